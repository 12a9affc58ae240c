"""Reproduces the bundled base model `blip_peft/models/blip-shapes-base`.

A small BLIP (same architecture as Salesforce/blip-image-captioning-base, about 4 M parameters) with a
compact WordPiece tokenizer made for the synthetic world's vocabulary, pretrained from scratch on the
world's *base* domain with this package's own full-parameter training (`blip_peft.train`). The result is
written in transformers' folder layout (config, float16 safetensors weights, processor and tokenizer files),
so `transformers.BlipForConditionalGeneration.from_pretrained` loads it too.

    python scripts/make_base_model.py                      # the shipped model (tens of minutes on 2 cores)
    python scripts/make_base_model.py --images 200 --epochs 1 --out /tmp/quick   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

import blip_peft as bp
from blip_peft import metrics, presets, world

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
IMAGE_SIZE = presets.BUNDLED_IMAGE_SIZE


def build_tokenizer(folder: str) -> str:
    """A BERT-style uncased WordPiece tokenizer over the world's words, plus BLIP's [DEC] (BOS) and [ENC]."""
    vocab = {token: i for i, token in enumerate(SPECIALS + world.vocabulary(("base", "target")))}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(SPECIALS + ["[DEC]", "[ENC]"])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    tok.save(path)
    return path


def make_processor(folder: str) -> bp.BlipProcessor:
    tokenizer_file = build_tokenizer(folder)
    tokenizer = bp.BlipTokenizer(
        tokenizer_file,
        bos_token="[DEC]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
        extra_special_tokens=["[ENC]"],
        model_max_length=64,
        do_lower_case=True,
        tokenizer_class="BertTokenizer",
    )
    image_processor = bp.BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return bp.BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def model_config(tokenizer: bp.BlipTokenizer) -> dict:
    """The bundled model's shapes (blip_peft.presets) with this tokenizer's vocabulary size and token ids."""
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        presets.BUNDLED_TEXT,
        vocab_size=len(tokenizer),
        bos_token_id=ids("[DEC]"),
        eos_token_id=ids("[SEP]"),
        sep_token_id=ids("[SEP]"),
        pad_token_id=ids("[PAD]"),
    )
    return {
        "model_type": "blip",
        "architectures": ["BlipForConditionalGeneration"],
        "text_config": text,
        "vision_config": dict(presets.BUNDLED_VISION),
        "tie_word_embeddings": True,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "..", "python", "blip_peft", "models", "blip-shapes-base"))
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        processor = make_processor(tmp)
        config = model_config(processor.tokenizer)
        model = bp.BlipForConditionalGeneration.from_config(config, seed=args.seed)
        print(f"model: {model.num_parameters():,} parameters")
        data = world.make_dataset(args.images, seed=args.seed, domain="base", size=IMAGE_SIZE)
        held_out = world.make_dataset(64, seed=args.seed + 10_000, domain="base", size=IMAGE_SIZE)
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
        captions = bp.generate(model, processor, [d["image"] for d in held_out], max_new_tokens=30)
        refs = [d["text"] for d in held_out]
        scores = {"exact_match": metrics.exact_match(captions, refs), "bleu4": metrics.bleu4(captions, refs)}
        print(f"trained {result.global_step} steps in {minutes:.1f} min; held-out base domain: {scores}")
        out = os.path.abspath(args.out)
        model.to(torch.float16).save_pretrained(out)  # float16 on disk keeps the package small
        processor.save_pretrained(out)
        card = {
            "what": "A small BLIP pretrained by scripts/make_base_model.py on the synthetic world's base domain.",
            "parameters": model.num_parameters(),
            "images": args.images,
            "epochs": args.epochs,
            "steps": result.global_step,
            "final_loss": result.losses[-1],
            "held_out_base_scores": scores,
            "training_minutes_2_cpu_cores": round(minutes, 1),
        }
        with open(os.path.join(out, "training_card.json"), "w") as f:
            json.dump(card, f, indent=2)
        print(f"saved to {out}")


if __name__ == "__main__":
    main()
