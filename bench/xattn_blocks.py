"""Per-block kernel times at LV-XAttn's step shapes: mmfa's own flash kernel, jax face and torch face.

One LV-XAttn step on a device attends the text query block that is visiting (Sq rows: one device's
share of the text) to the device's own visual K/V shard (Skv / P keys) and returns (out, lse), which
the ring merges by log-sum-exp. That block is what ``mmfa_jax.parallel`` and ``mmfa_torch.parallel``
run per step, so its time is the compute term of ``scripts/xattn_model.py``, which assumes one fixed
kernel rate (``--tflops``, default 400). This script times the block for both faces:

- jax: ``mmfa_jax.attention(q, k, v, return_lse=True)`` under ``jax.jit`` (layout BTNH);
- torch: ``mmfa_torch.scaled_dot_product_attention(q, k, v, return_lse=True)`` (SDPA layout);

forward, and with ``--backward`` forward + backward (``jax.vjp`` / ``torch.autograd.backward``; the
backward alone is the difference: LV-XAttn's backward runs the kernels' backward with the global LSE,
no forward again). Each time is the median over ``--repeats`` batches of calls (CUDA events for torch,
``block_until_ready`` for jax). FLOPs: 4·B·Hq·Sq·Skv_block·D forward, 3.5x that forward + backward.

Printed per shape: milliseconds, TFLOP/s, the model's compute time for that block at its rate and
measured / model; at the end the median rates and the ``scripts/xattn_model.py`` commands that use
them (``--model`` prints that model's tables with the measured rate straight away).

    python bench/xattn_blocks.py                  # GPU: Sq 1k,2k,4k,8k x Skv 16k..1M over P=8, 32 heads, bf16, d128
    python bench/xattn_blocks.py --quick          # GPU: four corners, fewer repeats
    python bench/xattn_blocks.py --devices 4,16 --kv-heads 8 --backward --csv results/xattn_blocks.csv
    python bench/xattn_blocks.py --smoke          # CPU: tiny shapes in the Pallas interpreter (checks the script)
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and jax share the GPU
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from xattn_model import sizes  # noqa: E402  (scripts/: token counts with k/M suffixes)

FIELDS = ["face", "pass", "batch", "q_heads", "kv_heads", "head_dim", "dtype", "sq", "skv", "devices", "skv_block",
          "ms", "tflops", "model_ms", "measured_over_model", "error"]


def _fmt(x: int) -> str:
    return f"{x // 1048576}M" if x >= 1048576 and x % 1048576 == 0 else (f"{x // 1024}k" if x % 1024 == 0 else str(x))


def flops(batch, heads, sq, skv, head_dim, backward: bool) -> float:
    return 4.0 * batch * heads * sq * skv * head_dim * (3.5 if backward else 1.0)


# ------------------------------------------------------------------------------------------------
# Timing


def _median_ms(run, sync, repeats: int, target_s: float = 0.02, max_calls: int = 50) -> float:
    """Median milliseconds per call of ``run()`` over ``repeats`` batches (``sync()`` waits for the
    device); calls per batch chosen so that a batch lasts about ``target_s``."""
    run()  # compile, allocate
    sync()
    t0 = time.perf_counter()
    run()
    sync()
    once = time.perf_counter() - t0
    calls = max(1, min(max_calls, math.ceil(target_s / max(once, 1e-9))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            run()
        sync()
        times.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(times)


def _cuda_median_ms(run, repeats: int, target_s: float = 0.02, max_calls: int = 50) -> float:
    """As ``_median_ms``, timed by CUDA events on torch's stream."""
    import torch

    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    calls = max(1, min(max_calls, math.ceil(target_s * 1e3 / max(start.elapsed_time(end), 1e-6))))
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def time_jax(args, sq: int, skv: int, backward: bool) -> float:
    import jax
    import jax.numpy as jnp

    import mmfa_jax

    dtype = jnp.dtype(args.dtype)
    kq, kk, kv, kg = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(kq, (args.batch, sq, args.heads, args.head_dim), dtype)
    k = jax.random.normal(kk, (args.batch, skv, args.kv_heads, args.head_dim), dtype)
    v = jax.random.normal(kv, (args.batch, skv, args.kv_heads, args.head_dim), dtype)

    def block(q, k, v):
        return mmfa_jax.attention(q, k, v, return_lse=True, implementation=args.implementation)

    if backward:
        g = jax.random.normal(kg, q.shape, dtype)
        g_lse = jnp.zeros((args.batch, sq, args.heads), jnp.float32)
        fn = jax.jit(lambda q, k, v: jax.vjp(block, q, k, v)[1]((g, g_lse)))
    else:
        fn = jax.jit(block)
    state = {}

    def run():
        state["out"] = fn(q, k, v)

    return _median_ms(run, lambda: jax.block_until_ready(state["out"]), args.repeats)


def time_torch(args, sq: int, skv: int, backward: bool) -> float:
    import torch

    import mmfa_torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    shape_q = (args.batch, args.heads, sq, args.head_dim)
    shape_kv = (args.batch, args.kv_heads, skv, args.head_dim)
    q, k, v = (torch.randn(s, generator=gen, device=device, dtype=dtype).requires_grad_(backward)
               for s in (shape_q, shape_kv, shape_kv))
    g = torch.randn(shape_q, generator=gen, device=device, dtype=dtype)
    gqa = args.kv_heads != args.heads

    def run():
        out, lse = mmfa_torch.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, return_lse=True,
                                                           implementation=args.implementation)
        if backward:
            torch.autograd.backward(out, g)

    if device == "cuda":
        return _cuda_median_ms(run, args.repeats)
    return _median_ms(run, lambda: None, args.repeats)


# ------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sq", default="1k,2k,4k,8k", help="query rows per block (one device's text shard); k/M suffixes")
    ap.add_argument("--skv", default="16k,64k,256k,1M", help="global visual tokens, divided over --devices")
    ap.add_argument("--devices", default="8", help="P, comma-separated: the K/V block is Skv / P")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (8 for Llama 3.2 Vision's GQA)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--faces", default="jax,torch")
    ap.add_argument("--backward", action="store_true", help="also time forward + backward")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--implementation", default=None, help="mmfa's kernels (default: mmfa's choice per device)")
    ap.add_argument("--min-block", type=int, default=1, help="skip K/V blocks shorter than this")
    ap.add_argument("--quick", action="store_true", help="Sq 1k,8k x Skv 64k,1M, 3 repeats")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of the script: tiny shapes, the Pallas kernels in the interpreter")
    ap.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    ap.add_argument("--model", action="store_true",
                    help="print scripts/xattn_model.py's speedup tables with the measured forward rate")
    args = ap.parse_args(argv)
    if args.quick:
        args.sq, args.skv, args.repeats = "1k,8k", "64k,1M", 3
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        args.sq, args.skv, args.devices, args.heads, args.kv_heads = "32,64", "256", "2,4", 2, 1
        args.head_dim, args.dtype, args.repeats = 32, "float32", 2
        args.implementation = args.implementation or "interpret"
    args.kv_heads = args.kv_heads or args.heads
    faces = [f.strip() for f in args.faces.split(",") if f.strip()]
    for f in faces:
        if f not in ("jax", "torch"):
            ap.error(f"--faces takes jax and/or torch, got {f!r}")

    import xattn_model

    model_tflops = xattn_model.Machine().tflops
    print(f"mmfa flash kernel per LV-XAttn block: batch {args.batch}, {args.heads} query / {args.kv_heads} KV heads, "
          f"d{args.head_dim}, {args.dtype}, implementation {args.implementation or 'default'}; median of "
          f"{args.repeats}. model: scripts/xattn_model.py's compute term at its {model_tflops:g} TFLOP/s.")
    head = (f"{'face':>5} {'pass':>7} {'Sq':>5} {'Skv':>5} {'P':>3} {'block':>6} | {'ms':>9} {'TFLOP/s':>8} "
            f"{'model ms':>9} {'meas/model':>10}")
    print(head)
    print("-" * len(head))
    rows = []
    passes = [False, True] if args.backward else [False]
    for p in (int(x) for x in args.devices.split(",")):
        for skv in sizes(args.skv):
            if skv % p or skv // p < args.min_block:
                continue
            block = skv // p
            for sq in sizes(args.sq):
                for face in faces:
                    for bwd in passes:
                        row = dict(face=face, batch=args.batch, q_heads=args.heads, kv_heads=args.kv_heads,
                                   head_dim=args.head_dim, dtype=args.dtype, sq=sq, skv=skv, devices=p,
                                   skv_block=block, error="", **{"pass": "fwd+bwd" if bwd else "fwd"})
                        f = flops(args.batch, args.heads, sq, block, args.head_dim, bwd)
                        model_ms = f / (model_tflops * 1e12) * 1e3
                        try:
                            ms = (time_jax if face == "jax" else time_torch)(args, sq, block, bwd)
                            row.update(ms=ms, tflops=f / (ms * 1e-3) / 1e12, model_ms=model_ms,
                                       measured_over_model=ms / model_ms)
                            print(f"{face:>5} {row['pass']:>7} {_fmt(sq):>5} {_fmt(skv):>5} {p:>3} {_fmt(block):>6} | "
                                  f"{ms:9.3f} {row['tflops']:8.4g} {model_ms:9.3f} {ms / model_ms:10.2f}", flush=True)
                        except Exception as e:  # noqa: BLE001 (an out-of-memory block: record it, go on)
                            row.update(ms="", tflops="", model_ms=model_ms, measured_over_model="",
                                       error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                            print(f"{face:>5} {row['pass']:>7} {_fmt(sq):>5} {_fmt(skv):>5} {p:>3} {_fmt(block):>6} | "
                                  f"error: {row['error']}", flush=True)
                        rows.append(row)
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")
    print()
    rates = {}
    for face in faces:
        for name in ("fwd", "fwd+bwd"):
            got = [r["tflops"] for r in rows if r["face"] == face and r["pass"] == name and r["tflops"] != ""]
            if got:
                rates[(face, name)] = statistics.median(got)
                print(f"{face} {name}: median {rates[(face, name)]:.4g} TFLOP/s over {len(got)} blocks "
                      f"(min {min(got):.4g}, max {max(got):.4g})")
    itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]
    shape_args = ["--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim),
                  "--dtype-bytes", str(itemsize), "--batch", str(args.batch)]
    for (face, name), rate in rates.items():
        use = "inference (forward)" if name == "fwd" else "training (one rate for forward and backward)"
        print(f"  {use}, {face} face: python scripts/xattn_model.py --tflops {rate:.4g} {' '.join(shape_args)}")
    if args.model and rates:
        face = faces[0]
        rate = rates.get((face, "fwd"))
        print(f"\nscripts/xattn_model.py with the {face} face's measured forward rate ({rate:.4g} TFLOP/s):")
        xattn_model.main(["--tflops", f"{rate:.4g}", *shape_args])


if __name__ == "__main__":
    main()
