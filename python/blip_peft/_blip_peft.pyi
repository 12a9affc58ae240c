"""Type stubs of the native module `blip_peft._blip_peft` (checked by mypy.stubtest in the test suite)."""

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, final, type_check_only

import numpy as np
import numpy.typing as npt
import torch

__all__ = [
    "BlipPeftError",
    "BlipPeftInternalError",
    "_BlipModel",
    "_BlipVqaModel",
    "_BlipRetrievalModel",
    "_ImageCaptionData",
    "_ImageProcessor",
    "_Tokenizer",
    "__version__",
    "augment_image",
    "augment_plan",
    "caption_scores",
    "collate_captions",
    "ptb_tokenize",
    "set_flush_denormals",
    "cuda_is_available",
    "kernel_code_paths",
    "cpu_bf16_support",
    "generation_setting_names",
    "write_text_atomic",
    "normalize_lora_config",
    "train_native",
    "_panic_for_test",
]

__version__: str

class BlipPeftError(RuntimeError):
    """An error raised inside libtorch while running the model."""

class BlipPeftInternalError(RuntimeError):
    """A bug in blip_peft: its native core failed an internal check (a Rust panic). Please report it."""

class _CollectiveLike(Protocol):
    """What `train_native` calls for torch.distributed (blip_peft.distributed._Collective)."""

    rank: int
    world_size: int
    def all_reduce_mean(self, t: torch.Tensor) -> None: ...
    def all_reduce_max(self, value: float) -> float: ...
    def all_equal(self, value: float) -> bool: ...

def cuda_is_available() -> bool: ...
def kernel_code_paths() -> dict[str, str]: ...
def cpu_bf16_support() -> dict[str, bool]: ...
def generation_setting_names() -> list[str]: ...
def write_text_atomic(path: str | os.PathLike[str], text: str) -> None: ...
def normalize_lora_config(config: dict[str, Any] | str) -> str: ...
def _panic_for_test(place: str) -> None: ...
def train_native(
    model: _BlipModel | _BlipVqaModel | _BlipRetrievalModel,
    train: Mapping[str, torch.Tensor] | _ImageCaptionData,
    eval: Mapping[str, torch.Tensor] | _ImageCaptionData | None,
    settings: dict[str, Any],
    adapter: tuple[str, str, str] | None = None,
    callback: Callable[[str, dict[str, Any]], Any] | None = None,
    distributed: _CollectiveLike | None = None,
    scorer: Callable[[int], dict[str, float]] | None = None,
    temp: torch.Tensor | None = None,
    ctrl_c: threading.Event | None = None,
) -> dict[str, Any]: ...
def collate_captions(
    captions: Sequence[Sequence[int]],
    bos_token_id: int,
    pad_token_id: int,
    max_length: int | None = None,
    prompt_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
def set_flush_denormals(on: bool) -> bool: ...
def augment_image(image: Any, ops: list[dict[str, Any]]) -> npt.NDArray[np.uint8]: ...
def augment_plan(
    settings: dict[str, Any],
    width: int,
    height: int,
    out_height: int,
    out_width: int,
    seed: int,
    epoch: int,
    index: int,
    flip_allowed: bool = True,
    resample: int = 3,
) -> list[dict[str, Any]]: ...
def caption_scores(
    references: Sequence[Sequence[str]], candidates: Sequence[str], tokenize: bool
) -> dict[str, float]: ...
def ptb_tokenize(texts: Sequence[str]) -> list[str]: ...

@type_check_only
class _BlipHandle:
    """What the three native handles share (the native `head_handle!` macro): attributes, moves, saving, LoRA."""

    @property
    def lm_head_tied(self) -> bool: ...
    def module_tree(self) -> list[tuple[str, str]]: ...
    def config_warnings(self) -> list[str]: ...
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
    def inject_lora(self, config: dict[str, Any] | str, adapter_name: str) -> list[str]: ...
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
class _BlipModel(_BlipHandle):
    @staticmethod
    def from_pretrained(
        path: str | os.PathLike[str], dtype: str | None = None, device: str = "cpu", config_json: str | None = None
    ) -> _BlipModel: ...
    @staticmethod
    def from_config(config_json: str, seed: int = 0, dtype: str | None = None, device: str = "cpu") -> _BlipModel: ...
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        eager: bool = False,
        logits_to_keep: int = 0,
        shift_labels: torch.Tensor | None = None,
        adapter_names: list[str] | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> tuple[
        torch.Tensor | None, torch.Tensor, torch.Tensor, list[torch.Tensor] | None, list[torch.Tensor] | None
    ]: ...
    def resize_vocab(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        decoder_weight: torch.Tensor | None = None,
        decoder_bias: torch.Tensor | None = None,
    ) -> None: ...
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        settings: dict[str, Any] | None = None,
        adapter_names: list[str] | None = None,
    ) -> torch.Tensor: ...
    def _last_generate_rows_per_step(self) -> list[int]: ...

@final
class _BlipVqaModel(_BlipHandle):
    @staticmethod
    def from_pretrained(
        path: str | os.PathLike[str], dtype: str | None = None, device: str = "cpu", config_json: str | None = None
    ) -> _BlipVqaModel: ...
    @staticmethod
    def from_config(
        config_json: str, seed: int = 0, dtype: str | None = None, device: str = "cpu"
    ) -> _BlipVqaModel: ...
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        interpolate_pos_encoding: bool = False,
        adapter_names: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]: ...
    def resize_vocab(
        self,
        encoder_weight: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        decoder_weight: torch.Tensor | None = None,
        decoder_bias: torch.Tensor | None = None,
    ) -> None: ...
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        settings: dict[str, Any] | None = None,
        adapter_names: list[str] | None = None,
    ) -> torch.Tensor: ...

@final
class _BlipRetrievalModel(_BlipHandle):
    @staticmethod
    def from_pretrained(
        path: str | os.PathLike[str], dtype: str | None = None, device: str = "cpu", config_json: str | None = None
    ) -> _BlipRetrievalModel: ...
    @staticmethod
    def from_config(
        config_json: str, seed: int = 0, dtype: str | None = None, device: str = "cpu"
    ) -> _BlipRetrievalModel: ...
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        use_itm_head: bool = True,
        *,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        eager: bool = False,
        interpolate_pos_encoding: bool = False,
        adapter_names: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor] | None, list[torch.Tensor] | None]: ...
    def resize_vocab(self, weight: torch.Tensor) -> None: ...
    def encode_images(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        adapter_names: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def encode_texts(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        adapter_names: list[str] | None = None,
    ) -> torch.Tensor: ...
    def itm_logits(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        adapter_names: list[str] | None = None,
        image_index: list[int] | None = None,
    ) -> torch.Tensor: ...
    def losses(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        temp: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        seed: int | None = None,
    ) -> dict[str, torch.Tensor]: ...

@final
class _ImageProcessor:
    def __new__(cls, settings: dict[str, Any] | None = None) -> _ImageProcessor: ...
    @staticmethod
    def from_pretrained(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> _ImageProcessor: ...
    @staticmethod
    def setting_names() -> list[str]: ...
    def with_overrides(self, overrides: dict[str, Any]) -> _ImageProcessor: ...
    def settings(self) -> dict[str, Any]: ...
    def to_dict(self) -> dict[str, Any]: ...
    def __call__(
        self,
        images: list[str | bytes | bytearray | npt.NDArray[np.uint8] | tuple[str, int, int, bytes, bytes | None]],
        overrides: dict[str, Any] | None = None,
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
    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]: ...
    def vocab_size(self, with_added_tokens: bool = True) -> int: ...
    def encode_batch(
        self,
        texts: Sequence[str],
        args: dict[str, Any],
        *,
        model_max_length: int,
        pad_token: str | None,
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
        prompt_tokens: int = 0,
        augment: dict[str, Any] | None = None,
        texts: Sequence[str] | None = None,
        questions: Sequence[Sequence[int]] | None = None,
        image_ids: Sequence[int] | None = None,
    ) -> _ImageCaptionData: ...
    def __len__(self) -> int: ...
    def batch(self, indices: Sequence[int], epoch: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]: ...
    def skipped(self) -> list[int]: ...
