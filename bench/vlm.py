"""End-to-end VLM benchmark: sdpa, eager, mmfa and mmfa + visual-token pruning inside transformers.

Full-size architectures with random weights, built from configs with the real sizes (no downloads):
LLaVA-1.5-7B (576 tokens an image: more images for more tokens), Qwen2.5-VL-7B (one image whose
resolution sets the tokens), Gemma-3-4B (256 tokens an image). For every (family, attention,
visual tokens, keep) row: time to first token (prefill, vision tower included), end-to-end latency,
inter-token latency (mean, P50, P90), decode throughput and peak memory (torch's allocator and JAX's,
which holds mmfa's outputs). Every row runs once untimed first (JAX compiles one kernel per shape,
the decode steps included), then is timed. A failing row (out of memory, say) is written with its
error and the run goes on. CSV rows are written as they come; a PNG of TTFT against visual tokens.

    python bench/vlm.py --preset h100              # the GPU grid (bf16), results/vlm_h100.csv + .png
    python bench/vlm.py --preset smoke             # tiny models on the CPU, seconds
    python bench/vlm.py --preset h100 --families gemma3 --impls sdpa mmfa mmfa+prune --visual 1024 4096
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mmfa_torch import hf  # noqa: E402
from mmfa_torch.testing import vlms  # noqa: E402

IMPLS = ("sdpa", "eager", "mmfa", "mmfa+prune")
PRESETS = {
    "smoke": dict(size="tiny", device="cpu", dtype="float32", families=["llava", "qwen2_5_vl", "gemma3"],
                  visual=[8, 16], keeps=[0.5], new_tokens=3, text=12, batch=1, layer=1, repeats=1),
    "h100": dict(size="full", device="cuda", dtype="bfloat16", families=["llava", "qwen2_5_vl", "gemma3"],
                 visual=[576, 1152, 2304, 4608, 9216], keeps=[0.25, 0.5], new_tokens=32, text=48, batch=1,
                 layer=2, repeats=2),
}
FIELDS = ["family", "model", "impl", "vision_attn", "decode", "cache", "keep", "layer", "visual_tokens", "images", "image_px",
          "prompt_tokens", "kept_tokens", "batch", "new_tokens", "ttft_ms", "vision_ms", "e2e_ms", "itl_mean_ms",
          "itl_p50_ms", "itl_p90_ms", "decode_tok_s", "peak_torch_gib", "peak_jax_gib", "error"]


def layout(model, family: str, target: int) -> tuple[int, int | None, int]:
    """(images, image side in pixels or None for the config's, visual tokens) closest to ``target``."""
    if family in ("qwen2_vl", "qwen2_5_vl"):
        v = model.config.vision_config
        unit = v.patch_size * v.spatial_merge_size
        side = max(1, round(math.sqrt(target)))
        return 1, side * unit, vlms.image_tokens(model, family, side * unit)
    per = vlms.image_tokens(model, family)
    n = max(1, round(target / per))
    return n, None, n * per


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _jax_peak_gib() -> float:
    try:
        import jax
        stats = jax.local_devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use", 0) / 2**30
    except Exception:  # noqa: BLE001 - CPU backends have no stats
        return float("nan")


def _vision_module(model):
    """The vision tower (LLaVA's and Gemma 3's ``vision_tower``, Qwen's ``visual``) or None."""
    inner = getattr(model, "model", model)
    return next((getattr(inner, n) for n in ("vision_tower", "visual") if hasattr(inner, n)), None)


class VisionTimer:
    """Seconds spent in the vision tower during a prefill (forward hooks that synchronise the
    device around it: the split of TTFT between the tower and the language model)."""

    def __init__(self, model, device: str):
        self.device, self.seconds, self._t0 = device, 0.0, None
        tower = _vision_module(model)
        self._handles = [] if tower is None else [tower.register_forward_pre_hook(self._start),
                                                  tower.register_forward_hook(self._stop)]

    def _start(self, *_):
        _sync(self.device)
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        _sync(self.device)
        self.seconds += time.perf_counter() - self._t0

    def remove(self):
        for h in self._handles:
            h.remove()


def run_once(model, inputs, new_tokens: int, device: str, cache_kind: str = "dynamic"):
    """Prefill then ``new_tokens`` greedy steps; returns (TTFT seconds, step seconds, cache length).

    ``cache_kind`` "dynamic": a DynamicCache and eager steps, each step timed. "static":
    ``generate`` with a StaticCache of prompt + new_tokens entries, which compiles the decode step
    with torch.compile(mode="reduce-overhead") (CUDA graphs), transformers' own path; the TTFT is a
    generate of one token and every step is the mean of the rest (one cache size for both, so one
    compiled step serves them)."""
    if cache_kind == "static":
        return _run_static(model, inputs, new_tokens, device)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config())
    inputs = dict(inputs)
    pos = vlms.generation_position_ids(model, inputs)
    inputs["position_ids"] = pos
    mask = inputs["attention_mask"]
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        out = model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        ttft = time.perf_counter() - t0
        steps = []
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            pos = torch.cat([pos, pos[..., -1:] + 1], -1)
            out = model(input_ids=nxt, attention_mask=mask, position_ids=pos[..., -1:], past_key_values=cache,
                        use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            steps.append(time.perf_counter() - t)
    return ttft, steps, int(cache.get_seq_length())


def _run_static(model, inputs, new_tokens: int, device: str):
    from transformers import StaticCache

    capacity = inputs["input_ids"].shape[1] + new_tokens
    times = []
    with torch.inference_mode():
        for n in (1, new_tokens):
            cache = StaticCache(config=model.config.get_text_config(), max_cache_len=capacity)
            _sync(device)
            t0 = time.perf_counter()
            model.generate(**inputs, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            _sync(device)
            times.append(time.perf_counter() - t0)
    ttft, total = times
    steps = [(total - ttft) / (new_tokens - 1)] * (new_tokens - 1)
    return ttft, steps, inputs["input_ids"].shape[1] + new_tokens - 1


def bench_row(model, family, impl, keep, layer, target, cfg, handle_box):
    device = cfg["device"]
    dtype = getattr(torch, cfg["dtype"])
    row = dict(family=family, model=vlms.FULL.get(family, family) if cfg["size"] == "full" else f"tiny-{family}",
               impl=impl, keep=keep if impl == "mmfa+prune" else "", layer=layer if impl == "mmfa+prune" else "",
               batch=cfg["batch"], new_tokens=cfg["new_tokens"])
    try:
        images, px, visual = layout(model, family, target)
        row.update(visual_tokens=visual, images=images, image_px=px or "")
        text_impl = "mmfa" if impl.startswith("mmfa") else impl
        vision_impl = text_impl if cfg["vision"] == "same" else cfg["vision"]
        model.set_attn_implementation({"text_config": text_impl, "vision_config": vision_impl})
        row.update(vision_attn=vision_impl, decode=cfg["decode"] if text_impl == "mmfa" else "", cache=cfg["cache"])
        if handle_box[0] is not None:
            handle_box[0].remove()
            handle_box[0] = None
        if impl == "mmfa+prune":
            handle_box[0] = hf.prune_visual_tokens(model, keep=keep, layer=layer)
        per_example = [images] * cfg["batch"]
        inputs = vlms.make_inputs(model, family, images_per_example=per_example, image_px=px,
                                  text_lengths=[cfg["text"]] * cfg["batch"], device=device, dtype=dtype)
        row["prompt_tokens"] = inputs["input_ids"].shape[1]
        run_once(model, inputs, cfg["new_tokens"], device, cfg["cache"])  # compile every shape, warm the allocators
        best = None
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        for _ in range(cfg["repeats"]):
            ttft, steps, cached = run_once(model, inputs, cfg["new_tokens"], device, cfg["cache"])
            if best is None or ttft < best[0]:
                best = (ttft, steps, cached)
        ttft, steps, cached = best
        timer = VisionTimer(model, device)  # a prefill of its own: its syncs would add to the TTFT timed above
        try:
            run_once(model, inputs, 1, device)
        finally:
            timer.remove()
        row["vision_ms"] = round(timer.seconds * 1e3, 3)
        if cfg.get("profile"):
            _profile(model, inputs, device, f"{family} {impl} visual={visual}")
        if cfg.get("kernels"):
            _kernel_table(model, inputs, device, f"{family} {impl} visual={visual}")
        steps_ms = np.array(steps) * 1e3 if steps else np.array([np.nan])
        row.update(
            kept_tokens=cached - (cfg["new_tokens"] - 1), ttft_ms=round(ttft * 1e3, 3),
            e2e_ms=round((ttft + sum(steps)) * 1e3, 3), itl_mean_ms=round(float(np.mean(steps_ms)), 3),
            itl_p50_ms=round(float(np.percentile(steps_ms, 50)), 3),
            itl_p90_ms=round(float(np.percentile(steps_ms, 90)), 3),
            decode_tok_s=round(cfg["batch"] * len(steps) / sum(steps), 2) if steps else "",
            peak_torch_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.startswith("cuda") else "",
            peak_jax_gib=round(_jax_peak_gib(), 3), error="")
    except Exception as e:  # noqa: BLE001 - one failing row must not end the run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        traceback.print_exc(limit=3)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return row


def _profile(model, inputs, device: str, label: str, rows: int = 18):
    """Where the host time of one prefill and one decode step goes (cProfile, by own time)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    run_once(model, inputs, 2, device)
    prof.disable()
    print(f"--- profile: {label}")
    pstats.Stats(prof).sort_stats("tottime").print_stats(rows)


def _kernel_table(model, inputs, device: str, label: str, rows: int = 15):
    """Where the GPU time of one prefill goes: CUDA kernels by total time (torch.profiler records
    every kernel of the process through CUPTI, mmfa's and jax's included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_once(model, inputs, 1, device)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time_total for e in events)
    print(f"--- kernels: {label}: {total / 1e3:.1f} ms of kernels in one prefill")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:rows]:
        print(f"{e.device_time_total / 1e3:9.2f} ms  x{e.count:<6} {e.key[:110]}")


def plot(rows, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({r["family"] for r in rows})
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), squeeze=False)
    for ax, fam in zip(axes[0], families):
        series = {}
        for r in rows:
            if r["family"] != fam or r.get("error") or r.get("ttft_ms") in ("", None):
                continue
            label = r["impl"] + (f" keep={r['keep']}" if r["impl"] == "mmfa+prune" else "")
            series.setdefault(label, []).append((int(r["visual_tokens"]), float(r["ttft_ms"])))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_title(next((r["model"] for r in rows if r["family"] == fam), fam))
        ax.set_xlabel("visual tokens")
        ax.set_ylabel("time to first token (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    p.add_argument("--families", nargs="+", choices=vlms.FAMILIES)
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--visual", nargs="+", type=int, help="visual token counts (targets)")
    p.add_argument("--keeps", nargs="+", type=float)
    p.add_argument("--layer", type=int, help="pruning layer K")
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--implementation", choices=["pallas", "interpret", "xla"],
                   help="mmfa kernels (default: per device)")
    p.add_argument("--vision", choices=["same", "sdpa", "eager", "mmfa"], default="same",
                   help="vision tower attention: the row's own (default) or a fixed one. Qwen's vision tower "
                        "calls a non-flash backend once per window, so per-call host overhead adds up there")
    p.add_argument("--decode", choices=["mmfa", "sdpa"], default="mmfa",
                   help="decode steps of the mmfa rows on mmfa's kernels (default) or torch's SDPA")
    p.add_argument("--cache", choices=["dynamic", "static"], default="dynamic",
                   help="dynamic: a DynamicCache and eager decode steps (default); static: a StaticCache and the "
                        "decode step in CUDA graphs (torch.compile reduce-overhead), as generate's "
                        "cache_implementation='static'")
    p.add_argument("--profile", action="store_true", help="also print a cProfile of one prefill + decode step per row")
    p.add_argument("--kernels", action="store_true", help="also print the CUDA kernels of one prefill per row")
    p.add_argument("--out", type=Path, help="CSV path (default bench/results/vlm_<preset>.csv); PNG next to it")
    args = p.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    for key in ("families", "visual", "keeps", "layer", "new_tokens", "batch"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        sys.exit("preset needs a CUDA GPU; use --preset smoke on the CPU")
    hf.register(implementation=args.implementation, decode=args.decode)
    cfg.update(vision=args.vision, decode=args.decode, cache=args.cache, profile=args.profile, kernels=args.kernels)
    out = args.out or Path(__file__).resolve().parent / "results" / f"vlm_{args.preset}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for family in cfg["families"]:
            t0 = time.perf_counter()
            try:
                model = vlms.build(family, size=cfg["size"], attn_implementation="mmfa",
                                   dtype=getattr(torch, cfg["dtype"]), device=cfg["device"])
            except Exception as e:  # noqa: BLE001
                row = dict(family=family, error=f"build: {type(e).__name__}: {e}"[:300])
                writer.writerow(row)
                rows.append(row)
                print(f"[{family}] build failed: {e}", flush=True)
                continue
            print(f"[{family}] built in {time.perf_counter() - t0:.1f}s", flush=True)
            handle_box = [None]
            for impl in args.impls:
                for target in cfg["visual"]:
                    for keep in (cfg["keeps"] if impl == "mmfa+prune" else [None]):
                        row = bench_row(model, family, impl, keep, cfg["layer"], target, cfg, handle_box)
                        writer.writerow(row)
                        f.flush()
                        rows.append(row)
                        print(f"[{family}] {impl:10s} keep={keep!s:5s} visual={row.get('visual_tokens')!s:>6} "
                              f"ttft={row.get('ttft_ms', '')!s:>9} ms itl={row.get('itl_mean_ms', '')!s:>8} ms "
                              f"kept={row.get('kept_tokens', '')!s:>6} {row['error']}", flush=True)
            if handle_box[0] is not None:
                handle_box[0].remove()
            del model
            if cfg["device"] == "cuda":
                torch.cuda.empty_cache()
    png = out.with_suffix(".png")
    plot(rows, png)
    print(f"wrote {out} and {png}")
    return rows


if __name__ == "__main__":
    main()
