"""Plain-jax attention with the kernels' exact semantics: the fallback where Pallas cannot run.

It materialises the (B, N, T, S) logits, so memory is quadratic in the sequence length; jax's
autodiff gives its gradients. Inputs are the normalised arrays of ``mmfa_jax.attention``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmfa_jax.masking import band_visible, combine


def xla_attention(p, q, k, v, bias, mask, q_seg, kv_seg, q_lengths, kv_lengths):
    """Returns (out like q, lse (B, N, T) float32)."""
    if p.layout == "BNTH":  # compute in BTNH, hand back in the caller's layout
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    out_dtype = q.dtype
    if jax.default_backend() == "cpu" and q.dtype != jnp.float32:
        # XLA:CPU cannot run every low-precision dot with a float32 result (seen: bf16 x bf16 -> f32
        # in the transposed layout under jit); float32 operands hold the same values exactly.
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    B, T, N, H = q.shape
    S, K, G = k.shape[1], k.shape[2], p.group
    qg = q.reshape(B, T, K, G, H)
    precision = jax.lax.Precision.HIGHEST if p.dot_precision == "highest" else None
    s = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32, precision=precision)
    s = s.reshape(B, N, T, S) * p.scale
    if p.softcap is not None:
        s = p.softcap * jnp.tanh(s / p.softcap)
    if bias is not None:
        s = s + bias.astype(jnp.float32)

    q_pos, k_pos = jnp.arange(T), jnp.arange(S)
    kv_valid = jnp.full((B,), S) if kv_lengths is None else jnp.minimum(kv_lengths, S)
    visible = combine(
        (k_pos[None, :] < kv_valid[:, None])[:, None, None, :],
        _expand(band_visible(p.band, q_pos, k_pos)),
        None if q_seg is None else (q_seg[:, :, None] == kv_seg[:, None, :])[:, None],
        None if mask is None else mask != 0,
    )
    s = jnp.where(visible, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s - m)
    l = jnp.sum(e, axis=-1, keepdims=True)
    live = l != 0  # (NaN in the inputs: NaN rows, as in the kernels)
    if q_lengths is not None:
        live = live & (q_pos[None, None, :, None] < q_lengths[:, None, None, None])
    probs = jnp.where(live, e / jnp.where(live, l, 1.0), 0.0)
    lse = jnp.where(live, m + jnp.log(jnp.where(live, l, 1.0)), -jnp.inf)[..., 0]

    probs = probs.reshape(B, K, G, T, S).astype(out_dtype).astype(v.dtype)
    # Value rows past the key length as 0 (as the kernels read them): 0 * NaN would reach every row.
    v = jnp.where((k_pos[None, :] < kv_valid[:, None])[:, :, None, None], v, 0)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32, precision=precision)
    out = out.reshape(B, T, N, H).astype(out_dtype)
    if p.layout == "BNTH":
        out = jnp.swapaxes(out, 1, 2)
    return out, lse


def _expand(band):
    return None if band is None else band[None, None]
