"""The one registry of backends: which implementation runs a call, decided once, in one place.

Users name an *implementation* (``implementation=`` in both faces):

  "pallas"     mmfa's Pallas kernels compiled for the GPU: by XLA's Triton on compute capability
               >= 8.0, by the official ``triton`` package on Turing (7.5)
  "triton"     the same kernels, always compiled by the official ``triton`` package
  "interpret"  the same kernels in the Pallas interpreter (any platform; slow; how CI tests them)
  "xla"        plain jax ops, quadratic memory (any platform)
  None         "pallas" where it can run, else "xla"

``resolve`` turns that name and the *target* (the device being lowered for) into a ``Lowering``:
one of the four backends below, with the compute capability and tuning family it compiles for.
Every kernel launcher takes the ``Lowering`` and gets its ``pallas_call`` arguments from it
(``Lowering.pallas_args``); the lowering rule of the Triton route reads the backend the params
carry and decides nothing itself.

  backend        runs on                               compiled by
  xla-triton     NVIDIA GPUs, compute capability >= 8.0   XLA's own Triton (stock jax)
  triton-route   NVIDIA GPUs, compute capability >= 7.5   the official ``triton`` (mmfa_jax.triton_route)
  interpret      anywhere                               nothing: the Pallas interpreter
  xla            anywhere                               XLA (no Pallas kernels)

The target is the device being lowered for, found by ``current_target``: the abstract device of
``jax.sharding.use_abstract_mesh`` when one is active (cross-lowering for a GPU that is not there),
else JAX's default device. The torch face passes its tensors' device (``Target.cuda(cc)``).

``settings`` is the one reader of the ``MMFA_*`` environment variables.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

IMPLEMENTATIONS = ("pallas", "triton", "interpret", "xla")
Implementation = Literal["pallas", "triton", "interpret", "xla"]

STOCK_MIN_CC = 80  # XLA's Triton refuses anything older
ROUTE_MIN_CC = 75  # what the Triton route is built and checked for (Turing)


@dataclasses.dataclass(frozen=True)
class Backend:
    """One way of running mmfa's attention: where it runs and what compiles it."""

    name: str
    kernels: bool  # runs mmfa's Pallas kernels (False: plain XLA ops)
    compiled: bool  # compiled for a GPU
    min_cc: int | None  # the oldest NVIDIA compute capability it runs on; None: any platform
    summary: str


BACKENDS = {b.name: b for b in (
    Backend("xla-triton", True, True, STOCK_MIN_CC, "Pallas kernels compiled by XLA's Triton (stock jax)"),
    Backend("triton-route", True, True, ROUTE_MIN_CC,
            "Pallas kernels compiled by the official triton package (mmfa_jax.triton_route)"),
    Backend("interpret", True, False, None, "Pallas kernels in the Pallas interpreter"),
    Backend("xla", False, False, None, "plain XLA ops (quadratic memory)"),
)}


# ------------------------------------------------------------------------------------------------
# Settings: the one reader of the environment.


@dataclasses.dataclass(frozen=True)
class Settings:
    """The ``MMFA_*`` environment variables, parsed.

    route:            ``MMFA_ROUTE`` "auto" (default) or "triton": "pallas" takes the Triton route on
                      every GPU ("stock" is accepted as "auto")
    triton_arch:      ``MMFA_TRITON_ARCH`` (e.g. 75): compile the Triton route's kernels for that compute
                      capability and take its tuning family (checks Turing code on a newer GPU)
    torch_launch:     ``MMFA_TORCH_LAUNCH`` "direct" (default: mmfa_torch launches the kernels itself) or
                      "jax" (CUDA tensors cross to JAX through DLPack)
    cache_dir:        ``MMFA_CACHE_DIR``, default ``~/.cache/mmfa``: the compiled-kernel cache
    show_deprecation: ``MMFA_SHOW_TRITON_DEPRECATION=1`` shows jax's Pallas-Triton deprecation warning
    """

    route: str = "auto"
    triton_arch: int | None = None
    torch_launch: str = "direct"
    cache_dir: str = ""
    show_deprecation: bool = False


class SettingError(ValueError):
    """An ``MMFA_*`` environment variable has a value mmfa does not know."""


def settings() -> Settings:
    """The current ``MMFA_*`` settings (read on every call: cheap, and tests may change them)."""
    env = os.environ
    route = env.get("MMFA_ROUTE", "auto").strip().lower() or "auto"
    if route not in ("auto", "stock", "triton"):
        raise SettingError(f"MMFA_ROUTE must be 'auto' or 'triton', got {route!r}")
    launch = env.get("MMFA_TORCH_LAUNCH", "direct").strip().lower() or "direct"
    if launch not in ("direct", "jax"):
        raise SettingError(f"MMFA_TORCH_LAUNCH must be 'direct' or 'jax', got {launch!r}")
    return Settings(
        route="triton" if route == "triton" else "auto",
        triton_arch=_arch(env.get("MMFA_TRITON_ARCH", "")),
        torch_launch=launch,
        cache_dir=env.get("MMFA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mmfa"),
        show_deprecation=env.get("MMFA_SHOW_TRITON_DEPRECATION", "").strip().lower() not in ("", "0", "false", "no",
                                                                                             "off"),
    )


def _arch(value: str) -> int | None:
    value = value.strip().lower().removeprefix("sm_").removeprefix("sm")
    if not value:
        return None
    try:
        cc = int(value.replace(".", ""))
    except ValueError:
        raise SettingError(f"MMFA_TRITON_ARCH must be a compute capability such as 75 or sm_75, got {value!r}") from None
    if cc < ROUTE_MIN_CC:
        raise SettingError(f"MMFA_TRITON_ARCH={cc} is below sm_{ROUTE_MIN_CC}, the oldest GPU the route supports")
    return cc


# ------------------------------------------------------------------------------------------------
# The target: the device being lowered for, and the one compute-capability probe.


@dataclasses.dataclass(frozen=True)
class Target:
    """The device a call is lowered for: its platform ("cuda", "cpu", "rocm", "tpu"...) and, for
    an NVIDIA GPU, its compute capability (75 for Turing, 90 for Hopper)."""

    platform: str
    cc: int | None = None
    kind: str = ""

    @classmethod
    def cuda(cls, cc: int, kind: str = "") -> "Target":
        return cls("cuda", int(cc), kind)

    def describe(self) -> str:
        if self.cc is not None:
            return f"{self.kind or 'an NVIDIA GPU'} (compute capability {self.cc / 10:.1f})"
        return f"{self.platform}{f' ({self.kind})' if self.kind else ''}"


def current_target() -> Target:
    """The device being lowered for: an active abstract mesh's device (``use_abstract_mesh``), else
    JAX's default device."""
    import jax

    abstract = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if abstract is not None:
        platform = "cuda" if abstract.platform in ("cuda", "gpu") else abstract.platform
        if platform != "cuda":
            return Target(platform, None, abstract.device_kind or "")
        return Target("cuda", cc_of_kind(abstract.device_kind), abstract.device_kind)
    device = jax.config.jax_default_device or jax.devices()[0]
    if isinstance(device, str):  # a platform name given as the default device
        device = jax.devices(device)[0]
    cc = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or cc is None:  # ROCm GPUs have no NVIDIA compute capability
        return Target(device.platform, None, getattr(device, "device_kind", ""))
    return Target.cuda(int(round(float(cc) * 10)), device.device_kind)


def cc_of_kind(device_kind: str) -> int:
    """The compute capability of an NVIDIA device kind jax knows ("Tesla T4" -> 75)."""
    from jax._src.pallas.triton import gpu_info

    version = gpu_info.gpu_version_from_device_kind(device_kind)
    if version is None:
        raise ValueError(f"unknown GPU device kind {device_kind!r}: no compute capability for it")
    return int(gpu_info.get_gpu_info_from_version(version).compute_capability)


# A device kind jax knows for each compute capability: what an abstract device is named when
# lowering for a GPU that jax itself is not running on.
DEVICE_KIND_OF_CC = {
    75: "Tesla T4", 80: "NVIDIA A100", 86: "NVIDIA A10", 89: "NVIDIA L4", 90: "NVIDIA H100", 100: "NVIDIA B200",
    103: "NVIDIA B300", 110: "NVIDIA Thor", 120: "NVIDIA RTX PRO 6000", 121: "NVIDIA GB10",
}


def device_kind_of_cc(cc: int) -> str:
    """A device kind jax knows for compute capability ``cc`` (the newest of its major version at or
    below it)."""
    if cc in DEVICE_KIND_OF_CC:
        return DEVICE_KIND_OF_CC[cc]
    older = [c for c in DEVICE_KIND_OF_CC if c <= cc and c // 10 == cc // 10]
    if not older:
        raise ValueError(f"no known device kind for compute capability {cc}")
    return DEVICE_KIND_OF_CC[max(older)]


def family_of_cc(cc: int) -> str:
    """The tuning table's family for compute capability ``cc``."""
    major = cc // 10
    return "sm90" if major >= 9 else "sm80" if major >= 8 else "sm75" if major == 7 else "any"


# ------------------------------------------------------------------------------------------------
# The decision.


@dataclasses.dataclass(frozen=True)
class Lowering:
    """What runs a call: a backend of ``BACKENDS`` and, for the compiled ones, the compute
    capability its kernels are compiled for and the tuning family whose tiles they take.
    Hashable: a static argument of jitted functions."""

    backend: str
    cc: int | None = None
    family: str = "any"

    @property
    def interpret(self) -> bool:
        return self.backend == "interpret"

    @property
    def kernels(self) -> bool:
        return BACKENDS[self.backend].kernels

    @property
    def compiled(self) -> bool:
        return BACKENDS[self.backend].compiled

    def pallas_args(self, cfg=None) -> dict:
        """``pl.pallas_call`` keyword arguments for a kernel built from the ``tuning.KernelConfig``
        ``cfg``: ``interpret=True``, or the Triton compiler params that carry this backend to the
        lowering rule (mmfa_jax.triton_route)."""
        if not self.kernels:
            raise ValueError(f"backend {self.backend!r} runs no Pallas kernels")
        if self.interpret:
            return dict(interpret=True)
        from mmfa_jax import triton_route

        return dict(compiler_params=triton_route.compiler_params(cfg, self))

    def via_triton_route(self) -> "Lowering":
        """The same kernels and tiles, compiled by the official triton (what mmfa_torch's own launch
        needs: cubins it can launch itself)."""
        return dataclasses.replace(self, backend="triton-route") if self.compiled else self


def resolve(implementation: str | None = None, target: Target | None = None, *,
            argument: str = "implementation") -> Lowering:
    """The ``Lowering`` of ``implementation`` on ``target`` (default: ``current_target()``).

    A ``Lowering`` is returned as it is: the pipelines resolve once and hand the result to each
    step. Raises ValueError, naming ``argument`` and its value, when the implementation is unknown
    or cannot run there (saying what can)."""
    if isinstance(implementation, Lowering):
        return implementation
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{argument} must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
    if implementation == "interpret":
        return Lowering("interpret")
    if implementation == "xla":
        return Lowering("xla")
    target = target or current_target()
    env = settings()
    cc = target.cc if target.platform == "cuda" else None
    if implementation is None:
        if cc is None or cc < ROUTE_MIN_CC or (cc < STOCK_MIN_CC and not triton_available()):
            return Lowering("xla")
        implementation = "pallas"
    if cc is None or cc < ROUTE_MIN_CC:
        raise ValueError(
            f"{argument}={implementation!r} needs an NVIDIA GPU with compute capability >= 7.5, but the device "
            f"being lowered for is {target.describe()}; use 'interpret' (the same kernels, interpreted) or 'xla'")
    route = implementation == "triton" or cc < STOCK_MIN_CC or env.route == "triton" or env.triton_arch is not None
    if not route:
        return Lowering("xla-triton", cc, family_of_cc(cc))
    check_triton_available()
    compile_cc = env.triton_arch or cc
    if compile_cc > cc:
        raise SettingError(f"MMFA_TRITON_ARCH={compile_cc} is newer than the GPU (sm_{cc}): code for it cannot run")
    return Lowering("triton-route", compile_cc, family_of_cc(compile_cc))


def default_implementation(target: Target | None = None) -> str:
    """The implementation ``None`` stands for on ``target``: "pallas" or "xla"."""
    return "xla" if resolve(None, target).backend == "xla" else "pallas"


def pallas_available(target: Target | None = None) -> bool:
    """True where the Pallas kernels can run compiled: NVIDIA GPUs of compute capability >= 8.0,
    and Turing (7.5) when the official ``triton`` package is installed."""
    return default_implementation(target) == "pallas"


def triton_available() -> bool:
    from mmfa_jax import triton_route

    return triton_route.available()


def check_triton_available():
    from mmfa_jax import triton_route

    triton_route.check_available()
