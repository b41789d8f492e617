"""Vision towers that call the attention once per window: one kernel call per layer instead.

Qwen2-VL, Qwen2.5-VL and the towers transformers builds the same way (Qwen3-VL, GLM-4V, ...) pack
every image, or every window of an image, into one sequence and hand their attention module the
window bounds ``cu_seqlens``. transformers passes the bounds on to flash-attention implementations
only. For any other, the module splits its query, key and value by them and calls the attention
once per window: about 16,000 calls per prefill of Qwen2.5-VL-7B at 9,216 visual tokens. The host
time of those calls, of the split and of the concatenation is most of the vision tower's time.

mmfa makes it one call per forward. A forward pre-hook on the module (installed by its first
attention call, so from its second forward on) keeps the bounds for the attention function and
hands the forward ``[0, total]`` instead, a host tensor, so that splitting by it needs no device
sync. The forward then makes a single call over the whole packed sequence, and that call attends
every window at once, as a batch of windows. Equal windows are a view of the packed tensors;
uneven ones are gathered into a padded batch with lengths. Autograd goes through it as through
any attention call.

The bounds are swapped only when all of these hold, so that nothing else can see the swap:
- the class's forward uses ``cu_seqlens`` for nothing but that split (checked once per class on
  its source: transformers' idiom, the flash branch aside);
- the module's config names an implementation that is mmfa's attention function;
- the call is not being traced by torch.compile (there the calls go one by one);
- there is no attention dropout in training.
The call that receives the swapped bounds must be that single whole-sequence call; anything else
is an error, never a silent change of the pattern.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re

import torch

from mmfa_torch.attention import scaled_dot_product_attention

Tensor = torch.Tensor

_SPLIT = "torch.split(tensor, lengths.tolist(), dim=2)"
_LENGTHS = "lengths = cu_seqlens[1:] - cu_seqlens[:-1]"
# What a qualifying forward may say of the bounds, line by line: the parameter, the split's
# lengths, and flash-attention's branch (which these implementations never take).
_BOUNDS_LINES = (re.compile(r"^cu_seqlens\s*:"), re.compile(re.escape(_LENGTHS) + "$"),
                 re.compile(r"^cu_seq_lens_[qk]=cu_seqlens,?$"), re.compile(r"^max_seqlen = .*\bcu_seqlens\b"))


@functools.cache
def _bounds_position(cls: type) -> int | None:
    """Position of ``cu_seqlens`` among the positional arguments of ``cls.forward`` (self excluded)
    when that forward uses the bounds only to split the sequence by them; otherwise None."""
    try:
        names = list(inspect.signature(cls.forward).parameters)
        source = inspect.getsource(cls.forward)
    except (TypeError, ValueError, OSError):
        return None
    if "cu_seqlens" not in names or _SPLIT not in source or _LENGTHS not in source:
        return None
    for line in source.splitlines():
        code = line.split("#", 1)[0].strip()
        if re.search(r"\bcu_seqlens\b", code) and not any(p.search(code) for p in _BOUNDS_LINES):
            return None
        if re.search(r"\blengths\b", code) and code != _LENGTHS and _SPLIT not in code:
            return None
    return names.index("cu_seqlens") - 1


def watch(module: torch.nn.Module):
    """Install the pre-hook on a qualifying attention module (once; nothing for any other)."""
    if "_mmfa_windows_hook" in module.__dict__ or _bounds_position(type(module)) is None:
        return
    module._mmfa_windows_hook = module.register_forward_pre_hook(_on_forward, with_kwargs=True)


def take(module: torch.nn.Module) -> _Plan | None:
    """The bounds this forward of ``module`` handed on to its single attention call (once), or None."""
    return module.__dict__.pop("_mmfa_window_plan", None)


def _runs_mmfa(module: torch.nn.Module) -> bool:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from mmfa_torch.hf.backend import attention_forward
    name = getattr(getattr(module, "config", None), "_attn_implementation", None)
    try:
        return name is not None and ALL_ATTENTION_FUNCTIONS[name] is attention_forward
    except KeyError:
        return False


def _on_forward(module, args, kwargs):
    module.__dict__.pop("_mmfa_window_plan", None)
    position = _bounds_position(type(module))
    in_kwargs = "cu_seqlens" in kwargs
    cu = kwargs["cu_seqlens"] if in_kwargs else (args[position] if len(args) > position else None)
    if (not isinstance(cu, Tensor) or cu.dim() != 1 or cu.shape[0] < 2 or cu.is_floating_point()
            or torch.compiler.is_compiling() or (module.training and getattr(module, "attention_dropout", 0))
            or not _runs_mmfa(module)):
        return None
    # The towers hand every layer the same bounds tensor: its plan is kept with it (the tensor held,
    # so that no other can take its place), saving a device sync per layer. Inference tensors keep
    # no version counter: their plan is kept by identity alone.
    version = None if cu.is_inference() else cu._version
    last = module.__dict__.get("_mmfa_last_bounds")
    if last is not None and last[0] is cu and last[1] == version:
        plan = last[2]
    else:
        plan = _plan(tuple(cu.tolist()), cu.device)
        module._mmfa_last_bounds = (cu, version, plan)
    if plan is None:
        return None
    module._mmfa_window_plan = plan
    whole = torch.tensor([0, plan.total], dtype=cu.dtype)
    if in_kwargs:
        return args, {**kwargs, "cu_seqlens": whole}
    return (*args[:position], whole, *args[position + 1:]), kwargs


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


def attend(plan: _Plan, q: Tensor, k: Tensor, v: Tensor, call: dict) -> Tensor:
    """Every window of the packed (1, H, total, D) query, key and value attending to itself (no
    causality, no mask): (1, total, Hq, D). ``call``: the kernel's other keyword arguments."""
    if q.shape[0] != 1 or q.shape[2] != plan.total or k.shape[2] != plan.total:
        raise RuntimeError(f"mmfa vision windows: the module's attention call must cover its {plan.total} packed "
                           f"tokens in one batch row, got query {tuple(q.shape)} and key {tuple(k.shape)}")
    n, width, heads, dim = len(plan.lengths), plan.width, q.shape[1], q.shape[3]
    if plan.uniform:  # the windows are a batch already: a view
        def batch(t):
            return t.transpose(1, 2).reshape(n, width, t.shape[1], t.shape[3]).transpose(1, 2)
        out = scaled_dot_product_attention(batch(q), batch(k), batch(v), **call)
        return out.transpose(1, 2).reshape(1, plan.total, heads, dim)

    def batch(t):  # (1, H, total, D) -> (n, H, width, D), padded slots masked by the lengths
        rows = t[0].transpose(0, 1).index_select(0, plan.gather)
        return rows.view(n, width, t.shape[1], t.shape[3]).transpose(1, 2)
    out = scaled_dot_product_attention(batch(q), batch(k), batch(v), query_seq_lengths=plan.seq_lengths,
                                       key_value_seq_lengths=plan.seq_lengths, **call)
    rows = out.transpose(1, 2).reshape(n * width, heads, dim)
    return rows.index_select(0, plan.scatter)[None]
