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


def _write(path, rows):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
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
    args = ap.parse_args(argv)
    print(f"devices: {jax.devices()}  jax {jax.__version__}", flush=True)
    kernel(args)


if __name__ == "__main__":
    main()
