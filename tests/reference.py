"""A NumPy float64 reference for attention, written from the specification alone.

Nothing here imports mmfa_jax or mmfa_torch: it is the yardstick both faces are measured against.

Layout is "BTNH": query (B, T, N, H), key/value (B, S, K, H) with K dividing N; query head n reads
key/value head n // (N // K). Semantics:

  x = scale * q.k                       (scale defaults to 1/sqrt(H))
  s = c * tanh(x / c) if soft-capped    (c = softcap)
  s = s + bias                          (bias broadcastable to (B, N, T, S))
  key j is visible to query i iff
      j < kv_lengths[b]                                  (if given)
      with offset = 0 (top-left, the default) or S - T (bottom_right) and d = j - (i + offset):
        d <= 0                                           (if causal)
        -left <= d <= right                              (window; None is unbounded)
      q_segments[b, i] == kv_segments[b, j]              (if given)
      mask[b, n, i, j]                                   (if given)
  out = softmax over the visible keys, @ v ; lse = log sum exp over the visible keys
  rows with no visible key, or i >= q_lengths[b], give out = 0 and lse = -inf.
"""

from __future__ import annotations

import numpy as np


def _f64(x):
    return None if x is None else np.asarray(x, dtype=np.float64)


def _window(window):
    if window is None:
        return None, None
    if isinstance(window, (int, np.integer)):
        return int(window), int(window)
    left, right = window
    return left, right


def visibility(B, N, T, S, *, mask=None, is_causal=False, q_lengths=None, kv_lengths=None, window=None,
               q_segments=None, kv_segments=None, bottom_right=False):
    """Boolean (B, N, T, S): which key each query may see (before the query-length rule)."""
    vis = np.ones((B, N, T, S), dtype=bool)
    i = np.arange(T)[:, None]
    j = np.arange(S)[None, :]
    d = j - (i + ((S - T) if bottom_right else 0))
    if is_causal:
        vis &= (d <= 0)[None, None]
    left, right = _window(window)
    if left is not None:
        vis &= (d >= -left)[None, None]
    if right is not None:
        vis &= (d <= right)[None, None]
    if kv_lengths is not None:
        kv_lengths = np.asarray(kv_lengths)
        vis &= (np.arange(S)[None, :] < kv_lengths[:, None])[:, None, None, :]
    if q_segments is not None:
        qs, ks = np.asarray(q_segments), np.asarray(kv_segments)
        vis &= (qs[:, :, None] == ks[:, None, :])[:, None]
    if mask is not None:
        vis &= np.broadcast_to(np.asarray(mask, dtype=bool), (B, N, T, S))
    return vis


def _forward_parts(q, k, v, *, bias=None, mask=None, scale=None, is_causal=False, q_lengths=None,
                   kv_lengths=None, window=None, softcap=None, q_segments=None, kv_segments=None,
                   bottom_right=False):
    q, k, v = _f64(q), _f64(k), _f64(v)
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    assert N % K == 0
    G = N // K
    if scale is None:
        scale = 1.0 / np.sqrt(H)
    kr = np.repeat(k, G, axis=2)  # head n -> n // G
    vr = np.repeat(v, G, axis=2)
    x = scale * np.einsum("btnh,bsnh->bnts", q, kr)
    if softcap is not None:
        tanh = np.tanh(x / softcap)
        s = softcap * tanh
    else:
        tanh = None
        s = x
    if bias is not None:
        s = s + np.broadcast_to(_f64(bias), (B, N, T, S))
    vis = visibility(B, N, T, S, mask=mask, is_causal=is_causal, kv_lengths=kv_lengths, window=window,
                     q_segments=q_segments, kv_segments=kv_segments, bottom_right=bottom_right)
    live = vis.any(axis=-1)  # (B, N, T)
    if q_lengths is not None:
        live &= (np.arange(T)[None, :] < np.asarray(q_lengths)[:, None])[:, None, :]
    s_masked = np.where(vis, s, -np.inf)
    m = np.max(s_masked, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(vis, np.exp(s_masked - m), 0.0)
    den = e.sum(-1, keepdims=True)
    lse = np.where(live, (m + np.log(np.where(den > 0, den, 1.0)))[..., 0], -np.inf)
    p = np.where(live[..., None], e / np.where(den > 0, den, 1.0), 0.0)
    out = np.einsum("bnts,bsnh->btnh", p, vr)
    return dict(q=q, kr=kr, vr=vr, p=p, out=out, lse=lse, tanh=tanh, scale=scale, B=B, N=N, T=T, S=S, K=K, G=G,
                H=H)


def attention_reference(q, k, v, *, bias=None, mask=None, scale=None, is_causal=False, q_lengths=None,
                        kv_lengths=None, window=None, softcap=None, q_segments=None, kv_segments=None,
                        bottom_right=False):
    """(out (B, T, N, H), lse (B, T, N)) in float64."""
    r = _forward_parts(q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal, q_lengths=q_lengths,
                       kv_lengths=kv_lengths, window=window, softcap=softcap, q_segments=q_segments,
                       kv_segments=kv_segments, bottom_right=bottom_right)
    return r["out"], np.swapaxes(r["lse"], 1, 2)


def sum_to_shape(x, shape):
    """Sum ``x`` over the axes along which an array of ``shape`` was broadcast to x.shape."""
    shape = tuple(shape)
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead))) if lead else x
    axes = tuple(a for a, n in enumerate(shape) if n == 1 and x.shape[a] != 1)
    return x.sum(axis=axes, keepdims=True).reshape(shape) if axes else x.reshape(shape)


def attention_reference_grads(q, k, v, d_out, d_lse=None, *, bias=None, mask=None, scale=None, is_causal=False,
                              q_lengths=None, kv_lengths=None, window=None, softcap=None, q_segments=None,
                              kv_segments=None, bottom_right=False):
    """Analytic float64 gradients (dq, dk, dv, dbias) of sum(out * d_out) + sum(lse * d_lse).

    d_out is (B, T, N, H), d_lse (B, T, N) (entries where lse is -inf are ignored). dbias has the
    shape of ``bias`` (None without a bias).
    """
    r = _forward_parts(q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal, q_lengths=q_lengths,
                       kv_lengths=kv_lengths, window=window, softcap=softcap, q_segments=q_segments,
                       kv_segments=kv_segments, bottom_right=bottom_right)
    B, N, T, S, K, G, H = (r[c] for c in "BNTSKGH")
    p, out = r["p"], r["out"]
    do = _f64(d_out)
    dlse = np.zeros((B, N, T)) if d_lse is None else np.swapaxes(_f64(d_lse), 1, 2)
    dlse = np.where(np.isfinite(r["lse"]), dlse, 0.0)
    dv = np.einsum("bnts,btnh->bsnh", p, do).reshape(B, S, K, G, H).sum(3)
    dp = np.einsum("btnh,bsnh->bnts", do, r["vr"])
    delta = np.einsum("btnh,btnh->bnt", do, out)
    ds = p * (dp - delta[..., None]) + p * dlse[..., None]
    dbias = None if bias is None else sum_to_shape(ds, np.shape(bias))
    dx = ds if r["tanh"] is None else ds * (1.0 - r["tanh"] ** 2)
    dq = r["scale"] * np.einsum("bnts,bsnh->btnh", dx, r["kr"])
    dk = (r["scale"] * np.einsum("bnts,btnh->bsnh", dx, r["q"])).reshape(B, S, K, G, H).sum(3)
    return dq, dk, dv, dbias


def importance_reference(q, k, visual_mask, scorers, *, per_head=False, **options):
    """Visual-token importance from the explicit softmax: for each key s, the mean over scorer rows
    t (boolean (B, T)) of the attention probability p[b, n, t, s] (and over heads n unless
    ``per_head``); keys that are not visual, and examples without scorers, get 0.
    ``options`` are those of attention_reference (bias and mask excepted)."""
    r = _forward_parts(q, k, k, **options)
    p = r["p"]  # (B, N, T, S)
    sc = np.asarray(scorers, dtype=np.float64)
    count = np.maximum(sc.sum(axis=1), 1.0)
    per = np.einsum("bnts,bt->bns", p, sc) / count[:, None, None]
    vis = np.asarray(visual_mask, dtype=bool)
    if per_head:
        return np.where(vis[:, None, :], per, 0.0)
    return np.where(vis, per.mean(axis=1), 0.0)


def select_reference(importance, visual_mask, keep, valid_lengths=None):
    """Kept positions per example (a list of int arrays): every valid non-visual token, plus the
    visual tokens with the highest scores (ties to the earlier position), ceil(keep * n) of them
    for a ratio keep, min(keep, n) for an int count."""
    importance, visual_mask = np.asarray(importance, np.float64), np.asarray(visual_mask, bool)
    B, S = visual_mask.shape
    out = []
    for b in range(B):
        n_valid = S if valid_lengths is None else int(valid_lengths[b])
        text = [s for s in range(n_valid) if not visual_mask[b, s]]
        vis = [s for s in range(n_valid) if visual_mask[b, s]]
        n = min(keep, len(vis)) if isinstance(keep, int) else int(np.ceil(round(keep * len(vis), 4)))
        best = sorted(vis, key=lambda s: (-importance[b, s], s))[:n]
        out.append(np.array(sorted(text + best), dtype=np.int64))
    return out


def attention_probabilities(q, k, **options):
    """The attention probabilities (B, N, T, S) in float64 (zeros for rows that see nothing)."""
    return _forward_parts(q, k, k, **options)["p"]


def block_sparse_mask(blocks, block_size, T, S):
    """The token-level mask (Bm, Nm, T, S) of a boolean block map (Bm, Nm, ceil(T / bq), ceil(S / bk)):
    query i may see key j iff block (i // bq, j // bk) is in the map."""
    bq, bk = (block_size, block_size) if isinstance(block_size, (int, np.integer)) else block_size
    blocks = np.asarray(blocks, dtype=bool)
    blocks = blocks.reshape((1,) * (4 - blocks.ndim) + blocks.shape)
    return blocks[:, :, np.arange(T) // bq][:, :, :, np.arange(S) // bk]


def block_sparse_reference(q, k, v, blocks, block_size, *, is_causal=False, scale=None):
    """(out (B, T, N, H), lse (B, T, N)) in float64 of block-sparse attention: the dense softmax
    restricted to the block map (broadcast over batch and heads where it has 1), intersected with
    the top-left causal mask when ``is_causal`` (key j <= query i). Rows that see nothing give
    zeros and LSE -inf."""
    T, S = np.shape(q)[1], np.shape(k)[1]
    return attention_reference(q, k, v, mask=block_sparse_mask(blocks, block_size, T, S), scale=scale,
                               is_causal=is_causal)


def block_sparse_reference_grads(q, k, v, blocks, block_size, d_out, d_lse=None, *, is_causal=False, scale=None):
    """Float64 gradients (dq, dk, dv) of sum(out * d_out) + sum(lse * d_lse) of
    ``block_sparse_reference``."""
    T, S = np.shape(q)[1], np.shape(k)[1]
    return attention_reference_grads(q, k, v, d_out, d_lse, mask=block_sparse_mask(blocks, block_size, T, S),
                                     scale=scale, is_causal=is_causal)[:3]


# ------------------------------------------------------------------------------------------------
# Dynamic mask attention (Flash-DMA, Doge's ``prepare_dynamic_mask``).


def _softplus(x):
    return np.logaddexp(0.0, x)


def zoh_states_reference(value, dt_proj, A, dt_bias=None):
    """zoh (B, K, S) float64 = exp(A[h] * softplus(V_flat @ dt_proj.T + dt_bias))[b, s, h], with
    value (B, S, K, H) flattened to V_flat (B, S, K * H) (head-major), dt_proj (K, K * H), A (K,),
    dt_bias (K,) or None (Doge's dt_proj Linear and A parameter)."""
    v = _f64(value)
    B, S, K, H = v.shape
    x = v.reshape(B, S, K * H) @ _f64(dt_proj).T
    if dt_bias is not None:
        x = x + _f64(dt_bias)
    return np.swapaxes(np.exp(_f64(A) * _softplus(x)), 1, 2)


def zoh_states_reference_grads(value, dt_proj, A, d_zoh, dt_bias=None):
    """Float64 gradients (d_value, d_dt_proj, d_A, d_dt_bias or None) of sum(zoh * d_zoh)."""
    v = _f64(value)
    B, S, K, H = v.shape
    vf = v.reshape(B, S, K * H)
    w, a = _f64(dt_proj), _f64(A)
    x = vf @ w.T + (0.0 if dt_bias is None else _f64(dt_bias))
    z = np.exp(a * _softplus(x))  # (B, S, K)
    dz = np.swapaxes(_f64(d_zoh), 1, 2) * z  # d/d(A * softplus(x))
    d_a = (dz * _softplus(x)).sum(axis=(0, 1))
    dx = dz * a / (1.0 + np.exp(-x))  # softplus' = sigmoid
    d_w = np.einsum("bsk,bsi->ki", dx, vf)
    d_v = (dx @ w).reshape(B, S, K, H)
    return d_v, d_w, d_a, None if dt_bias is None else dx.sum(axis=(0, 1))


def dynamic_mask_kept(zoh, keep_window_size, T, *, is_causal=True, bottom_right=False, q_segments=None,
                      kv_segments=None, kv_lengths=None):
    """Boolean (B, K, T, S): the keys each query row keeps, per KV head.

    Allowed keys are those of the dense mask conventions (``visibility``: causal top-left or
    bottom-right, key lengths, segments). Among a row's allowed keys, the ``keep_window_size``
    largest by zoh are kept; ties go to the lower key index; a NaN zoh counts as larger than
    every number (as torch.topk orders it). All allowed keys are kept when there are no more
    than ``keep_window_size`` of them."""
    z = _f64(zoh)
    B, K, S = z.shape
    allowed = visibility(B, 1, T, S, is_causal=is_causal, kv_lengths=kv_lengths, q_segments=q_segments,
                         kv_segments=kv_segments, bottom_right=bottom_right)  # (B, 1, T, S)
    kept = np.zeros((B, K, T, S), bool)
    s = np.arange(S)
    for b in range(B):
        for h in range(K):
            nan = np.isnan(z[b, h])
            # The global order of the keys, best first: NaN, then larger zoh, then lower index.
            order = np.lexsort((s, -np.where(nan, 0.0, z[b, h]), -nan.astype(np.int64)))
            ok = allowed[b, 0][:, order]  # (T, S) allowed, in that order
            keep_sorted = ok & (np.cumsum(ok, axis=1) <= keep_window_size)
            kept[b, h][:, order] = keep_sorted
    return kept


def _dynamic_mask_problem(q, zoh, keep_window_size, is_causal, bottom_right, segment_ids, kv_lengths, S):
    B, T, N = np.shape(q)[:3]
    K = np.shape(zoh)[1]
    q_seg = kv_seg = None
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
    kept = dynamic_mask_kept(zoh, keep_window_size, T, is_causal=is_causal, bottom_right=bottom_right,
                             q_segments=q_seg, kv_segments=kv_seg, kv_lengths=kv_lengths)
    G = N // K
    mask = np.repeat(kept, G, axis=1)  # (B, N, T, S): query head n keeps what its KV head n // G keeps
    bias = np.repeat(_f64(zoh), G, axis=1)[:, :, None, :]  # (B, N, 1, S)
    return mask, bias, G


def dynamic_mask_reference(q, k, v, zoh, *, keep_window_size, is_causal=True, scale=None, segment_ids=None,
                           q_lengths=None, kv_lengths=None, bottom_right=False):
    """(out (B, T, N, H), lse (B, T, N)) in float64 of dynamic mask attention (Flash-DMA / Doge).

    zoh is (B, K, S): one score per KV head and key. For query row t of head n (KV head
    h = n // (N // K)) the kept keys are ``dynamic_mask_kept``'s; logits are scale * q.k + zoh[b, h, s]
    on kept keys, and the softmax runs over kept keys only. Rows with no kept key, and rows at or
    past q_lengths[b], give zeros and LSE -inf. A NaN reaches exactly the rows whose kept keys
    carry it. segment_ids: one (B, T) array (T == S) or a pair ((B, T), (B, S))."""
    S = np.shape(k)[1]
    mask, bias, _ = _dynamic_mask_problem(q, zoh, keep_window_size, is_causal, bottom_right, segment_ids,
                                          kv_lengths, S)
    return attention_reference(q, k, v, bias=bias, mask=mask, scale=scale, q_lengths=q_lengths)


def dynamic_mask_reference_grads(q, k, v, zoh, d_out, d_lse=None, *, keep_window_size, is_causal=True, scale=None,
                                 segment_ids=None, q_lengths=None, kv_lengths=None, bottom_right=False):
    """Float64 gradients (dq, dk, dv, d_zoh) of sum(out * d_out) + sum(lse * d_lse) of
    ``dynamic_mask_reference``; d_zoh (B, K, S) sums the logits' gradients over the query rows and
    the query heads of each KV head's group (the kept set itself is piecewise constant in zoh)."""
    S = np.shape(k)[1]
    mask, bias, G = _dynamic_mask_problem(q, zoh, keep_window_size, is_causal, bottom_right, segment_ids,
                                          kv_lengths, S)
    dq, dk, dv, dbias = attention_reference_grads(q, k, v, d_out, d_lse, bias=bias, mask=mask, scale=scale,
                                                  q_lengths=q_lengths)
    B, N = dbias.shape[:2]
    d_zoh = dbias[:, :, 0, :].reshape(B, N // G, G, S).sum(axis=2)
    return dq, dk, dv, d_zoh


def image_block_mask(rng, shape):
    """A Gemma-3-like pattern (causal, plus bidirectional blocks of random spans along the
    diagonal), with the first keys hidden for example 0 (left padding) and one row wholly hidden:
    tiles that are empty, full and mixed, in the shape the forward's mask ranges look for."""
    T, S = shape[-2:]
    i, j = np.arange(T)[:, None] + (S - T), np.arange(S)[None, :]
    mask = np.broadcast_to(j <= i, shape).copy()
    start = 0
    while start < S:
        size = int(rng.integers(3, 24))
        if rng.random() < 0.6:  # an image block: every token sees the whole block
            inside = (i >= start) & (i < start + size) & (j >= start) & (j < start + size)
            mask |= np.broadcast_to(inside, shape)
        start += size + int(rng.integers(0, 10))
    if len(shape) == 4:
        mask[0, ..., :int(rng.integers(1, 20))] = False
    mask[(0,) * (len(shape) - 2) + (T // 2,)] = False
    return mask
