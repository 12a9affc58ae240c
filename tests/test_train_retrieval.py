"""`blip_peft.train` on the retrieval head (`BlipForImageTextRetrieval`, BLIP's ITC + ITM hard-negative losses with
the learned temperature) against a plain torch loop over transformers + peft + torch.optim.AdamW: the first step's
loss, a few steps' losses, adapter and temperature, accumulation, bf16 judged against float32, checkpoints and
resume, evaluation, the `train_retrieval` wrapper, bad datasets."""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_model, rel_err
from transformers import BlipConfig
from transformers import BlipForImageTextRetrieval as HFRetrieval

import blip_peft as bp
from blip_peft.presets import RETRIEVAL_TARGETS, TINY_TEXT, TINY_VISION

pytestmark = pytest.mark.cpu_isa

LORA = dict(r=4, lora_alpha=8, target_modules=RETRIEVAL_TARGETS)
TEXTS = ["a red circle", "two blue squares", "a star", "a green triangle on the left", "three stars", "nothing"]


@pytest.fixture(scope="module")
def processor() -> bp.BlipProcessor:
    return bp.BlipProcessor.from_pretrained(bp.bundled_model_path())


@pytest.fixture(scope="module")
def tiny_itm(tmp_path_factory: pytest.TempPathFactory, processor: bp.BlipProcessor) -> str:
    tok = processor.tokenizer
    text = dict(
        TINY_TEXT,
        vocab_size=len(tok),
        bos_token_id=tok.cls_token_id,
        pad_token_id=tok.pad_token_id,
        sep_token_id=tok.sep_token_id,
        eos_token_id=tok.sep_token_id,
        max_position_embeddings=64,
    )
    size = processor.image_processor.size["height"]
    config = BlipConfig(
        text_config=text, vision_config=dict(TINY_VISION, image_size=size, patch_size=16), image_text_hidden_size=16
    )
    path = tmp_path_factory.mktemp("tiny_itm_train")
    make_hf_model(config, seed=9, cls=HFRetrieval).save_pretrained(path)
    return str(path)


def pairs(n: int = 12, seed: int = 0) -> list[dict]:
    """Image-text pairs; every third pair repeats the previous image (the same image id): a positive pair."""
    g = torch.Generator().manual_seed(seed)
    out: list[dict] = []
    for i in range(n):
        if i % 3 == 2:
            out.append({"image": out[-1]["image"], "text": TEXTS[(i + 1) % 6], "image_id": out[-1]["image_id"]})
            continue
        image = (torch.rand(20, 24 + i % 2, 3, generator=g) * 255).to(torch.uint8).numpy().astype(np.uint8)
        out.append({"image": image, "text": TEXTS[i % 6], "image_id": 100 + i})
    return out


def peft_pair(checkpoint: str, tmp_path):
    ours = bp.get_peft_model(bp.BlipForImageTextRetrieval.from_pretrained(checkpoint), bp.LoraConfig(**LORA))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ours.save_pretrained(tmp_path / "start")
    ref = peft.PeftModel.from_pretrained(
        HFRetrieval.from_pretrained(checkpoint), tmp_path / "start", is_trainable=True
    )
    return ours, ref


def wrap64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def step_seed(seed: int, step: int, micro: int) -> int:
    """The trainer's dropout seed of a micro-batch, which its hard-negative draws use too."""
    return wrap64(seed * 1_000_003 + step * 64 + micro)


def torch_losses(ref, processor, data, temp, draw_seed: int):
    """BLIP's ITC + ITM in plain torch over transformers' (peft-wrapped) modules; the hard negatives drawn under
    `draw_seed` from the similarities' softmax with the positives zeroed."""
    enc = processor(images=[r["image"] for r in data], text=[r["text"] for r in data], padding=True,
                    return_tensors="pt")  # fmt: skip
    px, ids, mask = enc["pixel_values"], enc["input_ids"], enc["attention_mask"]
    image_ids = torch.tensor([r["image_id"] for r in data])
    base = ref.get_base_model() if hasattr(ref, "get_base_model") else ref
    with torch.no_grad():
        temp.clamp_(0.001, 0.5)
    image_embeds = base.vision_model(pixel_values=px).last_hidden_state
    text = base.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    image_feat = F.normalize(base.vision_proj(image_embeds[:, 0, :]), dim=-1)
    text_feat = F.normalize(base.text_proj(text[:, 0, :]), dim=-1)
    sim_i2t = image_feat @ text_feat.t() / temp
    sim_t2i = text_feat @ image_feat.t() / temp
    pos = image_ids.view(-1, 1) == image_ids.view(1, -1)
    targets = pos.float() / pos.float().sum(1, keepdim=True)
    itc = (
        -torch.sum(F.log_softmax(sim_i2t, dim=1) * targets, dim=1).mean()
        - torch.sum(F.log_softmax(sim_t2i, dim=1) * targets, dim=1).mean()
    ) / 2
    with torch.no_grad():
        w_i2t = F.softmax(sim_i2t, dim=1).masked_fill(pos, 0)
        w_t2i = F.softmax(sim_t2i, dim=1).masked_fill(pos, 0)
        torch.manual_seed(draw_seed)
        neg_images = torch.multinomial(w_t2i, 1).squeeze(1)
        neg_texts = torch.multinomial(w_i2t, 1).squeeze(1)

    def matching(ids_, mask_, embeds):
        atts = torch.ones(embeds.shape[:-1], dtype=torch.long)
        h = base.text_encoder(
            input_ids=ids_, attention_mask=mask_, encoder_hidden_states=embeds, encoder_attention_mask=atts
        ).last_hidden_state
        return base.itm_head(h[:, 0, :])

    logits = torch.cat([
        matching(ids, mask, image_embeds),
        matching(torch.cat([ids, ids[neg_texts]]), torch.cat([mask, mask[neg_texts]]),
                 torch.cat([image_embeds[neg_images], image_embeds])),
    ])  # fmt: skip
    b = px.shape[0]
    labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)])
    return itc + F.cross_entropy(logits, labels)


def reference_run(ref, processor, data, steps, batch, lr, wd, seed=0, accum=1):
    """A plain torch loop: AdamW (the temperature in a group without weight decay), clipping at 1.0 over every
    trained tensor, linear decay, batches in order."""
    ref.train()
    temp = torch.tensor(0.07, requires_grad=True)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "weight_decay": wd}, {"params": [temp], "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (steps - s) / steps))
    micro_per_epoch = -(-len(data) // batch)
    losses, micro = [], 0
    for step in range(steps):
        total = 0.0
        group = min(accum, micro_per_epoch - (micro % micro_per_epoch))
        for m in range(group):
            s = (micro % micro_per_epoch) * batch
            loss = torch_losses(ref, processor, data[s : s + batch], temp, step_seed(seed, step, m))
            (loss / group).backward()
            total += loss.item() / group
            micro += 1
        losses.append(total)
        torch.nn.utils.clip_grad_norm_([*params, temp], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    with torch.no_grad():
        temp.clamp_(0.001, 0.5)
    return losses, float(temp.detach())


def test_first_step_loss_equals_plain_torch_over_transformers_and_peft(tmp_path, tiny_itm: str, processor) -> None:
    ours, ref = peft_pair(tiny_itm, tmp_path)
    data = pairs(6)
    result = bp.train(ours, processor, data, max_steps=1, batch_size=6, shuffle=False, mixed_precision="no",
                      progress=False)  # fmt: skip
    ref.train()
    want = torch_losses(ref, processor, data, torch.tensor(0.07), step_seed(0, 0, 0)).item()
    assert abs(result.losses[0] - want) <= 1e-5 * abs(want), (result.losses[0], want)


@pytest.mark.parametrize(("accum", "checkpointing"), [(1, False), (2, False), (1, True)])
def test_steps_equal_a_torch_loop(tmp_path, tiny_itm: str, processor, accum: int, checkpointing: bool) -> None:
    ours, ref = peft_pair(tiny_itm, tmp_path)
    data = pairs(12)
    steps = 4
    batch = 6 // accum
    result = bp.train(
        ours, processor, data, max_steps=steps, batch_size=batch,
        learning_rate=1e-2, weight_decay=0.01, shuffle=False, mixed_precision="no", logging_steps=1, progress=False,
        gradient_accumulation_steps=accum, gradient_checkpointing=checkpointing,
    )  # fmt: skip
    expected, temp = reference_run(ref, processor, data, steps, batch, 1e-2, 0.01, accum=accum)
    for got, want in zip(result.losses, expected, strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (got, want)
    # Adam's normalised updates carry float32 rounding of the gradients into the weights: 1e-4, as the
    # captioner's trainer tests judge them.
    assert result.temp == pytest.approx(temp, rel=1e-4) and result.temp != pytest.approx(0.07)
    mine = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        if "lora_" in name:
            assert rel_err(mine[name], p) <= 1e-4, name


def test_bf16_is_judged_against_float32(tiny_itm: str, processor) -> None:
    def run(precision: str) -> list[float]:
        torch.manual_seed(0)  # the adapter's initial A
        model = bp.get_peft_model(bp.BlipForImageTextRetrieval.from_pretrained(tiny_itm), bp.LoraConfig(**LORA))
        return bp.train(model, processor, pairs(12), max_steps=3, batch_size=6, shuffle=False, learning_rate=1e-2,
                        mixed_precision=precision, logging_steps=1, progress=False).losses  # fmt: skip

    for a, b in zip(run("no"), run("bf16"), strict=True):
        assert abs(a - b) <= 2e-2 * abs(a), (a, b)


def test_checkpoint_and_resume_equal_the_uninterrupted_run(tmp_path, tiny_itm: str, processor) -> None:
    def model():
        torch.manual_seed(1)
        return bp.get_peft_model(
            bp.BlipForImageTextRetrieval.from_pretrained(tiny_itm), bp.LoraConfig(**LORA, init_lora_weights=False)
        )

    common = dict(batch_size=4, learning_rate=1e-2, mixed_precision="no", logging_steps=1, progress=False, seed=3)
    whole = model()
    full = bp.train(whole, processor, pairs(), max_steps=6, **common)
    out = tmp_path / "out"
    stop = lambda log: log["step"] >= 3  # noqa: E731
    part = bp.train(model(), processor, pairs(), max_steps=6, output_dir=out, save_steps=3, callback=stop, **common)
    assert part.interrupted and part.global_step == 3
    saved = json.loads((out / "checkpoint-3" / "retrieval_config.json").read_text())["temp"]
    assert saved == pytest.approx(part.temp)
    resumed = model()
    rest = bp.train(resumed, processor, pairs(), max_steps=6, output_dir=out, resume_from_checkpoint=True, **common)
    for a, b in zip(rest.losses, full.losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (a, b)
    assert rest.temp == pytest.approx(full.temp, rel=1e-6)
    theirs = dict(whole.named_parameters())
    for n, p in resumed.named_parameters():
        if "lora_" in n:
            assert rel_err(p, theirs[n]) <= 1e-5, n
    # peft's adapter files and the temperature beside them.
    assert json.loads((out / "retrieval_config.json").read_text())["temp"] == pytest.approx(rest.temp)
    peft.PeftModel.from_pretrained(HFRetrieval.from_pretrained(tiny_itm), out)


def test_eval_loss_equals_plain_torch_with_the_trained_adapter(tmp_path, tiny_itm: str, processor) -> None:
    torch.manual_seed(0)  # the adapter's initial A
    model = bp.get_peft_model(bp.BlipForImageTextRetrieval.from_pretrained(tiny_itm), bp.LoraConfig(**LORA))
    evaluation = pairs(6, seed=5)
    result = bp.train(model, processor, pairs(12), eval_dataset=evaluation, max_steps=4, eval_steps=2, batch_size=6,
                      learning_rate=1e-2, mixed_precision="no", progress=False)  # fmt: skip
    assert [s for s, _ in result.eval_history] == [2, 4]
    model.save_pretrained(tmp_path / "final")
    ref = peft.PeftModel.from_pretrained(HFRetrieval.from_pretrained(tiny_itm), tmp_path / "final").eval()
    with torch.no_grad():
        want = torch_losses(ref, processor, evaluation, torch.tensor(result.temp), 0).item()
    assert abs(result.eval_history[-1][1] - want) <= 1e-5 * abs(want)


def test_feature_cache_serves_the_frozen_vision_tower_bit_for_bit(tiny_itm: str, processor) -> None:
    def run(cache: bool):
        torch.manual_seed(0)  # the adapter's initial A
        text_only = dict(LORA, target_modules=r"text_encoder\..*\.(query|value)")
        model = bp.get_peft_model(bp.BlipForImageTextRetrieval.from_pretrained(tiny_itm), bp.LoraConfig(**text_only))
        return bp.train(model, processor, pairs(12), epochs=3, batch_size=6, feature_cache=cache,
                        mixed_precision="no", logging_steps=1, progress=False)  # fmt: skip

    cached, plain = run(True), run(False)
    assert cached.feature_cache["enabled"] and cached.feature_cache["hits"] == 24
    assert cached.losses == plain.losses and cached.temp == plain.temp


def test_train_retrieval_is_a_wrapper_over_train(tmp_path, tiny_itm: str, processor) -> None:
    data = [{k: v for k, v in r.items() if k != "image_id"} for r in pairs(8)]

    def model():
        torch.manual_seed(0)
        return bp.get_peft_model(bp.BlipForImageTextRetrieval.from_pretrained(tiny_itm), bp.LoraConfig(**LORA))

    old = bp.train_retrieval(model(), processor, data, per_device_train_batch_size=4, num_train_epochs=2,
                             learning_rate=1e-2, output_dir=str(tmp_path / "a"))  # fmt: skip
    new = bp.train(model(), processor, data, batch_size=4, epochs=2, learning_rate=1e-2, logging_steps=1,
                   max_length=64, progress=False, output_dir=tmp_path / "b")  # fmt: skip
    assert old.global_step == new.global_step == 4
    assert [h["loss"] for h in old.log_history] == new.losses
    assert old.temp == new.temp


def test_bad_datasets_name_the_missing_field_and_the_head(tiny_itm: str, processor) -> None:
    torch.manual_seed(0)  # the adapter's initial A
    model = bp.get_peft_model(bp.BlipForImageTextRetrieval.from_pretrained(tiny_itm), bp.LoraConfig(**LORA))
    vqa_rows = [{"image": r["image"], "question": "what?", "answer": "x"} for r in pairs(2)]
    with pytest.raises(ValueError, match=r"'text'.*BlipForImageTextRetrieval"):
        bp.train(model, processor, vqa_rows, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        bp.train(model, processor, pairs(4), batch_size=1, progress=False)
    with pytest.raises(TypeError, match="'image_id' must be an int"):
        bp.train(model, processor, [dict(r, image_id=1.5) for r in pairs(2)], progress=False)
