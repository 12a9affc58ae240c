"""The main job out of the box: the bundled model, the demo, the CLI, the tutorial example and the notebook."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import rel_err
from transformers import BlipForConditionalGeneration as HFBlip
from transformers import BlipProcessor as HFProcessor

import blip_peft as bp
from blip_peft import metrics, world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bundled() -> str:
    return bp.bundled_model_path()


@pytest.mark.cpu_isa
def test_bundled_model_is_small_and_loads_in_transformers_with_equal_logits(bundled: str) -> None:
    size = sum(os.path.getsize(os.path.join(bundled, f)) for f in os.listdir(bundled))
    assert size <= 25 * 1024 * 1024
    ours = bp.BlipForConditionalGeneration.from_pretrained(bundled, dtype="float32")
    ref = HFBlip.from_pretrained(bundled, dtype=torch.float32).eval()
    processor = bp.BlipProcessor.from_pretrained(bundled)
    ref_processor = HFProcessor.from_pretrained(bundled)
    items = world.make_dataset(3, seed=11, domain="base", size=processor.image_processor.size["height"])
    inputs = processor(
        images=[d["image"] for d in items], text=[d["text"] for d in items], padding=True, return_tensors="pt"
    )
    ref_inputs = ref_processor(
        images=[d["image"] for d in items], text=[d["text"] for d in items], padding=True, return_tensors="pt"
    )
    assert torch.equal(inputs["input_ids"], ref_inputs["input_ids"])
    assert torch.allclose(inputs["pixel_values"], ref_inputs["pixel_values"], atol=1e-6)
    with torch.no_grad():
        out = ours(**inputs, labels=inputs["input_ids"])
        expected = ref(**ref_inputs, labels=ref_inputs["input_ids"])
    assert rel_err(out.logits, expected.logits) <= 1e-5


@pytest.mark.cpu_isa
def test_bundled_model_captions_its_base_domain(bundled: str) -> None:
    """The pretraining worked: held-out base-domain images get their captions; captions equal transformers'."""
    processor = bp.BlipProcessor.from_pretrained(bundled)
    model = bp.BlipForConditionalGeneration.from_pretrained(bundled, dtype="float32")
    items = world.make_dataset(16, seed=12345, domain="base", size=processor.image_processor.size["height"])
    captions = bp.generate(model, processor, [d["image"] for d in items], max_new_tokens=32)
    assert metrics.bleu4(captions, [d["text"] for d in items]) > 0.35
    ref = HFBlip.from_pretrained(bundled, dtype=torch.float32).eval()
    ref_processor = HFProcessor.from_pretrained(bundled)
    pixel_values = ref_processor(images=[d["image"] for d in items], return_tensors="pt")["pixel_values"]
    expected = ref_processor.batch_decode(
        ref.generate(pixel_values=pixel_values, max_new_tokens=32), skip_special_tokens=True
    )
    assert captions == expected


@pytest.mark.cpu_isa
def test_short_demo_improves_the_target_domain(tmp_path) -> None:
    summary = bp.demo.run(output_dir=str(tmp_path), quick=True)
    assert summary["after"]["Bleu_4"] > summary["before"]["Bleu_4"] + 0.05
    assert summary["after"]["CIDEr"] > summary["before"]["CIDEr"] + 0.2
    assert summary["after"]["exact_match"] >= summary["before"]["exact_match"]
    # the best validation CIDEr picked the adapter kept
    cider = summary["validation_cider"]
    assert summary["best_step"] == int(max(cider, key=lambda s: (cider[s], -int(s))))
    assert summary["reloaded_matches"]
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
    assert os.path.getsize(tmp_path / "loss.png") > 0
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["train_steps"] == summary["train_steps"]


def _cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blip_peft", *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )


def test_cli_train_caption_merge(tmp_path, bundled: str) -> None:
    size = bp.BlipProcessor.from_pretrained(bundled).image_processor.size["height"]
    data = world.write_imagefolder(tmp_path / "data", n=16, seed=3, domain="target", size=size)
    trained = _cli(
        "train",
        "--model",
        bundled,
        "--data",
        data,
        "--output-dir",
        str(tmp_path / "adapter"),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--mixed-precision",
        "no",
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert os.path.isfile(tmp_path / "adapter" / "adapter_config.json")
    captioned = _cli(
        "caption",
        "--model",
        bundled,
        "--adapter",
        str(tmp_path / "adapter"),
        data,
        "--output",
        str(tmp_path / "captions.jsonl"),
        "--max-new-tokens",
        "8",
    )
    assert captioned.returncode == 0, captioned.stderr[-2000:]
    with open(tmp_path / "captions.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 16 and all(isinstance(r["text"], str) for r in rows)
    merged = _cli(
        "merge", "--model", bundled, "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")
    )
    assert merged.returncode == 0, merged.stderr[-2000:]
    ref, info = HFBlip.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    printed = _cli(
        "caption", "--model", str(tmp_path / "merged"), os.path.join(data, "00000.png"), "--max-new-tokens", "8"
    )
    assert printed.returncode == 0 and "00000.png\t" in printed.stdout


def test_cli_train_with_the_recipe_keeps_the_best_evaluation(tmp_path, bundled: str) -> None:
    """The recipe's flags reach bp.train: prompt, label smoothing, augmentation, CIDEr at eval steps and the
    best evaluation's adapter kept (its step and value printed, as trainer_state.json records them)."""
    size = bp.BlipProcessor.from_pretrained(bundled).image_processor.size["height"]
    data = world.write_imagefolder(tmp_path / "data", n=8, seed=3, domain="target", size=size)
    held_out = world.write_imagefolder(tmp_path / "eval", n=4, seed=9, domain="target", size=size)
    out = tmp_path / "adapter"
    trained = _cli(
        "train", "--model", bundled, "--data", data, "--output-dir", str(out), "--epochs", "1", "--batch-size", "4",
        "--mixed-precision", "no", "--prompt", "a picture of ", "--label-smoothing", "0.1", "--augment", "blip",
        "--eval-data", held_out, "--eval-steps", "1", "--metric-for-best-model", "CIDEr",
        "--load-best-model-at-end", "--save-steps", "1",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "best CIDEr" in trained.stdout, trained.stdout
    with open(out / "caption_config.json") as f:
        assert json.load(f)["prompt"] == "a picture of "
    states = sorted(out.glob("checkpoint-*/trainer_state.json"))
    assert states, list(out.iterdir())
    with open(states[-1]) as f:
        state = json.load(f)
    best = state["best_global_step"]
    assert f"at step {best}" in trained.stdout
    assert f"{state['best_metric']:.4f}" in trained.stdout


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["train"],
        ["train", "--model", "x", "--data", "/nonexistent", "--output-dir", "o"],
        ["caption", "--model", "x"],
        ["caption", "img.png", "--model", "x", "--num-beams", "0"],
        ["vqa", "--image", "img.png", "--question", "what?", "--num-beams", "0"],
        ["rank", "--texts", "a circle"],
        ["rank", "--images", "img.png"],
        ["rank", "--images", "img.png", "--texts", "a", "--top-k", "0"],
        ["demo", "--task", "segmentation"],
        ["frobnicate"],
    ],
)
def test_cli_bad_arguments_exit_2_with_usage(args: list[str]) -> None:
    result = _cli(*args)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_cli_missing_model_says_where_it_looked(tmp_path) -> None:
    img = tmp_path / "a.png"
    world.make_dataset(1, seed=0, domain="base", size=64)[0]["image"].save(img)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "cache"))
    result = subprocess.run(
        [sys.executable, "-m", "blip_peft", "caption", "--model", "Salesforce/blip-nope", str(img)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 1
    assert "not found" in result.stderr and "models--Salesforce--blip-nope" in result.stderr


def test_cli_finds_a_model_in_the_hf_cache(tmp_path, bundled: str) -> None:
    snapshot = tmp_path / "cache" / "models--someone--tiny-blip" / "snapshots" / "abc123"
    snapshot.parent.mkdir(parents=True)
    os.symlink(bundled, snapshot)
    (tmp_path / "cache" / "models--someone--tiny-blip" / "refs").mkdir()
    (tmp_path / "cache" / "models--someone--tiny-blip" / "refs" / "main").write_text("abc123")
    from blip_peft.cli import resolve_model

    os.environ["HF_HUB_CACHE"] = str(tmp_path / "cache")
    try:
        assert resolve_model("someone/tiny-blip") == str(snapshot)
    finally:
        del os.environ["HF_HUB_CACHE"]


def test_tutorial_example_runs_and_lowers_the_loss(tmp_path) -> None:
    env = dict(os.environ, BLIP_TUTORIAL_EPOCHS="8", BLIP_TUTORIAL_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "finetune_tutorial.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    first_loss, last_loss = (float(w.rstrip(",")) for w in last.split() if w.replace(".", "").rstrip(",").isdigit())
    assert last_loss < first_loss
    assert os.path.isfile(tmp_path / "training" / "caption" / "adapter_model.safetensors")


def test_notebook_runs_headless(tmp_path) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(ROOT, "examples", "demo.ipynb"), as_version=4)
    os.environ["BLIP_DEMO_QUICK"] = "1"
    try:
        NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        del os.environ["BLIP_DEMO_QUICK"]
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
    assert any("reloaded adapter gives the same captions" in o.get("text", "") for o in outputs)


def _world_images(folder, n: int, seed: int, domain: str = "base") -> tuple[list[str], list]:
    """`n` world scenes written as PNG files at the bundled models' size: their paths and the dataset items."""
    size = bp.BlipProcessor.from_pretrained(bp.bundled_model_path("vqa")).image_processor.size["height"]
    items = world.make_dataset(n, seed=seed, domain=domain, size=size)
    paths = []
    for i, item in enumerate(items):
        path = os.path.join(folder, f"{i:03d}.png")
        item["image"].save(path)
        paths.append(path)
    return paths, items


def test_cli_vqa_answers_as_the_python_api(tmp_path) -> None:
    paths, items = _world_images(tmp_path, 3, seed=41)
    qa = world.scene_questions(items[0]["scene"])[:3]
    model_path = bp.bundled_model_path("vqa")
    model = bp.BlipForQuestionAnswering.from_pretrained(model_path)
    processor = bp.BlipProcessor.from_pretrained(model_path)
    # pairs: one question per image (the bundled VQA model is the default --model)
    questions = [qa[0][0], qa[1][0], qa[2][0]]
    args = [a for p, q in zip(paths, questions, strict=True) for a in ("--image", p, "--question", q)]
    result = _cli("vqa", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = bp.answer(model, processor, paths, questions)
    assert result.stdout.splitlines() == [f"{p}\t{q}\t{a}" for p, q, a in zip(paths, questions, expected, strict=True)]
    # one question for every image, JSON lines, the model named
    result = _cli("vqa", "--model", model_path, "--image", str(tmp_path), "--question", questions[0], "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in rows] == paths
    assert [r["answer"] for r in rows] == bp.answer(model, processor, paths, questions[0])


def test_cli_vqa_with_an_adapter_answers_as_the_peft_model(tmp_path) -> None:
    model_path = bp.bundled_model_path("vqa")
    base = bp.BlipForQuestionAnswering.from_pretrained(model_path)
    peft_model = bp.get_peft_model(base, bp.LoraConfig(r=4, lora_alpha=8, target_modules=["self.query", "self.value"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    peft_model.save_pretrained(tmp_path / "adapter")
    paths, items = _world_images(tmp_path, 2, seed=42)
    question = "how many objects are there?"
    result = _cli("vqa", "--adapter", str(tmp_path / "adapter"), "--image", paths[0], "--image", paths[1],
                  "--question", question, "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    processor = bp.BlipProcessor.from_pretrained(model_path)
    expected = bp.answer(peft_model, processor, paths, question)
    assert [json.loads(line)["answer"] for line in result.stdout.splitlines()] == expected


def test_cli_rank_ranks_as_the_python_api(tmp_path) -> None:
    paths, items = _world_images(tmp_path, 4, seed=43)
    texts = [item["text"] for item in items] + [world.distractor_caption(items[0]["scene"], 0)]
    model_path = bp.bundled_model_path("retrieval")
    model = bp.BlipForImageTextRetrieval.from_pretrained(model_path)
    processor = bp.BlipProcessor.from_pretrained(model_path)
    for itm in (False, True):
        flags = ["--itm"] if itm else []
        result = _cli("rank", "--images", *paths, "--texts", *texts, "--top-k", "3", "--json", *flags)
        assert result.returncode == 0, result.stderr[-2000:]
        got = json.loads(result.stdout)
        expected = bp.rank(model, processor, paths, texts, top_k=3, rerank_itm=itm)
        assert [[m["index"] for m in row] for row in got["image_to_text"]] == expected.image_to_text.tolist()
        assert [[m["index"] for m in row] for row in got["text_to_image"]] == expected.text_to_image.tolist()
        scores = torch.tensor([[m["score"] for m in row] for row in got["image_to_text"]])
        assert torch.allclose(scores, expected.image_to_text_scores, atol=1e-5)
        assert got["image_to_text"][0][0]["text"] == texts[got["image_to_text"][0][0]["index"]]
    printed = _cli("rank", "--images", str(tmp_path), "--texts", *texts[:2], "--top-k", "2")
    assert printed.returncode == 0, printed.stderr[-2000:]
    lines = printed.stdout.splitlines()
    assert lines[0] == "image -> texts (top 2, by cosine similarity):" and lines[1] == paths[0]
    assert "text -> images (top 2, by cosine similarity):" in lines


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vqa", "--image", "{missing}", "--question", "is there a star?"], "no such image file"),
        (["vqa", "--image", "{image}"], "no question given"),
        (["vqa", "--question", "is there a star?"], "no image given"),
        (["vqa", "--image", "{image}", "--question", " "], "--question is empty"),
        (
            [
                "vqa",
                "--image",
                "{image}",
                "--image",
                "{image}",
                "--question",
                "a?",
                "--question",
                "b?",
                "--question",
                "c?",
            ],
            "2 images and 3 questions",
        ),  # fmt: skip
        (["vqa", "--model", "{tmp}/nope", "--image", "{image}", "--question", "a?"], "not found"),
        (["rank", "--images", "{missing}", "--texts", "a star"], "no such image file"),
        (["rank", "--images", "{image}", "--texts", ""], "empty text"),
        (["rank", "--images", "{tmp}/empty", "--texts", "a star"], "no images given"),
    ],
)
def test_cli_vqa_and_rank_bad_input_exit_1_with_the_reason(tmp_path, args: list[str], message: str) -> None:
    paths, _ = _world_images(tmp_path, 1, seed=44)
    (tmp_path / "empty").mkdir()
    subs = {"{missing}": str(tmp_path / "missing.png"), "{image}": paths[0], "{tmp}": str(tmp_path)}
    filled = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        filled.append(a)
    result = _cli(*filled)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
