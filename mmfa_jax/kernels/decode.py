"""Split-KV decode attention (Flash-Decoding): a few query rows against a long KV cache.

A decode step has T (1 to 16) query rows per head and S cache entries: the forward's grid of
query tiles would give B * Hq programs, far too few to fill a GPU at batch 1, each reading the
whole cache. Here the cache is split instead:

  ``mmfa_decode_partial``  grid (B, Hkv, splits). One program takes all G * T query rows of one
                           KV head (G = Hq // Hkv, the GQA group), packed into one query tile of
                           at least 16 rows (``tile_rows``), so K and V are read once per KV head,
                           never repeated. It walks its contiguous share of the example's valid
                           cache in blocks of ``block_k`` keys (the share comes from the example's
                           length: work is proportional to the valid cache, not to its capacity),
                           with an online softmax in float32 (logits in base 2, exp2), and writes
                           a partial output (float32, normalised) and a partial log-sum-exp (base
                           2) per row of the tile.
  ``mmfa_decode_merge``    grid (B, Hkv). Merges the splits of each row by their log-sum-exp into
                           the output (the query's layout and dtype) and the LSE (natural log).

Both are ``pallas_call``s whose operands and results are ordered by ``mmfa_jax.plans``
(``DECODE_PARTIAL``, ``DECODE_MERGE``); nothing but free reshapes lies between or around them.

Runtime cache length. K and V reach the partial kernel flattened to 2-D, (rows, D), and with an
int32 operand ``seq_len`` of shape (1,): the S the cache really has. Every key's row is computed
from (b, h, s) with that runtime S,

    layout "BNTH" (torch's, a transformers cache): row = (b * Hkv + h) * S + s
    layout "BTNH" (jax's):                         row = (b * S + s) * Hkv + h

and only keys s < min(kv_lengths[b], S) are loaded (masked loads elsewhere), so no row at or
past B * Hkv * S is ever read. An optional key mask (int8, flattened to (B * S,), entry b * S + s
with the same runtime S; nonzero: the key may be seen) hides single keys from every row: left
padding, a static cache's unwritten tail, a window; hidden keys are not loaded either. A kernel compiled for a capacity C >= S (its static row count
B * Hkv * C, ``DecodeProblem.capacity``) is therefore correct when launched on a cache of S
entries, which lets a launcher reuse one compiled kernel for a bucket of cache lengths. (Row
numbers are int32, so fewer than 2**31 rows; Pallas's lowering turns them into 64-bit element
offsets for arrays over 4 GiB, judged by the static shape: the capacity's.)

Query tile rows: row r of the tile is query head h * G + r // T, query row r % T; rows at or
past G * T are padding (loaded as 0, never stored). Query row t of example b sees keys
j < kv_len - T + 1 + t (kv_len = min(kv_lengths[b], S)): the last T positions of its sequence,
bottom-right causal; a row that sees no key gives zeros and LSE -inf. Value rows past the
length read as 0 and their logits are -inf, so a cache's unwritten tail (garbage, NaN) never
reaches the result, while a NaN inside the visible range does (l and lse become NaN, as in the
forward).

q and the output are flattened to 2-D as well ((B * T * Hq, D) in "BTNH", (B * Hq * T, D) in
"BNTH"; the LSE to (B * Hq * T,)), and the rows of one tile are read and written by index.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmfa_jax import plans
from mmfa_jax.backends import Lowering
from mmfa_jax.kernels.common import (
    LN2,
    block_size,
    dot,
    logits,
    online_softmax_step,
    padded_head_dim,
    whole_spec,
)
from mmfa_jax.masking import combine
from mmfa_jax.tuning import KernelConfig

MAX_QUERY_ROWS = 16  # T: the rows of a decode step (speculative or chunked steps included)
MIN_TILE_ROWS = 16  # tl.dot wants at least 16 rows

# Splits: aim at about this many partial programs (B * Hkv * splits), 3 waves of an H200's
# 132 SMs, so that short and long splits even out; but give every split at least this many
# key blocks, so that its fixed cost (the query tile, the partial rows, the merge) stays small.
SM_COUNT = 132
PROGRAMS_PER_SM = 3
MIN_BLOCKS_PER_SPLIT = 4

# (GPU family, largest padded head dim) -> (block_k, num_warps, num_stages) of the partial
# kernel for 16-bit inputs; float32 takes half the block (twice the bytes a key). The loop reads
# a K and a V block per step and does two small dots: memory-bound, so the blocks are sized for
# bytes in flight (cp.async stages of K and V blocks) rather than for the tensor cores. Wide query
# tiles (large GQA groups times many rows) shrink them until they fit shared memory (``_fitted``).
# Not tuned on a GPU yet. "any" is the interpreter (and anything else).
DECODE_TABLE: dict[tuple[str, int], tuple[int, int, int]] = {
    ("sm90", 128): (128, 4, 2),
    ("sm90", 256): (64, 4, 2),
    ("sm80", 128): (128, 4, 2),
    ("sm80", 256): (64, 4, 2),
    ("sm75", 128): (64, 4, 1),  # Turing: 64 KiB of shared memory, no cp.async to pipeline with
    ("sm75", 256): (32, 4, 1),
    ("any", 128): (64, 4, 2),
    ("any", 256): (64, 4, 2),
}
MERGE_WARPS, MERGE_STAGES = 4, 1
# Query tiles of more rows (large GQA groups times several query rows) hold a float32 accumulator
# of tile_rows x D: past this many rows both kernels take WIDE_TILE_WARPS warps, so that it fits
# in registers (a heuristic, not measured).
WIDE_TILE_ROWS, WIDE_TILE_WARPS = 64, 8
# The share of a GPU's shared memory per block that ``shared_bytes`` may estimate for a config.
SHARED_MARGIN = 0.9


@dataclasses.dataclass(frozen=True)
class DecodeProblem:
    """Static description of one decode call: what the two kernels are specialised on.

    capacity: the cache length the partial kernel is compiled for (K and V have
    batch * kv_heads * capacity rows); the cache length itself is the runtime ``seq_len``."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int  # T
    capacity: int
    head_dim: int
    scale: float
    softcap: float | None
    layout: str  # "BTNH" (jax) or "BNTH" (torch)
    has_kv_lengths: bool
    has_key_mask: bool
    dot_precision: str | None  # None: the dtype's default; "highest" for float32 inputs
    splits: int
    block_k: int

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def head_dim_padded(self) -> int:
        return padded_head_dim(self.head_dim)

    @property
    def tile_rows(self) -> int:
        """The packed query tile: G * T rows, padded to a power of two of at least 16."""
        return max(MIN_TILE_ROWS, pl.next_power_of_2(self.group * self.q_len))

    @property
    def kv_rows(self) -> int:
        return self.batch * self.kv_heads * self.capacity

    @property
    def q_rows(self) -> int:
        return self.batch * self.q_len * self.q_heads


def config_for(head_dim_padded: int, dtype, family: str) -> KernelConfig:
    """The partial kernel's (block_k, num_warps, num_stages) for a head size on a GPU family, as a
    ``KernelConfig`` (block_q unused: the query tile is ``DecodeProblem.tile_rows``)."""
    key = min((d for (fam, d) in DECODE_TABLE if fam == family and d >= head_dim_padded), default=None)
    if key is None:
        family = "any"
        key = min(d for (fam, d) in DECODE_TABLE if fam == family and d >= head_dim_padded)
    block_k, warps, stages = DECODE_TABLE[(family, key)]
    if jnp.dtype(dtype) == jnp.float32:
        block_k = max(16, block_k // 2)
    return KernelConfig(MIN_TILE_ROWS, block_k, warps, stages)


def default_splits(batch: int, kv_heads: int, capacity: int, block_k: int) -> int:
    """Splits per (example, KV head): about ``PROGRAMS_PER_SM * SM_COUNT`` partial programs in
    all, at most one split per ``MIN_BLOCKS_PER_SPLIT`` blocks of the cache, at least 1."""
    blocks = pl.cdiv(capacity, block_k)
    wanted = pl.cdiv(PROGRAMS_PER_SM * SM_COUNT, max(1, batch * kv_heads))
    return max(1, min(wanted, blocks // MIN_BLOCKS_PER_SPLIT))


def make_problem(*, batch, q_heads, kv_heads, q_len, kv_len, head_dim, dtype, scale, softcap, layout,
                 has_kv_lengths, family, has_key_mask=False, cc=None, splits=None,
                 capacity=None) -> tuple[DecodeProblem, KernelConfig]:
    """The problem and the partial kernel's configuration of a checked call, for GPU family
    ``family`` and compute capability ``cc`` (None: no shared-memory limit, the interpreter).
    ``capacity``: the static cache length to compile for, default ``kv_len``; ``splits``: default
    ``default_splits``."""
    capacity = kv_len if capacity is None else capacity
    hp = padded_head_dim(head_dim)
    tile_rows = max(MIN_TILE_ROWS, pl.next_power_of_2((q_heads // kv_heads) * q_len))
    cfg = config_for(hp, dtype, family)
    cfg = _fitted(cfg, tile_rows, hp, jnp.dtype(dtype).itemsize, cc)
    cfg = dataclasses.replace(cfg, block_q=tile_rows, block_k=block_size(capacity, cfg.block_k),
                              num_warps=_warps(tile_rows, cfg.num_warps))
    if splits is None:
        splits = default_splits(batch, kv_heads, capacity, cfg.block_k)
    p = DecodeProblem(batch=batch, q_heads=q_heads, kv_heads=kv_heads, q_len=q_len, capacity=capacity,
                      head_dim=head_dim, scale=scale, softcap=softcap, layout=layout,
                      has_kv_lengths=has_kv_lengths, has_key_mask=has_key_mask,
                      dot_precision="highest" if jnp.dtype(dtype) == jnp.float32 else None,
                      splits=int(splits), block_k=cfg.block_k)
    assert p.tile_rows == tile_rows
    return p, cfg


def _warps(tile_rows: int, warps: int) -> int:
    return max(warps, WIDE_TILE_WARPS) if tile_rows > WIDE_TILE_ROWS else warps


def shared_bytes(cfg: KernelConfig, tile_rows: int, head_dim_padded: int, itemsize: int) -> int:
    """A (generous) estimate of the partial kernel's shared memory: K and V blocks per stage, the
    query tile and the probabilities (the dots' staged operands). Checked against Triton's own
    figures for sm_75, sm_80 and sm_90 by cross-compiling (tests/test_decode.py)."""
    kv = max(1, cfg.num_stages) * 2 * cfg.block_k * head_dim_padded * itemsize
    return kv + tile_rows * head_dim_padded * itemsize + tile_rows * cfg.block_k * itemsize


def _fitted(cfg: KernelConfig, tile_rows: int, hp: int, itemsize: int, cc: int | None) -> KernelConfig:
    """``cfg`` with block_k halved (down to 16), then stages cut (down to 1), until the estimate
    fits ``SHARED_MARGIN`` of the GPU's shared memory per block (wide query tiles: large GQA
    groups times many rows, or d256); unchanged without a GPU."""
    if cc is None:
        return cfg
    from mmfa_jax.triton_route import SHARED_MEMORY_PER_BLOCK

    budget = SHARED_MARGIN * SHARED_MEMORY_PER_BLOCK.get(cc, min(SHARED_MEMORY_PER_BLOCK.values()))
    while shared_bytes(cfg, tile_rows, hp, itemsize) > budget:
        if cfg.block_k > 16:
            cfg = dataclasses.replace(cfg, block_k=cfg.block_k // 2)
        elif cfg.num_stages > 1:
            cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
        else:
            break  # the smallest configuration: let the compiler say whether it fits
    return cfg


# --------------------------------------------------------------------------------------------
# The tile's rows.


def _tile(p: DecodeProblem, b, h):
    """Per row of the query tile: (row of the flattened q / output, index into the flattened
    LSE, query row t, valid), for example b and KV head h. Padding rows point past the arrays,
    each to its own place: they are masked, but the interpreter's masked stores still write (the
    old value) where they point, so they must not meet a valid row."""
    r = jnp.arange(p.tile_rows, dtype=jnp.int32)
    g, t = r // p.q_len, r % p.q_len
    head = h * p.group + g
    if p.layout == "BTNH":
        row = (b * p.q_len + t) * p.q_heads + head
    else:
        row = (b * p.q_heads + head) * p.q_len + t
    lse_index = (b * p.q_heads + head) * p.q_len + t
    valid = r < p.group * p.q_len
    return jnp.where(valid, row, p.q_rows + r), jnp.where(valid, lse_index, p.q_rows + r), t, valid


def _columns(p: DecodeProblem):
    cols = jnp.arange(p.head_dim_padded, dtype=jnp.int32)
    return cols, (None if p.head_dim_padded == p.head_dim else (cols < p.head_dim)[None, :])


def _load(ref, rows, cols, row_mask, col_mask):
    """The tile at rows (int vector) of a 2-D ref; masked rows and columns read as 0."""
    mask = combine(None if row_mask is None else row_mask[:, None], col_mask)
    return plgpu.load(ref.at[rows[:, None], cols[None, :]], mask=mask, other=None if mask is None else 0)


# --------------------------------------------------------------------------------------------
# The kernels.


def _partial_kernel(q_ref, k_ref, v_ref, seq_len_ref, kvlen_ref, key_mask_ref, o_ref, lse_ref, *, p: DecodeProblem):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cols, col_mask = _columns(p)
    q_row, _, t, valid = _tile(p, b, h)
    q = _load(q_ref, q_row, cols, valid, col_mask)

    seq_len = seq_len_ref[0]
    kv_valid = seq_len if kvlen_ref is None else jnp.clip(kvlen_ref[...], 0, seq_len)
    # Query row t sees keys j < kv_valid - T + 1 + t: every row sees the keys before ``full_keys``.
    limit = kv_valid - (p.q_len - 1) + t
    full_keys = kv_valid - (p.q_len - 1)

    # This split's contiguous share of the valid blocks (shares differ by at most one block).
    bk = p.block_k
    num_blocks = pl.cdiv(kv_valid, bk)
    lo = split * num_blocks // p.splits
    hi = (split + 1) * num_blocks // p.splits
    full_hi = jnp.clip(jnp.maximum(full_keys, 0) // bk, lo, hi)  # blocks below: seen by every row, all valid

    # Key position s of example b, KV head h is row base + s * stride of the flattened K / V.
    if p.layout == "BTNH":
        base, stride = b * seq_len * p.kv_heads + h, p.kv_heads
    else:
        base, stride = (b * p.kv_heads + h) * seq_len, 1

    def body(j, carry, masked):
        acc, m, l = carry
        k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)
        rows = base + k_pos * stride
        # Keys at or past the length, or hidden by the key mask, are not loaded (values as 0:
        # 0 * NaN would reach every row).
        in_cache = k_pos < kv_valid if masked else None
        if masked and key_mask_ref is not None:
            shown = plgpu.load(key_mask_ref.at[b * seq_len + k_pos], mask=in_cache, other=0) != 0
            in_cache = in_cache & shown
        k = _load(k_ref, rows, cols, in_cache, col_mask)
        v = _load(v_ref, rows, cols, in_cache, col_mask)
        s, _ = logits(p, dot(p, q, k, trans_b=True), None)
        if masked:
            seen = k_pos[None, :] < limit[:, None]
            if key_mask_ref is not None:
                seen = seen & shown[None, :]
            s = jnp.where(seen, s, -jnp.inf)
        return online_softmax_step(p, (acc, m, l), s, v)

    carry = (jnp.zeros((p.tile_rows, p.head_dim_padded), jnp.float32),
             jnp.full((p.tile_rows,), -jnp.inf, jnp.float32),
             jnp.zeros((p.tile_rows,), jnp.float32))
    if key_mask_ref is None:  # (with a key mask any key may be hidden: every block is masked)
        carry = lax.fori_loop(lo, full_hi, functools.partial(body, masked=False), carry)
    else:
        full_hi = lo
    acc, m, l = lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)

    # l is exactly 0 where a row saw nothing in this split; NaN in the inputs makes it NaN.
    live = l != 0
    safe_l = jnp.where(live, l, 1.0)
    o_ref[...] = jnp.where(live[:, None], acc / safe_l[:, None], 0.0)
    lse_ref[...] = jnp.where(live, m + jnp.log2(safe_l), -jnp.inf)  # base 2


def _merge_kernel(po_ref, plse_ref, o_ref, lse_ref, *, p: DecodeProblem):
    b, h = pl.program_id(0), pl.program_id(1)
    cols, col_mask = _columns(p)
    row, lse_index, _, valid = _tile(p, b, h)

    def body(s, carry):
        acc, m, l = carry
        lse_s = plse_ref[s, :]
        m_new = jnp.maximum(m, lse_s)
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - shift)
        w = jnp.exp2(lse_s - shift)  # 0 for a split that saw nothing (its partial output is 0)
        l = l * alpha + w
        acc = acc * alpha[:, None] + po_ref[s, :, :] * w[:, None]
        return acc, m_new, l

    carry = (jnp.zeros((p.tile_rows, p.head_dim_padded), jnp.float32),
             jnp.full((p.tile_rows,), -jnp.inf, jnp.float32),
             jnp.zeros((p.tile_rows,), jnp.float32))
    acc, m, l = lax.fori_loop(0, p.splits, body, carry)
    live = l != 0  # no split saw a key: zeros and -inf; NaN stays NaN
    safe_l = jnp.where(live, l, 1.0)
    out = jnp.where(live[:, None], acc / safe_l[:, None], 0.0)
    lse = jnp.where(live, (m + jnp.log2(safe_l)) * LN2, -jnp.inf)
    plgpu.store(o_ref.at[row[:, None], cols[None, :]], out.astype(o_ref.dtype), mask=combine(valid[:, None], col_mask))
    plgpu.store(lse_ref.at[lse_index], lse, mask=valid)


# --------------------------------------------------------------------------------------------
# Launchers.


def partial(p: DecodeProblem, cfg: KernelConfig, q2, k2, v2, seq_len, kv_lengths, key_mask, *, lowering: Lowering):
    """The partial kernel on flattened arrays: q2 (p.q_rows, D), k2 / v2 (p.kv_rows, D) (a cache of
    ``seq_len[0]`` <= p.capacity entries in their first B * Hkv * seq_len rows), seq_len (1,) int32,
    kv_lengths (B,) int32 or None, key_mask (B * p.capacity,) int8 or None (its first B * seq_len
    entries are read). Returns the partial output (B, Hkv, splits, tile_rows, Dp)
    float32 and log-sum-exp (B, Hkv, splits, tile_rows) float32 (base 2)."""
    hp, m = p.head_dim_padded, p.tile_rows
    in_specs = [
        whole_spec(q2.shape), whole_spec(k2.shape), whole_spec(v2.shape), whole_spec(seq_len.shape),
        pl.BlockSpec((None,), lambda b, h, s: (b,)) if kv_lengths is not None else None,
        whole_spec(key_mask.shape) if key_mask is not None else None,
    ]
    out_specs = [pl.BlockSpec((None, None, None, m, hp), lambda b, h, s: (b, h, s, 0, 0)),
                 pl.BlockSpec((None, None, None, m), lambda b, h, s: (b, h, s, 0))]
    out_shape = [jax.ShapeDtypeStruct((p.batch, p.kv_heads, p.splits, m, hp), jnp.float32),
                 jax.ShapeDtypeStruct((p.batch, p.kv_heads, p.splits, m), jnp.float32)]
    return pl.pallas_call(
        functools.partial(_partial_kernel, p=p), grid=(p.batch, p.kv_heads, p.splits), in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape, **lowering.pallas_args(cfg), name=plans.DECODE_PARTIAL.name,
    )(*plans.DECODE_PARTIAL.ordered(q=q2, k=k2, v=v2, seq_len=seq_len, kv_lengths=kv_lengths, key_mask=key_mask))


def merge(p: DecodeProblem, partial_out, partial_lse, out_dtype, *, lowering: Lowering):
    """The merge kernel: the flattened output (p.q_rows, D) in ``out_dtype`` and LSE (B * Hq * T,)
    float32 (natural log; -inf for rows that see no key)."""
    hp, m = p.head_dim_padded, p.tile_rows
    cfg = KernelConfig(m, p.block_k, _warps(m, MERGE_WARPS), MERGE_STAGES)
    in_specs = [pl.BlockSpec((None, None, p.splits, m, hp), lambda b, h: (b, h, 0, 0, 0)),
                pl.BlockSpec((None, None, p.splits, m), lambda b, h: (b, h, 0, 0))]
    out_shape = [jax.ShapeDtypeStruct((p.q_rows, p.head_dim), out_dtype),
                 jax.ShapeDtypeStruct((p.batch * p.q_heads * p.q_len,), jnp.float32)]
    out_specs = [whole_spec(s.shape) for s in out_shape]
    return pl.pallas_call(
        functools.partial(_merge_kernel, p=p), grid=(p.batch, p.kv_heads), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, **lowering.pallas_args(cfg), name=plans.DECODE_MERGE.name,
    )(*plans.DECODE_MERGE.ordered(partial_out=partial_out, partial_lse=partial_lse))


def decode(p: DecodeProblem, cfg: KernelConfig, q, k, v, kv_lengths, key_mask=None, *, lowering: Lowering):
    """Decode attention by the two kernels. q (B, T, Hq, D) or (B, Hq, T, D) (``p.layout``), k / v
    (B, S, Hkv, D) or (B, Hkv, S, D) with S <= p.capacity, kv_lengths (B,) int32 or None, key_mask
    (B, S) int8 or None (nonzero: the key may be seen). Returns
    (out like q, lse (B, Hq, T) float32).

    With p.capacity > S (a kernel compiled for a larger cache: what a launcher reusing one kernel
    for a bucket of lengths does), the flattened K and V are padded with NaN rows up to
    B * Hkv * capacity: the kernels must never read them (a check of the runtime addressing)."""
    S = k.shape[1 if p.layout == "BTNH" else 2]
    hd = p.head_dim
    q2 = q.reshape(p.q_rows, hd)
    k2, v2 = k.reshape(-1, hd), v.reshape(-1, hd)
    if p.capacity > S:
        pad = jnp.full((p.kv_rows - k2.shape[0], hd), jnp.nan, k2.dtype)
        k2, v2 = jnp.concatenate([k2, pad]), jnp.concatenate([v2, pad])
    if key_mask is not None:  # (the capacity's rows past B * S: never read, so anything)
        key_mask = jnp.pad(key_mask.reshape(-1), (0, p.batch * (p.capacity - S)))
    seq_len = jnp.full((1,), S, jnp.int32)
    partial_out, partial_lse = partial(p, cfg, q2, k2, v2, seq_len, kv_lengths, key_mask, lowering=lowering)
    out2, lse1 = merge(p, partial_out, partial_lse, q.dtype, lowering=lowering)
    return out2.reshape(q.shape), lse1.reshape(p.batch, p.q_heads, p.q_len)
