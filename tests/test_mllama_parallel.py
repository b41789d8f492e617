"""mmfa_torch.hf.mllama.parallelize_cross_attention on a tiny random Llama 3.2 Vision (Mllama), gloo over
2 and 4 CPU processes: the patched model's logits, loss gradients and greedy generation equal the
unpatched model's (the same weights, on every rank).

The workers (this file with ``--worker``, started by ``test_parallel_torch.launch``) build the same
model from the test's seed, with the tanh gates of the cross-attention layers set away from their
initial 0 (at 0 a cross-attention layer changes nothing, and any patch would pass), and inputs that
exercise Mllama's masks: padding tiles, a text row before the image token that sees no tile (Mllama
lets it attend every visual token and zeroes its MLP output), text and visual lengths that the
ranks do not divide (padded shards). Cases:

- replicated: pixel_values on every rank, both strategies; logits, then every parameter's gradient
  of a language-model loss (vision tower included) and the gradient of pixel_values;
- sharded: each rank passes only its shard of the visual features as cross_attention_states
  (the last one zero-padded), with recompute_kv: logits and gradients (parameters, and the shard's);
- generate: greedy decoding with the KV cache (each rank caches its K/V shard) gives the same tokens
  and the same logits per step;
- remove: after ``handle.remove()`` the layers run the class's own forward again.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ("replicated_lv_xattn", "replicated_ring", "sharded_recompute", "generate", "remove")


def _mllama_missing() -> str | None:
    """Why this transformers cannot run the test (None: it can)."""
    try:
        import transformers
        from transformers import MllamaConfig, MllamaForConditionalGeneration  # noqa: F401
        from transformers.models.mllama.modeling_mllama import MllamaTextCrossAttention
    except ImportError as e:  # pragma: no cover (every supported transformers has Mllama)
        return f"this transformers has no Mllama ({e})"
    import inspect

    params = inspect.signature(MllamaTextCrossAttention.forward).parameters
    if not {"hidden_states", "cross_attention_states", "attention_mask"} <= set(params):
        return (f"transformers {transformers.__version__}: MllamaTextCrossAttention.forward takes {list(params)}, not "
                "the (hidden_states, cross_attention_states, attention_mask, cache) that the patch replaces")
    return None


@pytest.mark.parametrize("world", [2, 4])
def test_mllama_parallel(world, rng):
    pytest.importorskip("transformers")
    missing = _mllama_missing()
    if missing:
        pytest.skip(missing)
    from test_parallel_torch import launch

    results = launch(world, ",".join(CASES), int(rng.integers(2**31)), script=__file__)
    report = "\n".join(f"--- rank {rank} (rc {rc}) ---\n{out[-6000:]}" for rank, rc, out in results)
    assert all(rc == 0 for _, rc, _ in results), report
    assert all(f"{len(CASES)} cases passed" in out for _, _, out in results), report


def test_errors():
    pytest.importorskip("transformers")
    if _mllama_missing():
        pytest.skip(_mllama_missing())
    import torch

    from mmfa_torch.hf import mllama

    model = _model(0)
    with pytest.raises(ValueError, match=r"strategy must be one of \('lv_xattn', 'ring'\), got 'ulysses'"):
        mllama.parallelize_cross_attention(model, strategy="ulysses")
    with pytest.raises(ValueError, match=r"visual must be one of \('replicated', 'sharded'\), got 'split'"):
        mllama.parallelize_cross_attention(model, visual="split")
    if not torch.distributed.is_initialized():
        with pytest.raises(ValueError, match="needs an initialised torch.distributed process group"):
            mllama.parallelize_cross_attention(model)


# ------------------------------------------------------------------------------------------------
# The model and inputs (the same on every rank: built from the seed).

TEXT_LEN, IMAGE_ID, PATCHES = 11, 99, 5  # 8x8 tiles of 4x4 patches + the class token


def _model(seed: int):
    import torch
    import transformers as tf

    vision = dict(hidden_size=16, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=32,
                  vision_output_dim=32, image_size=8, patch_size=4, max_num_tiles=2, intermediate_layers_indices=[0],
                  supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    # 4 query / 2 KV heads of 8; layers 1 and 3 cross-attend.
    text = dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, cross_attention_layers=[1, 3], bos_token_id=1, eos_token_id=2, pad_token_id=0,
                max_position_embeddings=128)
    if int(tf.__version__.split(".")[0]) < 5:  # 4.x's Mllama rotary embedding reads rope_scaling["rope_type"]
        text.update(rope_scaling={"rope_type": "default"}, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = tf.MllamaForConditionalGeneration(tf.MllamaConfig(vision_config=vision, text_config=text,
                                                              image_token_index=IMAGE_ID)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):  # initialised to 0: make the layer count
                layer.cross_attn_attn_gate.copy_(0.5 + torch.rand(1, generator=g))
                layer.cross_attn_mlp_gate.copy_(0.5 + torch.rand(1, generator=g))
            for norm in (getattr(getattr(layer, "cross_attn", None), n, None) for n in ("q_norm", "k_norm")):
                if norm is not None:  # RMS norm weights of 1: make them differ per channel
                    norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=g))
    return model


def _inputs(seed: int, images: int):
    """B=2; example 0 has ``images`` images of 2 tiles (both real), example 1 one image of 1 real tile (its
    second tile and any further image are padding). Text row 0 of example 0 precedes its image token and
    sees no tile."""
    import torch

    g = torch.Generator().manual_seed(seed + 2)
    B, T = 2, TEXT_LEN
    ids = torch.randint(3, IMAGE_ID, (B, T), generator=g)
    ids[0, 1] = ids[1, 0] = IMAGE_ID
    pixel_values = torch.randn(B, images, 2, 3, 8, 8, generator=g)
    aspect_ratio_ids = torch.tensor([[2] * images, [1] + [0] * (images - 1)])
    aspect_ratio_mask = torch.tensor([[[1, 1]] * images, [[1, 0]] + [[0, 0]] * (images - 1)])
    cam = torch.zeros(B, T, images, 2, dtype=torch.long)
    cam[0, 1:, :, :] = 1
    cam[1, :, 0, 0] = 1
    if images > 1:
        cam[0, 1:5, 1:, :] = 0  # rows 1..4 see the first image only
    labels = torch.randint(3, IMAGE_ID, (B, T), generator=g)
    return dict(input_ids=ids, pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids,
                aspect_ratio_mask=aspect_ratio_mask, cross_attention_mask=cam), labels


def _grads(model, extra=()):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None} | dict(extra)


def _close(actual, expected, what, grad=False, floor=1e-6):
    from conftest import assert_close, tolerance

    assert_close(actual, expected.detach().double().numpy(), tolerance("float32", grad=grad), what, floor=floor)


def _compare_grads(got, want):
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    # A gradient that cancels to far below the model's others (a scalar gate's sum over every
    # position) is compared at 1e-3 of the largest: float32 sums in another order differ there by
    # their terms' rounding, not by the result's size.
    floor = 1e-3 * max(float(w.abs().max()) for w in want.values())
    for name in want:
        _close(got[name], want[name], f"grad {name}", grad=True, floor=floor)


# ------------------------------------------------------------------------------------------------
# The cases.


def _case_replicated(strategy, seed, rank, world):
    import torch

    from mmfa_torch.hf import mllama

    model = _model(seed)
    inputs, labels = _inputs(seed, images=2)  # S = 2 images x 2 tiles x 5 patches = 20
    pix = inputs.pop("pixel_values")

    def run():
        x = pix.clone().requires_grad_()
        out = model(**inputs, pixel_values=x, labels=labels, use_cache=False)
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        return out.logits.detach(), _grads(model, {"pixel_values": x.grad})

    want_logits, want_grads = run()
    with torch.no_grad():  # the visual path matters: other images change the logits
        other = model(**inputs, pixel_values=torch.randn(pix.shape, generator=torch.Generator().manual_seed(seed)),
                      use_cache=False).logits
    assert (other - want_logits).abs().max() > 1e-2 * want_logits.abs().max()
    handle = mllama.parallelize_cross_attention(model, strategy=strategy, implementation="xla")
    assert len(handle.modules) == 2 and handle.world_size == world
    logits, grads = run()
    _close(logits, want_logits, "logits")
    _compare_grads(grads, want_grads)
    handle.remove()


def _case_sharded_recompute(seed, rank, world):
    import torch

    from mmfa_torch.hf import mllama

    model = _model(seed)
    inputs, labels = _inputs(seed, images=1)  # S = 10: 4 ranks hold 3 + 3 + 3 + 1 (+ 2 padding)
    with torch.no_grad():
        vision = model.model.vision_model(pixel_values=inputs["pixel_values"],
                                          aspect_ratio_ids=inputs["aspect_ratio_ids"],
                                          aspect_ratio_mask=inputs["aspect_ratio_mask"]).last_hidden_state
        states = model.model.multi_modal_projector(vision).reshape(2, -1, 32)  # (B, S, C)
    common = {k: inputs[k] for k in ("input_ids", "cross_attention_mask")}
    S = states.shape[1]
    s = -(-S // world)

    def run(x, saved=None):
        x = x.clone().requires_grad_()
        # What autograd keeps from the forward (shapes), when asked.
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t)
        with hooks if saved is not None else contextlib.nullcontext():
            out = model(**common, cross_attention_states=x, labels=labels, use_cache=False)
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        return out.logits.detach(), _grads(model), x.grad

    want_logits, want_grads, want_dstates = run(states)
    handle = mllama.parallelize_cross_attention(model, visual="sharded", recompute_kv=True, implementation="xla")
    mine = torch.nn.functional.pad(states, (0, 0, 0, s * world - S))[:, rank * s:(rank + 1) * s]
    saved = []
    logits, grads, dstates = run(mine, saved)
    _close(logits, want_logits, "logits")
    want_grads.pop("model.multi_modal_projector.weight", None)  # states were given: no projector, no vision
    want_grads = {k: v for k, v in want_grads.items() if "vision_model" not in k and "projector" not in k}
    _compare_grads(grads, want_grads)
    want_mine = torch.nn.functional.pad(want_dstates, (0, 0, 0, s * world - S))[:, rank * s:(rank + 1) * s]
    _close(dstates, want_mine, "grad of this rank's cross_attention_states", grad=True)
    # recompute_kv: no K/V shard (B, Hkv=2, s, D=8) nor the k_proj output (B, s, Hkv * D) was kept
    assert saved and (2, 2, s, 8) not in saved and (2, s, 16) not in saved, saved
    handle.remove()


def _case_generate(seed, rank, world):
    import torch

    from mmfa_torch.hf import mllama

    model = _model(seed)
    inputs, _ = _inputs(seed, images=1)

    def generate():
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
        return out.sequences, out.logits

    want_tokens, want_logits = generate()
    handle = mllama.parallelize_cross_attention(model, implementation="xla")
    tokens, logits = generate()
    assert torch.equal(tokens, want_tokens), (tokens, want_tokens)
    for step, (a, b) in enumerate(zip(logits, want_logits)):
        _close(a, b, f"logits of step {step}")
    handle.remove()


def _case_remove(seed, rank, world):
    import torch

    from mmfa_torch.hf import mllama

    model = _model(seed)
    inputs, _ = _inputs(seed, images=1)
    with torch.no_grad():
        want = model(**inputs).logits
    handle = mllama.parallelize_cross_attention(model, implementation="xla")
    again = mllama.parallelize_cross_attention(model, strategy="ring", implementation="xla")  # replaces it
    assert handle.modules == [] and len(again.modules) == 2
    calls = []
    for m in again.modules:
        m.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        _close(model(**inputs).logits, want, "logits, patched twice")
    # What the patch refuses, on every rank alike (so no rank waits in a collective).
    layer = again.modules[0]
    hidden, feats = torch.randn(2, 3, 32), torch.randn(2, 4, 32)
    with pytest.raises(ValueError, match="must hold only 0 and finfo"):
        layer(hidden, cross_attention_states=feats, attention_mask=torch.full((2, 1, 3, 4), -1.0))
    with pytest.raises(ValueError, match=r"must have shape \(2 or 1, 1 or 4, 3, 4\)"):
        layer(hidden, cross_attention_states=feats, attention_mask=torch.zeros(2, 1, 3, 5))
    layer.dropout = 0.1
    layer.train()
    with pytest.raises(ValueError, match="no attention dropout; the text config's dropout is 0.1"):
        layer(hidden, cross_attention_states=feats)
    layer.dropout = 0.0
    layer.eval()
    with pytest.raises(ValueError, match="has no MllamaTextCrossAttention layers"):
        mllama.parallelize_cross_attention(torch.nn.Linear(2, 2))
    patched = list(again.modules)
    again.remove()
    assert again.modules == [] and all("forward" not in m.__dict__ for m in patched)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, want)  # the class's own forward: bit for bit
    assert calls


def _run_case(name, seed, rank, world):
    if name.startswith("replicated_"):
        _case_replicated(name.split("_", 1)[1], seed, rank, world)
    elif name == "sharded_recompute":
        _case_sharded_recompute(seed, rank, world)
    elif name == "generate":
        _case_generate(seed, rank, world)
    elif name == "remove":
        _case_remove(seed, rank, world)
    else:
        raise ValueError(f"unknown case {name!r}")


def _worker(rank: int, world: int, port: int, seed: int, cases: str):
    import datetime
    import time

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=200))
    names = cases.split(",")
    failures = []
    try:
        for name in names:
            start = time.perf_counter()
            try:
                _run_case(name, seed % 2**20, rank, world)
            except AssertionError:  # a wrong number: record it, stay in step with the other ranks
                failures.append(f"case {name}:\n{traceback.format_exc()}")
            print(f"rank {rank}: case {name} {time.perf_counter() - start:.1f} s", flush=True)
    finally:
        dist.destroy_process_group()
    if failures:
        print(f"rank {rank}: {len(failures)} of {len(names)} cases failed (seed {seed})\n" + "\n".join(failures))
        sys.exit(1)
    print(f"rank {rank}: {len(names)} cases passed {json.dumps(names)}")


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    sys.path.insert(0, HERE)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # Mllama's vision layers' renamed argument
    _worker(*(int(x) for x in sys.argv[2:6]), sys.argv[6])
