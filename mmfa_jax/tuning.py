"""Block configurations of the attention kernels, kept as data.

A row is chosen by GPU family and padded head dimension; on Ampere and Hopper float32 inputs take
half the tiles (their operands are twice as large). Measured on the H100 with ``bench/attention.py --sweep``;
figures and the command are in bench/NOTES.md.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters of one kernel.

    block_q / block_k: query rows and key rows per tile (powers of two, at least 16).
    num_warps / num_stages: Triton's warps per program and software-pipelining depth.
    split_head: (the forward kernel) a head dimension that is not a power of two is computed in
      two power-of-two column chunks when it rounds up to their sum (72 and 80 as 64 + 16, 96 as
      64 + 32) instead of padded (to 128): ``kernels.common.head_chunks``.
    """

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int
    split_head: bool = False

    def halved(self) -> "KernelConfig":
        return dataclasses.replace(self, block_q=max(16, self.block_q // 2), block_k=max(16, self.block_k // 2))


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Configurations of the forward kernel and the two backward kernels, and of the scorer
    kernels of visual-token importance (a few query rows over all keys: memory-bound, so their
    best tiles differ; None: the forward's)."""

    forward: KernelConfig
    backward_dq: KernelConfig
    backward_dkv: KernelConfig
    scorer: KernelConfig | None = None
    forward_small: KernelConfig | None = None  # see ``for_problem``
    forward_rows: KernelConfig | None = None  # see ``for_problem``

    @property
    def scoring(self) -> KernelConfig:
        return self.scorer or self.forward

    def for_problem(self, batch: int, heads: int, q_len: int, *, kv_rows: bool = False) -> "AttentionConfig":
        """The configuration for one attention problem: ``forward_small`` takes the forward's
        place when the forward's own tiles would give at most ``FEW_PROGRAMS`` programs (short
        sequences, under one program per SM: there smaller tiles finish sooner); otherwise
        ``forward_rows`` does when the forward reads its key and value rows by index
        (``kv_rows``: the loads of gathered rows pipeline differently, so other tiles win)."""
        if self.forward_small is not None and batch * heads * -(-q_len // self.forward.block_q) <= FEW_PROGRAMS:
            forward = self.forward_small
        elif kv_rows and self.forward_rows is not None:
            forward = self.forward_rows
        else:
            return self
        return dataclasses.replace(self, forward=forward, forward_small=None, forward_rows=None)

    def reads_rows_in_place(self, kept_len: int) -> bool:
        """Whether the pruning pipeline's forward should read its kept key/value rows in place
        (``forward_rows``) rather than from gathered copies: on rows where the table has such
        tiles, for kept sequences up to ``ROWS_IN_PLACE_MAX`` tokens."""
        return self.forward_rows is not None and kept_len <= ROWS_IN_PLACE_MAX

    def map(self, f) -> "AttentionConfig":
        """This configuration with ``f`` applied to each of its kernel configurations."""
        optional = lambda c: None if c is None else f(c)  # noqa: E731
        return AttentionConfig(f(self.forward), f(self.backward_dq), f(self.backward_dkv), optional(self.scorer),
                               optional(self.forward_small), optional(self.forward_rows))

    def halved(self) -> "AttentionConfig":
        return self.map(KernelConfig.halved)

    def fewer_stages(self) -> "AttentionConfig | None":
        """One software-pipelining stage fewer in every kernel (at least one), or None when every
        kernel has one already: what a launch retries with when a kernel needs more shared memory
        than the GPU has."""
        if all(c.num_stages <= 1 for c in (self.forward, self.backward_dq, self.backward_dkv)):
            return None
        return self.map(lambda c: dataclasses.replace(c, num_stages=max(1, c.num_stages - 1)))


K = KernelConfig

# One wave of the H100's 132 SMs: at or under this many forward programs, ``forward_small``.
FEW_PROGRAMS = 132

# Kept sequences up to this length read their key/value rows in place; longer ones are gathered
# first, since the loads by index slow the forward more than the gather costs as the sequence grows
# (H100, 16 heads x 128, bf16, causal: at 4,160 kept tokens gather + forward 193 us against 180 in
# place; at 8,256 even; at 12,352 the pipeline 1.56 against 1.62 ms; bench/NOTES.md).
ROWS_IN_PLACE_MAX = 8192

# (family, padded head dim) -> configs. "sm90": Hopper; "sm80": Ampere and Ada; "sm75": Turing; "any": the rest,
# including the CPU interpreter (where large tiles mean fewer interpreted grid steps).
TABLE: dict[tuple[str, int], AttentionConfig] = {
    ("sm90", 32): AttentionConfig(K(64, 128, 4, 2), K(128, 64, 4, 3), K(128, 64, 4, 2)),
    ("sm90", 64): AttentionConfig(K(64, 128, 4, 2), K(128, 64, 4, 3), K(128, 64, 4, 2)),
    ("sm90", 128): AttentionConfig(K(128, 128, 8, 3, split_head=True), K(128, 64, 8, 3), K(64, 64, 4, 2),
                                   scorer=K(128, 64, 4, 2), forward_small=K(64, 64, 4, 3, split_head=True),
                                   forward_rows=K(128, 64, 4, 3, split_head=True)),
    ("sm90", 256): AttentionConfig(K(64, 64, 4, 2), K(64, 32, 4, 2), K(32, 64, 4, 2)),
    ("sm80", 32): AttentionConfig(K(128, 64, 4, 3), K(128, 32, 4, 2), K(32, 128, 4, 2)),
    ("sm80", 64): AttentionConfig(K(128, 64, 4, 3), K(128, 32, 4, 2), K(32, 128, 4, 2)),
    ("sm80", 128): AttentionConfig(K(128, 64, 4, 2), K(64, 64, 4, 2), K(64, 64, 4, 2)),
    ("sm80", 256): AttentionConfig(K(64, 32, 4, 2), K(32, 32, 4, 2), K(32, 32, 4, 2)),
    # Turing (sm_75, through mmfa_jax.triton_route): 64 KiB of shared memory per block, and no mma
    # in Triton's code for it (dots are FMA loops whose operands are staged in shared memory), so
    # small tiles; no cp.async to pipeline loads with, so one stage. float32 has rows of its own
    # ("sm75-float32"): it stages more (d=256 fits only with 16x16 tiles and 2 warps). Every row
    # is compiled for sm_75 in CI and checked to fit (tests/test_turing.py); measured bytes:
    # fwd/dq/dkv 48K/32K/40K (d32), 64K/40K/48K (d64), 48K/48K/64K (d128), 64K/48K/64K (d256).
    ("sm75", 32): AttentionConfig(K(64, 64, 4, 1), K(64, 64, 4, 1), K(64, 64, 4, 1)),
    ("sm75", 64): AttentionConfig(K(64, 64, 4, 1), K(64, 32, 4, 1), K(64, 32, 4, 1)),
    ("sm75", 128): AttentionConfig(K(64, 32, 4, 1), K(32, 32, 4, 1), K(32, 32, 4, 1)),
    ("sm75", 256): AttentionConfig(K(32, 32, 4, 1), K(16, 16, 4, 1), K(16, 16, 4, 1)),
    ("sm75-float32", 32): AttentionConfig(K(64, 64, 4, 1), K(64, 64, 4, 1), K(64, 64, 4, 1)),
    ("sm75-float32", 64): AttentionConfig(K(64, 64, 4, 1), K(64, 32, 4, 1), K(64, 32, 4, 1)),
    ("sm75-float32", 128): AttentionConfig(K(64, 32, 4, 1), K(16, 16, 4, 1), K(16, 16, 4, 1)),
    ("sm75-float32", 256): AttentionConfig(K(16, 16, 4, 1), K(16, 16, 2, 1), K(16, 16, 2, 1)),
    # (The interpreter's rows read the pipeline's kept rows in place and split head dims, so the CPU
    # suite runs those paths.)
    ("any", 32): AttentionConfig(K(64, 64, 4, 2, True), K(64, 64, 4, 2), K(64, 64, 4, 2),
                                 forward_rows=K(64, 64, 4, 2, True)),
    ("any", 64): AttentionConfig(K(64, 64, 4, 2, True), K(64, 64, 4, 2), K(64, 64, 4, 2),
                                 forward_rows=K(64, 64, 4, 2, True)),
    ("any", 128): AttentionConfig(K(64, 64, 4, 2, True), K(64, 64, 4, 2), K(64, 64, 4, 2),
                                  forward_rows=K(64, 64, 4, 2, True)),
    ("any", 256): AttentionConfig(K(32, 32, 4, 2, True), K(32, 32, 4, 2), K(32, 32, 4, 2),
                                  forward_rows=K(32, 32, 4, 2, True)),
}


def config_for(head_dim_padded: int, dtype, family: str) -> AttentionConfig:
    """The table's row for this head size on a GPU family (``mmfa_jax.backends.Lowering.family``:
    "sm90", "sm80", "sm75" or "any"); float32 takes half the tiles (on Turing: its own rows)."""
    if family == "sm75" and jnp.dtype(dtype) == jnp.float32:
        family = "sm75-float32"
    key = min((d for (fam, d) in TABLE if fam == family and d >= head_dim_padded), default=None)
    if key is None:
        raise ValueError(f"no kernel configuration for head_dim {head_dim_padded} on {family}")
    cfg = TABLE[(family, key)]
    return cfg.halved() if jnp.dtype(dtype) == jnp.float32 and family in ("sm80", "sm90") else cfg
