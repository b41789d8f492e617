"""Regression tests for the defects of issue 15 §3, each named after the defect it pins down.

Both faces (mmfa_jax, mmfa_torch on CPU tensors, which cross to jax) and the CPU implementations
("interpret": the Pallas kernels in the interpreter; "xla") are run; the float64 NumPy reference in
tests/reference.py is the judge. Shapes are tiny so that the interpreter is quick. (Defect 4, torch
attn_mask of shape (S,) / (L, S), is in test_dropin.py; defect 8, the CLI, in test_cli.py.)
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import DEVICE, assert_close, normal, to_numpy, tolerance
from reference import attention_reference, importance_reference, select_reference

import mmfa_jax
import mmfa_torch
from mmfa_jax._checks import ArgumentError

TOL = tolerance("float32")




def t(x):
    """A torch tensor of a NumPy / jax array (copied), on the implementation's device."""
    return torch.from_numpy(np.array(x)).to(DEVICE[0])


def bnth(a):
    """(B, T, N, H) <-> (B, N, T, H) (and (B, T, N) <-> (B, N, T)) for NumPy arrays, contiguous."""
    return np.ascontiguousarray(np.swapaxes(np.asarray(a), 1, 2))


def visual_layout(rng, B, S, n_text=4):
    """bool (B, S) visual mask with ``n_text`` text tokens per example (at random places), the
    rest visual."""
    vis = np.ones((B, S), bool)
    for b in range(B):
        vis[b, rng.choice(S, n_text, replace=False)] = False
    return vis


def kept_of(indices, lengths):
    """The kept positions per example, as a list of int arrays."""
    indices, lengths = (np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x) for x in (indices, lengths))
    return [indices[b, :lengths[b]].astype(np.int64) for b in range(len(lengths))]


def assert_same_kept(got, want, what):
    assert len(got) == len(want)
    for b, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(g, w, err_msg=f"{what}: example {b}")


def run_attention(face, impl, q, k, v, bias=None, **kw):
    """(out (B, T, N, H), lse (B, T, N)) as float64 NumPy from one face, for BTNH NumPy inputs
    (the torch face gets them in its (B, H, L, D) layout and gives its results back in BTNH)."""
    if face == "jax":
        kw = {name: jnp.asarray(x) if isinstance(x, np.ndarray) else x for name, x in kw.items()}
        out, lse = mmfa_jax.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                      None if bias is None else jnp.asarray(bias), return_lse=True,
                                      implementation=impl, **kw)
        return to_numpy(out), to_numpy(lse)
    kw = {name: t(x) if isinstance(x, np.ndarray) else x for name, x in kw.items()}
    out, lse = mmfa_torch.scaled_dot_product_attention(
        t(bnth(q)), t(bnth(k)), t(bnth(v)), attn_mask=None if bias is None else t(bias),
        enable_gqa=q.shape[2] != k.shape[2], return_lse=True, implementation=impl, **kw)
    return bnth(to_numpy(out)), bnth(to_numpy(lse))


def data(rng, *shapes):
    """float32 NumPy unit normal arrays (fresh per call)."""
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


FACES = pytest.mark.parametrize("face", ["jax", "torch"])


# ------------------------------------------------------------------------------------------------
# Defect 1: keep=1.0 and keep_count=1 never share a cache entry


@pytest.mark.parametrize("order", ["ratio_first", "count_first"])
def test_keep_ratio_one_and_keep_count_one_never_collide(rng, impl, order):
    """keep=1.0 (all visual tokens) and keep_count=1 (one) called one after the other in one
    process, in either order, each give their own answer in mmfa_jax.select_visual_tokens,
    mmfa_torch.select_visual_tokens, mmfa_jax.multimodal_attention and
    mmfa_torch.multimodal_attention (kept positions as select_reference says; attention over the
    kept tokens as the reference says). Each order uses its own sequence length so that it meets
    fresh caches: the first rule of the pair fills them, the second must not hit its entry."""
    B, N, K, H = 2, 2, 1, 16
    S = 12 if order == "ratio_first" else 13
    vis = visual_layout(rng, B, S)
    importance = rng.standard_normal((B, S)).astype(np.float32)
    q, k, v = data(rng, (B, S, N, H), (B, S, K, H), (B, S, K, H))
    rules = [("keep", 1.0), ("keep_count", 1)]
    if order == "count_first":
        rules.reverse()
    for name, value in rules:
        rule = {name: value}
        want = select_reference(importance, vis, value)
        idx, n = mmfa_jax.select_visual_tokens(jnp.asarray(importance), jnp.asarray(vis), **rule,
                                               implementation=impl)
        assert_same_kept(kept_of(idx, n), want, f"mmfa_jax.select_visual_tokens({rule})")
        idx, n = mmfa_torch.select_visual_tokens(t(importance), t(vis), **rule)
        assert_same_kept(kept_of(idx, n), want, f"mmfa_torch.select_visual_tokens({rule})")

        for face in ("jax", "torch"):
            if face == "jax":
                r = mmfa_jax.multimodal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(vis),
                                                  **rule, implementation=impl)
                out, idx, n, imp = to_numpy(r.out), r.indices, r.lengths, np.asarray(r.importance)
            else:
                o, idx, n, imp = mmfa_torch.multimodal_attention(t(bnth(q)), t(bnth(k)), t(bnth(v)), t(vis), **rule,
                                                                 implementation=impl)
                out, imp = bnth(to_numpy(o)), to_numpy(imp)
            kept = kept_of(idx, n)
            what = f"mmfa_{face}.multimodal_attention({rule})"
            assert_same_kept(kept, select_reference(imp, vis, value), what)
            n_visual = [int(vis[b, kb].sum()) for b, kb in enumerate(kept)]
            assert n_visual == ([int(vis[b].sum()) for b in range(B)] if name == "keep" else [1] * B), what
            for b, kb in enumerate(kept):
                ref = attention_reference(q[b:b + 1, kb], k[b:b + 1, kb], v[b:b + 1, kb])[0][0]
                assert_close(out[b, :len(kb)], ref, TOL, f"{what}: out of example {b}")
                assert not np.any(out[b, len(kb):]), f"{what}: rows past the length of example {b} are not zero"


# ------------------------------------------------------------------------------------------------
# Defect 2: a NaN reaches exactly the outputs that depend on it


B_, T_, S_, N_, K_, H_ = 2, 7, 9, 4, 2, 16
G_ = N_ // K_


def expect_nan(out, lse, ref_out, ref_lse, nan_out, nan_lse, what):
    """NaN exactly at ``nan_out`` / ``nan_lse`` (boolean masks), the reference everywhere else."""
    np.testing.assert_array_equal(np.isnan(out), nan_out, err_msg=f"{what}: NaN entries of the output")
    np.testing.assert_array_equal(np.isnan(lse), nan_lse, err_msg=f"{what}: NaN entries of the LSE")
    assert_close(np.where(nan_out, ref_out, out), ref_out, TOL, f"{what}: the output elsewhere")
    assert_close(np.where(nan_lse, ref_lse, lse), ref_lse, TOL, f"{what}: the LSE elsewhere")


@FACES
def test_nan_in_query_reaches_only_its_row_and_head(rng, impl, face):
    """A NaN in one element of q[b, i, n] makes output row (b, i) of head n NaN (all channels) and
    its LSE NaN, nothing else: other heads of the row, sharing its key/value head, and other rows
    equal the reference."""
    q, k, v = data(rng, (B_, T_, N_, H_), (B_, S_, K_, H_), (B_, S_, K_, H_))
    b, i, n, d = 1, 3, 2, 5
    ref_out, ref_lse = attention_reference(q, k, v)
    q[b, i, n, d] = np.nan
    out, lse = run_attention(face, impl, q, k, v)
    nan_out = np.zeros(out.shape, bool)
    nan_out[b, i, n] = True
    nan_lse = np.zeros(lse.shape, bool)
    nan_lse[b, i, n] = True
    expect_nan(out, lse, ref_out, ref_lse, nan_out, nan_lse, f"{face} NaN in q")


@FACES
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("where", ["k", "v"])
def test_nan_in_key_or_value_reaches_rows_that_see_it(rng, impl, face, where, causal):
    """A NaN in one element of k[b, j, h] makes every row that sees key j, in every query head of
    the group of h, NaN (all channels) with its LSE; a NaN in v[b, j, h, d] makes channel d of
    those rows NaN and leaves the LSE alone. Rows that do not see key j (with is_causal, the rows
    i < j; other examples and other groups) equal the reference. One exception, shared with
    jax.nn and torch SDPA: with is_causal, a NaN in v[b, j] may also reach channel d of rows i < j
    that share a tile with key j (probability 0 times NaN in the probabilities-times-values
    product); such entries are only checked to be either NaN or the reference's value. Values past
    the key length never leak (test_rows_that_see_no_key_give_zeros)."""
    q, k, v = data(rng, (B_, T_, N_, H_), (B_, S_, K_, H_), (B_, S_, K_, H_))
    b, j, h, d = 0, 4, 1, 3
    ref_out, ref_lse = attention_reference(q, k, v, is_causal=causal)
    (k if where == "k" else v)[b, j, h, d] = np.nan
    out, lse = run_attention(face, impl, q, k, v, is_causal=causal)
    rows = np.arange(T_) >= j if causal else np.ones(T_, bool)
    heads = np.arange(N_) // G_ == h
    sees = np.zeros((B_, T_, N_), bool)
    sees[b] = rows[:, None] & heads[None, :]
    nan_out = np.zeros(out.shape, bool)
    if where == "k":
        nan_out[:] = sees[..., None]
        nan_lse = sees
    else:
        nan_out[..., d] = sees
        nan_lse = np.zeros(lse.shape, bool)
        if causal:  # the 0 * NaN product: NaN allowed, where it appears, in rows before key j
            out = np.array(out, copy=True)
            leak = np.zeros(out.shape, bool)
            leak[b, :j, :, d] = heads[None, :]
            leak &= np.isnan(out)
            out[leak] = ref_out[leak]
    expect_nan(out, lse, ref_out, ref_lse, nan_out, nan_lse, f"{face} NaN in {where}")


@FACES
@pytest.mark.parametrize("visible", [True, False], ids=["visible", "masked"])
def test_nan_in_bias_reaches_only_its_row(rng, impl, face, visible):
    """A NaN in bias[b, n, i, j] (a full (B, N, T, S) bias, causal attention) makes output row
    (b, i) of head n NaN and its LSE NaN when query i sees key j; when the causal mask hides key j
    from query i (j > i) it reaches nothing. Everything else equals the reference."""
    q, k, v, bias = data(rng, (B_, T_, N_, H_), (B_, S_, K_, H_), (B_, S_, K_, H_), (B_, N_, T_, S_))
    b, n, i = 1, 3, 4
    j = 2 if visible else 6
    ref_out, ref_lse = attention_reference(q, k, v, bias=bias, is_causal=True)
    bias[b, n, i, j] = np.nan
    out, lse = run_attention(face, impl, q, k, v, bias, is_causal=True)
    nan_out = np.zeros(out.shape, bool)
    nan_lse = np.zeros(lse.shape, bool)
    if visible:
        nan_out[b, i, n] = True
        nan_lse[b, i, n] = True
    expect_nan(out, lse, ref_out, ref_lse, nan_out, nan_lse, f"{face} NaN in bias")


@FACES
@pytest.mark.parametrize("nan_in_hidden_keys", [False, True], ids=["clean", "nan-in-hidden-keys"])
def test_rows_that_see_no_key_give_zeros(rng, impl, face, nan_in_hidden_keys):
    """key_value_seq_lengths = (S - 3, 0): example 1 sees no key, so every row of it gives zeros
    (LSE -inf), never NaN, and example 0 equals the reference. With NaN placed in keys and values
    that no row sees (past the lengths), the result is the same: they reach nothing."""
    q, k, v = data(rng, (B_, T_, N_, H_), (B_, S_, K_, H_), (B_, S_, K_, H_))
    lengths = np.array([S_ - 3, 0], np.int32)
    ref_out, ref_lse = attention_reference(q, k, v, kv_lengths=lengths)
    if nan_in_hidden_keys:
        for x in (k, v):
            x[0, S_ - 3:, :, 1] = np.nan
            x[1, :, 0, 2] = np.nan
    out, lse = run_attention(face, impl, q, k, v, key_value_seq_lengths=lengths)
    assert not np.any(out[1]), "the example that sees no key is not all zeros"
    assert np.all(lse[1] == -np.inf), "the example that sees no key has an LSE other than -inf"
    assert_close(out, ref_out, TOL, "out")
    assert_close(lse, ref_lse, TOL, "lse")


# ------------------------------------------------------------------------------------------------
# Defect 3: output_length below the kept count raises


def test_output_length_below_kept_count_raises(rng, impl):
    """select_visual_tokens and multimodal_attention (both faces), with concrete inputs and an
    output_length shorter than the tokens an example keeps (4 text + ceil(0.5 * 8) visual = 8 > 5),
    raise an ArgumentError whose message names output_length, rather than dropping kept tokens.
    (On CUDA tensors the torch face checks on the device instead: the next test.)"""
    B, S, N, H = 2, 12, 2, 16
    vis = visual_layout(rng, B, S, n_text=4)
    importance = rng.standard_normal((B, S)).astype(np.float32)
    q, k, v = data(rng, (B, S, N, H), (B, S, N, H), (B, S, N, H))
    calls = {
        "mmfa_jax.select_visual_tokens": lambda: mmfa_jax.select_visual_tokens(
            jnp.asarray(importance), jnp.asarray(vis), 0.5, output_length=5, implementation=impl),
        "mmfa_jax.multimodal_attention": lambda: mmfa_jax.multimodal_attention(
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(vis), 0.5, output_length=5,
            implementation=impl),
    }
    if DEVICE[0] == "cpu":
        calls.update({
            "mmfa_torch.select_visual_tokens": lambda: mmfa_torch.select_visual_tokens(
                t(importance), t(vis), 0.5, output_length=5),
            "mmfa_torch.multimodal_attention": lambda: mmfa_torch.multimodal_attention(
                t(bnth(q)), t(bnth(k)), t(bnth(v)), t(vis), 0.5, output_length=5, implementation=impl),
        })
    failures = []
    for name, call in calls.items():
        try:
            call()
        except ArgumentError as e:
            if "output_length" not in str(e):
                failures.append(f"{name}: message does not name output_length: {e}")
        else:
            failures.append(f"{name}: no error")
    assert not failures, "\n".join(failures)


_CUDA_OUTPUT_LENGTH_CALL = """
import numpy as np, torch, mmfa_torch
rng = np.random.default_rng(0)
vis = np.ones((2, 12), bool)
vis[:, :4] = False  # 4 text + ceil(0.5 * 8) visual = 8 kept > output_length 5
x = lambda a: torch.from_numpy(a).cuda()
if {attention}:
    q = x(rng.standard_normal((2, 2, 12, 16)).astype(np.float32))
    mmfa_torch.multimodal_attention(q, q, q, x(vis), 0.5, output_length=5)
else:
    mmfa_torch.select_visual_tokens(x(rng.standard_normal((2, 12)).astype(np.float32)), x(vis), 0.5, output_length=5)
torch.cuda.synchronize()
"""


@pytest.mark.gpu
@pytest.mark.parametrize("attention", [False, True], ids=["select_visual_tokens", "multimodal_attention"])
def test_output_length_below_kept_count_asserts_on_cuda(attention):
    """On CUDA tensors the torch face checks output_length on the device (no host sync): a
    device-side assert naming output_length, which, as torch's own bad-index asserts do, ends the
    process's CUDA context; so it runs in a process of its own."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _CUDA_OUTPUT_LENGTH_CALL.format(attention=attention)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0, f"no error:\n{run.stdout}\n{run.stderr}"
    assert "output_length" in run.stderr, run.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# Defect 5: empty inputs


EMPTY = {  # query (B, T, N, H), key/value (B, S, K, H)
    "batch0": ((0, 5, 2, 16), (0, 6, 2, 16)),
    "heads0": ((2, 5, 0, 16), (2, 6, 0, 16)),
    "T0": ((2, 0, 2, 16), (2, 6, 2, 16)),
    "S0": ((2, 5, 2, 16), (2, 0, 2, 16)),
}


@FACES
@pytest.mark.parametrize("case", list(EMPTY))
def test_empty_inputs(rng, impl, face, case):
    """Batch 0, 0 heads and T = 0 give empty outputs of the query's shape and dtype (and an empty
    LSE); S = 0 (no key) gives zeros and an LSE of -inf, shaped (B, T, N)."""
    qs, ks = EMPTY[case]
    q, k, v = data(rng, qs, ks, ks)
    out, lse = run_attention(face, impl, q, k, v)
    assert out.shape == qs, f"out shape {out.shape} != {qs}"
    assert lse.shape == qs[:3], f"lse shape {lse.shape} != {qs[:3]}"
    assert not np.any(out)
    assert np.all(lse == -np.inf)
    if face == "jax":
        assert mmfa_jax.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), implementation=impl).dtype == \
            jnp.float32
    else:
        got = mmfa_torch.scaled_dot_product_attention(t(bnth(q)), t(bnth(k)), t(bnth(v)), implementation=impl)
        assert got.dtype == torch.float32 and tuple(got.shape) == bnth(q).shape


@FACES
@pytest.mark.parametrize("case", list(EMPTY))
def test_empty_inputs_are_differentiable(rng, impl, face, case):
    """Empty inputs can be trained on as SDPA's and jax.nn's can: the gradients of out.sum() with
    respect to q, k and v exist, have the inputs' shapes and are zero (torch SDPA returns an output
    with a grad_fn for all four cases, so loss.backward() works on an empty batch)."""
    qs, ks = EMPTY[case]
    q, k, v = data(rng, qs, ks, ks)
    if face == "jax":
        grads = jax.grad(lambda q, k, v: jnp.sum(mmfa_jax.attention(q, k, v, implementation=impl)),
                         argnums=(0, 1, 2))(*(jnp.asarray(x) for x in (q, k, v)))
    else:
        leaves = [t(bnth(x)).requires_grad_(True) for x in (q, k, v)]
        out = mmfa_torch.scaled_dot_product_attention(*leaves, implementation=impl)
        out.sum().backward()
        grads = [x.grad for x in leaves]
        assert all(g is not None for g in grads), "no gradient reached the inputs"
        grads = [bnth(to_numpy(g)) for g in grads]
    for name, g, shape in zip("qkv", grads, (qs, ks, ks)):
        assert tuple(np.shape(g)) == shape, f"d{name} shape"
        assert not np.any(to_numpy(g)), f"d{name} not zero"


# ------------------------------------------------------------------------------------------------
# Defect 6: torch visual_token_importance without an LSE


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_torch_importance_without_lse_equals_jax_and_reference(rng, impl, causal):
    """mmfa_torch.visual_token_importance(q, k, None, visual_mask) (no LSE: it computes the scorer
    rows' own) works, and equals mmfa_jax.visual_token_importance with lse=None and the reference
    importance_reference (scorers: the text rows)."""
    B, T, N, K, H = 2, 10, 4, 2, 16
    q, q64 = normal(rng, (B, T, N, H))
    k, k64 = normal(rng, (B, T, K, H))
    vis = visual_layout(rng, B, T, n_text=4)
    want = importance_reference(q64, k64, vis, ~vis, is_causal=causal)
    jax_imp = mmfa_jax.visual_token_importance(q, k, None, jnp.asarray(vis), is_causal=causal, implementation=impl)
    torch_imp = mmfa_torch.visual_token_importance(t(bnth(q)), t(bnth(k)), None, t(vis), is_causal=causal,
                                                   implementation=impl)
    assert tuple(torch_imp.shape) == (B, T) and torch_imp.dtype == torch.float32
    assert_close(jax_imp, want, TOL, "jax importance vs reference")
    assert_close(torch_imp, want, TOL, "torch importance vs reference")
    assert_close(torch_imp, to_numpy(jax_imp), TOL, "torch importance vs jax")


# ------------------------------------------------------------------------------------------------
# Defect 7: torch and jax pruning agree on errors, and take numpy scalars


def _pruning_calls(rng):
    B, S, N, H = 2, 10, 2, 16
    vis = visual_layout(rng, B, S)
    importance = rng.standard_normal((B, S)).astype(np.float32)
    q, k, v = data(rng, (B, S, N, H), (B, S, N, H), (B, S, N, H))
    return vis, importance, {
        "mmfa_jax.select_visual_tokens": lambda **rule: mmfa_jax.select_visual_tokens(
            jnp.asarray(importance), jnp.asarray(vis), implementation="xla", **rule),
        "mmfa_torch.select_visual_tokens": lambda **rule: mmfa_torch.select_visual_tokens(
            t(importance), t(vis), **rule),
        "mmfa_jax.multimodal_attention": lambda **rule: mmfa_jax.multimodal_attention(
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(vis), implementation="xla", **rule),
        "mmfa_torch.multimodal_attention": lambda **rule: mmfa_torch.multimodal_attention(
            t(bnth(q)), t(bnth(k)), t(bnth(v)), t(vis), implementation="xla", **rule),
    }


@pytest.mark.parametrize("rule", [{"keep": -1}, {"keep": 0}, {"keep": 1.5}, {"keep_count": 0}], ids=str)
def test_pruning_errors_agree_between_faces(rng, rule):
    """keep=-1, keep=0, keep=1.5 and keep_count=0 raise the same ArgumentError with the same
    message from mmfa_jax and mmfa_torch select_visual_tokens and multimodal_attention, a message
    that names the argument and the value passed."""
    _, _, calls = _pruning_calls(rng)
    (name, value), = rule.items()
    seen = {}
    for fn, call in calls.items():
        with pytest.raises(ArgumentError) as info:
            call(**rule)
        seen[fn] = (type(info.value), str(info.value))
    assert len(set(seen.values())) == 1, f"the faces disagree: {seen}"
    message = next(iter(seen.values()))[1]
    assert name in message and str(value) in message, message


@pytest.mark.parametrize("rule", [("keep", np.float32(0.5), 0.5), ("keep_count", np.int64(3), 3)],
                         ids=["np.float32 keep", "np.int64 keep_count"])
def test_pruning_accepts_numpy_scalars(rng, rule):
    """np.float32(0.5) as keep and np.int64(3) as keep_count are accepted by both faces'
    select_visual_tokens and multimodal_attention and mean 0.5 and 3 (select_reference)."""
    name, value, plain = rule
    vis, importance, calls = _pruning_calls(rng)
    for fn, call in calls.items():
        result = call(**{name: value})
        if fn.endswith("select_visual_tokens"):
            idx, n = result
            assert_same_kept(kept_of(idx, n), select_reference(importance, vis, plain), fn)
        else:
            idx, n, imp = (result.indices, result.lengths, result.importance) if fn.startswith("mmfa_jax") else \
                result[1:]
            assert_same_kept(kept_of(idx, n), select_reference(np.asarray(imp), vis, plain), fn)


# ------------------------------------------------------------------------------------------------
# Defect 9: second-order gradients are refused by name


def test_jax_second_order_gradient(rng, impl):
    """jax.grad of jax.grad through mmfa_jax.attention: with the kernels (implementation=
    "interpret") it raises an error whose message says second-order / double backward (not a
    failure deep inside Pallas); with implementation="xla", which the message recommends, it works
    and equals jax.nn's second-order gradient."""
    q, _ = normal(rng, (1, 5, 2, 16))
    k, _ = normal(rng, (1, 6, 2, 16))
    v, _ = normal(rng, (1, 6, 2, 16))
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def second(attn):
        inner = jax.grad(lambda q: jnp.sum(jnp.sin(attn(q, k, v))))
        return jax.grad(lambda q: jnp.sum(inner(q) * w))(q)

    ours = lambda q, k, v: mmfa_jax.attention(q, k, v, is_causal=True, implementation=impl)
    if impl == "xla":
        theirs = second(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"))
        assert_close(second(ours), to_numpy(theirs), 1e-4, "second-order gradient vs jax.nn")
        return
    with pytest.raises(Exception, match=r"(?i)second-order|double backward"):
        second(ours)


def test_torch_double_backward_raises(rng, impl):
    """torch.autograd.grad(..., create_graph=True) followed by a second grad through
    mmfa_torch.scaled_dot_product_attention (CPU tensors) raises a RuntimeError that names double
    backward (the face has no derivative of its backward on any implementation), at the latest at
    the second grad."""
    q = torch.from_numpy(rng.standard_normal((1, 2, 5, 16)).astype(np.float32)).to(DEVICE[0]).requires_grad_(True)
    k = torch.from_numpy(rng.standard_normal((1, 2, 6, 16)).astype(np.float32)).to(DEVICE[0]).requires_grad_(True)
    v = torch.from_numpy(rng.standard_normal((1, 2, 6, 16)).astype(np.float32)).to(DEVICE[0]).requires_grad_(True)
    with pytest.raises(RuntimeError, match="double backward"):
        out = mmfa_torch.scaled_dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        (g,) = torch.autograd.grad(out.sin().sum(), q, create_graph=True)
        torch.autograd.grad(g.sum(), q)


# ------------------------------------------------------------------------------------------------
# Defect 10: max_scorers=0 is reported as 0


@FACES
def test_max_scorers_zero_is_reported_as_zero(rng, face):
    """multimodal_attention(..., max_scorers=0) raises an ArgumentError naming max_scorers and the
    value passed, 0 (not a clamped 1)."""
    B, S, N, H = 2, 10, 2, 16
    vis = visual_layout(rng, B, S)
    q, k, v = data(rng, (B, S, N, H), (B, S, N, H), (B, S, N, H))
    with pytest.raises(ArgumentError) as info:
        if face == "jax":
            mmfa_jax.multimodal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(vis), 0.5,
                                          max_scorers=0, implementation="xla")
        else:
            mmfa_torch.multimodal_attention(t(bnth(q)), t(bnth(k)), t(bnth(v)), t(vis), 0.5, max_scorers=0,
                                            implementation="xla")
    message = str(info.value)
    assert "max_scorers" in message, message
    assert re.search(r"\bgot 0\b", message) or re.search(r"max_scorers\s*=\s*0\b", message), message
    assert not re.search(r"\bgot 1\b", message), message
