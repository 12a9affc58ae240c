"""Type stubs of the native module `blip_peft._blip_peft` (checked by mypy.stubtest in the test suite)."""

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, final

import numpy as np
import numpy.typing as npt
import torch

__all__ = [
    "BlipPeftError",
    "_BlipModel",
    "_ImageCaptionData",
    "_ImageProcessor",
    "_Tokenizer",
    "__version__",
    "collate_captions",
    "set_flush_denormals",
    "cuda_is_available",
    "kernel_code_paths",
    "generation_setting_names",
    "write_text_atomic",
    "normalize_lora_config",
    "train_native",
]

__version__: str

class BlipPeftError(RuntimeError):
    """An error raised inside libtorch while running the model."""

class _CollectiveLike(Protocol):
    """What `train_native` calls for torch.distributed (blip_peft.distributed._Collective)."""

    rank: int
    world_size: int
    def all_reduce_mean(self, t: torch.Tensor) -> None: ...
    def all_reduce_max(self, value: float) -> float: ...
    def all_equal(self, value: float) -> bool: ...

def cuda_is_available() -> bool: ...
def kernel_code_paths() -> dict[str, str]: ...
def generation_setting_names() -> list[str]: ...
def write_text_atomic(path: str | os.PathLike[str], text: str) -> None: ...
def normalize_lora_config(config_json: str) -> str: ...
def train_native(
    model: _BlipModel,
    train: Mapping[str, torch.Tensor] | _ImageCaptionData,
    eval: Mapping[str, torch.Tensor] | _ImageCaptionData | None,
    settings: dict[str, Any],
    adapter: tuple[str, str, str] | None = None,
    callback: Callable[[str, dict[str, Any]], Any] | None = None,
    distributed: _CollectiveLike | None = None,
) -> dict[str, Any]: ...
def collate_captions(
    captions: Sequence[Sequence[int]], bos_token_id: int, pad_token_id: int, max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
def set_flush_denormals(on: bool) -> bool: ...

@final
class _BlipModel:
    @staticmethod
    def from_pretrained(path: str | os.PathLike[str], dtype: str | None = None, device: str = "cpu") -> _BlipModel: ...
    @staticmethod
    def from_config(config_json: str, seed: int = 0, dtype: str | None = None, device: str = "cpu") -> _BlipModel: ...
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        adapter_names: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]: ...
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        settings: dict[str, Any] | None = None,
        adapter_names: list[str] | None = None,
    ) -> torch.Tensor: ...
    def _last_generate_rows_per_step(self) -> list[int]: ...
    def named_parameters(self) -> list[tuple[str, torch.Tensor]]: ...
    def to(self, device: str | None = None, dtype: str | None = None) -> None: ...
    @property
    def training(self) -> bool: ...
    def set_training(self, mode: bool) -> None: ...
    @property
    def device(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def name_or_path(self) -> str: ...
    def config_json(self) -> str: ...
    def save_pretrained(self, path: str | os.PathLike[str]) -> None: ...
    def inject_lora(self, config_json: str, adapter_name: str) -> list[str]: ...
    def mark_trainable(self, adapter_name: str, bias: str) -> None: ...
    def lora_targets(self) -> list[tuple[str, str, int, int]]: ...
    def set_active_adapter(self, adapter_name: str) -> None: ...
    def merge_adapters(self) -> None: ...
    def unmerge_adapters(self) -> None: ...
    def set_adapters_disabled(self, disabled: bool) -> None: ...
    def unload_adapters(self, merge: bool) -> None: ...
    def delete_adapter(self, adapter_name: str) -> None: ...
    def adapter_names(self) -> list[str]: ...
    def adapter_state(self, adapter_name: str, bias: str) -> list[tuple[str, torch.Tensor]]: ...
    def save_adapter(self, dir: str | os.PathLike[str], adapter_name: str, bias: str, config_json: str) -> None: ...
    def load_adapter(self, path: str | os.PathLike[str], adapter_name: str, bias: str) -> None: ...
    def hotswap_adapter(self, path: str | os.PathLike[str], adapter_name: str, config_json: str) -> None: ...

@final
class _ImageProcessor:
    def __new__(
        cls,
        *,
        do_convert_rgb: bool,
        do_resize: bool,
        height: int,
        width: int,
        resample: int,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        max_image_pixels: int | None,
    ) -> _ImageProcessor: ...
    def __call__(
        self,
        images: list[str | bytes | bytearray | npt.NDArray[np.uint8] | tuple[str, int, int, bytes, bytes | None]],
    ) -> npt.NDArray[np.float32] | list[npt.NDArray[np.float32]]: ...

@final
class _Tokenizer:
    @staticmethod
    def from_file(path: str | os.PathLike[str]) -> _Tokenizer: ...
    @staticmethod
    def from_str(json: str) -> _Tokenizer: ...
    def to_str(self, pretty: bool = True) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, id: int) -> str | None: ...
    def vocab_size(self, with_added_tokens: bool = True) -> int: ...
    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool,
        padding: str,
        max_length: int | None,
        truncation: int | None,
        pad_to_multiple_of: int | None,
        pad_id: int,
        pad_token: str,
        padding_side: str = "right",
        truncation_side: str = "right",
    ) -> tuple[list[list[int]], list[list[int]], list[list[int]]]: ...
    def decode_batch(
        self, rows: Sequence[Sequence[int]], *, skip_special_tokens: bool, clean_up_tokenization_spaces: bool
    ) -> list[str]: ...

@final
class _ImageCaptionData:
    def __new__(
        cls,
        image_processor: _ImageProcessor,
        images: list[Any],
        captions: Sequence[Sequence[int]],
        bos_token_id: int,
        pad_token_id: int,
        max_length: int | None = None,
        skip_bad: bool = False,
        num_workers: int | None = None,
    ) -> _ImageCaptionData: ...
    def __len__(self) -> int: ...
    def skipped(self) -> list[int]: ...
