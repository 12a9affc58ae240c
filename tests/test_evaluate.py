"""bp.evaluate and `blip-peft eval`: the captions bp.generate gives, scored by bp.metrics.caption_scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import blip_peft as bp
from blip_peft import metrics, world
from blip_peft.evaluation import group_references


@pytest.fixture(scope="module")
def bundled() -> tuple[bp.BlipForConditionalGeneration, bp.BlipProcessor, int]:
    path = bp.bundled_model_path()
    processor = bp.BlipProcessor.from_pretrained(path)
    model = bp.BlipForConditionalGeneration.from_pretrained(path, dtype="float32")
    return model, processor, processor.image_processor.size["height"]


def test_evaluate_equals_caption_scores_of_generate(bundled, tmp_path) -> None:
    model, processor, size = bundled
    items = world.make_dataset(5, seed=21, domain="base", size=size)
    paths = []
    for i, item in enumerate(items):
        paths.append(str(tmp_path / f"{i}.png"))
        item["image"].save(paths[-1])
    # image 0 and image 3 have a second reference (another row with the same path, spelled differently)
    rows = [{"image": p, "text": d["text"]} for p, d in zip(paths, items, strict=True)]
    rows.insert(2, {"image": os.path.join(str(tmp_path), ".", "0.png"), "text": items[1]["text"]})
    rows.append({"image": paths[3], "text": "a picture of something else"})
    refs = [[d["text"]] for d in items]
    refs[0].append(items[1]["text"])
    refs[3].append("a picture of something else")

    model.train()  # evaluate captions in eval mode and puts the mode back
    result = bp.evaluate(model, processor, rows, batch_size=2, return_captions=True)
    assert model.training
    model.eval()
    captions = bp.generate(model, processor, paths, num_beams=3, min_new_tokens=5, max_new_tokens=20, batch_size=4)
    assert result["captions"] == captions
    assert result["references"] == refs
    expected = metrics.caption_scores(refs, captions)
    assert {k: result[k] for k in expected} == expected
    assert list(expected) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    assert expected["Bleu_1"] > 0.3  # the bundled model captions its base domain

    # the same references as one row per image with a list of captions, in an ImageCaptionDataset
    listed = bp.ImageCaptionDataset([{"image": p, "text": r} for p, r in zip(paths, refs, strict=True)])
    assert bp.evaluate(model, processor, listed, batch_size=3) == expected
    # other decoding settings go to generate; tokenize=False scores the captions as given
    greedy = bp.evaluate(model, processor, listed, num_beams=1, max_new_tokens=8, tokenize=False, return_captions=True)
    assert greedy["captions"] == bp.generate(model, processor, paths, num_beams=1, min_new_tokens=5, max_new_tokens=8)
    assert greedy["CIDEr"] == metrics.caption_scores(refs, greedy["captions"], tokenize=False)["CIDEr"]


def test_evaluate_datasets_dataset_and_pil_objects(bundled) -> None:
    datasets = pytest.importorskip("datasets")
    model, processor, size = bundled
    items = world.make_dataset(3, seed=5, domain="base", size=size)
    # one PIL object in two rows is one image
    rows = [{"image": d["image"], "text": d["text"]} for d in items] + [{"image": items[0]["image"], "text": "x y"}]
    images, refs = group_references(rows)
    assert len(images) == 3 and refs[0] == [items[0]["text"], "x y"]
    ds = datasets.Dataset.from_list([{"image": d["image"], "text": [d["text"]]} for d in items])
    ours = bp.evaluate(model, processor, ds, max_new_tokens=10, return_captions=True)
    assert ours["captions"] == bp.generate(
        model, processor, [d["image"] for d in items], num_beams=3, min_new_tokens=5, max_new_tokens=10
    )


def test_evaluate_bad_datasets(bundled) -> None:
    model, processor, _ = bundled
    with pytest.raises(ValueError, match="empty"):
        bp.evaluate(model, processor, [])
    with pytest.raises(TypeError, match="must be a caption"):
        bp.evaluate(model, processor, [{"image": "a.png", "text": 3}])
    with pytest.raises(TypeError, match="not a mapping of tensors"):
        bp.evaluate(model, processor, {"pixel_values": None, "input_ids": None})


def test_cli_eval(tmp_path) -> None:
    path = bp.bundled_model_path()
    size = bp.BlipProcessor.from_pretrained(path).image_processor.size["height"]
    data = world.write_imagefolder(tmp_path / "data", n=4, seed=8, domain="base", size=size)
    run = subprocess.run(
        [sys.executable, "-m", "blip_peft", "eval", "--model", path, "--data", data, "--batch-size", "2", "--json",
         "--max-new-tokens", "12", "--output", str(tmp_path / "out.jsonl")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    printed = json.loads(run.stdout)
    with open(tmp_path / "out.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 4
    expected = metrics.caption_scores([r["references"] for r in rows], [r["caption"] for r in rows])
    assert printed == pytest.approx(expected, abs=1e-12)
    plain = subprocess.run(
        [sys.executable, "-m", "blip_peft", "eval", "--model", path, "--data", data, "--max-new-tokens", "12"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert [line.split()[0] for line in plain.stdout.splitlines()] == list(expected)
    bad = subprocess.run(
        [sys.executable, "-m", "blip_peft", "eval", "--model", path, "--data", data, "--min-new-tokens", "-1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "usage:" in bad.stderr
