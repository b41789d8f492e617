"""Drop-in means the same answer for the same call (issue 15 §5).

mmfa is measured here against the anchors it claims to replace, run on the CPU: ``jax.nn.
dot_product_attention`` (implementation="xla"), ``torch.nn.functional.scaled_dot_product_attention``
and Flax's attention modules with their own ``attention_fn``. Everything is float32, so the anchors
and mmfa differ only by summation order (tolerance: conftest's float32 tolerance, 2e-5 of max|ref|).

What the anchors give for a query row that sees no key (checked on the versions installed):
jax.nn and Flax give the mean of the values (the row's logits are all the same large negative
number), torch SDPA (CPU) gives zeros, mmfa and the float64 reference give zeros. Top-left causal
masks never empty a row (row i always sees key 0), so only bottom-right alignment with T > S and
explicit masks produce such rows; where they do, the comparison is restricted to rows that see a
key (jax.nn, Flax), or made everywhere (torch SDPA, the reference: both define them as zeros).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_close, normal, to_numpy, tolerance
from flax import nnx
from reference import attention_reference
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import mmfa_jax
import mmfa_torch
from mmfa_jax._checks import ArgumentError, ArgumentTypeError
from mmfa_jax.flax import make_attention_fn

TOL = tolerance("float32")


GRAD_TOL = tolerance("float32", grad=True)
CROSS = pytest.mark.parametrize("T,S", [(5, 11), (11, 5)], ids=["T<S", "T>S"])


def jnn(q, k, v, **kw):
    """The JAX anchor: jax.nn.dot_product_attention in plain XLA."""
    return jax.nn.dot_product_attention(q, k, v, implementation="xla", **kw)


def tensor(rng, shape, requires_grad=False):
    """A float32 CPU tensor of unit normal data (fresh from ``rng``)."""
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(DEVICE[0]).requires_grad_(requires_grad)


def torch_grads(fn, tensors, weight):
    """(out, grads of sum(out * weight) w.r.t. ``tensors``) for a fresh graph of ``fn``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    return out.detach(), grads


def assert_close_where_defined(actual, anchor, tol, what):
    """Compare with an anchor where it is defined (finite); where it is not (NaN, a row that sees
    no key in an anchor that gives NaN there), mmfa must give its own answer, zeros."""
    a, e = to_numpy(actual), to_numpy(anchor)
    defined = np.isfinite(e)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert_close(a[defined], e[defined], tol, what)
    assert not np.any(a[~defined]), f"{what}: nonzero where the anchor is undefined"


def btnh(a):
    """(B, H, L, D) <-> (B, L, H, D) for NumPy arrays."""
    return np.swapaxes(np.asarray(a), 1, 2)


# ------------------------------------------------------------------------------------------------
# 1. is_causal with T != S, and the bottom-right alignment


@CROSS
def test_jax_is_causal_cross_lengths_equals_jax_nn(rng, impl, T, S):
    """mmfa_jax.attention(is_causal=True) with T != S is jax.nn's top-left causal mask (query i sees
    keys j <= i): the same output and the same q/k/v gradients as jax.nn.dot_product_attention
    (xla), and the float64 reference's. Top-left, no row is empty, so every entry is compared."""
    q, q64 = normal(rng, (2, T, 4, 16))
    k, k64 = normal(rng, (2, S, 2, 16))
    v, v64 = normal(rng, (2, S, 2, 16))
    w = jnp.asarray(rng.standard_normal((2, T, 4, 16)), jnp.float32)
    ours = mmfa_jax.attention(q, k, v, is_causal=True, implementation=impl)
    theirs = jnn(q, k, v, is_causal=True)
    assert_close(ours, to_numpy(theirs), TOL, "out vs jax.nn")
    assert_close(ours, attention_reference(q64, k64, v64, is_causal=True)[0], TOL, "out vs reference")

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * w)

    g_ours = jax.grad(loss(lambda q, k, v: mmfa_jax.attention(q, k, v, is_causal=True, implementation=impl)),
                      argnums=(0, 1, 2))(q, k, v)
    g_theirs = jax.grad(loss(lambda q, k, v: jnn(q, k, v, is_causal=True)), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_ours, g_theirs):
        assert_close(a, to_numpy(b), GRAD_TOL, f"d{name} vs jax.nn")


@CROSS
def test_torch_is_causal_cross_lengths_equals_sdpa(rng, impl, T, S):
    """mmfa_torch.scaled_dot_product_attention(is_causal=True) with L != S is SDPA's top-left causal
    mask: the same output and q/k/v gradients as torch's SDPA given the same call (GQA included,
    enable_gqa=True on both)."""
    q, k, v = tensor(rng, (2, 4, T, 16)), tensor(rng, (2, 2, S, 16)), tensor(rng, (2, 2, S, 16))
    w = tensor(rng, (2, 4, T, 16))
    out, grads = torch_grads(lambda q, k, v: mmfa_torch.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True, implementation=impl), (q, k, v), w)
    want, want_grads = torch_grads(lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True), (q, k, v), w)
    assert_close(out, to_numpy(want), TOL, "out vs SDPA")
    for name, a, b in zip("qkv", grads, want_grads):
        assert_close(a, to_numpy(b), GRAD_TOL, f"d{name} vs SDPA")


@CROSS
def test_bottom_right_equals_reference_and_causal_lower_right(rng, impl, T, S):
    """causal_alignment="bottom_right" (query i sees keys j <= i + S - T) is the reference's
    bottom_right=True in the jax face (output and LSE), and in the torch face it is SDPA with
    attn_mask=causal_lower_right(L, S). With T > S the first T - S rows see nothing: the reference,
    SDPA (CPU, this torch) and mmfa all give zeros there (LSE -inf); torch warns that the lower-right
bias may give NaN there, so SDPA is compared where it is defined and mmfa must give zeros elsewhere."""
    q, q64 = normal(rng, (2, T, 2, 16))
    k, k64 = normal(rng, (2, S, 2, 16))
    v, v64 = normal(rng, (2, S, 2, 16))
    out, lse = mmfa_jax.attention(q, k, v, is_causal=True, causal_alignment="bottom_right", return_lse=True,
                                  implementation=impl)
    ref_out, ref_lse = attention_reference(q64, k64, v64, is_causal=True, bottom_right=True)
    assert_close(out, ref_out, TOL, "jax out vs reference")
    assert_close(lse, ref_lse, TOL, "jax lse vs reference")

    tq, tk, tv = (torch.from_numpy(btnh(x).astype(np.float32)).to(DEVICE[0]) for x in (q, k, v))
    got = mmfa_torch.scaled_dot_product_attention(tq, tk, tv, is_causal=True, causal_alignment="bottom_right",
                                                  implementation=impl)
    # The anchor on the CPU: for L > S its kernels give zeros in the rows that see no key, where its
    # CUDA kernels leave values that mean nothing.
    want = F.scaled_dot_product_attention(tq.cpu(), tk.cpu(), tv.cpu(), attn_mask=causal_lower_right(T, S))
    assert_close_where_defined(got, want, TOL, "torch out vs SDPA causal_lower_right")
    assert_close(got, btnh(ref_out), TOL, "torch out vs reference")


# ------------------------------------------------------------------------------------------------
# 2. torch's CausalBias


@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@CROSS
def test_torch_causal_bias_honoured_with_gradients(rng, impl, variant, T, S):
    """attn_mask=causal_upper_left(L, S) / causal_lower_right(L, S) means exactly what SDPA makes of
    it: the same output and the same q/k/v gradients as SDPA given the same CausalBias (compared
    where SDPA is defined: for lower_right with L > S torch warns of NaN in the rows that see no key,
    though its CPU kernel gives zeros; there mmfa must give zeros)."""
    make = causal_upper_left if variant == "upper_left" else causal_lower_right
    q, k, v = tensor(rng, (2, 2, T, 16)), tensor(rng, (2, 2, S, 16)), tensor(rng, (2, 2, S, 16))
    w = tensor(rng, (2, 2, T, 16))
    out, grads = torch_grads(lambda q, k, v: mmfa_torch.scaled_dot_product_attention(
        q, k, v, attn_mask=make(T, S), implementation=impl), (q, k, v), w)
    # The anchor on the CPU: for lower_right with L > S its CUDA kernels leave values that mean
    # nothing in the rows that see no key (and in the gradients through them).
    want, want_grads = torch_grads(lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=make(T, S)), tuple(t.detach().cpu() for t in (q, k, v)), w.detach().cpu())
    assert_close_where_defined(out, want, TOL, f"out vs SDPA {variant}")
    for name, a, b in zip("qkv", grads, want_grads):
        assert_close_where_defined(a, b, GRAD_TOL, f"d{name} vs SDPA {variant}")


# ------------------------------------------------------------------------------------------------
# 3. jax masks of rank 1, 2, 3


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_jax_mask_ranks_equal_jax_nn(rng, impl, rank):
    """A boolean mask of rank 1 (S,), 2 (T, S) or 3 (N, T, S) is accepted and broadcast as jax.nn
    broadcasts it (right-aligned against (B, N, T, S)): the same output as jax.nn with the same
    mask, and the reference's. Every row keeps at least one key, so no row is empty (where jax.nn
    and mmfa would differ by design)."""
    B, T, S, N = 2, 7, 9, 2
    shape = {1: (S,), 2: (T, S), 3: (N, T, S)}[rank]
    m = rng.random(shape) > 0.4
    m[..., int(rng.integers(S))] = True  # one key every row sees
    mask = jnp.asarray(m)
    q, q64 = normal(rng, (B, T, N, 16))
    k, k64 = normal(rng, (B, S, N, 16))
    v, v64 = normal(rng, (B, S, N, 16))
    ours = mmfa_jax.attention(q, k, v, mask=mask, implementation=impl)
    assert_close(ours, to_numpy(jnn(q, k, v, mask=mask)), TOL, f"rank-{rank} mask vs jax.nn")
    assert_close(ours, attention_reference(q64, k64, v64, mask=m)[0], TOL, f"rank-{rank} mask vs reference")


# ------------------------------------------------------------------------------------------------
# 4. return_residual


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_return_residual_is_jax_nn_residual_without_gradient(rng, impl, dtype):
    """return_residual=True returns jax.nn's residual: shape (B, T, N), the query's dtype, equal to
    jax.nn.dot_product_attention(..., return_residual=True)'s; no gradient flows through it
    (jax.grad of residual.sum() w.r.t. q, k, v is exactly zero), while the output keeps its own
    gradient (the same as without return_residual)."""
    q, _ = normal(rng, (2, 6, 4, 16), dtype)
    k, _ = normal(rng, (2, 9, 2, 16), dtype)
    v, _ = normal(rng, (2, 9, 2, 16), dtype)

    def ours(q, k, v):
        return mmfa_jax.attention(q, k, v, is_causal=True, return_residual=True, implementation=impl)

    out, res = ours(q, k, v)
    want_out, want_res = jnn(q, k, v, is_causal=True, return_residual=True)
    assert res.shape == (2, 6, 4) == want_res.shape
    assert res.dtype == q.dtype == want_res.dtype
    assert out.dtype == q.dtype
    assert_close(out, to_numpy(want_out), tolerance(dtype), "out vs jax.nn")
    assert_close(res, to_numpy(want_res), tolerance(dtype), "residual vs jax.nn")

    g_res = jax.grad(lambda q, k, v: ours(q, k, v)[1].astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)
    for name, g in zip("qkv", g_res):
        assert not np.any(to_numpy(g)), f"d residual / d{name} is not zero"
    g_out = jax.grad(lambda q: ours(q, k, v)[0].astype(jnp.float32).sum())(q)
    g_plain = jax.grad(lambda q: mmfa_jax.attention(q, k, v, is_causal=True, implementation=impl)
                       .astype(jnp.float32).sum())(q)
    np.testing.assert_array_equal(to_numpy(g_out), to_numpy(g_plain))


# ------------------------------------------------------------------------------------------------
# 5. torch batch broadcasting


def test_torch_unbatched_query_against_batched_key_value(rng, impl):
    """SDPA broadcasts a query (H, L, D) = (4, 3, 8) against key/value (B, H, S, D) = (4, 4, 6, 8)
    to an output (4, 4, 3, 8); mmfa_torch gives that shape and SDPA's values."""
    q, k, v = tensor(rng, (4, 3, 8)), tensor(rng, (4, 4, 6, 8)), tensor(rng, (4, 4, 6, 8))
    want = F.scaled_dot_product_attention(q, k, v)
    got = mmfa_torch.scaled_dot_product_attention(q, k, v, implementation=impl)
    assert tuple(got.shape) == tuple(want.shape) == (4, 4, 3, 8)
    assert_close(got, to_numpy(want), TOL, "broadcast query vs SDPA")


def test_torch_query_batch_one_against_batch_two(rng, impl):
    """A query of batch 1 (1, H, L, D) against key/value of batch 2 (2, H, S, D) broadcasts as in
    SDPA: output (2, H, L, D) equal to SDPA's, and the query's gradient (summed over the broadcast
    batch) equal to SDPA's too."""
    q, k, v = tensor(rng, (1, 2, 5, 16)), tensor(rng, (2, 2, 7, 16)), tensor(rng, (2, 2, 7, 16))
    w = tensor(rng, (2, 2, 5, 16))
    got, grads = torch_grads(lambda q, k, v: mmfa_torch.scaled_dot_product_attention(q, k, v, implementation=impl),
                             (q, k, v), w)
    want, want_grads = torch_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), (q, k, v), w)
    assert tuple(got.shape) == tuple(want.shape) == (2, 2, 5, 16)
    assert_close(got, to_numpy(want), TOL, "batch-1 query vs SDPA")
    for name, a, b in zip("qkv", grads, want_grads):
        assert tuple(a.shape) == tuple(b.shape), f"d{name} shape"
        assert_close(a, to_numpy(b), GRAD_TOL, f"d{name} vs SDPA")


# ------------------------------------------------------------------------------------------------
# 6. torch errors are what `except RuntimeError` catches


def _bad_calls(rng):
    q, k, v = tensor(rng, (1, 2, 5, 16)), tensor(rng, (1, 2, 5, 16)), tensor(rng, (1, 2, 5, 16))
    return {
        "mixed dtypes": ((q, k.double(), v), {}),
        "1-D inputs": ((tensor(rng, (16,)), tensor(rng, (16,)), tensor(rng, (16,))), {}),
        "Hq != Hkv without enable_gqa": ((tensor(rng, (1, 4, 5, 16)), k, v), {}),
    }


@pytest.mark.parametrize("case", ["mixed dtypes", "1-D inputs", "Hq != Hkv without enable_gqa"])
def test_torch_errors_are_runtime_errors_where_sdpa_raises_one(rng, impl, case):
    """Where SDPA raises RuntimeError (mixed dtypes, 1-D inputs, Hq != Hkv without enable_gqa),
    mmfa_torch raises too, an exception that `except RuntimeError` catches and that is also a
    ValueError or TypeError (ArgumentError / ArgumentTypeError)."""
    args, kw = _bad_calls(rng)[case]
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(*args, **kw)
    with pytest.raises(RuntimeError) as info:
        mmfa_torch.scaled_dot_product_attention(*args, implementation=impl, **kw)
    assert isinstance(info.value, (ValueError, TypeError)), type(info.value).__mro__
    assert isinstance(info.value, (ArgumentError, ArgumentTypeError)), type(info.value).__mro__


# ------------------------------------------------------------------------------------------------
# 7. Flax modules, cross-attention with causality


@pytest.mark.parametrize("where", ["call", "adapter"])
def test_nnx_cross_attention_causal_equals_flax(rng, impl, where):
    """nnx.MultiHeadAttention with mmfa's attention_fn, cross-attention (T=6 queries, S=10 keys) and
    causality (the module's is_causal=True at the call, or make_attention_fn(is_causal=True)),
    gives the output of the same module (same parameters: the same Rngs) with Flax's own
    attention_fn, nnx.dot_product_attention, called with is_causal=True, and with Flax's explicit
    causal mask tril((T, S)) instead; plus a key padding mask (nnx.make_attention_mask) combined
    with causality, where the rows of padded queries, which see nothing, are left out (Flax gives
    them the mean of the values, mmfa zeros)."""
    T, S, F_ = 6, 10, 32
    xq = jnp.asarray(rng.standard_normal((2, T, F_)), jnp.float32)
    xkv = jnp.asarray(rng.standard_normal((2, S, F_)), jnp.float32)
    seed = int(rng.integers(1 << 30))
    kwargs = {"num_heads": 4, "in_features": F_, "decode": False}
    fn = make_attention_fn(implementation=impl, is_causal=where == "adapter")
    ours = nnx.MultiHeadAttention(**kwargs, rngs=nnx.Rngs(seed), attention_fn=fn)
    theirs = nnx.MultiHeadAttention(**kwargs, rngs=nnx.Rngs(seed))
    call = {"is_causal": True} if where == "call" else {}

    want = theirs(xq, xkv, is_causal=True)
    tril = jnp.broadcast_to(jnp.tril(jnp.ones((T, S), bool)), (2, 1, T, S))
    np.testing.assert_allclose(theirs(xq, xkv, mask=tril), want, atol=1e-5)  # Flax's two spellings agree
    got = ours(xq, xkv, **call)
    assert_close(got, to_numpy(want), TOL, "nnx causal cross-attention")

    q_keep = jnp.asarray(rng.random((2, T)) > 0.3)
    kv_keep = jnp.asarray(rng.random((2, S)) > 0.3).at[:, 0].set(True)  # every kept row sees key 0
    pad = nnx.make_attention_mask(q_keep, kv_keep)
    live = q_keep[..., None]
    want = theirs(xq, xkv, mask=pad, is_causal=True)
    got = ours(xq, xkv, mask=pad, **call)
    assert_close(jnp.where(live, got, 0), to_numpy(jnp.where(live, want, 0)), TOL, "nnx causal + padding")


def test_linen_cross_attention_causal_equals_flax(rng, impl):
    """linen.MultiHeadDotProductAttention with make_attention_fn(is_causal=True), cross-attention
    (T=6, S=10), equals the same module (same parameters) with Flax's own attention and Flax's
    explicit top-left causal mask tril((T, S)); the parameter gradients agree too."""
    T, S, F_ = 6, 10, 32
    xq = jnp.asarray(rng.standard_normal((2, T, F_)), jnp.float32)
    xkv = jnp.asarray(rng.standard_normal((2, S, F_)), jnp.float32)
    tril = jnp.tril(jnp.ones((T, S), bool))[None, None]
    ours = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=make_attention_fn(implementation=impl,
                                                                                       is_causal=True))
    theirs = nn.MultiHeadDotProductAttention(num_heads=4)
    params = theirs.init(jax.random.key(int(rng.integers(1 << 30))), xq, xkv)
    got = ours.apply(params, xq, xkv)
    want = theirs.apply(params, xq, xkv, mask=tril)
    assert_close(got, to_numpy(want), TOL, "linen causal cross-attention")

    g_ours = jax.grad(lambda p: jnp.sum(jnp.sin(ours.apply(p, xq, xkv))))(params)
    g_theirs = jax.grad(lambda p: jnp.sum(jnp.sin(theirs.apply(p, xq, xkv, mask=tril))))(params)
    # All parameters at once, relative to the largest gradient: the key projection's bias has an
    # exactly zero gradient (a constant shift of every logit of a row), mere rounding noise in both.
    flat = [np.concatenate([to_numpy(x).ravel() for x in jax.tree.leaves(g)]) for g in (g_ours, g_theirs)]
    assert_close(flat[0], flat[1], GRAD_TOL, "linen parameter gradients")


# ------------------------------------------------------------------------------------------------
# Defect 4: torch attn_mask (S,) and (L, S)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", ["S", "LS"])
def test_torch_attn_mask_broadcast_shapes_equal_sdpa(rng, impl, kind, shape):
    """attn_mask of shape (S,) or (L, S), bool or additive float, broadcasts as SDPA broadcasts it
    (right-aligned against (B, H, L, S)): the output equals SDPA's, and for a float mask the
    gradients (q, k, v and the mask, of the mask's own shape) equal SDPA's too. SDPA is run with
    its math backend: its default CPU kernel raises IndexError for a rank-1 mask in this torch,
    whereas the math backend implements the documented broadcast."""
    L, S = 6, 9
    mshape = (S,) if shape == "S" else (L, S)
    if kind == "bool":
        m = rng.random(mshape) > 0.4
        m[..., int(rng.integers(S))] = True
        mask = torch.from_numpy(m).to(DEVICE[0])
    else:
        mask = tensor(rng, mshape)
    q, k, v = tensor(rng, (2, 2, L, 16)), tensor(rng, (2, 2, S, 16)), tensor(rng, (2, 2, S, 16))
    w = tensor(rng, (2, 2, L, 16))
    inputs = (q, k, v) + ((mask,) if kind == "float" else ())

    def ours(q, k, v, b=mask):
        return mmfa_torch.scaled_dot_product_attention(q, k, v, attn_mask=b, implementation=impl)

    def theirs(q, k, v, b=mask):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=b)

    got, grads = torch_grads(ours, inputs, w)
    want, want_grads = torch_grads(theirs, inputs, w)
    assert_close(got, to_numpy(want), TOL, f"attn_mask {mshape} vs SDPA")
    for name, a, b in zip(["q", "k", "v", "attn_mask"], grads, want_grads):
        assert tuple(a.shape) == tuple(b.shape), f"d{name} shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert_close(a, to_numpy(b), GRAD_TOL, f"d{name} vs SDPA")


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_torch_attn_mask_wrong_shape_names_attn_mask(rng, impl, kind):
    """An attn_mask that does not broadcast to (B, H, L, S) ((L + 1, S) here; SDPA raises too)
    raises an error whose message names attn_mask, the argument as the torch user spells it."""
    L, S = 6, 9
    q, k, v = tensor(rng, (2, 2, L, 16)), tensor(rng, (2, 2, S, 16)), tensor(rng, (2, 2, S, 16))
    mask = torch.from_numpy(rng.random((L + 1, S)) > 0.4).to(DEVICE[0]) if kind == "bool" else tensor(rng, (L + 1, S))
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.raises(RuntimeError, match="attn_mask"):
        mmfa_torch.scaled_dot_product_attention(q, k, v, attn_mask=mask, implementation=impl)
