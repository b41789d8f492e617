"""Dynamic mask attention (Flash-DMA) benchmark: mmfa's kernels against dense causal attention and
Doge's own path, side by side in one run.

    python bench/dma.py                                   # H200: bf16, d128, 16 query / 4 KV heads, 16k and 64k
    python bench/dma.py --lengths 256 --keeps 64 --heads 2 --kv-heads 1 --head-dim 32 --smoke   # CPU check

Per (length, keep_window_size, mode in fwd / fwd+bwd), medians of repeats:

  mmfa_dma     ``mmfa_jax.dynamic_mask_attention`` (top-k selection on the device, gathered K/V)
  mmfa_dense   ``mmfa_jax.attention(is_causal=True)``: the same shapes, every allowed key
  mmfa_dma_select  the selection alone (the sort and the selection kernel: thresholds and candidate
               lists), forward mode only: what mmfa_dma spends before its attention kernel
  doge_sdpa    Doge's path (transformers ``DogeAttention``): the (B, H, T, S) float mask of
               ``prepare_dynamic_mask`` (zoh expanded, causal mask, top-k per row) and torch SDPA
               with it; where it fits in memory

The issue's targets: mmfa_dma at least 4x faster than mmfa_dense at 16k with 2048 kept, at least
10x at 64k with 2048 kept. Writes a CSV and prints a table.

    python bench/dma.py --sweep --lengths 16384 --keeps 2048     # tiles of the DMA kernels

``--sweep`` times mmfa_dma per kernel configuration instead: the forward over query positions per
tile x key block x warps x stages, then fwd+bwd over the backward's warps and stages on the
forward's best tiles (the backward shares the forward's tiles: the candidate lists depend on them).
The winners go into ``mmfa_jax/tuning.py`` by hand, with the figures in bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import csv
import itertools
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

FIELDS = ["impl", "tokens", "keep", "mode", "heads", "kv_heads", "head_dim", "dtype", "ms", "dense_ms", "speedup",
          "peak_gib", "error"]


def _inputs(rng, T, Hq, Hkv, D, dtype):
    q = jnp.asarray(rng.standard_normal((1, T, Hq, D), np.float32), dtype)
    k, v = (jnp.asarray(rng.standard_normal((1, T, Hkv, D), np.float32), dtype) for _ in range(2))
    zoh = jnp.asarray(np.exp(-np.abs(rng.standard_normal((1, Hkv, T)))), jnp.float32)  # exp(A * softplus(.)) < 1
    do = jnp.asarray(rng.standard_normal((1, T, Hq, D), np.float32), dtype)
    return q, k, v, zoh, do


def _jax_time(fn, args, mode, min_time, repeats):
    if mode == "fwd+bwd":
        inner = fn

        def fn(*a):  # noqa: F811
            out, vjp = jax.vjp(inner, *a[:-1])
            return vjp(a[-1])
    else:
        args = args[:-1]
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    peak = None if mem is None else (mem.temp_size_in_bytes + mem.output_size_in_bytes
                                      + mem.argument_size_in_bytes) / 2**30
    box = {}
    ms = 1e3 * time_it(lambda: box.__setitem__("r", compiled(*args)), lambda: jax.block_until_ready(box["r"]),
                       min_time=min_time, repeats=repeats)
    return ms, peak


def _doge_time(q, k, v, zoh, do, keep, mode, repeats):
    """Doge's attention as transformers runs it with sdpa: the dense dynamic mask, then SDPA."""
    import torch

    from bench.decode import cuda_us
    from mmfa_torch.bridge import to_torch

    tq, tk, tv, tdo = (to_torch(x).transpose(1, 2).contiguous() for x in (q, k, v, do))
    tz = to_torch(zoh).to(tq.dtype)
    T, S, G = tq.shape[2], tk.shape[2], tq.shape[1] // tk.shape[1]
    causal = torch.ones(T, S, dtype=torch.bool, device=tq.device).tril()
    min_dtype = torch.finfo(tq.dtype).min
    if mode == "fwd+bwd":
        tq.requires_grad_(True), tk.requires_grad_(True), tv.requires_grad_(True)

    def step():
        mask = tz[:, :, None, :].expand(-1, -1, T, -1).masked_fill(~causal, min_dtype)
        if S > keep:
            top = torch.topk(mask, keep, dim=-1, sorted=False).indices
            active = torch.zeros_like(mask).scatter(-1, top, 1.0)
            mask = mask.masked_fill(active == 0, min_dtype)
        out = torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv, attn_mask=mask.repeat_interleave(G, dim=1), enable_gqa=True)
        if mode == "fwd+bwd":
            out.backward(tdo)
        return out

    torch.cuda.reset_peak_memory_stats()
    us = cuda_us(step, calls=1, repeats=repeats)
    return us / 1e3, torch.cuda.max_memory_allocated() / 2**30


def _selection(keep, impl):
    """The selection of ``dynamic_mask_attention`` alone, as a function of (q, k, v, zoh)."""
    from mmfa_jax import dynamic_mask as jax_dma
    from mmfa_jax._checks import Options

    def select(q, k, v, zoh):
        opts = Options.make(is_causal=True, implementation=impl)
        static, _, _ = jax_dma.prepare(opts, keep, q, k, v, zoh)
        return jax_dma._select_kernels(static, zoh, None, None, None)

    return select


def _sweep(args, dt, impl):
    """Times mmfa_dma per configuration (see the module's docstring); prints the best rows."""
    from jax.experimental import pallas as pl

    from mmfa_jax.tuning import AttentionConfig, KernelConfig

    # A tile packs the GQA group's heads padded to a power of two (``tile_positions``).
    group = pl.next_power_of_2(args.heads // args.kv_heads)
    rng = np.random.default_rng(0)
    for T, keep in itertools.product(args.lengths, args.keeps):
        q, k, v, zoh, do = _inputs(rng, T, args.heads, args.kv_heads, args.head_dim, dt)

        def timed(cfg, mode):
            fn = lambda q, k, v, z: mmfa_jax.dynamic_mask_attention(  # noqa: E731
                q, k, v, z, keep_window_size=keep, implementation=impl, config=cfg)
            try:
                return _jax_time(fn, (q, k, v, zoh, do), mode, args.min_time, args.repeats)[0]
            except Exception as e:  # noqa: BLE001  (shared memory exceeded, lowering errors: skipped)
                print(f"   {cfg}: failed: {str(e).splitlines()[0][:100] if str(e) else type(e).__name__}")
                return float("inf")

        bwd = KernelConfig(0, 0, 8, 2)
        forward = {}
        for pos, bk, w, st in itertools.product((16, 32, 64), (32, 64, 128), (4, 8), (1, 2, 3)):
            f = KernelConfig(pos * group, bk, w, st)
            forward[f] = timed(AttentionConfig(f, bwd, bwd), "fwd")
            print(f"{T:>6} keep {keep:<5} fwd  positions {pos:<3} block_k {bk:<4} warps {w} stages {st}: "
                  f"{forward[f]:8.3f} ms", flush=True)
        best = sorted(forward, key=forward.get)[:args.top]
        print("best forward:", *(f"{f} {forward[f]:.3f} ms" for f in best), sep="\n  ")
        both = {}
        for f in best[:3]:
            for w, st in itertools.product((4, 8), (1, 2, 3)):
                b = KernelConfig(f.block_q, f.block_k, w, st)
                both[f, b] = timed(AttentionConfig(f, b, b), "fwd+bwd")
                print(f"{T:>6} keep {keep:<5} fwd+bwd {f} backward warps {w} stages {st}: {both[f, b]:8.3f} ms",
                      flush=True)
        print("best fwd+bwd:", *(f"{f} / {b} {both[f, b]:.3f} ms" for f, b in sorted(both, key=both.get)[:args.top]),
              sep="\n  ")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--lengths", type=ints, default=[16384, 65536])
    ap.add_argument("--keeps", type=ints, default=[1024, 2048, 4096])
    ap.add_argument("--modes", type=lambda s: s.split(","), default=["fwd", "fwd+bwd"])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--impls", type=lambda s: s.split(","), default=["mmfa_dense", "mmfa_dma", "doge_sdpa"])
    ap.add_argument("--doge-max", type=int, default=16384, help="longest length to run Doge's dense-mask path at")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.0)
    ap.add_argument("--smoke", action="store_true", help="the Pallas interpreter (a CPU check of the script)")
    ap.add_argument("--out", default="results/dma.csv")
    ap.add_argument("--sweep", action="store_true", help="time mmfa_dma per kernel configuration instead")
    ap.add_argument("--top", type=int, default=5, help="rows the sweep prints")
    args = ap.parse_args(argv)
    print(f"devices: {jax.devices()}  jax {jax.__version__}", flush=True)
    rng = np.random.default_rng(0)
    impl = "interpret" if args.smoke else None
    dt = jnp.dtype(args.dtype)
    if args.sweep:
        return _sweep(args, dt, impl)
    rows = []
    base = dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype)
    for T in args.lengths:
        q, k, v, zoh, do = _inputs(rng, T, args.heads, args.kv_heads, args.head_dim, dt)
        for mode in args.modes:
            if "mmfa_dense" not in args.impls:
                dense_ms, dense_peak = float("nan"), None
            else:
                dense_ms, dense_peak = _jax_time(
                    lambda q, k, v: mmfa_jax.attention(q, k, v, is_causal=True, implementation=impl), (q, k, v, do),
                    mode, args.min_time, args.repeats)
            rows.append(dict(base, impl="mmfa_dense", tokens=T, mode=mode, ms=round(dense_ms, 3),
                             peak_gib=round(dense_peak, 2) if dense_peak else None))
            print(f"{T:>6} {mode:<8} mmfa_dense            {dense_ms:9.3f} ms", flush=True)
            for keep in args.keeps:
                for impl_name in [i for i in ("mmfa_dma", "mmfa_dma_select", "doge_sdpa") if i in args.impls]:
                    row = dict(base, impl=impl_name, tokens=T, keep=keep, mode=mode, dense_ms=round(dense_ms, 3))
                    try:
                        if impl_name == "mmfa_dma":
                            ms, peak = _jax_time(
                                lambda q, k, v, z: mmfa_jax.dynamic_mask_attention(
                                    q, k, v, z, keep_window_size=keep, implementation=impl),
                                (q, k, v, zoh, do), mode, args.min_time, args.repeats)
                        elif impl_name == "mmfa_dma_select":
                            if mode != "fwd":
                                continue
                            ms, peak = _jax_time(_selection(keep, impl), (q, k, v, zoh, do), mode, args.min_time,
                                                 args.repeats)
                        elif T <= args.doge_max and not args.smoke:
                            ms, peak = _doge_time(q, k, v, zoh, do, keep, mode, args.repeats)
                        else:
                            continue
                        row.update(ms=round(ms, 3), speedup=round(dense_ms / ms, 2),
                                   peak_gib=round(peak, 2) if peak else None)
                        print(f"{T:>6} {mode:<8} {impl_name:<10} keep {keep:<5} {ms:9.3f} ms  "
                              f"{dense_ms / ms:6.2f}x vs dense", flush=True)
                    except Exception as e:  # noqa: BLE001  (out of memory, unsupported: recorded)
                        row["error"] = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                        print(f"{T:>6} {mode:<8} {impl_name:<10} keep {keep:<5} failed: {row['error']}", flush=True)
                    rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
