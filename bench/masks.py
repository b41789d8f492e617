"""Forward time of one attention call under different masks, side by side (H100 figures in NOTES.md).

A Gemma-3-like dense mask (causal, plus bidirectional image blocks of 256 tokens) against causal
and no mask, for mmfa's torch face and torch's SDPA (CUDA events, median of 5); and mmfa's jax
face with per-example lengths (none, query, key, both: what the pruning pipeline passes).

    python bench/masks.py                 # 2373 tokens, as Gemma-3-4B with 2304 visual tokens
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import mmfa_torch  # noqa: E402
from bench.attention import time_it  # noqa: E402
from mmfa_jax._autodiff import forward  # noqa: E402
from mmfa_jax._checks import Options  # noqa: E402

SHAPES = [(8, 4, 256), (28, 4, 128), (16, 16, 128)]  # (query heads, KV heads, head dim)


def image_block_mask(T: int, text: int = 48, block: int = 256) -> torch.Tensor:
    """Causal, with bidirectional blocks of ``block`` tokens after ``text`` prompt tokens."""
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for start in range(text, T, block):
        mask[start:start + block, start:start + block] = True
    return mask


def cuda_ms(fn, calls: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return float(np.median(times))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=2373)
    args = ap.parse_args(argv)
    T = args.seq_len
    sdpa = torch.nn.functional.scaled_dot_product_attention
    mask = image_block_mask(T).cuda()[None, None]
    print(f"{torch.cuda.get_device_name()}: {T} tokens, batch 1, bf16; ms per forward")
    for H, K, D in SHAPES:
        q = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k, v = (torch.randn(1, T, K, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        gqa = H != K
        rows = {
            "mmfa causal": lambda: mmfa_torch.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),
            "mmfa no mask": lambda: mmfa_torch.scaled_dot_product_attention(q, k, v, enable_gqa=gqa),
            "mmfa image-block mask": lambda: mmfa_torch.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                      enable_gqa=gqa),
            "sdpa causal": lambda: sdpa(q, k, v, is_causal=True, enable_gqa=gqa),
            "sdpa image-block mask": lambda: sdpa(q, k, v, attn_mask=mask, enable_gqa=gqa),
        }
        for name, fn in rows.items():
            print(f"  {H:>2} heads ({K} KV) x {D:<3} {name:<22} {cuda_ms(fn):7.3f}", flush=True)

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, T, 16, 128), np.float32), jnp.bfloat16) for _ in range(3))
    n = jnp.full((1,), T, jnp.int32)
    opts = Options.make(is_causal=True, implementation="pallas")
    for name, lengths in {"none": (None, None), "query": (n, None), "key": (None, n), "both": (n, n)}.items():
        box = {}
        sec = time_it(lambda: box.__setitem__("o", forward(opts, q, k, v, None, None, None, *lengths)),
                      lambda: jax.block_until_ready(box["o"]), min_time=0.1, repeats=5)
        print(f"  jax face, causal, 16 x 128, lengths: {name:<6} {sec * 1e3:7.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
