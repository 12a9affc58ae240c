"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/): small valid files of every kind each
loader reads, from which libFuzzer mutates. Run once (the seeds are committed): `python fuzz/make_corpus.py`."""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image
from safetensors.numpy import save
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target: str, name: str, data: bytes) -> None:
    os.makedirs(os.path.join(ROOT, target), exist_ok=True)
    with open(os.path.join(ROOT, target, name), "wb") as f:
        f.write(data)


def configs() -> None:
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "blip_peft", "presets.py")
    spec = importlib.util.spec_from_file_location("presets", path)
    assert spec is not None and spec.loader is not None
    presets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(presets)
    BASE_TEXT, BASE_VISION, TINY_TEXT, TINY_VISION = (  # noqa: N806
        presets.BASE_TEXT,
        presets.BASE_VISION,
        presets.TINY_TEXT,
        presets.TINY_VISION,
    )

    for name, (text, vision) in {"tiny": (TINY_TEXT, TINY_VISION), "base": (BASE_TEXT, BASE_VISION)}.items():
        doc = {"model_type": "blip", "text_config": dict(text), "vision_config": dict(vision)}
        put("config_json", f"{name}.json", json.dumps(doc, indent=1).encode())
    put("config_json", "empty.json", b"{}")
    put("config_json", "partial.json", b'{"text_config": {"vocab_size": 5, "hidden_size": 8}, "projection_dim": 4}')


def adapter_configs() -> None:
    base = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": ["query", "value"],
        "bias": "none",
        "init_lora_weights": True,
    }
    variants = {
        "plain": base,
        "regex": dict(base, target_modules=r".*\.(query|value)", exclude_modules=["qkv"]),
        "patterns": dict(base, rank_pattern={"query": 4}, alpha_pattern={"value": 2.5}, use_rslora=True),
        "layers": dict(base, layers_to_transform=[0, 1], layers_pattern=["layer", "layers"]),
        "saved": dict(base, target_modules="all-linear", modules_to_save=["post_layernorm"], use_dora=True),
        "init": dict(base, init_lora_weights="gaussian", fan_in_fan_out=False, inference_mode=True),
    }
    for name, doc in variants.items():
        put("adapter_config_json", f"{name}.json", json.dumps(doc).encode())


def safetensors_files() -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "b.bias": rng.standard_normal((5,)).astype(np.float16),
        "c.ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "d.flag": np.array([True, False]),
        "e.scalar": np.array(1.5, dtype=np.float64),
        "f.empty": np.zeros((0, 3), dtype=np.float32),
        "g.u8": np.arange(4, dtype=np.uint8),
    }
    whole = save(tensors, metadata={"format": "pt"})
    put("safetensors", "mixed.safetensors", bytes([255]) + whole)
    one = save({"x": np.ones((2, 2), dtype=np.float32)})
    other = save({"y": np.zeros((1, 3), dtype=np.int32)})
    # First byte: where the rest is cut into two shards.
    put("safetensors", "two_shards.safetensors", bytes([int(255 * len(one) / (len(one) + len(other)))]) + one + other)
    dup = save({"x": np.ones((1,), dtype=np.float32)})
    put("safetensors", "duplicate_names.safetensors", bytes([128]) + dup + dup)


def tokenizers_json() -> None:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "picture", "of", "red", "cube", "##s", "the"]
    wp = Tokenizer(WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    wp.decoder = decoders.WordPiece()
    wp.add_special_tokens(["[DEC]"])
    put("tokenizer_json", "wordpiece.json", wp.to_str().encode())
    bpe = Tokenizer(BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
    put("tokenizer_json", "bpe.json", bpe.to_str().encode())


def images() -> None:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    out = {
        "rgb.png": (rgb, "PNG", {}),
        "rgba.png": (rgb.convert("RGBA"), "PNG", {}),
        "palette.png": (rgb.convert("P"), "PNG", {}),
        "gray16.png": (Image.fromarray(rng.integers(0, 65535, (5, 6), dtype=np.uint16)), "PNG", {}),
        "la.png": (rgb.convert("LA"), "PNG", {}),
        "rgb.jpg": (rgb, "JPEG", {"quality": 80}),
        "gray.jpg": (rgb.convert("L"), "JPEG", {}),
        "cmyk.jpg": (rgb.convert("CMYK"), "JPEG", {}),
        "progressive.jpg": (rgb, "JPEG", {"progressive": True}),
        "rgb.gif": (rgb, "GIF", {}),
        "rgb.bmp": (rgb, "BMP", {}),
        "rgb.webp": (rgb, "WEBP", {"lossless": True}),
        "lossy.webp": (rgb, "WEBP", {"quality": 50}),
        "rgb.tiff": (rgb, "TIFF", {}),
        "cmyk.tiff": (rgb.convert("CMYK"), "TIFF", {}),
    }
    for name, (image, fmt, kwargs) in out.items():
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kwargs)
        put("image", name, buf.getvalue())


if __name__ == "__main__":
    configs()
    adapter_configs()
    safetensors_files()
    tokenizers_json()
    images()
    for target in sorted(os.listdir(ROOT)):
        print(target, len(os.listdir(os.path.join(ROOT, target))))
