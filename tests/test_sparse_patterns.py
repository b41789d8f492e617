"""mmfa_jax.sparse_patterns: the patterns' block maps against NumPy re-derivations, the video
permutation, permuted attention and recall against the float64 reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, normal, tolerance
from reference import attention_reference, block_sparse_mask

import mmfa_jax
from mmfa_jax import BlockMask, sparse_patterns as sp
from mmfa_jax._checks import ArgumentError


def _qk(rng, B=1, T=200, N=4, K=2, D=16):
    (q, q64), (k, k64), (v, v64) = (normal(rng, (B, T, n, D)) for n in (N, K, K))
    return (q, k, v), (q64, k64, v64)


def test_a_shape():
    blocks = np.asarray(sp.a_shape(300, block=32, sink_blocks=2, local_blocks=3))[0, 0]
    n = 10
    i, j = np.indices((n, n))
    assert np.array_equal(blocks, (j <= i) & ((j < 2) | (i - j < 3)))


def _vertical_slash_numpy(q, k, vertical, slash, last_q, block):
    B, T, N, D = q.shape
    G = N // k.shape[2]
    n = -(-T // block)
    out = np.zeros((B, N, n, n), bool)
    rows = np.arange(T - last_q, T)
    for b in range(B):
        for h in range(N):
            s = q[b, T - last_q:, h] @ k[b, :, h // G].T / np.sqrt(D)
            s = np.where(np.arange(T)[None] <= rows[:, None], s, -np.inf)
            p = np.exp(s - s.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            columns = np.argsort(-p.sum(0), kind="stable")[:vertical]
            diag = np.zeros(T)
            for r, t in enumerate(rows):
                diag[t - np.arange(t + 1)] += p[r, : t + 1]
            offsets = np.argsort(-diag, kind="stable")[:slash]
            i, j = np.indices((n, n))
            keep = np.isin(j, columns // block) | (j == 0) | (i == j)
            for d in offsets:
                keep |= (i - j == d // block) | (i - j == -(-d // block))
            out[b, h] = keep & (j <= i)
    return out


def test_vertical_slash_matches_numpy(rng):
    (q, k, _), (q64, k64, _) = _qk(rng, B=2, T=400)
    got = np.asarray(sp.vertical_slash(q, k, vertical=3, slash=2, last_q=16, block=32))
    want = _vertical_slash_numpy(q64, k64, 3, 2, 16, 32)
    assert got.shape == want.shape == (2, 4, 13, 13)
    assert np.array_equal(got, want)
    # at most 4 of 13 block columns and 5 of 13 block diagonals: never the whole triangle
    assert 0 < got.sum() < np.tril(np.ones((13, 13))).sum() * 8, "neither empty nor dense"


def test_vertical_slash_finds_a_planted_column(rng):
    """A key every query loves (aligned with all queries) lands in the kept columns."""
    (q, k, _), _ = _qk(rng, T=256, N=2, K=1)
    direction = rng.standard_normal(16)
    q = q + jnp.asarray(2.0 * direction)[None, None, None]
    k = k.at[:, 77, 0].set(jnp.asarray(6.0 * direction))
    blocks = np.asarray(sp.vertical_slash(q, k, vertical=1, slash=1, last_q=16, block=32))
    assert blocks[0, :, 77 // 32 + 1:, 77 // 32].all(), "the planted column's block is kept below it"


def test_block_topk_matches_numpy(rng):
    (q, k, _), (q64, k64, _) = _qk(rng, T=150)
    block, keep = 32, 2
    got = np.asarray(sp.block_topk(q, k, keep=keep, block=block))
    n = 5
    pad = lambda x: np.concatenate([x, np.full((x.shape[0], n * block - x.shape[1], *x.shape[2:]), np.nan)], 1)  # noqa
    pq, pk = (np.nanmean(pad(x).reshape(1, n, block, *x.shape[2:]), axis=2) for x in (q64, np.repeat(k64, 2, 2)))
    i, j = np.indices((n, n))
    for h in range(4):
        scores = np.where(j <= i, pq[0, :, h] @ pk[0, :, h].T, -np.inf)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
        want = np.zeros((n, n), bool)
        want[i[:, :keep], top] = True
        want = (want | (i == j) | (j == 0)) & (j <= i)
        assert np.array_equal(got[0, h], want), h


def test_with_boundaries():
    T, block = 128, 32
    visual = np.ones((1, T), bool)
    visual[0, 40:50] = False  # text inside block 1
    blocks = np.asarray(sp.with_boundaries(sp.a_shape(T, block=block, sink_blocks=0, local_blocks=1), visual,
                                           block=block))[0, 0]
    i, j = np.indices((4, 4))
    want = ((i == j) | (i == 1) | (j == 1)) & (j <= i)
    assert np.array_equal(blocks, want)
    with pytest.raises(ArgumentError, match="visual_mask"):
        sp.with_boundaries(blocks[None, None], visual.astype(np.int32), block=block)


def test_video_permutation():
    F, P, text = 3, 4, 5
    visual = np.zeros((2, text + F * P + 2), bool)
    visual[0, text:text + F * P] = True
    visual[1, 1:1 + F * P] = True
    perm = np.asarray(sp.video_permutation(visual, F, P))
    for b in range(2):
        assert sorted(perm[b]) == list(range(visual.shape[1]))
        slots = np.flatnonzero(visual[b])
        assert np.array_equal(perm[b, ~visual[b]], np.flatnonzero(~visual[b])), "text stays"
        frame, place = (perm[b, slots] - slots[0]) // P, (perm[b, slots] - slots[0]) % P
        assert np.array_equal(place, np.repeat(np.arange(P), F)) and np.array_equal(frame, np.tile(np.arange(F), P))
    with pytest.raises(ArgumentError, match="frames \\* tokens_per_frame"):
        sp.video_permutation(visual, F, P + 1)


def test_permuted_attention_matches_reference(impl, rng):
    """Attention in the position-major order with the original causality, put back: equals the
    reference with the map carried back to the original order."""
    F, P, text, block = 4, 16, 24, 32
    T = text + F * P + 8
    visual = np.zeros((1, T), bool)
    visual[0, text:text + F * P] = True
    (q, k, v), (q64, k64, v64) = _qk(rng, T=T)
    perm = np.asarray(sp.video_permutation(visual, F, P))
    blocks = np.asarray(sp.a_shape(T, block=block, sink_blocks=1, local_blocks=1))
    out = sp.permuted_attention(q, k, v, perm, blocks, block=block, implementation=impl)
    inverse = np.argsort(perm[0])
    in_perm = block_sparse_mask(blocks, block, T, T)[0, 0]
    mask = in_perm[inverse][:, inverse] & np.tril(np.ones((T, T), bool))
    ref, _ = attention_reference(q64, k64, v64, mask=mask[None, None])
    assert_close(out, ref, tolerance("float32"), "out")


def test_recall(impl, rng):
    """exp(LSE_sparse - LSE_dense) equals the kept share of each row's softmax mass; 1 for a map
    of every block."""
    T, block = 130, 32
    (q, k, v), (q64, k64, v64) = _qk(rng, T=T)
    blocks = np.asarray(sp.a_shape(T, block=block, sink_blocks=1, local_blocks=1))
    mask = BlockMask.from_dense(blocks, block, seq_lens=(T, T))
    got = sp.recall(q, k, v, mask, implementation=impl)
    causal = np.tril(np.ones((T, T), bool))
    s = np.einsum("bqnd,bknd->bnqk", q64, np.repeat(k64, 2, 2)) / 4.0
    s = np.where(causal, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.swapaxes((p * block_sparse_mask(blocks, block, T, T)).sum(-1), 1, 2)
    assert_close(got, want, 1e-5, "recall")
    assert 0.05 < float(np.min(want)) < 0.999, "a real partial recall"
    full = BlockMask.from_dense(np.ones((1, 1, 5, 5), bool), block, seq_lens=(T, T))
    assert_close(sp.recall(q, k, v, full, implementation=impl), np.ones((1, T, 4)), 1e-5, "dense recall")
    assert mmfa_jax.sparse_patterns is sp


def test_patterns_in_a_permuted_order_keep_earlier_keys_right_of_the_diagonal(rng):
    """In a permuted order a block right of the diagonal can hold keys earlier in time: the
    patterns' causal filter (by positions) keeps exactly the blocks with some visible pair."""
    F, P, text, block = 4, 16, 8, 16
    T = text + F * P
    visual = np.zeros((1, T), bool)
    visual[0, :F * P] = True
    perm = np.asarray(sp.video_permutation(visual, F, P))
    n = -(-T // block)
    visible = np.asarray(sp.causal_blocks(T, block, perm))[0, 0]
    pos = np.concatenate([perm[0], np.full(n * block - T, -1)]).reshape(n, block)
    want = np.array([[(pos[j][pos[j] >= 0].min() <= pos[i].max()) for j in range(n)] for i in range(n)])
    assert np.array_equal(visible, want) and (np.triu(visible, 1)).any(), "blocks right of the diagonal"
    (q, k, _), _ = _qk(rng, T=T)
    qp, kp = (jnp.take_along_axis(x, jnp.asarray(perm)[:, :, None, None], axis=1) for x in (q, k))
    everything = np.asarray(sp.block_topk(qp, kp, keep=n, block=block, positions=perm))
    assert np.array_equal(everything[0, 0], visible), "keep = n keeps every visible block"
    boundaries = np.asarray(sp.with_boundaries(np.zeros((1, 1, n, n), bool), visual[:, perm[0]], block=block,
                                               positions=perm))[0, 0]
    assert boundaries[-1].sum() == visible[-1].sum(), "the text rows see every visible block"


# ------------------------------------------------------------------------------------------------
# Index-list routes: the same blocks as the dense maps, as lists for BlockMask.from_indices.


@pytest.mark.parametrize("scores", ["random", "tied"])
@pytest.mark.parametrize("by_positions", [False, True], ids=["index-order", "positions"])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_block_topk_indices_list_block_topks_map(rng, chunk, by_positions, scores, impl):
    """Ragged T (7 blocks of 32, the last 14 rows), GQA, a chunk that does not divide the blocks,
    rows with fewer visible blocks than the budget, and scores all tied (a constant key: ties go
    to the lower block, as lax.top_k's): the lists, read by from_indices, give exactly
    block_topk's map; counted entries come first. On each implementation: with the kernels, the
    top blocks come from the Pallas selection."""
    T, block, keep = 206, 32, 3
    (q, k, _), _ = _qk(rng, T=T)
    if scores == "tied":
        k = jnp.ones_like(k)
    perm = np.stack([rng.permutation(T)]).astype(np.int32) if by_positions else None
    if by_positions:
        q, k = (jnp.take_along_axis(x, jnp.asarray(perm)[:, :, None, None], axis=1) for x in (q, k))
    want = np.asarray(sp.block_topk(q, k, keep=keep, block=block, positions=perm))
    indices, counts = sp.block_topk_indices(q, k, keep=keep, block=block, positions=perm, chunk=chunk,
                                            implementation=impl)
    n = -(-T // block)
    assert indices.shape == (1, 4, n, keep + 2) and counts.shape == (1, 4, n) and indices.dtype == jnp.int32
    mask = BlockMask.from_indices(indices, counts, block, seq_lens=(T, T))
    np.testing.assert_array_equal(np.asarray(mask.blocks), want)


def test_with_text_blocks_on_lists_is_the_2d_boundary(rng):
    """Text key blocks added to top-k lists give with_boundaries(rows=False) of the dense map, per
    example (two examples, text in different blocks); too small a max_text_blocks is refused."""
    T, block = 200, 32
    (q, k, _), _ = _qk(rng, T=T, B=2)
    visual = np.ones((2, T), bool)
    visual[0, 40:45] = False  # block 1
    visual[0, 190:] = False  # blocks 5 and 6 (the ragged last one)
    visual[1, 100:130] = False  # blocks 3 and 4
    dense = sp.with_boundaries(sp.block_topk(q, k, keep=1, block=block), visual, block=block, rows=False)
    indices, counts = sp.block_topk_indices(q, k, keep=1, block=block, chunk=2)
    lists = sp.with_text_blocks(indices, counts, visual, block=block, max_text_blocks=3)
    assert lists[0].shape == (2, 4, 7, 3 + 3)
    mask = BlockMask.from_indices(*lists, block, seq_lens=(T, T))
    np.testing.assert_array_equal(np.asarray(mask.blocks), np.asarray(dense))
    with pytest.raises(ArgumentError, match="max_text_blocks must be at least .* 3, got 2"):
        sp.with_text_blocks(indices, counts, visual, block=block, max_text_blocks=2)
    # In a permuted order, causal by the positions (the visual mask in that order too).
    perm = np.stack([rng.permutation(T) for _ in range(2)]).astype(np.int32)
    q, k = (jnp.take_along_axis(x, jnp.asarray(perm)[:, :, None, None], axis=1) for x in (q, k))
    visual = np.take_along_axis(visual, perm, axis=1)
    dense = sp.with_boundaries(sp.block_topk(q, k, keep=1, block=block, positions=perm), visual, block=block,
                               rows=False, positions=perm)
    indices, counts = sp.block_topk_indices(q, k, keep=1, block=block, chunk=4, positions=perm)
    lists = sp.with_text_blocks(indices, counts, visual, block=block, max_text_blocks=7, positions=perm)
    mask = BlockMask.from_indices(*lists, block, seq_lens=(T, T))
    np.testing.assert_array_equal(np.asarray(mask.blocks), np.asarray(dense))


def test_block_topk_indices_never_holds_the_block_scores():
    """4096 query and key blocks in chunks of 64: no array of the estimation and the lists has both
    a query-block and a key-block axis (the jaxpr's shapes, inside lax.map's body too)."""
    import jax

    T, block, n = 4096 * 16, 16, 4096
    q = jax.ShapeDtypeStruct((1, T, 2, 16), jnp.float32)
    k = jax.ShapeDtypeStruct((1, T, 1, 16), jnp.float32)
    visual = jax.ShapeDtypeStruct((1, T), jnp.bool_)

    def lists(q, k, visual):
        indices, counts = sp.block_topk_indices(q, k, keep=4, block=block, chunk=64)
        return sp.with_text_blocks(indices, counts, visual, block=block, max_text_blocks=2)

    def shapes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):  # a (closed) jaxpr: a jitted or mapped body
                        yield from shapes(inner)

    seen = list(shapes(jax.make_jaxpr(lists)(q, k, visual).jaxpr))
    assert (1, 2, 64, n) in seen, "the chunk's scores are there"
    for shape in seen:
        assert sum(d >= n for d in shape) < 2, shape
    out = jax.eval_shape(lists, q, k, visual)
    assert out[0].shape == (1, 2, n, 4 + 2 + 2) and out[1].shape == (1, 2, n)


def test_block_topk_indices_selection_compiles_for_hopper(tmp_path, monkeypatch):
    """The lists of a 1M-token video (8,192 key blocks of 128) with the top blocks chosen by the
    Pallas selection: lowered for an abstract H100 and compiled to an sm_90 cubin by the official
    Triton (no GPU needed), one program per (head, query block) of a chunk, within shared memory."""
    pytest.importorskip("triton")
    import jax

    from mmfa_jax import triton_route

    monkeypatch.setenv("MMFA_CACHE_DIR", str(tmp_path))
    triton_route.clear_memory_cache()
    T, block, N, chunk = 8192 * 128, 128, 4, 256
    q = jax.ShapeDtypeStruct((1, T, N, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, T, 1, 128), jnp.bfloat16)
    compiled = triton_route.lower_for(
        lambda q, k: sp.block_topk_indices(q, k, keep=256, block=block, chunk=chunk, implementation="triton"), q, k,
        device_kind="NVIDIA H100")
    assert [kernel.name for kernel, *_ in compiled] == ["mmfa_select"]
    kernel, _, grid, _, _ = compiled[0]
    assert grid == (N * chunk, 1, 1) and kernel.cc == 90 and len(kernel.cubin) > 0
    assert kernel.shared <= triton_route.SHARED_MEMORY_PER_BLOCK[90]
