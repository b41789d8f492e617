"""Block-sparse attention benchmark: cost per computed block against mmfa's dense kernel, one run.

    python bench/sparse.py kernel                      # H200: Qwen2.5-VL-7B's heads, 32k tokens, 5%..50% dense
    python bench/sparse.py kernel --seq-len 512 --heads 4 --kv-heads 2 --densities 0.5 --smoke   # CPU check

``kernel`` times ``mmfa_jax.block_sparse_attention`` over random block maps (a different map per
query head, each query block keeping the given share of its key blocks, at least one) and the
dense ``mmfa_jax.attention`` at the same shapes, forward and forward+backward, medians of
repeats. The figure of merit is the throughput per computed block relative to the dense kernel:

    per_block = (dense_ms * density) / sparse_ms         (1.0: a computed block costs what a dense tile does)

where density is the share of (query block, key block) pairs the map computes. The issue's target
is per_block >= 0.9 from 5% to 50%. Writes a CSV and prints a table.

    python bench/sparse.py prefill                     # H200: video of 256 tokens per frame + 64 text, 128k..1M
    python bench/sparse.py prefill --lengths 2112 --heads 4 --kv-heads 2 --smoke  # CPU check

``prefill`` times the whole sparse prefill of one layer (MMInference's way: the visual tokens
reordered position-major, block top-k estimated from pooled q/k in that order, text rows and
columns kept whole by the modality boundaries, the block map's lists, the block-sparse kernel, the
rows put back) against mmfa's dense causal attention, on synthetic video-structured q/k: each
token is a mix of its spatial position's code, its frame's slowly drifting code and noise, so
attention concentrates on the same place in nearby frames, a known ground truth. The budget
(``--keep`` key blocks per query block) is the smallest of the candidates whose recall (the kept
share of softmax mass, exact, from the kernels' LSEs) is at least ``--recall`` at the first
length. MInference's vertical-slash at its default budget is reported alongside as a reference
density (its recall too), and FlexAttention with the same block map (torch face) at the lengths
in ``--flex-lengths``. The map is held as index lists (memory linear in the blocks; the text
rows by dense attention), or as a dense block map with ``--lists dense``; ``--backward`` also
times forward + backward of the sparse prefill and of dense attention.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mmfa_jax  # noqa: E402
from bench.attention import time_it  # noqa: E402
from mmfa_jax import sparse_patterns as sp  # noqa: E402

FIELDS = ["impl", "seq_len", "heads", "kv_heads", "head_dim", "dtype", "causal", "mode", "density", "block",
          "ms", "dense_ms", "per_block"]


def random_map(rng, heads: int, nq: int, nk: int, density: float, causal: bool) -> np.ndarray:
    """(1, heads, nq, nk) bool: each query block keeps round(density * its visible key blocks) of
    them (at least one), chosen at random per head; under ``causal`` only blocks at or left of the
    diagonal are candidates."""
    blocks = np.zeros((1, heads, nq, nk), bool)
    for h in range(heads):
        for i in range(nq):
            visible = (i + 1) if causal else nk
            n = max(1, round(density * visible))
            blocks[0, h, i, rng.choice(visible, size=n, replace=False)] = True
    return blocks


def _timed(fn, args, mode: str, min_time: float, repeats: int) -> float:
    if mode == "fwd+bwd":
        inner = fn

        def fn(q, k, v, do):  # noqa: F811
            out, vjp = jax.vjp(inner, q, k, v)
            return vjp(do)
    compiled = jax.jit(fn).lower(*args).compile()
    box = {}
    return time_it(lambda: box.__setitem__("r", compiled(*args)), lambda: jax.block_until_ready(box["r"]),
                   min_time=min_time, repeats=repeats)


def kernel(args):
    rng = np.random.default_rng(0)
    T, Hq, Hkv, D, b = args.seq_len, args.heads, args.kv_heads, args.head_dim, args.block
    dt = jnp.dtype(args.dtype)
    q = jnp.asarray(rng.standard_normal((1, T, Hq, D), np.float32), dt)
    k, v = (jnp.asarray(rng.standard_normal((1, T, Hkv, D), np.float32), dt) for _ in range(2))
    do = jnp.asarray(rng.standard_normal((1, T, Hq, D), np.float32), dt)
    impl = "interpret" if args.smoke else None
    rows = []
    for causal in args.causal:
        for mode in args.modes:
            inputs = (q, k, v) if mode == "fwd" else (q, k, v, do)
            dense_ms = 1e3 * _timed(lambda q, k, v: mmfa_jax.attention(q, k, v, is_causal=causal,
                                                                         implementation=impl),
                                    inputs, mode, args.min_time, args.repeats)
            n = -(-T // b)
            full = n * (n + 1) // 2 if causal else n * n
            for density in args.densities:
                blocks = random_map(rng, Hq, n, n, density, causal)
                mask = mmfa_jax.BlockMask.from_dense(blocks, (b, b), seq_lens=(T, T))
                share = blocks.sum() / (Hq * full)
                ms = 1e3 * _timed(lambda q, k, v: mmfa_jax.block_sparse_attention(
                    q, k, v, mask, is_causal=causal, implementation=impl), inputs, mode, args.min_time, args.repeats)
                row = dict(impl="mmfa_jax", seq_len=T, heads=Hq, kv_heads=Hkv, head_dim=D, dtype=args.dtype,
                           causal=causal, mode=mode, density=round(float(share), 4), block=b, ms=round(ms, 4),
                           dense_ms=round(dense_ms, 4), per_block=round(float(dense_ms * share / ms), 3))
                print(f"{'causal' if causal else 'full  '} {mode:<8} density {share:6.3f}: {ms:9.3f} ms "
                      f"(dense {dense_ms:8.3f} ms)  per-block throughput {row['per_block']:.2f} of dense", flush=True)
                rows.append(row)
    _write(args.out, rows)


PREFILL_FIELDS = ["impl", "tokens", "frames", "heads", "kv_heads", "keep", "topk", "density", "recall_mean",
                  "recall_min", "ms", "estimate_ms", "dense_ms", "speedup", "peak_gib", "error"]


def synthetic_video(rng, frames: int, tokens_per_frame: int, text: int, heads: int, kv_heads: int, head_dim: int,
                    dtype):
    """(q, k, v, visual_mask) of one example: visual tokens frame-major, then the text. A visual
    token of frame f at place p has the code 3 * place[p] + 2 * frame[f] (per K/V head; frame
    codes a random walk, so nearby frames are alike); its key is the code plus noise, its query
    (each head of the GQA group) the code plus other noise. So a query's attention mass sits on
    its place in nearby frames, and on the text."""
    T = frames * tokens_per_frame + text
    key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
    k_place, k_drift, k_noise, q_noise, k_v = jax.random.split(key, 5)
    place = jax.random.normal(k_place, (tokens_per_frame, kv_heads, head_dim))
    drift = jax.random.normal(k_drift, (frames, kv_heads, head_dim)) * 0.3
    frame = jnp.cumsum(drift, axis=0) / jnp.sqrt(jnp.arange(1, frames + 1))[:, None, None]
    video = (3.0 * place[None] + 2.0 * frame[:, None]).reshape(-1, kv_heads, head_dim)
    code = jnp.concatenate([video, jnp.zeros((text, kv_heads, head_dim))])  # (T, K, D)
    norm = head_dim ** -0.25  # logits of order 10 between a token and its place
    k = (code + jax.random.normal(k_noise, (T, kv_heads, head_dim))) * norm
    q = (jnp.repeat(code, heads // kv_heads, axis=1) + jax.random.normal(q_noise, (T, heads, head_dim))) * norm
    v = jax.random.normal(k_v, (T, kv_heads, head_dim))
    visual = jnp.arange(T)[None] < frames * tokens_per_frame
    return q[None].astype(dtype), k[None].astype(dtype), v[None].astype(dtype), visual


def _prefill_map(q, k, visual, frames, tokens_per_frame, keep, block):
    """(perm (B, T), blocks (B, N, n, n)): the position-major video order and the map in it (block
    top-k on the permuted q/k, the modality boundaries, causality by the original positions)."""
    perm = sp.video_permutation(visual, frames, tokens_per_frame)
    take = lambda x: jnp.take_along_axis(x, perm[:, :, None, None], axis=1)  # noqa: E731
    blocks = sp.with_boundaries(sp.block_topk(take(q), take(k), keep=keep, block=block, positions=perm),
                                jnp.take_along_axis(visual, perm, axis=1), block=block, positions=perm)
    return perm, blocks


def _prefill_lists(q, k, visual, frames, tokens_per_frame, keep, block, text, topk=None):
    """(perm, (indices, counts)): ``_prefill_map``'s blocks as index lists (memory linear in the
    blocks), without the Q-boundary rows, which ``_sparse_prefill`` computes densely. ``topk``:
    the implementation that chooses the top blocks (None: the kernels where they run)."""
    perm = sp.video_permutation(visual, frames, tokens_per_frame)
    take = lambda x: jnp.take_along_axis(x, perm[:, :, None, None], axis=1)  # noqa: E731
    lists = sp.block_topk_indices(take(q), take(k), keep=keep, block=block, positions=perm, implementation=topk)
    indices, counts = sp.with_text_blocks(*lists, jnp.take_along_axis(visual, perm, axis=1), block=block,
                                          max_text_blocks=-(-text // block) + 1, positions=perm)
    # The rows from ``_dense_from`` on (original order) are computed densely by ``_sparse_prefill``.
    # The lists are in the permuted order, where only the text keeps its place: a block wholly of
    # text needs no list; one that mixes in visual tokens keeps it (they come from elsewhere).
    first_text = q.shape[1] - text
    counts = jnp.where(jnp.arange(counts.shape[-1]) * block >= first_text, 0, counts)
    return perm, (indices, counts)


def _dense_from(T: int, text: int, block: int) -> int:
    """The first row of the index route's dense rows: the block holding the first text row."""
    return (T - text) // block * block


def _sparse_prefill(frames, tokens_per_frame, keep, block, impl, lists: str, text: int, topk=None):
    """The whole sparse prefill as one jitted function of (q, k, v, visual) -> ((out, lse),
    computed blocks). ``lists="dense"``: the map as a dense (n, n) block map with both modality
    boundaries; ``"indices"``: index lists (``block_topk_indices``, ``with_text_blocks``), and the
    rows from the query block of the first text row on (the Q-boundary: text rows, the last
    ``text``, see every earlier key) by dense attention."""
    def run(q, k, v, visual):
        T = q.shape[1]
        if lists == "dense":
            perm, blocks = _prefill_map(q, k, visual, frames, tokens_per_frame, keep, block)
            computed = jnp.sum(blocks)
        else:
            perm, blocks = _prefill_lists(q, k, visual, frames, tokens_per_frame, keep, block, text, topk)
            # The dense rows' blocks (every earlier one): what the dense map's Q-boundary rows hold.
            first = _dense_from(T, text, block) // block
            computed = mmfa_jax.BlockMask.from_indices(*blocks, block, seq_lens=(T, T),
                                                       positions=(perm, perm)).computed_blocks(True)
            computed = computed + q.shape[2] * sum(i + 1 for i in range(first, -(-T // block)))
        out, lse = sp.permuted_attention(q, k, v, perm, blocks, block=block, implementation=impl, return_lse=True)
        if lists != "dense":
            rows = slice(_dense_from(T, text, block), T)
            text_out, text_lse = mmfa_jax.attention(q[:, rows], k, v, is_causal=True, causal_alignment="bottom_right",
                                                    implementation=impl, return_lse=True)
            out, lse = out.at[:, rows].set(text_out), lse.at[:, rows].set(text_lse)
        return (out, lse), computed

    return jax.jit(run)


def prefill(args):
    rng = np.random.default_rng(0)
    impl = "interpret" if args.smoke else None
    topk = "xla" if args.topk == "xla" else impl
    dt = jnp.dtype(args.dtype)
    rows, keep = [], None
    for tokens in args.lengths:
        frames = (tokens - args.text) // args.tokens_per_frame
        q, k, v, visual = synthetic_video(rng, frames, args.tokens_per_frame, args.text, args.heads, args.kv_heads,
                                          args.head_dim, dt)
        T = q.shape[1]
        dense = jax.jit(lambda q, k, v: mmfa_jax.attention(q, k, v, is_causal=True, implementation=impl,
                                                            return_lse=True))
        box = {}
        dense_ms = 1e3 * time_it(lambda: box.__setitem__("d", dense(q, k, v)), lambda: jax.block_until_ready(box["d"]),
                                 min_time=args.min_time, repeats=args.repeats)
        dense_lse = box["d"][1]
        n = -(-T // args.block)
        causal_blocks = n * (n + 1) // 2

        def measure(keep):
            run = _sparse_prefill(frames, args.tokens_per_frame, keep, args.block, impl, args.lists, args.text, topk)
            (out, lse), computed = jax.block_until_ready(run(q, k, v, visual))
            r = np.asarray(jnp.where(jnp.isneginf(dense_lse), 1.0, jnp.exp(lse - dense_lse)))
            density = float(computed) / (args.heads * causal_blocks)
            return run, float(r.mean()), float(r.mean(axis=1).min()), density

        if keep is None:  # the budget: the smallest candidate that reaches the recall target, at the first length
            for keep in args.keep:
                run, mean_r, min_r, density = measure(keep)
                print(f"  keep {keep:4d}: recall mean {mean_r:.4f}, worst head {min_r:.4f}, density {density:.4f}",
                      flush=True)
                if min_r >= args.recall:
                    break
        try:
            run, mean_r, min_r, density = measure(keep)
        except Exception as e:  # noqa: BLE001  (out of memory at the longest lengths: recorded)
            msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            print(f"{T:>8} tokens: sparse prefill failed: {msg}", flush=True)
            rows.append(dict(impl="mmfa_jax_sparse_prefill", tokens=T, frames=frames, keep=keep,
                             dense_ms=round(dense_ms, 3), error=msg))
            continue
        ms = 1e3 * time_it(lambda: box.__setitem__("s", run(q, k, v, visual)), lambda: jax.block_until_ready(box["s"]),
                           min_time=args.min_time, repeats=args.repeats)
        estimate_ms = None
        if args.lists == "indices":  # the estimation alone: the permutation and the lists
            estimate = jax.jit(lambda q, k, visual: _prefill_lists(q, k, visual, frames, args.tokens_per_frame, keep,
                                                                   args.block, args.text, topk))
            estimate_ms = round(1e3 * time_it(lambda: box.__setitem__("e", estimate(q, k, visual)),
                                              lambda: jax.block_until_ready(box["e"]), min_time=args.min_time,
                                              repeats=args.repeats), 3)
            box.pop("e")
        peak = _peak_gib()
        row = dict(impl="mmfa_jax_sparse_prefill", tokens=T, frames=frames, heads=args.heads, kv_heads=args.kv_heads,
                   keep=keep, topk=args.topk, density=round(density, 5), recall_mean=round(mean_r, 4),
                   recall_min=round(min_r, 4), ms=round(ms, 3), estimate_ms=estimate_ms, dense_ms=round(dense_ms, 3),
                   speedup=round(dense_ms / ms, 2), peak_gib=peak)
        print(f"{T:>8} tokens ({frames} frames): sparse prefill {ms:9.2f} ms (estimation {estimate_ms} ms), dense "
              f"{dense_ms:9.2f} ms, {dense_ms / ms:5.2f}x; density {density:.4f}, recall mean {mean_r:.4f} (worst "
              f"head {min_r:.4f})", flush=True)
        rows.append(row)
        if args.backward:  # forward + backward of the same prefill (the map's building has no gradient)
            do = jax.random.normal(jax.random.PRNGKey(1), q.shape, q.dtype)
            sparse_out = lambda q, k, v: run(q, k, v, visual)[0][0]  # noqa: E731
            dense_out = lambda q, k, v: mmfa_jax.attention(q, k, v, is_causal=True, implementation=impl)  # noqa: E731
            bwd_ms, dense_bwd_ms = (1e3 * _timed(f, (q, k, v, do), "fwd+bwd", args.min_time, args.repeats)
                                    for f in (sparse_out, dense_out))
            rows.append(dict(row, impl="mmfa_jax_sparse_prefill_fwd+bwd", ms=round(bwd_ms, 3),
                             dense_ms=round(dense_bwd_ms, 3), speedup=round(dense_bwd_ms / bwd_ms, 2),
                             peak_gib=_peak_gib()))
            print(f"{T:>8} tokens: forward + backward: sparse {bwd_ms:9.2f} ms, dense {dense_bwd_ms:9.2f} ms, "
                  f"{dense_bwd_ms / bwd_ms:5.2f}x", flush=True)
        if T <= args.vs_max:  # MInference's vertical-slash at its default budget: a reference density
            try:
                blocks = sp.vertical_slash(q, k, vertical=args.vs[0], slash=args.vs[1], block=args.block)
                mask = mmfa_jax.BlockMask.from_dense(blocks, args.block, seq_lens=(T, T))
                _, lse = mmfa_jax.block_sparse_attention(q, k, v, mask, is_causal=True, implementation=impl,
                                                         return_lse=True)
                r = jnp.where(jnp.isneginf(dense_lse), 1.0, jnp.exp(lse - dense_lse))
                d = float(jnp.sum(blocks)) / (blocks.shape[1] * causal_blocks)
                rows.append(dict(impl=f"vertical_slash_{args.vs[0]}_{args.vs[1]}", tokens=T, frames=frames,
                                 heads=args.heads, kv_heads=args.kv_heads, density=round(d, 5),
                                 recall_mean=round(float(jnp.mean(r)), 4),
                                 recall_min=round(float(jnp.min(jnp.mean(r, axis=1))), 4)))
                print(f"         vertical-slash {args.vs}: density {d:.4f}, recall mean {float(jnp.mean(r)):.4f}",
                      flush=True)
                del blocks, mask
            except Exception as e:  # noqa: BLE001  (a reference figure: recorded, not fatal)
                print(f"         vertical-slash failed: {str(e)[:120]}", flush=True)
        if T in args.flex_lengths:
            rows.append(_flex_row(q, k, v, visual, frames, args, keep, dense_ms))
        q = k = v = box = None  # free the inputs before the next length
    _write(args.out, rows, PREFILL_FIELDS)


def _flex_row(q, k, v, visual, frames, args, keep, dense_ms):
    """FlexAttention (torch) over the same permuted order and block map, the kernel alone."""
    row = dict(impl="torch_flex_attention", tokens=q.shape[1], frames=frames, heads=args.heads,
               kv_heads=args.kv_heads, keep=keep, dense_ms=round(dense_ms, 3))
    try:
        import torch
        from torch.nn.attention.flex_attention import BlockMask as FlexMask, flex_attention

        from mmfa_torch.bridge import to_torch

        perm, blocks = _prefill_map(q, k, visual, frames, args.tokens_per_frame, keep, args.block)
        take = lambda x: jnp.take_along_axis(x, perm[:, :, None, None], axis=1)  # noqa: E731
        T = q.shape[1]
        lists = mmfa_jax.BlockMask.from_dense(blocks, args.block, seq_lens=(T, T),
                                             positions=(perm, perm)).lists(True)
        count, full, index = (to_torch(x).long() for x in lists.forward)
        partial_count = count - full
        # flex wants the wholly visible blocks and the partial ones as two lists
        shift = torch.arange(index.shape[-1], device=index.device)
        partial = torch.gather(index, -1, torch.clamp(shift + full[..., None], max=index.shape[-1] - 1))
        pos = to_torch(perm).long()

        def mask_mod(b, h, q_idx, kv_idx):
            return pos[b, kv_idx] <= pos[b, q_idx]

        fm = FlexMask.from_kv_blocks(partial_count.int(), partial.int(), full.int(), index.int(),
                                     BLOCK_SIZE=args.block, mask_mod=mask_mod, seq_lengths=(T, T))
        tq, tk, tv = (to_torch(take(x)).transpose(1, 2).contiguous() for x in (q, k, v))
        attend = torch.compile(lambda a, b, c: flex_attention(a, b, c, block_mask=fm, enable_gqa=True))
        from bench.decode import cuda_us

        ms = cuda_us(lambda: attend(tq, tk, tv), calls=3, repeats=args.repeats) / 1e3
        row.update(ms=round(ms, 3), speedup=round(dense_ms / ms, 2))
        print(f"         FlexAttention (kernel only, same map): {ms:9.2f} ms", flush=True)
    except Exception as e:  # noqa: BLE001
        row["error"] = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        print(f"         FlexAttention failed: {row['error']}", flush=True)
    return row


def _peak_gib():
    try:
        stats = jax.devices()[0].memory_stats() or {}
        return round(stats.get("peak_bytes_in_use", 0) / 2**30, 2) or None
    except Exception:  # noqa: BLE001  (the CPU has no stats)
        return None


def _write(path, rows, fields=None):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    kp = sub.add_parser("kernel", help="per-block cost of the block-sparse kernels against the dense kernel")
    kp.add_argument("--seq-len", type=int, default=32768)
    kp.add_argument("--heads", type=int, default=28)
    kp.add_argument("--kv-heads", type=int, default=4)
    kp.add_argument("--head-dim", type=int, default=128)
    kp.add_argument("--dtype", default="bfloat16")
    kp.add_argument("--block", type=int, default=128, help="block size (query and key), the dense kernel's tile")
    kp.add_argument("--densities", type=lambda s: [float(x) for x in s.split(",")], default=[0.05, 0.1, 0.25, 0.5])
    kp.add_argument("--causal", type=lambda s: [x == "true" for x in s.split(",")], default=[False, True])
    kp.add_argument("--modes", type=lambda s: s.split(","), default=["fwd", "fwd+bwd"])
    kp.add_argument("--repeats", type=int, default=5)
    kp.add_argument("--min-time", type=float, default=0.05)
    kp.add_argument("--smoke", action="store_true", help="the Pallas interpreter (a CPU check of the script)")
    kp.add_argument("--out", default="results/sparse_kernel.csv")
    pp = sub.add_parser("prefill", help="the whole sparse prefill on synthetic video against dense attention")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    pp.add_argument("--lengths", type=ints, default=[131072, 262144, 524288, 1048576])
    pp.add_argument("--tokens-per-frame", type=int, default=256)
    pp.add_argument("--text", type=int, default=64)
    pp.add_argument("--heads", type=int, default=28)
    pp.add_argument("--kv-heads", type=int, default=4)
    pp.add_argument("--head-dim", type=int, default=128)
    pp.add_argument("--dtype", default="bfloat16")
    pp.add_argument("--block", type=int, default=128)
    pp.add_argument("--keep", type=ints, default=[4, 8, 16, 32, 64], help="candidate key blocks per query block")
    pp.add_argument("--recall", type=float, default=0.95, help="the recall the budget must reach (worst head)")
    pp.add_argument("--backward", action="store_true", help="also time forward + backward (sparse and dense)")
    pp.add_argument("--lists", choices=["indices", "dense"], default="indices",
                    help="the map as index lists, memory linear in the blocks (default), or as a dense block map")
    pp.add_argument("--topk", choices=["kernel", "xla"], default="kernel",
                    help="what chooses each query block's top key blocks on the index-list route: the Pallas "
                         "selection (default where the kernels run) or lax.top_k")
    pp.add_argument("--vs", type=ints, default=[1000, 6096], help="vertical-slash budget (MInference's default)")
    pp.add_argument("--vs-max", type=int, default=262144, help="longest length for the vertical-slash reference")
    pp.add_argument("--flex-lengths", type=ints, default=[], help="lengths (exact) to time FlexAttention at")
    pp.add_argument("--repeats", type=int, default=3)
    pp.add_argument("--min-time", type=float, default=0.0)
    pp.add_argument("--smoke", action="store_true")
    pp.add_argument("--out", default="results/sparse_prefill.csv")
    args = ap.parse_args(argv)
    print(f"devices: {jax.devices()}  jax {jax.__version__}", flush=True)
    {"kernel": kernel, "prefill": prefill}[args.what](args)


if __name__ == "__main__":
    main()
