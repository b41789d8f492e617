"""mmfa_jax.parallel: LV-XAttn and ring cross-attention, zig-zag ring self-attention, K/V recomputation,
against the float64 reference, on 2 and 4 CPU devices.

jax fixes its CPU device count when its backend starts (``--xla_force_host_platform_device_count``
in XLA_FLAGS), and in a pytest run some other module may already have started it with one
device. So the multi-device tests run in a subprocess: ``test_on_four_cpu_devices`` starts
``pytest`` on this file with XLA_FLAGS set and MMFA_PARALLEL_JAX=1, which makes the tests marked
``@multi_device`` collectable there (and only there); the session seed (MMFA_TEST_SEED) is passed
on, so a failing run replays. To run them directly (one line per test):

    XLA_FLAGS=--xla_force_host_platform_device_count=4 MMFA_PARALLEL_JAX=1 .venv/bin/pytest tests/test_parallel_jax.py

The argument checks run in the main process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from reference import attention_reference, attention_reference_grads

from mmfa_jax import parallel
from mmfa_jax._checks import ArgumentError, ArgumentTypeError

INNER = os.environ.get("MMFA_PARALLEL_JAX") == "1"
DEVICES = 4
SEQ = P(None, "x")  # the sequence axis (1) of BTNH arrays and of (B, T, N) LSEs, sharded


def multi_device(fn):
    """Collected only in the subprocess that has DEVICES CPU devices."""
    fn.__test__ = INNER
    return fn


def single_device(fn):
    """Collected only in the main process (the subprocess would repeat it)."""
    fn.__test__ = not INNER
    return fn


# ------------------------------------------------------------------------------------------------
# The subprocess.


@pytest.mark.skipif(INNER, reason="this is the subprocess")
def test_on_four_cpu_devices():
    # XLA's backend optimisation level 0: these small programs compile faster and compute the same.
    flags = f" --xla_force_host_platform_device_count={DEVICES} --xla_backend_optimization_level=0"
    env = dict(os.environ, MMFA_PARALLEL_JAX="1", JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + flags)
    env.pop("PYTEST_XDIST_WORKER", None)
    cmd = [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-W", "ignore::DeprecationWarning"]
    r = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=900,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, f"multi-device tests failed (rc {r.returncode}):\n{r.stdout[-20000:]}\n{r.stderr[-5000:]}"
    assert " passed" in r.stdout, r.stdout[-3000:]


# ------------------------------------------------------------------------------------------------
# Helpers.


def mesh(n: int):
    return jax.make_mesh((n,), ("x",), devices=jax.devices()[:n], axis_types=(jax.sharding.AxisType.Auto,))


def sharded_cross(n, strategy, impl, *, lengths=None, scale=None):
    """f(q, k, v) -> global (out, lse (B, T, N)) of cross_attention run on n devices."""
    def local(q, k, v, lens):
        return parallel.cross_attention(q, k, v, axis_name="x", strategy=strategy, kv_seq_lengths=lens, scale=scale,
                                        implementation=impl, return_lse=True)

    sm = parallel.shard_map(local, mesh=mesh(n), in_specs=(SEQ, SEQ, SEQ, P()), out_specs=(SEQ, SEQ),
                            check_vma=impl == "xla")
    return lambda q, k, v: sm(q, k, v, lengths)


def data(rng, B, T, S, N, K, H, dtype=jnp.float32):
    def normal(shape):
        x = jnp.asarray(rng.standard_normal(shape), dtype)
        return x, np.asarray(x.astype(jnp.float32), np.float64)

    (q, q64), (k, k64), (v, v64) = normal((B, T, N, H)), normal((B, S, K, H)), normal((B, S, K, H))
    return (q, k, v), (q64, k64, v64)


def padded_lengths(B, S, s_local):
    """Valid global key counts: all, the last shard all padding (and one more key), none, ..."""
    choices = [S, S - s_local - 1, 0, S - 1]
    return np.array([choices[b % len(choices)] for b in range(B)], np.int32)


def check_forward_and_grads(f, arrays, refs, lengths, close, tol, rng, what, dtype=jnp.float32, **ref_kw):
    """f's output, LSE and gradients (of sum(out * d_out) + sum(lse * d_lse) over the finite LSEs)
    against the reference; one jitted program for all three."""
    q, k, v = arrays
    q64, k64, v64 = refs
    d_out = rng.standard_normal(q.shape)
    d_lse = rng.standard_normal(q.shape[:3])

    @jax.jit
    def run(q, k, v):
        (out, lse), vjp = jax.vjp(f, q, k, v)
        return out, lse, vjp((jnp.asarray(d_out, out.dtype), jnp.where(jnp.isinf(lse), 0.0, d_lse)))

    out, lse, grads = run(q, k, v)
    r_out, r_lse = attention_reference(q64, k64, v64, kv_lengths=lengths, **ref_kw)
    close(out, r_out, tol(dtype), f"{what} out")
    close(lse, r_lse, tol(dtype), f"{what} lse")
    dead = np.isinf(r_lse)
    assert (np.asarray(out.astype(jnp.float32))[dead] == 0).all(), f"{what}: rows without keys must be zeros"
    want = attention_reference_grads(q64, k64, v64, d_out, d_lse, kv_lengths=lengths, **ref_kw)[:3]
    for name, g, w in zip(("dq", "dk", "dv"), grads, want):
        assert g.dtype == dtype
        close(g, w, tol(dtype, grad=True), f"{what} {name}")


# ------------------------------------------------------------------------------------------------
# Cross-attention.


@multi_device
@pytest.mark.parametrize("strategy", parallel.STRATEGIES)
def test_cross_attention_matches_reference(strategy, impl, rng, close, tol):
    """4 devices, GQA 8/2 (tiny 4/2 in the interpreter), odd local lengths, padded key sequences (a
    shard all padding, an example with no valid key): forward, LSE and gradients (through the LSE
    too). (2 devices: the bfloat16, MQA, self-attention and recompute tests.)"""
    n = 4
    if impl == "interpret":
        B, t, s, N, K, H = 2, 2, 3, 4, 2, 8
    else:
        B, t, s, N, K, H = 3, 3, 5, 8, 2, 16
    lengths = padded_lengths(B, n * s, s)
    arrays, refs = data(rng, B, n * t, n * s, N, K, H)
    f = sharded_cross(n, strategy, impl, lengths=jnp.asarray(lengths))
    check_forward_and_grads(f, arrays, refs, lengths, close, tol, rng, f"{strategy} n={n}")


@multi_device
@pytest.mark.parametrize("strategy", parallel.STRATEGIES)
def test_cross_attention_bfloat16(strategy, rng, close, tol):
    n, B, t, s, N, K, H = 2, 2, 4, 8, 4, 2, 32
    lengths = padded_lengths(B, n * s, s)
    arrays, refs = data(rng, B, n * t, n * s, N, K, H, jnp.bfloat16)
    f = sharded_cross(n, strategy, "xla", lengths=jnp.asarray(lengths))
    check_forward_and_grads(f, arrays, refs, lengths, close, tol, rng, f"{strategy} bf16", jnp.bfloat16)


@multi_device
@pytest.mark.parametrize("strategy", parallel.STRATEGIES)
def test_cross_attention_mqa_scale_no_lengths(strategy, rng, close, tol):
    n, B, t, s, N, K, H = 2, 1, 2, 6, 3, 1, 8
    arrays, refs = data(rng, B, n * t, n * s, N, K, H)
    f = sharded_cross(n, strategy, "xla", scale=0.37)
    check_forward_and_grads(f, arrays, refs, None, close, tol, rng, f"{strategy} mqa", scale=0.37)


@multi_device
@pytest.mark.parametrize("strategy", parallel.STRATEGIES)
def test_strategies_agree_and_output_only(strategy, rng, close, tol):
    """return_lse=False gives the output alone, the same as the reference."""
    n, B, t, s, N, K, H = 4, 2, 2, 4, 4, 2, 8
    (q, k, v), (q64, k64, v64) = data(rng, B, n * t, n * s, N, K, H)
    f = parallel.shard_map(
        lambda q, k, v: parallel.cross_attention(q, k, v, axis_name="x", strategy=strategy, implementation="xla"),
        mesh=mesh(n), in_specs=(SEQ, SEQ, SEQ), out_specs=SEQ)
    out = jax.jit(f)(q, k, v)
    close(out, attention_reference(q64, k64, v64)[0], tol(jnp.float32), "out")


@multi_device
@pytest.mark.parametrize("strategy", parallel.STRATEGIES)
def test_nan_rules(strategy, rng):
    """A NaN reaches exactly the outputs that depend on it: a query row's own row; a valid key's
    every row of its example; a key in the padding nothing."""
    n, B, t, s, N, K, H = 4, 3, 2, 3, 2, 1, 8
    S = n * s
    (q, k, v), _ = data(rng, B, n * t, S, N, K, H)
    lengths = jnp.asarray([S - s, S - s, S], jnp.int32)  # examples 0, 1: the last shard is padding
    q = q.at[0, 5, 1, 0].set(jnp.nan)          # example 0: one query row, one head
    k = k.at[1, S - 1, 0, 0].set(jnp.nan)      # example 1: a key in the padding
    v = v.at[2, 4, 0, 0].set(jnp.nan)          # example 2: a valid value row
    out, lse = jax.jit(sharded_cross(n, strategy, "xla", lengths=lengths))(q, k, v)
    out, lse = np.asarray(out), np.asarray(lse)
    nan_out = np.isnan(out).any(axis=-1)  # (B, T, N)
    assert nan_out[0, 5, 1] and nan_out[0].sum() == 1, "a NaN query reaches its own row only"
    assert not np.isnan(out[1]).any() and not np.isnan(lse[1]).any(), "a NaN key in the padding reaches nothing"
    assert nan_out[2].all() and not np.isnan(lse[2]).any(), "a NaN value row reaches every output row, not the LSE"


def _ppermutes(jaxpr):
    """(the jaxpr holding the ring, its ppermute equations), searched through nested jaxprs."""
    found = [e for e in jaxpr.eqns if e.primitive.name == "ppermute"]
    if found:
        return jaxpr, found
    for e in jaxpr.eqns:
        for p in e.params.values():
            inner = getattr(p, "jaxpr", p)
            if hasattr(inner, "eqns"):
                got = _ppermutes(inner)
                if got[1]:
                    return got
    return jaxpr, []


@multi_device
@pytest.mark.parametrize("strategy", parallel.STRATEGIES)
def test_communication_pattern(strategy):
    """What travels: LV-XAttn sends the query block n - 1 times and its (out, lse) accumulator n
    times, never a K/V-sized array; ring sends K and V n - 1 times. The block sent on at each step
    is the one just received (or the input), never an output of the step's attention: the
    transfer does not wait for the compute."""
    n, B, t, s, N, K, H = 4, 1, 2, 16, 4, 2, 8
    q = jax.ShapeDtypeStruct((B, n * t, N, H), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, n * s, K, H), jnp.bfloat16)
    f = sharded_cross(n, strategy, "xla")
    jaxpr, perms = _ppermutes(jax.make_jaxpr(f)(q, kv, kv).jaxpr)
    shapes = [tuple(x.aval.shape) for e in perms for x in e.invars]  # one array per ppermute or several
    dtypes = [x.aval.dtype for e in perms for x in e.invars]
    q_local, kv_local, lse_local = (B, t, N, H), (B, s, K, H), (B, N, t)
    if strategy == "lv_xattn":
        moving = [e for e in perms if e.invars[0].aval.dtype == jnp.bfloat16]
        assert sorted(shapes) == sorted([q_local] * (2 * n - 1) + [lse_local] * n), shapes
        assert dtypes.count(jnp.bfloat16) == n - 1, "the query block travels in its dtype, n - 1 times"
    else:
        moving = perms
        assert shapes == [kv_local] * 2 * (n - 1), shapes
    sources = set(map(id, jaxpr.invars)) | {id(v) for e in moving for v in e.outvars}
    assert all(id(v) in sources for e in moving for v in e.invars), "a moving block waited on a computation"


# ------------------------------------------------------------------------------------------------
# Ring self-attention.


def sharded_self(n, impl, causal):
    local = lambda q, k, v: parallel.ring_self_attention(q, k, v, axis_name="x", is_causal=causal,
                                                         implementation=impl, return_lse=True)
    sm = parallel.shard_map(local, mesh=mesh(n), in_specs=(SEQ,) * 3, out_specs=(SEQ, SEQ), check_vma=impl == "xla")
    if not causal:
        return sm

    def f(q, k, v):  # global order in and out; zig-zag chunks on the devices
        out, lse = sm(*(parallel.zigzag(x, n) for x in (q, k, v)))
        return parallel.unzigzag(out, n), parallel.unzigzag(lse, n)

    return f


@multi_device
@pytest.mark.parametrize("n", [2, 4])
def test_ring_self_attention_causal(n, impl, rng, close, tol):
    if (impl == "interpret") == (n == 4):
        pytest.skip("the interpreter is slow: n=2 covers the kernels, n=4 runs on xla")
    B, t, N, K, H = (1, 2, 2, 1, 8) if impl == "interpret" else (2, 6, 4, 2, 16)
    arrays, refs = data(rng, B, n * t, n * t, N, K, H)
    check_forward_and_grads(sharded_self(n, impl, True), arrays, refs, None, close, tol, rng, f"causal n={n}",
                            is_causal=True)


@multi_device
def test_ring_self_attention_not_causal(rng, close, tol):
    n, B, t, N, K, H = 2, 2, 3, 4, 2, 8
    arrays, refs = data(rng, B, n * t, n * t, N, K, H)
    check_forward_and_grads(sharded_self(n, "xla", False), arrays, refs, None, close, tol, rng, "full")


@single_device
def test_zigzag_round_trip():
    x = jnp.arange(2 * 3 * 8).reshape(2, 24)
    z = parallel.zigzag(x, 3)
    chunks = np.asarray(z[0]).reshape(6, 4) // 4  # chunk index of each element, device-major
    assert chunks[:, 0].tolist() == [0, 5, 1, 4, 2, 3]
    assert (np.asarray(parallel.unzigzag(z, 3)) == np.asarray(x)).all()
    with pytest.raises(ArgumentError, match="divisible by 2n = 6"):
        parallel.zigzag(jnp.zeros((1, 10)), 3)


# ------------------------------------------------------------------------------------------------
# K/V recomputation.


@multi_device
def test_recompute_kv_keeps_gradients(rng):
    """K/V projected from visual features under recompute_kv: the same values and gradients (to the
    queries, the features and the projection weights) as without it, and a remat in the graph."""
    strategy = "lv_xattn"
    n, B, t, s, N, K, H, F = 2, 2, 2, 4, 4, 2, 8, 12
    q = jnp.asarray(rng.standard_normal((B, n * t, N, H)), jnp.float32)
    feats = jnp.asarray(rng.standard_normal((B, n * s, F)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, F, K * H)) / np.sqrt(F), jnp.float32)
    d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def project(f, w):
        k, v = (jnp.tanh(f @ w[i]).reshape(*f.shape[:2], K, H) for i in range(2))
        return k, v

    def loss(q, feats, w, recompute):
        def local(q, f, w):
            k, v = parallel.recompute_kv(f, project, w) if recompute else project(f, w)
            return parallel.cross_attention(q, k, v, axis_name="x", strategy=strategy, implementation="xla")

        out = parallel.shard_map(local, mesh=mesh(n), in_specs=(SEQ, SEQ, P()), out_specs=SEQ)(q, feats, w)
        return jnp.sum(out * d_out)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    (v0, g0), (v1, g1) = grad(q, feats, w, False), grad(q, feats, w, True)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    text = str(jax.make_jaxpr(jax.grad(loss, argnums=1), static_argnums=3)(q, feats, w, True))
    assert "checkpoint" in text or "remat" in text


@multi_device
def test_cross_attention_from_features_keeps_no_kv(rng):
    """K/V projected inside the attention's VJP: the values and gradients (queries, features, weights)
    of projecting first, for both strategies, and no K- or V-sized array among the vjp's residuals
    (the plain call keeps both)."""
    n, B, t, s, N, K, H, F = 2, 2, 2, 6, 4, 2, 8, 12
    q = jnp.asarray(rng.standard_normal((B, n * t, N, H)), jnp.float32)
    feats = jnp.asarray(rng.standard_normal((B, n * s, F)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, F, K * H)) / np.sqrt(F), jnp.float32)
    d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    lengths = jnp.asarray([n * s, n * s - 3], jnp.int32)

    def project(f, w):
        return tuple(jnp.tanh(f @ w[i]).reshape(*f.shape[:2], K, H) for i in range(2))

    for strategy in parallel.STRATEGIES:
        def layer(q, feats, w, inside):
            def local(q, f, w):
                if inside:
                    return parallel.cross_attention_from_features(q, f, project, w, axis_name="x", strategy=strategy,
                                                                  kv_seq_lengths=lengths, implementation="xla")
                return parallel.cross_attention(q, *project(f, w), axis_name="x", strategy=strategy,
                                                kv_seq_lengths=lengths, implementation="xla")

            return parallel.shard_map(local, mesh=mesh(n), in_specs=(SEQ, SEQ, P()), out_specs=SEQ)(q, feats, w)

        loss = lambda *a: jnp.sum(layer(*a) * d_out)  # noqa: E731
        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
        (v0, g0), (v1, g1) = grad(q, feats, w, False), grad(q, feats, w, True)
        np.testing.assert_allclose(v1, v0, rtol=1e-6)
        for a, b in zip(g1, g0):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        kept = {}
        for inside in (False, True):  # bytes the vjp holds beyond its inputs
            _, vjp_fn = jax.vjp(lambda q, f, w: layer(q, f, w, inside), q, feats, w)
            held = {id(x): x.nbytes for x in jax.tree_util.tree_leaves(vjp_fn)
                    if isinstance(x, jax.Array) and not any(x is y for y in (q, feats, w))}
            kept[inside] = sum(held.values())
        kv_bytes = 2 * B * n * s * K * H * 4
        assert kept[False] - kept[True] >= kv_bytes, (strategy, kept, kv_bytes)


@single_device
def test_recompute_kv_single_device(rng):
    x = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)

    def f(x, w, recompute):
        project = lambda x, w: (jnp.sin(x @ w), jnp.cos(x @ w))
        k, v = parallel.recompute_kv(x, project, w) if recompute else project(x, w)
        return jnp.sum(k * v)

    g0 = jax.grad(f, argnums=(0, 1))(x, w, False)
    g1 = jax.grad(f, argnums=(0, 1))(x, w, True)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    with pytest.raises(ArgumentTypeError, match="project must be a callable"):
        parallel.recompute_kv(x, "not a function")


# ------------------------------------------------------------------------------------------------
# Argument errors (one device is enough).


def _args(B=1, T=2, S=4, N=4, K=2, H=8, dtype=jnp.float32):
    return jnp.zeros((B, T, N, H), dtype), jnp.zeros((B, S, K, H), dtype), jnp.zeros((B, S, K, H), dtype)


def _on_one_device(fn, *arrays, check_vma=True, out_specs=SEQ):
    m = jax.make_mesh((1,), ("x",), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,))
    return parallel.shard_map(fn, mesh=m, in_specs=(SEQ,) * len(arrays), out_specs=out_specs,
                              check_vma=check_vma)(*arrays)


@single_device
def test_bad_strategy():
    q, k, v = _args()
    with pytest.raises(ArgumentError, match=r"strategy must be one of \('lv_xattn', 'ring'\), got 'ulysses'"):
        parallel.cross_attention(q, k, v, axis_name="x", strategy="ulysses")


@single_device
@pytest.mark.parametrize("case, match", [
    ("value_shape", r"key and value must have the same shape, got \(1, 4, 2, 8\) and \(1, 5, 2, 8\)"),
    ("heads", r"query heads \(4\) must be a multiple of the key/value heads \(3\)"),
    ("rank", r"query must be the local shard \(B, L, heads, D\) of rank 4, got shape \(2, 4, 8\)"),
    ("head_dim", r"key/value head dim 4 does not match query head dim 8"),
    ("lengths_shape", r"kv_seq_lengths must have shape \(1,\), got \(2,\)"),
])
def test_shape_errors(case, match):
    q, k, v = _args()
    lengths = None
    if case == "value_shape":
        v = jnp.zeros((1, 5, 2, 8))
    elif case == "heads":
        k = v = jnp.zeros((1, 4, 3, 8))
    elif case == "rank":
        q = q[0]
    elif case == "head_dim":
        k = v = jnp.zeros((1, 4, 2, 4))
    elif case == "lengths_shape":
        lengths = jnp.array([1, 2])
    with pytest.raises(ArgumentError, match=match):
        parallel.cross_attention(q, k, v, axis_name="x", kv_seq_lengths=lengths)


@single_device
def test_type_errors():
    q, k, v = _args()
    with pytest.raises(ArgumentTypeError, match="kv_seq_lengths must be integers, got float32"):
        parallel.cross_attention(q, k, v, axis_name="x", kv_seq_lengths=jnp.ones((1,)))
    with pytest.raises(ArgumentTypeError, match="query, key and value must share a dtype"):
        parallel.cross_attention(q.astype(jnp.bfloat16), k, v, axis_name="x")
    with pytest.raises(ArgumentTypeError, match="query must be an array, got list"):
        parallel.cross_attention([1.0], k, v, axis_name="x")


@single_device
def test_unbound_axis():
    q, k, v = _args()
    with pytest.raises(ArgumentError, match="axis_name 'x' is not a mesh axis bound here"):
        parallel.cross_attention(q, k, v, axis_name="x")
    with pytest.raises(ArgumentError, match="axis_name 'y' is not a mesh axis bound here"):
        _on_one_device(lambda q, k, v: parallel.cross_attention(q, k, v, axis_name="y", implementation="xla"), q, k, v)


@single_device
def test_kernels_need_check_vma_off(rng, close, tol):
    (q, k, v), (q64, k64, v64) = data(rng, 1, 2, 4, 4, 2, 8)
    fn = lambda q, k, v: parallel.cross_attention(q, k, v, axis_name="x", implementation="interpret")
    with pytest.raises(ArgumentError, match="check_vma=False"):
        _on_one_device(fn, q, k, v)
    close(_on_one_device(fn, q, k, v, check_vma=False), attention_reference(q64, k64, v64)[0], tol(jnp.float32), "out")


@single_device
def test_ring_self_attention_errors():
    q, k, v = _args(T=4, S=4)
    with pytest.raises(ArgumentError, match="local sequence length must be even, got 3"):
        parallel.ring_self_attention(q[:, :3], k[:, :3], v[:, :3], axis_name="x")
    with pytest.raises(ArgumentError, match="one length, got 4 and 6"):
        parallel.ring_self_attention(q, jnp.zeros((1, 6, 2, 8)), jnp.zeros((1, 6, 2, 8)), axis_name="x")


@single_device
def test_empty_shards():
    q, k, v = _args(T=0)
    out, lse = _on_one_device(
        lambda q, k, v: parallel.cross_attention(q, k, v, axis_name="x", implementation="xla", return_lse=True), q, k, v,
        out_specs=(SEQ, SEQ))
    assert out.shape == q.shape and lse.shape == (1, 0, 4)
