"""Launch plans: what a launcher needs to know about each attention kernel, as data.

A kernel's parameters are its ``pallas_call``'s operands, then its results. Here each kernel's
operands and results are named, in order; an operand that a call does not have (no bias, no
lengths) is simply absent from the parameter list. The JAX launchers
(``mmfa_jax.kernels``) order their operands by these plans, and mmfa_torch's
own launch (``mmfa_torch.launch``) reads the same plans to hand torch tensors to the compiled
kernels, so neither counts operands by hand. Result shapes and dtypes come from the lowering
itself (``mmfa_jax.triton_route.Launch.results``); the work done around the kernels (the
backward's ``delta`` before, the bias gradient's reduction after) lives once, in
``mmfa_jax._autodiff`` (``backward_delta``, ``reduce_dbias``), and both faces call it.
"""

from __future__ import annotations

import dataclasses

# The operands every attention kernel may take, in order (after its own leading ones).
_SIDE = ("bias", "mask", "q_seg", "kv_seg", "q_lengths", "kv_lengths")


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """One kernel: its name (the ``pallas_call``'s), its operands' and its results' names, in order."""

    name: str
    operands: tuple[str, ...]
    results: tuple[str, ...]

    def ordered(self, **named) -> tuple:
        """The operands in this kernel's order, None where absent (what a ``pallas_call`` takes: a
        None operand is an empty pytree, and the kernel body gets None for its ref)."""
        unknown = set(named) - set(self.operands)
        if unknown:
            raise KeyError(f"{self.name} takes no operand {sorted(unknown)}")
        return tuple(named.get(n) for n in self.operands)

    def arguments(self, named: dict) -> list:
        """The operands present in ``named`` (name -> array or tensor; None or missing: absent), in
        this kernel's order: its parameters before the results."""
        return [t for n in self.operands if (t := named.get(n)) is not None]


MASK_BLOCKS = KernelPlan("mmfa_mask_blocks", ("mask",), ("mask_blocks",))
MASK_RANGES = KernelPlan("mmfa_mask_ranges", ("mask_blocks",), ("mask_ranges",))
FORWARD = KernelPlan("mmfa_flash_forward", ("q", "k", "v", *_SIDE, "mask_ranges", "q_source", "kv_source"),
                     ("out", "lse"))
BACKWARD_DQ = KernelPlan("mmfa_flash_dq", ("q", "k", "v", *_SIDE, "d_out", "lse", "delta"), ("dq", "dbias"))
BACKWARD_DKV = KernelPlan("mmfa_flash_dkv", ("q", "k", "v", *_SIDE, "d_out", "lse", "delta"), ("dk", "dv"))
# Split-KV decode (``mmfa_jax.kernels.decode``): q, k, v flattened to 2-D (rows, D); ``seq_len`` (1,)
# int32 is the cache length the K/V rows really hold (the kernel may be compiled for more);
# ``kv_lengths`` (B,) int32 and ``key_mask`` (B * capacity,) int8 are optional. The merge's results are the flattened output and LSE.
DECODE_PARTIAL = KernelPlan("mmfa_decode_partial", ("q", "k", "v", "seq_len", "kv_lengths", "key_mask"),
                            ("partial_out", "partial_lse"))
DECODE_MERGE = KernelPlan("mmfa_decode_merge", ("partial_out", "partial_lse"), ("out", "lse"))
# Block-sparse attention (``mmfa_jax.kernels.block_sparse``): q, k, v as the dense kernels take them,
# and a BlockMask's lists as it holds them (``mmfa_jax.block_sparse.BlockLists``, int32): per query
# block kv_count, kv_full (Bm, Nm, nq) and kv_index (Bm, Nm, nq, W), W the lists' static width; for
# dK/dV per key block q_offset, q_count, q_full (Bm, Nm, nk) into the compressed q_index
# (Bm, Nm, nq * W), which holds every key block's query blocks one after the other.
# ``q_pos`` (B, T) / ``kv_pos`` (B, S) int32, optional: the positions the causal mask compares (a
# permuted order attends with the causality of the original one: ``BlockMask(positions=...)``).
BLOCK_SPARSE_FORWARD = KernelPlan("mmfa_block_sparse_forward",
                                  ("q", "k", "v", "kv_count", "kv_full", "kv_index", "q_pos", "kv_pos"),
                                  ("out", "lse"))
BLOCK_SPARSE_DQ = KernelPlan("mmfa_block_sparse_dq",
                             ("q", "k", "v", "kv_count", "kv_full", "kv_index", "q_pos", "kv_pos", "d_out", "lse",
                              "delta"), ("dq",))
BLOCK_SPARSE_DKV = KernelPlan("mmfa_block_sparse_dkv",
                              ("q", "k", "v", "q_offset", "q_count", "q_full", "q_index", "q_pos", "kv_pos", "d_out",
                               "lse", "delta"), ("dk", "dv"))


def forward(has_mask: bool) -> tuple[KernelPlan, ...]:
    """The forward's kernels in launch order: with a dense mask, its block ranges first."""
    return (MASK_BLOCKS, MASK_RANGES, FORWARD) if has_mask else (FORWARD,)


def backward() -> tuple[KernelPlan, ...]:
    """The backward's kernels in launch order (``delta`` is computed before them, the bias
    gradient reduced after: ``mmfa_jax._autodiff``)."""
    return (BACKWARD_DQ, BACKWARD_DKV)


def decode() -> tuple[KernelPlan, ...]:
    """The decode kernels in launch order: the partial kernel's results are the merge's operands."""
    return (DECODE_PARTIAL, DECODE_MERGE)


def block_sparse_forward() -> tuple[KernelPlan, ...]:
    """The block-sparse forward's kernels in launch order."""
    return (BLOCK_SPARSE_FORWARD,)


def block_sparse_backward() -> tuple[KernelPlan, ...]:
    """The block-sparse backward's kernels in launch order (``delta`` before them, as for ``backward``)."""
    return (BLOCK_SPARSE_DQ, BLOCK_SPARSE_DKV)


# Dynamic mask attention (``mmfa_jax.kernels.dynamic_mask``, Flash-DMA): zoh (B, K, S); each key's
# ``rank`` (B, K, S) int32 (its place with the keys sorted best first) and each row's threshold as a
# rank, ``thr_pos`` (B, K, T) int32; in the nested case (no segment ids) the per-query-tile candidate
# lists ``candidates`` (B, K, nq, list_buffer) int32 and ``counts`` (B, K, nq) int32 and the
# thresholds, made by DMA_SELECT from the sorted order (``sorted_index`` (B, K, S) int32:
# ``kernels.dynamic_mask.sort_keys``), the ranks and the ``count_table``; with segment ids
# DMA_SELECT_ROWS gives every row's threshold as (order key, index), made ranks by XLA, and the
# attention kernels take no lists. The backward's dk_acc, dv_acc
# (B, K, S + block_k, padded D) and dzoh_acc (B, K, S + block_k) float32 start as zeros and are aliased
# to its last three results (atomic adds).
_DMA_ATTENTION = ("q", "k", "v", "zoh", "candidates", "counts", "rank", "thr_pos", "q_seg", "kv_seg",
                  "q_lengths", "kv_lengths")
DMA_SELECT = KernelPlan("mmfa_dma_select", ("sorted_index", "rank", "count_table", "kv_lengths"),
                        ("candidates", "counts", "thr_pos"))
DMA_SELECT_ROWS = KernelPlan("mmfa_dma_select_rows", ("zoh", "q_seg", "kv_seg", "kv_lengths"),
                             ("thr_key", "thr_index"))
DMA_FORWARD = KernelPlan("mmfa_dma_forward", _DMA_ATTENTION, ("out", "lse"))
DMA_BACKWARD = KernelPlan("mmfa_dma_backward", (*_DMA_ATTENTION, "d_out", "lse", "delta", "dk_acc", "dv_acc",
                                                "dzoh_acc"), ("dq", "dk_acc", "dv_acc", "dzoh_acc"))


def dynamic_mask_forward(nested: bool) -> tuple[KernelPlan, ...]:
    """The dynamic-mask forward's kernels in launch order (selection, then attention)."""
    return (DMA_SELECT, DMA_FORWARD) if nested else (DMA_SELECT_ROWS, DMA_FORWARD)


def dynamic_mask_backward() -> tuple[KernelPlan, ...]:
    """The dynamic-mask backward's kernels (it reuses the forward's selection)."""
    return (DMA_BACKWARD,)
