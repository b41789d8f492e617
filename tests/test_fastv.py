"""The layer-K (FastV) form in a small Flax model."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import importance_reference, select_reference

from mmfa_jax.fastv import FastVDecoder
from mmfa_jax.importance import visual_token_importance


def _inputs(rng, B=2, T=40, dim=64):
    x = jnp.asarray(rng.standard_normal((B, T, dim)), jnp.float32)
    vis = np.zeros((B, T), bool)
    vis[:, 3:30] = True
    return x, jnp.asarray(vis)


def test_keep_all_changes_nothing(rng, impl):
    x, vis = _inputs(rng)
    seed = int(rng.integers(1 << 30))
    pruned = FastVDecoder(64, 4, 3, prune_layer=1, keep=1.0, implementation=impl, rngs=nnx.Rngs(seed))
    plain = FastVDecoder(64, 4, 3, prune_layer=None, implementation=impl, rngs=nnx.Rngs(seed))
    h1, idx, n = pruned(x, vis)
    h2, _, _ = plain(x, vis)
    np.testing.assert_array_equal(np.asarray(idx), np.tile(np.arange(40), (2, 1)))
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h2), atol=1e-5)


def test_pruning_after_layer_k_matches_a_step_by_step_run(rng, impl):
    """Blocks run by hand: layers 0..K on all tokens, the reference importance from layer K's q/k,
    the reference selection, then the remaining layers on the kept tokens only."""
    x, vis = _inputs(rng)
    lengths = jnp.array([40, 33])
    model = FastVDecoder(64, 4, 3, prune_layer=1, keep=0.25, implementation=impl, rngs=nnx.Rngs(3))
    hidden, idx, n = model(x, vis, lengths)

    h, L = x, lengths
    for block in list(model.blocks)[:2]:
        h, (q, k, lse) = block(h, L)
    valid = np.arange(40)[None, :] < np.asarray(lengths)[:, None]
    imp = importance_reference(np.asarray(q, np.float64), np.asarray(k, np.float64), np.asarray(vis),
                               valid & ~np.asarray(vis), is_causal=True, q_lengths=np.asarray(lengths),
                               kv_lengths=np.asarray(lengths))
    ours = visual_token_importance(q, k, lse, vis, "text", is_causal=True, query_seq_lengths=lengths,
                                   key_value_seq_lengths=lengths, implementation=impl)
    np.testing.assert_allclose(np.asarray(ours), imp, atol=1e-5)
    # Select with our float32 scores: float64 could order two near-equal scores the other way.
    kept = select_reference(np.asarray(ours), np.asarray(vis), 0.25, np.asarray(lengths))
    for b in range(2):
        nb = len(kept[b])
        assert int(n[b]) == nb
        np.testing.assert_array_equal(np.asarray(idx[b, :nb]), kept[b])
        hb = h[b:b + 1, kept[b]]
        hb, _ = model.blocks[2](hb, jnp.array([nb]))
        np.testing.assert_allclose(np.asarray(hidden[b, :nb]), np.asarray(hb[0]), atol=2e-5)


def test_bad_prune_layer():
    with pytest.raises(ValueError, match="prune_layer"):
        FastVDecoder(32, 2, 2, prune_layer=2, rngs=nnx.Rngs(0))
