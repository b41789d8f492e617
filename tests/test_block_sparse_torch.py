"""mmfa_torch.block_sparse_attention and mmfa_torch.BlockMask (SDPA's layout) against the float64
reference of tests/reference.py, the JAX face's own lists, torch's SDPA and FlexAttention.

Tests taking ``impl`` run on "interpret" (the block-sparse Pallas kernels, interpreted) and "xla"
(the dense mask of the map), CPU tensors crossing to JAX by DLPack; with --gpu also on "pallas"
with CUDA tensors (conftest's DEVICE). Maps are random, with a query block that lists no key block
(rows that see nothing: zeros, LSE -inf); lengths are not multiples of the blocks. The test marked
``gpu`` runs CUDA tensors through both routes (mmfa_torch's own launch and JAX's).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from conftest import DEVICE, assert_close, to_numpy, tolerance  # noqa: E402
from reference import (  # noqa: E402
    attention_reference,
    attention_reference_grads,
    block_sparse_mask,
    block_sparse_reference,
    block_sparse_reference_grads,
)

import mmfa_jax  # noqa: E402
import mmfa_torch  # noqa: E402
from mmfa_jax import ArgumentError, ArgumentTypeError, compiles  # noqa: E402
from mmfa_torch import BlockMask  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Case:
    B: int = 2
    T: int = 50
    S: int = 45
    Hq: int = 4
    Hkv: int = 2
    D: int = 16
    block: tuple = (16, 32)
    density: float = 0.5
    causal: bool = False
    dtype: str = "float32"
    map_bn: tuple = ("B", "N")  # which of the map's batch and head axes are kept ("B"/"N") or broadcast (1)
    layout: str = "BHTD"  # "BHTD": (B, H, L, D)-contiguous; "view": transpose(1, 2) of (B, L, H, D)-contiguous


CASES = {
    "gqa-ragged-causal": Case(causal=True),
    "mha-rect-heads-map": Case(B=1, T=40, S=72, Hq=2, Hkv=2, block=(16, 16), density=0.3, map_bn=(1, "N")),
    "mqa-batch-map-bf16-causal": Case(T=40, S=34, Hq=2, Hkv=1, block=(16, 16), causal=True, dtype="bfloat16",
                                      map_bn=("B", 1)),
    "fp16-one-map-view": Case(B=1, T=33, S=50, Hq=2, Hkv=1, D=24, block=(16, 16), dtype="float16", map_bn=(1, 1),
                              layout="view"),
}


def grid(c: Case):
    return -(-c.T // c.block[0]), -(-c.S // c.block[1])


def random_map(rng, c: Case) -> np.ndarray:
    """A random boolean block map of the case's density and kept axes; query block 1 of the first
    (batch, head) lists nothing (rows that see nothing), the ragged corner block is listed."""
    nq, nk = grid(c)
    bm = c.B if c.map_bn[0] == "B" else 1
    nm = c.Hq if c.map_bn[1] == "N" else 1
    blocks = rng.random((bm, nm, nq, nk)) < c.density
    blocks[..., -1, -1] = True
    blocks[0, 0, 1, :] = False
    return blocks


def tensor(rng, shape, dtype="float32", layout="BHTD", requires_grad=False):
    """Unit normal (B, H, L, D) tensor on DEVICE[0], in the memory order ``layout``, and its
    (rounded) values in float64 as (B, L, H, D), the reference's layout."""
    if layout == "view":
        base = torch.from_numpy(rng.standard_normal((shape[0], shape[2], shape[1], shape[3])))
        t = base.to(TORCH_DTYPES[dtype]).to(DEVICE[0]).transpose(1, 2)
        assert t.transpose(1, 2).is_contiguous() and (min(shape[1:3]) == 1 or not t.is_contiguous())
    else:
        t = torch.from_numpy(rng.standard_normal(shape)).to(TORCH_DTYPES[dtype]).to(DEVICE[0])
    t.requires_grad_(requires_grad)
    return t, btnh(to_numpy(t))


def btnh(a: np.ndarray) -> np.ndarray:
    """(B, H, L, D) -> (B, L, H, D), or (B, H, L) -> (B, L, H)."""
    return np.swapaxes(a, 1, 2)


def inputs(rng, c: Case, requires_grad=False):
    q, q64 = tensor(rng, (c.B, c.Hq, c.T, c.D), c.dtype, c.layout, requires_grad)
    k, k64 = tensor(rng, (c.B, c.Hkv, c.S, c.D), c.dtype, c.layout, requires_grad)
    v, v64 = tensor(rng, (c.B, c.Hkv, c.S, c.D), c.dtype, c.layout, requires_grad)
    return (q, k, v), (q64, k64, v64)


def mask_of(c: Case, blocks: np.ndarray) -> BlockMask:
    return BlockMask.from_dense(torch.from_numpy(blocks).to(DEVICE[0]), c.block, seq_lens=(c.T, c.S))


# ------------------------------------------------------------------------------------------------
# Against the reference: forward and gradients.


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_match_reference(impl, rng, name):
    c = CASES[name]
    blocks = random_map(rng, c)
    (q, k, v), (q64, k64, v64) = inputs(rng, c, requires_grad=True)
    out, lse = mmfa_torch.block_sparse_attention(q, k, v, mask_of(c, blocks), is_causal=c.causal, implementation=impl,
                                                 return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == (c.B, c.Hq, c.T) and lse.dtype == torch.float32
    ref_out, ref_lse = block_sparse_reference(q64, k64, v64, blocks, c.block, is_causal=c.causal)
    dead = np.isneginf(ref_lse)
    assert dead.any() and not dead.all(), "the case has rows that see nothing, and rows that see keys"
    assert_close(btnh(to_numpy(out)), ref_out, tolerance(c.dtype), f"{name}: out")
    assert_close(btnh(to_numpy(lse)), ref_lse, tolerance(c.dtype), f"{name}: lse")  # -inf exactly where dead
    assert (btnh(to_numpy(out))[dead] == 0).all(), "rows that see nothing are not zero"

    d_out, d_out64 = tensor(rng, tuple(out.shape), c.dtype)
    d_lse = torch.from_numpy(rng.standard_normal(lse.shape)).float().to(DEVICE[0])
    torch.autograd.backward((out, lse), (d_out, d_lse))
    want = block_sparse_reference_grads(q64, k64, v64, blocks, c.block, d_out64, btnh(to_numpy(d_lse)),
                                        is_causal=c.causal)
    for what, t, w in zip(("dq", "dk", "dv"), (q, k, v), want):
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == t.dtype, what
        assert_close(btnh(to_numpy(t.grad)), w, tolerance(c.dtype, grad=True), f"{name}: {what}")


def test_output_only_gradient_and_scale(impl, rng):
    """A loss of the output alone (no LSE cotangent), and a scale."""
    c = Case(B=1, T=40, S=40, Hq=2, Hkv=1, block=(16, 16), causal=True)
    blocks = random_map(rng, c)
    (q, k, v), (q64, k64, v64) = inputs(rng, c, requires_grad=True)
    out = mmfa_torch.block_sparse_attention(q, k, v, mask_of(c, blocks), scale=0.3, is_causal=True,
                                            implementation=impl)
    (out.float() ** 2).sum().backward()
    ref_out, _ = block_sparse_reference(q64, k64, v64, blocks, c.block, is_causal=True, scale=0.3)
    assert_close(btnh(to_numpy(out)), ref_out, tolerance(c.dtype), "out")
    want = block_sparse_reference_grads(q64, k64, v64, blocks, c.block, 2 * ref_out, is_causal=True, scale=0.3)
    for what, t, w in zip(("dq", "dk", "dv"), (q, k, v), want):
        assert_close(btnh(to_numpy(t.grad)), w, tolerance(c.dtype, grad=True), what)


def test_transposed_view_and_contiguous_inputs_agree(impl, rng):
    """The transpose(1, 2) view of a (B, L, H, D)-contiguous tensor goes in as it is (the kernels'
    layout); a (B, H, L, D)-contiguous one is copied to it: the same numbers and gradients. The
    output is the transpose(1, 2) view of a (B, T, Hq, D)-contiguous tensor either way."""
    c = Case(B=2, T=40, S=40, Hq=2, Hkv=2, block=(16, 16), causal=True, layout="view")
    blocks = random_map(rng, c)
    (qv, kv, vv), (q64, k64, v64) = inputs(rng, c)
    views = [t.detach().clone().requires_grad_(True) for t in (qv, kv, vv)]  # clone keeps the strides
    assert all(t.transpose(1, 2).is_contiguous() for t in views)
    conts = [t.detach().contiguous().requires_grad_(True) for t in (qv, kv, vv)]
    mask = mask_of(c, blocks)
    d_out, d_out64 = tensor(rng, (c.B, c.Hq, c.T, c.D))
    want_out, _ = block_sparse_reference(q64, k64, v64, blocks, c.block, is_causal=True)
    want = block_sparse_reference_grads(q64, k64, v64, blocks, c.block, d_out64, is_causal=True)
    outs = []
    for what, ts in (("view", views), ("contiguous", conts)):
        out = mmfa_torch.block_sparse_attention(*ts, mask, is_causal=True, implementation=impl)
        assert out.shape == (c.B, c.Hq, c.T, c.D) and out.transpose(1, 2).is_contiguous(), what
        (out * d_out).sum().backward()
        assert_close(btnh(to_numpy(out)), want_out, tolerance(c.dtype), f"{what}: out")
        for g, t, w in zip(("dq", "dk", "dv"), ts, want):
            assert t.grad.shape == t.shape
            assert_close(btnh(to_numpy(t.grad)), w, tolerance(c.dtype, grad=True), f"{what}: {g}")
        outs.append(out)
    assert_close(outs[0], to_numpy(outs[1]), 1e-6, "view vs contiguous")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_a_map_of_every_block_is_dense_attention(impl, rng, causal):
    """Every block listed: mmfa's dense torch face and torch's own SDPA (K/V repeated for it)."""
    c = Case(B=1, T=40, S=40, Hq=4, Hkv=2, block=(16, 16), causal=causal)
    (q, k, v), _ = inputs(rng, c)
    mask = BlockMask.from_dense(torch.ones(1, 1, *grid(c), dtype=torch.bool, device=DEVICE[0]), c.block,
                                seq_lens=(c.T, c.S))
    out, lse = mmfa_torch.block_sparse_attention(q, k, v, mask, is_causal=causal, implementation=impl,
                                                 return_lse=True)
    dense, dense_lse = mmfa_torch.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True,
                                                               implementation=impl, return_lse=True)
    torch_sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), is_causal=causal)
    tol = tolerance(c.dtype)
    assert_close(out, to_numpy(dense), tol, "out vs mmfa dense")
    assert_close(lse, to_numpy(dense_lse), tol, "lse vs mmfa dense")
    assert_close(out, to_numpy(torch_sdpa), tol, "out vs torch SDPA")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # its unfused reference path
def test_matches_flex_attention_on_its_block_mask(rng):
    """``BlockMask.from_flex`` of a FlexAttention mask whose mask_mod is causal within block-aligned
    stripes: the map is FlexAttention's (partial and full blocks), and with is_causal the output
    is flex_attention's."""
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    B, Hq, Hkv, T, S, D, block = 2, 2, 1, 70, 90, 16, (16, 32)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (((q_idx // 16) + (kv_idx // 32) + h) % 3 != 0)

    flex = fa.create_block_mask(mask_mod, B, Hq, T, S, device="cpu", BLOCK_SIZE=block)
    assert (flex.full_kv_num_blocks > 0).any() and (flex.kv_num_blocks > 0).any(), "both kinds of block"
    mask = BlockMask.from_flex(flex)
    assert mask.block_size == block and mask.seq_lens == (T, S)
    assert torch.equal(mask.blocks, flex.to_dense().bool()), "the map is FlexAttention's"
    q, q64 = tensor(rng, (B, Hq, T, D))
    k, k64 = tensor(rng, (B, Hkv, S, D))
    v, v64 = tensor(rng, (B, Hkv, S, D))
    want = fa.flex_attention(q, k, v, block_mask=flex, enable_gqa=True)
    out = mmfa_torch.block_sparse_attention(q, k, v, mask, is_causal=True, implementation="xla")
    assert_close(out, to_numpy(want), tolerance("float32"), "vs flex_attention")
    ref_out, _ = block_sparse_reference(q64, k64, v64, flex.to_dense().bool().numpy(), block, is_causal=True)
    assert_close(btnh(to_numpy(out)), ref_out, tolerance("float32"), "vs the reference")


def test_empty_sequences(impl, rng):
    """No query rows: empty results; no keys: zeros and LSE -inf; gradients zero."""
    q, _ = tensor(rng, (2, 4, 0, 16), requires_grad=True)
    k, _ = tensor(rng, (2, 2, 40, 16), requires_grad=True)
    mask = BlockMask.from_dense(torch.zeros(1, 1, 0, 3, dtype=torch.bool, device=DEVICE[0]), 16, seq_lens=(0, 40))
    out, lse = mmfa_torch.block_sparse_attention(q, k, k, mask, implementation=impl, return_lse=True)
    assert out.shape == (2, 4, 0, 16) and lse.shape == (2, 4, 0)
    q, _ = tensor(rng, (1, 2, 20, 16), requires_grad=True)
    k, _ = tensor(rng, (1, 1, 0, 16), requires_grad=True)
    mask = BlockMask.from_dense(torch.zeros(1, 1, 2, 0, dtype=torch.bool, device=DEVICE[0]), 16, seq_lens=(20, 0))
    out, lse = mmfa_torch.block_sparse_attention(q, k, k, mask, implementation=impl, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all() and out.shape == q.shape
    out.sum().backward()
    assert (q.grad == 0).all() and k.grad.shape == k.shape


def test_causal_by_positions_in_a_permuted_order(impl, rng):
    """A mask with positions (rows in a permuted order, the causality of the original one): with
    is_causal key j is visible to query i when positions[j] <= positions[i] and its block is
    listed; forward and gradients, per-batch permutations as int64 tensors, GQA, ragged blocks, an
    empty query block. from_indices with the same positions builds the same mask; without
    is_causal the positions play no part."""
    c = Case(B=2, T=40, S=40, Hq=2, Hkv=1, block=(16, 16), density=0.6, causal=True)
    blocks = random_map(rng, c)
    perm = np.stack([rng.permutation(c.T) for _ in range(c.B)])
    positions = (torch.from_numpy(perm).to(DEVICE[0]),) * 2
    mask = BlockMask.from_dense(torch.from_numpy(blocks).to(DEVICE[0]), c.block, seq_lens=(c.T, c.S),
                                positions=positions)
    counts = blocks.sum(-1)
    order = np.argsort(~blocks, axis=-1, kind="stable")
    same = BlockMask.from_indices(torch.from_numpy(order).to(DEVICE[0]), torch.from_numpy(counts).to(DEVICE[0]),
                                  c.block, seq_lens=(c.T, c.S), positions=positions)
    assert len(same.leaves) == len(mask.leaves) and all(torch.equal(a, b) for a, b in zip(same.leaves, mask.leaves))
    (q, k, v), (q64, k64, v64) = inputs(rng, c, requires_grad=True)
    out, lse = mmfa_torch.block_sparse_attention(q, k, v, mask, is_causal=True, implementation=impl, return_lse=True)
    token_mask = block_sparse_mask(blocks, c.block, c.T, c.S) & (perm[:, None, None, :] <= perm[:, None, :, None])
    ref_out, ref_lse = attention_reference(q64, k64, v64, mask=token_mask)
    assert np.isinf(ref_lse).any()
    assert_close(btnh(to_numpy(out)), ref_out, tolerance(c.dtype), "out")
    assert_close(btnh(to_numpy(lse)), ref_lse, tolerance(c.dtype), "lse")
    d_out, d_out64 = tensor(rng, tuple(out.shape))
    torch.autograd.backward(out, d_out)
    want = attention_reference_grads(q64, k64, v64, d_out64, mask=token_mask)[:3]
    for what, t, w in zip(("dq", "dk", "dv"), (q, k, v), want):
        assert_close(btnh(to_numpy(t.grad)), w, tolerance(c.dtype, grad=True), what)
    plain = mmfa_torch.block_sparse_attention(q, k, v, mask, implementation=impl)
    assert_close(btnh(to_numpy(plain)), block_sparse_reference(q64, k64, v64, blocks, c.block)[0], tolerance(c.dtype),
                 "without is_causal")


# ------------------------------------------------------------------------------------------------
# The mask: the JAX face's lists, from_indices, to_jax.


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mask_holds_the_jax_faces_lists(rng, causal):
    """The torch mask's tensors are the JAX face's lists for the same map, bit for bit (they are
    built there), named as there."""
    T, S, block = 70, 45, (16, 32)
    blocks = rng.random((2, 3, 5, 2)) < 0.6
    mask = BlockMask.from_dense(torch.from_numpy(blocks), block, seq_lens=(T, S))
    ref = mmfa_jax.BlockMask.from_dense(jnp.asarray(blocks), block, seq_lens=(T, S))
    assert (mask.block_size, mask.seq_lens, mask.shape) == (ref.block_size, ref.seq_lens, ref.shape)
    assert torch.equal(mask.blocks, torch.from_numpy(blocks))
    got, want = mask.lists(causal), ref.lists(causal)
    for name in ("kv_count", "kv_full", "kv_index", "q_offset", "q_count", "q_full", "q_index"):
        t = getattr(got, name)
        assert isinstance(t, torch.Tensor) and t.dtype == torch.int32, name
        np.testing.assert_array_equal(t.numpy(), np.asarray(getattr(want, name)), err_msg=name)
    assert int(mask.computed_blocks(causal)) == int(ref.computed_blocks(causal))
    back = mask.to_jax()
    assert isinstance(back, mmfa_jax.BlockMask) and back.block_size == block
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The mask owns its tensors: writing to the map afterwards changes nothing.
    source = torch.from_numpy(blocks.copy())
    owned = BlockMask.from_dense(source, block, seq_lens=(T, S))
    source.fill_(False)
    assert torch.equal(owned.blocks, torch.from_numpy(blocks))


def test_from_indices_equals_from_dense(impl, rng):
    """Lists in any order, junk past the counts, int64 tensors: the same mask and the same output."""
    c = Case(B=1, T=70, S=100, Hq=2, Hkv=1, block=(16, 32), causal=True, map_bn=(1, "N"))
    blocks = random_map(rng, c)
    nk = blocks.shape[-1]
    counts = blocks.sum(-1)
    order = np.argsort(~blocks, axis=-1, kind="stable")  # listed ones first
    for pos in np.ndindex(*counts.shape):
        order[pos][:counts[pos]] = rng.permutation(order[pos][:counts[pos]])
        order[pos][counts[pos]:] = rng.integers(-5, 50, nk - counts[pos])
    got = BlockMask.from_indices(torch.from_numpy(order).to(DEVICE[0]), torch.from_numpy(counts).to(DEVICE[0]),
                                 c.block, seq_lens=(c.T, c.S))
    want = mask_of(c, blocks)
    assert len(got.leaves) == len(want.leaves)
    for a, b in zip(got.leaves, want.leaves):
        assert torch.equal(a, b)
    (q, k, v), (q64, k64, v64) = inputs(rng, c)
    out = mmfa_torch.block_sparse_attention(q, k, v, got, is_causal=True, implementation=impl)
    ref_out, _ = block_sparse_reference(q64, k64, v64, blocks, c.block, is_causal=True)
    assert_close(btnh(to_numpy(out)), ref_out, tolerance(c.dtype), "out")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_narrow_index_lists(impl, rng, causal):
    """Lists of 3 entries for 12 key blocks (repeats, junk past the counts, empty rows, GQA, ragged
    blocks): the mask's lists are 3 wide (q_index nq * 3), its map the listed blocks, and the
    output and gradients those of the reference for that map."""
    c = Case(B=2, T=150, S=180, Hq=4, Hkv=2, block=(16, 16), causal=causal)
    nq, nk = grid(c)
    shape = (c.B, c.Hq, nq)
    counts = rng.integers(0, 4, shape)
    counts.reshape(-1)[::4] = 0
    counted = np.arange(3) < counts[..., None]
    indices = np.where(counted, rng.integers(0, nk, shape + (3,)), rng.integers(-4, nk + 4, shape + (3,)))
    indices[..., 1] = np.where(counts > 1, indices[..., 0], indices[..., 1])  # a repeat
    blocks = np.zeros(shape + (nk,), bool)
    for pos in np.ndindex(*shape):
        blocks[pos][indices[pos][:counts[pos]]] = True
    mask = BlockMask.from_indices(torch.from_numpy(indices).to(DEVICE[0]), torch.from_numpy(counts).to(DEVICE[0]),
                                  c.block, seq_lens=(c.T, c.S))
    lists = mask.lists(causal)
    assert lists.kv_index.shape == (c.B, c.Hq, nq, 3) and lists.q_index.shape == (c.B, c.Hq, nq * 3)
    assert mask.shape == (c.B, c.Hq, nq, nk) and torch.equal(mask.blocks.cpu(), torch.from_numpy(blocks))
    (q, k, v), (q64, k64, v64) = inputs(rng, c, requires_grad=True)
    out, lse = mmfa_torch.block_sparse_attention(q, k, v, mask, is_causal=causal, implementation=impl,
                                                 return_lse=True)
    ref_out, ref_lse = block_sparse_reference(q64, k64, v64, blocks, c.block, is_causal=causal)
    assert np.isinf(ref_lse).any(), "the case has rows that see nothing"
    assert_close(btnh(to_numpy(out)), ref_out, tolerance(c.dtype), "out")
    assert_close(btnh(to_numpy(lse)), ref_lse, tolerance(c.dtype), "lse")
    d_out = torch.from_numpy(rng.standard_normal(tuple(out.shape))).to(out)
    out.backward(d_out)
    want = block_sparse_reference_grads(q64, k64, v64, blocks, c.block, btnh(to_numpy(d_out)), is_causal=causal)
    for t, ref, what in zip((q, k, v), want, ("dq", "dk", "dv")):
        assert_close(btnh(to_numpy(t.grad)), ref, tolerance(c.dtype, grad=True), what)


def test_warm_calls_compile_nothing(impl, rng):
    """A second call with fresh data and a fresh map of the seen shapes compiles nothing in JAX:
    building the mask, the forward and the backward."""
    c = Case(B=1, T=40, S=40, Hq=2, Hkv=1, block=(16, 16), causal=True)

    def call():
        (q, k, v), _ = inputs(rng, c, requires_grad=True)
        out = mmfa_torch.block_sparse_attention(q, k, v, mask_of(c, random_map(rng, c)), is_causal=True,
                                                implementation=impl)
        out.sum().backward()

    call()
    with compiles.counted() as seen:
        call()
    assert seen.total == 0, f"a warm call compiled: {seen}"


# ------------------------------------------------------------------------------------------------
# torch.compile.


@pytest.mark.parametrize("where", ["mask-passed-in", "mask-built-inside", "indices-and-positions-inside"])
def test_torch_compile_fullgraph_forward_and_backward(rng, where):
    """One graph (fullgraph=True): the map built inside (the builders' custom ops, from a block
    map, or from index lists with positions) or a mask passed in, the attention's forward and
    backward custom ops; against the reference."""
    impl = "interpret" if where == "mask-passed-in" else "xla"
    c = Case(B=1, T=40, S=48, Hq=4, Hkv=2, block=(16, 16), causal=True)
    blocks = random_map(rng, c)
    (q, k, v), (q64, k64, v64) = inputs(rng, c, requires_grad=True)
    token_mask = block_sparse_mask(blocks, c.block, c.T, c.S)
    if where == "mask-passed-in":
        arg = mask_of(c, blocks)
        build = lambda mask: mask  # noqa: E731
    elif where == "mask-built-inside":
        arg = torch.from_numpy(blocks)
        build = lambda blocks: BlockMask.from_dense(blocks, c.block, seq_lens=(c.T, c.S))  # noqa: E731
    else:
        # Query positions reversed inside each query block, keys in order: the causal mask then
        # differs from the index order's inside the diagonal blocks.
        q_pos = np.concatenate([np.arange(i, min(i + 16, c.T))[::-1] for i in range(0, c.T, 16)])[None]
        kv_pos = np.arange(c.S)[None]
        arg = tuple(torch.from_numpy(x) for x in (np.argsort(~blocks, axis=-1, kind="stable"), blocks.sum(-1), q_pos,
                                                   kv_pos))
        build = lambda lists: BlockMask.from_indices(*lists[:2], c.block, seq_lens=(c.T, c.S),  # noqa: E731
                                                     positions=lists[2:])
        token_mask = token_mask & (kv_pos[:, None, None, :] <= q_pos[:, None, :, None])
    if where != "indices-and-positions-inside":
        token_mask = token_mask & np.tril(np.ones((c.T, c.S), bool))

    def f(q, k, v, arg):
        out, lse = mmfa_torch.block_sparse_attention(q, k, v, build(arg), is_causal=True, implementation=impl,
                                                     return_lse=True)
        return (out * out).sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum() * 0.5, out

    torch._dynamo.reset()
    loss, out = torch.compile(f, fullgraph=True)(q, k, v, arg)
    loss.backward()
    ref_out, ref_lse = attention_reference(q64, k64, v64, mask=token_mask)
    assert_close(btnh(to_numpy(out)), ref_out, tolerance(c.dtype), "compiled out")
    want = attention_reference_grads(q64, k64, v64, 2 * ref_out, np.where(np.isfinite(ref_lse), 0.5, 0.0),
                                     mask=token_mask)
    for what, t, w in zip(("dq", "dk", "dv"), (q, k, v), want):
        assert_close(btnh(to_numpy(t.grad)), w, tolerance(c.dtype, grad=True), f"compiled {what}")


# ------------------------------------------------------------------------------------------------
# Errors: the argument and its value named.


def _errors():
    blocks = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    good = BlockMask.from_dense(blocks, (16, 16), seq_lens=(64, 64))
    q = torch.ones(2, 4, 64, 16)
    k = torch.ones(2, 2, 64, 16)

    def attend(mask=good, query=q, key=k, **kw):
        return lambda: mmfa_torch.block_sparse_attention(query, key, key, mask, **kw)

    def dense(b=blocks, size=(16, 16), lens=(64, 64)):
        return lambda: BlockMask.from_dense(b, size, seq_lens=lens)

    idx, cnt = torch.zeros(1, 1, 4, 2, dtype=torch.int64), torch.ones(1, 1, 4, dtype=torch.int64)

    def indices(i=idx, c=cnt):
        return lambda: BlockMask.from_indices(i, c, (16, 16), seq_lens=(64, 64))

    def mask(shape, size=16, lens=(64, 64)):
        return BlockMask.from_dense(torch.ones(shape, dtype=torch.bool), size, seq_lens=lens)

    return {
        "blocks-numpy": (dense(b=np.ones((1, 1, 4, 4), bool)), ArgumentTypeError,
                         "blocks must be a bool torch.Tensor, got ndarray"),
        "blocks-dtype": (dense(b=torch.ones(1, 1, 4, 4, dtype=torch.int32)), ArgumentTypeError,
                         "blocks must be a boolean block map, got dtype torch.int32"),
        "blocks-shape": (dense(b=torch.ones(1, 1, 3, 4, dtype=torch.bool)), ArgumentError, "got shape (1, 1, 3, 4)"),
        "block-size-zero": (dense(size=(0, 16)), ArgumentError, "block_size (block_q) must be positive, got 0"),
        "block-size-float": (dense(size=(16.0, 16)), ArgumentTypeError, "block_size (block_q) must be an integer"),
        "seq-lens-int": (dense(lens=64), ArgumentError, "seq_lens must be a pair (T, S), got 64"),
        "indices-dtype": (indices(i=idx.float()), ArgumentTypeError,
                          "indices must be integers, got dtype torch.float32"),
        "counts-range": (indices(c=cnt.clone().index_fill_(2, torch.tensor([2]), 3)), ArgumentError,
                         "counts must lie in [0, 2]"),
        "indices-range": (indices(i=idx.clone().index_fill_(2, torch.tensor([1]), 4)), ArgumentError,
                          "indices must lie in [0, 4)"),
        "positions-not-pair": (lambda: BlockMask.from_dense(blocks, 16, seq_lens=(64, 64), positions=torch.arange(64)),
                               ArgumentTypeError, "positions must be a pair"),
        "positions-dtype": (lambda: BlockMask.from_dense(blocks, 16, seq_lens=(64, 64),
                                                         positions=(torch.ones(1, 64), torch.arange(64)[None])),
                            ArgumentTypeError, "positions[0] must be integers, got dtype torch.float32"),
        "positions-shape": (lambda: BlockMask.from_dense(blocks, 16, seq_lens=(64, 64),
                                                         positions=(torch.arange(64)[None], torch.arange(32)[None])),
                            ArgumentError, "positions[1] must be (B, 64), got shape (1, 32)"),
        "flex-type": (lambda: BlockMask.from_flex(blocks), ArgumentTypeError, "flex_mask must be a FlexAttention"),
        "not-a-mask": (attend(mask=blocks), ArgumentTypeError, "block_mask must be a mmfa_torch.BlockMask"),
        "jax-mask": (attend(mask=good.to_jax()), ArgumentTypeError, "got BlockMask"),
        "seq-lens-mismatch": (attend(mask=mask((1, 1, 4, 5), lens=(64, 80))), ArgumentError,
                              "seq_lens (T, S) = (64, 80), but query and key have T=64, S=64"),
        "map-heads": (attend(mask=mask((1, 3, 4, 4))), ArgumentError, "heads 3"),
        "map-batch": (attend(mask=mask((3, 1, 4, 4))), ArgumentError, "batch 3"),
        "kernel-block": (attend(mask=mask((1, 1, 2, 4), size=(48, 16)), implementation="interpret"), ArgumentError,
                         "block_q must be a power of two from 16 to 256 for the kernels"),
        "query-dtype": (attend(query=q.double()), ArgumentTypeError, "query must be float16, bfloat16 or float32, got "
                                                                     "torch.float64"),
        "query-type": (attend(query=q.numpy()), ArgumentTypeError, "query must be a torch.Tensor, got ndarray"),
        "query-rank": (attend(query=q[0]), ArgumentError, "query must have rank 4 (B, H, L, D), got shape (4, 64, 16)"),
        "dtypes-differ": (attend(key=k.half()), ArgumentTypeError, "query, key and value must share a dtype"),
        "gqa": (attend(key=torch.ones(2, 3, 64, 16)), ArgumentError,
                "number of query heads (4) must be a multiple of the key/value heads (3)"),
        "scale": (attend(scale="big"), ArgumentTypeError, "scale must be a real number, got 'big'"),
        "implementation": (attend(implementation="cuda"), ValueError, "implementation must be one of"),
        "pallas-on-cpu": (attend(implementation="pallas"), ValueError, "implementation='pallas' needs an NVIDIA GPU"),
    }


ERRORS = ["blocks-numpy", "blocks-dtype", "blocks-shape", "block-size-zero", "block-size-float", "seq-lens-int",
          "indices-dtype", "counts-range", "indices-range", "positions-not-pair", "positions-dtype", "positions-shape",
          "flex-type", "not-a-mask", "jax-mask", "seq-lens-mismatch",
          "map-heads", "map-batch", "kernel-block", "query-dtype", "query-type", "query-rank", "dtypes-differ", "gqa",
          "scale", "implementation", "pallas-on-cpu"]


def test_every_error_case_is_run():
    assert sorted(_errors()) == sorted(ERRORS)


@pytest.mark.parametrize("name", ERRORS)
def test_argument_errors(name):
    call, kind, message = _errors()[name]
    with pytest.raises(kind) as info:
        call()
    assert message in str(info.value), str(info.value)
    if kind is not ValueError:
        assert isinstance(info.value, RuntimeError)  # as SDPA's errors


def test_double_backward_is_refused(rng):
    c = Case(B=1, T=32, S=32, Hq=2, Hkv=1, block=(16, 16))
    (q, k, v), _ = inputs(rng, c, requires_grad=True)
    out = mmfa_torch.block_sparse_attention(q, k, v, mask_of(c, random_map(rng, c)), implementation="xla")
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


# ------------------------------------------------------------------------------------------------
# CUDA tensors: the direct launch's plumbing without a GPU, and the numbers on one.


@pytest.mark.parametrize("causal, by_positions", [(False, False), (True, False), (True, True)],
                         ids=["full", "causal", "causal-positions"])
def test_direct_launch_names_every_kernel_operand(causal, by_positions):
    """For CUDA tensors mmfa_torch launches the kernels the JAX face lowers (official triton, here
    for an abstract H100, no GPU needed): forward, dQ and dK/dV, in the plans' order, each given
    exactly the operands its plan names from the tensors and the mask's lists (the launcher checks
    the count against the lowering; the shapes are checked here)."""
    pytest.importorskip("triton")
    from mmfa_jax import backends
    from mmfa_torch import sparse

    B, Hq, Hkv, T, S, D = 1, 4, 2, 200, 130, 64
    positions = (torch.randperm(T)[None], torch.randperm(S)[None]) if by_positions else None
    mask = BlockMask.from_dense(torch.rand(1, Hq, 4, 3) < 0.6, (64, 64), seq_lens=(T, S), positions=positions)
    q, k = torch.empty(B, T, Hq, D, dtype=torch.bfloat16), torch.empty(B, S, Hkv, D, dtype=torch.bfloat16)
    fwd, dq, dkv = sparse._launch_kernels(sparse._signature([q, k, k, *mask.leaves]), mask.structure, None, causal,
                                          backends.Lowering("xla-triton", 90, "sm90"), 90)
    lists = mask.lists(causal)
    named = dict(q=q, k=k, v=k, **sparse._kernel_operands(mask._view(), causal), d_out=q,
                 lse=torch.empty(B, Hq, T), delta=torch.empty(B, Hq, T))
    pos = tuple(mask._view().positions) if by_positions else ()  # the mask's own int32 positions
    assert len(pos) == 2 or not by_positions
    expect = {"mmfa_block_sparse_forward": (q, k, k, lists.kv_count, lists.kv_full, lists.kv_index, *pos),
              "mmfa_block_sparse_dq": (q, k, k, lists.kv_count, lists.kv_full, lists.kv_index, *pos, q, named["lse"],
                                       named["delta"]),
              "mmfa_block_sparse_dkv": (q, k, k, lists.q_offset, lists.q_count, lists.q_full, lists.q_index, *pos, q,
                                        named["lse"], named["delta"])}
    for kernel, grid in zip((fwd, dq, dkv), ((4, Hq, B), (4, Hq, B), (3, Hkv, B))):
        operands = kernel.plan.arguments(named)
        assert kernel.launch.operands == len(operands) == len(expect[kernel.plan.name]), kernel.plan.name
        assert all(a is b for a, b in zip(operands, expect[kernel.plan.name])), kernel.plan.name
        assert kernel.launch.grid == grid, kernel.plan.name
    assert [shape for shape, _ in fwd.launch.results] == [(B, T, Hq, D), (B, Hq, T)]
    assert [shape for shape, _ in dkv.launch.results] == [(B, S, Hkv, D)] * 2


@pytest.mark.gpu
@pytest.mark.parametrize("route", ["direct", "jax"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_tensors_match_reference(rng, route, dtype, monkeypatch):
    """CUDA tensors, through mmfa_torch's own launch ("direct") or JAX's GPU ("jax"): forward, LSE
    and gradients against the reference, with a map built on the GPU (GQA, ragged, causal, an
    empty query block, the map's heads broadcast), twice (warm plans)."""
    from mmfa_torch import launch

    if route == "jax":
        monkeypatch.setenv("MMFA_TORCH_LAUNCH", "jax")
    else:
        assert launch.enabled() and launch.available(), "the direct launch is not available on this GPU machine"
    DEVICE[0] = "cuda"
    c = Case(B=2, T=200, S=170, Hq=8, Hkv=2, D=64, block=(64, 32), causal=True, dtype=dtype, map_bn=("B", 1))
    for _ in range(2):
        blocks = random_map(rng, c)
        (q, k, v), (q64, k64, v64) = inputs(rng, c, requires_grad=True)
        mask = mask_of(c, blocks)
        assert mask.device.type == "cuda"
        out, lse = mmfa_torch.block_sparse_attention(q, k, v, mask, is_causal=True, return_lse=True)
        ref_out, ref_lse = block_sparse_reference(q64, k64, v64, blocks, c.block, is_causal=True)
        assert out.is_cuda and lse.is_cuda
        assert_close(btnh(to_numpy(out)), ref_out, tolerance(dtype), "out")
        assert_close(btnh(to_numpy(lse)), ref_lse, tolerance(dtype), "lse")
        d_out, d_out64 = tensor(rng, tuple(out.shape), dtype)
        d_lse = torch.from_numpy(rng.standard_normal(lse.shape)).float().cuda()
        torch.autograd.backward((out, lse), (d_out, d_lse))
        want = block_sparse_reference_grads(q64, k64, v64, blocks, c.block, d_out64, btnh(to_numpy(d_lse)),
                                            is_causal=True)
        for what, t, w in zip(("dq", "dk", "dv"), (q, k, v), want):
            assert_close(btnh(to_numpy(t.grad)), w, tolerance(dtype, grad=True), f"{route} {dtype}: {what}")


@pytest.mark.gpu
def test_cuda_torch_compile_fullgraph(rng):
    """The compiled graph on CUDA tensors (the map built inside it, on the GPU; mmfa_torch's own
    launch): forward and gradients against the reference."""
    DEVICE[0] = "cuda"
    c = Case(B=1, T=130, S=130, Hq=4, Hkv=2, D=64, block=(32, 32), causal=True, dtype="bfloat16")
    blocks = random_map(rng, c)
    (q, k, v), (q64, k64, v64) = inputs(rng, c, requires_grad=True)

    def f(q, k, v, blocks):
        mask = BlockMask.from_dense(blocks, c.block, seq_lens=(c.T, c.S))
        out = mmfa_torch.block_sparse_attention(q, k, v, mask, is_causal=True)
        return (out.float() ** 2).sum(), out

    torch._dynamo.reset()
    loss, out = torch.compile(f, fullgraph=True)(q, k, v, torch.from_numpy(blocks).cuda())
    loss.backward()
    ref_out, _ = block_sparse_reference(q64, k64, v64, blocks, c.block, is_causal=True)
    assert_close(btnh(to_numpy(out)), ref_out, tolerance(c.dtype), "compiled out")
    want = block_sparse_reference_grads(q64, k64, v64, blocks, c.block, 2 * btnh(to_numpy(out)), is_causal=True)
    for what, t, w in zip(("dq", "dk", "dv"), (q, k, v), want):
        assert_close(btnh(to_numpy(t.grad)), w, tolerance(c.dtype, grad=True), f"compiled {what}")
