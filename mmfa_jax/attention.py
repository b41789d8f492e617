"""The public attention function of the JAX face: argument checks, normalisation, dispatch.

``attention`` is a drop-in for ``jax.nn.dot_product_attention`` with the same layout and argument
names, plus GQA/MQA, soft capping, segment ids, a bottom-right aligned causal mask, the
log-sum-exp, and Pallas kernels for forward and backward.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from mmfa_jax import triton_route, tuning
from mmfa_jax.kernels import flash_attention as flash
from mmfa_jax.masking import Band
from mmfa_jax.xla_attention import xla_attention

Implementation = Literal["pallas", "triton", "interpret", "xla"]
IMPLEMENTATIONS = ("pallas", "triton", "interpret", "xla")
COMPILED = ("pallas", "triton")  # the kernels compiled for a GPU (XLA's Triton or the official one)
SUPPORTED_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
MAX_HEAD_DIM = 256


def pallas_available(device: jax.Device | None = None) -> bool:
    """True where the Pallas kernels can run compiled: NVIDIA GPUs of compute capability >= 8.0
    (XLA's Triton), and 7.5 up to 8.0 (Turing) when the official ``triton`` package is installed
    (the Triton route, mmfa_jax.triton_route)."""
    cc = _compute_capability(device)
    if cc is None:
        return False
    return cc >= triton_route.STOCK_MIN_CC or (cc >= triton_route.MIN_CC and triton_route.available())


def _compute_capability(device: jax.Device | None = None) -> int | None:
    """75 for a Turing GPU, 90 for Hopper; None for anything but an NVIDIA GPU."""
    device = device or jax.devices()[0]
    cc = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or cc is None:
        return None
    return int(round(float(cc) * 10))


def default_implementation() -> str:
    return "pallas" if pallas_available() else "xla"


def attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int | None, int | None] | None = None,
    logits_soft_cap: float | None = None,
    segment_ids=None,
    return_lse: bool = False,
    implementation: Implementation | None = None,
    config: tuning.AttentionConfig | None = None,
    layout: Literal["BTNH", "BNTH"] = "BTNH",
):
    """Scaled dot-product attention, exact and memory-linear.

    Shapes (layout "BTNH", as ``jax.nn.dot_product_attention``): query (B, T, N, H), key and
    value (B, S, K, H), where K divides N (GQA/MQA: query head n reads key/value head
    n // (N // K); K/V are never repeated). The batch axis may be left out of all three (the
    per-example arrays, segment ids and lengths, keep theirs: batch 1).
    With ``layout="BNTH"`` the arrays are (B, N, T, H) and (B, K, S, H) instead (PyTorch's
    order; the output follows the same layout).

    Args:
      query, key, value: float16, bfloat16 or float32, one dtype; head dim H up to 256.
      bias: additive logits bias broadcastable to (B, N, T, S); differentiable.
      mask: boolean, broadcastable to (B, N, T, S); True keeps a logit.
      scale: logit scale, default 1/sqrt(H).
      is_causal: causal mask aligned bottom-right: query i sees keys j <= i + (S - T), so the
        last query sees the last key (for T == S this is the usual lower triangle).
      query_seq_lengths: (B,) int; rows at or past the length give zeros (and LSE -inf).
      key_value_seq_lengths: (B,) int; keys at or past the length are invisible.
      local_window_size: w or (left, right): query i (at key position i + S - T) sees keys in
        [i + S - T - left, i + S - T + right]; None in a tuple leaves that side open.
      logits_soft_cap: c > 0 turns logits x into c * tanh(x / c) (Gemma 2), before the bias.
      segment_ids: (B, T) int when T == S, or a pair ((B, T), (B, S)): a query sees only keys
        of its own segment (packed sequences, several images in a row).
      return_lse: also return the log-sum-exp of the visible logits, (B, T, N) float32
        ((B, N, T) with layout "BNTH"); -inf where a row sees nothing.
      implementation: "pallas" (Triton kernels; the default on NVIDIA GPUs: compiled by XLA's
        Triton on compute capability >= 8.0, by the official ``triton`` package on Turing, 7.5),
        "triton" (the same kernels, always compiled by the official ``triton`` package: see
        ``mmfa_jax.triton_route``), "interpret" (the same kernels in the Pallas interpreter, on any
        backend; slow, for tests), "xla" (plain jax, materialises (T, S) logits; the default
        elsewhere).
      config: block configuration override (see ``mmfa_jax.tuning``); default from the table.

    Returns:
      The attention output, shaped and typed like ``query`` (and the LSE if asked). A query
      row with no visible key gives zeros, never NaN.
    """
    unbatched = jnp.ndim(query) == 3
    query, key, value = (_add_batch(x, name, unbatched) for x, name in ((query, "query"), (key, "key"), (value, "value")))
    opts = Options.make(scale, is_causal, local_window_size, logits_soft_cap, implementation, layout, config)
    out, lse = _differentiable(opts, query, key, value, bias, mask, segment_ids, query_seq_lengths,
                               key_value_seq_lengths)
    if layout == "BTNH":
        lse = jnp.swapaxes(lse, 1, 2)
    if unbatched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


dot_product_attention = attention


@dataclasses.dataclass(frozen=True)
class Options:
    """The static (hashable) arguments of one attention call, checked."""

    scale: float | None
    is_causal: bool
    window: tuple[int | None, int | None]
    softcap: float | None
    implementation: str
    layout: str
    config: tuning.AttentionConfig | None

    @classmethod
    def make(cls, scale=None, is_causal=False, local_window_size=None, logits_soft_cap=None, implementation=None,
             layout="BTNH", config=None) -> "Options":
        if layout not in ("BTNH", "BNTH"):
            raise ValueError(f"layout must be 'BTNH' or 'BNTH', got {layout!r}")
        if scale is not None:
            scale = float(scale)
            if not math.isfinite(scale):
                raise ValueError(f"scale must be a finite number, got {scale}")
        if logits_soft_cap is not None:
            logits_soft_cap = float(logits_soft_cap)
            if not (logits_soft_cap > 0 and math.isfinite(logits_soft_cap)):
                raise ValueError(f"logits_soft_cap must be a positive finite number or None, got {logits_soft_cap}")
        if config is not None and not isinstance(config, tuning.AttentionConfig):
            raise TypeError(f"config must be a mmfa_jax.AttentionConfig or None, got {type(config).__name__}")
        return cls(scale, bool(is_causal), normalise_window(local_window_size), logits_soft_cap,
                   _check_implementation(implementation), layout, config)


def prepare(opts: Options, arrays, *, kv_rows: bool = False):
    """Check and normalise the arrays; returns ((problem, config, interpret), normalised arrays).
    kv_rows: the forward will read its key and value rows by index (``attention_at_rows``)."""
    problem, args = _normalise(opts, *arrays)
    config = None
    if opts.implementation != "xla":
        config = kernel_config(opts, problem.head_dim_padded, args[0].dtype).for_problem(
            problem.batch, problem.q_heads, problem.q_len, kv_rows=kv_rows)
    return (problem, config, opts.implementation == "interpret"), args


def kernel_config(opts: Options, head_dim_padded: int, dtype) -> tuning.AttentionConfig:
    """The block configuration of the kernels: the caller's, or the table's for this GPU; with
    implementation "triton", compiled by the official Triton (mmfa_jax.triton_route)."""
    config = opts.config
    if config is None:
        family = "any" if opts.implementation == "interpret" else tuning.gpu_family()
        config = tuning.config_for(head_dim_padded, dtype, family)
    return config.with_route("triton") if opts.implementation == "triton" else config


@functools.partial(jax.jit, static_argnums=0)
def _differentiable(opts: Options, *arrays):
    """(out, lse in (B, N, T)) with gradients: our backward kernels, or autodiff for xla.

    Jitted, so that an eager call costs one dispatch rather than one per normalising op."""
    static, args = prepare(opts, arrays)
    if opts.implementation == "xla":
        return xla_attention(static[0], *args)
    return _flash(static, *args)


@functools.partial(jax.jit, static_argnums=0)
def forward(opts: Options, query, key, value, bias=None, mask=None, segment_ids=None, query_seq_lengths=None,
            key_value_seq_lengths=None):
    """Forward alone, for frameworks that do their own autograd (the torch face).

    Batched arrays in ``opts.layout``; returns (out, lse (B, N, T) float32)."""
    static, args = prepare(opts, (query, key, value, bias, mask, segment_ids, query_seq_lengths,
                                  key_value_seq_lengths))
    if opts.implementation == "xla":
        return xla_attention(static[0], *args)
    return _flash_fwd(static, *args)[0]


@functools.partial(jax.jit, static_argnums=0)
def backward(opts: Options, query, key, value, bias, mask, segment_ids, query_seq_lengths, key_value_seq_lengths,
             out, lse, d_out, d_lse):
    """Gradients (dq, dk, dv, dbias) from the forward's residuals; dbias is (Bb, Nb, T, S), the
    bias broadcast over T and S only (None without a bias)."""
    static, args = prepare(opts, (query, key, value, bias, mask, segment_ids, query_seq_lengths,
                                  key_value_seq_lengths))
    if opts.implementation == "xla":
        def f(q, k, v, b):
            return xla_attention(static[0], q, k, v, b, *args[4:])
        _, vjp = jax.vjp(f, *args[:4])
        return vjp((d_out, d_lse))
    return _flash_bwd(static, (*args, out, lse), (d_out, d_lse))[:4]


def attention_at_rows(query, rows, key, value, *, kv_rows=None, query_seq_lengths=None,
                      key_value_seq_lengths=None, scale=None, is_causal: bool = False, logits_soft_cap=None,
                      implementation=None, layout: str = "BTNH", config: tuning.AttentionConfig | None = None):
    """``attention`` with the query rows ``query[b, rows[b]]`` (and, with ``kv_rows``, the key and
    value rows ``key[b, kv_rows[b]]``): what the pruning pipeline runs on its kept tokens. The
    Pallas forward reads those rows in place, so no gathered copies are made (the backward gathers
    them, and scatters their gradients back).

    Args:
      query: (B, Tq, N, H) ((B, N, Tq, H) for layout "BNTH"); rows: (B, T) int indices into its
        sequence axis, in [0, Tq). key, value: (B, S, K, H) (or (B, K, S, H)); kv_rows: None, or
        (B, S') int indices into their sequence axis, in [0, S). Indices are checked when
        concrete; under jit the caller vouches for them. The band of ``is_causal`` is taken in
        the rows' own order (row i against key i), as for gathered copies.
      The rest as for ``attention`` (no bias, mask or segments here); with ``kv_rows`` the
      table's ``forward_rows`` tiles are used where it has them.

    Returns:
      (B, T, N, H) (or (B, N, T, H)) output, gradients to query, key and value.
    """
    query, rows, key, value = (jnp.asarray(x) for x in (query, rows, key, value))
    opts = Options.make(scale, is_causal, None, logits_soft_cap, implementation, layout, config)
    seq = 1 if layout == "BTNH" else 2
    rows = _checked_rows(rows, "rows", query, seq)
    if kv_rows is not None:
        kv_rows = _checked_rows(jnp.asarray(kv_rows), "kv_rows", key, seq)
    return _at_rows(opts, query, rows, key, value, kv_rows, query_seq_lengths, key_value_seq_lengths)


def _checked_rows(rows, name, x, seq: int):
    """int32 (B, T) row indices into the sequence axis of the rank-4 ``x``."""
    if x.ndim != 4 or rows.ndim != 2 or rows.shape[0] != x.shape[0] or not jnp.issubdtype(rows.dtype, jnp.integer):
        raise ValueError(f"{name} must be (B, T) integers for a rank-4 array of batch B, got {name} {rows.dtype} "
                         f"{rows.shape} and an array of shape {x.shape}")
    try:
        outside = bool(np.any((np.asarray(rows) < 0) | (np.asarray(rows) >= x.shape[seq])))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):  # traced: caller vouches
        outside = False
    if outside:
        raise ValueError(f"{name} must lie in [0, {x.shape[seq]}), the sequence axis of its array")
    return rows.astype(jnp.int32)


def take_rows(x, rows, layout: str = "BTNH"):
    """x[b, rows[b]] along the sequence axis of a (B, L, N, H) or (B, N, L, H) array."""
    if layout == "BTNH":
        return jax.vmap(lambda xb, rb: xb[rb])(x, rows)
    return jax.vmap(lambda xb, rb: xb[:, rb])(x, rows)


def _add_rows(x, rows, values, layout: str):
    """x with ``values`` added at ``rows`` of its sequence axis (the transpose of ``take_rows``)."""
    if layout == "BTNH":
        return jax.vmap(lambda xb, rb, vb: xb.at[rb].add(vb))(x, rows, values)
    return jax.vmap(lambda xb, rb, vb: xb.at[:, rb].add(vb))(x, rows, values)


def _rows_shape(x, rows, layout: str):
    seq = 1 if layout == "BTNH" else 2
    return jax.ShapeDtypeStruct(x.shape[:seq] + (rows.shape[1],) + x.shape[seq + 1:], x.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _at_rows(opts: Options, query, rows, key, value, kv_rows, q_lengths, kv_lengths):
    if opts.implementation == "xla":
        q = take_rows(query, rows, opts.layout)
        k, v = (x if kv_rows is None else take_rows(x, kv_rows, opts.layout) for x in (key, value))
        return _differentiable(opts, q, k, v, None, None, None, q_lengths, kv_lengths)[0]
    # The checks and the kernels' problem are those of the gathered copies' shapes.
    k_view, v_view = (x if kv_rows is None else _rows_shape(x, kv_rows, opts.layout) for x in (key, value))
    static, (_, k, v, *_, q_lengths, kv_lengths) = prepare(
        opts, (_rows_shape(query, rows, opts.layout), k_view, v_view, None, None, None, q_lengths, kv_lengths),
        kv_rows=kv_rows is not None)
    if kv_rows is not None:  # prepare saw shapes only: the arrays themselves are read in place
        k, v = key, value
    return _flash_at_rows(static, query, rows, k, v, kv_rows, q_lengths, kv_lengths)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_at_rows(static, query, rows, k, v, kv_rows, q_len, kv_len):
    return _flash_at_rows_fwd(static, query, rows, k, v, kv_rows, q_len, kv_len)[0]


def _flash_at_rows_fwd(static, query, rows, k, v, kv_rows, q_len, kv_len):
    problem, config, interpret = static
    out, lse = flash.forward(problem, config.forward, query, k, v, None, None, None, None, q_len, kv_len,
                             q_source=rows, kv_source=kv_rows, interpret=interpret)
    return out, (query, rows, k, v, kv_rows, q_len, kv_len, out, lse)


def _flash_at_rows_bwd(static, residuals, d_out):
    query, rows, key, value, kv_rows, q_len, kv_len, out, lse = residuals
    layout = static[0].layout
    q = take_rows(query, rows, layout)
    k, v = (x if kv_rows is None else take_rows(x, kv_rows, layout) for x in (key, value))
    dq, dk, dv, _ = _flash_bwd(static, (q, k, v, None, None, None, None, q_len, kv_len, out, lse),
                               (d_out, jnp.zeros_like(lse)))[:4]
    # Rows past the lengths have zero gradients, so the repeated padding rows add nothing.
    if kv_rows is not None:
        dk, dv = (_add_rows(jnp.zeros_like(x), kv_rows, d, layout) for x, d in ((key, dk), (value, dv)))
    return _add_rows(jnp.zeros_like(query), rows, dq, layout), None, dk, dv, None, None, None


_flash_at_rows.defvjp(_flash_at_rows_fwd, _flash_at_rows_bwd)


# ----------------------------------------------------------------------------------------------
# The Pallas path, differentiated with our own backward kernels.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len):
    return _flash_fwd(static, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len)[0]


def _flash_fwd(static, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len):
    problem, config, interpret = static
    out, lse = flash.forward(problem, config.forward, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len,
                             interpret=interpret)
    return (out, lse), (q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len, out, lse)


def _flash_bwd(static, residuals, cotangents):
    problem, config, interpret = static
    q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len, out, lse = residuals
    d_out, d_lse = cotangents
    # delta = rowsum(o * do) - dlse: the LSE's own gradient folds into the same term.
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=3)  # over the head dim
    if problem.layout == "BTNH":
        delta = jnp.swapaxes(delta, 1, 2)
    delta = delta - d_lse
    dq, dk, dv, dbias = flash.backward(
        problem, config.backward_dq, config.backward_dkv, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len,
        d_out, lse, delta, interpret=interpret)
    if dbias is not None:
        bb, nb = problem.bias_shape
        dbias = jnp.sum(dbias, axis=tuple(a for a, n in ((0, bb), (1, nb)) if n == 1), keepdims=True)
        dbias = dbias.astype(bias.dtype)
    return dq, dk, dv, dbias, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# Argument checks and normalisation.


def _check_implementation(implementation):
    if implementation is None:
        return default_implementation()
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
    if implementation in COMPILED:
        check_compiled_available(implementation)
    return implementation


def check_compiled_available(implementation: str, device: jax.Device | None = None):
    """ValueError unless ``implementation`` ("pallas" or "triton") can run on the device."""
    dev = device or jax.devices()[0]
    cc = _compute_capability(dev)
    if cc is None or cc < triton_route.MIN_CC:
        raise ValueError(
            f"implementation={implementation!r} needs an NVIDIA GPU with compute capability >= 7.5, but the default "
            f"device is {dev.platform} ({getattr(dev, 'device_kind', '?')}); use 'interpret' (same kernels, "
            "interpreted) or 'xla'")
    if implementation == "triton" or cc < triton_route.STOCK_MIN_CC:
        triton_route.check_available()


def _add_batch(x, name, unbatched):
    x = jnp.asarray(x)
    if x.ndim not in (3, 4):
        raise ValueError(f"{name} must have rank 4 (B, L, heads, H) or 3 (L, heads, H), got shape {x.shape}")
    if (x.ndim == 3) != unbatched:
        raise ValueError(f"{name} has rank {x.ndim} but query has rank {3 if unbatched else 4}: ranks must match")
    return x[None] if unbatched else x


def _normalise(opts: Options, q, k, v, bias, mask, segment_ids, q_lengths, kv_lengths):
    layout, impl, scale = opts.layout, opts.implementation, opts.scale
    seq_axis, head_axis = (1, 2) if layout == "BTNH" else (2, 1)
    for name, x in (("query", q), ("key", k), ("value", v)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"query, key and value must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, T, N, H = q.shape[0], q.shape[seq_axis], q.shape[head_axis], q.shape[3]
    S, K = k.shape[seq_axis], k.shape[head_axis]
    if k.shape != v.shape:
        raise ValueError(f"key and value must have the same shape, got {k.shape} and {v.shape}")
    if k.shape[0] != B:
        raise ValueError(f"key/value batch {k.shape[0]} does not match query batch {B}")
    if k.shape[3] != H:
        raise ValueError(f"key/value head dim {k.shape[3]} does not match query head dim {H}")
    if K == 0 or N % K != 0:
        raise ValueError(f"the number of query heads ({N}) must be a multiple of the key/value heads ({K})")
    if T == 0 or S == 0 or H == 0:
        raise ValueError(f"sequence lengths and head dim must be positive, got T={T}, S={S}, H={H}")
    if H > MAX_HEAD_DIM and impl != "xla":
        raise ValueError(f"head dim {H} is over {MAX_HEAD_DIM}, the kernels' limit; use implementation='xla'")

    if scale is None:
        scale = 1.0 / math.sqrt(H)
    band = Band.make(T, S, opts.is_causal, opts.window)

    bias, bias_shape = _pair_array(bias, "bias", B, N, T, S, None)
    if bias is not None and bias.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"bias must be a float16, bfloat16 or float32 array, got {bias.dtype}")
    mask, mask_shape = _pair_array(mask, "mask", B, N, T, S, jnp.bool_)
    if mask is not None:
        mask = mask.astype(jnp.int8)
    q_seg, kv_seg = _check_segments(segment_ids, B, T, S)
    q_lengths = _check_lengths(q_lengths, "query_seq_lengths", B)
    kv_lengths = _check_lengths(kv_lengths, "key_value_seq_lengths", B)

    problem = flash.Problem(
        batch=B, q_heads=N, kv_heads=K, q_len=T, kv_len=S, head_dim=H, scale=scale, softcap=opts.softcap, band=band,
        layout=layout, bias_shape=bias_shape, mask_shape=mask_shape, has_segments=q_seg is not None,
        has_q_lengths=q_lengths is not None, has_kv_lengths=kv_lengths is not None,
        dot_precision="highest" if q.dtype == jnp.float32 else None)
    return problem, (q, k, v, bias, mask, q_seg, kv_seg, q_lengths, kv_lengths)


def normalise_window(window) -> tuple[int | None, int | None]:
    """local_window_size as (left, right), None for an open side; ValueError when malformed."""
    if window is None:
        return (None, None)
    if isinstance(window, (int, np.integer)) and not isinstance(window, bool):
        window = (int(window), int(window))
    if not (isinstance(window, (tuple, list)) and len(window) == 2):
        raise ValueError(f"local_window_size must be an int, a pair (left, right) or None, got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        if w is not None and (not isinstance(w, (int, np.integer)) or isinstance(w, bool) or w < 0):
            raise ValueError(f"local_window_size {side} must be a non-negative int or None, got {w!r}")
        out.append(None if w is None else int(w))
    return tuple(out)


def _pair_array(x, name, B, N, T, S, dtype):
    """Broadcast a bias or mask to (Bb, Nb, T, S) with Bb in {1, B}, Nb in {1, N}."""
    if x is None:
        return None, None
    x = jnp.asarray(x)
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must be a boolean array, got dtype {x.dtype}")
    if not 2 <= x.ndim <= 4:
        raise ValueError(f"{name} must be broadcastable to (B, N, T, S) = {(B, N, T, S)}, got shape {x.shape}")
    shape = (1,) * (4 - x.ndim) + x.shape
    for got, want, axis in zip(shape, (B, N, T, S), "BNTS"):
        if got not in (1, want):
            raise ValueError(
                f"{name} must be broadcastable to (B, N, T, S) = {(B, N, T, S)}, got shape {x.shape} "
                f"(axis {axis}: {got})")
    bb, nb = shape[0], shape[1]
    return jnp.broadcast_to(x.reshape(shape), (bb, nb, T, S)), (bb, nb)


def _check_segments(segment_ids, B, T, S):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError("segment_ids must be one (B, T) array or a pair (query (B, T), key/value (B, S))")
        q_seg, kv_seg = segment_ids
    else:
        if T != S:
            raise ValueError(f"segment_ids as one array needs T == S (got T={T}, S={S}); pass a pair (q, kv)")
        q_seg = kv_seg = segment_ids
    q_seg, kv_seg = jnp.asarray(q_seg), jnp.asarray(kv_seg)
    for name, x, L in (("segment_ids (query)", q_seg, T), ("segment_ids (key/value)", kv_seg, S)):
        if x.shape != (B, L):
            raise ValueError(f"{name} must have shape {(B, L)}, got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name} must be integers, got {x.dtype}")
    return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def _check_lengths(lengths, name, B):
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    if lengths.shape != (B,):
        raise ValueError(f"{name} must have shape (B,) = {(B,)}, got {lengths.shape}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{name} must be integers, got {lengths.dtype}")
    return lengths.astype(jnp.int32)
