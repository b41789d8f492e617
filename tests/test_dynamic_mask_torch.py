"""The torch face of dynamic mask attention (``mmfa_torch.dynamic_mask_attention``, ``zoh_states``;
SDPA's layout, zoh (B, Hkv, S)) against the float64 reference, and against the JAX face on the same
inputs. Runs on "interpret" and "xla" (CPU tensors crossing to JAX), "pallas" with --gpu."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from conftest import DEVICE, assert_close, tolerance  # noqa: E402
from reference import (  # noqa: E402
    dynamic_mask_reference,
    dynamic_mask_reference_grads,
    zoh_states_reference,
    zoh_states_reference_grads,
)
from test_dynamic_mask import CONFIG  # noqa: E402

import mmfa_jax  # noqa: E402
import mmfa_torch  # noqa: E402
from mmfa_jax import ArgumentError, ArgumentTypeError  # noqa: E402


def _tensor(rng, shape, dtype=torch.float32, decimals=None):
    x = rng.standard_normal(shape)
    if decimals is not None:
        x = np.round(x, decimals)
    return torch.as_tensor(x, dtype=dtype, device=DEVICE[0]).requires_grad_()


def _btnh64(t):
    return t.detach().float().cpu().numpy().astype(np.float64).swapaxes(1, 2)


def _f64(t):
    return t.detach().float().cpu().numpy().astype(np.float64)


CASES = {
    "causal-gqa-padding": dict(B=2, T=40, S=40, Hq=4, Hkv=2, keep=7, lengths=True),
    "bottom-right": dict(B=1, T=20, S=45, Hq=2, Hkv=1, keep=9, bottom_right=True),
    "segments": dict(B=1, T=40, S=40, Hq=2, Hkv=2, keep=5, segments=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_forward_and_gradients(impl, rng, name):
    c = CASES[name]
    B, T, S, Hq, Hkv, keep = (c[x] for x in ("B", "T", "S", "Hq", "Hkv", "keep"))
    D = 16
    q, k, v = _tensor(rng, (B, Hq, T, D)), _tensor(rng, (B, Hkv, S, D)), _tensor(rng, (B, Hkv, S, D))
    zoh = _tensor(rng, (B, Hkv, S), decimals=1)  # ties
    ours, ref = dict(keep_window_size=keep), dict(keep_window_size=keep)
    if c.get("lengths"):
        kv_lengths = np.array([S - 6] + [S] * (B - 1), np.int64)
        ours["key_value_seq_lengths"], ref["kv_lengths"] = torch.as_tensor(kv_lengths, device=DEVICE[0]), kv_lengths
    if c.get("bottom_right"):
        ours["causal_alignment"], ref["bottom_right"] = "bottom_right", True
    if c.get("segments"):
        seg = np.sort(rng.integers(0, 3, (B, T)), axis=1)
        ours["segment_ids"], ref["segment_ids"] = torch.as_tensor(seg, device=DEVICE[0]), seg
    out, lse = mmfa_torch.dynamic_mask_attention(q, k, v, zoh, implementation=impl, return_lse=True, **ours)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (B, Hq, T)
    args64 = (_btnh64(q), _btnh64(k), _btnh64(v), _f64(zoh))
    ref_out, ref_lse = dynamic_mask_reference(*args64, **ref)
    assert_close(_f64(out).swapaxes(1, 2), ref_out, tolerance("float32"), "out")
    assert_close(_f64(lse).swapaxes(1, 2), ref_lse, tolerance("float32"), "lse")
    d_out = torch.as_tensor(rng.standard_normal(out.shape), dtype=torch.float32, device=DEVICE[0])
    d_lse = torch.as_tensor(rng.standard_normal(lse.shape), dtype=torch.float32, device=DEVICE[0])
    torch.autograd.backward((out, lse), (d_out, d_lse))
    refs = dynamic_mask_reference_grads(*args64, _f64(d_out).swapaxes(1, 2), _f64(d_lse).swapaxes(1, 2), **ref)
    tol = tolerance("float32", grad=True)
    for t, want, what in zip((q, k, v), refs[:3], ("dq", "dk", "dv")):
        assert_close(_f64(t.grad).swapaxes(1, 2), want, tol, what)
    assert_close(_f64(zoh.grad), refs[3], tol, "d_zoh")


def test_same_numbers_as_the_jax_face(impl, rng):
    """Same inputs (the torch tensors' values in jax's layout): the same output and LSE."""
    q, k, v = _tensor(rng, (1, 4, 40, 16)), _tensor(rng, (1, 2, 40, 16)), _tensor(rng, (1, 2, 40, 16))
    zoh = _tensor(rng, (1, 2, 40), decimals=1)
    out, lse = mmfa_torch.dynamic_mask_attention(q, k, v, zoh, keep_window_size=6, implementation=impl,
                                                 return_lse=True)
    j = [jnp.asarray(_f64(t).swapaxes(1, 2), jnp.float32) for t in (q, k, v)]
    j_out, j_lse = mmfa_jax.dynamic_mask_attention(*j, jnp.asarray(_f64(zoh), jnp.float32), keep_window_size=6,
                                                   implementation=impl, return_lse=True, config=CONFIG)
    assert_close(_f64(out).swapaxes(1, 2), np.asarray(j_out, np.float64), 1e-5, "out")
    assert_close(_f64(lse).swapaxes(1, 2), np.asarray(j_lse, np.float64), 1e-5, "lse")


def test_zoh_states_and_the_doge_step(rng):
    """zoh_states against the reference (values and gradients to value, dt_proj, A, the bias),
    then feeding dynamic mask attention: gradients reach A and dt_proj."""
    B, K, S, D = 2, 2, 24, 8
    value = _tensor(rng, (B, K, S, D))
    dt_proj, A, bias = _tensor(rng, (K, K * D)), _tensor(rng, (K,)), _tensor(rng, (K,))
    zoh = mmfa_torch.zoh_states(value, dt_proj, A, bias)
    v64 = _btnh64(value)
    assert zoh.shape == (B, K, S)
    assert_close(_f64(zoh), zoh_states_reference(v64, _f64(dt_proj), _f64(A), _f64(bias)), tolerance("float32"))
    d_zoh = rng.standard_normal(zoh.shape)
    zoh.backward(torch.as_tensor(d_zoh, dtype=torch.float32))
    refs = zoh_states_reference_grads(v64, _f64(dt_proj), _f64(A), d_zoh, _f64(bias))
    assert_close(_f64(value.grad).swapaxes(1, 2), refs[0], tolerance("float32", grad=True), "d_value")
    for t, want, what in zip((dt_proj, A, bias), refs[1:], ("d_dt_proj", "d_A", "d_bias")):
        assert_close(_f64(t.grad), want, tolerance("float32", grad=True), what)

    q = _tensor(rng, (B, 4, S, D))
    A.grad = dt_proj.grad = None
    out = mmfa_torch.dynamic_mask_attention(q, value, value, mmfa_torch.zoh_states(value, dt_proj, A),
                                            keep_window_size=5)
    out.sum().backward()
    assert A.grad is not None and torch.isfinite(A.grad).all() and A.grad.abs().sum() > 0
    assert dt_proj.grad is not None and dt_proj.grad.abs().sum() > 0


def test_argument_errors():
    q, kv = torch.ones(1, 4, 32, 16), torch.ones(1, 2, 32, 16)
    with pytest.raises(ArgumentError, match=r"zoh must be \(B, K, S\) = \(1, 2, 32\)"):
        mmfa_torch.dynamic_mask_attention(q, kv, kv, torch.ones(1, 32, 2), keep_window_size=4)
    with pytest.raises(ArgumentError, match="keep_window_size must be >= 1, got 0"):
        mmfa_torch.dynamic_mask_attention(q, kv, kv, torch.ones(1, 2, 32), keep_window_size=0)
    with pytest.raises(ArgumentTypeError, match="zoh must be a torch.Tensor, got ndarray"):
        mmfa_torch.dynamic_mask_attention(q, kv, kv, np.ones((1, 2, 32)), keep_window_size=4)
    with pytest.raises(ArgumentError, match=r"dt_proj must be \(K, K \* H\) = \(2, 32\)"):
        mmfa_torch.zoh_states(kv, torch.ones(2, 16), torch.ones(2))


def test_empty_query_gives_zeros_and_zero_gradients():
    q = torch.ones(1, 2, 0, 16, requires_grad=True)
    kv = torch.ones(1, 1, 8, 16, requires_grad=True)
    zoh = torch.ones(1, 1, 8, requires_grad=True)
    out = mmfa_torch.dynamic_mask_attention(q, kv, kv, zoh, keep_window_size=2)
    out.sum().backward()
    assert out.shape == q.shape and zoh.grad is not None and not zoh.grad.any()
