"""Block-sparse attention, PyTorch face: ``BlockMask`` and ``block_sparse_attention`` in SDPA's layout.

A block map says, per (batch, head), which (query block, key block) pairs attend; a query attends
exactly to the keys of its listed blocks (and, with ``is_causal``, to keys j <= i): a dense
softmax restricted to the map, computed by kernels that visit only the listed blocks (see
``mmfa_jax.block_sparse``, the JAX face this module wraps).

Usage::

    import torch, mmfa_torch

    B, Hq, Hkv, T, D = 1, 28, 4, 8192, 128
    q = torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    nq = nk = T // 128
    blocks = torch.rand(1, Hq, nq, nk, device="cuda") < 0.1          # (B or 1, Hq or 1, nq, nk) bool
    mask = mmfa_torch.BlockMask.from_dense(blocks, (128, 128), seq_lens=(T, T))   # built once,
    out = mmfa_torch.block_sparse_attention(q, k, v, mask, is_causal=True)      # used by any layer
    out.sum().backward()                                                          # dQ, dK, dV

``BlockMask.from_indices(indices, counts, ...)`` takes per-query-block lists of key blocks instead,
and ``BlockMask.from_flex(m)`` converts a FlexAttention ``BlockMask`` (its partial and full
blocks; not its token-level ``mask_mod``). Inputs may also be the ``transpose(1, 2)`` view of
(B, T, H, D)-contiguous tensors (what attention layers produce): then nothing is copied.

Where the work happens:

* The lists (per query block its key blocks, wholly visible ones apart from those that need the
  token-level mask, and the transposed lists for dK/dV) are built once, by the JAX face
  (``mmfa_jax.BlockMask.from_dense`` / ``from_indices``) on DLPack views of the torch tensors, and
  kept here as torch tensors: this ``BlockMask`` holds the JAX ``BlockMask``'s pytree leaves, in
  its order, and how it was built (which gives its tree structure back). Nothing about the lists
  is decided in torch. A CUDA map is read by JAX's GPU (DLPack), or copied to the CPU and back
  when JAX has none; ``from_indices`` reads the index values on the host (its checks).
* CPU tensors cross to JAX by DLPack (no copy) and run ``mmfa_jax.block_sparse_attention`` (its
  ``jax.vjp`` for the gradients), under one jit per shape.
* CUDA tensors launch the compiled kernels from torch (``mmfa_torch.launch``: the JAX face lowered
  once per shape for the GPU by the official triton, its kernels replayed on torch's stream, their
  operands named by ``mmfa_jax.plans.BLOCK_SPARSE_*``); with ``MMFA_TORCH_LAUNCH=jax``,
  ``launch.through_jax()``, or without triton, they cross to JAX's GPU by DLPack instead.
* The kernels take (B, T, H, D)-contiguous tensors (the JAX face's layout): an SDPA-contiguous
  (B, H, T, D) input is copied to it once per call, and the output is returned as the
  ``transpose(1, 2)`` view of a (B, T, Hq, D)-contiguous tensor (so ``out.transpose(1, 2)
  .reshape(B, T, Hq * D)`` costs nothing).
* Under ``torch.compile`` the map building and the attention are ``torch.library`` custom ops
  (``mmfa::block_mask_from_dense``, ``mmfa::block_mask_from_indices``,
  ``mmfa::block_sparse_forward`` / ``_backward``) whose fake kernels take their shapes from
  ``jax.eval_shape`` of the same JAX functions; ``fullgraph=True`` works with a mask built inside
  or outside the compiled function.

Gradients: on the JAX route the backward is ``jax.vjp`` of the forward under jit, which runs the
forward kernel again (the JAX face exposes no separate forward and backward); the direct launch
runs only the dQ and dK/dV kernels on the saved output and LSE.

Tested on the CPU (tests/test_block_sparse_torch.py: interpreter and XLA, and the direct launch's
kernels lowered for sm_90 with every operand named); the CUDA routes have a GPU test
(``--gpu``) that has not been run yet.
"""

from __future__ import annotations

import functools
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import torch

import mmfa_jax
from mmfa_jax import _checks, plans
from mmfa_jax._autodiff import backward_delta
from mmfa_jax._checks import ArgumentError, ArgumentTypeError
from mmfa_jax.block_sparse import BlockMask as JaxBlockMask
from mmfa_torch import launch, ops
from mmfa_torch.attention import _Empty, _jax_has_gpu, _lowering
from mmfa_torch.bridge import to_jax, to_torch
from mmfa_torch.launch import _JAX_DTYPE

Tensor = torch.Tensor

_TORCH_DTYPE = {name: dtype for dtype, name in _JAX_DTYPE.items()}
# The layout the JAX face's block-sparse kernels take (query (B, T, Hq, D)): every tensor is handed
# over in it, so the hand-off is a DLPack view.
_LAYOUT = "BTNH"


# ------------------------------------------------------------------------------------------------
# The JAX BlockMask's tree structure. A torch mask carries how it was built, as a string (a static
# argument a custom op can take and torch.compile can put in a graph, made without calling JAX, the
# same in every process); the structure is the one the JAX builder gives for it.


def _recipe(kind: str, block_size, seq_lens, has_positions: bool) -> str:
    (bq, bk), (T, S) = block_size, seq_lens
    return f"{kind}:block_size=({bq}, {bk}):seq_lens=({T}, {S}):positions={int(has_positions)}"


@functools.lru_cache(maxsize=256)
def _structure(recipe: str):
    """The tree structure of the JAX ``BlockMask`` that ``recipe`` builds (its leaves' order, the
    static block size and lengths), from ``jax.eval_shape`` of the builder on the smallest inputs:
    it depends on how a mask is built, not on the map's batch and heads."""
    parts = re.fullmatch(r"(dense|indices):block_size=\((\d+), (\d+)\):seq_lens=\((\d+), (\d+)\):positions=([01])",
                         recipe)
    if parts is None:
        raise ArgumentError(f"block_mask's structure must be a recipe of mmfa_torch.sparse._recipe, got {recipe!r}")
    kind, bq, bk, T, S, has_positions = parts.groups()
    block_size, seq_lens = (int(bq), int(bk)), (int(T), int(S))
    nq, nk = -(-seq_lens[0] // block_size[0]), -(-seq_lens[1] // block_size[1])
    positions = None
    if has_positions == "1":
        positions = tuple(jax.ShapeDtypeStruct((1, n), jnp.int32) for n in seq_lens)
    if kind == "dense":
        inputs = (jax.ShapeDtypeStruct((1, 1, nq, nk), jnp.bool_),)
    else:
        inputs = (jax.ShapeDtypeStruct((1, 1, nq, 1), jnp.int32), jax.ShapeDtypeStruct((1, 1, nq), jnp.int32))
    build = functools.partial(_jax_build, kind, block_size=block_size, seq_lens=seq_lens)
    return jax.tree_util.tree_structure(jax.eval_shape(build, inputs, positions))


def _jax_build(kind: str, inputs, positions, *, block_size, seq_lens) -> JaxBlockMask:
    """The JAX face's builder ``kind`` ("dense": from_dense(blocks), "indices": from_indices(indices,
    counts)) on ``inputs``, with ``positions`` (a pair) or without (None)."""
    extra = {} if positions is None else {"positions": positions}
    if kind == "dense":
        return JaxBlockMask.from_dense(*inputs, block_size, seq_lens=seq_lens, **extra)
    return JaxBlockMask.from_indices(*inputs, block_size, seq_lens=seq_lens, **extra)


def _unflatten(recipe: str, leaves):
    """A JAX ``BlockMask`` whose arrays are ``leaves`` (jax arrays, ShapeDtypeStructs, or torch
    tensors for reading attributes)."""
    return jax.tree_util.tree_unflatten(_structure(recipe), list(leaves))


def _flattened(mask: JaxBlockMask, recipe: str, device, inputs) -> list[Tensor]:
    """The JAX mask's leaves as torch tensors on ``device``, owning their memory."""
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    if treedef != _structure(recipe):  # the builder's structure must not depend on the inputs' shapes
        raise AssertionError(f"the JAX BlockMask built by {recipe} has structure {treedef}, not "
                             f"{_structure(recipe)}")
    return _owned([to_torch(x).to(device) for x in leaves], inputs)


def _signature(tensors) -> tuple:
    return tuple((tuple(t.shape), _checks.dtype_name(t.dtype)) for t in tensors)


def _structs(signature):
    return [jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)) for shape, dtype in signature]


def _empty_like_structs(structs, device) -> list[Tensor]:
    return [torch.empty(tuple(s.shape), dtype=_TORCH_DTYPE[jnp.dtype(s.dtype).name], device=device) for s in structs]


def _owned(outputs: list[Tensor], inputs: Sequence[Tensor | None]) -> list[Tensor]:
    """``outputs`` with any that share memory with an input cloned: jit returns an input it passes
    through (a rank-4 block map) as the same buffer, and a mask must own its arrays (a custom op's
    outputs may not alias its inputs, and a caller's later write to its map must not change the
    mask)."""
    taken = {t.data_ptr() for t in inputs if t is not None and t.numel()}
    return [t.clone() if t.numel() and t.data_ptr() in taken else t for t in outputs]


# ------------------------------------------------------------------------------------------------
# Building the lists: by the JAX face, on the tensors' device when JAX has it.


def _jax_side(t: Tensor | None) -> Tensor | None:
    """The tensor as JAX can read it: itself (a DLPack view), or a CPU copy when it is a CUDA tensor
    and JAX has no GPU (torch launches the kernels itself there; the lists are small)."""
    if t is None:
        return None
    t = t.contiguous()
    if t.is_cuda and not _jax_has_gpu():
        return t.cpu()
    return t


# Jitted: one dispatch for the few ops that build the lists (eager, each would be one).
_jax_from_dense = jax.jit(functools.partial(_jax_build, "dense"), static_argnames=("block_size", "seq_lens"))


def _from_dense_leaves(blocks: Tensor, positions, block_size, seq_lens) -> list[Tensor]:
    jp = None if positions is None else tuple(to_jax(_jax_side(p)) for p in positions)
    mask = _jax_from_dense((to_jax(_jax_side(blocks)),), jp, block_size=block_size, seq_lens=seq_lens)
    return _flattened(mask, _recipe("dense", block_size, seq_lens, positions is not None), blocks.device,
                      [blocks, *(positions or ())])


def _from_indices_leaves(indices: Tensor, counts: Tensor, positions, block_size, seq_lens) -> list[Tensor]:
    # Eager, not jitted: the JAX face checks concrete indices and counts (under jit it cannot).
    jp = None if positions is None else tuple(to_jax(_jax_side(p)) for p in positions)
    mask = _jax_build("indices", (to_jax(_jax_side(indices)), to_jax(_jax_side(counts))), jp, block_size=block_size,
                      seq_lens=seq_lens)
    return _flattened(mask, _recipe("indices", block_size, seq_lens, positions is not None), indices.device,
                      [indices, counts, *(positions or ())])


def _positions_pair(positions):
    if positions is None:
        return None
    if not isinstance(positions, (tuple, list)) or len(positions) != 2:
        raise ArgumentTypeError(f"positions must be a pair (query positions (B, T), key positions (B, S)) of "
                                f"integer tensors, got {type(positions).__name__}")
    return tuple(_int32_tensor(p, f"positions[{i}]") for i, p in enumerate(positions))


def _int32_tensor(t, name: str) -> Tensor:
    """An integer tensor as int32 (what the JAX face reads), values beyond int32 clamped so that they
    stay out of range rather than wrap into it."""
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ArgumentTypeError(f"{name} must be integers, got dtype {t.dtype}")
    if t.dtype != torch.int32:
        t = t.clamp(-2 ** 31, 2 ** 31 - 1).to(torch.int32)
    return t.contiguous()


def _pair_or_none(q_pos: Optional[Tensor], kv_pos: Optional[Tensor]):
    return None if q_pos is None else (q_pos, kv_pos)


def _from_dense_impl(blocks: Tensor, q_pos: Optional[Tensor], kv_pos: Optional[Tensor], block_q: int, block_k: int,
                     T: int, S: int) -> list[Tensor]:
    return _from_dense_leaves(blocks, _pair_or_none(q_pos, kv_pos), (block_q, block_k), (T, S))


def _from_indices_impl(indices: Tensor, counts: Tensor, q_pos: Optional[Tensor], kv_pos: Optional[Tensor],
                       block_q: int, block_k: int, T: int, S: int) -> list[Tensor]:
    return _from_indices_leaves(indices, counts, _pair_or_none(q_pos, kv_pos), (block_q, block_k), (T, S))


# Under torch.compile the builders are custom ops.
_from_dense_op = torch.library.custom_op("mmfa::block_mask_from_dense", _from_dense_impl, mutates_args=())
_from_indices_op = torch.library.custom_op("mmfa::block_mask_from_indices", _from_indices_impl, mutates_args=())


@functools.lru_cache(maxsize=256)
def _abstract_leaves(kind: str, signature: tuple, positions: tuple | None, block_size, seq_lens) -> tuple:
    """The leaves' ShapeDtypeStructs of the JAX builder ``kind`` on inputs of ``signature`` (and
    positions of that signature, or None): the fake kernels' shapes, from the JAX face itself (its
    shape checks included)."""
    build = functools.partial(_jax_build, kind, block_size=block_size, seq_lens=seq_lens)
    mask = jax.eval_shape(build, _structs(signature), None if positions is None else tuple(_structs(positions)))
    return tuple(jax.tree_util.tree_leaves(mask))


def _positions_signature(q_pos, kv_pos):
    return None if q_pos is None else _signature([q_pos, kv_pos])


@_from_dense_op.register_fake
def _(blocks, q_pos, kv_pos, block_q, block_k, T, S):
    leaves = _abstract_leaves("dense", _signature([blocks]), _positions_signature(q_pos, kv_pos), (block_q, block_k),
                              (T, S))
    return _empty_like_structs(leaves, blocks.device)


@_from_indices_op.register_fake
def _(indices, counts, q_pos, kv_pos, block_q, block_k, T, S):
    leaves = _abstract_leaves("indices", _signature([indices, counts]), _positions_signature(q_pos, kv_pos),
                              (block_q, block_k), (T, S))
    return _empty_like_structs(leaves, indices.device)


# ------------------------------------------------------------------------------------------------
# The mask.


class BlockMask:
    """Which (query block, key block) pairs attend, per batch and head, and the kernels' lists.

    Build it with ``BlockMask.from_dense`` (a boolean block map), ``BlockMask.from_indices`` (per
    query block, the list of its key blocks) or ``BlockMask.from_flex`` (a FlexAttention mask).
    It holds, as torch tensors on the map's device, what ``mmfa_jax.BlockMask`` holds, built by it:

      shape       (Bm, Nm, nq, nk), Bm in {1, B}, Nm in {1, Hq} (1: broadcast)
      lists(is_causal)  the lists the kernels walk for that reading of the map (int32; see
                  ``mmfa_jax.block_sparse.BlockLists``): kv_count, kv_full (Bm, Nm, nq),
                  kv_index (Bm, Nm, nq, W) (W: the lists' width, from_indices' L or
                  from_dense's nk), q_offset, q_count, q_full (Bm, Nm, nk), q_index
                  (Bm, Nm, nq * W) (per key block its query blocks, packed one after another)
      blocks      bool (Bm, Nm, nq, nk): the dense map, computed from the lists on demand
                  (quadratic in the blocks; the mask never holds it)
      block_size  (block_q, block_k)
      seq_lens    (T, S): nq = ceil(T / block_q), nk = ceil(S / block_k)

    ``leaves`` are the JAX mask's pytree leaves in its order; ``structure`` says how it was built
    (the builder, block size, lengths), which gives the JAX mask's tree structure; ``to_jax()``
    gives the JAX mask itself (DLPack views). Build a mask once and pass it to every layer that
    uses the map: the lists are not rebuilt per call.
    """

    def __init__(self, leaves: Sequence[Tensor], structure: str, block_size: tuple[int, int],
                 seq_lens: tuple[int, int]):
        self.leaves = tuple(leaves)
        self.structure = structure
        self.block_size, self.seq_lens = tuple(block_size), tuple(seq_lens)

    # Builders ------------------------------------------------------------------------------------

    @classmethod
    def from_dense(cls, blocks: Tensor, block_size, *, seq_lens, positions=None) -> "BlockMask":
        """From a boolean block map.

        Args:
          blocks: bool tensor (Bm, Nm, nq, nk), Bm in {1, B} and Nm in {1, Hq} (1 broadcasts); rank
            2 ((nq, nk)) and 3 ((Nm, nq, nk)) take leading 1s. True: the queries of block qi attend
            to the keys of block kj. On the CPU or a CUDA device; the mask lives there.
          block_size: (block_q, block_k) positive ints (one int: both). The kernels need powers of
            two from 16 to 256; implementation="xla" takes any.
          seq_lens: (T, S), the query and key lengths: nq = ceil(T / block_q), nk = ceil(S / block_k).
          positions: optional pair of integer tensors (query positions (B, T), key positions
            (B, S)), passed to ``mmfa_jax.BlockMask.from_dense``: with ``is_causal`` a key is then
            visible when its position is at most the query's (rows in a permuted order).
        """
        if not isinstance(blocks, torch.Tensor):
            raise ArgumentTypeError(f"blocks must be a bool torch.Tensor, got {type(blocks).__name__}")
        if blocks.dtype != torch.bool:
            raise ArgumentTypeError(f"blocks must be a boolean block map, got dtype {blocks.dtype}")
        block_size, seq_lens = _static_sizes(block_size, seq_lens)
        positions = _positions_pair(positions)
        if torch.compiler.is_compiling():
            leaves = _from_dense_op(blocks, *(positions or (None, None)), *block_size, *seq_lens)
        else:  # eager: the function the op runs, without the op's dispatch
            leaves = _from_dense_leaves(blocks, positions, block_size, seq_lens)
        return cls(leaves, _recipe("dense", block_size, seq_lens, positions is not None), block_size, seq_lens)

    @classmethod
    def from_indices(cls, indices: Tensor, counts: Tensor, block_size, *, seq_lens, positions=None) -> "BlockMask":
        """From per-query-block lists of key blocks.

        Args:
          indices: integer tensor (Bm, Nm, nq, L): the key blocks of each query block, in any order
            (only the first ``counts`` entries count; repeats are harmless); rank 2 and 3 take
            leading 1s.
          counts: integer tensor (Bm, Nm, nq), each in [0, L]: how many entries of each list count.
          block_size, seq_lens, positions: as for ``from_dense``.
        Indices and counts are checked (by the JAX face, on their values: one transfer to the host
        for CUDA tensors).
        """
        indices, counts = _int32_tensor(indices, "indices"), _int32_tensor(counts, "counts")
        if indices.device != counts.device:
            raise ArgumentError(f"indices and counts must be on one device, got {indices.device} and {counts.device}")
        block_size, seq_lens = _static_sizes(block_size, seq_lens)
        positions = _positions_pair(positions)
        if torch.compiler.is_compiling():
            leaves = _from_indices_op(indices, counts, *(positions or (None, None)), *block_size, *seq_lens)
        else:
            leaves = _from_indices_leaves(indices, counts, positions, block_size, seq_lens)
        return cls(leaves, _recipe("indices", block_size, seq_lens, positions is not None), block_size, seq_lens)

    @classmethod
    def from_flex(cls, flex_mask) -> "BlockMask":
        """From a FlexAttention ``torch.nn.attention.flex_attention.BlockMask``: the blocks it
        computes (its partial blocks ``kv_num_blocks`` / ``kv_indices`` and its full blocks
        ``full_kv_num_blocks`` / ``full_kv_indices``), at its ``BLOCK_SIZE`` and ``seq_lengths``.

        Only the block map carries over, not the ``mask_mod`` FlexAttention applies inside its
        partial blocks: the result equals the flex mask where that mask_mod is block-aligned, or
        is the causal mask (then pass ``is_causal=True``), as ``create_block_mask`` of a causal or
        block-level mask_mod gives.
        """
        for name in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE", "seq_lengths"):
            if not hasattr(flex_mask, name):
                raise ArgumentTypeError(f"flex_mask must be a FlexAttention BlockMask (with {name}), got "
                                        f"{type(flex_mask).__name__}")
        parts = [(flex_mask.kv_indices, flex_mask.kv_num_blocks)]
        if getattr(flex_mask, "full_kv_indices", None) is not None:
            parts.append((flex_mask.full_kv_indices, flex_mask.full_kv_num_blocks))
        # One list per query block, its counted entries first: the partial blocks' then the full
        # blocks' (from_indices counts a prefix; the order inside does not matter).
        indices = torch.cat([i for i, _ in parts], dim=-1)
        valid = torch.cat([torch.arange(i.shape[-1], device=i.device) < n[..., None] for i, n in parts], dim=-1)
        order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
        counts = sum(n.to(torch.int32) for _, n in parts)
        block_size = tuple(int(b) for b in flex_mask.BLOCK_SIZE)
        seq_lens = tuple(int(n) for n in flex_mask.seq_lengths)
        return cls.from_indices(torch.gather(indices, -1, order), counts, block_size, seq_lens=seq_lens)

    # Reading -------------------------------------------------------------------------------------

    def _view(self):
        """The JAX ``BlockMask`` over this mask's torch tensors: its attribute names, read in torch."""
        return _unflatten(self.structure, self.leaves)

    @property
    def blocks(self) -> Tensor:
        """bool (Bm, Nm, nq, nk): the map, scattered from the plain lists (quadratic in the
        blocks; the mask holds lists only)."""
        count, _, index = self.lists(False).forward
        nk = self.shape[-1]
        unused = torch.arange(index.shape[-1], device=index.device) >= count[..., None]
        target = torch.where(unused, nk, index).long()
        dense = torch.zeros(*index.shape[:-1], nk + 1, dtype=torch.bool, device=index.device)
        return dense.scatter_(-1, target, True)[..., :nk]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(Bm, Nm, nq, nk)."""
        plain = self.lists(False)
        return tuple(plain.kv_count.shape) + (plain.q_count.shape[-1],)

    @property
    def device(self) -> torch.device:
        return self.leaves[0].device

    def lists(self, is_causal: bool = False):
        """The lists the kernels walk for this reading of the map, as torch tensors: a
        ``mmfa_jax.block_sparse.BlockLists`` (kv_count, kv_full, kv_index, q_count, q_full,
        q_index)."""
        return self._view().lists(bool(is_causal))

    def computed_blocks(self, is_causal: bool = False) -> Tensor:
        """How many (batch, head, query block, key block) tiles a forward computes over the map's
        own (Bm, Nm), as an int32 scalar tensor: the cost in tiles."""
        return self.lists(is_causal).kv_count.sum(dtype=torch.int32)

    def to_jax(self) -> JaxBlockMask:
        """The ``mmfa_jax.BlockMask`` itself, over DLPack views of this mask's tensors."""
        return _unflatten(self.structure, [to_jax(t.contiguous()) for t in self.leaves])

    def to(self, device) -> "BlockMask":
        """This mask on ``device`` (its tensors copied there)."""
        return BlockMask([t.to(device) for t in self.leaves], self.structure, self.block_size, self.seq_lens)

    def __repr__(self):
        return (f"mmfa_torch.BlockMask(shape {self.shape}, block_size={self.block_size}, seq_lens={self.seq_lens}, "
                f"device={self.device})")


def _static_sizes(block_size, seq_lens):
    """block_size and seq_lens checked by the JAX face's own rules (the same messages)."""
    from mmfa_jax.block_sparse import _block_size, _seq_lens

    return _block_size(block_size), _seq_lens(seq_lens)


# ------------------------------------------------------------------------------------------------
# The attention through JAX (CPU tensors; CUDA tensors when not launched directly).


def _attend(q, k, v, mask, scale, is_causal, lowering):
    """The JAX face's call, its LSE in SDPA's (B, Hq, T) (which is the kernels' own layout: the two
    transposes cancel under jit)."""
    out, lse = mmfa_jax.block_sparse_attention(q, k, v, mask, scale=scale, is_causal=is_causal,
                                               implementation=lowering, return_lse=True)
    return out, jnp.swapaxes(lse, 1, 2)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _jax_forward(q, k, v, mask, scale, is_causal, lowering):
    return _attend(q, k, v, mask, scale, is_causal, lowering)


def _vjp(q, k, v, mask, d_out, d_lse, scale, is_causal, lowering):
    _, pullback = jax.vjp(lambda q, k, v: _attend(q, k, v, mask, scale, is_causal, lowering), q, k, v)
    return pullback((d_out, d_lse))


_jax_backward = jax.jit(_vjp, static_argnums=(6, 7, 8))


@functools.lru_cache(maxsize=512)
def _abstract_forward(signature: tuple, structure: str, scale, is_causal: bool, lowering):
    """(out, lse) ShapeDtypeStructs of a call: ``jax.eval_shape`` of the JAX face on the
    signature (q, k, v, then the mask's leaves), which runs all of its argument checks. Cached:
    once per distinct call; a failing call is not cached and raises again."""
    q, k, v, *leaves = _structs(signature)
    return jax.eval_shape(functools.partial(_attend, scale=scale, is_causal=is_causal, lowering=lowering), q, k, v,
                          _unflatten(structure, leaves))


# ------------------------------------------------------------------------------------------------
# The attention launched from torch (CUDA tensors).


def _kernel_operands(mask_view, is_causal: bool) -> dict:
    """The mask's part of the kernels' operands, by the plans' names: the lists of this reading
    (``BlockLists``' attribute names are the plans' operand names) and, for a causal call of a mask
    with positions, the positions (what ``mmfa_jax.block_sparse._run`` hands the kernels)."""
    named = dict(vars(mask_view.lists(is_causal)))
    positions = mask_view.positions
    if is_causal and positions is not None:
        named["q_pos"], named["kv_pos"] = positions
    return named


@functools.lru_cache(maxsize=256)
def _launch_kernels(signature: tuple, structure: str, scale, is_causal: bool, lowering, cc: int):
    """(forward, dQ, dK/dV) kernels of a call, lowered from the JAX face by the official triton for
    compute capability ``cc`` (``launch.capture``; the JAX face's checks, tiles and shared-memory
    fitting included). The backward's lowering is ``jax.vjp`` of the forward: its kernels are the
    forward's then the plans' backward pair, of which the launcher runs the latter."""
    route = lowering.via_triton_route()
    n = len(signature) - 3

    def forward(q, k, v, *leaves):
        return _attend(q, k, v, _unflatten(structure, leaves), scale, is_causal, route)

    def backward(q, k, v, *rest):
        leaves, (d_out, d_lse) = rest[:n], rest[n:]
        return _vjp(q, k, v, _unflatten(structure, leaves), d_out, d_lse, scale, is_causal, route)

    (fwd,) = launch.capture(forward, signature, cc, plans.block_sparse_forward())
    out, lse = _abstract_forward(signature, structure, scale, is_causal, lowering)
    cotangents = ((tuple(out.shape), out.dtype.name), (tuple(lse.shape), lse.dtype.name))
    _, dq, dkv = launch.capture(backward, signature + cotangents, cc,
                                plans.block_sparse_forward() + plans.block_sparse_backward())
    return fwd, dq, dkv


def _launched(q, k, v, leaves, structure, scale, is_causal, lowering):
    kernels = _launch_kernels(_signature([q, k, v, *leaves]), structure, scale, is_causal, lowering,
                              launch.compute_capability(q.device.index))
    named = dict(q=q, k=k, v=v, **_kernel_operands(_unflatten(structure, leaves), is_causal))
    return kernels, named


# ------------------------------------------------------------------------------------------------
# The ops: forward and backward on (B, T, H, D)-contiguous tensors, static options as plain values.


def _forward(q: Tensor, k: Tensor, v: Tensor, leaves: list[Tensor], structure: str, scale: Optional[float],
             is_causal: bool, backend: str, cc: int) -> tuple[Tensor, Tensor]:
    """(out (B, T, Hq, D) like q, lse (B, Hq, T) float32) of (B, T, H, D)-contiguous tensors."""
    lowering = ops.lowering(backend, cc)
    if ops.direct(backend, q):
        (fwd, _, _), named = _launched(q, k, v, leaves, structure, scale, is_causal, lowering)
        results = fwd.run(named, q.device)
        return results["out"], results["lse"]
    mask = _unflatten(structure, [to_jax(t) for t in leaves])
    out, lse = _jax_forward(to_jax(q), to_jax(k), to_jax(v), mask, scale, is_causal, lowering)
    return to_torch(out), to_torch(lse)


def _backward(q: Tensor, k: Tensor, v: Tensor, leaves: list[Tensor], out: Tensor, lse: Tensor, d_out: Tensor,
              d_lse: Tensor, structure: str, scale: Optional[float], is_causal: bool, backend: str,
              cc: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) like q, k, v, for cotangents d_out (B, T, Hq, D) and d_lse (B, Hq, T)."""
    lowering = ops.lowering(backend, cc)
    if ops.direct(backend, q):
        (_, dq_kernel, dkv_kernel), named = _launched(q, k, v, leaves, structure, scale, is_causal, lowering)
        # What the JAX face computes between the forward and the backward kernels, by its function.
        named.update(d_out=d_out, lse=lse,
                     delta=backward_delta(out, d_out, d_lse, _LAYOUT, f32=torch.Tensor.float).contiguous())
        grads = dq_kernel.run(named, q.device)
        grads.update(dkv_kernel.run(named, q.device))
        return grads["dq"], grads["dk"], grads["dv"]
    mask = _unflatten(structure, [to_jax(t) for t in leaves])
    dq, dk, dv = _jax_backward(to_jax(q), to_jax(k), to_jax(v), mask, to_jax(d_out), to_jax(d_lse), scale,
                               is_causal, lowering)
    return to_torch(dq), to_torch(dk), to_torch(dv)


_forward_op = torch.library.custom_op("mmfa::block_sparse_forward", _forward, mutates_args=())
_backward_op = torch.library.custom_op("mmfa::block_sparse_backward", _backward, mutates_args=())


@_forward_op.register_fake
def _(q, k, v, leaves, structure, scale, is_causal, backend, cc):
    out, lse = _abstract_forward(_signature([q, k, v, *leaves]), structure, scale, is_causal,
                                 ops.lowering(backend, cc))
    return tuple(_empty_like_structs((out, lse), q.device))


@_backward_op.register_fake
def _(q, k, v, leaves, out, lse, d_out, d_lse, structure, scale, is_causal, backend, cc):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_STATIC = ("structure", "scale", "is_causal", "backend", "cc")


def _setup_context(ctx, inputs, output):
    q, k, v, leaves, *static = inputs
    ctx.save_for_backward(q, k, v, *leaves, *output)
    ctx.static = tuple(static)


def _gradients(ctx, d_out, d_lse, backward):
    if torch.is_grad_enabled() and any(ctx.needs_input_grad):
        raise RuntimeError("mmfa block-sparse attention does not support double backward (create_graph=True, or a "
                           "gradient of a gradient): its backward kernels have no derivative of their own")
    q, k, v, *leaves, out, lse = ctx.saved_tensors
    d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
    d_lse = torch.zeros_like(lse) if d_lse is None else d_lse.contiguous()
    dq, dk, dv = backward(q, k, v, leaves, out, lse, d_out, d_lse, *ctx.static)
    # The custom op wants the inputs' structure back (a list for the leaves); an autograd.Function
    # wants None for an input that is not a tensor.
    no_leaf_grads = [None] * len(leaves) if backward is _backward_op else None
    return dq, dk, dv, no_leaf_grads, *(None,) * len(_STATIC)


_forward_op.register_autograd(lambda ctx, d_out, d_lse: _gradients(ctx, d_out, d_lse, _backward_op),
                              setup_context=_setup_context)


class _EagerSparse(torch.autograd.Function):
    """The same forward and backward for eager autograd, without the custom op's dispatch (host
    time on every call, as for ``mmfa_torch.ops.attention``)."""

    @staticmethod
    def forward(ctx, q, k, v, leaves, *static):
        output = _forward(q, k, v, leaves, *static)
        _setup_context(ctx, (q, k, v, leaves, *static), output)
        return output

    @staticmethod
    def backward(ctx, d_out, d_lse):
        return _gradients(ctx, d_out, d_lse, _backward)


# ------------------------------------------------------------------------------------------------
# The public function.


def block_sparse_attention(query: Tensor, key: Tensor, value: Tensor, block_mask: BlockMask, *,
                           scale: float | None = None, is_causal: bool = False, implementation: str | None = None,
                           return_lse: bool = False):
    """Attention restricted to a block map, in SDPA's layout: exact, memory-linear, cost
    proportional to the map's blocks.

    Shapes: query (B, Hq, T, D), key and value (B, Hkv, S, D), Hkv dividing Hq (GQA: query head n
    reads K/V head n // (Hq // Hkv); K/V are never repeated, no ``enable_gqa`` needed). Each may be
    (B, H, L, D)-contiguous or the ``transpose(1, 2)`` view of a (B, L, H, D)-contiguous tensor
    (no copy then).

    Args:
      query, key, value: float16, bfloat16 or float32 tensors of one dtype on one device; D up to
        256 for the kernels.
      block_mask: a ``mmfa_torch.BlockMask`` for seq_lens (T, S), of batch 1 or B and heads 1 or Hq,
        on the query's device. Query i attends to key j when block (i // block_q, j // block_k) is
        in the map (and j <= i with ``is_causal``). A row that sees no key gives zeros and LSE -inf.
      scale: logit scale, default 1/sqrt(D).
      is_causal: also the causal mask, aligned top-left (query i sees keys j <= i).
      implementation: "pallas" / "triton" (the compiled kernels; "pallas" is the default for CUDA
        tensors), "interpret" (the same kernels in the Pallas interpreter), "xla" (dense jax ops
        over the map's token mask, quadratic memory; the default for CPU tensors).
      return_lse: also return the log-sum-exp (B, Hq, T) float32, differentiable.

    Returns:
      The output (B, Hq, T, D) in query's dtype, as the ``transpose(1, 2)`` view of a
      (B, T, Hq, D)-contiguous tensor (and the LSE if asked). Differentiable in query, key and
      value (first order). Works under torch.compile (fullgraph). Bad arguments raise
      ``ArgumentError`` / ``ArgumentTypeError`` (ValueError / TypeError, and RuntimeError as SDPA's),
      naming the argument and its value.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ArgumentError(f"{name} must have rank 4 (B, H, L, D), got shape {tuple(t.shape)}")
        # Checked here too: JAX (without x64) would read a float64 description as float32.
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ArgumentTypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (query.device == key.device == value.device):
        raise ArgumentError(f"query, key and value must be on one device, got {query.device}, {key.device}, "
                            f"{value.device}")
    if not isinstance(block_mask, BlockMask):
        raise ArgumentTypeError(f"block_mask must be a mmfa_torch.BlockMask (BlockMask.from_dense / from_indices / "
                                f"from_flex), got {type(block_mask).__name__}")
    if block_mask.device != query.device:
        raise ArgumentError(f"block_mask is on {block_mask.device} but query is on {query.device}: build the mask "
                            f"from a map on the query's device, or move it with block_mask.to(device)")
    scale = _checks.checked_scale(scale)
    is_causal = bool(is_causal)
    lowering = _lowering(implementation, query.device)
    # The JAX face's layout: a view when the inputs already are (B, L, H, D)-contiguous.
    q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
    leaves = list(block_mask.leaves)
    structure = block_mask.structure
    # Every argument check of the JAX face, once per distinct call (cached), before any work; under
    # torch.compile the forward op's fake kernel runs the same checks while the graph is traced.
    if not torch.compiler.is_compiling():
        _abstract_forward(_signature([q, k, v, *leaves]), structure, scale, is_causal, lowering)
    if _checks.attention_dims(q, k, v, _LAYOUT, xla=not lowering.kernels).empty:
        out, lse = _Empty.apply(query, key, value)
        return (out, lse) if return_lse else out
    static = (structure, scale, is_causal, lowering.backend, -1 if lowering.cc is None else lowering.cc)
    if torch.compiler.is_compiling():
        out, lse = _forward_op(q, k, v, leaves, *static)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out, lse = _EagerSparse.apply(q, k, v, leaves, *static)
    else:
        out, lse = _forward(q, k, v, leaves, *static)
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


__all__ = ["BlockMask", "block_sparse_attention"]
