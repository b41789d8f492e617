"""Top-k selection of visual tokens as one Pallas program per example.

The XLA form of the selection (``mmfa_jax.pruning``: two 65,536-bin histograms, prefix sums,
scatters) is about fifteen small kernels, 60 us on the H100 for a 16k-token sequence, more than a
third of the attention it saves at keep 0.25. Here one program holds an example's whole sequence
in registers and does it all:

1. scores become int32 keys whose signed order is the float order (NaN as -inf, -0 as +0);
2. the keep-th largest key among the candidates is found bit by bit, from the first bit on which
   the smallest and largest candidates differ down (up to 32 counting passes over the
   registers, no memory traffic);
3. candidates above it are kept, and of those equal to it the earliest, up to the count;
4. a prefix sum of the kept flags gives each kept position its slot, stored by a scatter; the
   slots past the kept count repeat the last kept position.

Inputs, per example: score (S,) float32, kind (S,) int8 (0: dropped, 1: always kept (text),
2: a candidate (visual)); and for all: keep_table (S + 1,) int32, how many of n candidates to keep
(``mmfa_jax.pruning.keep_table``: a constant, so no kernel runs before this one to count them).
Outputs: indices (L,) int32 and length () int32.

``compact`` is step 4 alone, for a boolean mask: the positions of the scorer rows of importance
(one kernel where XLA's prefix sum, scatter and selects take seven).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmfa_jax.backends import Lowering
from mmfa_jax.tuning import KernelConfig

DROPPED, TEXT, CANDIDATE = 0, 1, 2

# The whole sequence sits in registers, spread over every thread of the program. Past this length
# the XLA selection is used. At most 16 warps: Triton stages the scatter of the positions through
# 8 KiB of shared memory per warp on sm_90, so 32 warps would ask for 256 KiB.
MAX_TOKENS = 1 << 15
# (up to this many tokens, warps), measured on the H100 (bench/NOTES.md).
_WARPS = ((4096, 4), (MAX_TOKENS, 16))

_SIGN = -(1 << 31)  # int32 with only the top bit set
_MAX = (1 << 31) - 1


def _ordered_keys(score):
    """int32 keys with key(a) < key(b) exactly when a < b as floats; NaN counts as -inf."""
    score = jnp.where(score != score, -jnp.inf, score)
    score = jnp.where(score == 0, 0.0, score)  # -0.0 and +0.0 are one score
    bits = lax.bitcast_convert_type(score, jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude, smaller key


def _pieces(n: int) -> list[tuple[int, int]]:
    """Static (start, size) pieces of power-of-two sizes that cover [0, n) with under an eighth of
    waste (16,448 tokens: 16,384 + 4,096, not 32,768): Triton's arrays have power-of-two sizes,
    and every padded slot costs its share of each counting pass."""
    unit = max(16, pl.next_power_of_2(n) // 8)
    total = pl.cdiv(n, unit) * unit
    pieces, start = [], 0
    for bit in reversed(range(total.bit_length())):
        if total & (1 << bit):
            pieces.append((start, 1 << bit))
            start += 1 << bit
    return pieces


class _Piece:
    """Positions [start, start + size) of the example: keys (INT32_MIN where not a candidate, which
    no trial threshold reaches), candidate and text flags."""

    def __init__(self, score_ref, kind_ref, start: int, size: int, seq_len: int):
        self.pos = start + jnp.arange(size, dtype=jnp.int32)
        inside = self.pos < seq_len
        # The last piece may run past the end (masked): named by its positions, not a slice (see
        # ``_Packer.finish``).
        kind = plgpu.load(kind_ref.at[self.pos], mask=inside, other=DROPPED).astype(jnp.int32)
        self.candidate, self.text = kind == CANDIDATE, kind == TEXT
        key = _ordered_keys(plgpu.load(score_ref.at[self.pos], mask=inside, other=0.0))
        self.key = jnp.where(self.candidate, key, _SIGN)


def _count(flags):
    return jnp.sum(flags.astype(jnp.int32))


def _select_kernel(score_ref, kind_ref, keep_table_ref, indices_ref, length_ref, *, seq_len: int, out_len: int):
    pieces = [_Piece(score_ref, kind_ref, start, size, seq_len) for start, size in _pieces(seq_len)]
    need = keep_table_ref[sum(_count(p.candidate) for p in pieces)]

    # The threshold bit by bit from the top: ``t`` holds the bits found so far, offset so that
    # unsigned order reads as signed, the largest t with at least ``need`` candidates at or above
    # it. A trial that has exactly ``need`` at or above it settles the set early (typically after
    # half the bits: once no other candidate lies between the trial and the need-th key).
    # (Two bits a pass, counting three trials in one (3, n) reduction, measured slower: 39 against
    # 28 us at 16,448 tokens.)
    def searching(state):
        bit, _, settled = state
        return (bit < 32) & ~settled

    def next_bit(state):
        bit, t, _ = state
        trial = t | lax.shift_left(jnp.int32(1), 31 - bit)
        at_least = sum(_count(p.key >= (trial ^ _SIGN)) for p in pieces)
        return bit + 1, jnp.where(at_least >= need, trial, t), at_least == need

    # The threshold lies between the smallest and the largest candidate key, so it shares the
    # leading bits on which those two agree: the search starts below them (at 16,448 tokens of
    # importance scores: 28.9 -> 24.8 us on the H100).
    largest = functools.reduce(jnp.maximum, [jnp.max(p.key) for p in pieces])
    smallest = functools.reduce(jnp.minimum, [jnp.min(jnp.where(p.candidate, p.key, _MAX)) for p in pieces])
    shared = lax.clz(smallest ^ largest)  # 32 when they are equal
    low = jnp.where(shared >= 32, 0, lax.shift_right_logical(jnp.int32(-1), jnp.minimum(shared, 31)))
    none = need == 0  # then the threshold is above every key
    start = jnp.where(none, jnp.int32(-1), (smallest ^ _SIGN) & ~low)
    _, t, _ = lax.while_loop(searching, next_bit, (jnp.where(none, 0, shared), start, none))
    threshold = t ^ _SIGN

    # Above the threshold: kept; equal to it: the earliest, up to the count.
    room_for_tied = need - sum(_count(p.key > threshold) for p in pieces)
    tied_before, packer = jnp.int32(0), _Packer(indices_ref, out_len)
    for p in pieces:
        tied = p.candidate & (p.key == threshold)
        tie_rank = tied_before + jnp.cumsum(tied.astype(jnp.int32))  # 1 for the earliest tied position
        packer.add(p.pos, p.text | (p.key > threshold) | (tied & (tie_rank <= room_for_tied)))
        tied_before += _count(tied)
    length_ref[...] = packer.finish()


class _Packer:
    """Stores kept positions, piece by piece in increasing order, packed to the front of a row of
    ``out_len`` (positions past it are dropped); the rest of the row repeats the last kept
    position (0 if none), so that it is harmless to gather."""

    def __init__(self, ref, out_len: int):
        self.ref, self.out_len = ref, out_len
        self.kept, self.last = jnp.int32(0), jnp.int32(0)

    def add(self, pos, kept):
        # Each kept position's slot is its rank among the kept: a prefix sum carried from piece to
        # piece. Positions not stored get distinct slots past the end: the CPU interpreter's
        # masked scatter writes back the old value under a false mask, so a repeated slot could
        # undo a real store.
        slot = jnp.where(kept, self.kept + jnp.cumsum(kept.astype(jnp.int32)) - 1, self.out_len + pos)
        plgpu.store(self.ref.at[slot], pos, mask=kept & (slot < self.out_len))
        self.kept += _count(kept)
        self.last = jnp.maximum(self.last, jnp.max(jnp.where(kept & (slot < self.out_len), pos, 0)))

    def finish(self):
        """Fills the tail; returns how many positions were kept (stored or not)."""
        # Triton's arrays have power-of-two sizes, so the row is written as a masked vector of
        # next_power_of_2(out_len) slots. They are named by an index vector, not a slice: a slice
        # past the row's end is refused at trace time (jax 0.12), the masked store of the same
        # offsets is not, and lowers to the same contiguous store.
        tail = jnp.arange(pl.next_power_of_2(self.out_len), dtype=jnp.int32)
        plgpu.store(self.ref.at[tail], jnp.full(tail.shape, self.last, jnp.int32),
                    mask=(tail >= self.kept) & (tail < self.out_len))
        return self.kept


def _compact_kernel(flags_ref, positions_ref, count_ref, *, seq_len: int, out_len: int):
    packer = _Packer(positions_ref, out_len)
    for start, size in _pieces(seq_len):
        pos = start + jnp.arange(size, dtype=jnp.int32)
        inside = pos < seq_len
        packer.add(pos, plgpu.load(flags_ref.at[pos], mask=inside, other=False) & inside)
    count_ref[...] = jnp.minimum(packer.finish(), out_len)


def _config(seq_len: int) -> KernelConfig:
    """Warps by sequence length: short sequences finish sooner on fewer (less to synchronise)."""
    warps = next((w for most, w in _WARPS if seq_len <= most), _WARPS[-1][1])  # (longer: the interpreter only)
    return KernelConfig(block_q=16, block_k=16, num_warps=warps, num_stages=1)


def compact(flags, out_len: int, *, lowering: Lowering):
    """(positions (B, out_len) int32, counts (B,) int32): per example the positions where the
    boolean flags (B, S) are True, increasing, packed to the front (the tail repeats the last, 0
    for none; those past out_len are dropped), and how many of them the row holds (at most
    out_len). What ``mmfa_jax.pruning.packed_positions`` computes, in one program per example."""
    B, S = flags.shape
    return pl.pallas_call(
        functools.partial(_compact_kernel, seq_len=S, out_len=out_len),
        grid=(B,),
        in_specs=[pl.BlockSpec((None, S), lambda b: (b, 0))],
        out_specs=[pl.BlockSpec((None, out_len), lambda b: (b, 0)), pl.BlockSpec((None,), lambda b: (b,))],
        out_shape=[jax.ShapeDtypeStruct((B, out_len), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32)],
        **lowering.pallas_args(_config(S)), name="mmfa_compact",
    )(flags)


def select(score, kind, keep_table, out_len: int, *, lowering: Lowering):
    """(indices (B, out_len) int32, lengths (B,) int32); see the module docstring.

    score: (B, S) float32; kind: (B, S) int8; keep_table: (S + 1,) int32 (entry n at most n);
    S at most ``MAX_TOKENS``."""
    B, S = score.shape
    row = pl.BlockSpec((None, S), lambda b: (b, 0))
    one = pl.BlockSpec((None,), lambda b: (b,))
    return pl.pallas_call(
        functools.partial(_select_kernel, seq_len=S, out_len=out_len),
        grid=(B,),
        in_specs=[row, row, pl.BlockSpec((S + 1,), lambda b: (0,))],
        out_specs=[pl.BlockSpec((None, out_len), lambda b: (b, 0)), one],
        out_shape=[jax.ShapeDtypeStruct((B, out_len), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32)],
        **lowering.pallas_args(_config(S)), name="mmfa_select",
    )(score, kind, jnp.asarray(keep_table, jnp.int32))
