"""Property-based bad input (hypothesis) for the public entry points: whatever values of whatever types a
caller passes, the answer is a result or a clear exception of an ordinary class (ValueError, TypeError,
MemoryError, FileNotFoundError...) whose message names the argument; never a panic, an abort, a raw libtorch
message or an internal format (JSON) leaking. Also a short seeded fuzz of the file loaders through Python."""

from __future__ import annotations

import io
import json
import os
import shutil

import pytest
import torch
from conftest import tiny_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blip_peft as bp
from blip_peft.presets import TINY_TEXT

CLEAR = (ValueError, TypeError, MemoryError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
LEAKS = ("invalid JSON", "libtorch error", "Exception raised from", "PanicException", "Traceback", "capacity overflow")
# A file's own format may be named in a message about that file (safetensors headers and configs are JSON).
FILE_LEAKS = LEAKS[1:]
SETTINGS = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Every kind of value a hostile or careless caller passes.
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, -(2**63), 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 200), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just(object()),
    st.just(b"bytes"),
)


def _clear(e: BaseException, *names: str, leaks: tuple[str, ...] = LEAKS) -> None:
    assert isinstance(e, CLEAR), f"{type(e).__name__}: {e}"
    text = str(e)
    for leak in leaks:
        assert leak not in text, text
    if names and not isinstance(e, MemoryError):
        assert any(n in text for n in names), f"{text!r} does not name {names}"


@pytest.fixture(scope="module")
def model(tiny_checkpoint: str) -> bp.BlipForConditionalGeneration:
    return bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint)


GENERATE_NAMES = [n for n in bp._blip_peft.generation_setting_names() if n != "seed"]


@SETTINGS
@given(settings_=st.dictionaries(st.sampled_from(GENERATE_NAMES), VALUES, min_size=1, max_size=3))
def test_generate_any_settings(model, settings_) -> None:
    px, _, _ = tiny_batch(batch=1)
    # Long outputs are legal but slow: cap them (the checks under test run before any decoding).
    safe = dict(settings_)
    for k in ("max_new_tokens", "max_length", "min_new_tokens", "min_length"):
        v = safe.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and 5 < v < TINY_TEXT["max_position_embeddings"]:
            safe[k] = 5
    # Requests that fit in memory would only take long; absurd ones (a MemoryError before allocating) stay.
    for k in ("num_beams", "num_return_sequences"):
        v = safe.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and 4 < v < 10**9:
            safe[k] = 4
    try:
        out = model.generate(pixel_values=px, **safe)
    except BaseException as e:  # noqa: BLE001
        _clear(e, *safe)
    else:
        assert out.dtype == torch.long and out.shape[1] <= TINY_TEXT["max_position_embeddings"]
        assert int(out.min()) >= 0 and int(out.max()) < TINY_TEXT["vocab_size"]


TRAIN_NAMES = [
    "epochs", "max_steps", "batch_size", "learning_rate", "weight_decay", "adam_eps", "lr_scheduler",
    "warmup_steps", "warmup_ratio", "gradient_accumulation_steps", "max_grad_norm", "mixed_precision",
    "max_length", "seed", "save_steps", "save_total_limit", "eval_steps", "logging_steps", "num_workers",
]  # fmt: skip


@SETTINGS
@given(settings_=st.dictionaries(st.sampled_from(TRAIN_NAMES), VALUES, min_size=1, max_size=2))
def test_train_any_settings(model, settings_) -> None:
    data = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": torch.randint(4, 90, (2, 6))}
    kwargs = {"max_steps": 1, "progress": False, **settings_}
    for k in ("max_steps", "epochs"):  # huge but valid run lengths would only take long
        if isinstance(kwargs.get(k), int) and not isinstance(kwargs[k], bool) and kwargs[k] > 2:
            kwargs[k] = 2
    try:
        bp.train(model, None, data, **kwargs)
    except BaseException as e:  # noqa: BLE001
        _clear(e, *settings_, "output_dir")


LORA_NAMES = [
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "modules_to_save",
    "init_lora_weights", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "use_rslora",
]  # fmt: skip


@SETTINGS
@given(fields=st.dictionaries(st.sampled_from(LORA_NAMES), VALUES, min_size=1, max_size=2))
def test_lora_any_fields(tiny_checkpoint: str, fields) -> None:
    fields = {"target_modules": ["query"], **fields}
    r = fields.get("r")
    if isinstance(r, int) and not isinstance(r, bool) and 64 < r < 10**10:
        fields["r"] = 10**10  # ranks that fit in memory would only take long: take an absurd one
    try:
        config = bp.LoraConfig(**fields)
        bp.get_peft_model(bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), config)
    except BaseException as e:  # noqa: BLE001
        _clear(e, *fields, "target", "layer", "module")


SHAPES = st.lists(st.integers(0, 40), min_size=0, max_size=5)
DTYPES = st.sampled_from(
    [torch.float32, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool, torch.uint8]
)


@SETTINGS
@given(px_shape=SHAPES, px_dtype=DTYPES, ids_shape=SHAPES, ids_dtype=DTYPES, ids_high=st.integers(-5, 200))
def test_forward_any_tensors(model, px_shape, px_dtype, ids_shape, ids_dtype, ids_high) -> None:
    px = torch.zeros(px_shape, dtype=px_dtype)
    ids = torch.full(ids_shape, ids_high).to(ids_dtype)
    try:
        model(pixel_values=px, input_ids=ids)
    except BaseException as e:  # noqa: BLE001
        _clear(e, "pixel_values", "input_ids")


@SETTINGS
@given(px_shape=SHAPES, px_dtype=DTYPES)
def test_generate_any_pixel_tensor(model, px_shape, px_dtype) -> None:
    try:
        model.generate(pixel_values=torch.zeros(px_shape, dtype=px_dtype), max_new_tokens=2)
    except BaseException as e:  # noqa: BLE001
        _clear(e, "pixel_values")


# --------------------------------------------------------------- the file loaders through Python, seeded
CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fuzz", "corpus")


def _seeds(target: str) -> list[bytes]:
    folder = os.path.join(CORPUS, target)
    return [open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))]


def _mutations(seeds: list[bytes]):
    return st.tuples(
        st.sampled_from(seeds),
        st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
        st.integers(0, 10**6),
    ).map(lambda t: _apply(*t))


def _apply(seed: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    data = bytearray(seed)
    for pos, value in edits:
        if data:
            data[pos % len(data)] = value
    if cut % 3 == 0 and data:
        del data[cut % len(data) :]
    return bytes(data)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=_mutations(_seeds("config_json")))
def test_config_json_files(tmp_path_factory, data: bytes) -> None:
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "config.json").write_bytes(data)
    try:
        bp.BlipForConditionalGeneration.from_pretrained(folder)
    except BaseException as e:  # noqa: BLE001
        _clear(e, leaks=FILE_LEAKS)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=_mutations(_seeds("adapter_config_json")))
def test_adapter_config_files(tmp_path_factory, tiny_checkpoint: str, data: bytes) -> None:
    folder = tmp_path_factory.mktemp("adapter")
    (folder / "adapter_config.json").write_bytes(data)
    try:
        bp.PeftModel.from_pretrained(bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), folder)
    except BaseException as e:  # noqa: BLE001
        _clear(e, leaks=FILE_LEAKS)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=_mutations(_seeds("safetensors")))
def test_weights_files(tmp_path_factory, tiny_checkpoint: str, data: bytes) -> None:
    folder = tmp_path_factory.mktemp("weights")
    shutil.copy(os.path.join(tiny_checkpoint, "config.json"), folder / "config.json")
    (folder / "model.safetensors").write_bytes(data[1:])
    try:
        bp.BlipForConditionalGeneration.from_pretrained(folder)
    except BaseException as e:  # noqa: BLE001
        _clear(e, leaks=FILE_LEAKS)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=_mutations(_seeds("tokenizer_json")))
def test_tokenizer_files(tmp_path_factory, data: bytes) -> None:
    folder = tmp_path_factory.mktemp("tok")
    (folder / "tokenizer.json").write_bytes(data)
    try:
        tok = bp.BlipTokenizer.from_pretrained(folder)
        tok(["a picture of a red cube", ""], padding=True)
    except BaseException as e:  # noqa: BLE001
        _clear(e, leaks=FILE_LEAKS)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=_mutations(_seeds("image")))
def test_image_bytes(data: bytes) -> None:
    try:
        out = bp.BlipImageProcessor(size={"height": 16, "width": 16})(data, return_tensors="pt")
    except BaseException as e:  # noqa: BLE001
        _clear(e, leaks=FILE_LEAKS)
    else:
        assert out["pixel_values"].shape == (1, 3, 16, 16)
        assert torch.isfinite(out["pixel_values"]).all()


PROCESSOR_SEED = json.dumps(
    {
        "do_resize": True,
        "size": {"height": 16, "width": 16},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
        "image_processor_type": "BlipImageProcessor",
    }
).encode()


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    data=_mutations([PROCESSOR_SEED]), layout=st.sampled_from(["preprocessor_config.json", "processor_config.json"])
)
def test_processor_config_files(tmp_path_factory, data: bytes, layout: str) -> None:
    from PIL import Image

    folder = tmp_path_factory.mktemp("proc")
    if layout == "processor_config.json":
        try:
            data = json.dumps({"image_processor": json.loads(data)}).encode()
        except ValueError:
            pass
    (folder / layout).write_bytes(data)
    image = Image.new("RGB", (5, 7), (10, 20, 30))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    try:
        processor = bp.BlipImageProcessor.from_pretrained(folder)
        size = processor.size
        if isinstance(size, dict) and all(isinstance(v, int) and v < 2048 for v in size.values()):
            processor(image, return_tensors="pt")
    except BaseException as e:  # noqa: BLE001
        _clear(e, leaks=FILE_LEAKS)


def test_the_checks_above_see_a_leak() -> None:
    """The property tests would catch the old failures: an internal format or a panic in a message."""
    with pytest.raises(AssertionError):
        _clear(ValueError("invalid JSON: expected value at line 1 column 24"))
    with pytest.raises(AssertionError):
        _clear(OverflowError("can't convert negative int to unsigned"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> bp.BlipTokenizer:
    folder = tmp_path_factory.mktemp("tok_ok")
    with open(os.path.join(CORPUS, "tokenizer_json", "wordpiece.json"), "rb") as seed:
        (folder / "tokenizer.json").write_bytes(seed.read())
    return bp.BlipTokenizer.from_pretrained(folder)


TOKENIZER_NAMES = ["max_length", "pad_to_multiple_of", "padding", "truncation", "add_special_tokens", "padding_side"]


@SETTINGS
@given(kwargs=st.dictionaries(st.sampled_from(TOKENIZER_NAMES), VALUES, min_size=1, max_size=3))
def test_tokenizer_any_arguments(tokenizer, kwargs) -> None:
    """Any value of the call's arguments: tokens, or an error naming the argument (never a bare OverflowError
    from an unsigned conversion, or serde's Rust type names)."""
    try:
        tokenizer(["a picture of a red cube", "a"], **kwargs)
    except BaseException as e:  # noqa: BLE001
        _clear(e, *kwargs)
        assert "expected usize" not in str(e) and "expected u64" not in str(e), str(e)


@SETTINGS
@given(ids=st.lists(VALUES, min_size=1, max_size=3))
def test_token_ids_any_values(tokenizer, ids) -> None:
    for call in (tokenizer.convert_ids_to_tokens, tokenizer.decode, lambda x: tokenizer.batch_decode([x])):
        try:
            call(ids)
        except BaseException as e:  # noqa: BLE001
            _clear(e)


@SETTINGS
@given(value=st.integers(min_value=-(2**70), max_value=-1))
def test_negative_model_max_length_is_named(tokenizer, value: int) -> None:
    old = tokenizer.model_max_length
    tokenizer.model_max_length = value
    try:
        with pytest.raises(ValueError, match="model_max_length"):
            tokenizer(["a dog"], truncation=True)
    finally:
        tokenizer.model_max_length = old


IMAGE_NAMES = ["size", "max_image_pixels", "resample", "rescale_factor", "do_resize", "image_mean", "do_normalize"]


@SETTINGS
@given(kwargs=st.dictionaries(st.sampled_from(IMAGE_NAMES), VALUES, min_size=1, max_size=3))
def test_image_processor_any_arguments(kwargs) -> None:
    from PIL import Image

    image = Image.new("RGB", (5, 7), (10, 20, 30))
    size = kwargs.get("size")
    if isinstance(size, int) and not isinstance(size, bool) and size > 256:
        kwargs["size"] = 256  # a large output is a memory question, tested in test_hardening
    try:
        out = bp.BlipImageProcessor()(image, return_tensors="pt", **kwargs)
    except BaseException as e:  # noqa: BLE001
        _clear(e, *kwargs)
        assert "expected usize" not in str(e) and "expected u64" not in str(e), str(e)
    else:
        assert out["pixel_values"].ndim == 4


def test_a_gif_frame_past_its_screen_is_refused_by_the_pixel_limit() -> None:
    """The image fuzzer's finding: a 375-byte GIF whose frame is far larger than its 7x9 screen once took
    seconds and gigabytes; the pixel limit now bounds what the decoder may allocate."""
    with open(os.path.join(CORPUS, "image", "gif_frame_past_screen.gif"), "rb") as f:
        data = f.read()
    with pytest.raises(ValueError, match="max_image_pixels"):
        bp.BlipImageProcessor()(data)
