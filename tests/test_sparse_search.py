"""mmfa_jax.sparse_search: the per-head pattern search against NumPy float64 recomputations.

Every recall the search reports is recomputed here from the config's own maps (``build_blocks``)
with a float64 dense causal softmax (no kernels), the densities by counting the map's blocks that
hold a visible (query, key) pair, and the choice is checked against every candidate's recomputed
recall and density."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, normal

import mmfa_jax
from mmfa_jax import sparse_search as ss
from mmfa_jax._checks import ArgumentError, ArgumentTypeError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.sparse import synthetic_video  # noqa: E402

# float32 kernels against float64: recalls agree to ~1e-6; 1e-4 leaves margin. A candidate whose
# float64 recall lies within it of the target cannot be judged either way, and is counted apart.
RECALL_TOL = 1e-4


# ------------------------------------------------------------------------------------------------
# NumPy float64 yardsticks.


def _token_mask(blocks, perm, block, T):
    """bool (B, N, T, T) in the original order: what each query sees under the map (in the order
    ``perm``, or the original one for None), with the original causality."""
    blocks = np.asarray(blocks, bool)
    B = blocks.shape[0]
    idx = np.arange(T) // block
    in_order = blocks[:, :, idx][:, :, :, idx]  # (B, N, T, T) over the rows/columns of the order
    perm = np.broadcast_to(np.arange(T), (B, T)) if perm is None else np.asarray(perm)
    out = np.zeros_like(in_order)
    for b in range(B):
        p = perm[b]
        causal = p[None, :] <= p[:, None]  # key position <= query position
        out[b][:, p[:, None], p[None, :]] = in_order[b] & causal
    return out


def _probabilities(q64, k64, scale=None):
    """(B, N, T, T) float64 causal softmax of q (B, T, N, D), k (B, T, K, D)."""
    B, T, N, D = q64.shape
    k = np.repeat(k64, N // k64.shape[2], axis=2)
    s = np.einsum("bqnd,bknd->bnqk", q64, k) * (D ** -0.5 if scale is None else scale)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _recall(p, mask):
    """(N,) mean over batch and rows of the kept share of each row's softmax mass."""
    return (p * mask).sum(-1).mean(axis=(0, 2))


def _density(blocks, perm, block, T):
    """(N,) computed blocks (those holding a visible pair) over n(n+1)/2, mean over the batch."""
    blocks = np.asarray(blocks, bool)
    B, N, n, _ = blocks.shape
    perm = np.broadcast_to(np.arange(T), (B, T)) if perm is None else np.asarray(perm)
    out = np.zeros((B, N))
    for b in range(B):
        pos = np.full(n * block, -1)
        pos[:T] = perm[b]
        pos = pos.reshape(n, block)
        q_hi = pos.max(1)
        k_lo = np.where(pos >= 0, pos, np.iinfo(np.int64).max).min(1)
        some = k_lo[None, :] <= q_hi[:, None]
        out[b] = (blocks[b] & some).sum((1, 2))
    return out.mean(0) / (n * (n + 1) / 2)


def _uniform(candidate, N, block=32, order="original"):
    """A config giving every head the candidate (to read its maps through build_blocks)."""
    c = ss.Candidate.of(candidate)
    return ss.SparseConfig([ss.HeadPattern(c.pattern, c.params, c.boundaries, 0.0, 0.0) for _ in range(N)], block,
                           order=order)


def _video(rng, frames=6, tokens_per_frame=64, text=32, heads=4, kv_heads=2, head_dim=32):
    q, k, v, visual = synthetic_video(rng, frames, tokens_per_frame, text, heads, kv_heads, head_dim, jnp.float32)
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    return (q, k, v, jnp.asarray(visual)), (f64(q), f64(k), f64(v))


# ------------------------------------------------------------------------------------------------
# The search.


def test_search_reaches_target_at_the_lowest_density(rng):
    """Synthetic video, both orders, boundaries: each head's reported recall and density equal
    float64 recomputations from build_blocks' map, the recall reaches the target, no candidate
    of lower density (recomputed) reaches it, and the lower-density order won."""
    F, P, block, target = 6, 64, 32, 0.9
    (q, k, v, visual), (q64, k64, v64) = _video(rng, F, P)
    T, N = q.shape[1], q.shape[2]
    candidates = [c for c in ss.default_candidates(T, block, boundaries=(None, "2d")) if c.pattern != "vertical_slash"]
    candidates += [ss.Candidate("vertical_slash", {"vertical": 64, "slash": 128, "last_q": 32}, "2d")]
    layout = dict(visual_mask=visual, frames=F, tokens_per_frame=P)
    config = ss.search(q, k, v, candidates=candidates, target_recall=target, block=block, order="auto",
                       implementation="xla", kv_heads_per_chunk=1, progress=False, **layout)
    densities = config.calibration["densities_by_order"]
    assert config.order == min(densities, key=lambda o: (densities[o], o != "original"))
    assert config.calibration["seq_len"] == T and len(config.heads) == N

    p = _probabilities(q64, k64)
    blocks, perm = ss.build_blocks(config, q, k, **layout)
    assert blocks.shape == (1, N, -(-T // block), -(-T // block)) and blocks.dtype == jnp.bool_
    assert (perm is None) == (config.order == "original")
    got_recall = _recall(p, _token_mask(blocks, perm, block, T))
    got_density = _density(blocks, perm, block, T)
    for h, head in enumerate(config.heads):
        assert head.reached
        assert abs(head.recall - got_recall[h]) < RECALL_TOL, (h, head, got_recall[h])
        assert got_recall[h] >= target - RECALL_TOL, (h, head)
        assert head.density == pytest.approx(got_density[h], abs=1e-12)

    # Optimality: every candidate's map in the chosen order, recomputed.
    for c in candidates:
        cb, cperm = ss.build_blocks(_uniform(c, N, block, config.order), q, k, **layout)
        r, d = _recall(p, _token_mask(cb, cperm, block, T)), _density(cb, cperm, block, T)
        for h, head in enumerate(config.heads):
            if d[h] < head.density - 1e-12 and abs(r[h] - target) > RECALL_TOL:
                assert r[h] < target, f"head {h}: {c.label} reaches {r[h]:.4f} at density {d[h]:.4f} < {head}"
    assert config.density < 1.0, "the video's structure lets some pattern beat dense"

    # attend: the layer's attention with the config equals the float64 masked softmax.
    out = ss.attend(config, q, k, v, implementation="xla", **layout)
    mask = _token_mask(blocks, perm, block, T)
    s = np.einsum("bqnd,bknd->bnqk", q64, np.repeat(k64, 2, axis=2)) / np.sqrt(q64.shape[-1])
    w = np.exp(np.where(mask, s, -np.inf) - np.where(mask, s, -np.inf).max(-1, keepdims=True))
    want = np.einsum("bnqk,bknd->bqnd", w / w.sum(-1, keepdims=True), np.repeat(v64, 2, axis=2))
    assert_close(out, want, 2e-5, "attend")


def test_evaluate_on_a_fresh_input(rng):
    """A config searched on one video, evaluated on another (new noise, same layout): evaluate's
    recall and density equal the float64 recomputation from build_blocks' map on that input."""
    F, P, block = 4, 64, 64  # the shapes of test_json_round_trip: its compiled calls serve this one too
    (q, k, v, visual), _ = _video(rng, F, P, text=20, heads=2, kv_heads=1, head_dim=16)
    layout = dict(visual_mask=visual, frames=F, tokens_per_frame=P)
    cands = [ss.Candidate("block_topk", {"keep": 2}, "2d"), ss.Candidate("a_shape", {"local_blocks": 2}, "2d")]
    config = ss.search(q, k, v, candidates=cands, target_recall=0.7, block=block, order="permuted",
                       implementation="xla", progress=False, **layout)
    (q2, k2, v2, _), (q64, k64, _) = _video(rng, F, P, text=20, heads=2, kv_heads=1, head_dim=16)
    recall, density = ss.evaluate(config, q2, k2, v2, implementation="xla", **layout)
    blocks, perm = ss.build_blocks(config, q2, k2, **layout)
    T = q2.shape[1]
    assert_close(recall, _recall(_probabilities(q64, k64), _token_mask(blocks, perm, block, T)), RECALL_TOL, "recall")
    assert np.array_equal(density, _density(blocks, perm, block, T))
    assert (recall < 1 - 1e-3).any(), "a real partial recall"


def test_picks_the_lower_density_when_two_reach_the_target(rng):
    """Two candidates both reach the target: the sparser wins although listed after the full one;
    one below the target is never chosen, even though it is the sparsest; on equal densities the
    first listed wins."""
    T, block, N, K = 256, 32, 4, 2
    n = T // block
    (q, _), (k, _), (v, _) = (normal(rng, (2, T, h, 16)) for h in (N, K, K))
    q = q * 0.3  # low-contrast logits: the kept share tracks the kept keys
    (q64, k64) = (np.asarray(x, np.float64) for x in (q, k))
    full = ss.Candidate("a_shape", {"sink_blocks": 1, "local_blocks": n})
    wide = ss.Candidate("a_shape", {"sink_blocks": 0, "local_blocks": n - 2})
    thin = ss.Candidate("a_shape", {"sink_blocks": 0, "local_blocks": 1})
    p = _probabilities(q64, k64)
    recall = {c.label: _recall(p, _token_mask(ss.build_blocks(_uniform(c, N, block), q, k)[0], None, block, T))
              for c in (full, wide, thin)}
    target = 0.8
    assert (recall[wide.label] > target + 0.02).all() and (recall[thin.label] < target - 0.02).all(), recall
    config = ss.search(q, k, v, candidates=[full, thin, wide], target_recall=target, block=block,
                       implementation="xla", kv_heads_per_chunk=2, progress=False)
    assert [h.label for h in config.heads] == [wide.label] * N
    assert all(h.density < 1 for h in config.heads)
    # equal densities (both every causal block): the first listed
    topk_all = ss.Candidate("block_topk", {"keep": n})
    config = ss.search(q, k, candidates=[topk_all, full], target_recall=target, block=block, implementation="xla",
                       progress=False)
    assert [h.pattern for h in config.heads] == ["block_topk"] * N
    assert all(h.density == 1.0 for h in config.heads)


def test_full_density_gives_recall_one_and_dense_fallback(rng):
    """A candidate with every causal block has recall 1 (and density 1); a target that no
    candidate reaches gives 'dense', whose map (in the permuted order too) has recall 1."""
    F, P, block = 4, 64, 64
    (q, k, v, visual), (q64, k64, _) = _video(rng, F, P, text=40, heads=2, kv_heads=1, head_dim=16)
    T = q.shape[1]
    n = -(-T // block)
    config = ss.search(q, k, v, candidates=[{"pattern": "a_shape", "params": {"sink_blocks": 0, "local_blocks": n}}],
                       target_recall=0.999, block=block, order="original", implementation="xla", progress=False)
    for h in config.heads:
        assert h.pattern == "a_shape" and h.density == 1.0 and h.recall == pytest.approx(1.0, abs=1e-5)
    layout = dict(visual_mask=visual, frames=F, tokens_per_frame=P)
    config = ss.search(q, k, v, candidates=[ss.Candidate("a_shape", {"sink_blocks": 0, "local_blocks": 1})],
                       target_recall=1.0, block=block, order="permuted", implementation="xla", progress=False, **layout)
    assert config.order == "permuted"
    assert [h.pattern for h in config.heads] == ["dense", "dense"] and all(h.recall == 1.0 for h in config.heads)
    blocks, perm = ss.build_blocks(config, q, k, **layout)
    assert_close(_recall(_probabilities(q64, k64), _token_mask(blocks, perm, block, T)), np.ones(2), 1e-12, "recall")
    # the permuted order's dense map computes the blocks that hold a visible pair: more than n(n+1)/2
    assert [h.density for h in config.heads] == pytest.approx(_density(blocks, perm, block, T), abs=1e-12)
    assert config.heads[0].density >= 1.0


def test_interpret_matches_float64(rng):
    """The search through the Pallas kernels (interpreter): reported recall equals float64."""
    T, block, N, K = 200, 32, 2, 1
    (q, q64), (k, k64), (v, _) = (normal(rng, (1, T, h, 16)) for h in (N, K, K))
    cands = [ss.Candidate("block_topk", {"keep": 2}), ss.Candidate("a_shape", {"sink_blocks": 1, "local_blocks": 3})]
    config = ss.search(q, k, v, candidates=cands, target_recall=0.5, block=block, implementation="interpret",
                       progress=False)
    blocks, _ = ss.build_blocks(config, q, k)
    want = _recall(_probabilities(q64, k64), _token_mask(blocks, None, block, T))
    for h, head in enumerate(config.heads):
        assert head.pattern != "dense" and head.recall == pytest.approx(want[h], abs=RECALL_TOL)
        assert want[h] >= 0.5 - RECALL_TOL


def test_json_round_trip(rng, tmp_path):
    (q, k, v, visual), _ = _video(rng, 4, 64, text=20, heads=2, kv_heads=1, head_dim=16)
    layout = dict(visual_mask=visual, frames=4, tokens_per_frame=64)
    cands = [ss.Candidate("block_topk", {"keep": 2}, "2d"), ss.Candidate("vertical_slash", {"vertical": 32, "slash": 64}),
             ss.Candidate("a_shape", {"local_blocks": 2}, "q")]
    config = ss.search(q, k, v, candidates=cands, target_recall=0.6, block=64, order="permuted", implementation="xla",
                       model="tiny-vlm", layer=3, progress=False, **layout)
    text = config.to_json(tmp_path / "layer3.json")
    back = ss.SparseConfig.from_json(text)
    assert back == config
    assert ss.SparseConfig.from_json(tmp_path / "layer3.json") == config
    doc = json.loads(text)
    assert doc["model"] == "tiny-vlm" and doc["layer"] == 3 and doc["block"] == 64 and len(doc["heads"]) == 2
    assert set(doc["heads"][0]) == {"head", "pattern", "params", "boundaries", "recall", "density", "reached"}
    for a, b in zip(ss.build_blocks(config, q, k, **layout), ss.build_blocks(back, q, k, **layout)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    other = ss.SparseConfig(config.heads[::-1], 64, order="permuted", model="tiny-vlm", layer=4)
    ss.save_configs(tmp_path / "model.json", [config, other])
    loaded = ss.load_configs(tmp_path / "model.json")
    assert loaded == {3: config, 4: other}
    assert ss.load_configs(text) == {3: config}
    assert "tiny-vlm" in config.table() and config.heads[0].label in config.table()


def test_command_line(rng, tmp_path, capsys):
    """python -m mmfa_jax.sparse_search, on synthetic video and on an .npz; writes the JSON."""
    cands = json.dumps([{"pattern": "block_topk", "params": {"keep": 2}},
                        {"pattern": "a_shape", "params": {"sink_blocks": 1, "local_blocks": 2}, "boundaries": "2d"}])
    out = tmp_path / "synthetic.json"
    assert ss.main(["--synthetic", "--frames", "3", "--tokens-per-frame", "64", "--text", "16", "--heads", "2",
                    "--kv-heads", "1", "--head-dim", "16", "--block", "64", "--candidates", cands,
                    "--target-recall", "0.5", "--implementation", "xla", "--layer", "0", "--out", str(out)]) == 0
    config = ss.SparseConfig.from_json(out)
    assert config.model == "synthetic-video" and config.layer == 0 and config.num_heads == 2
    assert "wrote" in capsys.readouterr().out
    (q, _), (k, _) = (normal(rng, (1, 130, h, 8)) for h in (2, 1))
    np.savez(tmp_path / "qk.npz", q=np.asarray(q), k=np.asarray(k))
    out = tmp_path / "npz.json"
    assert ss.main(["--npz", str(tmp_path / "qk.npz"), "--block", "32", "--candidates",
                    json.dumps([{"pattern": "a_shape", "params": {"local_blocks": 2}}]), "--target-recall", "0.3",
                    "--implementation", "xla", "--model", "m", "--out", str(out)]) == 0
    assert ss.SparseConfig.from_json(out).calibration["seq_len"] == 130


def test_errors(rng):
    (q, _), (k, _) = (normal(rng, (1, 64, h, 8)) for h in (2, 1))
    a = [ss.Candidate("a_shape", {"local_blocks": 1})]
    with pytest.raises(ArgumentError, match="target_recall must be in \\(0, 1\\], got 1.5"):
        ss.search(q, k, candidates=a, target_recall=1.5, block=32)
    with pytest.raises(ArgumentError, match="target_recall must be in \\(0, 1\\], got 0.0"):
        ss.search(q, k, candidates=a, target_recall=0.0, block=32)
    with pytest.raises(ArgumentError, match="block must be >= 1, got 0"):
        ss.search(q, k, candidates=a, block=0)
    with pytest.raises(ArgumentError, match="order must be one of .* got 'sideways'"):
        ss.search(q, k, candidates=a, block=32, order="sideways")
    with pytest.raises(ArgumentError, match="order 'permuted' needs visual_mask, frames and tokens_per_frame"):
        ss.search(q, k, candidates=a, block=32, order="permuted")
    with pytest.raises(ValueError, match="implementation must be one of .* got 'fast'"):
        ss.search(q, k, candidates=a, block=32, implementation="fast")
    with pytest.raises(ArgumentError, match="candidates\\[0\\].pattern must be one of .* got 'grid'"):
        ss.search(q, k, candidates=[{"pattern": "grid"}], block=32)
    with pytest.raises(ArgumentError, match="needs 'keep'"):
        ss.Candidate("block_topk", {})
    with pytest.raises(ArgumentError, match="unknown \\['window'\\]"):
        ss.Candidate("a_shape", {"local_blocks": 1, "window": 3})
    with pytest.raises(ArgumentError, match="Candidate.params\\['local_blocks'\\] must be >= 1, got 0"):
        ss.Candidate("a_shape", {"local_blocks": 0})
    with pytest.raises(ArgumentTypeError, match="Candidate.params\\['keep'\\] must be an integer, got 2.5"):
        ss.Candidate("block_topk", {"keep": 2.5})
    with pytest.raises(ArgumentError, match="Candidate.boundaries must be one of .* got 'rows'"):
        ss.Candidate("block_topk", {"keep": 1}, "rows")
    with pytest.raises(ArgumentError, match="visual_mask is needed"):
        ss.search(q, k, candidates=[ss.Candidate("block_topk", {"keep": 1}, "2d")], block=32)
    with pytest.raises(ArgumentError, match="query must be \\(B, T, heads, D\\), got shape \\(64, 2, 8\\)"):
        ss.search(q[0], k, candidates=a, block=32)
    with pytest.raises(ArgumentError, match="key's heads 2 must divide query's heads 3"):
        ss.search(jnp.zeros((1, 64, 3, 8)), jnp.zeros((1, 64, 2, 8)), candidates=a, block=32)
    with pytest.raises(ArgumentError, match="visual_mask must be a boolean \\(B, T\\) = \\(1, 64\\) array"):
        ss.search(q, k, candidates=a, block=32, visual_mask=np.ones((1, 63), bool), frames=1, tokens_per_frame=63,
                  order="permuted")
    config = _uniform(a[0], 4)
    with pytest.raises(ArgumentError, match="query has 2 heads but the config holds 4"):
        ss.build_blocks(config, q, k)
    with pytest.raises(ArgumentError, match="visual_mask is needed: the config uses modality boundaries"):
        ss.build_blocks(_uniform(ss.Candidate("block_topk", {"keep": 1}, "q"), 2), q, k)
    with pytest.raises(ArgumentTypeError, match="config must be a SparseConfig, got dict"):
        ss.build_blocks({}, q, k)
    with pytest.raises(ArgumentError, match="format 'mmfa.sparse_search/1', got 'other'"):
        ss.SparseConfig.from_json('{"format": "other"}')
    with pytest.raises(ArgumentError, match="source must be JSON text or the path of a JSON file"):
        ss.SparseConfig.from_json("/no/such/file.json")


@pytest.mark.parametrize("lists", ["indices", "dense"])
def test_bench_prefill_with_a_full_budget_is_dense_attention(lists):
    """bench/sparse.py's whole sparse prefill (permuted order, index lists or a dense map, text rows
    by dense attention), with a budget that keeps every block, equals dense causal attention, also
    when a frame is not a multiple of the block (visual tokens then move into the text's block)."""
    from bench.sparse import _sparse_prefill

    frames, per_frame, text, block = 2, 20, 8, 16
    q, k, v, visual = synthetic_video(np.random.default_rng(3), frames, per_frame, text, 2, 1, 16, jnp.float32)
    (out, lse), _ = _sparse_prefill(frames, per_frame, 64, block, "interpret", lists, text)(q, k, v, visual)
    want, want_lse = mmfa_jax.attention(q, k, v, is_causal=True, implementation="xla", return_lse=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=2e-5)
