"""Which keys a query may see: one definition shared by the Pallas kernels and the XLA path.

Query ``i`` sits at key position ``i + offset``: ``offset = 0`` aligned top-left (as
``jax.nn.dot_product_attention``, torch SDPA's ``is_causal`` and Flax: query i sees keys j <= i),
``offset = kv_len - q_len`` aligned bottom-right (as FlashAttention, and a KV-cache decode step: the
last query lines up with the last key), with ``q_len`` queries and ``kv_len`` keys (the static array
lengths). A query at aligned position ``p`` may see key ``j`` when

    p - window_left <= j <= p + window_right          (a missing bound is unbounded)

where ``causal`` forces ``window_right <= 0``. Keys at or past the per-example key length, keys in
another segment, and keys that the dense mask hides are invisible too.

Everything here works on jnp values, so the same code runs on one tile inside a kernel and on the
whole (T, S) grid in the XLA path.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Band:
    """The diagonal band of visible keys: static, hashable.

    Attributes:
      offset: key position of query 0 (0 top-left, ``kv_len - q_len`` bottom-right).
      left: how far back a query may look (None: unbounded).
      right: how far ahead a query may look (None: unbounded; 0 when causal).
    """

    offset: int
    left: int | None
    right: int | None

    @classmethod
    def make(cls, q_len: int, kv_len: int, causal: bool, window: tuple[int | None, int | None], *,
             bottom_right: bool) -> "Band":
        left, right = window
        if causal:
            right = 0 if right is None else min(right, 0)
        return cls(offset=kv_len - q_len if bottom_right else 0, left=left, right=right)

    @property
    def is_full(self) -> bool:
        return self.left is None and self.right is None


def band_visible(band: Band, q_pos, k_pos):
    """Boolean (len(q_pos), len(k_pos)) of the band alone, or None when the band hides nothing."""
    if band.is_full:
        return None
    delta = k_pos[None, :] - (q_pos[:, None] + band.offset)
    visible = None
    if band.left is not None:
        visible = delta >= -band.left
    if band.right is not None:
        upper = delta <= band.right
        visible = upper if visible is None else visible & upper
    return visible


def combine(*masks):
    """Logical and of the masks that are not None (None when all are)."""
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else out & m
    return out


def _cdiv(a, b: int):
    return lax.div(a + (b - 1), b)


def _clamp(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


def kv_block_range(band: Band, q_start, block_q: int, block_k: int, kv_valid, num_k_blocks: int):
    """Key blocks a query tile [q_start, q_start + block_q) must visit.

    Returns block indices (lo, full_lo, full_hi, hi), lo <= full_lo <= full_hi <= hi: blocks in
    [lo, hi) may hold visible keys; blocks in [full_lo, full_hi) are visible to every row of the
    tile and lie wholly below ``kv_valid`` (the key length), so they need no mask at all.
    """
    first_row, last_row = q_start + band.offset, q_start + block_q - 1 + band.offset
    lo = 0 if band.left is None else lax.div(jnp.maximum(first_row - band.left, 0), block_k)
    end = kv_valid if band.right is None else jnp.minimum(kv_valid, last_row + band.right + 1)
    hi = _clamp(_cdiv(jnp.maximum(end, 0), block_k), 0, num_k_blocks)
    lo = jnp.minimum(lo, hi)
    # Unmasked blocks: start at or after the last row's left edge, end at or before the first
    # row's right edge and before kv_valid.
    full_lo = lo if band.left is None else _cdiv(jnp.maximum(last_row - band.left, 0), block_k)
    full_end = kv_valid if band.right is None else jnp.minimum(kv_valid, first_row + band.right + 1)
    full_hi = lax.div(jnp.maximum(full_end, 0), block_k)
    full_lo = _clamp(full_lo, lo, hi)
    full_hi = _clamp(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def q_block_range(band: Band, k_start, block_k: int, block_q: int, q_valid, num_q_blocks: int, kv_tile_whole):
    """Query blocks that may see some key of the tile [k_start, k_start + block_k).

    ``kv_tile_whole`` says the key tile lies wholly below the key length; otherwise every query
    block needs the mask. Returns (lo, full_lo, full_hi, hi) as kv_block_range does.
    """
    first_key, last_key = k_start, k_start + block_k - 1
    # Row i sees key j when i + offset - left <= j <= i + offset + right.
    lo = 0 if band.right is None else lax.div(jnp.maximum(first_key - band.right - band.offset, 0), block_q)
    end = q_valid if band.left is None else jnp.minimum(q_valid, last_key + band.left - band.offset + 1)
    hi = _clamp(_cdiv(jnp.maximum(end, 0), block_q), 0, num_q_blocks)
    lo = jnp.minimum(lo, hi)
    full_lo = lo if band.right is None else _cdiv(jnp.maximum(last_key - band.right - band.offset, 0), block_q)
    full_end = q_valid if band.left is None else jnp.minimum(q_valid, first_key + band.left - band.offset + 1)
    full_hi = lax.div(jnp.maximum(full_end, 0), block_q)
    full_lo = _clamp(full_lo, lo, hi)
    full_hi = _clamp(full_hi, full_lo, hi)
    full_hi = jnp.where(kv_tile_whole, full_hi, full_lo)
    return lo, full_lo, full_hi, hi
