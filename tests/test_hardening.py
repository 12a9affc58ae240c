"""Issue #23: bad input gets a clear exception naming the argument, never a panic, an abort, a silently wrong
result or a raw libtorch message; a Rust panic reaches Python as a BlipPeftInternalError saying it is a bug;
killed runs leave every checkpoint loadable and the next run tidies up; the CLI checks its paths first and
says where an interrupted run's last checkpoint is."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_batch

import blip_peft as bp
from blip_peft import world
from blip_peft.presets import TINY_TEXT

POSITIONS = TINY_TEXT["max_position_embeddings"]
VOCAB = TINY_TEXT["vocab_size"]


@pytest.fixture(scope="module")
def model(tiny_checkpoint: str) -> bp.BlipForConditionalGeneration:
    return bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)


def _data(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(n, 3, 32, 32, generator=g),
        "input_ids": torch.randint(4, 90, (n, 8), generator=g),
    }


def _dead_pid() -> int:
    """The id of a process that has exited (for leftovers "written by a killed run")."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------------------- panics (item 1)
@pytest.mark.parametrize("place", ["here", "detached", "worker"])
def test_a_rust_panic_is_a_python_exception_that_says_it_is_a_bug(place: str) -> None:
    with pytest.raises(bp.BlipPeftInternalError, match="bug in blip_peft") as info:
        bp._blip_peft._panic_for_test(place)
    # An ordinary Exception (pyo3's PanicException is a BaseException that `except Exception` misses).
    assert isinstance(info.value, RuntimeError)
    assert "test panic" in str(info.value)
    # The process and the module keep working.
    bp._blip_peft._panic_for_test  # noqa: B018
    with pytest.raises(ValueError, match="place must be"):
        bp._blip_peft._panic_for_test("elsewhere")


def test_internal_error_is_exported() -> None:
    assert issubclass(bp.BlipPeftInternalError, RuntimeError)
    assert "BlipPeftInternalError" in bp.__all__


# ------------------------------------------------------------------------------------ generate (item 2)
def test_max_new_tokens_at_the_64_bit_limit_means_as_many_as_fit(model) -> None:
    px, _, _ = tiny_batch(batch=1)
    huge = model.generate(pixel_values=px, max_new_tokens=2**63 - 1, min_new_tokens=POSITIONS - 1)
    assert huge.shape[1] == POSITIONS  # it used to overflow to no new tokens at all
    capped = model.generate(pixel_values=px, max_new_tokens=10 * POSITIONS, min_new_tokens=POSITIONS - 1)
    assert torch.equal(huge, capped)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"min_new_tokens": POSITIONS}, "min_new_tokens"),
        ({"min_length": POSITIONS + 1}, "min_length"),
        ({"pad_token_id": -1}, "pad_token_id"),
        ({"bos_token_id": -5}, "bos_token_id"),
        ({"eos_token_id": VOCAB}, "eos_token_id"),
        ({"bos_token_id": 10**6}, "bos_token_id"),
        ({"length_penalty": math.nan, "num_beams": 2}, "length_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"max_new_tokens": 2**64}, "max_new_tokens"),
        ({"num_beams": -(2**70)}, "num_beams"),
    ],
)
def test_generate_settings_that_cannot_be_honoured_are_named(model, kwargs, name: str) -> None:
    px, _, _ = tiny_batch(batch=1)
    with pytest.raises(ValueError, match=name):
        model.generate(pixel_values=px, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_beams": 10**9}, "num_beams=1000000000"),
        ({"num_beams": 2**62, "num_return_sequences": 2}, "num_beams"),
        ({"do_sample": True, "num_return_sequences": 10**10}, "num_return_sequences=10000000000"),
    ],
)
def test_requests_bigger_than_the_machine_are_a_memory_error_before_allocating(model, kwargs, name: str) -> None:
    px, _, _ = tiny_batch(batch=2)
    with pytest.raises(MemoryError, match=name):
        model.generate(pixel_values=px, **kwargs)
    assert model.generate(pixel_values=px, max_new_tokens=2).shape[0] == 2  # still usable


def test_empty_batch_and_meta_tensors_are_named(model) -> None:
    with pytest.raises(ValueError, match="no images"):
        model.generate(pixel_values=torch.zeros(0, 3, 32, 32))
    with pytest.raises(ValueError, match="no images"):
        model(pixel_values=torch.zeros(0, 3, 32, 32), input_ids=torch.zeros(0, 3, dtype=torch.long))
    meta = torch.empty(1, 3, 32, 32, device="meta")
    with pytest.raises(ValueError, match='pixel_values is on the "meta" device'):
        model.generate(pixel_values=meta)
    _, ids, _ = tiny_batch(batch=1)
    with pytest.raises(ValueError, match='input_ids is on the "meta" device'):
        model(pixel_values=torch.zeros(1, 3, 32, 32), input_ids=ids.to("meta"))


def test_ids_out_of_range_say_the_range(model) -> None:
    px, ids, _ = tiny_batch(batch=1)
    ids[0, 2] = VOCAB + 5
    with pytest.raises(ValueError, match=rf"input_ids must be token ids in \[0, {VOCAB}\)"):
        model(pixel_values=px, input_ids=ids)
    with pytest.raises(ValueError, match=rf"\[0, {VOCAB}\)"):
        model.generate(pixel_values=px, input_ids=ids)


# ---------------------------------------------------------------------------------------- LoRA (item 2)
def test_absurd_rank_is_a_memory_error_naming_r(tiny_checkpoint: str) -> None:
    base = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    for r in (10**12, 2**62):
        with pytest.raises(MemoryError, match=f"r={r}"):
            bp.get_peft_model(base, bp.LoraConfig(r=r, target_modules=["query"]))
    # Nothing was injected by the refused calls.
    model = bp.get_peft_model(base, bp.LoraConfig(r=2, target_modules=["query"]))
    assert any("lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("field", ["lora_alpha", "lora_dropout"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_lora_numbers_are_named(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{field} must be a finite number") as info:
        bp.LoraConfig(target_modules=["query"], **{field: value})
    assert "JSON" not in str(info.value)


def test_r_past_64_bits_is_named() -> None:
    with pytest.raises(ValueError, match=r"r=\d+ is out of range"):
        bp.LoraConfig(r=2**70, target_modules=["query"])


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"layers_to_transform": [7]}, "layers_to_transform=[7]"),
        ({"layers_to_transform": [7], "layers_pattern": "layer"}, "layers_pattern"),
        ({"exclude_modules": ["query"]}, "exclude_modules"),
        ({"exclude_modules": ".*"}, "exclude_modules"),
    ],
)
def test_filters_that_exclude_every_target_say_so(tiny_checkpoint: str, extra, named: str) -> None:
    base = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match="excluded all of them") as info:
        bp.get_peft_model(base, bp.LoraConfig(target_modules=["query"], **extra))
    assert named in str(info.value)
    assert "not found" not in str(info.value)


def test_save_after_merge_and_unload_is_an_error_not_silence(tmp_path, tiny_checkpoint: str) -> None:
    model = bp.get_peft_model(
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), bp.LoraConfig(target_modules=["query"])
    )
    merged = model.merge_and_unload()
    with pytest.raises(ValueError, match="no adapter to save"):
        model.save_pretrained(tmp_path / "adapter")
    merged.save_pretrained(tmp_path / "merged")  # what the message points to works
    assert os.path.isfile(tmp_path / "merged" / "model.safetensors")


# ------------------------------------------------------------------------------------ training (item 2)
@pytest.mark.parametrize("max_length", [0, 1, -1, -(2**70)])
def test_train_max_length_below_two_is_refused_by_name(model, max_length: int) -> None:
    with pytest.raises(ValueError, match="max_length"):
        bp.train(model, None, _data(), max_steps=1, max_length=max_length, progress=False)
    with pytest.raises(ValueError, match="max_length"):
        bp._blip_peft.collate_captions([[1, 2, 3]], 97, 0, max_length)


def test_eval_steps_without_an_eval_set_is_refused(tiny_checkpoint: str) -> None:
    model = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match="eval_steps=2 .* no eval_dataset"):
        bp.train(model, None, _data(), max_steps=4, eval_steps=2, progress=False)


@pytest.mark.parametrize(("name", "value"), [("weight_decay", math.nan), ("learning_rate", math.inf)])
def test_non_finite_train_settings_are_named(model, name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name) as info:
        bp.train(model, None, _data(), max_steps=1, progress=False, **{name: value})
    assert "JSON" not in str(info.value)


def test_trainer_state_with_a_negative_step_is_named(tmp_path, tiny_checkpoint: str) -> None:
    lora = bp.LoraConfig(r=2, target_modules=["query"])
    model = bp.get_peft_model(bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), lora)
    bp.train(model, None, _data(), max_steps=2, save_steps=2, output_dir=tmp_path, progress=False)
    state_path = tmp_path / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["global_step"] = -3
    state_path.write_text(json.dumps(state))
    model = bp.get_peft_model(bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), lora)
    with pytest.raises(ValueError, match="global_step is -3"):
        bp.train(model, None, _data(), max_steps=4, output_dir=tmp_path, resume_from_checkpoint=True, progress=False)


# --------------------------------------------------------------------------------- image files (item 2)
def test_device_files_and_pipes_are_not_read_as_images(tmp_path) -> None:
    processor = bp.BlipImageProcessor()
    with pytest.raises(ValueError, match="not a regular file"):
        processor("/dev/zero")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        processor(str(fifo))
    with pytest.raises(ValueError, match="not a regular file"):
        processor(str(tmp_path))


def test_image_files_larger_than_any_allowed_image_are_refused_unread(tmp_path) -> None:
    big = tmp_path / "huge.bmp"
    with open(big, "wb") as f:
        f.truncate(8 * 89_478_485 + 1)  # sparse: no disk used
    with pytest.raises(ValueError, match="larger than"):
        bp.BlipImageProcessor()(str(big))


# ------------------------------------------------------------------------------ crash safety (item 3)
def test_the_next_run_removes_what_a_killed_run_left(tmp_path, tiny_checkpoint: str) -> None:
    dead = _dead_pid()
    leftovers = [
        tmp_path / f".checkpoint-4.tmp-{dead}",
        tmp_path / f".deleting-checkpoint-2-{dead}",
    ]
    for d in leftovers:
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"half")
    tmp_file = tmp_path / f".adapter_model.safetensors.tmp-{dead}"
    tmp_file.write_bytes(b"half")
    alive = tmp_path / f".checkpoint-9.tmp-{os.getpid()}"  # a live writer's temporary is kept
    alive.mkdir()
    model = bp.get_peft_model(
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), bp.LoraConfig(r=2, target_modules=["query"])
    )
    bp.train(model, None, _data(), max_steps=1, output_dir=tmp_path, progress=False)
    for path in [*leftovers, tmp_file]:
        assert not path.exists(), path
    assert alive.exists()


_KILL_SCRIPT = """
import sys, torch, blip_peft as bp
out, resume = sys.argv[1], sys.argv[2] == "1"
g = torch.Generator().manual_seed(0)
data = {{"pixel_values": torch.randn(16, 3, 32, 32, generator=g),
        "input_ids": torch.randint(4, 90, (16, 8), generator=g)}}
model = bp.get_peft_model(bp.BlipForConditionalGeneration.from_pretrained({checkpoint!r}),
                          bp.LoraConfig(r=4, target_modules="all-linear"))
print("ready", flush=True)
bp.train(model, None, data, max_steps=10**6, batch_size=2, output_dir=out, save_steps=1, save_total_limit=2,
         progress=False, resume_from_checkpoint=True if resume else None)
"""


def test_sigkill_at_many_points_of_checkpointing_leaves_every_checkpoint_loadable(tmp_path, tiny_checkpoint) -> None:
    """Kills a run that checkpoints every step (save_total_limit=2: writes and deletions all the time) at
    staggered moments, resuming each time; after every kill all checkpoints load, and the next run removes
    the hidden temporaries the killed one left."""
    script = _KILL_SCRIPT.format(checkpoint=tiny_checkpoint)
    out = tmp_path / "run"
    kills = 0
    for i in range(6):
        resume = out.exists() and any(d.startswith("checkpoint-") for d in os.listdir(out))
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(out), "1" if resume else "0"], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout.readline().strip() == "ready"
            deadline = time.time() + 120
            # Wait for this run's first checkpoint, by then it has removed the previous kill's temporaries.
            first = None
            while time.time() < deadline and proc.poll() is None:
                names = os.listdir(out) if out.exists() else []
                steps = [int(d.split("-")[1]) for d in names if d.startswith("checkpoint-")]
                if first is None and steps:
                    first = max(steps)
                if first is not None and max(steps, default=0) > first:
                    break
                time.sleep(0.02)
            foreign = [n for n in os.listdir(out) if n.startswith(".") and str(proc.pid) not in n]
            assert not foreign, f"the killed run's leftovers stayed: {foreign}"
            time.sleep(0.05 + 0.137 * i)
            proc.send_signal(signal.SIGKILL)
            kills += 1
        finally:
            proc.wait(timeout=30)
        names = os.listdir(out)
        complete = sorted(d for d in names if d.startswith("checkpoint-"))
        assert complete, names
        for d in complete:
            json.loads((out / d / "trainer_state.json").read_text())
            bp.PeftModel.from_pretrained(bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), out / d)
    assert kills == 6
    # A last run that finishes leaves nothing hidden behind.
    model = bp.get_peft_model(
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint),
        bp.LoraConfig(r=4, target_modules="all-linear"),
    )
    bp.train(model, None, _data(), max_steps=1, output_dir=out, progress=False)
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def _cli(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blip_peft", *args], capture_output=True, text=True, timeout=300, **kw
    )


def test_cli_checks_output_paths_before_the_work(tmp_path, tiny_checkpoint: str) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    data = tmp_path / "data.jsonl"
    data.write_text("")
    started = time.time()
    r = _cli("train", "--model", tiny_checkpoint, "--data", str(data), "--output-dir", str(a_file))
    assert r.returncode == 2 and "--output-dir" in r.stderr and "is a file" in r.stderr
    r = _cli("caption", str(a_file), "--model", tiny_checkpoint, "--output", str(tmp_path))
    assert r.returncode == 2 and "--output" in r.stderr and "is a folder" in r.stderr
    r = _cli("caption", str(a_file), "--model", tiny_checkpoint, "--output", str(tmp_path / "no" / "x.jsonl"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = _cli("merge", "--model", tiny_checkpoint, "--adapter", str(tmp_path), "--output", str(a_file))
    assert r.returncode == 2 and "is a file" in r.stderr
    assert "Traceback" not in r.stderr
    assert time.time() - started < 120


def test_cli_train_interrupted_exits_130_and_names_the_last_checkpoint(tmp_path) -> None:
    bundled = bp.bundled_model_path()
    size = bp.BlipProcessor.from_pretrained(bundled).image_processor.size["height"]
    folder = world.write_imagefolder(tmp_path / "data", n=8, seed=3, domain="target", size=size)
    out = tmp_path / "out"
    log = open(tmp_path / "stderr.txt", "w+")  # noqa: SIM115  (a file, not a pipe: progress output cannot block it)
    proc = subprocess.Popen(
        [sys.executable, "-m", "blip_peft", "train", "--model", bundled, "--data", str(folder),
         "--output-dir", str(out), "--max-steps", "1000000", "--batch-size", "2", "--save-steps", "1",
         "--lora-r", "2", "--target-modules", "query,value", "--mixed-precision", "no"],
        stdout=subprocess.DEVNULL, stderr=log, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and any(d.startswith("checkpoint-") for d in os.listdir(out)):
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        proc.kill()
        log.seek(0)
        err = log.read()
        log.close()
    assert proc.returncode == 130, err
    assert "interrupted after" in err and "last checkpoint is" in err, err
    path = err.split("last checkpoint is ")[1].split(" (")[0]
    assert os.path.isfile(os.path.join(path, "trainer_state.json"))


# -------------------------------------------------------------------------------- concurrency (item 4)
def test_attributes_never_wait_for_or_fail_because_of_a_generating_thread(tiny_checkpoint: str) -> None:
    import threading

    model = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    px = torch.randn(8, 3, 32, 32)
    done = threading.Event()
    errors: list[BaseException] = []

    def generate() -> None:
        try:
            while not done.is_set():
                model.generate(pixel_values=px, num_beams=3, max_new_tokens=30, min_new_tokens=30)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    worker = threading.Thread(target=generate)
    worker.start()
    try:
        names = None
        for _ in range(200):
            assert model.config.text_config.vocab_size == VOCAB
            assert str(model.device) == "cpu" and model.dtype == torch.float32
            names = [n for n, _ in model.named_parameters()]
            assert model.training in (True, False)
        assert names and names[0].startswith("vision_model")
        # The parameters handed out are the model's own tensors.
        a = dict(model.named_parameters())["text_decoder.cls.predictions.bias"]
        b = dict(model.named_parameters())["text_decoder.cls.predictions.bias"]
        assert a is b or a.data_ptr() == b.data_ptr()
    finally:
        done.set()
        worker.join()
    assert not errors, errors


def test_two_threads_generating_on_one_model_take_turns_and_get_their_own_answers(tiny_checkpoint: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    model = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)
    inputs = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    kwargs = [dict(max_new_tokens=12), dict(num_beams=3, max_new_tokens=12), dict(do_sample=True, seed=5)] * 2
    alone = [model.generate(pixel_values=px, **kw) for px, kw in zip(inputs, kwargs, strict=True)]
    with ThreadPoolExecutor(4) as pool:
        together = list(
            pool.map(lambda a: model.generate(pixel_values=a[0], **a[1]), zip(inputs, kwargs, strict=True))
        )
    for x, y in zip(alone, together, strict=True):
        assert torch.equal(x, y)  # seeded sampling too: each call runs alone on the model, in turn


def test_generate_from_a_training_callback_captions_with_the_weights_being_trained(tiny_checkpoint: str) -> None:
    model = bp.get_peft_model(
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), bp.LoraConfig(r=2, target_modules=["query"])
    )
    px = torch.randn(1, 3, 32, 32)
    samples: list[torch.Tensor] = []
    busy: list[str] = []

    def callback(info: dict) -> None:
        samples.append(model.generate(pixel_values=px, max_new_tokens=5))
        assert model.config.text_config.vocab_size == VOCAB
        assert len(list(model.named_parameters())) > 0
        try:
            model.merge_adapter()  # changing the model being trained is refused, clearly
        except RuntimeError as e:
            busy.append(str(e))

    bp.train(model, None, _data(), max_steps=4, logging_steps=2, callback=callback, progress=False)
    assert len(samples) >= 2 and all(s.shape[0] == 1 for s in samples)
    assert busy and all("busy" in m for m in busy)
    # The last sample is what the trained adapter now generates.
    assert torch.equal(samples[-1], model.generate(pixel_values=px, max_new_tokens=5))


def test_calls_from_another_thread_while_training_are_busy_not_stuck(tiny_checkpoint: str) -> None:
    import threading

    model = bp.get_peft_model(
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), bp.LoraConfig(r=2, target_modules=["query"])
    )
    started = threading.Event()
    seen: list[BaseException | str] = []

    def callback(info: dict) -> None:
        started.set()
        time.sleep(0.5)

    def other() -> None:
        started.wait(60)
        try:
            model.generate(pixel_values=torch.randn(1, 3, 32, 32), max_new_tokens=3)
            seen.append("generated")
        except RuntimeError as e:
            seen.append(e)
        assert model.config.text_config.vocab_size == VOCAB  # attributes still answer

    thread = threading.Thread(target=other)
    thread.start()
    bp.train(model, None, _data(), max_steps=4, logging_steps=1, callback=callback, progress=False)
    thread.join()
    assert len(seen) == 1 and isinstance(seen[0], RuntimeError) and "busy" in str(seen[0])


def test_a_tokenizer_json_of_another_model_type_is_refused(tmp_path) -> None:
    """transformers' BertTokenizer would keep only such a file's vocabulary and turn captions into unknown
    tokens; BLIP's tokenizer is WordPiece, so anything else is refused by name."""
    corpus = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fuzz", "corpus", "tokenizer_json")
    for name, kind in (("bpe.json", "BPE"),):
        (tmp_path / "tokenizer.json").write_bytes(open(os.path.join(corpus, name), "rb").read())
        with pytest.raises(ValueError, match=f"holds a {kind} tokenizer"):
            bp.BlipTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(open(os.path.join(corpus, "wordpiece.json"), "rb").read())
    tokenizer = bp.BlipTokenizer.from_pretrained(tmp_path)
    assert tokenizer("a red cube")["input_ids"] == [2, 6, 9, 10, 3]
