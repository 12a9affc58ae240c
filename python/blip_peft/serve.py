"""`blip-peft serve`: captions over HTTP from one base model and several LoRA adapters, with dynamic batching.

Built on aiohttp (PyPI `aiohttp`): one well-kept asyncio library that brings the HTTP server, routing, multipart
parsing, a request-body size limit and the client the tests drive it with, and nothing else to configure. The
model's work runs on one worker thread (the core releases the GIL while it decodes) while the event loop keeps
accepting requests.

Dynamic batching: requests wait in a queue; the batcher takes the oldest and gathers every other queued request
with the same decoding settings (`max_new_tokens`, `num_beams`, `prompt`), whatever its adapter, until
`max_batch` images or `max_wait_ms` have passed, and runs them as one mixed-adapter batch
(`generate(adapter_names=...)`); each request gets its own captions back.

Routes: `GET /` (a small page: choose or drop an image, pick adapters, captions side by side), `GET /health`,
`POST /caption` (JSON `{"images": [<base64>...], "adapter": NAME|null, "max_new_tokens", "num_beams",
"prompt"}`, or a multipart form with `image` files and the same fields). Bad requests get a 4xx JSON answer
`{"error": ...}` and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

BASE = "__base__"
MAX_NEW_TOKENS = 256
MAX_BEAMS = 16


class BadRequest(Exception):
    """A request the server refuses with `status` and a message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Job:
    pixel_values: torch.Tensor
    adapter: str
    settings: tuple[int, int, str | None]
    future: asyncio.Future[Any]
    queued: float = field(default_factory=time.perf_counter)


class CaptionServer:
    """The model, its processor and the batching queue behind the HTTP routes."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        adapters: list[str],
        *,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        max_image_pixels: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model = model
        self.processor = processor
        self.adapters = list(adapters)
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_image_pixels = max_image_pixels
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.pending: list[_Job] = []
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blip-peft-generate")
        self.batches = 0

    # ------------------------------------------------------------------------------------------- requests
    def parse_settings(self, fields: dict[str, Any]) -> tuple[str, tuple[int, int, str | None]]:
        adapter = fields.get("adapter")
        if adapter in (None, "", BASE):
            adapter = BASE
        elif not isinstance(adapter, str):
            raise BadRequest(f"adapter must be an adapter name or null, got {type(adapter).__name__}")
        elif adapter not in self.adapters:
            raise BadRequest(f"unknown adapter {adapter!r}; this server has {self.adapters} (or null for the base)")
        tokens = _int_field(fields, "max_new_tokens", 30, 1, MAX_NEW_TOKENS)
        beams = _int_field(fields, "num_beams", 1, 1, MAX_BEAMS)
        prompt = fields.get("prompt")
        if prompt == "":
            prompt = None
        if prompt is not None and not isinstance(prompt, str):
            raise BadRequest(f"prompt must be a string or null, got {type(prompt).__name__}")
        return adapter, (tokens, beams, prompt)

    def preprocess(self, images: list[bytes]) -> torch.Tensor:
        if not images:
            raise BadRequest("no images: send at least one (JSON 'images' as base64, or form files named 'image')")
        kwargs = {} if self.max_image_pixels is None else {"max_image_pixels": self.max_image_pixels}
        try:
            return self.processor(images=images, return_tensors="pt", **kwargs)["pixel_values"]
        except (ValueError, TypeError) as e:
            status = 413 if "exceeds the limit" in str(e) else 400
            raise BadRequest(f"bad image: {e}", status) from e

    async def caption(self, images: list[bytes], fields: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        adapter, settings = self.parse_settings(fields)
        loop = asyncio.get_running_loop()
        pixel_values = await loop.run_in_executor(None, self.preprocess, images)
        prepared = time.perf_counter()
        future: asyncio.Future[Any] = loop.create_future()
        await self.queue.put(_Job(pixel_values, adapter, settings, future))
        captions, timings = await future
        done = time.perf_counter()
        return {
            "captions": captions,
            "adapter": None if adapter == BASE else adapter,
            "timings": {
                "preprocess_ms": round(1000 * (prepared - start), 3),
                **timings,
                "total_ms": round(1000 * (done - start), 3),
            },
        }

    # -------------------------------------------------------------------------------------------- batching
    async def batcher(self) -> None:
        """Forever: gather queued jobs with the same settings (any adapters) into one mixed batch, run it."""
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                self.pending.append(await self.queue.get())
            first = self.pending[0]
            deadline = first.queued + self.max_wait
            while True:
                while not self.queue.empty():
                    self.pending.append(self.queue.get_nowait())
                batch = self._take(first.settings, dry_run=True)
                if sum(len(j.pixel_values) for j in batch) >= self.max_batch:
                    break
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    self.pending.append(await asyncio.wait_for(self.queue.get(), left))
            batch = self._take(first.settings)
            await self._run(loop, batch)

    def _take(self, settings: tuple[int, int, str | None], dry_run: bool = False) -> list[_Job]:
        """The oldest pending jobs with `settings`, up to max_batch images (at least one job)."""
        batch: list[_Job] = []
        images = 0
        for job in self.pending:
            if job.settings != settings:
                continue
            if batch and images + len(job.pixel_values) > self.max_batch:
                break
            batch.append(job)
            images += len(job.pixel_values)
        if not dry_run:
            self.pending = [j for j in self.pending if all(j is not b for b in batch)]
        return batch

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        started = time.perf_counter()
        try:
            texts = await loop.run_in_executor(self.worker, self._generate, batch)
        except Exception as e:  # noqa: BLE001 - every waiting request gets the error, the server goes on
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        finished = time.perf_counter()
        self.batches += 1
        at = 0
        for job in batch:
            n = len(job.pixel_values)
            timings = {
                "queue_ms": round(1000 * (started - job.queued), 3),
                "generate_ms": round(1000 * (finished - started), 3),
                "batch_images": sum(len(j.pixel_values) for j in batch),
                "batch_requests": len(batch),
                "batch_adapters": len({j.adapter for j in batch}),
            }
            if not job.future.done():
                job.future.set_result((texts[at : at + n], timings))
            at += n

    def _generate(self, batch: list[_Job]) -> list[str]:
        tokens, beams, prompt = batch[0].settings
        pixel_values = torch.cat([j.pixel_values for j in batch])
        names = [j.adapter for j in batch for _ in range(len(j.pixel_values))]
        kwargs: dict[str, Any] = {"max_new_tokens": tokens, "num_beams": beams}
        if prompt is not None:
            text = self.processor(text=[prompt] * len(names), return_tensors="pt")
            kwargs.update(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        ids = self.model.generate(pixel_values=pixel_values, adapter_names=names, **kwargs)
        return self.processor.batch_decode(ids, skip_special_tokens=True)


def _int_field(fields: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = fields.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise BadRequest(f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def build_app(server: CaptionServer, *, max_body_bytes: int = 16 * 2**20) -> Any:
    """The aiohttp application serving `server`; requests over `max_body_bytes` get 413."""
    import aiohttp
    from aiohttp import web

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=_PAGE.replace("__ADAPTERS__", json.dumps(server.adapters)), content_type="text/html")

    async def health(request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "adapters": server.adapters, "queued": server.queue.qsize(), "batches": server.batches}
        )

    async def caption(request: web.Request) -> web.Response:
        try:
            if request.content_type == "application/json":
                try:
                    body = await request.json()
                except json.JSONDecodeError as e:
                    raise BadRequest(f"the body is not valid JSON: {e}") from None
                if not isinstance(body, dict):
                    raise BadRequest("the JSON body must be an object with 'images'")
                raw = body.get("images")
                if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
                    raise BadRequest("'images' must be a list of base64-encoded image files")
                try:
                    images = [base64.b64decode(x, validate=True) for x in raw]
                except (binascii.Error, ValueError):
                    raise BadRequest("'images' holds text that is not base64") from None
                fields = body
            elif request.content_type == "multipart/form-data":
                images, fields = [], {}
                reader = await request.multipart()
                async for part in reader:
                    if not isinstance(part, aiohttp.BodyPartReader):
                        continue
                    if part.name == "image":
                        images.append(bytes(await part.read()))
                    elif part.name in ("adapter", "max_new_tokens", "num_beams", "prompt"):
                        fields[part.name] = await part.text()
            else:
                raise BadRequest(
                    f"send JSON (application/json) or a form (multipart/form-data), not {request.content_type!r}",
                    415,
                )
            return web.json_response(await server.caption(images, fields))
        except BadRequest as e:
            return web.json_response({"error": str(e)}, status=e.status)
        except web.HTTPRequestEntityTooLarge as e:
            return web.json_response({"error": f"request body too large: {e.text}"}, status=413)
        except (ValueError, TypeError) as e:
            return web.json_response({"error": str(e)}, status=400)
        except Exception as e:  # noqa: BLE001 - answered and logged; the server keeps serving
            traceback.print_exc()
            return web.json_response({"error": f"internal error: {type(e).__name__}: {e}"}, status=500)

    async def start_batcher(app: web.Application) -> Any:
        task = asyncio.create_task(server.batcher())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.worker.shutdown(wait=True)

    app = web.Application(client_max_size=max_body_bytes)
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    app.router.add_post("/caption", caption)
    app.cleanup_ctx.append(start_batcher)
    return app


def load(model_path: str, adapters: dict[str, str], device: str = "cpu") -> tuple[Any, Any]:
    """The base model with every adapter (`NAME -> folder`) loaded onto it, in evaluation mode, and its
    processor."""
    import blip_peft as bp

    processor = bp.AutoProcessor.from_pretrained(model_path)
    model: Any = bp.BlipForConditionalGeneration.from_pretrained(model_path, device=device)
    if adapters:
        items = list(adapters.items())
        model = bp.PeftModel.from_pretrained(model, items[0][1], items[0][0])
        for name, path in items[1:]:
            model.load_adapter(path, name)
    return model.eval(), processor


def run(
    model_path: str,
    adapters: dict[str, str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    max_batch: int = 8,
    max_wait_ms: float = 10.0,
    max_body_bytes: int = 16 * 2**20,
    max_image_pixels: int | None = None,
) -> None:
    """Loads the model and adapters and serves until interrupted; prints `serving on http://HOST:PORT` once
    listening (with `port=0`, the port the system chose)."""
    from aiohttp import web

    model, processor = load(model_path, adapters, device)
    server = CaptionServer(
        model,
        processor,
        list(adapters),
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_image_pixels=max_image_pixels,
    )
    app = build_app(server, max_body_bytes=max_body_bytes)

    async def main() -> None:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        bound = sockets[0].getsockname()[1] if sockets else port
        print(f"serving on http://{host}:{bound}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>blip-peft captions</title>
<style>
body{font-family:system-ui,sans-serif;margin:2rem;max-width:60rem}
#drop{border:2px dashed #888;padding:2rem;text-align:center;border-radius:.5rem}
#drop.over{background:#eef}
#preview{max-height:12rem;margin:1rem 0;display:none}
#results{display:flex;gap:1rem;flex-wrap:wrap}
.card{border:1px solid #ccc;border-radius:.5rem;padding:.75rem;min-width:14rem;flex:1}
.card h3{margin:.1rem 0 .5rem 0;font-size:1rem}.t{color:#666;font-size:.8rem}.err{color:#b00}
</style></head><body>
<h1>Captions, one base model, many adapters</h1>
<div id="drop">Drop an image here, or <input type="file" id="file" accept="image/*"></div>
<img id="preview" alt="">
<fieldset id="adapters"><legend>Adapters</legend></fieldset>
<p><label>max new tokens <input id="tokens" type="number" value="30" min="1" max="256"></label>
<label>beams <input id="beams" type="number" value="1" min="1" max="16"></label>
<label>prompt <input id="prompt" type="text" placeholder="optional"></label>
<button id="go" disabled>Caption</button></p>
<div id="results" data-state="idle"></div>
<script>
// The page's state for scripts and tests: #results carries data-state (idle, running, done) and data-run (a count
// of runs); each card (.card, data-adapter: the name, "" for the base model) carries data-state (pending, done,
// error), its caption in .c and its timings in .t.
const ADAPTERS = __ADAPTERS__;
const box = document.getElementById("adapters");
for (const name of [null, ...ADAPTERS]) {
  const label = document.createElement("label");
  const cb = document.createElement("input");
  cb.type = "checkbox"; cb.name = "adapter"; cb.value = name === null ? "" : name; cb.checked = true;
  cb.id = name === null ? "adapter-base" : "adapter-" + name;
  label.append(cb, " " + (name === null ? "base model" : name) + " ");
  box.append(label);
}
let file = null;
let run = 0;
function choose(f) {
  if (!f) return;
  file = f; document.getElementById("go").disabled = false;
  const img = document.getElementById("preview");
  img.src = URL.createObjectURL(f); img.style.display = "block";
  caption();
}
document.getElementById("file").addEventListener("change", e => choose(e.target.files[0]));
const drop = document.getElementById("drop");
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {
  e.preventDefault(); drop.classList.remove("over"); choose(e.dataTransfer.files[0]);
});
document.getElementById("go").addEventListener("click", caption);
async function captionOne(name, card, mine) {
  const c = card.querySelector(".c");
  const fail = text => { c.textContent = text; c.className = "c err"; card.dataset.state = "error"; };
  const form = new FormData();
  form.append("image", file); form.append("adapter", name);
  form.append("max_new_tokens", document.getElementById("tokens").value);
  form.append("num_beams", document.getElementById("beams").value);
  form.append("prompt", document.getElementById("prompt").value);
  let answer;
  try {
    const response = await fetch("/caption", {method: "POST", body: form});
    const text = await response.text();
    try { answer = JSON.parse(text); }
    catch (e) { answer = {error: `HTTP ${response.status}: ${text.slice(0, 200)}`}; }
    if (!response.ok && !answer.error) answer = {error: `HTTP ${response.status}`};
  } catch (e) {
    answer = {error: `the server did not answer: ${e}`};
  }
  if (mine !== run) return;  // a newer run replaced this card
  if (answer.error) { fail(answer.error); return; }
  c.textContent = answer.captions[0];
  const t = answer.timings;
  card.querySelector(".t").textContent =
    `${t.total_ms.toFixed(0)} ms (generate ${t.generate_ms.toFixed(0)} ms, batch of ${t.batch_images} images, ` +
    `${t.batch_adapters} adapters)`;
  card.dataset.state = "done";
}
async function caption() {
  if (!file) return;
  const mine = ++run;
  const results = document.getElementById("results"); results.innerHTML = "";
  results.dataset.state = "running"; results.dataset.run = String(mine);
  const picked = [...box.querySelectorAll("input:checked")].map(c => c.value);
  if (!picked.length) {
    results.textContent = "pick at least one adapter (or the base model)"; results.dataset.state = "done"; return;
  }
  // One request per adapter, sent together: the server batches them into one mixed-adapter batch.
  await Promise.all(picked.map(name => {
    const card = document.createElement("div"); card.className = "card";
    card.innerHTML = "<h3></h3><div class='c'>...</div><div class='t'></div>";
    card.querySelector("h3").textContent = name || "base model";
    card.dataset.adapter = name; card.dataset.state = "pending"; results.append(card);
    return captionOne(name, card, mine);
  }));
  if (mine === run) results.dataset.state = "done";
}
</script></body></html>
"""
