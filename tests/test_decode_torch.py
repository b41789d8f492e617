"""The torch face of decode attention (``mmfa_torch.decode_attention``, SDPA's layout) against the
float64 reference: GQA, ragged caches, garbage past the lengths; on CUDA tensors the direct launch,
one compiled kernel pair per bucket of cache lengths (several lengths, no new compile), and the
transformers backend's decode steps through it."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import DEVICE, assert_close, tolerance  # noqa: E402
from test_decode import decode_reference  # noqa: E402

import mmfa_torch  # noqa: E402
from mmfa_jax import compiles  # noqa: E402
from mmfa_jax._checks import ArgumentError  # noqa: E402


def _case(rng, B, Hq, Hkv, T, S, dtype=torch.float32):
    device = DEVICE[0]
    q, k, v = (torch.as_tensor(rng.standard_normal(shape), dtype=dtype, device=device)
               for shape in ((B, Hq, T, 64), (B, Hkv, S, 64), (B, Hkv, S, 64)))
    return q, k, v


def _f64_btnh(t):
    return t.float().cpu().numpy().astype(np.float64).swapaxes(1, 2)


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
def test_matches_reference(impl, T, heads, rng):
    B, S = 2, 150
    q, k, v = _case(rng, B, *heads, T, S)
    lengths = torch.tensor([S, 97], dtype=torch.int32, device=q.device)
    k[1, :, 97:] = float("nan")  # garbage past the length is never read
    v[1, :, 97:] = float("nan")
    out, lse = mmfa_torch.decode_attention(q, k, v, kv_lengths=lengths, implementation=impl, return_lse=True)
    ref_out, ref_lse = decode_reference(_f64_btnh(q), _f64_btnh(k), _f64_btnh(v), lengths.cpu().numpy())
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out.float().cpu().numpy().swapaxes(1, 2), ref_out, tolerance("float32"))
    assert_close(lse.cpu().numpy(), ref_lse, tolerance("float32"))


def test_key_mask(impl, rng):
    """A key mask (left padding, an unwritten static-cache tail) hides its keys, NaN under them
    included; a mask that hides everything gives zeros. On CUDA the direct launch, in a bucket."""
    B, S = 3, 150
    q, k, v = _case(rng, B, 8, 2, 1, S)
    pos = torch.arange(S)
    mask = torch.stack([(pos >= 20) & (pos < 133), torch.as_tensor(rng.random(S) < 0.5), torch.zeros(S, dtype=bool)])
    ref_out, ref_lse = decode_reference(_f64_btnh(q), _f64_btnh(k), _f64_btnh(v), key_mask=mask.numpy())
    hidden = ~mask.to(q.device)[:, None, :, None]
    k, v = k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("inf"))
    out, lse = mmfa_torch.decode_attention(q, k, v, key_mask=mask.to(q.device), implementation=impl, return_lse=True)
    assert_close(out.float().cpu().numpy().swapaxes(1, 2), ref_out, tolerance("float32"))
    assert_close(lse.cpu().numpy(), ref_lse, tolerance("float32"))
    assert (out[2] == 0).all()
    with pytest.raises(TypeError, match="key_mask"):
        mmfa_torch.decode_attention(q, k, v, key_mask=mask.int().to(q.device), implementation=impl)
    for bad in (mask[:, :S - 8], torch.ones(B, S + 8, dtype=torch.bool), mask[:1]):
        with pytest.raises(ValueError, match="key_mask"):
            mmfa_torch.decode_attention(q, k, v, key_mask=bad.to(q.device), implementation=impl)


def test_bf16_and_no_lengths(impl, rng):
    q, k, v = _case(rng, 1, 8, 2, 1, 300, torch.bfloat16)
    out = mmfa_torch.decode_attention(q, k, v, implementation=impl)
    ref, _ = decode_reference(_f64_btnh(q), _f64_btnh(k), _f64_btnh(v))
    assert_close(out.float().cpu().numpy().swapaxes(1, 2), ref, tolerance("bfloat16"))


def test_bad_arguments():
    q, k, v = (torch.randn(1, 4, 1, 16), torch.randn(1, 3, 20, 16), torch.randn(1, 3, 20, 16))
    with pytest.raises(ArgumentError, match="multiple"):
        mmfa_torch.decode_attention(q, k, v, implementation="xla")
    with pytest.raises(ArgumentError, match="T=17"):
        mmfa_torch.decode_attention(torch.randn(1, 3, 17, 16), k, v, implementation="xla")
    with pytest.raises(TypeError, match="kv_lengths"):
        mmfa_torch.decode_attention(torch.randn(1, 3, 1, 16), k, v, kv_lengths=torch.ones(1), implementation="xla")


@pytest.mark.gpu
def test_cuda_one_kernel_pair_serves_a_bucket_of_lengths(rng):
    """Growing caches (a new tensor each step, as transformers' DynamicCache makes) inside one bucket
    launch the same compiled kernels: after the first length, nothing compiles; every length is
    exact."""
    from mmfa_jax import decode as jax_decode

    DEVICE[0] = "cuda"
    base = 4096 + 7
    assert jax_decode.capacity_of(base) == jax_decode.capacity_of(base + 40)
    q, k, v = _case(rng, 1, 32, 8, 1, base + 40, torch.bfloat16)
    mmfa_torch.decode_attention(q, k[:, :, :base].contiguous(), v[:, :, :base].contiguous())
    torch.cuda.synchronize()
    caches, outs = [], []
    with compiles.counted() as seen:
        for S in range(base + 1, base + 41, 13):
            caches.append((k[:, :, :S].contiguous(), v[:, :, :S].contiguous()))
            outs.append(mmfa_torch.decode_attention(q, *caches[-1]))
        torch.cuda.synchronize()
    assert seen.total == 0, f"a length of the same bucket compiled: {seen}"
    for (ks, vs), out in zip(caches, outs):
        ref, _ = decode_reference(_f64_btnh(q), _f64_btnh(ks), _f64_btnh(vs))
        assert_close(out.float().transpose(1, 2), ref, tolerance("bfloat16"))


def test_torch_compile_fullgraph_traces_the_decode_op(rng):
    """Under torch.compile the step is the custom op ``mmfa::decode_attention``: a full graph, the
    eager result."""
    q, k, v = _case(rng, 2, 8, 2, 1, 90)
    lengths = torch.tensor([90, 41], dtype=torch.int32)

    mask = torch.arange(90)[None, :] >= torch.tensor([[3], [0]])

    def step(q, k, v, lengths, mask):
        return mmfa_torch.decode_attention(q, k, v, kv_lengths=lengths, key_mask=mask, implementation="xla") * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, lengths, mask), step(q, k, v, lengths, mask), atol=1e-6, rtol=1e-6)
