"""Time to quality: CIDEr on held-out images of the world's target domain after equal wall-clock training
budgets, for three ways of fine-tuning the bundled BLIP with LoRA on the same machine, one after another:

  (a) the tutorial's loop on transformers + peft: Hugging Face's BLIP captioning notebook (batch 2, AdamW at
      5e-5, `labels = input_ids`, `padding="max_length"`), with peft's LoRA;
  (b) `bp.train` with its defaults (batch 8, learning rate 1e-4, linear decay, pads masked);
  (c) `bp.train` with the recipe as the demo uses it (the prompt "a picture of " masked out of the loss, batch
      16, learning rate 2e-3, cosine schedule with 5% warm-up over the longest budget).

All three train the same LoRA (r=16, alpha 32, dropout 0.05, attention and MLP layers of both towers), float32,
on the same images and captions. Each run trains for the longest budget; when its training time (the clock
stopped while a snapshot is saved) passes a budget, the adapter is saved. Afterwards every snapshot is scored
the same way: blip_peft's beam search (3 beams, 5-20 new tokens) on the held-out images, the prompt (when a
caption starts with it) cut from captions and references, pycocoevalcap's CIDEr-D and BLEU-4 (papers print
them x100). Measure on a quiet machine.

    python bench/time_to_quality.py [--budgets 1,2,4,8] [--write-results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import blip_peft as bp
from blip_peft import metrics, world
from blip_peft.demo import PROMPT, bundled_model_path
from blip_peft.presets import ATTENTION_MLP_TARGETS

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "RESULTS.md"
SECTION = "## Time to quality (`bench/time_to_quality.py`, issue #20)"
VARIANTS = {
    "a": "(a) tutorial loop, transformers + peft",
    "b": "(b) bp.train, defaults",
    "c": "(c) bp.train, the recipe",
}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ATTENTION_MLP_TARGETS}


class Snapshots:
    """Captures the adapter each time the training clock passes the next budget; the clock stops meanwhile.
    `capture()` returns what `write(folder, captured)` later turns into an adapter folder."""

    def __init__(self, budgets_s: list[float], capture, write) -> None:  # type: ignore[no-untyped-def]
        self.budgets_s, self.capture, self.write = budgets_s, capture, write
        self.start = time.perf_counter()
        self.paused = 0.0
        self.steps: dict[float, int] = {}
        self.captured: dict[float, Any] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def step(self, step: int) -> bool:
        """Called after each optimizer step; True once the last budget is spent."""
        while len(self.steps) < len(self.budgets_s) and self.elapsed() >= self.budgets_s[len(self.steps)]:
            budget = self.budgets_s[len(self.steps)]
            t = time.perf_counter()
            self.captured[budget] = self.capture()
            self.paused += time.perf_counter() - t
            self.steps[budget] = step
        return len(self.steps) == len(self.budgets_s)

    def save_all(self, folder: Path) -> dict[float, int]:
        """Writes every snapshot (the last one standing for budgets the run ended before) and the steps."""
        for budget in self.budgets_s:
            if budget not in self.captured:
                self.captured[budget], self.steps[budget] = self.capture(), -1
            self.write(folder / f"{budget:g}s", self.captured[budget])
        return self.steps


def lora_state(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def save_lora_state(model, folder: Path, state: dict[str, torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])
    model.save_pretrained(folder)


def run_tutorial(train_set: list[dict[str, Any]], budgets_s: list[float], folder: Path) -> dict[float, int]:
    """(a): the notebook's loop, as a CPU user runs it."""
    import peft
    from transformers import BlipForConditionalGeneration, BlipProcessor

    path = bundled_model_path()
    processor = BlipProcessor.from_pretrained(path)
    model = BlipForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model.train()
    snapshots = Snapshots(budgets_s, lambda: lora_state(model), lambda f, st: save_lora_state(model, f, st))
    generator = torch.Generator().manual_seed(0)
    step = 0
    while True:
        order = torch.randperm(len(train_set), generator=generator).tolist()
        for i in range(0, len(order) - 1, 2):
            rows = [train_set[j] for j in order[i : i + 2]]
            batch = processor(
                images=[r["image"] for r in rows],
                text=[r["text"] for r in rows],
                padding="max_length",
                return_tensors="pt",
            )
            out = model(
                input_ids=batch["input_ids"],
                pixel_values=batch["pixel_values"],
                attention_mask=batch["attention_mask"],
                labels=batch["input_ids"],
            )
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if snapshots.step(step):
                return snapshots.save_all(folder)


def run_ours(train_set: list[dict[str, Any]], budgets_s: list[float], folder: Path, recipe: bool) -> dict[float, int]:
    """(b) and (c): `bp.train`, stopped by its callback when the last budget is spent."""
    path = bundled_model_path()
    processor = bp.BlipProcessor.from_pretrained(path)
    base = bp.BlipForConditionalGeneration.from_pretrained(path, dtype="float32")
    model = bp.get_peft_model(base, bp.LoraConfig(**LORA))
    snapshots: Snapshots | None = None

    def on_log(log: dict[str, Any]) -> bool:
        assert snapshots is not None
        return snapshots.step(int(log["step"]))

    if recipe:
        batch_size = 16
        # The cosine schedule's horizon: the steps the longest budget allows, from a short timed probe.
        probe = time.perf_counter()
        bp.train(
            model,
            processor,
            train_set[:64],
            prompt=PROMPT,
            batch_size=batch_size,
            epochs=1,
            progress=False,
            learning_rate=0.0,
            mixed_precision="no",
            seed=1,
        )
        per_step = (time.perf_counter() - probe) / 4
        settings: dict[str, Any] = {
            "prompt": PROMPT,
            "learning_rate": 2e-3,
            "lr_scheduler": "cosine",
            "warmup_ratio": 0.05,
            "max_steps": max(10, int(budgets_s[-1] / per_step)),
        }
        data = [{"image": d["image"], "text": d["text"].removeprefix(PROMPT)} for d in train_set]
    else:
        batch_size = 8
        settings = {"epochs": 1000}
        data = train_set
    # bp.train lends the model to its callback for reading: the snapshot is a copy of the LoRA weights.
    snapshots = Snapshots(budgets_s, lambda: lora_state(model), lambda f, st: save_lora_state(model, f, st))
    bp.train(
        model,
        processor,
        data,
        batch_size=batch_size,
        logging_steps=1,
        progress=False,
        callback=on_log,
        mixed_precision="no",
        seed=0,
        **settings,
    )
    return snapshots.save_all(folder)


def score(adapter: Path, test_set: list[dict[str, Any]]) -> dict[str, float]:
    processor = bp.BlipProcessor.from_pretrained(bundled_model_path())
    model = bp.AutoModelForVision2Seq.from_pretrained(str(adapter), dtype="float32")
    model.eval()
    captions = bp.evaluate(model, processor, test_set, return_captions=True)["captions"]
    refs = [[d["text"].removeprefix(PROMPT)] for d in test_set]
    scores = metrics.caption_scores(refs, [c.removeprefix(PROMPT.strip()).strip() for c in captions])
    return {"CIDEr": scores["CIDEr"], "Bleu_4": scores["Bleu_4"]}


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs"


def render(report: dict[str, Any]) -> list[str]:
    budgets = report["budgets_min"]
    lines = [
        SECTION,
        "",
        f"Machine: {report['machine']}; torch {report['torch']}, transformers {report['transformers']}, peft "
        f"{report['peft']}; {report['date']}. The bundled model ({report['image_size']} px images), "
        f"{report['n_train']} target-domain training images, CIDEr-D and BLEU-4 on {report['n_test']} held-out "
        "ones (beam 3, 5-20 tokens, the prompt cut from captions and references). Each budget is training time; "
        "steps done in brackets.",
        "",
        "| variant | " + " | ".join(f"{b:g} min" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for key, rows in report["variants"].items():
        cells = [
            f"CIDEr {r['CIDEr']:.3f}, BLEU-4 {r['Bleu_4']:.3f} ({r['steps'] if r['steps'] >= 0 else 'all'})"
            for r in rows
        ]
        lines.append(f"| {VARIANTS[key]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Before fine-tuning: CIDEr {report['base']['CIDEr']:.3f}, BLEU-4 {report['base']['Bleu_4']:.3f}.")
    if report.get("plot"):
        lines += ["", f"![CIDEr against training time]({report['plot']})"]
    return lines + [""]


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, rows in report["variants"].items():
        ax.plot(report["budgets_min"], [r["CIDEr"] for r in rows], marker="o", label=VARIANTS[key])
    ax.axhline(report["base"]["CIDEr"], color="grey", linestyle=":", label="base model")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training time (min)")
    ax.set_ylabel("CIDEr-D, held-out target images")
    ax.set_title("Time to quality, bundled BLIP, LoRA r=16, " + report["machine"].split(",")[0][:40], fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(report: dict[str, Any]) -> None:
    text = RESULTS.read_text()
    section = "\n".join(render(report))
    pattern = re.compile(re.escape(SECTION) + r".*?(?=\n## |\Z)", re.S)
    text = pattern.sub(lambda _: section.rstrip("\n") + "\n", text) if pattern.search(text) else text + "\n" + section
    RESULTS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="1,2,4,8", help="training budgets in minutes, comma-separated")
    parser.add_argument("--variants", default="a,b,c")
    parser.add_argument("--n-train", type=int, default=1600)
    parser.add_argument("--n-test", type=int, default=96)
    parser.add_argument("--write-results", action="store_true", help="the table and plot into bench/RESULTS.md")
    args = parser.parse_args()
    import peft
    import transformers

    budgets_min = sorted(float(b) for b in args.budgets.split(","))
    budgets_s = [60 * b for b in budgets_min]
    size = bp.BlipProcessor.from_pretrained(bundled_model_path()).image_processor.size["height"]
    train_set = world.make_dataset(args.n_train, seed=1, domain="target", size=size)
    test_set = world.make_dataset(args.n_test, seed=2, domain="target", size=size)
    report: dict[str, Any] = {
        "machine": machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "image_size": size,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "budgets_min": budgets_min,
        "variants": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        bp.get_peft_model(
            bp.BlipForConditionalGeneration.from_pretrained(bundled_model_path(), dtype="float32"),
            bp.LoraConfig(**LORA),
        ).save_pretrained(base_dir)  # a fresh LoRA is the identity: the base model's captions
        report["base"] = score(base_dir, test_set)
        print(f"base model: {report['base']}", flush=True)
        for key in args.variants.split(","):
            folder = Path(tmp) / key
            started = time.perf_counter()
            if key == "a":
                steps = run_tutorial(train_set, budgets_s, folder)
            else:
                steps = run_ours(train_set, budgets_s, folder, recipe=key == "c")
            print(f"{VARIANTS[key]}: trained in {time.perf_counter() - started:.0f} s, steps {steps}", flush=True)
            rows = []
            for budget in budgets_s:
                row = {"steps": steps[budget], **score(folder / f"{budget:g}s", test_set)}
                print(f"  {budget / 60:g} min: {row}", flush=True)
                rows.append(row)
            report["variants"][key] = rows
    out = BENCH / "results" / "time_to_quality.json"
    if args.write_results:
        png = BENCH / "time_to_quality.png"
        if plot(report, png):
            report["plot"] = png.name
        out.write_text(json.dumps(report, indent=2))
        write_results(report)
    print("\n".join(render(report)))


if __name__ == "__main__":
    sys.exit(main())
