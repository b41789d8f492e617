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

Masks: ``block_mask(query_shard, kv_shard)`` gives the visibility of one (query block, key block)
pair; each rank evaluates it for the blocks it computes, so no mask travels (Mllama's
cross-attention mask, for one, is replicated and small before its expansion to keys).

K/V recomputation (LV-XAttn's second idea): ``recompute_kv(features, project, *args)`` runs the
K/V projection of the visual features without keeping its intermediates, and ``cross_attention``
keeps no K/V shards of its own when they come from it: its backward asks the projection for them
again (once; the same recomputed graph then carries dK/dV back to the features and the
projection's weights). What stays between forward and backward is the features, which every
cross-attention layer of the model shares.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

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

__all__ = ["STRATEGIES", "cross_attention", "recompute_kv"]


def cross_attention(query: Tensor, key: Tensor, value: Tensor, *, group=None, strategy: str = "lv_xattn",
                    kv_seq_lengths: Tensor | None = None, block_mask: Callable[[int, int], Tensor | None] | None = None,
                    scale: float | None = None, implementation: str | None = None, return_lse: bool = False):
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
      block_mask: None, or a callable ``block_mask(query_shard, kv_shard)`` (group ranks: the
        shards' home ranks) returning None (all keys of that block visible) or a bool tensor
        (B or 1, Hq or 1, Tq_local, Skv_local), True where the query attends the key. Each rank
        calls it for the blocks it computes (LV-XAttn: every query shard against its own keys;
        ring: its own queries against every key shard), in the forward and again in the
        backward, so it must give the same answer both times. Combined with kv_seq_lengths by
        "and". A row that sees no key anywhere gives zeros and LSE -inf.
      scale: logit scale, default 1/sqrt(D).
      implementation: as in ``mmfa_torch.scaled_dot_product_attention``.
      return_lse: also return the (B, Hq, Tq_local) float32 log-sum-exp (-inf: no valid key).

    Returns:
      (B, Hq, Tq_local, D) like query (zeros for rows with no valid key), and the LSE if asked;
      differentiable in query, key and value. When key and value are the two outputs of one
      ``recompute_kv`` call, they are not kept for the backward but recomputed there.
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
    if block_mask is not None and not callable(block_mask):
        raise ArgumentTypeError(f"block_mask must be None or a callable (query_shard, kv_shard) -> bool tensor or "
                                f"None, got {type(block_mask).__name__}")
    if scale is not None:
        scale = _checks.real(scale, "scale")
    if not dist.is_available() or not dist.is_initialized():
        raise ArgumentError("cross_attention needs an initialised torch.distributed process group "
                            "(torch.distributed.init_process_group)")
    ring = _Ring(group, strategy, scale, implementation, d.kv_len, block_mask, (d.batch, d.q_heads, d.q_len, d.kv_len))
    if d.empty:
        out, lse = _attention._Empty.apply(query, key, value)  # zeros, LSE -inf, zero gradients
    else:
        recipe = _Recipe.of(key, value)
        out, lse = _CrossAttention.apply(query, key, value, kv_seq_lengths, ring, recipe)
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------------------------
# The ring: peers, messages, the step loop.


class _Ring:
    def __init__(self, group, strategy: str, scale, implementation, kv_len: int, block_mask=None, dims=None):
        self.group, self.strategy, self.scale, self.implementation, self.kv_len = (
            group, strategy, scale, implementation, kv_len)
        self.block_mask, self.dims = block_mask, dims
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

    def mask(self, q_origin: int, kv_origin: int, device) -> Tensor | None:
        """``block_mask(q_origin, kv_origin)``, checked: None or a bool (B|1, Hq|1, T, S) tensor."""
        if self.block_mask is None:
            return None
        m = self.block_mask(q_origin, kv_origin)
        if m is None:
            return None
        B, N, T, S = self.dims
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise ArgumentTypeError(f"block_mask({q_origin}, {kv_origin}) must return None or a bool tensor, got "
                                    f"{getattr(m, 'dtype', type(m).__name__)}")
        if m.dim() != 4 or m.shape[0] not in (1, B) or m.shape[1] not in (1, N) or tuple(m.shape[2:]) != (T, S):
            raise ArgumentError(f"block_mask({q_origin}, {kv_origin}) must return a ({B} or 1, {N} or 1, {T}, {S}) "
                                f"bool tensor (batch, query heads, local queries, local keys), got shape "
                                f"{tuple(m.shape)}")
        return m.to(device).contiguous()

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

    def block(self, q, k, v, kv_len, mask=None):
        """(out, lse (B, Hq, T) float32) of q against one key/value block (``mask``: None or bool
        (B|1, Hq|1, T, S), True where visible)."""
        from mmfa_torch import scaled_dot_product_attention

        return scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                            enable_gqa=q.shape[1] != k.shape[1], key_value_seq_lengths=kv_len,
                                            return_lse=True, implementation=self.implementation)

    def block_grads(self, q, k, v, kv_len, d_out, lse, delta, mask=None):
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
            dq, dk, dv, _ = ops.backward(q, k, v, None, mask, None, None, None, kv_len, torch.zeros_like(d_out),
                                         lse.contiguous(), d_out, (-delta).contiguous(), *static)
            return dq, dk, dv
        with torch.enable_grad():
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            o_b, lse_b = self.block(qg, kg, vg, kv_len, mask)
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
    def forward(ctx, q, k, v, kv_lengths, ring: _Ring, recipe):
        with torch.no_grad():
            if ring.strategy == "lv_xattn":
                mine = ring.local_lengths(kv_lengths, ring.rank)
                (out, lse), _ = ring.loop(
                    [q], _empty_acc(q), None,
                    lambda origin, moving: ring.block(moving[0], k, v, mine, ring.mask(origin, ring.rank, q.device)),
                    lambda part, acc, _: (_merge(acc, part), None))
            else:
                _, (out, lse) = ring.loop(
                    [k, v], None, _empty_acc(q),
                    lambda origin, kv: ring.block(q, kv[0], kv[1], ring.local_lengths(kv_lengths, origin),
                                                  ring.mask(ring.rank, origin, q.device)),
                    lambda part, _, acc: (None, _merge(acc, part)))
            out = out.to(q.dtype)
        ctx.ring, ctx.recipe = ring, recipe
        lengths = () if kv_lengths is None else (kv_lengths,)
        # K/V that recompute_kv made are not kept: the backward has the projection make them again.
        kv = () if recipe is not None else (k, v)
        ctx.save_for_backward(q, out, lse, *kv, *lengths)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        if torch.is_grad_enabled():
            raise RuntimeError("mmfa_torch.parallel.cross_attention does not support double backward "
                               "(create_graph=True, or a gradient of a gradient)")
        ring = ctx.ring
        q, out, lse, *rest = ctx.saved_tensors
        if ctx.recipe is not None:
            _, k, v = _recomputed(ctx.recipe)
            k, v = k.detach(), v.detach()
        else:
            k, v, *rest = rest
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
                    return ring.block_grads(q_b, k, v, mine, do_b, lse_b, delta_b,
                                            ring.mask(origin, ring.rank, q.device))

                def combine(part, dq, dkv):
                    return [dq[0] + part[0].float()], [dkv[0] + part[1].float(), dkv[1] + part[2].float()]

                (dq,), (dk, dv) = ring.loop([q, d_out, lse, delta], [zeros(q)], [zeros(k), zeros(v)], compute,
                                            combine)
            else:
                def compute(origin, kv):
                    return ring.block_grads(q, kv[0], kv[1], ring.local_lengths(kv_lengths, origin), d_out, lse,
                                            delta, ring.mask(ring.rank, origin, q.device))

                def combine(part, dkv, dq):
                    return [dkv[0] + part[1].float(), dkv[1] + part[2].float()], [dq[0] + part[0].float()]

                (dk, dv), (dq,) = ring.loop([k, v], [zeros(k), zeros(v)], [zeros(q)], compute, combine)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


# ------------------------------------------------------------------------------------------------
# K/V recomputation.


def recompute_kv(features: Tensor, project: Callable, *args):
    """``project(features, *args)`` -> (key, value), the K/V projection of the visual features,
    recomputed in the backward instead of kept (the torch twin of ``mmfa_jax.parallel.recompute_kv``).

    The visual features are the same in every cross-attention layer of the model, so keeping them
    once and recomputing each layer's K/V in the backward costs one projection per layer and saves
    the layers' K/V activations and the projection's intermediates (a norm's input, say).

    - Autograd keeps ``features`` and the tensors among ``args`` (the projection's weights, which
      are alive anyway), nothing that ``project`` computes.
    - ``mmfa_torch.parallel.cross_attention`` given the two outputs of one call as key and value
      keeps no K/V either: its backward recomputes them through this call, and the same recomputed
      graph then carries dK/dV back to ``features`` and ``args`` (one recomputation in all). Any
      other consumer that saves K/V for its backward (torch's SDPA, say) keeps them as usual.

    Args:
      features: the visual features, e.g. (B, S, C) (what ``project`` takes).
      project: a callable ``project(features, *args) -> (key, value)``, e.g. key/value
        (B, Hkv, S, D) for ``cross_attention``; deterministic (it runs again in the backward, with
        the same inputs). Weights it reads from a module rather than from ``args`` get no gradient
        (pass them in ``args`` to have them differentiated).
      args: further inputs of ``project``; tensors among them are differentiated.

    Returns:
      (key, value) as ``project`` gives them; differentiable in ``features`` and the tensors of
      ``args`` (first order).
    """
    if not callable(project):
        raise ArgumentTypeError(f"project must be a callable (features, *args) -> (key, value), got "
                                f"{type(project).__name__}")
    if not isinstance(features, torch.Tensor):
        raise ArgumentTypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    where = [isinstance(a, torch.Tensor) for a in args]
    others = [a for a in args if not isinstance(a, torch.Tensor)]
    return _RecomputeKV.apply(project, where, others, features, *tensors)


class _RecomputeKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, project, where, others, features, *tensors):
        ctx.project, ctx.where, ctx.others, ctx.graph = project, where, others, None
        with torch.no_grad():
            out = project(features, *_args(where, others, tensors))
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
            raise ArgumentTypeError(f"project must return (key, value), two tensors; got {type(out).__name__}")
        ctx.save_for_backward(features, *tensors)
        return out[0], out[1]

    @staticmethod
    def backward(ctx, d_key, d_value):
        inputs, k, v = _recomputed(ctx)
        ctx.graph = None  # the recomputed graph has served both backwards: let it go
        wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
        outs, grads = [], []
        for o, g in ((k, d_key), (v, d_value)):
            if g is not None and o.requires_grad:
                outs.append(o)
                grads.append(g)
        found = torch.autograd.grad(outs, [inputs[i] for i in wanted], grads, allow_unused=True) if outs else []
        result = [None] * len(inputs)
        for i, g in zip(wanted, found):
            result[i] = g
        return (None, None, None, *result)


def _args(where, others, tensors):
    tensors, others = iter(tensors), iter(others)
    return [next(tensors) if is_tensor else next(others) for is_tensor in where]


def _recomputed(ctx):
    """(inputs, key, value) of ``project`` run again with autograd on (once per backward: the
    attention's backward asks first for the values, recompute_kv's backward then uses the graph)."""
    if ctx.graph is None:
        features, *tensors = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) for t, need in zip([features, *tensors], ctx.needs_input_grad[3:])]
        with torch.enable_grad():
            k, v = ctx.project(inputs[0], *_args(ctx.where, ctx.others, inputs[1:]))
        ctx.graph = (inputs, k, v)
    return ctx.graph


class _Recipe:
    @staticmethod
    def of(key: Tensor, value: Tensor):
        """The ``_RecomputeKV`` node that made key and value (the same call), or None."""
        node = key.grad_fn
        if node is None or node is not value.grad_fn or not isinstance(node, _RecomputeKV._backward_cls):
            return None
        if not (torch.is_grad_enabled() and (key.requires_grad or value.requires_grad)):
            return None
        return node
