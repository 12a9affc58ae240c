"""Data-parallel training under torchrun (2 processes, gloo on this CPU machine)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import rel_err
from safetensors.torch import load_file

import blip_peft as bp

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")

SCRIPT = textwrap.dedent("""
    import os, sys, torch, blip_peft as bp
    checkpoint, out, batch, steps, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    g = torch.Generator().manual_seed(0)
    n = 16
    data = {"pixel_values": torch.randn(n, 3, 32, 32, generator=g),
            "input_ids": torch.randint(4, 90, (n, 6), generator=g)}  # equal lengths: per-rank means average exactly
    if mode == "fail" and bp.distributed.is_distributed() and int(os.environ["RANK"]) == 1:
        bp.distributed.init_process_group(timeout_seconds=20)
        raise RuntimeError("rank 1 fails on purpose")
    if mode == "mismatch" and int(os.environ.get("RANK", "0")) == 1:
        data = {k: v[:12] for k, v in data.items()}
    model = bp.BlipForConditionalGeneration.from_pretrained(checkpoint)
    torch.manual_seed(0)
    model = bp.get_peft_model(model, bp.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "qkv"],
                                                   init_lora_weights=False))
    resume = mode == "resume"
    stop_at_two = (lambda log: log.get("step") == 2) if mode == "stop" else None  # called on rank 0 only
    result = bp.train(model, None, data, max_steps=steps, batch_size=batch, learning_rate=1e-2, seed=5,
                      mixed_precision="no", output_dir=out, save_steps=2, progress=False, logging_steps=1,
                      resume_from_checkpoint=True if resume else None, callback=stop_at_two)
    print("losses", result.losses, flush=True)
""")


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def script(tmp_path) -> str:
    path = tmp_path / "ddp_train.py"
    path.write_text(SCRIPT)
    return str(path)


def _torchrun(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return _run(
        [
            TORCHRUN,
            "--nproc_per_node=2",
            "--master_port=0",
            "--rdzv_backend=c10d",
            "--rdzv_endpoint=localhost:0",
            script,
            *args,
        ],
        timeout,
    )


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun comes with torch")
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, tiny_checkpoint: str, script: str) -> None:
    single = _run([sys.executable, script, tiny_checkpoint, str(tmp_path / "single"), "4", "4", "plain"])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _torchrun(script, tiny_checkpoint, str(tmp_path / "ddp"), "2", "4", "plain")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = load_file(tmp_path / "single" / "adapter_model.safetensors")
    two = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        assert rel_err(two[key], one[key]) <= 1e-5, key
    # Checkpoints are written once (by rank 0), not per process.
    assert sorted(d for d in os.listdir(tmp_path / "ddp") if d.startswith("checkpoint-")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    losses_single = eval(single.stdout.split("losses", 1)[1].strip().splitlines()[0])
    losses_ddp = eval(ddp.stdout.split("losses", 1)[1].strip().splitlines()[0])
    assert max(abs(a - b) / abs(b) for a, b in zip(losses_ddp, losses_single, strict=True)) <= 1e-5


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun comes with torch")
def test_two_process_run_resumes(tmp_path, tiny_checkpoint: str, script: str) -> None:
    out = str(tmp_path / "ddp")
    first = _torchrun(script, tiny_checkpoint, out, "2", "4", "stop")  # rank 0 stops both at step 2
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2"]
    resumed = _torchrun(script, tiny_checkpoint, out, "2", "4", "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = _torchrun(script, tiny_checkpoint, str(tmp_path / "full"), "2", "4", "plain")
    assert full.returncode == 0, full.stderr[-3000:]
    a = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    b = load_file(tmp_path / "full" / "adapter_model.safetensors")
    for key in a:
        assert rel_err(a[key], b[key]) <= 1e-5, key


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun comes with torch")
def test_a_failing_rank_stops_the_others(tmp_path, tiny_checkpoint: str, script: str) -> None:
    result = _torchrun(script, tiny_checkpoint, str(tmp_path / "fail"), "2", "4", "fail", timeout=180)
    assert result.returncode != 0
    assert "rank 1 fails on purpose" in result.stderr


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun comes with torch")
def test_ranks_with_different_data_are_refused(tmp_path, tiny_checkpoint: str, script: str) -> None:
    result = _torchrun(script, tiny_checkpoint, str(tmp_path / "mismatch"), "2", "4", "mismatch", timeout=180)
    assert result.returncode != 0
    assert "disagree on the dataset size" in result.stderr


def test_all_reduce_gradients_is_a_no_op_alone(tiny_checkpoint: str) -> None:
    model = bp.get_peft_model(
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), bp.LoraConfig(r=4, target_modules=["query"])
    )
    px = torch.randn(1, 3, 32, 32)
    model(pixel_values=px, input_ids=torch.tensor([[97, 5, 6]]), labels=torch.tensor([[97, 5, 6]])).loss.backward()
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    bp.distributed.all_reduce_gradients(model)
    after = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
