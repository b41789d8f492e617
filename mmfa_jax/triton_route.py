"""The second launch route for mmfa's Pallas kernels: the official Triton compiler.

Stock jax hands a Pallas-Triton kernel to XLA, which compiles it with its own Triton and refuses
GPUs below compute capability 8.0. This route takes the very same kernel, lowered by jax's Pallas
lowering to Triton IR (TTIR), compiles that IR with the official ``triton`` package, and launches
the result through jaxlib's Triton kernel call (the FFI target ``triton_kernel_call_ffi``, what
jax-triton uses). So the kernels run on Turing (sm_75: T4, RTX 20xx, Quadro RTX) too.

Which kernels take this route is decided once per call by ``mmfa_jax.backends.resolve`` (the
backend "triton-route": ``implementation="triton"``, "pallas" on Turing, or ``MMFA_ROUTE=triton``).
Every mmfa kernel builds its ``pallas_call`` with ``compiler_params(cfg, lowering)``, a
``RouteParams``: jax's Triton ``CompilerParams`` plus the resolved backend and the compute
capability to compile for. Pallas looks up the lowering rule by the params' class; ours only obeys
the backend the params carry ("xla-triton": jax's stock lowering; "triton-route": this route).

Compiled kernels are cached in memory and on disk (``$MMFA_CACHE_DIR/triton``, default
``~/.cache/mmfa/triton``), keyed by the hash of the kernel's Triton IR (which spells out the
kernel, its shapes, dtypes and block sizes), num_warps, num_stages, the target compute capability
and the Triton version: a new process does not recompile.

``MMFA_TRITON_ARCH=75`` (testing knob, read by ``mmfa_jax.backends.settings``) compiles for that
compute capability instead of the device's and also selects that family's block configurations:
the sm_75 code, FMA dots and Turing tiles, then runs on a newer GPU (its PTX is compiled forward by
jaxlib), which is how the Turing code is checked on Hopper.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import tempfile
import threading
import typing
import zlib
from pathlib import Path

from jax.experimental.pallas import triton as plgpu

from mmfa_jax import backends

STOCK_MIN_CC = backends.STOCK_MIN_CC
MIN_CC = backends.ROUTE_MIN_CC
MIN_TRITON = (3, 2)
CACHE_FORMAT = 1  # bump when the cached record changes meaning

# Most shared memory one block may use (opt-in maximum), bytes, by compute capability.
SHARED_MEMORY_PER_BLOCK = {
    75: 64 * 1024,
    80: 163 * 1024, 87: 163 * 1024,
    86: 99 * 1024, 89: 99 * 1024, 120: 99 * 1024, 121: 99 * 1024,
    90: 227 * 1024, 100: 227 * 1024, 103: 227 * 1024, 110: 227 * 1024,
}


class RouteError(RuntimeError):
    """The Triton route cannot compile or launch a kernel; the message says what to change."""


class SharedMemoryError(RouteError):
    """A kernel as configured needs more shared memory per block than the GPU has."""


@dataclasses.dataclass(frozen=True)
class RouteParams(plgpu.CompilerParams):
    """jax's Triton compiler parameters plus the backend resolved for the call ("xla-triton" or
    "triton-route"), the compute capability to compile for, and, for messages, the block
    configuration that the kernel was built with."""

    backend: str = "xla-triton"
    compile_cc: int | None = None
    config: str = ""


def compiler_params(cfg, lowering) -> RouteParams:
    """The ``compiler_params`` of a kernel built from the ``tuning.KernelConfig`` ``cfg`` for the
    ``backends.Lowering`` ``lowering`` (use ``lowering.pallas_args(cfg)``)."""
    return RouteParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages, backend=lowering.backend,
                       compile_cc=lowering.cc,
                       config=f"block_q={cfg.block_q}, block_k={cfg.block_k}, num_warps={cfg.num_warps}, "
                              f"num_stages={cfg.num_stages}")


# ------------------------------------------------------------------------------------------------
# The installed triton.


def triton_version() -> str | None:
    """The installed ``triton`` package's version, or None (without importing it)."""
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


@functools.cache
def _triton():
    """(triton module, GPUTarget, make_backend, ir, Language or None), or RouteError."""
    version = triton_version()
    if version is None:
        raise RouteError(
            "the Triton route (GPUs below compute capability 8.0, or implementation='triton') needs the official "
            "`triton` package, which is not installed: `pip install triton` (it also comes with PyTorch on Linux: "
            "`pip install torch`, or mmfa's extra `pip install 'mmfa[torch]'`)")
    if _version_tuple(version) < MIN_TRITON:
        raise RouteError(f"the Triton route needs triton >= {'.'.join(map(str, MIN_TRITON))}, found {version}: "
                         "`pip install -U triton`")
    try:
        import triton
        from triton._C.libtriton import ir
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
    except Exception as e:  # a broken install, or an API this module does not know
        raise RouteError(f"triton {version} is installed but its compiler API could not be loaded ({e!r}); "
                         "reinstall it (`pip install --force-reinstall triton`) or use a version from 3.2 on") from e
    try:
        from triton.backends.compiler import Language
    except ImportError:  # older triton: add_stages takes no language
        Language = None
    return triton, GPUTarget, make_backend, ir, Language


def check_available():
    """RouteError, saying what to install, unless the route can compile here."""
    _triton()


def available() -> bool:
    """Whether the route can compile here (an importable, recent enough ``triton``)."""
    try:
        _triton()
        return True
    except RouteError:
        return False


# ------------------------------------------------------------------------------------------------
# Compilation and its cache.


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    """One kernel compiled by Triton for one compute capability."""

    name: str
    cc: int
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory per block
    ptx: str
    cubin: bytes
    global_scratch_size: int
    global_scratch_align: int
    triton_version: str
    key: str

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["cubin"] = base64.b64encode(self.cubin).decode()
        return json.dumps({"format": CACHE_FORMAT, **d})

    @classmethod
    def from_json(cls, text: str) -> "CompiledKernel":
        d = json.loads(text)
        if d.pop("format", None) != CACHE_FORMAT:
            raise ValueError("old cache format")
        d["cubin"] = base64.b64decode(d["cubin"])
        return cls(**d)


_memory: dict[str, CompiledKernel] = {}
_lock = threading.Lock()
STATS = {"compiled": 0, "memory_hits": 0, "disk_hits": 0, "launches_lowered": 0}


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$MMFA_CACHE_DIR/triton``, default ``~/.cache/mmfa/triton``."""
    return Path(backends.settings().cache_dir) / "triton"


def cache_key(ttir: str, cc: int, num_warps: int, num_stages: int, version: str) -> str:
    text = json.dumps([CACHE_FORMAT, hashlib.sha256(ttir.encode()).hexdigest(), cc, num_warps, num_stages, version])
    return hashlib.sha256(text.encode()).hexdigest()


def clear_memory_cache():
    with _lock:
        _memory.clear()


def compile_ttir(ttir: str, cc: int, num_warps: int, num_stages: int, *, label: str = "") -> CompiledKernel:
    """Compile Triton IR text for ``sm_<cc>``; served from memory or disk when seen before."""
    version = triton_version() or "none"
    key = cache_key(ttir, cc, num_warps, num_stages, version)
    with _lock:
        hit = _memory.get(key)
    if hit is not None:
        STATS["memory_hits"] += 1
        return hit
    path = cache_dir() / key[:2] / f"{key}.json"
    kernel = _read(path)
    if kernel is not None:
        STATS["disk_hits"] += 1
    else:
        kernel = _compile(ttir, cc, num_warps, num_stages, key, label)
        STATS["compiled"] += 1
        _write(path, kernel)
    with _lock:
        _memory[key] = kernel
    return kernel


def _read(path: Path) -> CompiledKernel | None:
    try:
        return CompiledKernel.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError):  # absent, unreadable or stale: compile again
        return None


def _write(path: Path, kernel: CompiledKernel):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(kernel.to_json())
        os.replace(tmp, path)  # atomic: concurrent processes never see half a record
    except OSError:  # a read-only home is no reason to fail; the memory cache still works
        pass


def _compile(ttir: str, cc: int, num_warps: int, num_stages: int, key: str, label: str) -> CompiledKernel:
    triton, GPUTarget, make_backend, ir, Language = _triton()
    target = GPUTarget("cuda", cc, 32)
    try:
        backend = make_backend(target)
    except Exception as e:
        raise RouteError(f"triton {triton.__version__} has no CUDA backend for sm_{cc} ({e})") from e
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages, "num_ctas": 1})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    with tempfile.TemporaryDirectory(prefix="mmfa_ttir_") as tmp:
        src = Path(tmp) / "kernel.ttir"
        src.write_text(ttir)
        try:
            module = ir.parse_mlir_module(str(src), context)
        except Exception as e:
            kept = _keep_failed(ttir, key)
            raise RouteError(
                f"triton {triton.__version__} cannot parse the Triton IR that jax {_jax_version()} produced"
                f"{_for(label)} ({e}). The Triton dialect of jax's Pallas lowering and of the installed triton "
                f"differ: install a triton release close to the one jax was built against (checked: jax 0.11.2 "
                f"with triton 3.6 and 3.8), or, on a GPU of compute capability >= 8.0, use "
                f"implementation='pallas'. The IR is kept at {kept}") from e
    module.context = context
    stages: dict = {}
    if Language is not None:
        backend.add_stages(stages, options, Language.TRITON)
    else:
        backend.add_stages(stages, options)
    # Unlike triton.compile on an IR file, run the TTIR stage too: its passes (inlining,
    # canonicalisation, combining) are what a kernel written in Triton's Python gets.
    metadata = {"hash": key, "target": target, **options.__dict__, "triton_version": triton.__version__}
    outputs = {}
    for stage, run in stages.items():
        try:
            module = run(module, metadata)
        except Exception as e:
            kept = _keep_failed(ttir, key)
            raise RouteError(f"triton {triton.__version__} failed in its '{stage}' stage for sm_{cc}{_for(label)}: "
                             f"{e}. The IR is kept at {kept}") from e
        outputs[stage] = module
    if "cubin" not in outputs or "ptx" not in outputs:
        raise RouteError(f"triton {triton.__version__} produced no PTX/cubin for sm_{cc} (stages: {list(outputs)})")
    return CompiledKernel(
        name=metadata["name"], cc=cc, num_warps=num_warps, num_stages=num_stages, shared=int(metadata["shared"]),
        ptx=outputs["ptx"], cubin=bytes(outputs["cubin"]),
        global_scratch_size=int(metadata.get("global_scratch_size") or 0),
        global_scratch_align=int(metadata.get("global_scratch_align") or 1),
        triton_version=triton.__version__, key=key)


def _keep_failed(ttir: str, key: str) -> str:
    try:
        path = cache_dir() / "failed" / f"{key}.ttir"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(ttir)
        return str(path)
    except OSError:
        return "(not kept: the cache directory is not writable)"


def _for(label: str) -> str:
    return f" for {label}" if label else ""


def _jax_version() -> str:
    import jax

    return jax.__version__


def check_fits(kernel: CompiledKernel, device_cc: int, label: str = ""):
    """RouteError when the kernel needs more shared memory per block than the GPU has."""
    limit = shared_memory_limit(device_cc)
    if kernel.shared > limit:
        raise SharedMemoryError(
            f"kernel {kernel.name}{_for(label)} needs {kernel.shared} bytes ({kernel.shared / 1024:.0f} KiB) of shared "
            f"memory per block as compiled for sm_{kernel.cc}, but sm_{device_cc} allows {limit} ({limit // 1024} KiB): "
            "choose a smaller configuration (smaller block_q/block_k or fewer num_stages; pass config=... or see the "
            "rows of mmfa_jax.tuning.TABLE)")


def shared_memory_limit(cc: int) -> int:
    if cc in SHARED_MEMORY_PER_BLOCK:
        return SHARED_MEMORY_PER_BLOCK[cc]
    older = [c for c in SHARED_MEMORY_PER_BLOCK if c <= cc]
    return SHARED_MEMORY_PER_BLOCK[max(older)] if older else 48 * 1024


# ------------------------------------------------------------------------------------------------
# Cross-compilation: lower for a GPU that is not there, keep what was compiled.

_collecting = threading.local()

class Launch(typing.NamedTuple):
    """One kernel as the route compiled it for a lowered pallas_call: the kernel, the label of its
    block configuration, its grid (x, y, z), how many operands it takes and its results' (shape,
    dtype name). Its parameters are the call's operands, then its results, in order (then whatever
    scratch pointers the Triton version adds); ``mmfa_jax.plans`` names them."""

    kernel: CompiledKernel
    label: str
    grid: tuple[int, int, int]
    operands: int
    results: tuple[tuple[tuple[int, ...], str], ...]


@contextlib.contextmanager
def collect():
    """Within this context, kernels taking the route are compiled and recorded, and lowering
    succeeds without jaxlib's CUDA plugin (the emitted call is a placeholder that cannot run).
    Yields the list of ``Launch`` records (kernel, label, grid), in lowering order. For checks on
    machines without a GPU, and for launchers of their own (mmfa_torch.launch)."""
    previous = getattr(_collecting, "kernels", None)
    kernels: list = []
    _collecting.kernels = kernels
    try:
        yield kernels
    finally:
        _collecting.kernels = previous


def lower_for(fn, *args, device_kind: str = "Tesla T4"):
    """Lower ``jax.jit(fn)(*args)`` (args may be ShapeDtypeStructs) for an abstract CUDA device
    (jax knows "Tesla T4" as sm_75, "NVIDIA A100" as sm_80, "NVIDIA H100" as sm_90) and return
    the kernels that took the route, as ``Launch`` records (kernel, config label, grid)."""
    import jax
    from jax.sharding import AbstractDevice, AbstractMesh

    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind=device_kind, num_cores=None,
                                                                     platform="cuda"))
    with collect() as kernels, jax.sharding.use_abstract_mesh(mesh):
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return kernels


# ------------------------------------------------------------------------------------------------
# The lowering rule.


def _device_cc() -> int:
    """The compute capability of the GPU being lowered for (``backends.current_target``: the one probe)."""
    try:
        cc = backends.current_target().cc
    except ValueError as e:
        raise RouteError(f"cannot tell the compute capability of the GPU being lowered for ({e})") from e
    if cc is None:
        raise RouteError("the Triton route lowers for an NVIDIA GPU, but the device being lowered for is not one")
    return cc


def _lower(ctx, *in_nodes, jaxpr, grid_mapping, compiler_params, input_output_aliases, **params):
    from jax._src.pallas.triton import pallas_call_registration as stock

    if compiler_params.backend != "triton-route":
        plain = plgpu.CompilerParams(num_warps=compiler_params.num_warps, num_stages=compiler_params.num_stages)
        return stock.pallas_call_lowering(ctx, *in_nodes, jaxpr=jaxpr, grid_mapping=grid_mapping,
                                          compiler_params=plain, input_output_aliases=input_output_aliases,
                                          **params)
    from jax._src.pallas.triton import lowering

    device_cc = _device_cc()
    [platform] = ctx.platforms or ctx.module_context.platforms
    if platform != "cuda":
        raise RouteError(f"the Triton route is for NVIDIA GPUs (cuda), not {platform}")
    if device_cc < MIN_CC:
        raise RouteError(f"the GPU has compute capability {device_cc / 10:.1f}; mmfa's kernels need 7.5 or newer "
                         "(use implementation='xla')")
    compile_cc = compiler_params.compile_cc or device_cc
    if compile_cc > device_cc:
        raise RouteError(f"MMFA_TRITON_ARCH={compile_cc} is newer than the GPU (sm_{device_cc}): code for it cannot run")
    num_warps = 4 if compiler_params.num_warps is None else compiler_params.num_warps
    num_stages = 3 if compiler_params.num_stages is None else compiler_params.num_stages
    label = compiler_params.config
    result = lowering.lower_jaxpr_to_triton_module(jaxpr, grid_mapping, platform, compile_cc,
                                                   mlir_ctx=ctx.module_context)
    ttir = result.module.operation.get_asm(enable_debug_info=False)
    kernel = compile_ttir(ttir, compile_cc, num_warps, num_stages, label=label)
    check_fits(kernel, compile_cc, label)  # under MMFA_TRITON_ARCH: the emulated GPU's limit
    grid = stock.normalize_grid(result.grid)
    collected = getattr(_collecting, "kernels", None)
    if collected is not None:
        collected.append(Launch(kernel, label, tuple(int(g) for g in grid), len(ctx.avals_in),
                                tuple((tuple(a.shape), str(a.dtype)) for a in ctx.avals_out)))
    return _emit(ctx, in_nodes, kernel, ttir, grid, device_cc, input_output_aliases, placeholder=collected is not None)


def _gpu_triton():
    try:
        from jax._src.lib import gpu_triton
    except ImportError:
        return None
    return gpu_triton if hasattr(gpu_triton, "TritonKernelCall") else None


def _emit(ctx, in_nodes, kernel: CompiledKernel, ttir: str, grid, device_cc: int, input_output_aliases, *,
          placeholder: bool):
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir

    gpu_triton = _gpu_triton()
    if gpu_triton is None and not placeholder:
        raise RouteError("launching a kernel compiled by the Triton route needs jaxlib's CUDA plugin, which is "
                         "not loaded: install jax for CUDA (`pip install 'jax[cuda13]'` or 'jax[cuda12]')")
    layouts_in = [list(reversed(range(a.ndim))) for a in ctx.avals_in]
    layouts_out = [list(reversed(range(a.ndim))) for a in ctx.avals_out]
    result_types = [ir.RankedTensorType.get(a.shape, mlir.dtype_to_ir_type(a.dtype)) for a in ctx.avals_out]
    if gpu_triton is None:
        return mlir.custom_call(
            "mmfa_cross_compiled_triton_kernel", result_types=result_types, operands=list(in_nodes),
            backend_config=kernel.name, operand_layouts=layouts_in, result_layouts=layouts_out).results
    # jaxlib compiles the PTX for the GPU it runs on (a newer GPU takes older PTX).
    args = (kernel.name, kernel.num_warps, 1, kernel.shared, kernel.ptx, ttir, device_cc)
    if kernel.global_scratch_size:
        try:
            tk = gpu_triton.TritonKernel(*args, kernel.global_scratch_size, kernel.global_scratch_align)
        except TypeError:
            raise RouteError(f"kernel {kernel.name} needs {kernel.global_scratch_size} bytes of global scratch memory, "
                             "which this jaxlib's Triton kernel call cannot provide: upgrade jaxlib") from None
    else:
        tk = gpu_triton.TritonKernel(*args)
    n_buffers = len(ctx.avals_in) + len(ctx.avals_out)
    call = gpu_triton.TritonKernelCall(tk, *grid, [gpu_triton.create_array_parameter(0, 16)] * n_buffers)
    opaque = zlib.compress(call.to_proto(kernel.name, b""))
    STATS["launches_lowered"] += 1
    return mlir.custom_call(
        "triton_kernel_call_ffi", result_types=result_types, operands=list(in_nodes), api_version=4,
        backend_config=dict(opaque=ir.StringAttr.get(opaque)), operand_layouts=layouts_in,
        result_layouts=layouts_out, operand_output_aliases=dict(input_output_aliases)).results


def _register():
    from jax._src.pallas import core as pallas_core

    pallas_core.register_lowering_rule(RouteParams, _lower, "gpu")


_register()
