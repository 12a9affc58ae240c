"""`BlipProcessor`: images and captions to model inputs, with transformers' API and numbers.

`BlipImageProcessor` (decode, convert to RGB, PIL-exact resize, rescale, normalise) and `BlipTokenizer`
(BERT WordPiece from `tokenizer.json`) run in the Rust core on all cores with the GIL released;
`BlipProcessor` combines them as transformers' `BlipProcessor` does. Folders are read and written in
transformers' layout, so either library loads what the other saved.
"""

from __future__ import annotations

import json
import operator
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from blip_peft import _blip_peft

PROCESSOR_CONFIG = "processor_config.json"
IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

# The image settings are defined in the core (their names, defaults and checks); these are read from it.
_IMAGE_SETTINGS = frozenset(_blip_peft._ImageProcessor.setting_names())
_IMAGE_DEFAULTS = _blip_peft._ImageProcessor().settings()
# PIL raises DecompressionBombError above twice Image.MAX_IMAGE_PIXELS; so do we, by default.
DEFAULT_MAX_IMAGE_PIXELS: int = _IMAGE_DEFAULTS["max_image_pixels"]
# transformers' "no limit" for model_max_length.
VERY_LARGE_INTEGER = int(1e30)

# PIL modes the core converts itself; other modes go through PIL's own convert("RGB").
_NATIVE_MODES = {"L", "LA", "RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "I;16", "I;16L", "I;16B", "1"}


class BatchEncoding(dict):
    """A dict of model inputs whose keys also read as attributes (`batch.pixel_values`), like
    transformers' `BatchEncoding` / `BatchFeature`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    @property
    def data(self) -> dict[str, Any]:
        return dict(self)

    def to(self, *args: Any, **kwargs: Any) -> BatchEncoding:
        """Moves tensors to a device; a dtype applies to floating-point tensors only (ids stay integers)."""
        dtype = kwargs.pop("dtype", None)
        device = kwargs.pop("device", None)
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            else:
                device = a
        out = BatchEncoding()
        for k, v in self.items():
            if isinstance(v, torch.Tensor):
                if dtype is not None and v.is_floating_point():
                    v = v.to(device=device, dtype=dtype, **kwargs)
                elif device is not None:
                    v = v.to(device=device, **kwargs)
            out[k] = v
        return out


def _check_return_tensors(return_tensors: Any) -> str | None:
    if return_tensors is None:
        return None
    value = getattr(return_tensors, "value", return_tensors)
    if value not in ("pt", "np"):
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
    return str(value)


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _write_json(path: str, data: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------


def _plain(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as the core reads them: numpy and torch values (arrays, scalars) as Python lists and numbers."""
    return {k: v.tolist() if isinstance(v, (np.ndarray, np.generic, torch.Tensor)) else v for k, v in settings.items()}


def _channels_last(array: np.ndarray, last: tuple[int, ...] = (1, 2, 3, 4)) -> np.ndarray:
    """A 3-D image array channels last: `(C, H, W)` with 1 or 3 channels is transposed, as transformers infers
    the layout, unless its last axis could be channels too (`last`: the channel counts channels last allows);
    such an array, e.g. `(3, H, 3)`, is taken as channels last."""
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in last:
        return np.ascontiguousarray(np.transpose(array, (1, 2, 0)))
    return array


def _native_image(image: Any, index: int, convert_rgb: bool) -> Any:
    """What the core accepts: a path, encoded bytes, a uint8 array, a float32/float64 array of RGB pixels
    (channels last), or PIL pixels as a tuple. torch tensors come as their numpy arrays."""
    if isinstance(image, (str, os.PathLike)):
        return os.fsdecode(image)
    if isinstance(image, (bytes, bytearray)):
        return image
    if isinstance(image, memoryview):
        return image.tobytes()
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dtype in (torch.float16, torch.bfloat16):
            image = image.float()
        image = image.numpy()
    if isinstance(image, np.ndarray):
        if image.dtype == np.float16:
            image = image.astype(np.float32)
        if image.dtype in (np.float32, np.float64):
            image = _channels_last(image, (1, 3))
            if image.ndim == 3 and image.shape[-1] == 1:  # one channel: gray as RGB
                image = np.repeat(image, 3, axis=-1)
            return np.ascontiguousarray(image)
        return _channels_last(image)
    if isinstance(image, Image.Image):
        mode = image.mode
        if mode not in _NATIVE_MODES:
            if not convert_rgb:
                raise ValueError(f"image {index}: mode {mode} is not RGB and do_convert_rgb is False")
            # Rare modes (I, F, YCbCr, LAB, HSV, premultiplied...): PIL's own conversion is the reference.
            image, mode = image.convert("RGB"), "RGB"
        palette = bytes(image.getpalette() or []) if mode in ("P", "PA") else None
        return (mode, image.width, image.height, image.tobytes(), palette)
    raise TypeError(
        f"image {index}: unsupported type {type(image).__name__}; expected a PIL image, a numpy array or torch "
        "tensor (uint8, or float RGB pixels in [0, 1] or [0, 255]), a path or encoded bytes"
    )


def _flat_images(images: Any) -> list[Any]:
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        flat: list[Any] = []
        for item in images:
            if isinstance(item, (list, tuple)):
                flat.extend(item)
            else:
                flat.append(item)
        return flat
    return [images]


def _as_transformers_dict(config: dict[str, Any]) -> dict[str, Any]:
    """The settings dict as transformers' `to_dict` returns it: `image_mean` / `image_std` as tuples."""
    return {k: tuple(v) if k in ("image_mean", "image_std") and isinstance(v, list) else v for k, v in config.items()}


def _write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Writes `text` to a temporary file next to `path`, then renames it over `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class BlipImageProcessor:
    """BLIP's image processor: transformers' `BlipImageProcessor` settings, PIL-exact numbers, in Rust.

    Accepts PIL images (any mode), numpy arrays and torch tensors (uint8 `(H, W)` / `(H, W, C)` / `(C, H, W)`,
    or float RGB pixels as transformers takes them: values in `[0, 1]` or whole numbers in `[0, 255]`, which
    `do_rescale` scales like any pixels; 4-D arrays or tensors are batches), file paths, encoded bytes, or lists
    mixing them. Returns `pixel_values` as float32 `[N, 3, H, W]`.

    Settings (transformers' names and defaults; read, checked and written by the core):

    - `do_resize`, `size` (an int, `{"height": h, "width": w}` or `(h, w)`; default 384x384), `resample`
      (a PIL filter number or `PIL.Image.Resampling`; default 3, bicubic);
    - `do_rescale`, `rescale_factor` (default 1/255); `do_normalize`, `image_mean`, `image_std` (one number
      or one per RGB channel; default OpenAI CLIP's); these must be finite, and `image_std` must not hold 0;
    - `do_convert_rgb`;
    - `max_image_pixels` (not a transformers setting, not saved): the most pixels an input image may have,
      whether encoded (checked before decoding) or given decoded (PIL image, numpy array); the default is
      PIL's refusal threshold (twice `Image.MAX_IMAGE_PIXELS`), `None` is no limit and 0 is refused.

    A `size` whose `pixel_values` would not fit in this machine's memory is a ValueError naming the bytes it
    would need, raised before anything is allocated. Any of the
    settings may be given per call (`processor(images, size=224)`; None keeps the setting) or assigned
    (`processor.size = 224`), checked the same way; other keys of a settings file are kept and saved back.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: int | Mapping[str, int] | Sequence[int] | None = None,
        resample: int = 3,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        **kwargs: Any,
    ) -> None:
        settings = dict(kwargs)
        settings.update(
            do_resize=do_resize,
            size=size,
            resample=resample,
            do_rescale=do_rescale,
            rescale_factor=rescale_factor,
            do_normalize=do_normalize,
            image_mean=image_mean,
            image_std=image_std,
            do_convert_rgb=do_convert_rgb,
            max_image_pixels=max_image_pixels,
        )
        self._native = _blip_peft._ImageProcessor(_plain(settings))

    @classmethod
    def _wrap(cls, native: _blip_peft._ImageProcessor) -> BlipImageProcessor:
        self = cls.__new__(cls)
        self._native = native
        return self

    # -- settings (held by the core) ---------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        native = self.__dict__.get("_native")
        if native is not None and name in _IMAGE_SETTINGS:
            return native.settings()[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _IMAGE_SETTINGS:
            object.__setattr__(self, "_native", self._native.with_overrides(_plain({name: value})))
        else:
            object.__setattr__(self, name, value)

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": {**self._native.to_dict(), "max_image_pixels": self.max_image_pixels}}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_native", _blip_peft._ImageProcessor(dict(state["settings"])))

    # -- configuration ----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], **kwargs: Any) -> BlipImageProcessor:
        return cls._wrap(_blip_peft._ImageProcessor(_plain({**config, **kwargs})))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> BlipImageProcessor:
        """Reads `preprocessor_config.json` (older layout) or the `image_processor` entry of
        `processor_config.json` (transformers 5 layout); `kwargs` override its settings."""
        return cls._wrap(_blip_peft._ImageProcessor.from_pretrained(os.fspath(path), _plain(kwargs)))

    def to_dict(self) -> dict[str, Any]:
        """The settings as transformers' `to_dict` gives them (`image_mean` / `image_std` as tuples)."""
        return _as_transformers_dict(self._native.to_dict())

    def to_json_string(self) -> str:
        """`preprocessor_config.json`'s text, as transformers writes it (sorted keys, two-space indent)."""
        return json.dumps(self._native.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike[str]) -> None:
        """Writes `to_json_string()` to a file (atomically)."""
        _write_text_atomic(json_file_path, self.to_json_string())

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> list[str]:
        """Writes `preprocessor_config.json` (what transformers' image processors write on their own)."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(os.fspath(save_directory), IMAGE_PROCESSOR_CONFIG)
        _write_json(path, self._native.to_dict())
        return [path]

    def __repr__(self) -> str:
        return f"BlipImageProcessor {self.to_json_string()}"

    # -- processing -------------------------------------------------------------------------------------

    def __call__(self, images: Any, return_tensors: Any = None, **kwargs: Any) -> BatchEncoding:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    def preprocess(self, images: Any, return_tensors: Any = None, **kwargs: Any) -> BatchEncoding:
        """Images to `{"pixel_values": ...}`: a torch tensor (`"pt"`), a numpy array (`"np"`) or, like
        transformers, a list of per-image arrays (`None`). Settings given as keywords apply to this call."""
        kind = _check_return_tensors(return_tensors)
        kwargs.pop("input_data_format", None)
        kwargs.pop("data_format", None)
        native = self._native.with_overrides(_plain(kwargs)) if kwargs else self._native
        flat = _flat_images(images)
        if not flat:
            raise ValueError("no images given")
        convert_rgb = native.settings()["do_convert_rgb"]
        pixels = native([_native_image(image, i, convert_rgb) for i, image in enumerate(flat)])
        if kind is None:
            return BatchEncoding(pixel_values=list(pixels))
        if isinstance(pixels, list):
            raise ValueError(
                "images of different sizes cannot be stacked into one tensor; enable do_resize or "
                "use return_tensors=None"
            )
        return BatchEncoding(pixel_values=torch.from_numpy(pixels) if kind == "pt" else pixels)


# ---------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------

_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_str(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and "content" in value:
        return str(value["content"])
    return str(value)


def _ids_list(ids: Any) -> Any:
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        return ids.tolist()
    return ids


def _token_id(value: Any, where: str = "") -> int:
    """One token id as the core takes it: an int that can index a vocabulary (the core refuses ids past it).
    `where` starts the message ("row 2: ")."""
    try:
        index = operator.index(value)
    except TypeError:
        raise TypeError(f"{where}token ids must be ints, got {type(value).__name__} {value!r}") from None
    if not 0 <= index < 2**32:
        raise ValueError(f"{where}token id {index} is not a vocabulary index (ids run from 0 to vocab_size - 1)")
    return index


class BlipTokenizer:
    """BLIP's tokenizer: BERT uncased WordPiece read from `tokenizer.json`, called like transformers'
    `BertTokenizer` (`padding`, `truncation`, `max_length`, `return_tensors`, ...), run in Rust."""

    model_input_names = ["input_ids", "token_type_ids", "attention_mask"]

    def __init__(self, tokenizer_file: str | os.PathLike[str] | None = None, **config: Any) -> None:
        if tokenizer_file is None:
            raise ValueError("BlipTokenizer needs a tokenizer.json (use BlipTokenizer.from_pretrained(folder))")
        self._native = _blip_peft._Tokenizer.from_file(os.fspath(tokenizer_file))
        self.init_kwargs = dict(config)
        self.model_max_length = int(config.get("model_max_length") or VERY_LARGE_INTEGER)
        self.padding_side = str(config.get("padding_side", "right"))
        self.truncation_side = str(config.get("truncation_side", "right"))
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.return_token_type_ids: bool | None = None
        self.special_tokens: dict[str, str] = {}
        for name in _SPECIAL_TOKEN_NAMES:
            token = _token_str(config.get(name))
            if token is not None:
                self.special_tokens[name] = token
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, Mapping):
            extra = list(extra.values())
        self.extra_special_tokens = [t for t in (_token_str(v) for v in extra) if t is not None]

    # -- loading and saving -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> BlipTokenizer:
        """Reads `tokenizer.json`, plus `tokenizer_config.json` and `special_tokens_map.json` if present."""
        folder = os.fspath(path)
        tokenizer_file = os.path.join(folder, TOKENIZER_FILE)
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"tokenizer file not found: {tokenizer_file}")
        config: dict[str, Any] = {}
        special_map = os.path.join(folder, SPECIAL_TOKENS_MAP)
        if os.path.isfile(special_map):
            config.update(_read_json(special_map))
        tokenizer_config = os.path.join(folder, TOKENIZER_CONFIG)
        if os.path.isfile(tokenizer_config):
            config.update(_read_json(tokenizer_config))
        config.update(kwargs)
        return cls(tokenizer_file, **config)

    @classmethod
    def from_transformers(cls, tokenizer: Any) -> BlipTokenizer:
        """Our tokenizer with the same files as a transformers tokenizer object."""
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            return cls.from_pretrained(tmp)

    def to_config(self) -> dict[str, Any]:
        config = {k: v for k, v in self.init_kwargs.items() if k not in ("tokenizer_file", "name_or_path")}
        config.update(self.special_tokens)
        config.pop("additional_special_tokens", None)
        config["extra_special_tokens"] = list(self.extra_special_tokens)
        config["model_max_length"] = self.model_max_length
        config["padding_side"] = self.padding_side
        config["truncation_side"] = self.truncation_side
        config["clean_up_tokenization_spaces"] = self.clean_up_tokenization_spaces
        config.setdefault("tokenizer_class", "BertTokenizer")
        config.setdefault("do_lower_case", True)
        return config

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> list[str]:
        """Writes `tokenizer.json` and `tokenizer_config.json`, which transformers' BertTokenizer loads."""
        folder = os.fspath(save_directory)
        os.makedirs(folder, exist_ok=True)
        tokenizer_file = os.path.join(folder, TOKENIZER_FILE)
        with open(tokenizer_file, "w", encoding="utf-8") as f:
            f.write(self._native.to_str(True))
        config_file = os.path.join(folder, TOKENIZER_CONFIG)
        _write_json(config_file, self.to_config())
        return [tokenizer_file, config_file]

    # -- vocabulary -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._native.vocab_size(True))

    @property
    def vocab_size(self) -> int:
        return int(self._native.vocab_size(False))

    def get_vocab(self) -> dict[str, int]:
        """Every token with its id, the added tokens included (transformers' `get_vocab()`)."""
        return dict(self._native.get_vocab(True))

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> Any:
        unk = self._token_id("unk_token")
        if isinstance(tokens, str):
            found = self._native.token_to_id(tokens)
            return unk if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> Any:
        if isinstance(ids, int):
            return self._native.id_to_token(_token_id(ids))
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._native.id_to_token(_token_id(i)) for i in _ids_list(ids) if i not in special]

    def _token_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._native.token_to_id(token)

    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    unk_token = property(lambda self: self.special_tokens.get("unk_token"))
    sep_token = property(lambda self: self.special_tokens.get("sep_token"))
    cls_token = property(lambda self: self.special_tokens.get("cls_token"))
    mask_token = property(lambda self: self.special_tokens.get("mask_token"))
    pad_token_id = property(lambda self: self._token_id("pad_token"))
    bos_token_id = property(lambda self: self._token_id("bos_token"))
    eos_token_id = property(lambda self: self._token_id("eos_token"))
    unk_token_id = property(lambda self: self._token_id("unk_token"))
    sep_token_id = property(lambda self: self._token_id("sep_token"))
    cls_token_id = property(lambda self: self._token_id("cls_token"))
    mask_token_id = property(lambda self: self._token_id("mask_token"))

    @property
    def all_special_tokens(self) -> list[str]:
        tokens = list(self.special_tokens.values()) + list(self.extra_special_tokens)
        return list(dict.fromkeys(tokens))

    @property
    def all_special_ids(self) -> list[int]:
        ids = [self._native.token_to_id(t) for t in self.all_special_tokens]
        return [i for i in ids if i is not None]

    # -- encoding ---------------------------------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        text_pair: Any = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: Any = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        """Tokenises one text or a list of texts (transformers' `tokenizer(...)`).

        `padding`: `True`/`"longest"` (to the longest row), `"max_length"`, `False`/`"do_not_pad"`.
        `truncation`: `True`/`"longest_first"`/`"only_first"` (to `max_length`, special tokens included),
        `False`/`"do_not_truncate"`. As in transformers: a `max_length` without `padding` or `truncation`
        truncates; a missing `max_length` falls back to `model_max_length` (none when that is transformers'
        "no limit"); `pad_to_multiple_of` rounds padded rows up, and with truncation `max_length` must be its
        multiple; `padding=True` with a `max_length` and no truncation warns that `max_length` is ignored
        (`verbose=False` silences it). The core resolves these arguments, so the Rust tokenizer alone follows
        transformers."""
        if text is None:
            raise ValueError("text is required")
        if text_pair is not None:
            raise ValueError("text pairs are not supported by the BLIP tokenizer")
        if stride:
            raise ValueError("stride (overflowing tokens) is not supported")
        for flag in ("return_overflowing_tokens", "return_special_tokens_mask", "return_offsets_mapping"):
            if kwargs.pop(flag, False):
                raise ValueError(f"{flag}=True is not supported")
        verbose = kwargs.pop("verbose", True)
        kwargs.pop("return_length", None)
        if kwargs:
            raise TypeError(f"unexpected tokenizer arguments: {sorted(kwargs)}")
        kind = _check_return_tensors(return_tensors)
        single = isinstance(text, str)
        texts: list[str]
        if isinstance(text, str):
            texts = [text]
        elif isinstance(text, (list, tuple)):
            texts = list(text)
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise TypeError(f"text {i} is {type(t).__name__}, not a string")
        else:
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        # The core resolves these as transformers does (max_length falling back to model_max_length, ...).
        args = {
            "add_special_tokens": add_special_tokens,
            "padding": padding,
            "truncation": truncation,
            "max_length": max_length,
            "pad_to_multiple_of": pad_to_multiple_of,
            "padding_side": padding_side,
            "verbose": verbose,
        }
        ids, mask, types = self._native.encode_batch(
            texts,
            args,
            model_max_length=self.model_max_length,
            pad_token=self.pad_token,
            padding_side=self.padding_side,
            truncation_side=self.truncation_side,
        )
        want_types = return_token_type_ids if return_token_type_ids is not None else self.return_token_type_ids
        out: dict[str, Any] = {"input_ids": ids}
        if want_types is not False:
            out["token_type_ids"] = types
        if return_attention_mask is not False:
            out["attention_mask"] = mask
        return BatchEncoding({k: self._as(kind, v, single) for k, v in out.items()})

    @staticmethod
    def _as(kind: str | None, rows: list[list[int]], single: bool) -> Any:
        if kind is None:
            return rows[0] if single else rows
        if len({len(r) for r in rows}) > 1:
            raise ValueError(
                "Unable to create tensor: the rows have different lengths; activate padding with "
                "padding=True (and truncation=True for long texts)"
            )
        if kind == "pt":
            return torch.tensor(rows, dtype=torch.long)
        return np.array(rows, dtype=np.int64)

    # -- decoding ---------------------------------------------------------------------------------------

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Token id rows (lists, a 2-D tensor or array) to strings, as transformers decodes them."""
        rows = _ids_list(sequences)
        if isinstance(rows, Mapping):
            rows = rows["input_ids"]
        rows = [[_token_id(i, f"row {r}: ") for i in _ids_list(row)] for r, row in enumerate(rows)]
        clean = (
            self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        )
        return list(
            self._native.decode_batch(
                rows, skip_special_tokens=bool(skip_special_tokens), clean_up_tokenization_spaces=bool(clean)
            )
        )

    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """One row of token ids (or a single id) to a string."""
        ids = _ids_list(token_ids)
        if isinstance(ids, int):
            ids = [ids]
        return self.batch_decode([ids], skip_special_tokens, clean_up_tokenization_spaces)[0]

    def __repr__(self) -> str:
        return (
            f"BlipTokenizer(vocab_size={len(self)}, model_max_length={self.model_max_length}, "
            f"special_tokens={self.all_special_tokens})"
        )


# ---------------------------------------------------------------------------------------------------------
# Both
# ---------------------------------------------------------------------------------------------------------


class BlipProcessor:
    """transformers' `BlipProcessor`: `processor(images=..., text=...)` gives `pixel_values`, `input_ids`
    and `attention_mask`; `batch_decode`/`decode` turn generated ids into captions."""

    attributes = ["image_processor", "tokenizer"]
    model_input_names = ["pixel_values", "input_ids", "attention_mask"]

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, **kwargs: Any) -> None:
        if image_processor is None:
            raise ValueError("BlipProcessor needs an image_processor")
        if tokenizer is None:
            raise ValueError("BlipProcessor needs a tokenizer")
        if not isinstance(image_processor, BlipImageProcessor):
            if not hasattr(image_processor, "to_dict"):
                raise TypeError(f"image_processor must be a BlipImageProcessor, got {type(image_processor).__name__}")
            image_processor = BlipImageProcessor.from_dict(image_processor.to_dict())
        if not isinstance(tokenizer, BlipTokenizer):
            if not hasattr(tokenizer, "save_pretrained"):
                raise TypeError(f"tokenizer must be a BlipTokenizer, got {type(tokenizer).__name__}")
            tokenizer = BlipTokenizer.from_transformers(tokenizer)
        # As transformers' BlipProcessor: the model takes no token_type_ids.
        tokenizer.return_token_type_ids = False
        self.image_processor: BlipImageProcessor = image_processor
        self.tokenizer: BlipTokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> BlipProcessor:
        """Reads a transformers processor folder (older or transformers 5 layout)."""
        folder = os.fspath(path)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"processor folder not found: {folder}")
        image_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _IMAGE_SETTINGS}
        return cls(
            image_processor=BlipImageProcessor.from_pretrained(folder, **image_kwargs),
            tokenizer=BlipTokenizer.from_pretrained(folder, **kwargs),
        )

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> list[str]:
        """Writes the transformers 5 layout: `processor_config.json` (with the image settings) and the
        tokenizer files; `transformers.BlipProcessor.from_pretrained` loads it."""
        folder = os.fspath(save_directory)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, PROCESSOR_CONFIG)
        _write_json(path, json.loads(self.to_json_string()))
        files = [path, *self.tokenizer.save_pretrained(folder)]
        config_file = os.path.join(folder, TOKENIZER_CONFIG)
        config = _read_json(config_file)
        config["processor_class"] = "BlipProcessor"
        _write_json(config_file, config)
        return files

    def to_dict(self) -> dict[str, Any]:
        """transformers' `ProcessorMixin.to_dict`: the image processor's settings and the processor class (the
        tokenizer is saved in its own files)."""
        return {"image_processor": self.image_processor.to_dict(), "processor_class": type(self).__name__}

    def to_json_string(self) -> str:
        """`processor_config.json`'s text, as transformers writes it."""
        data = {"image_processor": self.image_processor._native.to_dict(), "processor_class": type(self).__name__}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike[str]) -> None:
        """Writes `to_json_string()` to a file (atomically)."""
        _write_text_atomic(json_file_path, self.to_json_string())

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        return_tensors: Any = None,
        *,
        text_kwargs: Mapping[str, Any] | None = None,
        images_kwargs: Mapping[str, Any] | None = None,
        common_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        """Images and/or captions to model inputs. Options go flat (`padding=True, size=224`: image settings to
        the image processor, the rest to the tokenizer) or structured as transformers' processors take them:
        `text_kwargs={...}`, `images_kwargs={...}`, `common_kwargs={...}` (to both, e.g. `return_tensors`). A
        key given both flat and in a structured dict is a ValueError, as in transformers."""
        if images is None and text is None:
            raise ValueError("You have to specify either images or text.")
        for name, given in (("text_kwargs", text_kwargs), ("images_kwargs", images_kwargs)):
            for key in given or {}:
                if key in kwargs:
                    raise ValueError(
                        f"Keyword argument {key} was passed two times: in a dictionary for {name} and as a **kwarg."
                    )
        common = dict(common_kwargs or {})
        if "return_tensors" in common:
            common_tensors = common.pop("return_tensors")
            return_tensors = common_tensors if return_tensors is None else return_tensors
        image_kwargs = {k: v for k, v in common.items() if k in _IMAGE_SETTINGS}
        token_kwargs = {k: v for k, v in common.items() if k not in _IMAGE_SETTINGS}
        image_kwargs.update({k: kwargs.pop(k) for k in list(kwargs) if k in _IMAGE_SETTINGS})
        image_kwargs.update(images_kwargs or {})
        token_kwargs.update(kwargs)
        token_kwargs.update(text_kwargs or {})
        image_tensors = image_kwargs.pop("return_tensors", return_tensors)
        text_tensors = token_kwargs.pop("return_tensors", return_tensors)
        out = BatchEncoding()
        if images is not None:
            out.update(self.image_processor(images, return_tensors=image_tensors, **image_kwargs))
        if text is not None:
            token_kwargs.setdefault("return_token_type_ids", False)
            out.update(self.tokenizer(text, return_tensors=text_tensors, **token_kwargs))
        return out

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def __repr__(self) -> str:
        return f"BlipProcessor(image_processor={self.image_processor!r}, tokenizer={self.tokenizer!r})"


AutoProcessor = BlipProcessor
