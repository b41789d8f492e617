"""Visual-token importance against the explicit float64 softmax of tests/reference.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, normal
from reference import importance_reference

import mmfa_jax
from mmfa_jax.importance import scorer_rows, visual_token_importance
from mmfa_jax.kernels import scorer

TOL = 1e-5  # float32 data: probabilities are computed in float32 from an LSE accurate to ~1e-7


def _visual_mask(rng, B, S):
    """Each example: text, one or two image spans of its own length, text."""
    vis = np.zeros((B, S), bool)
    for b in range(B):
        start = int(rng.integers(1, S // 4))
        vis[b, start:start + int(rng.integers(S // 4, S // 2))] = True
        if rng.random() < 0.5:
            second = int(rng.integers(S // 2 + 2, S - 3))
            vis[b, second:second + 3] = True
    return vis


def _options(rng, kind, B, T):
    return {
        "plain": {},
        "causal": dict(is_causal=True),
        "window+softcap": dict(local_window_size=(9, 2), logits_soft_cap=4.0),
        "lengths": dict(query_seq_lengths=rng.integers(T // 2, T + 1, B), key_value_seq_lengths=rng.integers(T // 2, T + 1, B)),
        "segments": dict(segment_ids=rng.integers(0, 2, (B, T))),
    }[kind]


def _reference_options(opts):
    ref = {"is_causal": opts.get("is_causal", False), "window": opts.get("local_window_size"),
           "softcap": opts.get("logits_soft_cap"), "q_lengths": opts.get("query_seq_lengths"),
           "kv_lengths": opts.get("key_value_seq_lengths")}
    if "segment_ids" in opts:
        ref["q_segments"] = ref["kv_segments"] = opts["segment_ids"]
    return ref


@pytest.mark.parametrize("kind", ["plain", "causal", "window+softcap", "lengths", "segments"])
@pytest.mark.parametrize("rule", ["text", "last", "explicit"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_importance_matches_softmax(rng, impl, kind, rule, heads):
    B, T, (N, K), H = 2, 45, heads, 40
    q, q64 = normal(rng, (B, T, N, H))
    k, k64 = normal(rng, (B, T, K, H))
    opts = _options(rng, kind, B, T)
    vis = _visual_mask(rng, B, T)
    _, lse = mmfa_jax.attention(q, k, k, return_lse=True, implementation="xla", **opts)
    if rule == "explicit":
        scorers = rng.random((B, T)) < 0.2
        scorers[:, -1] = True
    else:
        scorers = np.asarray(scorer_rows(rule, jnp.asarray(vis), opts.get("query_seq_lengths")))
    got = visual_token_importance(q, k, lse, jnp.asarray(vis), jnp.asarray(scorers) if rule == "explicit" else rule,
                                  implementation=impl, per_head=True, **opts)
    want = importance_reference(q64, k64, vis, scorers, per_head=True, **_reference_options(opts))
    assert_close(got, want, TOL, "per-head importance")
    mean = visual_token_importance(q, k, lse, jnp.asarray(vis), jnp.asarray(scorers), implementation=impl, **opts)
    assert_close(mean, want.mean(axis=1), TOL, "importance")
    assert (np.asarray(mean)[~vis] == 0).all(), "non-visual keys must get exactly 0"


@pytest.mark.parametrize("kind", ["plain", "causal", "window+softcap", "lengths", "segments"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 1)])
@pytest.mark.parametrize("programs", [512, 1])
def test_importance_computes_the_scorer_lse_itself(rng, impl, kind, heads, programs, monkeypatch):
    """lse=None: the scorer rows' LSE comes from the scorer-stats pass (no attention over all rows)
    and the importance still equals the full attention's softmax. Key counts not a multiple of
    the key block and more scorer rows than one row tile exercise the kernels' edges; aiming at
    a single program puts every key block of a head into one chunk (the in-program key loop)."""
    monkeypatch.setattr(scorer, "_SCORER_PROGRAMS", programs)
    jax.clear_caches()
    B, T, (N, K), H = 2, 150, heads, 40
    q, q64 = normal(rng, (B, T, N, H))
    k, k64 = normal(rng, (B, T, K, H))
    opts = _options(rng, kind, B, T)
    vis = _visual_mask(rng, B, T)
    scorers = rng.random((B, T)) < 0.5
    scorers[0, :] = False
    scorers[0, [0, T - 1]] = True  # example 0: the first row (sees one key when causal) and the last
    got = visual_token_importance(q, k, None, jnp.asarray(vis), jnp.asarray(scorers), implementation=impl,
                                  per_head=True, **opts)
    want = importance_reference(q64, k64, vis, scorers, per_head=True, **_reference_options(opts))
    assert_close(got, want, TOL, "per-head importance from the scorer-stats LSE")


def test_text_rows_spread_one_unit_of_probability(rng, impl):
    """Without masks each scorer row's probabilities sum to 1 over all keys: the per-head
    importance summed over every key (visual or not) is 1."""
    B, T, N, H = 1, 40, 2, 32
    q, _ = normal(rng, (B, T, N, H))
    k, _ = normal(rng, (B, T, N, H))
    _, lse = mmfa_jax.attention(q, k, k, return_lse=True, implementation="xla")
    everything = jnp.ones((B, T), bool)
    got = visual_token_importance(q, k, lse, everything, jnp.asarray(rng.random((B, T)) < 0.3).at[:, 0].set(True),
                                  implementation=impl, per_head=True)
    np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, rtol=1e-5)


def test_max_scorers_and_jit(rng, impl):
    """A static bound on the scorer rows gives the same numbers, also under jit."""
    B, T, N, H = 2, 36, 2, 32
    q, q64 = normal(rng, (B, T, N, H))
    k, k64 = normal(rng, (B, T, N, H))
    vis = np.zeros((B, T), bool)
    vis[:, 4:30] = True
    _, lse = mmfa_jax.attention(q, k, k, return_lse=True, implementation="xla", is_causal=True)
    want = importance_reference(q64, k64, vis, ~vis, is_causal=True)
    f = jax.jit(lambda q, k, lse, vis: visual_token_importance(q, k, lse, vis, "text", max_scorers=10,
                                                               is_causal=True, implementation=impl))
    assert_close(f(q, k, lse, jnp.asarray(vis)), want, TOL, "importance, max_scorers=10 under jit")
    with pytest.raises(ValueError, match="max_scorers"):
        visual_token_importance(q, k, lse, jnp.asarray(vis), "text", max_scorers=5, implementation=impl)


def test_no_scorers_gives_zeros(rng, impl):
    B, T, N, H = 2, 20, 2, 16
    q, _ = normal(rng, (B, T, N, H))
    _, lse = mmfa_jax.attention(q, q, q, return_lse=True, implementation="xla")
    scorers = jnp.zeros((B, T), bool).at[1, 3].set(True)
    got = np.asarray(visual_token_importance(q, q, lse, jnp.ones((B, T), bool), scorers, implementation=impl))
    assert np.isfinite(got).all() and (got[0] == 0).all() and (got[1] > 0).all()


@pytest.mark.parametrize("bad, match", [
    (dict(lse="wrong"), "lse must have shape"),
    (dict(visual_mask="float"), "visual_mask must be a boolean"),
    (dict(scorers="first"), "scorers must be one of"),
    (dict(scorers="shape"), "scorers must be"),
    (dict(max_scorers=0), "max_scorers must be in"),
])
def test_bad_input(rng, bad, match):
    B, T, N, H = 1, 12, 2, 16
    q, _ = normal(rng, (B, T, N, H))
    _, lse = mmfa_jax.attention(q, q, q, return_lse=True, implementation="xla")
    vis = jnp.ones((B, T), bool)
    args = dict(lse=lse, visual_mask=vis, scorers="text", max_scorers=None)
    if "lse" in bad:
        args["lse"] = lse[:, :, :1]
    if "visual_mask" in bad:
        args["visual_mask"] = vis.astype(jnp.float32)
    if bad.get("scorers") == "first":
        args["scorers"] = "first"
    if bad.get("scorers") == "shape":
        args["scorers"] = jnp.ones((B, T + 1), bool)
    if "max_scorers" in bad:
        args["max_scorers"] = bad["max_scorers"]
    with pytest.raises(ValueError, match=match):
        visual_token_importance(q, q, args["lse"], args["visual_mask"], args["scorers"], max_scorers=args["max_scorers"],
                                implementation="xla")


@pytest.mark.parametrize("kind", ["plain", "causal"])
def test_importance_bnth_layout(rng, impl, kind):
    """Heads-first arrays (the torch layout) give the same importance."""
    B, T, N, K, H = 2, 37, 4, 2, 24
    q, q64 = normal(rng, (B, T, N, H))
    k, k64 = normal(rng, (B, T, K, H))
    opts = _options(rng, kind, B, T)
    vis = _visual_mask(rng, B, T)
    _, lse = mmfa_jax.attention(q, k, k, return_lse=True, implementation="xla", **opts)
    got = visual_token_importance(jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2), jnp.swapaxes(lse, 1, 2),
                                  jnp.asarray(vis), "text", implementation=impl, layout="BNTH", **opts)
    want = importance_reference(q64, k64, vis, np.asarray(scorer_rows("text", jnp.asarray(vis))),
                                **_reference_options(opts))
    assert_close(got, want, TOL, "importance, BNTH")


@pytest.mark.parametrize("causal", [False, True])
def test_sparsevlm_raters(rng, impl, causal):
    """Raters: text rows whose attention mass on visual keys is at least the text rows' mean."""
    from reference import attention_probabilities

    from mmfa_jax.importance import sparsevlm_raters

    B, T, N, K, H = 2, 40, 4, 2, 32
    q, q64 = normal(rng, (B, T, N, H))
    k, k64 = normal(rng, (B, T, K, H))
    vis = _visual_mask(rng, B, T)
    got = np.asarray(sparsevlm_raters(q, k, jnp.asarray(vis), is_causal=causal, implementation=impl))
    mass = (attention_probabilities(q64, k64, is_causal=causal) * vis[:, None, None, :]).sum(-1).mean(1)  # (B, T)
    text = ~vis
    mean = (mass * text).sum(1) / text.sum(1)
    want = text & (mass >= mean[:, None])
    clear = np.abs(mass - mean[:, None]) > 1e-5  # float32 may fall either side of a near-tie
    np.testing.assert_array_equal(got[clear], want[clear])
    assert not got[vis].any(), "visual rows are never raters"
