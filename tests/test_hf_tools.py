"""bench/vlm.py (smoke preset), scripts/vqa_eval.py (metric; end to end on a tiny saved model and
a tiny VQAv2-format dataset that the test writes) and scripts/needle_video.py (the haystack; end to
end on a tiny random model)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vqa = _load("scripts/vqa_eval.py", "vqa_eval")


# ------------------------------------------------------------------------------------------------
# The VQA metric

@pytest.mark.parametrize("raw,want", [
    ("Two", "2"), ("the dog.", "dog"), ("A red car", "red car"), ("yes!", "yes"), ("dont", "don't"),
    ("1,000", "1000"), ("t-shirt", "t shirt"), ("3.5", "3.5"), ("  Tennis\n", "tennis"), ("none", "0"),
])
def test_normalize_answer(raw, want):
    assert vqa.normalize_answer(raw) == want


def test_vqa_accuracy_leave_one_out():
    humans = ["2"] * 3 + ["3"] * 7
    # 3 matches: leaving out one of them (3 of 10 subsets) leaves 2 -> 2/3; else 3 -> 1
    assert vqa.vqa_accuracy("two", humans) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert vqa.vqa_accuracy("3", humans) == 1.0
    assert vqa.vqa_accuracy("4", humans) == 0.0
    one = ["cat"] + ["dog"] * 9
    assert vqa.vqa_accuracy("Cat", one) == pytest.approx(9 * (1 / 3) / 10)
    with pytest.raises(ValueError, match="human_answers"):
        vqa.vqa_accuracy("x", [])


# ------------------------------------------------------------------------------------------------
# End to end on a tiny model


def _tiny_llava_dir(tmp: Path, seed: int) -> Path:
    """A tiny random LLaVA with a word-level tokenizer and a CLIP image processor, saved like a hub model."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from mmfa_torch.testing import vlms

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
    words = ["what", "color", "is", "the", "how", "many", "USER:", "ASSISTANT:", "Answer", "question", "using", "a",
             "single", "word", "or", "phrase.", "?", "red", "blue", "two", "dog", "cat", "yes", "no"]
    for w in words:
        vocab[w] = len(vocab)
    while len(vocab) < vlms.IMAGE_ID:
        vocab[f"w{len(vocab)}"] = len(vocab)
    vocab["<image>"] = vlms.IMAGE_ID
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="[UNK]", padding_side="left",
                                        extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=4,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    model = vlms.build("llava", attn_implementation="eager", seed=seed)
    path = tmp / "tiny-llava"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _tiny_vqa(tmp: Path, rng) -> tuple[Path, Path, Path]:
    from PIL import Image

    images = tmp / "images"
    images.mkdir()
    questions, annotations = [], []
    for k, image_id in enumerate((42, 7, 123456)):
        pixels = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"COCO_val2014_{image_id:012d}.jpg")
        for j, text in enumerate(("what color is the dog ?", "how many cat ?")):
            qid = image_id * 10 + j
            questions.append({"question_id": qid, "image_id": image_id, "question": text})
            answers = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(["red"] * 4 + ["two"] * 6)]
            annotations.append({"question_id": qid, "image_id": image_id, "answers": answers,
                                "multiple_choice_answer": "two"})
    q, a = tmp / "questions.json", tmp / "annotations.json"
    q.write_text(json.dumps({"questions": questions}))
    a.write_text(json.dumps({"annotations": annotations}))
    return q, a, images


def test_vqa_eval_end_to_end(tmp_path, rng):
    model_dir = _tiny_llava_dir(tmp_path, int(rng.integers(2**31)))
    q, a, images = _tiny_vqa(tmp_path, rng)
    out = tmp_path / "result.json"
    common = ["--model", str(model_dir), "--questions", str(q), "--annotations", str(a), "--images", str(images),
              "--layer", "1", "--batch-size", "4", "--max-new-tokens", "3", "--implementation", "xla",
              "--device", "cpu", "--dtype", "float32"]
    result = vqa.main(common + ["--keeps", "none", "1.0", "0.5", "--out", str(out)])
    assert json.loads(out.read_text())["runs"][0]["questions"] == 6
    none, full, half = result["runs"]
    assert none["answers"] == full["answers"]  # keep = 1.0 prunes nothing
    assert half["questions"] == 6 and set(half["answers"]) == set(none["answers"])
    # Make the humans agree with the model's own (unpruned) answers on two questions: the accuracy follows.
    ann = json.loads(a.read_text())
    for entry in ann["annotations"][:2]:
        answer = none["answers"][str(entry["question_id"])]
        entry["answers"] = [{"answer": answer, "answer_id": i + 1} for i in range(3)] + entry["answers"][3:]
    a.write_text(json.dumps(ann))
    again = vqa.main(common + ["--keeps", "none"])["runs"][0]
    assert again["answers"] == none["answers"]
    items = vqa.load_vqa(q, a, images)
    want = np.mean([vqa.vqa_accuracy(again["answers"][str(qid)], humans) for qid, _, _, humans in items])
    assert again["accuracy"] == pytest.approx(want)
    assert again["scores"][str(items[0][0])] >= 0.9 - 1e-9  # 3 of 10 humans now agree: (3 * 2/3 + 7) / 10


def test_vqa_eval_missing_image(tmp_path, rng):
    q, a, images = _tiny_vqa(tmp_path, rng)
    next(images.iterdir()).unlink()
    with pytest.raises(FileNotFoundError, match="image of question"):
        vqa.load_vqa(q, a, images)


# ------------------------------------------------------------------------------------------------
# The benchmark's smoke preset


def test_bench_vlm_smoke(tmp_path):
    bench = _load("bench/vlm.py", "bench_vlm")
    out = tmp_path / "vlm.csv"
    rows = bench.main(["--preset", "smoke", "--families", "gemma3", "--visual", "8", "--new-tokens", "3",
                       "--implementation", "xla", "--out", str(out)])
    assert [r["error"] for r in rows] == [""] * 4, rows
    with open(out) as f:
        written = list(csv.DictReader(f))
    assert [r["impl"] for r in written] == ["sdpa", "eager", "mmfa", "mmfa+prune"]
    for r in written:
        assert float(r["ttft_ms"]) > 0 and float(r["itl_p90_ms"]) >= float(r["itl_p50_ms"]) > 0
        assert float(r["decode_tok_s"]) > 0
    dense, pruned = written[2], written[3]
    assert int(pruned["kept_tokens"]) < int(dense["kept_tokens"]) == int(dense["prompt_tokens"])
    assert out.with_suffix(".png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------------
# The needle-in-a-video check

needle = _load("scripts/needle_video.py", "needle_video")


def test_needle_haystack_writes_the_word_on_one_frame():
    plain = needle.haystack(9, 64, seed=3)
    marked = needle.haystack(9, 64, seed=3, needle="kiwi", depth=0.5)
    assert plain.shape == marked.shape == (9, 64, 64, 3) and plain.dtype == np.uint8
    changed = [i for i in range(9) if not np.array_equal(plain[i], marked[i])]
    assert changed == [4]  # round(0.5 * 8)
    assert (marked[4] == 0).all(-1).any() and not (plain[4] == 0).all(-1).any()  # black letters
    # the frames drift slowly: neighbours are closer than frames far apart
    d = lambda a, b: float(np.abs(plain[a].astype(int) - plain[b].astype(int)).mean())  # noqa: E731
    assert d(0, 1) < d(0, 8)


def test_needle_tiny_end_to_end(tmp_path):
    out, cfg = tmp_path / "needle.json", tmp_path / "cfg.json"
    result = needle.main(["--tiny", "qwen2_5_vl", "--search", "--block", "8", "--min-tokens", "8", "--frames", "3",
                          "--depths", "0.2", "0.8", "--implementation", "xla", "--device", "cpu",
                          "--target-recall", "0.9", "--max-new-tokens", "3", "--out", str(out),
                          "--save-config", str(cfg)])
    assert json.loads(out.read_text())["rows"] == result["rows"] and cfg.stat().st_size > 0
    for row in result["rows"]:
        assert row["sparse_calls"]["sparse"] > 0 and len(row["dense"]) == len(row["sparse"]) == 3
    again = needle.main(["--tiny", "qwen2_5_vl", "--config", str(cfg), "--min-tokens", "8", "--frames", "3",
                         "--depths", "0.2", "--implementation", "xla", "--device", "cpu", "--max-new-tokens", "3"])
    assert again["rows"][0]["sparse"] == result["rows"][0]["sparse"]  # the saved config drives the same prefill
