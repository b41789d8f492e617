"""mmfa_torch.hf.sparse_prefill on tiny random VLMs (CPU): a full-density config gives the dense
logits; a sparse config gives the logits of a plain-torch re-implementation written here (the
patterns' block maps derived in torch, the video permutation, a dense softmax under the block mask
with the original causality); generation runs, prefill sparse and decode steps dense."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from conftest import assert_close  # noqa: E402

from mmfa_jax import sparse_search as ss  # noqa: E402
from mmfa_torch.hf import backend  # noqa: E402
from mmfa_torch.hf.sparse_prefill import search_model, sparse_prefill  # noqa: E402
from mmfa_torch.testing import vlms  # noqa: E402

BLOCK = 8
F, P = 4, 4  # LLaVA-NeXT-Video tiny: 4 frames of 16 patches pooled to 4 tokens


def _next_video():
    """A tiny random LLaVA-NeXT-Video (mmfa_torch.testing.vlms has no builder for it) and a prompt of
    text, 4 frames x 4 video tokens, text."""
    backend.register()
    cfg = tf.LlavaNextVideoConfig(
        text_config=tf.LlamaConfig(**vlms._TINY_TEXT),
        vision_config=tf.CLIPVisionConfig(**vlms._TINY_VISION, image_size=16, patch_size=4, projection_dim=32),
        image_token_index=vlms.IMAGE_ID, video_token_index=vlms.IMAGE_ID + 1, spatial_pool_stride=2,
        image_grid_pinpoints=[[16, 16], [16, 32], [32, 16], [32, 32]], vision_feature_layer=-1)
    torch.manual_seed(0)
    model = tf.LlavaNextVideoForConditionalGeneration._from_config(cfg, attn_implementation="mmfa").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (1, 11), generator=g).tolist()[0] + [vlms.IMAGE_ID + 1] * (F * P) + \
        torch.randint(3, 100, (9,), generator=g).tolist()
    ids = torch.tensor([ids])
    return model, dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                       pixel_values_videos=torch.randn(1, F, 3, 16, 16, generator=g))


def _model(family):
    if family == "llava_next_video":
        return _next_video()
    model = vlms.build(family)
    return model, vlms.make_inputs(model, family, images_per_example=(2,), pad_left=False)


def _sparse_config(heads, layer, order="original"):
    patterns = [("a_shape", {"sink_blocks": 1, "local_blocks": 1}, None), ("block_topk", {"keep": 1}, None),
                ("a_shape", {"sink_blocks": 0, "local_blocks": 2}, "2d"), ("block_topk", {"keep": 2}, "q")]
    return ss.SparseConfig([ss.HeadPattern(*patterns[(h + layer) % 4], recall=0.0, density=0.0)
                            for h in range(heads)], BLOCK, order=order, layer=layer)


# ------------------------------------------------------------------------------------------------
# The plain-torch re-implementation: an attention function registered under its own name.


def _torch_blocks(head, q, k, visual, scale, pos):
    """(n, n) bool map of one head in torch: q (T, D), k (T, D), visual (T,) in the map's order,
    pos (T,) the rows' original positions (block (i, j) can be visible when block j's earliest
    key is no later than block i's latest query)."""
    T = q.shape[0]
    n = -(-T // BLOCK)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    first = torch.stack([pos[b * BLOCK:(b + 1) * BLOCK].min() for b in range(n)])
    last = torch.stack([pos[b * BLOCK:(b + 1) * BLOCK].max() for b in range(n)])
    visible = first[None, :] <= last[:, None]
    p = head.params
    if head.pattern == "a_shape":
        m = (j < p["sink_blocks"]) | ((i - j >= 0) & (i - j < p["local_blocks"]))
    elif head.pattern == "block_topk":
        pool = lambda x: torch.stack([x[b * BLOCK:(b + 1) * BLOCK].mean(0) for b in range(n)])  # noqa: E731
        s = (pool(q) @ pool(k).T * scale).masked_fill(~visible, -float("inf"))
        m = torch.zeros(n, n, dtype=torch.bool)
        m[i.expand(n, min(p["keep"], n)), s.topk(min(p["keep"], n), dim=1).indices] = True
        m = m | (i == j) | (j == 0)
    else:
        m = torch.ones(n, n, dtype=torch.bool)
        return m
    if head.boundaries:
        text = torch.stack([(~visual[b * BLOCK:(b + 1) * BLOCK]).any() for b in range(n)])
        m = m | text[:, None]
        if head.boundaries == "2d":
            m = m | text[None, :]
    return m & visible


def _position_major(visual, frames, per_frame):
    """perm (T,): the visual slots hold the visual tokens position-major, text stays."""
    slots = torch.nonzero(visual).flatten()
    r = torch.arange(frames * per_frame)
    perm = torch.arange(visual.shape[0])
    perm[slots] = slots[(r % frames) * per_frame + r // frames]
    return perm


class Reference:
    """Dense softmax under the configs' block maps on prefill, dense on decode steps."""

    def __init__(self, model, configs, video_layout=None):
        self.configs, self.video_layout = configs, video_layout
        ids = [getattr(model.config, n, None) for n in ("image_token_id", "image_token_index", "video_token_id",
                                                         "video_token_index")]
        self.ids = torch.tensor([i for i in ids if isinstance(i, int)])
        self.video_id = getattr(model.config, "video_token_id", None) or getattr(model.config, "video_token_index")
        self.visual = self.video = None
        tf.AttentionInterface.register("test_sparse_ref", self.attention)
        from transformers.masking_utils import AttentionMaskInterface
        AttentionMaskInterface.register("test_sparse_ref", backend.mask_function)
        inner = model.model
        inner.register_forward_pre_hook(self.note, with_kwargs=True)
        inner.language_model.config._attn_implementation = "test_sparse_ref"

    def note(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        self.visual = torch.isin(ids[0], self.ids)
        self.video = ids[0] == self.video_id

    def attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        B, H, T, D = query.shape
        assert B == 1 and attention_mask is None
        key = key.repeat_interleave(H // key.shape[1], dim=1)
        value = value.repeat_interleave(H // value.shape[1], dim=1)
        S = key.shape[2]
        scores = (query @ key.transpose(-1, -2)) * scaling  # (1, H, T, S)
        if T == S:  # prefill under the maps
            config = self.configs[module.layer_idx]
            if config.order == "permuted":
                perm = _position_major(self.video, *self.video_layout)
                visual = self.video[perm]
            else:
                perm, visual = torch.arange(T), self.visual
            mask = torch.zeros(H, T, T, dtype=torch.bool)
            for h, head in enumerate(config.heads):
                m = _torch_blocks(head, query[0, h, perm], key[0, h, perm], visual, scaling, perm)
                token = m[torch.arange(T)[:, None] // BLOCK, torch.arange(T)[None, :] // BLOCK]  # in perm's order
                back = torch.zeros(T, T, dtype=torch.bool)
                back[perm[:, None], perm[None, :]] = token
                mask[h] = back
            mask &= torch.ones(T, T, dtype=torch.bool).tril()
            scores = scores.masked_fill(~mask[None], -float("inf"))
        out = torch.softmax(scores, dim=-1) @ value
        return out.transpose(1, 2), None


# ------------------------------------------------------------------------------------------------


FAMILIES = ["qwen2_5_vl", "llava_onevision", "llava_next_video"]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_density_gives_dense_logits(family):
    model, inputs = _model(family)
    T = inputs["input_ids"].shape[1]
    with torch.no_grad():
        dense = model(**inputs).logits
    heads = model.config.get_text_config().num_attention_heads
    full = ss.SparseConfig([ss.HeadPattern("dense", {}, None, 1.0, 1.0)] * heads, BLOCK)  # layer None: every layer
    handle = sparse_prefill(model, full, min_tokens=T)
    with torch.no_grad():
        out = model(**inputs).logits
    layers = model.config.get_text_config().num_hidden_layers
    assert handle.calls == {"sparse": layers, "dense": 0}
    assert_close(out, dense, 2e-5, "logits")
    handle.remove()
    assert model.model.language_model.config._attn_implementation == "mmfa"
    handle = sparse_prefill(model, full, min_tokens=T + 1)  # below min_tokens: dense
    with torch.no_grad():
        model(**inputs)
    assert handle.calls == {"sparse": 0, "dense": layers}
    handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_config_matches_torch_reference_and_generates(family):
    model, inputs = _model(family)
    text = model.config.get_text_config()
    permuted = family == "llava_next_video"
    configs = {layer: _sparse_config(text.num_attention_heads, layer, "permuted" if permuted and layer != 1 else
                                     "original") for layer in range(text.num_hidden_layers)}
    layout = (F, P) if permuted else None
    with torch.no_grad():
        dense = model(**inputs).logits
    handle = sparse_prefill(model, configs, min_tokens=8, video_layout=layout)
    with torch.no_grad():
        out = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert handle.calls == {"sparse": 2 * text.num_hidden_layers, "dense": 3 * text.num_hidden_layers}
    handle.remove()
    assert float((out - dense).abs().max()) > 1e-3, "the maps change the logits (not secretly dense)"
    Reference(model, configs, layout)
    with torch.no_grad():
        want = model(**inputs).logits
        want_generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert_close(out, want, 2e-5, "logits")
    assert torch.equal(generated, want_generated)


def test_search_model_then_prefill(tmp_path):
    """search_model gives each layer a config meeting the target on the calibration prompt; saved and
    loaded per model, it drives sparse_prefill."""
    model, inputs = _model("qwen2_5_vl")
    configs = search_model(model, inputs, block=BLOCK, target_recall=0.9, implementation="xla")
    text = model.config.get_text_config()
    assert sorted(configs) == list(range(text.num_hidden_layers))
    for layer, c in configs.items():
        assert c.layer == layer and c.num_heads == text.num_attention_heads and c.min_recall >= 0.9
    assert model.model.language_model.config._attn_implementation == "mmfa"
    ss.save_configs(tmp_path / "tiny.json", list(configs.values()))
    handle = sparse_prefill(model, str(tmp_path / "tiny.json"), min_tokens=8)
    with torch.no_grad():
        model(**inputs)
    assert handle.calls["sparse"] == text.num_hidden_layers
    handle.remove()


def test_errors():
    import mmfa_torch.hf

    assert mmfa_torch.hf.sparse_prefill is sparse_prefill and mmfa_torch.hf.search_model is search_model
    model, inputs = _model("qwen2_5_vl")
    config = _sparse_config(4, 0)
    with pytest.raises(ValueError, match="min_tokens must be a positive int, got 0"):
        sparse_prefill(model, config, min_tokens=0)
    with pytest.raises(ValueError, match="video_layout must be \\(frames, tokens_per_frame\\)"):
        sparse_prefill(model, config, video_layout=(4,))
    with pytest.raises(ValueError, match="config names layers \\[7\\]"):
        sparse_prefill(model, {7: config})
    with pytest.raises(TypeError, match="config must be a SparseConfig"):
        sparse_prefill(model, [config])
    handle = sparse_prefill(model, {0: _sparse_config(8, 0)}, min_tokens=8)
    with pytest.raises(ValueError, match="already has a sparse prefill"):
        sparse_prefill(model, config)
    with pytest.raises(ValueError, match="config of layer 0 holds 8 heads, the model's layer has 4"):
        with torch.no_grad():
            model(**inputs)
    handle.remove()
    handle = sparse_prefill(model, {0: _sparse_config(4, 0, "permuted")}, min_tokens=8)
    with pytest.raises(ValueError, match="permuted video order: it needs"):
        with torch.no_grad():
            model(**inputs)
    handle.remove()
    padded = vlms.make_inputs(model, "qwen2_5_vl", images_per_example=(1, 2))  # left-padded: stays dense
    assert not bool(padded["attention_mask"].all())
    with pytest.raises(ValueError, match="no decoder layer had a whole-prompt prefill call to search"):
        search_model(model, padded, block=BLOCK, implementation="xla")
    assert model.model.language_model.config._attn_implementation == "mmfa"
    with pytest.raises(ValueError, match="could not find the text decoder"):
        sparse_prefill(torch.nn.Linear(2, 2), config)


def test_padded_batches_stay_dense():
    """A left-padded batch has no sparse route (the kernels have no padding segments): every call
    is dense and the logits are the unpatched model's."""
    model = vlms.build("llava_onevision")
    inputs = vlms.make_inputs(model, "llava_onevision", images_per_example=(2, 2))
    assert not bool(inputs["attention_mask"].all())
    with torch.no_grad():
        dense = model(**inputs).logits
    text = model.config.get_text_config()
    handle = sparse_prefill(model, {0: _sparse_config(text.num_attention_heads, 0)}, min_tokens=8)
    with torch.no_grad():
        out = model(**inputs).logits
    assert handle.calls == {"sparse": 0, "dense": text.num_hidden_layers}
    assert_close(out, dense, 2e-5, "logits")
    handle.remove()
