"""Where the host time of one small torch-face call goes (GPU only): cProfile of repeated calls.

    python scripts/host_profile.py [--tokens 128] [--backward]
"""

import argparse
import cProfile
import pstats
import time

import torch

import mmfa_torch

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, default=128)
p.add_argument("--backward", action="store_true")
p.add_argument("--calls", type=int, default=200)
p.add_argument("--rows", type=int, default=25)
args = p.parse_args()
q, k, v = (torch.randn(1, 16, args.tokens, 128, device="cuda", dtype=torch.bfloat16, requires_grad=args.backward)
           for _ in range(3))


def call():
    out = mmfa_torch.attention(q, k, v, is_causal=True)
    if args.backward:
        out.sum().backward()


for _ in range(5):
    call()
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(args.calls):
    call()
host = (time.perf_counter() - t) / args.calls
torch.cuda.synchronize()
print(f"host time per call: {host * 1e6:.0f} us (wall with sync {(time.perf_counter() - t) / args.calls * 1e6:.0f} us)")
prof = cProfile.Profile()
prof.enable()
for _ in range(args.calls):
    call()
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(args.rows)

if args.backward:  # the GPU side too: kernel durations, to tell host time from device time
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as gpu_prof:
        for _ in range(20):
            call()
        torch.cuda.synchronize()
    print(gpu_prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
