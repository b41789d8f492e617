"""torch <-> jax through DLPack: zero-copy and ordered on the GPU streams.

``jax.dlpack.from_dlpack`` hands the tensor's producer JAX's stream, so torch orders the hand-off
on the device; ``torch.from_dlpack`` of a jax array passes torch's current stream and jax makes
it wait for the buffer. Neither synchronises the host. Only compact (possibly permuted) strides
cross; callers pass contiguous tensors.
"""

from __future__ import annotations

import os
import warnings

# JAX grabs 75% of GPU memory at its first operation unless told otherwise; that would starve the
# torch program that imported us. This must run before JAX initialises a backend.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.dlpack  # noqa: E402
import torch  # noqa: E402


def _warn_if_preallocated():
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized() and os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE") != "false":
        warnings.warn(
            "JAX was initialised before mmfa_torch was imported and may have reserved 75% of GPU memory; "
            "set XLA_PYTHON_CLIENT_PREALLOCATE=false before importing jax", RuntimeWarning, stacklevel=3)


_warn_if_preallocated()


def to_jax(t: torch.Tensor | None) -> jax.Array | None:
    """A jax array that shares the tensor's memory (no copy). The tensor must be contiguous."""
    if t is None:
        return None
    return jax.dlpack.from_dlpack(t.detach())


def to_torch(x: jax.Array | None) -> torch.Tensor | None:
    """A torch tensor that shares the jax array's memory (no copy)."""
    if x is None:
        return None
    return torch.from_dlpack(x)
