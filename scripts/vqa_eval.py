"""VQA accuracy of a transformers VLM with and without mmfa's visual-token pruning (VQAv2 format).

Inputs are the VQAv2 files: a questions JSON ({"questions": [{"question_id", "image_id", "question"}]}),
an annotations JSON ({"annotations": [{"question_id", "answers": [{"answer": ...}, ...]}]}) and a
folder of images named as in COCO (``COCO_val2014_000000123456.jpg``; ``--image-pattern`` changes it).
The model is any local path or hub id that ``AutoModelForImageTextToText`` and ``AutoProcessor``
load, of a family that ``mmfa_torch.hf.prune_visual_tokens`` supports. Answers are greedy.

The metric is the standard VQA accuracy: an answer scores min(1, matching human answers / 3),
averaged over the ten leave-one-annotator-out subsets, after the official answer normalisation
(punctuation, number words to digits, articles, contractions).

    python scripts/vqa_eval.py --model llava-hf/llava-1.5-7b-hf \\
        --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json --images val2014/ \\
        --keeps none 0.5 0.25 --layer 2 --limit 1000 --out results/vqa_llava.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ------------------------------------------------------------------------------------------------
# The VQA answer normalisation and accuracy

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        # a mark next to a space (or anywhere in text with a number comma) disappears; else it splits words
        if (p + " " in text or " " + p in text) or re.search(_COMMA_IN_NUMBER, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_and_articles(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """The official VQA answer normalisation (as the VQA evaluation applies it to both sides)."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_punctuation(answer))


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """min(1, #matching humans / 3), averaged over the leave-one-out subsets of the human answers."""
    if not human_answers:
        raise ValueError("human_answers must not be empty")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in human_answers]
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(scores) / len(scores)


# ------------------------------------------------------------------------------------------------
# Data and model


def load_vqa(questions_path, annotations_path, images_dir, image_pattern="COCO_val2014_{image_id:012d}.jpg",
             limit=None):
    """[(question_id, image path, question, [human answers])] in the questions file's order."""
    questions = json.loads(Path(questions_path).read_text())["questions"]
    annotations = {a["question_id"]: a for a in json.loads(Path(annotations_path).read_text())["annotations"]}
    items = []
    for q in questions[:limit] if limit else questions:
        ann = annotations.get(q["question_id"])
        if ann is None:
            raise ValueError(f"question {q['question_id']} has no annotation in {annotations_path}")
        path = Path(images_dir) / image_pattern.format(image_id=q["image_id"])
        if not path.exists():
            raise FileNotFoundError(f"image of question {q['question_id']} not found: {path}")
        items.append((q["question_id"], path, q["question"], [a["answer"] for a in ann["answers"]]))
    return items


INSTRUCTION = "Answer the question using a single word or phrase."


def build_prompt(processor, question: str, template: str | None) -> str:
    if template is not None:
        return template.format(image=getattr(processor, "image_token", "<image>"), question=question,
                               instruction=INSTRUCTION)
    if getattr(processor, "chat_template", None):
        text = {"type": "text", "text": f"{question}\n{INSTRUCTION}"}
        messages = [{"role": "user", "content": [{"type": "image"}, text]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: {getattr(processor, 'image_token', '<image>')}\n{question} {INSTRUCTION} ASSISTANT:"


def answer_batch(model, processor, batch, template, max_new_tokens, device):
    import torch
    from PIL import Image

    images = [Image.open(path).convert("RGB") for _, path, _, _ in batch]
    prompts = [build_prompt(processor, q, template) for _, _, q, _ in batch]
    inputs = dict(processor(images=images, text=prompts, padding=True, return_tensors="pt"))
    accepted = inspect.signature(model.forward).parameters
    if "token_type_ids" in inputs and "token_type_ids" not in accepted:  # some tokenizers add it; LLaVA has none
        inputs.pop("token_type_ids")
    inputs = {k: (v.to(device, model.dtype) if v.is_floating_point() else v.to(device)) if hasattr(v, "to") else v
              for k, v in inputs.items()}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]


def evaluate(model, processor, items, *, keeps=("none",), layer=2, rule="text", batch_size=8, template=None,
             max_new_tokens=10, device="cpu", log=print):
    """Accuracy per keep setting ("none": no pruning). Returns {"runs": [{keep, accuracy, seconds,
    answers: {question_id: answer}, scores: {question_id: acc}}]}."""
    from mmfa_torch import hf

    runs = []
    for keep in keeps:
        handle = None
        if keep != "none":
            handle = hf.prune_visual_tokens(model, keep=keep, layer=layer, rule=rule)
        t0 = time.perf_counter()
        answers, scores = {}, {}
        try:
            for i in range(0, len(items), batch_size):
                batch = items[i:i + batch_size]
                for (qid, _, _, humans), ans in zip(batch, answer_batch(model, processor, batch, template,
                                                                       max_new_tokens, device)):
                    answers[str(qid)] = ans
                    scores[str(qid)] = vqa_accuracy(ans, humans)
        finally:
            if handle is not None:
                handle.remove()
        acc = sum(scores.values()) / max(1, len(scores))
        runs.append(dict(keep=keep, layer=layer if keep != "none" else None, rule=rule if keep != "none" else None,
                         accuracy=acc, questions=len(scores), seconds=time.perf_counter() - t0, answers=answers,
                         scores=scores))
        log(f"keep={keep!s:>5}: VQA accuracy {100 * acc:.2f} on {len(scores)} questions "
            f"({runs[-1]['seconds']:.1f}s)")
    return {"runs": runs}


def _keep(text: str):
    if text == "none":
        return "none"
    value = float(text)
    return int(value) if value > 1 else value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local path or hub id of a transformers VLM")
    p.add_argument("--questions", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument("--image-pattern", default="COCO_val2014_{image_id:012d}.jpg")
    p.add_argument("--keeps", nargs="+", type=_keep, default=["none", 0.5, 0.25],
                   help="'none' (no pruning), ratios in (0, 1] or counts > 1")
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--rule", choices=["text", "last"], default="text")
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--prompt", help="template with {image}, {question}, {instruction} (default: the chat template)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--implementation", choices=["pallas", "interpret", "xla"])
    p.add_argument("--out", type=Path, help="JSON with accuracies and every answer")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmfa_torch import hf

    hf.register(implementation=args.implementation)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    processor = AutoProcessor.from_pretrained(args.model)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"  # batched generation
    model = AutoModelForImageTextToText.from_pretrained(args.model, attn_implementation="mmfa", dtype=dtype)
    model = model.to(args.device).eval()
    items = load_vqa(args.questions, args.annotations, args.images, args.image_pattern, args.limit)
    result = evaluate(model, processor, items, keeps=args.keeps, layer=args.layer, rule=args.rule,
                      batch_size=args.batch_size, template=args.prompt, max_new_tokens=args.max_new_tokens,
                      device=args.device)
    result.update(model=args.model, questions_file=str(args.questions))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
