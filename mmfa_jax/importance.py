"""Visual-token importance: how much attention each visual token receives from the text.

The importance of key s is the attention probability softmax(q k^T)[t, n, s] of the full
attention (same scale, soft cap, causal band, window, segments and lengths), averaged over the
scorer query rows t and the heads n. The probabilities come from the LSE that
``attention(..., return_lse=True)`` already returned, so scoring is one pass over the keys for the
scorer rows only: never a (T, S) matrix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmfa_jax import _autodiff, kernels
from mmfa_jax._checks import ArgumentError, Options
from mmfa_jax.attention import attention
from mmfa_jax.masking import band_visible, combine
from mmfa_jax.pruning import compact, gather_tokens

SCORER_RULES = ("text", "last")


def scorer_rows(rule: str, visual_mask, query_seq_lengths=None):
    """Boolean (B, T) of the query rows that rate the visual tokens, for self-attention (T == S).

    "text": every valid row that is not a visual token. "last": the last valid row (FastV).
    """
    visual_mask = jnp.asarray(visual_mask)
    if visual_mask.ndim != 2 or visual_mask.dtype != jnp.bool_:
        raise ArgumentError(f"visual_mask must be a boolean (B, S) array, got {visual_mask.dtype} {visual_mask.shape}")
    B, T = visual_mask.shape
    rows = jnp.arange(T)[None, :]
    length = jnp.full((B,), T) if query_seq_lengths is None else jnp.minimum(jnp.asarray(query_seq_lengths), T)
    valid = rows < length[:, None]
    if rule == "text":
        return valid & ~visual_mask
    if rule == "last":
        return valid & (rows == length[:, None] - 1)
    raise ArgumentError(f"scorers must be one of {SCORER_RULES} or a boolean (B, T) array, got {rule!r}")


def sparsevlm_raters(query, key, visual_mask, text_mask=None, *, is_causal: bool = False, scale=None,
                     logits_soft_cap=None, query_seq_lengths=None, implementation=None):
    """SparseVLM's raters: the text rows that attend to the visual tokens more than the average
    text row does. Boolean (B, T) for self-attention (T == S); use it as ``scorers``.

    A row's visual attention mass, sum over visual keys of its attention probability, comes from
    the flash kernel itself: attention with a value that is 1 on visual keys and 0 elsewhere (in
    every channel, as the kernels want value and key to share a head dim), so no (T, S) matrix is
    formed. ``text_mask`` defaults to the valid rows that are not visual.
    """
    query, key, visual_mask = jnp.asarray(query), jnp.asarray(key), jnp.asarray(visual_mask)
    B, T, _, _ = query.shape
    if visual_mask.shape != (B, T) or visual_mask.dtype != jnp.bool_:
        raise ArgumentError(f"visual_mask must be a boolean (B, T) = {(B, T)} array, got {visual_mask.dtype} "
                         f"{visual_mask.shape}")
    text = scorer_rows("text", visual_mask, query_seq_lengths) if text_mask is None else jnp.asarray(text_mask)
    indicator = jnp.broadcast_to(visual_mask[:, :, None, None], key.shape).astype(key.dtype)
    mass = attention(query, key, indicator, scale=scale, is_causal=is_causal, logits_soft_cap=logits_soft_cap,
                     query_seq_lengths=query_seq_lengths, key_value_seq_lengths=query_seq_lengths,
                     implementation=implementation)[..., 0].astype(jnp.float32).mean(axis=2)  # (B, T)
    mean = jnp.sum(jnp.where(text, mass, 0.0), axis=1) / jnp.maximum(jnp.sum(text, axis=1), 1)
    return text & (mass >= mean[:, None])


def visual_token_importance(query, key, lse, visual_mask, scorers="text", *, per_head: bool = False,
                            max_scorers: int | None = None, scale=None, is_causal: bool = False,
                            local_window_size=None, logits_soft_cap=None, segment_ids=None, query_seq_lengths=None,
                            key_value_seq_lengths=None, implementation=None, config=None, layout="BTNH",
                            causal_alignment="top_left"):
    """Importance of every key for the scorer rows: (B, S) float32, or (B, N, S) with ``per_head``.

    Args:
      query: (B, T, N, H); key: (B, S, K, H), as given to ``attention``.
      lse: (B, T, N) float32, the LSE of the full attention (``attention(..., return_lse=True)``),
        or None: then the scorer rows' LSE is computed here, one more pass over the keys for those
        rows alone (what ``multimodal_attention`` does: no attention over all T rows is needed).
      visual_mask: boolean (B, S): which keys are visual tokens. Other keys get importance 0.
      scorers: "text" (valid rows that are not visual; needs T == S), "last" (the last valid row,
        as FastV; needs T == S), or a boolean (B, T) array of scorer rows.
      per_head: keep the heads apart: (B, N, S).
      max_scorers: a static bound R on the scorer rows per example; only the first R are read
        (the kernel's work is R rows). Default T. When the mask is concrete, more scorers than R
        raise; under jit the caller must make sure the bound holds.
      scale, is_causal, causal_alignment, local_window_size, logits_soft_cap, segment_ids,
      query_seq_lengths, key_value_seq_lengths: exactly as given to ``attention``, so that the
        probabilities are the attention's own.
      implementation: "pallas", "interpret" or "xla", as for ``attention``.
      layout: "BTNH", or "BNTH" for query (B, N, T, H), key (B, K, S, H) and lse (B, N, T).

    Returns:
      Mean over scorer rows (and heads) of the attention probability each key receives. An
      example with no scorer row gets zeros.
    """
    opts = Options.make(scale, is_causal, local_window_size, logits_soft_cap, implementation, layout, config,
                        causal_alignment=causal_alignment)
    query, key = jnp.asarray(query), jnp.asarray(key)
    if query.ndim != 4 or key.ndim != 4:
        raise ArgumentError(f"query and key must have rank 4, got {query.shape} and {key.shape}")
    seq_axis, head_axis = (1, 2) if layout == "BTNH" else (2, 1)
    B, T, N = query.shape[0], query.shape[seq_axis], query.shape[head_axis]
    S = key.shape[seq_axis]
    lse = None if lse is None else jnp.asarray(lse)
    lse_shape = (B, T, N) if layout == "BTNH" else (B, N, T)
    if lse is not None and lse.shape != lse_shape:
        raise ArgumentError(f"lse must have shape {lse_shape} (attention's return_lse), got {lse.shape}")
    visual_mask = jnp.asarray(visual_mask)
    if visual_mask.shape != (B, S) or visual_mask.dtype != jnp.bool_:
        raise ArgumentError(f"visual_mask must be a boolean (B, S) = {(B, S)} array, got {visual_mask.dtype} "
                         f"{visual_mask.shape}")
    if isinstance(scorers, str):
        if T != S:
            raise ArgumentError(f"scorers={scorers!r} needs self-attention (T == S), got T={T}, S={S}; pass a (B, T) mask")
        scorers = scorer_rows(scorers, visual_mask, query_seq_lengths)
    scorers = jnp.asarray(scorers)
    if scorers.shape != (B, T) or scorers.dtype != jnp.bool_:
        raise ArgumentError(f"scorers must be 'text', 'last' or a boolean (B, T) = {(B, T)} array, got "
                         f"{scorers.dtype} {scorers.shape}")
    R = T if max_scorers is None else int(max_scorers)
    if not 1 <= R <= T:
        raise ArgumentError(f"max_scorers must be in [1, T={T}], got {max_scorers}")
    try:
        most = int(np.max(np.sum(np.asarray(scorers), axis=1)))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):  # traced: caller vouches
        most = 0
    if most > R:
        raise ArgumentError(f"an example has {most} scorer rows, over max_scorers={R}")
    per_head_sums, counts = _importance(opts, R, query, key, lse, scorers, segment_ids, query_seq_lengths,
                                        key_value_seq_lengths)
    out = per_head_sums / jnp.maximum(counts, 1)[:, None, None]
    if not per_head:
        out = jnp.mean(out, axis=1)
        return jnp.where(visual_mask, out, 0.0)
    return jnp.where(visual_mask[:, None, :], out, 0.0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _importance(opts: Options, R: int, query, key, lse, scorers, segment_ids, q_lengths, kv_lengths):
    """(summed probabilities (B, N, S) over the first R scorer rows of each example, how many
    rows that is (B,) int32)."""
    (problem, config, lowering), (q, k, _, _, _, q_seg, kv_seg, q_lengths, kv_lengths) = _autodiff.prepare(
        opts, (query, key, key, None, None, segment_ids, q_lengths, kv_lengths))
    # Scorer rows first, in their original order.
    order, counts = compact(scorers, R, lowering)
    q_seg_rows = None if q_seg is None else jnp.take_along_axis(q_seg, order, axis=1)
    lse_rows = stats = None
    if lse is not None:  # (B, N, R) natural-log LSE of the scorer rows
        lse_rows = lse.astype(jnp.float32) if opts.layout == "BNTH" else jnp.swapaxes(lse.astype(jnp.float32), 1, 2)
        lse_rows = jnp.take_along_axis(lse_rows, order[:, None, :], axis=2)
    if not lowering.kernels:
        return _importance_xla(problem, q, k, lse_rows, order, counts, q_seg_rows, kv_seg, q_lengths,
                               kv_lengths), counts
    cfg = config.scoring
    if lse is None:  # the scorer rows' LSE over all keys: one more pass, combined inside the importance kernel
        stats = kernels.scorer_stats(problem, cfg, q, k, order, q_seg_rows, kv_seg, kv_lengths, counts,
                                   lowering=lowering)
    return kernels.importance(problem, cfg, q, k, order, q_seg_rows, kv_seg, kv_lengths, q_lengths, counts,
                            lse_rows=lse_rows, stats=stats, lowering=lowering), counts


def _importance_xla(p, q, k, lse_rows, order, counts, q_seg_rows, kv_seg, q_lengths, kv_lengths):
    """The same sums from XLA ops: the scorer rows' logits (B, N, R, S) in memory."""
    if p.layout == "BNTH":  # the scorer rows are gathered into (B, R, N, H)
        q = jnp.swapaxes(q, 1, 2)
    live = jnp.arange(order.shape[1])[None, :] < counts[:, None]
    if q_lengths is not None:  # rows past the query length attend to nothing (as in attention)
        live = live & (order < q_lengths[:, None])
    s = _scorer_logits_xla(p, gather_tokens(q, order), k, order, q_seg_rows, kv_seg, kv_lengths)
    if lse_rows is None:
        lse_rows = jax.nn.logsumexp(s, axis=-1)  # -inf for a row that sees nothing
    lse_rows = jnp.where(live[:, None, :], lse_rows, -jnp.inf)  # (B, N, R)
    return jnp.sum(jnp.exp(s - jnp.where(jnp.isinf(lse_rows), jnp.inf, lse_rows)[..., None]), axis=2)


def _scorer_logits_xla(p, q_rows, k, positions, q_seg_rows, kv_seg, kv_lengths):
    """(B, N, R, S) float32 logits of the scorer rows, -inf where the attention hides a key."""
    if p.layout == "BNTH":
        k = jnp.swapaxes(k, 1, 2)
    B, R, N, H = q_rows.shape
    S, K = k.shape[1], k.shape[2]
    qg = q_rows.reshape(B, R, K, p.group, H).astype(jnp.float32)
    s = jnp.einsum("brkgh,bskh->bkgrs", qg, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    s = s.reshape(B, N, R, S) * p.scale
    if p.softcap is not None:
        s = p.softcap * jnp.tanh(s / p.softcap)
    k_pos = jnp.arange(S)
    kv_valid = jnp.full((B,), S) if kv_lengths is None else jnp.minimum(kv_lengths, S)
    band = band_visible(p.band, jnp.zeros((1,), jnp.int32), k_pos)
    band = None if band is None else jax.vmap(lambda pos: band_visible(p.band, pos, k_pos))(positions)[:, None]
    visible = combine((k_pos[None, :] < kv_valid[:, None])[:, None, None, :], band,
                      None if q_seg_rows is None else (q_seg_rows[:, :, None] == kv_seg[:, None, :])[:, None])
    return jnp.where(visible, s, -jnp.inf)
