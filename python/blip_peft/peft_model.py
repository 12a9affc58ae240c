"""LoRA with peft's API: `LoraConfig`, `get_peft_model`, `PeftModel` and `lora_targets`.

The adapters live in the Rust core (attached to the model's Linear and Conv2d layers); this module
keeps peft's Python surface: configs, adapter names, saving and loading peft's file format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from blip_peft import _blip_peft
from blip_peft._convert import fspath, read_json_object
from blip_peft.modeling import BlipForConditionalGeneration, BlipPreTrainedModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: blip_peft's file next to an adapter's config: how the adapter captions (`{"prompt": ...}`, written when
#: `train(prompt=...)` trained it); peft ignores it.
CAPTION_CONFIG_NAME = "caption_config.json"


def _read_caption_prompt(path: str) -> str | None:
    file = os.path.join(path, CAPTION_CONFIG_NAME)
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as f:
        data = json.load(f)
    prompt = data.get("prompt") if isinstance(data, dict) else None
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"{file}: 'prompt' must be a string, got {prompt!r}")
    return prompt


PEFT_VERSION = "0.21.0"


@dataclass
class LoraConfig:
    """peft's `LoraConfig`: the same field names, defaults and checks.

    Args:
        r: adapter rank (> 0).
        lora_alpha: scaling numerator; the adapter output is scaled by `lora_alpha / r`
            (`lora_alpha / sqrt(r)` with `use_rslora`).
        lora_dropout: dropout on the adapter's input, in [0, 1).
        target_modules: a list (exact module names or dot-boundary suffixes such as "self_attn.qkv"),
            a regex string (full match) or "all-linear". `blip_peft.lora_targets(model)` lists the names.
        exclude_modules: modules never targeted, matched like `target_modules`.
        bias: "none", "all" (every bias trains) or "lora_only" (the biases of targeted layers train).
        modules_to_save: modules trained in full next to the adapters (those whose path ends with a name,
            e.g. "post_layernorm"): each adapter gets its own copy, saved under the module's own keys.
        init_lora_weights: True (A kaiming-uniform, B zeros: a no-op at first), False (both random),
            "gaussian", or "pissa" / "olora" (Linear only: A and B take W's principal part, W keeps the rest).
        rank_pattern / alpha_pattern: per-module rank / alpha by regex suffix, the first match in the given
            order wins.
        layers_to_transform / layers_pattern: restrict list targets to these layer indices.
        task_type: accepted and harmless (in peft, setting it breaks BLIP; here it changes nothing).
        inference_mode: adapters load frozen.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    revision: str | None = None

    peft_type = "LORA"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise TypeError(f"r must be an int, got {type(self.r).__name__}")
        for name in ("lora_alpha", "lora_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, frozenset, tuple)):
                setattr(self, name, sorted(value))
        if self.task_type is not None and not isinstance(self.task_type, str):
            self.task_type = str(getattr(self.task_type, "value", self.task_type))
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        # One set of checks, in the core: it raises ValueError naming the field.
        _blip_peft.normalize_lora_config(self._fields())

    def _fields(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        # As [key, value] pairs: JSON objects lose their order in the core, and the first matching key wins.
        for name in ("rank_pattern", "alpha_pattern"):
            if isinstance(fields[name], dict):
                fields[name] = [[k, v] for k, v in fields[name].items()]
        return fields

    def to_dict(self) -> dict[str, Any]:
        """The `adapter_config.json` document peft writes for this config."""
        doc = json.loads(_blip_peft.normalize_lora_config(self._fields()))
        doc["peft_version"] = PEFT_VERSION
        doc["revision"] = self.revision
        return doc

    def to_json(self) -> str:
        """`adapter_config.json`'s text as peft writes it (sorted keys, indent 2)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Writes `adapter_config.json`, atomically."""
        directory = fspath(save_directory, "save_directory")
        os.makedirs(directory, exist_ok=True)
        _blip_peft.write_text_atomic(os.path.join(directory, CONFIG_NAME), self.to_json())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """A config from peft's `adapter_config.json` fields; keys this version does not know are ignored."""
        if data.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"peft_type is {data.get('peft_type')!r}; only LoRA adapters are supported")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str]) -> LoraConfig:
        """Reads `adapter_config.json` from an adapter folder (or the file itself)."""
        path = fspath(pretrained_model_name_or_path, "pretrained_model_name_or_path")
        file = path if os.path.isfile(path) else os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{CONFIG_NAME} not found: {file!r}")
        return cls.from_dict(read_json_object(file))


PeftConfig = LoraConfig


def lora_targets(model: Any) -> list[tuple[str, str, tuple[int, int]]]:
    """The layers LoRA can target: `(module path, "Linear" | "Conv2d", (in, out))`, in module order: every
    Linear and Conv2d of the model's towers (for `BlipForQuestionAnswering` the question encoder's
    `text_encoder.encoder.layer.N.{attention,crossattention}.self.{query,key,value}`, `*.output.dense` and
    `intermediate.dense` too, between the vision tower's and the answer decoder's)."""
    native = _native_of(model)
    return [(path, kind, (i, o)) for path, kind, i, o in native.lora_targets()]


def _native_of(model: Any) -> Any:
    if isinstance(model, PeftModel):
        return model._native
    if isinstance(model, BlipPreTrainedModel):
        return model._native
    raise TypeError(
        "expected a blip_peft BlipForConditionalGeneration, BlipForQuestionAnswering or PeftModel, got "
        f"{type(model).__name__}"
    )


class LoraModel:
    """peft's `LoraModel`: the tuner layer between `PeftModel` and the wrapped model (`.model`)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        inner = repr(self.model).replace("\n", "\n  ")
        return f"LoraModel(\n  (model): {inner}\n)"


class PeftModel:
    """A BLIP model with LoRA adapters, as `peft.get_peft_model` returns it.

    Only the adapters (and the biases `bias` names) train; the base weights are frozen. The adapters are
    injected into the model in place, so the wrapped `BlipForConditionalGeneration` sees them too.
    """

    def __init__(self, model: Any, peft_config: LoraConfig, adapter_name: str = "default") -> None:
        if not isinstance(model, BlipPreTrainedModel):
            raise TypeError(
                "expected a blip_peft BlipForConditionalGeneration or BlipForQuestionAnswering, got "
                f"{type(model).__name__}"
            )
        if not isinstance(peft_config, LoraConfig):
            raise TypeError(f"peft_config must be a blip_peft.LoraConfig, got {type(peft_config).__name__}")
        self.base_model = LoraModel(model)
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter = adapter_name
        #: Each adapter's caption prompt (`train(prompt=...)`, `caption_config.json`), used by
        #: `blip_peft.generate` and `blip_peft.evaluate` when they are given none.
        self.caption_prompts: dict[str, str] = {}
        self._add(adapter_name, peft_config)
        self._refresh_trainable()

    @property
    def caption_prompt(self) -> str | None:
        """The active adapter's caption prompt (None: captions start from BOS alone)."""
        return self.caption_prompts.get(self.active_adapter)

    @caption_prompt.setter
    def caption_prompt(self, prompt: str | None) -> None:
        if prompt is None:
            self.caption_prompts.pop(self.active_adapter, None)
        elif not isinstance(prompt, str):
            raise TypeError(f"caption_prompt must be a string or None, got {type(prompt).__name__}")
        else:
            self.caption_prompts[self.active_adapter] = prompt

    @property
    def _native(self) -> Any:
        return self.base_model.model._native

    def _add(self, adapter_name: str, config: LoraConfig) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; choose another name")
        if config.base_model_name_or_path is None:
            config = dataclasses.replace(config, base_model_name_or_path=self.base_model.model.name_or_path or None)
        self._native.inject_lora(config._fields(), adapter_name)
        self.peft_config[adapter_name] = config

    def _refresh_trainable(self) -> None:
        config = self.peft_config[self.active_adapter]
        self._native.mark_trainable(self.active_adapter, config.bias)
        if config.inference_mode:
            for p in self.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------------------------------ running
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward with the active adapter."""
        return self.base_model.model(*args, **kwargs)

    __call__ = forward

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Captions with the active adapter (merged, unmerged or disabled as set); see
        `BlipForConditionalGeneration.generate`."""
        return self.base_model.model.generate(*args, **kwargs)

    def get_base_model(self) -> Any:
        return self.base_model.model

    def __getattr__(self, name: str) -> Any:
        # Anything peft does not define is the base model's (config, device, dtype, ...), as in peft.
        if name in ("base_model", "peft_config", "active_adapter"):
            raise AttributeError(name)
        return getattr(self.base_model.model, name)

    # --------------------------------------------------------------------------------------- parameters
    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Parameters with peft's names (`base_model.model.<path>.lora_A.default.weight`, ...)."""
        lead = f"{prefix}.base_model.model" if prefix else "base_model.model"
        yield from self.base_model.model.named_parameters(prefix=lead)

    def parameters(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        for _, p in self.named_parameters():
            yield p

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """`(trainable, all)` parameter counts as peft counts them (tied weights once, adapters included)."""
        trainable = total = 0
        for _, p in self.named_parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Prints peft's line: `trainable params: N || all params: M || trainable%: P`."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ---------------------------------------------------------------------------------------- adapters
    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        """Adds another adapter (inactive until `set_adapter`)."""
        if not isinstance(peft_config, LoraConfig):
            raise TypeError(f"peft_config must be a blip_peft.LoraConfig, got {type(peft_config).__name__}")
        self._add(adapter_name, peft_config)
        self._refresh_trainable()

    def set_adapter(self, adapter_name: str) -> None:
        """Makes `adapter_name` the active (and trainable) adapter."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; have {sorted(self.peft_config)}")
        self._native.set_active_adapter(adapter_name)
        self.active_adapter = adapter_name
        self._refresh_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; have {sorted(self.peft_config)}")
        if len(self.peft_config) == 1:
            raise ValueError("cannot delete the only adapter; use unload() to get the base model back")
        self._native.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        self.caption_prompts.pop(adapter_name, None)
        if self.active_adapter == adapter_name:
            self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes exactly the base model."""
        self._native.set_adapters_disabled(True)
        try:
            yield
        finally:
            self._native.set_adapters_disabled(False)

    def merge_adapter(self) -> None:
        """Adds the active adapter into the base weights (faster inference; `unmerge_adapter` undoes it)."""
        self._native.merge_adapters()

    def unmerge_adapter(self) -> None:
        self._native.unmerge_adapters()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False) -> Any:
        """Merges the active adapter into the base weights and returns the plain model (adapters removed)."""
        self._native.unload_adapters(True)
        return self._unwrap()

    def unload(self) -> Any:
        """Removes the adapters without merging: the base model exactly as it was."""
        self._native.unload_adapters(False)
        return self._unwrap()

    def _unwrap(self) -> Any:
        model = self.base_model.model
        model.requires_grad_(True)
        self.peft_config = {}
        return model

    # ---------------------------------------------------------------------------------- saving, loading
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        selected_adapters: list[str] | None = None,
        safe_serialization: bool = True,
        **kwargs: Any,
    ) -> None:
        """Writes peft's adapter folder: `adapter_config.json` + `adapter_model.safetensors` (the default
        adapter at the top, others in sub-folders named after them), atomically."""
        if not safe_serialization:
            raise ValueError("blip_peft writes safetensors only (safe_serialization=False is not supported)")
        directory = fspath(save_directory, "save_directory")
        if os.path.isfile(directory):
            raise ValueError(f"save_directory {directory!r} is a file, not a folder")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        if not names:
            raise ValueError(
                "this PeftModel holds no adapter to save (merge_and_unload() or unload() removed them, or "
                "selected_adapters is empty); save the model merge_and_unload() returned with its own "
                "save_pretrained(...)"
            )
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"no adapter named {name!r}; have {sorted(self.peft_config)}")
            target = directory if name == "default" else os.path.join(directory, name)
            config = self.peft_config[name]
            self._native.save_adapter(target, name, config.bias, self._config_text(config))
            prompt_file = os.path.join(target, CAPTION_CONFIG_NAME)
            if name in self.caption_prompts:
                text = json.dumps({"prompt": self.caption_prompts[name]}, indent=2) + "\n"
                _blip_peft.write_text_atomic(prompt_file, text)
            elif os.path.isfile(prompt_file):
                os.remove(prompt_file)  # a stale prompt of an earlier adapter saved here

    def _config_text(self, config: LoraConfig) -> str:
        """`adapter_config.json`'s text for `config` on this base model: peft's `auto_mapping` (written when no
        `task_type` is set) names the base model's class."""
        text = config.to_json()
        base_class = type(self.base_model.model).__name__
        if base_class != "BlipForConditionalGeneration":
            doc = json.loads(text)
            if isinstance(doc.get("auto_mapping"), dict):
                doc["auto_mapping"]["base_model_class"] = base_class
                text = json.dumps(doc, indent=2, sort_keys=True)
        return text

    @classmethod
    def from_pretrained(
        cls,
        model: Any,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Loads a peft adapter folder (ours or peft's) onto `model`. Missing, unexpected or mis-shaped keys
        are an error naming them. With `is_trainable=False` (peft's default) the adapter is frozen."""
        path = fspath(model_id, "model_id")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"adapter folder not found: {path!r}")
        config = config if config is not None else LoraConfig.from_pretrained(path)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        weights = _adapter_weights_file(path)
        peft_model = cls(model, config, adapter_name)
        try:
            peft_model._native.load_adapter(weights, adapter_name, config.bias)
        except BaseException:
            peft_model._native.unload_adapters(False)
            model.requires_grad_(True)
            raise
        peft_model._refresh_trainable()
        prompt = _read_caption_prompt(path)
        if prompt is not None:
            peft_model.caption_prompts[adapter_name] = prompt
        if not is_trainable:
            model.eval()
        return peft_model

    def load_adapter(
        self, model_id: str | os.PathLike[str], adapter_name: str, is_trainable: bool = False, **kwargs: Any
    ) -> None:
        """Loads another adapter folder under `adapter_name` (inactive until `set_adapter`)."""
        path = fspath(model_id, "model_id")
        config = dataclasses.replace(LoraConfig.from_pretrained(path), inference_mode=not is_trainable)
        weights = _adapter_weights_file(path)
        self._add(adapter_name, config)
        try:
            self._native.load_adapter(weights, adapter_name, config.bias)
        except BaseException:
            self._native.delete_adapter(adapter_name)
            del self.peft_config[adapter_name]
            raise
        self._refresh_trainable()
        prompt = _read_caption_prompt(path)
        if prompt is not None:
            self.caption_prompts[adapter_name] = prompt

    def hotswap_adapter(self, model_id: str | os.PathLike[str], adapter_name: str) -> None:
        """Replaces adapter `adapter_name`'s weights, in place on the live model, by the adapter folder `model_id`
        (peft's `hotswap_adapter`): it must target the same layers with the same ranks, and agree with the old one on
        what peft checks (`use_rslora`, `lora_dropout`, `alpha_pattern`, `use_dora`) and on `bias`; `lora_alpha`
        may differ (each layer's scaling follows it). The base is not
        reloaded and the parameters stay the same tensors, so an optimizer or a serving loop holding them keeps
        working; a swap that does not fit is refused before anything changes."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r} to swap; have {sorted(self.peft_config)}")
        path = fspath(model_id, "model_id")
        config = LoraConfig.from_pretrained(path)
        old = self.peft_config[adapter_name]
        for key in ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora", "bias"):
            if getattr(config, key) != getattr(old, key):
                raise ValueError(
                    f"Configs are incompatible: for {key}, {getattr(old, key)!r} != {getattr(config, key)!r}; "
                    "load the new adapter under its own name with load_adapter instead"
                )
        self._native.hotswap_adapter(_adapter_weights_file(path), adapter_name, json.dumps(config._fields()))
        self.peft_config[adapter_name] = dataclasses.replace(config, inference_mode=old.inference_mode)

    def adapter_memory(self) -> dict[str, int]:
        """The bytes each adapter's own tensors take (A, B and DoRA magnitudes in every layer, plus its
        modules_to_save copies), by adapter name. The base model's weights are shared and not counted."""
        sizes = dict.fromkeys(self.peft_config, 0)
        for name, p in self.named_parameters():
            parts = name.split(".")
            for i, part in enumerate(parts[:-1]):
                if part in ("lora_A", "lora_B", "lora_magnitude_vector", "modules_to_save") and parts[i + 1] in sizes:
                    sizes[parts[i + 1]] += p.numel() * p.element_size()
                    break
        return sizes

    # ------------------------------------------------------------------------------ device, mode, print
    def to(self, *args: Any, **kwargs: Any) -> PeftModel:
        self.base_model.model.to(*args, **kwargs)
        return self

    def train(self, mode: bool = True) -> PeftModel:
        self.base_model.model.train(mode)
        return self

    def eval(self) -> PeftModel:
        return self.train(False)

    def __repr__(self) -> str:
        inner = repr(self.base_model).replace("\n", "\n  ")
        return f"PeftModel(\n  (base_model): {inner}\n)"


def _adapter_weights_file(path: str) -> str:
    weights = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(weights):
        return weights
    if os.path.isfile(os.path.join(path, "adapter_model.bin")):
        raise ValueError(
            f"{path} holds only adapter_model.bin, a pickle file blip_peft never reads. Convert it once with peft "
            "(PeftModel.from_pretrained(...).save_pretrained(dir) writes adapter_model.safetensors)."
        )
    raise FileNotFoundError(f"{WEIGHTS_NAME} not found in {path!r}")


def hotswap_adapter(
    model: PeftModel, model_name_or_path: str | os.PathLike[str], adapter_name: str, **kwargs: Any
) -> None:
    """peft's `peft.utils.hotswap.hotswap_adapter`: `model.hotswap_adapter(model_name_or_path, adapter_name)`."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"hotswap_adapter expects a blip_peft PeftModel, got {type(model).__name__}")
    model.hotswap_adapter(model_name_or_path, adapter_name)


def get_peft_model(model: Any, peft_config: LoraConfig, adapter_name: str = "default", **kwargs: Any) -> PeftModel:
    """Wraps `model` with LoRA adapters per `peft_config`, freezing everything else (peft's `get_peft_model`)."""
    if isinstance(model, PeftModel):
        raise TypeError("the model already has adapters; use model.add_adapter(name, config)")
    return PeftModel(model, peft_config, adapter_name)


def load_adapter_folder(path: str, *, dtype: str | None, device: str, head: Any = None) -> PeftModel:
    """What `BlipForConditionalGeneration.from_pretrained(adapter_dir)` does: load the base model the adapter
    names (`base_model_name_or_path`) and attach the adapter, as transformers does with peft installed."""
    config = LoraConfig.from_pretrained(path)
    base = config.base_model_name_or_path
    if not base:
        raise ValueError(f"{path}/{CONFIG_NAME} does not name its base model (base_model_name_or_path)")
    if not os.path.isdir(base) and not os.path.isabs(base):
        candidate = os.path.join(path, base)
        base = candidate if os.path.isdir(candidate) else base
    if not os.path.isdir(base):
        raise FileNotFoundError(
            f"the adapter in {path!r} was trained on base model {config.base_model_name_or_path!r}, which is not a "
            "local folder; load the base with BlipForConditionalGeneration.from_pretrained(<folder>) and attach the "
            "adapter with PeftModel.from_pretrained(base, adapter_dir)"
        )
    # The class asked for (BlipForQuestionAnswering.from_pretrained(adapter_dir)), else the head the base
    # folder's config names (so AutoModelForVision2Seq.from_pretrained loads a retrieval adapter's head too).
    model_class = head if head not in (None, BlipForConditionalGeneration) else _head_class(base)
    model = model_class(model_class._native_class.from_pretrained(base, dtype, device))
    return PeftModel.from_pretrained(model, path)


def _head_class(folder: str) -> Any:
    """The blip_peft class of the BLIP head a checkpoint folder holds (its config's `architectures`)."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            architectures = json.load(f).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        architectures = []
    if "BlipForImageTextRetrieval" in architectures:
        from blip_peft.modeling_retrieval import BlipForImageTextRetrieval  # noqa: PLC0415

        return BlipForImageTextRetrieval
    if "BlipForQuestionAnswering" in architectures:
        from blip_peft.modeling_vqa import BlipForQuestionAnswering  # noqa: PLC0415

        return BlipForQuestionAnswering
    return BlipForConditionalGeneration
