"""What differs between the jax releases mmfa accepts (``jax>=0.11.2,<0.13``), in one place.

Tested: jax/jaxlib 0.11.2 (the GPU machine's, ``constraints.txt``) and 0.12.0.1 (the newest the
ranges allowed on 2026-12-01, ``constraints-newest.txt``). No shim is needed between them today:
the one difference that mattered, jax 0.12 refusing at trace time a ref slice with a static start
that runs past the ref's end (``Out of bound slice``), is met in the kernels themselves, which name
such masked rows by an index vector (``mmfa_jax.kernels.selection``). A future shim between jax
versions goes here.

jax's Pallas Triton backend, which every mmfa kernel is lowered through (XLA's Triton launch and
mmfa's official-triton route, ``mmfa_jax.triton_route``), is deprecated since jax 0.11: each
lowering of a Pallas kernel for an NVIDIA GPU warns (``jax._src.pallas.triton.
pallas_call_registration.pallas_call_lowering``, a ``DeprecationWarning`` through
``jax._src.deprecations.warn("jax-pallas-triton", ...)``). The warning is attributed to the frame
that called the lowering, which for mmfa's kernels is ``mmfa_jax.triton_route``. Importing
``mmfa_jax`` ignores that one warning from that one module, so mmfa's own kernels do not repeat it
for every shape they are compiled for (nor break under ``-W error``); the same warning raised for
anyone else's Pallas-Triton kernel still shows. ``MMFA_SHOW_TRITON_DEPRECATION=1`` in the
environment (set before the import) keeps it visible.
"""

from __future__ import annotations

import warnings

# The start of jax's message (0.11.2 and 0.12.0.1 alike), as a regular expression.
TRITON_DEPRECATION_MESSAGE = r"The Pallas Triton backend is deprecated"
# The module that the warning is attributed to when one of mmfa's kernels is lowered.
TRITON_DEPRECATION_MODULE = r"mmfa_jax\.triton_route"
SHOW_TRITON_DEPRECATION = "MMFA_SHOW_TRITON_DEPRECATION"

_installed = False


def show_triton_deprecation() -> bool:
    """Whether ``MMFA_SHOW_TRITON_DEPRECATION`` asks to see jax's Pallas Triton deprecation (read,
    as every MMFA_* setting, by ``mmfa_jax.backends.settings``)."""
    from mmfa_jax import backends

    return backends.settings().show_deprecation


def quiet_triton_deprecation() -> bool:
    """Ignore jax's Pallas Triton deprecation warning where mmfa's own kernels cause it; once per
    process, unless ``MMFA_SHOW_TRITON_DEPRECATION`` is set. Returns whether the filter is in place."""
    global _installed
    if _installed:
        return True
    if show_triton_deprecation():
        return False
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION_MESSAGE, category=DeprecationWarning,
                            module=TRITON_DEPRECATION_MODULE)
    _installed = True
    return True


def settle_trace_context():
    """Import, up front, the jax modules that a first Pallas call imports lazily and that define a
    configuration option belonging to jax's tracing context (jax 0.11.2 and 0.12:
    ``jax._src.pallas.fuser.jaxpr_fusion``, reached through the Pallas interpreter). Defined after a
    first call, such an option changes the context, so every function jitted before it would trace
    and compile once more on its second call."""
    import jax.experimental.pallas.fuser  # noqa: F401
