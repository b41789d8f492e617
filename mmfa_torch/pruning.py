"""The PyTorch face of visual-token importance and selection: the jax functions, through DLPack.

Layout is torch's: query (B, H, L, D), key (B, Hkv, S, D), lse (B, H, L) as returned by
``mmfa_torch.scaled_dot_product_attention(..., return_lse=True)``.
"""

import functools
from typing import Optional

import jax
import torch

from mmfa_jax import _checks
from mmfa_jax.importance import visual_token_importance as _jax_importance
from mmfa_jax import pruning as _jax_pruning
from mmfa_torch.attention import _in_layout, _int32, _layout_of, _lowering
from mmfa_torch.bridge import to_jax, to_torch
from mmfa_torch.ops import lowering

Tensor = torch.Tensor


@torch.library.custom_op("mmfa::visual_token_importance", mutates_args=())
def _importance_op(query: Tensor, key: Tensor, lse: Optional[Tensor], visual_mask: Tensor, scorers: Optional[Tensor],
                   rule: str,
                   segment_ids: Optional[Tensor], query_seq_lengths: Optional[Tensor],
                   key_value_seq_lengths: Optional[Tensor], per_head: bool, max_scorers: Optional[int],
                   scale: Optional[float], is_causal: bool, window_left: int, window_right: int,
                   softcap: Optional[float], layout: str, alignment: str, backend: str, cc: int) -> Tensor:
    out = _jax_importance(
        to_jax(query), to_jax(key), to_jax(lse), to_jax(visual_mask), rule if scorers is None else to_jax(scorers),
        per_head=per_head,
        max_scorers=max_scorers, scale=scale,
        is_causal=is_causal, local_window_size=(None if window_left < 0 else window_left,
                                                None if window_right < 0 else window_right),
        logits_soft_cap=softcap, segment_ids=to_jax(segment_ids),
        query_seq_lengths=to_jax(query_seq_lengths), key_value_seq_lengths=to_jax(key_value_seq_lengths),
        implementation=lowering(backend, cc), layout=layout, causal_alignment=alignment)
    return to_torch(out)


@_importance_op.register_fake
def _(query, key, lse, visual_mask, scorers, rule, segment_ids, query_seq_lengths, key_value_seq_lengths, per_head,
      max_scorers, scale, is_causal, window_left, window_right, softcap, layout, alignment, backend, cc):
    B, S = visual_mask.shape
    shape = (B, query.shape[1 if layout == "BNTH" else 2], S) if per_head else (B, S)
    return query.new_empty(shape, dtype=torch.float32)


def visual_token_importance(query: Tensor, key: Tensor, lse: Tensor | None, visual_mask: Tensor, scorers="text", *,
                            per_head: bool = False, max_scorers: int | None = None, scale: float | None = None,
                            is_causal: bool = False, local_window_size=None, logits_soft_cap: float | None = None,
                            segment_ids: Tensor | None = None, query_seq_lengths: Tensor | None = None,
                            key_value_seq_lengths: Tensor | None = None, implementation: str | None = None,
                            causal_alignment: str = "top_left") -> Tensor:
    """Importance of every key for the scorer rows, (B, S) float32 ((B, Hq, S) with ``per_head``).

    query (B, Hq, L, D), key (B, Hkv, S, D), lse (B, Hq, L) or None (then the scorer rows' LSE is
    computed, one more pass over the keys); see ``mmfa_jax.importance.visual_token_importance``
    for the definition and the options. ``scorers`` is "text", "last" or a bool (B, L) tensor. Not
    differentiable (scores feed a selection).
    """
    rule, scorers = (scorers, None) if isinstance(scorers, str) else ("mask", scorers.contiguous())
    left, right = (-1 if w is None else w for w in _checks.checked_window(local_window_size))
    _checks.choice(causal_alignment, "causal_alignment", _checks.ALIGNMENTS)
    layout = _layout_of(query)
    q, k = (_in_layout(t, layout) for t in (query, key))
    lse = None if lse is None else _in_layout(lse, layout).detach()
    chosen = _lowering(implementation, query.device)
    return _importance_op(q.detach(), k.detach(), lse, visual_mask.contiguous(), scorers, rule,
                          _int32(segment_ids, "segment_ids"), _int32(query_seq_lengths, "query_seq_lengths"),
                          _int32(key_value_seq_lengths, "key_value_seq_lengths"), bool(per_head),
                          None if max_scorers is None else int(max_scorers), _float(scale), bool(is_causal),
                          int(left), int(right), _float(logits_soft_cap), layout, causal_alignment, chosen.backend,
                          -1 if chosen.cc is None else chosen.cc)


def _float(x):
    return None if x is None else float(x)


def select_visual_tokens(importance: Tensor, visual_mask: Tensor, keep=None, *, keep_count=None,
                         valid_lengths: Tensor | None = None, output_length: int | None = None) -> tuple[Tensor, Tensor]:
    """(indices (B, L) int32, lengths (B,) int32) of the kept tokens, in order; see
    ``mmfa_jax.pruning.select_visual_tokens`` (``keep`` a ratio in (0, 1], or ``keep_count``).
    On CUDA an ``output_length`` given is checked on the device, with no sync: one too short for an
    example's kept tokens fails a device-side assert at the next sync (which ends the CUDA context,
    as for ``gather``'s indices); elsewhere, or without it, an ArgumentError now."""
    rule = _checks.checked_keep(keep, keep_count)
    if visual_mask.dim() != 2 or visual_mask.dtype != torch.bool:
        raise _checks.ArgumentError(f"visual_mask must be a boolean (B, S) tensor, got {visual_mask.dtype} "
                                    f"{tuple(visual_mask.shape)}")
    if importance.shape != visual_mask.shape:
        raise _checks.ArgumentError(f"importance must have the shape of visual_mask {tuple(visual_mask.shape)}, "
                                    f"got {tuple(importance.shape)}")
    valid_lengths = None if valid_lengths is None else _int32(valid_lengths, "valid_lengths")
    S = visual_mask.shape[1]
    # On CUDA an output_length given is checked on the device (as multimodal_attention does), so the
    # call needs no sync; otherwise the kept counts are read to size or check it.
    deferred_check = output_length is not None and visual_mask.is_cuda
    kept = None if deferred_check else _static_sizes(visual_mask, valid_lengths, rule, "text", None)[0]
    output_length = _jax_pruning.checked_output_length(output_length, kept, S, rule)
    idx, n = _jax_pruning.select_checked(to_jax(importance.detach().contiguous()), to_jax(visual_mask.contiguous()),
                                         to_jax(valid_lengths), rule=rule, output_length=output_length,
                                         lowering=_lowering(None, importance.device))
    n = to_torch(n)
    if deferred_check:
        torch._assert_async((n <= output_length).all(),
                            f"output_length={output_length} is shorter than the tokens an example keeps ({rule}); "
                            f"pass a longer output_length, or None")
    return to_torch(idx), n


def gather_tokens(x: Tensor, indices: Tensor, dim: int = 1) -> Tensor:
    """Gather kept tokens along ``dim`` (the batch is the dim before it), like
    ``mmfa_jax.pruning.gather_tokens``. Plain torch.gather rather than a trip through JAX, so that
    gradients flow into ``x`` (hidden states during fine-tuning)."""
    dim = dim % x.dim()
    if dim == 0:
        raise _checks.ArgumentError("dim must not be 0: the dim before it is the batch")
    shape = [1] * x.dim()
    shape[dim - 1], shape[dim] = indices.shape
    size = list(x.shape)
    size[dim] = indices.shape[1]
    return torch.gather(x, dim, indices.long().reshape(shape).expand(size))




def _multimodal(query: Tensor, key: Tensor, value: Tensor, visual_mask: Tensor, scorers: Optional[Tensor],
                rule: str, query_seq_lengths: Optional[Tensor], keep: float, keep_count: int,
                max_scorers: Optional[int], output_length: Optional[int], scale: Optional[float], is_causal: bool,
                softcap: Optional[float], backend: str, cc: int,
                layout: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    keep = _checks.Keep(count=keep_count) if keep_count > 0 else _checks.Keep(ratio=keep)
    T = visual_mask.shape[1]
    # The static sizes the jitted pipeline needs (left to jit, they would be the full length: a
    # (T, S) scoring pass and no shorter sequence). Those not given come from the masks, by torch
    # ops and one small sync, which also checks that an output_length given keeps every kept token.
    # With both given on CUDA there is no sync: the check is a device-side assert on the kept
    # counts the pipeline returns (torch's own way of checking data-dependent arguments on CUDA,
    # as gather's indices), after the call; a failure surfaces at the next sync, as theirs do.
    deferred_check = output_length is not None and max_scorers is not None and visual_mask.is_cuda
    if deferred_check:
        output_length = _jax_pruning.checked_output_length(output_length, None, T, keep)
        _checks.integer(max_scorers, "max_scorers", minimum=1)
    else:
        kept, scorer_counts = _static_sizes(visual_mask, query_seq_lengths, keep, rule, scorers)
        output_length = _jax_pruning.checked_output_length(output_length, kept, T, keep)
        if max_scorers is None:
            max_scorers = max(1, int(scorer_counts.max()))
    visual, lengths = to_jax(visual_mask), to_jax(query_seq_lengths)
    scorers = rule if scorers is None else to_jax(scorers)
    r = _jitted_multimodal(to_jax(query), to_jax(key), to_jax(value), visual, None if isinstance(scorers, str) else
                           scorers, lengths, keep=keep, rule=scorers if isinstance(scorers, str) else "mask",
                           max_scorers=max_scorers, output_length=output_length, scale=scale, is_causal=is_causal,
                           softcap=softcap, implementation=lowering(backend, cc), layout=layout)
    kept = to_torch(r.lengths)
    if deferred_check:
        torch._assert_async((kept <= output_length).all(),
                            f"output_length={output_length} is shorter than the tokens an example keeps ({keep}); "
                            f"pass a longer output_length, or None")
    return to_torch(r.out), to_torch(r.indices), kept, to_torch(r.importance)


def _static_sizes(visual_mask: Tensor, valid_lengths: Optional[Tensor], keep: _checks.Keep, rule: str,
                  scorers: Optional[Tensor]):
    """(kept (B,), scorer rows (B,)) as NumPy: how many tokens each example keeps
    (``mmfa_jax.pruning.kept_lengths`` with the same keep table) and how many rows rate its visual
    tokens (``mmfa_jax.importance.scorer_rows``: "text", "last", or the ``scorers`` mask), from
    torch ops on the masks and one transfer."""
    T = visual_mask.shape[1]
    valid = torch.ones_like(visual_mask) if valid_lengths is None else (
        torch.arange(T, device=visual_mask.device)[None, :] < valid_lengths[:, None])
    table = _keep_table(T, keep, visual_mask.device)
    text = (valid & ~visual_mask).sum(1)
    kept = text + table[(valid & visual_mask).sum(1)]
    rows = {"text": text, "last": valid.any(1).long()}.get(rule) if scorers is None else scorers.sum(1)
    both = torch.stack([kept, rows]).cpu().numpy()
    return both[0], both[1]


@functools.lru_cache(maxsize=64)
def _keep_table(T: int, keep: _checks.Keep, device: torch.device) -> Tensor:
    from mmfa_jax.pruning import keep_table

    return torch.as_tensor(keep_table(T, keep), device=device)


@functools.partial(jax.jit, static_argnames=("keep", "rule", "max_scorers", "output_length", "scale", "is_causal",
                                             "softcap", "implementation", "layout"))
def _jitted_multimodal(query, key, value, visual, scorers, lengths, *, keep, rule, max_scorers, output_length, scale,
                       is_causal, softcap, implementation, layout):
    """The jax pipeline under one jit: one dispatch per call rather than one per array operation."""
    from mmfa_jax.multimodal import multimodal_attention as _jax_multimodal

    return _jax_multimodal(query, key, value, visual, keep, scorers=rule if scorers is None else scorers,
                           max_scorers=max_scorers, scale=scale, is_causal=is_causal, logits_soft_cap=softcap,
                           query_seq_lengths=lengths, output_length=output_length, implementation=implementation,
                           layout=layout)


# Under torch.compile the pipeline is this custom op; eager calls skip it (torch's dispatch of a
# custom op costs host time on every call, as for attention: mmfa_torch.ops.attention).
_multimodal_op = torch.library.custom_op("mmfa::multimodal_attention", _multimodal, mutates_args=())


@_multimodal_op.register_fake
def _(query, key, value, visual_mask, scorers, rule, query_seq_lengths, keep, keep_count, max_scorers, output_length,
      scale, is_causal, softcap, backend, cc, layout):
    B, T = visual_mask.shape
    N, D = query.shape[2 if layout == "BTNH" else 1], query.shape[3]
    L = output_length if output_length is not None else torch.library.get_ctx().new_dynamic_size()
    out_shape = (B, L, N, D) if layout == "BTNH" else (B, N, L, D)
    return (query.new_empty(out_shape), query.new_empty((B, L), dtype=torch.int32),
            query.new_empty((B,), dtype=torch.int32), query.new_empty((B, T), dtype=torch.float32))


def multimodal_attention(query: Tensor, key: Tensor, value: Tensor, visual_mask: Tensor, keep=None, *,
                         keep_count: int | None = None, scorers="text",
                         max_scorers: int | None = None, scale: float | None = None, is_causal: bool = False,
                         logits_soft_cap: float | None = None, query_seq_lengths: Tensor | None = None,
                         output_length: int | None = None, implementation: str | None = None):
    """The MMFA pipeline on torch tensors: score, keep the top visual tokens, attend over them.

    query (B, Hq, T, D), key/value (B, Hkv, T, D) (self-attention over one sequence), visual_mask
    bool (B, T). Returns (out (B, Hq, L, D), indices (B, L) int32, lengths (B,) int32, importance
    (B, T) float32); see ``mmfa_jax.multimodal.multimodal_attention`` (``keep`` a ratio in (0, 1],
    or ``keep_count``). Inference only (no gradients). Under torch.compile L is data-dependent
    unless ``output_length`` is given.

    Host syncs: none when ``output_length`` and ``max_scorers`` are both given for CUDA tensors
    (an ``output_length`` shorter than an example's kept tokens then fails a device-side assert,
    reported at the next sync, as torch reports a bad index to ``gather``); otherwise one small
    transfer of the kept and scorer counts, and the same mistake raises an ArgumentError at once.
    """
    rule_of_keep = _checks.checked_keep(keep, keep_count)
    rule, scorers = (scorers, None) if isinstance(scorers, str) else ("mask", scorers.contiguous())
    # Handed over in the memory order they have (a transposed (B, T, H, D) view stays one): no copy.
    layout = _layout_of(query)
    q, k, v = (_in_layout(t.detach(), layout) for t in (query, key, value))
    chosen = _lowering(implementation, query.device)
    op = _multimodal_op if torch.compiler.is_compiling() else _multimodal
    out, idx, lengths, importance = op(
        q, k, v, visual_mask.contiguous(), scorers, rule, _int32(query_seq_lengths, "query_seq_lengths"),
        rule_of_keep.ratio or 0.0, rule_of_keep.count or 0,
        None if max_scorers is None else int(max_scorers),
        None if output_length is None else int(output_length), _float(scale), bool(is_causal),
        _float(logits_soft_cap), chosen.backend, -1 if chosen.cc is None else chosen.cc, layout)
    return (out.transpose(1, 2) if layout == "BTNH" else out), idx, lengths, importance


__all__ = ["gather_tokens", "multimodal_attention", "select_visual_tokens", "visual_token_importance"]
