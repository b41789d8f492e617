"""Block-sparse attention, JAX face: ``BlockMask`` and ``block_sparse_attention``.

A block map says, for each (batch, head) and each pair (query block, key block) of fixed sizes
(block_q, block_k), whether the queries of that block attend to the keys of that block. A query
attends exactly to the keys of its listed blocks (intersected with the causal mask when
``is_causal``): a dense softmax restricted to the map. The kernels
(``mmfa_jax.kernels.block_sparse``) take the map's blocks as their tiles and visit only the listed
ones, so the cost is proportional to the number of computed blocks.

``BlockMask`` holds the lists the kernels walk (per query block its key blocks; per key block its
query blocks, packed), built with jax ops (jittable), of a static width: from index lists their
memory is linear in the listed entries, never quadratic in the blocks (the dense map is computed
only on demand). It is a pytree (block sizes and sequence lengths static), so it passes through
``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mmfa_jax import _checks, backends, kernels, tuning
from mmfa_jax._autodiff import _first_order_only, backward_delta
from mmfa_jax._checks import ArgumentError, ArgumentTypeError
from mmfa_jax.kernels.block_sparse import SparseProblem, fitted_configs, shared_bytes
from mmfa_jax.masking import Band
from mmfa_jax.xla_attention import xla_attention

MIN_KERNEL_BLOCK, MAX_KERNEL_BLOCK = 16, 256


# ------------------------------------------------------------------------------------------------
# The map and its lists.


@jax.tree_util.register_pytree_node_class
class BlockLists:
    """The lists the kernels walk, for one reading of the map (with or without ``is_causal``); all
    int32, with Bm, Nm the map's batch and head extents, nq, nk its query and key blocks and W the
    lists' static width (capacity: ``from_indices``' list length L, ``from_dense``'s nk):

      kv_count (Bm, Nm, nq)     key blocks computed for each query block
      kv_full  (Bm, Nm, nq)     how many of them are wholly visible: the first ones of kv_index
      kv_index (Bm, Nm, nq, W)  the wholly visible blocks ascending, then the partial ones (which
                                need the token-level mask) ascending, then padding (0, never read)
      q_offset, q_count, q_full (Bm, Nm, nk)  the transposed lists, per key block, for the dK/dV
                                backward: where its query blocks start in q_index, how many there
                                are, and how many of them (the first) are wholly visible
      q_index  (Bm, Nm, nq * W) the key blocks' query blocks, compressed: key block after key
                                block, each one's wholly visible query blocks ascending then its
                                partial ones ascending; padding (0) after the last.

    So the memory is linear in nq * W (the listed entries), never nq * nk unless the lists are
    that wide. A computed block is a listed block that holds some visible logit (with
    ``is_causal``, blocks wholly above the diagonal are dropped); a wholly visible one lies inside
    both sequences (not a ragged last block) and, with ``is_causal``, wholly on or below the
    diagonal."""

    def __init__(self, kv_count, kv_full, kv_index, q_offset, q_count, q_full, q_index):
        self.kv_count, self.kv_full, self.kv_index = kv_count, kv_full, kv_index
        self.q_offset, self.q_count, self.q_full, self.q_index = q_offset, q_count, q_full, q_index

    def tree_flatten(self):
        return (self.kv_count, self.kv_full, self.kv_index, self.q_offset, self.q_count, self.q_full,
                self.q_index), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    @property
    def forward(self) -> tuple:
        """(kv_count, kv_full, kv_index): what the forward and dQ kernels take."""
        return self.kv_count, self.kv_full, self.kv_index

    @property
    def transposed(self) -> tuple:
        """(q_offset, q_count, q_full, q_index): what the dK/dV kernel takes."""
        return self.q_offset, self.q_count, self.q_full, self.q_index


# A list entry's class, which orders it: wholly visible, partial, or not computed (padding).
_FULL, _PARTIAL, _NONE = 0, 1, 2


def _block_extents(pos, block: int, length: int):
    """(min, max) of the positions in each block, (B, n) each (a ragged last block: its rows only)."""
    n = -(-length // block)
    pad = n * block - length
    big = jnp.iinfo(jnp.int32).max
    lo = jnp.pad(pos, ((0, 0), (0, pad)), constant_values=big).reshape(pos.shape[0], n, block).min(-1)
    hi = jnp.pad(pos, ((0, 0), (0, pad)), constant_values=-1).reshape(pos.shape[0], n, block).max(-1)
    return lo, hi


def _unique_rows(kj, nk: int):
    """Each row of key blocks (Bm, Nm, nq, W) sorted ascending, repeats and entries outside
    [0, nk) replaced by nk (past every real block, so they sort last)."""
    kj = jnp.sort(jnp.where((kj >= 0) & (kj < nk), kj, nk), axis=-1)
    repeat = jnp.concatenate([jnp.zeros(kj.shape[:-1] + (1,), bool), kj[..., 1:] == kj[..., :-1]], axis=-1)
    return jnp.where(repeat, nk, kj)


def _classes(kj, block_size, seq_lens, causal: bool, positions):
    """The class (_FULL, _PARTIAL, _NONE) of each entry of unique rows ``kj`` (Bm, Nm, nq, W; nk
    where unused), elementwise: the (nq, nk) grid of block pairs is never formed. With positions
    and ``causal`` the result has the positions' batch B."""
    (bq, bk), (T, S) = block_size, seq_lens
    nq, nk = _grid(block_size, seq_lens)
    qi = jnp.arange(nq, dtype=jnp.int32)[:, None]
    listed = kj < nk
    whole = ((qi + 1) * bq <= T) & ((kj + 1) * bk <= S)  # no ragged edge
    if causal and positions is not None:  # key visible when its position is at most the query's
        (q_lo, q_hi), (k_lo, k_hi) = _block_extents(positions[0], bq, T), _block_extents(positions[1], bk, S)
        batch = q_lo.shape[0]
        b = jnp.arange(batch)[:, None, None, None]
        at = jnp.minimum(kj, nk - 1)
        some = k_lo[b, at] <= q_hi[:, None, :, None]  # (B, Nm, nq, W)
        every = k_hi[b, at] <= q_lo[:, None, :, None]
    elif causal:  # top-left: query i sees keys j <= i
        some = kj * bk <= jnp.minimum((qi + 1) * bq, T) - 1  # the block's first key vs its last query
        every = (kj + 1) * bk - 1 <= qi * bq  # its last key vs its first query
    else:
        some = every = True
    computed = listed & some
    return jnp.where(computed & whole & every, _FULL, jnp.where(computed, _PARTIAL, _NONE)).astype(jnp.int32)


def _block_lists(kj, block_size, seq_lens, causal: bool, positions=None) -> BlockLists:
    """The lists of one reading from unique rows ``kj`` (``_unique_rows``): each row sorted by
    (class, block), and its entries sorted by (key block, class, query block) into the compressed
    transposed list. Memory and work linear in the entries (sorts of rows of W and of nq * W)."""
    nq, nk = _grid(block_size, seq_lens)
    category = _classes(kj, block_size, seq_lens, causal, positions)
    kj = jnp.broadcast_to(kj, category.shape)
    category, kj = lax.sort((category, kj), dimension=3, num_keys=2)
    used = category != _NONE
    kv_index = jnp.where(used, kj, 0)
    kv_count = jnp.sum(used, axis=-1, dtype=jnp.int32)
    kv_full = jnp.sum(category == _FULL, axis=-1, dtype=jnp.int32)

    bm, nm, _, width = kj.shape
    flat = (bm, nm, nq * width)
    key = jnp.where(used, kj, nk).reshape(flat)
    qi = jnp.broadcast_to(jnp.arange(nq, dtype=jnp.int32)[:, None], kj.shape).reshape(flat)
    key, t_category, qi = lax.sort((key, category.reshape(flat), qi), dimension=2, num_keys=3)
    q_index = jnp.where(key < nk, qi, 0)

    def per_key_block(weights):  # (Bm, Nm, nq * W) -> (Bm, Nm, nk): summed per key block
        rows = jax.vmap(lambda w, k: jax.ops.segment_sum(w, k, num_segments=nk + 1))
        rows_of = (bm * nm, flat[-1])
        return rows(weights.reshape(rows_of), key.reshape(rows_of))[:, :nk].reshape(bm, nm, nk)

    q_count = per_key_block((key < nk).astype(jnp.int32))
    q_full = per_key_block((t_category == _FULL).astype(jnp.int32))
    q_offset = (jnp.cumsum(q_count, axis=-1) - q_count).astype(jnp.int32)
    return BlockLists(kv_count, kv_full, kv_index, q_offset, q_count, q_full, q_index)


@jax.tree_util.register_pytree_node_class
class BlockMask:
    """Which (query block, key block) pairs attend, per batch and head, and the kernels' lists.

    Build it with ``BlockMask.from_dense`` (a boolean block map) or ``BlockMask.from_indices`` (per
    query block, the list of its key blocks). Attributes:

      plain       ``BlockLists`` without ``is_causal``: it holds the map itself (its listed blocks)
      causal      ``BlockLists`` with ``is_causal`` (top-left: query i sees keys j <= i)
      block_size  (block_q, block_k), static
      seq_lens    (T, S), static: nq = ceil(T / block_q), nk = ceil(S / block_k)
      positions   None, or (query positions (B, T), key positions (B, S)) int32
      shape       (Bm, Nm, nq, nk), Bm in {1, B}, Nm in {1, Hq} (1: broadcast)
      blocks      bool (Bm, Nm, nq, nk): the dense map, computed from the lists on demand
                  (quadratic in the blocks: for the "xla" backend and for inspection)

    The mask stores lists only, of a static width W (see ``BlockLists``): from index lists of
    length L its memory is linear in nq * L, however many key blocks there are. Both readings are
    built (small int arrays); under ``jax.jit`` the one a call does not use is dead code. The last
    blocks may be ragged (T, S not multiples of the block): their rows past the sequence simply do
    not exist.
    """

    def __init__(self, plain: BlockLists, causal: BlockLists, block_size: tuple[int, int],
                 seq_lens: tuple[int, int], positions=None):
        self.plain, self.causal = plain, causal
        self.block_size, self.seq_lens = tuple(block_size), tuple(seq_lens)
        self.positions = positions

    def tree_flatten(self):
        return (self.plain, self.causal, self.positions), (self.block_size, self.seq_lens)

    @classmethod
    def tree_unflatten(cls, aux, children):
        plain, causal, positions = children
        return cls(plain, causal, *aux, positions=positions)

    def __repr__(self):
        return (f"BlockMask(shape {self.shape}, lists of width {self.width}, block_size={self.block_size}, "
                f"seq_lens={self.seq_lens})")

    @classmethod
    def from_dense(cls, blocks, block_size, *, seq_lens, positions=None) -> "BlockMask":
        """From a boolean block map.

        Args:
          blocks: boolean (Bm, Nm, nq, nk), Bm in {1, B} and Nm in {1, Hq} (1 broadcasts); rank 2
            ((nq, nk)) and 3 ((Nm, nq, nk)) take leading 1s. True: the queries of block qi attend
            to the keys of block kj.
          block_size: (block_q, block_k) positive ints (one int: both). The kernels need powers of
            two from 16 to 256 (their tiles are the blocks); the "xla" backend takes any.
          seq_lens: (T, S), the query and key lengths: nq = ceil(T / block_q), nk = ceil(S / block_k).
          positions: optional (query positions (B, T), key positions (B, S)) integers: with
            ``is_causal`` a key is visible to a query when its position is at most the query's,
            rather than its index (the rows are in a permuted order, e.g. video tokens grouped by
            spatial position, ``mmfa_jax.sparse_patterns.permuted_attention``; causality is the
            original order's). The causal lists then have the positions' batch B.
        The lists have width nk (a dense map may list every block): memory quadratic in the
        blocks, as the map itself; ``from_indices`` gives lists as wide as its own.
        """
        block_size = _block_size(block_size)
        seq_lens = _seq_lens(seq_lens)
        positions = _positions(positions, seq_lens)
        blocks = _array(blocks, "blocks")
        if _checks.dtype_name(blocks.dtype) != "bool":
            raise ArgumentTypeError(f"blocks must be a boolean block map, got dtype {_checks.dtype_name(blocks.dtype)}")
        want = _grid(block_size, seq_lens)
        if not 2 <= blocks.ndim <= 4 or tuple(blocks.shape[-2:]) != want or 0 in blocks.shape[:-2]:
            raise ArgumentError(f"blocks must be (Bm, Nm, nq, nk) = (B or 1, Hq or 1, {want[0]}, {want[1]}) for "
                                f"seq_lens={seq_lens} and block_size={block_size}, got shape {tuple(blocks.shape)}")
        blocks = blocks.reshape((1,) * (4 - blocks.ndim) + tuple(blocks.shape))
        # Each row's listed blocks are its True columns: ascending and unique already.
        kj = jnp.where(blocks, jnp.arange(want[1], dtype=jnp.int32), want[1])
        return cls._from_rows(kj, block_size, seq_lens, positions, "blocks")

    @classmethod
    def from_indices(cls, indices, counts, block_size, *, seq_lens, positions=None) -> "BlockMask":
        """From per-query-block lists of key blocks.

        Args:
          indices: integers (Bm, Nm, nq, L): the key blocks of each query block, in any order (only
            the first ``counts`` entries count; repeats are harmless); rank 2 and 3 take leading 1s.
          counts: integers (Bm, Nm, nq), each in [0, L]: how many entries of each list are used.
          block_size, seq_lens, positions: as for ``from_dense``.
        Indices and counts are checked when concrete; under jit the caller vouches for them (an
        index outside [0, nk) is then dropped). The lists are built from the indices directly, of
        width L (at least 1): memory linear in nq * L, whatever nk (no (nq, nk) array is formed).
        """
        block_size = _block_size(block_size)
        seq_lens = _seq_lens(seq_lens)
        positions = _positions(positions, seq_lens)
        indices, counts = _array(indices, "indices"), _array(counts, "counts")
        for name, x in (("indices", indices), ("counts", counts)):
            if not jnp.issubdtype(x.dtype, jnp.integer) or _checks.dtype_name(x.dtype) == "bool":
                raise ArgumentTypeError(f"{name} must be integers, got dtype {_checks.dtype_name(x.dtype)}")
        nq, nk = _grid(block_size, seq_lens)
        if not 2 <= indices.ndim <= 4 or indices.shape[-2] != nq or 0 in indices.shape[:-2]:
            raise ArgumentError(f"indices must be (Bm, Nm, nq, L) with nq = {nq} query blocks (seq_lens={seq_lens}, "
                                f"block_size={block_size}), got shape {tuple(indices.shape)}")
        if tuple(counts.shape) != tuple(indices.shape[:-1]):
            raise ArgumentError(f"counts must have the shape of indices without its last axis, "
                                f"{tuple(indices.shape[:-1])}, got {tuple(counts.shape)}")
        length = indices.shape[-1]
        valid = jnp.arange(length) < counts[..., None]
        try:
            c, i, ok = np.asarray(counts), np.asarray(indices), np.asarray(valid)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            c = None  # traced: the caller vouches
        if c is not None:
            if np.any((c < 0) | (c > length)):
                raise ArgumentError(f"counts must lie in [0, {length}] (the lists' length), got values from "
                                    f"{int(c.min())} to {int(c.max())}")
            if np.any(ok & ((i < 0) | (i >= nk))):
                bad = i[ok & ((i < 0) | (i >= nk))]
                raise ArgumentError(f"indices must lie in [0, {nk}) (the key blocks) where counted, got {int(bad[0])}")
        shape = (1,) * (4 - indices.ndim) + tuple(indices.shape)
        kj = jnp.where(valid, indices.astype(jnp.int32), nk).reshape(shape)  # nk: unused
        if length == 0:  # a list of one unused entry: the kernels' list specs want a width
            kj = jnp.full(shape[:3] + (1,), nk, jnp.int32)
        return cls._from_rows(_unique_rows(kj, nk), block_size, seq_lens, positions, "indices")

    @classmethod
    def _from_rows(cls, kj, block_size, seq_lens, positions, name: str) -> "BlockMask":
        """Both readings' lists from unique rows ``kj`` (Bm, Nm, nq, W) int32 (nk: unused), built
        from the argument ``name``."""
        if positions is not None and kj.shape[0] not in (1, positions[0].shape[0]):
            raise ArgumentError(f"{name} has batch {kj.shape[0]}: it must be 1 or the positions' batch "
                                f"{positions[0].shape[0]}")
        plain = _block_lists(kj, block_size, seq_lens, False)
        return cls(plain, _block_lists(kj, block_size, seq_lens, True, positions), block_size, seq_lens, positions)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(Bm, Nm, nq, nk)."""
        return tuple(self.plain.kv_count.shape) + (self.plain.q_count.shape[-1],)

    @property
    def width(self) -> int:
        """W, the lists' static capacity per query block."""
        return self.plain.kv_index.shape[-1]

    @property
    def blocks(self):
        """bool (Bm, Nm, nq, nk): the map, scattered from the plain lists. Quadratic in the
        blocks (the mask itself never holds it)."""
        return _dense_map(self.plain, self.shape[-1])

    def lists(self, is_causal: bool) -> BlockLists:
        return self.causal if is_causal else self.plain

    def computed_blocks(self, is_causal: bool = False):
        """How many (batch, head, query block, key block) tiles a forward computes, over the map's
        own (Bm, Nm) (an int32 scalar array): its cost, in tiles."""
        return jnp.sum(self.lists(is_causal).kv_count)

    def dense_mask(self, is_causal: bool = False):
        """bool (Bm, Nm, T, S): the token-level mask of the map, without the causal mask, or with it
        when there are positions and ``is_causal`` (then (B, Nm, T, S)). Quadratic in the lengths."""
        (bq, bk), (T, S) = self.block_size, self.seq_lens
        mask = jnp.repeat(jnp.repeat(self.blocks, bq, axis=2), bk, axis=3)[:, :, :T, :S]
        if is_causal and self.positions is not None:
            q_pos, kv_pos = self.positions
            mask = mask & (kv_pos[:, None, None, :] <= q_pos[:, None, :, None])
        return mask


def _dense_map(lists: BlockLists, nk: int):
    """bool (Bm, Nm, nq, nk): the blocks a reading's forward lists hold."""
    count, _, index = lists.forward
    bm, nm, nq, width = index.shape
    target = jnp.where(jnp.arange(width) < count[..., None], index, nk)
    b = jnp.arange(bm)[:, None, None, None]
    h = jnp.arange(nm)[None, :, None, None]
    qi = jnp.arange(nq)[None, None, :, None]
    return jnp.zeros((bm, nm, nq, nk + 1), bool).at[b, h, qi, target].set(True)[..., :nk]


def _array(x, name):
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise ArgumentTypeError(f"{name} must be an array, got {type(x).__name__} ({e})") from None


def _positions(positions, seq_lens):
    """The checked (query positions (B, T), key positions (B, S)) as int32, or None."""
    if positions is None:
        return None
    if not isinstance(positions, (tuple, list)) or len(positions) != 2:
        raise ArgumentTypeError(f"positions must be a pair (query positions (B, T), key positions (B, S)), got "
                                f"{type(positions).__name__}")
    q_pos, kv_pos = (_array(x, n) for x, n in zip(positions, ("positions[0]", "positions[1]")))
    for name, x, n in (("positions[0]", q_pos, seq_lens[0]), ("positions[1]", kv_pos, seq_lens[1])):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ArgumentTypeError(f"{name} must be integers, got dtype {_checks.dtype_name(x.dtype)}")
        if x.ndim != 2 or x.shape[1] != n:
            raise ArgumentError(f"{name} must be (B, {n}), got shape {tuple(x.shape)}")
    if q_pos.shape[0] != kv_pos.shape[0]:
        raise ArgumentError(f"positions must share their batch, got {q_pos.shape[0]} and {kv_pos.shape[0]}")
    return q_pos.astype(jnp.int32), kv_pos.astype(jnp.int32)


def _int(value, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ArgumentError(f"{name} must be {'positive' if minimum == 1 else f'>= {minimum}'}, got {int(value)}")
    return int(value)


def _pair(value, name: str, parts: tuple[str, str], minimum: int) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ArgumentError(f"{name} must be a pair ({parts[0]}, {parts[1]}), got {value!r}")
    return tuple(_int(v, f"{name} ({part})", minimum) for v, part in zip(value, parts))


def _block_size(value) -> tuple[int, int]:
    return _pair(value, "block_size", ("block_q", "block_k"), 1)


def _seq_lens(value) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        raise ArgumentError(f"seq_lens must be a pair (T, S), got {value!r}")
    return _pair(value, "seq_lens", ("T", "S"), 0)


def _grid(block_size, seq_lens) -> tuple[int, int]:
    return -(-seq_lens[0] // block_size[0]), -(-seq_lens[1] // block_size[1])


# ------------------------------------------------------------------------------------------------
# The attention.


def block_sparse_attention(query, key, value, block_mask: BlockMask, *, scale: float | None = None,
                           is_causal: bool = False, implementation: backends.Implementation | None = None,
                           return_lse: bool = False):
    """Attention restricted to a block map: exact, memory-linear, cost proportional to its blocks.

    Shapes (jax's layout): query (B, T, Hq, D), key and value (B, S, Hkv, D), Hkv dividing Hq (GQA:
    query head n reads K/V head n // (Hq // Hkv); K/V are never repeated).

    Args:
      query, key, value: float16, bfloat16 or float32, one dtype; D up to 256.
      block_mask: a ``BlockMask`` for seq_lens (T, S), of batch 1 or B and heads 1 or Hq. Query i
        attends to key j when block (i // block_q, j // block_k) is in the map (and j <= i with
        ``is_causal``). A row that sees no key gives zeros and LSE -inf; a NaN in what a row sees
        reaches it.
      scale: logit scale, default 1/sqrt(D).
      is_causal: also the causal mask, aligned top-left (as ``mmfa_jax.attention``: query i sees
        keys j <= i).
      implementation: "pallas" / "triton" (the kernels compiled for an NVIDIA GPU; "pallas" is the
        default there), "interpret" (the same kernels in the Pallas interpreter), "xla" (plain jax
        over the dense mask of the map, quadratic memory; the default elsewhere).
      return_lse: also return the log-sum-exp (B, T, Hq) float32, differentiable.

    Returns:
      The output, shaped and typed like ``query`` (and the LSE if asked); differentiable in query,
      key and value (first order; the kernels' backward walks the same lists).
    """
    if not isinstance(block_mask, BlockMask):
        raise ArgumentTypeError(f"block_mask must be a mmfa_jax.BlockMask (BlockMask.from_dense / from_indices), got "
                                f"{type(block_mask).__name__}")
    lowering = backends.resolve(implementation)
    query, key, value = (_array(x, n) for x, n in ((query, "query"), (key, "key"), (value, "value")))
    d = _checks.attention_dims(query, key, value, "BTNH", xla=not lowering.kernels)
    if block_mask.seq_lens != (d.q_len, d.kv_len):
        raise ArgumentError(f"block_mask was built for seq_lens (T, S) = {block_mask.seq_lens}, but query and key have "
                            f"T={d.q_len}, S={d.kv_len}")
    bm, nm = block_mask.shape[:2]
    if bm not in (1, d.batch) or nm not in (1, d.q_heads):
        raise ArgumentError(f"block_mask's map has batch {bm} and heads {nm}: they must be 1 or the query's batch "
                            f"{d.batch} and heads {d.q_heads}")
    bq, bk = block_mask.block_size
    if lowering.kernels:
        for name, b in (("block_q", bq), ("block_k", bk)):
            if b & (b - 1) or not MIN_KERNEL_BLOCK <= b <= MAX_KERNEL_BLOCK:
                raise ArgumentError(f"block_mask's {name} must be a power of two from {MIN_KERNEL_BLOCK} to "
                                    f"{MAX_KERNEL_BLOCK} for the kernels (implementation {lowering.backend!r}), got "
                                    f"{b}; implementation='xla' takes any block size")
    scale = _checks.checked_scale(scale)
    is_causal = bool(is_causal)
    by_positions = is_causal and block_mask.positions is not None
    if by_positions and block_mask.positions[0].shape[0] != d.batch:
        raise ArgumentError(f"block_mask's positions have batch {block_mask.positions[0].shape[0]}, the query "
                            f"{d.batch}")
    if d.empty:
        out = jnp.zeros(query.shape, query.dtype)
        lse = jnp.full((d.batch, d.q_len, d.q_heads), -jnp.inf, jnp.float32)
        return (out, lse) if return_lse else out
    problem = kernels.Problem(
        batch=d.batch, q_heads=d.q_heads, kv_heads=d.kv_heads, q_len=d.q_len, kv_len=d.kv_len, head_dim=d.head_dim,
        scale=scale if scale is not None else d.head_dim ** -0.5, softcap=None,
        band=Band.make(d.q_len, d.kv_len, is_causal and not by_positions, (None, None), bottom_right=False),
        layout="BTNH",
        bias_shape=None, mask_shape=None, has_segments=False, has_q_lengths=False, has_kv_lengths=False,
        dot_precision="highest" if _checks.dtype_name(query.dtype) == "float32" else None)
    sp = SparseProblem(problem, bq, bk, block_mask.lists(is_causal).kv_count.shape[0], nm, by_positions)
    config = None
    if lowering.kernels:
        config = _configs(sp, query.dtype, lowering)
    out, lse = _run((sp, config, lowering), query, key, value, block_mask)
    lse = jnp.swapaxes(lse, 1, 2)
    return (out, lse) if return_lse else out


def _configs(sp: SparseProblem, dtype, lowering: backends.Lowering) -> tuning.AttentionConfig:
    """The kernels' configurations: the forward's tiles are the map's blocks; the backward's are the
    tuning table's tiles of the dense dQ and dK/dV kernels where those are smaller than the blocks
    (they divide them: powers of two; the map's 128-row blocks ran the backward at half the dense
    kernels' rate per block, bench/NOTES.md); warps and the forward's pipeline stages from the
    table's row for the head dim, at most two stages in the backward (three measured slower),
    fewer where the tiles would not fit shared memory."""
    table = tuning.config_for(sp.problem.head_dim_padded, dtype, lowering.family)

    def own(c: tuning.KernelConfig, tiled: bool) -> tuning.KernelConfig:
        rows = (min(c.block_q, sp.block_q), min(c.block_k, sp.block_k)) if tiled else (sp.block_q, sp.block_k)
        return tuning.KernelConfig(*rows, c.num_warps, c.num_stages if not tiled else min(c.num_stages, 2))

    fitted = fitted_configs(
        sp, {"forward": own(table.forward, False), "dq": own(table.backward_dq, True),
             "dkv": own(table.backward_dkv, True)}, jnp.dtype(dtype).itemsize, lowering.cc)
    config = tuning.AttentionConfig(fitted["forward"], fitted["dq"], fitted["dkv"])
    _check_fits(sp, config, ("forward",), dtype, lowering)
    return config


def _check_fits(sp: SparseProblem, config: tuning.AttentionConfig, which: tuple[str, ...], dtype,
                lowering: backends.Lowering):
    """ArgumentError when a kernel's tiles cannot fit the GPU's shared memory even with one pipeline
    stage (by the estimate of ``kernels.block_sparse.shared_bytes``). The backward's kernels are
    checked when a gradient is traced: a forward alone may use larger blocks."""
    if lowering.cc is None:
        return
    from mmfa_jax.triton_route import shared_memory_limit

    limit = shared_memory_limit(lowering.cc)
    tiles = {"forward": config.forward, "dq": config.backward_dq, "dkv": config.backward_dkv}
    for kernel in which:
        need = shared_bytes(kernel, sp, dataclasses.replace(tiles[kernel], num_stages=1), jnp.dtype(dtype).itemsize)
        if need > limit:
            raise ArgumentError(
                f"block_mask's block_size {(sp.block_q, sp.block_k)} is too large for the {kernel} kernel at head dim "
                f"{sp.problem.head_dim} ({_checks.dtype_name(jnp.dtype(dtype))}) on compute capability {lowering.cc}: it would need "
                f"about {need // 1024} KiB of shared memory per block, the GPU allows {limit // 1024} KiB; use "
                "smaller blocks")


@functools.partial(jax.jit, static_argnums=0)
def _run(static, q, k, v, block_mask: BlockMask):
    """(out, lse (B, Hq, T)); jitted, so that an eager call compiles once per shape."""
    sp, _, lowering = static
    p = sp.problem
    causal = p.band.right is not None or sp.by_positions  # the band is the causal mask or nothing
    if not lowering.kernels:
        mask = block_mask.dense_mask(causal)
        dense = dataclasses.replace(p, mask_shape=(mask.shape[0], sp.map_heads))
        return xla_attention(dense, q, k, v, None, mask, None, None, None, None)
    lists = block_mask.lists(causal)
    positions = block_mask.positions if sp.by_positions else (None, None)
    return _sparse_flash(static, q, k, v, *lists.forward, *lists.transposed, *positions)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_flash(static, q, k, v, kv_count, kv_full, kv_index, q_offset, q_count, q_full, q_index, q_pos, kv_pos):
    return _sparse_flash_fwd(static, q, k, v, kv_count, kv_full, kv_index, q_offset, q_count, q_full, q_index, q_pos,
                             kv_pos)[0]


def _sparse_flash_fwd(static, q, k, v, kv_count, kv_full, kv_index, q_offset, q_count, q_full, q_index, q_pos, kv_pos):
    out, lse = _forward_kernels(static, q, k, v, kv_count, kv_full, kv_index, q_pos, kv_pos)
    return (out, lse), (q, k, v, kv_count, kv_full, kv_index, q_offset, q_count, q_full, q_index, q_pos, kv_pos, out,
                        lse)


def _sparse_flash_bwd(static, residuals, cotangents):
    *args, out, lse = residuals
    d_out, d_lse = cotangents
    delta = backward_delta(out, d_out, d_lse, static[0].problem.layout)
    dq, dk, dv = _backward_kernels(static, *args, d_out, lse, delta)
    return (dq, dk, dv) + (None,) * 9


_sparse_flash.defvjp(_sparse_flash_fwd, _sparse_flash_bwd)


@_first_order_only
def _forward_kernels(static, q, k, v, kv_count, kv_full, kv_index, q_pos, kv_pos):
    sp, config, lowering = static
    return kernels.block_sparse_forward(sp, config.forward, q, k, v, kv_count, kv_full, kv_index, q_pos, kv_pos,
                                        lowering=lowering)


@_first_order_only
def _backward_kernels(static, q, k, v, kv_count, kv_full, kv_index, q_offset, q_count, q_full, q_index, q_pos, kv_pos,
                      d_out, lse, delta):
    sp, config, lowering = static
    _check_fits(sp, config, ("dq", "dkv"), q.dtype, lowering)
    return kernels.block_sparse_backward(sp, config.backward_dq, config.backward_dkv, q, k, v, kv_count, kv_full,
                                         kv_index, q_offset, q_count, q_full, q_index, d_out, lse, delta, q_pos,
                                         kv_pos, lowering=lowering)
