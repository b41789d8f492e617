"""mmfa: Multimodal Flash-Attention, PyTorch face.

``scaled_dot_product_attention`` (alias ``attention``) mirrors
``torch.nn.functional.scaled_dot_product_attention`` and runs mmfa's compiled Pallas kernels on the
torch tensors' own memory (DLPack, no copy). Importing this module sets
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (unless already set) so that JAX does not reserve 75% of
GPU memory.
"""

from mmfa_torch import bridge  # noqa: F401  (sets the allocator flag before JAX starts)
from mmfa_torch.attention import attention, scaled_dot_product_attention
from mmfa_torch.decode import decode_attention
from mmfa_torch.dynamic_mask import dynamic_mask_attention, zoh_states
from mmfa_torch.pruning import gather_tokens, multimodal_attention, select_visual_tokens, visual_token_importance

__all__ = ["attention", "decode_attention", "gather_tokens", "multimodal_attention", "scaled_dot_product_attention",
           "select_visual_tokens", "visual_token_importance"]
__all__ += ["dynamic_mask_attention", "zoh_states"]
from mmfa_torch.sparse import BlockMask, block_sparse_attention  # noqa: E402

__all__ += ["BlockMask", "block_sparse_attention"]
