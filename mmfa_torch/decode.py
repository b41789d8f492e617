"""The PyTorch face of decode attention: a few new query rows against a long KV cache.

Layout is SDPA's (what a transformers cache holds): query (B, Hq, T, D), key/value
(B, Hkv, S, D). On CUDA tensors the split-KV kernels (``mmfa_jax.kernels.decode``) are launched
directly (``mmfa_torch.launch.run_decode``): one compiled pair serves a whole bucket of cache lengths,
since the kernels address the cache through its runtime length. Elsewhere the call goes to
``mmfa_jax.decode_attention`` through DLPack.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import torch

from mmfa_jax import _checks
from mmfa_jax import decode as _jax_decode
from mmfa_torch import launch
from mmfa_torch.attention import _int32, _lowering
from mmfa_torch.launch import _JAX_DTYPE
from mmfa_torch.bridge import to_jax, to_torch

Tensor = torch.Tensor


def decode_attention(query: Tensor, key: Tensor, value: Tensor, *, kv_lengths: Tensor | None = None,
                     key_mask: Tensor | None = None, scale: float | None = None, logits_soft_cap: float | None = None,
                     implementation: str | None = None, return_lse: bool = False):
    """Attention of a decode step: out (B, Hq, T, D) like ``query`` (and lse (B, Hq, T) float32).

    query (B, Hq, T, D) with T from 1 to 16, the last T positions of each sequence; key and value
    (B, Hkv, S, D), Hq a multiple of Hkv (K and V read once per KV head, never repeated);
    kv_lengths (B,) int: the valid cache entries of each example (default S). Query row t sees
    keys j < kv_lengths[b] - T + 1 + t; entries past kv_lengths[b] are never read. key_mask
    (B, S) bool, optional: False hides a key from every row (left padding, a static cache's
    unwritten tail); hidden keys are never read either. See ``mmfa_jax.decode_attention`` for the
    rules (rows that see no key give zeros). Not differentiable (inference). Safe to capture in a
    CUDA graph once a shape bucket has been seen (no host synchronisation, torch's allocator).
    """
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor) or not isinstance(value, torch.Tensor):
        raise _checks.ArgumentTypeError("query, key and value must be torch tensors")
    lengths = None if kv_lengths is None else _int32(kv_lengths, "kv_lengths").to(query.device)
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            raise _checks.ArgumentTypeError(f"key_mask must be a bool tensor, got "
                                            f"{getattr(key_mask, 'dtype', type(key_mask).__name__)}")
        if key.dim() == 4 and tuple(key_mask.shape) != (key.shape[0], key.shape[2]):
            raise _checks.ArgumentError(f"key_mask must have shape (B, S) = {(key.shape[0], key.shape[2])}, got "
                                        f"{tuple(key_mask.shape)}")
        key_mask = key_mask.to(query.device).contiguous()
    # Under torch.compile the step is the custom op (its fake kernel gives the shapes); eager calls
    # skip the op's dispatch, which costs host time on every call.
    step = _decode_op if torch.compiler.is_compiling() else _decode
    out, lse = step(query.detach(), key.detach(), value.detach(), lengths, key_mask, _float(scale),
                    _float(logits_soft_cap), implementation)
    return (out, lse) if return_lse else out


def _decode(query: Tensor, key: Tensor, value: Tensor, kv_lengths: Optional[Tensor], key_mask: Optional[Tensor],
            scale: Optional[float], softcap: Optional[float], implementation: Optional[str],
            in_graph: bool = False) -> tuple[Tensor, Tensor]:
    device = query.device
    S = key.shape[2] if key.dim() == 4 else 0
    # Everything but the tensors' memory is decided once per shape bucket (host time is what a
    # decode step cannot spare): the checks, the problem, the kernels.
    plan = _plan(tuple(query.shape), query.dtype, _bucketed(key, value, device), key.dtype, value.dtype,
                 None if kv_lengths is None else tuple(kv_lengths.shape),
                 None if key_mask is None else tuple(key_mask.shape), scale, softcap, implementation,
                 device.type, device.index)
    if plan.static is None:  # some size is 0
        return (query.new_zeros(query.shape),
                query.new_full(tuple(query.shape[:3]), -float("inf"), dtype=torch.float32))
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    if plan.kernels is not None:
        return launch.run_decode(plan.kernels, q, k, v, S, kv_lengths, key_mask, in_graph=in_graph)
    return _through_jax(plan.static, q, k, v, kv_lengths, key_mask)


def _decode_in_graph(query: Tensor, key: Tensor, value: Tensor, kv_lengths: Optional[Tensor],
                     key_mask: Optional[Tensor], scale: Optional[float], softcap: Optional[float],
                     implementation: Optional[str]) -> tuple[Tensor, Tensor]:
    # Run by a compiled graph, maybe in CUDA graphs (inductor's cudagraph trees): every tensor made
    # here must be a plain temporary (the graphs' memory pool refuses allocations kept alive).
    return _decode(query, key, value, kv_lengths, key_mask, scale, softcap, implementation, in_graph=True)


_decode_op = torch.library.custom_op("mmfa::decode_attention", _decode_in_graph, mutates_args=())


@_decode_op.register_fake
def _(query, key, value, kv_lengths, key_mask, scale, softcap, implementation):
    return torch.empty_like(query), query.new_empty(tuple(query.shape[:3]), dtype=torch.float32)


def _float(x):
    return None if x is None else float(x)


@dataclasses.dataclass(frozen=True)
class _Plan:
    static: object  # mmfa_jax.decode's prepared call, or None when some size is 0
    kernels: tuple | None  # the compiled pair, when launched directly


def _bucketed(key: Tensor, value: Tensor, device: torch.device):
    """The (key, value) shapes a call is planned for: on CUDA, with the cache length rounded up to
    its bucket (``mmfa_jax.decode.capacity_of``), so that the steps of one bucket share a plan."""
    k, v = tuple(key.shape), tuple(value.shape)
    if device.type == "cuda" and key.dim() == 4 and k == v:
        k = v = k[:2] + (_jax_decode.capacity_of(k[2]),) + k[3:]
    return k, v


@functools.lru_cache(maxsize=1024)
def _plan(q_shape, q_dtype, kv_shapes, k_dtype, v_dtype, lengths_shape, mask_shape, scale, softcap, implementation,
          device_type, device_index) -> _Plan:
    device = torch.device(device_type, device_index)
    lowering = _lowering(implementation, device)
    direct = device_type == "cuda" and lowering.kernels and launch.enabled() and launch.available()
    k_shape, v_shape = kv_shapes
    structs = (_struct(q_shape, q_dtype), _struct(k_shape, k_dtype), _struct(v_shape, v_dtype))
    # The one argument layer checks shapes and dtypes: it gets their descriptions. Launched
    # directly, the kernels are compiled for the bucket's capacity (the shapes hold it already).
    if mask_shape is not None and len(k_shape) == 4:  # the mask of the capacity the kernels are compiled for
        mask_shape = mask_shape[:1] + k_shape[2:3]
    static, _ = _jax_decode.prepare(
        *structs, kv_lengths=None if lengths_shape is None else _struct(lengths_shape, torch.int32),
        key_mask=None if mask_shape is None else _struct(mask_shape, torch.bool), scale=scale,
        logits_soft_cap=softcap, layout="BNTH", implementation=lowering, capacity=k_shape[2] if direct else None)
    if static is None or not direct:
        return _Plan(static, None)
    return _Plan(static, launch.decode_kernels(static, q_shape, q_dtype, k_shape, k_dtype, lengths_shape, mask_shape,
                                               device_index))


def _struct(shape, dtype):
    if dtype not in _JAX_DTYPE:
        raise _checks.ArgumentTypeError(f"query, key and value must be float16, bfloat16 or float32, got {dtype}")
    return jax.ShapeDtypeStruct(shape, jnp.dtype(_JAX_DTYPE[dtype]))


def _through_jax(static, q, k, v, lengths: Optional[Tensor], key_mask: Optional[Tensor]):
    out, lse = _jax_decode.run(static, to_jax(q), to_jax(k), to_jax(v), to_jax(lengths), to_jax(key_mask))
    return to_torch(out), to_torch(lse)


__all__ = ["decode_attention"]
