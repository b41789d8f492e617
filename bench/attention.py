"""Attention benchmark: mmfa (both faces) against the anchors, side by side in one run.

Times forward and forward+backward (median of repeats), counts TFLOP/s as 4*B*H*S^2*D forward
(halved for causal; 3.5x that for forward+backward), and records peak memory. Writes a CSV and
prints a table.

    python bench/attention.py --preset target      # the issue's target size, every anchor
    python bench/attention.py --preset sweep       # 1k..32k tokens, bf16, head_dim 128
    python bench/attention.py --preset full        # bf16/fp16 x head dims 64/128 x 1k..32k
    python bench/attention.py --preset smoke       # tiny, runs on the CPU too

Implementations (``--impls``): mmfa_jax, mmfa_torch, jax_xla, jax_cudnn, jax_pallas_ref,
torch_flash, torch_cudnn, mmfa_jax_xla (mmfa's own xla fallback), mmfa_jax_triton and
mmfa_torch_triton (the same kernels compiled by the official triton package: the Turing route),
mmfa_torch_dlpack (the torch face through JAX and DLPack rather than its own launch),
mmfa_jax_padded (the JAX face with head dims padded to a power of two: the forward's column
chunks, ``KernelConfig.split_head``, turned off, to weigh them at the vision head dims 72 and 80).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mmfa_jax  # noqa: E402

try:
    import torch  # noqa: E402

    import mmfa_torch  # noqa: E402
    import mmfa_torch.launch  # noqa: E402
except ImportError:  # the torch anchors and face are skipped without torch
    torch = None


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    dtype: str
    causal: bool
    mode: str  # "fwd" or "fwd+bwd"

    @property
    def flops(self) -> float:
        f = 4.0 * self.batch * self.heads * self.seq_len**2 * self.head_dim
        f = f / 2 if self.causal else f
        return f * 3.5 if self.mode == "fwd+bwd" else f


PRESETS = {
    "smoke": dict(batch=1, heads=2, seq_lens=[256], head_dims=[64], dtypes=["bfloat16"]),
    "target": dict(batch=2, heads=16, seq_lens=[8192], head_dims=[128], dtypes=["bfloat16"]),
    "sweep": dict(batch=2, heads=16, seq_lens=[1024, 2048, 4096, 8192, 16384, 32768], head_dims=[128],
                  dtypes=["bfloat16"]),
    "full": dict(batch=2, heads=16, seq_lens=[1024, 2048, 4096, 8192, 16384, 32768], head_dims=[64, 128],
                 dtypes=["bfloat16", "float16"]),
    # Short sequences, where the host's cost per call shows (the torch face's direct launch against
    # its DLPack route, and the anchors).
    "small": dict(batch=1, heads=16, seq_lens=[128, 512, 2048], head_dims=[128], dtypes=["bfloat16"]),
    # Vision towers: head dims that are not powers of two (SigLIP's 72, Qwen2.5-VL's 80; padded to 128
    # inside the kernels), bidirectional, against 128.
    "vision": dict(batch=8, heads=16, seq_lens=[1024, 4096], head_dims=[72, 80, 128], dtypes=["bfloat16"]),
}
FIELDS = ["impl", "batch", "heads", "seq_len", "head_dim", "dtype", "causal", "mode", "ms", "tflops", "peak_gib", "error"]
ALL_IMPLS = ["mmfa_jax", "mmfa_torch", "jax_xla", "jax_cudnn", "jax_pallas_ref", "torch_flash", "torch_cudnn"]


# ----------------------------------------------------------------------------------------------
# Builders: each returns a zero-argument callable that launches the work asynchronously, a
# callable that waits for it, and a peak-memory probe (bytes or None).


def _jax_inputs(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    shape = (case.batch, case.seq_len, case.heads, case.head_dim)
    dt = jnp.dtype(case.dtype)
    return [jnp.asarray(rng.standard_normal(shape, np.float32), dt) for _ in range(4)]  # q, k, v, d_out


def _jax_callable(case: Case, attn, seed: int):
    q, k, v, do = _jax_inputs(case, seed)
    if case.mode == "fwd":
        fn = jax.jit(attn)
        args = (q, k, v)
    else:
        def fwd_bwd(q, k, v, do):
            out, vjp = jax.vjp(attn, q, k, v)
            return vjp(do)
        fn = jax.jit(fwd_bwd)
        args = (q, k, v, do)
    compiled = fn.lower(*args).compile()
    mem = compiled.memory_analysis()
    peak = None if mem is None else int(mem.temp_size_in_bytes + mem.output_size_in_bytes
                                        + mem.argument_size_in_bytes)
    state = {}

    def launch():
        state["out"] = compiled(*args)

    def wait():
        jax.block_until_ready(state["out"])

    return launch, wait, peak


def _torch_inputs(case: Case, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    dt = getattr(torch, case.dtype)
    return [torch.randn(shape, generator=g, device="cuda", dtype=dt) for _ in range(4)]


def _torch_callable(case: Case, attn, seed: int):
    q, k, v, do = _torch_inputs(case, seed)
    if case.mode == "fwd+bwd":
        for t in (q, k, v):
            t.requires_grad_(True)
    state = {}

    def launch():
        if case.mode == "fwd":
            with torch.no_grad():
                state["out"] = attn(q, k, v)
        else:
            out = attn(q, k, v)
            state["out"] = torch.autograd.grad(out, (q, k, v), do)

    def wait():
        torch.cuda.synchronize()

    launch()
    wait()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    launch()
    wait()
    peak = torch.cuda.max_memory_allocated() - base + sum(t.numel() * t.element_size() for t in (q, k, v, do))
    return launch, wait, peak


def build(impl: str, case: Case, seed: int):
    causal, scale = case.causal, 1.0 / case.head_dim**0.5
    if impl == "mmfa_jax":
        return _jax_callable(case, lambda q, k, v: mmfa_jax.attention(q, k, v, is_causal=causal), seed)
    if impl == "mmfa_jax_padded":
        from mmfa_jax import backends, tuning

        row = tuning.config_for(case.head_dim, case.dtype, backends.resolve(None).family)
        padded = row.map(lambda c: dataclasses.replace(c, split_head=False))
        return _jax_callable(case, lambda q, k, v: mmfa_jax.attention(q, k, v, is_causal=causal, config=padded), seed)
    if impl == "mmfa_jax_triton":
        return _jax_callable(case, lambda q, k, v: mmfa_jax.attention(q, k, v, is_causal=causal,
                                                                      implementation="triton"), seed)
    if impl == "mmfa_jax_xla":
        return _jax_callable(case, lambda q, k, v: mmfa_jax.attention(q, k, v, is_causal=causal,
                                                                      implementation="xla"), seed)
    if impl in ("jax_xla", "jax_cudnn"):
        which = impl.split("_")[1]
        return _jax_callable(case, lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=which), seed)
    if impl == "jax_pallas_ref":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas.ops.gpu import attention as pallas_ref
        return _jax_callable(case, lambda q, k, v: pallas_ref.mha(q, k, v, None, sm_scale=scale, causal=causal), seed)
    if torch is None:
        raise RuntimeError("torch is not installed")
    if impl == "mmfa_torch":  # launched from torch (mmfa_torch.launch): torch's memory
        return _torch_callable(case, lambda q, k, v: mmfa_torch.attention(q, k, v, is_causal=causal), seed)
    if impl in ("mmfa_torch_dlpack", "mmfa_torch_triton"):  # through JAX: the kernels' memory is JAX's
        implementation = "triton" if impl == "mmfa_torch_triton" else "pallas"

        def attn(q, k, v):
            with mmfa_torch.launch.through_jax():
                return mmfa_torch.attention(q, k, v, is_causal=causal, implementation=implementation)
        launch, wait, _ = _torch_callable(case, attn, seed)
        peak = _jax_callable(case, lambda q, k, v: mmfa_jax.attention(q, k, v, is_causal=causal,
                                                                      implementation=implementation), seed)[2]
        return launch, wait, peak
    if impl in ("torch_flash", "torch_cudnn"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.FLASH_ATTENTION if impl == "torch_flash" else SDPBackend.CUDNN_ATTENTION

        def attn(q, k, v):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return _torch_callable(case, attn, seed)
    raise ValueError(f"unknown implementation {impl!r}")


def time_it(launch, wait, *, min_time: float, repeats: int) -> float:
    """Median seconds per call: batches of async launches, each batch closed by one wait."""
    launch()
    wait()  # warm-up (compilation, autotuning, allocator)
    t0 = time.perf_counter()
    launch()
    wait()
    single = max(time.perf_counter() - t0, 1e-6)
    n = max(1, int(min_time / single))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            launch()
        wait()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="target")
    ap.add_argument("--impls", default=",".join(ALL_IMPLS), help="comma-separated implementations")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--causal", default="false,true", help="comma-separated: false,true")
    ap.add_argument("--seq-lens", default=None, help="override the preset's sequence lengths")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds per timed batch")
    ap.add_argument("--out", default="results/attention.csv")
    args = ap.parse_args(argv)

    preset = PRESETS[args.preset]
    seq_lens = [int(s) for s in args.seq_lens.split(",")] if args.seq_lens else preset["seq_lens"]
    impls = args.impls.split(",")
    cases = [Case(preset["batch"], preset["heads"], s, d, dt, c == "true", m)
             for dt in preset["dtypes"] for d in preset["head_dims"] for s in seq_lens
             for c in args.causal.split(",") for m in args.modes.split(",")]
    print(f"devices: {jax.devices()}  jax {jax.__version__}" + (f"  torch {torch.__version__}" if torch else ""),
          flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:  # rows are appended as they come: a cut run keeps them
        csv.DictWriter(f, fieldnames=FIELDS).writeheader()
    rows = []
    for i, case in enumerate(cases):
        for impl in impls:
            row = dict(dataclasses.asdict(case), impl=impl)
            try:
                launch, wait, peak = build(impl, case, seed=i)
                sec = time_it(launch, wait, min_time=args.min_time, repeats=args.repeats)
                row.update(ms=sec * 1e3, tflops=case.flops / sec / 1e12, peak_gib=None if peak is None else peak / 2**30)
            except Exception as e:  # out of memory, unsupported: recorded, not fatal
                msg = str(e).splitlines()[0][:90] if str(e) else type(e).__name__
                row.update(ms=None, tflops=None, peak_gib=None, error=msg)
                if os.environ.get("MMFA_BENCH_TRACEBACK"):
                    traceback.print_exc()
            rows.append(row)
            _print_row(row)
            with open(args.out, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=FIELDS).writerow(row)
            _free()
    print(f"\nwrote {args.out}")
    print_table(rows)


def _free():
    import gc

    gc.collect()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _print_row(row):
    what = f"{row['impl']:<15} {row['dtype']:<8} S={row['seq_len']:<6} D={row['head_dim']:<4} " \
           f"{'causal' if row['causal'] else 'full  '} {row['mode']:<8}"
    if row.get("error"):
        print(f"{what} error: {row['error']}", flush=True)
    else:
        mem = "" if row["peak_gib"] is None else f" {row['peak_gib']:7.2f} GiB"
        print(f"{what} {row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s{mem}", flush=True)


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def print_table(rows):
    """TFLOP/s per implementation (rows) and case (columns)."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cols = list(dict.fromkeys((r["dtype"], r["seq_len"], r["head_dim"], r["causal"], r["mode"]) for r in rows))
    header = ["impl"] + [f"{dt[:4]} {_tokens(s)} d{d} {'c' if c else 'n'} {m}" for dt, s, d, c, m in cols]
    width = max(len(h) for h in header[1:])
    print("TFLOP/s (peak GiB); 'x' = failed or out of memory")
    print(f"{header[0]:<15}" + "".join(f" | {h:>{width}}" for h in header[1:]))
    for impl in impls:
        cells = []
        for col in cols:
            r = next((r for r in rows if r["impl"] == impl and (r["dtype"], r["seq_len"], r["head_dim"],
                                                                  r["causal"], r["mode"]) == col), None)
            if r is None or r.get("error"):
                cells.append("x")
            else:
                mem = "" if r["peak_gib"] is None else f" ({r['peak_gib']:.1f})"
                cells.append(f"{r['tflops']:.3g}{mem}")
        print(f"{impl:<15}" + "".join(f" | {c:>{width}}" for c in cells))


if __name__ == "__main__":
    sys.exit(main())
