"""Sweep block configurations of the attention kernels on the GPU and print the best rows.

    python bench/tune.py --head-dim 128 --dtype bfloat16 --seq-len 8192

Forward configurations are timed alone; the backward is timed as dQ + dK/dV from saved
residuals, first sweeping the dQ kernel with dK/dV fixed, then dK/dV with the best dQ. The
winners go into ``mmfa_jax/tuning.py`` by hand, with the figures in bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.attention import time_it  # noqa: E402
from mmfa_jax import backends, tuning  # noqa: E402
from mmfa_jax._autodiff import backward, forward  # noqa: E402
from mmfa_jax._checks import Options  # noqa: E402
from mmfa_jax.tuning import AttentionConfig, KernelConfig  # noqa: E402

FORWARD = [KernelConfig(bq, bk, w, s) for bq, bk, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
           if not (bq == 64 and w == 8)]
BACKWARD = [KernelConfig(bq, bk, w, s) for bq, bk, w, s in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (2, 3))
            if bq * bk <= 128 * 64 or w == 8]


def _timed(fn, args, min_time):
    compiled = jax.jit(fn).lower(*args).compile()
    state = {}

    def launch():
        state["out"] = compiled(*args)

    return time_it(launch, lambda: jax.block_until_ready(state["out"]), min_time=min_time, repeats=5)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--part", default="fwd,bwd")
    ap.add_argument("--min-time", type=float, default=0.03)
    ap.add_argument("--top", type=int, default=5)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    shape = (args.batch, args.seq_len, args.heads, args.head_dim)
    q, k, v, do = (jnp.asarray(rng.standard_normal(shape, np.float32), args.dtype) for _ in range(4))
    flops = 4.0 * args.batch * args.heads * args.seq_len**2 * args.head_dim / (2 if args.causal else 1)
    base = tuning.config_for(max(16, 1 << (args.head_dim - 1).bit_length()), args.dtype, backends.resolve("pallas").family)
    print(f"{jax.devices()[0].device_kind}: {shape} {args.dtype} causal={args.causal}; table row {base}", flush=True)

    def opts(cfg):
        return Options.make(is_causal=args.causal, implementation="pallas", config=cfg)

    def sweep(name, candidates, make_cfg, fn_of, work):
        results = []
        for cand in candidates:
            try:
                sec = _timed(fn_of(make_cfg(cand)), (q, k, v, do), args.min_time)
                results.append((sec, cand))
                print(f"{name} {cand}: {sec * 1e3:.3f} ms {work / sec / 1e12:.0f} TFLOP/s", flush=True)
            except Exception as e:  # does not compile (shared memory, registers): skip
                print(f"{name} {cand}: failed ({str(e).splitlines()[0][:80]})", flush=True)
        results.sort(key=lambda r: r[0])
        print(f"best {name}:")
        for sec, cand in results[: args.top]:
            print(f"  {cand}  {sec * 1e3:.3f} ms  {work / sec / 1e12:.0f} TFLOP/s")
        return results[0][1] if results else None

    best_fwd = base.forward
    if "fwd" in args.part:
        best_fwd = sweep("forward", FORWARD, lambda c: AttentionConfig(c, base.backward_dq, base.backward_dkv),
                         lambda cfg: (lambda q, k, v, do: forward(opts(cfg), q, k, v)), flops) or best_fwd
    if "bwd" in args.part:
        out, lse = forward(opts(AttentionConfig(best_fwd, base.backward_dq, base.backward_dkv)), q, k, v)
        d_lse = jnp.zeros_like(lse)

        def bwd_fn(cfg):
            return lambda q, k, v, do: backward(opts(cfg), q, k, v, None, None, None, None, None, out, lse, do, d_lse)
        best_dq = sweep("backward_dq", BACKWARD, lambda c: AttentionConfig(best_fwd, c, base.backward_dkv), bwd_fn,
                        2.5 * flops) or base.backward_dq
        sweep("backward_dkv", BACKWARD, lambda c: AttentionConfig(best_fwd, best_dq, c), bwd_fn, 2.5 * flops)


if __name__ == "__main__":
    sys.exit(main())
