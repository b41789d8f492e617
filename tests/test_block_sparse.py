"""mmfa_jax.block_sparse_attention and mmfa_jax.BlockMask against the float64 reference.

Every test taking ``impl`` runs on "interpret" (the block-sparse Pallas kernels, interpreted) and
"xla" (the dense mask of the map), and on "pallas" with --gpu. Maps are random (densities ~10% and
~50%, with query blocks that list no key block), lengths need not be multiples of the blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, normal, tolerance
from reference import (attention_reference, attention_reference_grads, block_sparse_mask, block_sparse_reference,
                       block_sparse_reference_grads)

import mmfa_jax
from mmfa_jax import ArgumentError, ArgumentTypeError, BlockMask, compiles, kernels, tuning


@dataclasses.dataclass(frozen=True)
class Case:
    B: int = 2
    T: int = 200
    S: int = 200
    N: int = 8
    K: int = 2
    D: int = 32
    block: tuple = (64, 64)
    density: float = 0.5
    causal: bool = False
    dtype: str = "float32"
    map_bn: tuple = ("B", "N")  # which of the map's batch and head axes are kept ("B"/"N") or broadcast (1)


FORWARD_CASES = {
    "gqa-ragged-50": Case(),
    "gqa-ragged-50-causal": Case(causal=True),
    "rect-mha-10": Case(B=1, T=96, S=160, N=4, K=4, D=16, block=(32, 64), density=0.1, map_bn=(1, "N")),
    "rect-causal-bf16": Case(T=96, S=160, N=4, K=2, D=16, block=(64, 32), causal=True, dtype="bfloat16",
                             map_bn=("B", 1)),
    "mqa-16-blocks-10-causal": Case(T=128, S=128, N=4, K=1, D=32, block=(16, 16), density=0.1, causal=True,
                                    map_bn=(1, 1)),
    "t-over-s-padded-head-causal": Case(B=1, T=200, S=72, N=2, K=1, D=24, block=(32, 32), causal=True),
}

GRAD_CASES = {
    "gqa-ragged-50-causal": Case(causal=True),
    "rect-bf16-broadcast": Case(B=1, T=96, S=160, N=4, K=2, D=16, block=(32, 64), dtype="bfloat16", map_bn=(1, 1)),
    "mha-padded-head-10-causal": Case(B=1, T=130, S=130, N=2, K=2, D=24, block=(32, 32), density=0.1, causal=True,
                                      map_bn=(1, "N")),
}


def grid(c: Case):
    return -(-c.T // c.block[0]), -(-c.S // c.block[1])


def random_map(rng, c: Case):
    """A random boolean block map of the case's density and kept axes, with query block 1 of the
    first (batch, head) listing nothing and the ragged corner block listed."""
    nq, nk = grid(c)
    bm = c.B if c.map_bn[0] == "B" else 1
    nm = c.N if c.map_bn[1] == "N" else 1
    blocks = rng.random((bm, nm, nq, nk)) < c.density
    blocks[..., -1, -1] = True
    if nq > 1:
        blocks[0, 0, 1, :] = False
    return blocks


def inputs(rng, c: Case):
    q, q64 = normal(rng, (c.B, c.T, c.N, c.D), c.dtype)
    k, k64 = normal(rng, (c.B, c.S, c.K, c.D), c.dtype)
    v, v64 = normal(rng, (c.B, c.S, c.K, c.D), c.dtype)
    return (q, k, v), (q64, k64, v64)


def sparse(c: Case, impl, blocks, *, lse=True):
    mask = BlockMask.from_dense(jnp.asarray(blocks), c.block, seq_lens=(c.T, c.S))
    return lambda q, k, v: mmfa_jax.block_sparse_attention(q, k, v, mask, is_causal=c.causal, implementation=impl,
                                                           return_lse=lse)


@pytest.mark.parametrize("name", list(FORWARD_CASES))
def test_forward_matches_reference(impl, rng, name):
    c = FORWARD_CASES[name]
    blocks = random_map(rng, c)
    (q, k, v), (q64, k64, v64) = inputs(rng, c)
    out, lse = sparse(c, impl, blocks)(q, k, v)
    ref_out, ref_lse = block_sparse_reference(q64, k64, v64, blocks, c.block, is_causal=c.causal)
    assert out.dtype == q.dtype and lse.shape == (c.B, c.T, c.N) and lse.dtype == jnp.float32
    assert np.isinf(ref_lse).any(), "the case has rows that see nothing"
    assert_close(out, ref_out, tolerance(c.dtype), f"{name}: out")
    assert_close(lse, ref_lse, tolerance(c.dtype), f"{name}: lse")
    assert not np.any(np.asarray(out.astype(jnp.float32))[np.isinf(ref_lse)]), "rows that see nothing are not zero"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_a_map_of_all_blocks_is_dense_attention(impl, rng, causal):
    c = Case(B=2, T=100, S=100, N=4, K=2, D=32, block=(32, 32), causal=causal)
    blocks = np.ones((1, 1, *grid(c)), bool)
    (q, k, v), (q64, k64, v64) = inputs(rng, c)
    out, lse = sparse(c, impl, blocks)(q, k, v)
    dense_out, dense_lse = mmfa_jax.attention(q, k, v, is_causal=causal, implementation=impl, return_lse=True)
    tol = tolerance(c.dtype)
    assert_close(out, mmfa_jax_ref(dense_out), tol, "out against mmfa_jax.attention")
    assert_close(lse, mmfa_jax_ref(dense_lse), tol, "lse against mmfa_jax.attention")
    ref_out, ref_lse = block_sparse_reference(q64, k64, v64, blocks, c.block, is_causal=causal)
    assert_close(out, ref_out, tol, "out")
    assert_close(lse, ref_lse, tol, "lse")


def mmfa_jax_ref(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_match_reference(impl, rng, name):
    c = GRAD_CASES[name]
    blocks = random_map(rng, c)
    (q, k, v), (q64, k64, v64) = inputs(rng, c)
    (out, lse), vjp = jax.vjp(sparse(c, impl, blocks), q, k, v)
    d_out, d_out64 = normal(rng, out.shape, c.dtype)
    d_lse, d_lse64 = normal(rng, lse.shape, "float32")
    dq, dk, dv = vjp((d_out, d_lse))
    refs = block_sparse_reference_grads(q64, k64, v64, blocks, c.block, d_out64, d_lse64, is_causal=c.causal)
    for got, ref, what in zip((dq, dk, dv), refs, ("dq", "dk", "dv")):
        assert got.dtype == q.dtype
        assert_close(got, ref, tolerance(c.dtype, grad=True), f"{name}: {what}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_tiles_smaller_than_the_blocks(rng, monkeypatch, causal):
    """The backward's tiles may be smaller than the map's blocks (the dense kernels' tuned tiles):
    each program takes one tile of its block and walks the tiles of each listed block. Ragged
    lengths (the last block's last tiles lie wholly past the sequence), GQA, an empty query block."""
    padded_d = 32
    table = tuning.TABLE[("any", padded_d)]
    monkeypatch.setitem(tuning.TABLE, ("any", padded_d), dataclasses.replace(
        table, backward_dq=tuning.KernelConfig(16, 32, 4, 2), backward_dkv=tuning.KernelConfig(32, 16, 4, 2)))
    c = Case(B=1, T=150, S=140, N=4, K=2, D=32, block=(64, 64), density=0.6, causal=causal)
    blocks = random_map(rng, c)
    (q, k, v), (q64, k64, v64) = inputs(rng, c)
    (out, lse), vjp = jax.vjp(sparse(c, "interpret", blocks), q, k, v)
    d_out, d_out64 = normal(rng, out.shape, c.dtype)
    d_lse, d_lse64 = normal(rng, lse.shape, "float32")
    refs = block_sparse_reference_grads(q64, k64, v64, blocks, c.block, d_out64, d_lse64, is_causal=c.causal)
    for got, ref, what in zip(vjp((d_out, d_lse)), refs, ("dq", "dk", "dv")):
        assert_close(got, ref, tolerance(c.dtype, grad=True), what)


def _check_causal_by_positions(mask, blocks, perm, c, arrays, arrays64, rng, impl):
    """Causal block-sparse attention with ``mask`` (built with positions ``perm``): out, LSE and
    dq/dk/dv against the reference with the map's token mask and causality by the positions.
    Returns the reference LSE."""
    q, k, v = arrays
    q64, k64, v64 = arrays64

    def f(q, k, v):
        return mmfa_jax.block_sparse_attention(q, k, v, mask, is_causal=True, implementation=impl, return_lse=True)

    (out, lse), vjp = jax.vjp(f, q, k, v)
    token_mask = block_sparse_mask(blocks, c.block, c.T, c.S) & (perm[:, None, None, :] <= perm[:, None, :, None])
    ref_out, ref_lse = attention_reference(q64, k64, v64, mask=token_mask)
    assert_close(out, ref_out, tolerance(c.dtype), "out")
    assert_close(lse, ref_lse, tolerance(c.dtype), "lse")
    d_out, d_out64 = normal(rng, out.shape, c.dtype)
    d_lse, d_lse64 = normal(rng, lse.shape, "float32")
    refs = attention_reference_grads(q64, k64, v64, d_out64, d_lse64, mask=token_mask)[:3]
    for got, ref, what in zip(vjp((d_out, d_lse)), refs, ("dq", "dk", "dv")):
        assert_close(got, ref, tolerance(c.dtype, grad=True), what)
    return ref_lse


def test_causal_by_positions_in_a_permuted_order(impl, rng):
    """Rows in a permuted order with the causality of the original one: key j visible to query i
    when positions[j] <= positions[i] (and its block is listed), forward and gradients, per-batch
    permutations, GQA, ragged blocks, one empty query block."""
    c = Case(B=2, T=150, S=150, N=4, K=2, D=16, block=(32, 32), density=0.6, causal=True)
    blocks = random_map(rng, c)
    (q, k, v), (q64, k64, v64) = inputs(rng, c)
    perm = np.stack([rng.permutation(c.T) for _ in range(c.B)]).astype(np.int32)
    mask = BlockMask.from_dense(jnp.asarray(blocks), c.block, seq_lens=(c.T, c.S), positions=(perm, perm))

    ref_lse = _check_causal_by_positions(mask, blocks, perm, c, (q, k, v), (q64, k64, v64), rng, impl)
    assert np.isinf(ref_lse).any()
    # Without is_causal the positions play no part.
    plain = mmfa_jax.block_sparse_attention(q, k, v, mask, implementation=impl)
    assert_close(plain, block_sparse_reference(q64, k64, v64, blocks, c.block)[0], tolerance(c.dtype), "plain")


def test_bad_positions_are_refused():
    blocks = jnp.ones((1, 1, 2, 2), bool)
    good = np.arange(64, dtype=np.int32)[None]
    for positions, match in (((good, good[:, :32]), r"positions\[1\] must be \(B, 64\)"),
                             ((good.astype(np.float32), good), r"positions\[0\] must be integers"),
                             (good, "positions must be a pair")):
        with pytest.raises((ArgumentError, ArgumentTypeError), match=match):
            BlockMask.from_dense(blocks, 32, seq_lens=(64, 64), positions=positions)


# ------------------------------------------------------------------------------------------------
# What is read: NaN reaches what sees it, unlisted blocks are never read.


NAN_CASE = Case(B=2, T=96, S=96, N=4, K=2, D=16, block=(32, 32), map_bn=("B", "N"))


def nan_map(rng):
    blocks = random_map(rng, NAN_CASE)
    blocks[..., 2] = False  # key block 2 (keys 64..95): no query block lists it
    blocks[:, :, 1, 0] = True  # query block 1 sees key block 0 in every (batch, head)
    return blocks


def expect_nan(out, lse, ref_out, ref_lse, nan_out, nan_lse, what):
    out, lse = mmfa_jax_ref(out), mmfa_jax_ref(lse)
    np.testing.assert_array_equal(np.isnan(out), nan_out, err_msg=f"{what}: NaN entries of the output")
    np.testing.assert_array_equal(np.isnan(lse), nan_lse, err_msg=f"{what}: NaN entries of the LSE")
    assert_close(np.where(nan_out, ref_out, out), ref_out, tolerance("float32"), f"{what}: the output elsewhere")
    assert_close(np.where(nan_lse, ref_lse, lse), ref_lse, tolerance("float32"), f"{what}: the LSE elsewhere")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_in_query_or_key_reaches_the_rows_that_see_it(impl, rng, causal):
    """A NaN in q[b, i, n] makes row (b, i) of head n NaN; a NaN in k[b, j, h] every row that sees
    key j (its block listed, and j <= i with is_causal) in the query heads of h's group. The rest
    equals the reference."""
    c = dataclasses.replace(NAN_CASE, causal=causal)
    blocks = nan_map(rng)
    (q, k, v), (q64, k64, v64) = inputs(rng, c)
    run = sparse(c, impl, blocks)
    ref_out, ref_lse = block_sparse_reference(q64, k64, v64, blocks, c.block, is_causal=causal)
    b, i, n, j, h = 1, 40, 3, 5, 0  # query 40 is in query block 1, which sees key block 0 (keys 0..31)
    out, lse = run(q.at[b, i, n, 7].set(jnp.nan), k, v)
    nan_lse = np.zeros(lse.shape, bool)
    nan_lse[b, i, n] = True
    expect_nan(out, lse, ref_out, ref_lse, np.broadcast_to(nan_lse[..., None], out.shape), nan_lse, "NaN in q")

    out, lse = run(q, k.at[b, j, h, 3].set(jnp.nan), v)
    G = c.N // c.K
    sees = np.broadcast_to(block_sparse_mask(blocks, c.block, c.T, c.S)[..., j], (c.B, c.N, c.T)).copy()
    if causal:
        sees &= (np.arange(c.T) >= j)[None, None, :]
    sees[np.arange(c.B) != b] = False
    sees[:, np.arange(c.N) // G != h] = False
    nan_lse = np.swapaxes(sees, 1, 2)
    assert nan_lse[b, i, h * G], "the case puts the NaN where a row sees it"
    expect_nan(out, lse, ref_out, ref_lse, np.broadcast_to(nan_lse[..., None], out.shape), nan_lse, "NaN in k")


def test_unlisted_blocks_are_never_read(impl, rng):
    """NaN and infinities in the keys and values of a key block no query block lists reach
    nothing, forward or backward (the dense XLA path multiplies them by zero probabilities, so it
    is exempt); a NaN in a listed value reaches the rows that see it, in its channel."""
    if impl == "xla":
        pytest.skip("the xla path computes the dense product: 0 * NaN of hidden values is NaN, as in jax.nn")
    c = NAN_CASE
    blocks = nan_map(rng)
    (q, k, v), (q64, k64, v64) = inputs(rng, c)
    run = sparse(c, impl, blocks)
    junk = jnp.asarray(rng.choice(np.array([np.nan, np.inf, -np.inf], np.float32), size=(c.B, 32, c.K, c.D)))
    k_bad, v_bad = k.at[:, 64:].set(junk), v.at[:, 64:].set(junk[:, ::-1])
    (out, lse), vjp = jax.vjp(run, q, k_bad, v_bad)
    ref_out, ref_lse = block_sparse_reference(q64, k64, v64, blocks, c.block)
    assert_close(out, ref_out, tolerance(c.dtype), "out")
    assert_close(lse, ref_lse, tolerance(c.dtype), "lse")
    d_out, d_out64 = normal(rng, out.shape)
    grads = vjp((d_out, jnp.zeros_like(lse)))
    refs = block_sparse_reference_grads(q64, k64, v64, blocks, c.block, d_out64)
    for got, ref, what in zip(grads, refs, ("dq", "dk", "dv")):
        assert_close(got, ref, tolerance(c.dtype, grad=True), what)

    b, j, h, d = 0, 10, 1, 2  # a value in key block 0, listed for query block 1 in every (batch, head)
    out = mmfa_jax_ref(run(q, k, v.at[b, j, h, d].set(jnp.nan))[0])
    sees = np.broadcast_to(block_sparse_mask(blocks, c.block, c.T, c.S)[..., j], (c.B, c.N, c.T))
    G = c.N // c.K
    want = np.zeros(out.shape, bool)
    want[b, :, h * G:(h + 1) * G, d] = np.swapaxes(sees[b, h * G:(h + 1) * G], 0, 1)
    np.testing.assert_array_equal(np.isnan(out), want, err_msg="NaN in a listed value")


# ------------------------------------------------------------------------------------------------
# BlockMask: lists, full and partial blocks, from_indices, pytree and jit.


def brute_force_lists(blocks, block, T, S, causal):
    """Per (batch, head, query block): the sets of wholly visible and partial key blocks, from the
    token-level cells."""
    bq, bk = block
    nq, nk = blocks.shape[-2:]
    full = np.zeros(blocks.shape, bool)
    partial = np.zeros(blocks.shape, bool)
    for qi in range(nq):
        for kj in range(nk):
            i = np.arange(qi * bq, (qi + 1) * bq)[:, None]
            j = np.arange(kj * bk, (kj + 1) * bk)[None, :]
            cells = (i < T) & (j < S) & ((j <= i) if causal else True)
            whole_and_seen = cells.all()
            seen = cells.any()
            full[:, :, qi, kj] = blocks[:, :, qi, kj] & whole_and_seen
            partial[:, :, qi, kj] = blocks[:, :, qi, kj] & seen & ~whole_and_seen
    return full, partial


def check_lists(count, n_full, index, full, partial, what, offset=None):
    """Counts and rows of lists against the brute force's sets: per row its wholly visible blocks
    ascending, then its partial ones. ``offset``: the rows are the compressed transposed lists,
    row r at index[..., offset[r]:offset[r] + count[r]], packed one after the other."""
    count, n_full, index = np.asarray(count), np.asarray(n_full), np.asarray(index)
    n = full.shape[-1]
    np.testing.assert_array_equal(count, (full | partial).sum(-1), err_msg=f"{what}: counts")
    np.testing.assert_array_equal(n_full, full.sum(-1), err_msg=f"{what}: full counts")
    assert ((index >= 0) & (index < n)).all(), f"{what}: padding indices out of range"
    if offset is not None:
        offset = np.asarray(offset)
        np.testing.assert_array_equal(offset, np.cumsum(count, -1) - count, err_msg=f"{what}: packed offsets")
    for pos in np.ndindex(*count.shape):
        c, f = count[pos], n_full[pos]
        row = index[pos] if offset is None else index[pos[:-1]][offset[pos]:offset[pos] + c]
        assert list(row[:f]) == list(np.flatnonzero(full[pos])), f"{what}: full blocks of {pos}"
        assert list(row[f:c]) == list(np.flatnonzero(partial[pos])), f"{what}: partial blocks of {pos}"


def check_same_lists(got: BlockMask, want: BlockMask, what):
    """Two masks hold the same lists (whatever their widths): counts, offsets, and the used
    entries of every row."""
    assert (got.shape, got.block_size, got.seq_lens) == (want.shape, want.block_size, want.seq_lens), what
    for causal in (False, True):
        a, b = got.lists(causal), want.lists(causal)
        for name in ("kv_count", "kv_full", "q_offset", "q_count", "q_full"):
            np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)),
                                          err_msg=f"{what}: {name} (causal={causal})")
        count = np.asarray(a.kv_count)
        used = np.arange(a.kv_index.shape[-1]) < count[..., None]
        wide = np.asarray(b.kv_index)[..., :a.kv_index.shape[-1]]
        np.testing.assert_array_equal(np.where(used, a.kv_index, -1), np.where(used, wide, -1),
                                      err_msg=f"{what}: kv_index (causal={causal})")
        total = count.sum(-1)[..., None]
        used = np.arange(a.q_index.shape[-1]) < total
        wide = np.asarray(b.q_index)[..., :a.q_index.shape[-1]]
        np.testing.assert_array_equal(np.where(used, a.q_index, -1), np.where(used, wide, -1),
                                      err_msg=f"{what}: q_index (causal={causal})")


@pytest.mark.parametrize("T, S, block", [(70, 45, (16, 32)), (64, 64, (16, 16)), (33, 100, (32, 16))])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lists_separate_wholly_visible_from_partial_blocks(rng, T, S, block, causal):
    """Counts and lists of both directions against a brute force over the cells: with is_causal,
    blocks above the diagonal are dropped and blocks crossing it are partial; ragged last blocks are
    partial; wholly visible blocks come first, each part ascending."""
    nq, nk = -(-T // block[0]), -(-S // block[1])
    blocks = rng.random((2, 3, nq, nk)) < 0.6
    mask = BlockMask.from_dense(jnp.asarray(blocks), block, seq_lens=(T, S))
    lists = mask.lists(causal)
    full, partial = brute_force_lists(blocks, block, T, S, causal)
    check_lists(lists.kv_count, lists.kv_full, lists.kv_index, full, partial, "per query block")
    check_lists(lists.q_count, lists.q_full, lists.q_index, np.swapaxes(full, -1, -2), np.swapaxes(partial, -1, -2),
                "per key block", offset=lists.q_offset)
    assert lists.kv_index.shape == (2, 3, nq, nk) and lists.q_index.shape == (2, 3, nq * nk)
    assert int(mask.computed_blocks(causal)) == int((full | partial).sum())


def test_from_indices_equals_from_dense(rng):
    T, S, block = 100, 150, (32, 32)
    nq, nk = 4, 5
    blocks = rng.random((1, 2, nq, nk)) < 0.5
    counts = blocks.sum(-1)
    order = np.argsort(~blocks, axis=-1, kind="stable")  # listed ones first
    for pos in np.ndindex(*counts.shape):  # any order inside a list; junk past the count
        order[pos][:counts[pos]] = rng.permutation(order[pos][:counts[pos]])
        order[pos][counts[pos]:] = rng.integers(-5, 50, nk - counts[pos])
    got = BlockMask.from_indices(jnp.asarray(order), jnp.asarray(counts), block, seq_lens=(T, S))
    want = BlockMask.from_dense(jnp.asarray(blocks), block, seq_lens=(T, S))
    check_same_lists(got, want, "from_indices")
    np.testing.assert_array_equal(np.asarray(got.blocks), blocks)
    assert (got.block_size, got.seq_lens, got.shape) == (block, (T, S), (1, 2, nq, nk))
    # Under jit too (the checks of concrete values are then the caller's).
    built = jax.jit(lambda i, c: BlockMask.from_indices(i, c, block, seq_lens=(T, S)))(jnp.asarray(order),
                                                                                      jnp.asarray(counts))
    np.testing.assert_array_equal(np.asarray(built.blocks), blocks)


def test_block_mask_passes_through_jit(impl, rng):
    c = Case(B=1, T=64, S=96, N=2, K=1, D=16, block=(32, 32), causal=True)
    blocks = random_map(rng, c)
    (q, k, v), (q64, k64, v64) = inputs(rng, c)
    mask = BlockMask.from_dense(jnp.asarray(blocks), c.block, seq_lens=(c.T, c.S))
    leaves, tree = jax.tree_util.tree_flatten(mask)
    assert all(isinstance(x, jax.Array) for x in leaves) and jax.tree_util.tree_unflatten(tree, leaves).block_size

    @jax.jit
    def built_inside(q, k, v, blocks):
        m = BlockMask.from_dense(blocks, c.block, seq_lens=(c.T, c.S))
        return mmfa_jax.block_sparse_attention(q, k, v, m, is_causal=True, implementation=impl)

    passed = jax.jit(lambda q, k, v, m: mmfa_jax.block_sparse_attention(q, k, v, m, is_causal=True,
                                                                        implementation=impl))
    ref_out, _ = block_sparse_reference(q64, k64, v64, blocks, c.block, is_causal=True)
    assert_close(built_inside(q, k, v, jnp.asarray(blocks)), ref_out, tolerance(c.dtype), "map built under jit")
    assert_close(passed(q, k, v, mask), ref_out, tolerance(c.dtype), "mask passed to jit")


def test_warm_calls_compile_nothing(impl, rng):
    """A second call with fresh data and a fresh map of the seen shapes compiles nothing: the
    eager forward and a jitted gradient."""
    c = Case(B=1, T=80, S=80, N=2, K=1, D=16, block=(32, 32), causal=True)

    def call():
        blocks = jnp.asarray(random_map(rng, c))
        (q, k, v), _ = inputs(rng, c)
        mask = BlockMask.from_dense(blocks, c.block, seq_lens=(c.T, c.S))
        out = mmfa_jax.block_sparse_attention(q, k, v, mask, is_causal=True, implementation=impl)
        grads = grad(q, k, v, mask)
        return jax.block_until_ready((out, grads))

    @jax.jit
    def grad(q, k, v, mask):
        f = lambda q, k, v: mmfa_jax.block_sparse_attention(q, k, v, mask, is_causal=True,  # noqa: E731
                                                            implementation=impl).sum()
        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    call()
    with compiles.counted() as seen:
        call()
    assert seen.total == 0, f"a warm call compiled: {seen}"


def test_empty_sequences(impl, rng):
    q, _ = normal(rng, (2, 0, 4, 16))
    k, _ = normal(rng, (2, 40, 2, 16))
    mask = BlockMask.from_dense(jnp.zeros((1, 1, 0, 2), bool), (16, 32), seq_lens=(0, 40))
    out, lse = mmfa_jax.block_sparse_attention(q, k, k, mask, implementation=impl, return_lse=True)
    assert out.shape == (2, 0, 4, 16) and lse.shape == (2, 0, 4)


def test_any_block_size_on_xla(rng):
    """The XLA path takes block sizes the kernels cannot (not powers of two)."""
    c = Case(B=1, T=50, S=70, N=2, K=1, D=16, block=(12, 20), causal=True)
    blocks = random_map(rng, c)
    (q, k, v), (q64, k64, v64) = inputs(rng, c)
    out, lse = sparse(c, "xla", blocks)(q, k, v)
    ref_out, ref_lse = block_sparse_reference(q64, k64, v64, blocks, c.block, is_causal=True)
    assert_close(out, ref_out, tolerance(c.dtype), "out")
    assert_close(lse, ref_lse, tolerance(c.dtype), "lse")


# ------------------------------------------------------------------------------------------------
# Argument errors: the argument and the value named.


def _errors():
    blocks = jnp.ones((1, 1, 4, 4), bool)
    q = jnp.ones((2, 64, 4, 16), jnp.float32)
    k = jnp.ones((2, 64, 2, 16), jnp.float32)
    good = BlockMask.from_dense(blocks, (16, 16), seq_lens=(64, 64))

    def attend(mask=good, query=q, key=k, **kw):
        return lambda: mmfa_jax.block_sparse_attention(query, key, key, mask, **kw)

    def dense(b=blocks, size=(16, 16), lens=(64, 64)):
        return lambda: BlockMask.from_dense(b, size, seq_lens=lens)

    idx, cnt = jnp.zeros((1, 1, 4, 2), jnp.int32), jnp.ones((1, 1, 4), jnp.int32)

    def indices(i=idx, c=cnt):
        return lambda: BlockMask.from_indices(i, c, (16, 16), seq_lens=(64, 64))

    return {
        "blocks-dtype": (dense(b=jnp.ones((1, 1, 4, 4), jnp.int32)), ArgumentTypeError, "blocks must be a boolean"),
        "blocks-shape": (dense(b=jnp.ones((1, 1, 3, 4), bool)), ArgumentError, "(1, 1, 3, 4)"),
        "blocks-rank": (dense(b=jnp.ones((1, 1, 1, 4, 4), bool)), ArgumentError, "blocks must be"),
        "block-size-zero": (dense(size=(0, 16)), ArgumentError, "block_size (block_q) must be positive, got 0"),
        "block-size-float": (dense(size=(16.0, 16)), ArgumentTypeError, "block_size (block_q)"),
        "block-size-triple": (dense(size=(16, 16, 16)), ArgumentError, "block_size must be a pair"),
        "seq-lens-negative": (dense(lens=(-1, 64)), ArgumentError, "seq_lens (T) must be >= 0, got -1"),
        "seq-lens-int": (dense(lens=64), ArgumentError, "seq_lens must be a pair"),
        "indices-dtype": (indices(i=idx.astype(jnp.float32)), ArgumentTypeError, "indices must be integers"),
        "counts-shape": (indices(c=jnp.ones((1, 1, 3), jnp.int32)), ArgumentError, "counts must have the shape"),
        "counts-range": (indices(c=cnt.at[0, 0, 2].set(3)), ArgumentError, "counts must lie in [0, 2]"),
        "indices-range": (indices(i=idx.at[0, 0, 1, 0].set(4)), ArgumentError, "indices must lie in [0, 4)"),
        "not-a-mask": (attend(mask=blocks), ArgumentTypeError, "block_mask must be a mmfa_jax.BlockMask"),
        "seq-lens-mismatch": (attend(mask=BlockMask.from_dense(jnp.ones((1, 1, 4, 5), bool), 16, seq_lens=(64, 80))),
                              ArgumentError, "seq_lens (T, S) = (64, 80)"),
        "map-heads": (attend(mask=BlockMask.from_dense(jnp.ones((1, 3, 4, 4), bool), 16, seq_lens=(64, 64))),
                      ArgumentError, "heads 3"),
        "map-batch": (attend(mask=BlockMask.from_dense(jnp.ones((3, 1, 4, 4), bool), 16, seq_lens=(64, 64))),
                      ArgumentError, "batch 3"),
        "kernel-block": (attend(mask=BlockMask.from_dense(jnp.ones((1, 1, 2, 4), bool), (48, 16), seq_lens=(64, 64)),
                                implementation="interpret"), ArgumentError, "block_q must be a power of two"),
        "query-dtype": (attend(query=q.astype(jnp.int32)), ArgumentTypeError, "query must be float16"),
        "gqa": (attend(key=jnp.ones((2, 64, 3, 16), jnp.float32)), ArgumentError, "multiple of the key/value heads"),
        "scale": (attend(scale="big"), ArgumentTypeError, "scale must be a real number"),
        "implementation": (attend(implementation="cuda"), ValueError, "implementation must be one of"),
    }


ERRORS = ["blocks-dtype", "blocks-shape", "blocks-rank", "block-size-zero", "block-size-float", "block-size-triple",
          "seq-lens-negative", "seq-lens-int", "indices-dtype", "counts-shape", "counts-range", "indices-range",
          "not-a-mask", "seq-lens-mismatch", "map-heads", "map-batch", "kernel-block", "query-dtype", "gqa", "scale",
          "implementation"]


def test_every_error_case_is_run():
    assert sorted(_errors()) == sorted(ERRORS)


@pytest.mark.parametrize("name", ERRORS)
def test_argument_errors(name):
    call, kind, message = _errors()[name]
    with pytest.raises(kind) as info:
        call()
    assert message in str(info.value), str(info.value)
    if kind is not ValueError:
        assert isinstance(info.value, RuntimeError)


# ------------------------------------------------------------------------------------------------
# The kernels for a GPU, without one: Triton lowering and compilation.


def test_kernels_compile_for_hopper(tmp_path, monkeypatch):
    """Forward and gradient lowered for an abstract H100 and compiled to sm_90 cubins by the official
    Triton (no GPU needed): the three kernels the plans name, with their operands, grids over the
    blocks, within shared memory and within the configuration's estimate."""
    pytest.importorskip("triton")
    from mmfa_jax import backends, plans, triton_route
    from mmfa_jax.kernels.block_sparse import shared_bytes

    monkeypatch.setenv("MMFA_CACHE_DIR", str(tmp_path))
    triton_route.clear_memory_cache()
    # 128-row blocks: the backward runs the table's smaller tiles (dQ 128 x 64, dK/dV 128 x 64 at
    # d64 on sm_90), each program one tile of its block.
    B, T, S, N, K, D, block = 1, 200, 130, 4, 2, 64, (128, 128)
    nq, nk = 2, 2
    tile_of = {"forward": tuning.KernelConfig(128, 128, 4, 2), "dq": tuning.KernelConfig(128, 64, 4, 2),
               "dkv": tuning.KernelConfig(128, 64, 4, 2)}
    q = jax.ShapeDtypeStruct((B, T, N, D), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, S, K, D), jnp.bfloat16)

    def fn(q, k, v, blocks):
        mask = BlockMask.from_dense(blocks, block, seq_lens=(T, S))
        loss = lambda q, k, v: mmfa_jax.block_sparse_attention(  # noqa: E731
            q, k, v, mask, is_causal=True, implementation="triton").astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    compiled = triton_route.lower_for(fn, q, kv, kv, jax.ShapeDtypeStruct((B, N, nq, nk), jnp.bool_),
                                      device_kind="NVIDIA H100")
    kernel_plans = plans.block_sparse_forward() + plans.block_sparse_backward()
    assert [k.name for k, *_ in compiled] == [p.name for p in kernel_plans]
    grids = [(nq, N, B), (nq, N, B), (3, K, B)]  # dK/dV: ceil(130 / 64) key tiles
    sp = kernels.SparseProblem(kernels.Problem(
        batch=B, q_heads=N, kv_heads=K, q_len=T, kv_len=S, head_dim=D, scale=1.0, softcap=None, band=None,
        layout="BTNH", bias_shape=None, mask_shape=None, has_segments=False, has_q_lengths=False,
        has_kv_lengths=False, dot_precision=None), *block, B, N)
    limit = triton_route.SHARED_MEMORY_PER_BLOCK[90]
    for (kernel, _, grid, operands, _), plan, want, name in zip(compiled, kernel_plans, grids, ("forward", "dq", "dkv")):
        present = [n for n in plan.operands if n not in ("q_pos", "kv_pos")]  # no positions in this call
        assert grid == want and operands == len(present), plan.name
        assert len(kernel.cubin) > 0 and kernel.cc == 90
        tile = dataclasses.replace(tile_of[name], num_stages=kernel.num_stages)
        assert kernel.shared <= min(limit, shared_bytes(name, sp, tile, 2)), (name, kernel.shared)
    assert backends.resolve("triton", backends.Target.cuda(90)).backend == "triton-route"


def _compile_gradient_for_hopper(tmp_path, monkeypatch, make_mask, B, T, N, K, D, *map_args, absent=()):
    """Lowers jax.grad of a causal block-sparse loss (the mask built by ``make_mask(*map_args)``
    inside) for sm_90 with the official triton, and checks that each kernel of the plans compiled
    with every operand it names but ``absent``."""
    pytest.importorskip("triton")
    from mmfa_jax import plans, triton_route

    monkeypatch.setenv("MMFA_CACHE_DIR", str(tmp_path))
    triton_route.clear_memory_cache()
    q = jax.ShapeDtypeStruct((B, T, N, D), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, T, K, D), jnp.bfloat16)

    def fn(q, k, v, *args):
        mask = make_mask(*args)
        loss = lambda q, k, v: mmfa_jax.block_sparse_attention(  # noqa: E731
            q, k, v, mask, is_causal=True, implementation="triton").astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    compiled = triton_route.lower_for(fn, q, kv, kv, *map_args, device_kind="NVIDIA H100")
    kernel_plans = plans.block_sparse_forward() + plans.block_sparse_backward()
    assert [k.name for k, *_ in compiled] == [p.name for p in kernel_plans]
    for (kernel, _, _, operands, _), plan in zip(compiled, kernel_plans):
        present = [n for n in plan.operands if n not in absent]
        assert operands == len(present) and len(kernel.cubin) > 0, plan.name


def test_kernels_with_positions_compile_for_hopper(tmp_path, monkeypatch):
    """The kernels that take the causal mask from positions (a permuted order) lower and compile
    for sm_90, with every operand of their plans."""
    B, T, N = 2, 200, 4
    _compile_gradient_for_hopper(
        tmp_path, monkeypatch, lambda blocks, perm: BlockMask.from_dense(blocks, 64, seq_lens=(T, T),
                                                                         positions=(perm, perm)),
        B, T, N, 2, 64, jax.ShapeDtypeStruct((B, N, 4, 4), jnp.bool_), jax.ShapeDtypeStruct((B, T), jnp.int32))


def test_blocks_too_large_for_shared_memory_are_refused():
    """float32 at d128: 128-row blocks fit an H100 forward and backward (the backward's tiles are the
    table's, smaller than the blocks); 256 x 128 blocks do not fit the forward, which the call
    says, naming the block size."""
    from mmfa_jax import triton_route

    T = S = 256
    q = jax.ShapeDtypeStruct((1, T, 2, 128), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, S, 1, 128), jnp.float32)

    def attend(block):
        def f(q, k, v, blocks):
            mask = BlockMask.from_dense(blocks, block, seq_lens=(T, S))
            return mmfa_jax.block_sparse_attention(q, k, v, mask, implementation="pallas")
        return f

    def grad(f):
        return lambda q, k, v, b: jax.grad(lambda q: f(q, k, v, b).sum())(q)

    blocks = jax.ShapeDtypeStruct((1, 1, 2, 2), jnp.bool_)
    triton_route.lower_for(grad(attend((128, 128))), q, kv, kv, blocks, device_kind="NVIDIA H100")  # lowered only
    with pytest.raises(ArgumentError, match=r"block_size \(256, 128\) is too large for the forward kernel"):
        triton_route.lower_for(attend((256, 128)), q, kv, kv, jax.ShapeDtypeStruct((1, 1, 1, 2), jnp.bool_),
                               device_kind="NVIDIA H100")


# ------------------------------------------------------------------------------------------------
# Narrow index lists: the lists as wide as the indices, not as the key blocks.


def random_lists(rng, shape, nk, width):
    """Index lists (shape + (width,)) and counts (shape) with repeats inside the counted entries,
    junk (out-of-range values too) past them, and some empty rows; and the boolean map they list."""
    indices = rng.integers(-3, nk + 3, shape + (width,))
    counts = rng.integers(0, width + 1, shape)
    counts.reshape(-1)[::5] = 0  # empty rows
    counted = np.arange(width) < counts[..., None]
    indices = np.where(counted, rng.integers(0, nk, shape + (width,)), indices)
    indices[..., 1] = np.where(counts > 1, indices[..., 0], indices[..., 1])  # a repeat where two are counted
    blocks = np.zeros(shape + (nk,), bool)
    for pos in np.ndindex(*shape):
        blocks[pos][indices[pos][:counts[pos]]] = True
    return indices.astype(np.int32), counts.astype(np.int32), blocks


NARROW_CASES = {
    "gqa-ragged": Case(B=2, T=300, S=270, N=4, K=2, D=16, block=(16, 16)),
    "gqa-ragged-causal": Case(B=2, T=300, S=270, N=4, K=2, D=16, block=(16, 16), causal=True),
    "mqa-rect-broadcast-causal": Case(B=1, T=130, S=250, N=2, K=1, D=24, block=(32, 16), causal=True, map_bn=(1, 1)),
}


@pytest.mark.parametrize("name", list(NARROW_CASES))
def test_narrow_index_lists_match_the_dense_map(impl, rng, name):
    """Lists of 3 entries for 17 to 19 key blocks (repeats, junk past the counts, empty rows,
    ragged last blocks, GQA): lists of width 3, and the same outputs, LSE and gradients as the
    same map given densely, against the reference."""
    c = NARROW_CASES[name]
    nq, nk = grid(c)
    bm, nm = (c.B if c.map_bn[0] == "B" else 1), (c.N if c.map_bn[1] == "N" else 1)
    indices, counts, blocks = random_lists(rng, (bm, nm, nq), nk, 3)
    narrow = BlockMask.from_indices(jnp.asarray(indices), jnp.asarray(counts), c.block, seq_lens=(c.T, c.S))
    dense = BlockMask.from_dense(jnp.asarray(blocks), c.block, seq_lens=(c.T, c.S))
    assert narrow.width == 3 and dense.width == nk and narrow.shape == dense.shape == (bm, nm, nq, nk)
    for causal in (False, True):
        lists = narrow.lists(causal)
        assert lists.kv_index.shape == (bm, nm, nq, 3) and lists.q_index.shape == (bm, nm, nq * 3)
    check_same_lists(narrow, dense, name)
    np.testing.assert_array_equal(np.asarray(narrow.blocks), blocks)
    (q, k, v), (q64, k64, v64) = inputs(rng, c)

    def run(mask):
        return lambda q, k, v: mmfa_jax.block_sparse_attention(q, k, v, mask, is_causal=c.causal, implementation=impl,
                                                               return_lse=True)

    (out, lse), vjp = jax.vjp(run(narrow), q, k, v)
    (want_out, want_lse), want_vjp = jax.vjp(run(dense), q, k, v)
    ref_out, ref_lse = block_sparse_reference(q64, k64, v64, blocks, c.block, is_causal=c.causal)
    assert np.isinf(ref_lse).any(), "the case has rows that see nothing"
    tol = tolerance(c.dtype)
    assert_close(out, ref_out, tol, f"{name}: out")
    assert_close(lse, ref_lse, tol, f"{name}: lse")
    assert_close(out, mmfa_jax_ref(want_out), tol, f"{name}: out against the dense map's")
    assert_close(lse, mmfa_jax_ref(want_lse), tol, f"{name}: lse against the dense map's")
    d_out, d_out64 = normal(rng, out.shape, c.dtype)
    d_lse, d_lse64 = normal(rng, lse.shape, "float32")
    refs = block_sparse_reference_grads(q64, k64, v64, blocks, c.block, d_out64, d_lse64, is_causal=c.causal)
    for got, want, ref, what in zip(vjp((d_out, d_lse)), want_vjp((d_out, d_lse)), refs, ("dq", "dk", "dv")):
        assert_close(got, ref, tolerance(c.dtype, grad=True), f"{name}: {what}")
        assert_close(got, mmfa_jax_ref(want), tolerance(c.dtype, grad=True), f"{name}: {what} against the dense map's")


def test_narrow_index_lists_with_positions(impl, rng):
    """Narrow lists in a permuted order, causal by the positions (per-batch permutations, GQA,
    ragged blocks): the same as the dense map, against the reference, forward and gradients."""
    c = Case(B=2, T=150, S=150, N=4, K=2, D=16, block=(16, 16), causal=True)
    nq, nk = grid(c)
    indices, counts, blocks = random_lists(rng, (1, c.N, nq), nk, 4)
    perm = np.stack([rng.permutation(c.T) for _ in range(c.B)]).astype(np.int32)
    narrow = BlockMask.from_indices(jnp.asarray(indices), jnp.asarray(counts), c.block, seq_lens=(c.T, c.S),
                                    positions=(perm, perm))
    dense = BlockMask.from_dense(jnp.asarray(blocks), c.block, seq_lens=(c.T, c.S), positions=(perm, perm))
    check_same_lists(narrow, dense, "positions")
    assert narrow.causal.kv_index.shape == (c.B, c.N, nq, 4) and narrow.plain.kv_index.shape == (1, c.N, nq, 4)
    (q, k, v), (q64, k64, v64) = inputs(rng, c)

    _check_causal_by_positions(narrow, blocks, perm, c, (q, k, v), (q64, k64, v64), rng, impl)


def _shapes(jaxpr):
    """Every array shape a jaxpr (and the jaxprs inside it) makes."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):  # a (closed) jaxpr: a jitted or mapped body
                    yield from _shapes(inner)


@pytest.mark.parametrize("with_positions", [False, True], ids=["plain", "positions"])
def test_from_indices_memory_is_linear_in_the_lists(with_positions):
    """4096 x 4096 blocks listed 4 per query block: building the mask (both readings, under jit)
    makes no array with a query-block and a key-block axis, nor any of more than a sixteenth of
    nq * nk elements; the lists are nq * 4 wide."""
    T = S = 4096 * 16
    nq = nk = 4096
    indices = jax.ShapeDtypeStruct((1, 2, nq, 4), jnp.int32)
    counts = jax.ShapeDtypeStruct((1, 2, nq), jnp.int32)
    positions = (jax.ShapeDtypeStruct((1, T), jnp.int32),) * 2 if with_positions else None

    def build(indices, counts, positions):
        return BlockMask.from_indices(indices, counts, 16, seq_lens=(T, S), positions=positions)

    jaxpr = jax.make_jaxpr(build)(indices, counts, positions)
    shapes = list(_shapes(jaxpr.jaxpr))
    assert shapes, "the jaxpr was read"
    for shape in shapes:
        assert sum(n >= nq for n in shape) < 2 and int(np.prod(shape)) <= nq * nk // 16, shape
    mask = jax.eval_shape(build, indices, counts, positions)
    assert mask.plain.kv_index.shape == (1, 2, nq, 4) and mask.plain.q_index.shape == (1, 2, nq * 4)
    compiled = jax.jit(build).lower(indices, counts, positions).compile()
    analysis = compiled.memory_analysis()
    if analysis is not None:
        assert analysis.temp_size_in_bytes < nq * nk * 4 // 16, analysis


def test_narrow_lists_compile_for_hopper(tmp_path, monkeypatch):
    """Lists of a width that is not a power of two (3) lower and compile for sm_90 (forward and
    gradient) with every operand of the plans."""
    B, T, N = 1, 300, 4
    _compile_gradient_for_hopper(
        tmp_path, monkeypatch, lambda indices, counts: BlockMask.from_indices(indices, counts, 64, seq_lens=(T, T)),
        B, T, N, 2, 64, jax.ShapeDtypeStruct((B, N, 5, 3), jnp.int32), jax.ShapeDtypeStruct((B, N, 5), jnp.int32),
        absent=("q_pos", "kv_pos"))
