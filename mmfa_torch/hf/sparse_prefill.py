"""MMInference-style sparse prefill for Hugging Face VLMs (issue 17 part 4).

``sparse_prefill(model, config=..., min_tokens=...)`` makes the text decoder's self-attention of
a loaded VLM (Qwen2.5-VL, LLaVA-OneVision, LLaVA-NeXT-Video; any family that
``mmfa_torch.hf.pruning`` finds the decoder of) use per-head patterns searched offline
(``mmfa_jax.sparse_search``) during prefill:

    from mmfa_jax import sparse_search
    from mmfa_torch.hf.sparse_prefill import sparse_prefill, search_model

    configs = search_model(model, calibration_inputs, block=128)       # {layer: SparseConfig}
    sparse_search.save_configs("qwen2_5_vl.json", list(configs.values()))
    handle = sparse_prefill(model, config="qwen2_5_vl.json", min_tokens=8192)
    model.generate(**inputs)                                           # prefill sparse, decode dense
    handle.remove()

How it hooks in: the text decoder's ``_attn_implementation`` becomes "mmfa_sparse", an attention
function registered with transformers' ``AttentionInterface`` (and the "mmfa" mask function under
the same name in ``AttentionMaskInterface``). For a call of a patched layer that is a whole-prompt
prefill (T query rows over the same T keys, causal, no padding, no sliding window or soft cap
cutting in, at least ``min_tokens`` rows) it builds the layer's block map from that call's q and
k (``sparse_search.build_blocks``: one pattern per head, one row order per layer) and runs
``mmfa_torch.sparse.block_sparse_attention``; every other call (decode steps, chunked prefill over
a cache, padded batches, short prompts, layers without a config) goes to the "mmfa" backend's
dense attention (``mmfa_torch.hf.backend.attention_forward``, its decode path included). So the
text decoder runs on mmfa's kernels while patched, whatever it ran on before; ``remove()``
restores its previous implementation.

The visual tokens (for modality boundaries) are the ``input_ids`` equal to the config's image or
video token ids, noted by a pre-hook on the multimodal model. A config in the permuted order also
needs the video layout: ``video_layout=(frames, tokens_per_frame)``, where the video tokens (the
video token id) are frames x tokens_per_frame per example, frame-major; Qwen2.5-VL's
``video_grid_thw`` gives it when ``video_layout`` is None (one video per example). In that order
the video tokens alone are the visual ones (for the permutation and the boundaries); image
tokens count as text there. LLaVA-OneVision appends a newline token to a video's frames, so its
video tokens are not frames x tokens_per_frame: use the original order for it.

Tested on tiny random models on the CPU with transformers 5.17 and 4.57.1
(tests/test_hf_sparse_prefill.py); not yet on a GPU or a trained model.

Padded batches stay dense: the block-sparse kernels have no padding segments, and the maps were
searched on unpadded rows.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from mmfa_jax import sparse_search as ss
from mmfa_torch.hf import backend, pruning

Tensor = torch.Tensor
NAME = "mmfa_sparse"
_ATTR = "_mmfa_sparse_prefill"  # the attention module's (handle, layer index)


def register() -> str:
    """Register the "mmfa_sparse" attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    backend.register()
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, backend.mask_function)
    return NAME


def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """transformers attention interface for "mmfa_sparse": query (B, Hq, T, D), key/value
    (B, Hkv, S, D) -> ((B, T, Hq, D), None). The patched layers' whole-prompt prefill calls run
    block-sparse; everything else is ``backend.attention_forward``."""
    entry = getattr(module, _ATTR, None)
    if entry is not None:
        handle, layer = entry
        handle = handle()
        if handle is not None:
            out = handle._attend(module, layer, query, key, value, attention_mask, dropout, scaling, sliding_window,
                                 softcap, is_causal)
            if out is not None:
                return out, None
    return backend.attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     sliding_window=sliding_window, softcap=softcap, is_causal=is_causal, **kwargs)


@dataclasses.dataclass
class _Prompt:
    """What the multimodal model's pre-hook saw on its last call."""
    visual: Tensor | None = None        # (B, T) bool: image or video tokens
    video: Tensor | None = None         # (B, T) bool: video tokens
    layout: tuple | None = None         # (frames, tokens_per_frame) from video_grid_thw


class SparsePrefillHandle:
    """What ``sparse_prefill`` (and ``search_model``) install. ``calls`` counts the patched layers'
    attention calls by route ("sparse", "dense"); ``remove()`` takes everything off and restores
    the text decoder's attention implementation."""

    def __init__(self, model, configs: dict, min_tokens: int, video_layout, search: dict | None = None):
        self._model = weakref.ref(model)
        self.configs = configs
        self.min_tokens = min_tokens
        self.video_layout = video_layout
        self.calls = {"sparse": 0, "dense": 0}
        self.searched: dict = {}          # search_model: {layer: SparseConfig}
        self._search = search
        self._prompt = _Prompt()
        mm, lm, layers = _parts(model)
        self._text_config = lm.config
        self._previous = lm.config._attn_implementation
        self._modules = []
        self._hooks = [mm.register_forward_pre_hook(self._note_prompt, with_kwargs=True)]
        self._token_ids = pruning._token_ids(model.config)
        self._video_ids = tuple(i for i in (getattr(model.config, n, None) for n in ("video_token_id",
                                                                                   "video_token_index"))
                                if isinstance(i, int) and i >= 0)
        for i, layer in enumerate(layers):
            attn = getattr(layer, "self_attn", None)
            if attn is None:
                raise ValueError(f"{type(model).__name__}: decoder layer {i} has no self_attn")
            setattr(attn, _ATTR, (weakref.ref(self), i))
            self._modules.append(attn)
        register()
        lm.config._attn_implementation = NAME

    # -- hooks ------------------------------------------------------------------------------------

    def _note_prompt(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            self._prompt = _Prompt()
            return None
        visual = torch.isin(ids, torch.tensor(self._token_ids or (-1,), device=ids.device))
        video = torch.isin(ids, torch.tensor(self._video_ids or (-1,), device=ids.device))
        layout = None
        grid = kwargs.get("video_grid_thw")
        if isinstance(grid, torch.Tensor) and grid.shape[0] == ids.shape[0]:
            cfg = getattr(self._model().config, "vision_config", None)
            merge = getattr(cfg, "spatial_merge_size", 1)
            t, h, w = (int(x) for x in grid[0])
            if bool((grid == grid[0]).all()):  # one layout for every example
                layout = (t, h * w // merge ** 2)
        self._prompt = _Prompt(visual, video, layout)
        return None

    # -- the attention call -----------------------------------------------------------------------

    def _attend(self, module, layer, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap,
                is_causal):
        """The sparse output (B, T, Hq, D) of a whole-prompt prefill call of ``layer``, or None
        (the call goes dense)."""
        B, _, T, _ = query.shape
        causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
        padded = attention_mask is not None and not (attention_mask.dim() == 2 and bool(attention_mask.all()))
        eligible = (causal and key.shape[2] == T and T >= self.min_tokens and softcap is None and not padded
                    and not (sliding_window and sliding_window < T) and not (dropout and module.training))
        config = self.configs.get(layer, self.configs.get(None)) if self._search is None else None
        if not eligible or (config is None and self._search is None):
            self.calls["dense"] += 1
            return None
        visual, video, layout = self._prompt_for(B, T)
        if self._search is not None:  # search_model: search this layer's q/k, answer dense
            self._run_search(layer, query, key, visual, video, layout, scaling)
            self.calls["dense"] += 1
            return None
        if config.num_heads != query.shape[1]:
            raise ValueError(f"config of layer {layer} holds {config.num_heads} heads, the model's layer has "
                             f"{query.shape[1]} query heads")
        permuted = config.order == "permuted"
        if permuted and (video is None or layout is None):
            raise ValueError(f"layer {layer}'s config is in the permuted video order: it needs the prompt's video "
                             "tokens (input_ids with the video token id) and video_layout=(frames, "
                             f"tokens_per_frame) (got video_layout={self.video_layout!r})")
        if config.uses_boundaries and visual is None:
            raise ValueError(f"layer {layer}'s config uses modality boundaries: it needs the prompt's input_ids "
                             "(the visual tokens), which this call did not see")
        mask_for = video if permuted else visual
        frames, per_frame = layout if permuted else (None, None)
        blocks, perm = _build(config, query, key, mask_for, frames, per_frame, scaling)
        out = _block_sparse(query, key, value, blocks, perm, config.block, scaling)
        self.calls["sparse"] += 1
        return out

    def _prompt_for(self, B, T):
        p = self._prompt
        if p.visual is None or p.visual.shape != (B, T):
            return None, None, None
        layout = self.video_layout if self.video_layout is not None else p.layout
        return p.visual, p.video, layout

    def _run_search(self, layer, query, key, visual, video, layout, scaling):
        kw = dict(self._search)
        jq, jk = _jax_layout(query), _jax_layout(key)
        if visual is not None:
            use_video = layout is not None and video is not None and int(video.sum()) == video.shape[0] * \
                layout[0] * layout[1]
            mask = video if use_video else visual
            kw.update(visual_mask=_jax_bool(mask))
            if use_video:
                kw.update(frames=layout[0], tokens_per_frame=layout[1])
            else:
                kw.setdefault("order", "original")
        self.searched[layer] = ss.search(jq, jk, scale=scaling, layer=layer, **kw)

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for m in self._modules:
            if getattr(m, _ATTR, (None,))[0] is not None and getattr(m, _ATTR)[0]() is self:
                delattr(m, _ATTR)
        self._modules = []
        if self._text_config._attn_implementation == NAME:
            self._text_config._attn_implementation = self._previous
        model = self._model()
        if model is not None and getattr(model, "_mmfa_sparse_prefill", None) is self:
            del model._mmfa_sparse_prefill


def _jax_layout(t: Tensor):
    """(B, H, T, D) torch -> (B, T, H, D) jax float32 (a DLPack view where it can be), for the estimates."""
    from mmfa_torch.attention import _jax_has_gpu
    from mmfa_torch.bridge import to_jax

    t = t.detach()
    if t.is_cuda and not _jax_has_gpu():
        t = t.cpu()
    return to_jax(t.transpose(1, 2).float().contiguous())


def _jax_bool(t: Tensor):
    from mmfa_torch.bridge import to_jax

    return to_jax(t.detach().cpu().contiguous()).astype(bool)


def _build(config, query, key, visual, frames, per_frame, scaling):
    """(blocks (B, Hq, n, n) bool torch on query's device, perm (B, T) int64 or None)."""
    from mmfa_torch.bridge import to_torch

    blocks, perm = ss.build_blocks(config, _jax_layout(query), _jax_layout(key),
                                   visual_mask=None if visual is None else _jax_bool(visual), frames=frames,
                                   tokens_per_frame=per_frame, scale=scaling)
    blocks = to_torch(blocks).to(query.device)
    perm = None if perm is None else to_torch(perm).to(query.device).long()
    return blocks, perm


def _block_sparse(query, key, value, blocks, perm, block, scaling):
    """(B, T, Hq, D): causal block-sparse attention of (B, H, T, D) inputs over ``blocks`` in the
    order ``perm`` (rows x[:, :, perm[b]]; causality of the original order), back in the original order."""
    from mmfa_torch.sparse import BlockMask, block_sparse_attention

    T = query.shape[2]
    if perm is not None:
        take = lambda x: torch.gather(x, 2, perm[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))  # noqa
        query, key, value = take(query), take(key), take(value)
        mask = BlockMask.from_dense(blocks, block, seq_lens=(T, T), positions=(perm.int(), perm.int()))
    else:
        mask = BlockMask.from_dense(blocks, block, seq_lens=(T, T))
    out = block_sparse_attention(query, key, value, mask, scale=scaling, is_causal=True,
                                 implementation=backend.implementation())  # (B, Hq, T, D)
    if perm is not None:
        inverse = torch.argsort(perm, dim=1)
        out = torch.gather(out, 2, inverse[:, None, :, None].expand(-1, out.shape[1], -1, out.shape[3]))
    return out.transpose(1, 2)


def _parts(model):
    """(the multimodal model that sees input_ids, the text decoder, its layers)."""
    mm = model
    inner = getattr(model, "model", None)
    if isinstance(inner, torch.nn.Module) and isinstance(getattr(inner, "language_model", None), torch.nn.Module):
        mm = inner
    lm = getattr(mm, "language_model", None)
    layers = getattr(lm, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not hasattr(lm, "config"):
        raise ValueError(f"sparse_prefill: could not find the text decoder's layers of a {type(model).__name__} "
                         "(looked for model.model.language_model.layers and model.language_model.layers)")
    return mm, lm, layers


def _configs(config, num_layers: int) -> dict:
    if isinstance(config, ss.SparseConfig):
        return {None if config.layer is None else config.layer: config}
    if isinstance(config, dict) and all(isinstance(c, ss.SparseConfig) for c in config.values()):
        configs = dict(config)
    elif isinstance(config, (str, bytes)) or hasattr(config, "__fspath__"):
        configs = ss.load_configs(config)
    else:
        raise TypeError(f"config must be a SparseConfig, a dict {{layer: SparseConfig}} or a JSON file / text of "
                        f"sparse_search configs, got {type(config).__name__}")
    bad = [k for k in configs if k is not None and not (isinstance(k, int) and 0 <= k < num_layers)]
    if bad:
        raise ValueError(f"config names layers {bad}: the text decoder has layers 0..{num_layers - 1}")
    return configs


def _installed(model):
    old = getattr(model, "_mmfa_sparse_prefill", None)
    if old is not None:
        raise ValueError("the model already has a sparse prefill installed: call its handle's remove() first")


def sparse_prefill(model, config, min_tokens: int = 4096, *, video_layout=None) -> SparsePrefillHandle:
    """Make a loaded VLM's text decoder use the searched patterns during prefill.

    Args:
      model: a ``...ForConditionalGeneration`` (Qwen2.5-VL, LLaVA-OneVision, LLaVA-NeXT-Video, ...).
      config: a ``SparseConfig`` (its layer, or every layer when its layer is None), a dict
        {layer: SparseConfig}, or the path (or text) of a JSON file of ``sparse_search.save_configs``
        / ``SparseConfig.to_json``. Layers without a config stay dense.
      min_tokens: prefill calls with fewer rows stay dense (below some length the dense kernel is
        faster than estimating a map).
      video_layout: (frames, tokens_per_frame) of the prompts' video tokens, for configs in the
        permuted order (None: from ``video_grid_thw`` where the model takes it).

    Returns:
      ``SparsePrefillHandle`` (``calls``, ``remove()``).
    """
    _installed(model)
    _, _, layers = _parts(model)
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
        raise ValueError(f"min_tokens must be a positive int, got {min_tokens!r}")
    if video_layout is not None and not (isinstance(video_layout, (tuple, list)) and len(video_layout) == 2 and all(
            isinstance(x, int) and x > 0 for x in video_layout)):
        raise ValueError(f"video_layout must be (frames, tokens_per_frame) positive ints, got {video_layout!r}")
    configs = _configs(config, len(layers))
    handle = SparsePrefillHandle(model, configs, min_tokens, None if video_layout is None else tuple(video_layout))
    model._mmfa_sparse_prefill = handle
    return handle


def search_model(model, inputs: dict, *, min_tokens: int = 1, video_layout=None, **search_kwargs) -> dict:
    """Run the offline search on a model: one forward of ``inputs`` (the model's keyword arguments,
    a calibration prompt without padding) in which every decoder layer's prefill call hands its q
    and k (after the rotary embedding) to ``sparse_search.search`` (with the prompt's visual
    tokens, and its video layout when given or found) and answers dense. ``search_kwargs`` go to
    ``search`` (block, candidates, target_recall, implementation, order, ...).
    Returns {layer: SparseConfig}."""
    _installed(model)
    search_kwargs.setdefault("progress", False)
    search_kwargs.setdefault("model", getattr(model.config, "_name_or_path", "") or type(model).__name__)
    handle = SparsePrefillHandle(model, {}, min_tokens, None if video_layout is None else tuple(video_layout),
                                 search=search_kwargs)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    if not handle.searched:
        raise ValueError(f"search_model: no decoder layer had a whole-prompt prefill call to search (the calibration "
                         f"input must be unpadded, causal, and at least min_tokens={min_tokens} tokens long; got "
                         f"input_ids of shape {tuple(getattr(inputs.get('input_ids'), 'shape', ()))})")
    return dict(handle.searched)


__all__ = ["NAME", "SparsePrefillHandle", "attention_forward", "register", "search_model", "sparse_prefill"]
