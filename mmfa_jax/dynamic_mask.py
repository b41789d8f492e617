"""Dynamic mask attention (Flash-DMA, the attention of Doge), JAX face: ``dynamic_mask_attention``
and ``zoh_states``.

Each key carries a score per KV head, ``zoh`` (from the values by a zero-order hold:
``zoh_states``). Each query row keeps, among the keys its masks allow, the ``keep_window_size`` with
the largest zoh, and attends to those only, with zoh added to the logits: Doge's
``prepare_dynamic_mask`` (transformers ``models/doge``) without its (B, H, T, S) mask. The kernels
(``mmfa_jax.kernels.dynamic_mask``) find each row's threshold on the device and visit, per query
tile, a compact list of candidate keys (~keep_window_size + block_q of them), gathering their K/V
rows: cost proportional to the kept keys, memory linear.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mmfa_jax import _checks, backends, kernels, tuning
from mmfa_jax._autodiff import _first_order_only, backward_delta
from mmfa_jax._checks import ArgumentError, ArgumentTypeError, Options
from mmfa_jax.kernels import dynamic_mask as dma
from mmfa_jax.kernels.common import block_size
from mmfa_jax.masking import band_visible, combine
from mmfa_jax.xla_attention import xla_attention


def dynamic_mask_attention(query, key, value, zoh, *, keep_window_size: int, is_causal: bool = True,
                           scale: float | None = None, segment_ids=None, query_seq_lengths=None,
                           key_value_seq_lengths=None, causal_alignment: _checks.Alignment = "top_left",
                           implementation: backends.Implementation | None = None, return_lse: bool = False,
                           layout: _checks.Layout = "BTNH", config: tuning.AttentionConfig | None = None):
    """Attention of each query over the ``keep_window_size`` allowed keys with the largest zoh.

    Shapes (layout "BTNH", jax's): query (B, T, N, H), key and value (B, S, K, H), K dividing N
    (GQA: query head n reads KV head n // (N // K); K/V are never repeated); zoh (B, K, S), one
    score per KV head and key (``zoh_states``). With ``layout="BNTH"`` the arrays are (B, N, T, H)
    and (B, K, S, H) (PyTorch's order); zoh stays (B, K, S).

    For query row t of head n (KV head h): the *allowed* keys are those the causal mask (aligned
    as ``causal_alignment`` says, as ``mmfa_jax.attention``), the key lengths and the segment ids
    allow. When more than ``keep_window_size`` are allowed, only the ``keep_window_size`` with the
    largest ``zoh[b, h, s]`` are kept; equal zoh go to the lower key index; a NaN zoh counts as
    larger than every number (as torch.topk orders it); -0 and +0 are equal. The logits
    ``scale * q.k + zoh[b, h, s]`` of the kept keys go through a softmax over the kept keys only.
    A row that keeps nothing (or lies at or past its query length) gives zeros and LSE -inf.

    Args:
      query, key, value: float16, bfloat16 or float32, one dtype; H up to 256 for the kernels.
      zoh: float (B, K, S), any float dtype; differentiable (its gradient sums the logits'
        gradients over the kept query rows and the GQA group).
      keep_window_size: keys kept per row, >= 1 (Doge's ``keep_window_size``). At least S: every
        allowed key is kept (attention with zoh as a bias).
      is_causal: the causal mask (default True, as Doge).
      scale: logit scale, default 1/sqrt(H).
      segment_ids: (B, T) int when T == S, or a pair ((B, T), (B, S)): a query sees only keys of
        its own segment. (The kernels then take a slower selection path: see the kernels' module.)
      query_seq_lengths, key_value_seq_lengths: (B,) int: rows at or past the query length give
        zeros; keys at or past the key length are not allowed.
      causal_alignment: "top_left" (query i sees keys j <= i) or "bottom_right" (query i sees keys
        j <= i + S - T: a decode step over a cache).
      implementation: "pallas" / "triton" (the kernels compiled for an NVIDIA GPU; "pallas" the
        default there), "interpret" (the same kernels in the Pallas interpreter), "xla" (plain jax:
        the (B, N, T, S) logits and kept mask, quadratic memory; the default elsewhere).
      return_lse: also return the log-sum-exp over the kept logits, (B, T, N) float32 ((B, N, T)
        with layout "BNTH"), differentiable.
      config: tiles of the kernels (``forward``'s block_q and block_k serve every kernel).

    Returns:
      The output, shaped and typed like ``query`` (and the LSE if asked); differentiable in query,
      key, value and zoh (first order with the kernels).
    """
    opts = Options.make(scale, is_causal, None, None, implementation, layout, config,
                        causal_alignment=causal_alignment)
    query, key, value, zoh = (_array(x, n) for x, n in ((query, "query"), (key, "key"), (value, "value"),
                                                         (zoh, "zoh")))
    static, d, ints = prepare(opts, keep_window_size, query, key, value, zoh, segment_ids, query_seq_lengths,
                              key_value_seq_lengths)
    if d.empty:
        out = jnp.zeros(query.shape, query.dtype)
        lse = jnp.full((d.batch, d.q_heads, d.q_len), -jnp.inf, jnp.float32)
    else:
        out, lse = _run(static, query, key, value, zoh, *ints)
    if layout == "BTNH":
        lse = jnp.swapaxes(lse, 1, 2)
    return (out, lse) if return_lse else out


def zoh_states(value, dt_proj, A, dt_bias=None, *, layout: _checks.Layout = "BTNH"):
    """Doge's zero-order hold: zoh = exp(A * softplus(V_flat @ dt_proj.T + dt_bias)), (B, K, S).

    Args:
      value: (B, S, K, H) (layout "BTNH"; (B, K, S, H) with "BNTH"), flattened per key to
        V_flat (B, S, K * H) head-major, as Doge's ``value_states.transpose(1, 2).reshape(B, S, -1)``.
      dt_proj: (K, K * H), the weight of Doge's ``dt_proj`` Linear; dt_bias: its bias (K,) or None.
      A: (K,), Doge's ``A`` parameter.

    Returns:
      zoh (B, K, S) in the dtype the inputs promote to; differentiable in every input (plain jax).
    """
    value, dt_proj, A = (_array(x, n) for x, n in ((value, "value"), (dt_proj, "dt_proj"), (A, "A")))
    layout = _checks.choice(layout, "layout", _checks.LAYOUTS)
    for name, x in (("value", value), ("dt_proj", dt_proj), ("A", A)) + ((("dt_bias", dt_bias),) if dt_bias is not None
                                                                          else ()):
        if _checks.dtype_name(jnp.asarray(x).dtype) not in _checks.FLOAT_DTYPES:
            raise ArgumentTypeError(f"{name} must be float16, bfloat16 or float32, got {_checks.dtype_name(x.dtype)}")
    if value.ndim != 4:
        raise ArgumentError(f"value must have rank 4, got shape {tuple(value.shape)}")
    if layout == "BNTH":
        value = jnp.swapaxes(value, 1, 2)
    B, S, K, H = value.shape
    if tuple(dt_proj.shape) != (K, K * H):
        raise ArgumentError(f"dt_proj must be (K, K * H) = {(K, K * H)} for value of {K} heads of dim {H}, got shape "
                            f"{tuple(dt_proj.shape)}")
    if tuple(A.shape) != (K,):
        raise ArgumentError(f"A must be (K,) = ({K},), got shape {tuple(A.shape)}")
    precision = lax.Precision.HIGHEST
    x = jnp.einsum("bsi,ki->bks", value.reshape(B, S, K * H), dt_proj, precision=precision)
    if dt_bias is not None:
        dt_bias = _array(dt_bias, "dt_bias")
        if tuple(dt_bias.shape) != (K,):
            raise ArgumentError(f"dt_bias must be (K,) = ({K},) or None, got shape {tuple(dt_bias.shape)}")
        x = x + dt_bias[None, :, None]
    return jnp.exp(A[None, :, None] * jax.nn.softplus(x))


# ------------------------------------------------------------------------------------------------
# Checks and the static problem.


def _array(x, name):
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise ArgumentTypeError(f"{name} must be an array, got {type(x).__name__} ({e})") from None


def _check_zoh(zoh, d: _checks.Dims):
    if _checks.dtype_name(zoh.dtype) not in _checks.FLOAT_DTYPES:
        raise ArgumentTypeError(f"zoh must be float16, bfloat16 or float32, got {_checks.dtype_name(zoh.dtype)}")
    want = (d.batch, d.kv_heads, d.kv_len)
    if tuple(zoh.shape) != want:
        raise ArgumentError(f"zoh must be (B, K, S) = {want} (one score per key/value head and key), got shape "
                            f"{tuple(zoh.shape)}")


def prepare(opts: Options, keep_window_size, query, key, value, zoh, segment_ids=None, query_seq_lengths=None,
            key_value_seq_lengths=None):
    """The checks of a call (on shapes and dtypes only: jax arrays and torch tensors alike) and its
    static problem: returns (static, dims, (q_seg, kv_seg, q_lengths, kv_lengths) as int32 jax
    arrays or None). For the torch face, which converts its tensors afterwards, the integer
    arrays are None when ``segment_ids`` and the lengths are not jax arrays (it passes its own)."""
    keep = _checks.integer(keep_window_size, "keep_window_size", minimum=1)
    d = _checks.check_attention(opts, query, key, value, None, None, segment_ids, query_seq_lengths,
                                key_value_seq_lengths)[0]
    _check_zoh(zoh, d)
    q_seg, kv_seg = _checks.segment_pair(segment_ids, d)
    ints = tuple(None if x is None or not isinstance(x, (jax.Array, np.ndarray)) else jnp.asarray(x).astype(jnp.int32)
                 for x in (q_seg, kv_seg, query_seq_lengths, key_value_seq_lengths))
    return _static(opts, d, keep, query.dtype), d, ints


@dataclasses.dataclass(frozen=True)
class _Static:
    dp: dma.DmaProblem
    config: tuning.AttentionConfig | None
    lowering: backends.Lowering


def _static(opts: Options, d: _checks.Dims, keep: int, dtype) -> _Static:
    problem = kernels.Problem(
        batch=d.batch, q_heads=d.q_heads, kv_heads=d.kv_heads, q_len=d.q_len, kv_len=d.kv_len, head_dim=d.head_dim,
        scale=opts.scale if opts.scale is not None else d.head_dim ** -0.5, softcap=None,
        band=opts.band(d.q_len, d.kv_len), layout=opts.layout, bias_shape=None, mask_shape=None,
        has_segments=False, has_q_lengths=False, has_kv_lengths=False,
        dot_precision="highest" if _checks.dtype_name(dtype) == "float32" else None)
    config, bq, bk = None, 16, 16
    if opts.lowering.kernels:
        table = opts.kernel_config(problem.head_dim_padded, dtype)
        fwd = table.forward_rows or table.forward
        bq, bk = dma.tile_positions(d.q_len, fwd.block_q, d.q_heads // d.kv_heads), block_size(d.kv_len, fwd.block_k)
        # The table's rows are tuned for the dense kernels: their stages are capped at 2 here. A
        # caller's configuration (a sweep's, ``bench/dma.py --sweep``) is taken as it is.
        stages = (lambda c: min(c.num_stages, 2)) if opts.config is None else (lambda c: c.num_stages)  # noqa: E731
        own = lambda c: tuning.KernelConfig(bq, bk, c.num_warps, stages(c))  # noqa: E731
        config = tuning.AttentionConfig(own(fwd), own(table.backward_dq), own(table.backward_dkv))
    return _Static(dma.DmaProblem(problem, keep, bq, bk), config, opts.lowering)


def _with_sides(static: _Static, q_seg, q_lengths, kv_lengths) -> _Static:
    """The static problem with the optional operands this call has."""
    p = dataclasses.replace(static.dp.problem, has_segments=q_seg is not None, has_q_lengths=q_lengths is not None,
                            has_kv_lengths=kv_lengths is not None)
    return dataclasses.replace(static, dp=dataclasses.replace(static.dp, problem=p))


@functools.partial(jax.jit, static_argnums=0)
def _run(static: _Static, q, k, v, zoh, q_seg, kv_seg, q_lengths, kv_lengths):
    """(out, lse (B, N, T)); jitted, so that an eager call compiles once per shape."""
    static = _with_sides(static, q_seg, q_lengths, kv_lengths)
    if not static.lowering.kernels:
        return _xla(static.dp, q, k, v, zoh, q_seg, kv_seg, q_lengths, kv_lengths)
    return _dma(static, q, k, v, zoh, q_seg, kv_seg, q_lengths, kv_lengths)


@functools.partial(jax.jit, static_argnums=0)
def forward(static: _Static, q, k, v, zoh, q_seg, kv_seg, q_lengths, kv_lengths):
    """Forward alone, for frameworks with their own autograd (the torch face): (out, lse (B, N, T))."""
    static = _with_sides(static, q_seg, q_lengths, kv_lengths)
    if not static.lowering.kernels:
        return _xla(static.dp, q, k, v, zoh, q_seg, kv_seg, q_lengths, kv_lengths)
    return _dma_fwd(static, q, k, v, zoh, q_seg, kv_seg, q_lengths, kv_lengths)[0]


@functools.partial(jax.jit, static_argnums=0)
def backward(static: _Static, q, k, v, zoh, q_seg, kv_seg, q_lengths, kv_lengths, out, lse, d_out, d_lse):
    """Gradients (dq, dk, dv, d_zoh) from the forward's results; the kernels' selection is run
    again (it is a small part of the work) rather than kept between the two calls."""
    static = _with_sides(static, q_seg, q_lengths, kv_lengths)
    if not static.lowering.kernels:
        _, vjp = jax.vjp(lambda q, k, v, z: _xla(static.dp, q, k, v, z, q_seg, kv_seg, q_lengths, kv_lengths),
                         q, k, v, zoh)
        return vjp((d_out, d_lse))
    selection = _select_kernels(static, zoh, q_seg, kv_seg, kv_lengths)
    residuals = (q, k, v, zoh, selection, q_seg, kv_seg, q_lengths, kv_lengths, out, lse)
    return _dma_bwd(static, residuals, (d_out, d_lse))[:4]


# ------------------------------------------------------------------------------------------------
# XLA: the kept mask in full, then dense attention with zoh as a bias.


def xla_kept(dp: dma.DmaProblem, zoh, q_seg, kv_seg, kv_lengths):
    """Boolean (B, K, T, S): the keys each row keeps, by one sort of each (batch, KV head)'s keys
    (best first) and a running count of the allowed ones in that order."""
    p = dp.problem
    B, K, S = zoh.shape
    _, order = dma.sort_keys(zoh)
    kv_valid = jnp.full((B,), S, jnp.int32) if kv_lengths is None else jnp.minimum(kv_lengths, S)
    k_pos = jnp.arange(S)
    allowed = combine((k_pos[None, :] < kv_valid[:, None])[:, None, :],
                      None if band_visible(p.band, jnp.arange(p.q_len), k_pos) is None
                      else band_visible(p.band, jnp.arange(p.q_len), k_pos)[None],
                      None if q_seg is None else q_seg[:, :, None] == kv_seg[:, None, :])
    allowed = jnp.broadcast_to(allowed[:, None], (B, K, p.q_len, S))
    in_order = jnp.take_along_axis(allowed, jnp.broadcast_to(order[:, :, None, :], allowed.shape), axis=3)
    kept_in_order = in_order & (jnp.cumsum(in_order, axis=3, dtype=jnp.int32) <= dp.keep)
    rank = jnp.argsort(order, axis=2)
    return jnp.take_along_axis(kept_in_order, jnp.broadcast_to(rank[:, :, None, :], allowed.shape), axis=3)


def _xla(dp: dma.DmaProblem, q, k, v, zoh, q_seg, kv_seg, q_lengths, kv_lengths):
    p = dp.problem
    G = p.group
    kept = xla_kept(dp, zoh, q_seg, kv_seg, kv_lengths)
    mask = jnp.repeat(kept, G, axis=1)  # (B, N, T, S)
    bias = jnp.repeat(zoh, G, axis=1)[:, :, None, :]  # (B, N, 1, S), differentiable
    dense = dataclasses.replace(p, bias_shape=(p.batch, p.q_heads), mask_shape=(p.batch, p.q_heads),
                                has_segments=False)
    return xla_attention(dense, q, k, v, bias, mask, None, None, q_lengths, kv_lengths)


# ------------------------------------------------------------------------------------------------
# The kernels, differentiated with their own backward.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dma(static, q, k, v, zoh, q_seg, kv_seg, q_lengths, kv_lengths):
    return _dma_fwd(static, q, k, v, zoh, q_seg, kv_seg, q_lengths, kv_lengths)[0]


def _dma_fwd(static, q, k, v, zoh, q_seg, kv_seg, q_lengths, kv_lengths):
    selection = _select_kernels(static, zoh, q_seg, kv_seg, kv_lengths)
    out, lse = _forward_kernels(static, q, k, v, zoh, *selection, q_seg, kv_seg, q_lengths, kv_lengths)
    return (out, lse), (q, k, v, zoh, selection, q_seg, kv_seg, q_lengths, kv_lengths, out, lse)


def _dma_bwd(static, residuals, cotangents):
    q, k, v, zoh, selection, q_seg, kv_seg, q_lengths, kv_lengths, out, lse = residuals
    d_out, d_lse = cotangents
    delta = backward_delta(out, d_out, d_lse, static.dp.problem.layout)
    dq, dk, dv, d_zoh = _backward_kernels(static, q, k, v, zoh, *selection, q_seg, kv_seg, q_lengths, kv_lengths,
                                          d_out, lse, delta)
    if static.dp.problem.layout == "BTNH":  # the accumulators are (B, K, S, D)
        dk, dv = jnp.swapaxes(dk, 1, 2), jnp.swapaxes(dv, 1, 2)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), d_zoh.astype(zoh.dtype), None, None, None, None


_dma.defvjp(_dma_fwd, _dma_bwd)


@_first_order_only
def _select_kernels(static, zoh, q_seg, kv_seg, kv_lengths):
    return dma.select(static.dp, static.config.forward, zoh, q_seg, kv_seg, kv_lengths, lowering=static.lowering)


@_first_order_only
def _forward_kernels(static, *args):
    return dma.forward(static.dp, static.config.forward, *args, lowering=static.lowering)


@_first_order_only
def _backward_kernels(static, *args):
    return dma.backward(static.dp, static.config.backward_dq, *args, lowering=static.lowering)
