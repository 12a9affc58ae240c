"""Normalising the dtype and device arguments users pass the way they pass them to torch."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}

_DTYPE_ALIASES = {
    "float32": "float32",
    "float": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "half": "float16",
    "fp16": "float16",
}


def dtype_name(dtype: Any) -> str | None:
    """`None`, "auto", a `torch.dtype` or a name to one of "float32", "bfloat16", "float16" (or None)."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {dtype}; use torch.float32, torch.bfloat16 or torch.float16")
        return _DTYPE_NAMES[dtype]
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.")
        if key not in _DTYPE_ALIASES:
            raise ValueError(f"unsupported dtype {dtype!r}; use 'float32', 'bfloat16' or 'float16'")
        return _DTYPE_ALIASES[key]
    raise TypeError(f"dtype must be a torch.dtype or a string, got {type(dtype).__name__}")


def device_name(device: Any) -> str | None:
    """`None`, a `torch.device`, an int (CUDA index) or a string to a device string the core parses."""
    if device is None:
        return None
    if isinstance(device, torch.device):
        if device.type == "cuda":
            return f"cuda:{device.index if device.index is not None else 0}"
        return device.type
    if isinstance(device, int) and not isinstance(device, bool):
        return f"cuda:{device}"
    if isinstance(device, str):
        return device
    raise TypeError(f"device must be a string, an int or a torch.device, got {type(device).__name__}")


def fspath(path: Any, what: str) -> str:
    """A path-like argument as a string, or a TypeError naming `what`."""
    try:
        return os.fspath(path)
    except TypeError:
        raise TypeError(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}") from None


def read_json_object(path: str) -> dict[str, Any]:
    """The JSON object in the file at `path`; ValueError naming the file when it is not valid JSON or not an
    object."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data
