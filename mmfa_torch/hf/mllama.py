"""LV-XAttn in Llama 3.2 Vision (transformers' Mllama): the text model's cross-attention layers over a
``torch.distributed`` process group.

``parallelize_cross_attention(model, group=None, strategy="lv_xattn")`` replaces the ``forward`` of
every ``MllamaTextCrossAttention`` of a loaded Mllama model (an instance attribute, so
``handle.remove()`` gives the class's own back) by one that runs
``mmfa_torch.parallel.cross_attention`` over the ranks of ``group``. Every rank runs the model on the
same text inputs; inside each cross-attention layer the work is split:

- queries: rank r projects and attends only its shard of the text, rows [r·t, (r+1)·t) with
  t = ceil(T / P) (the last shard zero-padded); the layer's output rows are all-gathered, so the
  rest of the model (self-attention layers, MLPs, the gates, ``full_text_row_masked_out_mask``) runs
  on the whole text as before. The text is short (hundreds to thousands of tokens) next to the
  visual sequence, so that gather (T·C values a layer) is the small transfer.
- keys/values: rank r projects (k_proj, k_norm, v_proj) only its shard of the visual sequence,
  positions [r·s, (r+1)·s) of Mllama's flattened (image, tile, patch) order, and keeps only that
  shard (in the KV cache too). With ``visual="replicated"`` every rank is given the whole visual
  input (``pixel_values``, or the full ``cross_attention_states``) and takes its shard; with
  ``visual="sharded"`` each rank passes its own shard as ``cross_attention_states`` (B, s, C), the
  same s on every rank (the last one padded at its end), and never holds the rest.

Masks, as Mllama defines them: ``cross_attention_mask`` (B, T, images, tiles) reaches the layer as
an additive (B, 1, T, S) mask of 0 and ``finfo(dtype).min``, in which rows that see no tile were set
to 0 (such rows attend every visual token; the decoder layer then zeroes their MLP output through
``full_text_row_masked_out_mask``, which this patch leaves alone). The patched layer reads it as the
visibility ``mask == 0`` (the same softmax: exp(min) is 0 in every float type) and hands each rank's
blocks to the kernel as a ``block_mask``; any other value in it is refused. Every rank holds the
mask, as the unpatched model does.

Gradients: the result and every parameter's gradient equal the unpatched model's on every rank
(the replicated parts get the same gradients on every rank; the sharded projections' weight
gradients are summed over the ranks in the backward; the text rows' and the replicated visual
input's gradients are all-gathered). ``recompute_kv=True`` keeps no K/V shards for the backward
(``mmfa_torch.parallel.recompute_kv``): the projection runs again there from the visual features.

Not supported (refused with an error): attention dropout in training; a second visual input on a
KV cache that already holds one (the unpatched model concatenates them; a sharded cache would not
line up with the mask's columns); a mask of other values than Mllama's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref

import torch
import torch.distributed as dist
from torch.func import functional_call

from mmfa_jax import _checks
from mmfa_torch import parallel

Tensor = torch.Tensor
VISUAL = ("replicated", "sharded")

__all__ = ["VISUAL", "CrossAttentionParallel", "parallelize_cross_attention"]


@dataclasses.dataclass
class _State:
    group: object
    world: int
    rank: int
    strategy: str
    visual: str
    recompute_kv: bool
    implementation: str | None


class CrossAttentionParallel:
    """What ``parallelize_cross_attention`` returns: the patched modules and ``remove()``."""

    def __init__(self, model, state: _State, modules):
        self._model, self._state, self.modules = weakref.ref(model), state, list(modules)

    @property
    def strategy(self) -> str:
        return self._state.strategy

    @property
    def world_size(self) -> int:
        return self._state.world

    def remove(self):
        """Gives every patched ``MllamaTextCrossAttention`` its own forward back (idempotent)."""
        for module in self.modules:
            if module.__dict__.get("forward") is getattr(module, "_mmfa_parallel_forward", None):
                del module.forward
                previous = module.__dict__.pop("_mmfa_forward_before", None)
                if previous is not None:  # an instance forward someone else had set
                    module.forward = previous
            module.__dict__.pop("_mmfa_parallel_forward", None)
            module.__dict__.pop("_mmfa_visual_length", None)
        self.modules = []
        model = self._model()
        if model is not None and getattr(model, "_mmfa_cross_parallel", None) is self:
            del model._mmfa_cross_parallel


def _cross_attention_class():
    from transformers.models.mllama.modeling_mllama import MllamaTextCrossAttention

    return MllamaTextCrossAttention


def parallelize_cross_attention(model: torch.nn.Module, *, group=None, strategy: str = "lv_xattn",
                                visual: str = "replicated", recompute_kv: bool = False,
                                implementation: str | None = None) -> CrossAttentionParallel:
    """Run the cross-attention layers of a Mllama model over the ranks of a process group.

    Call it on every rank, with the same model (the same weights) and then the same text inputs.

    Args:
      model: ``MllamaForConditionalGeneration`` (or its ``.model``, ``MllamaTextModel``, any module
        holding ``MllamaTextCrossAttention`` layers).
      group: the ``torch.distributed`` process group (default: the world); initialised before.
      strategy: "lv_xattn" (text queries and their partial results travel, K/V stay) or "ring".
      visual: "replicated" (each rank gets the whole visual input and takes its shard, e.g.
        ``pixel_values``) or "sharded" (each rank passes its shard of the visual sequence as
        ``cross_attention_states``, (B, s, C) with C the text hidden size, rank r holding positions
        [r·s, (r+1)·s) of the (image, tile, patch) order, zero-padded past the end; the
        ``cross_attention_mask`` describes the whole sequence, and its length S tells the padding
        apart: without a mask all P·s tokens count as real).
      recompute_kv: keep no K/V shards for the backward; recompute them from the visual features.
      implementation: the kernels, as in ``mmfa_torch.scaled_dot_product_attention`` (None:
        mmfa's choice for the device).

    Returns:
      a ``CrossAttentionParallel`` handle: ``remove()`` undoes the patch; ``modules`` lists the
      patched layers. Calling again replaces an earlier patch of the same model.

    Shapes inside a patched layer (B batch, T text, S visual tokens, P ranks, t = ceil(T / P),
    s the visual shard, Hq/Hkv heads of size D): queries (B, Hq, t, D), keys/values (B, Hkv, s, D),
    output (B, T, C) on every rank, as the unpatched layer's.
    """
    strategy = _checks.choice(strategy, "strategy", parallel.STRATEGIES)
    visual = _checks.choice(visual, "visual", VISUAL)
    if not isinstance(recompute_kv, bool):
        raise TypeError(f"recompute_kv must be a bool, got {type(recompute_kv).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("parallelize_cross_attention needs an initialised torch.distributed process group "
                         "(torch.distributed.init_process_group) on every rank")
    cls = _cross_attention_class()
    modules = [m for m in model.modules() if isinstance(m, cls)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no MllamaTextCrossAttention layers: parallelize_cross_attention "
                         "patches Llama 3.2 Vision (Mllama) models")
    old = getattr(model, "_mmfa_cross_parallel", None)
    if old is not None:
        old.remove()
    state = _State(group, dist.get_world_size(group), dist.get_rank(group), strategy, visual, recompute_kv,
                   implementation)
    for module in modules:
        if "forward" in module.__dict__:
            module._mmfa_forward_before = module.__dict__["forward"]
        fwd = functools.partial(_forward, module, state)
        module._mmfa_parallel_forward = fwd
        module.forward = fwd
    handle = CrossAttentionParallel(model, state, modules)
    model._mmfa_cross_parallel = handle
    return handle


# ------------------------------------------------------------------------------------------------
# The patched forward.


def _forward(module, state: _State, hidden_states: Tensor, cross_attention_states: Tensor | None = None,
             past_key_values=None, attention_mask: Tensor | None = None, use_cache: bool | None = None, *,
             cache=None, past_key_value=None, cache_position=None, **kwargs):
    """``MllamaTextCrossAttention.forward`` over the ranks.

    hidden_states: (B, T, C), the whole text (the same on every rank); cross_attention_states:
    the visual features, (B·images·tiles, patches, C) or (B, S, C), or this rank's (B, s, C) shard
    with ``visual="sharded"``; None on decode steps (the cache holds this rank's K/V shard).
    attention_mask: Mllama's prepared cross-attention mask (B, 1, T, S) or None. The cache comes as
    ``cache`` (transformers 5.24), ``past_key_values`` (5.17) or ``past_key_value`` (4.x).
    Returns ((B, T, C), None), as the unpatched forward with a fused attention.
    """
    cache = next((c for c in (cache, past_key_values, past_key_value) if c is not None), None)
    if module.training and module.dropout:
        raise ValueError(f"the parallel cross-attention has no attention dropout; the text config's dropout is "
                         f"{module.dropout} and the model is in training mode (set config.text_config.dropout = 0 "
                         "or call model.eval())")
    B, T, C = hidden_states.shape
    P, layer = state.world, module.layer_idx
    Hq, Hkv, D = module.num_heads, module.num_key_value_heads, module.head_dim
    t = math.ceil(T / P)

    # This rank's text rows -> queries (B, Hq, t, D).
    rows = _Shard.apply(hidden_states, state, t)
    q = _call(module.q_proj, state, rows).view(B, t, Hq, D).transpose(1, 2)
    q = _call(module.q_norm, state, q)

    if cross_attention_states is not None:
        if cache is not None and cache.get_seq_length(layer) > 0:
            raise NotImplementedError(
                f"cross-attention layer {layer}: the KV cache already holds visual keys and a new visual input came; "
                "the parallel patch does not append to a sharded cache (start a new cache for a new image)")
        feats = cross_attention_states.reshape(B, -1, C)  # Mllama's (B·images·tiles, patches, C) is (B, S, C)
        if state.visual == "replicated":
            total = feats.shape[1]
            s = math.ceil(total / P)
            feats = _Shard.apply(feats, state, s)
        else:
            s = feats.shape[1]
            total = s * P if attention_mask is None else attention_mask.shape[-1]
            if not (s * (P - 1) < total <= s * P):
                raise ValueError(f"visual='sharded': cross_attention_states holds {s} visual tokens on each of {P} "
                                 f"ranks, but the cross_attention_mask describes {total}: the shards must tile the "
                                 f"sequence (s = ceil(S / P) = {math.ceil(total / P)}, the last one padded)")
        weights = [_param(p, state) for p in _kv_parameters(module)]
        project = functools.partial(_project_kv, module, Hkv, D)
        if state.recompute_kv and torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            k, v = parallel.recompute_kv(feats, project, *weights)
        else:
            k, v = project(feats, *weights)
        if cache is not None:
            cache.update(k, v, layer)  # this rank's shard; later steps read it back
        module._mmfa_visual_length = total
    elif cache is not None and cache.get_seq_length(layer) > 0:
        k, v = cache.layers[layer].keys, cache.layers[layer].values
        s = k.shape[2]
        total = attention_mask.shape[-1] if attention_mask is not None else module.__dict__.get(
            "_mmfa_visual_length", s * P)
    else:
        raise ValueError("Cross attention layer can't find neither `cross_attn_states` nor cached values for "
                         "key/values!")  # the unpatched layer's words

    block_mask = None
    if attention_mask is not None:
        block_mask = _block_mask(attention_mask, B, Hq, T, total, t, s, P)
    lengths = None if total == s * P else torch.full((B,), total, dtype=torch.int32, device=q.device)
    out = parallel.cross_attention(q, k, v, group=state.group, strategy=state.strategy, kv_seq_lengths=lengths,
                                   block_mask=block_mask, scale=module.scaling, implementation=state.implementation)
    out = _call(module.o_proj, state, out.transpose(1, 2).reshape(B, t, Hq * D))  # (B, t, C)
    return _Gather.apply(out, state, T), None


def _kv_parameters(module):
    """The parameters of the K/V projection, in the order ``_project_kv`` takes them."""
    return [p for sub in (module.k_proj, module.k_norm, module.v_proj) for _, p in sub.named_parameters(recurse=False)]


def _project_kv(module, Hkv: int, D: int, feats: Tensor, *weights):
    """(key, value) (B, Hkv, s, D) of visual features (B, s, C): k_norm(k_proj(x)), v_proj(x), as
    the unpatched layer computes them, with the given weights (so that their gradients can be
    summed over the ranks, or the projection recomputed)."""
    it = iter(weights)
    mine = lambda sub: {name: next(it) for name, _ in sub.named_parameters(recurse=False)}
    k_w, n_w, v_w = mine(module.k_proj), mine(module.k_norm), mine(module.v_proj)
    B, s = feats.shape[:2]
    k = functional_call(module.k_proj, k_w, (feats,)).view(B, s, Hkv, D).transpose(1, 2)
    k = functional_call(module.k_norm, n_w, (k,))
    v = functional_call(module.v_proj, v_w, (feats,)).view(B, s, Hkv, D).transpose(1, 2)
    return k, v


def _call(sub: torch.nn.Module, state: _State, x: Tensor) -> Tensor:
    """``sub(x)`` with its parameters' gradients summed over the ranks (each rank computes a shard)."""
    params = {name: _param(p, state) for name, p in sub.named_parameters(recurse=False)}
    return functional_call(sub, params, (x,))


def _param(p: Tensor, state: _State) -> Tensor:
    if state.world > 1 and torch.is_grad_enabled() and p.requires_grad:
        return _SumGrad.apply(p, state)
    return p


def _visible(mask: Tensor) -> Tensor:
    """Mllama's additive cross-attention mask as visibility (True: attends)."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"attention_mask (Mllama's cross_attention_mask) must be a float or bool tensor, got "
                        f"{mask.dtype}")
    visible = mask == 0
    if not bool((visible | (mask == torch.finfo(mask.dtype).min)).all()):
        raise ValueError("attention_mask (Mllama's prepared cross_attention_mask) must hold only 0 and "
                         f"finfo({mask.dtype}).min; the parallel cross-attention reads it as visibility and takes no "
                         "other bias")
    return visible


def _block_mask(mask: Tensor, B: int, Hq: int, T: int, total: int, t: int, s: int, P: int):
    """block_mask(query_shard, kv_shard) -> (B|1, 1|Hq, t, s) bool, from the (B|1, 1|Hq, T, S) mask,
    padded rows and columns invisible."""
    if mask.dim() != 4 or mask.shape[0] not in (1, B) or mask.shape[1] not in (1, Hq) or tuple(mask.shape[2:]) != (
            T, total):
        raise ValueError(f"attention_mask (Mllama's cross-attention mask) must have shape ({B} or 1, 1 or {Hq}, {T}, "
                         f"{total}) (batch, heads, text, visual tokens), got {tuple(mask.shape)}")
    visible = _visible(mask)
    visible = torch.nn.functional.pad(visible, (0, s * P - total, 0, t * P - T), value=False)

    def block_mask(q_shard: int, kv_shard: int) -> Tensor:
        return visible[:, :, q_shard * t:(q_shard + 1) * t, kv_shard * s:(kv_shard + 1) * s]

    return block_mask


# ------------------------------------------------------------------------------------------------
# The autograd pieces between the replicated model and the sharded layer.


class _Shard(torch.autograd.Function):
    """x (B, L, ...) -> this rank's rows [r·n, (r+1)·n) of axis 1, zero-padded past L.

    The model around is replicated, so every rank must see the gradient of the whole x: the
    backward all-gathers the ranks' row gradients."""

    @staticmethod
    def forward(ctx, x, state: _State, n: int):
        ctx.state, ctx.n, ctx.length = state, n, x.shape[1]
        start = min(state.rank * n, x.shape[1])
        part = x[:, start:start + n]
        if part.shape[1] < n:
            part = torch.nn.functional.pad(part, (0, 0) * (x.dim() - 2) + (0, n - part.shape[1]))
        return part

    @staticmethod
    def backward(ctx, g):
        g = _all_gather_rows(g.contiguous(), ctx.state)
        return g[:, :ctx.length], None, None


class _Gather(torch.autograd.Function):
    """Every rank's (B, n, ...) rows -> the (B, L, ...) whole on every rank (padding past L dropped).

    Backward: the model after it is replicated, so every rank holds the same gradient of the whole;
    this rank's rows of it are its rows' gradient (no communication)."""

    @staticmethod
    def forward(ctx, x, state: _State, length: int):
        ctx.state, ctx.n = state, x.shape[1]
        return _all_gather_rows(x.contiguous(), state)[:, :length]

    @staticmethod
    def backward(ctx, g):
        n, r = ctx.n, ctx.state.rank
        g = torch.nn.functional.pad(g, (0, 0) * (g.dim() - 2) + (0, n * ctx.state.world - g.shape[1]))
        return g[:, r * n:(r + 1) * n], None, None


class _SumGrad(torch.autograd.Function):
    """Identity on a parameter; its gradient summed over the ranks (each rank's is its shard's share)."""

    @staticmethod
    def forward(ctx, p, state: _State):
        ctx.state = state
        return p.view_as(p)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.state.group)
        return g, None


def _all_gather_rows(x: Tensor, state: _State) -> Tensor:
    if state.world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(state.world)]
    dist.all_gather(parts, x, group=state.group)
    return torch.cat(parts, dim=1)
