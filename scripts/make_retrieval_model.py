"""Reproduces the bundled retrieval model `blip_peft/models/blip-shapes-retrieval`.

transformers' `BlipForImageTextRetrieval` at the bundled captioner's shapes: the captioner's vision tower and
BERT body (as the text encoder) and its tokenizer, 128-wide contrastive projections and the matching head
(random at first), then trained in full by `blip_peft.train` on the synthetic world's *base* domain with BLIP's
retrieval losses (image-text contrastive with a learned temperature + image-text matching on hard negatives). It
ranks base-domain pairs well and leaves the target domain's new shapes and colours to fine-tuning (`blip-peft
demo --task retrieval`). Written in transformers' folder layout, so `transformers.BlipForImageTextRetrieval`
loads it.

    python scripts/make_retrieval_model.py                          # the shipped model (~7 min on 2 cores)
    python scripts/make_retrieval_model.py --images 256 --epochs 1 --out /tmp/quick-retrieval   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from bundled_heads import CAPTIONER, MODELS, captioner, head_config, initialise_from_captioner, save_bundle

import blip_peft as bp
from blip_peft import metrics, world

#: The contrastive projections' width (blip-itm-base-coco's is 256, for 768-wide towers).
IMAGE_TEXT_HIDDEN_SIZE = 128


def recall(model: bp.BlipForImageTextRetrieval, processor: bp.BlipProcessor, n: int, seed: int, domain: str):
    """Recall@1/@5 both ways on `n` held-out pairs of `domain` (ITC ranking)."""
    size = processor.image_processor.size["height"]
    pairs = world.retrieval_pairs(n, seed=seed, domain=domain, size=size)
    result = bp.rank(model, processor, pairs["images"], pairs["texts"], top_k=5)
    return metrics.retrieval_recall(result, pairs["relevant_texts"], pairs["relevant_images"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(MODELS, "blip-shapes-retrieval"))
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    source, source_config = captioner()
    processor = bp.BlipProcessor.from_pretrained(CAPTIONER)  # the captioner's tokenizer: captions only
    config = head_config(source_config, "BlipForImageTextRetrieval", image_text_hidden_size=IMAGE_TEXT_HIDDEN_SIZE)
    model = bp.BlipForImageTextRetrieval.from_config(config, seed=args.seed, dtype="float32")
    fresh = initialise_from_captioner(
        model, source, {"vision_model.": "vision_model.", "text_encoder.": "text_decoder.bert."}, args.seed
    )
    print(f"model: {model.num_parameters():,} parameters; random at first: {sorted({k.split('.')[0] for k in fresh})}")
    size = processor.image_processor.size["height"]
    data = world.make_dataset(args.images, seed=args.seed, domain="base", size=size)
    started = time.time()
    result = bp.train(
        model,
        processor,
        [{"image": d["image"], "text": d["text"]} for d in data],
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
    minutes = (time.time() - started) / 60
    model.eval()
    scores = {
        "held_out_base": recall(model, processor, 100, args.seed + 10_000, "base"),
        "held_out_target": recall(model, processor, 100, args.seed + 20_000, "target"),
    }
    print(f"trained {result.global_step} steps in {minutes:.1f} min; recall on 100 held-out pairs: {scores}")
    card = {
        "what": "A small BLIP retrieval head made by scripts/make_retrieval_model.py: the bundled captioner's vision "
        "tower and BERT body, trained in full on the synthetic world's base domain with BLIP's ITC + ITM losses.",
        "parameters": model.num_parameters(),
        "images": args.images,
        "epochs": args.epochs,
        "steps": result.global_step,
        "temperature": result.temp,
        "final_loss": result.losses[-1] if result.losses else None,
        "recall_100_held_out_pairs": scores,
        "training_minutes_2_cpu_cores": round(minutes, 1),
    }
    save_bundle(model, processor, args.out, card)
    print(f"saved to {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
