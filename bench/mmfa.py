"""Pipeline benchmark: score + prune + attention against dense attention over the full sequence.

Image inputs (576 to 2,880 visual tokens) and video inputs (8 to 64 frames of 256 tokens), with
32 to 128 text tokens after them, causal, keep in {0.25, 0.5, 0.75}; the pipeline is timed whole
(scoring included) under jit. CSV out, table printed.

    python bench/mmfa.py --preset issue      # the issue's grid on the GPU
    python bench/mmfa.py --preset target     # 16,384 visual + 64 text tokens, 16 heads x 128, bf16
    python bench/mmfa.py --preset smoke      # tiny, runs on the CPU
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mmfa_jax  # noqa: E402
from bench.attention import time_it  # noqa: E402

PRESETS = {
    "smoke": dict(batch=1, heads=2, head_dim=32, inputs=[("image", 96, 16)], keeps=[0.25, 0.5]),
    "target": dict(batch=1, heads=16, head_dim=128, inputs=[("video", 16384, 64)], keeps=[0.25, 0.5, 0.75]),
    "issue": dict(batch=1, heads=16, head_dim=128,
                  inputs=[("image", v, t) for v in (576, 1152, 2880) for t in (32, 128)]
                  + [("video", f * 256, t) for f in (8, 16, 32, 64) for t in (32, 128)],
                  keeps=[0.25, 0.5, 0.75]),
}
FIELDS = ["kind", "visual", "text", "batch", "heads", "head_dim", "keep", "kept_tokens", "dense_ms", "pipeline_ms",
          "speedup", "ideal_speedup", "torch_pipeline_ms", "score_ms", "select_ms", "gather_ms", "attend_ms", "error"]


def run_case(kind, n_visual, n_text, batch, heads, head_dim, keeps, dtype, impl, min_time, stages=False,
             torch_face=False):
    rng = np.random.default_rng(n_visual + n_text)
    T = n_visual + n_text
    q, k, v = (jnp.asarray(rng.standard_normal((batch, T, heads, head_dim), np.float32), dtype) for _ in range(3))
    visual = jnp.zeros((batch, T), bool).at[:, :n_visual].set(True)  # visual first, the prompt after it
    dense = jax.jit(lambda q, k, v: mmfa_jax.attention(q, k, v, is_causal=True, implementation=impl))
    out = {}
    dense_s = time_it(lambda: out.__setitem__("d", dense(q, k, v)), lambda: jax.block_until_ready(out["d"]),
                      min_time=min_time, repeats=5)
    rows = []
    for keep in keeps:
        length = n_text + int(np.ceil(keep * n_visual))

        @jax.jit
        def pipeline(q, k, v, visual):
            return mmfa_jax.multimodal_attention(q, k, v, visual, keep, is_causal=True, max_scorers=n_text,
                                                 output_length=length, implementation=impl).out

        sec = time_it(lambda: out.__setitem__("p", pipeline(q, k, v, visual)),
                      lambda: jax.block_until_ready(out["p"]), min_time=min_time, repeats=5)
        row = dict(kind=kind, visual=n_visual, text=n_text, batch=batch, heads=heads, head_dim=head_dim,
                   keep=keep, kept_tokens=length, dense_ms=dense_s * 1e3, pipeline_ms=sec * 1e3,
                   speedup=dense_s / sec, ideal_speedup=(T / length) ** 2, error="")
        if torch_face:
            row["torch_pipeline_ms"] = _torch_time(q, k, v, visual, keep, n_text, length, impl, min_time)
        if stages:
            row.update(_stage_times(q, k, v, visual, keep, n_text, length, impl, min_time))
        rows.append(row)
    return rows


def _torch_time(q, k, v, visual, keep, n_text, length, impl, min_time):
    """The torch face's pipeline (``mmfa_torch.multimodal_attention``) on (B, H, T, D) CUDA tensors."""
    import torch

    import mmfa_torch

    qt, kt, vt = (torch.from_dlpack(jnp.swapaxes(x, 1, 2).copy()) for x in (q, k, v))
    vis = torch.from_dlpack(visual)
    box = {}
    sec = time_it(lambda: box.__setitem__("r", mmfa_torch.multimodal_attention(
        qt, kt, vt, vis, keep, is_causal=True, max_scorers=n_text, output_length=length, implementation=impl)),
        torch.cuda.synchronize if qt.is_cuda else (lambda: None), min_time=min_time, repeats=5)
    return sec * 1e3


def _stage_times(q, k, v, visual, keep, n_text, length, impl, min_time):
    """The pipeline's stages timed one by one (each jitted alone), to see where the time goes."""
    rows = mmfa_jax.scorer_rows("text", visual)
    score = jax.jit(lambda q, k, visual, rows: mmfa_jax.visual_token_importance(
        q, k, None, visual, rows, max_scorers=n_text, is_causal=True, implementation=impl))
    select = jax.jit(lambda imp, visual: mmfa_jax.select_visual_tokens(imp, visual, keep, output_length=length,
                                                                       implementation=impl))
    gather = jax.jit(lambda q, k, v, idx: [mmfa_jax.gather_tokens(x, idx) for x in (q, k, v)])
    attend = jax.jit(lambda q, k, v, n: mmfa_jax.attention(q, k, v, is_causal=True, query_seq_lengths=n,
                                                           implementation=impl))
    imp = score(q, k, visual, rows)
    idx, n = select(imp, visual)
    kept = gather(q, k, v, idx)
    stages = {"score_ms": (score, (q, k, visual, rows)), "select_ms": (select, (imp, visual)),
              "gather_ms": (gather, (q, k, v, idx)), "attend_ms": (attend, (*kept, n))}
    times, box = {}, {}
    for name, (fn, args) in stages.items():
        sec = time_it(lambda fn=fn, args=args: box.__setitem__("r", fn(*args)),
                      lambda: jax.block_until_ready(box["r"]), min_time=min_time, repeats=5)
        times[name] = sec * 1e3
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="target")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--min-time", type=float, default=0.05)
    ap.add_argument("--out", default="results/mmfa.csv")
    ap.add_argument("--stages", action="store_true", help="also time score, select, gather and attend one by one")
    ap.add_argument("--torch", action="store_true", help="also time the torch face's pipeline")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    impl = "pallas" if mmfa_jax.pallas_available() else "interpret"
    print(f"{jax.devices()[0].device_kind}: kernels as '{impl}', {args.dtype}, batch {p['batch']}, "
          f"{p['heads']} heads x {p['head_dim']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        csv.DictWriter(f, fieldnames=FIELDS).writeheader()
    rows = []
    for kind, n_visual, n_text in p["inputs"]:
        try:
            new = run_case(kind, n_visual, n_text, p["batch"], p["heads"], p["head_dim"], p["keeps"],
                           jnp.dtype(args.dtype), impl, args.min_time, args.stages, args.torch)
        except Exception as e:  # recorded, not fatal
            new = [dict(kind=kind, visual=n_visual, text=n_text, error=str(e).splitlines()[0][:100])]
        with open(args.out, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS).writerows(new)
        rows += new
        for r in new:
            if r.get("error"):
                print(f"{kind:<6} {n_visual:>6}+{n_text:<4} error: {r['error']}", flush=True)
            else:
                print(f"{kind:<6} {n_visual:>6}+{n_text:<4} keep {r['keep']:<5} dense {r['dense_ms']:8.3f} ms  "
                      f"pipeline {r['pipeline_ms']:8.3f} ms  speedup {r['speedup']:5.2f}x "
                      f"(attention alone would give {r['ideal_speedup']:5.1f}x)"
                      + (f"  torch face {r['torch_pipeline_ms']:.3f} ms" if args.torch else ""), flush=True)
                if args.stages:
                    print("       stages: " + "  ".join(f"{s[:-3]} {r[s]:.3f} ms" for s in FIELDS if s.endswith("_ms")
                                                         and s not in ("dense_ms", "pipeline_ms", "torch_pipeline_ms")), flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
