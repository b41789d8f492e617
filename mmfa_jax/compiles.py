"""Counting compiles: what a warm call must not do.

``with compiles.counted() as seen: ...`` records every XLA backend compile (jax.monitoring's
duration event, with the compiled function's name) and every kernel the Triton route compiled
rather than found in its caches. Used by the tests (a second call of seen shapes compiles nothing)
and by ``bench/vlm.py --count-compiles``.
"""

from __future__ import annotations

import contextlib
import dataclasses

from jax import monitoring

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class Compiles:
    xla: list = dataclasses.field(default_factory=list)  # names of the functions XLA compiled
    triton_start: int = 0
    triton_end: int | None = None

    @property
    def triton(self) -> int:
        """Kernels the Triton route compiled (not served from memory or disk)."""
        from mmfa_jax import triton_route

        end = triton_route.STATS["compiled"] if self.triton_end is None else self.triton_end
        return end - self.triton_start

    @property
    def total(self) -> int:
        return len(self.xla) + self.triton

    def __str__(self):
        names = ", ".join(sorted(set(self.xla))) or "none"
        return f"{len(self.xla)} XLA compiles ({names}), {self.triton} Triton-route kernels compiled"


@contextlib.contextmanager
def counted():
    """Within this context, count compiles (this process, every thread); yields a ``Compiles``."""
    from mmfa_jax import triton_route

    seen = Compiles(triton_start=triton_route.STATS["compiled"])

    def listener(event, duration, **kwargs):
        if event == _BACKEND_COMPILE:
            seen.xla.append(kwargs.get("fun_name", "?"))

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        monitoring.unregister_event_duration_listener(listener)
        seen.triton_end = triton_route.STATS["compiled"]
