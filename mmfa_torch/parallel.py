"""Sequence-parallel cross-attention over ``torch.distributed``: LV-XAttn and ring, the torch twin of
``mmfa_jax.parallel.cross_attention``.

Every rank of the process group holds a query shard (B, Hq, Tq, D) and a key/value shard
(B, Hkv, Skv, D) of the global sequences (SDPA layout; rank r holds positions [r * len, (r + 1) *
len)). Blocks travel around the ring r -> r + 1 with point-to-point messages
(``torch.distributed.batch_isend_irecv``: gloo on CPU tensors, NCCL on CUDA ones):

- "lv_xattn": K/V stay; the query block travels, and with it its (output, LSE) accumulator. At
  step i rank r attends the block of rank (r - i) mod n to its own K/V, merges by log-sum-exp into
  the accumulator that came with the block and passes both on; n passes bring every accumulator
  home.
- "ring": queries stay; the K/V blocks travel; partial results merge locally.

The next block's transfer is posted before this step's attention and waited on after it; the
accumulator that arrives during a step is waited on only after the step's attention. Each block is
``mmfa_torch.scaled_dot_product_attention(..., return_lse=True)``: the same kernels as the jax face.

The backward (a ``torch.autograd.Function``) runs the same pattern once more. LV-XAttn moves the
query-side bundle (Q, dO, LSE, delta = rowsum(O * dO) - dLSE) with its dQ accumulator while dK/dV
accumulate in place; ring moves K/V with their dK/dV accumulators while dQ accumulates in place.
Per-block gradients are the kernels' backward given the global LSE and delta (the Pallas backends),
or, for ``implementation="xla"``, ``torch.autograd.grad`` of the recomputed block attention with the
cotangents the LSE merge hands it (see ``_block_grads``).
"""

from __future__ import annotations

import importlib

import torch
import torch.distributed as dist

from mmfa_jax import _checks
from mmfa_jax._checks import ArgumentError, ArgumentTypeError
from mmfa_torch import ops

# The module (``mmfa_torch.attention`` as an attribute is the function of that name).
_attention = importlib.import_module("mmfa_torch.attention")

Tensor = torch.Tensor
STRATEGIES = ("lv_xattn", "ring")
_MOVING_TAG, _TRAVELLING_TAG = 17, 23  # gloo matches messages by tag; NCCL by posting order (the same here)

__all__ = ["STRATEGIES", "cross_attention"]


def cross_attention(query: Tensor, key: Tensor, value: Tensor, *, group=None, strategy: str = "lv_xattn",
                    kv_seq_lengths: Tensor | None = None, scale: float | None = None,
                    implementation: str | None = None, return_lse: bool = False):
    """Exact cross-attention of sequence-sharded queries over sequence-sharded keys/values.

    Every rank of ``group`` calls it with its own shards (equal sizes on every rank). No causal
    mask: every query sees every valid key.

    Args:
      query: (B, Hq, Tq_local, D); key, value: (B, Hkv, Skv_local, D), Hkv dividing Hq (GQA is
        implied by the head counts). float16, bfloat16 or float32, one dtype; all on one device.
      group: the ``torch.distributed`` process group (default: the world).
      strategy: "lv_xattn" (queries and their accumulators travel) or "ring" (K/V travel).
      kv_seq_lengths: None or a (B,) integer tensor: valid keys in the GLOBAL key sequence
        (padding at its end), the same on every rank.
      scale: logit scale, default 1/sqrt(D).
      implementation: as in ``mmfa_torch.scaled_dot_product_attention``.
      return_lse: also return the (B, Hq, Tq_local) float32 log-sum-exp (-inf: no valid key).

    Returns:
      (B, Hq, Tq_local, D) like query (zeros for rows with no valid key), and the LSE if asked;
      differentiable in query, key and value.
    """
    strategy = _checks.choice(strategy, "strategy", STRATEGIES)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (query.device == key.device == value.device):
        raise ArgumentError(f"query, key and value must be on one device, got {query.device}, {key.device}, "
                            f"{value.device}")
    lowering = _attention._lowering(implementation, query.device)
    d = _checks.attention_dims(query, key, value, "BNTH", xla=not lowering.kernels)
    if kv_seq_lengths is not None:
        if not isinstance(kv_seq_lengths, torch.Tensor):
            raise ArgumentTypeError(f"kv_seq_lengths must be a (B,) integer tensor, got {type(kv_seq_lengths).__name__}")
        _checks.per_example(kv_seq_lengths, "kv_seq_lengths", (d.batch,))
        kv_seq_lengths = kv_seq_lengths.to(device=query.device, dtype=torch.int32)
    if scale is not None:
        scale = _checks.real(scale, "scale")
    if not dist.is_available() or not dist.is_initialized():
        raise ArgumentError("cross_attention needs an initialised torch.distributed process group "
                            "(torch.distributed.init_process_group)")
    ring = _Ring(group, strategy, scale, implementation, d.kv_len)
    if d.empty:
        out, lse = _attention._Empty.apply(query, key, value)  # zeros, LSE -inf, zero gradients
    else:
        out, lse = _CrossAttention.apply(query, key, value, kv_seq_lengths, ring)
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------------------------
# The ring: peers, messages, the step loop.


class _Ring:
    def __init__(self, group, strategy: str, scale, implementation, kv_len: int):
        self.group, self.strategy, self.scale, self.implementation, self.kv_len = (
            group, strategy, scale, implementation, kv_len)
        self.n = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = self._global((self.rank + 1) % self.n)
        self.prev = self._global((self.rank - 1) % self.n)

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def post(self, tensors, tag: int):
        """Sends ``tensors`` to the next rank and receives as many from the previous one, without
        waiting: returns (requests, receive buffers)."""
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        ops_ = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t in tensors]
        ops_ += [dist.P2POp(dist.irecv, r, self.prev, self.group, tag) for r in received]
        return dist.batch_isend_irecv(ops_), received

    @staticmethod
    def wait(pending):
        requests, received = pending
        for r in requests:
            r.wait()
        return received

    def local_lengths(self, kv_lengths, origin: int):
        if kv_lengths is None:
            return None
        return (kv_lengths - origin * self.kv_len).clamp(0, self.kv_len).to(torch.int32)

    def loop(self, moving, travelling, staying, compute, combine):
        """n steps around the ring (as ``mmfa_jax.parallel._ring_loop``): ``moving`` (a list of
        tensors) goes on to the next rank while ``compute(origin, moving)`` runs; the
        ``travelling`` accumulator (a list, or None) follows after ``combine(part, travelling,
        staying)`` and is waited on only after the next step's compute; n passes bring it home."""
        in_flight = None
        for i in range(self.n):
            upcoming = self.post(moving, _MOVING_TAG) if i < self.n - 1 else None
            part = compute((self.rank - i) % self.n, moving)
            if in_flight is not None:
                travelling = self.wait(in_flight)
            travelling, staying = combine(part, travelling, staying)
            if travelling is not None and self.n > 1:
                in_flight = self.post(travelling, _TRAVELLING_TAG)
            if upcoming is not None:
                moving = self.wait(upcoming)
        if in_flight is not None:
            travelling = self.wait(in_flight)
        return travelling, staying

    # --------------------------------------------------------------------------------------------
    # Blocks.

    def block(self, q, k, v, kv_len):
        """(out, lse (B, Hq, T) float32) of q against one key/value block."""
        from mmfa_torch import scaled_dot_product_attention

        return scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=q.shape[1] != k.shape[1],
                                            key_value_seq_lengths=kv_len, return_lse=True,
                                            implementation=self.implementation)

    def block_grads(self, q, k, v, kv_len, d_out, lse, delta):
        """(dq, dk, dv): one block's share of the full attention's gradients, given the global lse
        and delta = rowsum(out * d_out) - d_lse ((B, Hq, T) float32).

        With the global normaliser, exp(s - lse) over a block's keys is that block's part of the
        full softmax: the Pallas backends' backward kernels take (lse, delta) as they are (they
        form delta from out and d_lse, so out = 0 and d_lse = -delta). The XLA backend
        differentiates its own forward, so there the block's local (o_b, lse_b) is recomputed and
        given the cotangents the LSE merge passes it: w * d_out and w * (rowsum(o_b * d_out) -
        delta), w = exp(lse_b - lse)."""
        lowering = _attention._lowering(self.implementation, q.device)
        if lowering.kernels:
            q, k, v, d_out = (t.contiguous() for t in (q, k, v, d_out))
            static = (self.scale, False, "top_left", -1, -1, None, "BNTH", lowering.backend,
                      -1 if lowering.cc is None else lowering.cc)
            dq, dk, dv, _ = ops.backward(q, k, v, None, None, None, None, None, kv_len, torch.zeros_like(d_out),
                                         lse.contiguous(), d_out, (-delta).contiguous(), *static)
            return dq, dk, dv
        with torch.enable_grad():
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            o_b, lse_b = self.block(qg, kg, vg, kv_len)
            w = _weight(lse_b.detach(), lse)
            d_o = (w[..., None] * d_out.float()).to(o_b.dtype)
            d_l = w * ((o_b.detach().float() * d_out.float()).sum(-1) - delta)
            return torch.autograd.grad((o_b, lse_b), (qg, kg, vg), (d_o, d_l))


def _weight(lse_part: Tensor, lse: Tensor) -> Tensor:
    """exp(lse_part - lse), 0 where lse is -inf (a row that sees nothing yet)."""
    return torch.where(lse == float("-inf"), torch.zeros_like(lse), torch.exp(lse_part - lse))


def _merge(acc, part):
    """Two partial (out, lse) results over disjoint keys merged by log-sum-exp; out in float32."""
    (o_a, l_a), (o_b, l_b) = acc, part
    lse = torch.logaddexp(l_a, l_b)
    out = o_a.float() * _weight(l_a, lse)[..., None] + o_b.float() * _weight(l_b, lse)[..., None]
    return [out, lse]


def _empty_acc(q: Tensor):
    B, N, T, _ = q.shape
    return [torch.zeros(q.shape, dtype=torch.float32, device=q.device),
            torch.full((B, N, T), float("-inf"), device=q.device)]


class _CrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv_lengths, ring: _Ring):
        with torch.no_grad():
            if ring.strategy == "lv_xattn":
                mine = ring.local_lengths(kv_lengths, ring.rank)
                (out, lse), _ = ring.loop(
                    [q], _empty_acc(q), None,
                    lambda origin, moving: ring.block(moving[0], k, v, mine),
                    lambda part, acc, _: (_merge(acc, part), None))
            else:
                _, (out, lse) = ring.loop(
                    [k, v], None, _empty_acc(q),
                    lambda origin, kv: ring.block(q, kv[0], kv[1], ring.local_lengths(kv_lengths, origin)),
                    lambda part, _, acc: (None, _merge(acc, part)))
            out = out.to(q.dtype)
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, out, lse, *(() if kv_lengths is None else (kv_lengths,)))
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        if torch.is_grad_enabled():
            raise RuntimeError("mmfa_torch.parallel.cross_attention does not support double backward "
                               "(create_graph=True, or a gradient of a gradient)")
        ring = ctx.ring
        q, k, v, out, lse, *rest = ctx.saved_tensors
        kv_lengths = rest[0] if rest else None
        d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
        d_lse = torch.zeros_like(lse) if d_lse is None else d_lse
        delta = (out.float() * d_out.float()).sum(-1) - d_lse.float()
        zeros = lambda t: torch.zeros(t.shape, dtype=torch.float32, device=t.device)
        with torch.no_grad():
            if ring.strategy == "lv_xattn":
                mine = ring.local_lengths(kv_lengths, ring.rank)

                def compute(origin, bundle):
                    q_b, do_b, lse_b, delta_b = bundle
                    return ring.block_grads(q_b, k, v, mine, do_b, lse_b, delta_b)

                def combine(part, dq, dkv):
                    return [dq[0] + part[0].float()], [dkv[0] + part[1].float(), dkv[1] + part[2].float()]

                (dq,), (dk, dv) = ring.loop([q, d_out, lse, delta], [zeros(q)], [zeros(k), zeros(v)], compute,
                                            combine)
            else:
                def compute(origin, kv):
                    return ring.block_grads(q, kv[0], kv[1], ring.local_lengths(kv_lengths, origin), d_out, lse,
                                            delta)

                def combine(part, dkv, dq):
                    return [dkv[0] + part[1].float(), dkv[1] + part[2].float()], [dq[0] + part[0].float()]

                (dk, dv), (dq,) = ring.loop([k, v], [zeros(k), zeros(v)], [zeros(q)], compute, combine)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None
