"""`BlipConfig`: the parsed `config.json`, readable by attribute as in transformers."""

from __future__ import annotations

import json
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


class BlipConfig(ConfigSection):
    """The configuration of a BLIP captioning model (transformers' `BlipConfig` layout)."""

    @classmethod
    def from_json_string(cls, text: str) -> BlipConfig:
        return cls(json.loads(text))
