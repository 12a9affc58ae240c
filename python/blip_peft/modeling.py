"""`BlipForConditionalGeneration`: the BLIP captioning model, computed by the Rust core.

It mirrors transformers' class of the same name: `from_pretrained`, calling the model with
`pixel_values` / `input_ids` / `attention_mask` / `labels`, `parameters()` that a `torch.optim`
optimizer updates in place, `to`, `train`/`eval`, `save_pretrained` and `print(model)`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch

from blip_peft import _blip_peft
from blip_peft._convert import device_name, dtype_name, fspath
from blip_peft.configuration import BlipConfig


@dataclass
class BlipForConditionalGenerationModelOutput:
    """What a forward pass returns. Fields read as attributes or keys (`out.loss`, `out["logits"]`)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, int):
            return self.to_tuple()[key]
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, k) for k in self.keys())


class BlipForConditionalGeneration:
    """BLIP for image captioning, with transformers' API and weight names.

    Load a transformers checkpoint folder with :meth:`from_pretrained`, call the model like a torch
    module, and train it with any torch optimizer over :meth:`parameters`.
    """

    main_input_name = "pixel_values"

    def __init__(self, native: _blip_peft._BlipModel) -> None:
        if not isinstance(native, _blip_peft._BlipModel):
            raise TypeError(
                "BlipForConditionalGeneration is created with BlipForConditionalGeneration.from_pretrained(path) "
                "or .from_config(config)"
            )
        self._native = native

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        dtype: Any = None,
        device: Any = "cpu",
        torch_dtype: Any = None,
        device_map: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Loads a transformers checkpoint folder (`config.json` + `model.safetensors` or its shards).

        Args:
            pretrained_model_name_or_path: the folder.
            dtype: `None` (the stored precision), "float32", "bfloat16", "float16" or a `torch.dtype`.
            device: "cpu", "cuda", "cuda:N" or a `torch.device`.
            torch_dtype: the older name of `dtype`, accepted as transformers accepts it.
            device_map: accepted for a single device (e.g. "cuda" or "cpu") as a synonym of `device`.

        Returns:
            The model, in evaluation mode. A folder holding a PEFT adapter (`adapter_config.json`) loads the
            base model it names and returns a `PeftModel`.
        """
        path = fspath(pretrained_model_name_or_path, "pretrained_model_name_or_path")
        unknown = set(kwargs) - {"low_cpu_mem_usage", "trust_remote_code", "local_files_only", "use_safetensors"}
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        if dtype is not None and torch_dtype is not None:
            raise ValueError("pass either dtype or torch_dtype (its older name), not both")
        if device_map is not None:
            if not isinstance(device_map, (str, torch.device, int)) or device_map == "auto":
                raise ValueError("device_map must name a single device here (e.g. 'cuda' or 'cpu')")
            device = device_map
        dtype_arg = dtype_name(dtype if dtype is not None else torch_dtype)
        device_arg = device_name(device) or "cpu"
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"model folder not found: {path!r}. blip_peft reads local checkpoint folders (config.json + "
                "model.safetensors), e.g. a downloaded Salesforce/blip-image-captioning-base."
            )
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            from blip_peft import peft_model  # noqa: PLC0415  (only when an adapter folder is given)

            return peft_model.load_adapter_folder(path, dtype=dtype_arg, device=device_arg)
        native = _blip_peft._BlipModel.from_pretrained(path, dtype_arg, device_arg)
        return cls(native)

    @classmethod
    def from_config(
        cls, config: BlipConfig | dict[str, Any], *, seed: int = 0, dtype: Any = None, device: Any = "cpu"
    ) -> BlipForConditionalGeneration:
        """A randomly initialised model (transformers' initialisation) for a configuration."""
        import json

        data = config.to_dict() if isinstance(config, BlipConfig) else dict(config)
        native = _blip_peft._BlipModel.from_config(
            json.dumps(data), seed, dtype_name(dtype), device_name(device) or "cpu"
        )
        return cls(native)

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool = True,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Runs the model: logits of every caption position and, with `labels`, the mean cross-entropy of
        predicting `labels[:, 1:]` from positions `:-1` (exactly transformers' loss; -100 is ignored).

        `adapter_names` (peft's mixed-adapter batch, in evaluation mode): one adapter name per row, `"__base__"`
        for the base model; each row then runs its own adapter in both towers, whatever adapter is active.
        """
        if kwargs.get("interpolate_pos_encoding"):
            raise ValueError("interpolate_pos_encoding is not supported; resize images to the model's image_size")
        unknown = set(kwargs) - {"interpolate_pos_encoding", "output_attentions", "output_hidden_states"}
        if unknown:
            raise TypeError(f"forward() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        if input_ids is None:
            raise ValueError(
                "input_ids is required: BlipForConditionalGeneration scores captions; use generate() to write them"
            )
        names = _adapter_names(adapter_names)
        loss, logits, image_embeds = self._native.forward(pixel_values, input_ids, attention_mask, labels, names)
        out = BlipForConditionalGenerationModelOutput(loss=loss, logits=logits, image_embeds=image_embeds)
        return out if return_dict else out.to_tuple()

    __call__ = forward

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Generates captions as token ids, exactly as transformers' `generate` does for BLIP.

        The result is a `torch.LongTensor` laid out like transformers' (`[BOS, prompt..., new tokens..., pad]`).
        Keyword arguments take transformers' names and defaults: `max_new_tokens`, `max_length` (20 when neither
        is given), `min_new_tokens`, `min_length`, `num_beams`, `length_penalty`, `early_stopping`,
        `num_return_sequences`, `do_sample`, `temperature`, `top_k` (50), `top_p`, `repetition_penalty`,
        `no_repeat_ngram_size`, `bos_token_id`, `eos_token_id`, `pad_token_id`, and `seed` (an int or a
        `torch.Generator`) for reproducible sampling.

        A prompt (`input_ids` from the processor, e.g. "a photography of") is continued. Prompts of different
        lengths in one batch (with their `attention_mask`) are each decoded as if alone and the rows are
        right-padded; transformers mishandles that case.

        `adapter_names` (peft's mixed-adapter batch): one adapter name per image, `"__base__"` for the base model;
        the image and every row decoded from it (its beams, its `num_return_sequences`) run that adapter, in
        both towers, in one batch.
        """
        if pixel_values is None:
            raise ValueError("generate() needs pixel_values")
        names = _adapter_names(adapter_names)
        return self._native.generate(pixel_values, input_ids, attention_mask, _generation_settings(kwargs), names)

    # -------------------------------------------------------------------------------------- parameters
    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """`(name, parameter)` pairs with transformers' names, in its order (tied weights once)."""
        for name, param in self._native.named_parameters():
            yield (f"{prefix}.{name}" if prefix else name), param

    def parameters(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        """The model's parameters: the tensors themselves, so an optimizer updates the model in place."""
        for _, param in self.named_parameters():
            yield param

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The number of (unique) parameters, as transformers counts them."""
        total = 0
        for name, p in self.named_parameters():
            if only_trainable and not p.requires_grad:
                continue
            if exclude_embeddings and (
                name.endswith("word_embeddings.weight") or name.endswith("position_embeddings.weight")
            ):
                continue
            total += p.numel()
        return total

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters by name, detached (the layout `save_pretrained` writes)."""
        return {name: p.detach() for name, p in self.named_parameters()}

    def requires_grad_(self, requires_grad: bool = True) -> BlipForConditionalGeneration:
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters():
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    # ------------------------------------------------------------------------------ device, dtype, mode
    def to(self, *args: Any, **kwargs: Any) -> BlipForConditionalGeneration:
        """Moves and/or casts the parameters in place, as `nn.Module.to` does: `to("cuda")`,
        `to(torch.bfloat16)`, `to("cuda", torch.float16)`, `to(device=..., dtype=...)`."""
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        kwargs.pop("non_blocking", None)
        if kwargs:
            raise TypeError(f"to() got unexpected keyword argument(s): {', '.join(sorted(kwargs))}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, torch.device, int)) and not isinstance(arg, bool):
                if isinstance(arg, str) and arg.removeprefix("torch.") in (
                    "float32",
                    "float16",
                    "bfloat16",
                    "half",
                    "float",
                ):
                    dtype = arg
                else:
                    device = arg
            else:
                raise TypeError(f"to() expects a device and/or dtype, got {type(arg).__name__}")
        self._native.to(device_name(device), dtype_name(dtype))
        return self

    def cuda(self, device: int | None = None) -> BlipForConditionalGeneration:
        return self.to(f"cuda:{device or 0}")

    def cpu(self) -> BlipForConditionalGeneration:
        return self.to("cpu")

    def float(self) -> BlipForConditionalGeneration:
        return self.to(torch.float32)

    def half(self) -> BlipForConditionalGeneration:
        return self.to(torch.float16)

    def bfloat16(self) -> BlipForConditionalGeneration:
        return self.to(torch.bfloat16)

    def train(self, mode: bool = True) -> BlipForConditionalGeneration:
        """Training mode (dropout active where the config sets it)."""
        self._native.set_training(bool(mode))
        return self

    def eval(self) -> BlipForConditionalGeneration:
        """Evaluation mode (no dropout)."""
        return self.train(False)

    @property
    def training(self) -> bool:
        return self._native.training

    @property
    def device(self) -> torch.device:
        return torch.device(self._native.device)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self._native.dtype)

    @property
    def config(self) -> BlipConfig:
        """The parsed configuration (`config.text_config.vocab_size`, `config.to_dict()`)."""
        return BlipConfig.from_json_string(self._native.config_json())

    @property
    def name_or_path(self) -> str:
        return self._native.name_or_path

    # -------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Writes `config.json` and `model.safetensors`, a folder transformers loads with no missing or
        unexpected keys. Files are written atomically (temporary file, then rename)."""
        if kwargs.get("safe_serialization") is False:
            raise ValueError("blip_peft writes safetensors only (safe_serialization=False is not supported)")
        self._native.save_pretrained(fspath(save_directory, "save_directory"))

    def __repr__(self) -> str:
        return self._native.__repr__()


def _adapter_names(names: Any) -> list[str] | None:
    """`adapter_names` as the core takes it: a list of str (one per row), or None."""
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"adapter_names must be a list of adapter names (one per row), got {type(names).__name__}")
    bad = [type(n).__name__ for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f'adapter_names must hold str names ("__base__" for the base model), got {bad[0]}')
    return list(names)


# Accepted for compatibility; they do not change what is generated here.
_IGNORED_GENERATION_ARGS = {"use_cache", "output_attentions", "output_hidden_states", "synced_gpus"}


def _generation_settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    """transformers-style generate kwargs to the decoding settings the core reads (and checks): the Python-only
    forms are converted here (a `generation_config` object, a `torch.Generator` seed); None means the default."""
    settings: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in _IGNORED_GENERATION_ARGS or (key == "return_dict_in_generate" and not value):
            continue
        if key == "generation_config":
            if value is not None:
                names = set(_blip_peft.generation_setting_names())
                for k, v in value.to_dict().items():
                    if k in names and v is not None and k not in kwargs:
                        settings[k] = v
            continue
        if value is not None:
            settings[key] = value
    seed = settings.get("seed")
    if isinstance(seed, torch.Generator):
        # A seed drawn from the generator: reproducible for a generator in the same state.
        settings["seed"] = int(torch.randint(0, 2**62, (1,), generator=seed).item())
    elif seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    return settings


AutoModelForVision2Seq = BlipForConditionalGeneration
AutoModelForImageTextToText = BlipForConditionalGeneration
