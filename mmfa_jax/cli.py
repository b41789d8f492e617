"""The ``mmfa`` command.

    mmfa demo                 # prune a real image's visual tokens with a colour prompt, time
                              # attention before and after, write a PNG of the kept patches
    mmfa demo --image photo.jpg --prompt "the red parts" --keep 0.25
    mmfa attention            # attention alone: mmfa against jax's attention (time, memory, error)
    mmfa attention --seq-len 8192 --heads 16 --head-dim 128 --causal
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


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

    on_gpu = mmfa_jax.pallas_available()
    kernel_impl = "pallas" if on_gpu else "interpret"
    dev = jax.devices()[0]
    print(f"mmfa demo on {dev.platform} ({dev.device_kind}); kernels run as '{kernel_impl}'")
    B, T, N, K, H = args.batch, args.seq_len, args.heads, args.kv_heads or args.heads, args.head_dim
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
        print("\n(CPU: the kernels run in the Pallas interpreter, which checks them, not their speed.)")
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

    gpu = mmfa_jax.pallas_available()
    impl = "pallas" if gpu else "interpret"
    paths = args.video or [args.image or demo.default_image()]
    dtype = jnp.dtype(args.dtype or ("bfloat16" if gpu else "float32"))
    configs = [("cpu", demo.CONFIGS["cpu"])] if not gpu else [(n, demo.CONFIGS[n]) for n in ("moderate", "heavy")]
    configs = [(name, (h, d, args.size or size, b, args.keep or keep)) for name, (h, d, size, b, keep) in configs]
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mmfa", description="Multimodal Flash-Attention")
    sub = ap.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="prune a real image's visual tokens with a colour prompt; time it; write a PNG")
    d.add_argument("--image", help="an image file (default: a photograph that ships with matplotlib)")
    d.add_argument("--video", nargs="+", metavar="FRAME", help="image files taken as the frames of a video")
    d.add_argument("--prompt", default="the blue background", help="must name a colour")
    d.add_argument("--keep", type=float, default=None,
                   help="ratio of visual tokens kept (default per configuration: 0.25 on the CPU; on a GPU "
                        "0.4 moderate, 0.5 heavy)")
    d.add_argument("--patch", type=int, default=14)
    d.add_argument("--size", type=int, default=None, help="image side in pixels (default per configuration)")
    d.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: float32 on the CPU, bfloat16 on a GPU")
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--out", default="mmfa_demo.png")
    a = sub.add_parser("attention", help="attention alone: time, memory and error against jax's attention")
    a.add_argument("--batch", type=int, default=1)
    a.add_argument("--seq-len", type=int, default=None, help="default: 512 on the CPU, 8192 on a GPU")
    a.add_argument("--heads", type=int, default=None, help="default: 4 on the CPU, 16 on a GPU")
    a.add_argument("--kv-heads", type=int, default=None, help="fewer key/value heads: GQA")
    a.add_argument("--head-dim", type=int, default=None, help="default: 64 on the CPU, 128 on a GPU")
    a.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a.add_argument("--causal", action="store_true")
    a.add_argument("--repeats", type=int, default=5)
    a.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.command is None:
        args = ap.parse_args(["demo", *(argv or [])])
    if args.command == "demo":
        return image_demo(args)
    import mmfa_jax

    gpu = mmfa_jax.pallas_available()
    args.seq_len = args.seq_len or (8192 if gpu else 512)
    args.heads = args.heads or (16 if gpu else 4)
    args.head_dim = args.head_dim or (128 if gpu else 64)
    return attention_demo(args)


if __name__ == "__main__":
    sys.exit(main())
