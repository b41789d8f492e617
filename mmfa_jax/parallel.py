"""Sequence-parallel attention inside ``jax.shard_map``: LV-XAttn and ring cross-attention, ring
self-attention (zig-zag causal), and K/V recomputation for the backward.

Cross-attention in a vision-language model (Llama 3.2 Vision, Flamingo-style layers) attends a few
thousand text queries to up to a million visual keys. Sharded over ``n`` devices along both
sequences, each device holds a query shard ``Q_d`` (B, Tq, Hq, D) and a key/value shard
``K_d, V_d`` (B, Skv, Hkv, D) with Skv >> Tq. Every query needs every key, so something has to
travel around the ring ``d -> d + 1``:

- ``strategy="ring"`` (Ring Attention, the baseline): queries stay, the K/V blocks travel; each
  device merges its query shard's partial results by log-sum-exp. Per step a device sends
  2 * Skv * Hkv * D elements.
- ``strategy="lv_xattn"`` (LV-XAttn, Chang & Venkataraman, ICML 2025): K/V stay where they are;
  the small query block travels, and with it its partial (output, LSE) accumulator. At step i
  device d holds the query block of device (d - i) mod n, attends it to its own K/V, merges the
  result into the accumulator that arrived with that block and sends both on. After n steps (n
  sends of the accumulator, n - 1 of the query block) every accumulator is back on its home
  device. Per step a device sends the query block, Tq * Hq * D elements in its dtype, and the
  accumulator, Tq * Hq * (D + 1) float32 values, instead of the ring's K/V.

In both the transfer of the next step's block is issued before (and independent of) this step's
attention, and the accumulator that arrives during a step is only needed after its attention, so
XLA's scheduler can overlap communication with compute (the loop is unrolled: ``n`` is static).

The backward (one ``jax.custom_vjp`` per strategy) runs the same pattern once more: the per-block
gradients are the kernels' backward with the *global* output and LSE (the softmax of a block with
the final normaliser is exactly that block's share of the full softmax), so nothing is rescaled.
LV-XAttn moves the query-side bundle (Q, dO, LSE, delta = rowsum(O * dO) - dLSE) with the block's
dQ accumulator, while dK/dV accumulate in place; ring moves the K/V blocks with their dK/dV
accumulators, while dQ accumulates in place.

The Pallas kernels ("pallas", "triton", "interpret") run inside ``jax.shard_map(...,
check_vma=False)``: their ``pallas_call`` outputs carry no varying-axes type yet. ``"xla"`` runs
under either setting.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable

import jax
import jax.numpy as jnp

from mmfa_jax import _autodiff, _checks
from mmfa_jax._checks import ArgumentError, ArgumentTypeError, Options

STRATEGIES = ("lv_xattn", "ring")
F32 = jnp.float32

__all__ = ["STRATEGIES", "cross_attention", "cross_attention_from_features", "recompute_kv", "ring_self_attention", "shard_map", "unzigzag",
           "zigzag"]


def shard_map(f, **kwargs):
    """``jax.shard_map`` where the installed jax has it, else ``jax.experimental.shard_map``'s."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, **kwargs)
    from jax.experimental.shard_map import shard_map as legacy  # pragma: no cover (jax < 0.7)

    if "check_vma" in kwargs:
        kwargs["check_rep"] = kwargs.pop("check_vma")
    return legacy(f, **kwargs)


# ------------------------------------------------------------------------------------------------
# Public functions.


def cross_attention(query, key, value, *, axis_name: Hashable, strategy: str = "lv_xattn", kv_seq_lengths=None,
                    scale: float | None = None, implementation: str | None = None, return_lse: bool = False):
    """Exact cross-attention of sequence-sharded queries over sequence-sharded keys/values.

    Call inside ``jax.shard_map`` with the sequence axes of query and key/value sharded over
    ``axis_name`` (equal shards on every device). There is no causal mask: every query sees every
    valid key.

    Args:
      query: the local query shard, (B, Tq_local, Hq, D) (layout BTNH, as ``mmfa_jax.attention``).
      key, value: the local key/value shards, (B, Skv_local, Hkv, D); Hkv divides Hq (GQA/MQA).
        One dtype for all three: float16, bfloat16 or float32.
      axis_name: the mesh axis the sequences are sharded over; shard d holds positions
        [d * len, (d + 1) * len) of the global sequences, d = ``jax.lax.axis_index(axis_name)``.
      strategy: "lv_xattn" (queries and their accumulators travel, K/V stay) or "ring" (K/V travel).
      kv_seq_lengths: None or (B,) integers: the number of valid keys in the GLOBAL key sequence
        (padding at its end; a shard may be all padding). Replicated (the same on every device).
      scale: logit scale, default 1/sqrt(D).
      implementation: as in ``mmfa_jax.attention``; the Pallas kernels need ``check_vma=False``
        on the enclosing ``shard_map``.
      return_lse: also return the log-sum-exp, (B, Tq_local, Hq) float32 (as ``mmfa_jax.attention``
        gives it in this layout); -inf for rows that see no key.

    Returns:
      The output for the local query shard, (B, Tq_local, Hq, D) in the query's dtype (rows with
      no valid key are zeros), and the LSE if asked. Differentiable in query, key and value
      (first order), with the backward distributed by the same strategy.
    """
    strategy = _checks.choice(strategy, "strategy", STRATEGIES)
    opts = Options.make(scale, False, None, None, implementation, "BTNH", None)
    query, key, value = (_array(x, name) for x, name in ((query, "query"), (key, "key"), (value, "value")))
    d = _checks.attention_dims(query, key, value, "BTNH", xla=not opts.lowering.kernels)
    if kv_seq_lengths is not None:
        kv_seq_lengths = jnp.asarray(kv_seq_lengths)
        _checks.per_example(kv_seq_lengths, "kv_seq_lengths", (d.batch,))
        kv_seq_lengths = kv_seq_lengths.astype(jnp.int32)
    n = _axis_size(axis_name)
    if d.empty:  # nothing to compute (and nothing to send): zeros, LSE -inf
        out, lse = _empty(query, d)
    else:
        ring = _Ring(axis_name, n, opts, d.kv_len)
        fn = _lv_xattn if strategy == "lv_xattn" else _ring_cross
        out, lse = _vma_hint(fn, ring, query, key, value, kv_seq_lengths)
    return (out, jnp.swapaxes(lse, 1, 2)) if return_lse else out


def cross_attention_from_features(query, features, project: Callable, *project_args, axis_name: Hashable,
                                  strategy: str = "lv_xattn", kv_seq_lengths=None, scale: float | None = None,
                                  implementation: str | None = None, return_lse: bool = False):
    """``cross_attention(query, *project(features, *project_args), ...)`` that keeps neither K nor V
    for the backward: its residuals are the features and the projection's arguments, and the
    backward projects K/V again (once) before the attention's own backward, then carries dK/dV
    back through the projection. LV-XAttn's second idea, without recomputing the attention's
    forward (``jax.checkpoint`` around projection and attention would).

    Args:
      query: the local query shard (B, Tq_local, Hq, D).
      features: the local shard of the visual features, e.g. (B, Skv_local, C); any pytree of
        arrays ``project`` takes.
      project: ``project(features, *project_args) -> (key, value)``, each (B, Skv_local, Hkv, D);
        a pure function (it runs twice: forward and backward). Hashable (a module-level function
        or a ``functools.partial`` of one), as jax's static arguments are.
      project_args: the projection's weights (differentiable).
      axis_name, strategy, kv_seq_lengths, scale, implementation, return_lse: as ``cross_attention``.

    Returns:
      As ``cross_attention``; differentiable in query, features and project_args.
    """
    if not callable(project):
        raise ArgumentTypeError(f"project must be a callable features -> (key, value), got {type(project).__name__}")
    strategy = _checks.choice(strategy, "strategy", STRATEGIES)
    opts = Options.make(scale, False, None, None, implementation, "BTNH", None)
    query = _array(query, "query")
    key_shape, value_shape = jax.eval_shape(project, features, *project_args)
    d = _checks.attention_dims(query, key_shape, value_shape, "BTNH", xla=not opts.lowering.kernels)
    if kv_seq_lengths is not None:
        kv_seq_lengths = jnp.asarray(kv_seq_lengths)
        _checks.per_example(kv_seq_lengths, "kv_seq_lengths", (d.batch,))
        kv_seq_lengths = kv_seq_lengths.astype(jnp.int32)
    if d.empty:
        out, lse = _empty(query, d)
    else:
        ring = _Ring(axis_name, _axis_size(axis_name), opts, d.kv_len)
        out, lse = _vma_hint(_from_features, ring, strategy, project, query, features, tuple(project_args),
                             kv_seq_lengths)
    return (out, jnp.swapaxes(lse, 1, 2)) if return_lse else out


def ring_self_attention(query, key, value, *, axis_name: Hashable, is_causal: bool = True,
                        scale: float | None = None, implementation: str | None = None, return_lse: bool = False):
    """Ring self-attention for decoder layers, inside ``jax.shard_map``: K/V blocks travel, queries stay.

    With ``is_causal`` the sequence must be laid out zig-zag for load balance: split the global
    sequence of length 2 * n * c into 2n chunks of c; device d holds chunks d and 2n - 1 - d, in
    that order (``zigzag`` reorders a global array so that an ordinary contiguous sharding gives
    exactly that; ``unzigzag`` undoes it). Then every step but the first costs each device the
    same c x 2c block of work: against a block from an earlier device all of its queries see the
    block's first chunk; against a later device its second chunk of queries sees the whole block.
    Without ``is_causal`` any sharding works (it is ring cross-attention with Tq == Skv).

    Args:
      query: (B, T_local, Hq, D); key, value: (B, T_local, Hkv, D), T_local even when causal.
      axis_name, scale, implementation, return_lse: as in ``cross_attention``.

    Returns:
      (B, T_local, Hq, D) output for the local queries (and the (B, T_local, Hq) LSE if asked);
      differentiable (first order), the backward by the same ring.
    """
    opts = Options.make(scale, False, None, None, implementation, "BTNH", None)
    query, key, value = (_array(x, name) for x, name in ((query, "query"), (key, "key"), (value, "value")))
    d = _checks.attention_dims(query, key, value, "BTNH", xla=not opts.lowering.kernels)
    if d.q_len != d.kv_len:
        raise ArgumentError(f"self-attention needs query and key/value shards of one length, got {d.q_len} and "
                            f"{d.kv_len}")
    if is_causal and d.q_len % 2:
        raise ArgumentError(f"causal ring self-attention holds two zig-zag chunks per device, so the local sequence "
                            f"length must be even, got {d.q_len}")
    n = _axis_size(axis_name)
    if d.empty:
        out, lse = _empty(query, d)
    else:
        ring = _Ring(axis_name, n, opts, d.kv_len)
        if is_causal:
            out, lse = _vma_hint(_zigzag_causal, ring, query, key, value)
        else:
            out, lse = _vma_hint(_ring_cross, ring, query, key, value, None)
    return (out, jnp.swapaxes(lse, 1, 2)) if return_lse else out


def recompute_kv(features, project: Callable, *args):
    """``project(features, *args)`` (the K/V projection of the visual features) under
    ``jax.checkpoint`` with nothing saved, so that the backward recomputes its result from
    ``features`` instead of keeping it.

    The visual features are the same in every cross-attention layer of the model, so keeping
    them once and recomputing each layer's K/V costs a projection per layer in the backward and
    saves the layers' K/V activations (LV-XAttn's second idea). Everything ``project`` computes
    is recomputed; gradients are unchanged.

    Note: an attention whose custom VJP keeps K/V as residuals (``cross_attention`` does: its
    backward needs them) still holds them until the backward. To drop them too without running
    the attention's forward again, use ``cross_attention_from_features(query, features, project,
    *args, ...)``, whose VJP keeps the features and projects K/V again in the backward.
    """
    if not callable(project):
        raise ArgumentTypeError(f"project must be a callable features -> (key, value), got {type(project).__name__}")
    return jax.checkpoint(project, policy=jax.checkpoint_policies.nothing_saveable)(features, *args)


def zigzag(x, n: int, axis: int = 1):
    """Reorders the global sequence axis of ``x`` into 2n chunks laid out as
    [0, 2n-1, 1, 2n-2, ..., n-1, n]: sharded contiguously over n devices, device d then holds
    chunks d and 2n - 1 - d (what causal ``ring_self_attention`` expects). Apply it to the global
    array (a NumPy array or an unsharded one) before sharding it."""
    return jnp.take(x, _zigzag_order(x, n, axis), axis=axis)


def unzigzag(x, n: int, axis: int = 1):
    """The inverse of ``zigzag``: the global sequence order back."""
    order = _zigzag_order(x, n, axis)
    return jnp.take(x, jnp.argsort(order), axis=axis)


def _zigzag_order(x, n, axis):
    n = _checks.integer(n, "n", minimum=1)
    length = x.shape[axis]
    if length % (2 * n):
        raise ArgumentError(f"zig-zag needs a sequence length divisible by 2n = {2 * n}, got {length}")
    c = length // (2 * n)
    chunks = [ch for d in range(n) for ch in (d, 2 * n - 1 - d)]
    return jnp.asarray([ch * c + j for ch in chunks for j in range(c)], jnp.int32)


# ------------------------------------------------------------------------------------------------
# Checks and small pieces.


def _array(x, name):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ArgumentTypeError(f"{name} must be an array, got {type(x).__name__}")
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ArgumentError(f"{name} must be the local shard (B, L, heads, D) of rank 4, got shape {x.shape}")
    return x


def _axis_size(axis_name) -> int:
    try:
        return int(jax.lax.axis_size(axis_name))
    except (NameError, KeyError, ValueError) as e:
        raise ArgumentError(f"axis_name {axis_name!r} is not a mesh axis bound here: call this inside jax.shard_map "
                            f"over a mesh with that axis ({e})") from None


def _vma_hint(fn, *args):
    try:
        return fn(*args)
    except ValueError as e:
        if "check_vma" not in str(e):
            raise
        raise ArgumentError("mmfa's Pallas kernels run inside jax.shard_map(..., check_vma=False) (their outputs carry "
                            "no varying-axes type); pass check_vma=False or implementation='xla'") from e


def _empty(query, d: _checks.Dims):
    return (jnp.zeros(query.shape, query.dtype),
            jnp.full((d.batch, d.q_heads, d.q_len), -jnp.inf, F32))


@dataclasses.dataclass(frozen=True)
class _Ring:
    """The static side of a ring call: the axis, its size, the per-block options, the local
    key/value length."""

    axis_name: Hashable
    n: int
    opts: Options
    kv_len: int

    @property
    def causal_opts(self) -> Options:
        return dataclasses.replace(self.opts, is_causal=True)

    def send(self, tree):
        """One hop d -> d + 1 of every array in ``tree``."""
        perm = [(j, (j + 1) % self.n) for j in range(self.n)]
        return jax.lax.ppermute(tree, self.axis_name, perm)

    def local_lengths(self, kv_lengths, origin):
        """The valid key count of the block that started on device ``origin`` (None: all)."""
        if kv_lengths is None:
            return None
        return jnp.clip(kv_lengths - origin * self.kv_len, 0, self.kv_len).astype(jnp.int32)


def _ring_loop(ring: _Ring, moving, travelling, staying, compute, combine):
    """n steps around the ring d -> d + 1.

    At step i this device holds ``moving`` of origin (d - i) mod n and ``travelling``, the
    accumulator that goes with it. ``compute(i, origin, moving)`` makes the step's contribution;
    ``combine(part, travelling, staying)`` folds it into both accumulators. The next ``moving`` is
    sent before (and independently of) the compute; ``travelling`` is sent after the combine, n
    times in all, which brings it back to the device it started from. ``staying`` never moves.
    Returns (travelling, staying)."""
    me = jax.lax.axis_index(ring.axis_name)
    for i in range(ring.n):
        upcoming = ring.send(moving) if i < ring.n - 1 else None  # issued first: overlaps the compute
        part = compute(i, (me - i) % ring.n, moving)
        travelling, staying = combine(part, travelling, staying)
        if travelling is not None:
            travelling = ring.send(travelling)
        moving = upcoming
    return travelling, staying


def _weight(lse_part, lse):
    """exp(lse_part - lse), 0 where both are -inf (a row that sees nothing yet)."""
    return jnp.where(lse == -jnp.inf, 0.0, jnp.exp(lse_part - lse))


def _bt(w):
    """(B, N, T) weights as a (B, T, N, 1) factor of BTNH arrays."""
    return jnp.swapaxes(w, 1, 2)[..., None]


def _merge(acc, part):
    """Two partial results (out, lse (B, N, T)) over disjoint keys, merged by log-sum-exp; the
    output in float32. NaN in either reaches the merged row."""
    (o_a, l_a), (o_b, l_b) = acc, part
    lse = jnp.logaddexp(l_a, l_b)
    out = o_a.astype(F32) * _bt(_weight(l_a, lse)) + o_b.astype(F32) * _bt(_weight(l_b, lse))
    return out, lse


def _empty_acc(q):
    B, T, N, _ = q.shape
    return jnp.zeros(q.shape, F32), jnp.full((B, N, T), -jnp.inf, F32)


def _block_forward(opts: Options, q, k, v, kv_len):
    """(out like q, lse (B, N, T) float32) of q against one key/value block, mmfa's kernels (or XLA)."""
    return _autodiff.forward(opts, q, k, v, None, None, None, None, kv_len)


def _block_grads(opts: Options, q, k, v, kv_len, d_out, lse, delta):
    """(dq, dk, dv): one block's share of the gradients of the full attention, given the global
    lse and delta = rowsum(out * d_out) - d_lse (both (B, N, T) float32).

    With the global normaliser, p = exp(s - lse) over a block's keys is that block's part of the
    full softmax, so the kernels' backward with (lse, delta) gives exactly the block's share (it
    takes out and d_lse and forms delta itself: out = 0 and d_lse = -delta give it ours). The XLA
    backend differentiates its own forward instead, so there the block's local result (o_b, lse_b)
    is recomputed and given the cotangents the LSE merge passes it: w * d_out and
    w * (rowsum(o_b * d_out) - delta), w = exp(lse_b - lse)."""
    if opts.lowering.kernels:
        dq, dk, dv, _ = _autodiff.backward(opts, q, k, v, None, None, None, None, kv_len, jnp.zeros_like(d_out), lse,
                                           d_out, -delta)
        return dq, dk, dv
    (o_b, lse_b), vjp = jax.vjp(lambda q, k, v: _block_forward(opts, q, k, v, kv_len), q, k, v)
    w = _weight(lse_b, lse)
    d_o_b = (_bt(w) * d_out.astype(F32)).astype(o_b.dtype)
    rowdot = jnp.swapaxes((o_b.astype(F32) * d_out.astype(F32)).sum(-1), 1, 2)
    return vjp((d_o_b, w * (rowdot - delta)))


def _add(acc, x):
    return acc + x.astype(F32)


# ------------------------------------------------------------------------------------------------
# LV-XAttn: the query block and its accumulators travel, K/V stay.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lv_xattn(ring: _Ring, q, k, v, kv_lengths):
    return _lv_xattn_fwd(ring, q, k, v, kv_lengths)[0]


def _lv_xattn_fwd(ring: _Ring, q, k, v, kv_lengths):
    me = jax.lax.axis_index(ring.axis_name)
    mine = ring.local_lengths(kv_lengths, me)

    def compute(i, origin, q_block):
        return _block_forward(ring.opts, q_block, k, v, mine)

    def combine(part, acc, _):
        return _merge(acc, part), None

    (out, lse), _ = _ring_loop(ring, q, _empty_acc(q), None, compute, combine)
    out = out.astype(q.dtype)
    return (out, lse), (q, k, v, kv_lengths, out, lse)


def _lv_xattn_bwd(ring: _Ring, residuals, cotangents):
    q, k, v, kv_lengths, out, lse = residuals
    d_out, d_lse = cotangents
    delta = _autodiff.backward_delta(out, d_out, d_lse, "BTNH")
    mine = ring.local_lengths(kv_lengths, jax.lax.axis_index(ring.axis_name))

    def compute(i, origin, bundle):
        q_block, do_block, lse_block, delta_block = bundle
        return _block_grads(ring.opts, q_block, k, v, mine, do_block, lse_block, delta_block)

    def combine(part, dq, dkv):
        dq_part, dk_part, dv_part = part
        return _add(dq, dq_part), (_add(dkv[0], dk_part), _add(dkv[1], dv_part))

    zeros = lambda x: jnp.zeros(x.shape, F32)
    dq, (dk, dv) = _ring_loop(ring, (q, d_out, lse, delta), zeros(q), (zeros(k), zeros(v)), compute, combine)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_lv_xattn.defvjp(_lv_xattn_fwd, _lv_xattn_bwd)


# ------------------------------------------------------------------------------------------------
# K/V projected inside the attention's VJP: kept as features, projected again in the backward.


def _strategy_vjp(strategy: str):
    return (_lv_xattn_fwd, _lv_xattn_bwd) if strategy == "lv_xattn" else (_ring_cross_fwd, _ring_cross_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _from_features(ring: _Ring, strategy: str, project, q, features, args, kv_lengths):
    return _from_features_fwd(ring, strategy, project, q, features, args, kv_lengths)[0]


def _from_features_fwd(ring: _Ring, strategy: str, project, q, features, args, kv_lengths):
    k, v = project(features, *args)
    (out, lse), _ = _strategy_vjp(strategy)[0](ring, q, k, v, kv_lengths)
    return (out, lse), (q, features, args, kv_lengths, out, lse)


def _from_features_bwd(ring: _Ring, strategy: str, project, residuals, cotangents):
    q, features, args, kv_lengths, out, lse = residuals
    (k, v), pull = jax.vjp(lambda f, a: project(f, *a), features, args)
    dq, dk, dv, _ = _strategy_vjp(strategy)[1](ring, (q, k, v, kv_lengths, out, lse), cotangents)
    d_features, d_args = pull((dk, dv))
    return dq, d_features, d_args, None


_from_features.defvjp(_from_features_fwd, _from_features_bwd)


# ------------------------------------------------------------------------------------------------
# Ring: K/V blocks travel (with their dK/dV accumulators in the backward), queries stay.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_cross(ring: _Ring, q, k, v, kv_lengths):
    return _ring_cross_fwd(ring, q, k, v, kv_lengths)[0]


def _ring_cross_fwd(ring: _Ring, q, k, v, kv_lengths):
    def compute(i, origin, kv):
        return _block_forward(ring.opts, q, kv[0], kv[1], ring.local_lengths(kv_lengths, origin))

    def combine(part, _, acc):
        return None, _merge(acc, part)

    _, (out, lse) = _ring_loop(ring, (k, v), None, _empty_acc(q), compute, combine)
    out = out.astype(q.dtype)
    return (out, lse), (q, k, v, kv_lengths, out, lse)


def _ring_cross_bwd(ring: _Ring, residuals, cotangents):
    q, k, v, kv_lengths, out, lse = residuals
    d_out, d_lse = cotangents
    delta = _autodiff.backward_delta(out, d_out, d_lse, "BTNH")

    def compute(i, origin, kv):
        return _block_grads(ring.opts, q, kv[0], kv[1], ring.local_lengths(kv_lengths, origin), d_out, lse, delta)

    return _ring_backward_loop(ring, q, k, v, compute)


def _ring_backward_loop(ring: _Ring, q, k, v, compute):
    def combine(part, dkv, dq):
        dq_part, dk_part, dv_part = part
        return (_add(dkv[0], dk_part), _add(dkv[1], dv_part)), _add(dq, dq_part)

    zeros = lambda x: jnp.zeros(x.shape, F32)
    (dk, dv), dq = _ring_loop(ring, (k, v), (zeros(k), zeros(v)), zeros(q), compute, combine)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring_cross.defvjp(_ring_cross_fwd, _ring_cross_bwd)


# ------------------------------------------------------------------------------------------------
# Causal ring self-attention over zig-zag chunks.
#
# Device d holds query/key chunks (d, 2n-1-d) of the global sequence, in increasing position, so
# at step 0 (its own block) the causal mask is the plain local triangle. Against the block of
# device o != d: if o < d, chunk o precedes both query chunks and chunk 2n-1-o follows both, so
# all queries see exactly the first key chunk; if o > d, both key chunks follow chunk d and
# precede chunk 2n-1-d, so exactly the second query chunk sees the whole block. Either way one
# unmasked c x 2c block: the same work on every device at every step.


def _causal_zigzag_fwd(ring: _Ring, q, k, v):
    me = jax.lax.axis_index(ring.axis_name)
    c = q.shape[1] // 2

    def compute(i, origin, kv):
        k_b, v_b = kv
        if i == 0:
            return _block_forward(ring.causal_opts, q, k_b, v_b, None)

        def earlier():  # every query sees the block's first chunk
            return _block_forward(ring.opts, q, k_b[:, :c], v_b[:, :c], None)

        def later():  # the second query chunk sees the whole block
            o2, l2 = _block_forward(ring.opts, q[:, c:], k_b, v_b, None)
            o1, l1 = _empty_acc(q[:, :c])
            return jnp.concatenate([o1.astype(o2.dtype), o2], axis=1), jnp.concatenate([l1, l2], axis=2)

        return jax.lax.cond(origin < me, earlier, later)

    def combine(part, _, acc):
        return None, _merge(acc, part)

    _, (out, lse) = _ring_loop(ring, (k, v), None, _empty_acc(q), compute, combine)
    out = out.astype(q.dtype)
    return (out, lse), (q, k, v, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _zigzag_causal(ring: _Ring, q, k, v):
    return _causal_zigzag_fwd(ring, q, k, v)[0]


def _zigzag_causal_bwd(ring: _Ring, residuals, cotangents):
    q, k, v, out, lse = residuals
    d_out, d_lse = cotangents
    delta = _autodiff.backward_delta(out, d_out, d_lse, "BTNH")
    me = jax.lax.axis_index(ring.axis_name)
    c = q.shape[1] // 2

    def compute(i, origin, kv):
        k_b, v_b = kv
        if i == 0:
            return _block_grads(ring.causal_opts, q, k_b, v_b, None, d_out, lse, delta)

        def earlier():
            dq, dk1, dv1 = _block_grads(ring.opts, q, k_b[:, :c], v_b[:, :c], None, d_out, lse, delta)
            return dq, _pad_second(dk1), _pad_second(dv1)

        def later():
            dq2, dk, dv = _block_grads(ring.opts, q[:, c:], k_b, v_b, None, d_out[:, c:], lse[:, :, c:],
                                       delta[:, :, c:])
            return jnp.concatenate([jnp.zeros_like(dq2), dq2], axis=1), dk, dv

        return jax.lax.cond(origin < me, earlier, later)

    dq, dk, dv, _ = _ring_backward_loop(ring, q, k, v, compute)
    return dq, dk, dv


def _pad_second(x):
    """(B, c, ...) -> (B, 2c, ...) with zeros for the second chunk."""
    return jnp.concatenate([x, jnp.zeros_like(x)], axis=1)


def _zigzag_causal_fwd(ring: _Ring, q, k, v):
    return _causal_zigzag_fwd(ring, q, k, v)


_zigzag_causal.defvjp(_zigzag_causal_fwd, _zigzag_causal_bwd)
