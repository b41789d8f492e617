"""The Triton route (mmfa_jax.triton_route): the same Pallas kernels compiled by the official
``triton`` package, for Turing (sm_75) and on demand anywhere.

On the CPU: every kernel, for every row of the Turing tuning table, is lowered for an abstract
"Tesla T4" and compiled to an sm_75 cubin (and for an abstract A100 to sm_80) that must fit 64 KiB
of shared memory per block; the route's choice, cache and error messages. With --gpu: the route
forced on the GPU at hand, and the sm_75 code itself run on it (MMFA_TRITON_ARCH=75).

Compiling for sm_75 is slow (Triton emits unrolled FMA code: about 1-35 s a kernel on one CPU
core), so the CPU checks compile float16 and float32 for every row and kernel, and bfloat16 (float16's
rows, less shared memory) for the forward and importance kernels of one row; set
MMFA_TURING_FULL=1 to compile bfloat16 for every row and kernel too.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from conftest import assert_close, normal, tolerance
from reference import attention_reference, attention_reference_grads

import mmfa_jax
from mmfa_jax import backends, triton_route, tuning

try:
    import triton  # noqa: F401

    TRITON = None
except Exception as e:  # the message says what the skip is about
    TRITON = f"the official `triton` package is not importable ({e!r}); it comes with torch: pip install -e '.[test]'"

needs_triton = pytest.mark.skipif(TRITON is not None, reason=TRITON or "")

T4, A100 = "Tesla T4", "NVIDIA A100"
TURING_ROWS = sorted(d for (family, d) in tuning.TABLE if family == "sm75")
TURING_FLOAT32_ROWS = sorted(d for (family, d) in tuning.TABLE if family == "sm75-float32")
FULL = os.environ.get("MMFA_TURING_FULL", "") not in ("", "0")


def _kernels():
    sys.path.insert(0, os.path.dirname(__file__))
    return importlib.import_module("turing_kernels")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Each test compiles into its own cache directory, starting with an empty memory cache, so
    the checks below really compile."""
    monkeypatch.setenv("MMFA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MMFA_ROUTE", raising=False)
    monkeypatch.delenv("MMFA_TRITON_ARCH", raising=False)
    triton_route.clear_memory_cache()


def test_triton_is_importable_for_the_turing_checks():
    """Says plainly when the cross-compile checks below cannot run (and are skipped)."""
    if TRITON is not None:
        pytest.skip(TRITON)
    assert triton_route.available()


def test_turing_table_covers_every_head_dim():
    assert TURING_ROWS == TURING_FLOAT32_ROWS == [32, 64, 128, 256]
    for d in TURING_ROWS:
        for dtype in (jnp.float16, jnp.bfloat16):
            assert tuning.config_for(d, dtype, "sm75") == tuning.TABLE[("sm75", d)]
        assert tuning.config_for(d, jnp.float32, "sm75") == tuning.TABLE[("sm75-float32", d)]


# ------------------------------------------------------------------------------------------------
# Cross-compilation for sm_75 and sm_80, no GPU needed.


def _cases():
    """float16 and float32 (its own, tighter rows) for every row; bfloat16 (which uses the float16
    rows and less shared memory) for the forward and importance of one row unless MMFA_TURING_FULL."""
    cases = []
    for kernel in ("forward", "backward", "importance", "scorer_stats"):
        for d in TURING_ROWS:
            for dtype in ("float16", "float32", "bfloat16"):
                if dtype == "bfloat16" and (d != 64 or kernel == "backward") and not FULL:
                    continue
                cases.append(pytest.param(kernel, d, dtype, id=f"{kernel}-d{d}-{dtype}"))
    cases.append(pytest.param("forward_at_rows", 64, "float16", id="forward_at_rows-d64-float16"))
    return cases


@needs_triton
@pytest.mark.parametrize("kernel,head_dim,dtype", _cases())
def test_turing_table_compiles_for_sm75_within_64kib(kernel, head_dim, dtype):
    kernels = _kernels()
    config = tuning.config_for(head_dim, jnp.dtype(dtype), "sm75")  # the table's row
    fn, args = kernels.build(kernel, head_dim, jnp.dtype(dtype), config)
    compiled = triton_route.lower_for(fn, *args, device_kind=T4)  # auto route: sm_75 takes it
    names = [k.name for k, *_ in compiled]
    assert names == list(kernels.KERNELS[kernel][2]), names
    for k, label, *_ in compiled:
        assert k.cc == 75
        assert len(k.cubin) > 0 and ".target sm_75" in k.ptx, f"{k.name}: no sm_75 cubin"
        assert 0 < k.shared <= 64 * 1024, f"{k.name} ({label}) needs {k.shared} bytes of shared memory"


@needs_triton
@pytest.mark.parametrize("kernel", ["forward", "backward", "importance", "scorer_stats"])
def test_turing_table_compiles_for_sm80(kernel):
    """The same kernels and tiles, compiled for Ampere by the route (forced: XLA's Triton would
    take sm_80 otherwise). Fast: Ampere has mma, so the code is small."""
    kernels = _kernels()
    for d in TURING_ROWS:
        config = tuning.TABLE[("sm75", d)]
        fn, args = kernels.build(kernel, d, jnp.float16, config, implementation="triton")
        compiled = triton_route.lower_for(fn, *args, device_kind=A100)
        assert [k.cc for k, *_ in compiled] == [80] * len(kernels.KERNELS[kernel][2])
        for k, *_ in compiled:
            assert len(k.cubin) > 0 and "mma" in k.ptx and k.shared <= 163 * 1024


# ------------------------------------------------------------------------------------------------
# Which route a kernel takes.


T4_TARGET, A100_TARGET, H100_TARGET = (backends.Target.cuda(cc) for cc in (75, 80, 90))


@needs_triton
def test_route_choice():
    """One decision, in mmfa_jax.backends: "pallas" takes XLA's Triton from sm_80 and the Triton
    route on Turing; "triton" always the route; unknown names are refused, naming the argument."""
    assert backends.resolve("pallas", T4_TARGET) == backends.Lowering("triton-route", 75, "sm75")
    assert backends.resolve("pallas", A100_TARGET) == backends.Lowering("xla-triton", 80, "sm80")
    assert backends.resolve("pallas", H100_TARGET) == backends.Lowering("xla-triton", 90, "sm90")
    assert backends.resolve("triton", H100_TARGET) == backends.Lowering("triton-route", 90, "sm90")
    assert backends.resolve(None, H100_TARGET).backend == "xla-triton"
    assert backends.resolve(None, backends.Target("cpu")).backend == "xla"
    assert backends.resolve("interpret", H100_TARGET).backend == "interpret"
    with pytest.raises(ValueError, match="implementation must be one of"):
        backends.resolve("fast", H100_TARGET)
    with pytest.raises(ValueError, match="implementation='pallas' needs an NVIDIA GPU"):
        backends.resolve("pallas", backends.Target("cpu"))


@needs_triton
def test_route_forced_by_environment(monkeypatch):
    monkeypatch.setenv("MMFA_ROUTE", "triton")
    assert backends.resolve("pallas", H100_TARGET).backend == "triton-route"
    monkeypatch.setenv("MMFA_ROUTE", "sideways")
    with pytest.raises(backends.SettingError, match="MMFA_ROUTE must be"):
        backends.resolve("pallas", H100_TARGET)


@needs_triton
def test_arch_override_is_checked(monkeypatch):
    monkeypatch.setenv("MMFA_TRITON_ARCH", "sm_75")
    assert backends.settings().triton_arch == 75
    assert backends.resolve("pallas", H100_TARGET) == backends.Lowering("triton-route", 75, "sm75")
    monkeypatch.setenv("MMFA_TRITON_ARCH", "6.1")
    with pytest.raises(backends.SettingError, match="below sm_75"):
        backends.settings()
    monkeypatch.setenv("MMFA_TRITON_ARCH", "turing")
    with pytest.raises(backends.SettingError, match="compute capability such as 75"):
        backends.settings()


def _small_forward(implementation="pallas", dtype=jnp.float16, cfg=tuning.KernelConfig(16, 16, 4, 1)):
    """A small forward kernel: fast to compile even for sm_75."""
    return _kernels().forward(16, dtype, cfg, implementation=implementation)


@needs_triton
def test_ampere_and_hopper_keep_xlas_triton_unless_asked():
    fn, args = _small_forward("pallas")
    assert triton_route.lower_for(fn, *args, device_kind=A100) == []
    fn, args = _small_forward("triton")
    [(kernel, *_)] = triton_route.lower_for(fn, *args, device_kind="NVIDIA H100")
    assert kernel.cc == 90


@needs_triton
def test_public_attention_cross_lowers_for_turing_on_a_cpu_machine():
    """The backend follows the device being lowered for, not the process's default device: on a
    CPU-only machine, the public ``attention(..., implementation="pallas")`` lowered for an abstract
    T4 takes the Triton route (forward and backward kernels compiled for sm_75)."""
    q = jax.ShapeDtypeStruct((1, 32, 2, 16), jnp.float16)

    def loss(q, k, v):
        return mmfa_jax.attention(q, k, v, is_causal=True, implementation="pallas").astype(jnp.float32).sum()

    compiled = triton_route.lower_for(jax.grad(loss, argnums=(0, 1, 2)), q, q, q, device_kind=T4)
    assert [k.name for k, *_ in compiled] == ["mmfa_flash_forward", "mmfa_flash_dq", "mmfa_flash_dkv"]
    assert all(k.cc == 75 for k, *_ in compiled)


@needs_triton
def test_stock_route_on_turing_is_left_to_xla():
    """The backend "xla-triton" emits XLA's Triton call even for sm_75 (which XLA then refuses, as
    stock jax)."""
    fn, args = _small_forward(backends.Lowering("xla-triton", 75, "sm75"))
    from jax.sharding import AbstractDevice, AbstractMesh

    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind=T4, num_cores=None, platform="cuda"))
    with triton_route.collect() as kernels, jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert kernels == [] and "__gpu$xla.gpu.triton" in text


# ------------------------------------------------------------------------------------------------
# The cache.


def _lowerable(fn_args):
    """(a new function object, args): jax caches lowerings per function, which would hide the
    route's own cache."""
    fn, args = fn_args
    return (lambda *a: fn(*a)), *args


@needs_triton
def test_cache_in_memory_then_on_disk(tmp_path):
    before = dict(triton_route.STATS)
    [(first, *_)] = triton_route.lower_for(*_lowerable(_small_forward()), device_kind=T4)
    assert triton_route.STATS["compiled"] == before["compiled"] + 1
    [(again, *_)] = triton_route.lower_for(*_lowerable(_small_forward()), device_kind=T4)
    assert again is first and triton_route.STATS["memory_hits"] == before["memory_hits"] + 1
    files = list((tmp_path / "cache" / "triton").glob("*/*.json"))
    assert [f.stem for f in files] == [first.key]
    triton_route.clear_memory_cache()  # a new process, as far as the cache can tell
    [(from_disk, *_)] = triton_route.lower_for(*_lowerable(_small_forward()), device_kind=T4)
    assert triton_route.STATS["compiled"] == before["compiled"] + 1
    assert triton_route.STATS["disk_hits"] == before["disk_hits"] + 1
    assert from_disk == first
    record = json.loads(files[0].read_text())
    assert record["cc"] == 75 and record["triton_version"] == triton_route.triton_version()


@needs_triton
def test_cache_key_tells_kernels_apart():
    keys = set()
    for dtype in (jnp.float16, jnp.float32):
        for cfg in (tuning.KernelConfig(16, 16, 4, 1), tuning.KernelConfig(16, 16, 2, 1), tuning.KernelConfig(16, 32, 4, 1)):
            fn, args = _small_forward(dtype=dtype, cfg=cfg)
            [(kernel, *_)] = triton_route.lower_for(fn, *args, device_kind=T4)
            keys.add(kernel.key)
    assert len(keys) == 6
    k = triton_route.cache_key("ir", 75, 4, 1, "3.6.0")
    assert len({k, triton_route.cache_key("ir", 80, 4, 1, "3.6.0"), triton_route.cache_key("ir", 75, 4, 1, "3.8.0"),
                triton_route.cache_key("ir", 75, 4, 2, "3.6.0"), triton_route.cache_key("ir ", 75, 4, 1, "3.6.0")}) == 5


def test_unreadable_cache_entry_is_recompiled_not_fatal(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    assert triton_route._read(path) is None
    assert triton_route._read(tmp_path / "absent.json") is None


# ------------------------------------------------------------------------------------------------
# Errors that say what to do.


def test_missing_triton_says_what_to_install(monkeypatch):
    monkeypatch.setattr(triton_route, "triton_version", lambda: None)
    triton_route._triton.cache_clear()
    try:
        with pytest.raises(triton_route.RouteError, match="pip install triton"):
            triton_route.check_available()
        assert not triton_route.available()
    finally:
        triton_route._triton.cache_clear()


def test_old_triton_says_to_upgrade(monkeypatch):
    monkeypatch.setattr(triton_route, "triton_version", lambda: "2.1.0")
    triton_route._triton.cache_clear()
    try:
        with pytest.raises(triton_route.RouteError, match=r"needs triton >= 3\.2, found 2\.1\.0"):
            triton_route.check_available()
    finally:
        triton_route._triton.cache_clear()


@needs_triton
def test_unparseable_ir_is_named_and_kept(tmp_path):
    with pytest.raises(triton_route.RouteError, match="cannot parse the Triton IR") as e:
        triton_route.compile_ttir("module { this is not triton ir }", 75, 4, 1, label="a test kernel")
    assert "a test kernel" in str(e.value)
    kept = list((tmp_path / "cache" / "triton" / "failed").glob("*.ttir"))
    assert len(kept) == 1 and str(kept[0]) in str(e.value)


def test_shared_memory_over_the_limit_names_the_config():
    kernel = triton_route.CompiledKernel("k", 75, 4, 2, 96 * 1024, "", b"", 0, 1, "3.6.0", "key")
    with pytest.raises(triton_route.RouteError, match=r"needs 98304 bytes .* sm_75 allows 65536 \(64 KiB\).*"
                                                      r"smaller block_q/block_k"):
        triton_route.check_fits(kernel, 75, "block_q=128, block_k=128")
    triton_route.check_fits(kernel, 80)  # Ampere has room


@needs_triton
def test_config_too_large_for_turing_fails_at_lowering_with_advice(monkeypatch):
    """The check runs at lowering, on what Triton reports (a lowered limit keeps the compile small;
    the table tests show real configurations over 64 KiB being caught the same way)."""
    monkeypatch.setitem(triton_route.SHARED_MEMORY_PER_BLOCK, 75, 1024)
    fn, args = _small_forward(cfg=tuning.KernelConfig(16, 32, 4, 1))
    with pytest.raises(triton_route.RouteError, match=r"block_q=16, block_k=32.*needs \d+ bytes.*sm_75 allows 1024"):
        triton_route.lower_for(fn, *args, device_kind=T4)


def test_launch_without_cuda_plugin_says_so():
    if triton_route._gpu_triton() is not None:
        pytest.skip("jaxlib's CUDA plugin is loaded here")
    with pytest.raises(triton_route.RouteError, match="CUDA plugin"):
        triton_route._emit(None, (), None, "", (1, 1, 1), 75, (), placeholder=False)


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="checks the CPU-only message")
def test_triton_implementation_needs_a_gpu():
    q = jnp.ones((1, 16, 2, 16), jnp.float16)
    with pytest.raises(ValueError, match=r"implementation='triton' needs an NVIDIA GPU with compute capability >= 7\.5"):
        mmfa_jax.attention(q, q, q, implementation="triton")
    assert not mmfa_jax.pallas_available()


def test_torch_triton_implementation_needs_cuda_tensors():
    torch = pytest.importorskip("torch")
    import mmfa_torch

    q = torch.ones(1, 2, 16, 16)
    with pytest.raises(ValueError, match="implementation='triton' needs an NVIDIA GPU"):
        mmfa_torch.scaled_dot_product_attention(q, q, q, implementation="triton")


# ------------------------------------------------------------------------------------------------
# On a GPU (--gpu): the route forced, and the sm_75 code run on the GPU at hand.


def _attention_case(rng, dtype, B=2, T=200, N=4, K=2, H=64):
    q, q64 = normal(rng, (B, T, N, H), dtype)
    k, k64 = normal(rng, (B, T, K, H), dtype)
    v, v64 = normal(rng, (B, T, K, H), dtype)
    do, do64 = normal(rng, (B, T, N, H), dtype)
    return (q, k, v, do), (q64, k64, v64, do64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_gpu_triton_route_matches_reference(rng, dtype):
    (q, k, v, do), (q64, k64, v64, do64) = _attention_case(rng, dtype)

    def loss(q, k, v):
        out = mmfa_jax.attention(q, k, v, is_causal=True, implementation="triton")
        return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    ref_out, _ = attention_reference(q64, k64, v64, is_causal=True)
    ref_grads = attention_reference_grads(q64, k64, v64, do64, is_causal=True)[:3]
    assert_close(out, ref_out, tolerance(dtype), "out")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close(g, r, tolerance(dtype, grad=True), f"d{name}")


@pytest.mark.gpu
def test_gpu_triton_route_is_what_runs():
    q = jnp.ones((1, 128, 2, 64), jnp.float16)
    text = jax.jit(lambda q: mmfa_jax.attention(q, q, q, implementation="triton")).lower(q).as_text()
    assert "triton_kernel_call_ffi" in text and "__gpu$xla.gpu.triton" not in text
    if not os.environ.get("MMFA_ROUTE") and not os.environ.get("MMFA_TRITON_ARCH"):
        text = jax.jit(lambda q: mmfa_jax.attention(q, q, q, implementation="pallas")).lower(q).as_text()
        assert "__gpu$xla.gpu.triton" in text and "triton_kernel_call_ffi" not in text


@pytest.mark.gpu
def test_gpu_torch_face_takes_the_route():
    torch = pytest.importorskip("torch")
    import mmfa_torch

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_(True)
    out = mmfa_torch.scaled_dot_product_attention(q, k, v, is_causal=True, implementation="triton")
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(out.float(), want, atol=3e-3, rtol=3e-3)
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


_SUBPROCESS = textwrap.dedent("""
    import json, sys, numpy as np, jax, jax.numpy as jnp
    sys.path.insert(0, "tests")
    import mmfa_jax
    from mmfa_jax import triton_route
    from reference import attention_reference, attention_reference_grads
    rng = np.random.default_rng(0)
    errors = {}
    for dtype in ("float16", "bfloat16", "float32"):
        q, k, v, do = (jnp.asarray(rng.standard_normal(s), dtype) for s in
                       [(2, 300, 4, 64), (2, 300, 2, 64), (2, 300, 2, 64), (2, 300, 4, 64)])
        f64 = [np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v, do)]
        def loss(q, k, v):
            out = mmfa_jax.attention(q, k, v, is_causal=True)
            return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)), out
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        ref_out = attention_reference(*f64[:3], is_causal=True)[0]
        ref_grads = attention_reference_grads(*f64, is_causal=True)[:3]
        errs = [float(np.abs(np.asarray(a.astype(jnp.float32)) - r).max() / np.abs(r).max())
                for a, r in zip((out, *grads), (ref_out, *ref_grads))]
        errors[dtype] = errs
    print(json.dumps({"errors": errors, "stats": triton_route.STATS}))
""")


@pytest.mark.gpu
def test_gpu_runs_the_sm75_code_and_caches_it_on_disk(tmp_path):
    """MMFA_TRITON_ARCH=75: the kernels are compiled for sm_75 with the Turing tiles (the code a
    T4 gets: FMA dots, 64 KiB), then run on this GPU. A second process finds them on disk."""
    env = dict(os.environ, MMFA_TRITON_ARCH="75", MMFA_CACHE_DIR=str(tmp_path / "cache"),
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", _SUBPROCESS], capture_output=True, text=True, env=env, cwd=root)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for dtype, errs in runs[0]["errors"].items():
        limit = tolerance(dtype, grad=True)
        assert max(errs) <= limit, f"{dtype}: relative errors (out, dq, dk, dv) {errs} over {limit}"
    assert runs[0]["stats"]["compiled"] > 0
    assert runs[1]["stats"]["compiled"] == 0 and runs[1]["stats"]["disk_hits"] > 0
