"""The flash-attention forward kernel: one program per query tile, an online softmax over its key
blocks; writes the output and the log-sum-exp. Conventions as in ``mmfa_jax.kernels.common``."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmfa_jax import plans
from mmfa_jax.backends import Lowering
from mmfa_jax.kernels.common import (
    LN2,
    Problem,
    Side,
    batch_spec,
    block_size,
    common_in_specs,
    dot,
    head_chunks,
    heads_inside_tiles,
    load,
    load_rows,
    logits,
    online_softmax_step,
    optional,
    query_tile,
    row_spec,
    scalar,
    seq_spec,
    skip_dead_rows,
    three_ranges,
    tile_grid,
    tile_order,
)
from mmfa_jax.kernels.mask_ranges import (
    forward_query_tiles,
    intersect_ranges,
    load_ranges,
    mask_ranges,
)
from mmfa_jax.masking import combine, kv_block_range
from mmfa_jax.tuning import KernelConfig


def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, mask_ref, qseg_ref, kvseg_ref, qlen_ref, kvlen_ref,
                    mask_ranges_ref, q_source_ref, kv_source_ref, o_ref, lse_ref, *, p: Problem, block_q: int,
                    block_k: int, tile_axis: int, split_head: bool):
    t = query_tile(p, tile_axis)
    q_start = t * block_q
    q_pos = q_start + jnp.arange(block_q)
    q_rows = pl.ds(q_start, block_q)
    # Q, K, V and the accumulator are tuples of column chunks (one chunk: the padded head dim).
    chunks = head_chunks(p.head_dim, split_head)

    def tile(ref, rows, row_mask):
        return tuple(load(ref, rows, row_mask, c.mask, c.index) for c in chunks)

    def tile_rows(ref, rows, row_mask):
        return tuple(load_rows(ref, rows, row_mask, c.mask, c.width, c.start) for c in chunks)

    kv_valid = jnp.minimum(scalar(kvlen_ref, p.kv_len), p.kv_len)
    q_valid = jnp.minimum(scalar(qlen_ref, p.q_len), p.q_len)
    side = Side(p, bias_ref, mask_ref, qseg_ref, kvseg_ref, kv_valid)

    in_q = q_pos < p.q_len
    # Query rows read in place (``q_source``): once per program, before the key loop, so the
    # indirect load costs nothing in the loop's pipelining.
    if q_source_ref is None:
        q = tile(q_ref, q_rows, in_q)
    else:
        q = tile_rows(q_ref, plgpu.load(q_source_ref.at[q_rows], mask=in_q, other=0), in_q)
    num_k_blocks = pl.cdiv(p.kv_len, block_k)
    ranges = kv_block_range(p.band, q_start, block_q, block_k, kv_valid, num_k_blocks)
    if mask_ranges_ref is not None:  # a dense mask: visit only its live blocks, unmasked where it is all True
        ranges = intersect_ranges(ranges, load_ranges(mask_ranges_ref))
    ranges = skip_dead_rows(ranges, q_start < q_valid)
    # Segments hide single logits anywhere; a dense mask's full blocks are known from its ranges.
    any_full = not p.has_segments and p.kv_len >= block_k

    def body(j, carry, masked):
        acc, m, l = carry
        k_start = j * block_k
        k_rows = pl.ds(k_start, block_k)
        k_pos = k_start + jnp.arange(block_k)
        row_ok = k_pos < p.kv_len if masked else None
        # Value rows past the key length read as 0: their probability is 0, and 0 * NaN (a cache's
        # unwritten tail) would otherwise reach rows that never see them. Blocks past the length
        # are skipped, and the one that holds it takes this masked path, so this costs nothing.
        v_ok = k_pos < kv_valid if masked else None
        if kv_source_ref is None:
            k = tile(k_ref, k_rows, row_ok)
            v = tile(v_ref, k_rows, v_ok)
        else:
            src = plgpu.load(kv_source_ref.at[k_rows], mask=row_ok, other=None if row_ok is None else 0)
            k = tile_rows(k_ref, src, row_ok)
            v = tile_rows(v_ref, src, v_ok)
        qk = sum(dot(p, qc, kc, trans_b=True) for qc, kc in zip(q, k))
        s, _ = logits(p, qk, side.pair_tile(bias_ref, q_rows, k_rows, q_pos, k_pos, 0))
        if masked:
            s = jnp.where(side.visible(q_rows, k_rows, q_pos, k_pos), s, -jnp.inf)
        return online_softmax_step(p, (acc, m, l), s, v)

    init = (tuple(jnp.zeros((block_q, c.width), jnp.float32) for c in chunks),
            jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, l = three_ranges(body, ranges, init, any_full=any_full)

    # Rows with something to attend to. l is exactly 0 where every logit was masked; a NaN in the
    # inputs makes l NaN, and such a row must give NaN (as jax.nn and torch SDPA do), not zeros.
    live = (l != 0) & (q_pos < q_valid)
    lse = jnp.where(live, (m + jnp.log2(jnp.where(live, l, 1.0))) * LN2, -jnp.inf)
    store_rows = q_pos < p.q_len
    for c, a in zip(chunks, acc):
        out = jnp.where(live[:, None], a / jnp.where(live, l, 1.0)[:, None], 0.0)
        plgpu.store(o_ref.at[q_rows, c.index], out.astype(o_ref.dtype), mask=combine(store_rows[:, None], c.mask))
    plgpu.store(lse_ref.at[q_rows], lse, mask=store_rows)


def forward(p: Problem, cfg: KernelConfig, q, k, v, bias, dense_mask, q_seg, kv_seg, q_lengths, kv_lengths,
            *, q_source=None, kv_source=None, lowering: Lowering):
    """Returns (out (B, T, N, H) or (B, N, T, H), lse (B, N, T) float32 in natural log; -inf for
    rows that see nothing).

    q_source: None, or (B, T) int32: query row i is read in place from row q_source[b, i] of
    ``q``, whose sequence axis may then have any length (the pruning pipeline's kept tokens,
    without a gathered copy of the query).
    kv_source: likewise (B, S) int32 rows of ``k`` and ``v`` for key i (read in place in the key
    loop: the pipeline's kept keys without gathered copies).

    With a dense mask, a first kernel (``mask_ranges``) finds the key blocks each query tile must
    visit: blocks the mask hides are skipped and a run of blocks it shows wholly goes unmasked
    (causal plus bidirectional image blocks: 2.30 -> 0.73 ms at d256 on the H100, bench/NOTES.md)."""
    block_q, block_k = block_size(p.q_len, cfg.block_q), block_size(p.kv_len, cfg.block_k)
    q_head, kv_head = (lambda n: n), (lambda n: n // p.group)
    num_tiles = forward_query_tiles(p.q_len, cfg)
    ranges, ranges_spec = None, None
    if dense_mask is not None:
        ranges = mask_ranges(p, cfg, dense_mask, lowering=lowering)
        # Masked and unmasked loops over the keys, each pipelined: at most two stages fit in
        # shared memory with the table's largest tiles (three asked for 256 KiB on the H100).
        cfg = dataclasses.replace(cfg, num_stages=min(cfg.num_stages, 2))
        bm, nm = p.mask_shape
        tile_of = tile_order(p, num_tiles)
        ranges_spec = pl.BlockSpec((None, None, None, 4), lambda t, n, b: (b if bm > 1 else 0, n if nm > 1 else 0,
                                                                          tile_of(t), 0))
    seq = 1 if p.layout == "BTNH" else 2
    in_specs = [
        seq_spec(p, q.shape[seq], None, q_head),
        seq_spec(p, k.shape[seq], None, kv_head),
        seq_spec(p, v.shape[seq], None, kv_head),
        *common_in_specs(p, None, q_head),
        ranges_spec,
        optional(q_source is not None, batch_spec(p.q_len)),
        optional(kv_source is not None, batch_spec(p.kv_len)),
    ]
    out_specs = [seq_spec(p, p.q_len, None, q_head), row_spec(p.q_len, None, q_head)]
    out_rows = (p.batch, p.q_len, p.q_heads) if p.layout == "BTNH" else (p.batch, p.q_heads, p.q_len)
    out_shape = [jax.ShapeDtypeStruct((*out_rows, p.head_dim), q.dtype),
                 jax.ShapeDtypeStruct((p.batch, p.q_heads, p.q_len), jnp.float32)]
    grid, tile_axis, specs = tile_grid(num_tiles, p.q_heads, p.batch, heads_inside_tiles(p, num_tiles),
                                        in_specs + out_specs)
    in_specs, out_specs = specs[:len(in_specs)], specs[len(in_specs):]
    kernel = functools.partial(_forward_kernel, p=p, block_q=block_q, block_k=block_k, tile_axis=tile_axis,
                               split_head=cfg.split_head)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        **lowering.pallas_args(cfg), name=plans.FORWARD.name,
    )(*plans.FORWARD.ordered(q=q, k=k, v=v, bias=bias, mask=dense_mask, q_seg=q_seg, kv_seg=kv_seg,
                             q_lengths=q_lengths, kv_lengths=kv_lengths, mask_ranges=ranges, q_source=q_source,
                             kv_source=kv_source))
