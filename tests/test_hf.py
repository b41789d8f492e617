"""transformers integration: the "mmfa" attention backend and visual-token pruning in real VLM classes.

Tiny randomly initialised models of every supported family (no downloads), padded batches with
two images per prompt. The yardsticks are transformers' own eager attention and, for pruning,
a plain-torch re-implementation written here: pruning as masking (layers after K, and every decode
step, do not see the dropped tokens), with the importance computed from the eager probabilities.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import keep_kwargs  # noqa: E402
from transformers import AttentionInterface, DynamicCache  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402

from mmfa_torch import hf  # noqa: E402
from mmfa_torch.testing import vlms  # noqa: E402

FAMILIES = vlms.FAMILIES
TOL = dict(atol=2e-4, rtol=2e-4)
REF = "mmfa_test_reference"


@pytest.fixture
def seed(rng):
    return int(rng.integers(2**31))


@pytest.fixture(autouse=True)
def _xla_by_default():
    hf.register(implementation="xla")
    yield
    hf.register(implementation=None)


def trace(model, inputs, steps, tokens=None, positions=True):
    """Greedy decoding by hand with a DynamicCache, the way ``generate`` feeds the model (position
    ids from the padding mask, or M-RoPE ids; ``positions=False`` leaves them to the model).
    Returns (prefill logits (B, T|L, V), last-row logits of the prefill and of every step
    (B, steps + 1, V), fed tokens (B, steps)); ``tokens`` teacher-forces the fed tokens."""
    cache = DynamicCache(config=model.config.get_text_config())
    inputs = dict(inputs)
    pos = None
    if positions:
        pos = vlms.generation_position_ids(model, inputs)
        inputs["position_ids"] = pos
    with torch.no_grad():
        out = model(**inputs, past_key_values=cache, use_cache=True)
        prefill, last = out.logits, [out.logits[:, -1]]
        mask, fed = inputs["attention_mask"], []
        for i in range(steps):
            nxt = last[-1].argmax(-1, keepdim=True) if tokens is None else tokens[:, i:i + 1]
            fed.append(nxt)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            step = dict(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
            if pos is not None:
                pos = torch.cat([pos, pos[..., -1:] + 1], -1)
                step["position_ids"] = pos[..., -1:]
            out = model(**step)
            last.append(out.logits[:, -1])
    return prefill, torch.stack(last, 1), torch.cat(fed, 1)


def _inputs(model, family, seed):
    return vlms.make_inputs(model, family, images_per_example=(2, 2), text_lengths=[3, 6], seed=seed)


# ------------------------------------------------------------------------------------------------
# The attention backend


@pytest.mark.parametrize("family", FAMILIES)
def test_mmfa_matches_eager_prefill_and_decode(family, seed):
    """Pallas kernels (interpreter) in text decoder and vision tower: same logits as eager attention
    on a left-padded batch with two images per prompt, for prefill and two greedy steps."""
    hf.register(implementation="interpret")
    eager = vlms.build(family, attn_implementation="eager", seed=seed)
    mmfa = vlms.build(family, attn_implementation="mmfa", seed=seed)
    inputs = _inputs(eager, family, seed)
    valid = inputs["attention_mask"].bool()
    p_ref, s_ref, tokens = trace(eager, inputs, 2)
    p, s, _ = trace(mmfa, inputs, 2, tokens)
    torch.testing.assert_close(p[valid], p_ref[valid], **TOL)
    torch.testing.assert_close(s, s_ref, **TOL)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_mmfa_matches_sdpa_generate(family, seed):
    """model.generate end to end: scores of every step agree with sdpa's."""
    sdpa = vlms.build(family, attn_implementation="sdpa", seed=seed)
    mmfa = vlms.build(family, attn_implementation="mmfa", seed=seed)
    inputs = _inputs(sdpa, family, seed)
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref, got = sdpa.generate(**inputs, **kw), mmfa.generate(**inputs, **kw)
    T = inputs["input_ids"].shape[1]
    n = 1  # steps compared: up to the first token where a near-tie could have flipped the choice
    for a in ref.scores[:-1]:
        top2 = a.topk(2, dim=-1).values
        if bool(((top2[:, 0] - top2[:, 1]) < 1e-3).any()):
            break
        n += 1
    torch.testing.assert_close(torch.stack(got.scores[:n]), torch.stack(ref.scores[:n]), **TOL)
    assert torch.equal(got.sequences[:, T:T + n], ref.sequences[:, T:T + n])


def test_config_and_set_attn_implementation_per_submodel(seed):
    """Config(attn_implementation="mmfa") and set_attn_implementation per sub-model reach both towers."""
    cfg = vlms.config("llava")
    cfg._attn_implementation = "mmfa"
    model = transformers.LlavaForConditionalGeneration(cfg)
    assert model.config.get_text_config()._attn_implementation == "mmfa"
    assert model.config.vision_config._attn_implementation == "mmfa"
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "mmfa"})
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "mmfa"
    model.set_attn_implementation("mmfa")
    assert model.config.get_text_config()._attn_implementation == "mmfa"


@pytest.mark.parametrize("family,image_px", [("qwen2_5_vl", None), ("qwen2_5_vl", 40), ("qwen2_vl", 40)])
def test_vision_windows_answered_by_one_call(family, image_px, seed, monkeypatch):
    """Qwen's vision towers call the attention once per window (or image); from a module's second
    forward on, mmfa makes that one batched call per layer (even windows: image_px None; uneven:
    40 px), with the logits of eager attention, and with autograd the gradients of eager attention."""
    from mmfa_torch.hf import windows

    batched = []
    plain = windows.scaled_dot_product_attention
    monkeypatch.setattr(windows, "scaled_dot_product_attention", lambda *a, **k: batched.append(1) or plain(*a, **k))
    eager = vlms.build(family, attn_implementation="eager", seed=seed)
    mmfa = vlms.build(family, attn_implementation="mmfa", seed=seed)
    inputs = vlms.make_inputs(eager, family, images_per_example=(2, 1), text_lengths=[3, 6], image_px=image_px,
                              seed=seed)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = eager(**inputs).logits[valid]
        first = mmfa(**inputs).logits[valid]  # installs the hooks; call by call
        assert not batched
        second = mmfa(**inputs).logits[valid]
    depth = mmfa.config.vision_config.depth
    assert len(batched) == depth  # one call per vision layer
    torch.testing.assert_close(first, ref, **TOL)
    torch.testing.assert_close(second, ref, **TOL)
    batched.clear()
    with torch.inference_mode():  # what generate runs under: inference tensors keep no version counter
        inferred = mmfa(**inputs).logits[valid]
    assert len(batched) == depth
    torch.testing.assert_close(inferred, ref, **TOL)
    batched.clear()

    def vision_grads(model):
        model.zero_grad()
        (model(**inputs).logits[valid].float() ** 2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "visual" in n and p.grad is not None}
    with torch.enable_grad():
        got, want = vision_grads(mmfa), vision_grads(eager)
    assert len(batched) == depth
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-4, rtol=2e-3, msg=name)


def test_vision_windows_follow_the_implementation(seed):
    """Once a module's bounds hook is installed, switching its tower to sdpa hands sdpa the real
    bounds (the hook swaps them only for mmfa's attention function): sdpa's logits, not one window."""
    sdpa = vlms.build("qwen2_5_vl", attn_implementation="sdpa", seed=seed)
    mmfa = vlms.build("qwen2_5_vl", attn_implementation="mmfa", seed=seed)
    inputs = vlms.make_inputs(sdpa, "qwen2_5_vl", images_per_example=(1,), text_lengths=[4], image_px=40, seed=seed)
    with torch.no_grad():
        ref = sdpa(**inputs).logits
        mmfa(**inputs)  # installs the hooks
        mmfa.set_attn_implementation({"vision_config": "sdpa"})
        torch.testing.assert_close(mmfa(**inputs).logits, ref, **TOL)


def test_vision_windows_only_for_the_split_idiom():
    """Only a forward that uses its bounds for nothing but transformers' split qualifies; empty
    windows are left alone; a call that is not the whole packed sequence is an error."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    from mmfa_torch.hf import windows

    assert windows._bounds_position(modeling_qwen2_5_vl.Qwen2_5_VLVisionAttention) == 1  # after hidden_states

    class MaskFromBounds(torch.nn.Module):  # builds a mask from the bounds: swapping them would change it
        def forward(self, hidden_states, cu_seqlens: torch.Tensor):
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            mask = torch.zeros(hidden_states.shape[0], hidden_states.shape[0], dtype=torch.bool)
            for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
                mask[a:b, a:b] = True
            return [torch.split(tensor, lengths.tolist(), dim=2) for tensor in (hidden_states,)], mask

    class LengthsElsewhere(torch.nn.Module):
        def forward(self, hidden_states, cu_seqlens: torch.Tensor):
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            scale = lengths.float().mean()
            return [torch.split(tensor, lengths.tolist(), dim=2) for tensor in (hidden_states,)], scale

    assert windows._bounds_position(MaskFromBounds) is None
    assert windows._bounds_position(LengthsElsewhere) is None
    assert windows._plan((0, 0, 4), torch.device("cpu")) is None
    plan = windows._plan((0, 3, 7), torch.device("cpu"))
    assert not plan.uniform and plan.scatter.tolist() == [0, 1, 2, 4, 5, 6, 7]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 8, generator=g) for _ in range(3))
    call = dict(scale=None, enable_gqa=False, logits_soft_cap=None, implementation="xla")
    got = windows.attend(plan, q, k, v, call)
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
                     for a, b in ((0, 3), (3, 7))], dim=2).transpose(1, 2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="7 packed tokens"):
        windows.attend(plan, q[:, :, :3], k[:, :, :3], v[:, :, :3], call)


def _gemma_text(attn, seed, **overrides):
    cfg = transformers.Gemma3TextConfig(**dict(vlms._TINY_TEXT, sliding_window=5, query_pre_attn_scalar=8,
                                               layer_types=["sliding_attention", "full_attention",
                                                            "sliding_attention"], **overrides))
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM._from_config(cfg, attn_implementation=attn)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("padding", ["left", "right"])
def test_sliding_window_softcap_gqa_padding(padding, seed):
    """Gemma-3 text decoder with a 5-token sliding window shorter than the prompt, a logit soft cap,
    GQA (4 query heads, 2 KV heads) and left or right padding: same logits as eager."""
    g = torch.Generator().manual_seed(seed)
    eager = _gemma_text("eager", seed, attn_logit_softcapping=3.0)
    mmfa = _gemma_text("mmfa", seed, attn_logit_softcapping=3.0)
    lengths = [13, 9]
    ids = torch.randint(3, 100, (2, 13), generator=g)
    mask = torch.zeros(2, 13, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, 13 - n:] = 1 if padding == "left" else 0
        if padding == "right":
            mask[b, :n] = 1
    inputs = dict(input_ids=ids, attention_mask=mask)
    valid = mask.bool()
    with torch.no_grad():
        a, b = eager(**inputs).logits, mmfa(**inputs).logits
    torch.testing.assert_close(b[valid], a[valid], **TOL)
    if padding == "left":
        _, s_ref, tokens = trace(eager, inputs, 4)  # decode with a cache longer than the window
        _, s, _ = trace(mmfa, inputs, 4, tokens)
        torch.testing.assert_close(s, s_ref, **TOL)


def test_mask_function_compact_and_dense():
    """Plain causal masks stay compact (None or the keys' padding); other patterns come dense."""
    from transformers.masking_utils import causal_mask_function, or_masks, sdpa_mask

    pad = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    common = dict(batch_size=2, q_length=4, kv_length=4, kv_offset=0, device="cpu",
                  cache_position=torch.arange(4))  # 5.x spells the queries q_length, 4.57 cache_position
    assert hf.mask_function(**common, mask_function=causal_mask_function, attention_mask=None) is None
    got = hf.mask_function(**common, mask_function=causal_mask_function, attention_mask=pad)
    assert torch.equal(got, pad)
    blocks = or_masks(causal_mask_function, lambda b, h, q, k: (q >= 1) & (k >= 1) & (q <= 2) & (k <= 2))
    dense = hf.mask_function(**common, mask_function=blocks, attention_mask=pad, allow_is_causal_skip=False)
    want = sdpa_mask(**common, mask_function=blocks, attention_mask=pad, allow_is_causal_skip=False)
    assert dense.shape == (2, 1, 4, 4) and torch.equal(dense, want)


# ------------------------------------------------------------------------------------------------
# Pruning


class MaskedPruning:
    """The reference: pruning written as masking, in plain torch (eager attention).

    Layer K computes the importance of the visual tokens from its softmax probabilities (mean over
    heads and scorer rows), keeps the text and the top ``keep`` visual tokens (ties: earlier first);
    from then on layers after K (prefill) and every layer (decode) mask the dropped keys.
    """

    def __init__(self, layer, keep, rule):
        self.layer, self.keep, self.rule = layer, keep, rule
        self.visual = self.valid = self.kept = None

    def start(self, visual, valid):
        self.visual, self.valid, self.kept = visual, valid, None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kw):
        B, H, T, D = query.shape
        S = key.shape[2]
        rep = H // key.shape[1]
        k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        scale = scaling if scaling is not None else D ** -0.5
        s = (query.double() @ k.double().transpose(-1, -2)) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        allowed = torch.ones(B, 1, T, S, dtype=torch.bool)
        if attention_mask is not None:
            allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2 if attention_mask.is_floating_point() \
                else attention_mask
        i = getattr(module, "_ref_text_layer", None)
        full = None if self.visual is None else self.visual.shape[1]
        if i is not None and self.kept is not None:
            keys = torch.cat([self.kept, torch.ones(B, S - full, dtype=torch.bool)], 1)
            if S > full or i > self.layer:
                allowed = allowed & keys[:, None, None, :]
        s = s.masked_fill(~allowed, -math.inf)
        p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
        if i == self.layer and self.visual is not None and self.kept is None and T == S == full:
            self.kept = self._select(p)
        out = (p @ v.double()).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None

    def _select(self, p):
        visual, valid = self.visual, self.valid
        B, T = visual.shape
        if self.rule == "text":
            rows = valid & ~visual
        else:
            last = [max(j for j in range(T) if valid[b, j]) for b in range(B)]
            rows = torch.zeros(B, T, dtype=torch.bool)
            rows[torch.arange(B), last] = True
        imp = (p.mean(1) * rows[:, :, None]).sum(1) / rows.sum(1, keepdim=True)  # (B, S)
        kept = valid & ~visual
        for b in range(B):
            cand = [j for j in range(T) if visual[b, j] and valid[b, j]]
            n = min(self.keep, len(cand)) if isinstance(self.keep, int) else math.ceil(round(len(cand) * self.keep, 4))
            for j in sorted(cand, key=lambda j: (-float(imp[b, j]), j))[:n]:
                kept[b, j] = True
        return kept


def _reference_model(family, seed, layer, keep, rule):
    ref = MaskedPruning(layer, keep, rule)
    AttentionInterface.register(REF, ref)
    AttentionMaskInterface.register(REF, eager_mask)
    model = vlms.build(family, attn_implementation=REF, seed=seed)
    _, _, layers = hf.pruning._parts(model)
    for i, decoder_layer in enumerate(layers):
        decoder_layer.self_attn._ref_text_layer = i
    return model, ref


def _visual(model, inputs):
    return torch.isin(inputs["input_ids"], torch.tensor(hf.pruning._token_ids(model.config)))


@pytest.mark.parametrize("family,rule,keep", [
    ("llava", "text", 0.5), ("llava_next", "text", 0.5), ("llava_onevision", "last", 0.3), ("qwen2_vl", "text", 0.4),
    ("qwen2_5_vl", "last", 5), ("gemma3", "text", 0.5), ("idefics3", "text", 0.6), ("smolvlm", "last", 0.5)])
def test_pruning_matches_masked_reference(family, rule, keep, seed):
    """keep < 1: the pruned model's logits (prefill at the kept positions, and four decode steps)
    equal the plain-torch pruning-as-masking reference, and generate runs to the end."""
    layer = 1
    ref_model, ref = _reference_model(family, seed, layer, keep, rule)
    model = vlms.build(family, attn_implementation="mmfa", seed=seed)
    inputs = _inputs(model, family, seed)
    ref.start(_visual(model, inputs), inputs["attention_mask"].bool())
    p_ref, s_ref, tokens = trace(ref_model, inputs, 4)
    handle = hf.prune_visual_tokens(model, **keep_kwargs(keep), layer=layer, rule=rule)
    p, s, _ = trace(model, inputs, 4, tokens)
    kept = handle.kept_positions
    slots = kept >= 0
    # the same tokens survive, in order, right-aligned
    for b in range(kept.shape[0]):
        assert torch.equal(kept[b][slots[b]], torch.nonzero(ref.kept[b]).flatten())
    assert int(ref.kept.sum(1).max()) < int(inputs["attention_mask"].sum(1).max())  # something was dropped
    rows = torch.gather(p_ref, 1, kept.clamp(min=0)[:, :, None].expand(-1, -1, p_ref.shape[-1]))
    torch.testing.assert_close(p[slots], rows[slots], **TOL)
    torch.testing.assert_close(s, s_ref, **TOL)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3", "smolvlm"])
def test_keep_all_changes_nothing(family, seed):
    """keep = 1.0: the hooks run (scores, selection, cache re-slicing) and nothing changes."""
    model = vlms.build(family, attn_implementation="mmfa", seed=seed)
    inputs = _inputs(model, family, seed)
    # Qwen needs generate's M-RoPE ids on decode (transformers' own fallback does not slice the mask);
    # the others run on the model's default ids, which the hook must continue after pruning
    positions = family.startswith("qwen")
    p_ref, s_ref, tokens = trace(model, inputs, 3, positions=positions)
    handle = hf.prune_visual_tokens(model, keep=1.0, layer=1)
    p, s, _ = trace(model, inputs, 3, tokens, positions=positions)
    assert handle.kept_positions is not None
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(p[valid], p_ref[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)
    handle.remove()
    assert not hasattr(model, "_mmfa_pruning")


def test_pruning_interpret_kernels(seed):
    """The pruned path on the Pallas kernels (interpreter) equals the xla path."""
    model = vlms.build("qwen2_5_vl", attn_implementation="mmfa", seed=seed)
    inputs = _inputs(model, "qwen2_5_vl", seed)
    hf.prune_visual_tokens(model, keep=0.5, layer=1)
    p_x, s_x, tokens = trace(model, inputs, 2)
    kept_x = model._mmfa_pruning.kept_positions.clone()
    hf.register(implementation="interpret")
    p_i, s_i, _ = trace(model, inputs, 2, tokens)
    assert torch.equal(model._mmfa_pruning.kept_positions, kept_x)
    torch.testing.assert_close(p_i, p_x, **TOL)
    torch.testing.assert_close(s_i, s_x, **TOL)


def test_prompt_without_images_is_untouched(seed):
    model = vlms.build("llava", attn_implementation="mmfa", seed=seed)
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(3, 100, (2, 9), generator=g),
              "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    p_ref, s_ref, tokens = trace(model, inputs, 2)
    hf.prune_visual_tokens(model, keep=0.5, layer=0)
    p, s, _ = trace(model, inputs, 2, tokens)
    torch.testing.assert_close(p, p_ref, atol=0, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=0, rtol=0)


def test_bad_use_errors():
    model = vlms.build("llava", attn_implementation="mmfa")
    for keep in (0.0, 1.5, -0.1, float("nan"), 0, 64):
        with pytest.raises(ValueError, match=r"keep must be a ratio in \(0, 1\]"):
            hf.prune_visual_tokens(model, keep=keep)
    with pytest.raises(ValueError, match="keep_count must be >= 1"):
        hf.prune_visual_tokens(model, keep_count=0)
    with pytest.raises(TypeError, match="keep"):
        hf.prune_visual_tokens(model, keep=True)
    with pytest.raises(ValueError, match="layer must be"):
        hf.prune_visual_tokens(model, keep=0.5, layer=3)
    with pytest.raises(ValueError, match="rule must be"):
        hf.prune_visual_tokens(model, keep=0.5, rule="first")
    no_images = vlms.build("llava", attn_implementation="mmfa")
    no_images.config.image_token_id = None
    with pytest.raises(ValueError, match="no image_token_id"):
        hf.prune_visual_tokens(no_images, keep=0.5)
    text_only = transformers.LlamaForCausalLM(transformers.LlamaConfig(**vlms._TINY_TEXT))
    with pytest.raises(ValueError, match="supports the model types"):
        hf.prune_visual_tokens(text_only, keep=0.5)
    eager = vlms.build("llava", attn_implementation="eager")
    with pytest.raises(ValueError, match="attn_implementation='mmfa'"):
        hf.prune_visual_tokens(eager, keep=0.5)
    with pytest.raises(ValueError, match="implementation must be"):
        hf.register(implementation="cuda")
    hf.prune_visual_tokens(model, keep=0.5, layer=1)
    inputs = vlms.make_inputs(model, "llava")
    with pytest.raises(ValueError, match="labels"):
        model(**inputs, labels=inputs["input_ids"])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(ValueError, match="input_ids"):
        model.model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


def test_pruning_with_sliding_window_cache_shorter_than_prompt(seed):
    """Gemma 3 with a 6-token window over a 25-token prompt, pruned after layer 1: the sliding layers
    at or before K keep the last W - 1 kept tokens' keys (they record the prompt until the re-slice),
    every layer counts L tokens, and generation runs."""
    cfg = vlms.config("gemma3")
    cfg.text_config.sliding_window = 6
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="mmfa").eval()
    inputs = vlms.make_inputs(model, "gemma3", images_per_example=(3, 2), text_lengths=[4, 9], seed=seed)
    full = DynamicCache(config=model.config.get_text_config())
    if not hasattr(full.layers[0], "activate_past_recording"):  # transformers 4.57: such layers forget; say so
        hf.prune_visual_tokens(model, keep=0.5, layer=1)
        with torch.no_grad(), pytest.raises(NotImplementedError, match="sliding-window layer"):
            model(**inputs, past_key_values=full, use_cache=True)
        return
    full.layers[0].activate_past_recording()
    with torch.no_grad():
        model(**inputs, past_key_values=full, use_cache=True)  # layer 0 keeps every key
    handle = hf.prune_visual_tokens(model, keep=0.5, layer=1)
    cache = DynamicCache(config=model.config.get_text_config())
    with torch.no_grad():
        out = model(**inputs, past_key_values=cache, use_cache=True)
    kept = handle.kept_positions
    L = kept.shape[1]
    assert out.logits.shape[1] == L < inputs["input_ids"].shape[1]
    assert [layer.get_seq_length() for layer in cache.layers] == [L] * 3
    assert cache.layers[0].keys.shape[-2] == 5 and not cache.layers[0].record_past
    want = torch.gather(full.layers[0].keys, 2, kept[:, None, -5:, None].expand(-1, 2, -1, 8))
    torch.testing.assert_close(cache.layers[0].keys, want)
    with torch.no_grad():
        assert model.generate(**inputs, max_new_tokens=4, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "gemma3"])
def test_pruning_with_static_cache_matches_dynamic(family, seed):
    """generate(cache_implementation="static") of a pruned model gives the greedy tokens and scores of
    its generate with a DynamicCache (checked against the masked reference above): the static layers
    get the kept tokens in place, count L, and the later layers and steps write after them."""
    model = vlms.build(family, attn_implementation="mmfa", seed=seed)
    inputs = _static_inputs(model, family, seed)
    handle = hf.prune_visual_tokens(model, keep=0.5, layer=1)
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        dynamic = model.generate(**inputs, **kw)
        kept = handle.kept_positions.clone()
        static = model.generate(**inputs, cache_implementation="static", **kw)
    assert torch.equal(handle.kept_positions, kept) and kept.shape[1] < inputs["input_ids"].shape[1]
    T = inputs["input_ids"].shape[1]
    same = int((static.sequences[:, T:] == dynamic.sequences[:, T:]).all(0).long().cumprod(0).sum())
    assert same >= 1, (static.sequences, dynamic.sequences)
    for a, b in zip(static.scores[:same + 1], dynamic.scores[:same + 1]):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_pruning_with_static_cache_compiled_steps(family, seed):
    """The decode steps of a pruned static cache compiled as generate compiles them (here with the
    aot_eager backend, on the CPU): the greedy tokens of the eager dynamic-cache generate, and a
    second generate of the same shapes traces nothing (no host read of a step's length or state
    forces a recompile)."""
    from torch._dynamo.utils import counters
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import CompileConfig

    model = vlms.build(family, attn_implementation="mmfa", seed=seed)
    inputs = _static_inputs(model, family, seed)
    hf.prune_visual_tokens(model, keep=0.5, layer=1)
    config = GenerationConfig(max_new_tokens=5, do_sample=False, cache_implementation="static",
                              compile_config=CompileConfig(backend="aot_eager", mode=None, fullgraph=False))
    config.compile_config._compile_all_devices = True  # transformers compiles on accelerators only by default
    torch._dynamo.reset()
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        first = model.generate(**inputs, generation_config=config)
        assert counters["frames"]["ok"] >= 1  # the steps were compiled
        counters.clear()
        second = model.generate(**inputs, generation_config=config)
    assert not counters["frames"], dict(counters["frames"])
    assert torch.equal(first, want) and torch.equal(second, want)


def test_pruning_with_static_sliding_window_filling_up_matches_dynamic(seed):
    """Gemma 3 whose window is just over the prompt: after pruning, the static sliding layers at or
    before K count L tokens, so they fill (and start rolling) at the step the dynamic ones do."""
    cfg = vlms.config("gemma3")
    probe = transformers.Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="mmfa")
    inputs = _static_inputs(probe, "gemma3", seed)
    cfg.text_config.sliding_window = inputs["input_ids"].shape[1] + 2
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="mmfa").eval()
    hf.prune_visual_tokens(model, keep=0.25, layer=1)
    kw = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        dynamic = model.generate(**inputs, **kw)
        static = model.generate(**inputs, cache_implementation="static", **kw)
    for a, b in zip(static.scores, dynamic.scores):
        torch.testing.assert_close(a, b, **TOL)


def test_pruning_compiled_static_steps_refused_where_unsupported(seed, monkeypatch):
    """Where compiled steps of a pruned static cache are refused (CUDA graphs: pretended here on the
    CPU), generate raises the error, though dynamo meets it while tracing, and eager steps still run."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import CompileConfig

    monkeypatch.setattr(hf.pruning, "_refused_in_graphs", lambda t: True)
    model = vlms.build("llava", attn_implementation="mmfa", seed=seed)
    inputs = _static_inputs(model, "llava", seed)
    hf.prune_visual_tokens(model, keep=0.5, layer=1)
    config = GenerationConfig(max_new_tokens=3, do_sample=False, cache_implementation="static",
                              compile_config=CompileConfig(backend="aot_eager", mode=None, fullgraph=False))
    config.compile_config._compile_all_devices = True
    torch._dynamo.reset()
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match="disable_compile=True"):
            model.generate(**inputs, generation_config=config)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, cache_implementation="static",
                             disable_compile=True)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_pruning_keeps_the_first_token_of_an_example_keeping_fewer(seed):
    """Examples that keep different counts: every real token an example keeps is there, the first
    one included (unused selection entries once overwrote position 0's flag)."""
    model = vlms.build("llava", attn_implementation="mmfa", seed=seed)
    inputs = vlms.make_inputs(model, "llava", images_per_example=(2, 1), text_lengths=[3, 3], seed=seed)
    handle = hf.prune_visual_tokens(model, keep=0.25, layer=1)
    with torch.no_grad():
        model(**inputs)
    kept = handle.kept_positions
    text = inputs["attention_mask"].bool() & ~_visual(model, inputs)
    for b in range(kept.shape[0]):
        assert set(torch.nonzero(text[b]).flatten().tolist()) <= set(kept[b].tolist())  # every text token stays


def test_pruning_with_static_sliding_window_shorter_than_prompt_is_refused(seed):
    """A static cache's sliding-window layer at or before K is a rolling buffer shorter than the prompt:
    the kept tokens cannot all be put back, and pruning says so rather than attend to the wrong keys."""
    cfg = vlms.config("gemma3")
    cfg.text_config.sliding_window = 6
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="mmfa").eval()
    inputs = vlms.make_inputs(model, "gemma3", images_per_example=(3, 2), text_lengths=[4, 9], seed=seed)
    hf.prune_visual_tokens(model, keep=0.5, layer=1)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="rolling buffer"):
        model.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_sdpa_decode_option(seed):
    """register(decode="sdpa"): single-row calls on torch SDPA (padding, sliding window) give the same
    decode logits as mmfa's kernels."""
    g = torch.Generator().manual_seed(seed)
    model = _gemma_text("mmfa", seed)
    ids = torch.randint(3, 100, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :3] = 0
    inputs = dict(input_ids=ids, attention_mask=mask)
    _, s_ref, tokens = trace(model, inputs, 4)
    hf.register(implementation="xla", decode="sdpa")
    _, s, _ = trace(model, inputs, 4, tokens)
    torch.testing.assert_close(s, s_ref, **TOL)
    with pytest.raises(ValueError, match="decode must be"):
        hf.register(decode="flash")


# ------------------------------------------------------------------------------------------------
# Static caches: queries anywhere in the cache's fixed length, decode steps under torch.compile


def _static_inputs(model, family, seed):
    return vlms.make_inputs(model, family, images_per_example=(1, 1), text_lengths=[3, 6], seed=seed)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_static_cache_generate_matches_eager(family, seed):
    """generate(cache_implementation="static") on mmfa gives eager's (dynamic cache) greedy tokens
    and scores: the static cache's queries are not its last keys, so the mask function builds the
    4-D mask, and the decode steps take the decode kernel with the mask's row as a key mask."""
    eager = vlms.build(family, attn_implementation="eager", seed=seed)
    mmfa = vlms.build(family, attn_implementation="mmfa", seed=seed)
    inputs = _static_inputs(eager, family, seed)
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = eager.generate(**inputs, **kw)
        got = mmfa.generate(**inputs, cache_implementation="static", **kw)
    torch.testing.assert_close(got.scores[0], ref.scores[0], **TOL)
    assert torch.equal(got.sequences[:, :-1], ref.sequences[:, :-1]) or any(
        bool(((s.topk(2, -1).values[:, 0] - s.topk(2, -1).values[:, 1]) < 1e-3).any()) for s in ref.scores)


def test_static_cache_decode_step_compiles_to_one_graph(seed):
    """A static cache's decode step traced by torch.compile with fullgraph=True (no graph break:
    no host synchronisation in the mask function or the attention function) gives the eager step's
    logits, padding and a sliding window shorter than the cache included."""
    from transformers import StaticCache

    model = _gemma_text("mmfa", seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    pos = vlms.generation_position_ids(model, dict(input_ids=ids, attention_mask=mask))

    def prefilled():
        cache = StaticCache(config=model.config, max_cache_len=16)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        return cache, out.logits[:, -1].argmax(-1, keepdim=True)

    with torch.no_grad():
        logits = []
        for forward in (model.forward, torch.compile(model.forward, fullgraph=True, backend="aot_eager")):
            cache, nxt = prefilled()
            step = dict(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                        position_ids=pos[:, -1:] + 1, past_key_values=cache, use_cache=True)
            logits.append(forward(**step).logits[:, -1])
    want, got = logits
    torch.testing.assert_close(got, want, **TOL)
    eager = _gemma_text("eager", seed)
    _, s_ref, _ = trace(eager, dict(input_ids=ids, attention_mask=mask), 1, nxt)
    torch.testing.assert_close(want, s_ref[:, 1], **TOL)


def test_mask_function_static_cache():
    """transformers 5 passes a static cache's q_offset as a tensor: its queries sit anywhere in the
    cache. In eager calls the compact mask covers the keys written so far (the queries are their
    last ones); a static sliding-window layer, and any call under torch.compile, get the 4-D mask."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if "q_length" not in __import__("inspect").signature(sdpa_mask).parameters:
        pytest.skip("transformers 4.57 spells the queries cache_position (covered by the generate test)")
    common = dict(batch_size=1, q_length=3, kv_length=8, kv_offset=0, device="cpu", mask_function=causal_mask_function,
                  attention_mask=torch.ones(1, 5, dtype=torch.bool))  # the tokens seen so far
    got = hf.mask_function(**common, q_offset=torch.tensor(2))  # eager: the first 5 keys, the last 3 queries
    assert torch.equal(got, torch.tensor([[True] * 5]))
    with_padding = dict(common, attention_mask=torch.tensor([[False, True, True, True, True]]))
    assert torch.equal(hf.mask_function(**with_padding, q_offset=torch.tensor(2)), with_padding["attention_mask"])
    assert hf.mask_function(**dict(common, kv_length=5), q_offset=2) is None
    # A sliding-window layer of a static cache is a rolling buffer: always the 4-D mask.
    got = hf.mask_function(**common, q_offset=torch.tensor(0), local_size=4)
    want = sdpa_mask(**common, q_offset=torch.tensor(0), local_size=4, allow_is_causal_skip=False)
    assert got.shape == (1, 1, 3, 8) and torch.equal(got, want)
    # Cross-attention (an encoder's keys, the decoder's queries, no causality): the keys' padding only.
    from transformers.masking_utils import bidirectional_mask_function

    cross = dict(common, mask_function=bidirectional_mask_function, allow_is_bidirectional_skip=True,
                 attention_mask=None, kv_length=12)
    assert hf.mask_function(**cross, q_offset=0) is None
    assert hf.mask_function(**dict(cross, q_length=1), q_offset=0) is None
    # Under torch.compile nothing is read on the host: the 4-D mask.
    compiled = torch.compile(lambda q_offset: hf.mask_function(**common, q_offset=q_offset), fullgraph=True,
                             backend="eager")
    want = sdpa_mask(**common, q_offset=torch.tensor(0), allow_is_causal_skip=False)
    assert torch.equal(compiled(torch.tensor(0)), want)
