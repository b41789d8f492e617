"""The torch face of importance and selection: same numbers as the reference and the jax face."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import importance_reference, select_reference

import mmfa_torch


@pytest.mark.parametrize("rule", ["text", "last"])
def test_torch_importance_and_selection(rng, impl, rule):
    if impl == "pallas":
        pytest.skip("CUDA tensors are covered by test_torch_importance_cuda")
    B, H, Hkv, L, D = 2, 4, 2, 40, 32
    q = torch.from_numpy(rng.standard_normal((B, H, L, D)).astype(np.float32))
    k = torch.from_numpy(rng.standard_normal((B, Hkv, L, D)).astype(np.float32))
    vis = torch.zeros(B, L, dtype=torch.bool)
    vis[:, 5:30] = True
    _, lse = mmfa_torch.attention(q, k, k, enable_gqa=True, is_causal=True, return_lse=True, implementation="xla")
    got = mmfa_torch.visual_token_importance(q, k, lse, vis, rule, is_causal=True, implementation=impl)
    scorers = (~vis.numpy()) if rule == "text" else (np.arange(L)[None, :] == L - 1).repeat(B, 0)
    want = importance_reference(q.numpy().transpose(0, 2, 1, 3), k.numpy().transpose(0, 2, 1, 3), vis.numpy(),
                                scorers, is_causal=True)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    idx, n = mmfa_torch.select_visual_tokens(got, vis, 0.5)
    for b, w in enumerate(select_reference(got.numpy(), vis.numpy(), 0.5)):
        np.testing.assert_array_equal(idx[b, :n[b]].numpy(), w)
    hidden = torch.randn(B, L, 8, requires_grad=True)
    kept = mmfa_torch.gather_tokens(hidden, idx)
    kept.sum().backward()
    assert hidden.grad.sum().item() == pytest.approx(float(idx.shape[1] * B * 8))


def test_torch_importance_compiles(rng):
    q = torch.from_numpy(rng.standard_normal((1, 2, 16, 16)).astype(np.float32))
    vis = torch.zeros(1, 16, dtype=torch.bool)
    vis[:, 2:10] = True
    _, lse = mmfa_torch.attention(q, q, q, return_lse=True, implementation="xla")
    f = torch.compile(lambda q, lse, vis: mmfa_torch.visual_token_importance(q, q, lse, vis, "text",
                                                                              implementation="xla"), fullgraph=False)
    eager = mmfa_torch.visual_token_importance(q, q, lse, vis, "text", implementation="xla")
    torch.testing.assert_close(f(q, lse, vis), eager)


def test_torch_multimodal_compiles(rng):
    """Under torch.compile the pipeline is a custom op (fake shapes from output_length); its
    results are the eager call's, which skips the op."""
    q = torch.from_numpy(rng.standard_normal((1, 2, 24, 16)).astype(np.float32))
    vis = torch.zeros(1, 24, dtype=torch.bool)
    vis[:, 3:19] = True
    run = lambda q, vis: mmfa_torch.multimodal_attention(q, q, q, vis, 0.5, is_causal=True,  # noqa: E731
                                                         output_length=16, implementation="xla")
    for got, want in zip(torch.compile(run, fullgraph=True)(q, vis), run(q, vis)):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
def test_torch_importance_cuda(rng):
    q = torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16)
    vis = torch.zeros(2, 300, dtype=torch.bool, device="cuda")
    vis[:, 10:250] = True
    _, lse = mmfa_torch.attention(q, k, k, return_lse=True)
    got = mmfa_torch.visual_token_importance(q, k, lse, vis, "text")
    want = mmfa_torch.visual_token_importance(q.cpu().float(), k.cpu().float(), lse.cpu(), vis.cpu(), "text",
                                              implementation="xla")
    torch.testing.assert_close(got.cpu(), want, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("memory", ["BNTH", "BTNH"])
def test_torch_multimodal_matches_jax(rng, memory):
    """The torch pipeline gives the jax pipeline's numbers (same kernels, torch layout), for
    (B, H, T, D)-contiguous tensors and for transposed views of (B, T, H, D) ones (as transformers
    makes them), which go over without a copy."""
    import jax.numpy as jnp

    from mmfa_jax.multimodal import multimodal_attention as jax_multimodal

    B, H, Hkv, T, D = 2, 4, 2, 40, 32

    def tensor(heads):
        x = rng.standard_normal((B, heads, T, D)).astype(np.float32)
        if memory == "BTNH":
            return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).transpose(1, 2)
        return torch.from_numpy(x)

    q, k, v = tensor(H), tensor(Hkv), tensor(Hkv)
    vis = torch.zeros(B, T, dtype=torch.bool)
    vis[:, 4:30] = True
    out, idx, n, imp = mmfa_torch.multimodal_attention(q, k, v, vis, 0.5, is_causal=True, implementation="interpret")
    r = jax_multimodal(*(jnp.asarray(x.numpy().transpose(0, 2, 1, 3)) for x in (q, k, v)), jnp.asarray(vis.numpy()),
                       0.5, is_causal=True, implementation="xla")
    np.testing.assert_array_equal(idx.numpy(), np.asarray(r.indices))
    np.testing.assert_array_equal(n.numpy(), np.asarray(r.lengths))
    np.testing.assert_allclose(imp.numpy(), np.asarray(r.importance), atol=1e-6)
    np.testing.assert_allclose(out.numpy(), np.asarray(r.out).transpose(0, 2, 1, 3), atol=2e-5)
