"""mmfa's Pallas kernels (Triton lowering) and their launchers; every input is assumed checked
(``mmfa_jax._checks``), every launcher takes its backend (``mmfa_jax.backends.Lowering``).

  common       the static ``Problem``, block specs, loads, logits, visibility: what the kernels share
  forward      flash-attention forward (output and log-sum-exp)
  backward     dQ (and the bias gradient), dK/dV
  mask_ranges  a dense mask's live and fully visible key blocks per query tile
  scorer       visual-token importance: the scorer rows' statistics and the probability per key
  selection    top-k of visual tokens and compaction, one program per example
  decode       split-KV decode (Flash-Decoding): partial outputs per cache split, merged by LSE
  block_sparse block-sparse attention: forward, dQ, dK/dV over a block map's lists
"""

from mmfa_jax.kernels.backward import backward
from mmfa_jax.kernels.block_sparse import SparseProblem
from mmfa_jax.kernels.block_sparse import backward as block_sparse_backward
from mmfa_jax.kernels.block_sparse import forward as block_sparse_forward
from mmfa_jax.kernels.common import Problem, padded_head_dim
from mmfa_jax.kernels.decode import DecodeProblem, decode
from mmfa_jax.kernels.forward import forward
from mmfa_jax.kernels.mask_ranges import forward_query_tiles, mask_ranges
from mmfa_jax.kernels.scorer import importance, scorer_stats

__all__ = ["DecodeProblem", "Problem", "SparseProblem", "backward", "block_sparse_backward", "block_sparse_forward",
           "decode", "forward", "forward_query_tiles", "importance", "mask_ranges", "padded_head_dim", "scorer_stats"]
