"""The layer-K form of visual-token pruning (FastV) in a small Flax (nnx) decoder.

Layers 0..K run on the whole sequence; layer K's own attention (its LSE, from the flash kernel)
scores the visual tokens against the text rows; the top ``keep`` survive, and layers K+1.. run on
the kept tokens only, carrying the kept indices (causal order is the original order, since kept
indices increase). A model to show and test the mechanism, not a pretrained VLM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmfa_jax.attention import attention
from mmfa_jax.importance import visual_token_importance
from mmfa_jax.pruning import gather_tokens, select_visual_tokens


class DecoderBlock(nnx.Module):
    """Pre-norm causal self-attention (mmfa kernels) and an MLP."""

    def __init__(self, dim: int, heads: int, *, implementation=None, rngs: nnx.Rngs):
        self.heads, self.implementation = heads, implementation
        self.norm1, self.norm2 = nnx.RMSNorm(dim, rngs=rngs), nnx.RMSNorm(dim, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=False, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.up, self.down = nnx.Linear(dim, 4 * dim, rngs=rngs), nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x, lengths):
        """x (B, L, dim), lengths (B,). Returns (x, (q, k, lse)) for the scorer."""
        B, L, dim = x.shape
        q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(B, L, 3 * self.heads, dim // self.heads), 3, axis=2)
        o, lse = attention(q, k, v, is_causal=True, query_seq_lengths=lengths,  # causal: key lengths add nothing
                           return_lse=True, implementation=self.implementation)
        x = x + self.proj(o.reshape(B, L, dim))
        x = x + self.down(jax.nn.gelu(self.up(self.norm2(x))))
        return x, (q, k, lse)


class FastVDecoder(nnx.Module):
    """A stack of decoder blocks that prunes visual tokens after block ``prune_layer``."""

    def __init__(self, dim: int, heads: int, layers: int, *, prune_layer: int | None, keep=0.5, implementation=None,
                 rngs: nnx.Rngs):
        if prune_layer is not None and not 0 <= prune_layer < layers:
            raise ValueError(f"prune_layer must be in [0, {layers}) or None, got {prune_layer}")
        self.blocks = nnx.List([DecoderBlock(dim, heads, implementation=implementation, rngs=rngs)
                                for _ in range(layers)])
        self.prune_layer, self.keep, self.implementation = prune_layer, keep, implementation

    def __call__(self, x, visual_mask, lengths=None):
        """x (B, T, dim) token embeddings, visual_mask (B, T) bool, lengths (B,) valid tokens.

        Returns (hidden (B, L, dim), indices (B, L) kept positions, lengths (B,)); without
        pruning L = T and indices are 0..T-1."""
        B, T, _ = x.shape
        lengths = jnp.full((B,), T, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
        indices = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        for i, block in enumerate(self.blocks):
            x, (q, k, lse) = block(x, lengths)
            if i == self.prune_layer:
                importance = visual_token_importance(
                    q, k, lse, visual_mask, "text", is_causal=True, query_seq_lengths=lengths,
                    key_value_seq_lengths=lengths, implementation=self.implementation)
                kept, lengths = select_visual_tokens(importance, visual_mask, self.keep, valid_lengths=lengths)
                x, indices = gather_tokens(x, kept), gather_tokens(indices, kept)
        return x, indices, lengths
