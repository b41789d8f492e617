"""Needle in a video: does a VLM's answer survive mmfa's sparse prefill (issue 17's accuracy check)?

A haystack video (smooth random colour fields, frame to frame correlated) holds one needle frame
with a word written on it, at several depths. The model is asked which word appears; each depth
is answered twice, with dense attention ("mmfa") and with the searched block-sparse patterns
(``mmfa_torch.hf.sparse_prefill``), and the answers, whether they contain the word, and the
prefill times are reported. The patterns come from ``--config`` (a JSON of
``mmfa_jax.sparse_search.save_configs``) or, with ``--search``, from one calibration forward on a
needle-free video of the same layout (another seed: the check never searches on its own answer).

    python scripts/needle_video.py --model Qwen/Qwen2.5-VL-7B-Instruct --frames 64 --size 448 \\
        --search --save-config qwen2_5_vl_sparse.json --depths 0.1 0.5 0.9 --out needle.json

The model is any local path or hub id that ``AutoModelForImageTextToText`` and ``AutoProcessor``
load and that ``sparse_prefill`` supports (Qwen2.5-VL, LLaVA-OneVision, LLaVA-NeXT-Video). On
random weights the answers mean nothing; ``--tiny qwen2_5_vl`` runs the whole path on a tiny
random model without a processor (token ids instead of text) to check the plumbing, and reports
whether dense and sparse give the same greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTION = "One frame of this video shows a written word. What is the word? Answer with the word only."


def haystack(frames: int, size: int, seed: int, needle: str | None = None, depth: float = 0.5):
    """(frames, size, size, 3) uint8: colour fields that drift slowly from frame to frame (so that
    frames are alike, as in real video), with ``needle`` written large on frame round(depth * (frames - 1))."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    coarse = rng.random((frames + 3, 4, 4, 3))
    kernel = np.ones(4) / 4
    smooth = np.apply_along_axis(lambda x: np.convolve(x, kernel, mode="valid"), 0, coarse)[:frames]
    video = []
    for field in smooth:
        img = Image.fromarray((field * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        video.append(np.asarray(img))
    video = np.stack(video)
    if needle is not None:
        at = int(round(depth * (frames - 1)))
        img = Image.fromarray(video[at])
        draw = ImageDraw.Draw(img)
        try:
            font = ImageFont.load_default(size=max(12, size // 6))
        except TypeError:  # Pillow < 10.1: one fixed size
            font = ImageFont.load_default()
        box = draw.textbbox((0, 0), needle, font=font)
        xy = ((size - (box[2] - box[0])) // 2, (size - (box[3] - box[1])) // 2)
        draw.rectangle([xy[0] - 8, xy[1] - 8, xy[0] + box[2] - box[0] + 8, xy[1] + box[3] - box[1] + 8], fill="white")
        draw.text(xy, needle, fill="black", font=font)
        video[at] = np.asarray(img)
    return video


def processor_inputs(processor, video, device, dtype) -> dict:
    """The model's keyword arguments for QUESTION about ``video`` (the processor's chat template)."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], videos=[list(video)], return_tensors="pt")
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if hasattr(v, "to") else v
            for k, v in dict(inputs).items()}


def tiny_inputs(model, family: str, frames: int, seed: int, device) -> dict:
    """A tiny random model's prompt of ``frames`` random images standing for the frames (no processor)."""
    from mmfa_torch.testing import vlms

    return vlms.make_inputs(model, family, images_per_example=(frames,), pad_left=False, seed=seed, device=device)


def answer(model, inputs, max_new_tokens: int, decode=None):
    """(answer text or token ids, prefill seconds): greedy, the prefill timed by a 1-token generate."""
    import torch

    with torch.inference_mode():
        sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        sync()
        prefill = time.perf_counter() - t0
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    return (decode(new) if decode else new.tolist()), prefill


def run(model, make_inputs, *, depths, needle, frames, config, min_tokens, max_new_tokens, decode=None, log=print):
    """One dense and one sparse answer per depth. Returns {"rows": [...], "sparse_calls": {...}}."""
    from mmfa_torch.hf.sparse_prefill import sparse_prefill

    rows = []
    for depth in depths:
        inputs = make_inputs(depth)
        dense, t_dense = answer(model, inputs, max_new_tokens, decode)
        handle = sparse_prefill(model, config=config, min_tokens=min_tokens)
        try:
            sparse, t_sparse = answer(model, inputs, max_new_tokens, decode)
            calls = dict(handle.calls)
        finally:
            handle.remove()
        found = [needle.lower() in str(a).lower() for a in (dense, sparse)] if decode else [None, None]
        rows.append(dict(depth=depth, tokens=int(inputs["input_ids"].shape[1]), dense=dense, sparse=sparse,
                         same=dense == sparse, dense_found=found[0], sparse_found=found[1],
                         dense_prefill_s=round(t_dense, 4), sparse_prefill_s=round(t_sparse, 4), sparse_calls=calls))
        r = rows[-1]
        log(f"depth {depth:.2f}: {r['tokens']} tokens; dense {dense!r} ({t_dense * 1e3:.0f} ms prefill), sparse "
            f"{sparse!r} ({t_sparse * 1e3:.0f} ms; {calls['sparse']} sparse / {calls['dense']} dense calls)"
            + ("" if decode is None else f"; needle found: dense {found[0]}, sparse {found[1]}"))
    if all(r["sparse_calls"]["sparse"] == 0 for r in rows):
        log(f"warning: no call ran sparse (prompts shorter than --min-tokens={min_tokens}, or no config for the "
            "layers)")
    return {"rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local path or hub id of a transformers VLM")
    source.add_argument("--tiny", choices=["qwen2_5_vl"], help="a tiny random model (plumbing check, no text)")
    patterns = p.add_mutually_exclusive_group(required=True)
    patterns.add_argument("--config", type=Path, help="sparse_search JSON config")
    patterns.add_argument("--search", action="store_true",
                          help="search the patterns on a needle-free video of the same layout (another seed)")
    p.add_argument("--save-config", type=Path, help="where --search writes its config")
    p.add_argument("--target-recall", type=float, default=0.95, help="--search's recall target")
    p.add_argument("--block", type=int, default=128, help="--search's block size")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", type=int, default=448, help="frame side in pixels")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--needle", default="pineapple")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-tokens", type=int, default=4096, help="prefills shorter than this stay dense")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="default: cuda when there is one")
    p.add_argument("--implementation", choices=["pallas", "interpret", "xla"])
    p.add_argument("--out", type=Path, help="JSON with every answer")
    args = p.parse_args(argv)
    for d in args.depths:
        if not 0.0 <= d <= 1.0:
            p.error(f"--depths must be in [0, 1], got {d}")

    import torch

    from mmfa_jax import sparse_search
    from mmfa_torch import hf
    from mmfa_torch.hf.sparse_prefill import search_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf.register(implementation=args.implementation)
    decode = None
    if args.tiny:
        from mmfa_torch.testing import vlms

        model = vlms.build(args.tiny, attn_implementation="mmfa", seed=args.seed, device=device)
        make = lambda depth, seed=None: tiny_inputs(model, args.tiny, args.frames,  # noqa: E731
                                                    args.seed + 1 + int(1000 * depth) if seed is None else seed, device)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
        processor = AutoProcessor.from_pretrained(args.model)
        model = AutoModelForImageTextToText.from_pretrained(args.model, attn_implementation="mmfa", dtype=dtype)
        model = model.to(device).eval()

        def make(depth, seed=None):
            needle = None if seed is not None else args.needle
            video = haystack(args.frames, args.size, args.seed if seed is None else seed, needle, depth)
            return processor_inputs(processor, video, device, model.dtype)

        def decode(ids):
            return processor.batch_decode(ids[None], skip_special_tokens=True)[0].strip()

    if args.search:
        calibration = make(0.0, seed=args.seed + 10_000)
        print(f"searching the patterns on a needle-free video ({calibration['input_ids'].shape[1]} tokens)")
        configs = search_model(model, calibration, block=args.block, target_recall=args.target_recall,
                               implementation=args.implementation)
        config = configs
        if args.save_config:
            sparse_search.save_configs(args.save_config, list(configs.values()))
            print(f"wrote {args.save_config}")
    else:
        config = str(args.config)
    result = run(model, make, depths=args.depths, needle=args.needle, frames=args.frames, config=config,
                 min_tokens=args.min_tokens, max_new_tokens=args.max_new_tokens, decode=decode)
    result.update(model=args.model or f"tiny-{args.tiny}", frames=args.frames, needle=args.needle)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
