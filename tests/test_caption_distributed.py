"""`blip-peft caption` under torchrun (2 processes, gloo on this CPU machine): each rank captions its contiguous
shard of the images, rank 0 writes one output file in the order given, equal line by line to one process's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import blip_peft as bp
from blip_peft.cli import _shard

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
TOKENS = 8


def test_shards_cover_the_images_in_order() -> None:
    for n in range(0, 12):
        for world in range(1, 5):
            blocks = [_shard(n, r, world) for r in range(world)]
            assert [i for a, b in blocks for i in range(a, b)] == list(range(n))
            assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 1


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """A folder of 11 images (an odd count: the shards differ in size) and a non-image file that is skipped."""
    root = tmp_path_factory.mktemp("caption_folder")
    rng = np.random.default_rng(3)
    for i in range(11):
        h, w = rng.integers(40, 160, 2)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    (root / "notes.txt").write_text("not an image")
    return str(root)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> str:
    model = bp.get_peft_model(
        bp.BlipForConditionalGeneration.from_pretrained(bp.bundled_model_path()),
        bp.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "self_attn.qkv"]),
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = str(tmp_path_factory.mktemp("caption_adapter") / "a")
    model.save_pretrained(path)
    return path


def _caption_args(folder: str, adapter: str, output: str) -> list[str]:
    return [
        "caption",
        folder,
        "--model",
        bp.bundled_model_path(),
        "--adapter",
        adapter,
        "--max-new-tokens",
        str(TOKENS),
        "--num-beams",
        "2",
        "--batch-size",
        "3",
        "--output",
        output,
    ]


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun comes with torch")
def test_two_ranks_write_the_one_process_file(tmp_path, folder: str, adapter: str) -> None:
    single = str(tmp_path / "single.jsonl")
    one = _run([sys.executable, "-m", "blip_peft", *_caption_args(folder, adapter, single)])
    assert one.returncode == 0, one.stderr
    ddp = str(tmp_path / "ddp.jsonl")
    two = _run([str(TORCHRUN), "--nproc_per_node", "2", "-m", "blip_peft", *_caption_args(folder, adapter, ddp)])
    assert two.returncode == 0, two.stderr[-4000:]
    with open(single) as f:
        expected = f.read().splitlines()
    with open(ddp) as f:
        got = f.read().splitlines()
    assert len(expected) == 11
    assert [json.loads(line)["file_name"] for line in expected] == [
        os.path.join(folder, f"img{i:02d}.png") for i in range(11)
    ]
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert a == b, f"line {i}: {a} != {b}"
    assert len({json.loads(line)["text"] for line in got}) > 1
    # Only rank 0 wrote: no leftover temporaries next to the output.
    assert sorted(os.listdir(tmp_path)) == ["ddp.jsonl", "single.jsonl"]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun comes with torch")
def test_a_bad_image_on_one_rank_fails_every_rank_with_its_name(tmp_path, folder: str, adapter: str) -> None:
    images = tmp_path / "images"
    shutil.copytree(folder, images)
    (images / "img10.png").write_bytes(b"not a png")  # the last image: rank 1's shard
    out = str(tmp_path / "out.jsonl")
    run = _run([str(TORCHRUN), "--nproc_per_node", "2", "-m", "blip_peft", *_caption_args(str(images), adapter, out)])
    assert run.returncode != 0
    assert "captioning failed on rank 1 (images 5..10)" in run.stderr, run.stderr[-4000:]
    assert not os.path.exists(out)
