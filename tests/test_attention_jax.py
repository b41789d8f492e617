"""mmfa_jax.attention against the float64 reference, feature by feature, forward and backward.

Every test runs on implementation "interpret" (the Pallas kernels, interpreted) and "xla", and
on "pallas" too with --gpu.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, normal, seed_of, tolerance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import attention_reference, attention_reference_grads, image_block_mask

import mmfa_jax
from mmfa_jax import AttentionConfig, KernelConfig, tuning

# Small tiles: many key and query tiles even on short sequences, so the kernels' block ranges
# (skipped, unmasked and masked tiles) are exercised.
SMALL_TILES = AttentionConfig(KernelConfig(16, 16, 4, 2), KernelConfig(16, 16, 4, 2), KernelConfig(16, 16, 4, 2))


@dataclasses.dataclass(frozen=True)
class Case:
    B: int = 2
    T: int = 33
    S: int = 33
    N: int = 2
    K: int = 2
    H: int = 32
    dtype: str = "float32"
    causal: bool = False
    alignment: str = "top_left"  # of the causal diagonal and the window when T != S
    window: object = None
    softcap: float | None = None
    scale: float | None = None
    bias: tuple | None = None  # shape of the bias
    bias_dtype: str = "float32"
    mask: tuple | None = None  # shape of the boolean mask
    mask_pattern: str = "random"  # "random", or "blocks": causal, bidirectional blocks, hidden padding keys
    segments: str | None = None  # "single" or "pair"
    q_lengths: tuple | None = None
    kv_lengths: tuple | None = None
    layout: str = "BTNH"
    unbatched: bool = False
    config: AttentionConfig | None = None


def make_inputs(rng, c: Case):
    q, q64 = normal(rng, (c.B, c.T, c.N, c.H), c.dtype)
    k, k64 = normal(rng, (c.B, c.S, c.K, c.H), c.dtype)
    v, v64 = normal(rng, (c.B, c.S, c.K, c.H), c.dtype)
    bias = bias64 = mask = None
    if c.bias is not None:
        bias, bias64 = normal(rng, c.bias, c.bias_dtype)
    if c.mask is not None and c.mask_pattern == "blocks":
        mask = image_block_mask(rng, c.mask)
    elif c.mask is not None:
        mask = rng.random(c.mask) > 0.3
        mask[(0,) * (len(c.mask) - 2) + (c.mask[-2] // 2,)] = False  # one row fully masked
        if len(c.mask) == 4 and c.mask[-2] > 1:
            mask[(-1,) * (len(c.mask) - 2) + (0,)] = False  # and another
    q_seg = kv_seg = None
    if c.segments == "single":
        q_seg = kv_seg = np.sort(rng.integers(0, 3, (c.B, c.T)), axis=1).astype(np.int32)
    elif c.segments == "pair":
        q_seg = np.sort(rng.integers(0, 4, (c.B, c.T)), axis=1).astype(np.int32)
        kv_seg = np.sort(rng.integers(0, 3, (c.B, c.S)), axis=1).astype(np.int32)  # segment 3: no keys
    ql = None if c.q_lengths is None else np.asarray(c.q_lengths, np.int32)
    kvl = None if c.kv_lengths is None else np.asarray(c.kv_lengths, np.int32)
    return dict(q=q, k=k, v=v, q64=q64, k64=k64, v64=v64, bias=bias, bias64=bias64, mask=mask, q_seg=q_seg,
                kv_seg=kv_seg, ql=ql, kvl=kvl)


def reference_kwargs(c: Case, x):
    return dict(bias=x["bias64"], mask=x["mask"], scale=c.scale, is_causal=c.causal, q_lengths=x["ql"],
                kv_lengths=x["kvl"], window=c.window, softcap=c.softcap, q_segments=x["q_seg"],
                kv_segments=x["kv_seg"], bottom_right=c.alignment == "bottom_right")


def _to_layout(a, c: Case):
    if c.layout == "BNTH":
        a = jnp.swapaxes(a, 1, 2)
    return a[0] if c.unbatched else a


def _from_layout(a, c: Case):
    """Back to batched BTNH (and (B, T, N) for an LSE) numpy float64."""
    a = np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)
    if c.unbatched:
        a = a[None]
    return np.swapaxes(a, 1, 2) if c.layout == "BNTH" else a


def call(c: Case, impl, x, q, k, v, bias):
    segments = None
    if c.segments == "single":
        segments = jnp.asarray(x["q_seg"])
    elif c.segments == "pair":
        segments = (jnp.asarray(x["q_seg"]), jnp.asarray(x["kv_seg"]))
    return mmfa_jax.attention(
        q, k, v, bias, None if x["mask"] is None else jnp.asarray(x["mask"]),
        scale=c.scale, is_causal=c.causal, query_seq_lengths=x["ql"], key_value_seq_lengths=x["kvl"],
        local_window_size=c.window, logits_soft_cap=c.softcap, segment_ids=segments, return_lse=True,
        implementation=impl, config=c.config, layout=c.layout, causal_alignment=c.alignment)


def check_forward(c: Case, impl, rng):
    x = make_inputs(rng, c)
    q, k, v = (_to_layout(x[n], c) for n in "qkv")
    out, lse = call(c, impl, x, q, k, v, x["bias"])
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.dtype == jnp.float32 and lse.shape == q.shape[:-1]
    ref_out, ref_lse = attention_reference(x["q64"], x["k64"], x["v64"], **reference_kwargs(c, x))
    out, lse = _from_layout(out, c), _from_layout(lse, c)
    assert np.isfinite(out).all(), "output has non-finite entries"
    assert_close(out, ref_out, tolerance(c.dtype), "out")
    assert_close(lse, ref_lse, tolerance(c.dtype), "lse")
    dead = np.isneginf(ref_lse)  # (B, T, N): rows that see nothing, or past the query length
    assert (out[dead] == 0).all(), "rows with no visible key must be exactly zero"
    return x, ref_out, ref_lse, dead


def check_grads(c: Case, impl, rng, *, with_lse_grad=True, out_grad=True):
    x = make_inputs(rng, c)
    q, k, v = (_to_layout(x[n], c) for n in "qkv")
    bias = x["bias"]

    def f(q, k, v, *bias):
        return call(c, impl, x, q, k, v, bias[0] if bias else None)

    args = (q, k, v) + (() if bias is None else (bias,))
    (out, lse), vjp = jax.vjp(f, *args)
    d_out, d_out64 = normal(rng, (c.B, c.T, c.N, c.H), c.dtype)
    if not out_grad:
        d_out, d_out64 = jnp.zeros_like(d_out), np.zeros_like(d_out64)
    d_lse, d_lse64 = normal(rng, (c.B, c.T, c.N), "float32")
    if not with_lse_grad:
        d_lse, d_lse64 = jnp.zeros_like(d_lse), np.zeros_like(d_lse64)
    grads = vjp((_to_layout(d_out, c), _to_layout(d_lse, c)))
    want = attention_reference_grads(x["q64"], x["k64"], x["v64"], d_out64, d_lse64, **reference_kwargs(c, x))
    tol = tolerance(c.dtype, grad=True)
    for name, g, w, a in zip(("dq", "dk", "dv", "dbias"), grads, want, args):
        assert g.shape == a.shape and g.dtype == a.dtype, f"{name}: {g.shape} {g.dtype} vs {a.shape} {a.dtype}"
        g = np.asarray(jnp.asarray(g).astype(jnp.float32), np.float64) if name == "dbias" else _from_layout(g, c)
        assert np.isfinite(g).all(), f"{name} has non-finite entries"
        if name == "dbias":  # float32 dS, but delta uses the output rounded to the input dtype
            tol = max(tolerance(c.dtype, grad=True), tolerance(c.bias_dtype, grad=True))
        assert_close(g, w, tol, name)
    return x, grads, want


# ------------------------------------------------------------------------------------------------
# Forward, one feature at a time (output, LSE, zero rows).

FORWARD_CASES = {
    "plain": Case(),
    "plain_B1_N4_T7_S65": Case(B=1, T=7, S=65, N=4, K=4),
    "causal_T_eq_S": Case(T=65, S=65, causal=True),
    "causal_T_lt_S": Case(T=33, S=65, causal=True),
    "causal_T_gt_S": Case(T=65, S=33, causal=True),
    "causal_decode_T1": Case(T=1, S=100, causal=True),
    "causal_T_lt_S_bottom_right": Case(T=33, S=65, causal=True, alignment="bottom_right"),
    "causal_T_gt_S_bottom_right": Case(T=65, S=33, causal=True, alignment="bottom_right"),
    "causal_decode_T1_bottom_right": Case(T=1, S=100, causal=True, alignment="bottom_right"),
    "window_T_lt_S_bottom_right": Case(T=20, S=65, window=(6, 3), alignment="bottom_right"),
    "window_T_lt_S": Case(T=20, S=65, window=(6, 3)),
    "window_int": Case(T=65, S=65, window=8),
    "window_tuple": Case(T=33, S=65, window=(3, 5)),
    "window_None_right": Case(T=65, S=33, window=(None, 4)),
    "window_left_None": Case(T=33, S=65, window=(4, None)),
    "window_zero_zero": Case(T=33, S=33, window=(0, 0)),
    "window_causal": Case(T=65, S=65, window=(6, 3), causal=True),
    "softcap": Case(softcap=2.0, scale=0.5),
    "softcap_causal_T_gt_S": Case(T=33, S=7, softcap=1.0, causal=True),
    "scale_explicit": Case(scale=0.3),
    "bias_BNTS": Case(T=33, S=65, bias=(2, 2, 33, 65)),
    "bias_1NTS": Case(T=33, S=65, bias=(1, 2, 33, 65)),
    "bias_TS": Case(T=33, S=65, bias=(33, 65)),
    "bias_B11S": Case(T=33, S=65, bias=(2, 1, 1, 65)),
    "bias_bf16_with_f32": Case(bias=(2, 2, 33, 33), bias_dtype="bfloat16"),
    "mask_BNTS_dead_rows": Case(T=33, S=65, mask=(2, 2, 33, 65)),
    "mask_TS": Case(T=33, S=65, mask=(33, 65)),
    "mask_B1TS_causal": Case(T=65, S=65, mask=(2, 1, 65, 65), causal=True),
    "mask_blocks_small_tiles": Case(T=100, S=100, mask=(2, 1, 100, 100), mask_pattern="blocks", config=SMALL_TILES),
    "mask_blocks_T_lt_S": Case(T=40, S=100, N=4, K=2, mask=(2, 4, 40, 100), mask_pattern="blocks",
                               config=SMALL_TILES, q_lengths=(40, 31), kv_lengths=(90, 100)),
    "mask_blocks_window": Case(T=100, S=100, mask=(100, 100), mask_pattern="blocks", window=(30, None),
                               config=SMALL_TILES),
    "mask_blocks_default_tiles": Case(B=1, T=150, S=150, H=64, mask=(1, 1, 150, 150), mask_pattern="blocks"),
    "segments_single": Case(T=65, S=65, segments="single"),
    "segments_pair": Case(T=33, S=65, segments="pair"),
    "segments_causal": Case(T=65, S=65, segments="single", causal=True),
    "q_lengths": Case(T=65, S=33, q_lengths=(40, 1)),
    "kv_lengths": Case(T=33, S=65, kv_lengths=(20, 65)),
    "kv_lengths_zero": Case(T=33, S=33, kv_lengths=(0, 7)),
    "kv_lengths_over_S": Case(T=33, S=33, kv_lengths=(50, 33)),
    "lengths_causal": Case(T=65, S=65, q_lengths=(65, 30), kv_lengths=(17, 64), causal=True),
    "q_lengths_zero": Case(T=33, S=33, q_lengths=(0, 33)),
    "gqa_2": Case(N=4, K=2, causal=True),
    "gqa_4": Case(N=4, K=1, T=33, S=65, window=(10, 0)),
    "mqa_gqa_3": Case(N=3, K=1, T=7, S=33),
    "head_dim_72": Case(H=72, T=33, S=65, causal=True),
    "head_dim_80": Case(H=80, T=65, S=33),
    "head_dim_96": Case(H=96, N=4, K=2, bias=(1, 4, 33, 33)),
    "head_dim_128": Case(B=1, T=17, S=17, H=128, causal=True),
    "head_dim_256": Case(B=1, T=9, S=17, H=256, N=2, K=1),
    "head_dim_20": Case(H=20, T=7, S=7),
    "float16": Case(dtype="float16", T=65, S=65, causal=True),
    "float16_bias_mask": Case(dtype="float16", bias=(1, 2, 33, 33), mask=(2, 2, 33, 33), softcap=3.0),
    "bfloat16": Case(dtype="bfloat16", T=33, S=65, window=(5, 5)),
    "bfloat16_gqa_lengths": Case(dtype="bfloat16", N=4, K=1, kv_lengths=(10, 33), q_lengths=(33, 20)),
    "len_1_1": Case(T=1, S=1),
    "len_1_7": Case(T=1, S=7),
    "len_7_1": Case(T=7, S=1, causal=True),
    "len_100": Case(B=1, T=100, S=100, causal=True, window=(40, None)),
    "len_100_33": Case(B=1, T=100, S=33, N=4, K=2),
    "unbatched": Case(B=1, unbatched=True, T=33, S=65, causal=True, bias=(33, 65)),
    "unbatched_mask": Case(B=1, unbatched=True, T=7, S=7, mask=(2, 7, 7), N=2, K=1),
    "layout_BNTH": Case(layout="BNTH", T=33, S=65, N=4, K=2, causal=True, bias=(2, 4, 33, 65)),
    "layout_BNTH_segments_lengths": Case(layout="BNTH", T=65, S=65, segments="single", kv_lengths=(50, 10),
                                         window=(20, 20)),
    "small_tiles_causal": Case(T=65, S=65, causal=True, config=SMALL_TILES),
    "small_tiles_T_lt_S_window": Case(T=33, S=100, window=(20, 3), config=SMALL_TILES, kv_lengths=(90, 100)),
    "small_tiles_T_gt_S_lengths": Case(T=65, S=33, causal=True, q_lengths=(50, 65), kv_lengths=(33, 20),
                                       config=SMALL_TILES),
    "small_tiles_everything": Case(T=65, S=65, N=4, K=2, H=72, causal=True, window=(30, None), softcap=4.0,
                                   bias=(2, 1, 65, 65), mask=(1, 4, 65, 65), segments="single",
                                   q_lengths=(60, 65), kv_lengths=(65, 50), config=SMALL_TILES),
}


@pytest.mark.parametrize("case", list(FORWARD_CASES.values()), ids=list(FORWARD_CASES))
def test_forward(case, impl, rng):
    check_forward(case, impl, rng)


def test_causal_T_gt_S_rows_are_zero_not_nan(impl, rng):
    """T > S, bottom-right causal: the first T - S rows see nothing: zeros and LSE -inf."""
    c = Case(B=1, T=20, S=5, causal=True, alignment="bottom_right")
    x, _, ref_lse, dead = check_forward(c, impl, rng)
    assert dead[0, :15].all() and not dead[0, 15:].any()


def test_fully_masked_everything_gives_zeros(impl, rng):
    c = Case(B=1, T=7, S=9)
    x = make_inputs(rng, c)
    mask = jnp.zeros((7, 9), bool)
    out, lse = mmfa_jax.attention(x["q"], x["k"], x["v"], mask=mask, return_lse=True, implementation=impl)
    assert (np.asarray(out) == 0).all() and np.isneginf(np.asarray(lse)).all()
    grads = jax.grad(lambda q, k, v: mmfa_jax.attention(q, k, v, mask=mask, implementation=impl).sum(),
                     argnums=(0, 1, 2))(x["q"], x["k"], x["v"])
    for g in grads:
        assert (np.asarray(g) == 0).all()


def test_default_implementation_matches_reference(rng):
    c = Case(T=7, S=9, causal=True)
    x = make_inputs(rng, c)
    out = mmfa_jax.attention(x["q"], x["k"], x["v"], is_causal=True)
    ref, _ = attention_reference(x["q64"], x["k64"], x["v64"], is_causal=True)
    assert_close(out, ref, tolerance("float32"), "out")
    expected = "pallas" if mmfa_jax.pallas_available() else "xla"
    assert mmfa_jax.default_implementation() == expected
    assert mmfa_jax.dot_product_attention is mmfa_jax.attention


def test_small_problem_and_row_reading_forward_tiles(impl, rng):
    """The sm90 d128 row's forward tiles for small problems and for key/value rows read by index
    (``for_problem``) and its own tiles all give the reference's output on one small problem, so
    the GPU suite, whose problems are mostly small, checks each."""
    row = tuning.TABLE[("sm90", 128)]  # bfloat16 tiles
    assert row.for_problem(2, 16, 293).forward == row.forward_small  # 96 programs of 128 rows
    assert row.for_problem(2, 16, 293, kv_rows=True).forward == row.forward_small
    assert row.for_problem(1, 16, 4160).forward == row.forward  # 528
    assert row.for_problem(1, 16, 4160, kv_rows=True).forward == row.forward_rows
    assert row.for_problem(2, 16, 293).backward_dq == row.backward_dq
    c = Case(T=150, S=150, H=128, causal=True, dtype="bfloat16")
    x = make_inputs(rng, c)
    ref, _ = attention_reference(x["q64"], x["k64"], x["v64"], is_causal=True)
    large = dataclasses.replace(row, forward_small=None)  # as if the problem were large
    for config in (row, large):
        out = mmfa_jax.attention(x["q"], x["k"], x["v"], is_causal=True, config=config, implementation=impl)
        assert_close(out, ref, tolerance("bfloat16"), f"out with {config.for_problem(c.B, c.N, c.T).forward}")
    rows = np.tile(np.arange(c.T, dtype=np.int32), (c.B, 1))
    out = mmfa_jax.attention_at_rows(x["q"], rows, x["k"], x["v"], kv_rows=rows, is_causal=True, config=large,
                                     implementation=impl)
    assert_close(out, ref, tolerance("bfloat16"), f"out with {row.forward_rows}")


def test_under_jit_with_traced_lengths(impl, rng):
    c = Case(T=33, S=33, causal=True)
    x = make_inputs(rng, c)
    kvl = jnp.array([10, 33], jnp.int32)

    @jax.jit
    def f(q, k, v, kvl):
        return mmfa_jax.attention(q, k, v, is_causal=True, key_value_seq_lengths=kvl, implementation=impl)

    out = f(x["q"], x["k"], x["v"], kvl)
    ref, _ = attention_reference(x["q64"], x["k64"], x["v64"], is_causal=True, kv_lengths=np.asarray(kvl))
    assert_close(out, ref, tolerance("float32"), "out")


@pytest.mark.parametrize("layout", ["BTNH", "BNTH"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_under_jit(dtype, layout, impl, rng):
    """Forward and gradients inside jax.jit (how models call it; also how the torch face runs)."""
    c = Case(B=2, T=33, S=33, N=2, K=2, H=32, dtype=dtype, layout=layout, causal=True)
    x = make_inputs(rng, c)
    q, k, v = (_to_layout(x[n], c) for n in "qkv")
    w, w64 = normal(rng, (2, 33, 2, 32), dtype)

    @jax.jit
    def f(q, k, v):
        def loss(q, k, v):
            out = mmfa_jax.attention(q, k, v, is_causal=True, layout=layout, implementation=impl)
            return jnp.sum(out.astype(jnp.float32) * _to_layout(w, c).astype(jnp.float32)), out
        return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    grads, out = f(q, k, v)
    ref, _ = attention_reference(x["q64"], x["k64"], x["v64"], is_causal=True)
    assert out.dtype == q.dtype
    assert_close(_from_layout(out, c), ref, tolerance(dtype), "out")
    want = attention_reference_grads(x["q64"], x["k64"], x["v64"], w64, is_causal=True)
    for name, g, r in zip(("dq", "dk", "dv"), grads, want):
        assert_close(_from_layout(g, c), r, tolerance(dtype, grad=True), name)


def test_matches_jax_nn_dot_product_attention(impl, rng):
    """Drop-in: same numbers as jax.nn.dot_product_attention on what both support."""
    c = Case(T=33, S=33, N=4, K=2)
    x = make_inputs(rng, c)
    bias, _ = normal(rng, (2, 4, 33, 33))
    for kwargs in ({}, {"is_causal": True}, {"bias": bias, "scale": 0.2}):
        want = jax.nn.dot_product_attention(x["q"], x["k"], x["v"], implementation="xla", **kwargs)
        got = mmfa_jax.dot_product_attention(x["q"], x["k"], x["v"], implementation=impl, **kwargs)
        assert_close(got, np.asarray(want, np.float64), tolerance("float32"), f"vs jax.nn {sorted(kwargs)}")


# ------------------------------------------------------------------------------------------------
# Gradients

GRAD_CASES = {
    "plain": Case(),
    "causal_T_lt_S_lengths": Case(T=33, S=65, causal=True, q_lengths=(30, 33), kv_lengths=(60, 41)),
    "causal_T_gt_S": Case(T=65, S=33, causal=True),
    "window_softcap": Case(T=65, S=65, window=(10, 4), softcap=2.0, scale=0.6),
    "bias_BNTS_mask": Case(T=33, S=65, bias=(2, 2, 33, 65), mask=(2, 2, 33, 65)),
    "bias_TS": Case(T=33, S=33, bias=(33, 33), causal=True),
    "bias_1N1S": Case(T=33, S=65, N=4, K=2, bias=(1, 4, 1, 65)),
    "gqa_4_segments": Case(N=4, K=1, T=65, S=65, segments="single", causal=True),
    "gqa_2_pair_segments": Case(N=4, K=2, T=33, S=65, segments="pair"),
    "layout_BNTH": Case(layout="BNTH", N=4, K=2, T=33, S=65, bias=(2, 1, 33, 65), window=(None, 2)),
    "head_dim_72": Case(H=72, T=33, S=33, causal=True, kv_lengths=(33, 5)),
    "head_dim_96_T100": Case(B=1, H=96, T=100, S=100, causal=True),
    "unbatched": Case(B=1, unbatched=True, T=7, S=33, causal=True),
    "small_tiles_everything": Case(T=65, S=65, N=4, K=2, H=80, causal=True, window=(30, None), softcap=4.0,
                                   bias=(2, 1, 65, 65), mask=(1, 4, 65, 65), q_lengths=(60, 65),
                                   kv_lengths=(65, 50), config=SMALL_TILES),
    "small_tiles_T_gt_S": Case(T=65, S=33, window=(20, 5), segments="pair", config=SMALL_TILES),
    "mask_blocks_small_tiles": Case(T=65, S=65, mask=(2, 1, 65, 65), mask_pattern="blocks", config=SMALL_TILES),
    "float16": Case(dtype="float16", T=33, S=65, causal=True, bias=(1, 2, 33, 65)),
    "bfloat16": Case(dtype="bfloat16", N=4, K=2, T=33, S=33, softcap=3.0, kv_lengths=(20, 33)),
}


@pytest.mark.parametrize("case", list(GRAD_CASES.values()), ids=list(GRAD_CASES))
def test_grads(case, impl, rng):
    check_grads(case, impl, rng)


def test_grad_through_lse_only(impl, rng):
    """d_out = 0: the gradient flows through the LSE alone (dq = scale * sum p (dlse) k, ...)."""
    _, grads, _ = check_grads(Case(T=33, S=65, N=4, K=2, causal=True, bias=(2, 4, 33, 65)), impl, rng,
                              out_grad=False)
    assert float(jnp.abs(grads[0]).max()) > 0 and float(jnp.abs(grads[3]).max()) > 0


def test_grads_of_dead_rows_are_zero(impl, rng):
    """Bottom-right causal with T > S: the first T - S rows see nothing, rows past the length are
    padding: their query gradients are exactly 0."""
    c = Case(B=1, T=20, S=5, causal=True, alignment="bottom_right", q_lengths=(18,))
    _, grads, _ = check_grads(c, impl, rng)
    dq = np.asarray(grads[0])
    assert (dq[0, :15] == 0).all() and (dq[0, 18:] == 0).all()


def test_grad_via_jax_grad_of_scalar_loss(impl, rng):
    """The ordinary jax.grad route (no explicit LSE) agrees with the reference."""
    c = Case(T=33, S=33, causal=True)
    x = make_inputs(rng, c)
    w, w64 = normal(rng, (2, 33, 2, 32))

    def loss(q, k, v):
        return jnp.sum(mmfa_jax.attention(q, k, v, is_causal=True, implementation=impl) * w)

    grads = jax.grad(loss, argnums=(0, 1, 2))(x["q"], x["k"], x["v"])
    want = attention_reference_grads(x["q64"], x["k64"], x["v64"], w64, is_causal=True)
    for name, g, r in zip(("dq", "dk", "dv"), grads, want):
        assert_close(g, r, tolerance("float32", grad=True), name)


# ------------------------------------------------------------------------------------------------
# Property test: random shapes and options.


@st.composite
def cases(draw):
    K = draw(st.sampled_from([1, 2]))
    N = K * draw(st.sampled_from([1, 2, 4]))
    T = draw(st.sampled_from([1, 5, 17, 33, 64]))
    S = draw(st.sampled_from([1, 7, 16, 40, 65]))
    B = draw(st.sampled_from([1, 2]))
    window = draw(st.sampled_from([None, 3, (0, None), (None, 0), (5, 2), (None, 10)]))
    bias = draw(st.sampled_from([None, (T, S), (B, N, T, S), (1, N, 1, S)]))
    mask = draw(st.sampled_from([None, (T, S), (B, 1, T, S)]))
    segments = draw(st.sampled_from([None, "pair"] + (["single"] if T == S else [])))
    ql = draw(st.none() | st.lists(st.integers(0, T), min_size=B, max_size=B).map(tuple))
    kvl = draw(st.none() | st.lists(st.integers(0, S), min_size=B, max_size=B).map(tuple))
    return Case(
        B=B, T=T, S=S, N=N, K=K, H=draw(st.sampled_from([16, 32, 40, 64, 96])),
        dtype=draw(st.sampled_from(["float32", "float32", "float16", "bfloat16"])),
        causal=draw(st.booleans()), window=window,
        softcap=draw(st.sampled_from([None, None, 1.0, 5.0])), scale=draw(st.sampled_from([None, 0.25])),
        bias=bias, mask=mask, segments=segments, q_lengths=ql, kv_lengths=kvl,
        layout=draw(st.sampled_from(["BTNH", "BNTH"])),
        config=draw(st.sampled_from([None, SMALL_TILES])))


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(), seed=st.integers(0, 2**32 - 1))
def test_property_interpret_forward_and_grads(case, seed):
    rng = np.random.default_rng(seed)
    check_forward(case, "interpret", rng)
    check_grads(case, "interpret", rng)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(), seed=st.integers(0, 2**32 - 1))
def test_property_xla_forward_and_grads(case, seed):
    rng = np.random.default_rng(seed)
    check_forward(case, "xla", rng)
    check_grads(case, "xla", rng)


@pytest.mark.gpu
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(), seed=st.integers(0, 2**32 - 1))
def test_property_pallas_forward_and_grads(case, seed):
    rng = np.random.default_rng(seed)
    check_forward(case, "pallas", rng)
    check_grads(case, "pallas", rng)


def test_seed_helper_is_stable():
    assert seed_of("a") == seed_of("a") != seed_of("b")


@pytest.mark.parametrize("pattern,shape", [("blocks", (2, 1, 100, 100)), ("blocks", (1, 3, 40, 70)),
                                           ("random", (2, 2, 33, 65)), ("random", (2, 1, 65, 65))])
@pytest.mark.parametrize("tiles", [(16, 32), (32, 64), (64, 64)])
def test_mask_ranges_against_numpy(pattern, shape, tiles, kernel_impl, rng):
    """The forward's block ranges of a dense mask: first and last block with a visible logit,
    and the longest run of blocks where every (in-range) logit is visible, per query tile; for
    the tests' two kinds of mask (Gemma-like blocks; random with wholly hidden rows), ragged
    tiles, on each implementation (the GPU's compiled kernels with ``--gpu``)."""
    from mmfa_jax import backends, kernels
    from mmfa_jax._autodiff import prepare
    from mmfa_jax._checks import Options
    from mmfa_jax.kernels.common import block_size

    B, N, T, S = shape
    mask = image_block_mask(rng, shape) if pattern == "blocks" else make_inputs(rng, Case(T=T, S=S, mask=shape))["mask"]
    q = jnp.zeros((B, T, N, 32), jnp.float32)
    k = jnp.zeros((B, S, N, 32), jnp.float32)
    (problem, _, _), args = prepare(Options.make(implementation=kernel_impl), (q, k, k, None, jnp.asarray(mask),
                                                                              None, None, None))
    bq, bk = tiles
    lowering = backends.resolve(kernel_impl)
    got = np.asarray(kernels.mask_ranges(problem, KernelConfig(bq, bk, 4, 1), args[4], lowering=lowering))
    bq, bk = block_size(T, bq), block_size(S, bk)  # as the kernels clamp them
    nq, nk = -(-T // bq), -(-S // bk)
    assert got.shape == (B, N, nq, 4)
    for b, n, t in np.ndindex(B, N, nq):
        cells = [mask[b, n, t * bq:(t + 1) * bq, j * bk:(j + 1) * bk] for j in range(nk)]
        live = [j for j in range(nk) if cells[j].any()]
        full = [cells[j].all() for j in range(nk)]
        runs = [(a, e) for a in range(nk) for e in range(a + 1, nk + 1) if all(full[a:e])]
        best = max(runs, key=lambda r: (r[1] - r[0], -r[0]), default=(0, 0))
        want = (live[0], *best, live[-1] + 1) if live else (nk, *best, 0)
        assert tuple(got[b, n, t]) == want, (b, n, t)


def test_head_chunks_cover_the_head_dim_with_powers_of_two():
    """Split head dims: two power-of-two chunks whose sum is the head dim rounded up to 16, when
    that beats the padded power of two; otherwise the padded power of two as one chunk."""
    from mmfa_jax.kernels.common import head_chunks, padded_head_dim

    for d in range(1, 257):
        chunks = head_chunks(d, split=True)
        widths = [c.width for c in chunks]
        assert all(w >= 16 and w & (w - 1) == 0 for w in widths), (d, widths)
        assert [c.start for c in chunks] == [sum(widths[:i]) for i in range(len(widths))]
        assert sum(widths) >= d
        if len(chunks) == 2:
            assert sum(widths) == -(-d // 16) * 16 < padded_head_dim(d), (d, widths)
        assert [(c.start, c.width) for c in head_chunks(d, split=False)] == [(0, padded_head_dim(d))]
    assert [c.width for c in head_chunks(72, True)] == [64, 16]
    assert [c.width for c in head_chunks(96, True)] == [64, 32]


@pytest.mark.parametrize("head_dim", [72, 80])
def test_split_head_forward_compiles_for_hopper_in_less_shared_memory(tmp_path, monkeypatch, head_dim):
    """The forward kernel at the vision towers' head dims, split into 64 + 16 columns, lowers and
    compiles to an sm_90 cubin (official Triton, no GPU), in less shared memory than padded to 128."""
    pytest.importorskip("triton")
    import importlib
    import os
    import sys

    from mmfa_jax import triton_route

    monkeypatch.setenv("MMFA_CACHE_DIR", str(tmp_path))
    sys.path.insert(0, os.path.dirname(__file__))
    builders = importlib.import_module("turing_kernels")
    row = tuning.config_for(128, jnp.bfloat16, "sm90")
    shared = {}
    for split in (False, True):
        triton_route.clear_memory_cache()
        cfg = row.map(lambda c: dataclasses.replace(c, split_head=split))
        fn, args = builders.build("forward", head_dim, jnp.bfloat16, cfg, implementation="triton")
        (kernel, *_), = triton_route.lower_for(fn, *args, device_kind="NVIDIA H100")
        assert kernel.cc == 90 and len(kernel.cubin) > 0
        shared[split] = kernel.shared
    assert shared[True] < shared[False] <= triton_route.SHARED_MEMORY_PER_BLOCK[90], shared
