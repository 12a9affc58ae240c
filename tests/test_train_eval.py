"""Caption metrics during training (#20): `eval_dataset` scored as `bp.evaluate` scores it at every
`eval_steps`, `metric_for_best_model` / `greater_is_better` / `load_best_model_at_end` with transformers'
semantics, the best step in trainer_state.json (kept by save_total_limit, carried over a resume), and clear
errors for settings that cannot work."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from test_train import LORA, _data

import blip_peft as bp
from blip_peft import world
from blip_peft.evaluation import METRIC_NAMES

pytestmark = pytest.mark.cpu_isa

PROMPT = "a picture of "
DECODING = {"max_new_tokens": 12}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """The bundled model saved with dropout in both towers (so an evaluation that ran it would differ from the
    reloaded checkpoint's), its processor, and target-domain rows: training rows, and evaluation rows with two
    references per image (a list of captions)."""
    folder = tmp_path_factory.mktemp("dropout_model")
    for name in os.listdir(bp.bundled_model_path()):
        shutil.copy(os.path.join(bp.bundled_model_path(), name), folder / name)
    with open(folder / "config.json") as f:
        config = json.load(f)
    config["text_config"].update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    config["vision_config"].update(attention_dropout=0.1)
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    processor = bp.BlipProcessor.from_pretrained(str(folder))
    size = processor.image_processor.size["height"]
    images = tmp_path_factory.mktemp("rows")
    items = world.make_dataset(22, seed=11, domain="target", size=size)
    rows = []
    for i, item in enumerate(items):
        file = os.path.join(images, f"{i}.png")
        item["image"].save(file)
        rows.append({"image": file, "text": item["text"].removeprefix("a picture of ")})
    train_rows = rows[:16]
    # two references per image: its own caption and the next image's
    eval_rows = [
        {"image": r["image"], "text": [r["text"], rows[16 + (i + 1) % 6]["text"]]} for i, r in enumerate(rows[16:])
    ]
    return str(folder), processor, train_rows, eval_rows


def _model(path: str, seed: int = 0) -> bp.PeftModel:
    torch.manual_seed(seed)
    base = bp.BlipForConditionalGeneration.from_pretrained(path, dtype="float32")
    return bp.get_peft_model(
        base, bp.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])
    )


def _reload(path: str, adapter: str | os.PathLike[str]) -> bp.PeftModel:
    return bp.PeftModel.from_pretrained(
        bp.BlipForConditionalGeneration.from_pretrained(path, dtype="float32"), adapter
    )


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


SETTINGS = dict(max_steps=6, batch_size=4, learning_rate=3e-3, eval_steps=2, save_steps=2, logging_steps=2,
                prompt=PROMPT, mixed_precision="no", seed=1, progress=False,
                eval_generate_kwargs=DECODING)  # fmt: skip


@pytest.fixture(scope="module")
def best_run(setup, tmp_path_factory: pytest.TempPathFactory):
    path, processor, train_rows, eval_rows = setup
    out = tmp_path_factory.mktemp("best_run")
    model = _model(path)
    model.train()  # dropout on in the model's own mode too: the evaluation must not use it
    events: list[dict] = []
    result = bp.train(
        model, processor, train_rows, eval_dataset=eval_rows, output_dir=out, metric_for_best_model="CIDEr",
        load_best_model_at_end=True, callback=events.append, **SETTINGS,
    )  # fmt: skip
    return model, result, out, events


def test_metrics_at_each_eval_step_equal_evaluate_on_that_step_s_checkpoint(setup, best_run) -> None:
    path, processor, _, eval_rows = setup
    _, result, out, events = best_run
    assert sorted(result.metric_history) == [2, 4, 6]
    assert [s for s, _ in result.eval_history] == [2, 4, 6]
    evals = [e for e in events if "eval_loss" in e]
    for step, metrics in result.metric_history.items():
        assert list(metrics) == ["eval_loss", *METRIC_NAMES]
        assert metrics["eval_loss"] == dict(result.eval_history)[step]
        # the callback saw the same numbers
        assert {k: v for k, v in next(e for e in evals if e["step"] == step).items() if k != "step"} == metrics
        # bp.evaluate on the checkpoint of that step (in eval mode: no dropout), with train's prompt and decoding
        reloaded = _reload(path, out / f"checkpoint-{step}")
        expected = bp.evaluate(reloaded, processor, eval_rows, prompt=PROMPT, **DECODING)
        assert {k: metrics[k] for k in METRIC_NAMES} == expected, step
    # the scores move as the adapter trains (a run that scored one model throughout would not)
    assert len({m["CIDEr"] for m in result.metric_history.values()}) > 1


def test_the_values_equal_pycocoevalcap_for_the_captions_generated(setup, best_run) -> None:
    pytest.importorskip("pycocoevalcap")
    from test_caption_scores import oracle

    path, processor, _, eval_rows = setup
    _, result, out, _ = best_run
    reloaded = _reload(path, out / "checkpoint-4")
    scored = bp.evaluate(reloaded, processor, eval_rows, prompt=PROMPT, return_captions=True, **DECODING)
    assert not any(c.startswith("a picture of") for c in scored["captions"])  # the prompt is stripped
    assert scored["references"] == [r["text"] for r in eval_rows]
    tokenized = bp.metrics.ptb_tokenize
    theirs = oracle([tokenized(r) for r in scored["references"]], tokenized(scored["captions"]))
    for name in METRIC_NAMES:
        assert result.metric_history[4][name] == pytest.approx(theirs[name], abs=1e-6, rel=0)


def test_load_best_model_at_end_leaves_the_best_step_s_adapter(setup, best_run) -> None:
    path, processor, _, eval_rows = setup
    model, result, out, _ = best_run
    cider = {s: m["CIDEr"] for s, m in result.metric_history.items()}
    best = max(sorted(cider), key=lambda s: (cider[s], -s))  # the first of equal values (strict comparison)
    assert result.best_global_step == best and result.best_metric == cider[best]
    assert result.best_model_checkpoint == str(out / f"checkpoint-{best}")
    checkpoint = _reload(path, out / f"checkpoint-{best}")
    got, want = _lora(model), _lora(checkpoint)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    # ... and the adapter train saved into output_dir is the best one, with the prompt
    final = _reload(path, out)
    assert all(torch.equal(t, want[k]) for k, t in _lora(final).items())
    assert final.caption_prompt == PROMPT
    images = [r["image"] for r in eval_rows]
    model.eval()
    assert bp.generate(model, processor, images, **DECODING) == bp.generate(
        checkpoint, processor, images, prompt=PROMPT, **DECODING
    )
    # transformers' TrainerState fields, in every checkpoint's trainer_state.json
    with open(out / "checkpoint-6" / "trainer_state.json") as f:
        state = json.load(f)
    assert (state["best_metric"], state["best_global_step"]) == (cider[best], best)
    assert state["best_model_checkpoint"] == str(out / f"checkpoint-{best}")
    assert [r["step"] for r in state["metric_history"]] == [2, 4, 6]
    assert list(state["metric_history"][0]["metrics"]) == ["eval_loss", *METRIC_NAMES]


def test_greater_is_better_defaults_and_the_best_checkpoint_survives_the_limit(setup, tmp_path) -> None:
    path, processor, train_rows, eval_rows = setup
    # "eval_loss": lower is better (transformers' default for a name ending in "loss"); the eval loss alone
    # is computed (no captions generated) unless predict_with_generate asks for them
    lowest = bp.train(
        _model(path), processor, train_rows, eval_dataset=eval_rows, output_dir=tmp_path / "a",
        metric_for_best_model="eval_loss", **{**SETTINGS, "eval_generate_kwargs": None},
    )  # fmt: skip
    losses = dict(lowest.eval_history)
    assert lowest.best_global_step == min(losses, key=lambda s: (losses[s], s))
    assert all(list(m) == ["eval_loss"] for m in lowest.metric_history.values())
    # greater_is_better=True on the loss picks the worst step (the first, for a run that learns); with
    # save_total_limit=1 its checkpoint is kept beside the newest one
    worst = bp.train(
        _model(path), processor, train_rows, eval_dataset=eval_rows, output_dir=tmp_path / "b", save_total_limit=1,
        metric_for_best_model="loss", greater_is_better=True, load_best_model_at_end=True,
        **{**SETTINGS, "eval_generate_kwargs": None},
    )  # fmt: skip
    losses = dict(worst.eval_history)
    best = max(losses, key=lambda s: (losses[s], -s))
    assert best != 6, losses
    assert worst.best_global_step == best
    assert sorted(p for p in os.listdir(tmp_path / "b") if p.startswith("checkpoint-")) == [
        f"checkpoint-{best}",
        "checkpoint-6",
    ]
    # predict_with_generate=True: the caption metrics too, though the eval loss picks the best
    both = bp.train(
        _model(path), processor, train_rows, eval_dataset=eval_rows, max_steps=2, batch_size=4, progress=False,
        mixed_precision="no", predict_with_generate=True, eval_generate_kwargs=DECODING, prompt=PROMPT,
    )  # fmt: skip
    assert list(both.metric_history) == [2] and list(both.metric_history[2]) == ["eval_loss", *METRIC_NAMES]
    assert both.best_metric is None  # no metric_for_best_model: nothing picked


def test_resume_keeps_the_best_metric(setup, best_run, tmp_path) -> None:
    path, processor, train_rows, eval_rows = setup
    _, full, _, _ = best_run
    kwargs = dict(eval_dataset=eval_rows, output_dir=tmp_path, metric_for_best_model="CIDEr",
                  load_best_model_at_end=True, **SETTINGS)  # fmt: skip

    def stop_at_four(log):
        return log.get("step") == 4 and "loss" in log

    part = bp.train(_model(path), processor, train_rows, callback=stop_at_four, **kwargs)
    assert part.interrupted and part.global_step == 4 and sorted(part.metric_history) == [2, 4]
    with open(tmp_path / "checkpoint-4" / "trainer_state.json") as f:
        state = json.load(f)
    assert (state["best_metric"], state["best_global_step"]) == (part.best_metric, part.best_global_step)
    model = _model(path, seed=5)  # another fresh adapter: the resume overwrites it
    rest = bp.train(model, processor, train_rows, resume_from_checkpoint=True, **kwargs)
    # the resumed run knows the evaluations before the interruption and compares with their best
    assert sorted(rest.metric_history) == [2, 4, 6]
    assert {s: rest.metric_history[s] for s in (2, 4)} == part.metric_history
    cider = {s: m["CIDEr"] for s, m in rest.metric_history.items()}
    best = max(sorted(cider), key=lambda s: (cider[s], -s))
    assert (rest.best_global_step, rest.best_metric) == (best, cider[best])
    assert rest.best_model_checkpoint == str(tmp_path / f"checkpoint-{best}")
    # the same run as the uninterrupted one (training and dropout draws repeat; the scores to rounding)
    assert rest.best_global_step == full.best_global_step
    for step in (2, 4, 6):
        for name, value in full.metric_history[step].items():
            assert rest.metric_history[step][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, name)
    # the model ends with the best checkpoint's adapter, even when that best was reached before the resume
    want = _lora(_reload(path, tmp_path / f"checkpoint-{best}"))
    assert all(torch.equal(t, want[k]) for k, t in _lora(model).items())


def test_a_missing_best_checkpoint_on_resume_is_refused(setup, tmp_path) -> None:
    path, processor, train_rows, eval_rows = setup
    kwargs = dict(eval_dataset=eval_rows, output_dir=tmp_path, metric_for_best_model="loss", greater_is_better=True,
                  load_best_model_at_end=True, **{**SETTINGS, "eval_generate_kwargs": None})  # fmt: skip
    part = bp.train(_model(path), processor, train_rows, callback=lambda log: log.get("step") == 4, **kwargs)
    assert part.global_step == 4 and part.best_global_step == 2  # the worst loss: the first evaluation
    shutil.rmtree(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match="load_best_model_at_end needs the best checkpoint"):
        bp.train(_model(path), processor, train_rows, resume_from_checkpoint=True, **kwargs)


def test_bad_settings_get_clear_errors(setup, tiny_checkpoint: str) -> None:
    path, processor, train_rows, eval_rows = setup
    model = _model(path)
    run = dict(max_steps=1, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="'CIDEr-D' is not a metric train reports: 'eval_loss', 'Bleu_1'"):
        bp.train(model, processor, train_rows, eval_dataset=eval_rows, metric_for_best_model="CIDEr-D", **run)
    with pytest.raises(TypeError, match="metric_for_best_model must be"):
        bp.train(model, processor, train_rows, eval_dataset=eval_rows, metric_for_best_model=3, **run)
    with pytest.raises(ValueError, match="eval_steps=2 asks for an evaluation every 2 steps, but no eval_dataset"):
        bp.train(model, processor, train_rows, eval_steps=2, **run)
    for kw in ({"load_best_model_at_end": True}, {"metric_for_best_model": "CIDEr"}, {"predict_with_generate": True}):
        with pytest.raises(ValueError, match="no eval_dataset was given"):
            bp.train(model, processor, train_rows, **kw, **run)
    with pytest.raises(TypeError, match="load_best_model_at_end must be True or False"):
        bp.train(model, processor, train_rows, eval_dataset=eval_rows, load_best_model_at_end="yes", **run)
    with pytest.raises(ValueError, match="is a caption metric, which needs captions generated"):
        bp.train(
            model, processor, train_rows, eval_dataset=eval_rows, metric_for_best_model="Bleu_4",
            predict_with_generate=False, **run,
        )  # fmt: skip
    with pytest.raises(ValueError, match="not a mapping of tensors"):
        bp.train(model, None, _data(4), eval_dataset=_data(4), metric_for_best_model="eval_CIDEr", **run)
    with pytest.raises(ValueError, match="cannot set 'prompt'"):
        bp.train(
            model, processor, train_rows, eval_dataset=eval_rows, predict_with_generate=True,
            eval_generate_kwargs={"prompt": "x"}, **run,
        )  # fmt: skip
    with pytest.raises(ValueError, match="set predict_with_generate=True"):
        bp.train(model, processor, train_rows, eval_dataset=eval_rows, eval_generate_kwargs={"num_beams": 1}, **run)
    # a decoding setting generate refuses stops training with generate's error
    with pytest.raises(ValueError, match="num_beams"):
        bp.train(
            model, processor, train_rows, eval_dataset=eval_rows, predict_with_generate=True,
            eval_generate_kwargs={"num_beams": 0}, **run,
        )  # fmt: skip
    # the eval loss as the metric works on tensors (no captions needed), "eval_" prefix or not
    tiny_model = bp.get_peft_model(
        bp.BlipForConditionalGeneration.from_pretrained(tiny_checkpoint), bp.LoraConfig(**LORA)
    )
    tiny = bp.train(tiny_model, None, _data(4), eval_dataset=_data(4), metric_for_best_model="eval_loss", **run)
    assert tiny.best_global_step == 1 and tiny.best_metric == tiny.eval_history[0][1]


def test_plot_shows_the_metrics(best_run, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    _, result, _, _ = best_run
    fig = result.plot(tmp_path / "curves.png")
    assert len(fig.axes) == 2
    labels = [line.get_label() for line in fig.axes[1].get_lines()]
    assert labels == [*METRIC_NAMES, "best step"]
    assert (tmp_path / "curves.png").stat().st_size > 0
