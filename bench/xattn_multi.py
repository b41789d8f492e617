"""Distributed cross-attention on several devices: LV-XAttn against ring, both engines, one run.

    # jax: one process, every local GPU a shard of the mesh axis
    python bench/xattn_multi.py jax
    # torch: one process per GPU (NCCL), started by torch's own launcher
    python -m torch.distributed.run --nproc-per-node 2 bench/xattn_multi.py torch
    # CPU checks of the script: 4 jax CPU devices; gloo over 2 processes
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python bench/xattn_multi.py jax --smoke
    python -m torch.distributed.run --nproc-per-node 2 bench/xattn_multi.py torch --smoke

Per (Sq text tokens, Skv visual tokens, strategy, mode, recompute), a layer's cross-attention:
K/V projected from the visual features (B, Skv, C) by one matrix each (``--hidden`` C), queries
given; forward, or forward + backward into the queries, the features and the projection weights.
With ``recompute`` the K/V are projected again in the backward instead of kept
(``mmfa_jax.parallel.cross_attention_from_features``; ``mmfa_torch.parallel.recompute_kv``). Times
are medians of repeats; peak memory per device; the first (Sq, Skv) of every strategy and mode is
checked against one device's attention over the whole sequences (jax: mmfa's, outputs and all three
gradients; torch: torch's SDPA, outputs and the queries' gradient).

LV-XAttn's target (issue "Run distributed cross-attention on several GPUs"): at least 2x faster
than ring wherever Skv / Sq >= 16 on 2 GPUs. Compare the times with ``scripts/xattn_model.py``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import numpy as np  # noqa: E402
from xattn_model import sizes  # noqa: E402  (token counts with k/M suffixes)

FIELDS = ["engine", "devices", "sq", "skv", "heads", "head_dim", "strategy", "mode", "recompute", "ms", "peak_gib",
          "max_err", "error"]


def _cases(args):
    for sq in args.sq:
        for skv in args.skv:
            for strategy in args.strategies:
                for mode in args.modes:
                    for recompute in ((False, True) if mode == "fwd+bwd" and args.recompute else (False,)):
                        yield sq, skv, strategy, mode, recompute


# ------------------------------------------------------------------------------------------------
# jax: shard_map over the local devices.


def run_jax(args):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mmfa_jax import attention, parallel

    devices = jax.devices()
    n = len(devices)
    mesh = jax.make_mesh((n,), ("x",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
    seq, rep = P(None, "x"), P()
    dt = jnp.dtype(args.dtype)
    H, D, C = args.heads, args.head_dim, args.hidden
    impl = args.implementation
    rows = []
    for sq, skv, strategy, mode, recompute in _cases(args):
        row = dict(engine="jax", devices=n, sq=sq, skv=skv, heads=H, head_dim=D, strategy=strategy, mode=mode,
                   recompute=recompute)
        try:
            key = jax.random.PRNGKey(sq * 7 + skv)
            kq, kf, kw = jax.random.split(key, 3)
            q = jax.device_put(jax.random.normal(kq, (1, sq, H, D), dt), NamedSharding(mesh, seq))
            feats = jax.device_put(jax.random.normal(kf, (1, skv, C), dt), NamedSharding(mesh, seq))
            w = jax.device_put(jax.random.normal(kw, (2, C, H * D), dt) / np.sqrt(C), NamedSharding(mesh, rep))

            def project(f, w):
                return tuple((f @ w[i]).reshape(f.shape[0], f.shape[1], H, D) for i in range(2))

            def local(q, f, w):
                if recompute:
                    return parallel.cross_attention_from_features(q, f, project, w, axis_name="x", strategy=strategy,
                                                                  implementation=impl)
                return parallel.cross_attention(q, *project(f, w), axis_name="x", strategy=strategy,
                                                implementation=impl)

            layer = parallel.shard_map(local, mesh=mesh, in_specs=(seq, seq, rep), out_specs=seq, check_vma=False)
            do = jnp.ones(q.shape, dt)
            if mode == "fwd":
                fn = jax.jit(layer)
            else:
                fn = jax.jit(lambda q, f, w: jax.vjp(layer, q, f, w)[1](do))
            out = jax.block_until_ready(fn(q, feats, w))
            if (sq, skv) == (args.sq[0], args.skv[0]):  # the first shape: against one device, whole sequences
                ref = jax.jit(lambda q, f, w: attention(q, *project(f, w), implementation=impl))
                one = [jax.device_put(x, devices[0]) for x in (q, feats, w)]
                if mode == "fwd":
                    want = ref(*one)
                else:
                    want = jax.vjp(ref, *one)[1](jax.device_put(do, devices[0]))
                err = max(float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
                          for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(want)))
                row["max_err"] = float(f"{err:.3g}")
            samples = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(q, feats, w))
                samples.append(time.perf_counter() - t0)
            row["ms"] = round(1e3 * statistics.median(samples), 3)
            stats = [d.memory_stats() or {} for d in devices]
            peak = max((s.get("peak_bytes_in_use", 0) for s in stats), default=0)
            row["peak_gib"] = round(peak / 2**30, 2) or None
        except Exception as e:  # noqa: BLE001  (out of memory, unsupported: recorded)
            row["error"] = str(e).splitlines()[0][:140] if str(e) else type(e).__name__
        _report(row)
        rows.append(row)
    _write(args.out, rows)


# ------------------------------------------------------------------------------------------------
# torch: one process per device (torch.distributed.run), NCCL on GPUs, gloo on CPUs.


def run_torch(args):
    import torch
    import torch.distributed as dist

    import mmfa_torch
    from mmfa_torch import parallel

    cuda = torch.cuda.is_available() and not args.smoke
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dt = getattr(torch, args.dtype)
    H, D, C = args.heads, args.head_dim, args.hidden
    rows = []
    for sq, skv, strategy, mode, recompute in _cases(args):
        row = dict(engine="torch", devices=n, sq=sq, skv=skv, heads=H, head_dim=D, strategy=strategy, mode=mode,
                   recompute=recompute)
        try:
            if sq % n or skv % n:
                raise ValueError(f"Sq={sq} and Skv={skv} must divide over {n} ranks")
            g = torch.Generator().manual_seed(sq * 7 + skv)  # the same global tensors on every rank
            q_all = torch.randn(1, H, sq, D, generator=g).to(device, dt)
            f_all = torch.randn(1, skv, C, generator=g).to(device, dt)
            w = (torch.randn(2, C, H * D, generator=g) / C ** 0.5).to(device, dt)
            q = q_all[:, :, rank * sq // n:(rank + 1) * sq // n].clone().requires_grad_(mode == "fwd+bwd")
            feats = f_all[:, rank * skv // n:(rank + 1) * skv // n].clone().requires_grad_(mode == "fwd+bwd")
            w.requires_grad_(mode == "fwd+bwd")

            def project(f, w):
                return tuple((f @ w[i]).reshape(f.shape[0], f.shape[1], H, D).transpose(1, 2) for i in range(2))

            def step():
                k, v = parallel.recompute_kv(feats, project, w) if recompute else project(feats, w)
                out = parallel.cross_attention(q, k, v, strategy=strategy, implementation=args.implementation)
                if mode == "fwd+bwd":
                    out.backward(torch.ones_like(out))
                return out

            out = step()
            if (sq, skv) == (args.sq[0], args.skv[0]):  # the first shape: against one device
                row["max_err"] = _torch_check(q, out, q_all, f_all, w, project, mode, rank, n, sq, args)
            samples = []
            for _ in range(args.repeats):
                if cuda:
                    torch.cuda.synchronize()
                dist.barrier()
                t0 = time.perf_counter()
                step()
                if cuda:
                    torch.cuda.synchronize()
                samples.append(time.perf_counter() - t0)
            ms = torch.tensor([1e3 * statistics.median(samples)], device=device)
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)  # the slowest rank's time is the layer's
            row["ms"] = round(float(ms), 3)
            if cuda:
                peak = torch.tensor([torch.cuda.max_memory_allocated(device)], device=device, dtype=torch.float64)
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
                row["peak_gib"] = round(float(peak) / 2**30, 2)
                torch.cuda.reset_peak_memory_stats(device)
            q = feats = out = None  # free the shards before the next case
        except Exception as e:  # noqa: BLE001
            row["error"] = str(e).splitlines()[0][:140] if str(e) else type(e).__name__
        if rank == 0:
            _report(row)
        rows.append(row)
    if rank == 0:
        _write(args.out, rows)
    dist.destroy_process_group()
    del mmfa_torch


def _torch_check(q, out, q_all, f_all, w, project, mode, rank, n, sq, args):
    """Max abs difference of this run's output (and query gradient) from one device's torch SDPA
    over the whole sequences, the worst over ranks."""
    import torch
    import torch.distributed as dist

    qr = q_all.clone().requires_grad_(mode == "fwd+bwd")
    k, v = project(f_all, w.detach())
    want = torch.nn.functional.scaled_dot_product_attention(qr, k, v, enable_gqa=True)  # an independent judge
    mine = want[:, :, rank * sq // n:(rank + 1) * sq // n]
    err = (out.detach().float() - mine.detach().float()).abs().max()
    if mode == "fwd+bwd":
        want.backward(torch.ones_like(want))
        err = torch.maximum(err, (q.grad.float() - qr.grad[:, :, rank * sq // n:(rank + 1) * sq // n].float())
                            .abs().max())
        q.grad = None
    err = err.reshape(1)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return float(f"{float(err):.3g}")


# ------------------------------------------------------------------------------------------------


def _report(row):
    what = (f"{row['engine']:<5} P={row['devices']} Sq={row['sq']:<6} Skv={row['skv']:<8} {row['strategy']:<8} "
            f"{row['mode']:<8} {'recompute' if row['recompute'] else 'kv kept  '}")
    if row.get("error"):
        print(f"{what} failed: {row['error']}", flush=True)
    else:
        err = "" if row.get("max_err") is None else f"  max err vs one device {row['max_err']}"
        mem = "" if row.get("peak_gib") is None else f"  peak {row['peak_gib']} GiB"
        print(f"{what} {row['ms']:10.3f} ms{mem}{err}", flush=True)


def _write(path, rows):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", choices=["jax", "torch"])
    ap.add_argument("--sq", type=sizes, default=sizes("1k,8k"), help="text tokens (k/M suffixes)")
    ap.add_argument("--skv", type=sizes, default=sizes("64k,256k,1M"), help="visual tokens")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=4096, help="the visual features' width C")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--strategies", type=lambda s: s.split(","), default=["lv_xattn", "ring"])
    ap.add_argument("--modes", type=lambda s: s.split(","), default=["fwd", "fwd+bwd"])
    ap.add_argument("--no-recompute", dest="recompute", action="store_false")
    ap.add_argument("--implementation", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (xla implementation)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.sq, args.skv, args.heads, args.head_dim, args.hidden = [16], [64], 2, 16, 32
        args.dtype, args.repeats, args.implementation = "float32", 1, args.implementation or "xla"
    args.out = args.out or f"results/xattn_multi_{args.engine}.csv"
    (run_jax if args.engine == "jax" else run_torch)(args)


if __name__ == "__main__":
    main()
