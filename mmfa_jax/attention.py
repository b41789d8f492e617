"""The public dense attention of the JAX face: ``attention`` and ``attention_at_rows``.

``attention`` is a drop-in for ``jax.nn.dot_product_attention`` with the same layout, argument
names and meaning (``is_causal`` aligned top-left, ``return_residual``), plus GQA/MQA, soft capping,
segment ids, a named bottom-right alignment, the log-sum-exp, and Pallas kernels for forward and
backward. Arguments are checked in ``mmfa_jax._checks``, the backend chosen in
``mmfa_jax.backends``, gradients wired in ``mmfa_jax._autodiff``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmfa_jax import _autodiff, _checks, backends, tuning
from mmfa_jax._checks import ArgumentError, Options

Implementation = backends.Implementation
IMPLEMENTATIONS = backends.IMPLEMENTATIONS
pallas_available = backends.pallas_available
default_implementation = backends.default_implementation


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
    implementation: Implementation | None = None,
    return_residual: bool = False,
    logits_soft_cap: float | None = None,
    segment_ids=None,
    return_lse: bool = False,
    causal_alignment: _checks.Alignment = "top_left",
    config: tuning.AttentionConfig | None = None,
    layout: _checks.Layout = "BTNH",
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
      is_causal: causal mask, aligned as ``causal_alignment`` says (default top-left, as jax.nn:
        query i sees keys j <= i).
      query_seq_lengths: (B,) int; rows at or past the length give zeros (and LSE -inf).
      key_value_seq_lengths: (B,) int; keys at or past the length are invisible.
      local_window_size: w or (left, right): query i (at key position p, below) sees keys in
        [p - left, p + right]; None in a tuple leaves that side open.
      causal_alignment: where the diagonal of ``is_causal`` and the window sits when T != S:
        "top_left" (default; query i at key position i, as jax.nn, torch SDPA and Flax) or
        "bottom_right" (query i at key position i + S - T, so the last query sees the last key: a
        KV-cache decode step, FlashAttention's convention). For T == S both are the usual triangle.
      logits_soft_cap: c > 0 turns logits x into c * tanh(x / c) (Gemma 2), before the bias.
      segment_ids: (B, T) int when T == S, or a pair ((B, T), (B, S)): a query sees only keys
        of its own segment (packed sequences, several images in a row).
      return_lse: also return the log-sum-exp of the visible logits, (B, T, N) float32
        ((B, N, T) with layout "BNTH"); -inf where a row sees nothing; differentiable.
      return_residual: jax.nn's spelling: also return the log-sum-exp (B, T, N) in the query's
        dtype, without gradient. Not together with ``return_lse``.
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
    if return_lse and return_residual:
        raise ArgumentError("pass return_lse (float32, differentiable) or return_residual (jax.nn's: the query's "
                            "dtype, no gradient), not both")
    unbatched = jnp.ndim(query) == 3
    query, key, value = (_add_batch(x, name, unbatched) for x, name in ((query, "query"), (key, "key"), (value, "value")))
    opts = Options.make(scale, is_causal, local_window_size, logits_soft_cap, implementation, layout, config,
                        causal_alignment=causal_alignment)
    arrays = (query, key, value, bias, mask, segment_ids, query_seq_lengths, key_value_seq_lengths)
    d = _checks.check_attention(opts, *arrays)[0]
    if d.empty:  # some size is 0: nothing to compute, and rows that see no key give zeros
        out = jnp.zeros(query.shape, query.dtype)
        lse = jnp.full((d.batch, d.q_heads, d.q_len), -jnp.inf, jnp.float32)
    else:
        out, lse = _autodiff.differentiable(opts, *arrays)
    if layout == "BTNH":
        lse = jnp.swapaxes(lse, 1, 2)
    if unbatched:
        out, lse = out[0], lse[0]
    if return_residual:
        return out, jax.lax.stop_gradient(lse).astype(out.dtype)
    return (out, lse) if return_lse else out


dot_product_attention = attention


def attention_at_rows(query, rows, key, value, *, kv_rows=None, query_seq_lengths=None,
                      key_value_seq_lengths=None, scale=None, is_causal: bool = False, logits_soft_cap=None,
                      implementation=None, layout: str = "BTNH", config: tuning.AttentionConfig | None = None,
                      causal_alignment: _checks.Alignment = "top_left"):
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
    opts = Options.make(scale, is_causal, None, logits_soft_cap, implementation, layout, config,
                        causal_alignment=causal_alignment)
    seq = 1 if layout == "BTNH" else 2
    rows = _checked_rows(rows, "rows", query, seq)
    if kv_rows is not None:
        kv_rows = _checked_rows(jnp.asarray(kv_rows), "kv_rows", key, seq)
    return _autodiff.at_rows(opts, query, rows, key, value, kv_rows, query_seq_lengths, key_value_seq_lengths)


def _checked_rows(rows, name, x, seq: int):
    """int32 (B, T) row indices into the sequence axis of the rank-4 ``x``."""
    if x.ndim != 4 or rows.ndim != 2 or rows.shape[0] != x.shape[0] or not jnp.issubdtype(rows.dtype, jnp.integer):
        raise ArgumentError(f"{name} must be (B, T) integers for a rank-4 array of batch B, got {name} {rows.dtype} "
                         f"{rows.shape} and an array of shape {x.shape}")
    try:
        outside = bool(np.any((np.asarray(rows) < 0) | (np.asarray(rows) >= x.shape[seq])))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):  # traced: caller vouches
        outside = False
    if outside:
        raise ArgumentError(f"{name} must lie in [0, {x.shape[seq]}), the sequence axis of its array")
    return rows.astype(jnp.int32)


def _add_batch(x, name, unbatched):
    x = jnp.asarray(x)
    if x.ndim not in (3, 4):
        raise ArgumentError(f"{name} must have rank 4 (B, L, heads, H) or 3 (L, heads, H), got shape {x.shape}")
    if (x.ndim == 3) != unbatched:
        raise ArgumentError(f"{name} has rank {x.ndim} but query has rank {3 if unbatched else 4}: ranks must match")
    return x[None] if unbatched else x
