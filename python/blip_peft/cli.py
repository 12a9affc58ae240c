"""The `blip-peft` command (also `python -m blip_peft`): train, caption, eval, merge, demo, vqa, rank, serve."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from blip_peft.presets import QUERY_VALUE_TARGETS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _hub_cache_dirs() -> list[str]:
    """Where a Hugging Face cache may hold downloaded models, in the order huggingface_hub looks."""
    if os.environ.get("HF_HUB_CACHE"):
        return [os.environ["HF_HUB_CACHE"]]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return [os.path.join(home, "hub")]


def resolve_model(name: str) -> str:
    """A local checkpoint folder, or a hub id (`owner/name`) found in the local Hugging Face cache. Nothing is
    downloaded: a model that is not on disk is an error that says where it was looked for."""
    if os.path.isdir(name):
        return name
    looked = [os.path.abspath(name)]
    if name.count("/") == 1 and not name.startswith((".", "/")):
        for cache in _hub_cache_dirs():
            repo = os.path.join(cache, "models--" + name.replace("/", "--"))
            looked.append(repo)
            snapshots = os.path.join(repo, "snapshots")
            ref = os.path.join(repo, "refs", "main")
            if os.path.isfile(ref):
                with open(ref) as f:
                    candidate = os.path.join(snapshots, f.read().strip())
                if os.path.isdir(candidate):
                    return candidate
            if os.path.isdir(snapshots):
                found = sorted(os.listdir(snapshots))
                if found:
                    return os.path.join(snapshots, found[-1])
    raise FileNotFoundError(
        f"model {name!r} not found; looked in: {', '.join(looked)}. blip-peft does not download anything: pass a "
        "local checkpoint folder, or download the model once (e.g. `huggingface-cli download "
        "Salesforce/blip-image-captioning-base`) so it is in the Hugging Face cache."
    )


def _load_dataset(path: str) -> Any:
    import blip_peft as bp

    if os.path.isdir(path):
        return bp.ImageCaptionDataset.from_folder(path)
    if path.endswith(".jsonl"):
        return bp.ImageCaptionDataset.from_jsonl(path)
    if path.endswith(".csv"):
        return bp.ImageCaptionDataset.from_csv(path)
    raise ValueError(f"--data must be an imagefolder, a .jsonl or a .csv file, got {path!r}")


def _images(paths: Sequence[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            out.extend(os.path.join(p, f) for f in sorted(os.listdir(p)) if f.lower().endswith(IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    import blip_peft as bp

    model_path = resolve_model(args.model)
    processor = bp.AutoProcessor.from_pretrained(model_path)
    model = bp.BlipForConditionalGeneration.from_pretrained(model_path, device=args.device)
    if not args.full:
        targets: Any = args.target_modules
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        config = bp.LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets
        )
        model = bp.get_peft_model(model, config)
        model.print_trainable_parameters()
    result = bp.train(
        model,
        processor,
        _load_dataset(args.data),
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        lr_scheduler=args.lr_scheduler,
        warmup_ratio=args.warmup_ratio,
        mixed_precision=args.mixed_precision,
        output_dir=args.output_dir,
        save_steps=args.save_steps,
        seed=args.seed,
        resume_from_checkpoint=True if args.resume else None,
        prompt=args.prompt,
        label_smoothing=args.label_smoothing,
        augment=None if args.augment == "none" else args.augment,
        eval_dataset=_load_dataset(args.eval_data) if args.eval_data else None,
        eval_steps=args.eval_steps,
        metric_for_best_model=args.metric_for_best_model,
        load_best_model_at_end=args.load_best_model_at_end,
    )
    if result.interrupted:
        where = (
            f"its last checkpoint is {result.last_checkpoint} (continue with --resume)"
            if result.last_checkpoint
            else "no checkpoint was written"
        )
        print(f"blip-peft train: interrupted after {result.global_step} steps; {where}", file=sys.stderr)
        return 130
    if args.full:
        model.save_pretrained(args.output_dir)
        processor.save_pretrained(args.output_dir)
    final = f", final loss {result.losses[-1]:.4f}" if result.losses else ""
    if result.best_metric is not None:
        final += f", best {args.metric_for_best_model or 'eval_loss'} {result.best_metric:.4f} at step "
        final += f"{result.best_global_step}"
    print(f"trained {result.global_step} steps{final}; saved to {args.output_dir}")
    return 0


def _model_and_processor(args: argparse.Namespace, head: Any = None) -> tuple[Any, Any]:
    """`--model` (with `--adapter` when given) on `--device` as `head` (the captioner by default), and the
    model's processor."""
    import blip_peft as bp

    model_path = resolve_model(args.model)
    processor = bp.AutoProcessor.from_pretrained(model_path)
    model: Any = (head or bp.BlipForConditionalGeneration).from_pretrained(model_path, device=args.device)
    if args.adapter:
        model = bp.PeftModel.from_pretrained(model, args.adapter)
    return model, processor


def _shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous block of `n` items rank `rank` of `world` captions (sizes differ by one at most)."""
    return rank * n // world, (rank + 1) * n // world


def cmd_caption(args: argparse.Namespace) -> int:
    """Captions images; under torchrun each rank captions its contiguous shard of the images and rank 0 writes
    (or prints) them all, in the order given, as one process would."""
    import blip_peft as bp
    from blip_peft import distributed

    images = _images(args.images)
    if not images:
        raise ValueError("no images given (pass files or folders holding images)")
    captions = _caption_distributed(args, images) if distributed.is_distributed() else _caption_images(args, images)
    if captions is None:
        return 0  # not rank 0: rank 0 writes the output
    lines = [
        json.dumps({"file_name": image, "text": caption}) + "\n" if args.output else f"{image}\t{caption}\n"
        for image, caption in zip(images, captions, strict=True)
    ]
    if args.output:
        bp._blip_peft.write_text_atomic(args.output, "".join(lines))
    else:
        sys.stdout.write("".join(lines))
    return 0


def _caption_images(args: argparse.Namespace, images: list[str]) -> list[str]:
    import blip_peft as bp

    model, processor = _model_and_processor(args)
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    if args.do_sample:
        kwargs.update(do_sample=True, top_p=args.top_p, temperature=args.temperature, seed=args.seed)
    return bp.generate(model, processor, images, prompt=args.prompt, batch_size=args.batch_size, **kwargs)


def _caption_distributed(args: argparse.Namespace, images: list[str]) -> list[str] | None:
    """This rank's shard captioned, gathered on rank 0 in order (None on the other ranks). Every rank reaches the
    gather, also one whose captioning failed, so a bad image on one rank is an error on all of them, not a hang."""
    import torch.distributed as dist

    from blip_peft import distributed

    distributed.init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    start, end = _shard(len(images), rank, world)
    mine: tuple[str, Any]
    try:
        mine = ("ok", _caption_images(args, images[start:end]) if end > start else [])
    except (FileNotFoundError, ValueError, TypeError, RuntimeError, MemoryError) as e:
        mine = ("error", f"rank {rank} (images {start}..{end - 1}): {type(e).__name__}: {e}")
    gathered: list[Any] = [None] * world
    dist.gather_object(mine, gathered if rank == 0 else None, dst=0)
    errors: list[Any] = [[msg for kind, msg in gathered if kind == "error"] if rank == 0 else None]
    dist.broadcast_object_list(errors, src=0)
    if errors[0]:
        raise ValueError("captioning failed on " + "; ".join(errors[0]))
    if rank != 0:
        return None
    return [caption for _, captions in gathered for caption in captions]


def cmd_eval(args: argparse.Namespace) -> int:
    import blip_peft as bp

    model, processor = _model_and_processor(args)
    result = bp.evaluate(
        model,
        processor,
        _load_dataset(args.data),
        batch_size=args.batch_size,
        num_beams=args.num_beams,
        min_new_tokens=args.min_new_tokens,
        max_new_tokens=args.max_new_tokens,
        prompt=args.prompt,
        tokenize=not args.no_tokenize,
        return_captions=args.output is not None,
    )
    if args.output is not None:
        lines = [
            json.dumps({"caption": c, "references": r})
            for c, r in zip(result.pop("captions"), result.pop("references"), strict=True)
        ]
        bp._blip_peft.write_text_atomic(args.output, "".join(line + "\n" for line in lines))
    if args.json:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name:<8} {value:.4f}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    import blip_peft as bp

    model_path = resolve_model(args.model)
    base = bp.BlipForConditionalGeneration.from_pretrained(model_path)
    merged = bp.PeftModel.from_pretrained(base, args.adapter).merge_and_unload()
    merged.save_pretrained(args.output)
    try:
        bp.AutoProcessor.from_pretrained(model_path).save_pretrained(args.output)
    except (FileNotFoundError, ValueError):
        pass  # a checkpoint without processor files: the merged weights are still complete
    print(f"merged {args.adapter} into {model_path}; saved to {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from blip_peft import demo

    demo.run(output_dir=args.output_dir, quick=args.quick, task=args.task)
    return 0


def _existing_images(paths: Sequence[str], flag: str) -> list[str]:
    """Image files (folders expanded to their images), each checked to exist before a model is loaded."""
    images = _images(paths)
    for path in images:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag}: no such image file {path!r}")
    return images


def cmd_vqa(args: argparse.Namespace) -> int:
    """Answers questions about images: one question per image (given in pairs), one question for every image, or
    one image with every question; prints `image<TAB>question<TAB>answer` lines (or JSON lines with --json)."""
    import blip_peft as bp

    images = _existing_images(args.image or [], "--image")
    questions = args.question or []
    if not images:
        raise ValueError("no image given: pass --image FILE (repeatable, or a folder of images)")
    if not questions:
        raise ValueError('no question given: pass --question "..." (repeatable, one per --image or one for all)')
    if any(not q.strip() for q in questions):
        raise ValueError("--question is empty; ask something, e.g. --question 'how many circles are there?'")
    if len(images) != len(questions) and len(images) != 1 and len(questions) != 1:
        raise ValueError(
            f"got {len(images)} images and {len(questions)} questions: give one --question per --image, one "
            "--question for every image, or one --image for every question"
        )
    if len(images) == 1:
        images = images * len(questions)
    if len(questions) == 1:
        questions = questions * len(images)
    model, processor = _model_and_processor(args, bp.BlipForQuestionAnswering)
    answers = bp.answer(
        model,
        processor,
        images,
        questions,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
    )
    for image, question, answer in zip(images, questions, answers, strict=True):
        if args.json:
            print(json.dumps({"image": image, "question": question, "answer": answer}))
        else:
            print(f"{image}\t{question}\t{answer}")
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    """Ranks texts for each image and images for each text (`blip_peft.rank`), printing the top-k both ways."""
    import blip_peft as bp

    images = _existing_images(args.images, "--images")
    texts = list(args.texts)
    if not images:
        raise ValueError("no images given: pass --images FILE ... (files or folders of images)")
    if any(not t.strip() for t in texts):
        raise ValueError("--texts holds an empty text; give each candidate text in quotes")
    model, processor = _model_and_processor(args, bp.BlipForImageTextRetrieval)
    result = bp.rank(
        model, processor, images, texts, top_k=args.top_k, rerank_itm=args.itm, batch_size=args.batch_size
    )
    i2t = [
        [{"text": texts[j], "index": j, "score": round(s, 6)} for j, s in zip(row.tolist(), sc.tolist(), strict=True)]
        for row, sc in zip(result.image_to_text, result.image_to_text_scores, strict=True)
    ]
    t2i = [
        [
            {"image": images[j], "index": j, "score": round(s, 6)}
            for j, s in zip(row.tolist(), sc.tolist(), strict=True)
        ]
        for row, sc in zip(result.text_to_image, result.text_to_image_scores, strict=True)
    ]
    if args.json:
        print(json.dumps({"images": images, "texts": texts, "image_to_text": i2t, "text_to_image": t2i}))
        return 0
    score = "ITM logit + similarity" if args.itm else "cosine similarity"
    print(f"image -> texts (top {len(i2t[0])}, by {score}):")
    for image, matches in zip(images, i2t, strict=True):
        print(image)
        for n, m in enumerate(matches, 1):
            print(f"  {n}. {m['score']:8.4f}  {m['text']}")
    print(f"text -> images (top {len(t2i[0])}, by {score}):")
    for text, matches in zip(texts, t2i, strict=True):
        print(text)
        for n, m in enumerate(matches, 1):
            print(f"  {n}. {m['score']:8.4f}  {m['image']}")
    return 0


def _named_adapters(specs: Sequence[str]) -> dict[str, str]:
    """`NAME=PATH` pairs as given to `serve --adapter`."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=PATH (an adapter folder), got {spec!r}")
        if name == "__base__" or name in adapters:
            raise ValueError(f"--adapter name {name!r} is reserved or given twice")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--adapter {name}: {path!r} is not a folder")
        adapters[name] = path
    return adapters


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import aiohttp  # noqa: F401

        from blip_peft import serve
    except ImportError as e:
        raise ValueError(f"serve needs aiohttp (pip install aiohttp): {e}") from e
    serve.run(
        resolve_model(args.model),
        _named_adapters(args.adapter or []),
        host=args.host,
        port=args.port,
        device=args.device,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_image_pixels=args.max_image_pixels,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip-peft", description="Fine-tune BLIP with LoRA and caption images.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune a model (LoRA by default) on an image-caption dataset")
    train.add_argument("--model", required=True, help="checkpoint folder or a hub id in the local HF cache")
    train.add_argument("--data", required=True, help="imagefolder (metadata.jsonl), or a .jsonl / .csv file")
    train.add_argument("--output-dir", required=True)
    train.add_argument("--full", action="store_true", help="train every parameter instead of LoRA adapters")
    train.add_argument("--lora-r", type=int, default=16)
    train.add_argument("--lora-alpha", type=float, default=32)
    train.add_argument("--lora-dropout", type=float, default=0.05)
    train.add_argument(
        "--target-modules",
        default=",".join(QUERY_VALUE_TARGETS),
        help="comma-separated module names, or all-linear",
    )
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--learning-rate", type=float, default=1e-4)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--lr-scheduler", choices=["linear", "cosine", "constant"], default="linear")
    train.add_argument("--warmup-ratio", type=float, default=0.0)
    train.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"], default="auto")
    train.add_argument("--save-steps", type=int, default=None)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in --output-dir")
    train.add_argument("--device", default="cpu")
    recipe = train.add_argument_group("the BLIP recipe and evaluation (bp.train's arguments of the same names)")
    recipe.add_argument(
        "--prompt", default=None, help='prepended to every caption, masked out of the loss ("a picture of ")'
    )
    recipe.add_argument("--label-smoothing", type=float, default=None, help="the caption loss's (the recipe: 0.1)")
    recipe.add_argument("--augment", choices=["none", "blip"], default="none", help="training-image augmentation")
    recipe.add_argument("--eval-data", default=None, help="held-out images with reference captions (as --data)")
    recipe.add_argument("--eval-steps", type=int, default=None, help="evaluate --eval-data every N steps")
    recipe.add_argument("--metric-for-best-model", default=None, help='"CIDEr", "Bleu_4", ... or "eval_loss"')
    recipe.add_argument(
        "--load-best-model-at-end", action="store_true", help="keep the best evaluation's adapter, not the last"
    )
    train.set_defaults(func=cmd_train)

    caption = sub.add_parser("caption", help="caption images (files or folders)")
    caption.add_argument("images", nargs="+")
    caption.add_argument("--model", required=True)
    caption.add_argument("--adapter", default=None, help="a PEFT adapter folder to apply")
    caption.add_argument("--prompt", default=None, help='a text to continue, e.g. "a photography of"')
    caption.add_argument("--max-new-tokens", type=int, default=30)
    caption.add_argument("--num-beams", type=int, default=1)
    caption.add_argument("--do-sample", action="store_true")
    caption.add_argument("--top-p", type=float, default=0.9)
    caption.add_argument("--temperature", type=float, default=1.0)
    caption.add_argument("--seed", type=int, default=0)
    caption.add_argument("--batch-size", type=int, default=32)
    caption.add_argument("--output", default=None, help="write JSONL here instead of printing")
    caption.add_argument("--device", default="cpu")
    caption.set_defaults(func=cmd_caption)

    evaluate = sub.add_parser(
        "eval", help="caption a dataset's images and print BLEU-1..4, ROUGE-L and CIDEr (pycocoevalcap's numbers)"
    )
    evaluate.add_argument("--model", required=True, help="checkpoint folder or a hub id in the local HF cache")
    evaluate.add_argument("--adapter", default=None, help="a PEFT adapter folder to apply")
    evaluate.add_argument(
        "--data",
        required=True,
        help="imagefolder (metadata.jsonl), or a .jsonl / .csv file; rows with the same image, or a list of "
        "captions in one row, are several references",
    )
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--num-beams", type=int, default=3)
    evaluate.add_argument("--min-new-tokens", type=int, default=5)
    evaluate.add_argument("--max-new-tokens", type=int, default=20)
    evaluate.add_argument("--prompt", default=None, help="a text captions continue (stripped before scoring)")
    evaluate.add_argument("--no-tokenize", action="store_true", help="score captions as given, no PTB tokenising")
    evaluate.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    evaluate.add_argument("--output", default=None, help="also write each image's caption and references (JSONL)")
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(func=cmd_eval)

    merge = sub.add_parser("merge", help="merge an adapter into its base model and save a full checkpoint")
    merge.add_argument("--model", required=True)
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--output", required=True)
    merge.set_defaults(func=cmd_merge)

    demo = sub.add_parser("demo", help="the whole workflow on a bundled model and the world, offline")
    demo.add_argument("--output-dir", default="./blip-peft-demo")
    demo.add_argument("--quick", action="store_true", help="a few steps only (a smoke test)")
    demo.add_argument(
        "--task",
        choices=["caption", "vqa", "retrieval"],
        default="caption",
        help="which head: captioning (BLEU-4, CIDEr), question answering (VQA accuracy) or image-text retrieval "
        "(recall@1/@5 both ways)",
    )
    demo.set_defaults(func=cmd_demo)

    vqa = sub.add_parser("vqa", help="answer questions about images (BlipForQuestionAnswering)")
    vqa.add_argument(
        "--model",
        default=None,
        help="checkpoint folder or a hub id in the local HF cache (default: the bundled VQA model)",
    )
    vqa.add_argument("--adapter", default=None, help="a PEFT adapter folder to apply")
    vqa.add_argument("--image", action="append", help="an image file or folder (repeatable)")
    vqa.add_argument(
        "--question", action="append", help="a question (repeatable: one per --image, or one for every image)"
    )
    vqa.add_argument("--max-new-tokens", type=int, default=10)
    vqa.add_argument("--num-beams", type=int, default=1)
    vqa.add_argument("--batch-size", type=int, default=32)
    vqa.add_argument("--json", action="store_true", help="one JSON object per answer instead of tab-separated lines")
    vqa.add_argument("--device", default="cpu")
    vqa.set_defaults(func=cmd_vqa, default_model="vqa")

    rank = sub.add_parser("rank", help="rank texts for images and images for texts (BlipForImageTextRetrieval)")
    rank.add_argument(
        "--model",
        default=None,
        help="checkpoint folder or a hub id in the local HF cache (default: the bundled retrieval model)",
    )
    rank.add_argument("--adapter", default=None, help="a PEFT adapter folder to apply")
    rank.add_argument("--images", nargs="+", required=True, help="image files or folders")
    rank.add_argument("--texts", nargs="+", required=True, help="the candidate texts (each in quotes)")
    rank.add_argument("--top-k", type=int, default=5, help="matches printed per image and per text")
    rank.add_argument(
        "--itm", action="store_true", help="re-rank each query's top-k by the matching head (BLIP's evaluation)"
    )
    rank.add_argument("--batch-size", type=int, default=32)
    rank.add_argument("--json", action="store_true", help="print one JSON object")
    rank.add_argument("--device", default="cpu")
    rank.set_defaults(func=cmd_rank, default_model="retrieval")

    serve = sub.add_parser("serve", help="caption images over HTTP, one base model with several adapters")
    serve.add_argument("--model", required=True)
    serve.add_argument("--adapter", action="append", metavar="NAME=PATH", help="an adapter folder (repeatable)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--max-batch", type=int, default=8, help="images in one mixed-adapter batch at most")
    serve.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a request waits for others")
    serve.add_argument("--max-body-mb", type=float, default=16.0, help="larger request bodies get 413")
    serve.add_argument("--max-image-pixels", type=int, default=None, help="larger images get 413")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "default_model", None) and args.model is None:
        from blip_peft.demo import BUNDLED_MODELS  # noqa: PLC0415

        args.model = BUNDLED_MODELS[args.default_model]
    for name in ("batch_size", "epochs", "max_new_tokens", "num_beams", "lora_r", "top_k"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if getattr(args, "min_new_tokens", 0) < 0:
        parser.error("--min-new-tokens must not be negative")
    if getattr(args, "data", None) and not os.path.exists(args.data):
        parser.error(f"--data {args.data!r} does not exist")
    if isinstance(getattr(args, "adapter", None), str) and not os.path.isdir(args.adapter):
        parser.error(f"--adapter {args.adapter!r} is not a folder")
    # Output paths are checked before any work: a folder where a file goes (or the reverse) is an error now,
    # not a traceback after training or captioning.
    for name, kind in (("output_dir", "folder"), ("output", "folder" if args.command == "merge" else "file")):
        path = getattr(args, name, None)
        if path is None:
            continue
        flag = f"--{name.replace('_', '-')}"
        if kind == "folder" and os.path.exists(path) and not os.path.isdir(path):
            parser.error(f"{flag} {path!r} is a file; give a folder (it is created if missing)")
        if kind == "file":
            if os.path.isdir(path):
                parser.error(f"{flag} {path!r} is a folder; give a file name (JSONL is written there)")
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                parser.error(f"{flag} {path!r}: the folder {parent!r} does not exist")
    try:
        return int(args.func(args))
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"blip-peft {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
