"""Where the pipeline's GPU time goes, kernel by kernel.

torch.profiler records every CUDA kernel in the process through CUPTI, jax's included, so it
serves as a kernel timeline for the jitted ``multimodal_attention`` without another tool.

    python bench/profile_pipeline.py --visual 16384 --text 64 --keep 0.25 [--face torch]
    python bench/profile_pipeline.py --batch 2 --visual 576 --text 5 --keep 0.5   # the heavy demo
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import mmfa_jax  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--visual", type=int, default=16384)
    ap.add_argument("--text", type=int, default=64)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--face", choices=["jax", "torch"], default="jax",
                    help="profile the jax pipeline, or the torch face's on (B, H, T, D) tensors")
    args = ap.parse_args(argv)
    T = args.visual + args.text
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((args.batch, T, args.heads, args.head_dim), np.float32), args.dtype)
               for _ in range(3))
    visual = jnp.zeros((args.batch, T), bool).at[:, :args.visual].set(True)
    length = args.text + int(np.ceil(args.keep * args.visual))
    if args.face == "jax":
        pipeline = jax.jit(lambda q, k, v, vis: mmfa_jax.multimodal_attention(
            q, k, v, vis, args.keep, is_causal=True, max_scorers=args.text, output_length=length).out)
        wait = jax.block_until_ready
    else:
        import mmfa_torch

        q, k, v = (torch.from_dlpack(jnp.swapaxes(x, 1, 2).copy()) for x in (q, k, v))
        visual = torch.from_dlpack(visual)

        def pipeline(q, k, v, vis):
            return mmfa_torch.multimodal_attention(q, k, v, vis, args.keep, is_causal=True, max_scorers=args.text,
                                                   output_length=length)[0]

        def wait(_):
            torch.cuda.synchronize()

    wait(pipeline(q, k, v, visual))
    # Wall time per call with the calls back to back (one wait at the end): above the kernels'
    # sum when the host cannot launch them as fast as the GPU runs them.
    walls = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(args.calls):
            out = pipeline(q, k, v, visual)
        wait(out)
        walls.append((time.perf_counter() - t0) / args.calls * 1e6)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            out = pipeline(q, k, v, visual)
        wait(out)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time_total for e in events) / args.calls
    print(f"batch {args.batch}, {T} tokens, keep {args.keep} -> {length}: {total:.1f} us of kernels per call, "
          f"{statistics.median(walls):.1f} us of wall time per call (median of 5 x {args.calls} calls)")
    for e in sorted(events, key=lambda e: -e.device_time_total)[: args.top]:
        per_call = e.device_time_total / args.calls
        print(f"{per_call:9.1f} us  x{e.count // args.calls:<3} {e.key[:100]}")


if __name__ == "__main__":
    sys.exit(main())
