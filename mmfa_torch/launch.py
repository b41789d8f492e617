"""Direct launch of mmfa's compiled kernels on torch tensors: no JAX dispatch per call.

The DLPack route (mmfa_torch.bridge) costs about a millisecond of host time per call: importing
every tensor into JAX, jit dispatch, exporting the results. That is nothing next to a long prefill
and everything in a decode step. This module launches the very same kernels itself:

1. The first call for a problem (shapes, dtypes, options, GPU) traces the JAX launcher of the
   kernels (``mmfa_jax.kernels.flash_attention``, behind the one argument layer, ``mmfa_jax._checks``) and
   lowers it for an abstract device of the tensors' compute capability with the Triton route
   (mmfa_jax.triton_route), which compiles every Pallas kernel with the official ``triton`` and
   records its cubin and grid. JAX never touches the GPU; the compiled kernels are cached in memory
   and on disk like the route's.
2. Every call then allocates the results with torch and launches the recorded kernels on torch's
   current stream through the CUDA driver API (``cuLaunchKernel``, via ctypes). A kernel's
   parameters are the ``pallas_call``'s operands and results, in order.

What the JAX face computes outside the kernels is small and done here on torch tensors by the very
same functions (``mmfa_jax._autodiff.backward_delta`` and ``reduce_dbias``), besides the boolean
mask as int8 (a view) and broadcasting a bias or mask.

Used by mmfa_torch.ops for CUDA tensors when ``available()``; ``MMFA_TORCH_LAUNCH=jax`` forces the
DLPack route instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import re
import threading
import weakref

import torch

from mmfa_jax import _autodiff, backends, kernels, plans, triton_route
from mmfa_jax._autodiff import prepare
from mmfa_jax._checks import Options

_JAX_DTYPE = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.int32: "int32",
              torch.bool: "bool", torch.int8: "int8"}


class LaunchError(RuntimeError):
    """A kernel could not be loaded or launched through the CUDA driver."""


_local = threading.local()


@contextlib.contextmanager
def through_jax():
    """Within this context (this thread), CUDA tensors cross to JAX through DLPack instead."""
    previous = getattr(_local, "off", False)
    _local.off = True
    try:
        yield
    finally:
        _local.off = previous


def enabled() -> bool:
    """Whether CUDA tensors take this route (not within ``through_jax()``, and ``MMFA_TORCH_LAUNCH``
    is not "jax")."""
    if getattr(_local, "off", False):
        return False
    return backends.settings().torch_launch == "direct"


@functools.cache
def available() -> bool:
    """Whether this route can run here: the official triton (to compile) and the CUDA driver."""
    if not triton_route.available():
        return False
    try:
        _driver()
    except (OSError, LaunchError):
        return False
    return True


# ------------------------------------------------------------------------------------------------
# The CUDA driver, through ctypes: load a cubin (or PTX), launch a function.

_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
_STATIC_SHARED_LIMIT = 48 * 1024  # above this a kernel must opt in to more dynamic shared memory


class _Driver:
    def __init__(self):
        lib = ctypes.CDLL("libcuda.so.1")
        p, u, i = ctypes.c_void_p, ctypes.c_uint, ctypes.c_int
        lib.cuModuleLoadData.argtypes = [ctypes.POINTER(p), ctypes.c_char_p]
        lib.cuModuleGetFunction.argtypes = [ctypes.POINTER(p), p, ctypes.c_char_p]
        lib.cuFuncSetAttribute.argtypes = [p, i, i]
        lib.cuLaunchKernel.argtypes = [p, u, u, u, u, u, u, u, p, ctypes.POINTER(p), ctypes.POINTER(p)]
        lib.cuGetErrorString.argtypes = [i, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(p)]
        self.lib = lib

    def check(self, status: int, what: str):
        if status != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(status, ctypes.byref(text))
            raise LaunchError(f"{what} failed: CUDA error {status} ({(text.value or b'?').decode()})")

    def load(self, kernel: triton_route.CompiledKernel, device_cc: int) -> int:
        """The kernel's CUfunction in the current context (torch's, for the current device)."""
        ctx = ctypes.c_void_p()
        self.check(self.lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            raise LaunchError("no current CUDA context: torch has not initialised CUDA on this thread")
        # The cubin is for the GPU itself; code compiled for an older one (MMFA_TRITON_ARCH) goes as
        # PTX, which the driver compiles forward.
        image = kernel.cubin if kernel.cc == device_cc else kernel.ptx.encode() + b"\0"
        module, function = ctypes.c_void_p(), ctypes.c_void_p()
        self.check(self.lib.cuModuleLoadData(ctypes.byref(module), image), f"loading {kernel.name}")
        self.check(self.lib.cuModuleGetFunction(ctypes.byref(function), module, kernel.name.encode()),
                   f"finding {kernel.name}")
        if kernel.shared > _STATIC_SHARED_LIMIT:
            self.check(self.lib.cuFuncSetAttribute(function, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                   kernel.shared), f"opting {kernel.name} into shared memory")
        return function.value

    def launch(self, function: int, grid, threads: int, shared: int, stream: int, params: _Parameters,
               pointers: list[int], name: str):
        with params.lock:  # the driver copies the values at the launch: the buffer is free again after it
            params.values[:] = pointers
            status = self.lib.cuLaunchKernel(function, grid[0], grid[1], grid[2], threads, 1, 1, shared, stream,
                                             params.addresses, None)
        self.check(status, f"launching {name}")


class _Parameters:
    """A kernel's parameter buffer, made once: the values (device pointers) and, as cuLaunchKernel's
    kernelParams, the address of each value. Building these per call cost several microseconds."""

    def __init__(self, n: int):
        self.values = (ctypes.c_uint64 * n)()
        base = ctypes.addressof(self.values)
        self.addresses = (ctypes.c_void_p * n)(*range(base, base + 8 * n, 8))
        self.lock = threading.Lock()


@functools.cache
def _driver() -> _Driver:
    try:
        return _Driver()
    except (OSError, AttributeError) as e:
        raise LaunchError(f"the CUDA driver library could not be loaded ({e})") from e


def parameter_count(ptx: str, name: str) -> int:
    """How many parameters the kernel ``name`` takes, read from its PTX entry."""
    match = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if match is None:
        raise LaunchError(f"kernel {name} has no entry in its PTX")
    return match.group(1).count(".param")


# ------------------------------------------------------------------------------------------------
# Kernels as recorded, loaded per device.


_TORCH_DTYPE = {name: dtype for dtype, name in _JAX_DTYPE.items()}


@dataclasses.dataclass(frozen=True)
class _Kernel:
    """One compiled kernel and its plan (``mmfa_jax.plans``): launched with its present operands,
    then its results, which it allocates as the lowering recorded them."""

    launch: triton_route.Launch
    plan: plans.KernelPlan
    extra: int  # trailing parameters Triton adds (scratch pointers), passed as null

    @property
    def buffers(self) -> int:
        """Its operands and results: the pointers it takes before Triton's own."""
        return self.launch.operands + len(self.launch.results)

    @functools.cached_property
    def _parameters(self) -> _Parameters:
        return _Parameters(self.buffers + self.extra)

    @functools.cached_property
    def _results(self) -> tuple:
        return tuple((shape, _TORCH_DTYPE[dtype]) for shape, dtype in self.launch.results)

    def run(self, named: dict, device: torch.device) -> dict:
        """Launch on ``named`` tensors (the plan's operand names; None or missing: absent); returns
        the results by the plan's names."""
        operands = self.plan.arguments(named)
        if len(operands) != self.launch.operands:
            raise LaunchError(f"{self.plan.name} was captured with {self.launch.operands} operands, called with "
                              f"{len(operands)}")
        results = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in self._results]
        kernel = self.launch.kernel
        function = _function(kernel.key, device.index, kernel)
        pointers = [t.data_ptr() for t in operands]
        pointers += [t.data_ptr() for t in results]
        if self.extra:
            pointers += [0] * self.extra
        _driver().launch(function, self.launch.grid, 32 * kernel.num_warps, kernel.shared,
                         _current_stream(device.index), self._parameters, pointers, kernel.name)
        return dict(zip(self.plan.results, results))


def _current_stream(device_index: int) -> int:
    """torch's current stream on the device, as a CUstream handle."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what Triton's own launcher reads: fast
    if raw is not None:
        return raw(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


_functions: dict[tuple[str, int], int] = {}
_functions_lock = threading.Lock()


def _function(key: str, device_index: int, kernel: triton_route.CompiledKernel) -> int:
    fn = _functions.get((key, device_index))
    if fn is None:
        with _functions_lock, torch.cuda.device(device_index):
            fn = _functions.get((key, device_index))
            if fn is None:
                fn = _driver().load(kernel, compute_capability(device_index))
                _functions[(key, device_index)] = fn
    return fn


@functools.cache
def compute_capability(device_index: int | None) -> int:
    """The compute capability of a CUDA device as an int (75, 90): the torch face's one probe."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def _structs(signature):
    import jax
    import jax.numpy as jnp

    return [None if s is None else jax.ShapeDtypeStruct(s[0], jnp.dtype(s[1])) for s in signature]


def capture(fn, signature, cc: int, kernel_plans: tuple[plans.KernelPlan, ...]) -> tuple[_Kernel, ...]:
    """Lower ``fn`` (its arrays described by ``signature``: (shape, dtype name), or None for an
    absent one) for compute capability ``cc`` and return its kernels, which must be those of
    ``kernel_plans``, in order."""
    structs = _structs(signature)

    def lowered(*arrays):  # a new function object each time: jax caches lowerings per function
        it = iter(arrays)
        return fn(*[None if s is None else next(it) for s in structs])

    launches = triton_route.lower_for(lowered, *[s for s in structs if s is not None],
                                      device_kind=backends.device_kind_of_cc(cc))
    names = [launch.kernel.name for launch in launches]
    if names != [p.name for p in kernel_plans]:
        raise LaunchError(f"expected the kernels {[p.name for p in kernel_plans]}, the lowering recorded {names}")
    kernels = []
    for launch, plan in zip(launches, kernel_plans):
        k = launch.kernel
        if k.global_scratch_size:
            raise LaunchError(f"kernel {k.name} needs global scratch memory, which this launcher does not provide")
        n = launch.operands + len(launch.results)
        extra = parameter_count(k.ptx, k.name) - n
        if extra < 0:
            raise LaunchError(f"kernel {k.name} takes {n + extra} parameters, fewer than its {n} buffers")
        kernels.append(_Kernel(launch, plan, extra))
    return tuple(kernels)


# ------------------------------------------------------------------------------------------------
# Attention: forward and backward.


def _signature(*tensors) -> tuple:
    return tuple(None if t is None else (tuple(t.shape), _JAX_DTYPE[t.dtype]) for t in tensors)


@functools.lru_cache(maxsize=256)
def _config(opts: Options, head_dim: int, dtype: torch.dtype) -> Options:
    """The options with the block configuration made explicit (the capture retries with fewer
    stages where a kernel does not fit) and the kernels compiled by the official triton, which
    gives the cubins this module launches."""
    opts = dataclasses.replace(opts, lowering=opts.lowering.via_triton_route())
    return dataclasses.replace(opts, config=opts.kernel_config(kernels.padded_head_dim(head_dim), _JAX_DTYPE[dtype]))


def _fitted(build):
    """``build(opts, signature, cc)``, retried with one pipelining stage fewer in every kernel while a
    kernel needs more shared memory than the GPU has. The official Triton can stage a little more
    than XLA's for the same tiles (a dense mask's tile, say), so a table row at the limit may not fit."""

    @functools.lru_cache(maxsize=512)
    def fitted(opts: Options, signature: tuple, cc: int):
        while True:
            try:
                return build(opts, signature, cc)
            except triton_route.SharedMemoryError:
                fewer = opts.config.fewer_stages()
                if fewer is None:
                    raise
                opts = dataclasses.replace(opts, config=fewer)

    return fitted


@_fitted
def _forward_kernels(opts: Options, signature: tuple, cc: int) -> tuple[_Kernel, ...]:
    def fn(q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len):
        segments = None if q_seg is None else (q_seg, kv_seg)
        static, args = prepare(opts, (q, k, v, bias, mask, segments, q_len, kv_len))
        problem, config, lowering = static
        return kernels.forward(problem, config.forward, *args, lowering=lowering)

    return capture(fn, signature, cc, plans.forward(has_mask=signature[4] is not None))


@_fitted
def _backward_kernels(opts: Options, signature: tuple, cc: int) -> tuple[_Kernel, _Kernel]:
    def fn(q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len, do, lse, delta):
        segments = None if q_seg is None else (q_seg, kv_seg)
        static, args = prepare(opts, (q, k, v, bias, mask, segments, q_len, kv_len))
        problem, config, lowering = static
        return kernels.backward(problem, config.backward_dq, config.backward_dkv, *args, do, lse, delta,
                              lowering=lowering)

    return capture(fn, signature, cc, plans.backward())


def _pair(t: torch.Tensor | None, B: int, N: int, T: int, S: int) -> torch.Tensor | None:
    """A bias or mask as the kernels take it: (Bb, Nb, T, S) contiguous, Bb in {1, B}, Nb in {1, N};
    copied only where T or S is broadcast."""
    if t is None:
        return None
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t.expand(t.shape[0], t.shape[1], T, S).contiguous()


def _int8(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels read a boolean mask as int8: the same bytes."""
    return None if mask is None else mask.view(torch.int8)


def _dims(opts: Options, q: torch.Tensor, k: torch.Tensor):
    """(B, N, T, S) of tensors in the options' layout."""
    if opts.layout == "BNTH":
        return q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    return q.shape[0], q.shape[2], q.shape[1], k.shape[1]


def _operands(opts: Options, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len) -> dict:
    """The kernels' operands by their plan names: a bias or mask as (Bb, Nb, T, S), the mask as
    int8 (the same bytes)."""
    B, N, T, S = _dims(opts, q, k)
    return dict(q=q, k=k, v=v, bias=_pair(bias, B, N, T, S), mask=_int8(_pair(mask, B, N, T, S)), q_seg=q_seg,
                kv_seg=kv_seg, q_lengths=q_len, kv_lengths=kv_len)


def forward(opts: Options, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len) -> tuple[torch.Tensor, torch.Tensor]:
    """(out like q, lse (B, N, T) float32) for contiguous CUDA tensors in ``opts.layout``; the
    arguments as ``mmfa_jax._autodiff.forward`` takes them (mask boolean, ids and lengths int32)."""
    named = _operands(opts, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len)
    cc = compute_capability(q.device.index)
    opts = _config(opts, q.shape[3], q.dtype)
    structs = dict(named, mask=None if mask is None else named["mask"].view(torch.bool))
    *ranges_kernel, kernel = _forward_kernels(opts, _signature(*structs.values()), cc)
    if ranges_kernel:
        named["mask_ranges"] = _mask_ranges(mask, named["mask"], *ranges_kernel)
    results = kernel.run(named, q.device)
    return results["out"], results["lse"]


# A model hands one mask tensor to many layers (Gemma 3: one per layer type): its block ranges are
# computed once per tensor and kept while the tensor lives and is not written to. Tensors made in
# torch.inference_mode have no version counter to tell that, so theirs are computed every call.
_ranges_of_mask: dict[int, tuple] = {}


def _mask_ranges(mask: torch.Tensor, mask_int8: torch.Tensor, blocks_kernel: _Kernel, kernel: _Kernel) -> torch.Tensor:
    """(Bm, Nm, query tiles, 4) int32 block ranges of ``mask`` (as the caller passed it; the kernels
    read ``mask_int8``, its (Bm, Nm, T, S) int8 form)."""
    key = (kernel.launch.kernel.key, tuple(mask_int8.shape))
    tracked = not mask.is_inference()
    entry = _ranges_of_mask.get(id(mask)) if tracked else None
    if entry is not None and entry[0]() is mask and entry[1:3] == (mask._version, key):
        return entry[3]
    ranges = kernel.run(blocks_kernel.run(dict(mask=mask_int8), mask.device), mask.device)["mask_ranges"]
    if not tracked:
        return ranges
    ident = id(mask)
    _ranges_of_mask[ident] = (weakref.ref(mask, lambda _: _ranges_of_mask.pop(ident, None)), mask._version, key,
                              ranges)
    return ranges


def backward(opts: Options, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len, out, lse, d_out, d_lse):
    """(dq, dk, dv, dbias (Bb, Nb, T, S) in the bias's dtype, or None), as
    ``mmfa_jax._autodiff.backward``."""
    named = _operands(opts, q, k, v, bias, mask, q_seg, kv_seg, q_len, kv_len)
    named.update(d_out=d_out, lse=lse, delta=_autodiff.backward_delta(out, d_out, d_lse, opts.layout,
                                                                      f32=torch.Tensor.float).contiguous())
    cc = compute_capability(q.device.index)
    structs = dict(named, mask=None if mask is None else named["mask"].view(torch.bool))
    dq_kernel, dkv_kernel = _backward_kernels(_config(opts, q.shape[3], q.dtype), _signature(*structs.values()), cc)
    grads = dq_kernel.run(named, q.device)
    grads.update(dkv_kernel.run(named, k.device))
    dbias = grads.get("dbias")
    if dbias is not None:
        dbias = _autodiff.reduce_dbias(dbias, tuple(named["bias"].shape[:2])).to(bias.dtype)
    return grads["dq"], grads["dk"], grads["dv"], dbias


# ------------------------------------------------------------------------------------------------
# Decode: the split-KV kernels, one compiled pair per bucket of cache lengths.


@functools.lru_cache(maxsize=256)
def _decode_kernels(static, signature: tuple, cc: int) -> tuple[_Kernel, _Kernel]:
    """The partial and merge kernels of a prepared decode call (``mmfa_jax.decode.prepare``, its
    problem compiled for the bucket's capacity), lowered by the Triton route."""
    from mmfa_jax.decode import run

    static = dataclasses.replace(static, lowering=static.lowering.via_triton_route())

    def fn(q, k, v, kv_lengths, key_mask):
        return run(static, q, k, v, kv_lengths, key_mask)

    return capture(fn, signature, cc, plans.decode())


_seq_lens: dict[tuple[int, int], torch.Tensor] = {}


def _seq_len(S: int, device: torch.device) -> torch.Tensor:
    """The runtime cache length as the (1,) int32 device tensor the partial kernel reads; made once
    per length and device for eager calls (no fill per call; a graph captured by hand, as
    bench/decode.py --graphs does, replays it as it is)."""
    key = (S, device.index)
    t = _seq_lens.get(key)
    if t is None:
        if len(_seq_lens) > 4096:
            _seq_lens.clear()
        t = _seq_lens[key] = torch.full((1,), S, dtype=torch.int32, device=device)
    return t


def decode_kernels(static, q_shape, q_dtype, kv_shape, kv_dtype, lengths_shape, mask_shape,
                   device_index: int | None) -> tuple[_Kernel, _Kernel]:
    """The compiled pair of a prepared decode call (``mmfa_jax.decode.prepare`` for a capacity: the
    K/V shape ``kv_shape`` holds it, and the key mask's shape ``mask_shape``), for the compute
    capability of the device."""
    signature = ((q_shape, _JAX_DTYPE[q_dtype]), (kv_shape, _JAX_DTYPE[kv_dtype]), (kv_shape, _JAX_DTYPE[kv_dtype]),
                 None if lengths_shape is None else (lengths_shape, "int32"),
                 None if mask_shape is None else (mask_shape, "bool"))
    return _decode_kernels(static, signature, compute_capability(device_index))


def run_decode(kernels, q, k, v, S: int, kv_lengths, key_mask=None, *,
               in_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, T, D) like q, lse (B, Hq, T) float32) of contiguous CUDA tensors in torch's
    layout, q (B, Hq, T, D), k / v (B, Hkv, S, D), kv_lengths (B,) int32 or None, key_mask (B, S)
    bool or None, by the pair of ``decode_kernels`` compiled for a capacity >= S: the kernels read
    the cache (and the mask, whose bytes are the int8 the kernel reads) through its runtime length
    S, so the same pair serves every S of the bucket, on the tensors as they are. ``in_graph``: run
    by a compiled graph (torch.compile, maybe CUDA graphs): the length tensor is made afresh (a
    captured fill) instead of kept, since a graph's memory pool must not hold tensors alive."""
    partial_kernel, merge_kernel = kernels
    seq_len = torch.full((1,), S, dtype=torch.int32, device=q.device) if in_graph else _seq_len(S, q.device)
    parts = partial_kernel.run(dict(q=q, k=k, v=v, seq_len=seq_len, kv_lengths=kv_lengths, key_mask=key_mask),
                               q.device)
    result = merge_kernel.run(parts, q.device)
    B, Hq, T, D = q.shape
    return result["out"].view(B, Hq, T, D), result["lse"].view(B, Hq, T)
