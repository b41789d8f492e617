"""The flash-attention backward kernels: dQ (and the bias gradient) per query tile, dK/dV per key
tile looping over its GQA group (no atomics, no repeated K/V)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmfa_jax import plans
from mmfa_jax.backends import Lowering
from mmfa_jax.kernels.common import (
    LOG2E,
    HeadView,
    Problem,
    Side,
    block_size,
    column_mask,
    common_in_specs,
    dot,
    heads_inside_tiles,
    load,
    logits,
    query_tile,
    row_spec,
    scalar,
    seq_spec,
    skip_dead_rows,
    three_ranges,
    tile_grid,
)
from mmfa_jax.masking import combine, kv_block_range, q_block_range
from mmfa_jax.tuning import KernelConfig

# --------------------------------------------------------------------------------------------
# Backward. With s the natural-log logits after bias, p = exp(s - lse) and
#   dv = p^T do,  dp = do v^T,  ds = p (dp - delta),  delta = rowsum(o * do) - dlse,
#   d(bias) = ds,  d(qk) = ds * scale * (1 - tanh^2 if soft-capped),  dq = d(qk) k,  dk = d(qk)^T q.
# Rows whose LSE is -inf (nothing visible, or past the query length) get LSE +inf here, which
# makes their p exactly 0.


def backward_lse(lse):
    return jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)


def _grad_logits(p: Problem, probs, dp, delta, tanh):
    ds = probs * (dp - delta[:, None])
    dqk = ds * p.scale
    if tanh is not None:
        dqk = dqk * (1.0 - tanh * tanh)
    return ds, dqk


def _dq_kernel(q_ref, k_ref, v_ref, bias_ref, mask_ref, qseg_ref, kvseg_ref, qlen_ref, kvlen_ref,
               do_ref, lse_ref, delta_ref, dq_ref, *dbias_refs, p: Problem, block_q: int, block_k: int,
               tile_axis: int):
    dbias_ref = dbias_refs[0] if dbias_refs else None
    t = query_tile(p, tile_axis)
    q_start = t * block_q
    q_pos = q_start + jnp.arange(block_q)
    q_rows = pl.ds(q_start, block_q)
    cols = column_mask(p)
    kv_valid = jnp.minimum(scalar(kvlen_ref, p.kv_len), p.kv_len)
    side = Side(p, bias_ref, mask_ref, qseg_ref, kvseg_ref, kv_valid)

    in_q = q_pos < p.q_len
    q = load(q_ref, q_rows, in_q, cols)
    do = load(do_ref, q_rows, in_q, cols)
    lse = backward_lse(plgpu.load(lse_ref.at[q_rows], mask=in_q, other=-jnp.inf))
    delta = plgpu.load(delta_ref.at[q_rows], mask=in_q, other=0.0)

    num_k_blocks = pl.cdiv(p.kv_len, block_k)
    q_valid = jnp.minimum(scalar(qlen_ref, p.q_len), p.q_len)
    ranges = skip_dead_rows(kv_block_range(p.band, q_start, block_q, block_k, kv_valid, num_k_blocks),
                             q_start < q_valid)
    if dbias_ref is not None:  # dbias must be written for every key tile, visible or not
        ranges = (0, num_k_blocks, num_k_blocks, num_k_blocks)
    any_full = not p.needs_elementwise_mask and dbias_ref is None and p.kv_len >= block_k

    def body(j, dq, masked):
        k_start = j * block_k
        k_rows = pl.ds(k_start, block_k)
        k_pos = k_start + jnp.arange(block_k)
        row_ok = k_pos < p.kv_len if masked else None
        k = load(k_ref, k_rows, row_ok, cols)
        v = load(v_ref, k_rows, row_ok, cols)
        s, tanh = logits(p, dot(p, q, k, trans_b=True), side.pair_tile(bias_ref, q_rows, k_rows, q_pos, k_pos, 0))
        if masked:
            s = jnp.where(side.visible(q_rows, k_rows, q_pos, k_pos), s, -jnp.inf)
        probs = jnp.exp2(s - lse[:, None])
        ds, dqk = _grad_logits(p, probs, dot(p, do, v, trans_b=True), delta, tanh)
        if dbias_ref is not None:
            plgpu.store(dbias_ref.at[q_rows, k_rows], ds,
                        mask=in_q[:, None] & (k_pos < p.kv_len)[None, :])
        return dq + dot(p, dqk.astype(k.dtype), k)

    dq = three_ranges(body, ranges, jnp.zeros((block_q, p.head_dim_padded), jnp.float32), any_full=any_full)
    plgpu.store(dq_ref.at[q_rows, :], dq.astype(dq_ref.dtype), mask=combine(in_q[:, None], cols))


def _dkv_kernel(q_ref, k_ref, v_ref, bias_ref, mask_ref, qseg_ref, kvseg_ref, qlen_ref, kvlen_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, p: Problem, block_q: int, block_k: int):
    t = pl.program_id(0)
    k_start = t * block_k
    k_pos = k_start + jnp.arange(block_k)
    k_rows = pl.ds(k_start, block_k)
    cols = column_mask(p)
    kv_valid = jnp.minimum(scalar(kvlen_ref, p.kv_len), p.kv_len)
    q_valid = jnp.minimum(scalar(qlen_ref, p.q_len), p.q_len)

    in_k = k_pos < p.kv_len
    k = load(k_ref, k_rows, in_k, cols)
    v = load(v_ref, k_rows, in_k, cols)
    num_q_blocks = pl.cdiv(p.q_len, block_q)
    ranges = q_block_range(p.band, k_start, block_k, block_q, q_valid, num_q_blocks,
                           kv_tile_whole=k_start + block_k <= kv_valid)
    any_full = not p.needs_elementwise_mask and p.q_len >= block_q

    head_axis = 0 if p.layout == "BNTH" else 1

    def pair_view(ref, shape, g):
        if ref is None or shape[1] == 1:
            return ref
        return HeadView(ref, g)

    def group_member(g, carry):
        q_g, do_g = HeadView(q_ref, g, head_axis), HeadView(do_ref, g, head_axis)
        lse_g, delta_g = HeadView(lse_ref, g), HeadView(delta_ref, g)
        bias_g = pair_view(bias_ref, p.bias_shape, g)
        side = Side(p, bias_g, pair_view(mask_ref, p.mask_shape, g), qseg_ref, kvseg_ref, kv_valid)

        def body(i, carry, masked):
            dk, dv = carry
            q_start = i * block_q
            q_rows = pl.ds(q_start, block_q)
            q_pos = q_start + jnp.arange(block_q)
            in_q = q_pos < p.q_len if masked else None
            q = load(q_g, q_rows, in_q, cols)
            do = load(do_g, q_rows, in_q, cols)
            lse = backward_lse(lse_g.load(q_rows, mask=in_q, other=-jnp.inf))
            delta = delta_g.load(q_rows, mask=in_q, other=0.0)
            s, tanh = logits(p, dot(p, q, k, trans_b=True), side.pair_tile(bias_g, q_rows, k_rows, q_pos, k_pos, 0))
            if masked:
                s = jnp.where(side.visible(q_rows, k_rows, q_pos, k_pos), s, -jnp.inf)
            probs = jnp.exp2(s - lse[:, None])
            dv = dv + dot(p, probs.astype(do.dtype), do, trans_a=True)
            _, dqk = _grad_logits(p, probs, dot(p, do, v, trans_b=True), delta, tanh)
            dk = dk + dot(p, dqk.astype(q.dtype), q, trans_a=True)
            return dk, dv

        return three_ranges(body, ranges, carry, any_full=any_full)

    zeros = jnp.zeros((block_k, p.head_dim_padded), jnp.float32)
    dk, dv = lax.fori_loop(0, p.group, group_member, (zeros, zeros))
    store_mask = combine(in_k[:, None], cols)
    plgpu.store(dk_ref.at[k_rows, :], dk.astype(dk_ref.dtype), mask=store_mask)
    plgpu.store(dv_ref.at[k_rows, :], dv.astype(dv_ref.dtype), mask=store_mask)


def backward(p: Problem, dq_cfg: KernelConfig, dkv_cfg: KernelConfig, q, k, v, bias, dense_mask, q_seg, kv_seg,
             q_lengths, kv_lengths, do, lse, delta, *, lowering: Lowering):
    """Returns (dq, dk, dv, dbias or None). dbias is (B, N, T, S) float32: the caller sums it
    over the dimensions that the bias broadcast."""
    q_head, kv_head = (lambda n: n), (lambda n: n // p.group)
    common = [*common_in_specs(p, None, q_head)]
    operands = dict(q=q, k=k, v=v, bias=bias, mask=dense_mask, q_seg=q_seg, kv_seg=kv_seg, q_lengths=q_lengths,
                    kv_lengths=kv_lengths, d_out=do, lse=lse, delta=delta)

    # dQ (and dbias): one program per query tile, as the forward.
    block_q, block_k = block_size(p.q_len, dq_cfg.block_q), block_size(p.kv_len, dq_cfg.block_k)
    with_dbias = p.bias_shape is not None
    in_specs = [seq_spec(p, p.q_len, None, q_head), seq_spec(p, p.kv_len, None, kv_head),
                seq_spec(p, p.kv_len, None, kv_head), *common,
                seq_spec(p, p.q_len, None, q_head), row_spec(p.q_len, None, q_head),
                row_spec(p.q_len, None, q_head)]
    out_specs = [seq_spec(p, p.q_len, None, q_head)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if with_dbias:
        out_specs.append(pl.BlockSpec((None, None, p.q_len, p.kv_len), lambda t, n, b: (b, n, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((p.batch, p.q_heads, p.q_len, p.kv_len), jnp.float32))
    num_tiles = pl.cdiv(p.q_len, block_q)
    grid, tile_axis, specs = tile_grid(num_tiles, p.q_heads, p.batch, heads_inside_tiles(p, num_tiles),
                                        in_specs + out_specs)
    in_specs, out_specs = specs[:len(in_specs)], specs[len(in_specs):]
    dq, *dbias = pl.pallas_call(
        functools.partial(_dq_kernel, p=p, block_q=block_q, block_k=block_k, tile_axis=tile_axis),
        grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        **lowering.pallas_args(dq_cfg), name=plans.BACKWARD_DQ.name,
    )(*plans.BACKWARD_DQ.ordered(**operands))

    # dK, dV: one program per key tile of one K/V head, looping over its group of query heads.
    block_q, block_k = block_size(p.q_len, dkv_cfg.block_q), block_size(p.kv_len, dkv_cfg.block_k)
    if p.group > 1 and block_q == 16:
        # With 16-row query tiles and a loop over a GQA group, Triton's code (XLA's and the official
        # 3.6 alike, H100) gave dK that changed from run to run on identical inputs (decode-shaped
        # calls, T <= 16); 32-row tiles are exact. Checked by tests/test_launch.py's decode cases.
        block_q = min(32, dkv_cfg.block_q)
    group_of = lambda n: n  # noqa: E731  (grid axis 1 runs over K/V heads here)
    g = p.group
    in_specs = [seq_spec(p, p.q_len, g, group_of), seq_spec(p, p.kv_len, None, group_of),
                seq_spec(p, p.kv_len, None, group_of), *common_in_specs(p, g, group_of),
                seq_spec(p, p.q_len, g, group_of), row_spec(p.q_len, g, group_of),
                row_spec(p.q_len, g, group_of)]
    kv_spec = seq_spec(p, p.kv_len, None, group_of)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, p=p, block_q=block_q, block_k=block_k),
        grid=(pl.cdiv(p.kv_len, block_k), p.kv_heads, p.batch),
        in_specs=in_specs, out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        **lowering.pallas_args(dkv_cfg), name=plans.BACKWARD_DKV.name,
    )(*plans.BACKWARD_DKV.ordered(**operands))
    return dq, dk, dv, (dbias[0] if dbias else None)
