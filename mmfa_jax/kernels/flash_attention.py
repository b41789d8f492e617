"""Flash attention as Pallas kernels (Triton lowering): forward, dQ and dK/dV.

The kernels read like FlashAttention-2: the forward walks the key blocks of one query tile with
an online softmax and writes the output and the log-sum-exp; the backward recomputes the
probabilities from that LSE, one kernel per key tile for dK/dV (looping over the query heads of
its GQA group, so no atomics and no repeated K/V) and one per query tile for dQ.

Argument checking lives in ``mmfa_jax.attention``; here every input is assumed valid:
  q, o, do: (B, T, N, H) or (B, N, T, H) (``layout``), k, v: likewise with S and K heads,
  bias: (Bb, Nb, T, S) with Bb in {1, B}, Nb in {1, N}; dense_mask: int8 of the same form,
  q_segments: (B, T) int32, kv_segments: (B, S) int32, q_lengths / kv_lengths: (B,) int32,
  lse, delta: (B, N, T) float32.
The head dimension is padded to a power of two inside the kernel (masked loads), sequence
lengths need not be multiples of the blocks (masked loads and stores), so no copy is made.

Internally logits are kept in base 2 (scaled by log2(e)) so the softmax uses exp2.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmfa_jax.backends import Lowering
from mmfa_jax.masking import Band, band_visible, combine, kv_block_range, q_block_range
from mmfa_jax.tuning import KernelConfig

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Problem:
    """Static description of one attention call: what the kernels are specialised on."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    scale: float
    softcap: float | None
    band: Band
    layout: str  # "BTNH" (jax) or "BNTH" (torch)
    bias_shape: tuple[int, int] | None  # (Bb, Nb) of the bias, None without one
    mask_shape: tuple[int, int] | None  # (Bm, Nm) of the dense mask
    has_segments: bool
    has_q_lengths: bool
    has_kv_lengths: bool
    dot_precision: str | None  # None: the dtype's default; "highest" for float32 inputs

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def head_dim_padded(self) -> int:
        return padded_head_dim(self.head_dim)

    @property
    def needs_elementwise_mask(self) -> bool:
        return self.has_segments or self.mask_shape is not None


def padded_head_dim(head_dim: int) -> int:
    """The head dimension the kernels compute with: a power of two, at least 16 (masked loads)."""
    return max(16, pl.next_power_of_2(head_dim))


def _tile(n: int, block: int) -> int:
    """A power-of-two tile no larger than needed (Triton wants powers of two, dots at least 16)."""
    return max(16, min(block, pl.next_power_of_2(n)))


# --------------------------------------------------------------------------------------------
# BlockSpecs. The grid is (tile, head, batch): tiles of one head run next to each other, so
# they share that head's K/V (or Q) in L2.


def _seq_spec(p: Problem, seq_len: int, heads_per_block: int | None, head_of):
    """Whole sequence of one head (or of a group of heads) of a (B, L, N, H)/(B, N, L, H) array."""
    hp = p.head_dim_padded
    if p.layout == "BTNH":
        return pl.BlockSpec((None, seq_len, heads_per_block, hp), lambda t, n, b: (b, 0, head_of(n), 0))
    return pl.BlockSpec((None, heads_per_block, seq_len, hp), lambda t, n, b: (b, head_of(n), 0, 0))


def _row_spec(length: int, heads_per_block: int | None, head_of):
    """(B, N, L) float32 rows (lse, delta) of one head or group."""
    return pl.BlockSpec((None, heads_per_block, length), lambda t, n, b: (b, head_of(n), 0))


def _pair_spec(p: Problem, shape: tuple[int, int] | None, heads_per_block: int | None, head_of):
    """(Bb, Nb, T, S) bias or dense mask, broadcast over batch and heads by the index map."""
    if shape is None:
        return None
    bb, nb = shape
    per_head = nb > 1
    return pl.BlockSpec(
        (None, heads_per_block if per_head else None, p.q_len, p.kv_len),
        lambda t, n, b: (b if bb > 1 else 0, head_of(n) if per_head else 0, 0, 0),
    )


def _batch_spec(length: int | None):
    if length is None:  # (B,) lengths: one scalar per program
        return pl.BlockSpec((None,), lambda t, n, b: (b,))
    return pl.BlockSpec((None, length), lambda t, n, b: (b, 0))


def _optional(flag: bool, spec):
    return spec if flag else None


def _common_in_specs(p: Problem, heads_per_block, head_of):
    """Specs for bias, dense mask, segments and lengths, in kernel argument order."""
    return [
        _pair_spec(p, p.bias_shape, heads_per_block, head_of),
        _pair_spec(p, p.mask_shape, heads_per_block, head_of),
        _optional(p.has_segments, _batch_spec(p.q_len)),
        _optional(p.has_segments, _batch_spec(p.kv_len)),
        _optional(p.has_q_lengths, _batch_spec(None)),
        _optional(p.has_kv_lengths, _batch_spec(None)),
    ]


# --------------------------------------------------------------------------------------------
# Pieces of the kernel bodies shared by forward and backward.


class _View:
    """A ref with one axis fixed at a (dynamic) head of a GQA group. Triton's lowering takes a
    single indexer per load, so the head index joins each tile's index rather than making a
    sub-ref."""

    def __init__(self, ref, head=None, axis: int = 0):
        self.ref, self.head, self.axis = ref, head, axis

    def load(self, *idx, mask=None, other=None):
        if self.head is not None:
            idx = idx[:self.axis] + (self.head,) + idx[self.axis:]
        if mask is None:
            return self.ref[idx]
        return plgpu.load(self.ref.at[idx], mask=mask, other=other)


def _view(ref):
    return ref if ref is None or isinstance(ref, _View) else _View(ref)


def _load(ref, rows, row_mask, col_mask):
    """Masked tile load: rows out of range and padded head columns read as 0."""
    mask = combine(None if row_mask is None else row_mask[:, None], col_mask)
    return _view(ref).load(rows, slice(None), mask=mask, other=0)


def _load_rows(ref, rows, row_mask, col_mask, width: int):
    """Masked load of the tile at arbitrary rows (an int vector) of a (L, width) ref. Both axes
    take array indexers: the CPU interpreter's loads take arrays or slices, not a mix."""
    mask = combine(None if row_mask is None else row_mask[:, None], col_mask)
    return plgpu.load(ref.at[rows[:, None], jnp.arange(width)[None, :]], mask=mask,
                      other=None if mask is None else 0)


def _dot(p: Problem, a, b, trans_b: bool = False, trans_a: bool = False):
    precision = lax.Precision.HIGHEST if p.dot_precision == "highest" else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _logits(p: Problem, qk, bias_tile):
    """Logits in base 2 from q.k: scale, soft cap, bias. Returns (s2, tanh or None)."""
    if p.softcap is None:
        s2, t = qk * (p.scale * LOG2E), None
    else:
        t = jnp.tanh(qk * (p.scale / p.softcap))
        s2 = t * (p.softcap * LOG2E)
    if bias_tile is not None:
        s2 = s2 + bias_tile.astype(jnp.float32) * LOG2E
    return s2, t


def _scalar(ref, default):
    return default if ref is None else ref[...]


class _Side:
    """Refs and static facts that the masked path needs for one tile of keys or queries."""

    def __init__(self, p: Problem, bias_ref, mask_ref, qseg_ref, kvseg_ref, kv_valid):
        self.p, self.bias_ref, self.mask_ref = p, bias_ref, mask_ref
        self.qseg_ref, self.kvseg_ref, self.kv_valid = qseg_ref, kvseg_ref, kv_valid

    def pair_tile(self, ref, q_rows, k_rows, q_pos, k_pos, fill):
        if ref is None:
            return None
        mask = (q_pos[:, None] < self.p.q_len) & (k_pos[None, :] < self.p.kv_len)
        return _view(ref).load(q_rows, k_rows, mask=mask, other=fill)

    def visible(self, q_rows, k_rows, q_pos, k_pos):
        """Boolean (tile_q, tile_k): which logits of the tile count."""
        p = self.p
        vis = k_pos[None, :] < self.kv_valid
        vis = combine(vis, band_visible(p.band, q_pos, k_pos))
        if self.qseg_ref is not None:
            qs = plgpu.load(self.qseg_ref.at[q_rows], mask=q_pos < p.q_len, other=-1)
            ks = plgpu.load(self.kvseg_ref.at[k_rows], mask=k_pos < p.kv_len, other=-2)
            vis = vis & (qs[:, None] == ks[None, :])
        if self.mask_ref is not None:
            vis = vis & (self.pair_tile(self.mask_ref, q_rows, k_rows, q_pos, k_pos, 0) != 0)
        return vis


def _three_ranges(body, ranges, carry, *, any_full: bool = True):
    """Run ``body(j, carry, masked)`` over [lo, full_lo) masked, [full_lo, full_hi) unmasked,
    [full_hi, hi) masked: only tiles on an edge pay for the mask. ``any_full=False`` (static:
    the sequence is shorter than one tile, or single logits may be masked) masks every tile."""
    lo, full_lo, full_hi, hi = ranges
    if not any_full:
        return lax.fori_loop(lo, hi, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _skip_dead_rows(ranges, any_live_row):
    """An empty range for a query tile wholly past the query length (padding, pruned tokens)."""
    lo = ranges[0]
    return tuple(jnp.where(any_live_row, r, lo) for r in ranges)


def _query_tile(p: Problem, tile_axis: int = 0):
    """This program's query tile. Under a causal band (no left bound) later tiles see more keys:
    hand them out first, so that the short tiles fill the last wave instead of a long one
    running alone at the end."""
    return _tile_order(p, pl.num_programs(tile_axis))(pl.program_id(tile_axis))


def _heads_inside_tiles(p: Problem, num_tiles: int) -> bool:
    """Whether the grid runs every head's tile t before any head's next tile (heads as the fastest
    grid axis) rather than one head's tiles in a row.

    Under a causal band, tiles are handed out heaviest first (``_query_tile``); with heads inside,
    that order holds across all heads, the longest-job-first schedule. With a head's tiles in a
    row, the heavy tiles of the last heads start late. For short sequences (33 tiles of 16
    heads: a schedule of 86 tile steps per SM against 69, by simulation) that costs a quarter of
    the time; for long ones (129 tiles) under 1%, while there one head's K/V then stays in L2.
    Measured on the H100 (bench/NOTES.md): 4,160 causal tokens 0.213 -> 0.178 ms, 8,256 0.669 ->
    0.637, 16,448 2.298 -> 2.372 (hence the bound)."""
    return p.band.right is not None and p.band.left is None and num_tiles <= 96


def _tile_grid(num_tiles: int, heads: int, batch: int, heads_inside: bool, specs):
    """(grid, tile axis, specs): specs written for a (tile, head, batch) grid, adapted to the grid
    with heads as the fastest axis when ``heads_inside``."""
    if not heads_inside:
        return (num_tiles, heads, batch), 0, specs

    def swapped(spec):
        if spec is None:
            return None
        return pl.BlockSpec(spec.block_shape, lambda n, t, b, f=spec.index_map: f(t, n, b))

    return (heads, num_tiles, batch), 1, [swapped(s) for s in specs]


def _tile_order(p: Problem, num_tiles):
    """Program index -> query tile (see ``_query_tile``)."""
    if p.band.right is not None and p.band.left is None:
        return lambda t: num_tiles - 1 - t
    return lambda t: t


def _column_mask(p: Problem):
    hp = p.head_dim_padded
    return None if hp == p.head_dim else (jnp.arange(hp) < p.head_dim)[None, :]


# --------------------------------------------------------------------------------------------
# Forward


def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, mask_ref, qseg_ref, kvseg_ref, qlen_ref, kvlen_ref,
                    mask_ranges_ref, q_source_ref, kv_source_ref, o_ref, lse_ref, *, p: Problem, block_q: int,
                    block_k: int, tile_axis: int):
    t = _query_tile(p, tile_axis)
    q_start = t * block_q
    q_pos = q_start + jnp.arange(block_q)
    q_rows = pl.ds(q_start, block_q)
    cols = _column_mask(p)
    hp = p.head_dim_padded

    kv_valid = jnp.minimum(_scalar(kvlen_ref, p.kv_len), p.kv_len)
    q_valid = jnp.minimum(_scalar(qlen_ref, p.q_len), p.q_len)
    side = _Side(p, bias_ref, mask_ref, qseg_ref, kvseg_ref, kv_valid)

    in_q = q_pos < p.q_len
    # Query rows read in place (``q_source``): once per program, before the key loop, so the
    # indirect load costs nothing in the loop's pipelining.
    if q_source_ref is None:
        q = _load(q_ref, q_rows, in_q, cols)
    else:
        q = _load_rows(q_ref, plgpu.load(q_source_ref.at[q_rows], mask=in_q, other=0), in_q, cols, hp)
    num_k_blocks = pl.cdiv(p.kv_len, block_k)
    ranges = kv_block_range(p.band, q_start, block_q, block_k, kv_valid, num_k_blocks)
    if mask_ranges_ref is not None:  # a dense mask: visit only its live blocks, unmasked where it is all True
        ranges = _intersect_ranges(ranges, _load_ranges(mask_ranges_ref))
    ranges = _skip_dead_rows(ranges, q_start < q_valid)
    # Segments hide single logits anywhere; a dense mask's full blocks are known from its ranges.
    any_full = not p.has_segments and p.kv_len >= block_k

    def body(j, carry, masked):
        acc, m, l = carry
        k_start = j * block_k
        k_rows = pl.ds(k_start, block_k)
        k_pos = k_start + jnp.arange(block_k)
        row_ok = k_pos < p.kv_len if masked else None
        if kv_source_ref is None:
            k = _load(k_ref, k_rows, row_ok, cols)
            v = _load(v_ref, k_rows, row_ok, cols)
        else:
            src = plgpu.load(kv_source_ref.at[k_rows], mask=row_ok, other=None if row_ok is None else 0)
            k = _load_rows(k_ref, src, row_ok, cols, hp)
            v = _load_rows(v_ref, src, row_ok, cols, hp)
        s, _ = _logits(p, _dot(p, q, k, trans_b=True), side.pair_tile(bias_ref, q_rows, k_rows, q_pos, k_pos, 0))
        if masked:
            s = jnp.where(side.visible(q_rows, k_rows, q_pos, k_pos), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row that has seen only masked logits keeps m = -inf; shift by 0 there so that
        # exp2(-inf - shift) is 0 rather than NaN.
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - shift)
        probs = jnp.exp2(s - shift[:, None])
        l = l * alpha + jnp.sum(probs, axis=1)
        acc = acc * alpha[:, None] + _dot(p, probs.astype(v.dtype), v)
        return acc, m_new, l

    init = (jnp.zeros((block_q, hp), jnp.float32),
            jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, l = _three_ranges(body, ranges, init, any_full=any_full)

    # Rows with something to attend to. l is exactly 0 where every logit was masked; a NaN in the
    # inputs makes l NaN, and such a row must give NaN (as jax.nn and torch SDPA do), not zeros.
    live = (l != 0) & (q_pos < q_valid)
    out = acc / jnp.where(live, l, 1.0)[:, None]
    out = jnp.where(live[:, None], out, 0.0)
    lse = jnp.where(live, (m + jnp.log2(jnp.where(live, l, 1.0))) * LN2, -jnp.inf)
    store_rows = q_pos < p.q_len
    plgpu.store(o_ref.at[q_rows, :], out.astype(o_ref.dtype), mask=combine(store_rows[:, None], cols))
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
    block_q, block_k = _tile(p.q_len, cfg.block_q), _tile(p.kv_len, cfg.block_k)
    q_head, kv_head = (lambda n: n), (lambda n: n // p.group)
    num_tiles = forward_query_tiles(p.q_len, cfg)
    ranges, ranges_spec = None, None
    if dense_mask is not None:
        ranges = mask_ranges(p, cfg, dense_mask, lowering=lowering)
        # Masked and unmasked loops over the keys, each pipelined: at most two stages fit in
        # shared memory with the table's largest tiles (three asked for 256 KiB on the H100).
        cfg = dataclasses.replace(cfg, num_stages=min(cfg.num_stages, 2))
        bm, nm = p.mask_shape
        tile_of = _tile_order(p, num_tiles)
        ranges_spec = pl.BlockSpec((None, None, None, 4), lambda t, n, b: (b if bm > 1 else 0, n if nm > 1 else 0,
                                                                          tile_of(t), 0))
    seq = 1 if p.layout == "BTNH" else 2
    in_specs = [
        _seq_spec(p, q.shape[seq], None, q_head),
        _seq_spec(p, k.shape[seq], None, kv_head),
        _seq_spec(p, v.shape[seq], None, kv_head),
        *_common_in_specs(p, None, q_head),
        ranges_spec,
        _optional(q_source is not None, _batch_spec(p.q_len)),
        _optional(kv_source is not None, _batch_spec(p.kv_len)),
    ]
    out_specs = [_seq_spec(p, p.q_len, None, q_head), _row_spec(p.q_len, None, q_head)]
    out_rows = (p.batch, p.q_len, p.q_heads) if p.layout == "BTNH" else (p.batch, p.q_heads, p.q_len)
    out_shape = [jax.ShapeDtypeStruct((*out_rows, p.head_dim), q.dtype),
                 jax.ShapeDtypeStruct((p.batch, p.q_heads, p.q_len), jnp.float32)]
    grid, tile_axis, specs = _tile_grid(num_tiles, p.q_heads, p.batch, _heads_inside_tiles(p, num_tiles),
                                        in_specs + out_specs)
    in_specs, out_specs = specs[:len(in_specs)], specs[len(in_specs):]
    kernel = functools.partial(_forward_kernel, p=p, block_q=block_q, block_k=block_k, tile_axis=tile_axis)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        **lowering.pallas_args(cfg), name="mmfa_flash_forward",
    )(q, k, v, bias, dense_mask, q_seg, kv_seg, q_lengths, kv_lengths, ranges, q_source, kv_source)


# --------------------------------------------------------------------------------------------
# Block ranges of a dense mask. Per query tile and (mask) batch and head: the key blocks from the
# first to the last one with a visible logit, and the longest run of blocks in which every logit
# is visible. The forward intersects them with its band's ranges: blocks outside the first pair
# are skipped, blocks in the run need no mask, the rest take the mask tile by tile. Patterns
# such as causal, sliding windows, padding and bidirectional blocks along the diagonal (Gemma 3's
# images) have that shape; any other mask stays exact, only slower.


def forward_query_tiles(q_len: int, cfg: KernelConfig) -> int:
    """How many query tiles the forward has (the third axis of ``mask_ranges``)."""
    return pl.cdiv(q_len, _tile(q_len, cfg.block_q))


def _mask_ranges_kernel(mask_ref, out_ref, *, p: Problem, block_q: int, block_k: int):
    t = pl.program_id(0)
    q_pos = t * block_q + jnp.arange(block_q)
    in_q = q_pos < p.q_len
    num_k_blocks = pl.cdiv(p.kv_len, block_k)

    def body(j, carry):
        lo, hi, run_lo, run_hi, best_lo, best_hi = carry
        k_pos = j * block_k + jnp.arange(block_k)
        inside = in_q[:, None] & (k_pos < p.kv_len)[None, :]
        tile = plgpu.load(mask_ref.at[pl.ds(t * block_q, block_q), pl.ds(j * block_k, block_k)],
                          mask=inside, other=0).astype(jnp.int32)
        # (Reduced one axis at a time: Triton's lowering takes one axis per reduction.)
        live = jnp.max(jnp.max(tile, axis=1)) > 0  # some logit visible (cells past the array read as hidden)
        full = jnp.min(jnp.min(jnp.where(inside, tile, 1), axis=1)) > 0  # all visible (past it: don't care)
        lo = jnp.where(live & (lo > j), j, lo)
        hi = jnp.where(live, j + 1, hi)
        run_lo = jnp.where(full & (run_hi != j), j, run_lo)  # a run of full blocks starts or goes on
        run_hi = jnp.where(full, j + 1, run_hi)
        longer = full & (run_hi - run_lo > best_hi - best_lo)
        return (lo, hi, run_lo, run_hi, jnp.where(longer, run_lo, best_lo), jnp.where(longer, run_hi, best_hi))

    zero = jnp.int32(0)
    lo, hi, _, _, best_lo, best_hi = lax.fori_loop(0, num_k_blocks, body, (jnp.int32(num_k_blocks), zero, zero,
                                                                           zero, zero, zero))
    slot = jnp.arange(4)
    out_ref[...] = jnp.where(slot == 0, lo, jnp.where(slot == 1, best_lo, jnp.where(slot == 2, best_hi, hi)))


def mask_ranges(p: Problem, cfg: KernelConfig, dense_mask, *, lowering: Lowering):
    """(Bm, Nm, query tiles, 4) int32: per tile of the forward configuration ``cfg`` (first live
    key block, full run start, full run end, last live block + 1) of the int8 dense mask
    (Bm, Nm, T, S); a tile without a live block gets (number of key blocks, 0, 0, 0)."""
    bm, nm = p.mask_shape
    block_q, block_k = _tile(p.q_len, cfg.block_q), _tile(p.kv_len, cfg.block_k)
    num_tiles = forward_query_tiles(p.q_len, cfg)
    return pl.pallas_call(
        functools.partial(_mask_ranges_kernel, p=p, block_q=block_q, block_k=block_k),
        grid=(num_tiles, nm, bm),
        in_specs=[pl.BlockSpec((None, None, p.q_len, p.kv_len), lambda t, n, b: (b, n, 0, 0))],
        out_specs=pl.BlockSpec((None, None, None, 4), lambda t, n, b: (b, n, t, 0)),
        out_shape=jax.ShapeDtypeStruct((bm, nm, num_tiles, 4), jnp.int32),
        **lowering.pallas_args(dataclasses.replace(cfg, num_warps=4, num_stages=1)),
        name="mmfa_mask_ranges",
    )(dense_mask)


def _load_ranges(ref):
    """The four block indices of this program's tile, as scalars."""
    row = ref[...]
    slot = jnp.arange(4)
    return tuple(jnp.sum(jnp.where(slot == i, row, 0)) for i in range(4))


def _intersect_ranges(band, mask):
    """Block ranges (lo, full_lo, full_hi, hi) that both the band and the mask allow."""
    lo = jnp.maximum(band[0], mask[0])
    hi = jnp.maximum(lo, jnp.minimum(band[3], mask[3]))
    full_lo = jnp.clip(jnp.maximum(band[1], mask[1]), lo, hi)
    full_hi = jnp.clip(jnp.minimum(band[2], mask[2]), full_lo, hi)
    return lo, full_lo, full_hi, hi


# --------------------------------------------------------------------------------------------
# Backward. With s the natural-log logits after bias, p = exp(s - lse) and
#   dv = p^T do,  dp = do v^T,  ds = p (dp - delta),  delta = rowsum(o * do) - dlse,
#   d(bias) = ds,  d(qk) = ds * scale * (1 - tanh^2 if soft-capped),  dq = d(qk) k,  dk = d(qk)^T q.
# Rows whose LSE is -inf (nothing visible, or past the query length) get LSE +inf here, which
# makes their p exactly 0.


def _backward_lse(lse):
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
    t = _query_tile(p, tile_axis)
    q_start = t * block_q
    q_pos = q_start + jnp.arange(block_q)
    q_rows = pl.ds(q_start, block_q)
    cols = _column_mask(p)
    kv_valid = jnp.minimum(_scalar(kvlen_ref, p.kv_len), p.kv_len)
    side = _Side(p, bias_ref, mask_ref, qseg_ref, kvseg_ref, kv_valid)

    in_q = q_pos < p.q_len
    q = _load(q_ref, q_rows, in_q, cols)
    do = _load(do_ref, q_rows, in_q, cols)
    lse = _backward_lse(plgpu.load(lse_ref.at[q_rows], mask=in_q, other=-jnp.inf))
    delta = plgpu.load(delta_ref.at[q_rows], mask=in_q, other=0.0)

    num_k_blocks = pl.cdiv(p.kv_len, block_k)
    q_valid = jnp.minimum(_scalar(qlen_ref, p.q_len), p.q_len)
    ranges = _skip_dead_rows(kv_block_range(p.band, q_start, block_q, block_k, kv_valid, num_k_blocks),
                             q_start < q_valid)
    if dbias_ref is not None:  # dbias must be written for every key tile, visible or not
        ranges = (0, num_k_blocks, num_k_blocks, num_k_blocks)
    any_full = not p.needs_elementwise_mask and dbias_ref is None and p.kv_len >= block_k

    def body(j, dq, masked):
        k_start = j * block_k
        k_rows = pl.ds(k_start, block_k)
        k_pos = k_start + jnp.arange(block_k)
        row_ok = k_pos < p.kv_len if masked else None
        k = _load(k_ref, k_rows, row_ok, cols)
        v = _load(v_ref, k_rows, row_ok, cols)
        s, tanh = _logits(p, _dot(p, q, k, trans_b=True), side.pair_tile(bias_ref, q_rows, k_rows, q_pos, k_pos, 0))
        if masked:
            s = jnp.where(side.visible(q_rows, k_rows, q_pos, k_pos), s, -jnp.inf)
        probs = jnp.exp2(s - lse[:, None])
        ds, dqk = _grad_logits(p, probs, _dot(p, do, v, trans_b=True), delta, tanh)
        if dbias_ref is not None:
            plgpu.store(dbias_ref.at[q_rows, k_rows], ds,
                        mask=in_q[:, None] & (k_pos < p.kv_len)[None, :])
        return dq + _dot(p, dqk.astype(k.dtype), k)

    dq = _three_ranges(body, ranges, jnp.zeros((block_q, p.head_dim_padded), jnp.float32), any_full=any_full)
    plgpu.store(dq_ref.at[q_rows, :], dq.astype(dq_ref.dtype), mask=combine(in_q[:, None], cols))


def _dkv_kernel(q_ref, k_ref, v_ref, bias_ref, mask_ref, qseg_ref, kvseg_ref, qlen_ref, kvlen_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, p: Problem, block_q: int, block_k: int):
    t = pl.program_id(0)
    k_start = t * block_k
    k_pos = k_start + jnp.arange(block_k)
    k_rows = pl.ds(k_start, block_k)
    cols = _column_mask(p)
    kv_valid = jnp.minimum(_scalar(kvlen_ref, p.kv_len), p.kv_len)
    q_valid = jnp.minimum(_scalar(qlen_ref, p.q_len), p.q_len)

    in_k = k_pos < p.kv_len
    k = _load(k_ref, k_rows, in_k, cols)
    v = _load(v_ref, k_rows, in_k, cols)
    num_q_blocks = pl.cdiv(p.q_len, block_q)
    ranges = q_block_range(p.band, k_start, block_k, block_q, q_valid, num_q_blocks,
                           kv_tile_whole=k_start + block_k <= kv_valid)
    any_full = not p.needs_elementwise_mask and p.q_len >= block_q

    head_axis = 0 if p.layout == "BNTH" else 1

    def pair_view(ref, shape, g):
        if ref is None or shape[1] == 1:
            return ref
        return _View(ref, g)

    def group_member(g, carry):
        q_g, do_g = _View(q_ref, g, head_axis), _View(do_ref, g, head_axis)
        lse_g, delta_g = _View(lse_ref, g), _View(delta_ref, g)
        bias_g = pair_view(bias_ref, p.bias_shape, g)
        side = _Side(p, bias_g, pair_view(mask_ref, p.mask_shape, g), qseg_ref, kvseg_ref, kv_valid)

        def body(i, carry, masked):
            dk, dv = carry
            q_start = i * block_q
            q_rows = pl.ds(q_start, block_q)
            q_pos = q_start + jnp.arange(block_q)
            in_q = q_pos < p.q_len if masked else None
            q = _load(q_g, q_rows, in_q, cols)
            do = _load(do_g, q_rows, in_q, cols)
            lse = _backward_lse(lse_g.load(q_rows, mask=in_q, other=-jnp.inf))
            delta = delta_g.load(q_rows, mask=in_q, other=0.0)
            s, tanh = _logits(p, _dot(p, q, k, trans_b=True), side.pair_tile(bias_g, q_rows, k_rows, q_pos, k_pos, 0))
            if masked:
                s = jnp.where(side.visible(q_rows, k_rows, q_pos, k_pos), s, -jnp.inf)
            probs = jnp.exp2(s - lse[:, None])
            dv = dv + _dot(p, probs.astype(do.dtype), do, trans_a=True)
            _, dqk = _grad_logits(p, probs, _dot(p, do, v, trans_b=True), delta, tanh)
            dk = dk + _dot(p, dqk.astype(q.dtype), q, trans_a=True)
            return dk, dv

        return _three_ranges(body, ranges, carry, any_full=any_full)

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
    common = [*_common_in_specs(p, None, q_head)]

    # dQ (and dbias): one program per query tile, as the forward.
    block_q, block_k = _tile(p.q_len, dq_cfg.block_q), _tile(p.kv_len, dq_cfg.block_k)
    with_dbias = p.bias_shape is not None
    in_specs = [_seq_spec(p, p.q_len, None, q_head), _seq_spec(p, p.kv_len, None, kv_head),
                _seq_spec(p, p.kv_len, None, kv_head), *common,
                _seq_spec(p, p.q_len, None, q_head), _row_spec(p.q_len, None, q_head),
                _row_spec(p.q_len, None, q_head)]
    out_specs = [_seq_spec(p, p.q_len, None, q_head)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if with_dbias:
        out_specs.append(pl.BlockSpec((None, None, p.q_len, p.kv_len), lambda t, n, b: (b, n, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((p.batch, p.q_heads, p.q_len, p.kv_len), jnp.float32))
    num_tiles = pl.cdiv(p.q_len, block_q)
    grid, tile_axis, specs = _tile_grid(num_tiles, p.q_heads, p.batch, _heads_inside_tiles(p, num_tiles),
                                        in_specs + out_specs)
    in_specs, out_specs = specs[:len(in_specs)], specs[len(in_specs):]
    dq, *dbias = pl.pallas_call(
        functools.partial(_dq_kernel, p=p, block_q=block_q, block_k=block_k, tile_axis=tile_axis),
        grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        **lowering.pallas_args(dq_cfg), name="mmfa_flash_dq",
    )(q, k, v, bias, dense_mask, q_seg, kv_seg, q_lengths, kv_lengths, do, lse, delta)

    # dK, dV: one program per key tile of one K/V head, looping over its group of query heads.
    block_q, block_k = _tile(p.q_len, dkv_cfg.block_q), _tile(p.kv_len, dkv_cfg.block_k)
    if p.group > 1 and block_q == 16:
        # With 16-row query tiles and a loop over a GQA group, Triton's code (XLA's and the official
        # 3.6 alike, H100) gave dK that changed from run to run on identical inputs (decode-shaped
        # calls, T <= 16); 32-row tiles are exact. Checked by tests/test_launch.py's decode cases.
        block_q = min(32, dkv_cfg.block_q)
    group_of = lambda n: n  # noqa: E731  (grid axis 1 runs over K/V heads here)
    g = p.group
    in_specs = [_seq_spec(p, p.q_len, g, group_of), _seq_spec(p, p.kv_len, None, group_of),
                _seq_spec(p, p.kv_len, None, group_of), *_common_in_specs(p, g, group_of),
                _seq_spec(p, p.q_len, g, group_of), _row_spec(p.q_len, g, group_of),
                _row_spec(p.q_len, g, group_of)]
    kv_spec = _seq_spec(p, p.kv_len, None, group_of)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, p=p, block_q=block_q, block_k=block_k),
        grid=(pl.cdiv(p.kv_len, block_k), p.kv_heads, p.batch),
        in_specs=in_specs, out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        **lowering.pallas_args(dkv_cfg), name="mmfa_flash_dkv",
    )(q, k, v, bias, dense_mask, q_seg, kv_seg, q_lengths, kv_lengths, do, lse, delta)
    return dq, dk, dv, (dbias[0] if dbias else None)


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
        self.cols = _column_mask(p)
        self.kv_valid = jnp.minimum(_scalar(kvlen_ref, p.kv_len), p.kv_len)
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
        q = _load_rows(self.q_ref, q_pos, in_r, self.cols, self.p.head_dim_padded)
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
        k = _load(self.k_ref, k_rows, in_k if masked else None, self.cols)
        s, _ = _logits(p, _dot(p, q, k, trans_b=True), None)
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
        m, l = _three_ranges(key_block, sc.ranges(tile, skip_hidden=True), init, any_full=sc.any_full)
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
    q_valid = _scalar(qlen_ref, p.q_len)

    def row_tile(i, carry):
        tile = sc.row_tile(i)
        r_rows, in_r, q_pos = tile[0], tile[1], tile[3]
        live = in_r & (q_pos < q_valid)  # rows past the query length attend to nothing (as in attention)
        if lse_ref is None:
            lse = _combined_lse(m_ref, l_ref, r_rows, live, num_chunks)
        else:
            lse = _backward_lse(plgpu.load(lse_ref.at[r_rows], mask=live, other=-jnp.inf))

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
        return _three_ranges(key_block, sc.ranges(tile, skip_hidden=False), carry, any_full=sc.any_full)

    # At least one row tile, so that an example without scorer rows still writes its zeros.
    lax.fori_loop(0, jnp.maximum(sc.num_row_tiles, 1), row_tile, 0)


# Aim for this many programs (chunks x heads x batch): a few waves of the GPU's SMs.
_SCORER_PROGRAMS = 512


def _blocks_per_chunk(p: Problem, num_blocks: int) -> int:
    return max(1, min(16, num_blocks * p.q_heads * p.batch // _SCORER_PROGRAMS))


def _scorer_chunks(p: Problem, cfg: KernelConfig) -> tuple[int, int, int]:
    """(block_k, key blocks per chunk, chunks) of the scorer kernels."""
    block_k = _tile(p.kv_len, cfg.block_k)
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
        _seq_spec(p, p.q_len, None, head),
        _seq_spec(p, p.kv_len, None, lambda n: n // p.group),
        *(spec for _, spec in row_stats),
        _batch_spec(R),
        _optional(q_seg_rows is not None, _batch_spec(R)),
        _optional(kv_seg is not None, _batch_spec(p.kv_len)),
        _optional(kv_lengths is not None, _batch_spec(None)),
        *([] if kernel is _scorer_stats_kernel else [_optional(q_lengths is not None, _batch_spec(None))]),
        _batch_spec(None),
    ]
    args = [q, k, *(a for a, _ in row_stats), positions, q_seg_rows, kv_seg, kv_lengths,
            *([] if kernel is _scorer_stats_kernel else [q_lengths]), counts]
    kernel = functools.partial(kernel, p=p, rows=R, block_q=_tile(R, cfg.block_q), block_k=block_k,
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
