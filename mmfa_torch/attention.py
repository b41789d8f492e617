"""The PyTorch face: ``scaled_dot_product_attention`` on the same compiled Pallas kernels."""

from __future__ import annotations

import dataclasses
import functools

import jax
import torch

from mmfa_jax import _checks, backends
from mmfa_jax._checks import ArgumentError, ArgumentTypeError
from mmfa_torch import launch, ops

Tensor = torch.Tensor


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    local_window_size: int | tuple[int | None, int | None] | None = None,
    logits_soft_cap: float | None = None,
    segment_ids: Tensor | tuple[Tensor, Tensor] | None = None,
    query_seq_lengths: Tensor | None = None,
    key_value_seq_lengths: Tensor | None = None,
    return_lse: bool = False,
    implementation: str | None = None,
    causal_alignment: _checks.Alignment = "top_left",
):
    """Mirror of ``torch.nn.functional.scaled_dot_product_attention`` on mmfa's kernels.

    Shapes: query (B, Hq, L, D), key/value (B, Hkv, S, D); the batch axis may be left out, and
    batch axes broadcast as in SDPA (a query (Hq, L, D) against key/value (B, Hkv, S, D), say).
    Hkv must divide Hq, and Hq != Hkv needs ``enable_gqa=True`` (as in torch). K/V are never
    repeated. Inputs may be contiguous in (B, H, L, D) or be the ``transpose(1, 2)`` view of a
    contiguous (B, L, H, D) tensor (what attention layers usually produce): both cross to the
    kernels without a copy, and the output comes back in the same memory order. Other strides
    are copied to contiguous first.

    Args:
      attn_mask: bool (True takes part) or additive float mask, broadcastable to (B, Hq, L, S)
        ((S,) and (L, S) included); or torch's ``causal_upper_left(L, S)`` /
        ``causal_lower_right(L, S)`` (``torch.nn.attention.bias``): the causal mask aligned
        top-left or bottom-right.
      dropout_p: must be 0 (dropout is not supported).
      is_causal: lower-triangular mask aligned top-left, as SDPA's (query i sees keys j <= i);
        may be combined with ``attn_mask``. ``causal_alignment="bottom_right"`` (or
        ``attn_mask=causal_lower_right(L, S)``) aligns it bottom-right (query i sees keys
        j <= i + S - L: a KV-cache decode step).
      scale: default 1/sqrt(D).
      local_window_size, logits_soft_cap, segment_ids, query_seq_lengths,
      key_value_seq_lengths: as in ``mmfa_jax.attention``.
      return_lse: also return the log-sum-exp (B, Hq, L) float32 (-inf for rows that see nothing).
      implementation: "pallas" (default for CUDA tensors on GPUs of compute capability >= 7.5;
        below 8.0, Turing, compiled by the official ``triton`` package), "triton" (always compiled
        by the official ``triton`` package: mmfa_jax.triton_route), "interpret" or "xla" (default
        for CPU tensors).

    Returns:
      (B, Hq, L, D) like query (and the LSE if asked). Differentiable in query, key, value and
      a float attn_mask; works under torch.compile. Bad arguments raise ``ArgumentError`` /
      ``ArgumentTypeError`` (a ValueError / TypeError that is also the RuntimeError SDPA raises).
    """
    _checks.no_dropout(dropout_p)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (3, 4):
            raise ArgumentError(f"{name} must have rank 4 (B, H, L, D) or 3 (H, L, D), got shape {tuple(t.shape)}")
    if not (query.device == key.device == value.device):
        raise ArgumentError(f"query, key and value must be on one device, got {query.device}, {key.device}, "
                            f"{value.device}")
    unbatched = query.dim() == key.dim() == value.dim() == 3
    query, key, value = _broadcast_batch(query, key, value, enable_gqa)
    attn_mask, is_causal, causal_alignment = _causal_bias(attn_mask, is_causal, causal_alignment, query, key)
    lowering = _lowering(implementation, query.device)
    opts = _options(scale, bool(is_causal), _hashable(local_window_size), logits_soft_cap, lowering, causal_alignment)

    bias = mask = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise ArgumentTypeError(f"attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype == torch.bool:
            mask = attn_mask
        else:
            bias = attn_mask
    q_seg = kv_seg = None
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)) and len(segment_ids) != 2:
            raise ArgumentError("segment_ids must be one (B, L) tensor or a pair (query (B, L), key/value (B, S))")
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
    # The one argument layer, on the logical (B, H, L, D) shapes.
    d = _checks.check_attention(opts, query, key, value, _as_mask_shape(bias, "attn_mask"),
                                _as_mask_shape(mask, "attn_mask"),
                                None if q_seg is None else (q_seg, kv_seg), query_seq_lengths, key_value_seq_lengths,
                                bias_name="attn_mask", mask_name="attn_mask")[0]
    if d.empty:  # nothing to compute; rows that see no key give zeros
        out, lse = _Empty.apply(query, key, value)
        return _result(out, lse, unbatched, return_lse)
    bias, mask = (None if t is None else t.contiguous() for t in (bias, mask))
    q_seg, kv_seg = _int32(q_seg, "segment_ids"), _int32(kv_seg, "segment_ids")
    left, right = (-1 if w is None else w for w in opts.window)  # -1: open side

    # Hand the kernels the memory order the tensors already have: no copy either way.
    layout = _layout_of(query)
    q, k, v = (_in_layout(t, layout) for t in (query, key, value))
    out, lse = ops.attention(
        q, k, v, bias, mask, q_seg, kv_seg, _int32(query_seq_lengths, "query_seq_lengths"),
        _int32(key_value_seq_lengths, "key_value_seq_lengths"),
        opts.scale, opts.is_causal, opts.alignment, int(left), int(right), opts.softcap, layout, lowering.backend,
        -1 if lowering.cc is None else lowering.cc)
    if layout == "BTNH":
        out = out.transpose(1, 2)
    return _result(out, lse, unbatched, return_lse)


class _Empty(torch.autograd.Function):
    """The result of a call with a size 0 (no key, or nothing to compute): zeros and LSE -inf,
    with zero gradients, as SDPA gives (a plain zeros tensor would have no grad_fn)."""

    @staticmethod
    def forward(ctx, query, key, value):
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in (query, key, value)]
        B, N, T = query.shape[:3]
        return query.new_zeros(query.shape), torch.full((B, N, T), float("-inf"), device=query.device)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.shapes)


@functools.lru_cache(maxsize=256)
def _options(scale, is_causal, window, softcap, lowering, alignment) -> _checks.Options:
    """``Options.make`` for the torch face, cached: the checks run once per distinct call."""
    return _checks.Options.make(scale, is_causal, window, softcap, lowering, "BNTH", causal_alignment=alignment)


def _hashable(window):
    return tuple(window) if isinstance(window, list) else window


def _result(out, lse, unbatched: bool, return_lse: bool):
    if unbatched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


class _MaskShape:
    """A mask or bias tensor's shape and dtype, as the argument layer reads them; names the
    argument as the torch face's user knows it."""

    def __init__(self, t: Tensor):
        self.shape, self.dtype = tuple(t.shape), t.dtype


def _as_mask_shape(t, name: str):
    if t is None:
        return None
    if t.dtype not in (torch.bool, torch.float16, torch.bfloat16, torch.float32):
        raise ArgumentTypeError(f"{name} must be bool, float16, bfloat16 or float32, got {t.dtype}")
    return _MaskShape(t)


def _broadcast_batch(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool):
    """Rank-4 tensors whose batch axes broadcast as SDPA's do (leading axes right-aligned, size 1
    against any size); the heads axis broadcasts too, except between GQA groups."""
    ts = [t if t.dim() == 4 else t[None] for t in (query, key, value)]
    sizes = {t.shape[0] for t in ts}
    if len(sizes - {1}) > 1:
        raise ArgumentError(f"query, key and value batch sizes {[t.shape[0] for t in ts]} do not broadcast")
    batch = (max(sizes),) if len(sizes) > 1 else None
    heads = {t.shape[1] for t in ts}
    if query.shape[-3] != key.shape[-3] and not enable_gqa and 1 not in heads:
        raise ArgumentError(
            f"query has {query.shape[-3]} heads and key/value {key.shape[-3]}: pass enable_gqa=True for grouped-query "
            "attention")
    if batch is not None or (1 in heads and len(heads) > 1):
        b = ts[0].shape[0] if batch is None else batch[0]
        h = max(heads) if 1 in heads and len(heads) == 2 and not enable_gqa else None
        ts = [t.expand(b, h if h is not None and t.shape[1] == 1 else t.shape[1], *t.shape[2:]) for t in ts]
    return ts


def _causal_bias(attn_mask, is_causal: bool, alignment: str, query: Tensor, key: Tensor):
    """torch's ``CausalBias`` (``causal_upper_left`` / ``causal_lower_right``) as what it means: the
    causal mask, aligned top-left or bottom-right; never read as a tensor (its storage is not
    initialised)."""
    from torch.nn.attention.bias import CausalBias, CausalVariant

    if not isinstance(attn_mask, CausalBias):
        return attn_mask, is_causal, alignment
    L, S = query.shape[-2], key.shape[-2]
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (L, S):
        raise ArgumentError(f"attn_mask is a causal bias for (L, S) = {(attn_mask.seq_len_q, attn_mask.seq_len_kv)}, "
                            f"but query and key have L={L}, S={S}")
    if is_causal:
        raise ArgumentError("pass is_causal=True or a causal attn_mask (causal_upper_left / causal_lower_right), "
                            "not both")
    bottom_right = attn_mask.variant == CausalVariant.LOWER_RIGHT
    return None, True, "bottom_right" if bottom_right else "top_left"


attention = scaled_dot_product_attention


def _layout_of(query: Tensor) -> str:
    """The memory order the kernels should take: the transpose(1, 2) view of a (B, L, H, D)-contiguous
    tensor stays as it is ("BTNH"); anything else is (made) (B, H, L, D)-contiguous ("BNTH")."""
    return "BTNH" if (not query.is_contiguous() and query.transpose(1, 2).is_contiguous()) else "BNTH"


def _in_layout(t: Tensor, layout: str) -> Tensor:
    """(B, H, L, D) or, for rank 3 (B, H, L) such as an LSE, in the chosen memory order; no copy
    when it already is."""
    return t.contiguous() if layout == "BNTH" else t.transpose(1, 2).contiguous()


def _int32(t, name):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.dtype == torch.bool:
        raise ArgumentTypeError(f"{name} must be an integer tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    return t.to(torch.int32).contiguous()


@functools.cache
def _jax_has_gpu() -> bool:
    return any(d.platform == "gpu" for d in jax.devices())


def target(device: torch.device) -> backends.Target:
    """The device a torch call runs on, as the backend registry reads it: the tensors' own GPU when
    mmfa_torch launches the kernels itself, else JAX's device (the tensors cross through DLPack)."""
    if device.type == "cuda" and launch.enabled() and launch.available():
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cuda":
        if not _jax_has_gpu():
            raise RuntimeError(
                "mmfa_torch got CUDA tensors but can neither launch the kernels itself (that needs the `triton` "
                "package and a GPU of compute capability >= 7.5) nor hand them to JAX, which has no GPU backend "
                "here: install triton (it comes with torch on Linux) or jax with its CUDA plugin "
                "(pip install 'jax[cuda13]'), or move the tensors to the CPU")
        return backends.current_target()
    return backends.Target(device.type)


@functools.cache
def _cuda_target(index: int) -> backends.Target:
    # Cached: asking CUDA for a device's name and properties costs host time on every call.
    return backends.Target.cuda(launch.compute_capability(index), torch.cuda.get_device_name(index))


def _lowering(implementation: str | None, device: torch.device) -> backends.Lowering:
    if torch.compiler.is_compiling():
        return backends.Lowering(*_lowering_fields(implementation, device))
    return backends.resolve(implementation, target(device))


# Under torch.compile, a constant: the choice reads the environment, the CUDA driver and package
# metadata, which dynamo cannot trace (a fullgraph compile on CUDA tensors broke on it). It is
# made once while tracing, for the traced arguments, and kept by the graph; as plain fields, which
# dynamo can hold as constants (a Lowering itself it would hold as an opaque object).
@torch.compiler.assume_constant_result
def _lowering_fields(implementation: str | None, device: torch.device) -> tuple:
    return dataclasses.astuple(backends.resolve(implementation, target(device)))
