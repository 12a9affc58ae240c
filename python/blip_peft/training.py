"""`blip_peft.train`: a complete fine-tuning loop run by the Rust core, and its `TrainResult`."""

from __future__ import annotations

import contextlib
import json
import logging
import numbers
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from blip_peft import _blip_peft, distributed
from blip_peft._convert import fspath
from blip_peft.data import as_items
from blip_peft.evaluation import METRIC_NAMES, RECIPE_DECODING, group_references, score_images
from blip_peft.modeling import BlipPreTrainedModel
from blip_peft.peft_model import PeftModel
from blip_peft.processing import BlipImageProcessor, _native_image

logger = logging.getLogger("blip_peft")


@dataclass
class TrainResult:
    """What `train` returns: per-step history, evaluation losses and metrics, the best step, and where the
    result was saved.

    `metric_history` maps each evaluation step to its metrics: ``eval_loss``, and with caption evaluation
    (`predict_with_generate`) `evaluate`'s ``Bleu_1``..``Bleu_4``, ``ROUGE_L``, ``CIDEr``. `best_metric`,
    `best_global_step` and `best_model_checkpoint` are transformers' `TrainerState` fields for
    `metric_for_best_model` (None without one).

    `feature_cache` says what the frozen vision tower's feature cache did: ``enabled``, ``reason`` (why it was
    not used), ``hits`` / ``misses`` (image rows served from the cache / computed by the vision tower),
    ``cached_examples``, ``cached_bytes``, ``budget_bytes`` and ``cross_projections`` (whether the decoder's
    cross-attention key/value projections of the images were kept with them)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    metric_history: dict[int, dict[str, float]] = field(default_factory=dict)
    best_metric: float | None = None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    global_step: int = 0
    total_steps: int = 0
    interrupted: bool = False
    last_checkpoint: str | None = None
    adapter_path: str | None = None
    skipped_samples: list[int] = field(default_factory=list)
    feature_cache: dict[str, Any] = field(default_factory=dict)
    #: The retrieval head's learned contrastive temperature at the end (None for the other heads).
    temp: float | None = None

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]

    def plot(self, path: str | os.PathLike[str] | None = None) -> Any:
        """Draws the training (and evaluation) loss curves with matplotlib, and beside them the caption metrics
        of each evaluation when there are any (the best step marked); saves a PNG when `path` is given."""
        try:
            import matplotlib

            if path is not None:
                matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("TrainResult.plot needs matplotlib: pip install matplotlib") from None
        steps = sorted(self.metric_history)
        names = [n for n in (steps and self.metric_history[steps[-1]]) or {} if n != "eval_loss"]
        fig, axes = plt.subplots(1, 2 if names else 1, figsize=(11 if names else 6, 4), squeeze=False)
        ax = axes[0][0]
        ax.plot([h["step"] for h in self.history], self.losses, label="train loss")
        if self.eval_history:
            ax.plot([s for s, _ in self.eval_history], [v for _, v in self.eval_history], "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        if names:
            scores = axes[0][1]
            for name in names:
                at = [s for s in steps if name in self.metric_history[s]]
                scores.plot(at, [self.metric_history[s][name] for s in at], "o-", label=name)
            if self.best_global_step is not None:
                scores.axvline(self.best_global_step, color="grey", linestyle=":", label="best step")
            scores.set_xlabel("step")
            scores.set_ylabel("score (eval set)")
            scores.legend(fontsize="small")
        fig.tight_layout()
        if path is not None:
            fig.savefig(fspath(path, "path"), dpi=100)
            plt.close(fig)
        return fig


@contextlib.contextmanager
def _ctrl_c_noted() -> Iterator[threading.Event | None]:
    """Ctrl-C stops training after the step even when its KeyboardInterrupt is lost. Python runs the SIGINT
    handler in whatever Python code the main thread runs next, and an exception raised there inside a finalizer
    (`__del__`, a weakref or gc callback) is printed as "Exception ignored" and dropped, as it is by code that
    catches BaseException. While training runs, the handler also sets the event the trainer checks after every
    step. A handler the user installed is left as it is, as is a training run off the main thread (Python
    delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield None
        return
    noted = threading.Event()

    def on_ctrl_c(signum: int, frame: Any) -> None:
        noted.set()
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield noted
    finally:
        if signal.getsignal(signal.SIGINT) is on_ctrl_c:
            signal.signal(signal.SIGINT, signal.default_int_handler)


class _Progress:
    """tqdm when installed (terminals and notebooks), a plain line log otherwise."""

    def __init__(self, enabled: bool, user_callback: Callable[[dict[str, Any]], Any] | None) -> None:
        self.enabled = enabled
        self.user_callback = user_callback
        self.bar: Any = None

    def __call__(self, event: str, payload: dict[str, Any]) -> bool:
        stop = False
        if event == "log":
            for log in payload["logs"]:
                if self.user_callback is not None and self.user_callback(dict(log)) is True:
                    stop = True
            if self.enabled:
                self._show(payload["logs"][-1], payload["total_steps"])
        elif event == "eval":
            if self.user_callback is not None and self.user_callback(dict(payload)) is True:
                stop = True
            if self.enabled:
                extra = "".join(f", {k} {payload[k]:.4f}" for k in ("CIDEr", "Bleu_4") if k in payload)
                self._write(f"step {payload['step']}: eval loss {payload['eval_loss']:.4f}{extra}")
        return stop

    def _show(self, log: dict[str, Any], total: int) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        text = f"loss={log['loss']:.4f} lr={log['learning_rate']:.2e} {log['samples_per_second']:.1f} samples/s"
        if tqdm is None:
            print(f"step {log['step']}/{total} {text}", file=sys.stderr, flush=True)
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc="training", leave=True)
        self.bar.n = log["step"]
        self.bar.set_postfix_str(text)
        self.bar.refresh()

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _encode(
    dataset: Any,
    processor: Any,
    image_column: str,
    text_column: str,
    max_length: int | None,
    bos: int,
    pad: int,
    on_bad_sample: str,
    what: str,
    num_workers: int | None = None,
    prompt: str | None = None,
    augment: dict[str, Any] | None = None,
    several_captions: bool = False,
) -> tuple[Any, list[int]]:
    """A dataset as the core trains on it (with the training collation: BOS first, pads -100, a prompt's
    tokens -100): a streaming image-caption source for our processor, tensors otherwise; and the indices
    skipped up front. With `several_captions` (the evaluation set) a row's caption may be a list of
    references, as `evaluate` takes them: one (image, caption) pair each."""
    if isinstance(dataset, Mapping):
        if augment is not None:
            raise ValueError(
                f"augment= needs a {what} of images and captions; a mapping of tensors holds pixel_values already "
                "preprocessed, which cannot be augmented (pass the images, or augment=None)"
            )
        if prompt:
            raise ValueError(
                f"prompt= needs a {what} of images and captions; a mapping of tensors is used as given (put the "
                "prompt in its input_ids and -100 in its labels yourself)"
            )
        if "pixel_values" not in dataset or "input_ids" not in dataset:
            raise ValueError(f"{what} as a mapping of tensors needs 'pixel_values' and 'input_ids'")
        # The core applies the training collation (BOS first, labels with pads -100 where none are given).
        keys = ("pixel_values", "input_ids", "attention_mask", "labels")
        return {k: dataset.get(k) for k in keys}, []
    if processor is None:
        raise TypeError(f"{what} holds images and captions: pass the processor (e.g. BlipProcessor.from_pretrained)")
    pairs = as_items(dataset, image_column, text_column)
    if len(pairs) == 0:
        raise ValueError(f"the {what} is empty")
    images: list[Any] = []
    texts: list[str] = []
    for i in range(len(pairs)):
        image, text = pairs[i]
        several = several_captions and isinstance(text, (list, tuple)) and len(text) > 0
        for caption in text if several else [text]:
            if not isinstance(caption, str):
                kind = "a string or a list of strings" if several_captions else "a string"
                raise TypeError(f"{what} item {i}: the caption must be {kind}, got {type(caption).__name__}")
            images.append(image)
            texts.append(prompt + caption if prompt else caption)
    prompt_tokens = len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else 0
    image_processor = getattr(processor, "image_processor", None)
    if isinstance(image_processor, BlipImageProcessor):
        # Our processor: images are decoded and preprocessed batch by batch on Rust threads, ahead of the
        # model; files stay on disk until their batch is built.
        convert = image_processor.do_convert_rgb
        native_images = []
        for i, image in enumerate(images):
            try:
                native_images.append(_native_image(image, i, convert))
            except (TypeError, ValueError) as e:
                raise type(e)(f"{what} item {i}: {e}") from None
        captions = [list(ids) for ids in processor.tokenizer(texts)["input_ids"]]
        data = _blip_peft._ImageCaptionData(
            image_processor._native,
            native_images,
            captions,
            bos,
            pad,
            max_length,
            on_bad_sample == "skip",
            num_workers,
            prompt_tokens,
            augment,
            texts if augment is not None else None,
        )
        return data, []
    if augment is not None:
        raise ValueError(
            "augment= needs blip_peft's processor (its images are augmented on the core's batch threads); "
            f"{type(processor).__name__} preprocesses up front: use blip_peft.BlipProcessor, or augment=None"
        )
    # Another processor (e.g. transformers'): preprocess everything up front.
    pixels: list[torch.Tensor] = []
    token_lists: list[list[int]] = []
    skipped: list[int] = []
    for i, (image, text) in enumerate(zip(images, texts, strict=True)):
        try:
            pv = processor(images=image, return_tensors="pt")["pixel_values"]
        except Exception as e:  # noqa: BLE001  (reported with the item's index, or skipped on request)
            if on_bad_sample == "skip":
                skipped.append(i)
                continue
            raise ValueError(f"{what} item {i}: cannot read the image ({e})") from e
        pixels.append(pv[0])
        token_lists.append(list(processor.tokenizer(text)["input_ids"]))
    if not pixels:
        raise ValueError(f"every item of the {what} was skipped as unreadable")
    ids, mask, labels = _blip_peft.collate_captions(token_lists, bos, pad, max_length, prompt_tokens)
    return {"pixel_values": torch.stack(pixels), "input_ids": ids, "attention_mask": mask, "labels": labels}, skipped


#: What each head's training rows hold, by the head's class name (the task is chosen by the model's class).
TASK_FIELDS = {
    "BlipForConditionalGeneration": ("image", "text"),
    "BlipForQuestionAnswering": ("image", "question", "answer"),
    "BlipForImageTextRetrieval": ("image", "text"),
}


def _head_rows(dataset: Any, head: str, what: str) -> list[dict[str, Any]]:
    """The rows of a VQA (`{"image", "question", "answer"}`) or retrieval (`{"image", "text"}`, optional
    `"image_id"`) dataset: a sequence of dicts, a `datasets.Dataset` with those columns, or an
    `ImageCaptionDataset` read with those fields (folder / JSONL / CSV). A missing field is a ValueError naming
    it and the head."""
    fields = TASK_FIELDS[head]
    if dataset is None:
        raise TypeError(f"{what} is required")
    if isinstance(dataset, Mapping):
        raise ValueError(
            f"{head} trains on rows of {fields} (a list of dicts, a datasets.Dataset, or a folder / JSONL / CSV "
            f"read with ImageCaptionDataset); a mapping of tensors is for BlipForConditionalGeneration only"
        )
    column_names = getattr(dataset, "column_names", None)
    if column_names is not None:  # a datasets.Dataset
        missing = [f for f in fields if f not in column_names]
        if missing:
            raise ValueError(
                f"the {what} has no {missing[0]!r} column, which {head} training needs (its rows: {fields}; "
                f"columns: {column_names})"
            )
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"{what} must be a sequence of {fields} rows, got {type(dataset).__name__}")
    rows = []
    for i in range(len(dataset)):
        row = dataset[i]
        if not isinstance(row, Mapping):
            raise TypeError(f"{what} item {i} must be a dict with {fields}, got {type(row).__name__}")
        for f in fields:
            if f not in row:
                raise ValueError(
                    f"{what} item {i} has no {f!r} field, which {head} training needs (its rows: {fields}; "
                    f"fields: {sorted(row)})"
                )
        for f in fields[1:]:
            if not isinstance(row[f], str):
                raise TypeError(f"{what} item {i}: {f!r} must be a string, got {type(row[f]).__name__}")
        rows.append(dict(row))
    if not rows:
        raise ValueError(f"the {what} is empty")
    return rows


def _encode_head(
    dataset: Any,
    processor: Any,
    head: str,
    max_length: int | None,
    bos: int,
    pad: int,
    on_bad_sample: str,
    what: str,
    num_workers: int | None = None,
    augment: dict[str, Any] | None = None,
) -> Any:
    """A VQA or retrieval dataset as the core's batch source: images decoded batch by batch on Rust threads;
    VQA answers collated as captions (BOS first, pads -100 in the labels) with their questions as the
    tokenizer writes them; retrieval texts as the tokenizer writes them, with each pair's image id (the row's
    "image_id", else one id per distinct text, as `train_retrieval` did)."""
    rows = _head_rows(dataset, head, what)
    if processor is None:
        raise TypeError(f"{what} holds images and texts: pass the processor (e.g. BlipProcessor.from_pretrained)")
    image_processor = getattr(processor, "image_processor", None)
    if not isinstance(image_processor, BlipImageProcessor):
        raise TypeError(
            f"training {head} needs blip_peft's processor (its images are decoded on the core's batch threads); "
            f"got {type(processor).__name__}: use blip_peft.BlipProcessor"
        )
    convert = image_processor.do_convert_rgb
    native_images = []
    for i, row in enumerate(rows):
        try:
            native_images.append(_native_image(row["image"], i, convert))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{what} item {i}: {e}") from None
    tokenize = processor.tokenizer
    questions = image_ids = None
    if head == "BlipForQuestionAnswering":
        texts = [row["answer"] for row in rows]
        questions = [list(ids) for ids in tokenize([row["question"] for row in rows])["input_ids"]]
        side_texts = [row["question"] + " " + row["answer"] for row in rows]
    else:
        texts = [row["text"] for row in rows]
        ids_of_text: dict[str, int] = {}
        image_ids = []
        for i, row in enumerate(rows):
            if "image_id" in row and row["image_id"] is not None:
                value = row["image_id"]
                if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                    value = int(value)  # a CSV file's column
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise TypeError(f"{what} item {i}: 'image_id' must be an int, got {type(value).__name__}")
                image_ids.append(int(value))
            else:
                image_ids.append(ids_of_text.setdefault(row["text"], -1 - len(ids_of_text)))
        side_texts = texts
    captions = [list(ids) for ids in tokenize(texts)["input_ids"]]
    return _blip_peft._ImageCaptionData(
        image_processor._native,
        native_images,
        captions,
        bos,
        pad,
        max_length,
        on_bad_sample == "skip",
        num_workers,
        0,
        augment,
        side_texts if augment is not None else None,
        questions,
        image_ids,
    )


def _temperature(temp: Any, learn_temp: Any, head: str, device: Any) -> torch.Tensor | None:
    """The retrieval head's contrastive temperature for the run (BLIP's 0.07 unless given), trained unless
    `learn_temp=False`; None for the other heads, which refuse the settings."""
    if head != "BlipForImageTextRetrieval":
        if temp is not None or learn_temp is not True:
            raise TypeError(f"temp and learn_temp are the retrieval head's settings; {head} has no temperature")
        return None
    from blip_peft.modeling_retrieval import TEMP_INIT, new_temperature  # noqa: PLC0415

    if not isinstance(learn_temp, bool):
        raise TypeError(f"learn_temp must be True or False, got {learn_temp!r}")
    if isinstance(temp, torch.Tensor):
        if temp.dim() != 0 or temp.dtype != torch.float32:
            raise ValueError(f"temp must be a 0-dim float32 tensor, got {temp.dtype} of shape {list(temp.shape)}")
        if temp.device != torch.device(device):
            raise ValueError(f"temp must be on the model's device ({device}), got {temp.device}")
        temperature = temp
    else:
        temperature = new_temperature(TEMP_INIT if temp is None else temp, device=device)
    with torch.no_grad():
        temperature.requires_grad_(learn_temp)
    return temperature


def _augment_settings(augment: Any) -> dict[str, Any] | None:
    """`train(augment=...)` as the settings dict the core reads (it checks names and ranges): "blip" is the
    core's defaults (LAVIS's recipe), a mapping overrides some of them."""
    if augment is None:
        return None
    if isinstance(augment, str):
        if augment != "blip":
            raise ValueError(f"augment must be None, 'blip' or a dict of augmentation settings, got {augment!r}")
        return {}
    if isinstance(augment, Mapping):
        return dict(augment)
    raise TypeError(f"augment must be None, 'blip' or a dict of augmentation settings, got {type(augment).__name__}")


def _caption_scoring(
    eval_dataset: Any,
    metric_for_best_model: Any,
    greater_is_better: Any,
    load_best_model_at_end: Any,
    predict_with_generate: Any,
    eval_generate_kwargs: Any,
) -> dict[str, Any] | None:
    """The evaluation settings checked up front: the `evaluate` options for caption scoring (None: the eval
    loss alone)."""
    for name, value in (("load_best_model_at_end", load_best_model_at_end), ("greater_is_better", greater_is_better),
                        ("predict_with_generate", predict_with_generate)):  # fmt: skip
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if metric_for_best_model is not None and not isinstance(metric_for_best_model, str):
        raise TypeError(f"metric_for_best_model must be a metric's name (e.g. 'CIDEr'), got {metric_for_best_model!r}")
    key = None
    if metric_for_best_model is not None:
        key = "eval_loss" if metric_for_best_model in ("loss", "eval_loss") else metric_for_best_model
        key = key.removeprefix("eval_") if key != "eval_loss" else key
        if key != "eval_loss" and key not in METRIC_NAMES:
            known = ", ".join(repr(n) for n in ("eval_loss", *METRIC_NAMES))
            raise ValueError(f"metric_for_best_model={metric_for_best_model!r} is not a metric train reports: {known}")
    if eval_dataset is None:
        for name, asked in (("load_best_model_at_end=True", load_best_model_at_end),
                            ("metric_for_best_model", metric_for_best_model is not None),
                            ("predict_with_generate=True", bool(predict_with_generate))):  # fmt: skip
            if asked:
                raise ValueError(
                    f"{name} evaluates during training, but no eval_dataset was given; pass eval_dataset "
                    "(images with their reference captions) or leave it unset"
                )
    caption_metric = key is not None and key != "eval_loss"
    if predict_with_generate is False and caption_metric:
        raise ValueError(
            f"metric_for_best_model={metric_for_best_model!r} is a caption metric, which needs captions generated "
            "for eval_dataset: leave predict_with_generate at its default (or True), or pick 'eval_loss'"
        )
    generating = predict_with_generate if predict_with_generate is not None else caption_metric
    if eval_generate_kwargs is not None and not isinstance(eval_generate_kwargs, Mapping):
        raise TypeError(
            f"eval_generate_kwargs must be a dict of evaluate options, got {type(eval_generate_kwargs).__name__}"
        )
    if not generating:
        if eval_generate_kwargs:
            raise ValueError("eval_generate_kwargs is for caption evaluation: set predict_with_generate=True too")
        return None
    if isinstance(eval_dataset, Mapping):
        raise ValueError(
            "caption evaluation (predict_with_generate, or a caption metric_for_best_model) needs an eval_dataset of "
            "images and reference captions, not a mapping of tensors"
        )
    options: dict[str, Any] = dict(RECIPE_DECODING)
    for name, value in (eval_generate_kwargs or {}).items():
        if name in ("prompt", "return_captions", "image_column", "text_column"):
            raise ValueError(f"eval_generate_kwargs cannot set {name!r}: train's own {name} argument is used")
        options[name] = value
    return options


class _CaptionScorer:
    """`evaluate` for the trainer: the evaluation set's images grouped with their references once, captioned
    and scored at each evaluation step on the model being trained (the core lends it for the call)."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        dataset: Any,
        image_column: str,
        text_column: str,
        prompt: str | None,
        options: dict[str, Any],
    ) -> None:
        self.images, self.references = group_references(dataset, image_column, text_column)
        self.model, self.processor, self.prompt, self.options = model, processor, prompt, options

    def __call__(self, step: int) -> dict[str, float]:
        scores = score_images(
            self.model, self.processor, self.images, self.references, prompt=self.prompt, **self.options
        )
        return {name: float(value) for name, value in scores.items()}


def _feature_cache(value: Any) -> Any:
    """`train(feature_cache=...)` for the core (which checks the budget's range): True, False or MiB."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"feature_cache must be True, False or a budget in MiB, got {type(value).__name__}")


def _real(value: Any, name: str) -> Any:
    """A real number as a float for the core (which checks its range and finiteness), or a TypeError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _betas(value: Any) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"adam_betas must be a pair of numbers (beta1, beta2), got {value!r}")
    return [_real(value[0], "adam_betas[0]"), _real(value[1], "adam_betas[1]")]


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Treats denormal floats (below ~1.2e-38) as zero on the CPU while the block runs, on this thread and on
    libtorch's worker threads (`torch.set_flush_denormal` only changes the calling thread).

    x86 cores are many times slower on denormal numbers, which tiny gradients deep in a network produce;
    `blip_peft.train` does this itself. Use it around a hand-written torch training loop:

        with bp.flush_denormals():
            for batch in loader:
                ...
    """
    was_on = _blip_peft.set_flush_denormals(True)
    try:
        yield
    finally:
        if not was_on:
            _blip_peft.set_flush_denormals(False)


def train(
    model: BlipPreTrainedModel | PeftModel,
    processor: Any,
    train_dataset: Any,
    *,
    eval_dataset: Any = None,
    epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int = 8,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.0,
    adam_betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    lr_scheduler: str = "linear",
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float = 1.0,
    label_smoothing: float | None = None,
    prompt: str | None = None,
    mixed_precision: str = "auto",
    gradient_checkpointing: bool | None = None,
    max_length: int | None = 64,
    shuffle: bool = True,
    drop_last: bool = False,
    seed: int = 0,
    output_dir: str | os.PathLike[str] | None = None,
    save_steps: int | None = None,
    save_total_limit: int | None = None,
    resume_from_checkpoint: str | os.PathLike[str] | bool | None = None,
    eval_steps: int | None = None,
    metric_for_best_model: str | None = None,
    greater_is_better: bool | None = None,
    load_best_model_at_end: bool = False,
    predict_with_generate: bool | None = None,
    eval_generate_kwargs: Mapping[str, Any] | None = None,
    logging_steps: int = 10,
    progress: bool = True,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    image_column: str = "image",
    text_column: str = "text",
    on_bad_sample: str = "raise",
    num_workers: int | None = None,
    augment: str | Mapping[str, Any] | None = None,
    feature_cache: bool | float = True,
    temp: float | torch.Tensor | None = None,
    learn_temp: bool = True,
) -> TrainResult:
    """Fine-tunes `model` (a `PeftModel`: only its adapters train; a plain model: every parameter trains).

    Every BLIP head trains with this one loop, the task chosen by the model's class: captioning
    (`BlipForConditionalGeneration`: rows ``{"image", "text"}``, or encoded tensors), visual question answering
    (`BlipForQuestionAnswering`: rows ``{"image", "question", "answer"}``; transformers' loss on the answer, which
    is collated as a caption: BOS first, pads -100) and image-text retrieval (`BlipForImageTextRetrieval`: rows
    ``{"image", "text"}`` with an optional ``"image_id"``, pairs of one image being positives; BLIP's ITC + ITM on
    hard negatives drawn from the contrastive similarities under each micro-batch's seed, with the temperature
    `temp` (BLIP's 0.07) learned unless ``learn_temp=False``, returned as `TrainResult.temp` and saved as
    ``retrieval_config.json`` in each checkpoint and beside the adapter; `batch_size` at least 2). Rows are a list
    of dicts, a `datasets.Dataset` with those columns, or `ImageCaptionDataset.from_folder/from_jsonl/from_csv`
    (``fields=("question", "answer")`` for VQA files); a row without a field its head needs is a ValueError
    naming the field and the head. The VQA and retrieval heads need blip_peft's processor, are evaluated by
    their loss (``eval_loss``; no `prompt` / `predict_with_generate`), and with `gradient_checkpointing`
    recompute their vision tower's layers (their text towers keep their activations).

    The loop runs in Rust with the GIL released: batching, forward, backward, AdamW (torch's numerics,
    decoupled weight decay), the learning-rate schedule, gradient accumulation and clipping, and fp16 loss
    scaling. Captions start with the BOS token generation uses and padding is excluded from the loss.

    `mixed_precision` ("auto": bf16 on CUDA, float32 on CPU) lowers the frozen weights for the run and
    restores them after; trained weights (adapters, `modules_to_save`, biases, or everything in full
    fine-tuning) stay float32. `gradient_checkpointing=True` keeps only each transformer layer's input and
    recomputes the layers during the backward (same results, about a third of the activation memory); None (the
    default) follows the model (`model.gradient_checkpointing_enable()`).

    Under `torchrun` (or with a `torch.distributed` process group initialised) training is data-parallel:
    each process takes a disjoint shard of every epoch (`batch_size` is per process), gradients are averaged
    once per optimizer step as one flat bucket, and only rank 0 logs and writes checkpoints.

    Images are decoded and preprocessed batch by batch on Rust threads ahead of the model (`num_workers`
    threads, all cores by default) when `processor` is blip_peft's; other processors preprocess up front.

    `label_smoothing` (e.g. 0.1, the BLIP authors' setting) smooths the caption loss as torch's
    ``cross_entropy(label_smoothing=...)`` does (evaluation losses too); None uses the checkpoint's
    ``text_config.label_smoothing`` (transformers' default 0.0), which is what the model's own loss reads.

    `prompt` (e.g. ``"a picture of "``, LAVIS's) is put before every caption and its tokens are left out of
    the loss (labels -100), as the BLIP authors train; only the caption after it is learned. The prompt is
    remembered as the model's `caption_prompt` (saved with a `PeftModel`'s adapter in
    ``caption_config.json``), so `blip_peft.generate` and `blip_peft.evaluate` start captions with it by
    default.

    `augment` augments the training images (never the evaluation set's) on the batch threads: ``"blip"`` is
    the BLIP authors' recipe (LAVIS: RandomResizedCrop to the processor's size, scale 0.5-1.0, ratio 3/4-4/3,
    with the processor's resampling (BLIP's: bicubic); a horizontal flip with probability 0.5; RandAugment,
    2 operations of magnitude 5, each applied with probability 0.5, drawn from Identity, AutoContrast,
    Brightness, Sharpness, Equalize, ShearX/Y, TranslateX/Y, Rotate); a dict changes any of those settings
    (``random_resized_crop``, ``scale``, ``ratio``, ``flip_probability``, ``randaugment_ops``,
    ``randaugment_magnitude``, ``randaugment_probability``, ``randaugment_operations``) and keeps the rest;
    None (the default) trains on the images as the processor prepares them. Each image's draws depend only on
    (`seed`, epoch, its index), so a run, a resumed run and any `num_workers` see the same images. Images
    whose caption names a side (a word starting with "left" or "right", or containing "clockwise") are never
    flipped: the words are not swapped, as "left" and "right" have other meanings ("he left", "all right").
    Needs images and captions with blip_peft's processor (not pre-encoded ``pixel_values``).

    `feature_cache` (on by default) computes each training image's embeddings once and reuses them in later
    epochs when nothing in the vision tower trains or draws random numbers: LoRA only on the decoder (its
    self- or cross-attention, MLP), no ``vision_config.attention_dropout``, no `augment`, and
    ``on_bad_sample="raise"``. The losses are those of the uncached run, bit for bit: the embeddings kept are
    the ones the step computes, in the precision it computes them (float32, or bf16/fp16 under
    `mixed_precision`), and cached images are not decoded again. They are held in host memory within a budget:
    True is 2048 MiB (about 1,200 images at blip-image-captioning-base's 384 px in float32), a number is the
    budget in MiB, False turns the cache off; past the budget the remaining images are recomputed every
    epoch. With the captioner it also keeps each image's cross-attention projections (every decoder layer's
    frozen ``crossattention.self.key``/``value`` base output over the image, 25 times the embeddings' bytes at
    base shapes), so later epochs skip the GEMMs that are most of a text-only step (the adapters on those layers
    still add their part): when those base weights are frozen, without `gradient_checkpointing`, and when every
    example fits in the budget with them (about 48 images in 2048 MiB in float32; else only the embeddings are
    kept). When a condition does not hold the run goes on uncached and the reason is logged (logger
    ``"blip_peft"``, INFO) and kept in `TrainResult.feature_cache`, with the cache's hits and misses.

    `eval_dataset` is evaluated every `eval_steps` steps and at the end: its loss (``eval_loss``), and with
    ``predict_with_generate=True`` (transformers' Seq2Seq name; the default when `metric_for_best_model` is a
    caption metric) the caption metrics `blip_peft.evaluate` gives for the model at that step (``Bleu_1``..
    ``Bleu_4``, ``ROUGE_L``, ``CIDEr``): captions generated for its images with the recipe's decoding (beam
    search, 3 beams, 5 to 20 new tokens; `eval_generate_kwargs` overrides these and takes `evaluate`'s other
    options, e.g. ``{"batch_size": 16, "max_new_tokens": 30}``), starting from `prompt` as `evaluate` does, and
    scored against the dataset's captions. Generation never runs dropout. Its rows are those `evaluate` takes:
    a caption or a list of reference captions per row, or several rows with the same image. The metrics of
    every evaluation are in `TrainResult.metric_history` and its plot.

    `metric_for_best_model` (``"CIDEr"``, ``"Bleu_4"``, ..., or ``"eval_loss"``; transformers' ``"eval_"``
    prefix is accepted) picks the best evaluation; `greater_is_better` defaults as transformers does (True
    unless the name ends in "loss"). The best value, its step and its checkpoint are `TrainResult.best_metric`,
    `best_global_step` and `best_model_checkpoint`, also in each checkpoint's ``trainer_state.json`` (so a
    resumed run goes on comparing with them), and `save_total_limit` never deletes the best checkpoint.
    ``load_best_model_at_end=True`` (metric: ``"eval_loss"`` unless given) puts the best evaluation's trained
    weights back into the model when training ends (then saved into `output_dir`); with `output_dir`, every new
    best is also checkpointed, so a resumed run can restore a best from before the interruption.

    `callback(dict)` is called at every logging step with that step's record (and after each evaluation);
    returning True stops training. Ctrl-C stops after the current step, saves a checkpoint when `output_dir`
    is set, and returns the result so far. Checkpoints go to `output_dir/checkpoint-<step>/`; with a
    `PeftModel` the final adapter is saved into `output_dir` itself.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not isinstance(base, BlipPreTrainedModel) or type(base).__name__ not in TASK_FIELDS:
        raise TypeError(
            "model must be a blip_peft BLIP head (BlipForConditionalGeneration, BlipForQuestionAnswering, "
            f"BlipForImageTextRetrieval) or a PeftModel on one, got {type(base).__name__}"
        )
    head = type(base).__name__
    captioning = head == "BlipForConditionalGeneration"
    native = base._native
    adapter: tuple[str, str, str] | None = None
    if isinstance(model, PeftModel):
        config = model.peft_config[model.active_adapter]
        adapter = (model.active_adapter, config.bias, config.to_json())
    if not captioning:
        for name, setting in (("prompt", prompt), ("predict_with_generate", predict_with_generate),
                              ("eval_generate_kwargs", eval_generate_kwargs)):  # fmt: skip
            if setting is not None and setting is not False:
                raise ValueError(
                    f"{name} is for captioning (BlipForConditionalGeneration); {head} is evaluated by its loss"
                )
        if metric_for_best_model not in (None, "loss", "eval_loss"):
            raise ValueError(
                f"metric_for_best_model={metric_for_best_model!r}: {head} is evaluated by its loss, 'eval_loss'"
            )
    temperature = _temperature(temp, learn_temp, head, base.device)
    if head == "BlipForImageTextRetrieval" and (isinstance(batch_size, int) and not isinstance(batch_size, bool)):
        if batch_size < 2:
            raise ValueError("batch_size must be at least 2 for retrieval (the other pairs are the negatives)")
    if on_bad_sample not in ("raise", "skip"):
        raise ValueError(f"on_bad_sample must be 'raise' or 'skip', got {on_bad_sample!r}")
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string (e.g. 'a picture of '), got {type(prompt).__name__}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("logging_steps", logging_steps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    text_config = model.config.text_config
    bos, pad = text_config.bos_token_id, text_config.pad_token_id
    if num_workers is not None and (
        isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1
    ):
        raise ValueError(f"num_workers must be a positive int (threads decoding images), got {num_workers!r}")
    augment_settings = _augment_settings(augment)

    def encode(
        dataset: Any, what: str, workers: int | None = None, augment: dict[str, Any] | None = None
    ) -> tuple[Any, list[int]]:
        return _encode(
            dataset,
            processor,
            image_column,
            text_column,
            max_length,
            bos,
            pad,
            on_bad_sample,
            what,
            workers,
            prompt,
            augment,
        )

    scoring = _caption_scoring(
        eval_dataset, metric_for_best_model, greater_is_better, load_best_model_at_end, predict_with_generate,
        eval_generate_kwargs,
    )  # fmt: skip
    eval_tensors = None
    scorer = None
    if not captioning:
        train_tensors: Any = _encode_head(
            train_dataset, processor, head, max_length, bos, pad, on_bad_sample, "train_dataset", num_workers,
            augment_settings,
        )  # fmt: skip
        skipped: list[int] = []
        if eval_dataset is not None:
            eval_tensors = _encode_head(eval_dataset, processor, head, max_length, bos, pad, on_bad_sample,
                                        "eval_dataset")  # fmt: skip
    else:
        train_tensors, skipped = encode(train_dataset, "train_dataset", num_workers, augment_settings)
    if captioning and eval_dataset is not None:
        eval_tensors, _ = _encode(
            eval_dataset, processor, image_column, text_column, max_length, bos, pad, on_bad_sample,
            "eval_dataset", None, prompt, several_captions=True,
        )  # fmt: skip
        if scoring is not None:
            scorer = _CaptionScorer(model, processor, eval_dataset, image_column, text_column, prompt, scoring)
    out = fspath(output_dir, "output_dir") if output_dir is not None else None
    # True: the core resumes from the newest complete checkpoint in output_dir.
    resume = resume_from_checkpoint
    if resume_from_checkpoint not in (None, False, True):
        resume = fspath(resume_from_checkpoint, "resume_from_checkpoint")
    args = {
        "epochs": epochs,
        "max_steps": max_steps,
        "batch_size": batch_size,
        "learning_rate": _real(learning_rate, "learning_rate"),
        "weight_decay": _real(weight_decay, "weight_decay"),
        "adam_betas": _betas(adam_betas),
        "adam_eps": _real(adam_eps, "adam_eps"),
        "lr_scheduler": lr_scheduler,
        "warmup_steps": warmup_steps,
        "warmup_ratio": _real(warmup_ratio, "warmup_ratio"),
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "max_grad_norm": _real(max_grad_norm, "max_grad_norm"),
        "label_smoothing": label_smoothing,
        "mixed_precision": mixed_precision,
        # None: as the model says (`model.gradient_checkpointing_enable()`), as transformers' Trainer reads it.
        "gradient_checkpointing": bool(
            getattr(model, "is_gradient_checkpointing", False)
            if gradient_checkpointing is None
            else gradient_checkpointing
        ),
        "shuffle": shuffle,
        "drop_last": drop_last,
        "seed": seed,
        "logging_steps": logging_steps,
        "output_dir": out,
        "save_steps": save_steps,
        "save_total_limit": save_total_limit,
        "eval_steps": eval_steps,
        "metric_for_best_model": metric_for_best_model,
        "greater_is_better": greater_is_better,
        "load_best_model_at_end": load_best_model_at_end,
        "max_length": max_length,
        "resume_from_checkpoint": resume,
        "feature_cache": _feature_cache(feature_cache),
    }
    group = distributed.collective()
    main_process = group is None or group.rank == 0
    reporter = _Progress(progress and main_process, callback)
    try:
        with _ctrl_c_noted() as ctrl_c:
            result = _blip_peft.train_native(
                native, train_tensors, eval_tensors, args, adapter, reporter, group, scorer, temperature, ctrl_c
            )
    finally:
        reporter.close()
    train_result = TrainResult(
        history=result["history"],
        eval_history=[tuple(e) for e in result["eval_history"]],  # type: ignore[misc]
        metric_history={step: metrics for step, metrics in result["metric_history"]},
        best_metric=result["best_metric"],
        best_global_step=result["best_global_step"],
        best_model_checkpoint=result["best_model_checkpoint"],
        global_step=result["global_step"],
        total_steps=result["total_steps"],
        interrupted=result["interrupted"],
        last_checkpoint=result["last_checkpoint"],
        skipped_samples=sorted(
            set(skipped) | set(train_tensors.skipped() if hasattr(train_tensors, "skipped") else [])
        ),
        feature_cache=dict(result["feature_cache"]),
        temp=None if temperature is None else float(temperature.detach().clamp(0.001, 0.5)),
    )
    cache = train_result.feature_cache
    if cache["enabled"]:
        logger.info(
            "feature cache: %d image rows from the cache, %d computed; %d examples held%s (%.1f MiB of %.0f MiB)",
            cache["hits"], cache["misses"], cache["cached_examples"],
            " with their cross-attention projections" if cache["cross_projections"] else "",
            cache["cached_bytes"] / 2**20, cache["budget_bytes"] / 2**20,
        )  # fmt: skip
    else:
        logger.info("feature cache not used: %s", cache["reason"])
    if prompt is not None:
        model.caption_prompt = prompt or None
    if train_result.skipped_samples and progress and main_process:
        n = len(train_result.skipped_samples)
        print(f"skipped {n} unreadable sample(s): {train_result.skipped_samples[:10]}", file=sys.stderr)
    if out is not None and isinstance(model, PeftModel):
        if main_process:
            model.save_pretrained(out)
        train_result.adapter_path = out
    if out is not None and temperature is not None and main_process:
        # The learned temperature beside the adapter (or the full model's checkpoints), as BLIP keeps it.
        from blip_peft.retrieval import RETRIEVAL_CONFIG_NAME  # noqa: PLC0415

        os.makedirs(out, exist_ok=True)
        text = json.dumps({"temp": train_result.temp}, indent=2) + "\n"
        _blip_peft.write_text_atomic(os.path.join(out, RETRIEVAL_CONFIG_NAME), text)
    return train_result
