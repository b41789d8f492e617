"""The "mmfa" attention backend for Hugging Face transformers.

``register()`` adds "mmfa" to transformers' ``AttentionInterface`` (the attention function) and
``AttentionMaskInterface`` (the mask function that builds what the attention function receives).
After it, ``from_pretrained(..., attn_implementation="mmfa")``, ``Config(attn_implementation="mmfa")``
and ``model.set_attn_implementation("mmfa")`` (also per sub-model, e.g. ``{"text_config": "mmfa",
"vision_config": "sdpa"}``) run the model's attention on mmfa's kernels.

The mask function keeps masks compact whenever the kernel can express them: for a plain causal
(or sliding-window causal) or plain bidirectional mask whose T query rows are the last T of the
S keys (no cache, or a DynamicCache) it returns only the 2-D padding mask (B, S) of the keys, or
None without padding, and the attention function maps it to kernel arguments (``is_causal`` from
the module, ``sliding_window`` as a local window, padding as segment ids, which cover left and
right padding alike). Any other pattern (Gemma 3's bidirectional image blocks, packed sequences,
chunked attention, a static cache, whose queries sit anywhere in its fixed length, a user's 4-D
mask) arrives as a 4-D boolean (or additive float) mask and goes to the kernel as ``attn_mask``.

Decode steps (one query row) take the split-KV decode kernel whatever the mask: a padding mask or a
4-D boolean mask shared by the heads is, for one row, a mask of the keys (``key_mask``). So a
static cache's steps under ``torch.compile(mode="reduce-overhead")`` (what ``generate(...,
cache_implementation="static")`` does on CUDA) run the decode kernel in CUDA graphs: nothing on
that path synchronises with the GPU or allocates outside torch.

Scorers
-------
Another layer may ask one attention module for more than its output: ``attach_scorer(module, scorer)``
hands a ``Scorer`` the log-sum-exp of the calls it wants (visual-token pruning,
``mmfa_torch.hf.pruning``, scores the tokens at layer K during prefill this way). The backend knows
nothing of what the scorer does with it; the scorer reads the backend's kernel choice through
``implementation()``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from mmfa_jax import _checks, backends
from mmfa_torch.attention import scaled_dot_product_attention
from mmfa_torch.decode import decode_attention
from mmfa_torch.hf import windows

Tensor = torch.Tensor
NAME = "mmfa"

_settings = {"implementation": None, "decode": "mmfa"}


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------

_KEEP = object()  # register's default: leave the current choice as it is


def register(name: str = NAME, *, implementation=_KEEP, decode=_KEEP) -> str:
    """Register mmfa in transformers under ``name`` (default "mmfa"); returns the name.

    ``implementation`` picks the kernels for every call ("pallas", "triton", "interpret", "xla", or
    None: mmfa_torch's choice per device, the initial setting). ``decode="sdpa"`` hands calls with a
    single query row (decode steps) to torch's SDPA instead (for comparison; soft-capped layers stay
    on mmfa; initially "mmfa"). A choice not given is left as it is, so calling it again (as model
    builders and ``prune_visual_tokens`` do) never undoes one. Safe to call many times.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if implementation is not _KEEP:
        if implementation is not None:
            _checks.choice(implementation, "implementation", backends.IMPLEMENTATIONS)
        _settings["implementation"] = implementation
    if decode is not _KEEP:
        _settings["decode"] = _checks.choice(decode, "decode", ("mmfa", "sdpa"))
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_function)
    return name


def set_implementation(implementation: str | None):
    """Choose the kernels ("pallas", "interpret", "xla" or None for the default) for later calls."""
    register(implementation=implementation)


# --------------------------------------------------------------------------------------------------
# Mask function
# --------------------------------------------------------------------------------------------------

def key_padding(kwargs):
    """The (B, kv_length) bool key padding of a mask-function call (``kwargs`` as transformers passes
    them: attention_mask, kv_length, kv_offset), or None when every key is real (checked on the host
    in eager calls only: under torch.compile the padding is returned as it is)."""
    padding = kwargs.get("attention_mask")
    if padding is None:
        return None
    kv_length, kv_offset = int(kwargs["kv_length"]), int(kwargs.get("kv_offset", 0) or 0)
    padding = padding.to(torch.bool)
    missing = kv_offset + kv_length - padding.shape[-1]
    if missing > 0:  # as transformers' prepare_padding_mask: keys past the mask are padding
        padding = torch.nn.functional.pad(padding, (0, missing))
    padding = padding[:, kv_offset:kv_offset + kv_length]
    if torch.compiler.is_compiling():
        return padding
    return None if bool(padding.all()) else padding


def visible_keys(kwargs) -> int | None:
    """How many keys the T query rows of a mask-function call see as the last T of them: L when the
    queries are the last T of the first L keys, so that causality (and padding) say the rest;
    None when that cannot be told (the 4-D mask is then built). No cache, a DynamicCache or a
    sliding-window cache: L = kv_length (transformers 5 passes ``q_offset`` as an int). A static
    cache (q_offset a tensor; 4.57 passes ``cache_position``, a tensor, for every cache): its full
    attention layers hold the keys in position order, so L is the queries' end, read on the host in
    eager calls; under torch.compile nothing is read (None), and sliding-window layers with tensor
    positions (a static cache's is a rolling buffer; 4.57 does not say which cache it is) are None."""
    kv_length, kv_offset = int(kwargs["kv_length"]), int(kwargs.get("kv_offset", 0) or 0)
    if kwargs.get("q_length") is not None:  # transformers 5
        T, start = int(kwargs["q_length"]), kwargs.get("q_offset", 0)
    else:
        start = kwargs.get("cache_position")
        if start is None:
            return kv_length
        T = start.numel()
    if isinstance(start, torch.Tensor):
        # Positions read on the host: trusted for keys in position order only (not a sliding
        # window's cache, which a static cache keeps as a rolling buffer).
        if torch.compiler.is_compiling() or start.numel() == 0 or kv_offset or kwargs.get("local_size") is not None:
            return None
        if start.numel() == 1:  # q_offset (5.x), or one cache position (4.57)
            first = int(start.reshape(-1)[0])
        else:  # 4.57's cache positions of the T queries: consecutive ones only
            first, last = start.reshape(-1)[[0, -1]].tolist()
            if last - first + 1 != T:
                return None
        end = first + T
        return end if T <= end <= kv_length else None
    return kv_length if int(start) + T - kv_offset == kv_length else None


def mask_function(*args, **kwargs):
    """transformers mask interface for "mmfa".

    Returns None (no padding), a bool (B, L) padding mask of the first L <= S keys (plain causal,
    sliding-window causal or bidirectional masks whose queries are the last of those L keys, see
    ``visible_keys``: the attention function adds causality and the window itself, and drops the
    keys past L), or the 4-D bool mask (B, 1, T, S) that ``sdpa_mask`` would build, for every other
    pattern. Takes the arguments of ``transformers.masking_utils.sdpa_mask`` (4.57 and 5.x
    spellings).
    """
    from transformers.masking_utils import sdpa_mask

    if args:  # the interface is called with keywords; be tolerant of a positional batch_size
        kwargs = dict(zip(("batch_size",), args)) | kwargs
    causal_plain = kwargs.get("allow_is_causal_skip", True)
    bidirectional_plain = kwargs.get("allow_is_bidirectional_skip", False) and kwargs.get("local_size") is None
    config = kwargs.get("config")
    chunked = getattr(config, "attention_chunk_size", None) is not None
    # Without causality the queries' place does not matter (cross-attention, vision towers).
    visible = None
    if bidirectional_plain and not chunked:
        visible = int(kwargs["kv_length"])
    elif causal_plain and not chunked:
        visible = visible_keys(kwargs)
    if visible is not None:
        padding = key_padding(kwargs)
        if visible == int(kwargs["kv_length"]):
            return padding
        # Only the first ``visible`` keys are there (a static cache's written part): a shorter mask.
        if padding is None:
            return torch.ones(int(kwargs["batch_size"]), visible, dtype=torch.bool, device=kwargs.get("device"))
        return padding[:, :visible]
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
      attention_mask: None, bool (B, L) key padding of the first L <= S keys (from ``mask_function``;
        the keys past L are not there yet), or a 4-D bool or additive float mask broadcastable to
        (B, Hq, T, S), which then holds the whole pattern.
      dropout: dropout on the weights; mmfa has none, so training with dropout > 0 falls back to
        transformers' sdpa.
      scaling: softmax scale (default 1/sqrt(D)); sliding_window: keys within ``sliding_window``
        positions back, the current one included (transformers' convention); softcap: logit soft cap.

    Returns:
      ((B, T, Hq, D), None): mmfa does not form the attention weights.
    """
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)

    def kernel_args():
        return dict(scale=scaling, enable_gqa=query.shape[1] != key.shape[1], logits_soft_cap=softcap,
                    implementation=_settings["implementation"])

    bounds = windows.take(module)
    if bounds is not None:  # a vision tower's one call for all its windows (mmfa_torch.hf.windows)
        if causal or attention_mask is not None or sliding_window or (dropout and module.training):
            raise RuntimeError("mmfa vision windows: the call over every window came with a causal flag, a mask, "
                               "a window or dropout, which the window bounds do not combine with")
        return windows.attend(bounds, query, key, value, kernel_args()), None
    if dropout and module.training:
        return _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap,
                              causal, **kwargs)
    T, S = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.dim() == 2 and T > 1 and attention_mask.shape[-1] < S:
        # The queries see only the first L keys (a static cache's written part): the rest is not there.
        key, value = key[:, :, :attention_mask.shape[-1]], value[:, :, :attention_mask.shape[-1]]
        S = key.shape[2]
    if T == 1 and _settings["decode"] == "sdpa" and softcap is None:
        return _torch_decode(query, key, value, attention_mask, scaling, sliding_window), None
    scorer = getattr(module, _SCORER, None)
    scoring = scorer is not None and scorer.wants_scores(T, S)
    if scoring and S > T:  # a prompt in a static cache's first T slots (see Scorer)
        key, value, S = key[:, :, :T], value[:, :, :T], T
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = attention_mask[..., :T]
    if T == 1 and not scoring:
        key_mask = _key_mask(attention_mask, query.shape[0], S)
        if key_mask is not False:
            return _decode(query, key, value, key_mask, attention_mask is not None and attention_mask.dim() == 4,
                           scaling, sliding_window, softcap), None

    if not causal and attention_mask is None and not sliding_window and T == S:  # maybe one window of many
        windows.watch(module)
    call = kernel_args()
    segments = None
    if attention_mask is not None and attention_mask.dim() == 4:  # the whole pattern: no causal flag or window
        call["attn_mask"] = attention_mask
        causal, window = False, None
    else:
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[-1] != S:
                raise ValueError(f"attention_mask must be None, a (B, L<=S={S}) padding mask or a 4-D mask, got shape "
                                 f"{tuple(attention_mask.shape)}")
            valid = attention_mask.to(torch.bool)
            segments = (valid[:, S - T:].to(torch.int32), valid.to(torch.int32))  # queries are the last T keys
            call["segment_ids"] = segments
        window = None
        if sliding_window is not None and sliding_window > 0:
            window = (int(sliding_window) - 1, 0 if causal else int(sliding_window) - 1)
        call["local_window_size"] = window
        call["is_causal"] = causal
        # The queries are the last T keys (a prefill chunk or a step over a KV cache): the causal
        # diagonal and the window sit bottom-right, asked for by name (is_causal alone is top-left).
        call["causal_alignment"] = "bottom_right"
    # The kernels take the memory order of the query; a KV cache is (B, Hkv, S, D)-contiguous, so hand
    # them a contiguous query too rather than have K and V copied into the query's order.
    if key.is_contiguous() and value.is_contiguous() and not query.is_contiguous():
        query = query.contiguous()
    if scoring:
        out, lse = scaled_dot_product_attention(query, key, value, return_lse=True, **call)
        dense = attention_mask is not None and attention_mask.dim() == 4
        scorer.score(query, key, lse, scale=scaling, is_causal=causal, window=window, softcap=softcap,
                     dense_mask=dense, module_causal=bool(getattr(module, "is_causal", True)),
                     sliding_window=sliding_window)
    else:
        out = scaled_dot_product_attention(query, key, value, **call)
    return out.transpose(1, 2), None


def _key_mask(attention_mask, B: int, S: int):
    """For one query row: the attention function's mask as a (B, S) bool key mask (None: no mask),
    or False when it is not one (an additive float mask, or a 4-D mask that differs per head)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:  # (shorter than S: the keys past it are not there yet)
        return torch.nn.functional.pad(attention_mask.to(torch.bool), (0, S - attention_mask.shape[-1]))
    if (attention_mask.dim() == 4 and attention_mask.dtype == torch.bool and attention_mask.shape[1] == 1
            and attention_mask.shape[-1] >= S):  # (longer: keys past the cache's, as sdpa_attention_forward cuts)
        return attention_mask[:, 0, -1, :S].expand(B, S)
    return False


def _decode(query, key, value, key_mask, mask_is_whole, scaling, sliding_window, softcap):
    """One query row (the last position) over a KV cache, by the split-KV decode kernel: (B, 1, Hq, D).

    ``key_mask`` (B, S) bool or None: the keys the row may see. A padding mask (``mask_is_whole``
    False) says nothing of the window, so a sliding window keeps only the cache's last keys (a
    4-D mask holds the window already). One compiled kernel pair serves a bucket of cache lengths."""
    S = key.shape[2]
    if not mask_is_whole and sliding_window and S > sliding_window:
        key, value = key[:, :, S - sliding_window:], value[:, :, S - sliding_window:]
        key_mask = None if key_mask is None else key_mask[:, S - sliding_window:]
    return decode_attention(query, key, value, key_mask=key_mask, scale=scaling, logits_soft_cap=softcap,
                            implementation=_settings["implementation"]).transpose(1, 2)


def _torch_decode(query, key, value, attention_mask, scaling, sliding_window):
    """One query row (the last position) over S keys with torch's SDPA: (B, 1, Hq, D)."""
    S = key.shape[2]
    mask = None
    if attention_mask is not None:
        mask = (torch.nn.functional.pad(attention_mask.to(torch.bool), (0, S - attention_mask.shape[-1]))[:, None, None]
                if attention_mask.dim() == 2 else attention_mask)
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
# Scorers: what another layer (visual-token pruning) may ask of one attention module
# --------------------------------------------------------------------------------------------------

class Scorer(Protocol):
    """What ``attach_scorer`` takes: an object that wants the log-sum-exp of some calls of one module.

    ``wants_scores(T, S)`` is asked on the module's calls (T query rows, S keys) that reach mmfa's own
    path (not training with dropout, decode steps handed to torch's SDPA by ``register(decode="sdpa")``,
    or vision-window calls answered by one batched call); a wanted call never takes the decode path.
    A scorer that wants a call with S > T says the T queries are a prompt in the first T slots of a
    static cache: the call then attends to those T keys only (the slots past them are unwritten).
    The call computes the LSE with its output and hands it to ``score``, with how it ran: ``scale``
    (None: 1/sqrt(D)), ``is_causal`` and ``window`` (the kernel's ``local_window_size``), ``softcap``;
    ``dense_mask`` (True: a 4-D mask held the whole pattern, so ``is_causal`` is False and ``window``
    None), ``module_causal`` (the module's own ``is_causal``) and ``sliding_window`` (transformers'
    argument), from which a scorer can rebuild the band a dense mask stood for. ``score`` returns
    nothing; the call's output is unchanged.
    """

    def wants_scores(self, T: int, S: int) -> bool: ...

    def score(self, query: Tensor, key: Tensor, lse: Tensor, *, scale: float | None, is_causal: bool,
              window: tuple[int, int] | None, softcap: float | None, dense_mask: bool, module_causal: bool,
              sliding_window: int | None) -> None: ...


_SCORER = "_mmfa_scorer"  # the attribute of the attention module that holds its scorer


def attach_scorer(module: torch.nn.Module, scorer: Scorer):
    """Give ``module``'s attention calls to ``scorer`` (replacing any scorer it had)."""
    setattr(module, _SCORER, scorer)


def detach_scorer(module: torch.nn.Module, scorer: Scorer):
    """Take ``scorer`` off ``module`` (nothing happens when the module holds another one, or none)."""
    if getattr(module, _SCORER, None) is scorer:
        delattr(module, _SCORER)


def implementation() -> str | None:
    """The kernels chosen by ``register`` / ``set_implementation`` (None: mmfa_torch's choice per device)."""
    return _settings["implementation"]


__all__ = ["NAME", "Scorer", "attach_scorer", "attention_forward", "detach_scorer", "implementation",
           "mask_function", "register", "set_implementation", "visible_keys"]
