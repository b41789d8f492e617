"""The ``mmfa`` command.

    mmfa demo                 # attention demo: mmfa against jax's attention, a table of time,
                              # memory and error; runs on the CPU (interpreted kernels) and GPU
    mmfa demo --seq-len 8192 --heads 16 --head-dim 128 --causal
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _median_time(fn, args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compile
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def demo(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import mmfa_jax

    on_gpu = mmfa_jax.pallas_available()
    kernel_impl = "pallas" if on_gpu else "interpret"
    dev = jax.devices()[0]
    print(f"mmfa demo on {dev.platform} ({dev.device_kind}); kernels run as '{kernel_impl}'")
    B, T, N, K, H = args.batch, args.seq_len, args.heads, args.kv_heads or args.heads, args.head_dim
    rng = np.random.default_rng(args.seed)
    dtype = jnp.dtype(args.dtype)
    q = jnp.asarray(rng.standard_normal((B, T, N, H), np.float32), dtype)
    k, v = (jnp.asarray(rng.standard_normal((B, T, K, H), np.float32), dtype) for _ in range(2))
    print(f"query {q.shape} key/value {k.shape} {dtype.name}, causal={args.causal}")

    # float32 XLA attention on upcast inputs is the yardstick for the error column.
    ref = mmfa_jax.attention(*(x.astype(jnp.float32) for x in (q, k, v)), is_causal=args.causal,
                             implementation="xla")
    contenders = {
        f"mmfa ({kernel_impl})": lambda q, k, v: mmfa_jax.attention(q, k, v, is_causal=args.causal,
                                                                    implementation=kernel_impl),
        "mmfa (xla fallback)": lambda q, k, v: mmfa_jax.attention(q, k, v, is_causal=args.causal,
                                                                  implementation="xla"),
    }
    if K == N:
        contenders["jax.nn.dot_product_attention"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=args.causal)
    flops = 4.0 * B * N * T * T * H / (2 if args.causal else 1)
    rows = []
    for name, fn in contenders.items():
        compiled = jax.jit(fn).lower(q, k, v).compile()
        mem = compiled.memory_analysis()
        temp = None if mem is None else mem.temp_size_in_bytes / 2**20
        sec = _median_time(compiled, (q, k, v), args.repeats)
        out = compiled(q, k, v).astype(jnp.float32)
        err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        rows.append((name, sec * 1e3, flops / sec / 1e12, temp, err))

    print(f"\n{'implementation':<30} {'ms':>10} {'TFLOP/s':>9} {'scratch MiB':>12} {'rel. error':>11}")
    for name, ms, tf, temp, err in rows:
        temp_s = "?" if temp is None else f"{temp:.1f}"
        print(f"{name:<30} {ms:>10.2f} {tf:>9.3f} {temp_s:>12} {err:>11.1e}")
    if not on_gpu:
        print("\n(CPU: the kernels run in the Pallas interpreter, which checks them, not their speed.)")
    worst = max(r[4] for r in rows)
    tol = 2e-2 if dtype == jnp.bfloat16 else 5e-3 if dtype == jnp.float16 else 1e-4
    if worst > tol:
        print(f"error {worst:.1e} is over the {dtype.name} tolerance {tol:.0e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mmfa", description="Multimodal Flash-Attention")
    sub = ap.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="attention demo: time, memory and error against jax's attention")
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--seq-len", type=int, default=None, help="default: 512 on the CPU, 8192 on a GPU")
    d.add_argument("--heads", type=int, default=None, help="default: 4 on the CPU, 16 on a GPU")
    d.add_argument("--kv-heads", type=int, default=None, help="fewer key/value heads: GQA")
    d.add_argument("--head-dim", type=int, default=None, help="default: 64 on the CPU, 128 on a GPU")
    d.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    d.add_argument("--causal", action="store_true")
    d.add_argument("--repeats", type=int, default=5)
    d.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.command in (None, "demo"):
        if args.command is None:
            args = d.parse_args([])
        import mmfa_jax

        gpu = mmfa_jax.pallas_available()
        args.seq_len = args.seq_len or (8192 if gpu else 512)
        args.heads = args.heads or (16 if gpu else 4)
        args.head_dim = args.head_dim or (128 if gpu else 64)
        return demo(args)
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
