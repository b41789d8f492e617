"""What the attention kernels share: the static problem, block specs, loads, logits, visibility.

The kernels (Pallas, Triton lowering) read like FlashAttention-2 (``forward``, ``backward``); the
scorer kernels of visual-token importance (``scorer``) and a dense mask's block ranges
(``mask_ranges``) use the same pieces.

The forward walks the key blocks of one query tile with
an online softmax and writes the output and the log-sum-exp; the backward recomputes the
probabilities from that LSE, one kernel per key tile for dK/dV (looping over the query heads of
its GQA group, so no atomics and no repeated K/V) and one per query tile for dQ.

Argument checking lives in ``mmfa_jax._checks``; here every input is assumed valid:
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

from mmfa_jax.masking import Band, band_visible, combine

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


@dataclasses.dataclass(frozen=True)
class Columns:
    """A chunk of the head dimension a kernel computes in: ``width`` columns (a power of two)
    from ``start``; columns at or past the head dimension are masked (read as 0, not stored)."""

    start: int
    width: int
    head_dim: int

    @property
    def index(self):
        """The chunk's columns as a load/store indexer (the whole padded row for a single chunk)."""
        return slice(None) if self.start == 0 and self.width >= self.head_dim else pl.ds(self.start, self.width)

    @property
    def mask(self):
        """(1, width) bool of the columns inside the head dimension, or None when all are."""
        if self.start + self.width <= self.head_dim:
            return None
        return (self.start + jnp.arange(self.width) < self.head_dim)[None, :]


def head_chunks(head_dim: int, split: bool) -> tuple[Columns, ...]:
    """The column chunks of the head dimension: the padded power of two as one chunk, or with
    ``split``, when the head dimension rounded up to 16 is the sum of two powers of two, those two
    (72 and 80 as 64 + 16, 96 as 64 + 32): the dots then cost 80 columns rather than 128."""
    hp = padded_head_dim(head_dim)
    need = -(-head_dim // 16) * 16
    big = hp // 2
    rest = need - big
    if split and need < hp and rest >= 16 and rest & (rest - 1) == 0:
        return Columns(0, big, head_dim), Columns(big, rest, head_dim)
    return (Columns(0, hp, head_dim),)


def block_size(n: int, block: int) -> int:
    """A power-of-two tile no larger than needed (Triton wants powers of two, dots at least 16)."""
    return max(16, min(block, pl.next_power_of_2(n)))


# --------------------------------------------------------------------------------------------
# BlockSpecs. The grid is (tile, head, batch): tiles of one head run next to each other, so
# they share that head's K/V (or Q) in L2.


def seq_spec(p: Problem, seq_len: int, heads_per_block: int | None, head_of):
    """Whole sequence of one head (or of a group of heads) of a (B, L, N, H)/(B, N, L, H) array."""
    hp = p.head_dim_padded
    if p.layout == "BTNH":
        return pl.BlockSpec((None, seq_len, heads_per_block, hp), lambda t, n, b: (b, 0, head_of(n), 0))
    return pl.BlockSpec((None, heads_per_block, seq_len, hp), lambda t, n, b: (b, head_of(n), 0, 0))


def whole_spec(shape):
    """The whole array as one block (kernels that address its rows themselves)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def row_spec(length: int, heads_per_block: int | None, head_of):
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


def batch_spec(length: int | None):
    if length is None:  # (B,) lengths: one scalar per program
        return pl.BlockSpec((None,), lambda t, n, b: (b,))
    return pl.BlockSpec((None, length), lambda t, n, b: (b, 0))


def optional(flag: bool, spec):
    return spec if flag else None


def common_in_specs(p: Problem, heads_per_block, head_of):
    """Specs for bias, dense mask, segments and lengths, in kernel argument order."""
    return [
        _pair_spec(p, p.bias_shape, heads_per_block, head_of),
        _pair_spec(p, p.mask_shape, heads_per_block, head_of),
        optional(p.has_segments, batch_spec(p.q_len)),
        optional(p.has_segments, batch_spec(p.kv_len)),
        optional(p.has_q_lengths, batch_spec(None)),
        optional(p.has_kv_lengths, batch_spec(None)),
    ]


# --------------------------------------------------------------------------------------------
# Pieces of the kernel bodies shared by forward and backward.


class HeadView:
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
    return ref if ref is None or isinstance(ref, HeadView) else HeadView(ref)


def load(ref, rows, row_mask, col_mask, columns=slice(None)):
    """Masked tile load: rows out of range and padded head columns read as 0 (``columns``: the
    column indexer, by default the whole padded row; ``col_mask`` then covers those columns)."""
    mask = combine(None if row_mask is None else row_mask[:, None], col_mask)
    return _view(ref).load(rows, columns, mask=mask, other=0)


def load_rows(ref, rows, row_mask, col_mask, width: int, start: int = 0):
    """Masked load of the tile at arbitrary rows (an int vector) of a (L, width) ref, columns
    [start, start + width). Both axes take array indexers: the CPU interpreter's loads take arrays
    or slices, not a mix."""
    mask = combine(None if row_mask is None else row_mask[:, None], col_mask)
    return plgpu.load(ref.at[rows[:, None], start + jnp.arange(width)[None, :]], mask=mask,
                      other=None if mask is None else 0)


def dot(p: Problem, a, b, trans_b: bool = False, trans_a: bool = False):
    precision = lax.Precision.HIGHEST if p.dot_precision == "highest" else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def online_softmax_step(p, carry, s, v):
    """One key block of the online softmax: the running (acc, m, l) of a query tile updated with
    the block's base-2 logits ``s`` (rows, keys) and values ``v``. A row that has seen only masked
    logits keeps m = -inf; it shifts by 0 there so that exp2(-inf - shift) is 0 rather than NaN.
    ``acc`` and ``v`` may be tuples of column chunks (``head_chunks``), one accumulator each."""
    acc, m, l = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - shift)
    probs = jnp.exp2(s - shift[:, None])
    l = l * alpha + jnp.sum(probs, axis=1)
    acc = jax.tree.map(lambda a, vc: a * alpha[:, None] + dot(p, probs.astype(vc.dtype), vc), acc, v)
    return acc, m_new, l


def logits(p: Problem, qk, bias_tile):
    """Logits in base 2 from q.k: scale, soft cap, bias. Returns (s2, tanh or None)."""
    if p.softcap is None:
        s2, t = qk * (p.scale * LOG2E), None
    else:
        t = jnp.tanh(qk * (p.scale / p.softcap))
        s2 = t * (p.softcap * LOG2E)
    if bias_tile is not None:
        s2 = s2 + bias_tile.astype(jnp.float32) * LOG2E
    return s2, t


def scalar(ref, default):
    return default if ref is None else ref[...]


class Side:
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


def three_ranges(body, ranges, carry, *, any_full: bool = True):
    """Run ``body(j, carry, masked)`` over [lo, full_lo) masked, [full_lo, full_hi) unmasked,
    [full_hi, hi) masked: only tiles on an edge pay for the mask. ``any_full=False`` (static:
    the sequence is shorter than one tile, or single logits may be masked) masks every tile."""
    lo, full_lo, full_hi, hi = ranges
    if not any_full:
        return lax.fori_loop(lo, hi, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def skip_dead_rows(ranges, any_live_row):
    """An empty range for a query tile wholly past the query length (padding, pruned tokens)."""
    lo = ranges[0]
    return tuple(jnp.where(any_live_row, r, lo) for r in ranges)


def query_tile(p: Problem, tile_axis: int = 0):
    """This program's query tile. Under a causal band (no left bound) later tiles see more keys:
    hand them out first, so that the short tiles fill the last wave instead of a long one
    running alone at the end."""
    return tile_order(p, pl.num_programs(tile_axis))(pl.program_id(tile_axis))


def heads_inside_tiles(p: Problem, num_tiles: int) -> bool:
    """Whether the grid runs every head's tile t before any head's next tile (heads as the fastest
    grid axis) rather than one head's tiles in a row.

    Under a causal band, tiles are handed out heaviest first (``query_tile``); with heads inside,
    that order holds across all heads, the longest-job-first schedule. With a head's tiles in a
    row, the heavy tiles of the last heads start late. For short sequences (33 tiles of 16
    heads: a schedule of 86 tile steps per SM against 69, by simulation) that costs a quarter of
    the time; for long ones (129 tiles) under 1%, while there one head's K/V then stays in L2.
    Measured on the H100 (bench/NOTES.md): 4,160 causal tokens 0.213 -> 0.178 ms, 8,256 0.669 ->
    0.637, 16,448 2.298 -> 2.372 (hence the bound)."""
    return p.band.right is not None and p.band.left is None and num_tiles <= 96


def tile_grid(num_tiles: int, heads: int, batch: int, heads_inside: bool, specs):
    """(grid, tile axis, specs): specs written for a (tile, head, batch) grid, adapted to the grid
    with heads as the fastest axis when ``heads_inside``."""
    if not heads_inside:
        return (num_tiles, heads, batch), 0, specs

    def swapped(spec):
        if spec is None:
            return None
        return pl.BlockSpec(spec.block_shape, lambda n, t, b, f=spec.index_map: f(t, n, b))

    return (heads, num_tiles, batch), 1, [swapped(s) for s in specs]


def tile_order(p: Problem, num_tiles):
    """Program index -> query tile (see ``query_tile``)."""
    if p.band.right is not None and p.band.left is None:
        return lambda t: num_tiles - 1 - t
    return lambda t: t


def column_mask(p: Problem):
    hp = p.head_dim_padded
    return None if hp == p.head_dim else (jnp.arange(hp) < p.head_dim)[None, :]
