"""`GenerationConfig`: transformers' decoding settings object and its `generation_config.json` file."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from blip_peft._convert import fspath, read_json_object

GENERATION_CONFIG_NAME = "generation_config.json"

# transformers' defaults of the settings our generate reads (what an unset attribute reads as).
_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "max_new_tokens": None,
    "min_length": 0,
    "min_new_tokens": None,
    "early_stopping": False,
    "do_sample": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "use_cache": True,
    "output_attentions": False,
    "output_hidden_states": False,
    "return_dict_in_generate": False,
}


class GenerationConfig:
    """transformers' `GenerationConfig`: keyword settings read as attributes (transformers' defaults for the
    unset ones), `to_dict()`, `to_json_string()`, and `save_pretrained` / `from_pretrained` of
    `generation_config.json`. Pass one to `model.generate(generation_config=...)`; `model.generation_config`
    is the one read from (and written to) the model's folder."""

    def __init__(self, **kwargs: Any) -> None:
        object.__setattr__(self, "_fields", json.loads(json.dumps(kwargs)))

    def __getattr__(self, name: str) -> Any:
        fields = object.__getattribute__(self, "_fields")
        if name in fields:
            return fields[name]
        if name in _DEFAULTS:
            return _DEFAULTS[name]
        raise AttributeError(f"GenerationConfig has no setting {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        json.dumps(value)  # a value the file can hold
        self._fields[name] = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GenerationConfig) and self.to_diff_dict() == other.to_diff_dict()

    __hash__ = None  # type: ignore[assignment]

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Sets the given settings; returns the ones that are not settings of this object (transformers)."""
        unused = {}
        for key, value in kwargs.items():
            if key in self._fields or key in _DEFAULTS:
                setattr(self, key, value)
            else:
                unused[key] = value
        return unused

    def to_diff_dict(self) -> dict[str, Any]:
        """The settings given explicitly (what `generation_config.json` holds), without the version stamp."""
        return {k: v for k, v in copy.deepcopy(self._fields).items() if k != "transformers_version"}

    def to_dict(self) -> dict[str, Any]:
        """Every setting: transformers' defaults under the given ones."""
        out = dict(_DEFAULTS)
        out.update(copy.deepcopy(self._fields))
        return out

    def to_json_string(self, use_diff: bool = True) -> str:
        data = self._fields if use_diff else self.to_dict()
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike[str], config_file_name: str | None = None) -> None:
        """Writes `generation_config.json` into `save_directory` (atomically)."""
        directory = fspath(save_directory, "save_directory")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, config_file_name or GENERATION_CONFIG_NAME)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        os.replace(tmp, path)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name: str | os.PathLike[str], config_file_name: str | None = None
    ) -> GenerationConfig:
        """Reads `generation_config.json` from a folder (or the file itself)."""
        path = fspath(pretrained_model_name, "pretrained_model_name")
        if os.path.isdir(path):
            path = os.path.join(path, config_file_name or GENERATION_CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no generation config at {path!r}")
        data = read_json_object(path)
        return cls(**data)

    @classmethod
    def from_model_config(cls, model_config: Any) -> GenerationConfig:
        """What transformers makes for a model without `generation_config.json`: the decoder's special ids and
        output switches (BLIP: `text_config`'s), marked `_from_model_config`."""
        text = model_config.text_config
        return cls(
            _from_model_config=True,
            bos_token_id=text.bos_token_id,
            eos_token_id=text.eos_token_id,
            pad_token_id=text.pad_token_id,
            output_attentions=False,
            output_hidden_states=False,
            use_cache=True,
        )

    def __repr__(self) -> str:
        return f"GenerationConfig {self.to_json_string()}"
