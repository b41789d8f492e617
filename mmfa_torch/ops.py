"""The torch face's forward and backward, as torch.library custom ops (fake kernels, autograd) and,
for eager calls, a plain autograd.Function.

CUDA tensors go to the compiled kernels straight from torch (mmfa_torch.launch); the rest, and
everything when ``MMFA_TORCH_LAUNCH=jax``, cross to JAX through DLPack. The functions take
contiguous tensors in a declared layout ("BNTH" = torch's (B, H, S, D), or "BTNH" =
(B, S, H, D)) and return contiguous tensors in the same layout, so the hand-off to jax is a pure
DLPack view. Static arguments travel as plain numbers and strings (an open window side as -1)
so that torch.compile can trace calls to the ops.
"""

import functools
from typing import Optional

import torch

from mmfa_jax import backends
from mmfa_jax._autodiff import backward as jax_backward
from mmfa_jax._autodiff import forward as jax_forward
from mmfa_jax._checks import Options
from mmfa_torch import launch
from mmfa_torch.bridge import to_jax, to_torch

Tensor = torch.Tensor

# The op's arguments by name: the tensors, then the static options (plain numbers and strings).
TENSORS = ("q", "k", "v", "bias", "mask", "q_seg", "kv_seg", "q_lengths", "kv_lengths")
STATIC = ("scale", "is_causal", "alignment", "window_left", "window_right", "softcap", "layout", "backend", "cc")


@functools.lru_cache(maxsize=256)
def options(scale: Optional[float], is_causal: bool, alignment: str, window_left: int, window_right: int,
            softcap: Optional[float], layout: str, backend: str, cc: int) -> Options:
    """The checked options of a call, rebuilt from the op's static arguments (an open window side
    as -1, no compute capability as -1)."""
    return Options.make(scale=scale, is_causal=is_causal, causal_alignment=alignment,
                        local_window_size=(None if window_left < 0 else window_left,
                                           None if window_right < 0 else window_right),
                        logits_soft_cap=softcap, implementation=lowering(backend, cc), layout=layout)


def lowering(backend: str, cc: int) -> backends.Lowering:
    """A ``backends.Lowering`` from the plain values a custom op carries (no compute capability: -1)."""
    return backends.Lowering(backend, None if cc < 0 else cc, "any" if cc < 0 else backends.family_of_cc(cc))


def direct(backend: str, t: Tensor) -> bool:
    """Whether this call launches the kernels from torch rather than through JAX."""
    return backends.BACKENDS[backend].compiled and t.is_cuda and launch.enabled() and launch.available()


def _segments(q_seg, kv_seg):
    return None if q_seg is None else (to_jax(q_seg), to_jax(kv_seg))


def forward(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], q_seg: Optional[Tensor],
    kv_seg: Optional[Tensor], q_lengths: Optional[Tensor], kv_lengths: Optional[Tensor],
    scale: Optional[float], is_causal: bool, alignment: str, window_left: int, window_right: int,
    softcap: Optional[float], layout: str, backend: str, cc: int,
) -> tuple[Tensor, Tensor]:
    opts = options(scale, is_causal, alignment, window_left, window_right, softcap, layout, backend, cc)
    if direct(backend, q):
        return launch.forward(opts, q, k, v, bias, mask, q_seg, kv_seg, q_lengths, kv_lengths)
    out, lse = jax_forward(
        opts, to_jax(q), to_jax(k), to_jax(v), to_jax(bias), to_jax(mask), _segments(q_seg, kv_seg),
        to_jax(q_lengths), to_jax(kv_lengths))
    return to_torch(out), to_torch(lse)


attention_forward = torch.library.custom_op("mmfa::attention_forward", forward, mutates_args=())


@attention_forward.register_fake
def _(q, k, v, bias, mask, q_seg, kv_seg, q_lengths, kv_lengths, scale, is_causal, alignment, window_left,
      window_right, softcap, layout, backend, cc):
    B, N, T = (q.shape[0], q.shape[1], q.shape[2]) if layout == "BNTH" else (q.shape[0], q.shape[2], q.shape[1])
    return torch.empty_like(q), q.new_empty((B, N, T), dtype=torch.float32)


def backward(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], q_seg: Optional[Tensor],
    kv_seg: Optional[Tensor], q_lengths: Optional[Tensor], kv_lengths: Optional[Tensor], out: Tensor, lse: Tensor,
    d_out: Tensor, d_lse: Tensor,
    scale: Optional[float], is_causal: bool, alignment: str, window_left: int, window_right: int,
    softcap: Optional[float], layout: str, backend: str, cc: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dbias); dbias is empty without a bias, else shaped (Bb, Nb, T, S)."""
    opts = options(scale, is_causal, alignment, window_left, window_right, softcap, layout, backend, cc)
    if direct(backend, q):
        dq, dk, dv, dbias = launch.backward(opts, q, k, v, bias, mask, q_seg, kv_seg, q_lengths, kv_lengths, out, lse,
                                            d_out, d_lse)
        return dq, dk, dv, q.new_empty((0,)) if dbias is None else dbias
    dq, dk, dv, dbias = jax_backward(
        opts, to_jax(q), to_jax(k), to_jax(v), to_jax(bias), to_jax(mask), _segments(q_seg, kv_seg),
        to_jax(q_lengths), to_jax(kv_lengths), to_jax(out), to_jax(lse), to_jax(d_out), to_jax(d_lse))
    dbias = q.new_empty((0,)) if dbias is None else to_torch(dbias)
    return to_torch(dq), to_torch(dk), to_torch(dv), dbias


attention_backward = torch.library.custom_op("mmfa::attention_backward", backward, mutates_args=())


@attention_backward.register_fake
def _(q, k, v, bias, mask, q_seg, kv_seg, q_lengths, kv_lengths, out, lse, d_out, d_lse, scale, is_causal, alignment,
      window_left, window_right, softcap, layout, backend, cc):
    if bias is None:
        dbias = q.new_empty((0,))
    else:
        T, S = (q.shape[2], k.shape[2]) if layout == "BNTH" else (q.shape[1], k.shape[1])
        dbias = bias.new_empty((*((1,) * (4 - bias.dim()) + tuple(bias.shape))[:2], T, S))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup_context(ctx, inputs, output):
    named = dict(zip(TENSORS + STATIC, inputs))
    tensors = [named[name] for name in TENSORS]
    ctx.save_for_backward(*(t for t in tensors if t is not None), *output)
    ctx.present = tuple(t is not None for t in tensors)
    ctx.static = tuple(named[name] for name in STATIC)
    ctx.bias_shape = None if named["bias"] is None else named["bias"].shape


def _gradients(ctx, d_out, d_lse, backward_op):
    if torch.is_grad_enabled() and any(ctx.needs_input_grad):
        raise RuntimeError("mmfa attention does not support double backward (create_graph=True, or a gradient of a "
                           "gradient): its backward kernels have no derivative of their own")
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if present else None for present in ctx.present]
    out, lse = next(saved), next(saved)
    d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
    d_lse = torch.zeros_like(lse) if d_lse is None else d_lse.contiguous()
    dq, dk, dv, dbias = backward_op(*tensors, out, lse, d_out, d_lse, *ctx.static)
    dbias = None if ctx.bias_shape is None else dbias.sum_to_size(ctx.bias_shape)
    return dq, dk, dv, dbias, *(None,) * (len(TENSORS) - 4 + len(STATIC))


attention_forward.register_autograd(lambda ctx, d_out, d_lse: _gradients(ctx, d_out, d_lse, attention_backward),
                                    setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward for eager autograd, without the custom op's dispatch."""

    @staticmethod
    def forward(ctx, *inputs):
        output = forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, d_out, d_lse):
        return _gradients(ctx, d_out, d_lse, backward)


def attention(*inputs) -> tuple[Tensor, Tensor]:
    """(out, lse) for ``attention_forward``'s arguments, differentiable.

    Under torch.compile this is the custom op (traceable, with fake kernels). In eager mode a
    custom op costs about 0.2 ms of host time per call in torch's dispatch, more than a small
    kernel runs, so eager calls go through a plain ``autograd.Function`` (when a gradient is
    needed) or straight to the forward."""
    if torch.compiler.is_compiling():
        return attention_forward(*inputs)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs[:4]):  # q, k, v, bias
        return _EagerAttention.apply(*inputs)
    return forward(*inputs)
