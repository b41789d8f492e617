"""The PyTorch face: ``scaled_dot_product_attention`` on the same compiled Pallas kernels."""

from __future__ import annotations

import functools
import math

import jax
import torch

from mmfa_jax import triton_route
from mmfa_jax.attention import COMPILED, IMPLEMENTATIONS, normalise_window, pallas_available
from mmfa_torch import launch, ops

Tensor = torch.Tensor
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
):
    """Mirror of ``torch.nn.functional.scaled_dot_product_attention`` on mmfa's kernels.

    Shapes: query (B, Hq, L, D), key/value (B, Hkv, S, D); the batch axis may be left out.
    Hkv must divide Hq, and Hq != Hkv needs ``enable_gqa=True`` (as in torch). K/V are never
    repeated. Inputs may be contiguous in (B, H, L, D) or be the ``transpose(1, 2)`` view of a
    contiguous (B, L, H, D) tensor (what attention layers usually produce): both cross to the
    kernels without a copy, and the output comes back in the same memory order. Other strides
    are copied to contiguous first.

    Args:
      attn_mask: bool (True takes part) or additive float mask, broadcastable to (B, Hq, L, S).
      dropout_p: must be 0 (dropout is not supported).
      is_causal: lower-triangular mask aligned bottom-right (query i sees keys <= i + S - L);
        may be combined with ``attn_mask``.
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
      a float attn_mask; works under torch.compile.
    """
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0: mmfa attention has no dropout (got {dropout_p})")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} must have rank 4 (B, H, L, D) or 3 (H, L, D), got shape {tuple(t.shape)}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"query, key and value must have the same rank, got {query.dim()}, {key.dim()}, {value.dim()}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    unbatched = query.dim() == 3
    if unbatched:
        query, key, value = query[None], key[None], value[None]
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(
            f"query has {query.shape[1]} heads and key/value {key.shape[1]}: pass enable_gqa=True for grouped-query "
            "attention")
    implementation = _implementation(implementation, query.device)

    bias = mask = None
    if attn_mask is not None:
        _check_broadcast(attn_mask, "attn_mask", (query.shape[0], query.shape[1], query.shape[2], key.shape[2]))
        if attn_mask.dtype == torch.bool:
            mask = attn_mask.contiguous()
        elif attn_mask.dtype in SUPPORTED_DTYPES:
            bias = attn_mask.contiguous()
        else:
            raise TypeError(f"attn_mask must be bool, float16, bfloat16 or float32, got {attn_mask.dtype}")
    q_seg = kv_seg = None
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)) and len(segment_ids) != 2:
            raise ValueError("segment_ids must be one (B, L) tensor or a pair (query (B, L), key/value (B, S))")
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
        q_seg, kv_seg = _int32(q_seg, "segment_ids"), _int32(kv_seg, "segment_ids")
    left, right = (-1 if w is None else w for w in normalise_window(local_window_size))  # -1: open side
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap must be positive or None, got {logits_soft_cap}")

    # Hand the kernels the memory order the tensors already have: no copy either way.
    layout = _layout_of(query)
    q, k, v = (_in_layout(t, layout) for t in (query, key, value))
    out, lse = ops.attention(
        q, k, v, bias, mask, q_seg, kv_seg, _int32(query_seq_lengths, "query_seq_lengths"),
        _int32(key_value_seq_lengths, "key_value_seq_lengths"),
        None if scale is None else float(scale), bool(is_causal), int(left), int(right),
        None if logits_soft_cap is None else float(logits_soft_cap), layout,
        implementation)
    if layout == "BTNH":
        out = out.transpose(1, 2)
    if unbatched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


attention = scaled_dot_product_attention


def _check_broadcast(t: Tensor, name: str, shape: tuple[int, ...]):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    lead = (1,) * (len(shape) - t.dim())
    if t.dim() > len(shape) or any(d not in (1, want) for d, want in zip(lead + tuple(t.shape), shape)):
        raise ValueError(f"{name} must be broadcastable to (B, Hq, L, S) = {shape}, got shape {tuple(t.shape)}")


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
        raise TypeError(f"{name} must be an integer tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    return t.to(torch.int32).contiguous()


@functools.cache
def _jax_has_gpu() -> bool:
    return any(d.platform == "gpu" for d in jax.devices())


def _direct_launch(device: torch.device) -> bool:
    """Whether CUDA tensors on ``device`` can go to the kernels straight from torch (mmfa_torch.launch)."""
    return launch.enabled() and launch.available() and _capability(device.index) >= triton_route.MIN_CC


@functools.cache
def _capability(device_index: int | None) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def _implementation(implementation: str | None, device: torch.device) -> str:
    direct = device.type == "cuda" and _direct_launch(device)
    if device.type == "cuda" and not direct and not _jax_has_gpu():
        raise RuntimeError(
            "mmfa_torch got CUDA tensors but can neither launch the kernels itself (that needs the `triton` package "
            "and a GPU of compute capability >= 7.5) nor hand them to JAX, which has no GPU backend here: install "
            "triton (it comes with torch on Linux) or jax with its CUDA plugin (pip install 'jax[cuda13]'), or "
            "move the tensors to the CPU")
    if implementation is None:
        return "pallas" if device.type == "cuda" and (direct or pallas_available()) else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
    if implementation in COMPILED and device.type != "cuda":
        raise ValueError(f"implementation={implementation!r} needs CUDA tensors, got tensors on {device}")
    return implementation
