"""Shared test machinery: the --gpu switch, implementations, random data, tolerances, comparisons.

Tests that take an ``impl`` argument are parametrised over the implementations: "interpret" (the
Pallas kernels in the interpreter: what exercises the kernels on CPU) and "xla" always, and
"pallas" (compiled for the GPU) when pytest runs with ``--gpu``; a ``kernel_impl`` argument takes
those that run the Pallas kernels (all but "xla"). Tests marked ``gpu`` are skipped
without ``--gpu``. The tolerances are the same on every implementation.
"""

from __future__ import annotations

import os
import zlib

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# jax's own float32 matmuls (jax.nn and Flax attention, used as second opinions) default to TF32 on
# GPUs, an error of ~1e-3; the kernels' float32 dots are exact, so make the yardsticks exact too.
jax.config.update("jax_default_matmul_precision", "highest")

CPU_IMPLEMENTATIONS = ("interpret", "xla")


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", default=False,
                     help="also run implementation='pallas' and the tests marked gpu (needs an NVIDIA GPU, cc >= 8.0)")
    parser.addoption("--route", choices=("auto", "triton"), default=None,
                     help="how the compiled kernels are launched: 'triton' compiles every kernel with the official "
                          "triton package (mmfa_jax.triton_route; sets MMFA_ROUTE=triton), 'auto' as mmfa decides")


def pytest_configure(config):
    # Fresh data every run, reproducible on demand: one session seed, mixed into every test's seed,
    # set in the environment so that xdist workers (started later) share it.
    os.environ.setdefault("MMFA_TEST_SEED", str(np.random.SeedSequence().entropy % 2**31))
    if config.getoption("--route"):  # in the environment too, for the xdist workers and subprocesses
        os.environ["MMFA_ROUTE"] = config.getoption("--route")
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU with compute capability >= 8.0 (run with --gpu)")


def implementations(config) -> list:
    impls = [pytest.param(i, id=i) for i in CPU_IMPLEMENTATIONS]
    if config.getoption("--gpu"):
        impls.append(pytest.param("pallas", id="pallas", marks=pytest.mark.gpu))
    return impls


def pytest_generate_tests(metafunc):
    if "impl" in metafunc.fixturenames:
        metafunc.parametrize("impl", implementations(metafunc.config))
    if "kernel_impl" in metafunc.fixturenames:  # the implementations that run the Pallas kernels
        metafunc.parametrize("kernel_impl", [p for p in implementations(metafunc.config) if p.values[0] != "xla"])


def pytest_collection_modifyitems(config, items):
    if config.getoption("--gpu"):
        return
    skip = pytest.mark.skip(reason="needs --gpu (an NVIDIA GPU with compute capability >= 8.0)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------------------
# Compiled programs. Each XLA:CPU executable holds a few memory mappings of its JIT code until it is
# freed, and a suite compiles thousands (the interpreter's kernels, hypothesis' shapes). A worker
# that reaches the kernel's limit (vm.max_map_count) segfaults inside the next compile (bench/NOTES.md,
# session 17). So past half the limit the jit caches are dropped between tests (later calls compile
# again).


def _mapping_limit() -> int | None:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None  # not Linux: no such limit to watch


_MAPPING_LIMIT = _mapping_limit()


def pytest_runtest_teardown(item, nextitem):
    if _MAPPING_LIMIT is None:
        return
    with open("/proc/self/maps") as f:
        mappings = sum(1 for _ in f)
    if mappings > _MAPPING_LIMIT // 2:
        import gc

        jax.clear_caches()
        gc.collect()


# ------------------------------------------------------------------------------------------------
# Random data


def seed_of(text: str) -> int:
    return zlib.crc32(text.encode())


def pytest_report_header(config):
    route = os.environ.get("MMFA_ROUTE", "auto")
    return (f"mmfa test data seed: MMFA_TEST_SEED={os.environ['MMFA_TEST_SEED']} (set it to replay a run); "
            f"kernel route: MMFA_ROUTE={route}")


@pytest.fixture
def rng(request):
    """A generator per test: new data each run (session seed), the same for a given MMFA_TEST_SEED."""
    return np.random.default_rng([int(os.environ["MMFA_TEST_SEED"]), seed_of(request.node.nodeid)])


DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def normal(rng, shape, dtype="float32"):
    """Unit normal data as a jax array of ``dtype`` and the same (rounded) values in float64."""
    x = jnp.asarray(rng.standard_normal(shape), dtype=DTYPES[str(dtype)] if isinstance(dtype, str) else dtype)
    return x, np.asarray(x.astype(jnp.float32), dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# Tolerances. Errors are measured relative to max |reference| (over the whole compared array), so
# a single number per dtype fits outputs, LSEs and gradients of unit-scale data alike.
#
# float32: eps = 1.2e-7. The kernels run float32 dots at "highest" precision and accumulate in
#   float32; over at most ~100 keys and head dims <= 256 the observed error is ~1e-6 of max|ref|.
#   2e-5 leaves an order of magnitude of margin yet catches any semantic slip (a logit masked
#   wrongly, a wrong scale, a mis-indexed head shifts results by >= 1e-3).
# float16: eps = 9.8e-4. Inputs are rounded before the reference sees them, so only compute
#   rounding counts: probabilities (and the dS of the backward) are rounded to float16 before the
#   second matmul, and the output is rounded once: about one ulp, ~5e-4..1e-3 of max|ref|. 2e-3.
# bfloat16: eps = 7.8e-3, same reasoning with 8x the rounding: 2e-2.
# Gradients chain two rounded matmuls more (dS is rounded to the input dtype), so low-precision
# gradients get twice the forward tolerance; float32 gradients keep the float32 tolerance x2.
TOLERANCES = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 2e-2}
GRAD_FACTOR = 2.0


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def tolerance(dtype, grad: bool = False) -> float:
    return TOLERANCES[dtype_name(dtype)] * (GRAD_FACTOR if grad else 1.0)


@pytest.fixture
def tol():
    return tolerance


def to_numpy(x) -> np.ndarray:
    """float64 NumPy copy of a jax array or torch tensor (any float dtype)."""
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().double().numpy()
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.float64:
        x = x.astype(jnp.float32)
    return np.asarray(x, dtype=np.float64)


def assert_close(actual, expected, tol: float, what: str = "value", floor: float = 1e-6):
    """Compare against a reference: same shape, no NaN, infinities exactly where the reference
    has them (LSE of rows that see nothing), finite entries within ``tol * max(max|expected|,
    floor)``."""
    a, e = to_numpy(actual), np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != reference shape {e.shape}"
    assert not np.isnan(a).any(), f"{what}: {np.isnan(a).sum()} NaN entries"
    inf_a, inf_e = np.isinf(a), np.isinf(e)
    assert (inf_a == inf_e).all(), (
        f"{what}: infinite entries differ from the reference at {np.argwhere(inf_a != inf_e)[:5].tolist()}")
    assert (a[inf_a] == e[inf_e]).all(), f"{what}: infinities of the wrong sign"
    fin = ~inf_e
    if not fin.any():
        return
    scale = max(float(np.abs(e[fin]).max()), floor)
    err = np.abs(a[fin] - e[fin])
    worst = float(err.max()) / scale
    if worst > tol:
        idx = np.argwhere(fin)[int(np.argmax(err))].tolist()
        raise AssertionError(f"{what}: max error {worst:.3g} of max|ref| ({scale:.3g}) > tol {tol:.3g}, "
                             f"worst at {idx}: got {a[tuple(idx)]!r}, want {e[tuple(idx)]!r}")


@pytest.fixture
def close():
    return assert_close


def assert_finite(x, what="value"):
    a = to_numpy(x)
    assert np.isfinite(a).all(), f"{what}: {(~np.isfinite(a)).sum()} non-finite entries"


def jax_device_is_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def keep_kwargs(keep) -> dict:
    """The pruning functions' keyword for the reference's ``keep``: a ratio (float) or a count (int)."""
    return {"keep_count": keep} if isinstance(keep, (int, np.integer)) else {"keep": keep}


# Torch tensors of the tests live where the implementation runs: CUDA for the compiled kernels
# ("pallas", with --gpu: mmfa_torch's own launch), the CPU otherwise (they cross to jax). Tests read
# DEVICE[0] when they make tensors.
DEVICE = ["cpu"]


@pytest.fixture(autouse=True)
def _torch_device(request):
    impl = request.getfixturevalue("impl") if "impl" in request.fixturenames else "xla"
    DEVICE[0] = "cuda" if impl in ("pallas", "triton") else "cpu"
    yield
    DEVICE[0] = "cpu"
