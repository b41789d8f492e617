"""Bad input raises, and the message names the argument at fault."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mmfa_jax
import mmfa_torch
from mmfa_jax import AttentionConfig, KernelConfig


@pytest.fixture
def qkv(rng):
    """query (B=2, T=8, N=4, H=16), key/value (2, 8, 2, 16), float32."""
    q = jnp.asarray(rng.standard_normal((2, 8, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 8, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 8, 2, 16)), jnp.float32)
    return q, k, v


def attn(q, k, v, **kw):
    kw.setdefault("implementation", "xla")
    return mmfa_jax.attention(q, k, v, **kw)


# ------------------------------------------------------------------------------------------------
# JAX face: shapes and dtypes


def test_jax_wrong_rank(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="query must have rank"):
        attn(q[0, 0], k, v)
    with pytest.raises(ValueError, match="key must have rank"):
        attn(q, k[None], v)
    with pytest.raises(ValueError, match="key has rank 3 but query has rank 4"):
        attn(q, k[0], v)
    with pytest.raises(ValueError, match="value must have rank"):
        attn(q, k, v[0, 0])


def test_jax_mismatched_batch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="batch"):
        attn(q, k[:1], v[:1])


def test_jax_mismatched_head_dim(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="head dim"):
        attn(q, k[..., :8], v[..., :8])


def test_jax_key_value_shape_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="key and value"):
        attn(q, k, v[:, :4])
    with pytest.raises(ValueError, match="key and value"):
        attn(q, k, v[..., :8])


def test_jax_heads_not_divisible(qkv, rng):
    q, _, _ = qkv
    k3 = jnp.asarray(rng.standard_normal((2, 8, 3, 16)), jnp.float32)
    with pytest.raises(ValueError, match=r"query heads \(4\).*key/value heads \(3\)"):
        attn(q, k3, k3)


def test_jax_empty_inputs_give_empty_outputs(qkv, impl):
    """As jax.nn: T=0, batch 0 or no heads give empty outputs; S=0 gives rows that see nothing
    (zeros, LSE -inf)."""
    q, k, v = qkv
    for q_, k_, v_ in ((q[:, :0], k, v), (q[:0], k[:0], v[:0]), (q[:, :, :0], k[:, :, :0], v[:, :, :0])):
        out, lse = attn(q_, k_, v_, return_lse=True, implementation=impl)
        assert out.shape == q_.shape and lse.shape == q_.shape[:3]
    out, lse = attn(q, k[:, :0], v[:, :0], return_lse=True, implementation=impl)
    assert out.shape == q.shape and (np.asarray(out) == 0).all() and np.isneginf(np.asarray(lse)).all()


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_])
def test_jax_bad_dtype(qkv, dtype):
    q, k, v = qkv
    with pytest.raises(TypeError, match="query must be float16, bfloat16 or float32"):
        attn(q.astype(dtype), k, v)
    with pytest.raises(TypeError, match="key must be float16, bfloat16 or float32"):
        attn(q, k.astype(dtype), v)


def test_jax_float64_rejected_when_x64_enabled(rng):
    with jax.enable_x64(True):
        q = jnp.asarray(rng.standard_normal((1, 4, 2, 8)), jnp.float64)
        assert q.dtype == jnp.float64
        with pytest.raises(TypeError, match="query must be float16, bfloat16 or float32, got float64"):
            attn(q, q, q)


def test_jax_mixed_dtypes(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="query, key and value must share a dtype"):
        attn(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(TypeError, match="query, key and value must share a dtype"):
        attn(q.astype(jnp.float16), k.astype(jnp.float16), v)


def test_jax_head_dim_over_kernel_limit(rng):
    q = jnp.asarray(rng.standard_normal((1, 4, 1, 320)), jnp.float32)
    with pytest.raises(ValueError, match="head dim 320"):
        attn(q, q, q, implementation="interpret")
    assert attn(q, q, q).shape == q.shape  # the xla path has no limit


# ------------------------------------------------------------------------------------------------
# JAX face: options


@pytest.mark.parametrize("window", [-1, (-1, 2), (2, -3), (None, -1)])
def test_jax_window_negative(qkv, window):
    with pytest.raises(ValueError, match="local_window_size"):
        attn(*qkv, local_window_size=window)


@pytest.mark.parametrize("window", [(1, 2, 3), (1,), "8", 2.5, (1.5, 2), {"left": 1}])
def test_jax_window_malformed(qkv, window):
    with pytest.raises(ValueError, match="local_window_size"):
        attn(*qkv, local_window_size=window)


@pytest.mark.parametrize("cap", [0.0, -1.0, float("inf"), float("nan")])
def test_jax_soft_cap_not_positive(qkv, cap):
    with pytest.raises(ValueError, match="logits_soft_cap"):
        attn(*qkv, logits_soft_cap=cap)


def test_jax_bad_scale(qkv):
    with pytest.raises(ValueError, match="scale"):
        attn(*qkv, scale=float("nan"))


def test_jax_bad_layout(qkv):
    with pytest.raises(ValueError, match="layout"):
        attn(*qkv, layout="BHTD")


def test_jax_bad_config(qkv):
    with pytest.raises(TypeError, match="config"):
        attn(*qkv, config=KernelConfig(16, 16, 4, 2), implementation="interpret")
    # A valid config object is accepted.
    cfg = AttentionConfig(*(KernelConfig(16, 16, 4, 2),) * 3)
    assert attn(*qkv, config=cfg).shape == qkv[0].shape


@pytest.mark.parametrize("shape", [(2, 4, 8, 7), (3, 4, 8, 8), (2, 3, 8, 8), (7,), (1, 2, 2, 4, 8, 8), (9, 8)])
def test_jax_mask_wrong_shape(qkv, shape):
    with pytest.raises(ValueError, match="mask must be broadcastable"):
        attn(*qkv, mask=jnp.ones(shape, bool))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32, jnp.int8])
def test_jax_mask_not_bool(qkv, dtype):
    with pytest.raises(TypeError, match="mask must be a boolean"):
        attn(*qkv, mask=jnp.ones((8, 8), dtype))


@pytest.mark.parametrize("shape", [(2, 4, 8, 7), (2, 2, 8, 8), (4, 2, 4, 8, 8), (7,), (7, 8)])
def test_jax_bias_wrong_shape(qkv, shape):
    with pytest.raises(ValueError, match="bias must be broadcastable"):
        attn(*qkv, bias=jnp.zeros(shape, jnp.float32))


def test_jax_bias_bad_dtype(qkv):
    with pytest.raises(TypeError, match="bias"):
        attn(*qkv, bias=jnp.zeros((8, 8), jnp.int32))


def test_jax_segment_ids_wrong_shape(qkv, rng):
    q, k, v = qkv
    with pytest.raises(ValueError, match="segment_ids"):
        attn(q, k, v, segment_ids=jnp.zeros((2, 7), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        attn(q, k, v, segment_ids=jnp.zeros((8,), jnp.int32))
    with pytest.raises(ValueError, match=r"segment_ids \(key/value\)"):
        attn(q, k, v, segment_ids=(jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 5), jnp.int32)))
    with pytest.raises(ValueError, match="segment_ids"):
        attn(q, k, v, segment_ids=(jnp.zeros((2, 8), jnp.int32),) * 3)
    with pytest.raises(TypeError, match="segment_ids"):
        attn(q, k, v, segment_ids=jnp.zeros((2, 8), jnp.float32))
    # one array needs T == S
    k2 = jnp.asarray(rng.standard_normal((2, 5, 2, 16)), jnp.float32)
    with pytest.raises(ValueError, match="segment_ids"):
        attn(q, k2, k2, segment_ids=jnp.zeros((2, 8), jnp.int32))


@pytest.mark.parametrize("name", ["query_seq_lengths", "key_value_seq_lengths"])
def test_jax_lengths_wrong_shape_or_dtype(qkv, name):
    for bad in (jnp.array([8], jnp.int32), jnp.array([[8, 8]], jnp.int32), jnp.array(8, jnp.int32)):
        with pytest.raises(ValueError, match=name):
            attn(*qkv, **{name: bad})
    with pytest.raises(TypeError, match=name):
        attn(*qkv, **{name: jnp.array([8.0, 8.0])})


def test_jax_unknown_implementation(qkv):
    with pytest.raises(ValueError, match="implementation"):
        attn(*qkv, implementation="triton")


@pytest.mark.skipif(mmfa_jax.pallas_available(), reason="the default device can run Pallas")
def test_jax_pallas_on_cpu(qkv):
    with pytest.raises(ValueError, match="implementation='pallas'"):
        attn(*qkv, implementation="pallas")


# ------------------------------------------------------------------------------------------------
# Torch face


@pytest.fixture
def tqkv():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, 16, generator=g)
    k = torch.randn(2, 2, 8, 16, generator=g)
    v = torch.randn(2, 2, 8, 16, generator=g)
    return q, k, v


def tattn(q, k, v, *args, **kw):
    kw.setdefault("implementation", "xla")
    kw.setdefault("enable_gqa", True)
    return mmfa_torch.scaled_dot_product_attention(q, k, v, *args, **kw)


@pytest.mark.parametrize("p", [0.1, 1.0])
def test_torch_dropout(tqkv, p):
    with pytest.raises(ValueError, match="dropout_p"):
        tattn(*tqkv, dropout_p=p)


def test_torch_gqa_needs_enable_gqa(tqkv):
    with pytest.raises(ValueError, match="enable_gqa"):
        tattn(*tqkv, enable_gqa=False)


def test_torch_heads_not_divisible(tqkv):
    q, k, v = tqkv
    with pytest.raises(ValueError, match="heads"):
        tattn(q[:, :3], k[:, :2], v[:, :2])


def test_torch_wrong_rank(tqkv):
    q, k, v = tqkv
    with pytest.raises(ValueError, match="query must have rank"):
        tattn(q[0, 0], k, v)
    with pytest.raises(ValueError, match="value must have rank"):
        tattn(q, k, v[None])
    assert tattn(q, k[0], v[0]).shape == q.shape  # key/value (H, S, D) broadcast over the batch, as in SDPA


def test_torch_not_a_tensor(tqkv):
    q, k, v = tqkv
    with pytest.raises(TypeError, match="key must be a torch.Tensor"):
        tattn(q, k.numpy(), v)


def test_torch_mismatched_shapes(tqkv):
    q, k, v = tqkv
    with pytest.raises(ValueError, match="batch"):
        tattn(q, torch.cat([k, k[:1]]), torch.cat([v, v[:1]]))  # batch 2 against 3: no broadcast
    with pytest.raises(ValueError, match="head dim"):
        tattn(q, k[..., :8].contiguous(), v[..., :8].contiguous())
    with pytest.raises(ValueError, match="key and value"):
        tattn(q, k, v[:, :, :4].contiguous())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_torch_int_dtype(tqkv, dtype):
    q, k, v = tqkv
    with pytest.raises(TypeError, match="query must be float16, bfloat16 or float32"):
        tattn(q.to(dtype), k.to(dtype), v.to(dtype))


def test_torch_float64_rejected(tqkv):
    """float64 tensors must raise (naming the argument and the dtype) rather than be computed
    in float32 and handed back as float32 (the output dtype must follow the query)."""
    q, k, v = (t.double() for t in tqkv)
    with pytest.raises(TypeError, match="query.*float64"):
        out = tattn(q, k, v)
        # Not reached when the product raises; says what happened otherwise.
        raise AssertionError(f"float64 input accepted, output dtype {out.dtype}")


def test_torch_mixed_dtypes(tqkv):
    q, k, v = tqkv
    with pytest.raises(TypeError, match="query, key and value must share a dtype"):
        tattn(q, k.half(), v)


def test_torch_attn_mask_bad_dtype(tqkv):
    with pytest.raises(TypeError, match="attn_mask"):
        tattn(*tqkv, attn_mask=torch.ones(8, 8, dtype=torch.int32))


def test_torch_bool_attn_mask_wrong_shape(tqkv):
    with pytest.raises(ValueError, match="mask"):
        tattn(*tqkv, attn_mask=torch.ones(8, 7, dtype=torch.bool))


def test_torch_float_attn_mask_wrong_shape(tqkv):
    """The torch argument is attn_mask: the message should name it (not an internal 'bias')."""
    with pytest.raises(ValueError, match="mask"):
        tattn(*tqkv, attn_mask=torch.zeros(3, 8))


@pytest.mark.parametrize("window", [-1, (-2, 3), (3, -5)])
def test_torch_window_negative(tqkv, window):
    with pytest.raises(ValueError, match="local_window_size"):
        tattn(*tqkv, local_window_size=window)


def test_torch_window_minus_one_in_tuple(tqkv):
    """-1 inside a tuple is negative too; it must not silently mean 'unbounded'."""
    with pytest.raises(ValueError, match="local_window_size"):
        tattn(*tqkv, local_window_size=(-1, 3))


@pytest.mark.parametrize("window", [(1, 2, 3), "8"])
def test_torch_window_malformed(tqkv, window):
    with pytest.raises((ValueError, TypeError), match="local_window_size"):
        tattn(*tqkv, local_window_size=window)


@pytest.mark.parametrize("cap", [0.0, -2.0])
def test_torch_soft_cap_not_positive(tqkv, cap):
    with pytest.raises(ValueError, match="logits_soft_cap"):
        tattn(*tqkv, logits_soft_cap=cap)


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_torch_scale_not_finite(tqkv, scale):
    """Any finite scale is valid (as in torch); NaN and infinity are not."""
    with pytest.raises(ValueError, match="scale"):
        tattn(*tqkv, scale=scale)


def test_torch_segment_ids(tqkv):
    with pytest.raises(TypeError, match="segment_ids"):
        tattn(*tqkv, segment_ids=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="segment_ids"):
        tattn(*tqkv, segment_ids=torch.zeros(2, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="segment_ids"):
        tattn(*tqkv, segment_ids=(torch.zeros(2, 8, dtype=torch.int32), torch.zeros(2, 9, dtype=torch.int32)))


@pytest.mark.parametrize("name", ["query_seq_lengths", "key_value_seq_lengths"])
def test_torch_lengths(tqkv, name):
    with pytest.raises(TypeError, match=name):
        tattn(*tqkv, **{name: torch.tensor([8.0, 8.0])})
    with pytest.raises(ValueError, match=name):
        tattn(*tqkv, **{name: torch.tensor([8, 8, 8])})


def test_torch_unknown_implementation(tqkv):
    with pytest.raises(ValueError, match="implementation"):
        tattn(*tqkv, implementation="flash")


def test_torch_pallas_on_cpu_tensors(tqkv):
    with pytest.raises(ValueError, match="implementation='pallas' needs an NVIDIA GPU"):
        tattn(*tqkv, implementation="pallas")


@pytest.mark.gpu
def test_torch_tensors_on_different_devices(tqkv):
    q, k, v = tqkv
    with pytest.raises(ValueError, match="one device"):
        tattn(q.cuda(), k, v, implementation=None)


def test_torch_valid_call_still_works(tqkv):
    """The fixtures themselves are valid: the errors above come from the one bad argument."""
    out = tattn(*tqkv)
    assert out.shape == tqkv[0].shape and torch.isfinite(out).all()
    assert np.isfinite(out.numpy()).all()


def test_review_findings_on_argument_checks():
    """Found in review: bools as windows, float64 torch masks, malformed segment pairs, negative
    torch scales (valid, as in torch), torch importance options passed through unchanged."""
    import torch

    import mmfa_jax
    import mmfa_torch

    q = np.random.default_rng(0).standard_normal((1, 6, 2, 8)).astype(np.float32)
    for window in (True, (True, None)):
        with pytest.raises(ValueError, match="local_window_size"):
            mmfa_jax.attention(q, q, q, local_window_size=window, implementation="xla")
    t = torch.from_numpy(q).transpose(1, 2).contiguous()
    with pytest.raises(TypeError, match="attn_mask"):
        mmfa_torch.attention(t, t, t, attn_mask=torch.zeros(6, 6, dtype=torch.float64), implementation="xla")
    seg = torch.zeros(1, 6, dtype=torch.int32)
    with pytest.raises(ValueError, match="segment_ids"):
        mmfa_torch.attention(t, t, t, segment_ids=(seg, seg, seg), implementation="xla")
    got = mmfa_torch.attention(t, t, t, scale=-0.5, implementation="xla")
    want = mmfa_jax.attention(q, q, q, scale=-0.5, implementation="xla")
    np.testing.assert_allclose(got.transpose(1, 2).numpy(), np.asarray(want), atol=1e-6)
    vis = torch.zeros(1, 6, dtype=torch.bool)
    vis[:, 1:4] = True
    _, lse = mmfa_torch.attention(t, t, t, return_lse=True, scale=-0.5, implementation="xla")
    imp_t = mmfa_torch.visual_token_importance(t, t, lse, vis, "text", scale=-0.5, implementation="xla")
    imp_j = mmfa_jax.visual_token_importance(q, q, np.asarray(jnp_swap(lse)), vis.numpy(), "text", scale=-0.5,
                                             implementation="xla")
    np.testing.assert_allclose(imp_t.numpy(), np.asarray(imp_j), atol=1e-6)
    with pytest.raises(ValueError, match="max_scorers"):
        mmfa_torch.visual_token_importance(t, t, lse, vis, "text", max_scorers=0, implementation="xla")


def jnp_swap(lse):
    return lse.numpy().transpose(0, 2, 1)
