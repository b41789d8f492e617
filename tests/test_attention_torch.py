"""mmfa_torch.scaled_dot_product_attention against the float64 reference, torch's own SDPA and the
jax face: outputs, LSE, autograd, strided inputs, torch.compile."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, to_numpy, tolerance
from reference import attention_reference, attention_reference_grads, image_block_mask

import mmfa_torch

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def device_for(impl):
    return "cuda" if impl == "pallas" else "cpu"


def tensor(rng, shape, dtype="float32", device="cpu", requires_grad=False):
    """Unit normal torch tensor and its (rounded) values as float64 NumPy."""
    t = torch.from_numpy(rng.standard_normal(shape)).to(TORCH_DTYPES[dtype]).to(device)
    t.requires_grad_(requires_grad)
    return t, t.detach().cpu().double().numpy()


def btnh(a):
    """(B, H, L, D) numpy -> (B, L, H, D)."""
    return np.swapaxes(a, 1, 2)


@dataclasses.dataclass(frozen=True)
class TCase:
    B: int = 2
    Hq: int = 2
    Hkv: int = 2
    L: int = 33
    S: int = 33
    D: int = 32
    dtype: str = "float32"
    is_causal: bool = False
    mask: str | None = None  # "bool" (random), "blocks" (Gemma-like: tiles hidden, full and mixed) or "float"
    mask_shape: tuple | None = None
    window: object = None
    softcap: float | None = None
    scale: float | None = None
    segments: str | None = None  # "single" or "pair"
    q_lengths: tuple | None = None
    kv_lengths: tuple | None = None


def make(rng, c: TCase, device, requires_grad=False):
    q, q64 = tensor(rng, (c.B, c.Hq, c.L, c.D), c.dtype, device, requires_grad)
    k, k64 = tensor(rng, (c.B, c.Hkv, c.S, c.D), c.dtype, device, requires_grad)
    v, v64 = tensor(rng, (c.B, c.Hkv, c.S, c.D), c.dtype, device, requires_grad)
    kwargs, ref = {}, {}
    if c.mask == "bool":
        m = rng.random(c.mask_shape) > 0.3
        m[(0,) * (len(c.mask_shape) - 2) + (c.mask_shape[-2] // 2,)] = False  # a fully masked row
        kwargs["attn_mask"], ref["mask"] = torch.from_numpy(m).to(device), m
    elif c.mask == "blocks":
        m = image_block_mask(rng, c.mask_shape)
        kwargs["attn_mask"], ref["mask"] = torch.from_numpy(m).to(device), m
    elif c.mask == "float":
        b, b64 = tensor(rng, c.mask_shape, "float32", device, requires_grad)
        kwargs["attn_mask"], ref["bias"] = b, b64
    if c.segments == "single":
        s = np.sort(rng.integers(0, 3, (c.B, c.L)), axis=1)
        kwargs["segment_ids"] = torch.from_numpy(s).to(device)
        ref["q_segments"] = ref["kv_segments"] = s
    elif c.segments == "pair":
        qs, ks = np.sort(rng.integers(0, 4, (c.B, c.L)), axis=1), np.sort(rng.integers(0, 3, (c.B, c.S)), axis=1)
        kwargs["segment_ids"] = (torch.from_numpy(qs).to(device), torch.from_numpy(ks).to(device))
        ref["q_segments"], ref["kv_segments"] = qs, ks
    if c.q_lengths is not None:
        kwargs["query_seq_lengths"] = torch.tensor(c.q_lengths, device=device)
        ref["q_lengths"] = np.array(c.q_lengths)
    if c.kv_lengths is not None:
        kwargs["key_value_seq_lengths"] = torch.tensor(c.kv_lengths, device=device)
        ref["kv_lengths"] = np.array(c.kv_lengths)
    kwargs.update(is_causal=c.is_causal, scale=c.scale, enable_gqa=c.Hq != c.Hkv, local_window_size=c.window,
                  logits_soft_cap=c.softcap)
    ref.update(is_causal=c.is_causal, scale=c.scale, window=c.window, softcap=c.softcap)
    return (q, k, v), (btnh(q64), btnh(k64), btnh(v64)), kwargs, ref


CASES = {
    "plain": TCase(),
    "causal_L_lt_S": TCase(L=17, S=40, is_causal=True),
    "causal_L_gt_S": TCase(L=40, S=17, is_causal=True),
    "bool_mask_dead_rows": TCase(L=17, S=33, mask="bool", mask_shape=(2, 2, 17, 33)),
    "bool_mask_LS_causal": TCase(L=33, S=33, mask="bool", mask_shape=(33, 33), is_causal=True),
    "float_mask": TCase(L=17, S=33, mask="float", mask_shape=(2, 1, 17, 33), scale=0.4),
    "gqa": TCase(Hq=4, Hkv=1, L=17, S=33, is_causal=True),
    "everything": TCase(Hq=4, Hkv=2, L=33, S=40, D=72, window=(12, None), softcap=3.0, segments="pair",
                        q_lengths=(30, 33), kv_lengths=(40, 25), is_causal=True, mask="float",
                        mask_shape=(33, 40)),
    "segments_window_int": TCase(L=33, S=33, segments="single", window=5),
    "float16": TCase(dtype="float16", L=17, S=33, is_causal=True),
    "bfloat16": TCase(dtype="bfloat16", Hq=4, Hkv=2, mask="bool", mask_shape=(1, 4, 33, 33)),
    # long enough for tiles that the mask shows wholly (the GPU once skipped those as hidden)
    "blocks_mask": TCase(L=150, S=200, mask="blocks", mask_shape=(2, 1, 150, 200)),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_forward(case, impl, rng):
    (q, k, v), (q64, k64, v64), kwargs, ref = make(rng, case, device_for(impl))
    out, lse = mmfa_torch.scaled_dot_product_attention(q, k, v, return_lse=True, implementation=impl, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    ref_out, ref_lse = attention_reference(q64, k64, v64, **ref)
    assert_close(btnh(to_numpy(out)), ref_out, tolerance(case.dtype), "out")
    assert_close(np.swapaxes(to_numpy(lse), 1, 2), ref_lse, tolerance(case.dtype), "lse")
    dead = np.isneginf(ref_lse)
    assert (btnh(to_numpy(out))[dead] == 0).all()


def test_unbatched(impl, rng):
    c = TCase(B=1, Hq=2, Hkv=1, L=7, S=17, is_causal=True)
    (q, k, v), (q64, k64, v64), kwargs, ref = make(rng, c, device_for(impl))
    out, lse = mmfa_torch.attention(q[0], k[0], v[0], return_lse=True, implementation=impl, **kwargs)
    assert out.shape == q.shape[1:] and lse.shape == q.shape[1:3]
    ref_out, ref_lse = attention_reference(q64, k64, v64, **ref)
    assert_close(to_numpy(out).swapaxes(0, 1), ref_out[0], tolerance("float32"), "out")
    assert_close(to_numpy(lse).swapaxes(0, 1), ref_lse[0], tolerance("float32"), "lse")


GRAD_CASES = {
    "float_mask": TCase(L=17, S=33, mask="float", mask_shape=(2, 1, 17, 33), is_causal=True),
    "float_mask_LS_gqa_lengths": TCase(Hq=4, Hkv=2, L=33, S=33, mask="float", mask_shape=(33, 33),
                                       kv_lengths=(20, 33), q_lengths=(33, 30), softcap=2.0),
    "bool_mask_window": TCase(L=33, S=17, mask="bool", mask_shape=(2, 2, 33, 17), window=(5, 5)),
    "float_mask_HLS_T_gt_S": TCase(L=33, S=17, mask="float", mask_shape=(2, 33, 17), is_causal=True),
    "float16": TCase(dtype="float16", L=17, S=17, is_causal=True),
    "blocks_mask": TCase(L=150, S=200, mask="blocks", mask_shape=(2, 1, 150, 200)),
}


@pytest.mark.parametrize("case", list(GRAD_CASES.values()), ids=list(GRAD_CASES))
@pytest.mark.parametrize("lse_grad", [False, True], ids=["out", "out+lse"])
def test_autograd(case, lse_grad, impl, rng):
    (q, k, v), (q64, k64, v64), kwargs, ref = make(rng, case, device_for(impl), requires_grad=True)
    out, lse = mmfa_torch.scaled_dot_product_attention(q, k, v, return_lse=True, implementation=impl, **kwargs)
    d_out, d_out64 = tensor(rng, out.shape, case.dtype, out.device)
    d_lse, d_lse64 = tensor(rng, lse.shape, "float32", out.device)
    loss = (out.float() * d_out.float()).sum()
    if lse_grad:
        loss = loss + torch.where(torch.isfinite(lse), lse * d_lse, 0.0).sum()
    loss.backward()
    want = attention_reference_grads(q64, k64, v64, btnh(d_out64), btnh(d_lse64) if lse_grad else None, **ref)
    tol = tolerance(case.dtype, grad=True)
    for name, t, w in zip(("dq", "dk", "dv"), (q, k, v), want[:3]):
        assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape
        assert_close(btnh(to_numpy(t.grad)), w, tol, name)
    if case.mask == "float":
        bias = kwargs["attn_mask"]
        assert bias.grad is not None and bias.grad.shape == bias.shape
        assert_close(to_numpy(bias.grad), want[3], tol, "dbias")


def test_transposed_view_input_gives_same_numbers(impl, rng):
    """A contiguous (B, L, H, D) tensor viewed as (B, H, L, D) (what attention layers produce)."""
    device = device_for(impl)
    B, L, S, Hq, Hkv, D = 2, 33, 40, 4, 2, 32
    bases = [tensor(rng, shape, "float32", device)[0] for shape in ((B, L, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D))]
    views = [b.clone().requires_grad_(True) for b in bases]
    conts = [b.transpose(1, 2).contiguous().requires_grad_(True) for b in bases]
    assert not views[0].transpose(1, 2).is_contiguous()
    kw = dict(is_causal=True, enable_gqa=True, return_lse=True, implementation=impl)
    out_v, lse_v = mmfa_torch.scaled_dot_product_attention(*(x.transpose(1, 2) for x in views), **kw)
    out_c, lse_c = mmfa_torch.scaled_dot_product_attention(*conts, **kw)
    assert out_v.shape == out_c.shape == (B, Hq, L, D)
    d_out, _ = tensor(rng, (B, Hq, L, D), "float32", device)
    (out_v * d_out).sum().backward()
    (out_c * d_out).sum().backward()
    ref_out, ref_lse = attention_reference(*(to_numpy(b) for b in bases), is_causal=True)
    want = attention_reference_grads(*(to_numpy(b) for b in bases), btnh(to_numpy(d_out)), is_causal=True)
    tol = tolerance("float32")
    for out, lse in ((out_v, lse_v), (out_c, lse_c)):
        assert_close(btnh(to_numpy(out)), ref_out, tol, "out")
        assert_close(np.swapaxes(to_numpy(lse), 1, 2), ref_lse, tol, "lse")
    for name, xv, xc, w in zip(("dq", "dk", "dv"), views, conts, want):
        assert_close(to_numpy(xv.grad), w, tolerance("float32", grad=True), name + " (view)")
        assert_close(btnh(to_numpy(xc.grad)), w, tolerance("float32", grad=True), name + " (contiguous)")
    assert_close(out_v, to_numpy(out_c), 1e-6, "view vs contiguous")


def test_torch_compile_fullgraph_forward_and_backward(rng):
    impl = "interpret"
    (q, k, v), (q64, k64, v64), kwargs, ref = make(
        rng, TCase(Hq=4, Hkv=2, L=17, S=33, is_causal=True, mask="float", mask_shape=(1, 4, 17, 33)), "cpu",
        requires_grad=True)
    bias = kwargs["attn_mask"]

    def f(q, k, v, bias):
        out, lse = mmfa_torch.scaled_dot_product_attention(q, k, v, bias, is_causal=True, enable_gqa=True,
                                                           return_lse=True, implementation=impl)
        return (out * out).sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum() * 0.5, out

    compiled = torch.compile(f, fullgraph=True)
    loss, out = compiled(q, k, v, bias)
    loss.backward()
    ref_out, ref_lse = attention_reference(q64, k64, v64, bias=ref["bias"], is_causal=True)
    assert_close(btnh(to_numpy(out)), ref_out, tolerance("float32"), "compiled out")
    want = attention_reference_grads(q64, k64, v64, 2 * ref_out, np.full(ref_lse.shape, 0.5), bias=ref["bias"],
                                     is_causal=True)
    for name, t, w in zip(("dq", "dk", "dv", "dbias"), (q, k, v, bias), want):
        w = w if name == "dbias" else btnh(w)
        assert_close(to_numpy(t.grad), w, tolerance("float32", grad=True), "compiled " + name)


@pytest.mark.parametrize("layout", ["BNTH", "BTNH"])
def test_cross_framework_parity(layout, rng):
    """Torch and jax faces on the same inputs, both interpreted: the same numbers."""
    import jax.numpy as jnp

    import mmfa_jax

    B, L, S, Hq, Hkv, D = 2, 33, 40, 4, 2, 40
    q, _ = tensor(rng, (B, Hq, L, D))
    k, _ = tensor(rng, (B, Hkv, S, D))
    v, _ = tensor(rng, (B, Hkv, S, D))
    bias, _ = tensor(rng, (B, 1, L, S))
    kw = dict(is_causal=True, local_window_size=(20, None), logits_soft_cap=4.0, return_lse=True,
              implementation="interpret")
    t_out, t_lse = mmfa_torch.attention(q, k, v, bias, enable_gqa=True, **kw)
    arrays = [jnp.asarray(x.numpy()) for x in (q, k, v)]
    if layout == "BTNH":
        arrays = [jnp.swapaxes(a, 1, 2) for a in arrays]
    j_out, j_lse = mmfa_jax.attention(*arrays, jnp.asarray(bias.numpy()), layout=layout, **kw)
    if layout == "BTNH":
        j_out, j_lse = jnp.swapaxes(j_out, 1, 2), jnp.swapaxes(j_lse, 1, 2)
    assert_close(t_out, to_numpy(j_out), 1e-6, "out")
    assert_close(t_lse, to_numpy(j_lse), 1e-6, "lse")


def test_matches_torch_sdpa_on_plain_inputs(impl, rng):
    device = device_for(impl)
    q, _ = tensor(rng, (2, 4, 17, 32), device=device)
    k, _ = tensor(rng, (2, 2, 33, 32), device=device)
    v, _ = tensor(rng, (2, 2, 33, 32), device=device)
    bool_mask = torch.from_numpy(rng.random((17, 33)) > 0.3).to(device)
    bool_mask[:, 0] = True  # every row keeps a key: torch gives NaN for fully masked rows
    float_mask, _ = tensor(rng, (2, 1, 17, 33), device=device)
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    for kwargs in ({}, {"scale": 0.3}, {"attn_mask": bool_mask}, {"attn_mask": float_mask}):
        want = F.scaled_dot_product_attention(q, kr, vr, **kwargs)
        got = mmfa_torch.scaled_dot_product_attention(q, k, v, enable_gqa=True, implementation=impl, **kwargs)
        assert_close(got, to_numpy(want), tolerance("float32"), f"vs torch sdpa {sorted(kwargs)}")
    # Causal with L == S (torch aligns top-left, mmfa bottom-right: they agree on squares), and
    # torch's own enable_gqa.
    q2, _ = tensor(rng, (1, 4, 33, 32), device=device)
    want = F.scaled_dot_product_attention(q2, kr[:1], vr[:1], is_causal=True)
    got = mmfa_torch.scaled_dot_product_attention(q2, kr[:1], vr[:1], is_causal=True, implementation=impl)
    assert_close(got, to_numpy(want), tolerance("float32"), "causal vs torch sdpa")
    want = F.scaled_dot_product_attention(q2, k[:1], v[:1], enable_gqa=True)
    got = mmfa_torch.scaled_dot_product_attention(q2, k[:1], v[:1], enable_gqa=True, implementation=impl)
    assert_close(got, to_numpy(want), tolerance("float32"), "gqa vs torch sdpa")


def test_alias():
    assert mmfa_torch.attention is mmfa_torch.scaled_dot_product_attention
