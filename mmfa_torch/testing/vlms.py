"""Randomly initialised VLMs built from configs (no downloads), and prompts for them.

``build(family, size="tiny"|"full", attn_implementation=...)`` makes a model of one supported
family: "tiny" configs run the test suite on a CPU in seconds; "full" configs have the real
sizes of LLaVA-1.5-7B, Qwen2.5-VL-7B and Gemma-3-4B (for ``bench/vlm.py``). ``make_inputs`` lays
out a (left-padded) batch with several images per prompt, the image placeholders sized to what
the model's vision side produces, and the extra inputs each family wants (grids, token types).
"""

from __future__ import annotations

import torch

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "smolvlm")
FULL = {"llava": "LLaVA-1.5-7B", "qwen2_5_vl": "Qwen2.5-VL-7B", "gemma3": "Gemma-3-4B"}

_TINY_TEXT = dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
IMAGE_ID = 150  # inside the tiny vocab


def _major() -> int:
    import transformers
    return int(transformers.__version__.split(".")[0])


_V5 = _major() >= 5  # rope_parameters (5.x) or rope_scaling (4.x) in configs


def _rope(params: dict) -> dict:
    """Qwen M-RoPE settings as the installed transformers spells them."""
    if _V5:
        return {"rope_parameters": params}
    return {"rope_scaling": dict(params, type="mrope"), "rope_theta": params["rope_theta"]}


def config(family: str, size: str = "tiny"):
    """A transformers config of ``family`` ("tiny" or "full" size)."""
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if size == "full":
        return _full_config(family)
    if size != "tiny":
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    text = dict(_TINY_TEXT)
    if family == "llava":
        return tf.LlavaConfig(text_config=tf.LlamaConfig(**text),
                              vision_config=tf.CLIPVisionConfig(**_TINY_VISION, image_size=16, patch_size=4,
                                                                projection_dim=32),
                              image_token_index=IMAGE_ID, vision_feature_layer=-1)
    if family == "llava_next":
        return tf.LlavaNextConfig(
            text_config=tf.LlamaConfig(**text), image_token_index=IMAGE_ID,
            vision_config=tf.CLIPVisionConfig(**_TINY_VISION, image_size=16, patch_size=4, projection_dim=32),
            image_grid_pinpoints=[[16, 16], [16, 32], [32, 16], [32, 32]], vision_feature_layer=-1)
    if family == "llava_onevision":
        return tf.LlavaOnevisionConfig(
            text_config=tf.Qwen2Config(**text), image_token_index=IMAGE_ID, video_token_index=IMAGE_ID + 1,
            vision_config=tf.SiglipVisionConfig(**_TINY_VISION, image_size=16, patch_size=4),
            image_grid_pinpoints=[[16, 16], [16, 32], [32, 16], [32, 32]], vision_feature_layer=-1)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        rope = _rope({"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)
        if family == "qwen2_vl":
            return tf.Qwen2VLConfig(text_config=dict(text, **rope), vision_config=dict(vision, mlp_ratio=2),
                                    image_token_id=IMAGE_ID, video_token_id=IMAGE_ID + 1,
                                    vision_start_token_id=IMAGE_ID + 2, vision_end_token_id=IMAGE_ID + 3)
        vision = dict(vision, intermediate_size=64, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1])
        vision.pop("embed_dim")
        return tf.Qwen2_5_VLConfig(text_config=dict(text, **rope), vision_config=vision,
                                   image_token_id=IMAGE_ID, video_token_id=IMAGE_ID + 1,
                                   vision_start_token_id=IMAGE_ID + 2, vision_end_token_id=IMAGE_ID + 3)
    if family == "gemma3":
        return tf.Gemma3Config(
            text_config=tf.Gemma3TextConfig(**text, sliding_window=64, query_pre_attn_scalar=8,
                                            layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
            vision_config=tf.SiglipVisionConfig(**_TINY_VISION, image_size=16, patch_size=4),
            mm_tokens_per_image=4, image_token_index=IMAGE_ID, boi_token_index=IMAGE_ID + 1,
            eoi_token_index=IMAGE_ID + 2)
    cls = tf.Idefics3Config if family == "idefics3" else tf.SmolVLMConfig
    vision_cls = tf.Idefics3VisionConfig if family == "idefics3" else tf.SmolVLMVisionConfig
    return cls(text_config=tf.LlamaConfig(**text),
               vision_config=vision_cls(**_TINY_VISION, image_size=16, patch_size=4),
               image_token_id=IMAGE_ID, scale_factor=2, pad_token_id=0)


def _full_config(family: str):
    import transformers as tf

    if family == "llava":  # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 tokens an image) + Llama-2-7B
        return tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=336, patch_size=14,
                                              projection_dim=768, hidden_act="quick_gelu"),
            text_config=tf.LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                       max_position_embeddings=32768, rms_norm_eps=1e-5, pad_token_id=0),
            image_token_index=32000, vision_feature_layer=-2, vision_feature_select_strategy="default")
    if family == "qwen2_5_vl":  # Qwen2.5-VL-7B-Instruct
        return tf.Qwen2_5_VLConfig(
            text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                             rms_norm_eps=1e-6, **_rope({"rope_type": "default", "mrope_section": [16, 24, 24],
                                                         "rope_theta": 1000000.0})),
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                               fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu"),
            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
    if family == "gemma3":  # Gemma-3-4B-it: SigLIP so400m at 896 px pooled to 256 tokens an image
        layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(34)]
        return tf.Gemma3Config(
            text_config=tf.Gemma3TextConfig(
                vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                sliding_window=1024, layer_types=layer_types, max_position_embeddings=131072,
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
            vision_config=tf.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                num_attention_heads=16, image_size=896, patch_size=14,
                                                vision_use_head=False),
            mm_tokens_per_image=256, image_token_index=262144, boi_token_index=255999, eoi_token_index=256000)
    raise ValueError(f"full-size configs exist for {tuple(FULL)}, got {family!r}")


def build(family: str, size: str = "tiny", attn_implementation: str = "mmfa", dtype=torch.float32, device="cpu",
          seed: int = 0):
    """A randomly initialised ``...ForConditionalGeneration`` of ``family`` in eval mode."""
    import transformers as tf

    if attn_implementation == "mmfa":
        from mmfa_torch.hf.backend import register
        register()
    cfg = config(family, size)
    cls = {"llava": tf.LlavaForConditionalGeneration, "llava_next": tf.LlavaNextForConditionalGeneration,
           "llava_onevision": tf.LlavaOnevisionForConditionalGeneration,
           "qwen2_vl": tf.Qwen2VLForConditionalGeneration, "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
           "gemma3": tf.Gemma3ForConditionalGeneration, "idefics3": tf.Idefics3ForConditionalGeneration,
           "smolvlm": tf.SmolVLMForConditionalGeneration}[family]
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    if size == "tiny":  # random init of tiny models is small: widen it so that scores differ clearly
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.2)
    return model.eval()


def image_tokens(model, family: str, image_px: int | None = None) -> int:
    """Placeholder tokens one image of side ``image_px`` (default: the vision config's size) takes."""
    cfg = model.config
    v = cfg.vision_config
    if family in ("qwen2_vl", "qwen2_5_vl"):
        side = (image_px or 4 * v.patch_size * v.spatial_merge_size) // v.patch_size
        side -= side % v.spatial_merge_size
        return (side // v.spatial_merge_size) ** 2
    if family == "llava":
        n = (v.image_size // v.patch_size) ** 2
        return n + (1 if cfg.vision_feature_select_strategy == "full" else 0)
    if family == "gemma3":
        return cfg.mm_tokens_per_image
    if family in ("idefics3", "smolvlm"):
        return (v.image_size // v.patch_size) ** 2 // cfg.scale_factor ** 2
    raise ValueError(f"image_tokens: count it with the model for {family!r}")


def make_inputs(model, family: str, images_per_example=(2, 2), text_lengths=None, image_px: int | None = None,
                pad_left: bool = True, seed: int = 0, device="cpu", dtype=torch.float32) -> dict:
    """A batch of prompts, one per entry of ``images_per_example``, left-padded to one length.

    Each prompt is text, then per image its placeholder tokens followed by a few text tokens, and
    ends in text (the question). ``text_lengths`` (per example) sets the leading text length, which
    makes the padding differ. Returns the keyword arguments of the model's forward / generate.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    vocab = cfg.get_text_config().vocab_size
    image_id = cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None else cfg.image_token_index
    B = len(images_per_example)
    text_lengths = text_lengths or [3 + 2 * b for b in range(B)]
    n_images = sum(images_per_example)
    extra: dict = {}
    v = cfg.vision_config
    if family in ("qwen2_vl", "qwen2_5_vl"):
        side = (image_px or 4 * v.patch_size * v.spatial_merge_size) // v.patch_size
        side -= side % v.spatial_merge_size
        per_patch = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        extra["pixel_values"] = torch.randn(n_images * side * side, per_patch, generator=g)
        extra["image_grid_thw"] = torch.tensor([[1, side, side]] * n_images)
        counts = [image_tokens(model, family, image_px)] * n_images
    elif family in ("llava_next", "llava_onevision"):
        s = v.image_size
        onevision = family == "llava_onevision"
        # LLaVA-NeXT: an s x s image is its base view plus one grid view; OneVision with several images
        # per prompt takes the base view only
        extra["pixel_values"] = torch.randn(n_images, 1 if onevision else 2, 3, s, s, generator=g)
        extra["image_sizes"] = torch.tensor([[s, s]] * n_images)
        more = {}
        if onevision:
            extra["batch_num_images"] = more["batch_num_images"] = torch.tensor(list(images_per_example))
        with torch.no_grad():
            feats = model.model.get_image_features(extra["pixel_values"].to(device, dtype), extra["image_sizes"],
                                                   **more)
        feats = getattr(feats, "pooler_output", feats)  # transformers 5: an output object; 4.57: the list
        counts = [f.shape[0] for f in feats]
    elif family in ("idefics3", "smolvlm"):
        s = v.image_size
        most = max(images_per_example)
        pv = torch.zeros(B, most, 3, s, s)
        for b, n in enumerate(images_per_example):
            pv[b, :n] = torch.randn(n, 3, s, s, generator=g)
        extra["pixel_values"] = pv
        counts = [image_tokens(model, family)] * n_images
    else:
        s = v.image_size if image_px is None else image_px
        extra["pixel_values"] = torch.randn(n_images, 3, s, s, generator=g)
        counts = [image_tokens(model, family)] * n_images

    def text(n):
        return torch.randint(3, min(vocab, IMAGE_ID) if vocab > IMAGE_ID + 4 else 100, (n,), generator=g).tolist()

    rows, types, k = [], [], 0
    for b in range(B):
        ids, tt = text(text_lengths[b]), [0] * text_lengths[b]
        for _ in range(images_per_example[b]):
            ids += [image_id] * counts[k] + text(2)
            tt += [1] * counts[k] + [0, 0]
            k += 1
        ids += text(3)
        tt += [0, 0, 0]
        rows.append(ids)
        types.append(tt)
    T = max(map(len, rows))
    pad = cfg.get_text_config().pad_token_id or 0
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    token_types = torch.zeros(B, T, dtype=torch.long)
    for b, (ids, tt) in enumerate(zip(rows, types)):
        sl = slice(T - len(ids), T) if pad_left else slice(0, len(ids))
        input_ids[b, sl] = torch.tensor(ids)
        attention_mask[b, sl] = 1
        token_types[b, sl] = torch.tensor(tt)
    out = dict(input_ids=input_ids, attention_mask=attention_mask, **extra)
    if family == "gemma3":
        out["token_type_ids"] = token_types
    if family in ("qwen2_vl", "qwen2_5_vl") and _V5:  # 5.x finds M-RoPE groups through it; 4.57 has no such input
        out["mm_token_type_ids"] = token_types
    return {k: (t.to(device, dtype) if t.is_floating_point() else t.to(device)) for k, t in out.items()}


def generation_position_ids(model, inputs: dict):
    """The position ids ``generate`` gives a prompt: from the padding mask ((B, T)), or Qwen's M-RoPE
    ids ((3|4, B, T)). Continue them for decode steps with ``pos[..., -1:] + 1``."""
    prepare = getattr(model, "_prepare_position_ids_for_generation", None)
    if prepare is not None:  # transformers 5
        return prepare(inputs["input_ids"], dict(inputs))
    mask = inputs["attention_mask"]
    if hasattr(model.model, "get_rope_index"):  # transformers 4.57, Qwen2-VL / Qwen2.5-VL
        pos, deltas = model.model.get_rope_index(inputs["input_ids"], inputs.get("image_grid_thw"),
                                                 inputs.get("video_grid_thw"), mask)
        model.model.rope_deltas = deltas
        return pos
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


__all__ = ["FAMILIES", "FULL", "build", "config", "generation_position_ids", "image_tokens", "make_inputs"]
