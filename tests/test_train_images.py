"""`blip_peft.train` on images and captions: every dataset kind, streaming preprocessing, bad samples."""

from __future__ import annotations

import csv
import json
import os

import datasets
import pytest

import blip_peft as bp
from blip_peft import world


@pytest.fixture(scope="module")
def setup():
    path = bp.bundled_model_path()
    processor = bp.BlipProcessor.from_pretrained(path)
    size = processor.image_processor.size["height"]
    return path, processor, world.make_dataset(8, seed=21, domain="target", size=size)


def _model(path: str) -> bp.PeftModel:
    base = bp.BlipForConditionalGeneration.from_pretrained(path, dtype="float32")
    return bp.get_peft_model(base, bp.LoraConfig(r=4, target_modules=["self.query", "self_attn.qkv"]))


def test_every_dataset_kind_trains(tmp_path, setup) -> None:
    path, processor, items = setup
    folder = tmp_path / "folder"
    world.write_imagefolder(folder, n=8, seed=21, domain="target", size=processor.image_processor.size["height"])
    with open(folder / "metadata.jsonl") as f:
        rows = [json.loads(line) for line in f]
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows({"file_name": r["file_name"], "text": r["text"]} for r in rows)
    kinds = {
        "list of dicts": [{"image": d["image"], "text": d["text"]} for d in items],
        "datasets.Dataset": datasets.Dataset.from_list([{"image": d["image"], "text": d["text"]} for d in items]),
        "folder": bp.ImageCaptionDataset.from_folder(folder),
        "jsonl": bp.ImageCaptionDataset.from_jsonl(folder / "metadata.jsonl"),
        "csv": bp.ImageCaptionDataset.from_csv(folder / "metadata.csv"),
        "bytes": [{"image": open(folder / r["file_name"], "rb").read(), "text": r["text"]} for r in rows],
    }
    for name, dataset in kinds.items():
        result = bp.train(
            _model(path), processor, dataset, max_steps=2, batch_size=4, progress=False, logging_steps=1, num_workers=1
        )
        assert result.global_step == 2 and all(h["loss"] > 0 for h in result.history), name


def test_custom_column_names(setup) -> None:
    path, processor, items = setup
    dataset = datasets.Dataset.from_list([{"img": d["image"], "caption": d["text"]} for d in items])
    result = bp.train(
        _model(path),
        processor,
        dataset,
        max_steps=1,
        batch_size=4,
        progress=False,
        image_column="img",
        text_column="caption",
    )
    assert result.global_step == 1


def test_bad_samples(setup) -> None:
    path, processor, items = setup
    good = [{"image": d["image"], "text": d["text"]} for d in items]
    with pytest.raises(ValueError, match="no 'text' column"):
        bp.train(
            _model(path), processor, datasets.Dataset.from_list([{"image": d["image"]} for d in items]), progress=False
        )
    with pytest.raises(TypeError, match="item 2: the caption must be a string"):
        bp.train(_model(path), processor, good[:2] + [{"image": items[2]["image"], "text": 5}], progress=False)
    broken = good[:3] + [{"image": b"not an image at all", "text": "a red circle"}] + good[3:]
    with pytest.raises(ValueError, match="image 3"):
        bp.train(_model(path), processor, broken, max_steps=2, batch_size=4, shuffle=False, progress=False)
    result = bp.train(
        _model(path), processor, broken, epochs=1, batch_size=4, shuffle=False, progress=False, on_bad_sample="skip"
    )
    assert result.skipped_samples == [3]
    with pytest.raises(ValueError, match="empty"):
        bp.train(_model(path), processor, [], progress=False)
    with pytest.raises(ValueError, match="num_workers"):
        bp.train(_model(path), processor, good, num_workers=0, progress=False)
    with pytest.raises(FileNotFoundError):
        bp.train(_model(path), processor, [{"image": "/nonexistent.png", "text": "x"}], max_steps=1, progress=False)
    assert os.path.isdir(path)
