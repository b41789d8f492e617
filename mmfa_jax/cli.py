"""The ``mmfa`` command.

    mmfa demo                 # prune a real image's visual tokens with a colour prompt, time
                              # attention before and after, write a PNG of the kept patches
    mmfa demo --image photo.jpg --prompt "the red parts" --keep 0.25
    mmfa attention            # attention alone: mmfa against jax's attention (time, memory, error)
    mmfa attention --seq-len 8192 --heads 16 --head-dim 128 --causal
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


NOT_REPRESENTATIVE = ("These timings are not representative: without a GPU the kernels run in the Pallas interpreter "
                      "on the CPU, which checks them, not their speed; the GPU figures are in README.md.")


def _median_time(fn, args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compile
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def attention_demo(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import mmfa_jax

    on_gpu = _gpu()
    kernel_impl = "pallas" if on_gpu else "interpret"
    dev = jax.devices()[0]
    print(f"mmfa attention on {dev.platform} ({dev.device_kind}); kernels run as '{kernel_impl}'")
    B, T, N, K, H = args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim
    rng = np.random.default_rng(args.seed)
    dtype = jnp.dtype(args.dtype)
    q = jnp.asarray(rng.standard_normal((B, T, N, H), np.float32), dtype)
    k, v = (jnp.asarray(rng.standard_normal((B, T, K, H), np.float32), dtype) for _ in range(2))
    print(f"query {q.shape} key/value {k.shape} {dtype.name}, causal={args.causal}")

    # float32 XLA attention on upcast inputs is the yardstick for the error column.
    ref = mmfa_jax.attention(*(x.astype(jnp.float32) for x in (q, k, v)), is_causal=args.causal,
                             implementation="xla")
    contenders = {
        f"mmfa ({kernel_impl})": lambda q, k, v: mmfa_jax.attention(q, k, v, is_causal=args.causal,
                                                                    implementation=kernel_impl),
        "mmfa (xla fallback)": lambda q, k, v: mmfa_jax.attention(q, k, v, is_causal=args.causal,
                                                                  implementation="xla"),
    }
    if K == N:
        contenders["jax.nn.dot_product_attention"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=args.causal)
    flops = 4.0 * B * N * T * T * H / (2 if args.causal else 1)
    rows = []
    for name, fn in contenders.items():
        compiled = jax.jit(fn).lower(q, k, v).compile()
        mem = compiled.memory_analysis()
        temp = None if mem is None else mem.temp_size_in_bytes / 2**20
        sec = _median_time(compiled, (q, k, v), args.repeats)
        out = compiled(q, k, v).astype(jnp.float32)
        err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        rows.append((name, sec * 1e3, flops / sec / 1e12, temp, err))

    print(f"\n{'implementation':<30} {'ms':>10} {'TFLOP/s':>9} {'scratch MiB':>12} {'rel. error':>11}")
    for name, ms, tf, temp, err in rows:
        temp_s = "?" if temp is None else f"{temp:.1f}"
        print(f"{name:<30} {ms:>10.2f} {tf:>9.3f} {temp_s:>12} {err:>11.1e}")
    if not on_gpu:
        print(f"\n{NOT_REPRESENTATIVE}")
    worst = max(r[4] for r in rows)
    tol = 2e-2 if dtype == jnp.bfloat16 else 5e-3 if dtype == jnp.float16 else 1e-4
    if worst > tol:
        print(f"error {worst:.1e} is over the {dtype.name} tolerance {tol:.0e}", file=sys.stderr)
        return 1
    return 0


def image_demo(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import mmfa_jax
    from mmfa_jax import demo

    gpu = _gpu()
    impl = "pallas" if gpu else "interpret"
    paths = args.video or [args.image or demo.default_image()]
    dtype = jnp.dtype(args.dtype or ("bfloat16" if gpu else "float32"))
    configs = demo_configs(args)
    print(f"mmfa demo on {jax.devices()[0].device_kind}: kernels run as '{impl}' in {dtype.name}; {len(paths)} "
          f"frame(s) from {paths[0]}{' ...' if len(paths) > 1 else ''}; prompt {args.prompt!r}")
    rows, status = [], 0
    for name, (heads, head_dim, size, batch, keep) in configs:
        frames = demo.load_frames(paths, size)
        tok = demo.build_tokens(frames, args.patch, args.prompt, heads, head_dim, batch, dtype)
        B, T = tok.visual_mask.shape
        V = len(tok.colours)
        result = mmfa_jax.multimodal_attention(tok.q, tok.k, tok.v, tok.visual_mask, keep, is_causal=True,
                                               implementation=impl)
        idx = np.asarray(result.indices[0, : int(result.lengths[0])])
        kept = idx[(idx >= 2) & (idx < 2 + V)] - 2
        answer = demo.colour_answer(tok.colours, tok.target, len(kept))
        overlap = len(np.intersect1d(kept, answer)) / max(len(kept), 1)
        print(f"\n[{name}] batch {B}, {heads} heads x {head_dim}, {size}px, keep {keep}: {V} visual + {T - V} text -> "
              f"kept {len(kept)} visual; {overlap:.0%} of them are among the {len(kept)} patches closest to "
              f"{args.prompt!r} by colour")
        if overlap < 0.8:
            print(f"  overlap {overlap:.0%} is under 80%: the scores did not find the colour", file=sys.stderr)
            status = 1
        if name == configs[0][0]:
            per_frame = (size // args.patch) ** 2
            first = kept[kept < per_frame]
            demo.save_overlay(frames[0], first, args.patch, args.out,
                              f"kept {len(kept)}/{V} patches for {args.prompt!r}")
            print(f"  wrote {args.out}")
        rows += _time_demo(name, tok, result, keep, args.repeats, impl)
    print(f"\n{'config':<10} {'what':<52} {'tokens':>7} {'ms':>9}")
    for name, what, tokens, ms in rows:
        print(f"{name:<10} {what:<52} {tokens:>7} {ms:>9.3f}")
    if not gpu:
        print(f"\n{NOT_REPRESENTATIVE}")
    return status


LAYERS = 8


def _time_demo(name, tok, result, keep, repeats, impl):
    """Median times: dense over the full sequence, the whole pruning pipeline (each as one jitted
    call, and per layer of a jitted multi-layer program), attention on the kept tokens alone, and
    torch's SDPA and eager attention over the full sequence."""
    import jax
    import jax.numpy as jnp

    import mmfa_jax
    from mmfa_jax.demo import median_ms

    T, L = tok.q.shape[1], result.out.shape[1]
    dense = jax.jit(lambda q, k, v: mmfa_jax.attention(q, k, v, is_causal=True, implementation=impl))
    kept = [mmfa_jax.gather_tokens(x, result.indices) for x in (tok.q, tok.k, tok.v)]
    short = jax.jit(lambda q, k, v, n: mmfa_jax.attention(q, k, v, is_causal=True, query_seq_lengths=n,
                                                          implementation=impl))
    # Jitted whole, as a model would run it: one dispatch, with the scorer bound known statically.
    n_scorers = int(jnp.max(jnp.sum(mmfa_jax.scorer_rows("text", tok.visual_mask), axis=1)))
    pipeline = jax.jit(lambda q, k, v, visual: mmfa_jax.multimodal_attention(
        q, k, v, visual, keep, is_causal=True, implementation=impl, output_length=L, max_scorers=n_scorers).out)
    wait = jax.block_until_ready
    # Each jitted call above pays the host's dispatch (tens of us, more than these short sequences
    # take on a GPU). In a model one jitted program runs every layer: so also per layer of a
    # program that runs LAYERS of them, each on its own copy of q, k, v (separate arrays: slices of
    # one stacked array would be copied for the kernels; and so that no layer is shared), unrolled
    # (a while loop would wait on the host for its condition every layer).
    stacked = [[jnp.array(x, copy=True) for _ in range(LAYERS)] for x in (tok.q, tok.k, tok.v)]
    dense_layers = jax.jit(lambda qs, ks, vs: [dense(*layer) for layer in zip(qs, ks, vs)])
    pipeline_layers = jax.jit(lambda qs, ks, vs, visual: [pipeline(*layer, visual) for layer in zip(qs, ks, vs)])
    rows = [
        (name, "mmfa dense attention, full sequence", T,
         median_ms(lambda: dense(tok.q, tok.k, tok.v), wait, repeats)),
        (name, f"  per layer, {LAYERS} layers in one jitted program", T,
         median_ms(lambda: dense_layers(*stacked), wait, repeats) / LAYERS),
        (name, f"mmfa pipeline: score + prune + attend (keep {keep})", L,
         median_ms(lambda: pipeline(tok.q, tok.k, tok.v, tok.visual_mask), wait, repeats)),
        (name, f"  per layer, {LAYERS} layers in one jitted program", L,
         median_ms(lambda: pipeline_layers(*stacked, tok.visual_mask), wait, repeats) / LAYERS),
        (name, "mmfa attention on the kept tokens alone", L,
         median_ms(lambda: short(*kept, result.lengths), wait, repeats)),
    ]
    try:
        import torch
    except ImportError:
        print("  (torch not installed: no SDPA / eager rows)")
        return rows
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and impl == "pallas":
        print("  (torch has no CUDA here: its SDPA and eager rows below ran on the CPU; they say nothing of the GPU)")
    dt = getattr(torch, jnp.dtype(tok.q.dtype).name)
    q, k, v = (torch.tensor(jnp.asarray(x, jnp.float32).__array__(), device=device).to(dt).transpose(1, 2)
               for x in (tok.q, tok.k, tok.v))
    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    # As transformers' eager attention does it: an additive causal mask built once per forward.
    causal = torch.full((T, T), float("-inf"), device=device).triu(1).to(dt)

    def eager():
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + causal
        return torch.softmax(s, -1, dtype=torch.float32).to(dt) @ v

    with torch.no_grad():
        rows.append((name, "torch SDPA, full sequence", T, median_ms(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), sync, repeats)))
        rows.append((name, "torch eager attention, full sequence", T, median_ms(eager, sync, repeats)))
    return rows


# --- arguments: every value is checked here, before any work, as a one-line usage error (exit 2)
# naming the flag and the value. The types below raise ArgumentTypeError, which argparse prints as
# "mmfa demo: error: argument --keep: ..."; what needs several flags is checked in _check_*.

def positive_int(text: str) -> int:
    """An int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text}")
    return value


def ratio(text: str) -> float:
    """A float in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:  # (NaN fails this too)
        raise argparse.ArgumentTypeError(f"must be a ratio in (0, 1], got {text}")
    return value


def _demo_needs(module: str):
    try:
        __import__(module)
    except ImportError:
        raise argparse.ArgumentTypeError(
            f"mmfa demo reads and draws images with matplotlib and pillow ({module} is missing): "
            "pip install 'mmfa[demo]'") from None


def image_file(text: str) -> str:
    """An existing file that pillow reads as an image (decoded whole, so a truncated file fails here)."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r}: no such file")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not an image file")
    _demo_needs("PIL")
    from PIL import Image

    try:
        with Image.open(text) as im:
            im.load()
    except Exception as e:  # pillow raises many kinds: UnidentifiedImageError, OSError, SyntaxError, ...
        raise argparse.ArgumentTypeError(f"{text!r} is not an image pillow can read ({e})") from None
    return text


def output_image(text: str) -> str:
    """A path matplotlib can save an image to: its folder exists and is writable, it is not a folder,
    and it ends in a format matplotlib writes (.png, .jpg, .pdf, .svg, ...)."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text!r}: the folder {folder!r} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name such as {text.rstrip('/')}/kept.png")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(text) and not os.access(text, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written (permission denied)")
    _demo_needs("matplotlib")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if os.path.splitext(text)[1].lower().lstrip(".") not in formats:
        raise argparse.ArgumentTypeError(
            f"{text!r} must end in an image format matplotlib writes: {', '.join('.' + f for f in sorted(formats))}")
    return text


def colour_prompt(text: str) -> str:
    """A prompt that names one of the demo's colours."""
    from mmfa_jax import demo

    try:
        demo.prompt_colour(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser():
    """The ``mmfa`` parser and its subcommands' parsers, by name."""
    from mmfa_jax.demo import COLOURS

    ap = argparse.ArgumentParser(prog="mmfa", description="Multimodal Flash-Attention")
    sub = ap.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="prune a real image's visual tokens with a colour prompt; time it; write a PNG")
    frames = d.add_mutually_exclusive_group()
    frames.add_argument("--image", type=image_file,
                        help="an image file (default: a photograph that ships with matplotlib)")
    frames.add_argument("--video", nargs="+", metavar="FRAME", type=image_file,
                        help="image files taken as the frames of a video")
    d.add_argument("--prompt", default="the blue background", type=colour_prompt,
                   help=f"must name a colour: {', '.join(COLOURS)}")
    d.add_argument("--keep", type=ratio, default=None,
                   help="ratio in (0, 1] of visual tokens kept (default per configuration: 0.25 on the CPU; on a GPU "
                        "0.4 moderate, 0.5 heavy)")
    d.add_argument("--patch", type=positive_int, default=14, help="patch side in pixels; must divide --size")
    d.add_argument("--size", type=positive_int, default=None,
                   help="image side in pixels, a multiple of --patch (default per configuration: 224 on the CPU; "
                        "on a GPU 224 moderate, 336 heavy)")
    d.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: float32 on the CPU, bfloat16 on a GPU")
    d.add_argument("--repeats", type=positive_int, default=3)
    d.add_argument("--out", type=output_image, default="mmfa_demo.png",
                   help="where to write the image of the kept patches (its folder must exist)")
    a = sub.add_parser("attention", help="attention alone: time, memory and error against jax's attention")
    a.add_argument("--batch", type=positive_int, default=1)
    default = {name: f"default: {cpu} on the CPU, {gpu} on a GPU" for name, (cpu, gpu) in ATTENTION_DEFAULTS.items()}
    a.add_argument("--seq-len", type=positive_int, default=None, help=default["seq_len"])
    a.add_argument("--heads", type=positive_int, default=None, help=default["heads"])
    a.add_argument("--kv-heads", type=positive_int, default=None,
                   help="fewer key/value heads (GQA); must divide --heads (default: as many as --heads)")
    a.add_argument("--head-dim", type=positive_int, default=None, help=default["head_dim"])
    a.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a.add_argument("--causal", action="store_true")
    a.add_argument("--repeats", type=positive_int, default=5)
    a.add_argument("--seed", type=non_negative_int, default=0)
    return ap, {"demo": d, "attention": a}


@functools.cache
def _gpu() -> bool:
    """Whether the kernels run compiled here (the defaults depend on it); probed once, when first needed."""
    import mmfa_jax

    return mmfa_jax.pallas_available()


def demo_configs(args) -> list:
    """The demo's configurations, (name, (heads, head_dim, size, batch, keep)), with --size and --keep."""
    from mmfa_jax import demo

    names = ("moderate", "heavy") if _gpu() else ("cpu",)
    return [(name, (h, d, size if args.size is None else args.size, b, keep if args.keep is None else args.keep))
            for name, (h, d, size, b, keep) in ((n, demo.CONFIGS[n]) for n in names)]


def _check_demo(parser, args):
    if args.size is not None:
        sides = [(args.size, f"--size {args.size} into whole patches")]
    else:  # the configurations' own sizes (the device decides which run)
        sides = [(size, f"{size}, the {name} configuration's image side, into whole patches; choose --size")
                 for name, (_, _, size, _, _) in demo_configs(args)]
    for side, what in sides:
        if side % args.patch:
            parser.error(f"argument --patch: {args.patch} does not divide {what}")


ATTENTION_DEFAULTS = {"seq_len": (512, 8192), "heads": (4, 16), "head_dim": (64, 128)}  # (on the CPU, on a GPU)


def _check_attention(parser, args):
    """Checks what needs several flags, filling in the device's defaults (the device is probed only
    when a default is needed)."""
    limit = _max_head_dim()
    if args.head_dim is not None and limit is not None and args.head_dim > limit:
        parser.error(f"argument --head-dim: {args.head_dim} is over {limit}, the kernels' limit")
    heads_given = args.heads is not None
    for name, (cpu, gpu) in ATTENTION_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, gpu if _gpu() else cpu)
    if args.kv_heads is None:
        args.kv_heads = args.heads
    elif args.heads % args.kv_heads:
        parser.error(f"argument --kv-heads: {args.kv_heads} does not divide --heads {args.heads}"
                     f"{'' if heads_given else ' (its default here)'}: each key/value head serves a whole "
                     "group of query heads")


def _max_head_dim() -> int | None:
    """The kernels' head-dim limit, from the library's argument layer (where it lives, or lived)."""
    import importlib

    for module in ("mmfa_jax._checks", "mmfa_jax.attention"):
        try:
            return int(importlib.import_module(module).MAX_HEAD_DIM)
        except (ImportError, AttributeError):
            continue
    return None  # (tests/test_cli.py fails then: the limit moved)


def main(argv=None) -> int:
    ap, parsers = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        args = ap.parse_args(["demo", *(argv or [])])
    if args.command == "demo":
        _check_demo(parsers["demo"], args)
        return image_demo(args)
    _check_attention(parsers["attention"], args)
    return attention_demo(args)


if __name__ == "__main__":
    sys.exit(main())
