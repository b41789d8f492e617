"""The torch face's own launch of the compiled kernels (mmfa_torch.launch).

On the CPU: what the launcher records when it lowers for a GPU that is not there (kernels, grids,
parameter counts), for Hopper and Turing. With --gpu: the direct launch against the DLPack route
and the float64 reference, gradients included, on the caller's stream.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import assert_close, to_numpy, tolerance
from reference import attention_reference, attention_reference_grads

from mmfa_jax import triton_route
from mmfa_torch import launch
from mmfa_torch.ops import options

needs_triton = pytest.mark.skipif(not triton_route.available(), reason="needs the official triton package")


def _signature(B, N, K, T, S, D, *, mask=False, bias=False, segments=False, kv_lengths=False):
    t = lambda shape, dtype="bfloat16": (shape, dtype)  # noqa: E731
    return (t((B, N, T, D)), t((B, K, S, D)), t((B, K, S, D)), t((B, 1, T, S)) if bias else None,
            t((1, 1, T, S), "bool") if mask else None, t((B, T), "int32") if segments else None,
            t((B, S), "int32") if segments else None, None, t((B,), "int32") if kv_lengths else None)


@needs_triton
@pytest.mark.parametrize("cc", [90, 75])
def test_capture_records_kernels_grids_and_parameters(cc):
    opts = launch._config(options(None, True, "top_left", -1, -1, None, "BNTH", "triton-route", cc), 64,
                          torch.bfloat16)
    B, N, K, T, S, D = 2, 4, 2, 100, 130, 64
    sig = _signature(B, N, K, T, S, D, mask=True, segments=True, kv_lengths=True)
    blocks, ranges, fwd = launch._forward_kernels(opts, sig, cc)
    operands = sum(s is not None for s in sig)
    assert blocks.launch.kernel.name == "mmfa_mask_blocks" and blocks.buffers == 2  # the mask in, block flags out
    assert ranges.launch.kernel.name == "mmfa_mask_ranges" and ranges.buffers == 2  # the flags in, ranges out
    assert fwd.launch.kernel.name == "mmfa_flash_forward" and fwd.launch.kernel.cc == cc
    assert fwd.buffers == operands + 1 + 2  # the mask's ranges; out and lse
    assert launch.parameter_count(fwd.launch.kernel.ptx, "mmfa_flash_forward") == fwd.buffers + fwd.extra
    block_q = int(fwd.launch.label.split("block_q=")[1].split(",")[0])
    # Causal with few query tiles: heads are the fastest grid axis (heaviest tiles first across heads).
    assert fwd.launch.grid == (N, -(-T // block_q), B)  # (heads, query tiles, batch)

    bwd_sig = sig + (sig[0], ((B, N, T), "float32"), ((B, N, T), "float32"))
    dq, dkv = launch._backward_kernels(opts, bwd_sig, cc)
    assert (dq.launch.kernel.name, dkv.launch.kernel.name) == ("mmfa_flash_dq", "mmfa_flash_dkv")
    assert dq.buffers == operands + 3 + 1 and dkv.buffers == operands + 3 + 2
    assert dkv.launch.grid[1:] == (K, B)  # one program per key tile of a K/V head


@needs_triton
def test_stages_are_reduced_until_the_kernel_fits():
    """A configuration over the shared memory limit is retried with fewer pipelining stages."""
    from mmfa_jax import tuning

    big = tuning.KernelConfig(128, 128, 8, 6)
    opts = dataclasses.replace(options(None, False, "top_left", -1, -1, None, "BNTH", "triton-route", 90),
                               config=tuning.AttentionConfig(big, big, big))
    opts = launch._config(opts, 128, torch.bfloat16)
    *_, fwd = launch._forward_kernels(opts, _signature(1, 2, 2, 256, 256, 128, mask=True), 90)
    assert "num_stages=6" not in fwd.launch.label
    assert fwd.launch.kernel.shared <= triton_route.shared_memory_limit(90)


def test_device_kinds_and_parameter_count():
    from mmfa_jax.backends import device_kind_of_cc

    assert device_kind_of_cc(90) == "NVIDIA H100" and device_kind_of_cc(75) == "Tesla T4"
    assert device_kind_of_cc(87) == "NVIDIA A10"  # the nearest older of the same major
    with pytest.raises(ValueError, match="compute capability 60"):
        device_kind_of_cc(60)
    ptx = ".visible .entry k(\n .param .u64 .ptr a,\n .param .u64 b\n)\n{ .param .b32 c; }"
    assert launch.parameter_count(ptx, "k") == 2
    with pytest.raises(launch.LaunchError, match="no entry"):
        launch.parameter_count(ptx, "other")


def test_launch_switch(monkeypatch):
    monkeypatch.setenv("MMFA_TORCH_LAUNCH", "jax")
    assert not launch.enabled()
    monkeypatch.setenv("MMFA_TORCH_LAUNCH", "direct")
    assert launch.enabled()
    with launch.through_jax():
        assert not launch.enabled()
    assert launch.enabled()
    monkeypatch.setenv("MMFA_TORCH_LAUNCH", "sideways")
    with pytest.raises(ValueError, match="MMFA_TORCH_LAUNCH"):
        launch.enabled()


# ------------------------------------------------------------------------------------------------
# On the GPU.


def _inputs(rng, B, N, K, T, S, D, dtype):
    def t(shape):
        x = torch.tensor(rng.standard_normal(shape), device="cuda", dtype=dtype, requires_grad=True)
        return x, to_numpy(x)  # the reference sees the rounded values

    return t((B, N, T, D)), t((B, K, S, D)), t((B, K, S, D))


CASES = [
    dict(name="gqa causal bias lengths", B=2, N=4, K=2, T=70, S=150, D=64, causal=True, bias=True, lengths=True),
    dict(name="mask window softcap", B=1, N=2, K=1, T=128, S=128, D=128, mask=True, window=(31, 8), softcap=5.0),
    dict(name="segments", B=2, N=2, K=2, T=96, S=96, D=32, segments=True),
    dict(name="decode row", B=3, N=8, K=2, T=1, S=333, D=128, causal=True),
    dict(name="16 rows gqa", B=2, N=8, K=2, T=16, S=200, D=128, causal=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("layout", ["BNTH", "BTNH"])
def test_direct_launch_matches_reference_and_dlpack_route(case, layout, rng):
    import mmfa_torch

    B, N, K, T, S, D = (case[k] for k in "BNKTSD")
    dtype = torch.bfloat16
    (q, q64), (k, k64), (v, v64) = _inputs(rng, B, N, K, T, S, D, dtype)
    kw, ref_kw = dict(is_causal=case.get("causal", False), enable_gqa=N != K, return_lse=True), {}
    ref_kw["is_causal"] = kw["is_causal"]
    if case.get("bias"):
        b = rng.standard_normal((B, 1, T, S))
        kw["attn_mask"] = torch.tensor(b, device="cuda", dtype=torch.float32, requires_grad=True)
        ref_kw["bias"] = b
    if case.get("mask"):
        m = rng.random((T, S)) > 0.3
        m[:, 0] = True
        kw["attn_mask"], ref_kw["mask"] = torch.tensor(m, device="cuda"), m
    if case.get("lengths"):
        lengths = rng.integers(1, S + 1, B)
        kw["key_value_seq_lengths"] = torch.tensor(lengths, device="cuda")
        ref_kw["kv_lengths"] = lengths
    if case.get("window"):
        kw["local_window_size"] = ref_kw["window"] = case["window"]
    if case.get("softcap"):
        kw["logits_soft_cap"] = ref_kw["softcap"] = case["softcap"]
    if case.get("segments"):
        seg = np.sort(rng.integers(0, 3, (B, T)), axis=1)
        kw["segment_ids"] = torch.tensor(seg, device="cuda")
        ref_kw["q_segments"] = ref_kw["kv_segments"] = seg
    if layout == "BTNH":  # transpose(1, 2) views of (B, L, H, D) tensors: the kernels take them as they are
        q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True) for t in (q, k, v))

    def run():
        out, lse = mmfa_torch.attention(q, k, v, **kw)
        do = torch.ones_like(out)
        grads = torch.autograd.grad((out * do).sum() + 0.5 * lse.sum(), (q, k, v))
        return out, lse, grads

    out, lse, grads = run()
    again = run()[2]  # the same inputs twice: the same gradients (a Triton race once made dK vary)
    for g, h in zip(grads, again):
        torch.testing.assert_close(g, h, rtol=0, atol=0)
    with launch.through_jax():
        out_j, lse_j, grads_j = run()
    torch.cuda.synchronize()
    tol = tolerance("bfloat16")
    assert_close(out.float(), to_numpy(out_j.float()), tol, "out vs DLPack route")
    assert_close(lse, to_numpy(lse_j), tol, "lse vs DLPack route")

    def btnh(a):
        return np.swapaxes(a, 1, 2)

    ref_out, ref_lse = attention_reference(btnh(q64), btnh(k64), btnh(v64), **ref_kw)
    assert_close(btnh(to_numpy(out.float())), ref_out, tol, "out")
    want = attention_reference_grads(btnh(q64), btnh(k64), btnh(v64), np.ones_like(ref_out),
                                     np.full(ref_lse.shape, 0.5), **ref_kw)
    for name, g, w, gj in zip(("dq", "dk", "dv"), grads, want, grads_j):
        assert_close(g.float(), to_numpy(gj.float()), tolerance("bfloat16", grad=True), name + " vs DLPack route")
        assert_close(btnh(to_numpy(g.float())), w, tolerance("bfloat16", grad=True), name)


@pytest.mark.gpu
def test_mask_ranges_computed_once_per_mask_tensor(rng, monkeypatch):
    """One mask tensor handed to several calls (a model's layers) gets its block ranges once; written
    to in place, they are computed again, and the outputs follow the mask."""
    import mmfa_torch

    T = S = 300
    q, k, v = (torch.tensor(rng.standard_normal((1, 2, T, 64)), device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    mask = torch.tensor(rng.random((1, 1, T, S)) > 0.5, device="cuda")
    mask[..., 0] = True
    runs = []
    plain = launch._Kernel.run
    monkeypatch.setattr(launch._Kernel, "run", lambda self, *a: runs.append(self.launch.kernel.name) or plain(self, *a))
    outs = [mmfa_torch.attention(q, k, v, attn_mask=mask) for _ in range(3)]
    assert runs.count("mmfa_mask_ranges") == 1 and runs.count("mmfa_flash_forward") == 3
    before = to_numpy(mask)
    mask[..., T // 2:, :] = False
    mask[..., T // 2:, : S // 3] = True
    changed = mmfa_torch.attention(q, k, v, attn_mask=mask)
    assert runs.count("mmfa_mask_ranges") == 2
    with torch.inference_mode():  # no version counter: computed every call
        made_here = mask.clone()
        inference = [mmfa_torch.attention(q, k, v, attn_mask=made_here) for _ in range(2)]
    assert runs.count("mmfa_mask_ranges") == 4
    qkv = [np.swapaxes(to_numpy(t.float()), 1, 2) for t in (q, k, v)]
    for out, m in ((outs[-1], before), (changed, to_numpy(mask)), (inference[-1], to_numpy(mask))):
        ref, _ = attention_reference(*qkv, mask=m)
        assert_close(np.swapaxes(to_numpy(out.float()), 1, 2), ref, tolerance("bfloat16"), "out")
