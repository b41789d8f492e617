"""Keep the most important visual tokens: top-k selection, order-preserving gathers, lengths.

Shapes stay static under jit: the kept tokens of each example are packed to the front of an
``output_length``-long index array, and ``lengths`` says how many are real (what attention's
``query_seq_lengths`` / ``key_value_seq_lengths`` take).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def keep_counts(visual_mask, keep):
    """How many visual tokens each example keeps: ceil(keep * n_visual) for a ratio in (0, 1],
    min(keep, n_visual) for an int count. (B,) int32."""
    n_visual = jnp.sum(visual_mask, axis=1)
    if isinstance(keep, (bool, np.bool_)) or not isinstance(keep, (int, float, np.integer, np.floating)):
        raise TypeError(f"keep must be a ratio in (0, 1] or a positive int count, got {keep!r}")
    if isinstance(keep, (int, np.integer)):
        if keep < 1:
            raise ValueError(f"keep as a count must be >= 1, got {keep}")
        return jnp.minimum(n_visual, int(keep)).astype(jnp.int32)
    if not 0.0 < keep <= 1.0 or math.isnan(keep):
        raise ValueError(f"keep as a ratio must be in (0, 1], got {keep}")
    # A float32 product can land a hair above an integer (0.3 * 10 = 3.0000002): round first.
    return jnp.ceil(jnp.round(n_visual * keep, 4)).astype(jnp.int32)


def select_visual_tokens(importance, visual_mask, keep, *, valid_lengths=None, output_length: int | None = None):
    """Which tokens survive pruning, in their original order.

    Args:
      importance: (B, S) float scores of the tokens (only visual ones matter).
      visual_mask: (B, S) bool, the visual tokens.
      keep: ratio in (0, 1] or int count of visual tokens to keep per example. Every valid
        non-visual (text) token stays. Among visual tokens the highest scores win; ties go to
        the earlier position, so the result is deterministic.
      valid_lengths: (B,) int, tokens at or past it are padding and dropped (default: none).
      output_length: static length of the index array. Default: the longest kept sequence when
        the inputs are concrete, else S.

    Returns:
      (indices (B, output_length) int32, lengths (B,) int32): indices[b, :lengths[b]] are the
      kept positions in increasing order; the rest repeat the last kept position (harmless to
      gather, ignored through ``lengths``).
    """
    importance, visual_mask = jnp.asarray(importance), jnp.asarray(visual_mask)
    if visual_mask.ndim != 2 or visual_mask.dtype != jnp.bool_:
        raise ValueError(f"visual_mask must be a boolean (B, S) array, got {visual_mask.dtype} {visual_mask.shape}")
    if importance.shape != visual_mask.shape:
        raise ValueError(f"importance must have the shape of visual_mask {visual_mask.shape}, got {importance.shape}")
    B, S = visual_mask.shape
    valid = jnp.ones((B, S), bool) if valid_lengths is None else (
        jnp.arange(S)[None, :] < jnp.asarray(valid_lengths)[:, None])
    visual = visual_mask & valid
    n_keep = keep_counts(visual, keep)
    # Rank the visual tokens first (whatever their scores: -inf and NaN included, NaN last), best
    # score first; lexsort is stable, so earlier positions win ties.
    score = importance.astype(jnp.float32)
    score = jnp.where(jnp.isnan(score), -jnp.inf, score)
    order = jnp.lexsort((-score, ~visual), axis=1)
    rank = jnp.argsort(order, axis=1)
    kept = (valid & ~visual_mask) | (visual & (rank < n_keep[:, None]))
    lengths = jnp.sum(kept, axis=1).astype(jnp.int32)
    if output_length is None:
        try:
            output_length = max(1, int(np.max(np.asarray(lengths))))
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            output_length = S
    if not 1 <= output_length <= S:
        raise ValueError(f"output_length must be in [1, S={S}], got {output_length}")
    indices = jnp.argsort(~kept, axis=1, stable=True)[:, :output_length].astype(jnp.int32)
    last = jnp.take_along_axis(indices, jnp.maximum(lengths - 1, 0)[:, None], axis=1)
    indices = jnp.where(jnp.arange(output_length)[None, :] < lengths[:, None], indices, last)
    return indices, lengths


def gather_tokens(x, indices, axis: int = 1):
    """Gather kept tokens along ``axis``: hidden states (B, S, D) or q/k/v (B, S, N, H) with
    axis 1, position ids (B, S) with axis 1, multi-axis ids such as Qwen2-VL's M-RoPE (3, B, S)
    with axis 2. ``indices`` is (B, L) from ``select_visual_tokens``; the batch axis is the one
    before ``axis``."""
    x = jnp.asarray(x)
    axis = axis % x.ndim
    if axis == 0:
        raise ValueError("axis must not be 0: the axis before it is the batch axis")
    if x.shape[axis - 1] != indices.shape[0]:
        raise ValueError(f"batch axis {axis - 1} of x has size {x.shape[axis - 1]}, indices have batch "
                         f"{indices.shape[0]}")
    shape = [1] * x.ndim
    shape[axis - 1], shape[axis] = indices.shape
    idx = jnp.broadcast_to(indices.reshape(shape), x.shape[:axis] + (indices.shape[1],) + x.shape[axis + 1:])
    return jnp.take_along_axis(x, idx, axis=axis)
