"""`BlipConfig`: the parsed `config.json`, readable by attribute as in transformers."""

from __future__ import annotations

import json
import os
from typing import Any


class ConfigSection:
    """A JSON object whose keys read as attributes (`config.text_config.vocab_size`)."""

    def __init__(self, data: dict[str, Any]) -> None:
        object.__setattr__(self, "_data", data)

    def __getattr__(self, name: str) -> Any:
        data = object.__getattribute__(self, "_data")
        if name not in data:
            raise AttributeError(f"config has no field {name!r}")
        value = data[name]
        return ConfigSection(value) if isinstance(value, dict) else value

    def __getitem__(self, name: str) -> Any:
        return self.__getattr__(name)

    def __contains__(self, name: object) -> bool:
        return name in self._data

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the fields as plain Python values."""
        return json.loads(json.dumps(self._data))

    def to_json_string(self) -> str:
        return json.dumps(self._data, indent=2, sort_keys=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConfigSection) and self._data == other._data

    __hash__ = None  # type: ignore[assignment]


# transformers' `PretrainedConfig` attributes a BLIP config reads as when its JSON does not hold them.
_PRETRAINED_DEFAULTS: dict[str, Any] = {
    "is_encoder_decoder": False,
    "return_dict": True,
    "output_hidden_states": False,
    "output_attentions": False,
    "tie_word_embeddings": True,
    "model_type": "blip",
    "name_or_path": "",
    "_attn_implementation": "sdpa",
}


class BlipConfig(ConfigSection):
    """The configuration of a BLIP captioning model (transformers' `BlipConfig` layout), with the
    `PretrainedConfig` attributes code reads (`is_encoder_decoder`, `use_return_dict`, `get_text_config()`,
    `return_dict`, `output_hidden_states`, ...). It is a read-only view of the model's configuration."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data)
        object.__setattr__(self, "_defaults", dict(_PRETRAINED_DEFAULTS))

    def __getattr__(self, name: str) -> Any:
        data = object.__getattribute__(self, "_data")
        if name not in data:
            defaults = object.__getattribute__(self, "_defaults")
            if name in defaults:
                return defaults[name]
        return super().__getattr__(name)

    def _set_defaults(self, **values: Any) -> None:
        object.__getattribute__(self, "_defaults").update(values)

    @property
    def use_return_dict(self) -> bool:
        return bool(self.return_dict)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> Any:
        """The decoder's section (`text_config`), as transformers returns it; `encoder=True` alone: the
        whole config (BLIP has no separate text encoder)."""
        if encoder and not decoder:
            return self
        return self.text_config

    @classmethod
    def from_json_string(cls, text: str) -> BlipConfig:
        return cls(json.loads(text))

    @classmethod
    def from_json_file(cls, path: str) -> BlipConfig:
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f))

    @classmethod
    def from_pretrained(cls, folder: str) -> BlipConfig:
        """Reads `config.json` from a checkpoint folder."""
        return cls.from_json_file(os.path.join(folder, "config.json"))

    def to_json_file(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string() + "\n")
