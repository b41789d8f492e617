"""Visual-token pruning for Hugging Face transformers VLMs, on the "mmfa" attention backend.

``prune_visual_tokens(model, keep, layer=K, rule="text")`` installs hooks on a loaded VLM:

1. a pre-hook on the multimodal model (``model.model``: it sees ``input_ids``) notes which tokens
   are visual (``input_ids`` equal to the config's image/video token id) and the padding, on prefill;
   on later calls that continue a pruned cache it rewrites the 2-D attention mask (kept prefix +
   new columns) and, when none are given, the position ids (the original numbering continues);
2. the attention function, at layer K during prefill, also returns the LSE and computes mmfa's
   visual-token importance (``rule`` "text": mean over text rows, "last": the last row, FastV): the
   pruning state is attached to layer K's attention module as a scorer (``backend.attach_scorer``);
3. a post-hook on decoder layer K keeps the text tokens and the top ``keep`` visual tokens of each
   example (right-aligned, so that padding stays on the left and the last token is last), gathers
   the hidden states, and re-slices the KV cache of layers 0..K to the kept tokens;
4. pre-hooks on layers K+1.. gather what the decoder loop hands every layer: position embeddings
   (cos/sin of any rotary kind, Qwen's M-RoPE included: they are per token), position ids and the
   attention mask.

After prefill the cache of every layer holds the kept tokens only, with their original RoPE
positions, so generation continues as if the pruned sequence had been the prompt. The logits of
a pruned prefill have the kept length L; ``handle.kept_positions`` says which input position each
row came from (-1 for padding slots).
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref

import torch

import mmfa_torch
from mmfa_jax import _checks
from mmfa_torch.hf import backend
from mmfa_torch.hf.backend import NAME

Tensor = torch.Tensor
RULES = ("text", "last")
# model_type of the multimodal config -> how the family is laid out (checked by the tests).
SUPPORTED_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3",
                      "smolvlm")


@dataclasses.dataclass
class _PruneState:
    """What the hooks share, and the scorer (``backend.Scorer``) of layer K's attention. One prefill at a
    time per model."""
    keep: _checks.Keep
    layer: int
    rule: str
    token_ids: tuple[int, ...]
    # set on a prefill with visual tokens, until layer K has pruned
    pending: bool = False
    visual: Tensor | None = None        # (B, T) bool
    valid: Tensor | None = None         # (B, T) bool, not padding
    importance: Tensor | None = None    # (B, T) float32
    next_position: Tensor | None = None  # (B,) first position after the prompt (original numbering)
    sizes: "_PrunedSizes | None" = None  # the prefill's static sizes, read once when the prompt arrives
    static_cache: bool = False          # the pruned prefill's cache has static layers
    static_mask: Tensor | None = None   # (B, slots) long: the mask of every call continuing that cache
    position_rank: int = 2              # 2: (B, n) position ids, 3: (3, B, n) (M-RoPE)
    # set by layer K, used by layers K+1.. of the same prefill
    in_prefill: bool = False
    index: Tensor | None = None         # (B, L) int64: input position of every kept slot
    kept_valid: Tensor | None = None    # (B, L) bool: slot holds a real token (False: left padding)
    memo: dict = dataclasses.field(default_factory=dict)
    # after a pruned prefill, for the calls that continue its cache
    active: bool = False
    cache_ref: object = None
    full_length: int = 0                # T of the prompt
    pruned_length: int = 0              # L
    decoded: int = 0                    # tokens fed after the prompt
    recording: list = dataclasses.field(default_factory=list)

    def wants_scores(self, T: int, S: int) -> bool:
        # S > T: the prompt in a static cache's first T slots (the hooks score prompts from an empty cache only)
        return self.pending and self.visual is not None and T == self.visual.shape[1] <= S

    def score(self, query, key, lse, *, scale, is_causal, window, softcap, dense_mask, module_causal, sliding_window):
        """Importance of every input token at layer K, from the attention's own LSE."""
        visual, valid = self.visual, self.valid
        if dense_mask:
            # A 4-D mask (e.g. Gemma 3's bidirectional image blocks) is only special for image rows; the scorer
            # rows (text) see the causal band, the window and the padding, which the kernel expresses.
            is_causal = module_causal
            w = int(sliding_window or 0)
            window = (w - 1, 0 if is_causal else w - 1) if w > 0 else None
        T = visual.shape[1]
        if self.rule == "text":
            scorers = valid & ~visual
        else:
            last = torch.where(valid, torch.arange(T, device=valid.device), -1).amax(dim=1)
            scorers = torch.arange(T, device=valid.device)[None, :] == last[:, None]
        seg = None if self.sizes.no_padding else valid.to(torch.int32)
        self.importance = mmfa_torch.visual_token_importance(
            query, key, lse, visual & valid, scorers, max_scorers=self.sizes.scorers, scale=scale,
            is_causal=is_causal, local_window_size=window, logits_soft_cap=softcap, segment_ids=seg,
            implementation=backend.implementation())

    def reset(self):
        self.pending = self.in_prefill = self.active = False
        self.visual = self.valid = self.importance = self.next_position = None
        self.index = self.kept_valid = self.sizes = self.static_mask = None
        self.cache_ref = None
        self.memo = {}
        self.decoded = 0
        self.recording = []


@dataclasses.dataclass(frozen=True)
class _PrunedSizes:
    """The static sizes of a pruned prefill, read from the prompt's masks in one transfer when it
    arrives (the GPU has little queued then), so that layer K and the layers after it need no sync
    of their own: each would stall the host until the GPU had caught up."""
    selected: int          # the selection's output length: every non-visual position + the kept visual ones
    kept: int              # L: the longest example's kept tokens (padding dropped)
    all_slots_valid: bool  # every example keeps L tokens: no padding slot after pruning
    no_padding: bool       # the prompt has no padding
    scorers: int           # the most scorer rows of an example (rule "text": its text tokens; "last": 1)

    @staticmethod
    def of(visual: Tensor, valid: Tensor, keep: _checks.Keep, rule: str) -> "_PrunedSizes | None":
        """None when the prompt has no visual token (nothing to prune)."""
        from mmfa_jax.pruning import keep_table

        B, T = visual.shape
        shown = visual & valid
        counts = torch.stack([shown.sum(1), (valid & ~visual).sum(1), valid.sum(1)]).cpu().numpy()
        n_visual, n_text, n_valid = counts
        if not n_visual.any():
            return None
        chosen = keep_table(T, keep)[n_visual]
        kept = n_text + chosen
        return _PrunedSizes(selected=int((T - n_visual + chosen).max()), kept=max(1, int(kept.max())),
                            all_slots_valid=bool((kept == kept.max()).all()), no_padding=bool((n_valid == T).all()),
                            scorers=max(1, int(n_text.max())) if rule == "text" else 1)


class PruningHandle:
    """What ``prune_visual_tokens`` returns: ``remove()`` takes the hooks off; ``kept_positions``
    (B, L) int64 are the input positions kept by the last pruned prefill (-1: padding slot)."""

    def __init__(self, model, state, hooks, attn_module):
        self._model, self._state, self._hooks, self._attn = weakref.ref(model), state, hooks, attn_module

    @property
    def keep(self) -> _checks.Keep:
        """The keep rule: ``.ratio`` or ``.count``."""
        return self._state.keep

    @property
    def layer(self):
        return self._state.layer

    @property
    def kept_positions(self) -> Tensor | None:
        s = self._state
        if s.index is None:
            return None
        return torch.where(s.kept_valid, s.index, torch.full_like(s.index, -1))

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        backend.detach_scorer(self._attn, self._state)
        model = self._model()
        if model is not None and getattr(model, "_mmfa_pruning", None) is self:
            del model._mmfa_pruning


def _parts(model):
    """(multimodal model that sees input_ids, text decoder, its layers) of a supported VLM."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"prune_visual_tokens supports the model types {SUPPORTED_FAMILIES}; got a "
                         f"{type(model).__name__} with model_type {model_type!r}")
    mm = model  # the module whose forward sees input_ids: ...ForConditionalGeneration.model, or the model itself
    inner = getattr(model, "model", None)
    if isinstance(inner, torch.nn.Module) and any(isinstance(getattr(inner, n, None), torch.nn.Module)
                                                  for n in ("language_model", "text_model")):
        mm = inner
    lm = getattr(mm, "language_model", None) or getattr(mm, "text_model", None)
    layers = getattr(lm, "layers", None)
    if lm is None or not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: could not find the text decoder's layers (looked for "
                         "model.model.language_model.layers and model.model.text_model.layers)")
    return mm, lm, layers


def _token_ids(config) -> tuple[int, ...]:
    ids = []
    for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v >= 0 and v not in ids:
            ids.append(v)
    return tuple(ids)


def prune_visual_tokens(model: torch.nn.Module, keep: float | None = None, layer: int = 2, rule: str = "text", *,
                        keep_count: int | None = None) -> PruningHandle:
    """Make a loaded VLM drop its least important visual tokens after decoder layer ``layer`` on prefill.

    Args:
      model: a transformers VLM of a supported family (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL,
        Qwen2.5-VL, Gemma 3, Idefics3, SmolVLM): the ``...ForConditionalGeneration`` or its ``.model``.
        Its text decoder must use ``attn_implementation="mmfa"`` (layer ``layer``'s attention scores).
      keep: the ratio in (0, 1] of each example's visual tokens kept (ceil(keep * n_visual)); or
      keep_count: how many are kept (at most all). Exactly one of the two. Text tokens always stay.
        Several images in one prompt compete for the same budget.
      layer: K: layers 0..K see every token; layer K's attention scores them; layers K+1.. and every
        decode step see the kept ones only.
      rule: "text" (importance averaged over the text rows and heads) or "last" (the last row, FastV).

    Returns:
      a ``PruningHandle`` (``remove()``, ``kept_positions``). Calling again replaces the previous hooks.

    Generation (``model.generate``) and direct forward calls with a ``DynamicCache`` both work; batches
    may be padded (left or right) and hold several images. A prefill without visual tokens runs
    unchanged. Pruning is for inference: a prefill with ``labels`` raises.
    """
    mm, lm, layers = _parts(model)
    token_ids = _token_ids(model.config)
    if not token_ids:
        raise ValueError(f"{type(model).__name__}'s config has no image_token_id (or video_token_id): "
                         "prune_visual_tokens finds the visual tokens through it")
    keep = _checks.checked_keep(keep, keep_count)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise ValueError(f"layer must be an int in [0, {len(layers)}) (the text decoder has {len(layers)} layers), "
                         f"got {layer!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    impl = getattr(lm.config, "_attn_implementation", None)
    if impl != NAME:
        raise ValueError(f"prune_visual_tokens needs the text decoder on attn_implementation='{NAME}' (it is "
                         f"{impl!r}): call mmfa_torch.hf.register() and load with attn_implementation='{NAME}' or "
                         f"model.set_attn_implementation('{NAME}')")
    attn = getattr(layers[layer], "self_attn", None)
    if attn is None:
        raise ValueError(f"decoder layer {layer} of {type(model).__name__} has no self_attn module")
    old = getattr(model, "_mmfa_pruning", None)
    if old is not None:
        old.remove()
    backend.register()  # the function the attention of layer K reaches must be ours

    state = _PruneState(keep=keep, layer=layer, rule=rule, token_ids=token_ids)
    backend.attach_scorer(attn, state)
    hooks = [] if mm is model else [model.register_forward_pre_hook(_labels_hook(state), with_kwargs=True)]
    hooks += [mm.register_forward_pre_hook(_outer_pre_hook(state, mm), with_kwargs=True),
             lm.register_forward_pre_hook(_lm_pre_hook(state), with_kwargs=True),
             lm.register_forward_hook(_lm_post_hook(state), with_kwargs=True),
             layers[layer].register_forward_hook(_layer_k_hook(state), with_kwargs=True)]
    for later in layers[layer + 1:]:
        hooks.append(later.register_forward_pre_hook(_later_layer_hook(state), with_kwargs=True))
    handle = PruningHandle(model, state, hooks, attn)
    model._mmfa_pruning = handle
    return handle


def _bind(module, args, kwargs):
    """All arguments of a forward call as keywords."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    out = dict(bound.arguments)
    out.update(out.pop("kwargs", {}) or {})
    return out


def _cache_of(kwargs):
    """The KV cache a forward call was given: ``cache=`` (the name in recent transformers, 5.24 for
    one, which hands it down to the decoder and its layers by that name) or ``past_key_values=``
    (5.17 and earlier, and callers still using the deprecated name)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    return int(cache.get_seq_length())


def _labels_hook(state: _PruneState):
    def hook(module, args, kwargs):
        kwargs = _bind(module, args, kwargs)
        ids = kwargs.get("input_ids")
        if kwargs.get("labels") is not None and ids is not None and bool(
                torch.isin(ids, torch.tensor(state.token_ids, device=ids.device)).any()):
            raise ValueError("prune_visual_tokens is for inference: a call with labels would need every token's "
                             "logits; remove the pruning (handle.remove()) to train")
        return None

    return hook


def _outer_pre_hook(state: _PruneState, mm):
    def hook(module, args, kwargs):
        kwargs = _bind(module, args, kwargs)
        cache = _cache_of(kwargs)
        input_ids = kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        n = input_ids.shape[1] if input_ids is not None else embeds.shape[1]
        pruned_cache = state.active and state.cache_ref is not None and state.cache_ref() is cache
        if pruned_cache and state.static_cache and torch.compiler.is_compiling():  # nothing read on the host
            if _refused_in_graphs(state.static_mask):
                _refuse_compiled_cuda_steps()
            return (), _continue_static(state, kwargs, cache, n)
        past = _cache_length(cache)
        if past == 0:  # a new prompt
            state.reset()
            if input_ids is None:
                raise ValueError("prune_visual_tokens finds visual tokens through input_ids: pass input_ids, not only "
                                 "inputs_embeds, on prefill (or remove the pruning hooks)")
            visual = torch.isin(input_ids, torch.tensor(state.token_ids, device=input_ids.device))
            if n < 2:
                return (), kwargs
            mask = kwargs.get("attention_mask")
            if _is_prepared(mask) and _has_static_layers(cache):  # generate's 4-D masks: the padding they hold
                mask = kwargs["attention_mask"] = _padding_of(mask, visual.shape[0], n).long()
            valid = torch.ones_like(visual) if not isinstance(mask, torch.Tensor) or mask.dim() != 2 else \
                mask.to(torch.bool)
            sizes = _PrunedSizes.of(visual, valid, state.keep, state.rule)  # the prefill's one early sync
            if sizes is None:  # no visual tokens
                return (), kwargs
            if kwargs.get("labels") is not None:
                raise ValueError("prune_visual_tokens is for inference: a prefill with labels would need every "
                                 "token's logits")
            if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else ""
                raise ValueError("prune_visual_tokens needs a 2-D (B, T) attention_mask (or None; with a static "
                                 f"cache also generate's 4-D one), got {type(mask).__name__}{shape}")
            state.visual, state.valid, state.sizes = visual, valid, sizes
            state.pending = True
            return (), kwargs
        if not pruned_cache:
            return (), kwargs  # a cache this model did not prune
        if state.static_cache:
            return (), _continue_static(state, kwargs, cache, n)
        expected = state.pruned_length + state.decoded
        if past != expected:
            raise RuntimeError(f"the pruned KV cache holds {past} tokens, expected {expected} (kept prompt "
                               f"{state.pruned_length} + {state.decoded} fed since): was it changed outside the model?")
        full = state.full_length + state.decoded + n  # what a caller that knows nothing of pruning counts
        mask = kwargs.get("attention_mask")
        B = state.kept_valid.shape[0]
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            if mask.shape[1] != full:
                raise ValueError(f"attention_mask has {mask.shape[1]} columns; after a pruned prompt of "
                                 f"{state.full_length} tokens and {state.decoded} more, expected {full}")
            kwargs["attention_mask"] = torch.cat([state.kept_valid.to(mask.dtype), mask[:, state.full_length:]], 1)
        elif mask is None:
            if not state.sizes.all_slots_valid:
                new = torch.ones(B, state.decoded + n, dtype=torch.long, device=state.kept_valid.device)
                kwargs["attention_mask"] = torch.cat([state.kept_valid.long(), new], 1)
        else:
            raise ValueError("after a pruned prompt the attention_mask must be 2-D or None")
        cp = kwargs.get("cache_position")  # transformers < 5: cache indices, which pruning shifted
        if isinstance(cp, torch.Tensor):
            kwargs["cache_position"] = cp - (state.full_length - state.pruned_length)
        if kwargs.get("position_ids") is None:
            pos = state.next_position[:, None] + state.decoded + torch.arange(n, device=state.next_position.device)
            kwargs["position_ids"] = pos[None].expand(3, -1, -1) if state.position_rank == 3 else pos
        state.decoded += n
        return (), kwargs

    return hook


def _is_prepared(mask) -> bool:
    """A mask generate prepared for a static cache: 4-D (or a dict of them, by layer kind), its
    columns the cache's slots, that is the original positions."""
    return isinstance(mask, dict) or (isinstance(mask, torch.Tensor) and mask.dim() == 4)


def _padding_of(mask, B: int, n: int) -> Tensor:
    """(B, n) bool: which tokens of a prompt of n are real, read from the diagonal of the mask
    generate prepared for it (B|1, 1|H, n, S), its columns the slots of an empty cache: a row sees
    itself unless it is padding."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values())))
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2] != n or mask.shape[-1] < n:
        raise ValueError(f"prune_visual_tokens cannot read the padding of an attention_mask of "
                         f"{type(mask).__name__}{tuple(getattr(mask, 'shape', ()))}")
    own = torch.diagonal(mask[:, 0, :, :n], dim1=-2, dim2=-1)
    visible = own if own.dtype == torch.bool else own > torch.finfo(own.dtype).min / 2
    return visible.expand(B, n)


def _refused_in_graphs(t: Tensor) -> bool:
    return t.is_cuda


@torch._dynamo.disable
def _refuse_compiled_cuda_steps():
    # On the CPU (aot_eager) the compiled steps give the eager tokens; in CUDA graphs the GPU test's
    # scores differed from the dynamic cache's, cause not found yet: refused rather than wrong. Run
    # outside dynamo (a raise it traces would only make it give up the frame and run it eagerly).
    raise NotImplementedError(
        "prune_visual_tokens: a pruned static cache's compiled decode steps on CUDA (CUDA graphs) are not "
        "supported yet; pass disable_compile=True to generate (eager steps), or use a DynamicCache")


def _continue_static(state: _PruneState, kwargs: dict, cache, n: int) -> dict:
    """The arguments of a call continuing a pruned static cache. Its mask covers the cache's slots:
    the kept prefix's padding, then every later slot real (causality says which are written): one
    tensor for every step, so that a compiled step sees one shape and reads nothing on the host.
    A mask generate prepared (4-D, over the pruned cache's slots from the caller's 2-D mask, so its
    padding columns are misplaced) is replaced too: the tokens generate feeds are real."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        if not torch.compiler.is_compiling() and not bool(mask[:, state.full_length:].all()):
            raise ValueError("after a pruned prompt in a static cache the tokens fed must be real (their "
                             "attention_mask columns 1)")
    elif mask is not None and not _is_prepared(mask):
        raise ValueError("after a pruned prompt the attention_mask must be 2-D, generate's 4-D one, or None")
    kwargs["attention_mask"] = state.static_mask
    cp = kwargs.get("cache_position")  # transformers < 5: cache indices, which pruning shifted
    if isinstance(cp, torch.Tensor):
        kwargs["cache_position"] = cp - (state.full_length - state.pruned_length)
    if kwargs.get("position_ids") is None:
        device = state.next_position.device
        fed = torch.as_tensor(cache.get_seq_length(), device=device) - state.pruned_length
        pos = state.next_position[:, None] + fed + torch.arange(n, device=device)
        kwargs["position_ids"] = pos[None].expand(3, -1, -1) if state.position_rank == 3 else pos
    return kwargs


def _has_static_layers(cache) -> bool:
    return any(type(layer).__name__ in _STATIC_LAYERS for layer in getattr(cache, "layers", None) or [])


def _static_width(cache) -> int:
    """The slots of a static cache's full-attention layers (its max_cache_len)."""
    return max(int(layer.max_cache_len) for layer in cache.layers if hasattr(layer, "max_cache_len"))


def _lm_pre_hook(state: _PruneState):
    def hook(module, args, kwargs):
        if not state.pending:
            return None
        kwargs = _bind(module, args, kwargs)
        embeds = kwargs.get("inputs_embeds")
        B, T = state.visual.shape
        if embeds is None or embeds.shape[1] != T:
            raise RuntimeError("prune_visual_tokens: the text decoder did not get the prompt's embeddings")
        pos = kwargs.get("position_ids")
        if pos is None:
            state.next_position = torch.full((B,), T, dtype=torch.long, device=embeds.device)
            state.position_rank = 3 if _uses_mrope(module) else 2
        else:
            if pos.dim() == 3:  # (3, B, T) M-RoPE, or (4, B, T) with the text positions first
                state.position_rank = 3
                p = pos[1:] if pos.shape[0] == 4 else pos
                state.next_position = p.amax(dim=(0, 2)).long() + 1
            else:
                state.position_rank = 2
                state.next_position = pos.amax(dim=-1).long().expand(B) + 1
        # Sliding-window cache layers would forget the tokens past the window before layer K re-slices
        # them: have them record everything until then.
        cache = _cache_of(kwargs)
        state.recording = []
        for i, layer in enumerate(getattr(cache, "layers", []) or []):
            recordable = hasattr(layer, "activate_past_recording") and not getattr(layer, "record_past", True)
            if i <= state.layer and recordable:
                layer.activate_past_recording()
                state.recording.append(layer)
        return (), kwargs

    return hook


def _uses_mrope(lm) -> bool:
    rope = getattr(getattr(lm, "config", None), "rope_parameters", None) or getattr(lm.config, "rope_scaling", None)
    return isinstance(rope, dict) and "mrope_section" in rope


def _lm_post_hook(state: _PruneState):
    def hook(module, args, kwargs, output):
        if state.pending:  # layer K never ran on the prompt
            state.pending = False
            raise RuntimeError(f"prune_visual_tokens: decoder layer {state.layer} did not score the visual tokens "
                               "(its attention did not run through mmfa)")
        state.in_prefill = False
        state.memo = {}
        return None

    return hook


def _right_aligned(kept: Tensor, L: int) -> tuple[Tensor, Tensor]:
    """(index (B, L), slot_valid (B, L)) placing each example's kept positions, in order, at the
    end of L = max kept count slots; padding slots (on the left) point at the first kept token."""
    counts = kept.sum(dim=1)
    order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :L]  # kept positions first, ascending
    src = torch.arange(L, device=kept.device)[None, :] - (L - counts)[:, None]
    slot_valid = src >= 0
    index = torch.gather(order, 1, src.clamp(min=0))
    return index, slot_valid


def _layer_k_hook(state: _PruneState):
    def hook(module, args, kwargs, output):
        if not state.pending:
            return None
        state.pending = False
        if state.importance is None:
            raise RuntimeError(f"prune_visual_tokens: decoder layer {state.layer}'s attention did not run through "
                               "mmfa, so there are no importance scores")
        visual = state.visual & state.valid
        idx, lengths = mmfa_torch.select_visual_tokens(state.importance, visual, state.keep,  # a checked Keep
                                                       output_length=state.sizes.selected)
        B, T = visual.shape
        live = torch.arange(idx.shape[1], device=idx.device)[None, :] < lengths[:, None]
        # The unused entries go to a spare column T (sent to 0 they would overwrite position 0's flag).
        kept = torch.zeros(B, T + 1, dtype=torch.bool, device=visual.device)
        kept.scatter_(1, torch.where(live, idx.long(), T), True)
        kept = kept[:, :T] & state.valid
        index, slot_valid = _right_aligned(kept, state.sizes.kept)
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = _gather_seq(hidden, index, axis=1)
        cache = _cache_of(kwargs)
        state.static_cache = _has_static_layers(cache)
        if cache is not None:
            _reslice_cache(cache, state, index)
        if state.static_cache:
            width = _static_width(cache)
            state.static_mask = torch.ones(slot_valid.shape[0], width, dtype=torch.long, device=slot_valid.device)
            state.static_mask[:, :slot_valid.shape[1]] = slot_valid
        state.index, state.kept_valid = index, slot_valid
        state.full_length, state.pruned_length = T, index.shape[1]
        state.cache_ref = weakref.ref(cache) if cache is not None else None
        state.active = cache is not None
        state.decoded = 0
        state.in_prefill = True
        state.memo = {}
        state.importance = None
        if isinstance(output, tuple):
            return (hidden,) + tuple(output[1:])
        return hidden

    return hook


def _gather_seq(x: Tensor, index: Tensor, axis: int, batch_axis: int | None = None) -> Tensor:
    """x[..., b, ..., index[b, l], ...]: gather ``axis`` per example; ``batch_axis`` (default: the
    axis before ``axis``) has size B or 1 (then it is broadcast)."""
    axis = axis % x.dim()
    batch_axis = axis - 1 if batch_axis is None else batch_axis % x.dim()
    B, L = index.shape
    shape = list(x.shape)
    shape[batch_axis] = B
    x = x.expand(shape)
    view = [1] * x.dim()
    view[batch_axis], view[axis] = B, L
    size = list(x.shape)
    size[axis] = L
    return torch.gather(x, axis, index.reshape(view).expand(size))


def _reslice_cache(cache, state: _PruneState, index: Tensor):
    """Keep the kept tokens in the cache of layers 0..K (the later layers only ever see them)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise NotImplementedError(f"prune_visual_tokens needs a transformers DynamicCache with .layers "
                                  f"(transformers >= 4.56), got {type(cache).__name__}")
    L = index.shape[1]
    for i in range(state.layer + 1):
        layer = layers[i]
        kind = type(layer).__name__
        T = state.full_length if state.full_length else state.visual.shape[1]
        if kind in _STATIC_LAYERS:
            _reslice_static(layer, i, index, T)
            continue
        if kind not in ("DynamicLayer", "DynamicSlidingWindowLayer"):
            raise NotImplementedError(f"prune_visual_tokens re-slices DynamicCache and StaticCache layers; layer {i} "
                                      f"is {kind}")
        if layer.keys.shape[-2] != T:
            raise NotImplementedError(f"cache layer {i} holds {layer.keys.shape[-2]} tokens of a {T}-token prompt "
                                      "(a sliding-window layer that could not record the whole prompt)")
        layer.keys = _gather_seq(layer.keys, index, axis=2, batch_axis=0)      # (B, Hkv, T, D)
        layer.values = _gather_seq(layer.values, index, axis=2, batch_axis=0)
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = L
            window = getattr(layer, "sliding_window", None)
            if any(layer is r for r in state.recording):
                layer.record_past = False
            if window:
                layer.keys = layer.keys[:, :, -window + 1:, :]
                layer.values = layer.values[:, :, -window + 1:, :]
    state.recording = []


# The static layers of transformers 4.57 and 5.x whose buffers hold the prompt in position order from slot 0.
_STATIC_LAYERS = ("StaticLayer", "StaticSlidingWindowLayer", "SlidingWindowLayer")


def _reslice_static(layer, i: int, index: Tensor, T: int):
    """A static cache layer's first L slots get the kept tokens, in place (its buffers keep their
    addresses: torch.compile and CUDA graphs hold them); the slots the prompt left behind are zeroed
    (4.57 counts a static layer's length by its non-zero slots) and the layer's count says L."""
    L = index.shape[1]
    capacity = layer.keys.shape[-2]
    if T > capacity:
        raise NotImplementedError(f"static cache layer {i} holds {capacity} tokens, fewer than the {T}-token prompt "
                                  "(a sliding window's rolling buffer has already dropped some): prune at a layer "
                                  "before the first sliding-window layer, or use a DynamicCache")
    for buffer in (layer.keys, layer.values):
        kept = _gather_seq(buffer[:, :, :T], index, axis=2, batch_axis=0)
        buffer[:, :, :L].copy_(kept)
        buffer[:, :, L:T].zero_()
    count = getattr(layer, "cumulative_length", None)
    if isinstance(count, torch.Tensor):  # 5.x
        count.fill_(L)
    elif isinstance(count, int):  # 4.57's sliding-window layers
        layer.cumulative_length = L
    if hasattr(layer, "cumulative_length_int"):
        layer.cumulative_length_int = L


def _later_layer_hook(state: _PruneState):
    def hook(module, args, kwargs):
        if not state.in_prefill:
            return None
        kwargs = _bind(module, args, kwargs)
        index, slot_valid = state.index, state.kept_valid
        T = state.visual.shape[1]
        memo = state.memo

        def once(x, fn):
            key = id(x)
            if key not in memo:
                memo[key] = (x, fn(x))  # keep x alive so that its id is not reused
            return memo[key][1]

        mask = kwargs.get("attention_mask")
        if mask is None:
            kwargs["attention_mask"] = None if state.sizes.all_slots_valid else slot_valid
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
            # With a static cache the 2-D mask also says how many keys are there (its written part, see
            # backend.mask_function), now the L kept ones: kept even when every slot is valid.
            kwargs["attention_mask"] = None if state.sizes.all_slots_valid and not state.static_cache else slot_valid
        elif isinstance(mask, torch.Tensor) and mask.dim() == 4:
            kwargs["attention_mask"] = once(mask, lambda m: _gather_mask(m, index, slot_valid, state.static_cache))
        else:
            raise NotImplementedError("prune_visual_tokens cannot slice an attention mask of type "
                                      f"{type(mask).__name__}")
        for name in [n for n in kwargs if n.startswith("position_embeddings")]:  # 4.57 Gemma 3: _global, _local
            pe = kwargs[name]
            if isinstance(pe, (tuple, list)):
                kwargs[name] = type(pe)(
                    once(t, lambda t: _gather_seq(t, index, axis=-2)) if isinstance(t, torch.Tensor) and t.dim() >= 3
                    and t.shape[-2] == T else t for t in pe)
        for name in ("position_ids", "text_position_ids"):
            p = kwargs.get(name)
            if isinstance(p, torch.Tensor) and p.dim() >= 2 and p.shape[-1] == T:
                kwargs[name] = once(p, lambda p: _gather_seq(p, index, axis=-1))
        cp = kwargs.get("cache_position")
        if isinstance(cp, torch.Tensor):
            kwargs["cache_position"] = torch.arange(index.shape[1], device=cp.device, dtype=cp.dtype)
        hidden = kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.shape[1] != index.shape[1]:
            raise RuntimeError(f"decoder layer got {hidden.shape[1]} tokens after pruning to {index.shape[1]}")
        return (), kwargs

    return hook


def _gather_mask(mask: Tensor, index: Tensor, slot_valid: Tensor, static: bool) -> Tensor:
    """A 4-D (B|1, 1|H, T, S) mask restricted to the kept rows and the kept columns of the prompt,
    which move to the first L; padding slots masked. ``static``: the S columns are a static cache's
    slots, which stay (those past L masked); otherwise the result has L columns."""
    B, L = index.shape
    mask = mask.expand(B, *mask.shape[1:])
    H, S = mask.shape[1], mask.shape[3]
    m = torch.gather(mask, 2, index[:, None, :, None].expand(B, H, L, S))   # rows
    m = torch.gather(m, 3, index[:, None, None, :].expand(B, H, L, L))      # columns
    pair = slot_valid[:, None, :, None] & slot_valid[:, None, None, :]
    hidden = False if m.dtype == torch.bool else torch.finfo(m.dtype).min
    m = m & pair if m.dtype == torch.bool else torch.where(pair, m, hidden)
    if static and S > L:
        m = torch.nn.functional.pad(m, (0, S - L), value=hidden)
    return m


__all__ = ["RULES", "SUPPORTED_FAMILIES", "PruningHandle", "prune_visual_tokens"]
