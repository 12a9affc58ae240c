"""`blip_peft.train` against transformers + peft + torch.optim.AdamW, learning, checkpoints and resume."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import textwrap
import time

import peft
import pytest
import torch
from conftest import make_hf_model, rel_err, tiny_hf_config
from transformers import BlipForConditionalGeneration as HFBlip

import blip_peft as bp

# Losses against peft's and mixed precision rest on the CPU's kernels: `make test` runs these twice.
pytestmark = pytest.mark.cpu_isa

LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value", "qkv", "fc1", "patch_embedding"])


def _data(n: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Encoded samples of different caption lengths ([SEP]=3 ends each caption, padding after it)."""
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(n, 3, 32, 32, generator=g)
    ids = torch.randint(4, 90, (n, 8), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        length = 4 + i % 5
        ids[i, length - 1] = 3
        ids[i, length:] = 0
        mask[i, length:] = 0
    return {"pixel_values": px, "input_ids": ids, "attention_mask": mask}


def _peft_pair(checkpoint: str, tmp_path, **lora):
    """Our PeftModel and peft's, starting from the same (non-zero) adapter."""
    ours = bp.get_peft_model(bp.BlipForConditionalGeneration.from_pretrained(checkpoint), bp.LoraConfig(**lora))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ours.save_pretrained(tmp_path / "start")
    ref = peft.PeftModel.from_pretrained(HFBlip.from_pretrained(checkpoint), tmp_path / "start", is_trainable=True)
    return ours, ref


def _reference_run(ref, data, steps, batch, lr, wd, accum=1, bos=97, autocast=None):
    """The transformers + peft recipe done right: BOS first, pads -100, AdamW, clipping, linear decay; the
    forward under `torch.autocast("cpu", autocast)` when given."""
    ref.train()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (steps - s) / steps))
    ids = data["input_ids"].clone()
    ids[:, 0] = bos
    mask = data["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    n = ids.shape[0]
    micro_per_epoch = -(-n // batch)
    losses = []
    micro = 0
    for _ in range(steps):
        total = 0.0
        group = min(accum, micro_per_epoch - (micro % micro_per_epoch))
        for _ in range(group):
            s = (micro % micro_per_epoch) * batch
            sl = slice(s, s + batch)
            with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
                out = ref(
                    pixel_values=data["pixel_values"][sl],
                    input_ids=ids[sl],
                    attention_mask=mask[sl],
                    labels=labels[sl],
                )
            (out.loss / group).backward()
            total += out.loss.item() / group
            micro += 1
        losses.append(total)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    return losses


def _train_as_reference(ours, data, steps: int, **kw):
    """`bp.train` with `_reference_run`'s recipe (batch 4, lr 1e-2, weight decay 0.01, data in order)."""
    kw = dict(batch_size=4, learning_rate=1e-2, weight_decay=0.01, shuffle=False, mixed_precision="no") | kw
    return bp.train(ours, None, data, max_steps=steps, logging_steps=3, progress=False, **kw)


def _assert_run_equals_reference(result, ours, ref, expected) -> None:
    """Our losses and adapter against the reference run's within float32 rounding."""
    for got, want in zip(result.losses, expected, strict=True):
        assert abs(got - want) <= 1e-4 * abs(want)
    mine = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        if "lora_" in name:
            assert rel_err(mine[name], p) <= 1e-4, name


@pytest.mark.parametrize(("accum", "checkpointing"), [(1, False), (2, False), (2, True)])
def test_losses_and_adapter_equal_peft_and_adamw(tmp_path, tiny_checkpoint: str, accum: int, checkpointing) -> None:
    ours, ref = _peft_pair(tiny_checkpoint, tmp_path, **LORA)
    data = _data()
    steps = 10
    result = _train_as_reference(
        ours, data, steps, gradient_accumulation_steps=accum, gradient_checkpointing=checkpointing
    )
    expected = _reference_run(ref, data, steps, 4, 1e-2, 0.01, accum=accum)
    assert [h["step"] for h in result.history] == list(range(1, steps + 1))
    _assert_run_equals_reference(result, ours, ref, expected)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_loss_over_masked_positions_equals_transformers(tmp_path, tiny_checkpoint: str, checkpointing) -> None:
    """Labels -100 inside the captions (a prompt's positions) and over their padding: `train`'s loss, whose LM
    head runs over the scored positions alone, equals transformers + peft's, computed over every position."""
    ours, ref = _peft_pair(tiny_checkpoint, tmp_path, **LORA)
    data = _data(4)
    ids = data["input_ids"].clone()
    ids[:, 0] = 97
    labels = ids.masked_fill(data["attention_mask"] == 0, -100)
    labels[:, 1:3] = -100
    labels[0, 5] = -100
    batch = dict(data, input_ids=ids, labels=labels)
    result = _train_as_reference(ours, batch, 1, gradient_checkpointing=checkpointing)
    with torch.no_grad():
        want = ref.eval()(**batch).loss.item()
    assert abs(result.losses[0] - want) <= 1e-5 * abs(want)


@pytest.mark.parametrize("feature_cache", [True, False], ids=["cached", "uncached"])
def test_text_only_lora_over_the_frozen_tower_equals_peft(tmp_path, tiny_checkpoint: str, feature_cache) -> None:
    """LoRA on the decoder only: the trainer computes the frozen tower's features (and the cross-attention's
    base key/value projections, which the adapters then add into) apart from the decoder's forward."""
    ours, ref = _peft_pair(tiny_checkpoint, tmp_path, r=4, lora_alpha=8, target_modules=["query", "value"])
    data = _data()
    steps = 6
    result = _train_as_reference(ours, data, steps, feature_cache=feature_cache)
    assert result.feature_cache["enabled"] is feature_cache
    assert result.feature_cache["cross_projections"] is feature_cache
    _assert_run_equals_reference(result, ours, ref, _reference_run(ref, data, steps, 4, 1e-2, 0.01))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_full_fine_tuning_equals_adamw(tiny_checkpoint: str, checkpointing: bool) -> None:
    ours = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    ref = HFBlip.from_pretrained(tiny_checkpoint)
    data = _data(8, seed=1)
    result = bp.train(
        ours,
        None,
        data,
        max_steps=4,
        batch_size=4,
        learning_rate=1e-3,
        shuffle=False,
        mixed_precision="no",
        logging_steps=1,
        progress=False,
        gradient_checkpointing=checkpointing,
    )
    expected = _reference_run(ref, data, 4, 4, 1e-3, 0.0)
    assert max(abs(a - b) / abs(b) for a, b in zip(result.losses, expected, strict=True)) <= 1e-4
    assert (
        rel_err(
            dict(ours.named_parameters())["vision_model.post_layernorm.weight"], ref.vision_model.post_layernorm.weight
        )
        <= 1e-4
    )


def test_training_learns_and_generate_reproduces_captions(tiny_checkpoint: str) -> None:
    """Four flat-colour images with four captions: the loss falls and greedy decoding returns the captions."""
    model = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])
    px = colours[:, :, None, None].expand(4, 3, 32, 32).contiguous()
    captions = torch.tensor([[97, 10, 11, 12, 3], [97, 20, 21, 3, 0], [97, 30, 31, 32, 3], [97, 40, 3, 0, 0]])
    mask = (captions != 0).long()
    result = bp.train(
        model,
        None,
        {"pixel_values": px, "input_ids": captions, "attention_mask": mask},
        epochs=100,
        batch_size=4,
        learning_rate=1e-2,
        mixed_precision="no",
        progress=False,
        logging_steps=20,
    )
    assert result.losses[-1] < 0.1 * result.losses[0]
    out = model.generate(pixel_values=px, max_new_tokens=6)
    for row, caption, m in zip(out, captions, mask, strict=True):
        n = int(m.sum())
        assert row[:n].tolist() == caption[:n].tolist()


def test_lora_training_lowers_the_loss(tiny_checkpoint: str) -> None:
    model = bp.get_peft_model(
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint),
        bp.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    result = bp.train(model, None, _data(8), epochs=15, batch_size=4, learning_rate=5e-3, progress=False)
    assert result.losses[-1] < result.losses[0] - 0.5


def test_resume_repeats_the_uninterrupted_run(tmp_path, tiny_checkpoint: str) -> None:
    lora = dict(LORA, lora_dropout=0.1)
    data = _data(12)
    kwargs = dict(
        max_steps=6, batch_size=4, learning_rate=5e-3, mixed_precision="no", logging_steps=1, progress=False, seed=3
    )
    base = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    torch.manual_seed(0)
    full = bp.train(bp.get_peft_model(base, bp.LoraConfig(**lora)), None, data, **kwargs)

    def stop_at_three(log):
        return log.get("step") == 3

    torch.manual_seed(0)
    first = bp.get_peft_model(bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), bp.LoraConfig(**lora))
    part = bp.train(first, None, data, output_dir=tmp_path, callback=stop_at_three, **kwargs)
    assert part.interrupted and part.global_step == 3
    assert os.path.isdir(tmp_path / "checkpoint-3")
    torch.manual_seed(1)  # a different fresh adapter: resuming must overwrite it
    second = bp.get_peft_model(bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), bp.LoraConfig(**lora))
    rest = bp.train(second, None, data, output_dir=tmp_path, resume_from_checkpoint=True, **kwargs)
    # The history carries on from the checkpoint's; the resumed steps repeat the uninterrupted run's losses.
    assert [h["step"] for h in rest.history] == [1, 2, 3, 4, 5, 6]
    assert rest.losses[:3] == part.losses
    for got, want in zip(rest.losses[3:], full.losses[3:], strict=True):
        assert abs(got - want) <= 1e-5 * abs(want)


def test_checkpoints_load_in_peft_and_respect_the_limit(tmp_path, tiny_checkpoint: str) -> None:
    model = bp.get_peft_model(bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), bp.LoraConfig(**LORA))
    result = bp.train(
        model,
        None,
        _data(8),
        max_steps=6,
        batch_size=4,
        output_dir=tmp_path,
        save_steps=2,
        save_total_limit=2,
        progress=False,
    )
    names = sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint-"))
    assert names == ["checkpoint-4", "checkpoint-6"]
    assert result.last_checkpoint.endswith("checkpoint-6") and result.adapter_path == str(tmp_path)
    with open(tmp_path / "checkpoint-6" / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == 6
    ref = peft.PeftModel.from_pretrained(HFBlip.from_pretrained(tiny_checkpoint), tmp_path / "checkpoint-6")
    px = _data(2)["pixel_values"]
    ids = torch.tensor([[97, 5, 6], [97, 7, 8]])
    with torch.no_grad():
        assert (
            rel_err(model(pixel_values=px, input_ids=ids).logits, ref(pixel_values=px, input_ids=ids).logits) <= 1e-5
        )
    reloaded = bp.BlipForConditionalGeneration.from_pretrained(tmp_path)  # the final adapter in output_dir
    assert isinstance(reloaded, bp.PeftModel)


def test_killed_while_checkpointing_leaves_loadable_checkpoints(tmp_path, tiny_checkpoint: str) -> None:
    script = textwrap.dedent(f"""
        import torch, blip_peft as bp
        g = torch.Generator().manual_seed(0)
        data = {{"pixel_values": torch.randn(16, 3, 32, 32, generator=g),
                 "input_ids": torch.randint(4, 90, (16, 8), generator=g)}}
        model = bp.get_peft_model(bp.BlipForConditionalGeneration.from_pretrained({tiny_checkpoint!r}),
                                  bp.LoraConfig(r=4, target_modules="all-linear"))
        bp.train(model, None, data, max_steps=100000, batch_size=2, output_dir={str(tmp_path)!r}, save_steps=1,
                 save_total_limit=3, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if len([d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")]) >= 2:
                break
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    complete = [d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")]
    assert complete
    for d in complete:
        with open(tmp_path / d / "trainer_state.json") as f:
            json.load(f)
        bp.PeftModel.from_pretrained(bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), tmp_path / d)


def test_ctrl_c_stops_after_the_step_saves_and_returns(tmp_path, tiny_checkpoint: str) -> None:
    script = textwrap.dedent(f"""
        import torch, blip_peft as bp
        g = torch.Generator().manual_seed(0)
        data = {{"pixel_values": torch.randn(8, 3, 32, 32, generator=g),
                 "input_ids": torch.randint(4, 90, (8, 8), generator=g)}}
        model = bp.get_peft_model(bp.BlipForConditionalGeneration.from_pretrained({tiny_checkpoint!r}),
                                  bp.LoraConfig(r=4, target_modules="all-linear"))
        print("ready", flush=True)
        result = bp.train(model, None, data, max_steps=10**6, batch_size=2, output_dir={str(tmp_path)!r},
                          progress=False, logging_steps=10**5)
        print("returned", result.interrupted, result.global_step, result.last_checkpoint, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0
    _, interrupted, step, checkpoint = out.split()[-4:]
    assert interrupted == "True" and int(step) > 0
    assert checkpoint.endswith(f"checkpoint-{step}") and os.path.isdir(checkpoint)


def test_ctrl_c_stops_training_when_its_interrupt_is_swallowed(monkeypatch, tiny_checkpoint: str) -> None:
    """Python raises Ctrl-C's KeyboardInterrupt in whatever Python code the main thread runs next; raised in a
    finalizer it is printed as "Exception ignored" and dropped (a CI run trained on for 2 minutes after SIGINT).
    Training stops after the step all the same."""
    swallowed: list = []
    monkeypatch.setattr(sys, "unraisablehook", swallowed.append)

    class RaisesCtrlCWhenCollected:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGINT)  # the handler runs here, and its KeyboardInterrupt goes nowhere

    steps: list[int] = []

    def callback(log: dict) -> None:
        steps.append(log["step"])
        if log["step"] == 2:
            RaisesCtrlCWhenCollected()

    model = bp.get_peft_model(bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), bp.LoraConfig(**LORA))
    result = bp.train(
        model, None, _data(8), max_steps=8, batch_size=2, logging_steps=1, progress=False, callback=callback
    )
    assert [type(u.exc_value) for u in swallowed] == [KeyboardInterrupt]
    assert result.interrupted and result.global_step == 2 and steps == [1, 2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_eval_dataset_reports_eval_loss(tiny_checkpoint: str) -> None:
    model = bp.get_peft_model(bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), bp.LoraConfig(**LORA))
    seen = []
    result = bp.train(
        model,
        None,
        _data(8),
        eval_dataset=_data(4, seed=9),
        max_steps=4,
        batch_size=4,
        eval_steps=2,
        progress=False,
        callback=seen.append,
    )
    assert [s for s, _ in result.eval_history] == [2, 4]
    assert any("eval_loss" in e for e in seen) and any("loss" in e for e in seen)
    data = _data(4, seed=9)
    ids = data["input_ids"].clone()
    ids[:, 0] = 97
    labels = ids.masked_fill(data["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(
            pixel_values=data["pixel_values"], input_ids=ids, attention_mask=data["attention_mask"], labels=labels
        ).loss
    assert abs(result.eval_history[-1][1] - loss.item()) <= 1e-5 * loss.item()


def test_bf16_base_trains_and_is_restored(tiny_checkpoint: str) -> None:
    model = bp.get_peft_model(bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), bp.LoraConfig(**LORA))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    result = bp.train(model, None, _data(8), max_steps=3, batch_size=4, mixed_precision="bf16", progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    after = dict(model.named_parameters())
    for name, p in before.items():
        assert after[name].dtype == torch.float32 and torch.equal(after[name], p), name


def test_gradient_checkpointing_with_dropout_equals_the_plain_step(tiny_checkpoint: str) -> None:
    # Every layer runs under a seed derived from the step's, in both modes: the recomputation draws the same
    # dropout masks as its first run, and the same as a plain step does.
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same adapter init
        model = bp.get_peft_model(
            bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), bp.LoraConfig(**LORA, lora_dropout=0.3)
        )
        result = bp.train(
            model,
            None,
            _data(8),
            max_steps=3,
            batch_size=4,
            shuffle=False,
            mixed_precision="no",
            gradient_checkpointing=checkpointing,
            logging_steps=1,
            progress=False,
            learning_rate=1e-2,
        )
        runs.append((result.losses, {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}))
    (plain, plain_weights), (ckpt, ckpt_weights) = runs
    assert max(abs(a - b) / abs(b) for a, b in zip(ckpt, plain, strict=True)) <= 1e-5
    for name, p in plain_weights.items():
        assert rel_err(ckpt_weights[name], p) <= 1e-5, name


@pytest.mark.parametrize("mode", ["modules_to_save", "full"])
def test_mixed_precision_trains_float32_weights_over_a_lowered_base(tiny_checkpoint: str, mode: str) -> None:
    """Trained non-adapter weights (modules_to_save copies, or everything) stay float32 and are cast on the
    way in, as autocast does; the frozen base is lowered for the run and restored exactly after it."""
    base = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    model = base
    if mode == "modules_to_save":
        model = bp.get_peft_model(base, bp.LoraConfig(**LORA, modules_to_save=["post_layernorm", "transform"]))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    if mode == "modules_to_save":
        reference = bp.get_peft_model(
            reference, bp.LoraConfig(**LORA, modules_to_save=["post_layernorm", "transform"])
        )
    common = dict(max_steps=3, batch_size=4, shuffle=False, logging_steps=1, progress=False, learning_rate=1e-3)
    result = bp.train(model, None, _data(8), mixed_precision="bf16", **common)
    full = bp.train(reference, None, _data(8), mixed_precision="no", **common)
    assert abs(result.losses[0] - full.losses[0]) <= 2e-2 * abs(full.losses[0])
    changed = set()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        if not torch.equal(p, before[name]):
            changed.add(name)
    assert changed <= trained  # the frozen base came back exactly
    grown = [n for n in changed if ".modules_to_save." in n or mode == "full"]
    assert len(grown) >= 4, sorted(changed)


def test_bf16_matches_peft_under_autocast_within_bf16_tolerance(tmp_path, tiny_checkpoint: str) -> None:
    """`mixed_precision="bf16"` (frozen base in bf16, float32 adapters and AdamW state) against transformers +
    peft under `torch.autocast("cpu", torch.bfloat16)`, both judged against the float32 run as the truth."""
    steps, common = 4, dict(batch_size=4, learning_rate=1e-2, weight_decay=0.01, shuffle=False)
    data = _data()
    torch.manual_seed(0)  # the same adapter A in both pairs (B is set by _peft_pair)
    truth_model, _ = _peft_pair(tiny_checkpoint, tmp_path / "truth", **LORA)
    truth = bp.train(truth_model, None, data, max_steps=steps, mixed_precision="no", progress=False, logging_steps=1,
                     **common).losses  # fmt: skip
    torch.manual_seed(0)
    ours, ref = _peft_pair(tiny_checkpoint, tmp_path / "bf16", **LORA)
    mine = bp.train(ours, None, data, max_steps=steps, mixed_precision="bf16", progress=False, logging_steps=1,
                    **common).losses  # fmt: skip
    theirs = _reference_run(ref, data, steps, 4, 1e-2, 0.01, autocast=torch.bfloat16)
    print("bf16 losses: ours", mine, "peft+autocast", theirs, "float32", truth)
    for got, want, exact in zip(mine, theirs, truth, strict=True):
        ours_err, theirs_err = abs(got - exact) / exact, abs(want - exact) / exact
        assert ours_err <= 2e-2 and theirs_err <= 2e-2  # bf16's 8 bits: about 0.4% an operation
        assert ours_err <= 2 * theirs_err + 5e-3  # no worse than autocast's own rounding, beyond noise
        assert abs(got - want) / exact <= 3e-2
    # The trained adapters after 4 steps, against the float32 run's. Ours keep the towers' residual stream in bf16
    # (the frozen base computes in bf16 end to end), autocast keeps it in float32 (only matmuls and convolutions
    # run in bf16), so the deepest gradients (the vision tower's first layers) are about 10x further from float32
    # here (measured: patch_embedding's lora_B 1.7e-2 against 1.7e-3): both within bf16's reach.
    adapters = {n: p for n, p in truth_model.named_parameters() if "lora_" in n}
    mine = dict(ours.named_parameters())
    errors = {
        n: (rel_err(mine[n], adapters[n]), rel_err(p, adapters[n])) for n, p in ref.named_parameters() if "lora_" in n
    }
    print("adapter errors against float32 (ours, peft+autocast), worst five:",
          sorted(errors.items(), key=lambda kv: -kv[1][0])[:5])  # fmt: skip
    for name, (mine_err, their_err) in errors.items():
        assert mine_err <= 5e-2 and their_err <= 5e-2, name
    mean_mine, mean_theirs = (sum(e[i] for e in errors.values()) / len(errors) for i in (0, 1))
    print(f"mean adapter error: ours {mean_mine:.4f}, peft+autocast {mean_theirs:.4f}")
    assert mean_mine <= 2 * mean_theirs + 5e-3


def test_cpu_bf16_detection_is_reported() -> None:
    support = bp._blip_peft.cpu_bf16_support()
    assert set(support) == {"avx512_bf16", "amx_bf16", "usable"}
    assert bp.cpu_has_bf16() == support["usable"]
    if support["usable"]:
        assert support["avx512_bf16"] or support["amx_bf16"]
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx512_bf16" in flags or " avx512_bf16\n" in flags:
        assert support["avx512_bf16"]
    if " amx_bf16" in flags:
        assert support["amx_bf16"]


def test_fp16_loss_scaling_skips_overflowing_steps(tiny_checkpoint: str) -> None:
    model = bp.get_peft_model(bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), bp.LoraConfig(**LORA))
    with torch.no_grad():  # large logits: a 65536 loss scale overflows float16 gradients at first
        for n, p in model.named_parameters():
            if n.endswith("cls.predictions.transform.LayerNorm.weight"):
                p.mul_(200.0)
    result = bp.train(
        model, None, _data(8), max_steps=10, batch_size=4, mixed_precision="fp16", progress=False, logging_steps=1
    )
    skipped = [h["skipped"] for h in result.history]
    assert skipped[0] and not all(skipped)  # skipped while the scale is too high, then training proceeds
    assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if "lora_" in n)
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in result.history if not h["skipped"]])))


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def peft_model(tiny_checkpoint: str):
    return bp.get_peft_model(bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), bp.LoraConfig(**LORA))


def test_bad_arguments(peft_model, tmp_path) -> None:
    data = _data(4)
    with pytest.raises(ValueError, match="batch_size"):
        bp.train(peft_model, None, data, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="learning_rate"):
        bp.train(peft_model, None, data, learning_rate=-1.0, progress=False)
    with pytest.raises(ValueError, match="lr_scheduler"):
        bp.train(peft_model, None, data, lr_scheduler="exotic", progress=False)
    with pytest.raises(ValueError, match="mixed_precision"):
        bp.train(peft_model, None, data, mixed_precision="fp8", progress=False)
    with pytest.raises(TypeError, match="processor"):
        bp.train(peft_model, None, [{"image": "x.png", "text": "a caption"}], progress=False)
    with pytest.raises(TypeError, match="model must be"):
        bp.train("a model", None, data, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="output_dir"):
        bp.train(peft_model, None, data, output_dir=blocker / "sub", progress=False)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        bp.train(peft_model, None, data, resume_from_checkpoint=tmp_path / "missing", progress=False)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        bp.train(peft_model, None, data, output_dir=tmp_path / "empty", resume_from_checkpoint=True, progress=False)


def test_empty_dataset(peft_model) -> None:
    empty = {"pixel_values": torch.zeros(0, 3, 32, 32), "input_ids": torch.zeros(0, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match="empty"):
        bp.train(peft_model, None, empty, progress=False)


def test_no_trainable_parameters(tmp_path, tiny_checkpoint: str, peft_model) -> None:
    peft_model.save_pretrained(tmp_path)
    frozen = bp.PeftModel.from_pretrained(bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), tmp_path)
    with pytest.raises(ValueError, match="no trainable parameters"):
        bp.train(frozen, None, _data(4), progress=False)


def test_mismatched_checkpoint(tmp_path, tiny_checkpoint: str, peft_model) -> None:
    bp.train(peft_model, None, _data(4), max_steps=1, batch_size=4, output_dir=tmp_path, progress=False)
    other = bp.get_peft_model(
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), bp.LoraConfig(r=2, target_modules=["key"])
    )
    with pytest.raises(ValueError, match="adapter"):
        bp.train(other, None, _data(4), output_dir=tmp_path, resume_from_checkpoint=True, progress=False)


def test_nan_loss_stops_naming_the_step_and_keeps_checkpoints(tmp_path, peft_model) -> None:
    bp.train(peft_model, None, _data(4), max_steps=2, batch_size=4, output_dir=tmp_path, save_steps=1, progress=False)
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(ValueError, match="loss became NaN at step 1"):
        bp.train(
            peft_model,
            None,
            _data(4),
            max_steps=3,
            batch_size=4,
            output_dir=tmp_path / "second",
            save_steps=1,
            progress=False,
            logging_steps=1,
        )
    assert not os.path.exists(tmp_path / "second" / "checkpoint-1")
    assert os.path.isdir(tmp_path / "checkpoint-2")


def test_callback_errors_propagate(peft_model) -> None:
    def broken(log):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        bp.train(peft_model, None, _data(4), max_steps=2, batch_size=4, callback=broken, progress=False)


def test_model_usable_during_callback_errors_cleanly(peft_model) -> None:
    calls = []

    def uses_model(log):
        # A callback may caption with the model being trained (the trainer lends it); changing the model while
        # it trains is refused clearly, never a deadlock.
        ids = peft_model.generate(pixel_values=torch.randn(1, 3, 32, 32), max_new_tokens=2)
        assert ids.shape[0] == 1
        with pytest.raises(RuntimeError, match="busy"):
            peft_model.set_adapter("default")
        calls.append(log)

    bp.train(peft_model, None, _data(4), max_steps=1, batch_size=4, callback=uses_model, progress=False)
    assert calls


def test_plot_writes_png(tmp_path, peft_model) -> None:
    pytest.importorskip("matplotlib")
    result = bp.train(peft_model, None, _data(4), max_steps=2, batch_size=4, logging_steps=1, progress=False)
    result.plot(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_make_hf_model_is_random_enough() -> None:
    assert not torch.equal(
        next(make_hf_model(tiny_hf_config(), 1).parameters()), next(make_hf_model(tiny_hf_config(), 2).parameters())
    )


def test_flush_denormals_covers_torch_worker_threads_and_restores() -> None:
    tiny = torch.full((1 << 20,), 1e-39)  # denormal float32; a tensor this size runs on the OpenMP threads
    assert (tiny * 0.5).count_nonzero() == tiny.numel()
    with bp.flush_denormals():
        assert (tiny * 0.5).count_nonzero() == 0
        assert (tiny[:4] * 0.5).count_nonzero() == 0  # the calling thread
    assert (tiny * 0.5).count_nonzero() == tiny.numel()


# Run in a fresh interpreter: in this one, earlier tests leave free chunks of any size inside the heap (glibc trims
# only its top), and a 256 MiB block carved from one reuses resident pages whatever the mmap settings are.
_FREED_MEMORY_SCRIPT = """
import json, os, resource, sys
import torch
import blip_peft as bp

def page_faults_of_a_fresh_block():
    # Page faults of filling a 256 MiB tensor right after one of that size was freed.
    block = 256 << 20
    torch.ones(block // 4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(block // 4)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

checkpoint, data, lora = sys.argv[1], torch.load(sys.argv[2]), json.loads(sys.argv[3])
before = page_faults_of_a_fresh_block()
during, resident_during = [], []

def refill(log):
    during.append(page_faults_of_a_fresh_block())
    resident_during.append(resident_bytes())

model = bp.get_peft_model(bp.BlipForConditionalGeneration.from_pretrained(checkpoint), bp.LoraConfig(**lora))
bp.train(model, None, data, max_steps=3, batch_size=2, logging_steps=1, progress=False, callback=refill)
print(json.dumps({"before": before, "during": during, "resident_during": resident_during,
                  "resident_after": resident_bytes()}))
"""


def _freed_memory_run(tmp_path, checkpoint: str, **env: str) -> dict:
    torch.save(_data(4), tmp_path / "data.pt")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = subprocess.run(
        [sys.executable, "-c", _FREED_MEMORY_SCRIPT, checkpoint, str(tmp_path / "data.pt"), json.dumps(LORA)],
        capture_output=True, text=True, timeout=300, env={**environ, **env},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc returns freed blocks to the system")
@pytest.mark.skipif("glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""), reason="malloc tuned by the user")
def test_train_keeps_freed_memory_for_the_next_step_and_gives_it_back_after(tmp_path, tiny_checkpoint: str) -> None:
    """glibc unmaps a freed block over its mmap threshold, so the next block of that size page-faults fresh zeroed
    pages in (a base-shape step at batch 8 did that for 14 GB); while train() runs, freed blocks stay in the heap
    and the next step can reuse their pages; when it returns, the heap's free pages go back to the system.
    Inside train(), glibc did not reuse the block every time (about 1 refill in 10 faulted in again, when a step's
    allocations had split it), so one refill of three without page faults is required."""
    run = _freed_memory_run(tmp_path, tiny_checkpoint)
    before, during = run["before"], run["during"]
    assert before > 60_000, run  # outside train() the block's 65,536 pages fault in every time
    assert len(during) == 3 and min(during) * 8 < before, run
    # The last refill's block, freed but kept, was resident inside train(); after it, it is not.
    assert run["resident_during"][-1] - run["resident_after"] > 128 << 20, run


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc returns freed blocks to the system")
def test_train_leaves_malloc_alone_when_the_user_tuned_it(tmp_path, tiny_checkpoint: str) -> None:
    """With MALLOC_*_ set (or GLIBC_TUNABLES' glibc.malloc.*), train() does not change malloc's settings: the
    refills inside it fault their pages in as outside it (the test above is not passing by chance)."""
    run = _freed_memory_run(tmp_path, tiny_checkpoint, MALLOC_TOP_PAD_="131072")
    assert min(run["before"], *run["during"]) > 60_000, run


def test_modules_to_save_train_checkpoint_resume_and_load_in_peft(tmp_path, tiny_checkpoint: str) -> None:
    """The copies train, go into checkpoints and the final adapter (peft reads it), and a resumed run ends
    with the uninterrupted run's weights."""
    config = dict(LORA, modules_to_save=["post_layernorm"])
    common = dict(max_steps=4, batch_size=2, shuffle=False, mixed_precision="no", progress=False, logging_steps=1)
    torch.manual_seed(0)
    model = bp.get_peft_model(
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), bp.LoraConfig(**config)
    )
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    full = bp.train(model, None, _data(8), output_dir=str(tmp_path / "full"), save_steps=2, **common)
    copy = "base_model.model.vision_model.post_layernorm.modules_to_save.default.weight"
    assert not torch.equal(dict(model.named_parameters())[copy], start[copy])
    torch.manual_seed(0)
    again = bp.get_peft_model(
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), bp.LoraConfig(**config)
    )
    resumed = bp.train(
        again,
        None,
        _data(8),
        output_dir=str(tmp_path / "resumed"),
        resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"),
        **common,
    )
    assert resumed.losses == full.losses
    theirs = dict(again.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in model.named_parameters())
    ref = peft.PeftModel.from_pretrained(HFBlip.from_pretrained(tiny_checkpoint), tmp_path / "full").eval()
    batch = _data(2)
    with torch.no_grad():
        ours = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"]).logits
        expected = ref(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"]).logits
    assert rel_err(ours, expected) <= 1e-5


def test_mixed_precision_refuses_half_precision_trained_weights(tiny_checkpoint: str) -> None:
    model = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="load the model in float32"):
        bp.train(model, None, _data(4), max_steps=1, batch_size=2, mixed_precision="bf16", progress=False)


def test_settings_that_json_cannot_hold_name_the_argument(peft_model) -> None:
    data = _data(4)
    with pytest.raises(ValueError, match="learning_rate must be a finite number"):
        bp.train(peft_model, None, data, learning_rate=float("nan"), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        bp.train(peft_model, None, data, batch_size=-2, progress=False)
