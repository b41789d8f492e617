"""Hugging Face transformers integration: the "mmfa" attention backend and visual-token pruning.

Attention backend
-----------------
``register()`` adds "mmfa" to transformers' ``AttentionInterface`` (the attention function) and
``AttentionMaskInterface`` (the mask function that builds what the attention function receives).
After it, ``from_pretrained(..., attn_implementation="mmfa")``, ``Config(attn_implementation="mmfa")``
and ``model.set_attn_implementation("mmfa")`` (also per sub-model, e.g. ``{"text_config": "mmfa",
"vision_config": "sdpa"}``) run the model's attention on mmfa's kernels.

The mask function keeps masks compact whenever the kernel can express them: for a plain causal
(or sliding-window causal) or plain bidirectional mask it returns only the 2-D padding mask
(B, S) of the keys, or None without padding, and the attention function maps it to kernel
arguments (``is_causal`` from the module, ``sliding_window`` as a local window, padding as
segment ids, which cover left and right padding alike). Any other pattern (Gemma 3's bidirectional
image blocks, packed sequences, chunked attention, a user's 4-D mask) arrives as a 4-D boolean
(or additive float) mask and goes to the kernel as ``attn_mask``.

Visual-token pruning
--------------------
``prune_visual_tokens(model, keep, layer=K, rule="text")`` installs hooks on a loaded VLM:

1. a pre-hook on the multimodal model (``model.model``: it sees ``input_ids``) notes which tokens
   are visual (``input_ids`` equal to the config's image/video token id) and the padding, on prefill;
   on later calls that continue a pruned cache it rewrites the 2-D attention mask (kept prefix +
   new columns) and, when none are given, the position ids (the original numbering continues);
2. the attention function, at layer K during prefill, also returns the LSE and computes mmfa's
   visual-token importance (``rule`` "text": mean over text rows, "last": the last row, FastV);
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
from mmfa_torch.attention import scaled_dot_product_attention
from mmfa_torch.hf import windows

Tensor = torch.Tensor
NAME = "mmfa"
RULES = ("text", "last")
# model_type of the multimodal config -> how the family is laid out (checked by the tests).
SUPPORTED_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3",
                      "smolvlm")

_settings = {"implementation": None, "decode": "mmfa"}


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------

def register(name: str = NAME, *, implementation: str | None = None, decode: str = "mmfa") -> str:
    """Register mmfa in transformers under ``name`` (default "mmfa"); returns the name.

    ``implementation`` picks the kernels for every call ("pallas", "interpret", "xla"; default:
    mmfa_torch's choice per device). ``decode="sdpa"`` hands calls with a single query row (decode
    steps) to torch's SDPA instead (for comparison; soft-capped layers stay on mmfa). Calling it
    again updates both choices. Safe to call many times.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if implementation is not None and implementation not in ("pallas", "interpret", "xla"):
        raise ValueError(f"implementation must be 'pallas', 'interpret', 'xla' or None, got {implementation!r}")
    if decode not in ("mmfa", "sdpa"):
        raise ValueError(f"decode must be 'mmfa' or 'sdpa', got {decode!r}")
    _settings["implementation"] = implementation
    _settings["decode"] = decode
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_function)
    return name


def set_implementation(implementation: str | None):
    """Choose the kernels ("pallas", "interpret", "xla" or None for the default) for later calls."""
    register(implementation=implementation)


# --------------------------------------------------------------------------------------------------
# Mask function
# --------------------------------------------------------------------------------------------------

def mask_function(*args, **kwargs):
    """transformers mask interface for "mmfa".

    Returns None (no padding), a bool (B, S) padding mask of the keys (plain causal, sliding-window
    causal or bidirectional masks: the attention function adds causality and the window itself),
    or the 4-D bool mask (B, 1, T, S) that ``sdpa_mask`` would build, for every other pattern.
    Takes the arguments of ``transformers.masking_utils.sdpa_mask`` (4.57 and 5.x spellings).
    """
    from transformers.masking_utils import sdpa_mask

    if args:  # the interface is called with keywords; be tolerant of a positional batch_size
        kwargs = dict(zip(("batch_size",), args)) | kwargs
    causal_plain = kwargs.get("allow_is_causal_skip", True)
    bidirectional_plain = kwargs.get("allow_is_bidirectional_skip", False) and kwargs.get("local_size") is None
    config = kwargs.get("config")
    chunked = getattr(config, "attention_chunk_size", None) is not None
    if (causal_plain or bidirectional_plain) and not chunked:
        padding = kwargs.get("attention_mask")
        if padding is None:
            return None
        kv_length, kv_offset = int(kwargs["kv_length"]), int(kwargs.get("kv_offset", 0) or 0)
        padding = padding.to(torch.bool)
        missing = kv_offset + kv_length - padding.shape[-1]
        if missing > 0:  # as transformers' prepare_padding_mask: keys past the mask are padding
            padding = torch.nn.functional.pad(padding, (0, missing))
        padding = padding[:, kv_offset:kv_offset + kv_length]
        return None if bool(padding.all()) else padding
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    kwargs.pop("dtype", None)
    return sdpa_mask(**kwargs)


# --------------------------------------------------------------------------------------------------
# Attention function
# --------------------------------------------------------------------------------------------------

def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None, is_causal: bool | None = None,
                      **kwargs) -> tuple[Tensor, None]:
    """transformers attention interface for "mmfa".

    Args:
      module: the attention module (its ``is_causal`` is the default for ``is_causal``).
      query: (B, Hq, T, D); key, value: (B, Hkv, S, D), Hkv dividing Hq (GQA heads not repeated).
        With a KV cache the T query rows are the last T of the S keys (decode: T = 1).
      attention_mask: None, bool (B, S) key padding (from ``mask_function``), or a 4-D bool or
        additive float mask broadcastable to (B, Hq, T, S), which then holds the whole pattern.
      dropout: dropout on the weights; mmfa has none, so training with dropout > 0 falls back to
        transformers' sdpa.
      scaling: softmax scale (default 1/sqrt(D)); sliding_window: keys within ``sliding_window``
        positions back, the current one included (transformers' convention); softcap: logit soft cap.

    Returns:
      ((B, T, Hq, D), None): mmfa does not form the attention weights.
    """
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if dropout and module.training:
        return _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap,
                              causal, **kwargs)
    T, S = query.shape[2], key.shape[2]
    if T == 1 and _settings["decode"] == "sdpa" and softcap is None:
        return _torch_decode(query, key, value, attention_mask, scaling, sliding_window), None
    state = getattr(module, "_mmfa_prune_state", None)
    if (T == 1 and (attention_mask is None or attention_mask.dim() == 2)
            and not (state is not None and state.wants_scores(T, S))):
        return _decode(query, key, value, attention_mask, scaling, sliding_window, softcap), None

    def kernel_args():
        return dict(scale=scaling, enable_gqa=query.shape[1] != key.shape[1], logits_soft_cap=softcap,
                    implementation=_settings["implementation"])

    if not causal and attention_mask is None and not sliding_window and T == S:  # maybe one window of many
        windows.watch(module)
        batch = module.__dict__.get("_mmfa_windows")
        out = None if batch is None else batch.answer(query, key, value, kernel_args)
        if out is not None:
            return out, None
    call = kernel_args()
    segments = None
    if attention_mask is not None and attention_mask.dim() == 4:  # the whole pattern: no causal flag or window
        call["attn_mask"] = attention_mask
        causal, window = False, None
    else:
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[-1] != S:
                raise ValueError(f"attention_mask must be None, a (B, S={S}) padding mask or a 4-D mask, got shape "
                                 f"{tuple(attention_mask.shape)}")
            valid = attention_mask.to(torch.bool)
            segments = (valid[:, S - T:].to(torch.int32), valid.to(torch.int32))  # queries are the last T keys
            call["segment_ids"] = segments
        window = None
        if sliding_window is not None and sliding_window > 0:
            window = (int(sliding_window) - 1, 0 if causal else int(sliding_window) - 1)
        call["local_window_size"] = window
        call["is_causal"] = causal
    # The kernels take the memory order of the query; a KV cache is (B, Hkv, S, D)-contiguous, so hand
    # them a contiguous query too rather than have K and V copied into the query's order.
    if key.is_contiguous() and value.is_contiguous() and not query.is_contiguous():
        query = query.contiguous()
    if state is not None and state.wants_scores(T, S):
        out, lse = scaled_dot_product_attention(query, key, value, return_lse=True, **call)
        dense = attention_mask is not None and attention_mask.dim() == 4
        state.score(query, key, lse, scale=scaling, is_causal=causal, window=window, softcap=softcap,
                    dense_mask=dense, module_causal=bool(getattr(module, "is_causal", True)),
                    sliding_window=sliding_window)
    else:
        out = scaled_dot_product_attention(query, key, value, **call)
    return out.transpose(1, 2), None


DECODE_BUCKET = 256  # decode calls see the cache padded to a multiple of this many keys


def _decode(query, key, value, attention_mask, scaling, sliding_window, softcap):
    """One query row (the last position) over a KV cache on the GPU: (B, 1, Hq, D).

    The cache grows by one key per step, and a kernel is compiled per shape; so the keys are padded
    to a multiple of ``DECODE_BUCKET`` and the padding is masked (by length, or with the padding mask
    as segment ids). One compile serves 256 steps. A sliding window keeps only its last keys first;
    after that the row sees every key, so no causal flag or window is needed."""
    B, S = key.shape[0], key.shape[2]
    valid = None if attention_mask is None else attention_mask.to(torch.bool)
    if sliding_window and S > sliding_window:
        key, value = key[:, :, S - sliding_window:], value[:, :, S - sliding_window:]
        valid = None if valid is None else valid[:, S - sliding_window:]
        S = sliding_window
    padded = -(-S // DECODE_BUCKET) * DECODE_BUCKET
    pad = (0, 0, 0, padded - S)
    key, value = torch.nn.functional.pad(key, pad), torch.nn.functional.pad(value, pad)
    call = dict(scale=scaling, enable_gqa=query.shape[1] != key.shape[1], logits_soft_cap=softcap,
                implementation=_settings["implementation"])
    if valid is None:
        call["key_value_seq_lengths"] = torch.full((B,), S, dtype=torch.int32, device=query.device)
    else:
        kv_seg = torch.nn.functional.pad(valid.to(torch.int32), (0, padded - S))  # 1: a real key, 0: not
        call["segment_ids"] = (torch.ones(B, 1, dtype=torch.int32, device=query.device), kv_seg)
    return scaled_dot_product_attention(query.contiguous(), key, value, **call).transpose(1, 2)


def _torch_decode(query, key, value, attention_mask, scaling, sliding_window):
    """One query row (the last position) over S keys with torch's SDPA: (B, 1, Hq, D)."""
    S = key.shape[2]
    mask = None
    if attention_mask is not None:
        mask = attention_mask.to(torch.bool)[:, None, None, :] if attention_mask.dim() == 2 else attention_mask
    if sliding_window and S > sliding_window - 1 and (attention_mask is None or attention_mask.dim() == 2):
        band = torch.arange(S, device=key.device) > S - 1 - sliding_window
        mask = band[None, None, None, :] if mask is None else mask & band
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


def _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap, causal,
                   **kwargs):
    """Training with attention dropout: transformers' sdpa with a dense mask built from ours."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if softcap is not None:
        raise ValueError("mmfa attention: dropout > 0 with a logit soft cap has no fallback; set the attention "
                         "dropout to 0 or use attn_implementation='eager'")
    T, S = query.shape[2], key.shape[2]
    if attention_mask is None or attention_mask.dim() == 2:
        dense = torch.ones(T, S, dtype=torch.bool, device=query.device)
        q_pos = torch.arange(T, device=query.device)[:, None] + (S - T)
        k_pos = torch.arange(S, device=query.device)[None, :]
        if causal:
            dense &= k_pos <= q_pos
        if sliding_window:
            dense &= k_pos > q_pos - sliding_window
        dense = dense[None, None]
        if attention_mask is not None:
            dense = dense & attention_mask.to(torch.bool)[:, None, None, :]
        attention_mask = dense
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=False, **kwargs)


# --------------------------------------------------------------------------------------------------
# Visual-token pruning
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _PruneState:
    """What the hooks share. One prefill at a time per model."""
    keep: float | int
    layer: int
    rule: str
    token_ids: tuple[int, ...]
    # set on a prefill with visual tokens, until layer K has pruned
    pending: bool = False
    visual: Tensor | None = None        # (B, T) bool
    valid: Tensor | None = None         # (B, T) bool, not padding
    importance: Tensor | None = None    # (B, T) float32
    next_position: Tensor | None = None  # (B,) first position after the prompt (original numbering)
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
        return self.pending and self.visual is not None and T == S == self.visual.shape[1]

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
        seg = None if bool(valid.all()) else valid.to(torch.int32)
        self.importance = mmfa_torch.visual_token_importance(
            query, key, lse, visual & valid, scorers, scale=scale, is_causal=is_causal, local_window_size=window,
            logits_soft_cap=softcap, segment_ids=seg, implementation=_settings["implementation"])

    def reset(self):
        self.pending = self.in_prefill = self.active = False
        self.visual = self.valid = self.importance = self.next_position = None
        self.index = self.kept_valid = None
        self.cache_ref = None
        self.memo = {}
        self.decoded = 0
        self.recording = []


class PruningHandle:
    """What ``prune_visual_tokens`` returns: ``remove()`` takes the hooks off; ``kept_positions``
    (B, L) int64 are the input positions kept by the last pruned prefill (-1: padding slot)."""

    def __init__(self, model, state, hooks, attn_module):
        self._model, self._state, self._hooks, self._attn = weakref.ref(model), state, hooks, attn_module

    @property
    def keep(self):
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
        if getattr(self._attn, "_mmfa_prune_state", None) is self._state:
            del self._attn._mmfa_prune_state
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


def prune_visual_tokens(model: torch.nn.Module, keep: float | int, layer: int = 2, rule: str = "text") -> PruningHandle:
    """Make a loaded VLM drop its least important visual tokens after decoder layer ``layer`` on prefill.

    Args:
      model: a transformers VLM of a supported family (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL,
        Qwen2.5-VL, Gemma 3, Idefics3, SmolVLM): the ``...ForConditionalGeneration`` or its ``.model``.
        Its text decoder must use ``attn_implementation="mmfa"`` (layer ``layer``'s attention scores).
      keep: visual tokens kept per example: a ratio in (0, 1] (ceil(keep * n_visual)) or an int count.
        Text tokens always stay. Several images in one prompt compete for the same budget.
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
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be a ratio in (0, 1] or a positive int count, got {keep!r}")
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"keep as a count must be >= 1, got {keep}")
    if isinstance(keep, float) and not (0.0 < keep <= 1.0):
        raise ValueError(f"keep as a ratio must be in (0, 1], got {keep}")
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
    register()  # the function the attention of layer K reaches must be ours

    state = _PruneState(keep=keep, layer=layer, rule=rule, token_ids=token_ids)
    attn._mmfa_prune_state = state
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
        past = _cache_length(cache)
        input_ids = kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        n = input_ids.shape[1] if input_ids is not None else embeds.shape[1]
        if past == 0:  # a new prompt
            state.reset()
            if input_ids is None:
                raise ValueError("prune_visual_tokens finds visual tokens through input_ids: pass input_ids, not only "
                                 "inputs_embeds, on prefill (or remove the pruning hooks)")
            visual = torch.isin(input_ids, torch.tensor(state.token_ids, device=input_ids.device))
            if n < 2 or not bool(visual.any()):
                return (), kwargs
            if kwargs.get("labels") is not None:
                raise ValueError("prune_visual_tokens is for inference: a prefill with labels would need every "
                                 "token's logits")
            mask = kwargs.get("attention_mask")
            if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else ""
                raise ValueError("prune_visual_tokens needs a 2-D (B, T) attention_mask (or None), got "
                                 f"{type(mask).__name__}{shape}")
            state.visual = visual
            state.valid = torch.ones_like(visual) if mask is None else mask.to(torch.bool)
            state.pending = True
            return (), kwargs
        if not state.active or state.cache_ref is None or state.cache_ref() is not cache:
            return (), kwargs  # a cache this model did not prune
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
            if not bool(state.kept_valid.all()):
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


def _right_aligned(kept: Tensor) -> tuple[Tensor, Tensor]:
    """(index (B, L), slot_valid (B, L)) placing each example's kept positions, in order, at the
    end of L = max kept count slots; padding slots (on the left) point at the first kept token."""
    counts = kept.sum(dim=1)
    L = max(1, int(counts.max()))
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
        idx, lengths = mmfa_torch.select_visual_tokens(state.importance, visual, state.keep)
        B, T = visual.shape
        live = torch.arange(idx.shape[1], device=idx.device)[None, :] < lengths[:, None]
        kept = torch.zeros(B, T, dtype=torch.bool, device=visual.device)
        kept.scatter_(1, torch.where(live, idx.long(), 0), live)
        kept &= state.valid
        index, slot_valid = _right_aligned(kept)
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = _gather_seq(hidden, index, axis=1)
        cache = _cache_of(kwargs)
        if cache is not None:
            _reslice_cache(cache, state, index)
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
        if kind not in ("DynamicLayer", "DynamicSlidingWindowLayer"):
            raise NotImplementedError(f"prune_visual_tokens re-slices DynamicCache layers only; layer {i} is {kind}")
        T = state.full_length if state.full_length else state.visual.shape[1]
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
        if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            kwargs["attention_mask"] = None if bool(slot_valid.all()) else slot_valid
        elif isinstance(mask, torch.Tensor) and mask.dim() == 4:
            kwargs["attention_mask"] = once(mask, lambda m: _gather_mask(m, index, slot_valid))
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


def _gather_mask(mask: Tensor, index: Tensor, slot_valid: Tensor) -> Tensor:
    """A 4-D (B|1, 1|H, T, T) mask restricted to the kept rows and columns; padding slots masked."""
    B, L = index.shape
    mask = mask.expand(B, *mask.shape[1:])
    H, S = mask.shape[1], mask.shape[3]
    m = torch.gather(mask, 2, index[:, None, :, None].expand(B, H, L, S))   # rows
    m = torch.gather(m, 3, index[:, None, None, :].expand(B, H, L, L))      # columns
    pair = slot_valid[:, None, :, None] & slot_valid[:, None, None, :]
    if m.dtype == torch.bool:
        return m & pair
    return torch.where(pair, m, torch.finfo(m.dtype).min)


__all__ = ["NAME", "PruningHandle", "SUPPORTED_FAMILIES", "attention_forward", "mask_function", "prune_visual_tokens",
           "register", "set_implementation"]
