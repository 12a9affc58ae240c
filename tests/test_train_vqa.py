"""`blip_peft.train` on the VQA head (`BlipForQuestionAnswering`) against transformers + peft + torch.optim.AdamW:
the first step's loss, a few steps' losses and adapter, accumulation, gradient checkpointing, bf16 judged against
float32, checkpoints and resume, evaluation, the feature cache, datasets in every form, bad datasets."""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
from conftest import make_hf_model, rel_err
from transformers import BlipConfig
from transformers import BlipForQuestionAnswering as HFVqa

import blip_peft as bp
from blip_peft.presets import TINY_TEXT, TINY_VISION

pytestmark = pytest.mark.cpu_isa

LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value", "qkv", "fc1"])
# LoRA on the text towers only: the vision tower stays frozen, so the feature cache may hold its embeddings.
TEXT_LORA = dict(r=4, lora_alpha=8, target_modules=r"text_(encoder|decoder)\..*\.(query|value)")
QUESTIONS = ["how many circles are there?", "what colour is the large square?", "is there a star?", "what shape?"]
ANSWERS = ["2", "red", "no", "a small blue triangle"]


@pytest.fixture(scope="module")
def processor() -> bp.BlipProcessor:
    return bp.BlipProcessor.from_pretrained(bp.bundled_model_path())


@pytest.fixture(scope="module")
def tiny_vqa(tmp_path_factory: pytest.TempPathFactory, processor: bp.BlipProcessor) -> str:
    """A tiny VQA checkpoint (transformers', random weights) over the bundled tokenizer and image size."""
    tok = processor.tokenizer
    text = dict(
        TINY_TEXT,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id,
        pad_token_id=tok.pad_token_id,
        sep_token_id=tok.sep_token_id,
        eos_token_id=tok.sep_token_id,
        max_position_embeddings=64,
    )
    size = processor.image_processor.size["height"]
    config = BlipConfig(text_config=text, vision_config=dict(TINY_VISION, image_size=size, patch_size=16))
    path = tmp_path_factory.mktemp("tiny_vqa_train")
    make_hf_model(config, seed=4, cls=HFVqa).save_pretrained(path)
    return str(path)


def rows(n: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        image = (torch.rand(20 + i % 3, 24, 3, generator=g) * 255).to(torch.uint8).numpy().astype(np.uint8)
        out.append({"image": image, "question": QUESTIONS[i % 4], "answer": ANSWERS[(i + i // 4) % 4]})
    return out


def _pad(lists: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in lists)
    ids = torch.tensor([x + [pad] * (width - len(x)) for x in lists])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in lists])
    return ids, mask


def reference_batch(processor, data: list[dict], bos: int) -> dict[str, torch.Tensor]:
    """transformers' VQA inputs for `data`, collated as the trainer documents it: the questions as the
    tokenizer writes them, the answers with BOS first (what generate starts from), pads -100 in the labels."""
    tok = processor.tokenizer
    pad = tok.pad_token_id
    question, qmask = _pad([list(x) for x in tok([r["question"] for r in data])["input_ids"]], pad)
    answers = [[bos, *list(x)[1:]] for x in tok([r["answer"] for r in data])["input_ids"]]
    answer, amask = _pad(answers, pad)
    px = processor(images=[r["image"] for r in data], return_tensors="pt")["pixel_values"]
    return {
        "pixel_values": px,
        "input_ids": question,
        "attention_mask": qmask,
        "decoder_input_ids": answer,
        "decoder_attention_mask": amask,
        "labels": answer.masked_fill(amask == 0, -100),
    }


def peft_pair(checkpoint: str, tmp_path, **lora):
    """Our PeftModel and peft's on transformers' VQA model, starting from the same (non-zero) adapter."""
    ours = bp.get_peft_model(bp.BlipForQuestionAnswering.from_pretrained(checkpoint), bp.LoraConfig(**lora))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ours.save_pretrained(tmp_path / "start")
    ref = peft.PeftModel.from_pretrained(HFVqa.from_pretrained(checkpoint), tmp_path / "start", is_trainable=True)
    return ours, ref


def reference_run(ref, processor, data, steps, batch, lr, wd, bos, accum=1):
    """A plain torch loop over transformers + peft: AdamW, clipping at 1.0, linear decay, batches in order."""
    ref.train()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (steps - s) / steps))
    micro_per_epoch = -(-len(data) // batch)
    losses, micro = [], 0
    for _ in range(steps):
        total = 0.0
        group = min(accum, micro_per_epoch - (micro % micro_per_epoch))
        for _ in range(group):
            s = (micro % micro_per_epoch) * batch
            loss = ref(**reference_batch(processor, data[s : s + batch], bos)).loss
            (loss / group).backward()
            total += loss.item() / group
            micro += 1
        losses.append(total)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    return losses


def _bos(checkpoint: str) -> int:
    return bp.BlipForQuestionAnswering.from_pretrained(checkpoint).config.text_config.bos_token_id


def test_first_step_loss_equals_transformers_and_peft(tmp_path, tiny_vqa: str, processor) -> None:
    ours, ref = peft_pair(tiny_vqa, tmp_path, **LORA)
    data = rows(4)
    result = bp.train(ours, processor, data, max_steps=1, batch_size=4, shuffle=False, mixed_precision="no",
                      progress=False)  # fmt: skip
    ref.train()
    want = ref(**reference_batch(processor, data, _bos(tiny_vqa))).loss.item()
    assert abs(result.losses[0] - want) <= 1e-5 * abs(want), (result.losses[0], want)


@pytest.mark.parametrize(("accum", "checkpointing"), [(1, False), (2, False), (1, True)])
def test_steps_equal_a_torch_loop_over_transformers_and_peft(tmp_path, tiny_vqa, processor, accum, checkpointing):
    ours, ref = peft_pair(tiny_vqa, tmp_path, **LORA)
    data = rows(12)
    steps = 4
    result = bp.train(
        ours, processor, data, max_steps=steps, batch_size=4, learning_rate=1e-2, weight_decay=0.01, shuffle=False,
        mixed_precision="no", logging_steps=1, progress=False, gradient_accumulation_steps=accum,
        gradient_checkpointing=checkpointing,
    )  # fmt: skip
    expected = reference_run(ref, processor, data, steps, 4, 1e-2, 0.01, _bos(tiny_vqa), accum=accum)
    assert [h["step"] for h in result.history] == list(range(1, steps + 1))
    for got, want in zip(result.losses, expected, strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (got, want)
    # Adam's normalised updates carry float32 rounding of the gradients into the weights, by an amount that
    # depends on the CPU's kernels (1.9e-5 under AVX2): 1e-4, as the captioner's trainer tests judge them.
    mine = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        if "lora_" in name:
            assert rel_err(mine[name], p) <= 1e-4, name


def test_bf16_is_judged_against_float32(tiny_vqa: str, processor) -> None:
    def run(precision: str) -> list[float]:
        torch.manual_seed(0)  # the adapter's initial A
        model = bp.get_peft_model(bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa), bp.LoraConfig(**LORA))
        r = bp.train(model, processor, rows(8), max_steps=3, batch_size=4, shuffle=False, learning_rate=1e-2,
                     mixed_precision=precision, logging_steps=1, progress=False)  # fmt: skip
        for n, p in model.named_parameters():
            assert p.dtype == torch.float32, n  # the base is restored after the run
        return r.losses

    fp32, bf16 = run("no"), run("bf16")
    for a, b in zip(fp32, bf16, strict=True):
        assert abs(a - b) <= 2e-2 * abs(a), (a, b)


def test_checkpoint_and_resume_equal_the_uninterrupted_run(tmp_path, tiny_vqa: str, processor) -> None:
    def model():
        torch.manual_seed(1)
        return bp.get_peft_model(
            bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa), bp.LoraConfig(**LORA, init_lora_weights=False)
        )

    common = dict(batch_size=4, learning_rate=1e-2, mixed_precision="no", logging_steps=1, progress=False, seed=3)
    whole = model()
    full = bp.train(whole, processor, rows(), max_steps=6, **common)

    out = tmp_path / "out"
    first = model()
    stop = lambda log: log["step"] >= 3  # noqa: E731
    part = bp.train(first, processor, rows(), max_steps=6, output_dir=out, save_steps=3, callback=stop, **common)
    assert part.interrupted and part.global_step == 3
    assert (out / "checkpoint-3" / "adapter_model.safetensors").is_file()
    resumed = model()
    rest = bp.train(resumed, processor, rows(), max_steps=6, output_dir=out, resume_from_checkpoint=True, **common)
    assert rest.global_step == 6
    for a, b in zip(rest.losses, full.losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (a, b)
    theirs = dict(whole.named_parameters())
    for n, p in resumed.named_parameters():
        if "lora_" in n:
            assert rel_err(p, theirs[n]) <= 1e-5, n
    # The adapter in output_dir is peft's and loads on transformers' VQA model.
    ref = peft.PeftModel.from_pretrained(HFVqa.from_pretrained(tiny_vqa), out)
    assert {n for n, _ in ref.named_parameters() if "lora_" in n}


def test_eval_loss_equals_transformers_with_the_trained_adapter(tmp_path, tiny_vqa: str, processor) -> None:
    torch.manual_seed(0)  # the adapter's initial A
    model = bp.get_peft_model(bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa), bp.LoraConfig(**LORA))
    evaluation = rows(4, seed=7)
    result = bp.train(model, processor, rows(8), eval_dataset=evaluation, max_steps=4, eval_steps=2, batch_size=4,
                      learning_rate=1e-2, mixed_precision="no", output_dir=tmp_path / "out",
                      load_best_model_at_end=True, progress=False)  # fmt: skip
    assert [s for s, _ in result.eval_history] == [2, 4]
    assert set(result.metric_history[4]) == {"eval_loss"}
    assert result.best_global_step in (2, 4)
    model.save_pretrained(tmp_path / "final")
    ref = peft.PeftModel.from_pretrained(HFVqa.from_pretrained(tiny_vqa), tmp_path / "final").eval()
    with torch.no_grad():
        want = ref(**reference_batch(processor, evaluation, _bos(tiny_vqa))).loss.item()
    assert abs(result.best_metric - want) <= 1e-5 * abs(want), (result.best_metric, want)


def test_feature_cache_serves_the_frozen_vision_tower_bit_for_bit(tiny_vqa: str, processor) -> None:
    def run(cache: bool):
        torch.manual_seed(0)  # the adapter's initial A
        model = bp.get_peft_model(bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa), bp.LoraConfig(**TEXT_LORA))
        return bp.train(model, processor, rows(8), epochs=3, batch_size=4, feature_cache=cache, mixed_precision="no",
                        logging_steps=1, progress=False)  # fmt: skip

    cached, plain = run(True), run(False)
    assert cached.feature_cache["enabled"] and cached.feature_cache["hits"] == 16
    assert cached.losses == plain.losses


def test_datasets_in_every_form_give_the_same_run(tmp_path, tiny_vqa: str, processor) -> None:
    from PIL import Image

    data = rows(4)
    folder = tmp_path / "vqa"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for i, r in enumerate(data):
            Image.fromarray(r["image"]).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "question": r["question"], "answer": r["answer"]}) + "\n")
    as_files = [dict(r, image=str(folder / f"{i}.png")) for i, r in enumerate(data)]

    def run(dataset) -> list[float]:
        torch.manual_seed(0)  # the adapter's initial A
        model = bp.get_peft_model(bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa), bp.LoraConfig(**LORA))
        return bp.train(model, processor, dataset, max_steps=1, batch_size=4, shuffle=False, mixed_precision="no",
                        progress=False).losses  # fmt: skip

    want = run(as_files)
    assert run(bp.ImageCaptionDataset.from_folder(folder, fields=("question", "answer"))) == want
    assert run(bp.ImageCaptionDataset.from_jsonl(folder / "metadata.jsonl", fields=("question", "answer"))) == want
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_list([{k: r[k] for k in ("image", "question", "answer")} for r in as_files])
    assert run(table) == want


def test_bad_datasets_name_the_missing_field_and_the_head(tiny_vqa: str, processor) -> None:
    torch.manual_seed(0)  # the adapter's initial A
    model = bp.get_peft_model(bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa), bp.LoraConfig(**LORA))
    no_answer = [{k: v for k, v in r.items() if k != "answer"} for r in rows(2)]
    with pytest.raises(ValueError, match=r"'answer'.*BlipForQuestionAnswering"):
        bp.train(model, processor, no_answer, progress=False)
    captions = [{"image": r["image"], "text": "a caption"} for r in rows(2)]
    with pytest.raises(ValueError, match=r"'question'.*BlipForQuestionAnswering"):
        bp.train(model, processor, captions, progress=False)
    with pytest.raises(TypeError, match="'answer' must be a string"):
        bp.train(model, processor, [dict(r, answer=2) for r in rows(2)], progress=False)
    with pytest.raises(ValueError, match="BlipForConditionalGeneration only"):
        bp.train(model, processor, {"pixel_values": torch.zeros(1, 3, 8, 8)}, progress=False)
    with pytest.raises(ValueError, match="prompt is for captioning"):
        bp.train(model, processor, rows(2), prompt="a picture of ", progress=False)
    with pytest.raises(ValueError, match="evaluated by its loss"):
        bp.train(model, processor, rows(2), eval_dataset=rows(2), metric_for_best_model="CIDEr", progress=False)
    with pytest.raises(TypeError, match="retrieval head"):
        bp.train(model, processor, rows(2), temp=0.1, progress=False)


def test_world_questions_train_with_the_defaults(tiny_vqa: str, processor) -> None:
    """What the demo does: `bp.train(vqa_model, processor, rows)` over the synthetic world's questions."""
    from blip_peft import world

    rows_ = world.vqa_dataset(2, seed=0, size=64)
    torch.manual_seed(0)
    model = bp.get_peft_model(bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa), bp.LoraConfig(**LORA))
    result = bp.train(model, processor, rows_, epochs=3, learning_rate=1e-2, progress=False)
    assert result.global_step == 3 * -(-len(rows_) // 8) and result.losses[-1] < result.losses[0]


def test_fp16_trains_with_the_loss_scaler(tiny_vqa: str, processor) -> None:
    def run(precision: str):
        torch.manual_seed(0)  # the adapter's initial A
        model = bp.get_peft_model(bp.BlipForQuestionAnswering.from_pretrained(tiny_vqa), bp.LoraConfig(**LORA))
        return bp.train(model, processor, rows(8), max_steps=3, batch_size=4, shuffle=False, learning_rate=1e-2,
                        mixed_precision=precision, logging_steps=1, progress=False)  # fmt: skip

    fp32, fp16 = run("no"), run("fp16")
    assert not any(h["skipped"] for h in fp16.history)
    for a, b in zip(fp32.losses, fp16.losses, strict=True):
        assert abs(a - b) <= 2e-2 * abs(a), (a, b)


DDP_SCRIPT = """
import sys, numpy as np, torch, blip_peft as bp
checkpoint, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
g = torch.Generator().manual_seed(0)
answers = ["red", "blue", "green", "circle"]  # one token each, one question: every row scores as many tokens
rows = [{"image": (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy().astype(np.uint8),
         "question": "what colour is the circle?", "answer": answers[i % 4]} for i in range(8)]
processor = bp.BlipProcessor.from_pretrained(bp.bundled_model_path())
torch.manual_seed(0)
lora = bp.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "qkv"], init_lora_weights=False)
model = bp.get_peft_model(bp.BlipForQuestionAnswering.from_pretrained(checkpoint), lora)
result = bp.train(model, processor, rows, max_steps=4, batch_size=batch, learning_rate=1e-2, seed=5,
                  mixed_precision="no", output_dir=out, progress=False, logging_steps=1)
print("losses", result.losses, flush=True)
"""


def test_torchrun_two_processes_equal_one_with_twice_the_batch(tmp_path, tiny_vqa: str) -> None:
    import os
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun comes with torch")
    script = tmp_path / "ddp_vqa.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(args: list[str]) -> None:
        done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]

    run([sys.executable, str(script), tiny_vqa, str(tmp_path / "single"), "4"])
    run([torchrun, "--nproc_per_node=2", "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
         str(script), tiny_vqa, str(tmp_path / "ddp"), "2"])  # fmt: skip
    one = load_file(tmp_path / "single" / "adapter_model.safetensors")
    two = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        assert rel_err(two[name], one[name]) <= 1e-5, name
