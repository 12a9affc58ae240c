"""Training-time augmentation (`train(augment=...)`, #20): each operation against PIL's output for the same
parameters (torchvision is not installed; its `resized_crop` and `hflip` on PIL images are these PIL calls),
the pipeline against PIL reconstructions of the drawn plan, seeded determinism, captions naming a side, and
training runs with the recipe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

import blip_peft as bp
from blip_peft import _blip_peft, world

FILL = (128, 128, 128)


def _image(h: int, w: int, seed: int, low: int = 0, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, (h, w, 3), dtype=np.uint8)


def _smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """Gradients plus noise: less extreme than uniform noise, so resampling and histograms vary."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 200 / w, y * 180 / h, (x + y) * 90 / (w + h) + 40], axis=-1)
    noise = np.random.default_rng(seed).normal(0, 12, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _ours(a: np.ndarray, *ops: dict) -> np.ndarray:
    return _blip_peft.augment_image(a, list(ops))


def _lavis_to_pil(m: tuple[float, ...]) -> tuple[float, ...]:
    """An OpenCV-convention source-from-output map (pixel centres at integers) as PIL AFFINE data."""
    a, b, c, d, e, f = m
    return (a, b, c + 0.5 - 0.5 * a - 0.5 * b, d, e, f + 0.5 - 0.5 * d - 0.5 * e)


def _pil_affine(a: np.ndarray, data: tuple[float, ...]) -> np.ndarray:
    im = Image.fromarray(a)
    return np.asarray(im.transform(im.size, Image.AFFINE, data, Image.BILINEAR, fillcolor=FILL))


def _pil_op(im: Image.Image, op: dict) -> Image.Image:
    """The PIL oracle of one operation."""
    name = op["op"]
    a = np.asarray(im)
    h, w = a.shape[:2]
    if name == "ResizedCrop":
        box = (op["left"], op["top"], op["left"] + op["width"], op["top"] + op["height"])
        return im.crop(box).resize((op["out_width"], op["out_height"]), op["resample"])
    if name == "Flip":
        return im.transpose(Image.FLIP_LEFT_RIGHT)
    if name == "Identity":
        return im
    if name == "AutoContrast":
        return ImageOps.autocontrast(im)
    if name == "Equalize":
        return ImageOps.equalize(im)
    if name == "Brightness":
        return ImageEnhance.Brightness(im).enhance(op["factor"])
    if name == "Sharpness":
        return ImageEnhance.Sharpness(im).enhance(op["factor"])
    if name == "ShearX":
        m = (1, -op["factor"], 0, 0, 1, 0)
    elif name == "ShearY":
        m = (1, 0, 0, -op["factor"], 1, 0)
    elif name == "TranslateX":
        m = (1, 0, op["offset"], 0, 1, 0)
    elif name == "TranslateY":
        m = (1, 0, 0, 0, 1, op["offset"])
    elif name == "Rotate":
        t = math.radians(op["degrees"])
        c, s = math.cos(t), math.sin(t)
        cx, cy = w / 2, h / 2
        m = (c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy)
    else:
        raise AssertionError(name)
    return Image.fromarray(_pil_affine(a, _lavis_to_pil(m)))


@pytest.mark.parametrize("shape", [(37, 53), (300, 200), (64, 64)])
def test_resized_crop_is_pils_crop_then_resize(shape) -> None:
    """torchvision's resized_crop on a PIL image is img.crop(box).resize(size, filter): bit-equal."""
    a = _smooth_image(*shape, seed=1)
    h, w = shape
    rng = np.random.default_rng(0)
    for resample in (3, 2):
        for out in ((24, 24), (96, 80), (384, 384)):
            ch, cw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            op = dict(
                op="ResizedCrop",
                top=top,
                left=left,
                height=ch,
                width=cw,
                out_height=out[0],
                out_width=out[1],
                resample=resample,
            )
            want = np.asarray(_pil_op(Image.fromarray(a), op))
            np.testing.assert_array_equal(_ours(a, op), want, err_msg=str(op))


def test_flip_is_pils_transpose() -> None:
    a = _image(5, 8, 2)
    np.testing.assert_array_equal(_ours(a, {"op": "Flip"}), np.asarray(Image.fromarray(a).transpose(0)))


@pytest.mark.parametrize("op", ["AutoContrast", "Equalize"])
def test_histogram_ops_are_pils(op) -> None:
    images = [
        _image(40, 30, 3),
        _image(40, 30, 4, low=60, high=140),  # a narrow range: autocontrast stretches, equalize steps are small
        _smooth_image(50, 70, 5),
        np.full((9, 9, 3), 77, np.uint8),  # one value: both leave it
        np.where(_image(16, 16, 6) > 128, 250, 3).astype(np.uint8),  # two values
        np.concatenate([np.zeros((300, 4, 3), np.uint8), _image(300, 1, 7, 0, 40)], axis=1),  # skewed histogram
    ]
    for a in images:
        want = np.asarray(_pil_op(Image.fromarray(a), {"op": op}))
        np.testing.assert_array_equal(_ours(a, {"op": op}), want)


@pytest.mark.parametrize("op", ["Brightness", "Sharpness"])
@pytest.mark.parametrize("factor", [0.1, 0.55, 1.0, 1.45, 1.9, 0.0, 3.0])
def test_enhance_ops_are_pils(op, factor) -> None:
    for a in (_image(20, 33, 8), _smooth_image(41, 17, 9), _image(2, 5, 10)):
        want = np.asarray(_pil_op(Image.fromarray(a), {"op": op, "factor": factor}))
        np.testing.assert_array_equal(_ours(a, {"op": op, "factor": factor}), want, err_msg=f"{op} {factor}")


GEOMETRY = [
    {"op": "ShearX", "factor": 0.15},
    {"op": "ShearX", "factor": -0.15},
    {"op": "ShearY", "factor": 0.15},
    {"op": "ShearY", "factor": -0.27},
    {"op": "TranslateX", "offset": 5.0},
    {"op": "TranslateX", "offset": -5.0},
    {"op": "TranslateY", "offset": 2.5},
    {"op": "TranslateY", "offset": -5.0},
    {"op": "Rotate", "degrees": 15.0},
    {"op": "Rotate", "degrees": -15.0},
    {"op": "Rotate", "degrees": 93.0},
]


@pytest.mark.parametrize("op", GEOMETRY, ids=lambda o: f"{o['op']}{list(o.values())[1]}")
def test_geometric_ops_are_pils_bilinear_transform_of_lavis_matrices(op) -> None:
    """LAVIS's cv2 matrices (converted to PIL's half-pixel convention in this test) resampled as PIL's
    Image.transform(AFFINE, BILINEAR, fillcolor=128): bit-equal."""
    for a in (_smooth_image(48, 64, 11), _image(31, 23, 12)):
        want = np.asarray(_pil_op(Image.fromarray(a), op))
        np.testing.assert_array_equal(_ours(a, op), want)


def test_geometry_checked_against_pils_own_rotate_and_exact_shifts() -> None:
    """Independent of the matrices above: LAVIS's rotation about (W/2, H/2) in OpenCV's integer-centre
    convention is PIL's rotate about (W/2 + 0.5, H/2 + 0.5) (PIL rounds its matrix to 15 digits, so a few
    values may differ by one level); an integer translation is an exact shift with grey fill."""
    a = _smooth_image(48, 64, 13)
    for deg in (15.0, -15.0):
        want = np.asarray(
            Image.fromarray(a).rotate(deg, Image.BILINEAR, center=(64 / 2 + 0.5, 48 / 2 + 0.5), fillcolor=FILL)
        ).astype(int)
        diff = np.abs(_ours(a, {"op": "Rotate", "degrees": deg}).astype(int) - want)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    got = _ours(a, {"op": "TranslateX", "offset": 5.0})
    np.testing.assert_array_equal(got[:, :-5], a[:, 5:])
    assert (got[:, -5:] == 128).all()
    got = _ours(a, {"op": "TranslateY", "offset": -5.0})
    np.testing.assert_array_equal(got[5:], a[:-5])
    assert (got[:5] == 128).all()


def test_ops_refuse_bad_parameters() -> None:
    a = _image(10, 10, 14)
    with pytest.raises(ValueError, match="outside the 10x10 image"):
        _ours(
            a,
            {
                "op": "ResizedCrop",
                "top": 5,
                "left": 0,
                "height": 6,
                "width": 4,
                "out_height": 4,
                "out_width": 4,
                "resample": 3,
            },
        )
    with pytest.raises(ValueError, match="ops\\[0\\]"):
        _ours(a, {"op": "Solarize"})
    with pytest.raises(ValueError, match="finite"):
        _ours(a, {"op": "Rotate", "degrees": float("inf")})


RECIPE_PLAN_ARGS = dict(width=200, height=150, out_height=96, out_width=96)


def test_the_recipe_plans_lavis_parameters() -> None:
    """Over many draws: crops cover 0.5-1.0 of the area within the ratios, flips about half, RandAugment picks
    its 2 operations from the 10 with replacement, each applied half the time, at magnitude 5's values."""
    flips, applied, names = 0, 0, set()
    n = 600
    for i in range(n):
        ops = _blip_peft.augment_plan({}, **RECIPE_PLAN_ARGS, seed=0, epoch=0, index=i)
        crop = ops[0]
        assert crop["op"] == "ResizedCrop" and (crop["out_height"], crop["out_width"], crop["resample"]) == (96, 96, 3)
        area = crop["height"] * crop["width"] / (200 * 150)
        assert 0.49 <= area <= 1.0 and 0.74 <= crop["width"] / crop["height"] <= 1.35
        flips += any(o["op"] == "Flip" for o in ops)
        rand = [o for o in ops[1:] if o["op"] != "Flip"]
        applied += len(rand)
        for o in rand:
            names.add(o["op"])
            value = {k: v for k, v in o.items() if k != "op"}
            assert value in (
                {},
                {"factor": 1.0},  # Brightness, Sharpness at magnitude 5
                {"factor": 0.15},
                {"factor": -0.15},  # shears
                {"offset": 5.0},
                {"offset": -5.0},  # translations
                {"degrees": 15.0},
                {"degrees": -15.0},  # rotations
            ), o
    assert 0.42 < flips / n < 0.58
    assert 0.9 < applied / n < 1.1  # 2 operations x probability 0.5
    assert names == {
        "Identity",
        "AutoContrast",
        "Brightness",
        "Sharpness",
        "Equalize",
        "ShearX",
        "ShearY",
        "TranslateX",
        "TranslateY",
        "Rotate",
    }
    none = _blip_peft.augment_plan(
        {"randaugment_ops": 0, "flip_probability": 0.0, "random_resized_crop": False},
        **RECIPE_PLAN_ARGS,
        seed=0,
        epoch=0,
        index=0,
    )
    assert none == [
        dict(op="ResizedCrop", top=0, left=0, height=150, width=200, out_height=96, out_width=96, resample=3)
    ]


def test_plans_are_keyed_by_seed_epoch_and_index() -> None:
    def plan(seed, epoch, index):
        return _blip_peft.augment_plan({}, **RECIPE_PLAN_ARGS, seed=seed, epoch=epoch, index=index)

    assert plan(3, 1, 7) == plan(3, 1, 7)
    assert len({str(plan(*k)) for k in [(3, 1, 7), (4, 1, 7), (3, 2, 7), (3, 1, 8)]}) == 4


# The pipeline: `_ImageCaptionData` as `train` builds it, its batches as training draws them.


@pytest.fixture(scope="module")
def processor():
    return bp.BlipProcessor.from_pretrained(bp.bundled_model_path())


def _data(processor, images, texts, augment, num_workers=None):
    captions = [list(ids) for ids in processor.tokenizer(texts)["input_ids"]]
    return _blip_peft._ImageCaptionData(
        processor.image_processor._native,
        list(images),
        captions,
        30522,
        0,
        None,
        False,
        num_workers,
        0,
        augment,
        texts,
    )


def _normalise(processor, a: np.ndarray) -> torch.Tensor:
    """Pixels as the processor rescales and normalises them (no resize: `a` is at the output size)."""
    return processor.image_processor(Image.fromarray(a), return_tensors="pt", do_resize=False)["pixel_values"][0]


def test_recipe_batches_are_the_pil_reconstruction_of_their_plans(processor) -> None:
    size = processor.image_processor.size
    out = (size["height"], size["width"])
    images = [_smooth_image(120 + 7 * i, 90 + 11 * i, 20 + i) for i in range(6)]
    texts = ["a red circle", "two squares", "a blue square to the left of a circle", "a star", "dots", "lines"]
    data = _data(processor, images, texts, {})
    batch = data.batch(list(range(6)), epoch=2, seed=5)["pixel_values"]
    for i, a in enumerate(images):
        ops = _blip_peft.augment_plan({}, a.shape[1], a.shape[0], *out, seed=5, epoch=2, index=i, flip_allowed=i != 2)
        im = Image.fromarray(a)
        for op in ops:
            im = _pil_op(im, op)
        torch.testing.assert_close(batch[i], _normalise(processor, np.asarray(im)), rtol=0, atol=0)


def test_augmentation_off_is_the_plain_pipeline_and_flips_skip_captions_naming_a_side(processor) -> None:
    images = [_smooth_image(70, 50 + i, 30 + i) for i in range(4)]
    texts = ["a red circle", "a square on the Left", "a right-angled triangle", "two stars"]
    plain = processor(images=[Image.fromarray(a) for a in images], return_tensors="pt")["pixel_values"]
    off = {"random_resized_crop": False, "flip_probability": 0.0, "randaugment_ops": 0}
    got = _data(processor, images, texts, off).batch([0, 1, 2, 3], epoch=0)["pixel_values"]
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    flip = dict(off, flip_probability=1.0)
    got = _data(processor, images, texts, flip).batch([0, 1, 2, 3], epoch=0)["pixel_values"]
    for i in range(4):
        want = plain[i] if i in (1, 2) else plain[i].flip(-1)  # captions naming a side are never flipped
        torch.testing.assert_close(got[i], want, rtol=0, atol=0)
    # Evaluation batches (no epoch) are never augmented.
    torch.testing.assert_close(_data(processor, images, texts, flip).batch([0, 1])["pixel_values"], plain[:2])


def test_batches_depend_only_on_seed_epoch_and_index(processor) -> None:
    images = [_smooth_image(80, 60 + 3 * i, 40 + i) for i in range(6)]
    texts = [f"item {i}" for i in range(6)]
    one = _data(processor, images, texts, {}, num_workers=1)
    three = _data(processor, images, texts, {}, num_workers=3)
    a = one.batch([0, 1, 2, 3, 4, 5], epoch=1, seed=9)["pixel_values"]
    torch.testing.assert_close(three.batch([0, 1, 2, 3, 4, 5], epoch=1, seed=9)["pixel_values"], a, rtol=0, atol=0)
    # An example's pixels do not depend on the batch it is in or its position.
    torch.testing.assert_close(three.batch([4, 2], epoch=1, seed=9)["pixel_values"], a[[4, 2]], rtol=0, atol=0)
    assert not torch.equal(one.batch([0, 1, 2, 3, 4, 5], epoch=2, seed=9)["pixel_values"], a)
    assert not torch.equal(one.batch([0, 1, 2, 3, 4, 5], epoch=1, seed=10)["pixel_values"], a)


# train(augment=...)


@pytest.fixture(scope="module")
def setup(processor):
    size = processor.image_processor.size["height"]
    items = world.make_dataset(12, seed=21, domain="target", size=size)
    return bp.bundled_model_path(), [{"image": d["image"], "text": d["text"]} for d in items]


def _model(path: str) -> bp.PeftModel:
    base = bp.BlipForConditionalGeneration.from_pretrained(path, dtype="float32")
    return bp.get_peft_model(base, bp.LoraConfig(r=4, target_modules=["self.query", "self_attn.qkv"]))


KW = dict(max_steps=4, batch_size=4, learning_rate=1e-3, logging_steps=1, progress=False, seed=3, mixed_precision="no")


def test_train_with_the_recipe_resumes_and_ignores_num_workers(tmp_path, setup, processor) -> None:
    path, items = setup
    torch.manual_seed(0)
    full = bp.train(_model(path), processor, items, augment="blip", num_workers=1, **KW)
    assert full.global_step == 4 and all(math.isfinite(x) and x > 0 for x in full.losses)
    torch.manual_seed(0)
    plain = bp.train(_model(path), processor, items, **KW)
    assert plain.losses[0] != full.losses[0]  # the images changed
    torch.manual_seed(0)
    workers = bp.train(_model(path), processor, items, augment="blip", num_workers=3, **KW)
    assert workers.losses == full.losses
    torch.manual_seed(0)
    part = bp.train(
        _model(path),
        processor,
        items,
        augment="blip",
        output_dir=tmp_path,
        callback=lambda log: log["step"] == 2,
        **KW,
    )
    assert part.interrupted and part.global_step == 2
    torch.manual_seed(1)
    rest = bp.train(
        _model(path), processor, items, augment="blip", output_dir=tmp_path, resume_from_checkpoint=True, **KW
    )
    assert rest.losses[:2] == part.losses == full.losses[:2]
    for got, want in zip(rest.losses[2:], full.losses[2:], strict=True):
        assert abs(got - want) <= 1e-5 * abs(want)


def test_train_augment_argument_errors(setup, processor) -> None:
    path, items = setup
    model = _model(path)
    with pytest.raises(ValueError, match="augment must be None, 'blip' or a dict"):
        bp.train(model, processor, items, augment="lavis", progress=False)
    with pytest.raises(TypeError, match="augment must be None, 'blip' or a dict"):
        bp.train(model, processor, items, augment=5, progress=False)
    with pytest.raises(TypeError, match='augment got an unsupported keyword argument "flip"'):
        bp.train(model, processor, items, augment={"flip": 0.5}, progress=False)
    with pytest.raises(ValueError, match="augment argument scale"):
        bp.train(model, processor, items, augment={"scale": [0.0, 1.0]}, progress=False)
    with pytest.raises(ValueError, match='augment argument randaugment_operations: unknown operation "Solarize"'):
        bp.train(model, processor, items, augment={"randaugment_operations": ["Solarize"]}, progress=False)
    encoded = processor(
        images=[d["image"] for d in items[:4]], text=[d["text"] for d in items[:4]], return_tensors="pt", padding=True
    )
    with pytest.raises(ValueError, match="augment= needs a train_dataset of images and captions"):
        bp.train(model, None, dict(encoded), augment="blip", progress=False)
