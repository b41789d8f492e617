"""Doge (transformers ``models/doge``) on mmfa's dynamic mask attention, without the dense mask.

``use_mmfa(model)`` replaces the ``forward`` of every ``DogeAttention`` of a Doge model (an instance
attribute, so ``handle.remove()`` gives the class's own back) by one that computes what Doge computes
(q/k/v projections, q/k RMS norms, rotary embeddings, the KV cache update, and the zero-order hold
``dt_states = exp(A * softplus(dt_proj(V_flat)))`` of every key, (B, Hkv, S)) and then calls
``mmfa_torch.dynamic_mask_attention`` with it, where Doge builds a (B, H, T, S) float mask in
``prepare_dynamic_mask`` and hands it to the attention function. The model's attention
implementation is switched to "mmfa_doge" while the patch is on (restored by ``remove()``): its mask
function keeps the model from building the (B, 1, T, S) causal mask too, and passes on only the
2-D (B, S) key padding (or None).

What Doge's mask means, and what the patched forward passes instead (read from
``DogeAttention.prepare_dynamic_mask``, transformers 4.57 to 5.24; the same code in each):

- Doge fills dt_states with ``finfo.min`` where the causal/padding mask disallows a key, then, only
  when S > keep_window_size, keeps per query row the ``keep_window_size`` largest entries of that
  row (``torch.topk``) and sets the rest to ``finfo.min``; the result is added to
  ``scaling * q.k``. Disallowed keys hold ``finfo.min`` and a zoh is ``exp(...)`` >= 0, so the
  top-k never prefers a disallowed key to an allowed one, and when a row allows fewer than
  ``keep_window_size`` keys every allowed key is kept. That is exactly mmfa's rule (keep, among
  the allowed keys, the ``keep_window_size`` with the largest zoh; all of them when there are
  fewer; NaN largest, as ``torch.topk``): the condition S > keep_window_size needs no separate
  test.
- Causality: Doge's queries are the last T of the S keys (a prefill: T == S; a decode step or a
  chunk over a DynamicCache: T < S), so the call is causal with ``causal_alignment="bottom_right"``.
- Padding: a 2-D ``attention_mask`` becomes ``key_value_seq_lengths`` when every row is a prefix of
  ones (right padding), else segment ids (1: a real token, 0: padding; left padding and any other
  holes), which give every real query row exactly Doge's allowed set (causal and a real key).
  Query rows at padded positions differ from Doge's (Doge gives such a row, which allows no key,
  the mean of all values; mmfa gives zeros or attends to other padding): they are padding, and no
  real row reads them (a padded key is never allowed).
- Ties: mmfa keeps the lower key index among equal zoh; Doge keeps whatever ``torch.topk`` returns,
  which no order is documented for. The kept sets can differ only when equal zoh straddle a row's
  cut. Note that a freshly initialised Doge has A = 0, so every zoh is 1 and every row is one tie:
  the two then keep different keys (a trained model's A is not 0). Equal zoh also come from equal
  value rows: the first layer's values depend on the token alone, so a token repeated in the
  window ties with itself; and bfloat16 zoh have 8 bits of mantissa.

Compare against Doge's "eager" path: on "sdpa" (Doge's default) transformers 4.57 and 5.17 skip the
causal mask when nothing is padded (``create_causal_mask`` returns None), ``prepare_dynamic_mask``
then masks no future key and SDPA gets a float mask, not ``is_causal``: every token sees the whole
sequence. 5.24 builds the mask always (``allow_is_causal_skip=False``). The patch is causal in each.

Refused with an error (the kernels take a causal mask, key lengths and segment ids, no dense mask
and no dropout): ``config.sliding_window``; masks other than causal plus padding (packed
sequences found from position ids, a prepared 4-D mask); caches whose layer does not return
exactly the past keys plus the new ones (a static or sliding-window cache); attention dropout in
training. The attention weights are not formed (the second output is None).

Kernels: ``implementation`` as ``mmfa_torch.dynamic_mask_attention`` ("pallas" on CUDA tensors by
default, "xla" on CPU; "xla" is plain jax with the dense logits: memory quadratic, for CPU tests).
Gradients flow to every parameter, dt_proj and A included (through zoh).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import weakref

import torch

from mmfa_jax import _checks, backends
from mmfa_torch.dynamic_mask import dynamic_mask_attention, zoh_states
from mmfa_torch.hf.backend import key_padding, visible_keys

Tensor = torch.Tensor
NAME = "mmfa_doge"  # the attention implementation a patched model runs under

__all__ = ["NAME", "DogeAttentionPatch", "mask_function", "use_mmfa"]


@dataclasses.dataclass
class _State:
    implementation: str | None
    memo: tuple | None = None  # (mask tensor, T, kernel arguments): one classification per forward


class DogeAttentionPatch:
    """What ``use_mmfa`` returns: the patched ``DogeAttention`` modules and ``remove()``."""

    def __init__(self, model, state: _State, modules, previous: str | None):
        self._model, self._state, self.modules, self._previous = weakref.ref(model), state, list(modules), previous

    @property
    def implementation(self) -> str | None:
        return self._state.implementation

    def remove(self):
        """Gives every patched ``DogeAttention`` its own forward back and the model its previous
        attention implementation (idempotent)."""
        for module in self.modules:
            ours = module.__dict__.get("_mmfa_doge_forward")
            if ours is not None and module.__dict__.get("forward") is ours:
                del module.forward
                previous = module.__dict__.pop("_mmfa_forward_before", None)
                if previous is not None:  # an instance forward someone else had set
                    module.forward = previous
            module.__dict__.pop("_mmfa_doge_forward", None)
        self.modules = []
        self._state.memo = None
        model = self._model()
        if model is None:
            return
        if getattr(model.config, "_attn_implementation", None) == NAME and self._previous is not None:
            model.set_attn_implementation(self._previous)
        if getattr(model, "_mmfa_doge", None) is self:
            del model._mmfa_doge


def _doge_module():
    try:
        from transformers.models.doge import modeling_doge
    except ImportError as e:  # transformers before Doge (4.53)
        import transformers

        raise ImportError(f"mmfa_torch.hf.doge needs transformers with models/doge (transformers "
                          f"{transformers.__version__} has none)") from e
    return modeling_doge


def register(name: str = NAME) -> str:
    """Register ``name`` with transformers: ``mask_function`` in ``AttentionMaskInterface`` and, in
    ``AttentionInterface``, a function that refuses calls (only patched ``DogeAttention`` layers run
    under this name, and they do not call an attention function). Safe to call many times."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, _not_patched)
    AttentionMaskInterface.register(name, mask_function)
    return name


def use_mmfa(model: torch.nn.Module, *, implementation: str | None = None) -> DogeAttentionPatch:
    """Run the attention of a Doge model on ``mmfa_torch.dynamic_mask_attention``.

    Args:
      model: a transformers Doge model (``DogeForCausalLM``, ``DogeModel``,
        ``DogeForSequenceClassification``): a ``PreTrainedModel`` holding ``DogeAttention`` layers.
      implementation: the kernels ("pallas", "triton", "interpret", "xla"; None: mmfa's choice for
        the tensors' device).

    Returns:
      a ``DogeAttentionPatch``: ``remove()`` undoes the patch (the layers' forwards and the model's
      attention implementation); ``modules`` lists the patched layers. Calling again replaces an
      earlier patch of the same model.

    Shapes inside a patched layer (B batch, T new tokens, S keys = cached + T, Hq/Hkv heads of size
    D): hidden_states (B, T, C) -> query (B, Hq, T, D), key/value (B, Hkv, S, D) after the cache
    update, zoh (B, Hkv, S); the layer returns ((B, T, C), None), as Doge's with attention weights
    not formed. The mask the layers receive is None or the (B, S) bool key padding.
    """
    if implementation is not None:
        _checks.choice(implementation, "implementation", backends.IMPLEMENTATIONS)
    cls = _doge_module().DogeAttention
    modules = [m for m in model.modules() if isinstance(m, cls)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no DogeAttention layers: use_mmfa patches transformers' Doge "
                         "models (DogeForCausalLM, DogeModel, ...)")
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"use_mmfa needs the Doge PreTrainedModel itself (it sets its attention implementation), got "
                         f"{type(model).__name__}")
    config = model.config
    if getattr(config, "sliding_window", None) is not None:
        raise NotImplementedError(f"Doge with sliding_window={config.sliding_window}: the dynamic mask kernels take "
                                  "no local window; set config.sliding_window = None or keep Doge's own attention")
    old = getattr(model, "_mmfa_doge", None)
    if old is not None:
        old.remove()
    previous = getattr(config, "_attn_implementation", None)
    register()
    model.set_attn_implementation(NAME)
    state = _State(implementation)
    for module in modules:
        if "forward" in module.__dict__:
            module._mmfa_forward_before = module.__dict__["forward"]
        fwd = functools.partial(_forward, module, state)
        module._mmfa_doge_forward = fwd
        module.forward = fwd
    handle = DogeAttentionPatch(model, state, modules, previous)
    model._mmfa_doge = handle
    return handle


# ------------------------------------------------------------------------------------------------
# The mask function: what the layers receive as attention_mask.


def mask_function(*args, **kwargs):
    """transformers mask interface for "mmfa_doge": None (no padding) or the bool (B, S) key padding.

    Takes the arguments of ``transformers.masking_utils.sdpa_mask`` (4.57's ``cache_position`` and
    5.x's ``q_length``/``q_offset`` alike). Doge asks for a causal mask (5.24 with
    ``allow_is_causal_skip=False``, as its own mask is added onto it; the patched layers apply the
    causal mask themselves, so it is not built); any other pattern (``mask_function`` other than
    plain causality: packed sequences, a sliding window, overlays) is refused.
    """
    from transformers.masking_utils import causal_mask_function

    if kwargs.get("mask_function") is not causal_mask_function:
        raise NotImplementedError(
            "mmfa Doge attention: transformers asked for a mask other than causal plus padding (packed sequences "
            "found from the position ids, a sliding window, or an or/and overlay); the dynamic mask kernels take a "
            "causal mask with key padding only. Pass an attention_mask (or no position ids) for unpacked batches")
    # A static cache (5.x says so by a tensor q_offset; under torch.compile on 4.57 the positions
    # cannot be read, and a DynamicCache is assumed there) puts the queries anywhere in its keys.
    visible = visible_keys(kwargs)
    if isinstance(kwargs.get("q_offset"), torch.Tensor) or visible not in (None, int(kwargs["kv_length"])):
        raise NotImplementedError(
            "mmfa Doge attention: the queries are not the last keys of the cache (a static cache, whose keys are "
            "its whole fixed length); the patched layers take a DynamicCache")
    return key_padding(kwargs)


def _not_patched(module, *args, **kwargs):
    raise RuntimeError(f"attn_implementation '{NAME}' serves only the DogeAttention layers patched by "
                       f"mmfa_torch.hf.doge.use_mmfa; {type(module).__name__} reached it unpatched (call "
                       "use_mmfa(model) again, or model.set_attn_implementation('eager'))")


def _padding_arguments(state: _State, mask: Tensor | None, B: int, T: int, S: int) -> dict:
    """The kernel arguments for a (B, S) key padding mask: key lengths for right padding, else
    segment ids ((B, T) for the queries, the last T keys, and (B, S)). Classified once per forward
    (every layer gets the same mask tensor)."""
    if mask is None:
        return {}
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != (B, S):
        shape = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
        raise NotImplementedError(f"mmfa Doge attention: the attention mask must be None or the (B, S) = {(B, S)} key "
                                  f"padding that mask_function returns, got {shape} (a prepared 4-D mask can not go "
                                  "to the dynamic mask kernels: pass the 2-D attention_mask)")
    memo = state.memo
    if memo is not None and memo[0] is mask and memo[1] == T:
        return memo[2]
    valid = mask.to(torch.bool)
    lengths = valid.sum(-1, dtype=torch.int32)
    prefix = torch.arange(S, device=mask.device)[None, :] < lengths[:, None]
    if bool((prefix == valid).all()):  # right padding: real keys are [0, length)
        call = {"key_value_seq_lengths": lengths}
    else:
        seg = valid.to(torch.int32)
        call = {"segment_ids": (seg[:, S - T:].contiguous(), seg)}
    state.memo = (mask, T, call)
    return call


# ------------------------------------------------------------------------------------------------
# The patched forward.


def _forward(module, state: _State, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None,
             attention_mask: Tensor | None = None, past_key_values=None, *, cache=None, past_key_value=None,
             cache_position: Tensor | None = None, **kwargs):
    """``DogeAttention.forward`` on ``mmfa_torch.dynamic_mask_attention``.

    hidden_states: (B, T, C); position_embeddings: (cos, sin), (B, T, D) each; attention_mask: None
    or the (B, S) bool key padding (``mask_function``); the cache comes as ``cache`` (transformers
    5.24), ``past_key_values`` (5.17, 4.57) or ``past_key_value`` (older 4.x). Returns
    ((B, T, C), None).
    """
    kv_cache = next((c for c in (cache, past_key_values, past_key_value) if c is not None), None)
    if module.training and module.attention_dropout:
        raise NotImplementedError(f"mmfa Doge attention has no attention dropout; config.attention_dropout is "
                                  f"{module.attention_dropout} and the model is in training mode (set it to 0, or call "
                                  "model.eval())")
    if position_embeddings is None:
        raise ValueError("DogeAttention needs position_embeddings (cos, sin)")
    B, T = hidden_states.shape[:2]
    D = module.head_dim
    hidden_shape = (B, T, -1, D)
    # As DogeAttention.forward: projections, RMS norms of q and k, rotary embeddings.
    query = module.q_norm(module.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
    key = module.k_norm(module.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
    value = module.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = sys.modules[type(module).__module__].apply_rotary_pos_emb(query, key, cos, sin)
    past = 0
    if kv_cache is not None:
        past = int(kv_cache.get_seq_length(module.layer_idx))
        # 4.57 passes these cache_kwargs (the static cache reads cache_position); 5.x layers take and
        # ignore extra arguments.
        key, value = kv_cache.update(key, value, module.layer_idx,
                                     {"sin": sin, "cos": cos, "cache_position": cache_position})
    if query.dtype != value.dtype or key.dtype != value.dtype:
        # Under autocast the Linear layers give its dtype while the RMS norms (float32 weights) and the
        # rotary tables lift q and k to float32; Doge's matmuls then run in autocast's dtype, which is
        # the values' (v_proj's output): the kernels take one dtype, that one.
        query, key = query.to(value.dtype), key.to(value.dtype)
    S = key.shape[2]
    if S != past + T:
        raise NotImplementedError(f"mmfa Doge attention: the cache of layer {module.layer_idx} returned {S} keys for "
                                  f"{past} cached and {T} new tokens (a static or sliding-window cache); the dynamic "
                                  "mask kernels need the queries to be the last T keys: use a DynamicCache")
    # The zero-order hold, as Doge: exp(A * softplus(dt_proj(V_flat))), (B, Hkv, S), in the values'
    # dtype (the top-k then compares the same numbers Doge's does). zoh_states is that formula with
    # dt_proj's weight and bias; a dt_proj that is not a plain Linear (an adapter, a quantised layer,
    # a module with hooks) is called as a module, as Doge calls it.
    dt_proj = module.dt_proj
    if type(dt_proj) is torch.nn.Linear and not (dt_proj._forward_hooks or dt_proj._forward_pre_hooks):
        zoh = zoh_states(value, dt_proj.weight, module.A, dt_proj.bias)
    else:
        dt = dt_proj(value.transpose(1, 2).reshape(B, S, -1))
        zoh = torch.exp(module.A * torch.nn.functional.softplus(dt)).transpose(-1, -2)
    call = _padding_arguments(state, attention_mask, B, T, S)
    out = dynamic_mask_attention(query, key, value, zoh, keep_window_size=int(module.keep_window_size),
                                 is_causal=True, causal_alignment="bottom_right", scale=module.scaling,
                                 implementation=state.implementation, **call)
    out = out.transpose(1, 2).reshape(B, T, -1).contiguous()
    return module.o_proj(out), None
