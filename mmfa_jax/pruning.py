"""Keep the most important visual tokens: top-k selection, order-preserving gathers, lengths.

Shapes stay static under jit: the kept tokens of each example are packed to the front of an
``output_length``-long index array, and ``lengths`` says how many are real (what attention's
``query_seq_lengths`` / ``key_value_seq_lengths`` take).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mmfa_jax import _checks, backends
from mmfa_jax._checks import ArgumentError, Keep
from mmfa_jax.kernels import selection


def keep_counts(visual_mask, keep=None, *, keep_count=None):
    """How many visual tokens each example keeps: ceil(keep * n_visual) for a ratio ``keep`` in
    (0, 1] (the product rounded to 4 decimals first, in float64), min(keep_count, n_visual) for a
    count. (B,) int32."""
    return jnp.asarray(keep_table(visual_mask.shape[1], _checks.checked_keep(keep, keep_count)))[
        jnp.sum(visual_mask, axis=1)]


@functools.lru_cache(maxsize=64)
def _keep_table(seq_len: int, rule: Keep) -> np.ndarray:
    if rule.count is not None:
        return np.minimum(np.arange(seq_len + 1), rule.count).astype(np.int32)
    # A product can land a hair above an integer (0.3 * 10 = 3.0000000000000004): round first.
    return np.array([math.ceil(round(i * rule.ratio, 4)) for i in range(seq_len + 1)], np.int32)


def keep_table(seq_len: int, rule: Keep) -> np.ndarray:
    """(seq_len + 1,) int32: entry n is how many of n visual tokens are kept (``keep_counts``).
    Computed once on the host: under jit it is a constant, so the selection kernel looks its
    count up rather than waiting for kernels that compute it. ``rule``: ``_checks.checked_keep``'s."""
    return _keep_table(int(seq_len), _checks.checked_keep(rule))


def kept_lengths(visual_mask, keep=None, valid_lengths=None, *, keep_count=None):
    """(B,) int32: how many tokens each example keeps (its valid text tokens and its share of
    visual ones), what ``select_visual_tokens`` returns as lengths; its maximum is the default
    ``output_length``."""
    visual_mask = jnp.asarray(visual_mask)
    S = visual_mask.shape[1]
    valid = jnp.ones_like(visual_mask) if valid_lengths is None else (
        jnp.arange(S)[None, :] < jnp.asarray(valid_lengths)[:, None])
    return (jnp.sum(valid & ~visual_mask, axis=1)
            + keep_counts(visual_mask & valid, _checks.checked_keep(keep, keep_count))).astype(jnp.int32)


def select_visual_tokens(importance, visual_mask, keep=None, *, keep_count=None, valid_lengths=None,
                         output_length: int | None = None, implementation: str | None = None):
    """Which tokens survive pruning, in their original order.

    Args:
      importance: (B, S) float scores of the tokens (only visual ones matter).
      visual_mask: (B, S) bool, the visual tokens.
      keep: the ratio in (0, 1] of each example's visual tokens to keep (rounded up); or
      keep_count: how many to keep (at most all). Exactly one of the two. Every valid non-visual
        (text) token stays. Among visual tokens the highest scores win; ties go to the earlier
        position, so the result is deterministic.
      valid_lengths: (B,) int, tokens at or past it are padding and dropped (default: none).
      output_length: static length of the index array. Default: the longest kept sequence when
        the inputs are concrete, else S. Shorter than an example's kept length raises (when the
        inputs are concrete).
      implementation: "pallas" or "triton" (one Pallas program per example,
        ``mmfa_jax.kernels.selection``; the default on GPUs where the kernels run, up to
        ``MAX_TOKENS`` tokens), "interpret" (that kernel in the CPU interpreter) or "xla" (a radix
        select in XLA ops). All give the same result.

    Returns:
      (indices (B, output_length) int32, lengths (B,) int32): indices[b, :lengths[b]] are the
      kept positions in increasing order; the rest repeat the last kept position (harmless to
      gather, ignored through ``lengths``).
    """
    return select(importance, visual_mask, _checks.checked_keep(keep, keep_count), valid_lengths, output_length,
                  backends.resolve(implementation))


def select(importance, visual_mask, rule: Keep, valid_lengths, output_length, lowering: backends.Lowering):
    """``select_visual_tokens`` with the keep rule checked and the backend resolved."""
    importance, visual_mask = jnp.asarray(importance), jnp.asarray(visual_mask)
    if visual_mask.ndim != 2 or visual_mask.dtype != jnp.bool_:
        raise ArgumentError(f"visual_mask must be a boolean (B, S) array, got {visual_mask.dtype} {visual_mask.shape}")
    if importance.shape != visual_mask.shape:
        raise ArgumentError(f"importance must have the shape of visual_mask {visual_mask.shape}, got "
                            f"{importance.shape}")
    S = visual_mask.shape[1]
    valid_lengths = None if valid_lengths is None else jnp.asarray(valid_lengths)
    output_length = checked_output_length(output_length, kept_lengths(visual_mask, rule, valid_lengths), S, rule)
    return select_checked(importance, visual_mask, valid_lengths, rule=rule, output_length=output_length,
                          lowering=lowering)


def select_checked(importance, visual_mask, valid_lengths, *, rule: Keep, output_length: int,
                   lowering: backends.Lowering):
    """``select`` of checked arguments (output_length static and checked; mmfa_torch checks with
    torch ops): one jitted call."""
    return _select(importance, visual_mask, valid_lengths, rule=rule, output_length=output_length,
                   lowering=_selection_lowering(lowering, visual_mask.shape[1]))


# Under one jit with the static choices, so that a warm call compiles nothing (an eager
# pallas_call is traced and compiled anew on every call).
@functools.partial(jax.jit, static_argnames=("rule", "output_length", "lowering"))
def _select(importance, visual_mask, valid_lengths, *, rule: Keep, output_length: int, lowering: backends.Lowering):
    B, S = visual_mask.shape
    valid = jnp.ones((B, S), bool) if valid_lengths is None else (jnp.arange(S)[None, :] < valid_lengths[:, None])
    visual = visual_mask & valid
    if lowering.kernels:
        kind = jnp.where(valid, jnp.where(visual_mask, selection.CANDIDATE, selection.TEXT), selection.DROPPED)
        return selection.select(importance.astype(jnp.float32), kind.astype(jnp.int8), keep_table(S, rule),
                                output_length, lowering=lowering)
    chosen = _top_visual(importance.astype(jnp.float32), visual, keep_counts(visual, rule))
    kept = (valid & ~visual_mask) | chosen
    return packed_positions(kept, output_length), jnp.sum(kept, axis=1).astype(jnp.int32)


def checked_output_length(output_length, lengths, S: int, rule: Keep) -> int:
    """The static length of the kept sequence: ``output_length``, checked against the kept
    ``lengths`` when they are concrete (shorter would drop kept tokens), or by default the longest
    of them (S under jit)."""
    longest = _concrete_max(lengths)
    if output_length is None:
        return S if longest is None else max(1, longest)
    output_length = _checks.integer(output_length, "output_length")
    if not 1 <= output_length <= S:
        raise ArgumentError(f"output_length must be in [1, S={S}], got {output_length}")
    if longest is not None and longest > output_length:
        raise ArgumentError(f"output_length={output_length} is shorter than the {longest} tokens an example keeps "
                            f"({rule}); pass output_length >= {longest}, or None")
    return output_length


def _concrete_max(x) -> int | None:
    """max(x) when x is concrete, None under jit (or when x is None: not known)."""
    if x is None:
        return None
    try:
        return int(np.max(np.asarray(x)))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _selection_lowering(lowering: backends.Lowering, S: int) -> backends.Lowering:
    """The backend of the selection and compaction kernels: the call's, but XLA where the kernel
    does not fit (it holds a whole sequence in registers; Turing's 64 KiB of shared memory is too
    little, and past ``selection.MAX_TOKENS`` tokens any GPU's)."""
    if lowering.compiled and (S > selection.MAX_TOKENS or lowering.family == "sm75"):
        return backends.Lowering("xla")
    return lowering


def _top_visual(score, visual, n_keep):
    """Bool (B, S): per example the ``n_keep`` visual tokens of highest score, earlier positions
    first among equal scores, NaN counted as -inf. Exact and without a sort: a radix select finds
    the n_keep-th largest score from two 65,536-bin histograms (its high and low 16 bits), then
    everything above that threshold is kept, and the first of those equal to it up to the count."""
    B, S = score.shape
    rows = jnp.arange(B)[:, None]
    score = jnp.where(jnp.isnan(score), -jnp.inf, score)
    score = jnp.where(score == 0, 0.0, score)  # -0.0 and +0.0 are one score
    bits = jax.lax.bitcast_convert_type(score, jnp.uint32)
    key = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))  # unsigned order = float order

    def threshold_digit(digit, among, need):
        """The largest d with count(among & digit >= d) >= need, and count(among & digit > d)."""
        hist = jnp.zeros((B, 1 << 16), jnp.int32).at[rows, digit].add(among.astype(jnp.int32))
        at_least = jnp.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # at_least[d] = count(digit >= d)
        d = jnp.sum(at_least >= need[:, None], axis=1) - 1
        above = jnp.where(d + 1 < 1 << 16, jnp.take_along_axis(at_least, jnp.minimum(d + 1, (1 << 16) - 1)[:, None],
                                                                axis=1)[:, 0], 0)
        return d.astype(jnp.uint32), above

    high, low = (key >> 16).astype(jnp.int32), (key & 0xFFFF).astype(jnp.int32)
    h, above_h = threshold_digit(high, visual, n_keep)
    l, above_l = threshold_digit(low, visual & (key >> 16 == h[:, None]), n_keep - above_h)
    threshold = ((h << 16) | l)[:, None]
    equal = visual & (key == threshold)
    rest = (n_keep - above_h - above_l)[:, None]
    return (visual & (key > threshold)) | (equal & (jnp.cumsum(equal, axis=1) <= rest))


def compact_positions(mask, length: int, implementation: str | None = None):
    """(positions (B, length) int32, counts (B,) int32): ``packed_positions`` of the boolean mask
    (B, S), and how many of its True positions fit in the row (min(count, length)). With
    implementation "pallas", "triton" or "interpret", one Pallas program per example
    (``mmfa_jax.kernels.selection.compact``) where the selection kernel runs; else XLA ops."""
    return compact(mask, length, backends.resolve(implementation))


def compact(mask, length: int, lowering: backends.Lowering):
    """``compact_positions`` with the backend resolved."""
    mask = jnp.asarray(mask)
    return _compact(mask, length=_checks.integer(length, "length", minimum=1),
                    lowering=_selection_lowering(lowering, mask.shape[1]))


@functools.partial(jax.jit, static_argnames=("length", "lowering"))
def _compact(mask, *, length: int, lowering: backends.Lowering):
    if not lowering.kernels:
        return packed_positions(mask, length), jnp.minimum(jnp.sum(mask, axis=1), length).astype(jnp.int32)
    return selection.compact(mask, length, lowering=lowering)


def packed_positions(mask, length: int):
    """(B, length) int32: the positions where ``mask`` (B, S) is True, in increasing order, packed
    to the front (a prefix sum and a scatter, no sort); the tail repeats the last of them (0 for
    an example with none), so it is harmless to gather. Positions past ``length`` are dropped."""
    B, S = mask.shape
    count = jnp.sum(mask, axis=1)
    slot = jnp.where(mask, jnp.cumsum(mask, axis=1) - 1, length)
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    packed = jnp.zeros((B, length), jnp.int32).at[jnp.arange(B)[:, None], slot].set(positions, mode="drop")
    last = jnp.take_along_axis(packed, jnp.clip(count - 1, 0, length - 1)[:, None], axis=1)
    return jnp.where(jnp.arange(length)[None, :] < count[:, None], packed, last)


def gather_tokens(x, indices, axis: int = 1):
    """Gather kept tokens along ``axis``: hidden states (B, S, D) or q/k/v (B, S, N, H) with
    axis 1, position ids (B, S) with axis 1, multi-axis ids such as Qwen2-VL's M-RoPE (3, B, S)
    with axis 2. ``indices`` is (B, L) from ``select_visual_tokens``; the batch axis is the one
    before ``axis``."""
    x = jnp.asarray(x)
    axis = axis % x.ndim
    if axis == 0:
        raise ArgumentError("axis must not be 0: the axis before it is the batch axis")
    if x.shape[axis - 1] != indices.shape[0]:
        raise ArgumentError(f"batch axis {axis - 1} of x has size {x.shape[axis - 1]}, indices have batch "
                         f"{indices.shape[0]}")
    # Advanced indexing on (batch, axis) gathers whole trailing slices per index, rather than an
    # index per element as take_along_axis would.
    moved = jnp.moveaxis(x, (axis - 1, axis), (0, 1))
    out = moved[jnp.arange(indices.shape[0])[:, None], indices]
    return jnp.moveaxis(out, (0, 1), (axis - 1, axis))
