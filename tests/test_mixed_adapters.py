"""Mixed-adapter batches (peft's `adapter_names`): each row runs its own adapter in both towers, in one batch.

Oracles: peft's own mixed batch (`forward` / `generate(adapter_names=...)`, LoRA, greedy: peft refuses DoRA and
cannot run BLIP's vision tower under beam search), and each row run alone with its adapter (every case)."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import rel_err, tiny_batch
from transformers import BlipForConditionalGeneration as HFBlip

import blip_peft as bp

# Adapters of different ranks and targets, in both towers (the patch-embedding Conv2d, the fused qkv, the
# decoder's self- and cross-attention, the MLPs and the LM head's input).
LORA = {
    "cats": dict(r=4, lora_alpha=8, target_modules=["query", "value", "self_attn.qkv", "fc1", "patch_embedding"]),
    "dogs": dict(r=2, lora_alpha=6, target_modules=["query", "key", "value", "fc2", "output.dense"]),
    "birds": dict(r=8, lora_alpha=4, target_modules=["qkv", "crossattention.self.key", "intermediate.dense"]),
}
DORA = {
    "dora1": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["query", "value", "qkv", "patch_embedding"]),
    "dora2": dict(r=2, lora_alpha=4, use_dora=True, target_modules=["key", "fc1", "output.dense"]),
}
ROWS = ["cats", "__base__", "dogs", "birds", "cats", "dogs"]


def _perturb(named_params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _adapter_folders(tmp_path, checkpoint: str, configs: dict) -> dict[str, str]:
    """Adapters made by peft (random weights), saved as folders."""
    folders = {}
    for i, (name, cfg) in enumerate(configs.items()):
        ref = peft.get_peft_model(HFBlip.from_pretrained(checkpoint), peft.LoraConfig(**cfg))
        _perturb(ref.named_parameters(), seed=10 + i)
        if cfg.get("use_dora"):
            # A magnitude away from its initial value (the weight norm), so DoRA's rescaling shows.
            with torch.no_grad():
                for n, p in ref.named_parameters():
                    if "lora_magnitude_vector" in n:
                        p.mul_(1.0 + 0.2 * torch.rand(p.shape, generator=torch.Generator().manual_seed(i)))
        folders[name] = str(tmp_path / name)
        ref.save_pretrained(folders[name])
    return folders


def _ours(checkpoint: str, folders: dict[str, str]) -> bp.PeftModel:
    names = list(folders)
    model = bp.PeftModel.from_pretrained(
        bp.BlipForConditionalGeneration.from_pretrained(checkpoint), folders[names[0]], names[0]
    )
    for n in names[1:]:
        model.load_adapter(folders[n], n)
    return model.eval()


def _peft(checkpoint: str, folders: dict[str, str]) -> peft.PeftModel:
    names = list(folders)
    model = peft.PeftModel.from_pretrained(HFBlip.from_pretrained(checkpoint), folders[names[0]], names[0])
    for n in names[1:]:
        model.load_adapter(folders[n], n)
    return model.eval()


@pytest.fixture(scope="module")
def lora_folders(tmp_path_factory, tiny_checkpoint: str) -> dict[str, str]:
    return _adapter_folders(tmp_path_factory.mktemp("lora"), tiny_checkpoint, LORA)


@pytest.fixture(scope="module")
def dora_folders(tmp_path_factory, tiny_checkpoint: str) -> dict[str, str]:
    return _adapter_folders(tmp_path_factory.mktemp("dora"), tiny_checkpoint, {**DORA, "cats": LORA["cats"]})


def _alone(model: bp.PeftModel, name: str, fn):
    """`fn()` with only adapter `name` active (the base model for "__base__")."""
    if name == "__base__":
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    return fn()


def _staggered_ends(captions: torch.Tensor) -> list[int]:
    """Tokens the captions first reach at the most different steps (never, for some): end tokens to try."""
    spread = {}
    for tok in captions[:, 1:].unique().tolist():
        hits = captions[:, 1:] == tok
        first = torch.where(hits.any(1), hits.float().argmax(1), torch.tensor(captions.shape[1]))
        spread[int(tok)] = len(set(first.tolist()))
    return sorted(spread, key=lambda t: -spread[t])[:8]


def test_forward_logits_equal_peft_mixed_batch(tiny_checkpoint, lora_folders) -> None:
    ours, ref = _ours(tiny_checkpoint, lora_folders), _peft(tiny_checkpoint, lora_folders)
    px, ids, mask = tiny_batch(batch=len(ROWS), seed=3)
    with torch.no_grad():
        got = ours(pixel_values=px, input_ids=ids, attention_mask=mask, adapter_names=ROWS)
        want = ref(pixel_values=px, input_ids=ids, attention_mask=mask, adapter_names=ROWS)
    assert rel_err(got.logits, want.logits) <= 1e-5
    assert rel_err(got.image_embeds, want.image_embeds) <= 1e-5
    # Each row alone with its adapter gives the same logits (and the active adapter does not matter).
    for i, name in enumerate(ROWS):
        alone = _alone(ours, name, lambda i=i: ours(pixel_values=px[i : i + 1], input_ids=ids[i : i + 1]).logits)
        assert rel_err(got.logits[i : i + 1], alone) <= 1e-5, name


def test_generate_token_equal_to_peft_mixed_batch(tiny_checkpoint, lora_folders) -> None:
    ours, ref = _ours(tiny_checkpoint, lora_folders), _peft(tiny_checkpoint, lora_folders)
    px, _, _ = tiny_batch(batch=len(ROWS), seed=4)
    got = ours.generate(pixel_values=px, adapter_names=ROWS, max_new_tokens=12)
    with torch.no_grad():
        want = ref.generate(pixel_values=px, adapter_names=ROWS, max_new_tokens=12)
    assert torch.equal(got, want)
    # The adapters differ: the mixed batch is not one adapter's captions.
    assert len({tuple(r.tolist()) for r in got}) > 2


@pytest.mark.parametrize(
    "settings",
    [
        dict(max_new_tokens=12),
        dict(max_new_tokens=12, num_beams=3),
        dict(max_new_tokens=10, num_beams=3, num_return_sequences=2),
        dict(max_new_tokens=10, num_beams=2, min_new_tokens=3, early_stopping=True),
    ],
    ids=["greedy", "beams", "beams_return2", "beams_early"],
)
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_generate_token_equal_to_each_row_alone(tiny_checkpoint, lora_folders, dora_folders, settings, kind) -> None:
    folders = lora_folders if kind == "lora" else dora_folders
    rows = ROWS if kind == "lora" else ["dora1", "cats", "__base__", "dora2", "dora1", "cats"]
    ours = _ours(tiny_checkpoint, folders)
    px, _, _ = tiny_batch(batch=len(rows), seed=5)
    # An end token that some rows reach mid-caption and others do not, so rows (and images) leave the batch at
    # different steps and the row -> adapter map has to follow them.
    free = ours.generate(pixel_values=px, adapter_names=rows, max_new_tokens=12)
    for eos in _staggered_ends(free):
        got = ours.generate(pixel_values=px, adapter_names=rows, **settings, eos_token_id=eos)
        steps = ours._native._last_generate_rows_per_step()
        if min(steps) < steps[0]:
            break
    if settings.get("num_beams", 1) == 1 or settings.get("early_stopping"):
        assert min(steps) < steps[0], steps  # rows (images, for beams) left mid-call
    settings = dict(settings, eos_token_id=eos)
    alone = [
        _alone(ours, name, lambda i=i: ours.generate(pixel_values=px[i : i + 1], **settings))
        for i, name in enumerate(rows)
    ]
    per_image = got.shape[0] // len(rows)
    for i, a in enumerate(alone):
        # Each image's sequences as alone; a batch pads the shorter ones after their end.
        assert torch.equal(got[i * per_image : (i + 1) * per_image, : a.shape[1]], a), rows[i]
    assert got.shape[1] == max(a.shape[1] for a in alone)


def test_prompts_and_ragged_prompts_follow_their_rows(tiny_checkpoint, lora_folders) -> None:
    ours = _ours(tiny_checkpoint, lora_folders)
    rows = ["dogs", "cats", "__base__", "birds"]
    px, ids, mask = tiny_batch(batch=4, seq=5, seed=6)
    mask[1, 3:] = 0
    mask[3, 2:] = 0
    for beams in (1, 3):
        got = ours.generate(px, ids, mask, adapter_names=rows, max_new_tokens=8, num_beams=beams)
        for i, name in enumerate(rows):
            n = int(mask[i].sum())
            alone = _alone(
                ours,
                name,
                lambda i=i, n=n, beams=beams: ours.generate(
                    px[i : i + 1], ids[i : i + 1, :n], max_new_tokens=8, num_beams=beams
                ),
            )
            assert torch.equal(got[i, : alone.shape[1]], alone[0]), (beams, name)


def test_dora_forward_mixed_equals_each_row_alone(tiny_checkpoint, dora_folders) -> None:
    """peft refuses DoRA in a mixed batch; each DoRA row equals peft's logits for that row alone."""
    ours, ref = _ours(tiny_checkpoint, dora_folders), _peft(tiny_checkpoint, dora_folders)
    rows = ["dora1", "dora2", "__base__", "cats", "dora1"]
    px, ids, mask = tiny_batch(batch=len(rows), seed=7)
    with torch.no_grad():
        got = ours(pixel_values=px, input_ids=ids, attention_mask=mask, adapter_names=rows).logits
    for i, name in enumerate(rows):
        with torch.no_grad():
            want = (
                ref(pixel_values=px[i : i + 1], input_ids=ids[i : i + 1], adapter_names=["__base__"]).logits
                if (name == "__base__")
                else _peft_alone(ref, name, px[i : i + 1], ids[i : i + 1])
            )
        assert rel_err(got[i : i + 1], want) <= 1e-5, name


def _peft_alone(ref: peft.PeftModel, name: str, px: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    ref.set_adapter(name)
    return ref(pixel_values=px, input_ids=ids).logits


def test_mixed_batch_leaves_the_model_as_it_was(tiny_checkpoint, lora_folders) -> None:
    """The selection is an argument of the call: afterwards the active adapter runs as before."""
    ours = _ours(tiny_checkpoint, lora_folders)
    ours.set_adapter("dogs")
    px, ids, _ = tiny_batch(batch=2, seed=8)
    before = ours(pixel_values=px, input_ids=ids).logits
    ours.generate(px, adapter_names=["cats", "birds"], max_new_tokens=5)
    ours(pixel_values=px, input_ids=ids, adapter_names=["birds", "__base__"])
    assert torch.equal(ours(pixel_values=px, input_ids=ids).logits, before)
    assert ours.active_adapter == "dogs"


def test_bad_adapter_names_are_clear_errors(tiny_checkpoint, lora_folders) -> None:
    ours = _ours(tiny_checkpoint, lora_folders)
    px, ids, _ = tiny_batch(batch=2, seed=9)
    with pytest.raises(ValueError, match="does not hold: nope"):
        ours.generate(px, adapter_names=["cats", "nope"])
    with pytest.raises(ValueError, match="has 3 names but the batch has 2"):
        ours.generate(px, adapter_names=["cats", "dogs", "birds"])
    with pytest.raises(ValueError, match="has 1 names but the batch has 2"):
        ours(pixel_values=px, input_ids=ids, adapter_names=["cats"])
    with pytest.raises(TypeError, match="list of adapter names"):
        ours.generate(px, adapter_names="cats")
    with pytest.raises(TypeError, match="str names"):
        ours.generate(px, adapter_names=["cats", 3])
    ours.train()
    with pytest.raises(ValueError, match="inference"):
        ours(pixel_values=px, input_ids=ids, adapter_names=["cats", "dogs"])
    ours.eval()
    ours.set_adapter("cats")
    ours.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        ours.generate(px, adapter_names=["cats", "dogs"])
    ours.unmerge_adapter()
    # The model keeps serving after each refusal.
    assert ours.generate(px, adapter_names=["cats", "dogs"], max_new_tokens=3).shape[0] == 2
