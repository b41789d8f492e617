"""The MMFA pipeline: score the visual tokens, keep the best, attend over the shorter sequence.

``multimodal_attention`` runs self-attention prefill over a mixed text + visual sequence:

1. the scorer rows (a few text rows) are scored against all keys: their softmax, averaged over
   rows and heads, is each visual token's importance (the probabilities of the full attention,
   masked as it is; the full (T, S) matrix is never formed, nor attention over all T rows);
2. per example the top ``keep`` visual tokens survive, with every text token, in order;
3. attention runs on the kept sequence (flash kernels), padded to a static length with
   per-example lengths.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mmfa_jax import _checks, backends, kernels, pruning, tuning
from mmfa_jax._autodiff import take_rows
from mmfa_jax._checks import ArgumentError
from mmfa_jax.attention import attention_at_rows
from mmfa_jax.importance import scorer_rows, visual_token_importance


@dataclasses.dataclass(frozen=True)
class MultimodalResult:
    """out: (B, L, N, H) attention output of the kept tokens ((B, N, L, H) for layout "BNTH"; rows
    past ``lengths`` are 0);
    indices: (B, L) int32 kept positions in the original sequence, increasing;
    lengths: (B,) int32 kept tokens per example; importance: (B, S) float32 of every token."""

    out: jax.Array
    indices: jax.Array
    lengths: jax.Array
    importance: jax.Array


jax.tree_util.register_dataclass(MultimodalResult, data_fields=["out", "indices", "lengths", "importance"],
                                 meta_fields=[])


def multimodal_attention(query, key, value, visual_mask, keep=None, *, keep_count=None, scorers="text",
                         max_scorers: int | None = None,
                         scale=None, is_causal: bool = False, logits_soft_cap=None, query_seq_lengths=None,
                         output_length: int | None = None, implementation=None,
                         layout: str = "BTNH") -> MultimodalResult:
    """Prune visual tokens by importance, then attend over the kept sequence.

    Args:
      query, key, value: (B, T, N, H) and (B, T, K, H): self-attention over one token sequence.
      visual_mask: bool (B, T), the visual tokens (any number of spans per example).
      keep: the ratio in (0, 1] of each example's visual tokens kept (rounded up); or
      keep_count: how many are kept (at most all). Exactly one of the two.
      scorers: "text", "last" or a bool (B, T) mask of the rows that rate the visual tokens.
      max_scorers: static bound on scorer rows per example, at least 1 (default: the most any
        example has, when the masks are concrete; else T, which costs a full (T, S) scoring pass).
      scale, is_causal, logits_soft_cap: as for ``attention``; causality is kept in original order.
      query_seq_lengths: (B,) valid lengths (right padding).
      output_length: static length of the kept sequence (default: the longest, when concrete).
      implementation: "pallas", "triton", "interpret" or "xla", for every step (scoring,
        selection, attention).
      layout: "BTNH", or "BNTH" for query (B, N, T, H) and key/value (B, K, T, H) (torch's
        order; the output follows it), so that no transpose is copied.

    Returns:
      A ``MultimodalResult``. With keep=1.0 its ``out`` is the dense attention's output.
    """
    query, key, value, visual_mask = (jnp.asarray(x) for x in (query, key, value, visual_mask))
    _checks.choice(layout, "layout", _checks.LAYOUTS)
    rule = _checks.checked_keep(keep, keep_count)
    seq = 1 if layout == "BTNH" else 2
    if (query.ndim != 4 or key.ndim != 4 or (key.shape[0], key.shape[seq]) != (query.shape[0], query.shape[seq])
            or key.shape != value.shape):
        shapes = "(B, T, N, H) and key/value (B, T, K, H)" if seq == 1 else "(B, N, T, H) and key/value (B, K, T, H)"
        raise ArgumentError(f"multimodal_attention is self-attention: query {shapes} over one sequence, got "
                         f"{query.shape}, {key.shape}, {value.shape}")
    B, T = query.shape[0], query.shape[seq]
    if visual_mask.shape != (B, T) or visual_mask.dtype != jnp.bool_:
        raise ArgumentError(f"visual_mask must be a boolean (B, T) = {(B, T)} array, got {visual_mask.dtype} "
                         f"{visual_mask.shape}")
    rows = scorer_rows(scorers, visual_mask, query_seq_lengths) if isinstance(scorers, str) else jnp.asarray(scorers)
    if rows.shape != (B, T) or rows.dtype != jnp.bool_:
        raise ArgumentError(f"scorers must be 'text', 'last' or a boolean (B, T) array, got {rows.dtype} {rows.shape}")
    if max_scorers is None:
        max_scorers = _concrete_max(jnp.sum(rows, axis=1), default=T)
    elif _checks.integer(max_scorers, "max_scorers", minimum=1) > T:
        raise ArgumentError(f"max_scorers must be in [1, T={T}], got {max_scorers}")
    # The scores only pick tokens: no gradient flows through them (nor through the scoring kernels).
    lowering = backends.resolve(implementation)  # once, for every step
    importance = visual_token_importance(
        jax.lax.stop_gradient(query), jax.lax.stop_gradient(key), None, visual_mask, rows,
        max_scorers=int(max(1, min(max_scorers, T))), scale=scale, is_causal=bool(is_causal),
        logits_soft_cap=logits_soft_cap, query_seq_lengths=query_seq_lengths, key_value_seq_lengths=query_seq_lengths,
        implementation=lowering, layout=layout)
    indices, lengths = pruning.select(importance, visual_mask, rule, query_seq_lengths, output_length, lowering)
    # The forward reads the kept query rows in place, and the key and value rows too where the
    # table says that beats gathered copies (``AttentionConfig.reads_rows_in_place``).
    kv_rows = None
    if lowering.kernels:
        config = tuning.config_for(kernels.padded_head_dim(query.shape[3]), query.dtype, lowering.family)
        kv_rows = indices if config.reads_rows_in_place(indices.shape[1]) else None
    if kv_rows is None:
        key, value = (take_rows(x, indices, layout) for x in (key, value))
    # Under causality a row before the length never sees a key past it, so the key lengths add
    # nothing; and the forward kernel with both lengths runs about 14% slower on the H100 than
    # with either alone (bench/NOTES.md).
    out = attention_at_rows(query, indices, key, value, kv_rows=kv_rows, scale=scale, is_causal=is_causal,
                            logits_soft_cap=logits_soft_cap, query_seq_lengths=lengths,
                            key_value_seq_lengths=None if is_causal else lengths, implementation=lowering,
                            layout=layout)
    return MultimodalResult(out, indices, lengths, importance)


def _concrete_max(x, default: int) -> int:
    try:
        return max(1, int(np.max(np.asarray(x))))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return default
