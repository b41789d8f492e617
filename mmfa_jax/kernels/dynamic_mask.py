"""Dynamic mask attention (Flash-DMA): per-row top-k key selection by zoh, and the attention over
the kept keys, forward and backward, in Pallas (Triton lowering).

Semantics (``mmfa_jax.dynamic_mask``): query row t of KV head h may see the keys its causal band,
key length and segments allow; of those it keeps the ``keep`` best by ``zoh[b, h, s]``, ties to
the lower key index, a NaN zoh counting as larger than every number; logits on kept keys are
``scale * q.k + zoh``.

Order. zoh values become int32 keys by an order-preserving map of the float32 bits (``order_key``:
negative floats have their 31 low bits flipped, -0 reads as +0, NaN as INT32_MAX), so that "key a
beats key b" is the lexicographic ``(key_a, -a) > (key_b, -b)``: every pair of keys is ordered,
ties included. One XLA sort per (batch, KV head) puts the keys in that order, best first
(``sort_keys``); a key's **rank** is its place in it (``ranks``), so "a beats b" is ``rank_a <
rank_b``. A row's **threshold** is the best key it does *not* keep (the (keep+1)-th best allowed
key), held as that key's rank, or S when the row allows at most ``keep`` keys; the row keeps
exactly the allowed keys ranked before its threshold: one integer comparison per logit in the
attention kernels. Thresholds are (B, K, T) int32 (``thr_pos``): no T x S memory anywhere.

Two cases, decided statically (``DmaProblem.nested``):

* **nested** (no segment ids): a row's allowed keys are a prefix [0, e_t) of the keys, with
  e_t = clamp(t + offset + 1, 0, kv_len) under the causal band (top-left offset 0, bottom-right
  S - T) and e_t = kv_len without it. Prefixes grow with t, so thresholds never decrease, and a
  key that row t >= t0 keeps is either kept by row t0 or one of the keys [e_t0, e_t) that entered
  since: the kept keys of the whole query tile [t0, t0 + block_q) are among
  ``min(keep, e_t0) + (e_last - e_t0) <= keep + block_q - 1`` **candidates**.
  With the sorted order and the ranks comes a count table (``count_table``: for key boundaries m *
  block_q and position boundaries c * width, how many sorted positions before the latter hold a
  key before the former). Row t's threshold is the (keep+1)-th sorted position holding a key
  < e_t. ``mmfa_dma_select`` (grid (query tiles, K, B), once per KV head: the GQA group shares
  it) reads from the table the bracket of sorted positions where the tile's rows reach that
  count, counts per row inside the bracket only (a cumulative sum along each chunk), and lists
  the tile's candidates: row t0's kept keys (the sorted positions before its threshold with a key
  < e_t0, in sorted order) then the keys [e_t0, e_last); capacity ``list_capacity``, unused
  entries 0. The attention kernels then gather K, V and zoh rows by the list's indices: work per
  query tile proportional to its candidates, ~keep + block_q keys, not to S. (Random zoh
  scatters the kept keys over the whole prefix, so skipping whole key blocks would save almost
  nothing: hence the gather.) Each attention program holds the G query heads of a GQA group
  (``tile_positions``, ``_packed``), so a chunk's K/V rows are gathered once for the group.

* **general** (segment ids): allowed sets are not nested across rows of different segments.
  ``mmfa_dma_select_rows`` runs the radix select for every row of the tile at once (a (block_q,
  block_k) count per pass over the keys up to the tile's last visible one), and the attention
  kernels walk all those key blocks (contiguous, no list). Correct, but the selection costs
  ~(33 + log2 S) x T x S comparisons and the attention T x S: no saving over dense attention.
  Its (order key, index) thresholds become ranks like the nested case's (``_threshold_ranks``).

Gather. Pallas's Triton lowering takes int vector indexers in loads and stores
(``ref.at[rows[:, None], cols[None, :]]`` becomes a tensor of pointers), so K/V rows are gathered
in the kernel (``common.load_rows``, as the forward reading rows in place); checked by compiling
for sm_90 (tests/turing_kernels.py builders ``dma_*``).

Backward. ``mmfa_dma_backward`` (grid (query tiles, Hq, B)) recomputes the probabilities over the
tile's candidates, accumulates dQ in registers, and adds each chunk's dK, dV (float32, (rows,
padded head dim)) and d(zoh) (the column sums of dS) to float32 accumulators with **atomic adds**
at the gathered rows: a candidate is shared by many query tiles and by the G query heads of a
group, so the per-key sum has no fixed owner; deterministic partial buffers would take
(query tiles x candidates x head dim) memory per head. The sums are therefore not bitwise
reproducible run to run on a GPU (float addition order). The accumulators have ``block_k`` spare
rows past S: list entries past the count add their (zero) contributions there, each lane to its
own row, so no two lanes of one atomic add hit the same row (the interpreter's scatter keeps
only one of duplicate indices).

NaN: a NaN in q, k or zoh reaches exactly the rows that keep the key (logits are masked with a
select before the softmax). A NaN in a value row reaches every row of the query tile whose
candidates hold it, in that channel (its probability 0 there, and 0 * NaN is NaN), as in the dense
kernels for keys masked inside a visible block.
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
from mmfa_jax.kernels.backward import backward_lse
from mmfa_jax.kernels.common import (
    LN2,
    LOG2E,
    Problem,
    batch_spec,
    block_size,
    column_mask,
    dot,
    load,
    load_rows,
    online_softmax_step,
    optional,
    row_spec,
    seq_spec,
    whole_spec,
)
from mmfa_jax.masking import band_visible, combine
from mmfa_jax.tuning import KernelConfig

INT32_MIN = -(2 ** 31)
INT32_MAX = 2 ** 31 - 1


def tile_positions(q_len: int, block_q: int, group: int) -> int:
    """Query positions per tile (``DmaProblem.block_q``) for the attention kernels' ``block_q``
    rows: a tile packs the G heads of a GQA group, so it spans block_q / G positions (at least 16,
    as dots want; no more than the query needs)."""
    return block_size(q_len, block_q // pl.next_power_of_2(group))


def order_key(z):
    """int32 keys of float values, in the same order: larger value, larger key (subnormals
    included); -0 and +0 equal; NaN (of either sign) the largest of all (as torch.topk orders NaN).
    Any float dtype (converted to float32, which keeps the order); jnp ops only, so the kernels and
    the XLA path share it."""
    # On the bits alone: float comparisons would flush subnormals to zero where the hardware does
    # (XLA:CPU does), merging them with 0.
    bits = lax.bitcast_convert_type(z.astype(jnp.float32), jnp.int32)
    bits = jnp.where(bits == jnp.int32(INT32_MIN), jnp.int32(0), bits)  # -0 reads as +0
    key = jnp.where(bits < 0, bits ^ jnp.int32(INT32_MAX), bits)
    nan = (bits & jnp.int32(INT32_MAX)) > jnp.int32(0x7F800000)
    return jnp.where(nan, jnp.int32(INT32_MAX), key)


@dataclasses.dataclass(frozen=True)
class DmaProblem:
    """A dynamic-mask call: the dense ``Problem`` (sizes, scale, causal band, segments, lengths;
    no bias or mask), ``keep`` (keys kept per row) and the tiles."""

    problem: Problem
    keep: int
    block_q: int
    block_k: int

    @property
    def nested(self) -> bool:
        """Allowed key sets are prefixes, nested in t: the short candidate lists apply."""
        return not self.problem.has_segments

    @property
    def tile_rows(self) -> int:
        """Rows of an attention program's query tile: the GQA group's G heads times the block_q
        positions (head-major), padded to a power of two. K/V rows are gathered once for the group."""
        return pl.next_power_of_2(self.problem.group * self.block_q)

    @property
    def num_q_blocks(self) -> int:
        return pl.cdiv(self.problem.q_len, self.block_q)

    @property
    def list_capacity(self) -> int:
        """Entries of a query tile's candidate list: min(keep + block_q - 1, S) rounded up to the key block."""
        need = min(self.keep + self.block_q - 1, self.problem.kv_len)
        return max(self.block_k, pl.cdiv(need, self.block_k) * self.block_k)

    @property
    def table_rows(self) -> int:
        """Rows of the count table: key boundaries 0, block_q, 2 block_q, ... up to S."""
        return pl.cdiv(self.problem.kv_len, self.block_q) + 1

    @property
    def table_width(self) -> int:
        """Sorted positions per count-table column: the key block, doubled until the columns
        (position boundaries 0, width, 2 width, ... up to S) number at most 1024."""
        width = self.block_k
        while pl.cdiv(self.problem.kv_len, width) + 1 > 1024:
            width *= 2
        return width

    @property
    def table_columns(self) -> int:
        """Columns of the count table, a power of two (a row is loaded as one vector)."""
        return pl.next_power_of_2(pl.cdiv(self.problem.kv_len, self.table_width) + 1)

    @property
    def list_pass(self) -> int:
        """Sorted positions per step of the pass that lists row t0's kept keys (one row: wide steps)."""
        return max(self.block_k, 512)

    @property
    def list_buffer(self) -> int:
        """The list's buffer: the capacity and one key block of spare slots (where the compaction's
        masked lanes point, each lane its own)."""
        return self.list_capacity + self.block_k

    @property
    def accumulator_rows(self) -> int:
        """Rows of the backward's float32 dK/dV/d(zoh) accumulators: S and one key block of spare rows."""
        return self.problem.kv_len + self.block_k

    @property
    def index_bits(self) -> int:
        return max(1, (self.problem.kv_len - 1).bit_length())


# ------------------------------------------------------------------------------------------------
# What a row allows.


def _kv_valid(p: Problem, kvlen_ref):
    return p.kv_len if kvlen_ref is None else jnp.minimum(kvlen_ref[...], p.kv_len)


def _prefix_end(p: Problem, t, kv_valid):
    """e_t: row t allows keys [0, e_t) (the nested case)."""
    if p.band.right is None:
        return jnp.full(jnp.shape(t), kv_valid, jnp.int32) if jnp.ndim(t) else kv_valid
    return jnp.clip(t + p.band.offset + 1, 0, kv_valid)


def _allowed(p: Problem, q_pos, k_pos, kv_valid, q_seg=None, k_seg=None):
    """Boolean (rows, keys): key k_pos[j] is allowed to query q_pos[i] (band, key length, segments)."""
    vis = combine((k_pos < kv_valid)[None, :], band_visible(p.band, q_pos, k_pos))
    if q_seg is not None:
        vis = combine(vis, q_seg[:, None] == k_seg[None, :])
    if vis.shape != (q_pos.shape[0], k_pos.shape[0]):
        vis = jnp.broadcast_to(vis, (q_pos.shape[0], k_pos.shape[0]))
    return vis


def _zoh_keys(zoh_ref, k_pos, in_range):
    """The order keys and float32 values of zoh at the key positions (a vector), gathered."""
    z = plgpu.load(zoh_ref.at[jnp.where(in_range, k_pos, 0)], mask=in_range, other=0.0).astype(jnp.float32)
    return order_key(z), z


# ------------------------------------------------------------------------------------------------
# Radix select.


def _radix_select(count, rank, index_bits: int):
    """The rank-th best key (1-based) of each row, by counting passes.

    ``count(pred)`` returns, per row (a vector), how many allowed keys satisfy ``pred(key, index)``
    (key and index: (1, keys) tiles; thresholds: (rows, 1)). Returns (thr_key, thr_index) vectors;
    the sentinel (INT32_MIN, 0) for rows that allow fewer than ``rank`` keys."""
    total = count(lambda key, idx, thr: key == key, None)
    # Value bits, most significant first, keeping v = the largest value with count(key >= v) >= rank.
    # The sign bit first: keys >= 0 are the non-negative floats; within a sign, adding low bits
    # raises the value.
    zero = jnp.zeros_like(total)
    ge0 = count(lambda key, idx, thr: key >= thr, zero)
    v = jnp.where(ge0 >= rank, zero, jnp.full_like(total, INT32_MIN))

    def value_bit(i, v):
        cand = v | jnp.left_shift(jnp.int32(1), 30 - i)
        c = count(lambda key, idx, thr: key >= thr, cand)
        return jnp.where(c >= rank, cand, v)

    v = lax.fori_loop(0, 31, value_bit, v)
    above = count(lambda key, idx, thr: key > thr, v)
    need = rank - above  # >= 1: the need-th lowest index among the keys equal to v

    def index_bit(i, m):
        cand = m + jnp.left_shift(jnp.int32(1), index_bits - 1 - i)
        c = count(lambda key, idx, thr: (key == thr[0]) & (idx < thr[1]), (v, cand))
        return jnp.where(c < need, cand, m)

    m = lax.fori_loop(0, index_bits, index_bit, zero)
    enough = total >= rank
    return jnp.where(enough, v, INT32_MIN), jnp.where(enough, m, 0)


def _counter(zoh_ref, kv_len: int, num_blocks, block_k: int, allowed_fn, rows: int):
    """``count`` for ``_radix_select``: loops over key blocks [0, num_blocks), per row."""

    def count(pred, thr):
        def body(j, acc):
            k_pos = j * block_k + jnp.arange(block_k)
            ok = allowed_fn(k_pos)  # (rows, block_k)
            key, _ = _zoh_keys(zoh_ref, k_pos, k_pos < kv_len)
            hit = pred(key[None, :], k_pos[None, :], jax.tree.map(lambda x: x[:, None], thr))
            return acc + jnp.sum((ok & hit).astype(jnp.int32), axis=1)

        return lax.fori_loop(0, num_blocks, body, jnp.zeros((rows,), jnp.int32))

    return count


# ------------------------------------------------------------------------------------------------
# Selection kernels.


def _select_kernel(order_ref, rank_ref, table_ref, kvlen_ref, cand_ref, count_ref, thr_ref, *, dp: DmaProblem):
    """Nested case, one (query tile, KV head, batch): every row's threshold and the tile's candidates,
    from the keys sorted best first (``order_ref``: the key at each sorted position; ``rank_ref``:
    the sorted position of each key) and their count table (``count_table``).

    Row t's threshold is the (keep+1)-th sorted position whose key is < e_t. The table brackets
    where the tile's rows reach that count (their e_t lie between two table rows), so the per-row
    counting (a cumulative sum along each chunk of sorted positions, one count per row) runs over
    that bracket only, starting from counts the table and the ranks of the tile's own keys give.
    Row t0 allows the fewest keys; its kept keys, the list's first part, are the sorted positions
    before its threshold with a key < e_t0 (a one-row pass); the keys [e_t0, e_last) follow."""
    p, block_q, block_k, keep = dp.problem, dp.block_q, dp.block_k, dp.keep
    S, width = p.kv_len, dp.table_width
    t0 = pl.program_id(0) * block_q
    kv_valid = _kv_valid(p, kvlen_ref)
    q_pos = t0 + jnp.arange(block_q)
    in_q = q_pos < p.q_len
    ends = _prefix_end(p, jnp.minimum(q_pos, p.q_len - 1), kv_valid)  # (block_q,)
    e0 = jnp.asarray(_prefix_end(p, t0, kv_valid))
    e_last = jnp.asarray(_prefix_end(p, jnp.minimum(t0 + block_q, p.q_len) - 1, kv_valid))
    need = in_q & (ends > keep)  # rows with a threshold to find
    scan_first = e0 > keep  # else row t0 keeps all of [0, e0): the list starts with them in order
    lanes = jnp.arange(block_k)
    cap = dp.list_capacity

    # The bracket [p_lo, p_hi) of sorted positions that holds every row's threshold: table row m
    # counts the keys < m * block_q, and the rows' e_t lie in [m_lo, m_hi] * block_q.
    last_row = dp.table_rows - 1
    m_lo = jnp.minimum(jnp.maximum(e0, keep + 1) // block_q, last_row)
    m_hi = jnp.minimum(pl.cdiv(e_last, block_q), last_row)

    def first_column(m):  # the first table column whose count reaches keep + 1 (the counts grow along a row)
        return jnp.sum((table_ref[m, :] < keep + 1).astype(jnp.int32))

    c_lo = jnp.maximum(first_column(m_hi) - 1, 0)
    p_lo = c_lo * width
    p_hi = jnp.minimum(first_column(m_lo) * width, S)

    # Each row's count of allowed keys before p_lo: the table's, for the keys < m_base * block_q,
    # plus those of the keys [m_base * block_q, e_t) whose rank is below p_lo.
    m_base = jnp.minimum(e0 // block_q, last_row)
    below = table_ref[m_base, c_lo]
    first_key = m_base * block_q

    def own_keys(j, seen):
        k_pos = first_key + j * block_k + lanes
        in_range = k_pos < e_last
        rank = plgpu.load(rank_ref.at[jnp.where(in_range, k_pos, 0)], mask=in_range, other=INT32_MAX)
        early = (k_pos[None, :] < ends[:, None]) & (rank < p_lo)[None, :]
        return seen + jnp.sum(early.astype(jnp.int32), axis=1)

    seen = lax.fori_loop(0, pl.cdiv(e_last - first_key, block_k), own_keys,
                         jnp.full((block_q,), below, jnp.int32))

    def searching(carry):
        j, _, at = carry
        return (j * block_k < p_hi) & (jnp.max((need & (at == S)).astype(jnp.int32)) > 0)

    def scan(carry):
        j, seen, at = carry
        pos = j * block_k + lanes
        idx = plgpu.load(order_ref.at[jnp.where(pos < S, pos, 0)], mask=pos < S, other=INT32_MAX)
        allows = idx[None, :] < ends[:, None]  # (block_q, block_k)
        running = seen[:, None] + jnp.cumsum(allows.astype(jnp.int32), axis=1)
        hit = allows & (running == keep + 1)
        at = jnp.minimum(at, jnp.min(jnp.where(hit, pos[None, :], S), axis=1))
        return j + 1, seen + jnp.sum(allows.astype(jnp.int32), axis=1), at

    _, _, at = lax.while_loop(searching, scan, (p_lo // block_k, seen, jnp.full((block_q,), S, jnp.int32)))

    # Row t0's kept keys: the sorted positions before its threshold with a key < e0 (keep of them).
    first_at = jnp.sum(jnp.where(jnp.arange(block_q) == 0, at, 0))
    wide = jnp.arange(dp.list_pass)

    def row0(j, n):
        pos = j * dp.list_pass + wide
        valid = pos < first_at
        idx = plgpu.load(order_ref.at[jnp.where(valid, pos, 0)], mask=valid, other=INT32_MAX)
        take = valid & (idx < e0)
        rank0 = n + jnp.cumsum(take.astype(jnp.int32))
        plgpu.store(cand_ref.at[jnp.where(take, rank0 - 1, cap + wide % block_k)], idx, mask=take)
        return n + jnp.sum(take.astype(jnp.int32))

    lax.fori_loop(0, jnp.where(scan_first, pl.cdiv(first_at, dp.list_pass), 0), row0, jnp.int32(0))

    # The contiguous part: [e0, e_last) after row t0's kept keys, or [0, e_last) when it keeps all.
    lo = scan_first.astype(jnp.int32) * e0
    base = scan_first.astype(jnp.int32) * keep

    def append(j, carry):
        k_pos = lo + j * block_k + lanes
        take = k_pos < e_last
        plgpu.store(cand_ref.at[jnp.where(take, base + j * block_k + lanes, cap + lanes)], k_pos, mask=take)
        return carry

    lax.fori_loop(0, pl.cdiv(e_last - lo, block_k), append, 0)
    n = base + e_last - lo

    def fill(j, carry):  # the unused entries, disjoint from those written above
        pos = j * block_k + lanes
        plgpu.store(cand_ref.at[pos], jnp.zeros((block_k,), jnp.int32), mask=pos >= n)
        return carry

    lax.fori_loop(n // block_k, cap // block_k, fill, 0)
    count_ref[...] = n
    # Rows past the query point past the array, each lane to its own place (never written): a masked
    # lane of the interpreter's scatter must not share an index with a real row.
    rows = jnp.where(in_q, q_pos, p.q_len + jnp.arange(block_q))
    plgpu.store(thr_ref.at[rows], jnp.where(need & (at < S), at, S), mask=in_q)


def _select_rows_kernel(zoh_ref, qseg_ref, kvseg_ref, kvlen_ref, thr_key_ref, thr_idx_ref, *, dp: DmaProblem):
    """General case (segments): every row's threshold by radix select over its allowed keys."""
    p, block_q, block_k = dp.problem, dp.block_q, dp.block_k
    t0 = pl.program_id(0) * block_q
    q_pos = t0 + jnp.arange(block_q)
    in_q = q_pos < p.q_len
    # Rows past the query point past the array, each lane to its own place (never written): a masked
    # lane of the interpreter's scatter must not share an index with a real row.
    rows = jnp.where(in_q, q_pos, p.q_len + jnp.arange(block_q))
    kv_valid = _kv_valid(p, kvlen_ref)
    q_seg = plgpu.load(qseg_ref.at[rows], mask=in_q, other=-1)
    hi = _tile_key_end(p, t0, block_q, kv_valid)

    def allowed(k_pos):
        in_k = k_pos < p.kv_len
        k_seg = plgpu.load(kvseg_ref.at[jnp.where(in_k, k_pos, 0)], mask=in_k, other=-2)
        return _allowed(p, q_pos, k_pos, kv_valid, q_seg, k_seg) & in_q[:, None]

    count = _counter(zoh_ref, p.kv_len, pl.cdiv(hi, block_k), block_k, allowed, block_q)
    thr_key, thr_idx = _radix_select(count, dp.keep + 1, dp.index_bits)
    plgpu.store(thr_key_ref.at[rows], thr_key, mask=in_q)
    plgpu.store(thr_idx_ref.at[rows], thr_idx, mask=in_q)


def _tile_key_end(p: Problem, t0, block_q: int, kv_valid):
    """One past the last key any row of the tile [t0, t0 + block_q) may see (the band's end for its
    last row, within the key length)."""
    if p.band.right is None:
        return kv_valid
    return jnp.clip(jnp.minimum(t0 + block_q, p.q_len) - 1 + p.band.offset + 1, 0, kv_valid)


def _zoh_spec(p: Problem, head_of):
    return pl.BlockSpec((None, None, p.kv_len), lambda t, n, b: (b, head_of(n), 0))


def _per_tile_spec(head_of, length=None):
    if length is None:
        return pl.BlockSpec((None, None, None), lambda t, n, b: (b, head_of(n), t))
    return pl.BlockSpec((None, None, None, length), lambda t, n, b: (b, head_of(n), t, 0))


def sort_keys(zoh):
    """zoh's keys best first, per (batch, KV head): (order keys, key indices), (B, K, S) int32 each;
    equal keys by ascending index. One XLA sort (``~key`` reverses the order without overflow)."""
    key = order_key(lax.stop_gradient(zoh))
    index = lax.broadcasted_iota(jnp.int32, key.shape, 2)
    not_key, order = lax.sort((~key, index), dimension=2, num_keys=2)
    return ~not_key, order


def ranks(order):
    """The inverse of the sorted order: the sorted position of each key, (B, K, S) int32."""
    B, K, S = order.shape
    b, h, pos = (lax.broadcasted_iota(jnp.int32, order.shape, d) for d in range(3))
    return jnp.zeros((B, K, S), jnp.int32).at[b, h, order].set(pos, unique_indices=True)


def count_table(dp: DmaProblem, order):
    """(B, K, table_rows, table_columns) int32: entry [m, c] counts the sorted positions
    < c * table_width whose key is < m * block_q (a histogram of (key block, position block), then
    cumulative sums along both axes; columns past the positions repeat the row's total)."""
    B, K, S = order.shape
    b, h, pos = (lax.broadcasted_iota(jnp.int32, order.shape, d) for d in range(3))
    hist = jnp.zeros((B, K, dp.table_rows, dp.table_columns), jnp.int32)
    hist = hist.at[b, h, order // dp.block_q + 1, pos // dp.table_width + 1].add(1, mode="drop")
    return jnp.cumsum(jnp.cumsum(hist, axis=2), axis=3)


def _threshold_ranks(rank, thr_key, thr_idx):
    """Thresholds as (order key, index) pairs (the radix select's) to ranks: the threshold key's
    rank, S for the sentinel (INT32_MIN is no float's order key)."""
    S = rank.shape[-1]
    return jnp.where(thr_key == INT32_MIN, S, jnp.take_along_axis(rank, thr_idx, axis=2)).astype(jnp.int32)


def select(dp: DmaProblem, cfg: KernelConfig, zoh, q_seg, kv_seg, kv_lengths, *, lowering: Lowering):
    """What the attention kernels take besides q, k, v and zoh: (candidates (B, K, nq, list_buffer)
    int32 and counts (B, K, nq) int32, the per-tile lists, in the nested case, else None, None;
    rank (B, K, S) int32, each key's sorted position; thr_pos (B, K, T) int32, each row's
    threshold as a rank)."""
    p = dp.problem
    grid = (dp.num_q_blocks, p.kv_heads, p.batch)
    same = lambda h: h  # noqa: E731 (grid axis 1 runs over K/V heads)
    thr_shape = jax.ShapeDtypeStruct((p.batch, p.kv_heads, p.q_len), jnp.int32)
    thr_spec = row_spec(p.q_len, None, same)
    kvlen_spec = optional(p.has_kv_lengths, batch_spec(None))
    if not dp.nested:
        plan = plans.DMA_SELECT_ROWS
        thr_key, thr_idx = pl.pallas_call(
            functools.partial(_select_rows_kernel, dp=dp), grid=grid,
            in_specs=[_zoh_spec(p, same), batch_spec(p.q_len), batch_spec(p.kv_len), kvlen_spec],
            out_specs=[thr_spec, thr_spec], out_shape=[thr_shape, thr_shape],
            **lowering.pallas_args(cfg), name=plan.name,
        )(*plan.ordered(zoh=zoh, q_seg=q_seg, kv_seg=kv_seg, kv_lengths=kv_lengths))
        rank = ranks(sort_keys(zoh)[1])
        return None, None, rank, _threshold_ranks(rank, thr_key, thr_idx)
    order = sort_keys(zoh)[1]
    rank, table = ranks(order), count_table(dp, order)
    plan = plans.DMA_SELECT
    table_spec = pl.BlockSpec((None, None, dp.table_rows, dp.table_columns), lambda t, n, b: (b, n, 0, 0))
    cand, count, thr_pos = pl.pallas_call(
        functools.partial(_select_kernel, dp=dp), grid=grid,
        in_specs=[_zoh_spec(p, same), _zoh_spec(p, same), table_spec, kvlen_spec],
        out_specs=[_per_tile_spec(same, dp.list_buffer), _per_tile_spec(same), thr_spec],
        out_shape=[jax.ShapeDtypeStruct((p.batch, p.kv_heads, dp.num_q_blocks, dp.list_buffer), jnp.int32),
                   jax.ShapeDtypeStruct((p.batch, p.kv_heads, dp.num_q_blocks), jnp.int32), thr_shape],
        **lowering.pallas_args(cfg), name=plan.name,
    )(*plan.ordered(sorted_index=order, rank=rank, count_table=table, kv_lengths=kv_lengths))
    return cand, count, rank, thr_pos


# ------------------------------------------------------------------------------------------------
# Attention over the kept keys.


def _packed(dp: DmaProblem, b, h):
    """The query tile of an attention program (query tile program_id(0), KV head h, example b):
    per row, its row of the flattened query / output ((B*T*N) or (B*N*T) rows, as the layout
    orders them), its index into the flattened LSE (B*N*T), its query position, and whether it is
    a real row. Row g * block_q + i holds head h * G + g at position t0 + i. Padding rows point past
    the arrays, each to its own place: masked, and never meeting a real row."""
    p = dp.problem
    r = jnp.arange(dp.tile_rows, dtype=jnp.int32)
    g, i = r // dp.block_q, r % dp.block_q
    t = pl.program_id(0) * dp.block_q + i
    head = h * p.group + g
    valid = (g < p.group) & (t < p.q_len)
    if p.layout == "BTNH":
        row = (b * p.q_len + t) * p.q_heads + head
    else:
        row = (b * p.q_heads + head) * p.q_len + t
    spare = p.batch * p.q_heads * p.q_len + r
    return (jnp.where(valid, row, spare), jnp.where(valid, (b * p.q_heads + head) * p.q_len + t, spare),
            jnp.where(valid, t, 0), valid)


def _load_packed(ref, rows, valid, p: Problem):
    return load_rows(ref, rows, valid, column_mask(p), p.head_dim_padded)


def _store_packed(ref, rows, valid, p: Problem, x):
    hp = p.head_dim_padded
    plgpu.store(ref.at[rows[:, None], jnp.arange(hp)[None, :]], x.astype(ref.dtype),
                mask=combine(valid[:, None], column_mask(p)))


class _Tile:
    """One query tile's view of its keys: chunks of ``block_k`` key positions (from the candidate
    list, or contiguous blocks in the general case) and which logits of a chunk are kept, for the
    tile's rows (positions ``q_pos``, real where ``valid``)."""

    def __init__(self, dp: DmaProblem, q_pos, valid, zoh_ref, cand_ref, count_ref, rank_ref, thr_ref, qseg_ref,
                 kvseg_ref, kvlen_ref):
        p = dp.problem
        self.dp, self.p, self.q_pos = dp, p, q_pos
        self.zoh_ref, self.cand_ref, self.rank_ref, self.kvseg_ref = zoh_ref, cand_ref, rank_ref, kvseg_ref
        self.in_q = valid
        self.kv_valid = _kv_valid(p, kvlen_ref)
        self.thr = plgpu.load(thr_ref.at[q_pos], mask=valid, other=0)  # padding rows: nothing ranks before 0
        self.q_seg = None if qseg_ref is None else plgpu.load(qseg_ref.at[q_pos], mask=valid, other=-1)
        if dp.nested:
            self.length = count_ref[...]
        else:
            self.length = _tile_key_end(p, pl.program_id(0) * dp.block_q, dp.block_q, self.kv_valid)
        self.num_chunks = pl.cdiv(self.length, dp.block_k)

    def chunk(self, j):
        """(positions (block_k,) int32, in range (block_k,) bool) of chunk j."""
        lanes = j * self.dp.block_k + jnp.arange(self.dp.block_k)
        ok = lanes < self.length
        if self.dp.nested:
            idx = self.cand_ref[pl.ds(j * self.dp.block_k, self.dp.block_k)]
            return jnp.where(ok, idx, 0), ok
        return jnp.where(ok, lanes, 0), ok

    def kept(self, k_pos, ok):
        """(kept (block_q, block_k) bool, zoh (block_k,) float32) of a chunk."""
        z = plgpu.load(self.zoh_ref.at[k_pos], mask=ok, other=0.0).astype(jnp.float32)
        rank = plgpu.load(self.rank_ref.at[k_pos], mask=ok, other=self.p.kv_len)  # S: before no threshold
        k_seg = None
        if self.q_seg is not None:
            k_seg = plgpu.load(self.kvseg_ref.at[k_pos], mask=ok, other=-2)
        allowed = _allowed(self.p, self.q_pos, k_pos, self.kv_valid, self.q_seg, k_seg)
        return allowed & (rank[None, :] < self.thr[:, None]), z


def _logits(p: Problem, q, k, z, keep):
    """Base-2 logits of a chunk: (scale q.k + zoh) log2(e) where kept, -inf elsewhere (one
    multiply-add per logit: zoh is scaled per key)."""
    s = dot(p, q, k, trans_b=True) * (p.scale * LOG2E) + (z * LOG2E)[None, :]
    return jnp.where(keep, s, -jnp.inf)


def _forward_kernel(q_ref, k_ref, v_ref, zoh_ref, cand_ref, count_ref, rank_ref, thr_ref, qseg_ref, kvseg_ref,
                    qlen_ref, kvlen_ref, o_ref, lse_ref, *, dp: DmaProblem):
    p = dp.problem
    cols = column_mask(p)
    hp = p.head_dim_padded
    rows, lse_rows, q_pos, valid = _packed(dp, pl.program_id(2), pl.program_id(1))
    tile = _Tile(dp, q_pos, valid, zoh_ref, cand_ref, count_ref, rank_ref, thr_ref, qseg_ref, kvseg_ref, kvlen_ref)
    q = _load_packed(q_ref, rows, valid, p)

    def body(j, carry):
        k_pos, ok = tile.chunk(j)
        k = load_rows(k_ref, k_pos, ok, cols, hp)
        v = load_rows(v_ref, k_pos, ok, cols, hp)
        keep, z = tile.kept(k_pos, ok)
        return online_softmax_step(p, carry, _logits(p, q, k, z, keep), v)

    init = (jnp.zeros((dp.tile_rows, hp), jnp.float32), jnp.full((dp.tile_rows,), -jnp.inf, jnp.float32),
            jnp.zeros((dp.tile_rows,), jnp.float32))
    acc, m, l = lax.fori_loop(0, tile.num_chunks, body, init)
    q_valid = p.q_len if qlen_ref is None else jnp.minimum(qlen_ref[...], p.q_len)
    # l is exactly 0 where a row kept nothing (zeros, LSE -inf); NaN inputs make it NaN (a NaN row).
    live = (l != 0) & (q_pos < q_valid) & valid
    out = acc / jnp.where(live, l, 1.0)[:, None]
    out = jnp.where(live[:, None], out, 0.0)
    lse = jnp.where(live, (m + jnp.log2(jnp.where(live, l, 1.0))) * LN2, -jnp.inf)
    _store_packed(o_ref, rows, valid, p, out)
    plgpu.store(lse_ref.at[lse_rows], lse, mask=valid)


def _attention_specs(dp: DmaProblem):
    """In specs of (q flattened to rows, k, v, zoh, candidates, counts, rank, thr_pos, q_seg,
    kv_seg, q_lengths, kv_lengths) for a (query tile, KV head, batch) grid."""
    p = dp.problem
    head = lambda h: h  # noqa: E731 (grid axis 1 runs over K/V heads)
    return [whole_spec((p.batch * p.q_heads * p.q_len, p.head_dim)), seq_spec(p, p.kv_len, None, head),
            seq_spec(p, p.kv_len, None, head), _zoh_spec(p, head),
            optional(dp.nested, _per_tile_spec(head, dp.list_buffer)), optional(dp.nested, _per_tile_spec(head)),
            _zoh_spec(p, head), row_spec(p.q_len, None, head), optional(p.has_segments, batch_spec(p.q_len)), optional(p.has_segments, batch_spec(p.kv_len)),
            optional(p.has_q_lengths, batch_spec(None)), optional(p.has_kv_lengths, batch_spec(None))]


def _rows_of(p: Problem, x):
    """q-shaped (B, T, N, D) / (B, N, T, D) as the rows the attention kernels address."""
    return x.reshape(p.batch * p.q_heads * p.q_len, p.head_dim)


def forward(dp: DmaProblem, cfg: KernelConfig, q, k, v, zoh, cand, count, rank, thr_pos, q_seg, kv_seg, q_lengths,
            kv_lengths, *, lowering: Lowering):
    """(out like q, lse (B, Hq, T) float32, natural log; -inf for rows that keep nothing)."""
    p = dp.problem
    plan = plans.DMA_FORWARD
    rows = p.batch * p.q_heads * p.q_len
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, dp=dp), grid=(dp.num_q_blocks, p.kv_heads, p.batch),
        in_specs=_attention_specs(dp), out_specs=[whole_spec((rows, p.head_dim)), whole_spec((rows,))],
        out_shape=[jax.ShapeDtypeStruct((rows, p.head_dim), q.dtype), jax.ShapeDtypeStruct((rows,), jnp.float32)],
        **lowering.pallas_args(cfg), name=plan.name,
    )(*plan.ordered(q=_rows_of(p, q), k=k, v=v, zoh=zoh, candidates=cand, counts=count, rank=rank,
                    thr_pos=thr_pos, q_seg=q_seg, kv_seg=kv_seg, q_lengths=q_lengths, kv_lengths=kv_lengths))
    return out.reshape(q.shape), lse.reshape(p.batch, p.q_heads, p.q_len)


def _backward_kernel(q_ref, k_ref, v_ref, zoh_ref, cand_ref, count_ref, rank_ref, thr_ref, qseg_ref, kvseg_ref,
                     qlen_ref, kvlen_ref, do_ref, lse_ref, delta_ref, dk_in, dv_in, dz_in, dq_ref, dk_ref, dv_ref,
                     dz_ref, *, dp: DmaProblem):
    del dk_in, dv_in, dz_in  # aliased to dk_ref, dv_ref, dz_ref: the accumulators start as zeros
    p, block_k = dp.problem, dp.block_k
    cols = column_mask(p)
    hp = p.head_dim_padded
    rows, lse_rows, q_pos, valid = _packed(dp, pl.program_id(2), pl.program_id(1))
    tile = _Tile(dp, q_pos, valid, zoh_ref, cand_ref, count_ref, rank_ref, thr_ref, qseg_ref, kvseg_ref, kvlen_ref)
    q = _load_packed(q_ref, rows, valid, p)
    do = _load_packed(do_ref, rows, valid, p)
    lse = backward_lse(plgpu.load(lse_ref.at[lse_rows], mask=valid, other=-jnp.inf))
    delta = plgpu.load(delta_ref.at[lse_rows], mask=valid, other=0.0)
    spare = p.kv_len + jnp.arange(block_k)  # each lane's own spare accumulator row
    head_cols = jnp.arange(hp)[None, :]

    def body(j, dq):
        k_pos, ok = tile.chunk(j)
        k = load_rows(k_ref, k_pos, ok, cols, hp)
        v = load_rows(v_ref, k_pos, ok, cols, hp)
        keep, z = tile.kept(k_pos, ok)
        probs = jnp.exp2(_logits(p, q, k, z, keep) - lse[:, None])
        ds = probs * (dot(p, do, v, trans_b=True) - delta[:, None])  # d loss / d logit (natural units)
        dqk = ds * p.scale
        # The group's G heads summed in the dots: one atomic add per chunk and KV head.
        k_rows = jnp.where(ok, k_pos, spare)
        plgpu.atomic_add(dk_ref, (k_rows[:, None], head_cols), dot(p, dqk.astype(q.dtype), q, trans_a=True))
        plgpu.atomic_add(dv_ref, (k_rows[:, None], head_cols), dot(p, probs.astype(do.dtype), do, trans_a=True))
        plgpu.atomic_add(dz_ref, (k_rows,), jnp.sum(ds, axis=0))
        return dq + dot(p, dqk.astype(k.dtype), k)

    dq = lax.fori_loop(0, tile.num_chunks, body, jnp.zeros((dp.tile_rows, hp), jnp.float32))
    _store_packed(dq_ref, rows, valid, p, dq)


def backward(dp: DmaProblem, cfg: KernelConfig, q, k, v, zoh, cand, count, rank, thr_pos, q_seg, kv_seg, q_lengths,
             kv_lengths, d_out, lse, delta, *, lowering: Lowering):
    """(dq like q, dk and dv float32 (B, K, S, D), d_zoh float32 (B, K, S)) from the forward's LSE
    and ``delta`` (``mmfa_jax._autodiff.backward_delta``), both (B, Hq, T) float32. dK, dV and
    d(zoh) are summed over the query rows and the GQA group by atomic adds."""
    p = dp.problem
    plan = plans.DMA_BACKWARD
    rows, hp = dp.accumulator_rows, p.head_dim_padded
    q_rows = p.batch * p.q_heads * p.q_len
    acc_spec = pl.BlockSpec((None, None, rows, hp), lambda t, h, b: (b, h, 0, 0))
    dz_spec = pl.BlockSpec((None, None, rows), lambda t, h, b: (b, h, 0))
    acc = jnp.zeros((p.batch, p.kv_heads, rows, hp), jnp.float32)
    dz = jnp.zeros((p.batch, p.kv_heads, rows), jnp.float32)
    operands = plan.ordered(q=_rows_of(p, q), k=k, v=v, zoh=zoh, candidates=cand, counts=count, rank=rank,
                            thr_pos=thr_pos, q_seg=q_seg, kv_seg=kv_seg, q_lengths=q_lengths, kv_lengths=kv_lengths,
                            d_out=_rows_of(p, d_out), lse=lse.reshape(-1), delta=delta.reshape(-1), dk_acc=acc,
                            dv_acc=acc, dzoh_acc=dz)
    in_specs = [*_attention_specs(dp), whole_spec((q_rows, p.head_dim)), whole_spec((q_rows,)),
                whole_spec((q_rows,)), acc_spec, acc_spec, dz_spec]
    # The accumulators are the last three operands; absent operands (None) take no index.
    present = [i for i, x in enumerate(operands) if x is not None]
    first_acc = len(present) - 3
    dq, dk, dv, d_zoh = pl.pallas_call(
        functools.partial(_backward_kernel, dp=dp), grid=(dp.num_q_blocks, p.kv_heads, p.batch),
        in_specs=in_specs, out_specs=[whole_spec((q_rows, p.head_dim)), acc_spec, acc_spec, dz_spec],
        out_shape=[jax.ShapeDtypeStruct((q_rows, p.head_dim), q.dtype), jax.ShapeDtypeStruct(acc.shape, jnp.float32),
                   jax.ShapeDtypeStruct(acc.shape, jnp.float32), jax.ShapeDtypeStruct(dz.shape, jnp.float32)],
        input_output_aliases={first_acc: 1, first_acc + 1: 2, first_acc + 2: 3},
        **lowering.pallas_args(cfg), name=plan.name,
    )(*operands)
    dq = dq.reshape(q.shape)
    S, D = p.kv_len, p.head_dim
    return dq, dk[:, :, :S, :D], dv[:, :, :S, :D], d_zoh[:, :, :S]
