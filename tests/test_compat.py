"""jax versions: the Pallas Triton deprecation warning is kept out of users' logs only where mmfa's
own kernels cause it, and shows on request (mmfa_jax._compat).

Each case runs in a fresh interpreter, since pytest installs warning filters of its own. The
kernels are lowered for an abstract H100 (no GPU needed): XLA's Triton launch, the path that warns.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

MESSAGE = "The Pallas Triton backend is deprecated"

LOWER_MMFA = """
import jax, jax.numpy as jnp
import mmfa_jax
from mmfa_jax import backends, triton_route
from mmfa_jax.kernels import selection
# Resolved while tracing, for the abstract H100 being lowered for: XLA's Triton, jax's own lowering.
triton_route.lower_for(lambda f: selection.compact(f, 5, lowering=backends.resolve("pallas")),
                       jax.ShapeDtypeStruct((2, 45), jnp.bool_), device_kind="NVIDIA H100")
print("lowered")
"""

# Somebody else's Pallas-Triton kernel, in a process that imported mmfa_jax.
LOWER_OTHER = """
import jax, jax.numpy as jnp
from jax.experimental import pallas as pl
import mmfa_jax
from mmfa_jax import triton_route

def double(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2

call = lambda x: pl.pallas_call(double, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)
triton_route.lower_for(call, jax.ShapeDtypeStruct((16,), jnp.float32), device_kind="NVIDIA H100")
print("lowered")
"""


def _run(code: str, *warning_options: str, show: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MMFA_ROUTE", "MMFA_TRITON_ARCH", "MMFA_SHOW_TRITON_DEPRECATION", "PYTHONWARNINGS")}
    env["JAX_PLATFORMS"] = "cpu"
    if show:
        env["MMFA_SHOW_TRITON_DEPRECATION"] = "1"
    args = [sys.executable, *(f"-W{w}" for w in warning_options), "-c", code]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


def test_mmfa_kernels_lower_quietly_even_under_warnings_as_errors():
    done = _run(LOWER_MMFA, "error::DeprecationWarning")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lowered" in done.stdout
    assert MESSAGE not in done.stderr


def test_the_warning_shows_when_asked_for():
    done = _run(LOWER_MMFA, "always::DeprecationWarning", show=True)
    assert done.returncode == 0, done.stderr[-3000:]
    # If jax changes where it attributes the warning, the filter's module no longer matches: this
    # names the module it is attributed to now.
    assert MESSAGE in done.stderr and "triton_route.py" in done.stderr, done.stderr[-3000:]


def test_the_filter_is_scoped_to_mmfa():
    done = _run(LOWER_OTHER, "always::DeprecationWarning")
    assert done.returncode == 0, done.stderr[-3000:]
    assert MESSAGE in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize("value, shown", [("", False), ("0", False), ("1", True), ("yes", True)])
def test_show_setting(monkeypatch, value, shown):
    from mmfa_jax import _compat

    monkeypatch.setenv(_compat.SHOW_TRITON_DEPRECATION, value)
    assert _compat.show_triton_deprecation() is shown
