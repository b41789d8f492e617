"""Sparse-attention patterns (MInference, MMInference): cheap functions that build block maps.

Each pattern returns a boolean block map (B or 1, N or 1, nq, nk) for ``BlockMask.from_dense``,
for causal self-attention over one sequence of T tokens in square blocks of ``block`` rows;
``mmfa_jax.block_sparse_attention(..., is_causal=True)`` then computes only those blocks.

  a_shape           attention sinks (the first blocks) + a local window along the diagonal
  vertical_slash    the columns and diagonals that the last query rows attend to most (MInference)
  block_topk        per query block, the key blocks whose pooled scores are highest
  with_boundaries   modality boundaries (MMInference): text query rows see every earlier block
                    (Q-boundary), and every query sees the text key blocks (2D-boundary)

Index-list routes, for ``BlockMask.from_indices`` (memory linear in the blocks, for maps of many
blocks, e.g. a 1M-token video): ``block_topk_indices`` (block_topk's blocks, its scores computed a
chunk of query blocks at a time) and ``with_text_blocks`` (the 2D-boundary's text key blocks
added to every list).

Video is frame-periodic: a token attends to the same place in other frames, a stripe every
``tokens_per_frame`` keys, which no block map of the frame order captures sparsely.
``video_permutation`` reorders the visual tokens position-major (each spatial position's tokens
of all frames next to each other), where those stripes become dense blocks near the diagonal;
``permuted_attention`` attends in that order with the causality of the original one (the block
mask's ``positions``) and puts the rows back.

``recall`` measures a map: the share of each query's softmax mass that its kept keys carry,
exp(LSE_sparse - LSE_dense), from the kernels' own log-sum-exps, so it needs no T x S memory.

The estimations run as jax ops over (last rows x S) scores per head (``vertical_slash``) or over
pooled (nq x nk) block scores (``block_topk``; ``block_topk_indices``: (chunk x nk) at a time).
``block_topk_indices`` chooses each row's top blocks with a Pallas kernel where the kernels run
(a bisection over the scores' bits, no sort); the scores themselves are one matmul per chunk,
left to XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmfa_jax import _checks, backends
from mmfa_jax._checks import ArgumentError
from mmfa_jax.block_sparse import BlockMask, _block_extents, block_sparse_attention
from mmfa_jax.kernels import selection

_NEG = -jnp.inf


def _blocks_of(T: int, block: int) -> int:
    _checks.integer(block, "block", minimum=1)
    return -(-T // block)


def causal_blocks(seq_len: int, block: int, positions=None) -> jax.Array:
    """(1 or B, 1, n, n) bool: the (query block, key block) pairs that hold some causally visible
    logit: j <= i in the rows' own order, or, with ``positions`` (B, T) (the rows' original
    positions, for a permuted order), the pairs whose earliest key comes no later than the
    block's latest query. Every pattern ends in it: in a permuted order a block right of the
    diagonal may hold keys earlier in time."""
    n = _blocks_of(seq_len, block)
    if positions is None:
        return jnp.asarray(np.tril(np.ones((n, n), bool))[None, None])
    positions = jnp.asarray(positions, jnp.int32)
    if positions.ndim != 2 or positions.shape[1] != seq_len:
        raise ArgumentError(f"positions must be (B, {seq_len}), got shape {tuple(positions.shape)}")
    lo, hi = _block_extents(positions, block, seq_len)
    return (lo[:, None, :] <= hi[:, :, None])[:, None]


def a_shape(seq_len: int, *, block: int = 128, sink_blocks: int = 1, local_blocks: int = 4,
            positions=None) -> jax.Array:
    """(1, 1, n, n) bool (n = ceil(seq_len / block)): the first ``sink_blocks`` key blocks and the
    ``local_blocks`` blocks on and left of the diagonal, for every query block; within
    ``causal_blocks(seq_len, block, positions)`` ((B, 1, n, n) with positions)."""
    n = _blocks_of(_checks.integer(seq_len, "seq_len", minimum=1), block)
    _checks.integer(sink_blocks, "sink_blocks", minimum=0)
    _checks.integer(local_blocks, "local_blocks", minimum=1)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    blocks = (j < sink_blocks) | ((i - j >= 0) & (i - j < local_blocks))
    return jnp.asarray(blocks[None, None]) & causal_blocks(seq_len, block, positions)


def _group(query, key):
    """(B, T, N, D) query and (B, S, K, D) key -> key repeated to N heads' view (for estimation only:
    a gather of the K/V head each query head reads)."""
    N, K = query.shape[2], key.shape[2]
    if N % K:
        raise ArgumentError(f"key's heads {K} must divide query's heads {N}")
    return jnp.repeat(key, N // K, axis=2)


@functools.partial(jax.jit, static_argnames=("vertical", "slash", "last_q", "block", "scale"))
def vertical_slash(query, key, *, vertical: int, slash: int, last_q: int = 64, block: int = 128,
                   scale: float | None = None, positions=None) -> jax.Array:
    """(B, N, n, n) bool, MInference's vertical-slash pattern at block granularity.

    The last ``last_q`` query rows' causal softmax over all keys (query (B, T, N, D), key
    (B, T, K, D)) rates every key column (its summed probability) and every diagonal (offset
    q - k, its summed probability along the diagonal); the ``vertical`` best columns and ``slash``
    best diagonals are kept, and a block is computed when it holds a kept column or a kept
    diagonal crosses it. The first block column and the diagonal blocks are always kept. With
    ``positions`` (B, T) (a permuted order) the estimate's causal mask and the final block filter
    compare positions; columns and diagonals are those of the given order."""
    B, T, N, D = query.shape
    n = _blocks_of(T, block)
    last_q = min(last_q, T)
    vertical, slash = min(vertical, T), min(slash, T)
    scale = D ** -0.5 if scale is None else scale
    k = _group(query, key)
    q_last = query[:, T - last_q:].astype(jnp.float32)
    rows = jnp.arange(T - last_q, T)
    cols = jnp.arange(T)
    if positions is None:
        visible = (cols[None, :] <= rows[:, None])[None]  # (1, last_q, T)
    else:
        pos = jnp.asarray(positions, jnp.int32)
        visible = pos[:, None, :] <= pos[:, T - last_q:, None]  # (B, last_q, T)

    def per_head(qh, kh):  # (B, last_q, D), (B, T, D)
        s = jnp.einsum("bqd,bkd->bqk", qh, kh.astype(jnp.float32)) * scale
        s = jnp.where(visible, s, _NEG)
        p = jax.nn.softmax(s, axis=-1)
        column = p.sum(1)  # (B, T)
        offsets = rows[:, None] - cols[None, :]  # (last_q, T): >= 0 where visible
        diagonal = jax.vmap(lambda pb: jnp.zeros(T).at[jnp.clip(offsets, 0, T - 1)].add(
            jnp.where(offsets >= 0, pb, 0.0)))(p)  # (B, T) by offset (in the given order)
        return column, diagonal

    column, diagonal = jax.lax.map(lambda x: per_head(*x), (jnp.moveaxis(q_last, 2, 0), jnp.moveaxis(k, 2, 0)))
    column, diagonal = jnp.moveaxis(column, 0, 1), jnp.moveaxis(diagonal, 0, 1)  # (B, N, T)
    kept_cols = jax.lax.top_k(column, vertical)[1]  # (B, N, vertical)
    kept_offsets = jax.lax.top_k(diagonal, slash)[1]
    col_blocks = jnp.zeros((B, N, n), bool).at[
        jnp.arange(B)[:, None, None], jnp.arange(N)[None, :, None], kept_cols // block].set(True)
    # A diagonal of offset d crosses the block diagonals floor(d / block) and ceil(d / block).
    diag_blocks = jnp.zeros((B, N, n + 1), bool)
    for part in (kept_offsets // block, -(-kept_offsets // block)):
        diag_blocks = diag_blocks.at[jnp.arange(B)[:, None, None], jnp.arange(N)[None, :, None],
                                     jnp.minimum(part, n)].set(True)
    i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    blocks = col_blocks[:, :, None, :] | diag_blocks[:, :, jnp.clip(i - j, 0, n)]
    blocks = blocks | (j == 0) | (i == j)
    return blocks & causal_blocks(T, block, positions)


def _pooled(x, block: int):
    """(B, T, H, D) -> (B, H, n, D) float32: the mean over each block's rows (a ragged last block:
    its own rows)."""
    B, T, H, D = x.shape
    n = _blocks_of(T, block)
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n * block - T), (0, 0), (0, 0)))
    counts = jnp.minimum(block, T - jnp.arange(n) * block).astype(jnp.float32)
    return jnp.moveaxis(x.reshape(B, n, block, H, D).sum(2) / counts[None, :, None, None], 2, 1)


def _pooled_pair(query, key, block: int):
    """Pooled query (B, N, n, D) and pooled key repeated to the N query heads (pooled first: the
    repeat is of n rows, not T)."""
    N, K = query.shape[2], key.shape[2]
    if N % K:
        raise ArgumentError(f"key's heads {K} must divide query's heads {N}")
    return _pooled(query, block), jnp.repeat(_pooled(key, block), N // K, axis=1)


@functools.partial(jax.jit, static_argnames=("keep", "block", "scale"))
def block_topk(query, key, *, keep: int, block: int = 128, scale: float | None = None, positions=None) -> jax.Array:
    """(B, N, n, n) bool: per query block, the ``keep`` visible key blocks (``causal_blocks``: earlier
    ones, or with ``positions`` (B, T) those holding earlier positions) with the highest score
    between the block-mean query and block-mean key (query (B, T, N, D), key (B, T, K, D)), plus
    the diagonal block and the first block (attention sinks). Quadratic in the blocks (the scores
    and the map): ``block_topk_indices`` gives the same blocks as index lists, in chunks."""
    B, T, N, D = query.shape
    n = _blocks_of(T, block)
    keep = _checks.integer(keep, "keep", minimum=1)
    scale = D ** -0.5 if scale is None else scale
    pq, pk = _pooled_pair(query, key, block)
    scores = jnp.einsum("bnid,bnjd->bnij", pq, pk) * scale
    i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    visible = causal_blocks(T, block, positions)
    scores = jnp.where(visible, scores, _NEG)
    top = jax.lax.top_k(scores, min(keep, n))[1]
    blocks = jnp.zeros((B, N, n, n), bool).at[
        jnp.arange(B)[:, None, None, None], jnp.arange(N)[None, :, None, None], i[None, None], top].set(True)
    return (blocks | (i == j) | (j == 0)) & visible


def _visible_entries(kj, qi, T: int, block: int, positions):
    """Whether key block ``kj`` (Bk, Nk, rows, L) holds a logit causally visible to query block
    ``qi`` (rows, 1) (``causal_blocks``' rule, elementwise: no (n, n) array); with positions
    (B, T) the result has their batch."""
    if positions is None:
        return kj <= qi
    lo, hi = _block_extents(positions, block, T)  # (B, n) each
    B = lo.shape[0]
    kj = jnp.broadcast_to(kj, (B,) + kj.shape[1:])
    earliest_key = lo[jnp.arange(B)[:, None, None, None], jnp.clip(kj, 0, lo.shape[1] - 1)]
    return earliest_key <= hi[:, qi[:, 0]][:, None, :, None]


def _counted_first(indices, used):
    """(indices with the ``used`` entries first, in their order; how many per row, int32): the
    counted prefix ``BlockMask.from_indices`` reads."""
    order = jnp.argsort(~used, axis=-1, stable=True)
    return (jnp.take_along_axis(indices, order, axis=-1).astype(jnp.int32),
            jnp.sum(used, axis=-1, dtype=jnp.int32))


def _top_visible(scores, visible, keep: int, lowering):
    """(indices (B, N, rows, keep) int32, filled (B, N, rows, keep) bool): per row of ``scores``
    (B, N, rows, n) float32, the ``keep`` highest among the ``visible`` ones ((1 or B, 1, rows, n)
    bool), ties to the lower index. A row with fewer visible entries has slots left over: the
    kernel leaves them unfilled (``filled`` False), ``lax.top_k`` fills them with hidden entries,
    which the caller's visibility check drops.

    With kernels (``lowering.kernels``, n at most ``selection.MAX_TOKENS``) one program per row
    finds the keep-th largest score by bisection over its bits (``kernels.selection.select``,
    the pruning's selection) and packs the kept indices in increasing order: no sort. Otherwise
    ``lax.top_k``, which sorts each row when keep is large. (NaN scores: the kernel ranks them
    lowest, ``lax.top_k`` highest.)"""
    B, N, rows, n = scores.shape
    if lowering.kernels and n <= selection.MAX_TOKENS:
        kind = jnp.where(jnp.broadcast_to(visible, scores.shape), selection.CANDIDATE, selection.DROPPED)
        keep_table = jnp.minimum(jnp.arange(n + 1, dtype=jnp.int32), keep)
        top, counts = selection.select(scores.reshape(-1, n), kind.astype(jnp.int8).reshape(-1, n), keep_table, keep,
                                       lowering=lowering)
        filled = jnp.arange(keep) < counts[:, None]
        return top.reshape(B, N, rows, keep), filled.reshape(B, N, rows, keep)
    top = jax.lax.top_k(jnp.where(visible, scores, _NEG), keep)[1].astype(jnp.int32)
    return top, jnp.ones(top.shape, bool)


@functools.partial(jax.jit, static_argnames=("keep", "block", "scale", "chunk", "implementation"))
def block_topk_indices(query, key, *, keep: int, block: int = 128, scale: float | None = None, positions=None,
                       chunk: int = 256, implementation: str | None = None):
    """``block_topk``'s blocks as index lists for ``BlockMask.from_indices``: (indices (B, N, n, k)
    int32, counts (B, N, n) int32), k = min(keep, n) + 2 (the top key blocks, then the diagonal
    block and the first block; repeats are harmless). Each row's counted entries are its visible
    ones, so the lists list exactly ``block_topk``'s map. The pooled scores are computed ``chunk``
    query blocks at a time (``lax.map``: (B, N, chunk, n) scores each), so memory is linear in n
    for a fixed chunk: a 1M-token map never holds (n, n) scores. ``implementation``: as the
    attention's; where the kernels run (the GPU's default, "interpret") each chunk's top blocks
    are chosen by a Pallas kernel without sorting (``_top_visible``), else by ``lax.top_k``."""
    B, T, N, D = query.shape
    n = _blocks_of(T, block)
    keep = min(_checks.integer(keep, "keep", minimum=1), n)
    chunk = min(_checks.integer(chunk, "chunk", minimum=1), n)
    scale = D ** -0.5 if scale is None else scale
    lowering = backends.resolve(implementation)
    if positions is not None:
        positions = jnp.asarray(positions, jnp.int32)
        if positions.ndim != 2 or positions.shape[1] != T:
            raise ArgumentError(f"positions must be (B, {T}), got shape {tuple(positions.shape)}")
    pq, pk = _pooled_pair(query, key, block)
    chunks = -(-n // chunk)
    pq = jnp.pad(pq, ((0, 0), (0, 0), (0, chunks * chunk - n), (0, 0)))
    pq = jnp.moveaxis(pq.reshape(B, N, chunks, chunk, D), 2, 0)  # (chunks, B, N, chunk, D)
    kj = jnp.arange(n)[None, :]

    def top_of(args):
        first, q_chunk = args
        qi = jnp.minimum(first + jnp.arange(chunk), n - 1)[:, None]  # padded rows: the last block's
        scores = jnp.einsum("bnid,bnjd->bnij", q_chunk, pk) * scale
        visible = _visible_entries(jnp.broadcast_to(kj, (chunk, n))[None, None], qi, T, block, positions)
        return _top_visible(scores, visible, keep, lowering)  # (B, N, chunk, keep) each

    top, filled = (jnp.moveaxis(x, 0, 2).reshape(B, N, chunks * chunk, keep)[:, :, :n]
                     for x in jax.lax.map(top_of, (jnp.arange(chunks) * chunk, pq)))
    qi = jnp.arange(n)[:, None]
    fixed = jnp.broadcast_to(jnp.concatenate([qi, jnp.zeros_like(qi)], axis=1), (B, N, n, 2))
    indices = jnp.concatenate([top, fixed], axis=-1)
    used = jnp.broadcast_to(_visible_entries(indices, qi, T, block, positions), indices.shape)
    used = used & jnp.concatenate([filled, jnp.ones(fixed.shape, bool)], axis=-1)
    return _counted_first(indices, used)


def with_text_blocks(indices, counts, visual_mask, *, block: int = 128, max_text_blocks: int, positions=None):
    """MMInference's 2D-boundary on index lists: every query block also lists the key blocks that
    hold a text token (``visual_mask`` (B, T) False), as ``with_boundaries(..., rows=False)`` does
    on a dense map. ``indices`` (B or 1, N or 1, n, L), ``counts`` (B or 1, N or 1, n): lists for
    ``BlockMask.from_indices``. Returns (indices (B, N or 1, n, L + max_text_blocks), counts), each
    row's counted entries its own and the causally visible text blocks (``causal_blocks``' rule,
    by ``positions`` (B, T) when given). ``max_text_blocks``: static, at least the number of text
    key blocks of any example (checked when concrete). The Q-boundary (text query rows see every
    earlier block) is not offered here: it would make those rows' lists n wide."""
    visual_mask = jnp.asarray(visual_mask)
    if visual_mask.ndim != 2 or visual_mask.dtype != jnp.bool_:
        raise ArgumentError(f"visual_mask must be a boolean (B, T) array, got {visual_mask.dtype} {visual_mask.shape}")
    B, T = visual_mask.shape
    n = _blocks_of(T, block)
    m = _checks.integer(max_text_blocks, "max_text_blocks", minimum=0)
    indices, counts = jnp.asarray(indices), jnp.asarray(counts)
    if indices.ndim != 4 or indices.shape[2] != n or indices.shape[0] not in (1, B):
        raise ArgumentError(f"indices must be (B or 1, N or 1, {n}, L) for T={T} and block={block}, got shape "
                            f"{tuple(indices.shape)}")
    if tuple(counts.shape) != tuple(indices.shape[:3]):
        raise ArgumentError(f"counts must be {tuple(indices.shape[:3])} (indices without its last axis), got "
                            f"{tuple(counts.shape)}")
    text = jnp.pad(~visual_mask, ((0, 0), (0, n * block - T))).reshape(B, n, block).any(-1)  # (B, n)
    try:
        most = int(np.asarray(text.sum(1)).max())
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        most = None  # under jit: the caller vouches (text blocks past max_text_blocks are then left out)
    if most is not None and most > m:
        raise ArgumentError(f"max_text_blocks must be at least the text key blocks of an example, {most}, got {m}")
    if positions is not None:
        positions = jnp.asarray(positions, jnp.int32)
        if positions.shape != (B, T):
            raise ArgumentError(f"positions must be ({B}, {T}), got shape {tuple(positions.shape)}")
    text_ids = jax.vmap(lambda t: jnp.nonzero(t, size=m, fill_value=n)[0])(text).astype(jnp.int32)  # (B, m)
    nm, L = indices.shape[1], indices.shape[-1]
    extra = jnp.broadcast_to(text_ids[:, None, None, :], (B, nm, n, m))
    indices = jnp.concatenate([jnp.broadcast_to(indices, (B, nm, n, L)).astype(jnp.int32), extra], axis=-1)
    qi = jnp.arange(n)[:, None]
    own = jnp.arange(L) < jnp.broadcast_to(counts, (B, nm, n))[..., None]
    seen = (extra < n) & _visible_entries(extra, qi, T, block, positions)
    return _counted_first(indices, jnp.concatenate([own, jnp.broadcast_to(seen, extra.shape)], axis=-1))


def with_boundaries(blocks, visual_mask, *, block: int = 128, rows: bool = True, columns: bool = True,
                    positions=None) -> jax.Array:
    """MMInference's modality boundaries on a block map (B or 1, N or 1, n, n) of one sequence whose
    visual tokens ``visual_mask`` (B, T) marks: ``rows`` (Q-boundary) keeps every earlier block for
    the query blocks that hold a text token (text rows keep their attention to the whole video);
    ``columns`` (2D-boundary) keeps the key blocks that hold a text token for every query block.
    Returns (B, N or 1, n, n) bool, within ``causal_blocks`` (by ``positions`` (B, T) when given:
    the rows of a permuted order, whose ``visual_mask`` is then in that order too)."""
    visual_mask = jnp.asarray(visual_mask)
    if visual_mask.ndim != 2 or visual_mask.dtype != jnp.bool_:
        raise ArgumentError(f"visual_mask must be a boolean (B, T) array, got {visual_mask.dtype} {visual_mask.shape}")
    B, T = visual_mask.shape
    n = _blocks_of(T, block)
    if blocks.shape[-2:] != (n, n):
        raise ArgumentError(f"blocks must end in ({n}, {n}) for T={T} and block={block}, got {tuple(blocks.shape)}")
    text = jnp.pad(~visual_mask, ((0, 0), (0, n * block - T))).reshape(B, n, block).any(-1)  # (B, n)
    out = jnp.asarray(blocks, bool)
    if rows:
        out = out | text[:, None, :, None]
    if columns:
        out = out | text[:, None, None, :]
    return out & causal_blocks(T, block, positions)


def video_permutation(visual_mask, frames: int, tokens_per_frame: int) -> jax.Array:
    """(B, T) int32 ``perm``: the order in which ``x[b, perm[b]]`` holds the sequence with each
    example's visual tokens position-major (spatial position p of frames 0..F-1, then p + 1, ...),
    in the slots the visual tokens held; text tokens stay where they are. ``visual_mask`` (B, T)
    bool marks frames x tokens_per_frame visual tokens per example, frame-major as VLMs lay them."""
    visual_mask = jnp.asarray(visual_mask)
    F, P = (_checks.integer(frames, "frames", minimum=1), _checks.integer(tokens_per_frame, "tokens_per_frame",
                                                                          minimum=1))
    try:
        counts = np.asarray(visual_mask.sum(1))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        counts = None  # under jit: the caller vouches
    if counts is not None and np.any(counts != F * P):
        raise ArgumentError(f"visual_mask must mark frames * tokens_per_frame = {F * P} tokens per example, got "
                            f"{counts.tolist()}")
    B, T = visual_mask.shape
    slots = jnp.argsort(~visual_mask, axis=1, stable=True)[:, :F * P]  # the visual tokens' positions, in order
    rank = jnp.arange(F * P)
    position_major = (rank % F) * P + rank // F  # frame-major index of the r-th token in position-major order
    perm = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return perm.at[jnp.arange(B)[:, None], slots].set(slots[:, position_major].astype(jnp.int32))


def permuted_attention(query, key, value, perm, blocks, *, block: int = 128, implementation=None,
                       return_lse: bool = False):
    """Causal block-sparse self-attention computed in the order ``perm`` (B, T) (rows
    ``x[b, perm[b]]``), with the original order's causality, the output back in the original
    order. ``blocks``: the map in the permuted order, a bool (B or 1, N or 1, n, n) map or index
    lists ``(indices, counts)`` as ``BlockMask.from_indices`` takes them (``block_topk_indices``,
    ``with_text_blocks``: memory linear in n). Shapes as ``block_sparse_attention`` (query
    (B, T, N, D), key/value (B, T, K, D))."""
    perm = jnp.asarray(perm, jnp.int32)
    take = lambda x: jnp.take_along_axis(x, perm[:, :, None, None], axis=1)  # noqa: E731
    T = query.shape[1]
    if isinstance(blocks, (tuple, list)):
        mask = BlockMask.from_indices(*blocks, block, seq_lens=(T, T), positions=(perm, perm))
    else:
        mask = BlockMask.from_dense(blocks, block, seq_lens=(T, T), positions=(perm, perm))
    out, lse = block_sparse_attention(take(query), take(key), take(value), mask, is_causal=True,
                                      implementation=implementation, return_lse=True)
    inverse = jnp.argsort(perm, axis=1)
    out = jnp.take_along_axis(out, inverse[:, :, None, None], axis=1)
    lse = jnp.take_along_axis(lse, inverse[:, :, None], axis=1)
    return (out, lse) if return_lse else out


def recall(query, key, value, block_mask: BlockMask, *, implementation=None, perm=None) -> jax.Array:
    """(B, T, N) float32: the share of each query's causal softmax mass that the map's keys carry,
    exp(LSE over the map - LSE over all earlier keys), exactly (1 for a dense map), from the
    kernels' log-sum-exps: memory linear in T. ``perm``: the map is in that order
    (``permuted_attention``); ``block_mask`` then carries the positions."""
    from mmfa_jax.attention import attention

    _, dense = attention(query, key, value, is_causal=True, implementation=implementation, return_lse=True)
    if perm is not None:
        take = lambda x: jnp.take_along_axis(x, jnp.asarray(perm)[:, :, None, None], axis=1)  # noqa: E731
        query, key, value = take(query), take(key), take(value)
    _, sparse = block_sparse_attention(query, key, value, block_mask, is_causal=True, implementation=implementation,
                                       return_lse=True)
    if perm is not None:
        sparse = jnp.take_along_axis(sparse, jnp.argsort(jnp.asarray(perm), axis=1)[:, :, None], axis=1)
    return jnp.where(jnp.isneginf(dense), 1.0, jnp.exp(sparse - dense))


__all__ = ["a_shape", "block_topk", "block_topk_indices", "causal_blocks", "permuted_attention", "recall",
           "vertical_slash", "video_permutation", "with_boundaries", "with_text_blocks"]
