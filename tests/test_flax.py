"""The Flax adapters inside flax.linen.MultiHeadDotProductAttention and flax.nnx.MultiHeadAttention.

Each module runs twice with the same parameters, once with Flax's own attention and once with
mmfa's ``attention_fn``; the outputs (and linen's parameter gradients) must agree.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfa_jax.flax import make_attention_fn

TOL = 2e-5  # float32 end to end: only summation order differs


def _inputs(rng, batch=(2,), length=11, features=32):
    x = jnp.asarray(rng.standard_normal((*batch, length, features)), jnp.float32)
    keep = jnp.asarray(rng.random((*batch, length)) > 0.2).at[..., 0].set(True)
    return x, keep


@pytest.mark.parametrize("masking", ["none", "causal", "padding"])
def test_linen_module(rng, impl, masking):
    x, keep = _inputs(rng)
    mask = {"none": None, "causal": nn.make_causal_mask(keep), "padding": nn.make_attention_mask(keep, keep)}[masking]
    ours = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=make_attention_fn(implementation=impl))
    theirs = nn.MultiHeadDotProductAttention(num_heads=4)
    params = theirs.init(jax.random.key(int(rng.integers(1 << 30))), x, mask=mask)
    # A query row that sees no key: Flax averages all values, mmfa gives zeros by design. Compare
    # the rows that see something.
    live = keep[..., None] if masking == "padding" else True
    np.testing.assert_allclose(jnp.where(live, ours.apply(params, x, mask=mask), 0),
                               jnp.where(live, theirs.apply(params, x, mask=mask), 0), atol=TOL)

    def loss(p, module):
        return jnp.sum(jnp.where(live, jnp.sin(module.apply(p, x, mask=mask)), 0))

    g_ours = jax.grad(loss)(params, ours)
    g_theirs = jax.grad(loss)(params, theirs)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_linen_extra_batch_axes(rng, impl):
    x, keep = _inputs(rng, batch=(2, 3), length=9)
    mask = nn.make_attention_mask(keep, keep)
    ours = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=make_attention_fn(implementation=impl))
    theirs = nn.MultiHeadDotProductAttention(num_heads=2)
    params = theirs.init(jax.random.key(1), x, mask=mask)
    live = keep[..., None]  # rows that see no key differ by design (zeros vs Flax's mean)
    np.testing.assert_allclose(jnp.where(live, ours.apply(params, x, mask=mask), 0),
                               jnp.where(live, theirs.apply(params, x, mask=mask), 0), atol=TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_nnx_module(rng, impl, causal):
    x, keep = _inputs(rng)
    mask = nnx.make_attention_mask(keep, keep)
    seed = int(rng.integers(1 << 30))
    kwargs = dict(num_heads=4, in_features=32, decode=False)
    ours = nnx.MultiHeadAttention(**kwargs, rngs=nnx.Rngs(seed), attention_fn=make_attention_fn(implementation=impl))
    theirs = nnx.MultiHeadAttention(**kwargs, rngs=nnx.Rngs(seed))
    # nnx combines is_causal with the mask itself for its own attention; ours gets is_causal too.
    want = theirs(x, mask=nnx.combine_masks(mask, nnx.make_causal_mask(keep)) if causal else mask)
    got = ours(x, mask=mask, is_causal=causal) if causal else ours(x, mask=mask)
    live = keep[..., None]  # rows that see no key differ by design (zeros vs Flax's mean)
    np.testing.assert_allclose(jnp.where(live, got, 0), jnp.where(live, want, 0), atol=TOL)


def test_dropout_and_sow_are_refused(rng):
    x, _ = _inputs(rng)
    layer = nn.MultiHeadDotProductAttention(num_heads=4, dropout_rate=0.5, attention_fn=make_attention_fn(
        implementation="xla"))
    params = layer.init(jax.random.key(0), x, deterministic=True)
    with pytest.raises(NotImplementedError, match="dropout"):
        layer.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    sow = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=make_attention_fn(implementation="xla"))
    with pytest.raises(NotImplementedError, match="sow"):
        sow.init(jax.random.key(0), x, sow_weights=True)
