"""LoRA against peft (the oracle): parameter counts, names, printouts, adapter files both ways, invariants."""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch
from conftest import make_hf_model, rel_err, tiny_batch, tiny_hf_config
from safetensors.torch import load_file, save_file
from transformers import BlipConfig
from transformers import BlipForConditionalGeneration as HFBlip

import blip_peft as bp
from blip_peft.presets import BASE_TEXT, BASE_VISION

# Logits against peft's rest on the kernels the CPU's instruction set picks: `make test` runs these twice.
pytestmark = pytest.mark.cpu_isa


def _ours(checkpoint: str) -> bp.BlipForConditionalGeneration:
    return bp.BlipForConditionalGeneration.from_pretrained(checkpoint)


def _perturb(named_params, seed: int = 0) -> None:
    """Gives every adapter weight (and every modules_to_save copy) random values, so one that is not
    applied shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if "lora_" in name or ".modules_to_save." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _logits(model, batch) -> torch.Tensor:
    px, ids, mask = batch
    with torch.no_grad():
        return model(pixel_values=px, input_ids=ids, attention_mask=mask).logits


EXCHANGE_CONFIGS = {
    "linear": dict(r=4, lora_alpha=8, target_modules=["query", "value", "self_attn.qkv", "fc1"]),
    "conv": dict(r=4, lora_alpha=16, target_modules=["patch_embedding", "projection", "output.dense"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["key", "qkv"]),
    "regex": dict(r=2, lora_alpha=4, target_modules=r".*layer\.1\.attention\.self\.(query|value)"),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["query", "fc1", "patch_embedding"]),
    "dora_rslora": dict(r=4, lora_alpha=8, use_dora=True, use_rslora=True, target_modules=["value", "qkv"]),
    "patterns": dict(
        r=4, lora_alpha=8, target_modules=["query", "fc2"], rank_pattern={"fc2": 2}, alpha_pattern={"query": 3}
    ),
    # Whole modules trained next to the adapters: a LayerNorm, the Conv2d, a block (its dense is not adapted).
    "modules_to_save": dict(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value", "output.dense"],
        modules_to_save=["post_layernorm", "patch_embedding", "crossattention.output"],
    ),
}


@pytest.mark.parametrize("name", sorted(EXCHANGE_CONFIGS))
def test_our_adapter_loads_in_peft_with_same_logits(tmp_path, tiny_checkpoint: str, name: str) -> None:
    model = bp.get_peft_model(_ours(tiny_checkpoint), bp.LoraConfig(**EXCHANGE_CONFIGS[name]))
    _perturb(model.named_parameters())
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft only warns about missing/unexpected keys: make that fail
        ref = peft.PeftModel.from_pretrained(HFBlip.from_pretrained(tiny_checkpoint), tmp_path).eval()
    batch = tiny_batch()
    assert rel_err(_logits(model, batch), _logits(ref, batch)) <= 1e-5


@pytest.mark.parametrize("name", sorted(EXCHANGE_CONFIGS))
def test_peft_adapter_loads_here_with_same_logits(tmp_path, tiny_checkpoint: str, name: str) -> None:
    ref = peft.get_peft_model(HFBlip.from_pretrained(tiny_checkpoint), peft.LoraConfig(**EXCHANGE_CONFIGS[name]))
    _perturb(ref.named_parameters(), seed=1)
    ref.save_pretrained(tmp_path)
    model = bp.PeftModel.from_pretrained(_ours(tiny_checkpoint), tmp_path)
    batch = tiny_batch()
    assert rel_err(_logits(model, batch), _logits(ref.eval(), batch)) <= 1e-5
    assert model.get_nb_trainable_parameters()[0] == 0  # is_trainable=False, as in peft


NAMES_CONFIGS = {
    "lora": dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "qkv", "patch_embedding"]),
    "dora": dict(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "qkv", "patch_embedding"], use_dora=True
    ),
    "modules_to_save": dict(
        r=4, target_modules=["query", "fc1"], modules_to_save=["layer_norm2", "crossattention", "transform"]
    ),
}


@pytest.mark.parametrize("name", sorted(NAMES_CONFIGS))
def test_names_printout_and_counts_match_peft(tiny_checkpoint: str, capsys, name: str) -> None:
    config = NAMES_CONFIGS[name]
    ours = bp.get_peft_model(_ours(tiny_checkpoint), bp.LoraConfig(**config))
    ref = peft.get_peft_model(HFBlip.from_pretrained(tiny_checkpoint), peft.LoraConfig(**config))
    assert [(n, tuple(p.shape), p.requires_grad) for n, p in ours.named_parameters()] == [
        (n, tuple(p.shape), p.requires_grad) for n, p in ref.named_parameters()
    ]
    assert repr(ours) == repr(ref)
    ours.print_trainable_parameters()
    ref.print_trainable_parameters()
    mine, theirs = capsys.readouterr().out.splitlines()
    assert mine == theirs
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()


@pytest.fixture(scope="module")
def base_shapes_models():
    """Our real-shape model (random init) and transformers' on the meta device, tied and untied heads."""
    out = {}
    for tied in (True, False):
        text = dict(BASE_TEXT, tie_word_embeddings=tied)
        config = BlipConfig(text_config=text, vision_config=dict(BASE_VISION), tie_word_embeddings=tied)
        ours = bp.BlipForConditionalGeneration.from_config(config.to_dict())
        out[tied] = (ours, config)
    return out


COUNT_CONFIGS = [
    dict(r=16, target_modules=["query", "value"]),
    dict(r=8, target_modules=r".*vision_model.*self_attn\.(qkv|projection)"),
    dict(r=4, target_modules="all-linear"),
    dict(r=8, target_modules=["dense", "fc1"], exclude_modules=["intermediate.dense"]),
    dict(r=8, target_modules=["query", "fc1"], layers_to_transform=[0, 3]),
    dict(r=8, target_modules=["qkv", "projection", "key"], rank_pattern={"qkv": 4, r"layer\.2\..*key": 2}),
    dict(r=8, target_modules=["query"], bias="all"),
    dict(r=8, target_modules=["value", "fc2"], bias="lora_only"),
    dict(r=8, target_modules=["patch_embedding", "fc2"]),
    dict(r=8, target_modules=["query", "value"], modules_to_save=["post_layernorm", "crossattention"]),
]


# Every config on the tied head; the untied head where a config touches it.
COUNT_CASES = [(True, i) for i in range(len(COUNT_CONFIGS))] + [(False, 0), (False, 2), (False, 6), (False, 9)]


@pytest.mark.slow
@pytest.mark.parametrize(("tied", "index"), COUNT_CASES)
def test_parameter_counts_match_peft_on_real_shapes(base_shapes_models, tied: bool, index: int) -> None:
    ours, config = base_shapes_models[tied]
    with torch.device("meta"):
        ref_model = HFBlip(config)
    ref = peft.get_peft_model(ref_model, peft.LoraConfig(**COUNT_CONFIGS[index]))
    model = bp.get_peft_model(ours, bp.LoraConfig(**COUNT_CONFIGS[index]))
    try:
        assert model.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    finally:
        model.unload()
    if index == 0 and tied:
        assert ref.get_nb_trainable_parameters() == (1_179_648, 225_151_292)


def test_fresh_adapter_is_a_no_op(tiny_checkpoint: str) -> None:
    base = _ours(tiny_checkpoint)
    batch = tiny_batch()
    before = _logits(base, batch)
    model = bp.get_peft_model(base, bp.LoraConfig(r=4, target_modules="all-linear"))
    assert torch.equal(_logits(model, batch), before)


def test_only_adapters_change_after_a_step(tiny_checkpoint: str) -> None:
    model = bp.get_peft_model(_ours(tiny_checkpoint), bp.LoraConfig(r=4, target_modules=["query", "qkv"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    px, ids, mask = tiny_batch()
    model(pixel_values=px, input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p)
        if "lora_A" in name:  # B starts at zero, so A's gradient is zero on the first step
            continue
        assert changed == ("lora_B" in name), name


@pytest.mark.parametrize("use_dora", [False, True])
def test_disable_merge_unmerge_unload(tiny_checkpoint: str, use_dora: bool) -> None:
    base = _ours(tiny_checkpoint)
    batch = tiny_batch()
    plain = _logits(base, batch)
    base_weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    config = bp.LoraConfig(r=4, target_modules=["query", "fc1", "patch_embedding"], use_dora=use_dora)
    model = bp.get_peft_model(base, config)
    assert torch.equal(_logits(model, batch), plain)  # a fresh adapter (DoRA too) changes nothing
    _perturb(model.named_parameters())
    adapted = _logits(model, batch)
    assert rel_err(adapted, plain) > 1e-3
    with model.disable_adapter():
        assert torch.equal(_logits(model, batch), plain)
    assert torch.equal(_logits(model, batch), adapted)
    model.merge_adapter()
    assert rel_err(_logits(model, batch), adapted) <= 1e-5
    with model.disable_adapter():  # disabling unmerges: the base comes back
        assert rel_err(_logits(model, batch), plain) <= 1e-6
    model.unmerge_adapter()
    restored = model.unload()
    assert isinstance(restored, bp.BlipForConditionalGeneration)
    for name, p in restored.named_parameters():
        assert torch.allclose(p, base_weights[name], atol=1e-6), name
    assert [n for n, _ in restored.named_parameters()] == list(base_weights)


def test_merge_and_unload_saves_a_plain_checkpoint(tmp_path, tiny_checkpoint: str) -> None:
    model = bp.get_peft_model(_ours(tiny_checkpoint), bp.LoraConfig(r=4, target_modules=["value", "fc2"]))
    _perturb(model.named_parameters())
    batch = tiny_batch()
    adapted = _logits(model, batch)
    merged = model.merge_and_unload()
    assert rel_err(_logits(merged, batch), adapted) <= 1e-5
    merged.save_pretrained(tmp_path)
    ref, info = HFBlip.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert rel_err(_logits(ref.eval(), batch), adapted) <= 1e-5


def test_from_pretrained_on_adapter_folder_loads_base_and_adapter(tmp_path, tiny_checkpoint: str) -> None:
    model = bp.get_peft_model(_ours(tiny_checkpoint), bp.LoraConfig(r=4, target_modules=["query"]))
    _perturb(model.named_parameters())
    model.save_pretrained(tmp_path)
    with open(tmp_path / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == tiny_checkpoint
    reloaded = bp.AutoModelForVision2Seq.from_pretrained(tmp_path)
    assert isinstance(reloaded, bp.PeftModel)
    batch = tiny_batch()
    assert torch.equal(_logits(reloaded, batch), _logits(model, batch))


def test_task_type_is_harmless(tiny_checkpoint: str) -> None:
    config = bp.LoraConfig(r=4, target_modules=["query"], task_type="CAUSAL_LM")
    model = bp.get_peft_model(_ours(tiny_checkpoint), config)
    px, ids, mask = tiny_batch()
    assert model(pixel_values=px, input_ids=ids, labels=ids).loss.isfinite()


def test_multiple_adapters(tiny_checkpoint: str) -> None:
    model = bp.get_peft_model(_ours(tiny_checkpoint), bp.LoraConfig(r=4, target_modules=["query"]))
    _perturb(model.named_parameters(), seed=0)
    batch = tiny_batch()
    first = _logits(model, batch)
    model.add_adapter("other", bp.LoraConfig(r=2, target_modules=["value"]))
    assert model.active_adapter == "default"
    assert torch.equal(_logits(model, batch), first)
    _perturb([(n, p) for n, p in model.named_parameters() if ".other." in n], seed=5)
    model.set_adapter("other")
    second = _logits(model, batch)
    assert rel_err(second, first) > 1e-3
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".other." in n for n in trainable)
    model.delete_adapter("other")
    assert model.active_adapter == "default"
    assert torch.equal(_logits(model, batch), first)


def test_lora_targets_lists_layers(tiny_checkpoint: str) -> None:
    targets = bp.lora_targets(_ours(tiny_checkpoint))
    names = [t[0] for t in targets]
    assert ("vision_model.embeddings.patch_embedding", "Conv2d", (3, 32)) in targets
    assert "text_decoder.bert.encoder.layer.0.crossattention.self.key" in names
    assert "text_decoder.cls.predictions.decoder" in names


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        (dict(r=0), ValueError, "positive"),
        (dict(r=-2), ValueError, "positive"),
        (dict(r=2.5), TypeError, "r must be an int"),
        (dict(lora_dropout=1.0), ValueError, "lora_dropout"),
        (dict(lora_dropout=-0.1), ValueError, "lora_dropout"),
        (dict(bias="some"), ValueError, "bias"),
        (dict(init_lora_weights="magic"), ValueError, "init_lora_weights"),
        (dict(target_modules="(unclosed"), ValueError, "invalid regex"),
        (dict(target_modules=["q"], rank_pattern={"(bad": 2}), ValueError, "invalid regex"),
        (dict(target_modules="query", layers_to_transform=[0]), ValueError, "layers_to_transform"),
    ],
)
def test_bad_configs(kwargs, exc, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        bp.LoraConfig(**kwargs)


def test_targets_matching_nothing_list_the_names(tiny_checkpoint: str) -> None:
    model = _ours(tiny_checkpoint)
    with pytest.raises(ValueError, match=r"q_proj.*not found.*qkv.*query"):
        bp.get_peft_model(model, bp.LoraConfig(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="target_modules is required"):
        bp.get_peft_model(model, bp.LoraConfig())
    # The model is untouched by the failures.
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_rank_pattern_matching_nothing(tiny_checkpoint: str) -> None:
    model = _ours(tiny_checkpoint)
    with pytest.raises(ValueError, match="rank_pattern key"):
        bp.get_peft_model(model, bp.LoraConfig(target_modules=["query"], rank_pattern={"fc1": 2}))
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_adapter_for_other_shapes_is_rejected(tmp_path, tiny_checkpoint: str) -> None:
    ref = peft.get_peft_model(HFBlip.from_pretrained(tiny_checkpoint), peft.LoraConfig(r=4, target_modules=["query"]))
    ref.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(4, 31)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lora_A.weight.*\[4, 31\]"):
        bp.PeftModel.from_pretrained(_ours(tiny_checkpoint), tmp_path)


def test_missing_and_unexpected_adapter_keys_are_named(tmp_path, tiny_checkpoint: str) -> None:
    ref = peft.get_peft_model(HFBlip.from_pretrained(tiny_checkpoint), peft.LoraConfig(r=4, target_modules=["query"]))
    ref.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    tensors["base_model.model.mystery.lora_A.weight"] = torch.zeros(1)
    save_file(tensors, file, metadata={"format": "pt"})
    model = _ours(tiny_checkpoint)
    with pytest.raises(ValueError, match=rf"missing adapter keys: `{dropped}`.*unexpected.*mystery"):
        bp.PeftModel.from_pretrained(model, tmp_path)
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_wrong_key_prefix_is_an_error_not_a_silent_no_op(tmp_path, tiny_checkpoint: str) -> None:
    ref = peft.get_peft_model(HFBlip.from_pretrained(tiny_checkpoint), peft.LoraConfig(r=4, target_modules=["query"]))
    ref.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = {k.removeprefix("base_model.model."): v for k, v in load_file(file).items()}
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing adapter keys"):
        bp.PeftModel.from_pretrained(_ours(tiny_checkpoint), tmp_path)


def test_adapter_folder_errors(tmp_path, tiny_checkpoint: str) -> None:
    with pytest.raises(FileNotFoundError):
        bp.PeftModel.from_pretrained(_ours(tiny_checkpoint), tmp_path / "nope")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["query"]}))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        bp.PeftModel.from_pretrained(_ours(tiny_checkpoint), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="only LoRA"):
        bp.PeftModel.from_pretrained(_ours(tiny_checkpoint), tmp_path)


def test_modules_to_save_train_save_and_unload_as_in_peft(tmp_path, tiny_checkpoint: str) -> None:
    config = dict(r=4, target_modules=["query", "qkv"], modules_to_save=["post_layernorm", "transform"])
    batch = tiny_batch()
    base = _ours(tiny_checkpoint)
    plain = _logits(base, batch)
    model = bp.get_peft_model(base, bp.LoraConfig(**config))
    assert torch.equal(_logits(model, batch), plain)  # the copies start equal to the originals
    # A step changes only the adapters and the copies; the originals stay.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    px, ids, mask = batch
    model(pixel_values=px, input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if "lora_A" in name:
            continue
        assert (not torch.equal(before[name], p)) == ("lora_B" in name or ".modules_to_save." in name), name
    _perturb(model.named_parameters(), seed=3)
    adapted = _logits(model, batch)
    with model.disable_adapter():
        assert torch.equal(_logits(model, batch), plain)
    assert torch.equal(_logits(model, batch), adapted)
    # peft reads the copies from our file and unloads to the same model.
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.vision_model.post_layernorm.weight" in keys
    ref = peft.PeftModel.from_pretrained(HFBlip.from_pretrained(tiny_checkpoint), tmp_path).eval()
    assert rel_err(_logits(ref, batch), adapted) <= 1e-5
    ref_merged = ref.merge_and_unload()
    merged = model.merge_and_unload()
    assert [n for n, _ in merged.named_parameters()] == [n for n, _ in ref_merged.named_parameters()]
    assert rel_err(_logits(merged, batch), _logits(ref_merged, batch)) <= 1e-5
    merged.save_pretrained(tmp_path / "merged")
    reloaded = HFBlip.from_pretrained(tmp_path / "merged").eval()
    assert rel_err(_logits(reloaded, batch), adapted) <= 1e-5


def test_modules_to_save_with_two_adapters(tiny_checkpoint: str) -> None:
    model = bp.get_peft_model(
        _ours(tiny_checkpoint), bp.LoraConfig(r=4, target_modules=["query"], modules_to_save=["post_layernorm"])
    )
    _perturb(model.named_parameters(), seed=0)
    batch = tiny_batch()
    first = _logits(model, batch)
    model.add_adapter("other", bp.LoraConfig(r=2, target_modules=["value"], modules_to_save=["post_layernorm"]))
    assert torch.equal(_logits(model, batch), first)
    _perturb([(n, p) for n, p in model.named_parameters() if ".other." in n], seed=5)
    model.set_adapter("other")
    assert rel_err(_logits(model, batch), first) > 1e-3
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "base_model.model.vision_model.post_layernorm.modules_to_save.other.weight" in trainable
    assert all(".other." in n for n in trainable)
    model.delete_adapter("other")
    assert torch.equal(_logits(model, batch), first)


def test_modules_to_save_errors(tiny_checkpoint: str) -> None:
    model = _ours(tiny_checkpoint)
    with pytest.raises(ValueError, match="matches no module"):
        bp.get_peft_model(model, bp.LoraConfig(target_modules=["query"], modules_to_save=["lm_head"]))
    # "decoder" ends the whole text decoder's path, which holds the adapted query layers.
    with pytest.raises(ValueError, match="holds the LoRA layer"):
        bp.get_peft_model(model, bp.LoraConfig(target_modules=["query"], modules_to_save=["decoder"]))
    with pytest.raises(ValueError, match="tied to the word embeddings"):
        bp.get_peft_model(model, bp.LoraConfig(target_modules=["query"], modules_to_save=["cls"]))
    with pytest.raises(ValueError, match="not a valid pattern"):
        bp.LoraConfig(target_modules=["query"], modules_to_save=["(bad"])
    # The model is untouched by the failures.
    assert not any("lora" in n or "modules_to_save" in n for n, _ in model.named_parameters())


def test_half_precision_base_keeps_float32_adapters(tiny_checkpoint: str) -> None:
    base = bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    model = bp.get_peft_model(base, bp.LoraConfig(r=4, target_modules=["query", "patch_embedding"]))
    kinds = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in kinds.items() if "lora_" in n)
    assert all(d == torch.bfloat16 for n, d in kinds.items() if "lora_" not in n)
    ref = peft.get_peft_model(
        HFBlip.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16),
        peft.LoraConfig(r=4, target_modules=["query", "patch_embedding"]),
    )
    _perturb(model.named_parameters())
    _perturb(ref.named_parameters())
    px, ids, mask = tiny_batch()
    out = model(pixel_values=px, input_ids=ids, labels=ids)
    expected = ref(pixel_values=px.to(torch.bfloat16), input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    assert rel_err(out.logits, expected.logits) <= 2e-2
    out.loss.backward()
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n
    )


def test_make_hf_model_helper_is_deterministic() -> None:
    a = make_hf_model(tiny_hf_config(), seed=3)
    b = make_hf_model(tiny_hf_config(), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_init_as_peft(tiny_checkpoint: str, init: str) -> None:
    """The adapters take W's principal part and the base keeps the rest, as peft computes them: the model's
    output is unchanged at first, and the adapter and residual weights equal peft's."""
    config = dict(r=4, lora_alpha=8, target_modules=["query", "value", "qkv", "fc2"], init_lora_weights=init)
    batch = tiny_batch()
    base = _ours(tiny_checkpoint)
    plain = _logits(base, batch)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = bp.get_peft_model(base, bp.LoraConfig(**config))
    ref = peft.get_peft_model(HFBlip.from_pretrained(tiny_checkpoint), peft.LoraConfig(**config)).eval()
    theirs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert torch.allclose(p, theirs[name], atol=1e-5), name
    residual = "base_model.model.text_decoder.bert.encoder.layer.0.attention.self.query.base_layer.weight"
    assert not torch.allclose(
        theirs[residual], original[residual.removeprefix("base_model.model.").replace(".base_layer", "")]
    )
    assert rel_err(_logits(model, batch), plain) <= 1e-5
    assert rel_err(_logits(model, batch), _logits(ref, batch)) <= 1e-5
    assert model.peft_config["default"].to_dict()["init_lora_weights"] == init


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_refuse_conv2d_and_leave_the_model_alone(tiny_checkpoint: str, init: str) -> None:
    model = _ours(tiny_checkpoint)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="Unknown initialization"):
        bp.get_peft_model(model, bp.LoraConfig(target_modules=["query", "patch_embedding"], init_lora_weights=init))
    # Nothing was rewritten by the failed attempt (the check comes before any layer changes).
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_rank_pattern_first_match_in_given_order(tiny_checkpoint: str) -> None:
    # Both keys match layer 0's query; peft takes the first in the dict's order (not sorted order).
    config = dict(r=8, target_modules=["query"], rank_pattern={"query": 2, r"layer\.0\..*query": 3})
    ours = bp.get_peft_model(_ours(tiny_checkpoint), bp.LoraConfig(**config))
    ref = peft.get_peft_model(HFBlip.from_pretrained(tiny_checkpoint), peft.LoraConfig(**config))
    shapes = [(n, tuple(p.shape)) for n, p in ours.named_parameters() if "lora_" in n]
    assert shapes == [(n, tuple(p.shape)) for n, p in ref.named_parameters() if "lora_" in n]
    assert {s[0] for _, s in shapes if len(s) == 2} == {2, 32}
