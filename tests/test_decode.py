"""Split-KV decode attention (``mmfa_jax.decode_attention``, ``mmfa_jax.kernels.decode``) against the
float64 reference: both layouts, 1 to 16 query rows, GQA groups, ragged caches (lengths not a
multiple of the block, rows that see no key), garbage past the lengths, NaN inside them, soft cap
and scale, splits, a kernel compiled for a larger cache than it runs on, warm calls, bad arguments.

The reference of a decode step: the T query rows of example b are the last T positions of its
kv_lengths[b] cache entries, so query row t sees keys j < kv_lengths[b] - T + 1 + t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, normal, tolerance
from reference import attention_reference

import mmfa_jax
from mmfa_jax import compiles, plans
from mmfa_jax._checks import ArgumentError, ArgumentTypeError
from mmfa_jax.decode import prepare, run
from mmfa_jax.kernels.decode import default_splits


def decode_reference(q, k, v, kv_lengths=None, *, scale=None, softcap=None, key_mask=None):
    """float64 (out (B, T, Hq, D), lse (B, Hq, T)) from BTNH arrays; ``key_mask`` (B, S) bool hides keys."""
    B, T = q.shape[:2]
    S = k.shape[1]
    lengths = np.full(B, S) if kv_lengths is None else np.clip(np.asarray(kv_lengths), 0, S)
    limit = lengths[:, None] - T + 1 + np.arange(T)[None, :]
    mask = np.arange(S)[None, None, :] < limit[:, :, None]  # (B, T, S)
    if key_mask is not None:
        mask = mask & np.asarray(key_mask)[:, None, :]
    out, lse = attention_reference(q, k, v, mask=mask[:, None], kv_lengths=lengths, scale=scale, softcap=softcap)
    return out, np.swapaxes(lse, 1, 2)


def to_layout(x, layout):
    """A BTNH array (jax or numpy) in ``layout``."""
    return x if layout == "BTNH" else x.swapaxes(1, 2)


def make(rng, layout, B, T, Hq, Hkv, S, D, dtype):
    """(q, k, v) in ``layout`` and their float64 BTNH values."""
    q, q64 = normal(rng, (B, T, Hq, D), dtype)
    k, k64 = normal(rng, (B, S, Hkv, D), dtype)
    v, v64 = normal(rng, (B, S, Hkv, D), dtype)
    return (to_layout(q, layout), to_layout(k, layout), to_layout(v, layout)), (q64, k64, v64)


# The tests of the kernels alone (splits, capacity): the interpreter, and with --gpu the compiled kernels.
def check(out, lse, ref_out, ref_lse, layout, dtype):
    assert_close(out, to_layout(ref_out, layout), tolerance(dtype), "out")
    assert_close(lse, ref_lse, max(tolerance(dtype), 1e-4), "lse")


# (layout, T, Hq, Hkv, S, D, dtype, kv_lengths): every layout with T in {1, 3, 16}, heads in
# {(4, 4), (8, 2), (6, 1)}, caches of 77 and 300 entries (not multiples of the block), lengths of 1
# and rows that see no key (T > length), head dims that are padded (40, 80) and not.
CASES = [
    ("BTNH", 1, 4, 4, 77, 32, "float32", (77, 1)),
    ("BNTH", 1, 8, 2, 300, 64, "bfloat16", (300, 129)),
    ("BNTH", 1, 6, 1, 300, 80, "float32", None),
    ("BTNH", 3, 8, 2, 300, 40, "float32", (1, 2, 300)),
    ("BNTH", 3, 6, 1, 77, 16, "bfloat16", (77, 5)),
    ("BTNH", 3, 4, 4, 300, 16, "bfloat16", None),
    ("BTNH", 16, 6, 1, 77, 32, "bfloat16", (10, 77)),
    ("BNTH", 16, 4, 4, 300, 64, "float32", (300, 3)),
    ("BNTH", 16, 8, 2, 77, 128, "float32", (0, 77)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:7])))
def test_matches_reference(case, impl, rng):
    layout, T, Hq, Hkv, S, D, dtype, lengths = case
    B = 2 if lengths is None else len(lengths)
    (q, k, v), (q64, k64, v64) = make(rng, layout, B, T, Hq, Hkv, S, D, dtype)
    kv_lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    out, lse = mmfa_jax.decode_attention(q, k, v, kv_lengths=kv_lengths, layout=layout, implementation=impl,
                                         return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (B, Hq, T) and lse.dtype == jnp.float32
    ref_out, ref_lse = decode_reference(q64, k64, v64, lengths)
    check(out, lse, ref_out, ref_lse, layout, dtype)
    dead = np.isinf(ref_lse)  # rows that see no key: exactly zero
    if dead.any():
        assert (np.asarray(jnp.moveaxis(to_layout(out, layout), 1, 2).astype(jnp.float32))[dead] == 0).all()
    assert_close(mmfa_jax.decode_attention(q, k, v, kv_lengths=kv_lengths, layout=layout, implementation=impl),
                 to_layout(ref_out, layout), tolerance(dtype), "out without lse")


def test_splits_give_the_same_result(kernel_impl, rng):
    """One split, several, and more splits than blocks (empty splits) agree with each other and with
    the reference; so does the default."""
    layout, T, Hq, Hkv, S, D = "BNTH", 3, 8, 2, 300, 32
    (q, k, v), (q64, k64, v64) = make(rng, layout, 3, T, Hq, Hkv, S, D, "float32")
    lengths = (300, 150, 2)
    ref_out, ref_lse = decode_reference(q64, k64, v64, lengths)
    kv_lengths = jnp.asarray(lengths, jnp.int32)
    results = {}
    for splits in (1, 3, 16, None):
        out, lse = mmfa_jax.decode_attention(q, k, v, kv_lengths=kv_lengths, layout=layout, implementation=kernel_impl,
                                             return_lse=True, splits=splits)
        check(out, lse, ref_out, ref_lse, layout, "float32")
        results[splits] = np.asarray(out)
    for splits, out in results.items():
        np.testing.assert_allclose(out, results[1], rtol=0, atol=1e-5, err_msg=f"splits={splits}")


@pytest.mark.parametrize("layout", ["BTNH", "BNTH"])
def test_garbage_past_the_lengths_is_never_read(layout, impl, rng):
    """NaN, infinities and huge values past each example's length leave the result bit for bit
    unchanged (the kernels never load those keys or values)."""
    B, T, Hq, Hkv, S, D = 3, 3, 8, 2, 77, 32
    (q, k, v), (q64, k64, v64) = make(rng, layout, B, T, Hq, Hkv, S, D, "bfloat16")
    lengths = np.array([40, 1, 76])
    kv_lengths = jnp.asarray(lengths, jnp.int32)
    seq_axis = 1 if layout == "BTNH" else 2
    past = np.arange(S)[None, :] >= lengths[:, None]  # (B, S)
    past = jnp.asarray(np.expand_dims(past, 2 if layout == "BTNH" else 1)[..., None])
    junk = jnp.asarray(rng.choice(np.array([np.nan, np.inf, -np.inf, 3e38], np.float32), size=k.shape), k.dtype)
    assert k.shape[seq_axis] == S
    dirty_k, dirty_v = jnp.where(past, junk, k), jnp.where(past, junk[::-1], v)

    def call(k, v):
        return mmfa_jax.decode_attention(q, k, v, kv_lengths=kv_lengths, layout=layout, implementation=impl,
                                         return_lse=True, splits=2)

    clean, dirty = call(k, v), call(dirty_k, dirty_v)
    for a, b in zip(clean, dirty):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    check(*dirty, *decode_reference(q64, k64, v64, lengths), layout, "bfloat16")


@pytest.mark.parametrize("layout, T, with_lengths", [("BNTH", 1, False), ("BTNH", 3, True)])
def test_key_mask_hides_keys_and_their_garbage(layout, T, with_lengths, impl, rng):
    """A key mask (left padding of each example, a static cache's unwritten tail, holes) hides its
    keys from every row: the result is the reference's with those keys removed; NaN and infinities
    under hidden keys and values never reach it; an example with every key hidden gives zeros."""
    B, Hq, Hkv, S, D = 4, 8, 2, 300, 64
    (q, k, v), (q64, k64, v64) = make(rng, layout, B, T, Hq, Hkv, S, D, "bfloat16")
    pos = np.arange(S)[None, :]
    key_mask = np.stack([(pos[0] >= 37) & (pos[0] < 250),  # left padding and an unwritten tail
                         rng.random(S) < 0.6,  # holes anywhere
                         np.zeros(S, bool),  # nothing to see
                         pos[0] < 299])
    lengths = np.array([280, 300, 300, 120]) if with_lengths else None
    seq_axis = 1 if layout == "BTNH" else 2
    hidden = np.expand_dims(~key_mask, 2 if layout == "BTNH" else 1)[..., None]
    junk = jnp.asarray(rng.choice(np.array([np.nan, np.inf, -np.inf], np.float32), size=k.shape), k.dtype)
    assert k.shape[seq_axis] == S
    dirty_k, dirty_v = jnp.where(hidden, junk, k), jnp.where(hidden, junk[::-1], v)
    out, lse = mmfa_jax.decode_attention(q, dirty_k, dirty_v, kv_lengths=None if lengths is None else
                                         jnp.asarray(lengths, jnp.int32), key_mask=jnp.asarray(key_mask),
                                         layout=layout, implementation=impl, return_lse=True, splits=3)
    check(out, lse, *decode_reference(q64, k64, v64, lengths, key_mask=key_mask), layout, "bfloat16")
    empty = np.asarray(to_layout(out, layout))[2].astype(np.float32)
    assert (empty == 0).all() and np.isneginf(np.asarray(lse)[2]).all()


def test_key_mask_errors(rng):
    (q, k, v), _ = make(rng, "BTNH", 2, 1, 4, 2, 40, 16, "float32")
    for bad in (np.ones((2, 41), bool), np.ones((1, 40), bool), np.ones((2, 40), np.int32)):
        with pytest.raises(ArgumentError, match="key_mask"):
            mmfa_jax.decode_attention(q, k, v, key_mask=jnp.asarray(bad), implementation="interpret")


def test_nan_inside_the_lengths_reaches_the_rows_that_see_it(impl, rng):
    """A NaN key at the last valid position is seen by the last query row of its KV head's group
    only (bottom-right causal); a NaN value inside the cache, by every row of the group. Other rows
    stay exact."""
    layout, B, T, Hq, Hkv, S, D = "BTNH", 2, 3, 4, 2, 77, 16
    (q, k, v), (q64, k64, v64) = make(rng, layout, B, T, Hq, Hkv, S, D, "float32")
    lengths = np.array([50, 77])
    k = k.at[0, 49, 1].set(jnp.nan)  # example 0, KV head 1 (query heads 2, 3), the last valid key
    v = v.at[1, 10, 0].set(jnp.nan)  # example 1, KV head 0 (query heads 0, 1)
    out, lse = mmfa_jax.decode_attention(q, k, v, kv_lengths=jnp.asarray(lengths, jnp.int32), implementation=impl,
                                         return_lse=True, splits=2)
    out, lse = np.asarray(out), np.asarray(lse)
    nan_rows = np.zeros((B, T, Hq), bool)
    nan_rows[0, T - 1, 2:] = True
    nan_rows[1, :, :2] = True
    assert np.isnan(out).any(-1).tolist() == nan_rows.tolist()
    assert np.isnan(out[nan_rows]).all()
    assert np.isnan(lse[0, 2:, T - 1]).all() and not np.isnan(lse[1]).any()  # a NaN value: finite LSE
    ref_out, ref_lse = decode_reference(q64, k64, v64, lengths)
    np.testing.assert_allclose(out[~nan_rows], ref_out[~nan_rows], atol=tolerance("float32") * np.abs(ref_out).max())
    finite = ~np.isnan(lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=1e-4)


@pytest.mark.parametrize("layout", ["BTNH", "BNTH"])
def test_soft_cap_and_scale(layout, impl, rng):
    B, T, Hq, Hkv, S, D = 2, 3, 6, 1, 300, 32
    (q, k, v), (q64, k64, v64) = make(rng, layout, B, T, Hq, Hkv, S, D, "float32")
    q, q64 = q * 4, q64 * 4  # large logits, so the cap bites
    lengths = (300, 120)
    out, lse = mmfa_jax.decode_attention(q, k, v, kv_lengths=jnp.asarray(lengths, jnp.int32), scale=0.3,
                                         logits_soft_cap=2.5, layout=layout, implementation=impl, return_lse=True)
    check(out, lse, *decode_reference(q64, k64, v64, lengths, scale=0.3, softcap=2.5), layout, "float32")


# Two of the four layout x lengths combinations: each costs ~15 s in the interpreter, and the two
# cover both addressings and both length sources.
@pytest.mark.parametrize("layout, with_lengths", [("BTNH", False), ("BNTH", True)], ids=["BTNH-no-lengths",
                                                                                          "BNTH-lengths"])
def test_kernel_compiled_for_a_larger_cache(kernel_impl, layout, with_lengths, rng):
    """A kernel compiled for a capacity C > S (static K/V rows B * Hkv * C) and launched with the
    runtime cache length S, on K/V padded with NaN rows past B * Hkv * S: the result is that of the
    kernel compiled for S (the keys are addressed through the runtime length and never past it)."""
    B, T, Hq, Hkv, S, D = 2, 3, 8, 2, 77, 32
    (q, k, v), (q64, k64, v64) = make(rng, layout, B, T, Hq, Hkv, S, D, "float32")
    lengths = (77, 30) if with_lengths else None
    kv_lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    results, blocks = [], set()
    for capacity in (None, 200):
        static, arrays = prepare(q, k, v, kv_lengths=kv_lengths, layout=layout, implementation=kernel_impl, splits=2,
                                 capacity=capacity)
        assert static.problem.kv_rows == B * Hkv * (capacity or S)
        blocks.add(static.problem.block_k)
        results.append(run(static, *arrays))
    assert len(blocks) == 1  # the same blocks for both: the same arithmetic
    for a, b in zip(*results):
        assert not np.isnan(np.asarray(b)).any()
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    check(*results[1], *decode_reference(q64, k64, v64, lengths), layout, "float32")


def test_warm_calls_compile_nothing(impl, rng):
    """A second call with the same shapes (fresh data, other lengths) compiles nothing, eagerly
    and under the caller's jit."""

    def data():
        (q, k, v), _ = make(rng, "BNTH", 2, 1, 8, 2, 77, 32, "bfloat16")
        return q, k, v, jnp.asarray(rng.integers(1, 78, size=2), jnp.int32)

    def eager(q, k, v, lengths):
        return mmfa_jax.decode_attention(q, k, v, kv_lengths=lengths, layout="BNTH", implementation=impl,
                                         return_lse=True)

    jitted = jax.jit(eager)
    for call in (eager, jitted):
        jax.block_until_ready(call(*data()))
        with compiles.counted() as seen:
            jax.block_until_ready(call(*data()))
        assert seen.total == 0, f"a warm call compiled: {seen}"


def test_empty_sizes():
    q = jnp.ones((2, 1, 4, 16), jnp.float32)
    out, lse = mmfa_jax.decode_attention(q, jnp.ones((2, 0, 2, 16)), jnp.ones((2, 0, 2, 16)), return_lse=True,
                                         implementation="interpret")
    assert (np.asarray(out) == 0).all() and out.shape == q.shape
    assert np.isneginf(np.asarray(lse)).all() and lse.shape == (2, 4, 1)
    out = mmfa_jax.decode_attention(q[:0], jnp.ones((0, 5, 2, 16)), jnp.ones((0, 5, 2, 16)), implementation="interpret")
    assert out.shape == (0, 1, 4, 16)


def test_default_splits():
    """About three waves of an H200's 132 SMs, at least four blocks a split, at least one split."""
    assert default_splits(1, 8, 32768, 128) == 50  # 400 programs
    assert default_splits(4, 8, 32768, 128) == 13
    assert default_splits(64, 8, 32768, 128) == 1
    assert default_splits(1, 8, 1024, 128) == 2  # 8 blocks: at most 2 splits of 4
    assert default_splits(1, 8, 77, 64) == 1
    static, _ = prepare(*(jnp.ones(s, jnp.bfloat16) for s in ((1, 32, 1, 128), (1, 8, 32768, 128),
                                                              (1, 8, 32768, 128))), layout="BNTH",
                        implementation="interpret")
    assert static.problem.splits == default_splits(1, 8, 32768, static.problem.block_k)
    assert static.problem.tile_rows == 16  # G * T = 4 rows, padded to 16


def test_argument_errors():
    q = jnp.ones((2, 1, 4, 16), jnp.float32)
    kv = jnp.ones((2, 9, 2, 16), jnp.float32)

    def call(q=q, k=kv, v=kv, **kw):
        kw.setdefault("implementation", "interpret")
        return mmfa_jax.decode_attention(q, k, v, **kw)

    with pytest.raises(ArgumentError, match=r"1 to 16 rows \(T\).*T=17"):
        call(jnp.ones((2, 17, 4, 16)))
    with pytest.raises(ArgumentError, match=r"T=17.*layout 'BNTH'"):
        call(jnp.ones((2, 4, 17, 16)), jnp.ones((2, 2, 9, 16)), jnp.ones((2, 2, 9, 16)), layout="BNTH")
    with pytest.raises(ArgumentError, match="T=0"):
        call(jnp.ones((2, 0, 4, 16)))
    with pytest.raises(ArgumentError, match=r"query heads \(3\) must be a multiple of the key/value heads \(2\)"):
        call(jnp.ones((2, 1, 3, 16)))
    with pytest.raises(ArgumentError, match="layout must be one of"):
        call(layout="BSHD")
    with pytest.raises(ArgumentError, match="query must have rank 4"):
        call(q[0])
    with pytest.raises(ArgumentError, match="key and value must have the same shape"):
        call(v=kv[:, :5])
    with pytest.raises(ArgumentError, match="batch"):
        call(k=kv[:1], v=kv[:1])
    with pytest.raises(ArgumentError, match="head dim"):
        call(k=kv[..., :8], v=kv[..., :8])
    with pytest.raises(ArgumentError, match="head dim 300 is over 256"):
        call(jnp.ones((2, 1, 4, 300)), jnp.ones((2, 9, 2, 300)), jnp.ones((2, 9, 2, 300)))
    with pytest.raises(ArgumentTypeError, match="query must be float16, bfloat16 or float32, got int32"):
        call(q.astype(jnp.int32))
    with pytest.raises(ArgumentTypeError, match="must share a dtype"):
        call(k=kv.astype(jnp.bfloat16), v=kv.astype(jnp.bfloat16))
    with pytest.raises(ArgumentError, match=r"kv_lengths must have shape \(2,\), got \(3,\)"):
        call(kv_lengths=jnp.ones((3,), jnp.int32))
    with pytest.raises(ArgumentTypeError, match="kv_lengths must be integers, got float32"):
        call(kv_lengths=jnp.ones((2,), jnp.float32))
    with pytest.raises(ArgumentError, match="splits must be >= 1, got 0"):
        call(splits=0)
    with pytest.raises(ArgumentTypeError, match="splits must be an integer"):
        call(splits=2.5)
    with pytest.raises(ArgumentError, match="logits_soft_cap must be a positive"):
        call(logits_soft_cap=-1.0)
    with pytest.raises(ValueError, match="implementation must be one of"):
        call(implementation="fast")
    # Every one of them is also what torch code catches.
    with pytest.raises(RuntimeError):
        call(layout="BSHD")


def test_plans_name_the_kernels():
    assert [k.name for k in plans.decode()] == ["mmfa_decode_partial", "mmfa_decode_merge"]
    assert plans.DECODE_PARTIAL.arguments({"q": 1, "k": 2, "v": 3, "seq_len": 4, "kv_lengths": None}) == [1, 2, 3, 4]
    assert plans.DECODE_PARTIAL.arguments({"q": 1, "k": 2, "v": 3, "seq_len": 4, "key_mask": 5}) == [1, 2, 3, 4, 5]
    assert plans.DECODE_MERGE.operands == plans.DECODE_PARTIAL.results


try:
    import triton  # noqa: F401

    TRITON = None
except Exception as e:  # noqa: BLE001
    TRITON = f"the official `triton` package is not importable ({e!r})"


# (device kind, layout, T, Hq, Hkv, D, dtype): the common decode shape on Hopper; a wide query
# tile (a group of 16 query heads times 16 rows: 256 rows) there; float32 at d256 on an sm_86 GPU
# (99 KiB of shared memory per block).
COMPILE_CASES = [
    ("NVIDIA H100", "BNTH", 1, 32, 8, 128, "bfloat16"),
    ("NVIDIA H100", "BTNH", 16, 64, 4, 128, "bfloat16"),
    ("NVIDIA A10", "BNTH", 4, 8, 2, 256, "float32"),
]


@pytest.mark.skipif(TRITON is not None, reason=TRITON or "")
@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernels_compile_for_gpus(case, tmp_path, monkeypatch):
    """Both kernels lower through Triton and compile to cubins (no GPU needed), with the operands
    their plans name, the (B, Hkv, splits) and (B, Hkv) grids, within the GPU's shared memory,
    which the configuration's estimate (``shared_bytes``) does not understate."""
    from mmfa_jax import backends, triton_route
    from mmfa_jax.kernels.decode import shared_bytes

    monkeypatch.setenv("MMFA_CACHE_DIR", str(tmp_path))
    triton_route.clear_memory_cache()
    kind, layout, T, Hq, Hkv, D, dtype = case
    B, S = 1, 4096
    dtype = jnp.dtype(dtype)
    q = jax.ShapeDtypeStruct(to_layout(np.empty((B, T, Hq, 0)), layout).shape[:3] + (D,), dtype)
    kv = jax.ShapeDtypeStruct(to_layout(np.empty((B, S, Hkv, 0)), layout).shape[:3] + (D,), dtype)
    lengths = jax.ShapeDtypeStruct((B,), jnp.int32)

    def fn(q, k, v, lengths):
        return mmfa_jax.decode_attention(q, k, v, kv_lengths=lengths, layout=layout, implementation="triton",
                                         return_lse=True)

    compiled = triton_route.lower_for(fn, q, kv, kv, lengths, device_kind=kind)
    assert [k.name for k, *_ in compiled] == [p.name for p in plans.decode()]
    (partial, _, partial_grid, partial_operands, _), (merge, _, merge_grid, merge_operands, _) = compiled
    cc = backends.cc_of_kind(kind)
    static, _ = prepare(q, kv, kv, kv_lengths=lengths, layout=layout,
                        implementation=backends.Lowering("triton-route", cc, backends.family_of_cc(cc)))
    p, cfg = static.problem, static.config
    assert partial_grid == (B, Hkv, p.splits) and merge_grid == (B, Hkv, 1)
    assert partial_operands == len(plans.DECODE_PARTIAL.operands) - 1  # every operand but the key mask
    assert merge_operands == len(plans.DECODE_MERGE.operands)
    limit = triton_route.SHARED_MEMORY_PER_BLOCK[cc]
    for k in (partial, merge):
        assert k.cc == cc and len(k.cubin) > 0 and k.shared <= limit
    assert (partial.num_warps, partial.num_stages) == (cfg.num_warps, cfg.num_stages)
    assert partial.shared <= shared_bytes(cfg, p.tile_rows, p.head_dim_padded, dtype.itemsize)
