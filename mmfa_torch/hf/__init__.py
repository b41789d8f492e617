"""Hugging Face transformers integration: the "mmfa" attention backend and visual-token pruning.

- ``backend``: ``register()`` adds "mmfa" to transformers' ``AttentionInterface`` and
  ``AttentionMaskInterface`` (``attention_forward``, ``mask_function``; decode steps; the sdpa
  fallback for training with dropout), and the small scorer interface that pruning uses.
- ``pruning``: ``prune_visual_tokens(model, keep, layer=K, rule="text")``, hooks that drop the least
  important visual tokens of a VLM after decoder layer K on prefill (``PruningHandle``).
- ``windows``: the per-window attention calls of vision towers (Qwen2-VL, Qwen2.5-VL) answered by one
  batched kernel call.
- ``mllama``: ``parallelize_cross_attention(model, group=None, strategy="lv_xattn")``, Llama 3.2 Vision's
  cross-attention layers over a torch.distributed process group (LV-XAttn or ring; ``remove()`` undoes it).

The random VLMs for tests and benchmarks are in ``mmfa_torch.testing.vlms``.
"""

from __future__ import annotations

from mmfa_torch.hf import backend, mllama, pruning, windows
from mmfa_torch.hf.backend import NAME, attention_forward, mask_function, register, set_implementation
from mmfa_torch.hf.mllama import CrossAttentionParallel, parallelize_cross_attention
from mmfa_torch.hf.pruning import RULES, SUPPORTED_FAMILIES, PruningHandle, prune_visual_tokens

__all__ = ["NAME", "RULES", "SUPPORTED_FAMILIES", "CrossAttentionParallel", "PruningHandle",
           "attention_forward", "backend", "mask_function", "mllama", "parallelize_cross_attention",
           "prune_visual_tokens", "pruning", "register", "set_implementation", "windows"]

# MMInference-style sparse prefill (issue 17 part 4). ``mmfa_torch.hf.sparse_prefill`` is the
# function here (as the issue names it); the module is ``sys.modules["mmfa_torch.hf.sparse_prefill"]``,
# reached with ``from mmfa_torch.hf.sparse_prefill import ...`` (``import ... as`` would give the function).
from mmfa_torch.hf.sparse_prefill import SparsePrefillHandle, search_model, sparse_prefill  # noqa: E402

__all__ += ["SparsePrefillHandle", "search_model", "sparse_prefill"]

# Doge (transformers models/doge) on dynamic mask attention (issue 18): ``use_mmfa(model)`` patches
# its DogeAttention layers (``handle.remove()`` undoes it); ``doge.NAME`` is the attention
# implementation the patched model runs under ("mmfa_doge").
from mmfa_torch.hf import doge  # noqa: E402
from mmfa_torch.hf.doge import DogeAttentionPatch, use_mmfa  # noqa: E402

__all__ += ["DogeAttentionPatch", "doge", "use_mmfa"]
