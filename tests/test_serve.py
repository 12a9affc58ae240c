"""`blip-peft serve` as a real server process on the loopback interface: JSON and form uploads, concurrent requests
for different adapters gathered into mixed batches (each answer equal to the image's caption alone with its
adapter), bad requests answered 4xx while the server keeps serving, the page at /."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import blip_peft as bp

pytest.importorskip("aiohttp")

TOKENS = 6
ADAPTERS = ["birds", "cars"]


def _png(seed: int, size: tuple[int, int] = (96, 80)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("serve_adapters")
    folders = {}
    for i, name in enumerate(ADAPTERS):
        model = bp.get_peft_model(
            bp.BlipForConditionalGeneration.from_pretrained(bp.bundled_model_path()),
            bp.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "self_attn.qkv"]),
        )
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        folders[name] = str(root / name)
        model.save_pretrained(folders[name])
    return folders


@pytest.fixture(scope="module")
def server(adapters):
    cmd = [sys.executable, "-m", "blip_peft", "serve", "--model", bp.bundled_model_path(), "--port", "0"]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    cmd += ["--max-wait-ms", "400", "--max-batch", "8", "--max-body-mb", "1", "--max-image-pixels", "200000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("serving on "):
            proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def reference(adapters):
    """Captions computed in this process, each image alone with its adapter."""
    processor = bp.AutoProcessor.from_pretrained(bp.bundled_model_path())
    model = bp.PeftModel.from_pretrained(
        bp.BlipForConditionalGeneration.from_pretrained(bp.bundled_model_path()), adapters[ADAPTERS[0]], ADAPTERS[0]
    )
    model.load_adapter(adapters[ADAPTERS[1]], ADAPTERS[1])
    model.eval()

    def caption(image: bytes, adapter: str | None, **kwargs) -> str:
        if adapter is None:
            with model.disable_adapter():
                return bp.generate(model, processor, [image], max_new_tokens=TOKENS, **kwargs)[0]
        model.set_adapter(adapter)
        return bp.generate(model, processor, [image], max_new_tokens=TOKENS, **kwargs)[0]

    return caption


def _post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/caption", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _json(url: str, **payload) -> tuple[int, dict]:
    return _post(url, json.dumps(payload).encode(), "application/json")


def _caption_json(url: str, images: list[bytes], adapter: str | None, **kw) -> tuple[int, dict]:
    return _json(
        url, images=[base64.b64encode(i).decode() for i in images], adapter=adapter, max_new_tokens=TOKENS, **kw
    )


def _form(url: str, image: bytes, fields: dict[str, str]) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + image
        + b"\r\n"
    ]
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return _post(url, body, f"multipart/form-data; boundary={boundary}")


def test_health_and_page(server) -> None:
    with urllib.request.urlopen(server + "/health", timeout=30) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["adapters"] == ADAPTERS
    with urllib.request.urlopen(server + "/", timeout=30) as r:
        page = r.read().decode()
    assert 'type="file"' in page and "/caption" in page and json.dumps(ADAPTERS) in page


def test_json_and_form_captions_equal_each_image_alone(server, reference) -> None:
    images = [_png(1), _png(2)]
    status, answer = _caption_json(server, images, "birds")
    assert status == 200, answer
    assert answer["adapter"] == "birds"
    assert answer["captions"] == [reference(images[0], "birds"), reference(images[1], "birds")]
    assert {"preprocess_ms", "queue_ms", "generate_ms", "total_ms", "batch_images"} <= set(answer["timings"])
    status, answer = _form(server, images[0], {"adapter": "cars", "max_new_tokens": str(TOKENS), "num_beams": "2"})
    assert status == 200, answer
    assert answer["captions"] == [reference(images[0], "cars", num_beams=2)]
    status, answer = _caption_json(server, images[:1], None, prompt="a picture of")
    assert status == 200 and answer["adapter"] is None
    assert answer["captions"] == [reference(images[0], None, prompt="a picture of")]


def test_concurrent_requests_for_different_adapters_share_batches(server, reference) -> None:
    jobs = [(_png(10 + i), [None, "birds", "cars"][i % 3]) for i in range(6)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(lambda job: _caption_json(server, [job[0]], job[1]), jobs))
    for (image, adapter), (status, answer) in zip(jobs, answers, strict=True):
        assert status == 200, answer
        assert answer["adapter"] == adapter
        assert answer["captions"] == [reference(image, adapter)], adapter
    # Gathered: some batch held several requests for different adapters.
    assert max(a["timings"]["batch_adapters"] for _, a in answers) > 1
    assert max(a["timings"]["batch_requests"] for _, a in answers) > 1
    assert len({a["captions"][0] for _, a in answers}) > 1


@pytest.mark.parametrize(
    "payload, status, message",
    [
        (dict(images=[base64.b64encode(b"not an image").decode()]), 400, "bad image"),
        (dict(images=["***"]), 400, "not base64"),
        (dict(images=[]), 400, "no images"),
        (dict(images="x"), 400, "list of base64"),
        (dict(images=[base64.b64encode(_png(3)).decode()], adapter="nope"), 400, "unknown adapter 'nope'"),
        (dict(images=[base64.b64encode(_png(3)).decode()], num_beams=0), 400, "num_beams must be between"),
        (dict(images=[base64.b64encode(_png(3)).decode()], max_new_tokens="many"), 400, "max_new_tokens must be"),
        (dict(images=[base64.b64encode(_png(3)).decode()], prompt=3), 400, "prompt must be"),
        (dict(images=[base64.b64encode(_png(3, (600, 400))).decode()]), 413, "exceeds the limit"),
    ],
    ids=[
        "not_image",
        "not_base64",
        "no_images",
        "images_not_list",
        "unknown_adapter",
        "beams",
        "tokens",
        "prompt",
        "pixels",
    ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, payload, status, message) -> None:
    got, answer = _json(server, **payload)
    assert got == status and message in answer["error"], answer
    ok, answer = _caption_json(server, [_png(4)], "cars")
    assert ok == 200 and len(answer["captions"]) == 1


def test_oversized_body_and_wrong_content_type(server) -> None:
    got, answer = _post(server, b"{" + b" " * (2 * 2**20) + b"}", "application/json")
    assert got == 413, answer
    got, answer = _post(server, b"hello", "text/plain")
    assert got == 415 and "multipart/form-data" in answer["error"]
    got, answer = _post(server, b"{not json", "application/json")
    assert got == 400 and "not valid JSON" in answer["error"]
    ok, _ = _caption_json(server, [_png(5)], None)
    assert ok == 200
