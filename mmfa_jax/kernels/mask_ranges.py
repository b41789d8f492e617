"""Block ranges of a dense mask: which key blocks each forward query tile must visit, and which
of them need no token-level mask."""

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
from mmfa_jax.kernels.common import Problem, block_size
from mmfa_jax.tuning import KernelConfig

# --------------------------------------------------------------------------------------------
# Block ranges of a dense mask. Per query tile and (mask) batch and head: the key blocks from the
# first to the last one with a visible logit, and the longest run of blocks in which every logit
# is visible. The forward intersects them with its band's ranges: blocks outside the first pair
# are skipped, blocks in the run need no mask, the rest take the mask tile by tile. Patterns
# such as causal, sliding windows, padding and bidirectional blocks along the diagonal (Gemma 3's
# images) have that shape; any other mask stays exact, only slower.


def forward_query_tiles(q_len: int, cfg: KernelConfig) -> int:
    """How many query tiles the forward has (the third axis of ``mask_ranges``)."""
    return pl.cdiv(q_len, block_size(q_len, cfg.block_q))


# Two kernels, so that the mask is read by many programs at once: one per (query tile, key block)
# says whether its tile of the mask shows some logit and whether it shows all of them; then one per
# query tile turns its row of those flags into the ranges. (One program per query tile walking its
# key blocks in turn was latency-bound: 0.36 ms per call at 2.4k tokens on the H200.)

_HIDDEN, _PARTLY, _FULL = 0, 1, 2  # a block's flag: live + full, as full implies live


def _mask_blocks_kernel(mask_ref, out_ref, *, p: Problem, block_q: int, block_k: int, num_k_blocks: int):
    t, j = pl.program_id(0) // num_k_blocks, pl.program_id(0) % num_k_blocks
    q_pos = t * block_q + jnp.arange(block_q)
    k_pos = j * block_k + jnp.arange(block_k)
    inside = (q_pos < p.q_len)[:, None] & (k_pos < p.kv_len)[None, :]
    tile = plgpu.load(mask_ref.at[pl.ds(t * block_q, block_q), pl.ds(j * block_k, block_k)],
                      mask=inside, other=0).astype(jnp.int32)
    # (Reduced one axis at a time: Triton's lowering takes one axis per reduction.)
    live = jnp.max(jnp.max(tile, axis=1)) > 0  # some logit visible (cells past the array read as hidden)
    full = jnp.min(jnp.min(jnp.where(inside, tile, 1), axis=1)) > 0  # all visible (past it: don't care)
    # A sum, not nested selects of constants: on the GPU (both Triton routes) that select gave
    # _HIDDEN for full blocks, as if the constant 2 had been narrowed to one bit.
    flag = live.astype(jnp.int32) + full.astype(jnp.int32)
    out_ref[...] = jnp.full((1,), flag, jnp.int32)


def _mask_ranges_kernel(flags_ref, out_ref, *, num_k_blocks: int):
    width = flags_ref.shape[-1]
    idx = jnp.arange(width)
    flags = plgpu.load(flags_ref.at[pl.ds(0, width)], mask=idx < num_k_blocks, other=_HIDDEN)
    live = flags != _HIDDEN
    lo = jnp.min(jnp.where(live, idx, num_k_blocks))
    hi = jnp.max(jnp.where(live, idx + 1, 0))

    def body(j, carry):  # the first longest run of full blocks
        run_lo, run_hi, best_lo, best_hi = carry
        full = jnp.sum(jnp.where(idx == j, flags, 0)) == _FULL
        run_lo = jnp.where(full & (run_hi != j), j, run_lo)  # a run of full blocks starts or goes on
        run_hi = jnp.where(full, j + 1, run_hi)
        longer = full & (run_hi - run_lo > best_hi - best_lo)
        return run_lo, run_hi, jnp.where(longer, run_lo, best_lo), jnp.where(longer, run_hi, best_hi)

    zero = jnp.int32(0)
    _, _, best_lo, best_hi = lax.fori_loop(0, num_k_blocks, body, (zero, zero, zero, zero))
    slot = jnp.arange(4)
    out_ref[...] = jnp.where(slot == 0, lo, jnp.where(slot == 1, best_lo, jnp.where(slot == 2, best_hi, hi)))


def mask_ranges(p: Problem, cfg: KernelConfig, dense_mask, *, lowering: Lowering):
    """(Bm, Nm, query tiles, 4) int32: per tile of the forward configuration ``cfg`` (first live
    key block, full run start, full run end, last live block + 1) of the int8 dense mask
    (Bm, Nm, T, S); a tile without a live block gets (number of key blocks, 0, 0, 0)."""
    bm, nm = p.mask_shape
    block_q, block_k = block_size(p.q_len, cfg.block_q), block_size(p.kv_len, cfg.block_k)
    num_tiles = forward_query_tiles(p.q_len, cfg)
    num_k_blocks = pl.cdiv(p.kv_len, block_k)
    width = pl.next_power_of_2(num_k_blocks)  # the flags' row, padded for the second kernel's vector
    small = lowering.pallas_args(dataclasses.replace(cfg, num_warps=4, num_stages=1))
    flags = pl.pallas_call(
        functools.partial(_mask_blocks_kernel, p=p, block_q=block_q, block_k=block_k, num_k_blocks=num_k_blocks),
        grid=(num_tiles * num_k_blocks, nm, bm),
        in_specs=[pl.BlockSpec((None, None, p.q_len, p.kv_len), lambda i, n, b: (b, n, 0, 0))],
        out_specs=pl.BlockSpec((None, None, None, 1), lambda i, n, b: (b, n, i // num_k_blocks, i % num_k_blocks)),
        out_shape=jax.ShapeDtypeStruct((bm, nm, num_tiles, width), jnp.int32),
        **small, name=plans.MASK_BLOCKS.name,
    )(*plans.MASK_BLOCKS.ordered(mask=dense_mask))
    return pl.pallas_call(
        functools.partial(_mask_ranges_kernel, num_k_blocks=num_k_blocks),
        grid=(num_tiles, nm, bm),
        in_specs=[pl.BlockSpec((None, None, None, width), lambda t, n, b: (b, n, t, 0))],
        out_specs=pl.BlockSpec((None, None, None, 4), lambda t, n, b: (b, n, t, 0)),
        out_shape=jax.ShapeDtypeStruct((bm, nm, num_tiles, 4), jnp.int32),
        **small, name=plans.MASK_RANGES.name,
    )(*plans.MASK_RANGES.ordered(mask_blocks=flags))


def load_ranges(ref):
    """The four block indices of this program's tile, as scalars."""
    row = ref[...]
    slot = jnp.arange(4)
    return tuple(jnp.sum(jnp.where(slot == i, row, 0)) for i in range(4))


def intersect_ranges(band, mask):
    """Block ranges (lo, full_lo, full_hi, hi) that both the band and the mask allow."""
    lo = jnp.maximum(band[0], mask[0])
    hi = jnp.maximum(lo, jnp.minimum(band[3], mask[3]))
    full_lo = jnp.clip(jnp.maximum(band[1], mask[1]), lo, hi)
    full_hi = jnp.clip(jnp.minimum(band[2], mask[2]), full_lo, hi)
    return lo, full_lo, full_hi, hi
