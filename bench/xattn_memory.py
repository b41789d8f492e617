"""Activation memory of one cross-attention layer, with and without K/V recomputation (LV-XAttn), on the CPU.

What a layer keeps from its forward for its backward, measured, not modelled:

- torch face: ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor autograd saves during
  the layer's forward (custom Functions' ``save_for_backward`` included); the bytes of their distinct
  storages are added up. The layer is transformers' ``MllamaTextCrossAttention`` (Llama 3.2 Vision's
  shapes by default): unpatched (sdpa), and patched by ``mmfa_torch.hf.mllama`` (one gloo rank)
  with K/V kept or ``recompute_kv=True``.
- jax face: the residuals of ``jax.vjp`` of the same layer (q/k/v/o projections, RMS norms on q and
  k, ``mmfa_jax.parallel.cross_attention`` inside ``shard_map`` over one device): the arrays the
  vjp closure holds. Three variants: K/V kept; ``recompute_kv`` (the projection under
  ``jax.checkpoint``: its intermediates go, but the attention's custom VJP still keeps K/V); and
  the projection and the attention under one ``jax.checkpoint`` (nothing of the attention kept;
  its forward runs again in the backward, ring communication included).

Counted: activations only. The weights and the layer's two inputs (the text hidden states, which
the residual stream keeps anyway, and the visual features, which every cross-attention layer of the
model shares and keeps once) are left out. Per rank with P ranks the visual terms (K/V, the
projection's intermediates) are 1/P of these (each rank keeps its shard) and the text terms stay.

    python bench/xattn_memory.py                                   # Llama-3.2-11B-Vision layer, 128 text tokens
    python bench/xattn_memory.py --visual 1601,6404 --faces torch  # one and four tiles
    python bench/xattn_memory.py --hidden 256 --heads 4 --kv-heads 2 --head-dim 64 --visual 512,2048  # quick
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

DTYPES = ("bfloat16", "float32")


def _sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1024 if part.endswith("k") else 1
        out.append(int(float(part.rstrip("k")) * mult))
    return out


# ------------------------------------------------------------------------------------------------
# torch


def _init_group():
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def torch_saved_bytes(fn, exclude) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs, less those of ``exclude``."""
    import torch

    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    total = sum(n for ptr, n in storages.items() if ptr not in skip)
    del out
    return total


def torch_rows(args, visual: int) -> dict[str, int]:
    import torch
    from transformers import MllamaTextConfig
    from transformers.models.mllama.modeling_mllama import MllamaTextCrossAttention

    from mmfa_torch.hf import mllama

    dtype = getattr(torch, args.dtype)
    config = MllamaTextConfig(hidden_size=args.hidden, num_attention_heads=args.heads,
                              num_key_value_heads=args.kv_heads, intermediate_size=4 * args.hidden,
                              num_hidden_layers=1, cross_attention_layers=[0], vocab_size=128)
    config._attn_implementation = "sdpa"
    if args.hidden // args.heads != args.head_dim:
        raise SystemExit(f"--hidden / --heads must be --head-dim (Mllama's head size), got {args.hidden} / "
                         f"{args.heads} != {args.head_dim}")
    torch.manual_seed(0)
    layer = MllamaTextCrossAttention(config, layer_idx=0).to(dtype)
    holder = torch.nn.ModuleList([layer])
    hidden = torch.randn(args.batch, args.text, args.hidden, dtype=dtype, requires_grad=True)
    # The visual features come from a frozen vision tower here (the usual fine-tuning setup); with a
    # trained tower they would require grad too, and be kept once for every layer either way.
    feats = torch.randn(args.batch, visual, args.hidden, dtype=dtype)
    exclude = [hidden, feats, *layer.parameters()]

    def run():
        out, _ = layer(hidden, cross_attention_states=feats, attention_mask=None)
        return out

    rows = {"transformers sdpa (unpatched)": torch_saved_bytes(run, exclude)}
    for name, recompute in (("mmfa lv_xattn, K/V kept", False), ("mmfa lv_xattn, recompute_kv", True)):
        handle = mllama.parallelize_cross_attention(holder, recompute_kv=recompute, implementation=args.implementation)
        rows[name] = torch_saved_bytes(run, exclude)
        handle.remove()
    return rows


# ------------------------------------------------------------------------------------------------
# jax


def jax_rows(args, visual: int) -> dict[str, int]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P

    from mmfa_jax import parallel

    dtype = jnp.dtype(args.dtype)
    B, T, S, C, Hq, Hkv, D = args.batch, args.text, visual, args.hidden, args.heads, args.kv_heads, args.head_dim
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    x = jax.random.normal(keys[0], (B, T, C), dtype)
    feats = jax.random.normal(keys[1], (B, S, C), dtype)
    w_q = jax.random.normal(keys[2], (C, Hq * D), dtype) / np.sqrt(C)
    w_k = jax.random.normal(keys[3], (C, Hkv * D), dtype) / np.sqrt(C)
    w_v = jax.random.normal(keys[4], (C, Hkv * D), dtype) / np.sqrt(C)
    w_o = jax.random.normal(keys[5], (Hq * D, C), dtype) / np.sqrt(Hq * D)
    g_q, g_k = jnp.ones((D,), dtype), jnp.ones((D,), dtype)
    weights = (w_q, g_q, w_k, g_k, w_v, w_o)

    def rms(h, g):  # as Mllama's: in float32, back to the input dtype, times the weight
        h32 = h.astype(jnp.float32)
        return g * (h32 * jax.lax.rsqrt(jnp.mean(h32 * h32, -1, keepdims=True) + 1e-5)).astype(h.dtype)

    def project(f, w_k, g_k, w_v):
        k = rms((f @ w_k).reshape(B, -1, Hkv, D), g_k)
        return k, (f @ w_v).reshape(B, -1, Hkv, D)

    def attend(q, k, v):
        return parallel.cross_attention(q, k, v, axis_name="x", implementation=args.implementation)

    def layer(variant):
        def body(x, feats, w_q, g_q, w_k, g_k, w_v, w_o):
            q = rms((x @ w_q).reshape(B, -1, Hq, D), g_q)
            if variant == "kept":
                out = attend(q, *project(feats, w_k, g_k, w_v))
            elif variant == "recompute_kv":
                out = attend(q, *parallel.recompute_kv(feats, project, w_k, g_k, w_v))
            elif variant == "from_features":
                out = parallel.cross_attention_from_features(q, feats, project, w_k, g_k, w_v, axis_name="x",
                                                             implementation=args.implementation)
            else:
                out = jax.checkpoint(lambda q, f, *w: attend(q, *project(f, *w)),
                                     policy=jax.checkpoint_policies.nothing_saveable)(q, feats, w_k, g_k, w_v)
            return out.reshape(B, -1, Hq * D) @ w_o

        mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
        seq = P(None, "x")
        return parallel.shard_map(body, mesh=mesh, in_specs=(seq, seq) + (P(),) * 6, out_specs=seq,
                                  check_vma=False)

    inputs = (x, feats) + weights
    skip = {a.unsafe_buffer_pointer() for a in inputs}
    rows = {}
    for name, variant in (("mmfa lv_xattn, K/V kept", "kept"), ("mmfa lv_xattn, recompute_kv", "recompute_kv"),
                          ("mmfa lv_xattn, cross_attention_from_features", "from_features"),
                          ("mmfa lv_xattn, checkpoint(projection + attention)", "all")):
        _, vjp_fn = jax.vjp(layer(variant), *inputs)
        seen = {}
        for leaf in jax.tree_util.tree_leaves(vjp_fn):
            if isinstance(leaf, jax.Array) and leaf.size:
                ptr = leaf.unsafe_buffer_pointer()
                if ptr not in skip:
                    seen[ptr] = leaf.nbytes
        rows[name] = sum(seen.values())
        del vjp_fn
    return rows


# ------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--visual", default="1601,6404,12808",
                    help="visual tokens (Mllama: 1601 per tile, 4 tiles an image), comma-separated; k suffix")
    ap.add_argument("--text", type=int, default=128, help="text tokens")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=4096, help="text hidden size C (Llama-3.2-11B-Vision: 4096)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    ap.add_argument("--faces", default="torch,jax", help="torch, jax or both")
    ap.add_argument("--implementation", default="xla", help="mmfa's kernels (CPU: xla or interpret)")
    args = ap.parse_args(argv)
    faces = [f.strip() for f in args.faces.split(",") if f.strip()]
    for f in faces:
        if f not in ("torch", "jax"):
            ap.error(f"--faces takes torch and/or jax, got {f!r}")
    if "torch" in faces:
        _init_group()

    print(f"Activations kept per cross-attention layer for the backward (MiB), weights and the layer's inputs "
          f"excluded; {args.dtype}, batch {args.batch}, {args.text} text tokens, C={args.hidden}, {args.heads} query / "
          f"{args.kv_heads} KV heads of {args.head_dim}, one rank. ratio: K/V kept / the recomputing variant.")
    head = f"{'face':>5} {'visual':>7} | {'variant':<48} {'MiB':>9} {'ratio':>7}"
    print(head)
    print("-" * len(head))
    mib = 1024.0 ** 2
    for visual in _sizes(args.visual):
        for face in faces:
            rows = torch_rows(args, visual) if face == "torch" else jax_rows(args, visual)
            base = rows["mmfa lv_xattn, K/V kept"]
            for name, n in rows.items():
                ratio = f"{base / n:6.2f}x" if ("recompute_kv" in name or "from_features" in name) and n else ""
                print(f"{face:>5} {visual:>7} | {name:<48} {n / mib:9.2f} {ratio:>7}", flush=True)
        print()
    if "torch" in faces:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
