"""Top-k selection of visual tokens and the gathers, against tests/reference.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import keep_kwargs
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import select_reference

from mmfa_jax.backends import Lowering
from mmfa_jax.pruning import compact_positions, gather_tokens, keep_counts, select_visual_tokens

ROUTE_H100 = Lowering("triton-route", 90, "sm90")


def _check(indices, lengths, want):
    indices, lengths = np.asarray(indices), np.asarray(lengths)
    for b, w in enumerate(want):
        assert lengths[b] == len(w), f"example {b}: kept {lengths[b]}, want {len(w)}"
        np.testing.assert_array_equal(indices[b, :lengths[b]], w)
        assert (indices[b, lengths[b]:] == (w[-1] if len(w) else 0)).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 3), S=st.integers(1, 40),
       keep=st.one_of(st.floats(0.01, 1.0), st.integers(1, 12)), ties=st.booleans(), padded=st.booleans())
def test_selection_matches_reference(impl, seed, B, S, keep, ties, padded):
    rng = np.random.default_rng(seed)
    vis = rng.random((B, S)) < 0.6
    imp = rng.integers(0, 3, (B, S)).astype(np.float32) if ties else rng.random((B, S)).astype(np.float32)
    lengths = rng.integers(0, S + 1, B) if padded else None
    want = select_reference(imp, vis, keep, lengths)
    if max(len(w) for w in want) == 0:
        return
    idx, n = select_visual_tokens(jnp.asarray(imp), jnp.asarray(vis), **keep_kwargs(keep), valid_lengths=lengths,
                                  implementation=impl)
    _check(idx, n, want)


def test_selection_under_jit_uses_static_length():
    rng = np.random.default_rng(0)
    imp, vis = rng.random((2, 30)), rng.random((2, 30)) < 0.7
    f = jax.jit(lambda i, v: select_visual_tokens(i, v, 0.25))
    idx, n = f(jnp.asarray(imp), jnp.asarray(vis))
    assert idx.shape == (2, 30)
    _check(idx, n, select_reference(imp, vis, 0.25))


def test_keep_one_keeps_everything_in_order():
    rng = np.random.default_rng(1)
    vis = rng.random((2, 17)) < 0.5
    idx, n = select_visual_tokens(jnp.asarray(rng.random((2, 17))), jnp.asarray(vis), 1.0)
    assert (np.asarray(n) == 17).all()
    np.testing.assert_array_equal(np.asarray(idx), np.tile(np.arange(17), (2, 1)))


def test_gathers():
    rng = np.random.default_rng(2)
    B, S, D = 2, 12, 5
    idx, n = select_visual_tokens(jnp.asarray(rng.random((B, S))), jnp.asarray(rng.random((B, S)) < 0.6), 0.5)
    hidden = rng.standard_normal((B, S, D)).astype(np.float32)
    qkv = rng.standard_normal((B, S, 3, 4)).astype(np.float32)
    pos = np.tile(np.arange(S, dtype=np.int32), (B, 1))
    mrope = rng.integers(0, 50, (3, B, S)).astype(np.int32)
    for x, axis in ((hidden, 1), (qkv, 1), (pos, 1), (mrope, 2)):
        got = np.asarray(gather_tokens(jnp.asarray(x), idx, axis=axis))
        for b in range(B):
            sel = np.asarray(idx[b])
            want = x[b][sel] if axis == 1 else x[:, b][:, sel]
            np.testing.assert_array_equal(got[b] if axis == 1 else got[:, b], want)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(keep=0.0), ValueError, r"keep must be a ratio in \(0, 1\], got 0.0"),
    (dict(keep=1.5), ValueError, r"keep must be a ratio in \(0, 1\], got 1.5"),
    (dict(keep=-1), ValueError, r"keep must be a ratio in \(0, 1\], got -1"),
    (dict(keep=64), ValueError, "keep_count=64"),
    (dict(keep=True), TypeError, "keep must be a ratio"), (dict(keep="half"), TypeError, "keep must be a ratio"),
    (dict(keep=float("nan")), ValueError, r"\(0, 1\]"),
    (dict(keep_count=0), ValueError, "keep_count must be >= 1, got 0"),
    (dict(keep_count=-1), ValueError, "keep_count must be >= 1, got -1"),
    (dict(keep_count=0.5), TypeError, "keep_count must be a positive integer"),
    (dict(), ValueError, "exactly one of keep"), (dict(keep=0.5, keep_count=2), ValueError, "exactly one of keep"),
])
def test_bad_keep(kwargs, err, match):
    with pytest.raises(err, match=match):
        keep_counts(jnp.ones((1, 4), bool), **kwargs)


def test_keep_ratio_one_and_count_one_never_share_a_cache_entry():
    """keep=1.0 (every visual token) and keep_count=1 (one) in one process: each call gets its own
    table (an lru_cache keyed on 1 == 1.0 once gave the second call the first one's)."""
    vis = jnp.ones((1, 6), bool)
    imp = jnp.asarray(np.arange(6, dtype=np.float32))[None]
    assert int(keep_counts(vis, keep=1.0)[0]) == 6 and int(keep_counts(vis, keep_count=1)[0]) == 1
    assert int(keep_counts(vis, keep_count=1)[0]) == 1 and int(keep_counts(vis, keep=1.0)[0]) == 6
    assert select_visual_tokens(imp, vis, keep_count=1)[1].tolist() == [1]
    assert select_visual_tokens(imp, vis, 1.0)[1].tolist() == [6]
    assert int(keep_counts(vis, keep=np.float32(0.5))[0]) == 3 and int(keep_counts(vis, keep_count=np.int64(2))[0]) == 2


def test_output_length_below_the_kept_count_raises():
    vis = jnp.ones((2, 8), bool)
    with pytest.raises(ValueError, match="output_length=3 is shorter than the 4 tokens"):
        select_visual_tokens(jnp.ones((2, 8)), vis, 0.5, output_length=3)
    idx, n = select_visual_tokens(jnp.ones((2, 8)), vis, 0.5, output_length=4)
    assert idx.shape == (2, 4) and n.tolist() == [4, 4]


def test_bad_shapes():
    with pytest.raises(ValueError, match="visual_mask must be a boolean"):
        select_visual_tokens(jnp.ones((1, 4)), jnp.ones((1, 4)), 0.5)
    with pytest.raises(ValueError, match="importance must have the shape"):
        select_visual_tokens(jnp.ones((1, 5)), jnp.ones((1, 4), bool), 0.5)
    with pytest.raises(ValueError, match="batch axis"):
        gather_tokens(jnp.ones((3, 4, 2)), jnp.zeros((2, 2), jnp.int32))


def test_infinite_and_nan_scores_still_keep_the_count(impl):
    """-inf or NaN scores on visual tokens must not let text tokens take their places."""
    vis = jnp.asarray([[False, True, True, True, False, True]])
    for scores in ([0, -np.inf, -np.inf, 1, 0, -np.inf], [0, np.nan, np.nan, np.nan, 0, np.nan],
                   [0, np.nan, 2.0, np.nan, 0, 1.0]):
        idx, n = select_visual_tokens(jnp.asarray([scores], jnp.float32), vis, keep_count=3, implementation=impl)
        kept = np.asarray(idx[0, :int(n[0])])
        assert len(kept) == 5 and {0, 4} <= set(kept.tolist()), (scores, kept)
    idx, n = select_visual_tokens(jnp.asarray([[0, np.nan, 2.0, np.nan, 0, 1.0]], jnp.float32), vis, keep_count=2,
                                  implementation=impl)
    np.testing.assert_array_equal(np.asarray(idx[0, :int(n[0])]), [0, 2, 4, 5])  # NaN ranks last


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), S=st.sampled_from([1, 9, 300]), keep=st.floats(0.01, 1.0))
def test_selection_exact_on_awkward_scores(impl, seed, S, keep):
    """The radix select against a plain sort, on scores that stress it: signed zeros, infinities,
    NaN, neighbours one ulp apart and values sharing their high 16 bits, with many ties."""
    rng = np.random.default_rng(seed)
    one = np.float32(1.0)
    pool = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -1.5, 1e-30, -1e-30, one, np.nextafter(one, np.float32(2)),
                     np.nextafter(one, np.float32(0)), 1.0 + 2**-10, 3e38, -3e38], np.float32)
    B = 2
    imp = np.where(rng.random((B, S)) < 0.5, rng.choice(pool, (B, S)), rng.standard_normal((B, S))).astype(np.float32)
    vis = rng.random((B, S)) < 0.7
    want = select_reference(np.where(np.isnan(imp), -np.inf, imp), vis, keep)  # NaN ranks as -inf
    if max(len(w) for w in want) == 0:
        return
    idx, n = select_visual_tokens(jnp.asarray(imp), jnp.asarray(vis), keep, implementation=impl)
    _check(idx, n, want)


@pytest.mark.parametrize("S, output_length", [(16448, 4160), (30000, 9000), (70000, 1000)])
def test_selection_at_length(impl, S, output_length):
    """Sequences of real length (the selection kernel holds one in registers; past MAX_TOKENS the
    XLA select takes over), with many ties and padding. An output shorter than the kept count is
    refused (it would drop kept tokens while the lengths count them); a longer one repeats the
    last kept position."""
    rng = np.random.default_rng(S)
    B = 2
    imp = np.round(rng.random((B, S)) * 2000).astype(np.float32)
    vis = rng.random((B, S)) < 0.98
    lengths = np.asarray([S, S - 1234])
    wants = select_reference(imp, vis, 0.25, lengths)
    longest = max(len(w) for w in wants)
    args = (jnp.asarray(imp), jnp.asarray(vis), 0.25)
    if output_length < longest:
        with pytest.raises(ValueError, match=f"output_length={output_length} is shorter than the {longest} tokens"):
            select_visual_tokens(*args, valid_lengths=jnp.asarray(lengths), output_length=output_length,
                                 implementation=impl)
        output_length = longest + 7
    idx, n = select_visual_tokens(*args, valid_lengths=jnp.asarray(lengths), output_length=output_length,
                                  implementation=impl)
    assert idx.shape == (B, output_length)
    for b, want in enumerate(wants):
        assert int(n[b]) == len(want)
        got = np.asarray(idx[b])
        np.testing.assert_array_equal(got[:len(want)], want)
        assert (got[len(want):] == want[-1]).all()


@pytest.mark.parametrize("S", [16448, 32768])
def test_selection_kernel_fits_hopper(S):
    """Compiled for sm_90 by the official Triton (no GPU needed), the selection kernel fits in
    shared memory up to its length limit."""
    pytest.importorskip("triton")
    from mmfa_jax import triton_route
    from mmfa_jax.kernels import selection

    args = (jax.ShapeDtypeStruct((1, S), jnp.float32), jax.ShapeDtypeStruct((1, S), jnp.int8),
            jax.ShapeDtypeStruct((S + 1,), jnp.int32))
    [(kernel, *_)] = triton_route.lower_for(lambda s, k, n: selection.select(s, k, n, S // 4, lowering=ROUTE_H100), *args,
                                           device_kind="NVIDIA H100")
    assert kernel.shared <= 227 * 1024


@pytest.mark.parametrize("S, length", [(37, 8), (300, 64), (16448, 64), (5000, 4999)])
def test_compact_positions(impl, S, length):
    """The positions of a mask packed to the front (the scorer rows of importance), by the
    compaction kernel or XLA: against NumPy, including rows with none, with more than fit, and
    with every position."""
    rng = np.random.default_rng(S)
    mask = rng.random((4, S)) < np.array([[0.1], [0.0], [1.0], [0.5]])
    positions, counts = compact_positions(jnp.asarray(mask), length, implementation=impl)
    for b in range(4):
        want = np.flatnonzero(mask[b])[:length]
        assert int(counts[b]) == len(want)
        got = np.asarray(positions[b])
        np.testing.assert_array_equal(got[:len(want)], want)
        assert (got[len(want):] == (want[-1] if len(want) else 0)).all(), "the tail repeats the last position"


def test_compaction_kernel_fits_hopper():
    pytest.importorskip("triton")
    from mmfa_jax import triton_route
    from mmfa_jax.kernels import selection

    S = selection.MAX_TOKENS
    [(kernel, *_)] = triton_route.lower_for(lambda f: selection.compact(f, 128, lowering=ROUTE_H100),
                                           jax.ShapeDtypeStruct((1, S), jnp.bool_), device_kind="NVIDIA H100")
    assert kernel.shared <= 227 * 1024
