"""The main job, offline: caption a held-out domain with the bundled base model, LoRA fine-tune on it, caption
again, save the adapter, reload it in a fresh model and caption once more. `blip-peft demo` runs it."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch

from blip_peft.presets import ATTENTION_MLP_TARGETS

BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "blip-shapes-base")


def bundled_model_path() -> str:
    """The folder of the small BLIP that ships with the package (transformers' layout)."""
    if not os.path.isfile(os.path.join(BUNDLED_MODEL, "model.safetensors")):
        raise FileNotFoundError(
            f"the bundled model is missing from {BUNDLED_MODEL}; recreate it with scripts/make_base_model.py"
        )
    return BUNDLED_MODEL


def _log(message: str) -> None:
    print(message, flush=True)


def _score(captions: list[str], refs: list[str]) -> dict[str, float]:
    from blip_peft import metrics

    return {"exact_match": metrics.exact_match(captions, refs), "bleu4": metrics.bleu4(captions, refs)}


def run(
    output_dir: str = "./blip-peft-demo",
    quick: bool = False,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
    epochs: int | None = None,
) -> dict[str, Any]:
    """Runs the demo and returns its scores. `quick` shrinks it (about a minute on 2 cores); `n_train`,
    `n_test` and `epochs` override the sizes."""
    import blip_peft as bp
    from blip_peft import world

    started = time.time()
    torch.manual_seed(seed)
    os.makedirs(output_dir, exist_ok=True)
    base_path = bundled_model_path()
    processor = bp.BlipProcessor.from_pretrained(base_path)
    size = processor.image_processor.size["height"]
    default_train, default_test, default_epochs = (256, 24, 4) if quick else (1600, 96, 6)
    n_train = n_train or default_train
    n_test = n_test or default_test
    epochs = epochs or default_epochs
    target = world.DOMAINS["target"]
    _log(
        f"1. A held-out domain the base model never saw: new shapes ({', '.join(target.novel_kinds)}), new colours "
        f"({', '.join(target.novel_colours)}) and captions that start with {target.prefix!r}."
    )
    train_set = world.make_dataset(n_train, seed=seed + 1, domain="target", size=size)
    test_set = world.make_dataset(n_test, seed=seed + 2, domain="target", size=size)
    images = [d["image"] for d in test_set]
    refs = [d["text"] for d in test_set]

    base = bp.BlipForConditionalGeneration.from_pretrained(base_path, dtype="float32")
    _log(f"2. Captioning {n_test} target images with the base model ({base.num_parameters():,} parameters)...")
    before = bp.generate(base, processor, images, max_new_tokens=32)
    before_scores = _score(before, refs)

    _log("3. LoRA fine-tuning on the target domain with blip_peft.train...")
    model = bp.get_peft_model(
        base, bp.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=ATTENTION_MLP_TARGETS)
    )
    model.print_trainable_parameters()
    adapter_dir = os.path.join(output_dir, "adapter")
    result = bp.train(
        model,
        processor,
        [{"image": d["image"], "text": d["text"]} for d in train_set],
        epochs=epochs,
        batch_size=16,
        learning_rate=2e-3,
        lr_scheduler="cosine",
        warmup_ratio=0.05,
        output_dir=adapter_dir,
        logging_steps=5,
        seed=seed,
        mixed_precision="no",
    )
    model.eval()
    after = bp.generate(model, processor, images, max_new_tokens=32)
    after_scores = _score(after, refs)

    _log("4. Reloading the saved adapter into a fresh base model...")
    # The adapter folder names its base model; load it in the precision it was fine-tuned in.
    reloaded = bp.AutoModelForVision2Seq.from_pretrained(adapter_dir, dtype="float32")
    again = bp.generate(reloaded, processor, images, max_new_tokens=32)
    plot_path = os.path.join(output_dir, "loss.png")
    try:
        result.plot(plot_path)
    except ImportError:
        plot_path = ""

    minutes = (time.time() - started) / 60
    _log("")
    _log(f"{'':<28}{'exact match':>14}{'BLEU-4':>10}")
    _log(f"{'base model (before)':<28}{before_scores['exact_match']:>14.3f}{before_scores['bleu4']:>10.3f}")
    _log(f"{'after LoRA fine-tuning':<28}{after_scores['exact_match']:>14.3f}{after_scores['bleu4']:>10.3f}")
    _log("")
    for i in range(min(4, n_test)):
        _log(f"  reference: {refs[i]}")
        _log(f"  before:    {before[i]}")
        _log(f"  after:     {after[i]}")
        _log("")
    same = again == after
    _log(f"Adapter saved to {adapter_dir}; reloaded model gives the same captions: {same}")
    if plot_path:
        _log(f"Loss curve: {plot_path}")
    _log(f"Done in {minutes:.1f} min ({result.global_step} training steps).")
    summary = {
        "before": before_scores,
        "after": after_scores,
        "reloaded_matches": same,
        "train_steps": result.global_step,
        "final_loss": result.losses[-1] if result.losses else None,
        "minutes": minutes,
        "adapter_dir": adapter_dir,
        "loss_plot": plot_path,
    }
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
