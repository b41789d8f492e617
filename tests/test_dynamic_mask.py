"""mmfa_jax.dynamic_mask_attention and mmfa_jax.zoh_states (Flash-DMA) against the float64 reference.

Every test taking ``impl`` runs on "interpret" (the dynamic-mask Pallas kernels, interpreted: the
selection, the candidate lists or the per-row selection, the attention and its backward) and "xla"
(the kept mask in full), and on "pallas" with --gpu. Tiles are 16 x 16 (``CONFIG``) so that small
problems span several query tiles and candidate chunks. zoh is drawn rounded to one decimal in most
cases, so equal values (ties, broken towards the lower key index) are common.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, normal, tolerance
from reference import (
    dynamic_mask_kept,
    dynamic_mask_reference,
    dynamic_mask_reference_grads,
    zoh_states_reference,
    zoh_states_reference_grads,
)

import mmfa_jax
from mmfa_jax import ArgumentError, ArgumentTypeError, tuning

_TILE = tuning.KernelConfig(16, 16, 4, 1)
CONFIG = tuning.AttentionConfig(_TILE, _TILE, _TILE)


@dataclasses.dataclass(frozen=True)
class Case:
    B: int = 2
    T: int = 45
    S: int = 45
    N: int = 4
    K: int = 2
    D: int = 16
    keep: int = 9
    causal: bool = True
    bottom_right: bool = False
    segments: bool = False
    q_lengths: bool = False
    kv_lengths: bool = False
    ties: bool = True  # zoh rounded to one decimal
    dtype: str = "float32"
    zoh_dtype: str = "float32"


FORWARD_CASES = {
    "causal-gqa-odd": Case(),
    "causal-mha-no-ties": Case(B=1, T=37, S=37, N=2, K=2, D=24, keep=5, ties=False),
    "causal-mqa-padding": Case(T=40, S=40, N=4, K=1, keep=6, q_lengths=True, kv_lengths=True),
    "bottom-right-t<s-padding": Case(T=23, S=50, keep=8, bottom_right=True, kv_lengths=True),
    "bottom-right-t>s-empty-rows": Case(B=1, T=50, S=30, keep=7, bottom_right=True),
    "top-left-t>s": Case(B=1, T=50, S=30, keep=7),
    "full-padding": Case(T=33, S=47, keep=10, causal=False, kv_lengths=True),
    "segments-causal": Case(T=40, S=40, keep=5, segments=True, kv_lengths=True),
    "segments-full-rect": Case(B=1, T=30, S=41, N=2, K=1, keep=6, causal=False, segments=True),
    "keep-1": Case(B=1, T=40, S=40, keep=1),
    "keep-over-s": Case(B=1, T=40, S=40, keep=64),
    "bfloat16": Case(B=1, T=40, S=40, keep=8, dtype="bfloat16"),
    "decode-step": Case(B=2, T=1, S=37, keep=5, bottom_right=True, kv_lengths=True),
    "tiny": Case(B=1, T=3, S=5, N=2, K=1, D=8, keep=2),
}

GRAD_CASES = {
    "causal-gqa-odd": Case(),
    "bottom-right-padding": Case(B=1, T=23, S=50, keep=8, bottom_right=True, kv_lengths=True, q_lengths=True),
    "segments-causal": Case(B=1, T=40, S=40, keep=5, segments=True),
    "full-mqa": Case(B=1, T=33, S=47, N=2, K=1, keep=10, causal=False),
    "bfloat16": Case(B=1, T=40, S=40, keep=8, dtype="bfloat16"),
    "float16-zoh-bfloat16": Case(B=1, T=40, S=40, keep=8, dtype="float16", zoh_dtype="bfloat16", ties=False),
}


def inputs(rng, c: Case):
    """Arrays (q, k, v, zoh) and their float64 copies, and the keyword arguments of both sides."""
    q, q64 = normal(rng, (c.B, c.T, c.N, c.D), c.dtype)
    k, k64 = normal(rng, (c.B, c.S, c.K, c.D), c.dtype)
    v, v64 = normal(rng, (c.B, c.S, c.K, c.D), c.dtype)
    z = rng.standard_normal((c.B, c.K, c.S))
    z = np.round(z, 1) if c.ties else z
    zoh = jnp.asarray(z, c.zoh_dtype)
    z64 = np.asarray(zoh.astype(jnp.float32), np.float64)
    ours, ref = dict(keep_window_size=c.keep, is_causal=c.causal), dict(keep_window_size=c.keep, is_causal=c.causal)
    if c.bottom_right:
        ours["causal_alignment"], ref["bottom_right"] = "bottom_right", True
    if c.segments:  # sorted, as packed sequences; query segment 3 has no key: empty rows
        q_seg = np.sort(rng.integers(0, 4, (c.B, c.T)), axis=1).astype(np.int32)
        kv_seg = np.sort(rng.integers(0, 3, (c.B, c.S)), axis=1).astype(np.int32)
        ours["segment_ids"] = (jnp.asarray(q_seg), jnp.asarray(kv_seg))
        ref["segment_ids"] = (q_seg, kv_seg)
    if c.q_lengths:
        lengths = np.array([c.T - 5] + [c.T] * (c.B - 1), np.int32)
        ours["query_seq_lengths"], ref["q_lengths"] = jnp.asarray(lengths), lengths
    if c.kv_lengths:
        lengths = np.array([c.S - 7] + [c.S - 1] * (c.B - 1), np.int32)
        ours["key_value_seq_lengths"], ref["kv_lengths"] = jnp.asarray(lengths), lengths
    return (q, k, v, zoh), (q64, k64, v64, z64), ours, ref


def attend(impl, ours):
    return lambda q, k, v, z: mmfa_jax.dynamic_mask_attention(q, k, v, z, implementation=impl, return_lse=True,
                                                              config=CONFIG, **ours)


def as64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


@pytest.mark.parametrize("name", list(FORWARD_CASES))
def test_forward_matches_reference(impl, rng, name):
    c = FORWARD_CASES[name]
    arrays, arrays64, ours, ref = inputs(rng, c)
    out, lse = attend(impl, ours)(*arrays)
    ref_out, ref_lse = dynamic_mask_reference(*arrays64, **ref)
    assert out.dtype == arrays[0].dtype and out.shape == arrays[0].shape
    assert lse.dtype == jnp.float32 and lse.shape == (c.B, c.T, c.N)
    assert_close(out, ref_out, tolerance(c.dtype), f"{name}: out")
    assert_close(lse, ref_lse, tolerance(c.dtype), f"{name}: lse")
    empty = np.isinf(ref_lse)
    assert not np.any(as64(out)[empty]), "rows that keep nothing are not zero"
    if name in ("bottom-right-t>s-empty-rows", "segments-causal", "causal-mqa-padding"):
        assert empty.any(), "the case has rows that keep nothing"


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_match_reference(impl, rng, name):
    c = GRAD_CASES[name]
    arrays, arrays64, ours, ref = inputs(rng, c)
    (out, lse), vjp = jax.vjp(attend(impl, ours), *arrays)
    d_out, d_out64 = normal(rng, out.shape, c.dtype)
    d_lse, d_lse64 = normal(rng, lse.shape, "float32")
    grads = vjp((d_out, d_lse))
    refs = dynamic_mask_reference_grads(*arrays64, d_out64, d_lse64, **ref)
    for got, want, x, what in zip(grads, refs, arrays, ("dq", "dk", "dv", "d_zoh")):
        assert got.dtype == x.dtype and got.shape == x.shape, what
        # d_zoh comes in zoh's dtype: rounded to it once more (bfloat16: 2^-9 of the value)
        tol = max(tolerance(c.dtype, grad=True), tolerance(x.dtype) if what == "d_zoh" else 0.0)
        assert_close(got, want, tol, f"{name}: {what}")


def test_keep_of_s_or_more_is_attention_with_zoh_as_bias(impl, rng):
    """keep_window_size >= S keeps every allowed key: mmfa_jax.attention with the zoh bias, values
    and gradients (d_zoh against the bias gradient summed over rows and the group)."""
    c = Case(B=1, T=40, S=40, keep=40, ties=False)
    (q, k, v, zoh), _, ours, _ = inputs(rng, c)
    G = c.N // c.K

    def dense(q, k, v, z):
        bias = jnp.repeat(z, G, axis=1)[:, :, None, :]
        return mmfa_jax.attention(q, k, v, bias=bias, is_causal=True, implementation=impl, return_lse=True)

    (out, lse), vjp = jax.vjp(attend(impl, ours), q, k, v, zoh)
    (d_o, d_l), dense_vjp = jax.vjp(dense, q, k, v, zoh)
    assert_close(out, as64(d_o), tolerance("float32"), "out")
    assert_close(lse, as64(d_l), tolerance("float32"), "lse")
    cot = (normal(rng, out.shape)[0], normal(rng, lse.shape)[0])
    for got, want, what in zip(vjp(cot), dense_vjp(cot), ("dq", "dk", "dv", "d_zoh")):
        assert_close(got, as64(want), tolerance("float32", grad=True), what)


def test_ties_go_to_the_lower_key_index(impl, rng):
    """Equal zoh (+0 and -0 mixed: equal too): each causal row keeps its keep_window_size lowest
    allowed keys. With q = 0 the kept keys share the probability evenly, and one-hot values
    read it out key by key."""
    T = S = D = 48
    keep = 5
    q = jnp.zeros((1, T, 2, D), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, S, 1, D)), jnp.float32)
    v = jnp.eye(S, dtype=jnp.float32)[None, :, None, :]
    zoh = jnp.where(jnp.arange(S) % 2 == 0, 0.0, -0.0).astype(jnp.float32)[None, None, :]
    out = mmfa_jax.dynamic_mask_attention(q, k, v, zoh, keep_window_size=keep, implementation=impl, config=CONFIG)
    t = np.arange(T)[:, None]
    s = np.arange(S)[None, :]
    want = ((s <= t) & (s < keep)) / np.minimum(t + 1, keep)
    for head in range(2):
        assert_close(out[0, :, head], want, tolerance("float32"), f"head {head}")
    # Larger zoh wins over the lower index: key 30's zoh is above the rest, so rows t >= 30 keep it.
    out = mmfa_jax.dynamic_mask_attention(q, k, v, zoh.at[0, 0, 30].set(1.0), keep_window_size=keep,
                                          implementation=impl, config=CONFIG)
    kept = dynamic_mask_kept(np.asarray(zoh.at[0, 0, 30].set(1.0), np.float64), keep, T)[0, 0]
    assert kept[40, 30] and kept[40, :4].all() and not kept[40, 4]
    probs = np.where(kept, np.exp(np.where(s == 30, 1.0, 0.0)), 0.0)
    assert_close(out[0, :, 0], probs / probs.sum(axis=1, keepdims=True), tolerance("float32"), "with a larger zoh")


@pytest.mark.parametrize("where", ["q", "k", "zoh"])
def test_nan_reaches_exactly_the_rows_that_keep_it(impl, rng, where):
    """A NaN in q[b, i, n] makes that row NaN; a NaN in k[b, j, h] every row of h's group that keeps
    key j; a NaN zoh[b, h, j] ranks above every number, so every row of h's group that allows key j
    keeps it and is NaN. The rest equals the reference, whose NaN pattern is the same."""
    c = Case(B=2, T=40, S=40, keep=6, ties=False)
    (q, k, v, zoh), (q64, k64, v64, z64), ours, ref = inputs(rng, c)
    b, i, n, h = 1, 33, 3, 1
    j = int(np.argmax(z64[b, h, :30]))  # the best key of the first 30: rows from j on keep it
    if where == "q":
        q, q64 = q.at[b, i, n, 2].set(jnp.nan), q64.copy()
        q64[b, i, n, 2] = np.nan
    elif where == "k":
        k, k64 = k.at[b, j, h, 2].set(jnp.nan), k64.copy()
        k64[b, j, h, 2] = np.nan
    else:
        zoh, z64 = zoh.at[b, h, j].set(jnp.nan), z64.copy()
        z64[b, h, j] = np.nan
    out, lse = attend(impl, ours)(q, k, v, zoh)
    ref_out, ref_lse = dynamic_mask_reference(q64, k64, v64, z64, **ref)
    nan_rows = np.isnan(ref_out).any(axis=-1)  # (the reference's LSE does not carry NaN: it is read off its output)
    if where == "zoh":
        G = c.N // c.K
        want = np.zeros(nan_rows.shape, bool)
        want[b, j:, h * G:(h + 1) * G] = True
        np.testing.assert_array_equal(nan_rows, want, err_msg="the reference's NaN rows")
    assert nan_rows.any() and not nan_rows.all()
    out64, lse64 = as64(out), as64(lse)
    np.testing.assert_array_equal(np.isnan(lse64), nan_rows, err_msg="NaN rows of the LSE")
    np.testing.assert_array_equal(np.isnan(out64), np.isnan(ref_out), err_msg="NaN entries of the output")
    assert_close(np.where(nan_rows[..., None], 0.0, out64), np.where(nan_rows[..., None], 0.0, ref_out),
                 tolerance("float32"), "the output elsewhere")
    assert_close(np.where(nan_rows, 0.0, lse64), np.where(nan_rows, 0.0, ref_lse), tolerance("float32"),
                 "the LSE elsewhere")


# ------------------------------------------------------------------------------------------------
# zoh_states: Doge's zero-order hold, and gradients through it to A and dt_proj.


def test_zoh_states_and_its_gradients(rng):
    B, S, K, H = 2, 13, 3, 8
    value, v64 = normal(rng, (B, S, K, H))
    dt_proj, w64 = normal(rng, (K, K * H))
    A, a64 = normal(rng, (K,))
    bias, b64 = normal(rng, (K,))
    zoh, vjp = jax.vjp(lambda *x: mmfa_jax.zoh_states(*x), value, dt_proj, A, bias)
    assert zoh.shape == (B, K, S) and zoh.dtype == jnp.float32
    assert_close(zoh, zoh_states_reference(v64, w64, a64, b64), tolerance("float32"), "zoh")
    d_zoh, d_zoh64 = normal(rng, zoh.shape)
    refs = zoh_states_reference_grads(v64, w64, a64, d_zoh64, b64)
    for got, want, what in zip(vjp(d_zoh), refs, ("d_value", "d_dt_proj", "d_A", "d_dt_bias")):
        assert_close(got, want, tolerance("float32", grad=True), what)
    torch_layout = mmfa_jax.zoh_states(jnp.swapaxes(value, 1, 2), dt_proj, A, layout="BNTH")
    assert_close(torch_layout, zoh_states_reference(v64, w64, a64), tolerance("float32"), "layout BNTH")


def test_gradients_through_zoh_states_reach_a_and_dt_proj(impl, rng):
    """The whole Doge attention step: zoh from the values, then dynamic mask attention; gradients to
    q, k, v (through both paths), dt_proj and A against the chained float64 references."""
    c = Case(B=1, T=40, S=40, N=4, K=2, D=16, keep=7)
    (q, k, v, _), (q64, k64, v64, _), ours, ref = inputs(rng, c)
    # dt_proj at a Linear's scale: with unit entries A * softplus(.) can pass -104, where float32's
    # zoh underflows to 0 and ties that float64 ranks apart (another top-k than the reference's)
    dt_proj = jnp.asarray(rng.standard_normal((c.K, c.K * c.D)) / np.sqrt(c.K * c.D), jnp.float32)
    w64 = np.asarray(dt_proj, np.float64)
    A = -jnp.exp(jnp.asarray(rng.standard_normal(c.K), jnp.float32))  # Doge keeps A negative in practice
    a64 = np.asarray(A, np.float64)

    def step(q, k, v, w, a):
        zoh = mmfa_jax.zoh_states(v, w, a)
        return mmfa_jax.dynamic_mask_attention(q, k, v, zoh, implementation=impl, config=CONFIG, **ours)

    out, vjp = jax.vjp(step, q, k, v, dt_proj, A)
    z64 = zoh_states_reference(v64, w64, a64)
    assert_close(out, dynamic_mask_reference(q64, k64, v64, z64, **ref)[0], tolerance("float32"), "out")
    d_out, d_out64 = normal(rng, out.shape)
    dq, dk, dv, dw, da = vjp(d_out)
    rq, rk, rv, rz = dynamic_mask_reference_grads(q64, k64, v64, z64, d_out64, **ref)
    zv, zw, za, _ = zoh_states_reference_grads(v64, w64, a64, rz)
    tol = tolerance("float32", grad=True)
    assert_close(dq, rq, tol, "dq")
    assert_close(dk, rk, tol, "dk")
    assert_close(dv, rv + zv, tol, "dv")
    assert_close(dw, zw, tol, "d_dt_proj")
    assert_close(da, za, tol, "d_A")


# ------------------------------------------------------------------------------------------------
# Against Doge itself (transformers' prepare_dynamic_mask and eager attention), on distinct zoh.


def test_doge_prepare_dynamic_mask_and_eager_attention_agree():
    torch = pytest.importorskip("torch")
    doge = pytest.importorskip("transformers.models.doge.modeling_doge")
    rng = np.random.default_rng(int(os.environ["MMFA_TEST_SEED"]))
    B, T, N, K, D, keep = 2, 24, 4, 2, 8, 6
    q = rng.standard_normal((B, N, T, D))
    k = rng.standard_normal((B, K, T, D))
    v = rng.standard_normal((B, K, T, D))
    zoh = rng.random((B, K, T))
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    min_value = torch.finfo(torch.float32).min
    causal = torch.triu(torch.full((T, T), min_value), diagonal=1)[None, None].expand(B, 1, T, T)
    hidden = torch.zeros(B, T, 1)
    mask = doge.DogeAttention.prepare_dynamic_mask(None, hidden, f32(zoh), keep_window_size=keep,
                                                   attention_mask=causal)
    mask = doge.repeat_kv(mask, N // K)
    kr, vr = doge.repeat_kv(f32(k), N // K), doge.repeat_kv(f32(v), N // K)
    weights = torch.softmax(f32(q) @ kr.transpose(2, 3) * D ** -0.5 + mask, dim=-1)
    theirs = (weights @ vr).transpose(1, 2).numpy()  # (B, T, N, D)
    ours = mmfa_jax.dynamic_mask_attention(jnp.asarray(np.swapaxes(q, 1, 2), jnp.float32),
                                           jnp.asarray(np.swapaxes(k, 1, 2), jnp.float32),
                                           jnp.asarray(np.swapaxes(v, 1, 2), jnp.float32),
                                           jnp.asarray(zoh, jnp.float32), keep_window_size=keep, implementation="xla")
    assert_close(ours, theirs.astype(np.float64), tolerance("float32"), "against Doge")
    # and the reference agrees with Doge's mask: kept keys are where its mask is not the minimum
    kept = dynamic_mask_kept(zoh, keep, T)
    np.testing.assert_array_equal(kept, (mask[:, ::N // K] > min_value / 2).numpy())


# ------------------------------------------------------------------------------------------------
# Arguments.


def _errors():
    q = jnp.ones((1, 32, 4, 16), jnp.float32)
    kv = jnp.ones((1, 32, 2, 16), jnp.float32)
    zoh = jnp.ones((1, 2, 32), jnp.float32)

    def attend_with(**kw):
        args = dict(query=q, key=kv, value=kv, zoh=zoh, keep_window_size=4)
        args.update(kw)
        return lambda: mmfa_jax.dynamic_mask_attention(**args)

    def zoh_with(**kw):
        args = dict(value=kv, dt_proj=jnp.ones((2, 32)), A=jnp.ones((2,)))
        args.update(kw)
        return lambda: mmfa_jax.zoh_states(**args)

    return {
        "keep-zero": (attend_with(keep_window_size=0), ArgumentError, "keep_window_size must be >= 1, got 0"),
        "keep-float": (attend_with(keep_window_size=2.5), ArgumentTypeError,
                       "keep_window_size must be an integer, got 2.5"),
        "keep-bool": (attend_with(keep_window_size=True), ArgumentTypeError,
                      "keep_window_size must be an integer, got True"),
        "zoh-shape": (attend_with(zoh=jnp.ones((1, 4, 32))), ArgumentError, "zoh must be (B, K, S) = (1, 2, 32)"),
        "zoh-dtype": (attend_with(zoh=jnp.ones((1, 2, 32), jnp.int32)), ArgumentTypeError,
                      "zoh must be float16, bfloat16 or float32, got int32"),
        "query-dtype": (attend_with(query=q.astype(jnp.int32)), ArgumentTypeError, "query must be float16"),
        "gqa": (attend_with(key=jnp.ones((1, 32, 3, 16)), value=jnp.ones((1, 32, 3, 16)), zoh=jnp.ones((1, 3, 32))),
                ArgumentError, "multiple of the key/value heads"),
        "segments-shape": (attend_with(segment_ids=jnp.ones((1, 31), jnp.int32)), ArgumentError,
                           "segment_ids (query) must have shape (1, 32), got (1, 31)"),
        "lengths-dtype": (attend_with(key_value_seq_lengths=jnp.ones((1,), jnp.float32)), ArgumentTypeError,
                          "key_value_seq_lengths must be integers, got float32"),
        "alignment": (attend_with(causal_alignment="center"), ArgumentError,
                      "causal_alignment must be one of ('top_left', 'bottom_right'), got 'center'"),
        "scale": (attend_with(scale="big"), ArgumentTypeError, "scale must be a real number, got 'big'"),
        "implementation": (attend_with(implementation="cuda"), ValueError, "implementation must be one of"),
        "dt-proj-shape": (zoh_with(dt_proj=jnp.ones((2, 16))), ArgumentError,
                          "dt_proj must be (K, K * H) = (2, 32) for value of 2 heads of dim 16, got shape (2, 16)"),
        "a-shape": (zoh_with(A=jnp.ones((3,))), ArgumentError, "A must be (K,) = (2,), got shape (3,)"),
        "dt-bias-shape": (zoh_with(dt_bias=jnp.ones((1,))), ArgumentError, "dt_bias must be (K,) = (2,) or None"),
        "value-rank": (zoh_with(value=jnp.ones((32, 2, 16))), ArgumentError, "value must have rank 4, got shape"),
        "value-dtype": (zoh_with(value=kv.astype(jnp.int32)), ArgumentTypeError, "value must be float16"),
    }


ERRORS = ["keep-zero", "keep-float", "keep-bool", "zoh-shape", "zoh-dtype", "query-dtype", "gqa", "segments-shape",
          "lengths-dtype", "alignment", "scale", "implementation", "dt-proj-shape", "a-shape", "dt-bias-shape",
          "value-rank", "value-dtype"]


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


def test_empty_sizes_give_zeros():
    q = jnp.ones((1, 0, 2, 16), jnp.float32)
    kv = jnp.ones((1, 8, 1, 16), jnp.float32)
    out, lse = mmfa_jax.dynamic_mask_attention(q, kv, kv, jnp.ones((1, 1, 8)), keep_window_size=2, return_lse=True)
    assert out.shape == q.shape and lse.shape == (1, 0, 2)


def test_the_candidate_lists_stay_short():
    """For a causal call the lists are sized by keep_window_size + block_q, not by S: the work of
    the attention kernels per query tile is bounded by them."""
    from mmfa_jax.kernels.dynamic_mask import DmaProblem

    p = mmfa_jax.kernels.Problem(batch=1, q_heads=1, kv_heads=1, q_len=65536, kv_len=65536, head_dim=128, scale=1.0,
                                 softcap=None, band=None, layout="BTNH", bias_shape=None, mask_shape=None,
                                 has_segments=False, has_q_lengths=False, has_kv_lengths=False, dot_precision=None)
    dp = DmaProblem(p, 2048, 64, 128)
    assert dp.nested and dp.list_capacity == 2176  # 2048 + 63 rounded up to the key block
    assert not dataclasses.replace(dp, problem=dataclasses.replace(p, has_segments=True)).nested


# ------------------------------------------------------------------------------------------------
# The kernels for a GPU, without one: lowered for an abstract H100, compiled by the official Triton.


def _builders():
    sys.path.insert(0, os.path.dirname(__file__))
    return importlib.import_module("turing_kernels")


@pytest.mark.parametrize("kernel", ["dma_forward", "dma_forward_segments", "dma_backward"])
def test_kernels_compile_for_hopper(tmp_path, monkeypatch, kernel):
    """The selection, forward and backward kernels (gathers by index vectors, cumulative sums, atomic
    adds) lower through Pallas's Triton lowering and compile to sm_90 cubins within shared memory,
    with the table's sm_90 tiles for bf16 d128."""
    pytest.importorskip("triton")
    from mmfa_jax import triton_route

    monkeypatch.setenv("MMFA_CACHE_DIR", str(tmp_path))
    triton_route.clear_memory_cache()
    builders = _builders()
    table = tuning.config_for(128, jnp.bfloat16, "sm90")
    cfg = table.forward_rows or table.forward
    fn, args = builders.build(kernel, 128, jnp.bfloat16, tuning.AttentionConfig(cfg, cfg, cfg), implementation="triton")
    compiled = triton_route.lower_for(fn, *args, device_kind="NVIDIA H100")
    assert [k.name for k, *_ in compiled] == list(builders.KERNELS[kernel][2])
    for k, *_ in compiled:
        assert k.cc == 90 and len(k.cubin) > 0, k.name
        assert k.shared <= triton_route.SHARED_MEMORY_PER_BLOCK[90], (k.name, k.shared)


# ------------------------------------------------------------------------------------------------
# The selection's internals: order keys, thresholds and candidate lists.


def test_order_key_preserves_the_order_of_floats(rng):
    """Larger floats get larger int32 keys (subnormals, infinities included); -0 and +0 share a key;
    NaN of either sign gets the largest key."""
    from mmfa_jax.kernels.dynamic_mask import INT32_MAX, order_key

    x = np.concatenate([rng.standard_normal(500) * 10.0 ** rng.integers(-40, 38, 500),
                        [np.inf, -np.inf, 1e-45, -1e-45, 0.0, -0.0, 3.4e38, -3.4e38]]).astype(np.float32)
    x = np.sort(x)
    keys = np.asarray(order_key(jnp.asarray(x)))
    assert (np.diff(keys.astype(np.int64)) >= 0).all()
    assert ((np.diff(keys.astype(np.int64)) > 0) == (np.diff(x) > 0)).all()
    assert np.asarray(order_key(jnp.asarray([0.0, -0.0], jnp.float32))).tolist() == [0, 0]
    nans = jnp.asarray(np.array([np.nan, -np.nan], np.float32))
    assert np.asarray(order_key(nans)).tolist() == [INT32_MAX, INT32_MAX]
    assert int(order_key(jnp.float32(np.inf))) < INT32_MAX


@pytest.mark.parametrize("alignment,T,S,keep", [("top_left", 40, 70, 6), ("bottom_right", 40, 70, 6),
                                                 ("top_left", 203, 203, 37), ("bottom_right", 150, 260, 90),
                                                 ("bottom_right", 40, 17000, 5000)])  # table columns of 2 blocks
def test_thresholds_and_candidate_lists(rng, alignment, T, S, keep):
    """The selection kernels (interpreted) against the reference's kept sets: each key's rank is its
    place in the (larger zoh, lower index) order, each row's threshold the rank of its best excluded
    allowed key (or S when it excludes none), and each query tile's list holds every key
    some row of the tile keeps, within the bound min(keep, e_t0) + (e_last - e_t0)."""
    from mmfa_jax import dynamic_mask as jax_dma
    from mmfa_jax.kernels import dynamic_mask as dma

    B, K = 2, 2
    bottom = alignment == "bottom_right"
    zoh = jnp.asarray(np.round(rng.standard_normal((B, K, S)), 1), jnp.float32)
    q = jnp.zeros((B, T, 2 * K, 16), jnp.float32)
    kv = jnp.zeros((B, S, K, 16), jnp.float32)
    kv_lengths = np.array([S - 9, S], np.int32)
    opts = mmfa_jax._checks.Options.make(is_causal=True, implementation="interpret", config=CONFIG,
                                         causal_alignment=alignment)
    static, _, _ = jax_dma.prepare(opts, keep, q, kv, kv, zoh, None, None, jnp.asarray(kv_lengths))
    static = jax_dma._with_sides(static, None, None, kv_lengths)
    dp = static.dp
    cand, count, rank, thr_pos = dma.select(dp, static.config.forward, zoh, None, None, jnp.asarray(kv_lengths),
                                            lowering=static.lowering)
    cand, count, rank, thr_pos = (np.asarray(x) for x in (cand, count, rank, thr_pos))
    kept = dynamic_mask_kept(np.asarray(zoh, np.float64), keep, T, bottom_right=bottom, kv_lengths=kv_lengths)
    keys = np.asarray(dma.order_key(zoh)).astype(np.int64)
    offset = S - T if bottom else 0
    for b in range(B):
        for h in range(K):
            in_order = sorted(range(S), key=lambda s: (-keys[b, h, s], s))
            assert rank[b, h, in_order].tolist() == list(range(S)), (b, h)
            for t in range(T):
                allowed = np.flatnonzero(np.arange(S) < min(t + offset + 1, kv_lengths[b]))
                excluded = [s for s in allowed if not kept[b, h, t, s]]
                if excluded:
                    best = max(excluded, key=lambda s: (keys[b, h, s], -s))
                    assert thr_pos[b, h, t] == rank[b, h, best], (b, h, t)
                else:
                    assert thr_pos[b, h, t] == S, (b, h, t)
            for tile in range(dp.num_q_blocks):
                rows = range(tile * dp.block_q, min((tile + 1) * dp.block_q, T))
                listed = cand[b, h, tile, :count[b, h, tile]]
                assert len(set(listed.tolist())) == len(listed), "a key listed twice"
                union = np.flatnonzero(kept[b, h, list(rows)].any(axis=0))
                assert set(union.tolist()) <= set(listed.tolist()), (b, h, tile)
                ends = [int(np.clip(t + offset + 1, 0, kv_lengths[b])) for t in (rows[0], rows[-1])]
                assert count[b, h, tile] <= min(keep, ends[0]) + ends[1] - ends[0]
                assert not cand[b, h, tile, count[b, h, tile]:dp.list_capacity].any(), "unused entries are 0"
