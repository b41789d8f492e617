"""Properties of the GPU path that only a GPU can show (run with --gpu)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gpu


def test_import_does_not_preallocate_gpu_memory():
    """Importing mmfa_torch and running it leaves most GPU memory free (JAX would take 75%)."""
    script = textwrap.dedent("""
        import os
        os.environ.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
        import torch, mmfa_torch
        q = torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
        mmfa_torch.attention(q, q, q)
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        print(free / total)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) > 0.6, out.stdout


def test_bridge_shares_memory():
    """torch -> jax -> torch hands over the same device buffer: no copy either way."""
    import torch

    from mmfa_torch.bridge import to_jax, to_torch

    t = torch.randn(2, 8, 128, 64, device="cuda", dtype=torch.bfloat16)
    x = to_jax(t)
    assert x.unsafe_buffer_pointer() == t.data_ptr()
    assert to_torch(x).data_ptr() == t.data_ptr()


def test_torch_output_is_on_the_callers_stream():
    """Work queued on a side stream before the call is seen by the kernels (stream ordering)."""
    import torch

    import mmfa_torch

    side = torch.cuda.Stream()
    q = torch.randn(1, 2, 4096, 64, device="cuda", dtype=torch.float16)
    with torch.cuda.stream(side):
        for _ in range(20):  # a long queue on the side stream, ending in the value we check
            q.mul_(1.0)
        q.fill_(0.5)
        k = torch.randn(1, 2, 4096, 64, device="cuda", dtype=torch.float16)
        v = torch.randn(1, 2, 4096, 64, device="cuda", dtype=torch.float16)
        out = mmfa_torch.attention(q, k, v)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    side.synchronize()
    torch.testing.assert_close(out, want, atol=2e-3, rtol=2e-3)


def test_torch_pipeline_without_sync_still_refuses_a_short_output_length():
    """With output_length and max_scorers given on CUDA the torch pipeline makes no host sync; an
    output_length that would drop kept tokens then fails a device-side assert at the next sync
    (in a subprocess: a device assert ends the CUDA context), and a long enough one passes."""
    script = textwrap.dedent("""
        import sys, torch, mmfa_torch
        torch.manual_seed(0)
        B, H, T, D, n_text = 1, 2, 512, 64, 32
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        visual = torch.zeros(B, T, dtype=torch.bool, device="cuda")
        visual[:, : T - n_text] = True
        kept = n_text + (T - n_text) // 2  # keep 0.5 of 480 visual tokens
        out, idx, lengths, _ = mmfa_torch.multimodal_attention(q, k, v, visual, 0.5, is_causal=True,
                                                              max_scorers=n_text, output_length=kept)
        torch.cuda.synchronize()
        assert int(lengths.max()) == kept, lengths
        mmfa_torch.multimodal_attention(q, k, v, visual, 0.5, is_causal=True, max_scorers=n_text,
                                        output_length=kept - 1)
        try:
            torch.cuda.synchronize()
        except RuntimeError as e:
            print("ASSERTED", e)
            sys.exit(0)
        print("NOT ASSERTED")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert "ASSERTED" in out.stdout and "NOT ASSERTED" not in out.stdout, (out.stdout, out.stderr[-3000:])
