"""Reproduces the bundled VQA model `blip_peft/models/blip-shapes-vqa`.

transformers' `BlipForQuestionAnswering` at the bundled captioner's shapes, initialised from it as LAVIS
initialises BLIP's VQA model from a captioning / pretraining checkpoint: the captioner's vision tower, its BERT
body as the question encoder, and the captioner's decoder (LM head included) as the answer decoder. The
captioner's tokenizer gains the words of the world's questions (`QUESTION_WORDS`, new ids after the captioner's,
so every captioner id keeps its meaning; their embedding rows start at the mean of the known ones). Then it is
trained in full with `blip_peft.train` on the questions of the synthetic world's *base* domain, so it answers
there and leaves the target domain's new shapes and colours to fine-tuning (`blip-peft demo --task vqa`).
Written in transformers' folder layout, so `transformers.BlipForQuestionAnswering` loads it.

    python scripts/make_vqa_model.py                          # the shipped model (~7 min on 2 cores)
    python scripts/make_vqa_model.py --images 64 --epochs 1 --out /tmp/quick-vqa   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from bundled_heads import CAPTIONER, MODELS, captioner, head_config, initialise_from_captioner, save_bundle

import blip_peft as bp
from blip_peft import metrics, world

#: The words of `world.scene_questions`' questions and answers that captions never use (BERT's pre-tokenizer
#: splits "?" off as a word of its own); digits answer the counting questions.
QUESTION_WORDS = [
    "?", "are", "colour", "how", "is", "many", "no", "object", "objects", "shape", "there", "what", "yes",
    *(str(d) for d in range(10)),
]  # fmt: skip


def vqa_processor(folder: str) -> bp.BlipProcessor:
    """The captioner's processor with `QUESTION_WORDS` added to its WordPiece vocabulary (ids after the
    captioner's last, [ENC]), written into `folder` and read back."""
    source = bp.BlipProcessor.from_pretrained(CAPTIONER)
    source.save_pretrained(folder)
    path = os.path.join(folder, "tokenizer.json")
    with open(path) as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    next_id = 1 + max([*vocab.values(), *(t["id"] for t in tok["added_tokens"])])
    for word in QUESTION_WORDS:
        if word not in vocab:
            vocab[word] = next_id
            next_id += 1
    with open(path, "w") as f:
        json.dump(tok, f, ensure_ascii=False, indent=2)
    processor = bp.BlipProcessor.from_pretrained(folder)
    # Every question and answer of both domains is spelt with known words.
    unk = processor.tokenizer.unk_token_id
    for domain in ("base", "target"):
        for seed in range(200):
            for question, answer in world.scene_questions(world.sample_scene(seed, domain)):
                ids = processor.tokenizer(question + " " + answer)["input_ids"]
                if unk in ids:
                    raise AssertionError(f"{question!r} / {answer!r} has a word the tokenizer lacks")
    return processor


def answer_accuracy(model: bp.BlipForQuestionAnswering, processor: bp.BlipProcessor, n: int, seed: int, domain: str):
    """VQA accuracy on the questions of `n` held-out scenes of `domain`."""
    items = world.vqa_dataset(n, seed=seed, domain=domain, size=processor.image_processor.size["height"])
    answers = bp.answer(model, processor, [d["image"] for d in items], [d["question"] for d in items])
    return metrics.vqa_accuracy(answers, [d["answer"] for d in items])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(MODELS, "blip-shapes-vqa"))
    parser.add_argument("--images", type=int, default=800, help="base-domain scenes (each asks ~9 questions)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-vision", action="store_true", help="train the vision tower too (slower)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    source, source_config = captioner()
    with tempfile.TemporaryDirectory() as tmp:
        processor = vqa_processor(tmp)
    config = head_config(source_config, "BlipForQuestionAnswering")
    config["text_config"]["vocab_size"] = len(processor.tokenizer)
    model = bp.BlipForQuestionAnswering.from_config(config, seed=args.seed, dtype="float32")
    fresh = initialise_from_captioner(
        model,
        source,
        {"vision_model.": "vision_model.", "text_encoder.": "text_decoder.bert.", "text_decoder.": "text_decoder."},
        args.seed,
    )
    if fresh:
        raise AssertionError(f"weights the captioner should have given: {fresh}")
    if not args.train_vision:
        # The captioner's vision tower already sees what the questions ask about; kept frozen, its features are
        # computed once per row and cached by bp.train (the feature cache), which makes pretraining ~2x faster.
        for p in model.vision_model.parameters():
            p.requires_grad_(False)
    print(
        f"model: {model.num_parameters():,} parameters ({model.num_parameters(only_trainable=True):,} trained), "
        f"vocabulary {len(processor.tokenizer)}"
    )
    size = processor.image_processor.size["height"]
    data = world.vqa_dataset(args.images, seed=args.seed, domain="base", size=size)
    started = time.time()
    result = bp.train(
        model,
        processor,
        [{"image": d["image"], "question": d["question"], "answer": d["answer"]} for d in data],
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler="cosine",
        warmup_ratio=0.05,
        weight_decay=0.01,
        mixed_precision="no",
        seed=args.seed,
        logging_steps=25,
    )
    print(f"feature cache: {result.feature_cache}")
    minutes = (time.time() - started) / 60
    model.eval()
    scores = {
        "held_out_base": answer_accuracy(model, processor, 40, args.seed + 10_000, "base"),
        "held_out_target": answer_accuracy(model, processor, 40, args.seed + 20_000, "target"),
    }
    print(f"trained {result.global_step} steps in {minutes:.1f} min; VQA accuracy on 40 held-out scenes: {scores}")
    card = {
        "what": "A small BLIP VQA head made by scripts/make_vqa_model.py: the bundled captioner's vision tower, BERT "
        "body (question encoder) and decoder (answer decoder), trained in full on the synthetic world's base domain.",
        "parameters": model.num_parameters(),
        "images": args.images,
        "questions": len(data),
        "epochs": args.epochs,
        "steps": result.global_step,
        "final_loss": result.losses[-1] if result.losses else None,
        "vqa_accuracy_40_held_out_scenes": scores,
        "training_minutes_2_cpu_cores": round(minutes, 1),
    }
    save_bundle(model, processor, args.out, card)
    print(f"saved to {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
