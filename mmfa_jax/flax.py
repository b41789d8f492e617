"""Flax adapters: mmfa attention as the ``attention_fn`` of Flax's attention modules.

    import flax.linen as nn
    from mmfa_jax.flax import make_attention_fn
    layer = nn.MultiHeadDotProductAttention(num_heads=8, attention_fn=make_attention_fn())

    from flax import nnx
    layer = nnx.MultiHeadAttention(num_heads=8, in_features=64, decode=False, rngs=nnx.Rngs(0),
                                   attention_fn=make_attention_fn())

linen passes only the keyword arguments that the function names; nnx passes mask, dropout_rng,
dropout_rate, broadcast_dropout, deterministic, dtype, precision, module and is_causal. The
adapter accepts all of them. Dropout on the attention weights is not supported (it raises when
it would be active), nor is sowing the weights (they are never materialised). ``precision`` is
ignored: the kernels pick their own (float32 accumulation; exact float32 dots for float32).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from mmfa_jax.attention import attention


def make_attention_fn(*, implementation=None, is_causal: bool = False, local_window_size=None,
                      logits_soft_cap=None, scale=None, config=None):
    """An ``attention_fn`` for ``flax.linen.MultiHeadDotProductAttention`` and
    ``flax.nnx.MultiHeadAttention``.

    The module hands query (..., T, N, H), key/value (..., S, K, H) with any number of leading
    batch axes, and a boolean mask broadcastable to (..., N, T, S). The options given here
    apply to every call; ``is_causal`` from nnx is combined with the one given here.
    """

    def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                     dropout_rate=0.0, deterministic=True, dtype=None, precision=None, module=None, **kwargs):
        del broadcast_dropout, dropout_rng, precision
        causal = bool(kwargs.pop("is_causal", False)) or is_causal
        if kwargs:
            raise TypeError(f"mmfa attention_fn got unexpected arguments {sorted(kwargs)}")
        if dropout_rate > 0.0 and not deterministic:
            raise NotImplementedError("mmfa attention has no dropout on the attention weights: set dropout_rate=0 "
                                      "or deterministic=True")
        if module is not None:
            raise NotImplementedError("mmfa attention never materialises the weights, so they cannot be sown "
                                      "(sow_weights=True)")
        if mask is not None:  # Flax's mask helpers give float 0/1 masks
            mask = jnp.asarray(mask).astype(jnp.bool_)
        if dtype is not None:
            query, key, value = (jnp.asarray(x, dtype) for x in (query, key, value))
        batch = query.shape[:-3]
        if len(batch) != 1:  # fold any number of leading batch axes into one
            b = math.prod(batch)
            query, key, value = (x.reshape((b, *x.shape[-3:])) for x in (query, key, value))
            bias, mask = (None if a is None else _fold_pair(a, batch, b) for a in (bias, mask))
        out = attention(query, key, value, bias=bias, mask=mask, scale=scale, is_causal=causal,
                        local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
                        implementation=implementation, config=config)
        return out.reshape((*batch, *out.shape[-3:]))

    return attention_fn


def _fold_pair(x, batch, b):
    """Bring a (..., N, T, S) bias or mask to the folded batch: (b or 1, N, T, S)."""
    x = jnp.asarray(x)
    lead = x.shape[:-3]
    if all(d == 1 for d in lead):
        return x.reshape(x.shape[-3:])[None]
    return jnp.broadcast_to(x, (*batch, *x.shape[-3:])).reshape((b, *x.shape[-3:]))


attention_fn = make_attention_fn()
