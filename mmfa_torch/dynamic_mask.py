"""Dynamic mask attention (Flash-DMA), PyTorch face: ``dynamic_mask_attention`` and ``zoh_states``
in SDPA's layout, on the JAX face's checks, backend choice and kernels.

The tensors cross to JAX through DLPack (no copy for contiguous tensors; ``mmfa_torch.bridge``)
and the results come back the same way; gradients run the JAX face's backward (its kernels, or
XLA's autodiff) under a ``torch.autograd.Function``. Unlike ``scaled_dot_product_attention``, CUDA
tensors do not take mmfa_torch's own launch (``mmfa_torch.launch``) yet: they go through JAX's
launch of the same kernels.
"""

from __future__ import annotations

import torch

from mmfa_jax import _checks
from mmfa_jax import dynamic_mask as jax_dma
from mmfa_jax._checks import ArgumentError, ArgumentTypeError
from mmfa_torch.attention import _int32, _lowering
from mmfa_torch.bridge import to_jax, to_torch

Tensor = torch.Tensor


def dynamic_mask_attention(query: Tensor, key: Tensor, value: Tensor, zoh: Tensor, *, keep_window_size: int,
                           is_causal: bool = True, scale: float | None = None,
                           segment_ids: Tensor | tuple[Tensor, Tensor] | None = None,
                           query_seq_lengths: Tensor | None = None, key_value_seq_lengths: Tensor | None = None,
                           causal_alignment: _checks.Alignment = "top_left", implementation: str | None = None,
                           return_lse: bool = False):
    """``mmfa_jax.dynamic_mask_attention`` in SDPA's layout.

    Shapes: query (B, Hq, T, D), key and value (B, Hkv, S, D), Hkv dividing Hq (GQA; K/V never
    repeated), zoh (B, Hkv, S) (Doge's ``dt_states``). Each query row keeps, among the keys the
    causal mask (top-left, or ``causal_alignment="bottom_right"``), the key lengths and the
    segments allow, the ``keep_window_size`` with the largest zoh (ties to the lower key index, NaN
    largest) and attends to them with zoh added to the logits. Rows that keep nothing give zeros.

    Args: as ``mmfa_jax.dynamic_mask_attention``; segment_ids (B, T) (T == S) or a pair of
      (B, T) and (B, S) integer tensors; lengths (B,) integer tensors. implementation: "pallas"
      (CUDA tensors' default), "interpret", "xla" (CPU tensors' default).

    Returns:
      (B, Hq, T, D) like query (and the LSE (B, Hq, T) float32 if asked), differentiable in
      query, key, value and zoh.
    """
    for name, t in (("query", query), ("key", key), ("value", value), ("zoh", zoh)):
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if len({t.device for t in (query, key, value, zoh)}) != 1:
        raise ArgumentError(f"query, key, value and zoh must be on one device, got {query.device}, {key.device}, "
                            f"{value.device}, {zoh.device}")
    lowering = _lowering(implementation, query.device)
    opts = _checks.Options.make(scale, is_causal, None, None, lowering, "BNTH", causal_alignment=causal_alignment)
    q_seg = kv_seg = None
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)) and len(segment_ids) != 2:
            raise ArgumentError("segment_ids must be one (B, T) tensor or a pair (query (B, T), key/value (B, S))")
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
    static, d, _ = jax_dma.prepare(opts, keep_window_size, query, key, value, zoh,
                                   None if q_seg is None else (q_seg, kv_seg), query_seq_lengths,
                                   key_value_seq_lengths)
    if d.empty:
        out, lse = _Empty.apply(query, key, value, zoh)
        return (out, lse) if return_lse else out
    ints = (_int32(q_seg, "segment_ids"), _int32(kv_seg, "segment_ids"),
            _int32(query_seq_lengths, "query_seq_lengths"), _int32(key_value_seq_lengths, "key_value_seq_lengths"))
    out, lse = _DynamicMask.apply(static, query.contiguous(), key.contiguous(), value.contiguous(), zoh.contiguous(),
                                  *ints)
    return (out, lse) if return_lse else out


class _Empty(torch.autograd.Function):
    """A call with a size 0: zeros and LSE -inf, with zero gradients."""

    @staticmethod
    def forward(ctx, query, key, value, zoh):
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in (query, key, value, zoh)]
        B, N, T = query.shape[:3]
        return query.new_zeros(query.shape), torch.full((B, N, T), float("-inf"), device=query.device)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.shapes)


class _DynamicMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, static, q, k, v, zoh, q_seg, kv_seg, q_lengths, kv_lengths):
        ints = tuple(to_jax(t) for t in (q_seg, kv_seg, q_lengths, kv_lengths))
        out, lse = jax_dma.forward(static, to_jax(q), to_jax(k), to_jax(v), to_jax(zoh), *ints)
        out, lse = to_torch(out), to_torch(lse)
        ctx.static = static
        ctx.save_for_backward(q, k, v, zoh, out, lse)
        ctx.ints = (q_seg, kv_seg, q_lengths, kv_lengths)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        if torch.is_grad_enabled():
            raise RuntimeError("mmfa dynamic mask attention does not support double backward (create_graph=True)")
        q, k, v, zoh, out, lse = ctx.saved_tensors
        d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
        d_lse = torch.zeros_like(lse) if d_lse is None else d_lse.contiguous()
        ints = tuple(to_jax(t) for t in ctx.ints)
        grads = jax_dma.backward(ctx.static, to_jax(q), to_jax(k), to_jax(v), to_jax(zoh), *ints, to_jax(out),
                                 to_jax(lse), to_jax(d_out), to_jax(d_lse))
        dq, dk, dv, d_zoh = (to_torch(g) for g in grads)
        return None, dq, dk, dv, d_zoh, None, None, None, None


def zoh_states(value: Tensor, dt_proj: Tensor, A: Tensor, dt_bias: Tensor | None = None) -> Tensor:
    """Doge's zero-order hold in SDPA's layout: value (B, Hkv, S, D), dt_proj (Hkv, Hkv * D) (the
    ``dt_proj`` Linear's weight; dt_bias its bias or None), A (Hkv,); returns
    zoh = exp(A * softplus(V_flat @ dt_proj.T + dt_bias)) (B, Hkv, S), V_flat = value.transpose(1, 2)
    flattened per key. Plain torch ops (differentiable by torch), checked by the JAX face's rules."""
    for name, t in (("value", value), ("dt_proj", dt_proj), ("A", A)) + ((("dt_bias", dt_bias),) if dt_bias is not None
                                                                          else ()):
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if _checks.dtype_name(t.dtype) not in _checks.FLOAT_DTYPES:
            raise ArgumentTypeError(f"{name} must be float16, bfloat16 or float32, got {_checks.dtype_name(t.dtype)}")
    if value.dim() != 4:
        raise ArgumentError(f"value must have rank 4, got shape {tuple(value.shape)}")
    B, K, S, D = value.shape
    if tuple(dt_proj.shape) != (K, K * D):
        raise ArgumentError(f"dt_proj must be (K, K * H) = {(K, K * D)} for value of {K} heads of dim {D}, got shape "
                            f"{tuple(dt_proj.shape)}")
    if tuple(A.shape) != (K,):
        raise ArgumentError(f"A must be (K,) = ({K},), got shape {tuple(A.shape)}")
    if dt_bias is not None and tuple(dt_bias.shape) != (K,):
        raise ArgumentError(f"dt_bias must be (K,) = ({K},) or None, got shape {tuple(dt_bias.shape)}")
    x = torch.nn.functional.linear(value.transpose(1, 2).reshape(B, S, K * D), dt_proj, dt_bias)
    return torch.exp(A * torch.nn.functional.softplus(x)).transpose(1, 2)
