"""Every mmfa Pallas kernel as a jit-able function of ShapeDtypeStructs, for cross-compilation.

``KERNELS`` maps a kernel name to a builder ``(head_dim, dtype, KernelConfig, implementation)
-> (fn, args)``: the launcher called directly (no argument checks beyond attention's
normalisation), on a problem that fills whole tiles of the configuration and takes the causal
(masked) path. ``implementation`` is resolved when ``fn`` is traced, so for the device being lowered
for ("pallas": the Triton route on Turing, XLA's Triton from sm_80), or is a ``backends.Lowering``.
A new kernel joins the cross-compile check by adding a builder here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmfa_jax import backends, kernels
from mmfa_jax._autodiff import prepare
from mmfa_jax._checks import Options
from mmfa_jax.kernels import scorer

BATCH, HEADS, KV_HEADS = 1, 2, 1  # GQA, so the dK/dV kernel loops over a group


def _problem(q, k, v, seq_len):
    (problem, _, _), args = prepare(Options.make(is_causal=True, implementation="interpret"),
                                    (q, k, v, None, None, None, None, None))
    return problem, args


def _shapes(head_dim, dtype, seq_len):
    q = jax.ShapeDtypeStruct((BATCH, seq_len, HEADS, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((BATCH, seq_len, KV_HEADS, head_dim), dtype)
    return q, kv


def _seq_len(*cfgs):
    return 2 * max(max(c.block_q, c.block_k) for c in cfgs)  # whole tiles, more than one of each


def forward(head_dim, dtype, cfg, implementation="pallas"):
    q, kv = _shapes(head_dim, dtype, _seq_len(cfg))

    def fn(q, k, v):
        p, args = _problem(q, k, v, q.shape[1])
        return kernels.forward(p, cfg, *args, lowering=backends.resolve(implementation))

    return fn, (q, kv, kv)


def forward_at_rows(head_dim, dtype, cfg, implementation="pallas"):
    """The forward reading its query, key and value rows in place (the pipeline's kept tokens)."""
    T = _seq_len(cfg)
    q, kv = _shapes(head_dim, dtype, 2 * T)
    rows = jax.ShapeDtypeStruct((BATCH, T), jnp.int32)

    def fn(q, rows, k, v):
        kept_q = jax.ShapeDtypeStruct((BATCH, T, HEADS, head_dim), dtype)
        kept_kv = jax.ShapeDtypeStruct((BATCH, T, KV_HEADS, head_dim), dtype)
        p, _ = _problem(kept_q, kept_kv, kept_kv, T)
        return kernels.forward(p, cfg, q, k, v, None, None, None, None, None, None, q_source=rows, kv_source=rows,
                             lowering=backends.resolve(implementation))

    return fn, (q, rows, kv, kv)


def backward(head_dim, dtype, dq_cfg, dkv_cfg, implementation="pallas"):
    T = _seq_len(dq_cfg, dkv_cfg)
    q, kv = _shapes(head_dim, dtype, T)
    rows = jax.ShapeDtypeStruct((BATCH, HEADS, T), jnp.float32)

    def fn(q, k, v, do, lse, delta):
        p, args = _problem(q, k, v, T)
        return kernels.backward(p, dq_cfg, dkv_cfg, *args, do, lse, delta, lowering=backends.resolve(implementation))[:3]

    return fn, (q, kv, kv, q, rows, rows)


def importance(head_dim, dtype, cfg, implementation="pallas"):
    """The importance kernel, combining the stats kernel's per-chunk stats into the rows' LSE."""
    T = _seq_len(cfg)
    q, kv = _shapes(head_dim, dtype, T)
    R = max(cfg.block_q, 16) * 2
    positions = jax.ShapeDtypeStruct((BATCH, R), jnp.int32)
    counts = jax.ShapeDtypeStruct((BATCH,), jnp.int32)

    def fn(q, k, positions, counts):
        p, (q, k, *_rest) = _problem(q, k, k, T)
        num_chunks = scorer._scorer_chunks(p, cfg)[2]
        stats = [jnp.zeros((BATCH, HEADS, num_chunks, R), jnp.float32)] * 2
        return kernels.importance(p, cfg, q, k, positions, None, None, None, None, counts, stats=stats,
                                lowering=backends.resolve(implementation))

    return fn, (q, kv, positions, counts)


def scorer_stats(head_dim, dtype, cfg, implementation="pallas"):
    T = _seq_len(cfg)
    q, kv = _shapes(head_dim, dtype, T)
    R = max(cfg.block_q, 16) * 2
    positions = jax.ShapeDtypeStruct((BATCH, R), jnp.int32)
    counts = jax.ShapeDtypeStruct((BATCH,), jnp.int32)

    def fn(q, k, positions, counts):
        p, (q, k, *_rest) = _problem(q, k, k, T)
        return kernels.scorer_stats(p, cfg, q, k, positions, None, None, None, counts,
                                  lowering=backends.resolve(implementation))

    return fn, (q, kv, positions, counts)


# name -> (builder, the AttentionConfig entries it takes, the kernels it launches)
KERNELS = {
    "forward": (forward, ("forward",), ("mmfa_flash_forward",)),
    "forward_at_rows": (forward_at_rows, ("forward",), ("mmfa_flash_forward",)),
    "backward": (backward, ("backward_dq", "backward_dkv"), ("mmfa_flash_dq", "mmfa_flash_dkv")),
    "importance": (importance, ("forward",), ("mmfa_importance",)),
    "scorer_stats": (scorer_stats, ("forward",), ("mmfa_scorer_stats",)),
}


def build(kernel: str, head_dim: int, dtype, config, implementation="pallas"):
    """(fn, args) for one KERNELS entry with the entries of an AttentionConfig."""
    builder, entries, _ = KERNELS[kernel]
    return builder(head_dim, dtype, *(getattr(config, e) for e in entries), implementation=implementation)


# Dynamic mask attention (mmfa_jax.kernels.dynamic_mask): the selection kernels and the attention over
# the kept keys, causal and nested (candidate lists, gathered K/V) or with segment ids (per-row selection).
def _dma(q, k, v, cfg, implementation, segments: bool):
    import dataclasses

    from mmfa_jax.kernels.dynamic_mask import DmaProblem, tile_positions

    p, _ = _problem(q, k, v, q.shape[1])
    p = dataclasses.replace(p, has_segments=segments)
    block_q = tile_positions(p.q_len, cfg.block_q, p.group)
    return DmaProblem(p, cfg.block_k, block_q, cfg.block_k), backends.resolve(implementation)


def _dma_shapes(head_dim, dtype, cfg):
    T = _seq_len(cfg)
    q, kv = _shapes(head_dim, dtype, T)
    zoh = jax.ShapeDtypeStruct((BATCH, KV_HEADS, T), jnp.float32)
    return T, q, kv, zoh, jax.ShapeDtypeStruct((BATCH, T), jnp.int32)


def dma_forward(head_dim, dtype, cfg, implementation="pallas", segments=False):
    from mmfa_jax.kernels import dynamic_mask as dma

    T, q, kv, zoh, seg = _dma_shapes(head_dim, dtype, cfg)

    def fn(q, k, v, zoh, seg):
        dp, lowering = _dma(q, k, v, cfg, implementation, segments)
        segs = (seg, seg) if segments else (None, None)
        selection = dma.select(dp, cfg, zoh, *segs, None, lowering=lowering)
        return dma.forward(dp, cfg, q, k, v, zoh, *selection, *segs, None, None, lowering=lowering)

    return fn, (q, kv, kv, zoh, seg)


def dma_forward_segments(head_dim, dtype, cfg, implementation="pallas"):
    return dma_forward(head_dim, dtype, cfg, implementation, segments=True)


def dma_backward(head_dim, dtype, cfg, implementation="pallas"):
    from mmfa_jax.kernels import dynamic_mask as dma

    T, q, kv, zoh, seg = _dma_shapes(head_dim, dtype, cfg)
    rows = jax.ShapeDtypeStruct((BATCH, HEADS, T), jnp.float32)

    def fn(q, k, v, zoh, do, lse, delta):
        dp, lowering = _dma(q, k, v, cfg, implementation, False)
        selection = dma.select(dp, cfg, zoh, None, None, None, lowering=lowering)
        return dma.backward(dp, cfg, q, k, v, zoh, *selection, None, None, None, None, do, lse, delta,
                            lowering=lowering)

    return fn, (q, kv, kv, zoh, q, rows, rows)


KERNELS.update({
    "dma_forward": (dma_forward, ("forward",), ("mmfa_dma_select", "mmfa_dma_forward")),
    "dma_forward_segments": (dma_forward_segments, ("forward",), ("mmfa_dma_select_rows", "mmfa_dma_forward")),
    "dma_backward": (dma_backward, ("forward",), ("mmfa_dma_select", "mmfa_dma_backward")),
})
