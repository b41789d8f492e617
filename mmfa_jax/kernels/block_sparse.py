"""Block-sparse flash attention: the forward, dQ and dK/dV kernels, each walking only the blocks a
block map lists (``mmfa_jax.block_sparse.BlockMask``).

The tiles ARE the map's blocks: a query tile is a query block of ``block_q`` rows, a key tile a key
block of ``block_k`` rows. The map's lists (built with jax ops in ``mmfa_jax.block_sparse``) give,
per (map batch, map head, block):

  kv_count (Bm, Nm, nq) int32     key blocks listed for query block qi (blocks with some visible logit)
  kv_full  (Bm, Nm, nq) int32     how many of them come first in ``kv_index`` and are wholly visible
  kv_index (Bm, Nm, nq, W) int32  the wholly visible blocks (ascending), then the partial ones
                                  (ascending), then padding (never read); W: the lists' width
  q_offset, q_count, q_full (Bm, Nm, nk) int32   the same transposed, per key block (dK/dV): its
                                  query blocks are q_index[offset : offset + count], the first
                                  q_full of them wholly visible
  q_index  (Bm, Nm, nq * W) int32 every key block's query blocks, one after the other (compressed:
                                  the size of the listed entries, not nk x nq)

with Bm in {1, B}, Nm in {1, Hq} (broadcast by the index maps, never materialised). A wholly
visible block is taken unmasked; a partial one (crossing the causal diagonal, or the ragged last
block of a sequence that is not a multiple of the block) with the token-level mask. Each program
loops from 0 to its count, so the work is proportional to the listed blocks.

  ``mmfa_block_sparse_forward``  grid (nq, Hq, B): online softmax over the query block's key list;
                                 writes the output and the log-sum-exp (natural log, -inf for a row
                                 that sees nothing, whose output is 0).
  ``mmfa_block_sparse_dq``       grid (nq, Hq, B): dQ over the same list.
  ``mmfa_block_sparse_dkv``      grid (nk, Hkv, B): dK and dV of one key block of one K/V head,
                                 looping over the query heads of its GQA group and, for each, over
                                 that head's transposed list: no atomics, K/V never repeated.

Operands and results are ordered by ``mmfa_jax.plans`` (``BLOCK_SPARSE_*``): the map's lists go in
as the BlockMask holds them, so a launcher needs nothing but the arrays themselves. The rest of the
conventions (base-2 logits, the padded head dimension, masked loads past the lengths, the NaN and
empty-row rules of ``live = l != 0``) are those of ``mmfa_jax.kernels.forward`` / ``backward``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmfa_jax import plans
from mmfa_jax.backends import Lowering
from mmfa_jax.kernels.backward import _grad_logits, backward_lse
from mmfa_jax.kernels.common import (
    LN2,
    HeadView,
    Problem,
    Side,
    column_mask,
    dot,
    load,
    logits,
    online_softmax_step,
    row_spec,
    seq_spec,
)
from mmfa_jax.masking import combine
from mmfa_jax.tuning import KernelConfig


@dataclasses.dataclass(frozen=True)
class SparseProblem:
    """A block-sparse call: the dense ``Problem`` (sizes, scale, the causal band; no bias, mask,
    segments or lengths) and the map's block sizes and kept (batch, head) extents."""

    problem: Problem
    block_q: int
    block_k: int
    map_batch: int  # Bm: 1 (broadcast) or B
    map_heads: int  # Nm: 1 (broadcast) or Hq
    by_positions: bool = False  # causal by the rows' positions (q_pos, kv_pos operands), not by their indices

    @property
    def num_q_blocks(self) -> int:
        return pl.cdiv(self.problem.q_len, self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return pl.cdiv(self.problem.kv_len, self.block_k)


def shared_bytes(kernel: str, sp: SparseProblem, tile: KernelConfig, itemsize: int) -> int:
    """An estimate of a kernel's shared memory per block with ``tile``'s rows and pipeline stages:
    the tiles loaded in the loop, once per stage, and those loaded once (and 1 KiB of Triton's
    scratch for the forward and dQ). Against the official Triton's sm_90 code: bf16 d64 with
    64-row tiles and bf16 d128 with 128-row tiles within 1 KiB over, float32 d64 with 128-row
    tiles the same."""
    hp, bq, bk, stages = sp.problem.head_dim_padded, tile.block_q, tile.block_k, tile.num_stages
    if kernel == "forward":  # K, V per stage; Q
        return (stages * 2 * bk * hp + bq * hp) * itemsize + 1024
    if kernel == "dq":  # K, V per stage; Q, dO
        return (stages * 2 * bk * hp + 2 * bq * hp) * itemsize + 1024
    # dK/dV: Q, dO (and the LSE, delta rows) per stage; K, V; the transposed probabilities
    return (stages * 2 * bq * hp + 2 * bk * hp + bq * bk) * itemsize + stages * 2 * bq * 4


def fitted_configs(sp: SparseProblem, configs: dict[str, KernelConfig], itemsize: int,
                   cc: int | None) -> dict[str, KernelConfig]:
    """Each kernel's ``KernelConfig`` (its tiles: the map's blocks or parts of them) with pipeline stages cut
    (down to 1) until the estimate fits the GPU's shared memory per block; unchanged for the
    interpreter (``cc`` None). Whether one stage fits is left to the compiler."""
    if cc is None:
        return configs
    from mmfa_jax.triton_route import shared_memory_limit

    limit = shared_memory_limit(cc)
    out = {}
    for kernel, cfg in configs.items():
        stages = cfg.num_stages
        while stages > 1 and shared_bytes(kernel, sp, dataclasses.replace(cfg, num_stages=stages), itemsize) > limit:
            stages -= 1
        out[kernel] = dataclasses.replace(cfg, num_stages=stages)
    return out


def _map_batch(sp: SparseProblem, b):
    return b if sp.map_batch > 1 else 0


def _list_specs(sp: SparseProblem, length: int, tiles_per_block: int = 1):
    """Specs of (count, full, index) for a (tile, head, batch) grid over query heads: one scalar
    count each and the row of ``length`` indices of the map block holding the tile (a block is
    ``tiles_per_block`` tiles)."""
    head = (lambda n: n) if sp.map_heads > 1 else (lambda n: 0)
    block = lambda t: t // tiles_per_block  # noqa: E731
    count = pl.BlockSpec((None, None, None), lambda t, n, b: (_map_batch(sp, b), head(n), block(t)))
    index = pl.BlockSpec((None, None, None, length), lambda t, n, b: (_map_batch(sp, b), head(n), block(t), 0))
    return [count, count, index]


def _group_list_specs(sp: SparseProblem, length: int, tiles_per_block: int):
    """Specs of the transposed (offset, count, full, index) for the dK/dV grid over K/V heads: the
    scalars of the tile's key block and the whole compressed index row (``length`` = nq * W: a
    key block's entries lie anywhere in it), of the group's G query heads (one list for all when
    the map broadcasts its head axis)."""
    block = lambda t: t // tiles_per_block  # noqa: E731
    if sp.map_heads == 1:
        count = pl.BlockSpec((None, None, None), lambda t, h, b: (_map_batch(sp, b), 0, block(t)))
        index = pl.BlockSpec((None, None, length), lambda t, h, b: (_map_batch(sp, b), 0, 0))
    else:
        g = sp.problem.group
        count = pl.BlockSpec((None, g, None), lambda t, h, b: (_map_batch(sp, b), h, block(t)))
        index = pl.BlockSpec((None, g, length), lambda t, h, b: (_map_batch(sp, b), h, 0))
    return [count, count, count, index]


def _entry(ref, head, *idx):
    """A scalar of a list ref: at ``idx``, of query head ``head`` of the group (None: the map's one
    head)."""
    idx = idx if head is None else (head, *idx)
    return ref[idx] if idx else ref[...]


def _position_specs(p: Problem, q_pos):
    """Specs of the optional (B, T) and (B, S) positions: each program reads its batch row."""
    if q_pos is None:
        return [None, None]
    return [pl.BlockSpec((None, p.q_len), lambda t, n, b: (b, 0)),
            pl.BlockSpec((None, p.kv_len), lambda t, n, b: (b, 0))]


def _visible(side: Side, qpos_ref, kvpos_ref, q_rows, k_rows, q_pos, k_pos):
    """Which logits of a masked tile count: the side's rules (keys inside the sequence, the causal
    band on the rows' indices), or with positions the causal mask on the positions the rows hold
    (the problem then has no band)."""
    if qpos_ref is None:
        return side.visible(q_rows, k_rows, q_pos, k_pos)
    p = side.p
    qp = plgpu.load(qpos_ref.at[q_rows], mask=q_pos < p.q_len, other=-1)
    kp = plgpu.load(kvpos_ref.at[k_rows], mask=k_pos < p.kv_len, other=jnp.iinfo(jnp.int32).max)
    return (k_pos[None, :] < p.kv_len) & (kp[None, :] <= qp[:, None])


def _entry_and_tile(i, tiles_per_block: int):
    """(list entry, tile within its block) of loop step ``i`` of ``_two_loops``."""
    if tiles_per_block == 1:  # static: no division (Triton's lowering of ``i % 1`` mistypes the 1)
        return i, 0
    per = jnp.int32(tiles_per_block)
    return lax.div(i, per), lax.rem(i, per)


def _two_loops(body, n_full, n_all, carry, *, any_full: bool, tiles_per_block: int = 1):
    """``body(i, carry, masked)`` over list entries [0, n_full) unmasked, then [n_full, n_all)
    masked; with ``tiles_per_block`` > 1 over the tiles of those entries' blocks, i running over
    entry * tiles_per_block + tile (one loop, so that Triton pipelines it as a whole).
    ``any_full=False`` (static: the sequence looped over is shorter than one block, so no block
    can be whole) runs the masked body over all of them."""
    n_full, n_all = n_full * tiles_per_block, n_all * tiles_per_block
    if not any_full:
        return lax.fori_loop(0, n_all, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    return lax.fori_loop(n_full, n_all, functools.partial(body, masked=True), carry)


# --------------------------------------------------------------------------------------------
# Forward.


def _forward_kernel(q_ref, k_ref, v_ref, count_ref, full_ref, index_ref, qpos_ref, kvpos_ref, o_ref, lse_ref, *,
                    sp: SparseProblem):
    p, block_q, block_k = sp.problem, sp.block_q, sp.block_k
    q_start = pl.program_id(0) * block_q
    q_pos = q_start + jnp.arange(block_q)
    q_rows = pl.ds(q_start, block_q)
    cols = column_mask(p)
    hp = p.head_dim_padded
    side = Side(p, None, None, None, None, p.kv_len)
    in_q = q_pos < p.q_len
    q = load(q_ref, q_rows, in_q, cols)

    def body(i, carry, masked):
        acc, m, l = carry
        k_start = index_ref[i] * block_k
        k_rows = pl.ds(k_start, block_k)
        k_pos = k_start + jnp.arange(block_k)
        # Partial blocks: rows past the key length read as 0 (values too: 0 * NaN must not reach
        # a row); whole blocks lie inside the arrays.
        row_ok = k_pos < p.kv_len if masked else None
        k = load(k_ref, k_rows, row_ok, cols)
        v = load(v_ref, k_rows, row_ok, cols)
        s, _ = logits(p, dot(p, q, k, trans_b=True), None)
        if masked:
            s = jnp.where(_visible(side, qpos_ref, kvpos_ref, q_rows, k_rows, q_pos, k_pos), s, -jnp.inf)
        return online_softmax_step(p, (acc, m, l), s, v)

    init = (jnp.zeros((block_q, hp), jnp.float32),
            jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, l = _two_loops(body, full_ref[...], count_ref[...], init, any_full=p.kv_len >= block_k)

    # l is exactly 0 where a row saw nothing (zeros, LSE -inf); NaN inputs make it NaN (a NaN row).
    live = (l != 0) & in_q
    out = acc / jnp.where(live, l, 1.0)[:, None]
    out = jnp.where(live[:, None], out, 0.0)
    lse = jnp.where(live, (m + jnp.log2(jnp.where(live, l, 1.0))) * LN2, -jnp.inf)
    plgpu.store(o_ref.at[q_rows, :], out.astype(o_ref.dtype), mask=combine(in_q[:, None], cols))
    plgpu.store(lse_ref.at[q_rows], lse, mask=in_q)


def forward(sp: SparseProblem, cfg: KernelConfig, q, k, v, kv_count, kv_full, kv_index, q_pos=None, kv_pos=None, *,
            lowering: Lowering):
    """(out like q, lse (B, Hq, T) float32 in natural log; -inf for rows that see nothing).
    ``q_pos`` (B, T) / ``kv_pos`` (B, S) int32, both or neither: the causal mask compares them
    (key visible when its position is at most the query's) instead of the rows' indices."""
    p = sp.problem
    q_head, kv_head = (lambda n: n), (lambda n: n // p.group)
    in_specs = [seq_spec(p, p.q_len, None, q_head), seq_spec(p, p.kv_len, None, kv_head),
                seq_spec(p, p.kv_len, None, kv_head), *_list_specs(sp, kv_index.shape[-1]),
                *_position_specs(p, q_pos)]
    out_specs = [seq_spec(p, p.q_len, None, q_head), row_spec(p.q_len, None, q_head)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((p.batch, p.q_heads, p.q_len), jnp.float32)]
    return pl.pallas_call(
        functools.partial(_forward_kernel, sp=sp), grid=(sp.num_q_blocks, p.q_heads, p.batch),
        in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        **lowering.pallas_args(cfg), name=plans.BLOCK_SPARSE_FORWARD.name,
    )(*plans.BLOCK_SPARSE_FORWARD.ordered(q=q, k=k, v=v, kv_count=kv_count, kv_full=kv_full, kv_index=kv_index,
                                          q_pos=q_pos, kv_pos=kv_pos))


# --------------------------------------------------------------------------------------------
# Backward: as ``mmfa_jax.kernels.backward`` (p = exp(s - lse), ds = p (dp - delta)), over the lists.


def _dq_kernel(q_ref, k_ref, v_ref, count_ref, full_ref, index_ref, qpos_ref, kvpos_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, sp: SparseProblem, tile_q: int, tile_k: int):
    p = sp.problem
    per_block = sp.block_k // tile_k  # key tiles per listed key block
    q_start = pl.program_id(0) * tile_q
    q_pos = q_start + jnp.arange(tile_q)
    q_rows = pl.ds(q_start, tile_q)
    cols = column_mask(p)
    side = Side(p, None, None, None, None, p.kv_len)
    in_q = q_pos < p.q_len
    q = load(q_ref, q_rows, in_q, cols)
    do = load(do_ref, q_rows, in_q, cols)
    lse = backward_lse(plgpu.load(lse_ref.at[q_rows], mask=in_q, other=-jnp.inf))
    delta = plgpu.load(delta_ref.at[q_rows], mask=in_q, other=0.0)

    def body(i, dq, masked):
        entry, tile = _entry_and_tile(i, per_block)
        k_start = index_ref[entry] * sp.block_k + tile * tile_k
        k_rows = pl.ds(k_start, tile_k)
        k_pos = k_start + jnp.arange(tile_k)
        row_ok = k_pos < p.kv_len if masked else None
        k = load(k_ref, k_rows, row_ok, cols)
        v = load(v_ref, k_rows, row_ok, cols)
        s, tanh = logits(p, dot(p, q, k, trans_b=True), None)
        if masked:
            s = jnp.where(_visible(side, qpos_ref, kvpos_ref, q_rows, k_rows, q_pos, k_pos), s, -jnp.inf)
        probs = jnp.exp2(s - lse[:, None])
        _, dqk = _grad_logits(p, probs, dot(p, do, v, trans_b=True), delta, tanh)
        return dq + dot(p, dqk.astype(k.dtype), k)

    dq = _two_loops(body, full_ref[...], count_ref[...], jnp.zeros((tile_q, p.head_dim_padded), jnp.float32),
                    any_full=p.kv_len >= sp.block_k, tiles_per_block=per_block)
    plgpu.store(dq_ref.at[q_rows, :], dq.astype(dq_ref.dtype), mask=combine(in_q[:, None], cols))


def _dkv_kernel(q_ref, k_ref, v_ref, offset_ref, count_ref, full_ref, index_ref, qpos_ref, kvpos_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, *, sp: SparseProblem, tile_q: int, tile_k: int):
    p = sp.problem
    per_block = sp.block_q // tile_q  # query tiles per listed query block
    k_start = pl.program_id(0) * tile_k
    k_pos = k_start + jnp.arange(tile_k)
    k_rows = pl.ds(k_start, tile_k)
    cols = column_mask(p)
    side = Side(p, None, None, None, None, p.kv_len)
    in_k = k_pos < p.kv_len
    k = load(k_ref, k_rows, in_k, cols)
    v = load(v_ref, k_rows, in_k, cols)
    head_axis = 0 if p.layout == "BNTH" else 1
    per_head = sp.map_heads > 1

    def group_member(g, carry):
        q_g, do_g = HeadView(q_ref, g, head_axis), HeadView(do_ref, g, head_axis)
        lse_g, delta_g = HeadView(lse_ref, g), HeadView(delta_ref, g)
        list_head = g if per_head else None
        n_all, n_full = _entry(count_ref, list_head), _entry(full_ref, list_head)
        offset = _entry(offset_ref, list_head)  # this key block's entries in the compressed list

        def body(i, carry, masked):
            dk, dv = carry
            entry, tile = _entry_and_tile(i, per_block)
            q_start = _entry(index_ref, list_head, offset + entry) * sp.block_q + tile * tile_q
            q_rows = pl.ds(q_start, tile_q)
            q_pos = q_start + jnp.arange(tile_q)
            in_q = q_pos < p.q_len if masked else None
            q = load(q_g, q_rows, in_q, cols)
            do = load(do_g, q_rows, in_q, cols)
            lse = backward_lse(lse_g.load(q_rows, mask=in_q, other=-jnp.inf))
            delta = delta_g.load(q_rows, mask=in_q, other=0.0)
            s, tanh = logits(p, dot(p, q, k, trans_b=True), None)
            if masked:
                s = jnp.where(_visible(side, qpos_ref, kvpos_ref, q_rows, k_rows, q_pos, k_pos), s, -jnp.inf)
            probs = jnp.exp2(s - lse[:, None])
            dv = dv + dot(p, probs.astype(do.dtype), do, trans_a=True)
            _, dqk = _grad_logits(p, probs, dot(p, do, v, trans_b=True), delta, tanh)
            dk = dk + dot(p, dqk.astype(q.dtype), q, trans_a=True)
            return dk, dv

        return _two_loops(body, n_full, n_all, carry, any_full=p.q_len >= sp.block_q, tiles_per_block=per_block)

    zeros = jnp.zeros((tile_k, p.head_dim_padded), jnp.float32)
    dk, dv = lax.fori_loop(0, p.group, group_member, (zeros, zeros))
    store_mask = combine(in_k[:, None], cols)
    plgpu.store(dk_ref.at[k_rows, :], dk.astype(dk_ref.dtype), mask=store_mask)
    plgpu.store(dv_ref.at[k_rows, :], dv.astype(dv_ref.dtype), mask=store_mask)


def backward(sp: SparseProblem, dq_cfg: KernelConfig, dkv_cfg: KernelConfig, q, k, v, kv_count, kv_full, kv_index,
             q_offset, q_count, q_full, q_index, do, lse, delta, q_pos=None, kv_pos=None, *, lowering: Lowering):
    """(dq, dk, dv) from the forward's LSE and ``delta`` (``mmfa_jax._autodiff.backward_delta``),
    both (B, Hq, T) float32. The configs' tiles may be smaller than the map's blocks (each dividing
    its block): a program then takes one tile of its block, and walks the tiles of each listed
    block of the other axis, so the backward runs at the dense kernels' tuned tiles."""
    p = sp.problem
    for cfg in (dq_cfg, dkv_cfg):
        assert sp.block_q % cfg.block_q == 0 and sp.block_k % cfg.block_k == 0, (sp, cfg)
    operands = dict(q=q, k=k, v=v, kv_count=kv_count, kv_full=kv_full, kv_index=kv_index, q_offset=q_offset,
                    q_count=q_count, q_full=q_full, q_index=q_index, d_out=do, lse=lse, delta=delta, q_pos=q_pos,
                    kv_pos=kv_pos)
    q_head, kv_head = (lambda n: n), (lambda n: n // p.group)
    in_specs = [seq_spec(p, p.q_len, None, q_head), seq_spec(p, p.kv_len, None, kv_head),
                seq_spec(p, p.kv_len, None, kv_head),
                *_list_specs(sp, kv_index.shape[-1], sp.block_q // dq_cfg.block_q),
                *_position_specs(p, q_pos), seq_spec(p, p.q_len, None, q_head), row_spec(p.q_len, None, q_head),
                row_spec(p.q_len, None, q_head)]
    (dq,) = pl.pallas_call(
        functools.partial(_dq_kernel, sp=sp, tile_q=dq_cfg.block_q, tile_k=dq_cfg.block_k),
        grid=(pl.cdiv(p.q_len, dq_cfg.block_q), p.q_heads, p.batch),
        in_specs=in_specs, out_specs=[seq_spec(p, p.q_len, None, q_head)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
        **lowering.pallas_args(dq_cfg), name=plans.BLOCK_SPARSE_DQ.name,
    )(*plans.BLOCK_SPARSE_DQ.ordered(**{n: operands[n] for n in plans.BLOCK_SPARSE_DQ.operands}))

    g, group_of = p.group, (lambda h: h)  # grid axis 1 runs over K/V heads
    in_specs = [seq_spec(p, p.q_len, g, group_of), seq_spec(p, p.kv_len, None, group_of),
                seq_spec(p, p.kv_len, None, group_of),
                *_group_list_specs(sp, q_index.shape[-1], sp.block_k // dkv_cfg.block_k), *_position_specs(p, q_pos),
                seq_spec(p, p.q_len, g, group_of), row_spec(p.q_len, g, group_of), row_spec(p.q_len, g, group_of)]
    kv_spec = seq_spec(p, p.kv_len, None, group_of)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, sp=sp, tile_q=dkv_cfg.block_q, tile_k=dkv_cfg.block_k),
        grid=(pl.cdiv(p.kv_len, dkv_cfg.block_k), p.kv_heads, p.batch),
        in_specs=in_specs, out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        **lowering.pallas_args(dkv_cfg), name=plans.BLOCK_SPARSE_DKV.name,
    )(*plans.BLOCK_SPARSE_DKV.ordered(**{n: operands[n] for n in plans.BLOCK_SPARSE_DKV.operands}))
    return dq, dk, dv
