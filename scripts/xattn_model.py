#!/usr/bin/env python3
"""A first-order model of sequence-parallel cross-attention: LV-XAttn against ring attention.

What it models (mmfa_jax.parallel / mmfa_torch.parallel as built): n devices in a ring, each
holding Sq/n text queries and Skv/n visual keys/values. Both strategies run n steps; each step
attends one (Sq/n) x (Skv/n) block, the same compute for both:

    forward FLOPs per step  = 4 * B * Hq * (Sq/n) * (Skv/n) * d
    backward FLOPs per step = 2.5x that (mmfa's backward takes the global LSE, so no block forward
                              is recomputed: dS, dQ, dK, dV are 5 matmuls to the forward's 2)

and differ in what crosses a link per step (each device sends to its neighbour while receiving
from the other one, all at once):

    ring, forward:      K and V blocks           2 * B * (Skv/n) * Hkv * d * bytes
    ring, backward:     K, V + dK, dV            2 * B * (Skv/n) * Hkv * d * (bytes + acc_bytes)
    LV-XAttn, forward:  Q block + (O, LSE)       B * (Sq/n) * Hq * (d * bytes + d * acc_bytes + 4)
    LV-XAttn, backward: Q, dO + LSE, delta + dQ  B * (Sq/n) * Hq * (2 * d * bytes + 8 + d * acc_bytes)

acc_bytes is the accumulators' width (4: mmfa keeps O, dQ, dK, dV partials in float32 so that n
merges add no rounding; 2 would model bf16 accumulators).

Assumptions:
- Overlap: a step takes max(compute, transfer): the next block's transfer runs during this
  step's attention (the implementations post it first), and an accumulator sent after a step
  travels during the next one. The moving blocks are sent n - 1 times (the last is not sent on);
  the travelling accumulators (LV-XAttn's O/LSE and dQ, ring's dK/dV in the backward) n times,
  the last hop, which brings them home, exposed after the last step.
- One link bandwidth per direction for every hop (NVLink ~450 GB/s per direction on H100/H200
  nodes; PCIe or InfiniBand ~25-50 GB/s); a ring across nodes runs at its slowest hop, so use
  the inter-node figure there. Every hop also pays a fixed latency (--latency-us, default 10 us:
  a typical small-message P2P latency; it matters only when blocks are small).
- The attention kernel runs at a fixed rate (--tflops, default 400, roughly mmfa's measured
  bf16 forward on the H200 at long sequences) whatever the block size: small blocks run slower in
  practice, which favours neither strategy's transfer but makes compute longer, so real
  speedups at large n are lower than the model's when blocks get tiny.
- Nothing else: no projections, no memory limits (ring needs room for two K/V blocks in flight,
  LV-XAttn for two query blocks), no contention between the two directions of a link.

It predicts, it does not measure: nothing here has run on GPUs.

    python scripts/xattn_model.py                       # the default shapes, NVLink and InfiniBand
    python scripts/xattn_model.py --kv-heads 8          # GQA as in Llama 3.2 Vision (32/8)
    python scripts/xattn_model.py --bandwidth 25 --tflops 300 --sq 2048 --skv 131072
"""

from __future__ import annotations

import argparse
import dataclasses


@dataclasses.dataclass(frozen=True)
class Shape:
    sq: int
    skv: int
    heads: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    batch: int = 1
    dtype_bytes: int = 2
    acc_bytes: int = 4


@dataclasses.dataclass(frozen=True)
class Machine:
    bandwidth_gbs: float = 450.0  # per direction, per link
    tflops: float = 400.0
    latency_us: float = 10.0


@dataclasses.dataclass(frozen=True)
class Prediction:
    step_compute_s: float
    step_transfer_s: float
    exposed_s: float  # transfer not hidden behind compute (the accumulator's last hop)
    total_s: float
    bytes_per_step: float


def _transfer_s(nbytes: float, m: Machine) -> float:
    return nbytes / (m.bandwidth_gbs * 1e9) + m.latency_us * 1e-6


def predict(strategy: str, n: int, s: Shape, m: Machine, *, backward: bool = False) -> Prediction:
    """Time of one cross-attention call (forward, or the backward alone) on n devices."""
    tq, tkv = s.sq / n, s.skv / n
    flops = 4.0 * s.batch * s.heads * tq * tkv * s.head_dim * (2.5 if backward else 1.0)
    compute = flops / (m.tflops * 1e12)
    if n == 1:
        return Prediction(compute, 0.0, 0.0, compute, 0.0)
    if strategy == "ring":
        per_elem = s.dtype_bytes + (s.acc_bytes if backward else 0)
        moving = 2 * s.batch * tkv * s.kv_heads * s.head_dim * per_elem  # the K/V (+ dK/dV) travel together
        step = _transfer_s(moving, m)
        # n - 1 overlapped steps, then the last block's compute; in the backward the dK/dV
        # accumulators make one more (exposed) hop home.
        exposed = _transfer_s(2 * s.batch * tkv * s.kv_heads * s.head_dim * s.acc_bytes, m) if backward else 0.0
        total = (n - 1) * max(compute, step) + compute + exposed
        return Prediction(compute, step, exposed, total, moving)
    if strategy == "lv_xattn":
        rows = s.batch * tq * s.heads
        if backward:
            moving = rows * (2 * s.head_dim * s.dtype_bytes + 8)  # Q, dO, LSE, delta
            acc = rows * s.head_dim * s.acc_bytes  # dQ
        else:
            moving = rows * s.head_dim * s.dtype_bytes  # Q
            acc = rows * (s.head_dim * s.acc_bytes + 4)  # O, LSE
        step = _transfer_s(moving + acc, m)
        exposed = _transfer_s(acc, m)  # the last hop home follows the last step
        total = (n - 1) * max(compute, step) + compute + exposed
        return Prediction(compute, step, exposed, total, moving + acc)
    raise ValueError(f"strategy must be 'lv_xattn' or 'ring', got {strategy!r}")


def speedup(n: int, s: Shape, m: Machine, *, training: bool) -> float:
    """ring time / LV-XAttn time (forward, or forward + backward when training)."""
    ring = predict("ring", n, s, m).total_s
    lv = predict("lv_xattn", n, s, m).total_s
    if training:
        ring += predict("ring", n, s, m, backward=True).total_s
        lv += predict("lv_xattn", n, s, m, backward=True).total_s
    return ring / lv


def _fmt_tokens(x: int) -> str:
    return f"{x // 1048576}M" if x >= 1048576 and x % 1048576 == 0 else (f"{x // 1024}k" if x % 1024 == 0 else str(x))


def table(shapes, devices, m: Machine, *, training: bool) -> str:
    head = f"{'Sq':>6} {'Skv':>6} | " + " ".join(f"{'n=' + str(n):>7}" for n in devices)
    lines = [head, "-" * len(head)]
    for s in shapes:
        cells = []
        for n in devices:
            if s.sq % n or s.skv % n:
                cells.append(f"{'-':>7}")
            else:
                cells.append(f"{speedup(n, s, m, training=training):>6.2f}x")
        lines.append(f"{_fmt_tokens(s.sq):>6} {_fmt_tokens(s.skv):>6} | " + " ".join(cells))
    return "\n".join(lines)


def detail(s: Shape, n: int, m: Machine) -> str:
    out = []
    for strategy in ("ring", "lv_xattn"):
        for bwd in (False, True):
            p = predict(strategy, n, s, m, backward=bwd)
            out.append(f"  {strategy:>8} {'bwd' if bwd else 'fwd'}: step compute {p.step_compute_s * 1e3:8.3f} ms, "
                       f"transfer {p.step_transfer_s * 1e3:8.3f} ms ({p.bytes_per_step / 1e6:9.2f} MB/step), "
                       f"exposed {p.exposed_s * 1e3:6.3f} ms, total {p.total_s * 1e3:9.3f} ms")
    return "\n".join(out)


def sizes(text: str) -> list[int]:
    """Comma-separated token counts with optional k (1024) or M (1048576) suffixes: "1k,8k,1M"."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1048576 if part.endswith("m") else 1024 if part.endswith("k") else 1
        out.append(int(float(part.rstrip("mk")) * mult))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sq", default="1k,2k,4k,8k", help="text query lengths (global), comma-separated; k/M suffixes")
    ap.add_argument("--skv", default="16k,64k,256k,1M", help="visual key lengths (global)")
    ap.add_argument("--pairs", action="store_true",
                    help="pair --sq and --skv element-wise instead of taking every combination")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads; 8 for Llama 3.2 "
                                                                "Vision's GQA)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype-bytes", type=int, default=2, help="2 for bf16/fp16, 4 for fp32")
    ap.add_argument("--acc-bytes", type=int, default=4, help="the travelling accumulators' width (mmfa: float32)")
    ap.add_argument("--bandwidth", type=float, default=None,
                    help="link GB/s per direction (default: two tables, NVLink 450 and InfiniBand 50)")
    ap.add_argument("--tflops", type=float, default=400.0, help="attention kernel TFLOP/s (forward and backward)")
    ap.add_argument("--latency-us", type=float, default=10.0,
                    help="latency added to every hop (default 10 us, a typical small-message P2P latency)")
    ap.add_argument("--devices", default="2,4,8,16,32,64")
    ap.add_argument("--detail", action="store_true", help="per-step times of the first shape at every n")
    args = ap.parse_args(argv)

    sqs, skvs = sizes(args.sq), sizes(args.skv)
    if args.pairs:
        if len(sqs) != len(skvs):
            ap.error("--pairs needs as many --sq as --skv values")
        combos = list(zip(sqs, skvs))
    else:
        combos = [(a, b) for a in sqs for b in skvs]
    shapes = [Shape(a, b, args.heads, args.kv_heads or args.heads, args.head_dim, args.batch, args.dtype_bytes,
                    args.acc_bytes) for a, b in combos]
    devices = [int(x) for x in args.devices.split(",")]
    links = [("link", args.bandwidth)] if args.bandwidth else [("NVLink", 450.0), ("InfiniBand", 50.0)]
    s0 = shapes[0]
    print(f"Predicted speedup of LV-XAttn over ring attention (ring time / LV-XAttn time); {s0.heads} query / "
          f"{s0.kv_heads} KV heads, d{s0.head_dim}, batch {s0.batch}, {s0.dtype_bytes}-byte inputs, "
          f"{s0.acc_bytes}-byte accumulators, {args.tflops:g} TFLOP/s, latency {args.latency_us:g} us per hop.")
    for name, bw in links:
        m = Machine(bw, args.tflops, args.latency_us)
        for training in (False, True):
            print(f"\n{name} {bw:g} GB/s per direction, {'forward + backward' if training else 'forward'}:")
            print(table(shapes, devices, m, training=training))
        if args.detail:
            for n in devices:
                print(f"\n{name}, Sq {_fmt_tokens(s0.sq)}, Skv {_fmt_tokens(s0.skv)}, n={n}:")
                print(detail(s0, n, m))


if __name__ == "__main__":
    main()
