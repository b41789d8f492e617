"""The fused pipeline (score, prune, attend) against the float64 reference run step by step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, keep_kwargs, normal
from reference import attention_reference, attention_reference_grads, importance_reference, select_reference

import mmfa_jax
from mmfa_jax.multimodal import multimodal_attention
from mmfa_jax.pruning import gather_tokens

TOL = 2e-5


def _visual(rng, B, T):
    vis = np.zeros((B, T), bool)
    for b in range(B):
        a = int(rng.integers(2, 8))
        vis[b, a:a + int(rng.integers(T // 3, T // 2))] = True
        c = int(rng.integers(T // 2 + 3, T - 6))
        vis[b, c:c + 4] = True
    return vis


def _inputs(rng, B, T, N, K, H):
    """Random q (B, T, N, H), k and v (B, T, K, H), and a visual mask of a few spans."""
    (q, _), (k, _), (v, _) = (normal(rng, (B, T, heads, H)) for heads in (N, K, K))
    return q, k, v, jnp.asarray(_visual(rng, B, T))


@pytest.mark.parametrize("causal", [False, True])
def test_keep_all_is_dense_attention(rng, impl, causal):
    B, T, N, K, H = 2, 48, 4, 2, 32
    q, k, v, vis = _inputs(rng, B, T, N, K, H)
    r = multimodal_attention(q, k, v, vis, 1.0, is_causal=causal, implementation=impl)
    dense = mmfa_jax.attention(q, k, v, is_causal=causal, implementation="xla")
    np.testing.assert_array_equal(np.asarray(r.indices), np.tile(np.arange(T), (B, 1)))
    assert_close(r.out, np.asarray(dense, np.float64), TOL, "keep=1.0 output")


@pytest.mark.parametrize("keep", [0.25, 0.5, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_pruned_attention_matches_reference_pipeline(rng, impl, keep, causal):
    B, T, N, K, H = 2, 50, 4, 2, 32
    q, q64 = normal(rng, (B, T, N, H))
    k, k64 = normal(rng, (B, T, K, H))
    v, v64 = normal(rng, (B, T, K, H))
    vis = _visual(rng, B, T)
    lengths = np.array([T, T - 7])
    r = multimodal_attention(q, k, v, jnp.asarray(vis), **keep_kwargs(keep), is_causal=causal, query_seq_lengths=lengths,
                             implementation=impl)

    valid = np.arange(T)[None, :] < lengths[:, None]
    scorers = valid & ~vis
    imp = importance_reference(q64, k64, vis, scorers, is_causal=causal, q_lengths=lengths, kv_lengths=lengths)
    assert_close(r.importance, imp, 1e-5, "importance")
    # Select with the product's own scores (float32 ties could order differently than float64).
    kept = select_reference(np.asarray(r.importance), vis, keep, lengths)
    L = r.out.shape[1]
    for b in range(B):
        n = len(kept[b])
        assert int(r.lengths[b]) == n
        np.testing.assert_array_equal(np.asarray(r.indices[b, :n]), kept[b])
        out, _ = attention_reference(q64[b:b + 1, kept[b]], k64[b:b + 1, kept[b]], v64[b:b + 1, kept[b]],
                                     is_causal=causal)
        assert_close(r.out[b:b + 1, :n], out, TOL, f"example {b} kept rows")
        assert (np.asarray(r.out[b, n:L]) == 0).all(), "rows past the kept length must be zeros"


def test_gradients_flow_through_the_kept_rows(rng, impl):
    """The pipeline's gradient with respect to q, k and v is the dense attention's on the kept rows,
    scattered back to their positions (zero elsewhere); the scoring kernels take no gradient."""
    B, T, N, K, H = 2, 40, 4, 2, 32
    q, k, v, vis = _inputs(rng, B, T, N, K, H)
    weight = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    r = multimodal_attention(q, k, v, vis, 0.5, is_causal=True, implementation=impl)
    idx, L = r.indices, r.indices.shape[1]

    def pruned(q, k, v):
        out = multimodal_attention(q, k, v, vis, 0.5, is_causal=True, implementation=impl).out
        return jnp.sum(out * weight[:, :L])

    def on_kept(q, k, v):
        take = lambda x: gather_tokens(x, idx)  # noqa: E731
        out = mmfa_jax.attention(take(q), take(k), take(v), is_causal=True, query_seq_lengths=r.lengths,
                                 implementation="xla")
        return jnp.sum(out * weight[:, :L])

    got = jax.grad(pruned, argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(on_kept, argnums=(0, 1, 2))(q, k, v)
    for g, w, name in zip(got, want, "qkv"):
        assert_close(g, np.asarray(w, np.float64), 1e-4, f"d{name}")
        dropped = np.ones(T, bool)
        dropped[np.asarray(idx[0])] = False
        assert (np.asarray(g[0, dropped]) == 0).all(), f"d{name} of pruned tokens must be zero"


@pytest.mark.parametrize("kv_in_place", [False, True])
@pytest.mark.parametrize("layout", ["BTNH", "BNTH"])
def test_attention_at_rows_reads_the_rows_in_place(rng, impl, layout, kv_in_place):
    """attention_at_rows(query, rows, k, v[, kv_rows]) is attention over query[b, rows[b]] (and
    key[b, kv_rows[b]]): output against the float64 reference on the gathered rows, and the
    gradients scattered back (added where rows repeat)."""
    B, Tq, Tk, T, N, K, H = 2, 45, 33, 21, 4, 2, 32
    q, q64 = normal(rng, (B, Tq, N, H))
    k, k64 = normal(rng, (B, Tk if kv_in_place else T, K, H))
    v, v64 = normal(rng, (B, Tk if kv_in_place else T, K, H))
    pick = lambda n: np.stack([rng.choice(n, T, replace=b == 1) for b in range(B)]).astype(np.int32)  # noqa: E731
    rows = pick(Tq)  # repeats in example 1
    kv_rows = pick(Tk) if kv_in_place else None
    lengths = np.array([T, T - 6])
    d_out, d64 = normal(rng, (B, T, N, H))
    t = (lambda x: jnp.swapaxes(x, 1, 2)) if layout == "BNTH" else (lambda x: x)

    def loss(q, k, v):
        out = mmfa_jax.attention_at_rows(t(q), rows, t(k), t(v), kv_rows=kv_rows, is_causal=True,
                                         query_seq_lengths=lengths, implementation=impl, layout=layout)
        return jnp.sum(t(out) * d_out), t(out)

    def gather(x, r):
        return x if r is None else np.take_along_axis(x, r[:, :, None, None], axis=1)

    def scatter(g, r, like):
        if r is None:
            return g
        full = np.zeros_like(like)
        for b in range(B):
            np.add.at(full[b], r[b], g[b])
        return full

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    q_rows, k_rows, v_rows = gather(q64, rows), gather(k64, kv_rows), gather(v64, kv_rows)
    want, _ = attention_reference(q_rows, k_rows, v_rows, is_causal=True, q_lengths=lengths)
    assert_close(out, want, TOL, "output")
    dq, dk, dv, _ = attention_reference_grads(q_rows, k_rows, v_rows, d64, is_causal=True, q_lengths=lengths)
    wants = scatter(dq, rows, q64), scatter(dk, kv_rows, k64), scatter(dv, kv_rows, v64)
    for g, w, name in zip(grads, wants, "qkv"):
        assert_close(g, w, 1e-4, f"d{name}")
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 45\)"):
        mmfa_jax.attention_at_rows(t(q), rows + 30, t(k), t(v), implementation=impl, layout=layout)
    if kv_in_place:
        with pytest.raises(ValueError, match=r"kv_rows must lie in \[0, 33\)"):
            mmfa_jax.attention_at_rows(t(q), rows, t(k), t(v), kv_rows=kv_rows + 20, implementation=impl,
                                       layout=layout)


def test_bad_input(rng):
    q, _ = normal(rng, (1, 10, 2, 16))
    vis = jnp.zeros((1, 10), bool).at[0, 2:6].set(True)
    with pytest.raises(ValueError, match="visual_mask must be a boolean"):
        multimodal_attention(q, q, q, vis.astype(jnp.int32), 0.5, implementation="xla")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        multimodal_attention(q, q, q, vis, 1.5, implementation="xla")
    with pytest.raises(ValueError, match="self-attention"):
        multimodal_attention(q, q[:, :5], q[:, :5], vis, 0.5, implementation="xla")


def test_torch_order_layout(rng, impl):
    """layout="BNTH" (query (B, N, T, H)) gives the same result as the default order, transposed."""
    B, T, N, K, H = 2, 44, 4, 2, 32
    q, k, v, vis = _inputs(rng, B, T, N, K, H)
    want = multimodal_attention(q, k, v, vis, 0.5, is_causal=True, implementation=impl)
    t = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    got = multimodal_attention(t(q), t(k), t(v), vis, 0.5, is_causal=True, implementation=impl, layout="BNTH")
    np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices))
    np.testing.assert_allclose(np.asarray(got.importance), np.asarray(want.importance), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(t(got.out)), np.asarray(want.out), rtol=1e-5, atol=1e-6)
