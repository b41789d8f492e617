"""mmfa: Multimodal Flash-Attention, JAX face.

``attention`` (alias ``dot_product_attention``) is a drop-in for ``jax.nn.dot_product_attention``
backed by Pallas kernels (Triton lowering) for forward and backward.

Importing it ignores jax's Pallas Triton deprecation warning where mmfa's kernels cause it (set
``MMFA_SHOW_TRITON_DEPRECATION=1`` to see it): see ``mmfa_jax._compat``.
"""

from mmfa_jax import _compat

_compat.quiet_triton_deprecation()
_compat.settle_trace_context()

from mmfa_jax._checks import ArgumentError, ArgumentTypeError  # noqa: E402
from mmfa_jax.attention import (
    IMPLEMENTATIONS,
    attention,
    attention_at_rows,
    default_implementation,
    dot_product_attention,
    pallas_available,
)
from mmfa_jax.block_sparse import BlockMask, block_sparse_attention
from mmfa_jax import sparse_patterns  # noqa: F401  (mmfa_jax.sparse_patterns: block maps for block_sparse_attention)
from mmfa_jax.decode import decode_attention
from mmfa_jax.dynamic_mask import dynamic_mask_attention, zoh_states
from mmfa_jax.importance import scorer_rows, sparsevlm_raters, visual_token_importance
from mmfa_jax.multimodal import MultimodalResult, multimodal_attention
from mmfa_jax.pruning import gather_tokens, select_visual_tokens
from mmfa_jax.tuning import AttentionConfig, KernelConfig

__all__ = [
    "IMPLEMENTATIONS",
    "ArgumentError",
    "ArgumentTypeError",
    "AttentionConfig",
    "BlockMask",
    "KernelConfig",
    "MultimodalResult",
    "attention",
    "attention_at_rows",
    "block_sparse_attention",
    "decode_attention",
    "default_implementation",
    "dot_product_attention",
    "dynamic_mask_attention",
    "gather_tokens",
    "multimodal_attention",
    "pallas_available",
    "scorer_rows",
    "select_visual_tokens",
    "sparsevlm_raters",
    "visual_token_importance",
    "zoh_states",
]
__version__ = "0.1.0"
