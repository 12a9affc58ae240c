"""Time bp.metrics.caption_scores against pycocoevalcap 1.2's Bleu/Rouge/Cider scorers on the same input.

5,000 images x 5 references of the synthetic world's captions (already tokenised: lower case, no punctuation),
the candidates other scenes' captions. Both sides run in this one process, one after the other; the numbers
must agree within 1e-6. Usage: PYTHONPATH=python:<pycocoevalcap> python bench/caption_metrics.py [--images N]
"""

from __future__ import annotations

import argparse
import time

from jobs import cpu_name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    from blip_peft import metrics, world

    n = args.images
    caption = [world.describe(world.sample_scene(i, "base" if i % 2 else "target")) for i in range(6 * n)]
    refs = [caption[5 * i : 5 * i + 5] for i in range(n)]
    cands = [caption[5 * n + i] for i in range(n)]

    ours_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours = metrics.caption_scores(refs, cands, tokenize=False)
        ours_times.append(time.perf_counter() - start)
    tok_start = time.perf_counter()
    metrics.caption_scores(refs, cands)
    tok_time = time.perf_counter() - tok_start

    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [c] for i, c in enumerate(cands)}
    start = time.perf_counter()
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    theirs_time = time.perf_counter() - start
    theirs = dict(
        zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"], [*bleu, rouge, cider], strict=True)
    )
    diff = max(abs(ours[k] - theirs[k]) for k in theirs)
    print(f"CPU: {cpu_name()}")
    print(f"{n} images x 5 references; scores {ours}")
    print(
        f"blip_peft caption_scores: best {min(ours_times):.3f} s of {args.repeats} (tokenize=True: {tok_time:.3f} s)"
    )
    print(f"pycocoevalcap Bleu+Rouge+Cider: {theirs_time:.2f} s; max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
