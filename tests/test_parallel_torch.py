"""mmfa_torch.parallel.cross_attention over torch.distributed (gloo, CPU), 2 and 4 processes, against
the float64 reference: forward, LSE and gradients, both strategies; block masks; K/V made by
``recompute_kv`` (gradients to the features and the projection's weights, and no K/V kept).

Each test starts ``world`` worker processes running this file (``--worker``), which join one
gloo group on a free local port, build the same global data from the seed the test passes (drawn
from the ``rng`` fixture), run every case of the test on their own shards and compare them with
the reference's matching slices. A failing comparison is recorded and the worker carries on (so
the ranks stay in step) and exits non-zero at the end; the test shows every rank's output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 400


# ------------------------------------------------------------------------------------------------
# The cases: (name, world-independent sizes and options).


def case(strategy, *, B=2, N=8, K=2, t=3, s=5, H=16, lengths="padded", dtype="float32", impl="xla", scale=None,
         backward=True, mask=False, recompute=False):
    """``mask``: a random (B, 1, T, S) visibility (with dead rows) given as block_mask; ``recompute``:
    K/V projected from random features by ``recompute_kv``."""
    return {"strategy": strategy, "B": B, "N": N, "K": K, "t": t, "s": s, "H": H, "lengths": lengths, "dtype": dtype,
            "impl": impl, "scale": scale, "backward": backward, "mask": mask, "recompute": recompute}


STRATEGIES = ("lv_xattn", "ring")
GQA_PADDED = [case(st) for st in STRATEGIES]  # GQA 8/2, odd local lengths, a shard all padding, an empty example
MQA = [case(st, B=3, N=4, K=1, t=2, s=4, H=8) for st in STRATEGIES]
# A worker's start (torch, jax, gloo) costs more than its cases, so each world size runs one batch.
MASKED = [case(st, mask=True, recompute=True) for st in STRATEGIES]  # with padding lengths too
CASES = {
    "four": GQA_PADDED + MQA + MASKED,
    "two": GQA_PADDED + MQA + MASKED
    + [case(st, lengths=None, recompute=True) for st in STRATEGIES]
    + [case(st, B=2, N=2, K=1, t=2, s=3, H=8, impl="interpret", mask=True) for st in STRATEGIES]
    + [case(st, B=1, N=4, K=4, lengths=None, scale=0.3) for st in STRATEGIES]  # MHA, no lengths, a scale
    + [case(st, B=2, N=4, K=2, t=4, s=8, H=32, dtype="bfloat16") for st in STRATEGIES]
    + [case(st, B=2, N=2, K=1, t=2, s=3, H=8, impl="interpret") for st in STRATEGIES],  # the Pallas kernels
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(world: int, cases: str, seed: int, script: str | None = None):
    """Runs the workers (``script --worker rank world port seed cases``, this file by default; other
    distributed tests reuse it); returns [(rank, returncode, output)]. Their output goes to files (a
    full pipe would block a worker in the middle of a collective)."""
    port = _free_port()
    # XLA's backend optimisation level 0: these tiny programs compile faster and compute the same.
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0")
    with tempfile.TemporaryDirectory() as tmp:
        logs = [open(os.path.join(tmp, f"rank{rank}.log"), "w+") for rank in range(world)]  # noqa: SIM115
        procs = [subprocess.Popen([sys.executable, os.path.abspath(script or __file__), "--worker", str(rank),
                                   str(world), str(port), str(seed), cases], cwd=HERE, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, text=True)
                 for rank, log in enumerate(logs)]
        deadline = time.monotonic() + TIMEOUT_S
        results = []
        try:
            for rank, p in enumerate(procs):
                try:
                    p.wait(timeout=max(1.0, deadline - time.monotonic()))
                    note = ""
                except subprocess.TimeoutExpired:
                    for other in procs:
                        if other.poll() is None:
                            other.kill()
                    p.wait()
                    note = f"\n[rank {rank}: killed after {TIMEOUT_S} s]"
                logs[rank].seek(0)
                results.append((rank, p.returncode, logs[rank].read() + note))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
    return results


@pytest.mark.parametrize("world, cases", [(4, "four"), (2, "two")])
def test_cross_attention_distributed(world, cases, rng):
    results = launch(world, cases, int(rng.integers(2**31)))
    report = "\n".join(f"--- rank {rank} (rc {rc}) ---\n{out[-6000:]}" for rank, rc, out in results)
    assert all(rc == 0 for _, rc, _ in results), report
    assert all(f"{len(CASES[cases])} cases passed" in out for _, _, out in results), report


# ------------------------------------------------------------------------------------------------
# Argument errors (no process group needed).


def test_errors():
    import torch

    from mmfa_jax._checks import ArgumentError, ArgumentTypeError
    from mmfa_torch import parallel

    q, k, v = torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8)
    with pytest.raises(ArgumentError, match=r"strategy must be one of \('lv_xattn', 'ring'\), got 'ulysses'"):
        parallel.cross_attention(q, k, v, strategy="ulysses")
    with pytest.raises(ArgumentError, match=r"key and value must have the same shape, got \(1, 2, 3, 8\) and "
                                            r"\(1, 2, 4, 8\)"):
        parallel.cross_attention(q, k, torch.zeros(1, 2, 4, 8))
    with pytest.raises(ArgumentError, match=r"query heads \(4\) must be a multiple of the key/value heads \(3\)"):
        parallel.cross_attention(q, torch.zeros(1, 3, 3, 8), torch.zeros(1, 3, 3, 8))
    with pytest.raises(ArgumentError, match=r"kv_seq_lengths must have shape \(1,\), got \(2,\)"):
        parallel.cross_attention(q, k, v, kv_seq_lengths=torch.tensor([1, 2]))
    with pytest.raises(ArgumentTypeError, match="kv_seq_lengths must be integers, got torch.float32|float32"):
        parallel.cross_attention(q, k, v, kv_seq_lengths=torch.ones(1))
    with pytest.raises(ArgumentTypeError, match="key must be a torch.Tensor, got ndarray"):
        parallel.cross_attention(q, np.zeros((1, 2, 3, 8)), v)
    with pytest.raises(ArgumentError, match="must have rank 4"):
        parallel.cross_attention(q[0], k, v)
    with pytest.raises(ArgumentTypeError, match="block_mask must be None or a callable .* got Tensor"):
        parallel.cross_attention(q, k, v, block_mask=torch.ones(1, 1, 2, 3, dtype=torch.bool))
    with pytest.raises(ArgumentTypeError, match=r"project must be a callable \(features, \*args\) -> \(key, value\), "
                                                "got int"):
        parallel.recompute_kv(torch.zeros(1, 3, 4), 3)
    with pytest.raises(ArgumentTypeError, match="project must return .key, value., two tensors; got Tensor"):
        parallel.recompute_kv(torch.zeros(1, 3, 4), lambda f: f)
    if not torch.distributed.is_initialized():
        with pytest.raises(ArgumentError, match="needs an initialised torch.distributed process group"):
            parallel.cross_attention(q, k, v)


def test_recompute_kv_with_another_attention(rng):
    """recompute_kv under any consumer (torch's SDPA here, no process group): the same values and
    gradients as the plain projection, and none of the projection's intermediates kept."""
    import torch

    from mmfa_torch import parallel

    B, S, F, K, H, T = 2, 7, 12, 2, 8, 5
    feats0, wk0, wv0, g0 = (torch.tensor(rng.standard_normal(sh), dtype=torch.float64)
                            for sh in ((B, S, F), (F, K * H), (F, K * H), (H,)))
    q = torch.tensor(rng.standard_normal((B, K, T, H)), dtype=torch.float64)

    def project(f, w_k, w_v, gain):  # an RMS norm on K, as Mllama's k_norm: intermediates worth dropping
        k = (f @ w_k).view(B, S, K, H).transpose(1, 2)
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * gain
        return k, (f @ w_v).view(B, S, K, H).transpose(1, 2)

    grads, saved = [], []
    for use in (False, True):
        leaves = [t.clone().requires_grad_() for t in (feats0, wk0, wv0, g0)]
        pack = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: pack.append(x) or x, lambda x: x):
            k, v = parallel.recompute_kv(leaves[0], project, *leaves[1:]) if use else project(*leaves)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        (out * out).sum().backward()
        grads.append([t.grad for t in leaves])
        saved.append(pack)
    for a, b, name in zip(*grads, ("features", "W_k", "W_v", "gain")):
        assert b is not None and torch.allclose(a, b, rtol=1e-10, atol=1e-12), name
    assert saved[0] and len(saved[1]) == 4  # the plain projection keeps its intermediates; recompute_kv its inputs


# ------------------------------------------------------------------------------------------------
# The worker.


def _run_case(index: int, c: dict, rank: int, world: int, seed: int):
    import torch
    from conftest import assert_close, tolerance
    from reference import attention_reference, attention_reference_grads

    from mmfa_torch import parallel

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[c["dtype"]]
    rng = np.random.default_rng([seed, index])
    B, N, K, t, s, H = (c[x] for x in "BNKtsH")
    T, S = t * world, s * world
    F = 12  # feature width of the recompute cases
    # Global data (BTNH), rounded to the dtype, the same on every rank.
    glob = [torch.tensor(rng.standard_normal(shape), dtype=torch.float32).to(dtype)
            for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H))]
    if c["recompute"]:  # K/V = features @ W (B, S, K, H), the features and weights of unit scale
        feats = torch.tensor(rng.standard_normal((B, S, F)), dtype=torch.float32).to(dtype)
        w_kv = [torch.tensor(rng.standard_normal((F, K * H)) / np.sqrt(F), dtype=torch.float32).to(dtype)
                for _ in range(2)]
        glob[1:] = [(feats.double() @ w.double()).view(B, S, K, H) for w in w_kv]
    q64, k64, v64 = (x.double().numpy() for x in glob)
    lengths = None
    if c["lengths"] == "padded":
        choices = [S, S - s - 1, 0, S - 1]  # all, the last shard all padding (+ one), none
        lengths = np.array([choices[b % 4] for b in range(B)], np.int64)
    mask = None
    if c["mask"]:
        mask = rng.random((B, 1, T, S)) < 0.6
        mask[0, 0, 1] = False  # a row that sees nothing
        mask[-1, 0, -1, s:] = False  # a row that sees only the first key shard
    mine_q, mine_kv = slice(rank * t, (rank + 1) * t), slice(rank * s, (rank + 1) * s)
    q, k, v = (x[:, sl].transpose(1, 2).contiguous().requires_grad_()  # (B, heads, L, D), this rank's shard
               for x, sl in zip(glob, (mine_q, mine_kv, mine_kv)))
    block_mask = None
    if mask is not None:
        torch_mask = torch.tensor(mask)
        calls = []

        def block_mask(q_origin, kv_origin):
            calls.append((q_origin, kv_origin))
            return torch_mask[:, :, q_origin * t:(q_origin + 1) * t, kv_origin * s:(kv_origin + 1) * s]
    if c["recompute"]:
        f_mine = feats[:, mine_kv].clone().requires_grad_()
        w_mine = [w.clone().requires_grad_() for w in w_kv]

        def project(f, w_k, w_v):
            return tuple((f @ w).view(B, s, K, H).transpose(1, 2).contiguous() for w in (w_k, w_v))

        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
            k, v = parallel.recompute_kv(f_mine, project, *w_mine)
            out, lse = parallel.cross_attention(q, k, v, strategy=c["strategy"], implementation=c["impl"],
                                                scale=c["scale"], block_mask=block_mask, return_lse=True,
                                                kv_seq_lengths=None if lengths is None else torch.tensor(lengths))
        # What autograd keeps: the features, the weights, the query shard, out, lse (and the
        # lengths); never a K/V shard (the projection runs again in the backward).
        kept = {x.data_ptr() for x in saved}
        assert k.data_ptr() not in kept and v.data_ptr() not in kept, "recompute_kv: K/V were kept"
        assert f_mine.data_ptr() in kept
    else:
        out, lse = parallel.cross_attention(q, k, v, strategy=c["strategy"], implementation=c["impl"],
                                            scale=c["scale"], block_mask=block_mask, return_lse=True,
                                            kv_seq_lengths=None if lengths is None else torch.tensor(lengths))
    if mask is not None:  # each rank computes its n blocks: LV-XAttn every query shard against its keys
        want = ({(o, rank) for o in range(world)} if c["strategy"] == "lv_xattn"
                else {(rank, o) for o in range(world)})
        assert set(calls) == want and len(calls) == world, calls
    r_out, r_lse = attention_reference(q64, k64, v64, kv_lengths=lengths, mask=mask, scale=c["scale"])
    tol = tolerance(c["dtype"])
    assert out.dtype == dtype and out.shape == (B, N, t, H) and lse.shape == (B, N, t)
    assert_close(out.transpose(1, 2), r_out[:, mine_q], tol, "out")
    assert_close(lse.transpose(1, 2), r_lse[:, mine_q], tol, "lse")
    dead = np.isinf(r_lse[:, mine_q]).transpose(0, 2, 1)
    assert (out.detach().float().numpy()[dead] == 0).all(), "rows without keys must be zeros"
    if not c["backward"]:
        return
    d_out = rng.standard_normal((B, T, N, H))
    d_lse = rng.standard_normal((B, T, N))
    d_out_mine = torch.tensor(d_out[:, mine_q]).transpose(1, 2).float()
    d_lse_mine = torch.tensor(d_lse[:, mine_q]).transpose(1, 2).float()
    loss = (out.float() * d_out_mine).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * d_lse_mine).sum()
    if mask is not None:
        calls.clear()
    loss.backward()
    if mask is not None:  # the backward asks for the same blocks again
        assert set(calls) == want and len(calls) == world, calls
    want_grads = attention_reference_grads(q64, k64, v64, d_out, d_lse, kv_lengths=lengths, mask=mask,
                                           scale=c["scale"])[:3]
    grad_tol = tolerance(c["dtype"], grad=True)
    assert q.grad is not None and q.grad.dtype == dtype, "dq"
    assert_close(q.grad.transpose(1, 2), want_grads[0][:, mine_q], grad_tol, "dq")
    if not c["recompute"]:
        for name, x, w in zip(("dk", "dv"), (k, v), want_grads[1:]):
            assert x.grad is not None and x.grad.dtype == dtype, name
            assert_close(x.grad.transpose(1, 2), w[:, mine_kv], grad_tol, name)
        return
    # Through the projection: d features = dK W_k^T + dV W_v^T on this rank's rows; each rank's
    # weight gradient is its shard's share, f_mine^T dK_mine.
    f64, w64 = feats.double().numpy(), [w.double().numpy() for w in w_kv]
    dk_mine, dv_mine = (g[:, mine_kv].reshape(B, s, K * H) for g in want_grads[1:])
    want_df = dk_mine @ w64[0].T + dv_mine @ w64[1].T
    assert f_mine.grad is not None and f_mine.grad.dtype == dtype, "d features"
    assert_close(f_mine.grad, want_df, grad_tol, "d features")
    for name, w, g in zip(("dW_k", "dW_v"), w_mine, (dk_mine, dv_mine)):
        want_dw = np.einsum("bsf,bsk->fk", f64[:, mine_kv], g)
        assert w.grad is not None, name
        assert_close(w.grad, want_dw, grad_tol, name)


def _worker(rank: int, world: int, port: int, seed: int, cases: str):
    import datetime
    import time

    start = time.perf_counter()
    import torch
    import torch.distributed as dist

    import mmfa_torch.parallel  # noqa: F401

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S // 2))
    print(f"rank {rank}: imports and group {time.perf_counter() - start:.1f} s", flush=True)
    failures = []
    try:
        for index, c in enumerate(CASES[cases]):
            t = time.perf_counter()
            try:
                _run_case(index, c, rank, world, seed)
            except AssertionError:  # a wrong number: record it, stay in step with the other ranks
                failures.append(f"case {index} {json.dumps(c)}:\n{traceback.format_exc()}")
            print(f"rank {rank}: case {index} {time.perf_counter() - t:.1f} s", flush=True)
    finally:
        dist.destroy_process_group()
    if failures:
        print(f"rank {rank}: {len(failures)} of {len(CASES[cases])} cases failed (seed {seed})\n" + "\n".join(failures))
        sys.exit(1)
    print(f"rank {rank}: {len(CASES[cases])} cases passed")


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    sys.path.insert(0, HERE)
    _worker(*(int(x) for x in sys.argv[2:6]), sys.argv[6])
