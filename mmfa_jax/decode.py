"""Decode attention over a KV cache: ``decode_attention``, the split-KV (Flash-Decoding) kernels'
public face, and its plain-XLA path.

A decode step attends T (1 to 16) new query rows, the last T positions of each example's
sequence, to a cache of S entries of which the first ``kv_lengths[b]`` are valid. The kernels
(``mmfa_jax.kernels.decode``) split the cache across programs and merge the splits by their
log-sum-exp; the XLA path computes the same thing with plain jax ops.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mmfa_jax import _checks, backends
from mmfa_jax._checks import ArgumentError, ArgumentTypeError
from mmfa_jax.kernels.decode import MAX_QUERY_ROWS, DecodeProblem, make_problem


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything a decode call is specialised on (hashable: the jitted function's static argument)."""

    problem: DecodeProblem
    config: object  # tuning.KernelConfig of the partial kernel
    lowering: backends.Lowering


def decode_attention(query, key, value, *, kv_lengths=None, key_mask=None, scale: float | None = None,
                     logits_soft_cap: float | None = None, layout: _checks.Layout = "BTNH",
                     implementation: backends.Implementation | None = None, return_lse: bool = False,
                     splits: int | None = None):
    """Attention of a decode step: T new query rows against a KV cache, split over the cache.

    Shapes: layout "BTNH" (jax's): query (B, T, Hq, D), key and value (B, S, Hkv, D); layout
    "BNTH" (torch's, what a transformers KV cache holds): query (B, Hq, T, D), key and value
    (B, Hkv, S, D). Hq is a multiple of Hkv (GQA/MQA: query head n reads KV head n // (Hq // Hkv);
    K and V are read once per KV head, never repeated).

    Args:
      query, key, value: float16, bfloat16 or float32, one dtype; T from 1 to 16; D up to 256.
      kv_lengths: (B,) integers, default S: the valid cache entries of each example (clipped to
        [0, S]). Query row t of example b is at position kv_lengths[b] - T + t and sees keys
        j < kv_lengths[b] - T + 1 + t (bottom-right causal within the new rows; T = 1: every
        valid key). Entries at or past kv_lengths[b] are never read as values, so a cache's
        unwritten tail may hold anything (NaN included). A row that sees no key gives zeros
        (LSE -inf); a NaN among the keys or values a row sees makes its output NaN.
      key_mask: (B, S) bool, optional: False hides key s of example b from every row, on top of
        ``kv_lengths`` and the causal rule (left padding, a static cache's unwritten tail); hidden
        keys are never read as values either.
      scale: logit scale, default 1/sqrt(D).
      logits_soft_cap: c > 0 turns logits x into c * tanh(x / c).
      implementation: "pallas" / "triton" (the Pallas kernels compiled for an NVIDIA GPU; "pallas"
        is the default there), "interpret" (the same kernels in the Pallas interpreter), "xla"
        (plain jax; the default elsewhere). See ``mmfa_jax.backends``.
      return_lse: also return the log-sum-exp of each row's visible logits, (B, Hq, T) float32 in
        natural-log units (in both layouts).
      splits: how many parts each (example, KV head)'s cache is split into; default: about three
        waves of programs on an H200 (``mmfa_jax.kernels.decode.default_splits``), with at least a
        few key blocks per split. The result does not depend on it beyond rounding.

    Returns:
      The output, shaped and typed like ``query`` (and the LSE if ``return_lse``).
    """
    static, arrays = prepare(query, key, value, kv_lengths=kv_lengths, key_mask=key_mask, scale=scale,
                             logits_soft_cap=logits_soft_cap, layout=layout, implementation=implementation,
                             splits=splits)
    if static is None:  # some size is 0
        out, lse = arrays
    else:
        out, lse = run(static, *arrays)
    return (out, lse) if return_lse else out


def prepare(query, key, value, *, kv_lengths=None, key_mask=None, scale=None, logits_soft_cap=None, layout="BTNH",
            implementation=None, splits=None, capacity: int | None = None):
    """Check the arguments: returns (static, (query, key, value, kv_lengths, key_mask)) for ``run``, or
    (None, (out, lse)) when some size is 0. ``capacity``: compile the kernels for a cache of that
    many entries (>= S; K and V are then padded with NaN rows, which must never be read: the test
    of the kernels' runtime cache length, see ``mmfa_jax.kernels.decode``)."""
    layout = _checks.choice(layout, "layout", _checks.LAYOUTS)
    lowering = backends.resolve(implementation)
    query, key, value = (_array(x, name) for x, name in ((query, "query"), (key, "key"), (value, "value")))
    d = _checks.attention_dims(query, key, value, layout, xla=not lowering.kernels)
    if not 1 <= d.q_len <= MAX_QUERY_ROWS:
        raise ArgumentError(f"query must have 1 to {MAX_QUERY_ROWS} rows (T) for decode_attention, got T={d.q_len} "
                            f"(query shape {tuple(query.shape)}, layout {layout!r}); use mmfa_jax.attention with "
                            "causal_alignment='bottom_right' for longer queries")
    if kv_lengths is not None:
        kv_lengths = _array(kv_lengths, "kv_lengths")
        _checks.per_example(kv_lengths, "kv_lengths", (d.batch,))
    if key_mask is not None:
        key_mask = _array(key_mask, "key_mask")
        if tuple(key_mask.shape) != (d.batch, d.kv_len) or key_mask.dtype != jnp.bool_:
            raise ArgumentError(f"key_mask must be bool of shape (B, S) = {(d.batch, d.kv_len)}, got "
                                f"{key_mask.dtype} {tuple(key_mask.shape)}")
    scale = _checks.checked_scale(scale)
    softcap = _checks.checked_soft_cap(logits_soft_cap)
    if splits is not None:
        splits = _checks.integer(splits, "splits", minimum=1)
    if capacity is not None:
        capacity = _checks.integer(capacity, "capacity", minimum=d.kv_len)
    if d.empty:
        return None, (jnp.zeros(query.shape, query.dtype),
                      jnp.full((d.batch, d.q_heads, d.q_len), -jnp.inf, jnp.float32))
    problem, config = make_problem(
        batch=d.batch, q_heads=d.q_heads, kv_heads=d.kv_heads, q_len=d.q_len, kv_len=d.kv_len, head_dim=d.head_dim,
        dtype=query.dtype, scale=scale if scale is not None else d.head_dim ** -0.5, softcap=softcap, layout=layout,
        has_kv_lengths=kv_lengths is not None, has_key_mask=key_mask is not None, family=lowering.family,
        cc=lowering.cc, splits=splits, capacity=capacity)
    return _Static(problem, config, lowering), (query, key, value, kv_lengths, key_mask)


@functools.partial(jax.jit, static_argnums=0)
def run(static: _Static, query, key, value, kv_lengths, key_mask=None):
    """(out like query, lse (B, Hq, T) float32) of a prepared call; jitted, so that an eager call
    compiles once per shape (an eager ``pallas_call`` would compile on every call). ``key_mask``:
    bool, or int8 as the kernels read it (nonzero: seen)."""
    p, lowering = static.problem, static.lowering
    if kv_lengths is not None:
        kv_lengths = kv_lengths.astype(jnp.int32)
    if not lowering.kernels:
        return xla_decode(p, query, key, value, kv_lengths, None if key_mask is None else key_mask != 0)
    from mmfa_jax import kernels

    return kernels.decode(p, static.config, query, key, value, kv_lengths,
                          None if key_mask is None else key_mask.astype(jnp.int8), lowering=lowering)


def xla_decode(p: DecodeProblem, q, k, v, kv_lengths, key_mask=None):
    """The decode step in plain jax (float32 arithmetic), with the kernels' visibility and NaN
    rules. Returns (out like q, lse (B, Hq, T) float32)."""
    out_dtype = q.dtype
    if p.layout == "BNTH":  # compute in BTNH, hand back in the caller's layout
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    B, T, Hq, D = q.shape
    S, Hkv, G = k.shape[1], k.shape[2], p.group
    kv_valid = jnp.full((B,), S, jnp.int32) if kv_lengths is None else jnp.clip(kv_lengths, 0, S)
    limit = kv_valid[:, None] - (T - 1) + jnp.arange(T)[None, :]  # (B, T): row t sees keys j < limit
    visible = jnp.arange(S)[None, None, :] < limit[:, :, None]  # (B, T, S)
    readable = jnp.arange(S)[None, :] < kv_valid[:, None]  # (B, S): keys whose values may be read
    if key_mask is not None:
        visible &= key_mask[:, None, :]
        readable &= key_mask

    hi = jax.lax.Precision.HIGHEST
    s = jnp.einsum("btkgd,bskd->bkgts", q.reshape(B, T, Hkv, G, D), k, precision=hi)
    s = s * p.scale
    if p.softcap is not None:
        s = p.softcap * jnp.tanh(s / p.softcap)
    s = jnp.where(visible[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(m == -jnp.inf, 0.0, m)  # (NaN stays NaN)
    e = jnp.exp(s - m)
    l = jnp.sum(e, axis=-1, keepdims=True)
    live = l != 0
    safe_l = jnp.where(live, l, 1.0)
    probs = jnp.where(live, e / safe_l, 0.0)
    lse = jnp.where(live, m + jnp.log(safe_l), -jnp.inf)[..., 0].reshape(B, Hq, T)
    # Value rows past the length as 0: their probability is 0, and 0 * NaN would reach every row.
    v = jnp.where(readable[:, :, None, None], v, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, precision=hi).reshape(B, T, Hq, D).astype(out_dtype)
    if p.layout == "BNTH":
        out = jnp.swapaxes(out, 1, 2)
    return out, lse


def _array(x, name: str):
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return x
    try:
        return jnp.asarray(x)
    except TypeError:
        raise ArgumentTypeError(f"{name} must be an array, got {type(x).__name__}") from None


# Cache capacities a launcher compiles for (the kernels read the cache through its runtime length,
# so one compiled pair serves every length up to its capacity): multiples of 256 keys up to 2,048,
# then eight buckets per doubling, so a decode of n tokens meets about 8 * log2(n / 2048) kernels
# and a bucket is at most 1/8 larger than the cache it serves (work follows the real length).
CAPACITY_STEP, BUCKETS_PER_DOUBLING = 256, 8


def capacity_of(seq_len: int) -> int:
    """The bucket capacity (>= ``seq_len``) a launcher compiles the decode kernels for."""
    seq_len = max(1, int(seq_len))
    step = max(CAPACITY_STEP, (1 << (seq_len - 1).bit_length()) // (2 * BUCKETS_PER_DOUBLING))
    return -(-seq_len // step) * step
