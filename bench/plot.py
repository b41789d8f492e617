"""Plot benchmark CSVs from bench/attention.py: TFLOP/s against sequence length, one panel per
(dtype, head dim, causal, mode), one line per implementation; failed runs (out of memory) are
marked with an x on the axis.

    python bench/plot.py results/attention_sweep.csv --out bench/attention_sweep.png
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--out", default="attention.png")
    ap.add_argument("--title", default="attention on the GPU, mmfa against the anchors")
    args = ap.parse_args(argv)

    rows = [r for path in args.csv for r in csv.DictReader(open(path))]
    panels = defaultdict(lambda: defaultdict(list))
    for r in rows:
        key = (r["dtype"], r["head_dim"], r["causal"], r["mode"])
        panels[key][r["impl"]].append(r)
    keys = sorted(panels)
    cols = min(2, len(keys))
    n_rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(6.5 * cols, 4.2 * n_rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        dtype, head_dim, causal, mode = key
        for impl, rs in sorted(panels[key].items()):
            rs.sort(key=lambda r: int(r["seq_len"]))
            ok = [(int(r["seq_len"]), float(r["tflops"])) for r in rs if r["tflops"]]
            failed = [int(r["seq_len"]) for r in rs if not r["tflops"]]
            style = dict(lw=2.5) if impl.startswith("mmfa") else dict(lw=1.2, ls="--")
            line, = ax.plot(*zip(*ok), marker="o", label=impl, **style) if ok else ax.plot([], [], label=impl)
            if failed:
                ax.plot(failed, [0] * len(failed), "x", color=line.get_color(), ms=10, mew=2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens (x marks: failed, out of memory)")
        ax.set_ylabel("TFLOP/s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{dtype}, head_dim {head_dim}, {'causal' if causal == 'True' else 'full'}, {mode}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
