"""The reference checks itself: against jax.nn.dot_product_attention and finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from reference import attention_reference, attention_reference_grads, sum_to_shape


def test_reference_matches_jax_nn_plain_causal_bias_gqa(rng):
    B, T, N, K, H = 2, 9, 4, 2, 8
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
    bias = rng.standard_normal((B, N, T, T)).astype(np.float32)
    for kwargs, ref_kwargs in (
        ({}, {}),
        ({"is_causal": True}, {"is_causal": True}),
        ({"bias": bias}, {"bias": bias}),
        ({"local_window_size": (2, 1)}, {"window": (2, 1)}),
        ({"key_value_seq_lengths": jnp.array([5, 9])}, {"kv_lengths": np.array([5, 9])}),
        ({"scale": 0.3, "is_causal": True, "bias": bias}, {"scale": 0.3, "is_causal": True, "bias": bias}),
    ):
        want = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)
        got, lse = attention_reference(q, k, v, **ref_kwargs)
        assert_close(want, got, 2e-5, f"jax.nn vs reference {sorted(kwargs)}")
        assert lse.shape == (B, T, N) and np.isfinite(lse).all()


def test_reference_lse_and_dead_rows(rng):
    B, T, S, N, H = 1, 6, 4, 2, 3
    q, k, v = rng.standard_normal((B, T, N, H)), rng.standard_normal((B, S, N, H)), rng.standard_normal((B, S, N, H))
    out, lse = attention_reference(q, k, v, is_causal=True, q_lengths=np.array([5]), bottom_right=True)
    # Bottom-right causal with T > S: rows 0, 1 see nothing; row 5 is past the query length.
    for i in (0, 1, 5):
        assert (out[0, i] == 0).all() and (lse[0, i] == -np.inf).all()
    s = np.einsum("tnh,snh->nts", q[0], k[0]) / np.sqrt(H)
    assert np.allclose(lse[0, 2], np.log(np.exp(s[:, 2, :1]).sum(-1)))  # row 2 sees key 0 only
    assert np.allclose(lse[0, 4], np.log(np.exp(s[:, 4, :3]).sum(-1)))
    assert np.allclose(out[0, 2], v[0, 0])
    # Top-left (the default, as jax.nn): row i sees keys j <= i, so every row sees key 0.
    out, lse = attention_reference(q, k, v, is_causal=True)
    assert np.isfinite(lse).all() and np.allclose(out[0, 0], v[0, 0])
    assert np.allclose(lse[0, 1], np.log(np.exp(s[:, 1, :2]).sum(-1)))


@pytest.mark.parametrize("softcap", [None, 1.5])
def test_reference_grads_match_finite_differences(rng, softcap):
    B, T, S, N, K, H = 2, 4, 5, 4, 2, 3
    q, k, v = (rng.standard_normal(s) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    bias = rng.standard_normal((1, N, 1, S))
    mask = rng.random((B, 1, T, S)) > 0.25
    mask[0, 0, 1] = False  # a dead row
    opts = dict(mask=mask, scale=0.7, is_causal=True, softcap=softcap, kv_lengths=np.array([5, 4]),
                q_lengths=np.array([4, 3]), window=(3, None))
    d_out, d_lse = rng.standard_normal((B, T, N, H)), rng.standard_normal((B, T, N))

    def loss(q, k, v, bias):
        out, lse = attention_reference(q, k, v, bias=bias, **opts)
        return (out * d_out).sum() + np.where(np.isfinite(lse), lse * d_lse, 0.0).sum()

    grads = attention_reference_grads(q, k, v, d_out, d_lse, bias=bias, **opts)
    args = [q, k, v, bias]
    eps = 1e-6
    for which, (x, g) in enumerate(zip(args, grads)):
        assert g.shape == x.shape
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[which][idx] += eps
            minus[which][idx] -= eps
            num[idx] = (loss(*plus) - loss(*minus)) / (2 * eps)
        np.testing.assert_allclose(g, num, atol=1e-6, rtol=1e-5, err_msg=f"argument {which}")
    assert np.abs(grads[0]).max() > 0 and np.abs(grads[3]).max() > 0


def test_sum_to_shape():
    x = np.arange(24.0).reshape(2, 3, 4)
    assert np.array_equal(sum_to_shape(x, (3, 4)), x.sum(0))
    assert np.array_equal(sum_to_shape(x, (2, 1, 4)), x.sum(1, keepdims=True))
    assert np.array_equal(sum_to_shape(x, (1, 4)), x.sum((0, 1)).reshape(1, 4))
