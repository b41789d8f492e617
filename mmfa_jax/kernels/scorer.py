"""The scorer kernels of visual-token importance: a few query rows over all keys, in chunks of keys
(the scorer rows' max and sum of exp, then the probability each key receives)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmfa_jax.backends import Lowering
from mmfa_jax.kernels.backward import backward_lse
from mmfa_jax.kernels.common import (
    Problem,
    batch_spec,
    block_size,
    column_mask,
    dot,
    load,
    load_rows,
    logits,
    optional,
    scalar,
    seq_spec,
    three_ranges,
)
from mmfa_jax.masking import band_visible, combine, kv_block_range
from mmfa_jax.tuning import KernelConfig

# --------------------------------------------------------------------------------------------
# Scorer rows: a few query rows (named by their positions, read in place) over all keys. The grid
# runs over chunks of keys, so every SM has work however few the rows; within a program the loop
# over the chunk's key blocks is the inner one, so Triton pipelines its loads. Two passes read K:
# the first gives each row's max and sum of exp per chunk, the second combines those into the LSE
# and sums the attention probability each key receives over the rows. Cost: two passes over K for
# R rows, never T x S.


class _Scorers:
    """The scorer rows against the key blocks of this program's chunk. Row r of the R is query row
    positions[r] (read in place from q); rows at or past ``count`` are padding."""

    def __init__(self, p: Problem, rows: int, block_q: int, block_k: int, blocks_per_chunk: int, q_ref, k_ref,
                 pos_ref, qseg_ref, kvseg_ref, kvlen_ref, count_ref):
        self.p, self.rows, self.block_q, self.block_k = p, rows, block_q, block_k
        self.q_ref, self.k_ref, self.pos_ref, self.qseg_ref, self.kvseg_ref = q_ref, k_ref, pos_ref, qseg_ref, kvseg_ref
        self.cols = column_mask(p)
        self.kv_valid = jnp.minimum(scalar(kvlen_ref, p.kv_len), p.kv_len)
        self.count = jnp.minimum(count_ref[...], rows)
        first = pl.program_id(0) * blocks_per_chunk
        self.blocks = (first, jnp.minimum(first + blocks_per_chunk, pl.cdiv(p.kv_len, block_k)))
        # Static: whether any block can go unmasked (segments hide single logits anywhere).
        self.any_full = qseg_ref is None and p.kv_len >= block_k

    @property
    def num_row_tiles(self):
        return pl.cdiv(self.count, self.block_q)

    def row_tile(self, i):
        """Rows i*block_q ...: (row slice, row is real, q tile, positions, segments or None)."""
        r = i * self.block_q + jnp.arange(self.block_q)
        r_rows = pl.ds(i * self.block_q, self.block_q)
        in_r = r < self.count
        q_pos = plgpu.load(self.pos_ref.at[r_rows], mask=in_r, other=0)
        q = load_rows(self.q_ref, q_pos, in_r, self.cols, self.p.head_dim_padded)
        q_seg = None if self.qseg_ref is None else plgpu.load(self.qseg_ref.at[r_rows], mask=in_r, other=-1)
        return r_rows, in_r, q, q_pos, q_seg

    def ranges(self, tile, skip_hidden: bool):
        """(lo, full_lo, full_hi, hi): this chunk's key blocks, those in [full_lo, full_hi) visible
        to every live row of the tile (no mask needed: the band seen from the tile's first and
        last live positions). ``skip_hidden``: [lo, hi) holds only blocks some row may see;
        else it is the whole chunk (a pass that writes every key)."""
        p, (first, last) = self.p, self.blocks
        _, in_r, _, q_pos, _ = tile
        q_min = jnp.min(jnp.where(in_r, q_pos, p.q_len))
        q_max = jnp.max(jnp.where(in_r, q_pos, 0))
        num_blocks = pl.cdiv(p.kv_len, self.block_k)
        band = kv_block_range(p.band, q_min, jnp.maximum(q_max - q_min + 1, 1), self.block_k, self.kv_valid,
                              num_blocks)
        lo, hi = (jnp.maximum(band[0], first), jnp.minimum(band[3], last)) if skip_hidden else (first, last)
        hi = jnp.maximum(lo, hi)
        full_lo = jnp.clip(band[1], lo, hi)
        full_hi = jnp.clip(band[2], full_lo, hi)
        return lo, full_lo, full_hi, hi

    def logits(self, tile, j, masked: bool = True):
        """Key block j: (key slice, key in range, base-2 logits (block_q, block_k)); masked: -inf
        where hidden and in rows that are not live. Unmasked (a block every live row sees wholly,
        below the key length), rows that are not live hold finite logits of a zero query."""
        p, bk = self.p, self.block_k
        _, in_r, q, q_pos, q_seg = tile
        k_pos = j * bk + jnp.arange(bk)
        k_rows = pl.ds(j * bk, bk)
        in_k = k_pos < p.kv_len
        k = load(self.k_ref, k_rows, in_k if masked else None, self.cols)
        s, _ = logits(p, dot(p, q, k, trans_b=True), None)
        if not masked:
            return k_rows, None, s
        vis = combine(k_pos[None, :] < self.kv_valid, band_visible(p.band, q_pos, k_pos))
        if q_seg is not None:
            kv_seg = plgpu.load(self.kvseg_ref.at[k_rows], mask=in_k, other=-2)
            vis = vis & (q_seg[:, None] == kv_seg[None, :])
        return k_rows, in_k, jnp.where(vis & in_r[:, None], s, -jnp.inf)


def _scorer_stats_kernel(q_ref, k_ref, pos_ref, qseg_ref, kvseg_ref, kvlen_ref, count_ref, m_ref, l_ref, *,
                         p: Problem, rows: int, block_q: int, block_k: int, blocks_per_chunk: int):
    sc = _Scorers(p, rows, block_q, block_k, blocks_per_chunk, q_ref, k_ref, pos_ref, qseg_ref, kvseg_ref, kvlen_ref,
                  count_ref)

    def row_tile(i, carry):
        tile = sc.row_tile(i)

        def key_block(j, ml, masked):  # online max and sum of exp over the chunk (base 2)
            m, l = ml
            _, _, s = sc.logits(tile, j, masked)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            return m_new, l * jnp.exp2(m - shift) + jnp.sum(jnp.exp2(s - shift[:, None]), axis=1)

        init = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
        # (Rows that are not live are never stored, so the unmasked blocks may leave them finite.)
        m, l = three_ranges(key_block, sc.ranges(tile, skip_hidden=True), init, any_full=sc.any_full)
        plgpu.store(m_ref.at[tile[0]], m, mask=tile[1])
        plgpu.store(l_ref.at[tile[0]], l, mask=tile[1])
        return carry

    lax.fori_loop(0, sc.num_row_tiles, row_tile, 0)


# Chunks of the stats combined at a time by the importance kernel (bounds its registers).
_CHUNKS_AT_ONCE = 32


def _combined_lse(m_ref, l_ref, r_rows, live, num_chunks: int):
    """Base-2 LSE of the rows r_rows from the stats kernel's per-chunk (max, sum), +inf for rows
    that are not live or see nothing (so that their probabilities come out 0)."""
    width = min(_CHUNKS_AT_ONCE, pl.next_power_of_2(num_chunks))
    c = jnp.arange(width)

    def group(g, ml):
        top, total = ml
        at = c + g * width
        mask = (at < num_chunks)[:, None] & live[None, :]
        m = plgpu.load(m_ref.at[pl.ds(g * width, width), r_rows], mask=mask, other=-jnp.inf)
        l = plgpu.load(l_ref.at[pl.ds(g * width, width), r_rows], mask=mask, other=0.0)
        new_top = jnp.maximum(top, jnp.max(m, axis=0))
        shift = jnp.where(new_top == -jnp.inf, 0.0, new_top)
        return new_top, total * jnp.exp2(top - shift) + jnp.sum(l * jnp.exp2(m - shift[None, :]), axis=0)

    n = r_rows.size
    top, total = lax.fori_loop(0, pl.cdiv(num_chunks, width), group,
                               (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32)))
    return jnp.where(total > 0, top + jnp.log2(jnp.where(total > 0, total, 1.0)), jnp.inf)


def _importance_kernel(q_ref, k_ref, *refs, p: Problem, rows: int, block_q: int, block_k: int,
                       blocks_per_chunk: int, num_chunks: int | None):
    # Either the rows' LSE (B, N, R) or the stats kernel's (max, sum) per chunk (B, N, chunks, R).
    lse_ref, m_ref, l_ref = (refs[0], None, None) if num_chunks is None else (None, refs[0], refs[1])
    pos_ref, qseg_ref, kvseg_ref, kvlen_ref, qlen_ref, count_ref, out_ref = refs[1 if num_chunks is None else 2:]
    sc = _Scorers(p, rows, block_q, block_k, blocks_per_chunk, q_ref, k_ref, pos_ref, qseg_ref, kvseg_ref, kvlen_ref,
                  count_ref)
    q_valid = scalar(qlen_ref, p.q_len)

    def row_tile(i, carry):
        tile = sc.row_tile(i)
        r_rows, in_r, q_pos = tile[0], tile[1], tile[3]
        live = in_r & (q_pos < q_valid)  # rows past the query length attend to nothing (as in attention)
        if lse_ref is None:
            lse = _combined_lse(m_ref, l_ref, r_rows, live, num_chunks)
        else:
            lse = backward_lse(plgpu.load(lse_ref.at[r_rows], mask=live, other=-jnp.inf))

        def key_block(j, carry, masked):
            k_rows, in_k, s = sc.logits(tile, j, masked)
            # Rows that are not live have lse +inf: probability 0 (their logits are finite).
            probs = jnp.sum(jnp.exp2(s - lse[:, None]), axis=0)
            # This program owns these keys: the first row tile writes, later ones add.
            if masked:
                before = plgpu.load(out_ref.at[k_rows], mask=in_k & (i > 0), other=0.0)
                plgpu.store(out_ref.at[k_rows], before + probs, mask=in_k)
            else:
                plgpu.store(out_ref.at[k_rows], jnp.where(i > 0, out_ref[k_rows], 0.0) + probs)
            return carry

        # Every key of the chunk is written (zeros where no row sees it).
        return three_ranges(key_block, sc.ranges(tile, skip_hidden=False), carry, any_full=sc.any_full)

    # At least one row tile, so that an example without scorer rows still writes its zeros.
    lax.fori_loop(0, jnp.maximum(sc.num_row_tiles, 1), row_tile, 0)


# Aim for this many programs (chunks x heads x batch): a few waves of the GPU's SMs.
_SCORER_PROGRAMS = 512


def _blocks_per_chunk(p: Problem, num_blocks: int) -> int:
    return max(1, min(16, num_blocks * p.q_heads * p.batch // _SCORER_PROGRAMS))


def _scorer_chunks(p: Problem, cfg: KernelConfig) -> tuple[int, int, int]:
    """(block_k, key blocks per chunk, chunks) of the scorer kernels."""
    block_k = block_size(p.kv_len, cfg.block_k)
    num_blocks = pl.cdiv(p.kv_len, block_k)
    per_chunk = _blocks_per_chunk(p, num_blocks)
    return block_k, per_chunk, pl.cdiv(num_blocks, per_chunk)


def _scorer_call(kernel, p: Problem, cfg: KernelConfig, q, k, row_stats, positions, q_seg_rows, kv_seg, kv_lengths,
                 q_lengths, counts, out_specs, out_shape, lowering: Lowering, name: str, **static):
    """One scorer kernel over the grid (chunks, heads, batch). ``row_stats``: the per-row inputs
    (LSE, or per-chunk stats) as (array, BlockSpec) pairs; ``q_lengths`` None for the stats kernel."""
    R = positions.shape[1]
    block_k, per_chunk, num_chunks = _scorer_chunks(p, cfg)
    head = lambda n: n  # noqa: E731
    in_specs = [
        seq_spec(p, p.q_len, None, head),
        seq_spec(p, p.kv_len, None, lambda n: n // p.group),
        *(spec for _, spec in row_stats),
        batch_spec(R),
        optional(q_seg_rows is not None, batch_spec(R)),
        optional(kv_seg is not None, batch_spec(p.kv_len)),
        optional(kv_lengths is not None, batch_spec(None)),
        *([] if kernel is _scorer_stats_kernel else [optional(q_lengths is not None, batch_spec(None))]),
        batch_spec(None),
    ]
    args = [q, k, *(a for a, _ in row_stats), positions, q_seg_rows, kv_seg, kv_lengths,
            *([] if kernel is _scorer_stats_kernel else [q_lengths]), counts]
    kernel = functools.partial(kernel, p=p, rows=R, block_q=block_size(R, cfg.block_q), block_k=block_k,
                               blocks_per_chunk=per_chunk, **static)
    return pl.pallas_call(
        kernel, grid=(num_chunks, p.q_heads, p.batch), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        **lowering.pallas_args(cfg), name=name,
    )(*args)


def scorer_stats(p: Problem, cfg: KernelConfig, q, k, positions, q_seg_rows, kv_seg, kv_lengths, counts, *,
                 lowering: Lowering):
    """Per key chunk, each scorer row's max logit and sum of exp (base 2): two (B, N, chunks, R)
    float32 arrays, which ``importance`` combines into the rows' LSE. Arguments as for
    ``importance``; rows past ``counts`` are left unwritten (``importance`` never reads them)."""
    R = positions.shape[1]
    num_chunks = _scorer_chunks(p, cfg)[2]
    spec = pl.BlockSpec((None, None, None, R), lambda t, n, b: (b, n, t, 0))
    shape = jax.ShapeDtypeStruct((p.batch, p.q_heads, num_chunks, R), jnp.float32)
    return _scorer_call(_scorer_stats_kernel, p, cfg, q, k, [], positions, q_seg_rows, kv_seg, kv_lengths, None,
                        counts, [spec, spec], [shape, shape], lowering, "mmfa_scorer_stats")


def importance(p: Problem, cfg: KernelConfig, q, k, positions, q_seg_rows, kv_seg, kv_lengths, q_lengths, counts, *,
               lse_rows=None, stats=None, lowering: Lowering):
    """Summed attention probabilities per key and query head, (B, N, S) float32.

    q, k: the query and key of the original (T-row) attention, in its layout (``p``); positions:
    (B, R) int32, the scorer rows (query rows, read in place; also their place in the causal or
    window band); counts: (B,) int32, how many of the R are real; q_seg_rows: (B, R) or None;
    q_lengths: (B,) or None: rows at or past it attend to nothing. The rows' normaliser comes as
    ``lse_rows`` (B, N, R) float32 (natural log, -inf for a row that sees nothing), or as
    ``stats``, what ``scorer_stats`` returned for the same arguments (combined here).
    """
    R = positions.shape[1]
    out_spec = pl.BlockSpec((None, None, p.kv_len), lambda t, n, b: (b, n, 0))
    shape = jax.ShapeDtypeStruct((p.batch, p.q_heads, p.kv_len), jnp.float32)
    if stats is not None:
        num_chunks = stats[0].shape[2]
        spec = pl.BlockSpec((None, None, num_chunks, R), lambda t, n, b: (b, n, 0, 0))
        row_stats = [(stats[0], spec), (stats[1], spec)]
    else:
        num_chunks = None
        row_stats = [(lse_rows, pl.BlockSpec((None, None, R), lambda t, n, b: (b, n, 0)))]
    return _scorer_call(_importance_kernel, p, cfg, q, k, row_stats, positions, q_seg_rows, kv_seg, kv_lengths,
                        q_lengths, counts, out_spec, shape, lowering, "mmfa_importance", num_chunks=num_chunks)
