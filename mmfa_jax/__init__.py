"""mmfa: Multimodal Flash-Attention, JAX face.

``attention`` (alias ``dot_product_attention``) is a drop-in for ``jax.nn.dot_product_attention``
backed by Pallas kernels (Triton lowering) for forward and backward.
"""

from mmfa_jax.attention import (
    IMPLEMENTATIONS,
    attention,
    default_implementation,
    dot_product_attention,
    pallas_available,
)
from mmfa_jax.tuning import AttentionConfig, KernelConfig

__all__ = [
    "IMPLEMENTATIONS",
    "AttentionConfig",
    "KernelConfig",
    "attention",
    "default_implementation",
    "dot_product_attention",
    "pallas_available",
]
__version__ = "0.1.0"
