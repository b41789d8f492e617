"""Decode benchmark: a few query rows over a long KV cache, mmfa against torch SDPA's backends.

One decode step of a GQA model: query (B, Hq, T, D) with T in 1..16 rows, cache key/value
(B, Hkv, S, D). The step reads the whole cache once, so its floor is the HBM time of K and V;
the table reports each implementation's time and the fraction of HBM bandwidth it reaches
(K/V bytes over time, against ``--hbm`` TB/s). The rows see the whole cache (the last T positions of
a causal sequence see every earlier key: no mask is needed when T == 1; for T > 1 the rows are
aligned bottom-right, as a KV-cache step is).

    python bench/decode.py                       # B in {1, 8}, S in {8k, 32k, 128k}, 32/8 heads, d128, bf16
    python bench/decode.py --batch 1 --seq-lens 32768 --rows 1 4 16

Implementations: mmfa_torch and mmfa_jax (``decode_attention``: the split-KV kernels; the torch face
launches them itself), mmfa_prefill_kernel (mmfa_torch's SDPA, the prefill kernel, for comparison),
and torch SDPA with the cuDNN, flash and memory-efficient backends (``enable_gqa``; a backend that
refuses is recorded with its error).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import torch  # noqa: E402

IMPLS = ("mmfa_torch", "mmfa_jax", "mmfa_prefill_kernel", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient")
FIELDS = ["impl", "timing", "batch", "q_heads", "kv_heads", "rows", "seq_len", "head_dim", "us", "hbm_fraction", "error"]


def cuda_us(fn, *, calls: int = 50, repeats: int = 7) -> float:
    """Median microseconds per call over ``repeats`` batches of ``calls`` launches (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def graph_us(fn, *, calls: int = 50, repeats: int = 7) -> float:
    """Median microseconds per call of ``calls`` launches captured in one CUDA graph and replayed:
    the device time alone, with no host cost per call (what a captured decode step pays)."""
    fn()  # warm: compile, allocate, and make the per-length constants before capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def jax_us(fn, args, *, calls: int = 50, repeats: int = 7) -> float:
    import time

    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e6 / calls)
    return statistics.median(times)


def step(impl: str, q, k, v):
    """A zero-argument callable running one decode step of ``impl`` on torch tensors (SDPA layout)."""
    rows, seq = q.shape[2], k.shape[2]
    if impl == "mmfa_torch":
        import mmfa_torch

        return lambda: mmfa_torch.decode_attention(q, k, v)
    if impl == "mmfa_prefill_kernel":
        import mmfa_torch

        bias = None if rows == 1 else _lower_right(rows, seq)
        return lambda: mmfa_torch.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    if impl.startswith("sdpa_"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION}[impl[5:]]
        bias = None if rows == 1 else _lower_right(rows, seq)

        def run():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
        return run
    raise ValueError(f"unknown implementation {impl!r}")


def _lower_right(rows: int, seq: int):
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(rows, seq)


def run_case(impl, batch, q_heads, kv_heads, rows, seq, head_dim, dtype, calls, graphs=False):
    g = torch.Generator(device="cuda").manual_seed(seq + rows)
    q = torch.randn(batch, q_heads, rows, head_dim, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(batch, kv_heads, seq, head_dim, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    if impl == "mmfa_jax":
        import jax
        import jax.numpy as jnp

        import mmfa_jax

        jq, jk, jv = (jnp.asarray(t.float().cpu().numpy(), dtype=jnp.bfloat16).swapaxes(1, 2) for t in (q, k, v))
        fn = jax.jit(lambda q, k, v: mmfa_jax.decode_attention(q, k, v))
        return jax_us(fn, (jq, jk, jv), calls=calls)
    with torch.no_grad():
        return (graph_us if graphs else cuda_us)(step(impl, q, k, v), calls=calls)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--seq-lens", nargs="+", type=int, default=[8192, 32768, 131072])
    ap.add_argument("--rows", nargs="+", type=int, default=[1])
    ap.add_argument("--heads", nargs=2, type=int, default=[32, 8], metavar=("Q", "KV"))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    ap.add_argument("--hbm", type=float, default=4.8, help="HBM bandwidth in TB/s (H200: 4.8)")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--graphs", action="store_true",
                    help="time the torch implementations as CUDA graph replays (device time, no host cost per "
                         "call); mmfa_jax is always timed by wall clock of jitted calls")
    ap.add_argument("--out", default="results/decode.csv")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/decode.py needs a CUDA GPU")
    dtype = torch.bfloat16
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows_out = []
    for batch in args.batch:
        for seq in args.seq_lens:
            for rows in args.rows:
                kv_bytes = 2 * batch * args.heads[1] * seq * args.head_dim * 2
                floor = kv_bytes / (args.hbm * 1e12) * 1e6
                print(f"B={batch} S={seq} rows={rows}: K/V {kv_bytes / 2**20:.0f} MiB, HBM floor {floor:.1f} us",
                      flush=True)
                for impl in args.impls:
                    timing = "wall" if impl == "mmfa_jax" else ("graph" if args.graphs else "events")
                    row = dict(impl=impl, timing=timing, batch=batch, q_heads=args.heads[0], kv_heads=args.heads[1], rows=rows,
                               seq_len=seq, head_dim=args.head_dim, error="")
                    try:
                        us = run_case(impl, batch, *args.heads, rows, seq, args.head_dim, dtype, args.calls,
                                      args.graphs)
                        row.update(us=round(us, 2), hbm_fraction=round(floor / us, 3))
                        print(f"  {impl:15s} {us:9.1f} us  {100 * floor / us:5.1f}% of HBM", flush=True)
                    except Exception as e:  # noqa: BLE001  (a backend that refuses is recorded)
                        row.update(error=f"{type(e).__name__}: {e}".splitlines()[0][:200])
                        print(f"  {impl:15s} error: {row['error']}", flush=True)
                    rows_out.append(row)
                    torch.cuda.empty_cache()
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows_out)
    print(f"wrote {args.out}")
    return rows_out


if __name__ == "__main__":
    main()
