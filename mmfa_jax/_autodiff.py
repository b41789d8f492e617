"""The custom_vjp wiring of attention: checked arguments in, the kernels (or XLA) forward and backward.

``prepare`` turns checked options and arrays into the kernels' static problem and normalised
arrays; ``differentiable`` is attention with gradients (our backward kernels under a custom_vjp,
jax's autodiff for the XLA backend); ``forward`` and ``backward`` are the two halves for
frameworks with their own autograd (the torch face through JAX); ``at_rows`` is attention over
rows read by index (the pruning pipeline), with its own custom_vjp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mmfa_jax import _checks, kernels
from mmfa_jax._checks import Options
from mmfa_jax.xla_attention import xla_attention


def prepare(opts: Options, arrays, *, kv_rows: bool = False):
    """Check and normalise the arrays (q, k, v, bias, mask, segment_ids, query lengths, key/value
    lengths; batched, in ``opts.layout``): returns ((problem, config, lowering), normalised arrays),
    config None for the XLA backend. kv_rows: the forward will read its key and value rows by index."""
    q, k, v, bias, mask, segment_ids, q_lengths, kv_lengths = arrays
    d, bias_shape, mask_shape = _checks.check_attention(opts, *arrays)
    q_seg, kv_seg = _checks.segment_pair(segment_ids, d)
    problem = kernels.Problem(
        batch=d.batch, q_heads=d.q_heads, kv_heads=d.kv_heads, q_len=d.q_len, kv_len=d.kv_len, head_dim=d.head_dim,
        scale=opts.scale if opts.scale is not None else d.head_dim ** -0.5, softcap=opts.softcap,
        band=opts.band(d.q_len, d.kv_len), layout=opts.layout, bias_shape=bias_shape, mask_shape=mask_shape,
        has_segments=q_seg is not None, has_q_lengths=q_lengths is not None, has_kv_lengths=kv_lengths is not None,
        dot_precision="highest" if _checks.dtype_name(q.dtype) == "float32" else None)
    if bias is not None:
        bias = _pair(bias, bias_shape, d)
    if mask is not None:
        mask = _pair(mask, mask_shape, d).astype(jnp.int8)
    q_seg, kv_seg, q_lengths, kv_lengths = (None if x is None else jnp.asarray(x).astype(jnp.int32)
                                            for x in (q_seg, kv_seg, q_lengths, kv_lengths))
    config = None
    if opts.lowering.kernels:
        config = opts.kernel_config(problem.head_dim_padded, q.dtype).for_problem(
            problem.batch, problem.q_heads, problem.q_len, kv_rows=kv_rows)
    return (problem, config, opts.lowering), (q, k, v, bias, mask, q_seg, kv_seg, q_lengths, kv_lengths)


def _pair(x, kept: tuple[int, int], d: _checks.Dims):
    """A bias or mask as the kernels take it: (Bb, Nb, T, S)."""
    x = jnp.asarray(x)
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    return jnp.broadcast_to(x, (*kept, d.q_len, d.kv_len))


@functools.partial(jax.jit, static_argnums=0)
def differentiable(opts: Options, *arrays):
    """(out, lse in (B, N, T)) with gradients: our backward kernels, or autodiff for xla.

    Jitted, so that an eager call costs one dispatch rather than one per normalising op."""
    static, args = prepare(opts, arrays)
    if not opts.lowering.kernels:
        return xla_attention(static[0], *args)
    return _flash(static, *args)


@functools.partial(jax.jit, static_argnums=0)
def forward(opts: Options, query, key, value, bias=None, mask=None, segment_ids=None, query_seq_lengths=None,
            key_value_seq_lengths=None):
    """Forward alone, for frameworks that do their own autograd (the torch face).

    Batched arrays in ``opts.layout``; returns (out, lse (B, N, T) float32)."""
    static, args = prepare(opts, (query, key, value, bias, mask, segment_ids, query_seq_lengths,
                                  key_value_seq_lengths))
    if not opts.lowering.kernels:
        return xla_attention(static[0], *args)
    return _flash_fwd(static, *args)[0]


@functools.partial(jax.jit, static_argnums=0)
def backward(opts: Options, query, key, value, bias, mask, segment_ids, query_seq_lengths, key_value_seq_lengths,
             out, lse, d_out, d_lse):
    """Gradients (dq, dk, dv, dbias) from the forward's residuals; dbias is (Bb, Nb, T, S), the
    bias broadcast over T and S only (None without a bias)."""
    static, args = prepare(opts, (query, key, value, bias, mask, segment_ids, query_seq_lengths,
                                  key_value_seq_lengths))
    if not opts.lowering.kernels:
        def f(q, k, v, b):
            return xla_attention(static[0], q, k, v, b, *args[4:])
        _, vjp = jax.vjp(f, *args[:4])
        return vjp((d_out, d_lse))
    return _flash_bwd(static, (*args, out, lse), (d_out, d_lse))[:4]


# ----------------------------------------------------------------------------------------------
# The Pallas path, differentiated with our own backward kernels.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len):
    return _flash_fwd(static, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len)[0]


def _flash_fwd(static, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len):
    out, lse = _forward_kernels(static, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len, None, None)
    return (out, lse), (q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len, out, lse)


def backward_delta(out, d_out, d_lse, layout: str, *, f32=lambda x: x.astype(jnp.float32)):
    """delta = rowsum(o * do) - dlse, (B, N, T) float32: the LSE's own gradient folds into the same
    term. Written with methods jax arrays and torch tensors share, so the torch launch runs this
    same function (with ``f32=Tensor.float``)."""
    delta = (f32(out) * f32(d_out)).sum(axis=3)  # over the head dim
    if layout == "BTNH":
        delta = delta.swapaxes(1, 2)
    return delta - d_lse


def reduce_dbias(dbias, bias_shape: tuple[int, int]):
    """The dQ kernel's (B, N, T, S) float32 bias gradient summed over the axes the bias broadcast
    (it kept (Bb, Nb)); jax arrays and torch tensors alike."""
    axes = tuple(a for a, n in ((0, bias_shape[0]), (1, bias_shape[1])) if n == 1)
    return dbias.sum(axis=axes, keepdims=True) if axes else dbias


def _flash_bwd(static, residuals, cotangents):
    problem, config, lowering = static
    q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len, out, lse = residuals
    d_out, d_lse = cotangents
    delta = backward_delta(out, d_out, d_lse, problem.layout)
    dq, dk, dv, dbias = _backward_kernels(static, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len, d_out, lse,
                                          delta)
    if dbias is not None:
        dbias = reduce_dbias(dbias, problem.bias_shape).astype(bias.dtype)
    return dq, dk, dv, dbias, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


class DoubleBackwardError(NotImplementedError):
    """Second-order gradients (double backward) of mmfa's attention kernels are not implemented."""


DOUBLE_BACKWARD = ("second-order gradients (double backward, e.g. jax.grad of jax.grad, or a Hessian) of mmfa "
                   "attention are not supported: its kernels have no derivative of their own. Use "
                   "implementation='xla' for higher-order derivatives")


def _first_order_only(kernels):
    """``kernels(static, *arrays)`` behind a custom_jvp whose rule raises ``DoubleBackwardError``:
    first-order gradients never differentiate the kernels themselves (the custom_vjp supplies
    them), so only a second-order derivative reaches the rule, which would otherwise fail deep
    inside Pallas."""
    guarded = jax.custom_jvp(kernels, nondiff_argnums=(0,))

    def refuse(static, primals, tangents):
        raise DoubleBackwardError(DOUBLE_BACKWARD)

    guarded.defjvp(refuse)
    return guarded


@_first_order_only
def _forward_kernels(static, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len, q_source, kv_source):
    problem, config, lowering = static
    return kernels.forward(problem, config.forward, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len,
                         q_source=q_source, kv_source=kv_source, lowering=lowering)


@_first_order_only
def _backward_kernels(static, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len, d_out, lse, delta):
    problem, config, lowering = static
    return kernels.backward(problem, config.backward_dq, config.backward_dkv, q, k, v, bias, mask, q_seg, kv_seg,
                          q_len, kv_len, d_out, lse, delta, lowering=lowering)


# ----------------------------------------------------------------------------------------------
# Rows read by index: the pruning pipeline's attention over its kept tokens.


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
def at_rows(opts: Options, query, rows, key, value, kv_rows, q_lengths, kv_lengths):
    """(B, T, N, H) attention of the rows ``query[b, rows[b]]`` over ``key[b, kv_rows[b]]`` (all keys
    without ``kv_rows``), differentiable; the kernels read the rows in place."""
    if not opts.lowering.kernels:
        q = take_rows(query, rows, opts.layout)
        k, v = (x if kv_rows is None else take_rows(x, kv_rows, opts.layout) for x in (key, value))
        return differentiable(opts, q, k, v, None, None, None, q_lengths, kv_lengths)[0]
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
    out, lse = _forward_kernels(static, query, k, v, None, None, None, None, q_len, kv_len, rows, kv_rows)
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
