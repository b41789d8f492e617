"""Vision towers that call the attention once per window: one kernel call per layer instead.

Qwen2-VL and Qwen2.5-VL (and the towers transformers builds the same way: an attention module whose
``forward`` takes ``cu_seqlens``) pack every image, or every window of an image, into one sequence.
transformers hands ``cu_seqlens`` to flash-attention implementations only; every other
implementation gets one call per window: about 4,000 per prefill of a 1344-pixel image in
Qwen2.5-VL-7B, whose host time is most of the vision tower's time.

mmfa answers them with one call. A forward pre-hook on the attention module (installed by the first
call that comes from it, so from the module's second forward on) reads ``cu_seqlens``. The call for
the first window then attends every window at once, as a batch of windows: equal windows are a
strided view of the packed tensors (no copy), uneven ones are gathered into a padded batch with
lengths. Each window's call returns its slice of that result.

A call is answered from the batch only when its query, key and value are exactly that window of the
tensors the batch read: the same address and strides (the batch holds those tensors, so no other
tensor can sit at that address), hence the very data the call would have used. And only without
autograd or torch.compile; anything else takes the ordinary per-call path.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import torch

from mmfa_torch.attention import scaled_dot_product_attention

Tensor = torch.Tensor


@functools.cache
def _cu_seqlens_position(cls: type) -> int | None:
    """Position of ``cu_seqlens`` among the positional arguments of ``cls.forward`` (self excluded),
    or None when it takes no such argument."""
    try:
        names = list(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("cu_seqlens") - 1 if "cu_seqlens" in names else None


def watch(module: torch.nn.Module):
    """Install the pre-hook on an attention module whose forward takes ``cu_seqlens`` (once)."""
    if "_mmfa_windows_hook" in module.__dict__ or _cu_seqlens_position(type(module)) is None:
        return
    module._mmfa_windows_hook = module.register_forward_pre_hook(_on_forward, with_kwargs=True)


def _on_forward(module, args, kwargs):
    position = _cu_seqlens_position(type(module))
    cu = kwargs.get("cu_seqlens", args[position] if len(args) > position else None)
    plan = None
    if isinstance(cu, Tensor) and cu.dim() == 1 and cu.shape[0] >= 2 and not cu.is_floating_point():
        # The towers hand every layer the same cu_seqlens tensor: its plan is kept with it (and the
        # tensor held, so that no other can take its place), saving a device sync per layer.
        # (Inference tensors keep no version counter: their plan is kept by identity alone.)
        version = None if cu.is_inference() else cu._version
        last = module.__dict__.get("_mmfa_last_bounds")
        if last is not None and last[0] is cu and last[1] == version:
            plan = last[2]
        else:
            plan = _plan(tuple(cu.tolist()), cu.device)
            module._mmfa_last_bounds = (cu, version, plan)
    module._mmfa_windows = None if plan is None else _Windows(plan)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Windows [starts[i], starts[i] + lengths[i]) tiling [0, total) in order."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    total: int
    width: int                      # the longest window: the batch's sequence length
    gather: Tensor | None = None    # uneven windows: (n * width,) token of every batch slot (padding: 0)
    scatter: Tensor | None = None   # (total,) batch slot of every token
    seq_lengths: Tensor | None = None  # (n,) int32

    @property
    def uniform(self) -> bool:
        return self.gather is None


@functools.lru_cache(maxsize=16)
def _plan(bounds: tuple[int, ...], device: torch.device) -> _Plan | None:
    lengths = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    if bounds[0] != 0 or min(lengths) < 1:  # empty windows: leave those calls alone
        return None
    starts, n, width = bounds[:-1], len(lengths), max(lengths)
    if all(n_ == width for n_ in lengths):
        return _Plan(starts, lengths, bounds[-1], width)
    slot = torch.arange(width)
    valid = slot[None, :] < torch.tensor(lengths)[:, None]
    gather = torch.where(valid, torch.tensor(starts)[:, None] + slot[None, :], 0).reshape(-1)
    scatter = torch.arange(n * width).reshape(n, width)[valid]  # windows in order, tokens in order within
    return _Plan(starts, lengths, bounds[-1], width, gather.to(device), scatter.to(device),
                 torch.tensor(lengths, dtype=torch.int32, device=device))


class _Windows:
    """One forward of a watched module: its plan, how many window calls it has answered, the
    batch's output split into the windows' results, and what each call must hand over."""

    def __init__(self, plan: _Plan):
        self.plan, self.next, self.parts, self.expect = plan, 0, None, None

    def answer(self, query: Tensor, key: Tensor, value: Tensor, make_call) -> Tensor | None:
        """(1, lengths[i], Hq, D) for the i-th window's call, or None: not this call (per-call path).
        ``make_call()`` gives the keyword arguments of the batched attention call."""
        plan, i = self.plan, self.next
        if i >= len(plan.lengths) or query.shape[2] != plan.lengths[i]:
            fits = False
        elif i == 0:
            sources = tuple(_whole(t, plan.total) for t in (query, key, value))
            fits = (query.shape[0] == 1 and None not in sources and not torch.compiler.is_compiling()
                    and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                                           or value.requires_grad)))
            if fits:
                self.parts = torch.split(_attend(plan, *sources, make_call()), plan.lengths, dim=1)
                # What the call for window i must hand over: the same strides, at start_i of each source
                # (the sources held here, so that no other tensor can take their memory meanwhile).
                self.expect = (sources, tuple(t.data_ptr() for t in sources),
                               tuple(t.stride(2) * t.element_size() for t in sources),
                               tuple(t.stride() for t in sources))
        else:  # the same forward: grad mode and compiling were checked at window 0
            _, (pq, pk, pv), (sq, sk, sv), (tq, tk, tv) = self.expect
            start = plan.starts[i]
            fits = (query.data_ptr() == pq + start * sq and key.data_ptr() == pk + start * sk
                    and value.data_ptr() == pv + start * sv and query.stride() == tq and key.stride() == tk
                    and value.stride() == tv)
        if not fits:  # from here on this forward goes call by call
            self.next, self.parts, self.expect = len(plan.lengths), None, None
            return None
        out = self.parts[i]
        self.next += 1
        if self.next == len(plan.lengths):
            self.parts = self.expect = None
        return out


def _whole(t: Tensor, total: int) -> Tensor | None:
    """The (1, H, total, D) tensor whose first window ``t`` (1, H, n, D) is, if its storage holds it."""
    if any(s < 0 for s in t.stride()):
        return None
    last = t.storage_offset() + sum((d - 1) * s for d, s in zip((1, t.shape[1], total, t.shape[3]), t.stride()))
    if (last + 1) * t.element_size() > t.untyped_storage().nbytes():
        return None
    return t.as_strided((1, t.shape[1], total, t.shape[3]), t.stride(), t.storage_offset())


def _attend(plan: _Plan, q: Tensor, k: Tensor, v: Tensor, call: dict) -> Tensor:
    """Every window attending to itself: (1, total, Hq, D)."""
    n, width = len(plan.lengths), plan.width
    if plan.uniform:  # the windows are a batch already: a strided view
        def batch(t):
            return t.as_strided((n, t.shape[1], width, t.shape[3]),
                                (width * t.stride(2), t.stride(1), t.stride(2), t.stride(3)), t.storage_offset())
        out = scaled_dot_product_attention(batch(q), batch(k), batch(v), **call)
        return out.transpose(1, 2).reshape(1, plan.total, q.shape[1], q.shape[3])

    def batch(t):  # (1, H, total, D) -> (n, H, width, D), padded slots masked by the lengths
        rows = t[0].transpose(0, 1).index_select(0, plan.gather)
        return rows.view(n, width, t.shape[1], t.shape[3]).transpose(1, 2)
    out = scaled_dot_product_attention(batch(q), batch(k), batch(v), query_seq_lengths=plan.seq_lengths,
                                       key_value_seq_lengths=plan.seq_lengths, **call)
    rows = out.transpose(1, 2).reshape(n * width, q.shape[1], q.shape[3])
    return rows.index_select(0, plan.scatter)[None]
