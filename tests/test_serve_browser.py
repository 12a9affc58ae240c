"""The web page of `blip-peft serve` in a real headless browser: Chromium and chromedriver from the system packages
(Debian's `chromium`, `chromium-driver`; `make install` installs them), driven by selenium.

A real server process on the loopback interface serves a tiny transformers-built model with two peft-made adapters.
The browser opens /, chooses an image file, picks both adapters (not the base model), submits, and waits until both
captions are shown side by side with their timings; each shown caption must equal what `model.generate` gives the
same image with that adapter alone (and what transformers + peft give it).

Nothing is downloaded: selenium is pointed at /usr/bin/chromium and /usr/bin/chromedriver, so Selenium Manager never
runs. Without them (or selenium) the test is skipped, unless BLIP_PEFT_REQUIRE_BROWSER=1 (set by `make test`, so CI
runs it), where a missing piece is a failure that says how to install it.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import peft
import pytest
import torch
from conftest import make_hf_model
from PIL import Image
from transformers import BlipConfig
from transformers import BlipForConditionalGeneration as HFBlip

import blip_peft as bp
from blip_peft.presets import TINY_TEXT, TINY_VISION

ADAPTERS = ["birds", "cars"]
TOKENS = 30  # the page's default max new tokens
TARGETS = ["query", "value", "self_attn.qkv"]
REQUIRED = os.environ.get("BLIP_PEFT_REQUIRE_BROWSER") == "1"


def _need(what: str, found: object) -> None:
    if found:
        return
    message = (
        f"the browser test needs {what}: `make install` installs chromium and chromium-driver (Debian packages) "
        "and selenium (requirements-dev.txt)"
    )
    if REQUIRED:
        pytest.fail(message)
    pytest.skip(message)


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    _need("Chromium (the `chromium` package)", chromium)
    _need("chromedriver (the `chromium-driver` package)", driver)
    return str(chromium), str(driver)


@pytest.fixture(scope="module")
def webdriver():
    try:
        from selenium import webdriver as wd
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _need("selenium (pip)", False)
    chromium, driver = _browser_paths()
    options = wd.ChromeOptions()
    options.binary_location = chromium
    flags = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900")
    for arg in flags:
        options.add_argument(arg)
    browser = wd.Chrome(service=Service(driver), options=options)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """A tiny BLIP made by transformers (vocabulary and ids of the bundled model's tokenizer, 32-pixel images),
    its processor files, and two LoRA adapters made by peft with random A and B."""
    root = tmp_path_factory.mktemp("browser_blip")
    tokenizer = bp.BlipProcessor.from_pretrained(bp.bundled_model_path()).tokenizer
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        TINY_TEXT,
        vocab_size=len(tokenizer),
        bos_token_id=ids("[DEC]"),
        eos_token_id=ids("[SEP]"),
        sep_token_id=ids("[SEP]"),
        pad_token_id=ids("[PAD]"),
    )
    config = BlipConfig(text_config=text, vision_config=dict(TINY_VISION))
    model_dir = root / "model"
    make_hf_model(config).save_pretrained(model_dir)
    size = TINY_VISION["image_size"]
    image_processor = bp.BlipImageProcessor(size={"height": size, "width": size})
    bp.BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(model_dir)
    adapters = {}
    for i, name in enumerate(ADAPTERS):
        hf = peft.get_peft_model(HFBlip.from_pretrained(model_dir), peft.LoraConfig(r=4, target_modules=TARGETS))
        g = torch.Generator().manual_seed(1 + i)
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        adapters[name] = str(root / name)
        hf.save_pretrained(adapters[name])
    return str(model_dir), adapters


@pytest.fixture(scope="module")
def server(checkpoint):
    model_dir, adapters = checkpoint
    cmd = [sys.executable, "-m", "blip_peft", "serve", "--model", model_dir, "--host", "127.0.0.1", "--port", "0"]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    cmd += ["--max-wait-ms", "300"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("serving on "):
            proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _alone(checkpoint, image_path: str) -> dict[str, str]:
    """Each adapter's caption of the image, computed alone in this process: ours, and transformers + peft's."""
    model_dir, adapters = checkpoint
    processor = bp.BlipProcessor.from_pretrained(model_dir)
    pixel_values = processor(images=[Image.open(image_path)], return_tensors="pt")["pixel_values"]
    ours = bp.PeftModel.from_pretrained(
        bp.BlipForConditionalGeneration.from_pretrained(model_dir), adapters[ADAPTERS[0]], ADAPTERS[0]
    )
    theirs = peft.PeftModel.from_pretrained(HFBlip.from_pretrained(model_dir), adapters[ADAPTERS[0]], ADAPTERS[0])
    for name in ADAPTERS[1:]:
        ours.load_adapter(adapters[name], name)
        theirs.load_adapter(adapters[name], name)
    ours.eval()
    theirs.eval()
    captions = {}
    for name in ["", *ADAPTERS]:  # "": the base model, as the page names it
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if name:
                ours.set_adapter(name)
                theirs.set_adapter(name)
            else:
                stack.enter_context(ours.disable_adapter())
                stack.enter_context(theirs.disable_adapter())
            ids = ours.generate(pixel_values=pixel_values, max_new_tokens=TOKENS)
            hf_ids = theirs.generate(pixel_values=pixel_values, max_new_tokens=TOKENS)
        assert ids.tolist() == hf_ids.tolist(), name
        captions[name] = processor.batch_decode(ids, skip_special_tokens=True)[0]
    return captions


def _photo(tmp_path) -> str:
    image_path = str(tmp_path / "photo.png")
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 255, (60, 72, 3), dtype=np.uint8)).save(image_path)
    return image_path


def test_the_page_shows_each_adapters_caption_side_by_side(webdriver, server, checkpoint, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image_path = _photo(tmp_path)
    expected = _alone(checkpoint, image_path)
    assert expected[ADAPTERS[0]] != expected[ADAPTERS[1]] and all(expected.values()), expected

    webdriver.get(server + "/")
    assert webdriver.title == "blip-peft captions"
    # Choosing the file captions it at once with what is ticked (everything, at first) ...
    webdriver.find_element(By.ID, "file").send_keys(image_path)
    # ... then the user picks both adapters without the base model and submits: that run replaces the first.
    base = webdriver.find_element(By.ID, "adapter-base")
    if base.is_selected():
        base.click()
    for name in ADAPTERS:
        box = webdriver.find_element(By.ID, f"adapter-{name}")
        if not box.is_selected():
            box.click()
    webdriver.find_element(By.ID, "go").click()

    results = webdriver.find_element(By.ID, "results")
    WebDriverWait(webdriver, 120, poll_frequency=0.2).until(
        lambda d: results.get_attribute("data-state") == "done" and results.get_attribute("data-run") == "2"
    )
    cards = results.find_elements(By.CSS_SELECTOR, ".card")
    assert [c.get_attribute("data-adapter") for c in cards] == ADAPTERS
    assert [c.get_attribute("data-state") for c in cards] == ["done", "done"], [c.text for c in cards]
    for card, name in zip(cards, ADAPTERS, strict=True):
        assert card.find_element(By.TAG_NAME, "h3").text == name
        assert card.find_element(By.CSS_SELECTOR, ".c").text == expected[name], name
        timing = card.find_element(By.CSS_SELECTOR, ".t").text
        assert " ms (generate " in timing and "batch of" in timing, timing
    # Side by side: one row, left to right.
    first, second = (c.rect for c in cards)
    assert abs(first["y"] - second["y"]) < 1 and first["x"] + first["width"] <= second["x"], (first, second)
    assert webdriver.find_element(By.ID, "preview").is_displayed()


def test_an_image_dropped_on_the_page_is_captioned_by_every_ticked_adapter(
    webdriver, server, checkpoint, tmp_path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image_path = _photo(tmp_path)
    expected = _alone(checkpoint, image_path)
    webdriver.get(server + "/")
    with open(image_path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    # A file dropped on the drop zone, as a user's drag from the desktop delivers it.
    webdriver.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        const zone = document.getElementById("drop");
        zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: dt, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        """,
        data,
    )
    results = webdriver.find_element(By.ID, "results")
    WebDriverWait(webdriver, 120, poll_frequency=0.2).until(lambda d: results.get_attribute("data-state") == "done")
    cards = results.find_elements(By.CSS_SELECTOR, ".card")
    assert [c.get_attribute("data-adapter") for c in cards] == ["", *ADAPTERS]
    shown = {c.get_attribute("data-adapter"): c.find_element(By.CSS_SELECTOR, ".c").text for c in cards}
    assert shown == expected
    assert "over" not in webdriver.find_element(By.ID, "drop").get_attribute("class")
    # Three requests sent together: the server answered them from shared mixed-adapter batches.
    timings = [c.find_element(By.CSS_SELECTOR, ".t").text for c in cards]
    assert any("batch of 1 images" not in t for t in timings), timings


def test_the_page_shows_a_refused_image_as_an_error(webdriver, server, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"these bytes are not a PNG")
    webdriver.get(server + "/")
    webdriver.find_element(By.ID, "file").send_keys(str(bad))
    results = webdriver.find_element(By.ID, "results")
    WebDriverWait(webdriver, 60, poll_frequency=0.2).until(lambda d: results.get_attribute("data-state") == "done")
    cards = results.find_elements(By.CSS_SELECTOR, ".card")
    assert len(cards) == 1 + len(ADAPTERS)
    for card in cards:
        assert card.get_attribute("data-state") == "error"
        assert "bad image" in card.find_element(By.CSS_SELECTOR, ".c").text
    # The server keeps serving.
    started = time.monotonic()
    with urllib.request.urlopen(server + "/health", timeout=30) as r:
        assert r.status == 200 and time.monotonic() - started < 30
