"""Prints the headline table of a scripts/regression.sh run from its CSVs (markdown).

    python scripts/regression_table.py results/
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def _rows(path: Path):
    if not path.exists():
        return []
    with open(path) as f:
        return [r for r in csv.DictReader(f)]


def _num(x, fmt="{:.3g}"):
    try:
        return fmt.format(float(x))
    except (TypeError, ValueError):
        return "-"


def main(argv=None):
    folder = Path((argv or sys.argv[1:] or ["results"])[0])
    print("| attention (B2, 16x128, 8k, bf16), TFLOP/s | " + " | ".join(["fwd", "fwd+bwd", "fwd causal",
                                                                          "fwd+bwd causal"]) + " |")
    print("|---|---|---|---|---|")
    attn = _rows(folder / "attention.csv")
    for impl in dict.fromkeys(r["impl"] for r in attn):
        cells = []
        for causal in ("False", "True"):
            for mode in ("fwd", "fwd+bwd"):
                hit = [r for r in attn if r["impl"] == impl and r["mode"] == mode and r["causal"] == causal]
                cells.append(_num(hit[0]["tflops"], "{:.0f}") if hit and not hit[0]["error"] else "-")
        print(f"| {impl} | " + " | ".join(cells) + " |")
    print("\n| pipeline (16,384 + 64, 16x128, bf16, causal) | dense ms | jax pipeline ms | speedup | torch pipeline ms |")
    print("|---|---|---|---|---|")
    for r in _rows(folder / "pipeline.csv"):
        print(f"| keep {r['keep']} | {_num(r['dense_ms'])} | {_num(r['pipeline_ms'])} | {_num(r['speedup'])}x | "
              f"{_num(r.get('torch_pipeline_ms'))} |")
    for name, what in (("decode.csv", "CUDA-graph replays: device time"),
                       ("decode_calls.csv", "back-to-back calls: host cost included")):
        dec = _rows(folder / name) if (folder / name).exists() else []
        if not dec:
            continue
        impls = list(dict.fromkeys(r["impl"] for r in dec))
        print(f"\n| decode (32/8 heads, d128, bf16; {what}), µs | B | S | " + " | ".join(impls) + " |")
        print("|---|---|---|" + "---|" * len(impls))
        for key in dict.fromkeys((r["batch"], r["seq_len"], r["rows"]) for r in dec):
            cells = []
            for impl in impls:
                hit = [r for r in dec if (r["batch"], r["seq_len"], r["rows"]) == key and r["impl"] == impl]
                cells.append(f"{_num(hit[0]['us'], '{:.0f}')} ({_num(hit[0]['hbm_fraction'], '{:.0%}')})"
                             if hit and not hit[0]["error"] else "err")
            print(f"| rows {key[2]} | {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    sparse = _rows(folder / "sparse_kernel.csv")
    if sparse:
        print("\n| block-sparse (32k, 28/4 heads, d128, bf16, 128-blocks) | density | sparse ms | dense ms | "
              "per-block throughput of dense |")
        print("|---|---|---|---|---|")
        for r in sparse:
            what = f"{'causal' if r['causal'] == 'True' else 'full'} {r['mode']}"
            print(f"| {what} | {_num(r['density'])} | {_num(r['ms'])} | {_num(r['dense_ms'])} | {_num(r['per_block'])} |")
    dma = _rows(folder / "dma.csv")
    if dma:
        print("\n| dynamic mask (16/4 heads, d128, bf16) | tokens | keep | ms | dense ms | speedup |")
        print("|---|---|---|---|---|---|")
        for r in dma:
            if r["impl"] == "mmfa_dma":
                print(f"| {r['mode']} | {r['tokens']} | {r['keep']} | {_num(r['ms'])} | {_num(r['dense_ms'])} | "
                      f"{_num(r['speedup'])}x |")
    print("\n| VLM (random weights, bf16, B1) | visual | impl | keep | cache | TTFT ms | of it vision tower ms "
          "| ITL ms | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    # vlm.csv: DynamicCache, eager steps; vlm_static.csv: StaticCache, steps in CUDA graphs.
    for r in _rows(folder / "vlm.csv") + _rows(folder / "vlm_static.csv"):
        print(f"| {r.get('model') or r.get('family')} | {r.get('visual_tokens', '')} | {r.get('impl', '')} | "
              f"{r.get('keep') or ''} | {r.get('cache') or 'dynamic'} | {_num(r.get('ttft_ms'), '{:.1f}')} | "
              f"{_num(r.get('vision_ms'), '{:.1f}')} | {_num(r.get('itl_mean_ms'), '{:.1f}')} | "
              f"{(r.get('error') or '')[:60]} |")


if __name__ == "__main__":
    main()
