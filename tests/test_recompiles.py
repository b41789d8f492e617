"""A call whose shapes were seen compiles nothing: every public function, both faces, the
transformers path (prefill, pruning, decode). Counted with ``mmfa_jax.compiles`` (jax.monitoring's
XLA compile events, and the Triton route's own compiles) on fresh random data each call.

An eager ``pallas_call`` builds a new jitted wrapper on every call, so it compiles every time:
these tests are what keeps each kernel launch under a cached jit.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import jax.numpy as jnp

import mmfa_jax
from conftest import DEVICE
from mmfa_jax import compiles


def _twice(make, call):
    """Run ``call(*make())`` twice on fresh data; returns what the second run compiled."""
    call(*make())
    with compiles.counted() as seen:
        out = call(*make())
        jax_block(out)
    return seen


def jax_block(out):
    import jax

    for leaf in jax.tree_util.tree_leaves(out):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()


def _data(rng, B=2, T=40, S=40, H=2, D=16):
    def make():
        q = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((B, S, H, D)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((B, S, H, D)), jnp.float32)
        visual = jnp.asarray(np.arange(S)[None, :].repeat(B, 0) % 3 != 0)
        return q, k, v, visual
    return make


@pytest.mark.parametrize("what", ["attention", "attention_lse", "attention_at_rows", "importance", "importance_no_lse",
                                  "select", "compact", "multimodal"])
def test_jax_face_warm_calls_compile_nothing(what, impl, rng):
    make = _data(rng)

    def call(q, k, v, visual):
        if what == "attention":
            return mmfa_jax.attention(q, k, v, is_causal=True, implementation=impl)
        if what == "attention_lse":
            return mmfa_jax.attention(q, k, v, return_lse=True, implementation=impl)
        if what == "attention_at_rows":
            rows = jnp.tile(jnp.arange(0, 40, 2, dtype=jnp.int32)[None], (2, 1))
            return mmfa_jax.attention_at_rows(q, rows, k, v, implementation=impl)
        if what in ("importance", "importance_no_lse"):
            _, lse = mmfa_jax.attention(q, k, v, return_lse=True, implementation=impl)
            return mmfa_jax.visual_token_importance(q, k, lse if what == "importance" else None, visual,
                                                    implementation=impl)
        if what == "select":
            score = mmfa_jax.visual_token_importance(q, k, None, visual, implementation=impl)
            return mmfa_jax.select_visual_tokens(score, visual, 0.5, implementation=impl)
        if what == "compact":
            from mmfa_jax.pruning import compact_positions
            return compact_positions(visual, 30, implementation=impl)
        return mmfa_jax.multimodal_attention(q, k, v, visual, 0.5, implementation=impl)

    seen = _twice(make, call)
    assert seen.total == 0, f"{what}: a warm call compiled: {seen}"


torch = pytest.importorskip("torch")


def _torch_data(rng, B=2, T=40, H=2, D=16):
    device = DEVICE[0]

    def make():
        q, k, v = (torch.as_tensor(rng.standard_normal((B, H, T, D)), dtype=torch.float32, device=device)
                   for _ in range(3))
        visual = torch.as_tensor(np.arange(T)[None, :].repeat(B, 0) % 3 != 0, device=device)
        return q, k, v, visual
    return make


@pytest.mark.parametrize("what", ["sdpa", "sdpa_backward", "importance", "select", "multimodal"])
def test_torch_face_warm_calls_compile_nothing(what, impl, rng):
    import mmfa_torch

    make = _torch_data(rng)

    def call(q, k, v, visual):
        if what == "sdpa":
            return mmfa_torch.scaled_dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        if what == "sdpa_backward":
            q.requires_grad_(True)
            out = mmfa_torch.scaled_dot_product_attention(q, k, v, is_causal=True, implementation=impl)
            out.sum().backward()
            return q.grad
        if what in ("importance", "select"):
            _, lse = mmfa_torch.scaled_dot_product_attention(q, k, v, return_lse=True, implementation=impl)
            score = mmfa_torch.visual_token_importance(q, k, lse, visual, implementation=impl)
            if what == "importance":
                return score
            return mmfa_torch.select_visual_tokens(score, visual, 0.5)
        return mmfa_torch.multimodal_attention(q, k, v, visual, 0.5, implementation=impl)

    seen = _twice(make, call)
    assert seen.total == 0, f"{what}: a warm call compiled: {seen}"


@contextlib.contextmanager
def _tiny_llava(impl, rng):
    """A tiny random LLaVA on the test device, its text decoder on "mmfa" with ``impl``'s kernels
    (registered while the block runs): yields (model, dtype)."""
    pytest.importorskip("transformers")
    if impl == "xla":
        pytest.skip("the XLA path launches no Pallas kernel; the kernels' paths are 'interpret' and 'pallas'")
    from mmfa_torch import hf
    from mmfa_torch.testing import vlms

    hf.register(implementation=impl)
    try:
        dtype = torch.bfloat16 if DEVICE[0] == "cuda" else torch.float32
        yield vlms.build("llava", seed=int(rng.integers(2**31)), device=DEVICE[0], dtype=dtype), dtype
    finally:
        hf.register(implementation=None)


@pytest.mark.parametrize("prune", [False, True], ids=["dense", "prune"])
def test_generate_compiles_nothing_when_warm(prune, impl, rng):
    """A second ``generate`` of the same shapes (prefill, pruned prefill, decode steps) compiles nothing."""
    from mmfa_torch import hf
    from mmfa_torch.testing import vlms

    with _tiny_llava(impl, rng) as (model, dtype):
        if prune:
            hf.prune_visual_tokens(model, 0.25, layer=1)
        seeds = iter(rng.integers(2**31, size=2))

        def make():
            return (vlms.make_inputs(model, "llava", images_per_example=(1, 1), text_lengths=[3, 5],
                                     seed=int(next(seeds)), device=DEVICE[0], dtype=dtype),)

        def call(inputs):
            with torch.no_grad():
                return model.generate(**inputs, max_new_tokens=3, do_sample=False)

        seen = _twice(make, call)
    assert seen.total == 0, f"a warm generate compiled: {seen}"


@pytest.mark.gpu
@pytest.mark.parametrize("prune", [False, True], ids=["dense", "prune"])
def test_static_cache_generate_in_cuda_graphs(prune, rng):
    """generate(cache_implementation="static") on CUDA compiles the decode step with
    torch.compile(mode="reduce-overhead") (transformers' default): the steps run mmfa's decode
    kernel inside CUDA graphs, give the greedy tokens of an eager generate with a dynamic cache,
    and a second generate compiles no kernel. With ``prune`` the compiled steps are refused with a
    clear error (their scores differed in CUDA graphs), and eager steps (disable_compile) run."""
    pytest.importorskip("transformers")
    import torch

    from mmfa_torch import hf, launch
    from mmfa_torch.testing import vlms

    hf.register(implementation="pallas")
    model = vlms.build("llava", seed=int(rng.integers(2**31)), device="cuda", dtype=torch.bfloat16)
    if prune:
        hf.prune_visual_tokens(model, 0.25, layer=1)
    seeds = iter(rng.integers(2**31, size=3))

    def make():
        return (vlms.make_inputs(model, "llava", images_per_example=(1, 1), text_lengths=[3, 5],
                                 seed=int(next(seeds)), device="cuda", dtype=torch.bfloat16),)

    launched = []
    real = launch.run_decode

    def counting(*args, **kwargs):
        launched.append(torch.cuda.is_current_stream_capturing())
        return real(*args, **kwargs)

    def call(inputs, **kw):
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=6, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True, **kw)

    launch.run_decode = counting
    try:
        inputs = make()[0]
        if prune:  # refused until the scores in CUDA graphs match (see hf.pruning._outer_pre_hook)
            with pytest.raises(NotImplementedError, match="CUDA graphs"):
                call(inputs, cache_implementation="static")
            eager = call(inputs, cache_implementation="static", disable_compile=True)
            assert eager.sequences.shape[1] == inputs["input_ids"].shape[1] + 6
            return
        static = call(inputs, cache_implementation="static")
        assert any(launched), "no decode kernel was launched inside a CUDA graph capture"
        dynamic = call(inputs)
        # Teacher-forced comparison up to the first token the two runs chose differently (bf16 on
        # random weights has near ties): the scores of every step up to it agree.
        T = inputs["input_ids"].shape[1]
        same = (static.sequences[:, T:] == dynamic.sequences[:, T:]).all(0).long().cumprod(0).sum().item()
        for a, b in zip(static.scores[:same + 1], dynamic.scores[:same + 1]):
            torch.testing.assert_close(a.float(), b.float(), atol=0.05, rtol=0.05)
        assert same >= 1, (static.sequences, dynamic.sequences)  # at least one step in graphs compared
        seen = _twice(make, lambda x: call(x, cache_implementation="static"))
    finally:
        launch.run_decode = real
        hf.register(implementation=None)
    assert seen.total == 0, f"a warm static-cache generate compiled: {seen}"


def test_static_cache_decode_step_traces_without_graph_breaks(impl, rng):
    """The decode step generate compiles for a static cache (LLaVA, 4-D masks under torch.compile)
    is one graph on "mmfa": a graph break would make dynamo compile each attention layer as a
    frame of its own, recompile per layer index and, past its limit, run the steps eagerly."""
    import torch._dynamo
    import transformers

    from mmfa_torch.testing import vlms

    with _tiny_llava(impl, rng) as (model, dtype):
        inputs = vlms.make_inputs(model, "llava", images_per_example=(1,), text_lengths=[3],
                                  seed=int(rng.integers(2**31)), device=DEVICE[0], dtype=dtype)
        L = inputs["input_ids"].shape[1]
        cache = transformers.StaticCache(config=model.config, max_cache_len=L + 8)
        with torch.no_grad():
            token = model(**inputs, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            torch._dynamo.reset()
            explained = torch._dynamo.explain(model.forward)(
                input_ids=token, past_key_values=cache, use_cache=True,
                cache_position=torch.tensor([L], device=DEVICE[0]),
                attention_mask=torch.ones(1, L + 1, dtype=torch.long, device=DEVICE[0]))
    reasons = [f"{b.reason} at {b.user_stack[-1] if b.user_stack else '?'}" for b in explained.break_reasons]
    assert explained.graph_break_count == 0, "\n".join(reasons)


@pytest.mark.gpu
def test_pruned_prefill_syncs_once_more_than_a_plain_one(rng):
    """Pruning reads its static sizes once, when the prompt arrives: a pruned prefill makes at most
    one host sync more than the same prefill without pruning (a sync per later layer would stall
    the host behind the GPU each time). Counted with torch's sync debug mode, warm."""
    pytest.importorskip("transformers")
    import warnings

    import torch

    from mmfa_torch import hf
    from mmfa_torch.testing import vlms

    hf.register(implementation="pallas")
    model = vlms.build("llava", seed=int(rng.integers(2**31)), device="cuda", dtype=torch.bfloat16)
    inputs = vlms.make_inputs(model, "llava", images_per_example=(1, 1), text_lengths=[3, 5],
                              seed=int(rng.integers(2**31)), device="cuda", dtype=torch.bfloat16)

    def syncs():
        with torch.no_grad():
            model(**inputs)  # warm
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    model(**inputs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in seen)

    try:
        plain = syncs()
        handle = hf.prune_visual_tokens(model, 0.25, layer=1)
        pruned = syncs()
        assert handle.kept_positions.shape[1] < inputs["input_ids"].shape[1]  # it did prune
    finally:
        hf.register(implementation=None)
    assert pruned <= plain + 1, f"a pruned prefill made {pruned} host syncs, a plain one {plain}"
