"""Offline per-head pattern search for block-sparse prefill (MMInference's offline step, issue 17 part 3).

Given one layer's calibration q, k (and v) and optionally the visual layout, choose for every query
head the sparse pattern and budget that keeps at least ``target_recall`` of its attention (the
mean over the head's rows of ``sparse_patterns.recall``: the share of each query's causal softmax
mass that the kept keys carry) at the lowest density (computed blocks / the dense causal kernel's
blocks). The result is a ``SparseConfig`` (one ``HeadPattern`` per query head) saved as JSON; for
a new input, ``build_blocks`` (or ``block_mask``, ``attend``) turns it into one block map for one
kernel call.

    from mmfa_jax import sparse_search as ss

    config = ss.search(q, k, v, block=128, visual_mask=visual, frames=F, tokens_per_frame=P,
                       model="Qwen2.5-VL-7B", layer=3)          # q (B, T, N, D), k/v (B, T, K, D)
    print(config.table())
    open("layer3.json", "w").write(config.to_json())
    ...
    config = ss.SparseConfig.from_json(open("layer3.json").read())
    out = ss.attend(config, q, k, v, visual_mask=visual, frames=F, tokens_per_frame=P)

Command line (writes the JSON, prints the table)::

    python -m mmfa_jax.sparse_search --synthetic --frames 16 --tokens-per-frame 64 --text 64 \
        --heads 4 --kv-heads 2 --block 64 --out config.json
    python -m mmfa_jax.sparse_search --npz layer3.npz --block 128 --out layer3.json   # arrays q, k[, v, visual_mask]

Candidates are data (``Candidate``): a pattern of ``mmfa_jax.sparse_patterns`` with its budget
(``a_shape``: sink_blocks, local_blocks; ``vertical_slash``: vertical, slash[, last_q];
``block_topk``: keep; ``dense``: every block) and optional modality boundaries (``"q"``: text
query blocks see every earlier block; ``"2d"``: also every query block sees the text key blocks).
``default_candidates`` gives a grid of budgets.

One order per layer. The permuted video order (visual tokens position-major,
``sparse_patterns.video_permutation``) is a property of the whole layer (``SparseConfig.order``),
not of a head: one kernel call takes one row order for all heads (the rows of q, k and v are
permuted once; a per-head order would need a per-head copy of K/V and a separate call). With
``order="auto"`` the search runs both orders and keeps the one whose heads need the lower mean
density.

Memory: the search loops over groups of ``kv_heads_per_chunk`` K/V heads (their query heads), so
what it holds at once is O(T) per head plus one candidate's (n x n) block map and its lists
(n = T / block: about n^2 * 9 bytes per head, the BlockMask's int32 lists included); the recall
comes from the kernels' log-sum-exps (no T x S scores). Only implementation="xla" (plain jax, a
dense mask per chunk) is quadratic in T; it is meant for small calibration inputs and tests.

In the permuted order the patterns get the rows' original positions: their causal filter
(``sparse_patterns.causal_blocks``) keeps every block that holds an earlier-in-time key, also
right of that order's diagonal, and ``vertical_slash`` estimates under the original causality;
its columns and diagonals are those of the permuted order, and the measured recall includes that.

Selection per head: among the candidates that reach the target, the lowest density, and among
equal densities the one listed first. A candidate's density is known from its map before any
attention runs, so its recall is measured only where it could beat the best so far. A head that
no candidate brings to the target gets ``dense`` (every block: recall 1 by construction).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmfa_jax import _checks, backends
from mmfa_jax import sparse_patterns as sp
from mmfa_jax._checks import ArgumentError, ArgumentTypeError
from mmfa_jax.block_sparse import BlockMask, block_sparse_attention

PATTERNS = ("a_shape", "vertical_slash", "block_topk", "dense")
BOUNDARIES = (None, "q", "2d")
ORDERS = ("original", "permuted")
FORMAT = "mmfa.sparse_search/1"

# Each pattern's parameters: name -> (default or None when required, minimum).
_PARAMS: dict[str, dict[str, tuple[int | None, int]]] = {
    "a_shape": {"sink_blocks": (1, 0), "local_blocks": (None, 1)},
    "vertical_slash": {"vertical": (None, 1), "slash": (None, 1), "last_q": (64, 1)},
    "block_topk": {"keep": (None, 1)},
    "dense": {},
}


# ------------------------------------------------------------------------------------------------
# Candidates and the config.


@dataclasses.dataclass
class Candidate:
    """One pattern with its budget: ``pattern`` in PATTERNS, ``params`` its integer parameters
    (missing optional ones take their defaults), ``boundaries`` None, "q" or "2d"."""

    pattern: str
    params: dict = dataclasses.field(default_factory=dict)
    boundaries: str | None = None

    def __post_init__(self):
        self.pattern, self.params, self.boundaries = _checked_pattern(self.pattern, self.params, self.boundaries,
                                                                      "Candidate")

    @property
    def label(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.pattern}({args})" + (f"+{self.boundaries}" if self.boundaries else "")

    @classmethod
    def of(cls, x, name: str = "candidate") -> "Candidate":
        """A ``Candidate`` from itself or a dict {"pattern", "params", "boundaries"}."""
        if isinstance(x, Candidate):
            return x
        if isinstance(x, dict):
            extra = set(x) - {"pattern", "params", "boundaries"}
            if extra or "pattern" not in x:
                raise ArgumentError(f"{name} must be a Candidate or a dict with keys pattern, params, boundaries; got "
                                    f"keys {sorted(x)}")
            # checked under the caller's name first, so that an error says which entry
            return cls(*_checked_pattern(x["pattern"], dict(x.get("params") or {}), x.get("boundaries"), name))
        raise ArgumentTypeError(f"{name} must be a Candidate or a dict, got {type(x).__name__}")


def _checked_pattern(pattern, params, boundaries, name: str):
    _checks.choice(pattern, f"{name}.pattern", PATTERNS)
    if not isinstance(params, dict):
        raise ArgumentTypeError(f"{name}.params must be a dict, got {type(params).__name__}")
    spec = _PARAMS[pattern]
    unknown = set(params) - set(spec)
    if unknown:
        raise ArgumentError(f"{name}.params for {pattern!r} takes {sorted(spec)}, got unknown {sorted(unknown)}")
    out = {}
    for key, (default, minimum) in spec.items():
        if key not in params and default is None:
            raise ArgumentError(f"{name}.params for {pattern!r} needs {key!r}, got {params!r}")
        out[key] = _checks.integer(params.get(key, default), f"{name}.params[{key!r}]", minimum=minimum)
    _checks.choice(boundaries, f"{name}.boundaries", BOUNDARIES)
    if pattern == "dense" and boundaries is not None:
        raise ArgumentError(f"{name}.boundaries must be None for 'dense' (it keeps every block), got {boundaries!r}")
    return pattern, out, boundaries


@dataclasses.dataclass
class HeadPattern:
    """One query head's choice: its pattern, parameters and boundaries (as ``Candidate``), and what
    the search measured on the calibration input: ``recall`` (mean over the head's rows and the
    batch), ``density`` (its computed blocks over the dense causal kernel's n(n+1)/2, mean over the
    batch) and ``reached`` (recall >= the target)."""

    pattern: str
    params: dict
    boundaries: str | None
    recall: float
    density: float
    reached: bool = True

    def __post_init__(self):
        self.pattern, self.params, self.boundaries = _checked_pattern(self.pattern, self.params, self.boundaries,
                                                                      "HeadPattern")

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.pattern, dict(self.params), self.boundaries)

    @property
    def label(self) -> str:
        return self.candidate.label


@dataclasses.dataclass
class SparseConfig:
    """One layer's per-head patterns (``heads[n]``: query head n) for block size ``block`` in the
    row order ``order`` ("original", or "permuted": visual tokens position-major, for every head),
    searched for ``target_recall``. ``model`` and ``layer`` name where it belongs; ``calibration``
    records what it was searched on (lengths, layout), for the reader."""

    heads: list
    block: int
    order: str = "original"
    target_recall: float = 0.95
    model: str = ""
    layer: int | None = None
    calibration: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.block = _checks.integer(self.block, "block", minimum=1)
        _checks.choice(self.order, "order", ORDERS)
        if not isinstance(self.heads, (list, tuple)) or not self.heads:
            raise ArgumentError(f"heads must be a non-empty list of HeadPattern, got {self.heads!r}")
        self.heads = [h if isinstance(h, HeadPattern) else HeadPattern(**h) for h in self.heads]

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    @property
    def density(self) -> float:
        """Mean density over the heads: the layer's cost against dense causal attention."""
        return float(np.mean([h.density for h in self.heads]))

    @property
    def min_recall(self) -> float:
        return float(min(h.recall for h in self.heads))

    @property
    def uses_boundaries(self) -> bool:
        return any(h.boundaries for h in self.heads)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "model": self.model, "layer": self.layer, "block": self.block, "order": self.order,
                "target_recall": self.target_recall, "calibration": self.calibration,
                "heads": [dict(head=i, **dataclasses.asdict(h)) for i, h in enumerate(self.heads)]}

    def to_json(self, path=None, *, indent: int = 1) -> str:
        """The JSON text (also written to ``path`` when given)."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "SparseConfig":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ArgumentError(f"a sparse-search config must be a dict with format {FORMAT!r}, got {got!r}")
        heads = []
        for i, h in enumerate(d["heads"]):
            h = dict(h)
            if h.pop("head", i) != i:
                raise ArgumentError(f"heads[{i}] has head index {h.get('head')}: the entries must be in head order")
            heads.append(HeadPattern(**h))
        return cls(heads=heads, block=d["block"], order=d.get("order", "original"),
                   target_recall=d.get("target_recall", 0.95), model=d.get("model", ""), layer=d.get("layer"),
                   calibration=d.get("calibration") or {})

    @classmethod
    def from_json(cls, source) -> "SparseConfig":
        """From JSON text, or from the path of a file holding it."""
        return cls.from_dict(json.loads(_read(source)))

    def table(self) -> str:
        """A per-head table of the choice and its measured recall and density."""
        lines = [f"model {self.model or '-'}, layer {self.layer if self.layer is not None else '-'}: block "
                 f"{self.block}, order {self.order}, target recall {self.target_recall}",
                 f"{'head':>4}  {'pattern':<44} {'recall':>7} {'density':>8}"]
        for i, h in enumerate(self.heads):
            flag = "" if h.reached else "  (below target)"
            lines.append(f"{i:>4}  {h.label:<44} {h.recall:7.4f} {h.density:8.4f}{flag}")
        lines.append(f"mean density {self.density:.4f}, lowest recall {self.min_recall:.4f}")
        return "\n".join(lines)


def save_configs(path, configs: Sequence[SparseConfig], *, model: str | None = None):
    """Write several layers' configs of one model to one JSON file {"format", "model", "layers": [...]}."""
    configs = list(configs)
    if not configs or not all(isinstance(c, SparseConfig) for c in configs):
        raise ArgumentError(f"configs must be a non-empty sequence of SparseConfig, got {configs!r}")
    doc = {"format": FORMAT, "model": model if model is not None else configs[0].model,
           "layers": [c.to_dict() for c in configs]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def load_configs(source) -> dict:
    """{layer: SparseConfig} from a file of ``save_configs`` (or of one ``SparseConfig.to_json``),
    or its text."""
    doc = json.loads(_read(source))
    if isinstance(doc, dict) and "layers" in doc:
        if doc.get("format") != FORMAT:
            raise ArgumentError(f"a sparse-search file must have format {FORMAT!r}, got {doc.get('format')!r}")
        configs = [SparseConfig.from_dict(d) for d in doc["layers"]]
    else:
        configs = [SparseConfig.from_dict(doc)]
    out = {}
    for c in configs:
        if c.layer in out:
            raise ArgumentError(f"the file holds layer {c.layer} twice")
        out[c.layer] = c
    return out


def _read(source) -> str:
    if isinstance(source, (bytes, str)) and str(source).lstrip().startswith("{"):
        return source.decode() if isinstance(source, bytes) else source
    try:
        with open(source) as f:
            return f.read()
    except (OSError, TypeError) as e:
        raise ArgumentError(f"source must be JSON text or the path of a JSON file, got {source!r} ({e})") from None


def default_candidates(seq_len: int, block: int, *, boundaries: Iterable = (None,)) -> list[Candidate]:
    """A grid of budgets for a sequence of ``seq_len`` tokens in blocks of ``block``: A-shape with
    one sink block and a window of 1, 2, 4, ... blocks; vertical-slash with (vertical, slash) of
    (64, 64), (256, 256), (1000, 1000) and MInference's (1000, 6096) tokens; block top-k keeping 1,
    2, 4, ... key blocks; budgets capped at the sequence (duplicates dropped); each with every
    ``boundaries`` entry (None, "q", "2d")."""
    T = _checks.integer(seq_len, "seq_len", minimum=1)
    n = -(-T // _checks.integer(block, "block", minimum=1))
    budgets = sorted({min(2 ** e, n) for e in range(0, 11)})
    base = [("a_shape", {"sink_blocks": 1, "local_blocks": b}) for b in budgets]
    slashes = sorted({(min(v, T), min(s, T)) for v, s in ((64, 64), (256, 256), (1000, 1000), (1000, 6096))})
    base += [("vertical_slash", {"vertical": v, "slash": s}) for v, s in slashes]
    base += [("block_topk", {"keep": b}) for b in budgets]
    return [Candidate(p, dict(params), b) for b in boundaries for p, params in base]


# ------------------------------------------------------------------------------------------------
# Maps.


class _Layout:
    """The row order of a layer's input: ``perm`` (B, T) or None, and the visual mask in that order."""

    def __init__(self, order, visual_mask, frames, tokens_per_frame, B, T):
        self.order = order
        self.visual = None
        if visual_mask is not None:
            visual = jnp.asarray(visual_mask)
            if visual.dtype != jnp.bool_ or visual.shape != (B, T):
                raise ArgumentError(f"visual_mask must be a boolean (B, T) = ({B}, {T}) array, got "
                                    f"{_checks.dtype_name(visual.dtype)} {tuple(visual.shape)}")
            self.visual = visual
        self.perm = None
        if order == "permuted":
            if self.visual is None or frames is None or tokens_per_frame is None:
                raise ArgumentError(f"order 'permuted' needs visual_mask, frames and tokens_per_frame, got "
                                    f"visual_mask={'given' if visual_mask is not None else None}, frames={frames!r}, "
                                    f"tokens_per_frame={tokens_per_frame!r}")
            self.perm = sp.video_permutation(self.visual, frames, tokens_per_frame)
            self.visual = jnp.take_along_axis(self.visual, self.perm, axis=1)

    def take(self, x):
        """x (B, T, ...) in this order."""
        if self.perm is None:
            return x
        index = self.perm.reshape(self.perm.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, index, axis=1)

    @property
    def positions(self):
        return None if self.perm is None else (self.perm, self.perm)


def _pattern_blocks(candidate: Candidate, q, k, layout: _Layout, block: int, scale) -> jax.Array:
    """(B, Nc, n, n) bool: the candidate's map over q (B, T, Nc, D), k (B, T, Kc, D), both in the
    layout's order."""
    B, T, Nc, _ = q.shape
    n = -(-T // block)
    p = candidate.params
    positions = layout.perm  # causality by the original positions in a permuted order
    if candidate.pattern == "a_shape":
        blocks = sp.a_shape(T, block=block, sink_blocks=p["sink_blocks"], local_blocks=p["local_blocks"],
                            positions=positions)
    elif candidate.pattern == "vertical_slash":
        blocks = sp.vertical_slash(q, k, vertical=p["vertical"], slash=p["slash"], last_q=p["last_q"], block=block,
                                   scale=scale, positions=positions)
    elif candidate.pattern == "block_topk":
        blocks = sp.block_topk(q, k, keep=p["keep"], block=block, scale=scale, positions=positions)
    else:  # dense: every block; in the original order the causal lists drop those above the
        # diagonal, in a permuted one those whose keys all come later (by position)
        blocks = jnp.ones((1, 1, n, n), bool)
    if candidate.boundaries is not None:
        if layout.visual is None:
            raise ArgumentError(f"visual_mask is needed: the pattern {candidate.label} uses modality boundaries")
        blocks = sp.with_boundaries(blocks, layout.visual, block=block, rows=True,
                                    columns=candidate.boundaries == "2d", positions=positions)
    return jnp.broadcast_to(blocks, (B, Nc, n, n))


def _density(blocks, layout: _Layout, block: int, T: int) -> np.ndarray:
    """(Nc,) float64: computed blocks per head (mean over the batch) over the dense causal kernel's
    n(n+1)/2 blocks in the original order."""
    n = blocks.shape[-1]
    mask = BlockMask.from_dense(blocks, block, seq_lens=(T, T), positions=layout.positions)
    counts = np.asarray(jnp.sum(mask.causal.kv_count, axis=-1), np.float64)  # (B, Nc)
    return counts.mean(0) / (n * (n + 1) / 2)


def _lse_recall(q, k, v, blocks, dense_lse, layout: _Layout, block: int, implementation, scale) -> np.ndarray:
    """(Nc,) float64: mean over (batch, rows) of exp(LSE over the map - LSE dense); q, k, v and
    dense_lse (B, T, Nc) in the layout's order."""
    T = q.shape[1]
    mask = BlockMask.from_dense(blocks, block, seq_lens=(T, T), positions=layout.positions)
    _, lse = block_sparse_attention(q, k, v, mask, is_causal=True, implementation=implementation, scale=scale,
                                    return_lse=True)
    r = jnp.where(jnp.isneginf(dense_lse), 1.0, jnp.exp(lse - dense_lse))
    return np.asarray(jnp.mean(r, axis=(0, 1)), np.float64)


# ------------------------------------------------------------------------------------------------
# The search.


def _checked_inputs(query, key, value):
    query, key = jnp.asarray(query), jnp.asarray(key)
    value = key if value is None else jnp.asarray(value)  # the LSE does not depend on the values
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ArgumentError(f"{name} must be (B, T, heads, D), got shape {tuple(x.shape)}")
    B, T, N, D = query.shape
    if key.shape[:2] != (B, T) or key.shape[3] != D or value.shape != key.shape:
        raise ArgumentError(f"key and value must be (B, T, K, D) = ({B}, {T}, K, {D}) for query {tuple(query.shape)} "
                            f"(self-attention), got key {tuple(key.shape)} and value {tuple(value.shape)}")
    K = key.shape[2]
    if K == 0 or N % K:
        raise ArgumentError(f"key's heads {K} must divide query's heads {N}")
    if T == 0 or B == 0:
        raise ArgumentError(f"query must hold at least one token, got shape {tuple(query.shape)}")
    return query, key, value


def search(query, key, value=None, *, candidates=None, target_recall: float = 0.95, block: int = 64,
           visual_mask=None, frames: int | None = None, tokens_per_frame: int | None = None, order: str = "auto",
           implementation=None, scale: float | None = None, kv_heads_per_chunk: int = 1, model: str = "",
           layer: int | None = None, progress: bool | None = None, verbose: bool = False) -> SparseConfig:
    """Choose every query head's pattern and budget on one layer's calibration input.

    Args:
      query: (B, T, N, D) float, the layer's queries (after the rotary embedding, as the attention
        sees them); key, value: (B, T, K, D), K dividing N (GQA). ``value`` may be None (the recall
        depends on q and k only; the keys then stand in for it).
      candidates: a sequence of ``Candidate`` (or dicts {"pattern", "params", "boundaries"});
        default ``default_candidates(T, block)``, with boundaries "2d" too when a visual_mask is given.
      target_recall: in (0, 1]: the mean recall over a head's rows that a choice must reach.
      block: the square block size of the maps (the kernels need a power of two from 16 to 256).
      visual_mask: optional (B, T) bool, True at visual tokens (needed by boundaries and the
        permuted order). frames, tokens_per_frame: the video layout (frames x tokens_per_frame
        visual tokens per example, frame-major), needed by the permuted order.
      order: "original", "permuted" or "auto" (both when the video layout is given, else original;
        the lower mean density wins, the original order on a tie).
      implementation: of the attention calls ("xla", "interpret", "pallas", ...; default as
        ``block_sparse_attention``).
      scale: the logit scale (default 1/sqrt(D)).
      kv_heads_per_chunk: K/V heads (with their query heads) handled at once.
      model, layer: recorded in the config.
      progress: a tqdm progress bar (default: when stderr is a terminal); verbose: print the table.

    Returns:
      ``SparseConfig`` with one ``HeadPattern`` per query head.
    """
    query, key, value = _checked_inputs(query, key, value)
    B, T, N, D = query.shape
    K = key.shape[2]
    target_recall = _checks.real(target_recall, "target_recall")
    if not 0.0 < target_recall <= 1.0:
        raise ArgumentError(f"target_recall must be in (0, 1], got {target_recall}")
    block = _checks.integer(block, "block", minimum=1)
    chunk = _checks.integer(kv_heads_per_chunk, "kv_heads_per_chunk", minimum=1)
    scale = _checks.checked_scale(scale)
    backends.resolve(implementation)  # a bad name fails here, naming implementation
    _checks.choice(order, "order", ORDERS + ("auto",))
    has_video = visual_mask is not None and frames is not None and tokens_per_frame is not None
    if candidates is None:
        candidates = default_candidates(T, block, boundaries=(None, "2d") if visual_mask is not None else (None,))
    if isinstance(candidates, (str, bytes, dict)) or not isinstance(candidates, Iterable):
        raise ArgumentTypeError(f"candidates must be a sequence of Candidate, got {type(candidates).__name__}")
    candidates = [Candidate.of(c, f"candidates[{i}]") for i, c in enumerate(candidates)]
    if not candidates:
        raise ArgumentError("candidates must not be empty")
    if visual_mask is None and any(c.boundaries for c in candidates):
        raise ArgumentError("visual_mask is needed: candidates with boundaries "
                            f"{[c.label for c in candidates if c.boundaries][:3]} mark text apart from video")
    orders = {"auto": ("original", "permuted") if has_video else ("original",)}.get(order, (order,))
    calibration = {"batch": B, "seq_len": T, "heads": N, "kv_heads": K, "head_dim": D,
                   "frames": frames, "tokens_per_frame": tokens_per_frame,
                   "visual_tokens": None if visual_mask is None else int(np.asarray(visual_mask).sum())}
    results = []
    for o in orders:
        layout = _Layout(o, visual_mask, frames, tokens_per_frame, B, T)
        heads = _search_order(query, key, value, candidates, target_recall, block, layout, implementation, scale,
                              chunk, progress, o)
        results.append(SparseConfig(heads=heads, block=block, order=o, target_recall=target_recall, model=model,
                                    layer=layer, calibration=dict(calibration)))
    best = min(results, key=lambda c: c.density)  # min keeps the first (original) on a tie
    if len(results) > 1:
        best.calibration["densities_by_order"] = {c.order: round(c.density, 6) for c in results}
    if verbose:
        print(best.table(), flush=True)
    return best


def _progress_bar(total: int, progress: bool | None, desc: str):
    if progress is None:
        progress = sys.stderr.isatty()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        tqdm = None
    if not progress or tqdm is None:
        return None
    return tqdm(total=total, desc=desc, leave=False)


def _search_order(query, key, value, candidates, target, block, layout: _Layout, implementation, scale, chunk,
                  progress, name) -> list[HeadPattern]:
    from mmfa_jax.attention import attention

    B, T, N, D = query.shape
    K = key.shape[2]
    G = N // K
    q_all, k_all, v_all = layout.take(query), layout.take(key), layout.take(value)
    chosen: list[HeadPattern | None] = [None] * N
    groups = [range(g, min(g + chunk, K)) for g in range(0, K, chunk)]
    bar = _progress_bar(len(groups) * len(candidates), progress, f"pattern search ({name} order)")
    for kv in groups:
        heads = np.arange(kv.start * G, kv.stop * G)
        q, k, v = q_all[:, :, heads], k_all[:, :, kv.start:kv.stop], v_all[:, :, kv.start:kv.stop]
        # Dense causal LSE in the original order (causality is the original order's), then in the layout's.
        _, dense = attention(query[:, :, heads], key[:, :, kv.start:kv.stop], value[:, :, kv.start:kv.stop],
                             is_causal=True, implementation=implementation, scale=scale, return_lse=True)
        dense = layout.take(dense)
        # Densities first, from each map alone; the maps are not kept (C of them at (n x n) per head
        # would dominate the memory at long lengths) but rebuilt for the candidates that get measured.
        densities = np.stack([_density(_pattern_blocks(c, q, k, layout, block, scale), layout, block, T)
                              for c in candidates])  # (C, Nc)
        best_density = np.full(len(heads), np.inf)
        best = [None] * len(heads)
        # Cheapest first: later candidates are measured only where their density could still win.
        for c in sorted(range(len(candidates)), key=lambda c: (densities[c].mean(), c)):
            could = (densities[c] < best_density) | ((densities[c] == best_density) &
                                                     np.array([b is not None and c < b[0] for b in best]))
            if could.any():
                blocks = _pattern_blocks(candidates[c], q, k, layout, block, scale)
                r = _lse_recall(q, k, v, blocks, dense, layout, block, implementation, scale)
                for h in np.flatnonzero(could & (r >= target)):
                    best_density[h] = densities[c, h]
                    best[h] = (c, float(r[h]))
            if bar is not None:
                bar.update(1)
        missing = [h for h in range(len(heads)) if best[h] is None]
        if missing:  # nothing reached the target: every block (exact, recall 1)
            full = _pattern_blocks(Candidate("dense"), q, k, layout, block, scale)
            full_density = _density(full, layout, block, T)
        for h, head in enumerate(heads):
            if best[h] is None:
                chosen[head] = HeadPattern("dense", {}, None, recall=1.0, density=float(full_density[h]))
            else:
                c, r = best[h]
                cand = candidates[c]
                chosen[head] = HeadPattern(cand.pattern, dict(cand.params), cand.boundaries, recall=r,
                                           density=float(densities[c, h]), reached=True)
    if bar is not None:
        bar.close()
    return chosen


# ------------------------------------------------------------------------------------------------
# Using a config on a new input.


def build_blocks(config: SparseConfig, query, key, *, visual_mask=None, frames: int | None = None,
                 tokens_per_frame: int | None = None, scale: float | None = None):
    """The config's block map for a new input: one map for all heads, for one kernel call.

    Args:
      config: a ``SparseConfig`` with one entry per query head.
      query: (B, T, N, D), key: (B, T, K, D), in the original order (the estimating patterns read
        them; a_shape and dense do not).
      visual_mask: (B, T) bool, needed when the config uses boundaries or the permuted order;
        frames, tokens_per_frame: this input's video layout, needed by the permuted order.
      scale: the logit scale the estimates use (default 1/sqrt(D)).

    Returns:
      (blocks, perm): blocks (B, N, n, n) bool, n = ceil(T / config.block), head n's map from its
      own pattern, in the config's order; perm (B, T) int32 (rows ``x[b, perm[b]]``) when the order
      is "permuted", else None. ``BlockMask.from_dense(blocks, config.block, seq_lens=(T, T),
      positions=None if perm is None else (perm, perm))`` with ``is_causal=True`` on the permuted
      q, k, v is the layer's attention (``block_mask``, ``attend``).
    """
    if not isinstance(config, SparseConfig):
        raise ArgumentTypeError(f"config must be a SparseConfig, got {type(config).__name__}")
    query, key, _ = _checked_inputs(query, key, None)
    B, T, N, D = query.shape
    if N != config.num_heads:
        raise ArgumentError(f"query has {N} heads but the config holds {config.num_heads} (layer {config.layer})")
    if visual_mask is None and config.uses_boundaries:
        raise ArgumentError("visual_mask is needed: the config uses modality boundaries (heads "
                            f"{[i for i, h in enumerate(config.heads) if h.boundaries][:8]})")
    G = N // key.shape[2]
    layout = _Layout(config.order, visual_mask, frames, tokens_per_frame, B, T)
    q, k = layout.take(query), layout.take(key)
    n = -(-T // config.block)
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(config.heads):  # heads of one pattern and budget: one estimate call
        groups.setdefault(json.dumps([h.pattern, h.params, h.boundaries], sort_keys=True), []).append(i)
    blocks = jnp.zeros((B, N, n, n), bool)
    for members in groups.values():
        idx = np.asarray(members)
        # each query head with its own K/V head (the estimates' GQA grouping, one K/V per head here)
        sub = _pattern_blocks(config.heads[members[0]].candidate, q[:, :, idx], k[:, :, idx // G], layout,
                              config.block, scale)
        blocks = blocks.at[:, idx].set(sub)
    return blocks, layout.perm


def block_mask(config: SparseConfig, query, key, **kwargs):
    """(BlockMask, perm): ``build_blocks``'s map as a ``BlockMask`` (with the permutation's
    positions when the order is "permuted"), for ``block_sparse_attention(..., is_causal=True)`` on
    rows in the order ``perm`` (None: the original order)."""
    blocks, perm = build_blocks(config, query, key, **kwargs)
    T = jnp.shape(query)[1]
    return BlockMask.from_dense(blocks, config.block, seq_lens=(T, T),
                                positions=None if perm is None else (perm, perm)), perm


def attend(config: SparseConfig, query, key, value, *, visual_mask=None, frames=None, tokens_per_frame=None,
           scale=None, implementation=None, return_lse: bool = False):
    """The layer's causal self-attention with the config's patterns: query (B, T, N, D), key and
    value (B, T, K, D) in the original order; output (B, T, N, D) in the original order (and the
    LSE (B, T, N) if asked). The rows are permuted, attended with the original causality, and put
    back when the config's order is "permuted"."""
    mask, perm = block_mask(config, query, key, visual_mask=visual_mask, frames=frames,
                            tokens_per_frame=tokens_per_frame, scale=scale)
    if perm is None:
        return block_sparse_attention(query, key, value, mask, is_causal=True, scale=scale,
                                      implementation=implementation, return_lse=return_lse)
    take = lambda x: jnp.take_along_axis(x, perm.reshape(perm.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
    out, lse = block_sparse_attention(take(query), take(key), take(value), mask, is_causal=True, scale=scale,
                                      implementation=implementation, return_lse=True)
    inverse = jnp.argsort(perm, axis=1)
    out = jnp.take_along_axis(out, inverse[:, :, None, None], axis=1)
    lse = jnp.take_along_axis(lse, inverse[:, :, None], axis=1)
    return (out, lse) if return_lse else out


def evaluate(config: SparseConfig, query, key, value=None, *, visual_mask=None, frames: int | None = None,
             tokens_per_frame: int | None = None, scale: float | None = None, implementation=None,
             kv_heads_per_chunk: int = 1):
    """How the config does on another input (is the calibration's choice general?): per query head
    the recall (mean over batch and rows of ``sparse_patterns.recall``) and the density of the map
    that ``build_blocks`` makes for it. Shapes and layout arguments as ``build_blocks``; ``value``
    may be None. Returns (recall (N,), density (N,)) float64 NumPy arrays; looped over groups of
    ``kv_heads_per_chunk`` K/V heads (LSE-based: no T x S scores outside implementation="xla")."""
    from mmfa_jax.attention import attention

    query, key, value = _checked_inputs(query, key, value)
    blocks, _ = build_blocks(config, query, key, visual_mask=visual_mask, frames=frames,
                             tokens_per_frame=tokens_per_frame, scale=scale)
    B, T, N, _ = query.shape
    K = key.shape[2]
    G = N // K
    chunk = _checks.integer(kv_heads_per_chunk, "kv_heads_per_chunk", minimum=1)
    layout = _Layout(config.order, visual_mask, frames, tokens_per_frame, B, T)
    q_all, k_all, v_all = layout.take(query), layout.take(key), layout.take(value)
    recall, density = np.zeros(N), np.zeros(N)
    for g in range(0, K, chunk):
        kv, heads = slice(g, min(g + chunk, K)), slice(g * G, min(g + chunk, K) * G)
        _, dense = attention(query[:, :, heads], key[:, :, kv], value[:, :, kv], is_causal=True,
                             implementation=implementation, scale=scale, return_lse=True)
        recall[heads] = _lse_recall(q_all[:, :, heads], k_all[:, :, kv], v_all[:, :, kv], blocks[:, heads],
                                    layout.take(dense), layout, config.block, implementation, scale)
        density[heads] = _density(blocks[:, heads], layout, config.block, T)
    return recall, density


# ------------------------------------------------------------------------------------------------
# Command line.


def _parse_candidates(text):
    if text is None:
        return None
    try:
        items = json.loads(_read(text) if not text.lstrip().startswith("[") else text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--candidates must be a JSON list (or a file of one): {e}") from None
    return [Candidate.of(c, f"--candidates[{i}]") for i, c in enumerate(items)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmfa_jax.sparse_search",
                                 description="Per-head sparse-pattern search on one layer's q/k/v; writes the JSON "
                                             "config and prints recall and density per head.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", action="store_true",
                     help="synthetic video-structured q/k/v (bench.sparse.synthetic_video)")
    src.add_argument("--npz", help=".npz with q (B,T,N,D), k (B,T,K,D), optional v, visual_mask (B,T), frames, "
                                   "tokens_per_frame")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--tokens-per-frame", type=int, default=None)
    ap.add_argument("--text", type=int, default=64, help="text tokens after the video (--synthetic)")
    ap.add_argument("--heads", type=int, default=4, help="query heads (--synthetic)")
    ap.add_argument("--kv-heads", type=int, default=2, help="K/V heads (--synthetic)")
    ap.add_argument("--head-dim", type=int, default=64, help="(--synthetic)")
    ap.add_argument("--seed", type=int, default=0, help="(--synthetic)")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--order", default="auto", choices=ORDERS + ("auto",))
    ap.add_argument("--candidates", default=None, help="JSON list of {pattern, params, boundaries} (or its file)")
    ap.add_argument("--implementation", default=None)
    ap.add_argument("--model", default="")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--out", required=True, help="the JSON config to write")
    args = ap.parse_args(argv)
    if args.synthetic:
        frames, tpf = args.frames or 8, args.tokens_per_frame or 64
        try:
            from bench.sparse import synthetic_video
        except ImportError as e:
            raise SystemExit(f"--synthetic needs bench/sparse.py (run from the repository root): {e}") from None
        q, k, v, visual = synthetic_video(np.random.default_rng(args.seed), frames, tpf, args.text, args.heads,
                                          args.kv_heads, args.head_dim, jnp.float32)
        model = args.model or "synthetic-video"
    else:
        data = np.load(args.npz)
        missing = {"q", "k"} - set(data.files)
        if missing:
            raise SystemExit(f"--npz {args.npz} lacks {sorted(missing)} (it has {data.files})")
        q, k = data["q"], data["k"]
        v = data["v"] if "v" in data.files else None
        visual = data["visual_mask"].astype(bool) if "visual_mask" in data.files else None
        frames = args.frames or (int(data["frames"]) if "frames" in data.files else None)
        tpf = args.tokens_per_frame or (int(data["tokens_per_frame"]) if "tokens_per_frame" in data.files else None)
        model = args.model
    config = search(q, k, v, candidates=_parse_candidates(args.candidates), target_recall=args.target_recall,
                    block=args.block, visual_mask=visual, frames=frames, tokens_per_frame=tpf, order=args.order,
                    implementation=args.implementation, model=model, layer=args.layer)
    print(config.table())
    config.to_json(args.out)
    print(f"wrote {args.out}")
    return 0


__all__ = ["BOUNDARIES", "Candidate", "HeadPattern", "ORDERS", "PATTERNS", "SparseConfig", "attend", "block_mask",
           "build_blocks", "default_candidates", "evaluate", "load_configs", "save_configs", "search"]


if __name__ == "__main__":
    sys.exit(main())
