"""torch.library custom ops around the jax kernels: forward, backward, fake kernels, autograd.

The ops take contiguous tensors in a declared layout ("BNTH" = torch's (B, H, S, D), or "BTNH" =
(B, S, H, D)) and return contiguous tensors in the same layout, so the hand-off to jax is a pure
DLPack view. Static arguments travel as plain numbers and strings (an open window side as -1)
so that torch.compile can trace calls to the ops.
"""

import functools
from typing import Optional

import torch

from mmfa_jax.attention import Options, backward, forward
from mmfa_torch.bridge import to_jax, to_torch

Tensor = torch.Tensor


@functools.lru_cache(maxsize=256)
def _options(scale: Optional[float], is_causal: bool, window_left: int, window_right: int, softcap: Optional[float],
             layout: str,
             implementation: str) -> Options:
    return Options.make(
        scale=scale,
        is_causal=is_causal,
        local_window_size=(None if window_left < 0 else window_left, None if window_right < 0 else window_right),
        logits_soft_cap=softcap,
        implementation=implementation,
        layout=layout,
    )


def _segments(q_seg, kv_seg):
    return None if q_seg is None else (to_jax(q_seg), to_jax(kv_seg))


@torch.library.custom_op("mmfa::attention_forward", mutates_args=())
def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], q_seg: Optional[Tensor],
    kv_seg: Optional[Tensor], q_lengths: Optional[Tensor], kv_lengths: Optional[Tensor],
    scale: Optional[float], is_causal: bool, window_left: int, window_right: int, softcap: Optional[float], layout: str,
    implementation: str,
) -> tuple[Tensor, Tensor]:
    opts = _options(scale, is_causal, window_left, window_right, softcap, layout, implementation)
    out, lse = forward(
        opts, to_jax(q), to_jax(k), to_jax(v), to_jax(bias), to_jax(mask), _segments(q_seg, kv_seg),
        to_jax(q_lengths), to_jax(kv_lengths))
    return to_torch(out), to_torch(lse)


@attention_forward.register_fake
def _(q, k, v, bias, mask, q_seg, kv_seg, q_lengths, kv_lengths, scale, is_causal, window_left, window_right,
      softcap, layout, implementation):
    B, N, T = (q.shape[0], q.shape[1], q.shape[2]) if layout == "BNTH" else (q.shape[0], q.shape[2], q.shape[1])
    return torch.empty_like(q), q.new_empty((B, N, T), dtype=torch.float32)


@torch.library.custom_op("mmfa::attention_backward", mutates_args=())
def attention_backward(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], q_seg: Optional[Tensor],
    kv_seg: Optional[Tensor], q_lengths: Optional[Tensor], kv_lengths: Optional[Tensor], out: Tensor, lse: Tensor,
    d_out: Tensor, d_lse: Tensor,
    scale: Optional[float], is_causal: bool, window_left: int, window_right: int, softcap: Optional[float], layout: str,
    implementation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dbias); dbias is empty without a bias, else shaped (Bb, Nb, T, S)."""
    opts = _options(scale, is_causal, window_left, window_right, softcap, layout, implementation)
    dq, dk, dv, dbias = backward(
        opts, to_jax(q), to_jax(k), to_jax(v), to_jax(bias), to_jax(mask), _segments(q_seg, kv_seg),
        to_jax(q_lengths), to_jax(kv_lengths), to_jax(out), to_jax(lse), to_jax(d_out), to_jax(d_lse))
    dbias = q.new_empty((0,)) if dbias is None else to_torch(dbias)
    return to_torch(dq), to_torch(dk), to_torch(dv), dbias


@attention_backward.register_fake
def _(q, k, v, bias, mask, q_seg, kv_seg, q_lengths, kv_lengths, out, lse, d_out, d_lse, scale, is_causal,
      window_left, window_right, softcap, layout, implementation):
    if bias is None:
        dbias = q.new_empty((0,))
    else:
        T, S = (q.shape[2], k.shape[2]) if layout == "BNTH" else (q.shape[1], k.shape[1])
        dbias = bias.new_empty((*((1,) * (4 - bias.dim()) + tuple(bias.shape))[:2], T, S))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


_STATIC = ("scale", "is_causal", "window_left", "window_right", "softcap", "layout", "implementation")
_INPUTS = ("q", "k", "v", "bias", "mask", "q_seg", "kv_seg", "q_lengths", "kv_lengths")


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs[:9] if t is not None), *output)
    ctx.present = tuple(t is not None for t in inputs[:9])
    ctx.static = inputs[9:]
    ctx.bias_shape = None if inputs[3] is None else inputs[3].shape


def _backward(ctx, d_out, d_lse):
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if present else None for present in ctx.present]
    out, lse = next(saved), next(saved)
    d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
    d_lse = torch.zeros_like(lse) if d_lse is None else d_lse.contiguous()
    dq, dk, dv, dbias = attention_backward(*tensors, out, lse, d_out, d_lse, *ctx.static)
    dbias = None if ctx.bias_shape is None else dbias.sum_to_size(ctx.bias_shape)
    return dq, dk, dv, dbias, *(None,) * (len(_INPUTS) - 4 + len(_STATIC))


attention_forward.register_autograd(_backward, setup_context=_setup_context)
