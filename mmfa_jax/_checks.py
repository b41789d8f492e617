"""The one argument layer: arrays and options in, a validated problem out; shapes and dtypes only.

Both faces (and the transformers integration) check their arguments here, so one rule and one
message hold everywhere. The functions look at ``.shape`` and ``.dtype`` only, so they take jax
arrays, ``jax.ShapeDtypeStruct`` and torch tensors alike (the torch face converts its layout first).

Errors name the argument and the value passed. They are ``ArgumentError`` (a ``ValueError``) and
``ArgumentTypeError`` (a ``TypeError``); both are also ``RuntimeError``, which is what torch's SDPA
raises for the same mistakes, so code that catches either face's errors catches mmfa's.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Literal

import numpy as np

from mmfa_jax import backends, tuning
from mmfa_jax.masking import Band

LAYOUTS = ("BTNH", "BNTH")
ALIGNMENTS = ("top_left", "bottom_right")
FLOAT_DTYPES = ("float16", "bfloat16", "float32")
MAX_HEAD_DIM = 256
Layout = Literal["BTNH", "BNTH"]
Alignment = Literal["top_left", "bottom_right"]


class ArgumentError(ValueError, RuntimeError):
    """An argument has a value or shape mmfa cannot take; the message names it."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument has a type or dtype mmfa cannot take; the message names it."""


def dtype_name(dtype) -> str:
    """"float32", "bfloat16", "bool", "int32"...: one spelling for jax, numpy and torch dtypes."""
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------
# Scalars and options.


def real(value, name: str) -> float:
    """A finite real number (Python or numpy, not bool)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ArgumentError(f"{name} must be finite, got {value}")
    return value


def integer(value, name: str, *, minimum: int | None = None) -> int:
    """A Python or numpy integer (not bool), at least ``minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value}")
    return value


def checked_scale(value) -> float | None:
    return None if value is None else real(value, "scale")


def checked_soft_cap(value) -> float | None:
    """``logits_soft_cap``: None, or a positive finite number."""
    if value is None:
        return None
    value = real(value, "logits_soft_cap")
    if value <= 0:
        raise ArgumentError(f"logits_soft_cap must be a positive finite number or None, got {value}")
    return value


def checked_window(value) -> tuple[int | None, int | None]:
    """``local_window_size`` as (left, right), None for an open side."""
    if value is None:
        return (None, None)
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        value = (int(value), int(value))
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ArgumentError(f"local_window_size must be an int, a pair (left, right) or None, got {value!r}")
    out = []
    for side, w in zip(("left", "right"), value):
        if w is not None:
            if isinstance(w, (bool, np.bool_)) or not isinstance(w, numbers.Integral) or w < 0:
                raise ArgumentError(f"local_window_size {side} must be a non-negative int or None, got {w!r}")
            w = int(w)
        out.append(w)
    return tuple(out)


def choice(value, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ArgumentError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def no_dropout(value, name: str = "dropout_p"):
    if value is None:
        return
    if real(value, name) != 0.0:
        raise ArgumentError(f"{name} must be 0: mmfa attention has no dropout (got {value})")


@dataclasses.dataclass(frozen=True)
class Options:
    """The static (hashable) arguments of one attention call, checked, with the backend resolved."""

    scale: float | None
    is_causal: bool
    alignment: str  # where the causal diagonal and the window sit when T != S: "top_left" or "bottom_right"
    window: tuple[int | None, int | None]
    softcap: float | None
    lowering: backends.Lowering
    layout: str
    config: tuning.AttentionConfig | None

    @classmethod
    def make(cls, scale=None, is_causal=False, local_window_size=None, logits_soft_cap=None, implementation=None,
             layout="BTNH", config=None, *, causal_alignment="top_left",
             target: backends.Target | None = None) -> "Options":
        if config is not None and not isinstance(config, tuning.AttentionConfig):
            raise ArgumentTypeError(f"config must be a mmfa_jax.AttentionConfig or None, got {type(config).__name__}")
        return cls(checked_scale(scale), bool(is_causal), choice(causal_alignment, "causal_alignment", ALIGNMENTS),
                   checked_window(local_window_size), checked_soft_cap(logits_soft_cap),
                   backends.resolve(implementation, target), choice(layout, "layout", LAYOUTS), config)

    @property
    def implementation(self) -> str:
        """The backend's kind as the user names it ("pallas" for either compiled backend)."""
        return {"xla-triton": "pallas", "triton-route": "triton"}.get(self.lowering.backend, self.lowering.backend)

    def band(self, q_len: int, kv_len: int) -> Band:
        return Band.make(q_len, kv_len, self.is_causal, self.window, bottom_right=self.alignment == "bottom_right")

    def kernel_config(self, head_dim_padded: int, dtype) -> tuning.AttentionConfig:
        """The block configuration of the kernels: the caller's, or the table's for the backend's
        GPU family."""
        return self.config or tuning.config_for(head_dim_padded, dtype_name(dtype), self.lowering.family)


# ------------------------------------------------------------------------------------------------
# Arrays.


@dataclasses.dataclass(frozen=True)
class Dims:
    """The sizes of one attention call: query (B, T, N, H), key/value (B, S, K, H)."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int

    @property
    def empty(self) -> bool:
        """No output element depends on a key: some size is 0."""
        return 0 in (self.batch, self.q_heads, self.q_len, self.head_dim, self.kv_len)


def attention_dims(q, k, v, layout: str, *, xla: bool = False) -> Dims:
    """Checks query, key and value (rank 4 in ``layout``) and returns their sizes."""
    seq, heads = (1, 2) if layout == "BTNH" else (2, 1)
    for name, x in (("query", q), ("key", k), ("value", v)):
        if dtype_name(x.dtype) not in FLOAT_DTYPES:
            raise ArgumentTypeError(f"{name} must be float16, bfloat16 or float32, got {dtype_name(x.dtype)}")
        if len(x.shape) != 4:
            raise ArgumentError(f"{name} must have rank 4, got shape {tuple(x.shape)}")
    if not (dtype_name(q.dtype) == dtype_name(k.dtype) == dtype_name(v.dtype)):
        raise ArgumentTypeError(f"query, key and value must share a dtype, got {dtype_name(q.dtype)}, "
                                f"{dtype_name(k.dtype)}, {dtype_name(v.dtype)}")
    B, T, N, H = q.shape[0], q.shape[seq], q.shape[heads], q.shape[3]
    S, K = k.shape[seq], k.shape[heads]
    if tuple(k.shape) != tuple(v.shape):
        raise ArgumentError(f"key and value must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ArgumentError(f"key/value batch {k.shape[0]} does not match query batch {B}")
    if k.shape[3] != H:
        raise ArgumentError(f"key/value head dim {k.shape[3]} does not match query head dim {H}")
    if (K == 0) != (N == 0) or (K and N % K):
        raise ArgumentError(f"the number of query heads ({N}) must be a multiple of the key/value heads ({K})")
    if H > MAX_HEAD_DIM and not xla:
        raise ArgumentError(f"head dim {H} is over {MAX_HEAD_DIM}, the kernels' limit; use implementation='xla'")
    return Dims(B, N, K, T, S, H)


def broadcast_pair(x, name: str, d: Dims, *, boolean: bool) -> tuple[int, int] | None:
    """A bias or mask broadcastable to (B, N, T, S), as jax.nn and torch SDPA take it (rank 0 to 4,
    each axis 1 or full): returns its (Bb, Nb), the batch and head extents it keeps."""
    if x is None:
        return None
    kind = dtype_name(x.dtype)
    if boolean and kind != "bool":
        raise ArgumentTypeError(f"{name} must be a boolean array, got dtype {kind}")
    if not boolean and kind not in FLOAT_DTYPES:
        raise ArgumentTypeError(f"{name} must be a float16, bfloat16 or float32 array, got {kind}")
    want = (d.batch, d.q_heads, d.q_len, d.kv_len)
    if len(x.shape) > 4:
        raise ArgumentError(f"{name} must be broadcastable to (B, N, T, S) = {want}, got shape {tuple(x.shape)}")
    shape = (1,) * (4 - len(x.shape)) + tuple(x.shape)
    for got, size, axis in zip(shape, want, "BNTS"):
        if got not in (1, size):
            raise ArgumentError(f"{name} must be broadcastable to (B, N, T, S) = {want}, got shape {tuple(x.shape)} "
                                f"(axis {axis}: {got})")
    return shape[0], shape[1]


def per_example(x, name: str, shape: tuple[int, ...]):
    """An integer array of exactly ``shape`` (segment ids, lengths)."""
    if x is None:
        return
    if tuple(x.shape) != tuple(shape):
        raise ArgumentError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    kind = dtype_name(x.dtype)
    if not (kind.startswith("int") or kind.startswith("uint")):
        raise ArgumentTypeError(f"{name} must be integers, got {kind}")


def segment_pair(segment_ids, d: Dims):
    """(query segments, key/value segments) from one (B, T) array (T == S) or a pair; checked."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ArgumentError("segment_ids must be one (B, T) array or a pair (query (B, T), key/value (B, S)), "
                                f"got a sequence of {len(segment_ids)}")
        q_seg, kv_seg = segment_ids
    else:
        if d.q_len != d.kv_len:
            raise ArgumentError(f"segment_ids as one array needs T == S (got T={d.q_len}, S={d.kv_len}); "
                                "pass a pair (query, key/value)")
        q_seg = kv_seg = segment_ids
    per_example(q_seg, "segment_ids (query)", (d.batch, d.q_len))
    per_example(kv_seg, "segment_ids (key/value)", (d.batch, d.kv_len))
    return q_seg, kv_seg


def check_attention(opts: Options, q, k, v, bias=None, mask=None, segment_ids=None, q_lengths=None,
                    kv_lengths=None, *, bias_name: str = "bias",
                    mask_name: str = "mask") -> tuple[Dims, tuple[int, int] | None, tuple[int, int] | None]:
    """Every check of an attention call: (dims, (Bb, Nb) of the bias, (Bm, Nm) of the mask).
    ``bias_name`` / ``mask_name``: what the caller's user calls them (torch: both ``attn_mask``)."""
    d = attention_dims(q, k, v, opts.layout, xla=not opts.lowering.kernels)
    bias_shape = broadcast_pair(bias, bias_name, d, boolean=False)
    mask_shape = broadcast_pair(mask, mask_name, d, boolean=True)
    segment_pair(segment_ids, d)
    per_example(q_lengths, "query_seq_lengths", (d.batch,))
    per_example(kv_lengths, "key_value_seq_lengths", (d.batch,))
    return d, bias_shape, mask_shape


# ------------------------------------------------------------------------------------------------
# Pruning.


@dataclasses.dataclass(frozen=True)
class Keep:
    """How many visual tokens an example keeps: a ratio in (0, 1] of its visual tokens (rounded
    up), or a count (at most all of them). Exactly one is set; hashable, so a ratio of 1.0 and a
    count of 1 never share a cache entry."""

    ratio: float | None = None
    count: int | None = None

    def __str__(self) -> str:
        return f"keep={self.ratio}" if self.count is None else f"keep_count={self.count}"


def checked_keep(ratio=None, count=None) -> Keep:
    """The one validator of ``keep`` (a ratio in (0, 1]) and ``keep_count`` (a count >= 1), of
    which exactly one is given."""
    if isinstance(ratio, Keep) and count is None:
        return ratio
    if (ratio is None) == (count is None):
        raise ArgumentError(f"pass exactly one of keep (a ratio in (0, 1]) and keep_count (a count of visual "
                            f"tokens), got keep={ratio!r}, keep_count={count!r}")
    if count is not None:
        if isinstance(count, (bool, np.bool_)) or not isinstance(count, numbers.Integral):
            raise ArgumentTypeError(f"keep_count must be a positive integer, got {count!r}")
        if count < 1:
            raise ArgumentError(f"keep_count must be >= 1, got {int(count)}")
        return Keep(count=int(count))
    if isinstance(ratio, (bool, np.bool_)) or not isinstance(ratio, numbers.Real):
        raise ArgumentTypeError(f"keep must be a ratio in (0, 1] (use keep_count= for a count), got {ratio!r}")
    value = float(ratio)
    if not 0.0 < value <= 1.0:  # (NaN fails this too)
        hint = f"; for a count of {int(value)} tokens pass keep_count={int(value)}" if value > 1 and value.is_integer() \
            else ""
        raise ArgumentError(f"keep must be a ratio in (0, 1], got {ratio!r}{hint}")
    return Keep(ratio=value)
