"""The report: the tables and text of a run (`render`), the scaling curves (table and PNG), the raw results kept
in bench/results/, and this machine's section of RESULTS.md."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from shapes import (
    BF16_LIBS,
    EARLY_MODES,
    EARLY_NEW_TOKENS,
    HEAP_LIBS,
    KEPT_MEMORY_TUNABLES,
    LEARNING_RATE,
    LIB_LABEL,
    MAX_GRAD_NORM,
    SECTIONS,
    TARGET_MODULES,
    generation_floor,
    presets,
    train_flops_per_sample,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_FILE = BENCH_DIR / "RESULTS.md"


# ------------------------------------------------------------------------------------------------- reporting
def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if x == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{x:,.{decimals}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "–"
    return f"{a / b:.2f}×"


def _vs_hf(r: dict[str, Any], hf: dict[str, Any] | None, is_hf: bool, time_key: str, time: float) -> list[str]:
    """A row's "speed vs HF" and "memory vs HF" cells: 1.00× on transformers' own row, – without one."""
    if is_hf:
        return ["1.00×", "1.00×"]
    if not hf:
        return ["–", "–"]
    return [_ratio(hf[time_key], time), _ratio(r["peak_mib"], hf["peak_mib"])]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _bytes_per(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _section_info(report: dict[str, Any], section: str) -> dict[str, Any]:
    """The machine measurement (floors) taken in the run that measured `section`."""
    return report.get("section_info", {}).get(section) or report["info"]


def render(report: dict[str, Any]) -> list[str]:
    info = report["info"]
    suite = report["suite"]
    on_gpu = report["device"].startswith("cuda")
    v = info["versions"]
    out = [
        f"- **Device**: {info['device_name']} ({info['device_detail']}); suite `{suite}` "
        f"({report['config']} shapes, {report['dtype']}); {report['date']}",
        f"- **Versions**: blip_peft {v['blip_peft']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"peft {v['peft']}, Python {v['python']}",
    ]
    measured = [s for s in SECTIONS if s in report]
    groups: list[tuple[dict[str, Any], list[str]]] = []
    for section in measured:
        sinfo = _section_info(report, section)
        for group_info, names in groups:
            if group_info is sinfo or group_info == sinfo:
                names.append(section)
                break
        else:
            groups.append((sinfo, [section]))
    for sinfo, names in groups or [(info, [])]:
        scope = "in this run" if len(groups) <= 1 else f"with the {', '.join(names)} run"
        out.append(
            f"- **Machine floors** (measured {scope}): memory bandwidth {sinfo['bandwidth'] / 1e9:,.1f} GB/s (a "
            f"{'1 GiB' if on_gpu else '256 MiB'} tensor copy), matmul {sinfo['matmul_flops'] / 1e9:,.1f} GFLOP/s "
            f"({sinfo['matmul_n']}² {report['dtype']} GEMM)"
        )
    st = report["suite_settings"]
    gen_plan = ", ".join(f"batch {b}: {w} + {n}" for b, w, n in st["gen_plan"])
    out.append(
        f"- **Timing**: the {'best' if report.get('stat', 'min') == 'min' else 'median'} of the timed runs after "
        f"warm-up (training: {st['train_warmup']} warm-up + {st['train_iters']} timed steps; generation calls: "
        f"{gen_plan}; preprocessing: {st['pre_warmup']} + {st['pre_iters']}; curves: {st['scale_iters']} timed per "
        "point); every (library, job) in its own process"
    )
    length = report["suite_settings"]["caption_len"]
    tflops = train_flops_per_sample(report["config"], length)
    bpe = _bytes_per(report["dtype"])

    if report.get("train"):
        tinfo = _section_info(report, "train")
        mm = tinfo["matmul_flops"]
        peak = tinfo.get("nominal_peak") or mm
        peak_name = (
            f"{tinfo['device_name']} nominal dense {report['dtype']} peak {peak / 1e12:.0f} TFLOP/s"
            if tinfo.get("nominal_peak")
            else f"this machine's measured {report['dtype']} matmul rate ({mm / 1e9:,.1f} GFLOP/s)"
        )
        out += [
            "",
            f"**Training** — LoRA r=16 (α=32, dropout 0.05) on {', '.join(TARGET_MODULES)}; AdamW lr {LEARNING_RATE}, "
            f"clip {MAX_GRAD_NORM}; captions of {length} tokens; {report['dtype']}"
            + (" (frozen base in bf16/fp16, adapters float32)" if report["dtype"] != "float32" else "")
            + f". Model FLOPs: {_fmt(tflops / 1e9)} GFLOP per sample (2 × forward). "
            f"MFU = achieved FLOP/s ÷ {peak_name}. Floor = the FLOPs at the measured matmul rate.",
            "",
        ]
        rows = []
        hf_by_batch = {r["batch"]: r for r in report["train"] if r["lib"] == "hf" and "error" not in r}
        autocast_by_batch = {r["batch"]: r for r in report["train"] if r["lib"] == "hf_autocast" and "error" not in r}
        bf16_rows = any(r["lib"] in BF16_LIBS for r in report["train"])
        mm_bf16 = tinfo.get("matmul_flops_bf16")
        for r in report["train"]:
            label = LIB_LABEL[r["lib"]]
            if "error" in r:
                rows.append(
                    [str(r["batch"]), label, "failed: " + r["error"], "", "", "", "", "", "", ""] + [""] * bf16_rows
                )
                continue
            step = r["step_s"]
            sps = r["batch"] / step
            rate = mm_bf16 if r["lib"] in BF16_LIBS and mm_bf16 else mm
            floor = r["batch"] * tflops / rate
            hf = hf_by_batch.get(r["batch"])
            is_hf = r["lib"] == "hf"
            row = [
                str(r["batch"]),
                label,
                _fmt(step * 1e3),
                _fmt(sps),
                _fmt(r["peak_mib"], 4),
                f"{r['step_faulted_mib']:,.0f}" if "step_faulted_mib" in r else "–",
                f"{100 * sps * tflops / (peak if rate is mm else rate):.1f}%",
                f"{_fmt(floor * 1e3)} ({step / floor:.1f}×)",
                *_vs_hf(r, hf, is_hf, "step_s", step),
            ]
            if bf16_rows:
                autocast = autocast_by_batch.get(r["batch"])
                row.append(_ratio(autocast["step_s"], step) if autocast and r["lib"] in BF16_LIBS else "–")
            rows.append(row)
        out += _table(
            [
                "batch",
                "implementation",
                "step (ms)",
                "samples/s",
                "peak mem (MiB)",
                "page-faulted / step (MiB)",
                "MFU",
                "floor ms (time/floor)",
                "speed vs HF",
                "memory vs HF",
            ]
            + (["speed vs HF bf16 autocast"] if bf16_rows else []),
            rows,
        )
        if bf16_rows:
            has = tinfo.get("cpu_has_bf16")
            out += [
                "",
                'bf16 rows: ours is `train(mixed_precision="bf16")` (the frozen base cast to bf16, adapters and '
                'AdamW state float32); theirs the same loop with the forward under `torch.autocast("cpu", '
                "torch.bfloat16)`. Their MFU and floor use the measured bf16 GEMM rate"
                + (f" ({mm_bf16 / 1e9:,.1f} GFLOP/s, 2048² bf16)" if mm_bf16 else "")
                + f'; `bp.cpu_has_bf16()` = {has}. "speed vs HF" is against transformers + peft in float32.',
            ]
        elif report.get("suite_settings", {}).get("bf16_rows") and tinfo.get("cpu_has_bf16") is False:
            out += [
                "",
                "No bf16 rows: this CPU has no bf16 arithmetic (`bp.cpu_has_bf16()` = False; neither AVX-512 BF16 "
                'nor AMX), so bf16 would run emulated in float32 units and `mixed_precision="auto"` stays float32.',
            ]
        if any(r["lib"] in HEAP_LIBS for r in report["train"]):
            out += [
                "",
                '"freed memory kept" rows: transformers + peft\'s loop in a process started with '
                f"`GLIBC_TUNABLES={KEPT_MEMORY_TUNABLES}`, what our `train()` sets for itself while it runs "
                "(src/freed_memory.rs): glibc then reuses freed blocks instead of handing each step fresh zeroed "
                "pages. A transformers user gets these numbers only by setting that (or preloading jemalloc / "
                "tcmalloc); the plain rows are what the tutorial's loop gets.",
            ]
        kinds = {r.get("memory_kind") for r in report["train"] if "error" not in r}
        trainable = {LIB_LABEL[r["lib"]]: r.get("trainable") for r in report["train"] if "error" not in r}
        out += [
            "",
            f"Peak memory: {', '.join(sorted(k for k in kinds if k))} of the training phase (weights included). "
            "Page-faulted: fresh pages the kernel zeroed during the reported step (getrusage's minor faults × the "
            "page size; `jobs.faulted_mib`): time spent in the kernel, not in the model. "
            f"Trainable parameters: {', '.join(f'{k}: {v:,}' for k, v in trainable.items() if v)}.",
        ]

    if report.get("generate"):
        ginfo = _section_info(report, "generate")
        bw, mm = ginfo["bandwidth"], ginfo["matmul_flops"]
        tokens = report["suite_settings"]["new_tokens"]
        out += [
            "",
            f"**Generation** — {tokens} new tokens forced (min_new_tokens = max_new_tokens = {tokens}), greedy and "
            f"beam search, base model (no adapter), {report['dtype']}. Floor = vision tower + cross-attention K/V at "
            "the matmul rate, then per token max(decoder weights + KV cache ÷ bandwidth, FLOPs ÷ matmul rate).",
            "",
        ]
        rows = []
        hf_rows = {
            (r["batch"], r["beams"]): r for r in report["generate"] if r["lib"] == "hf_gen" and "error" not in r
        }
        order = {"ours_gen": 0, "hf_gen": 1}
        for r in sorted(report["generate"], key=lambda r: (r["batch"], r.get("beams", 0), order[r["lib"]])):
            label = LIB_LABEL[r["lib"]]
            if "error" in r:
                rows.append([str(r["batch"]), "", label, "failed: " + r["error"], "", "", "", "", ""])
                continue
            floor = generation_floor(report["config"], r["batch"], r["beams"], tokens, bw, mm, bpe)
            hf = hf_rows.get((r["batch"], r["beams"]))
            is_hf = r["lib"] == "hf_gen"
            lat = r["latency_s"]
            rows.append(
                [
                    str(r["batch"]),
                    str(r["beams"]),
                    label,
                    _fmt(lat * 1e3),
                    _fmt(r["batch"] / lat),
                    _fmt(r["peak_mib"], 4),
                    f"{_fmt(floor * 1e3)} ({lat / floor:.1f}×)",
                    *_vs_hf(r, hf, is_hf, "latency_s", lat),
                ]
            )
        out += _table(
            [
                "batch",
                "beams",
                "implementation",
                "latency (ms)",
                "captions/s",
                "peak mem (MiB)",
                "floor ms (time/floor)",
                "speed vs HF",
                "memory vs HF",
            ],
            rows,
        )
        lens = {(r["lib"], r["beams"], r.get("out_len")) for r in report["generate"] if "error" not in r}
        by_key: dict[int, set[int]] = {}
        for _, beams, n in lens:
            by_key.setdefault(beams, set()).add(n)
        if any(len(s) > 1 for s in by_key.values()):
            out += ["", f"Warning: the two sides returned sequences of different lengths: {sorted(lens)}"]

    if report.get("early"):
        out += ["", *render_early(report)]

    pre = report.get("preprocess")
    if isinstance(pre, dict) and "skipped" in pre:
        out += ["", f"**Preprocessing** — not available: {pre['skipped']} (this part of the suite was skipped)."]
    elif pre:
        out += [
            "",
            f"**Preprocessing** — a batch of {pre[0]['n']} generated 640×480 JPEGs (PIL-opened, decoded inside the "
            "processor) → `pixel_values` at the model's image size.",
            "",
        ]
        hf = next((r for r in pre if r["lib"] == "hf_pre" and "error" not in r and "skipped" not in r), None)
        rows = []
        for r in pre:
            label = LIB_LABEL[r["lib"]]
            if "error" in r or "skipped" in r:
                rows.append([label, "failed: " + r.get("error", r.get("skipped", "")), "", "", "", ""])
                continue
            rows.append(
                [
                    f"{label} ({r.get('processor', '')})",
                    _fmt(r["batch_s"] * 1e3),
                    _fmt(r["n"] / r["batch_s"]),
                    _fmt(r["peak_mib"], 4),
                    str(r.get("shape")),
                    "1.00×" if r["lib"] == "hf_pre" else (_ratio(hf["batch_s"], r["batch_s"]) if hf else "–"),
                ]
            )
            if r.get("paths_batch_s"):
                t = r["paths_batch_s"]
                rows.append(
                    [
                        f"{label}, given the file paths",
                        _fmt(t * 1e3),
                        _fmt(r["n"] / t),
                        "–",
                        str(r.get("shape")),
                        _ratio(hf["batch_s"], t) if hf else "–",
                    ]
                )
        out += _table(["implementation", "batch (ms)", "images/s", "peak RSS (MiB)", "output", "speed vs HF"], rows)
        means = [r["mean"] for r in pre if r.get("mean") is not None]
        if len(means) > 1 and max(means) - min(means) > 1e-3:
            out += ["", f"Warning: the outputs differ (mean pixel value {', '.join(f'{m:.5f}' for m in means)})."]

    scale = report.get("scale")
    if scale:
        out += ["", "**How cost grows** (seconds; a line fit gives the marginal cost and the fixed part):", ""]
        out += render_scaling(report)

    epochs = report.get("text_lora_epochs")
    if epochs:
        n, batch, count = report["suite_settings"].get("epochs_plan", ("?", "?", "?"))
        out += [
            "",
            f"**Text-only LoRA over {count} epochs of the same {n} JPEGs** (batch {batch}, the decoder's attention "
            "and MLP; the whole run from the images' paths, float32): blip_peft's feature cache computes each "
            "image's embeddings once; transformers + peft runs the tutorial's loop (processor in the Dataset).",
            "",
        ]
        hf = next((r for r in epochs if r["lib"] == "hf" and "error" not in r), None)
        rows = []
        for r in epochs:
            label = LIB_LABEL[r["lib"]]
            if "error" in r:
                rows.append([label, "failed: " + r["error"], "", "", "", ""])
                continue
            cache = r.get("feature_cache") or {}
            hits = f"{cache['hits']} / {cache['misses']}" if cache.get("enabled") else "–"
            rows.append(
                [
                    label,
                    _fmt(r["total_s"]),
                    _fmt(r["total_s"] / max(r["steps"], 1)),
                    _fmt(r["peak_mib"], 4),
                    hits,
                    "1.00×" if r["lib"] == "hf" else (_ratio(hf["total_s"], r["total_s"]) if hf else "–"),
                ]
            )
        out += _table(
            ["implementation", "whole run (s)", "per step (s)", "peak (MiB)", "cache hits / misses", "speed vs HF"],
            rows,
        )
    return out


def render_early(report: dict[str, Any]) -> list[str]:
    early = report["early"]
    ok = [r for r in early if "error" not in r]
    lengths = sorted(n for r in ok for n in r["new_tokens"])
    span = f"{lengths[0]}–{lengths[-1]}" if lengths else "–"
    text, vision = presets.BUNDLED_TEXT, presets.BUNDLED_VISION
    out = [
        f"**Generation, captions ending on their own** — the bundled trained model (blip-shapes-base: "
        f"{vision['num_hidden_layers']} + {text['num_hidden_layers']} layers of width {text['hidden_size']}, "
        f"{(vision['image_size'] // vision['patch_size']) ** 2} image patches), world images of its base domain, "
        f"max_new_tokens = {EARLY_NEW_TOKENS} and no minimum, {report['dtype']}: captions end after {span} new "
        "tokens, so rows (beam search: images) that finished leave the batch. Sampling uses the same seed on both "
        "sides. Decoder rows run: the rows of all decoder passes, of those a batch that never shrinks would run "
        "(transformers). "
        "Timing: the best of the timed calls after warm-up ("
        + ", ".join(f"batch {b}: {w} + {n}" for b, w, n in report["suite_settings"].get("early_plan", []))
        + ").",
        "",
    ]
    hf_rows = {(r["batch"], r["mode"]): r for r in ok if r["lib"] == "hf_gen"}
    rows = []
    mismatched = []
    order = {"ours_gen": 0, "hf_gen": 1}
    modes = list(EARLY_MODES)
    for r in sorted(early, key=lambda r: (r["batch"], modes.index(r["mode"]) if "mode" in r else -1, order[r["lib"]])):
        label = LIB_LABEL[r["lib"]]
        if "error" in r:
            rows.append([str(r["batch"]), "", label, "failed: " + r["error"], "", "", "", "", "", ""])
            continue
        hf = hf_rows.get((r["batch"], r["mode"]))
        is_hf = r["lib"] == "hf_gen"
        lat = r["latency_s"]
        if hf and not is_hf and hf.get("ids_sha1") != r.get("ids_sha1"):
            mismatched.append(f"batch {r['batch']}, {r['mode']}")
        if is_hf:
            work = "all"
        elif r.get("decoder_rows"):
            work = f"{r['decoder_rows']:,} of {r['all_rows']:,} ({100 * r['decoder_rows'] / r['all_rows']:.0f}%)"
        else:
            work = "–"
        rows.append(
            [
                str(r["batch"]),
                r["mode"],
                label,
                _fmt(lat * 1e3),
                _fmt(r["captions"] / lat),
                _fmt(r["peak_mib"], 4),
                f"{min(r['new_tokens'])}–{max(r['new_tokens'])}",
                work,
                *_vs_hf(r, hf, is_hf, "latency_s", lat),
            ]
        )
    out += _table(
        [
            "batch",
            "decoding",
            "implementation",
            "latency (ms)",
            "captions/s",
            "peak mem (MiB)",
            "new tokens",
            "decoder rows run",
            "speed vs HF",
            "memory vs HF",
        ],
        rows,
    )
    if mismatched:
        out += ["", f"Warning: the two sides returned different tokens ({'; '.join(mismatched)})."]
    return out


CURVES = [
    ("train_batch", "training step (s) vs batch size", "batch", "per sample"),
    ("train_len", "training step (s) vs caption length", "tokens", "per token"),
    ("gen_tokens", "generate (s) vs new tokens, greedy", "new tokens", "per token"),
    ("gen_beams", "generate (s) vs beams", "beams", "per beam"),
]


def _fit(points: list[list]) -> tuple[float, float] | None:
    pts = [(p[0], p[1]) for p in points if len(p) > 1 and p[1] is not None]
    if len(pts) < 2:
        return None
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, my - slope * mx


def _curve_context(report: dict[str, Any]) -> dict[str, str]:
    s = report["suite_settings"]
    return {
        "train_batch": f"captions of {s['caption_len']} tokens",
        "train_len": f"batch {s['scale_caption_batch']}",
        "gen_tokens": f"batch {s['scale_gen_batch']}",
        "gen_beams": f"batch {s['scale_gen_batch']}, {s['new_tokens']} new tokens",
    }


def render_scaling(report: dict[str, Any]) -> list[str]:
    scale = report["scale"]
    context = _curve_context(report)
    rows = []
    for key, title, _, unit in CURVES:
        ours, hf = scale.get("ours", {}), scale.get("hf", {})
        if "error" in ours or "error" in hf:
            continue
        pts_o = {p[0]: p[1] for p in ours.get(key, [])}
        pts_h = {p[0]: p[1] for p in hf.get(key, [])}
        xs = sorted(set(pts_o) | set(pts_h))
        if not xs:
            continue
        cells = ", ".join(f"{x}: {_fmt(pts_o.get(x))} / {_fmt(pts_h.get(x))}" for x in xs)
        fits = []
        for name, pts in (("ours", ours.get(key, [])), ("HF", hf.get(key, []))):
            f = _fit(pts)
            fits.append(f"{name} {_fmt(f[0] * 1e3)} ms {unit} + {_fmt(f[1] * 1e3)} ms" if f else f"{name} –")
        rows.append([f"{title} ({context[key]})", cells, "; ".join(fits)])
    errors = [f"{lib}: {v['error']}" for lib, v in scale.items() if "error" in v]
    lines = _table(["curve", "x: blip_peft / transformers", "line fit"], rows)
    if errors:
        lines += ["", "Scaling runs failed: " + "; ".join(errors)]
    return lines


def plot_scaling(report: dict[str, Any], path: Path) -> bool:
    scale = report.get("scale") or {}
    if not scale or all("error" in v for v in scale.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    context = _curve_context(report)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for ax, (key, title, xlabel, _) in zip(axes.flat, CURVES, strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for lib, style, label in (("ours", "o-", "blip_peft"), ("hf", "s--", "transformers + peft")):
            pts = [p for p in scale.get(lib, {}).get(key, []) if len(p) > 1 and p[1] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_title(f"{title}\n({context[key]})", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    info = report["info"]
    fig.suptitle(f"{report['suite']} suite, {info['device_name']}, {report['dtype']} ({report['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def _git_head() -> str | None:
    """The commit checked out (read from .git; git itself is not run). In a worktree `.git` is a file naming the
    worktree's git folder, whose branch refs live in the shared folder."""
    try:
        git = REPO_DIR / ".git"
        if git.is_file():
            git = (REPO_DIR / git.read_text().split("gitdir:", 1)[1].strip()).resolve()
        common = git / (git / "commondir").read_text().strip() if (git / "commondir").exists() else git
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            for folder in (git, common):
                if (folder / ref).exists():
                    return (folder / ref).read_text().strip()[:10]
            packed = common / "packed-refs"
            for line in packed.read_text().splitlines() if packed.exists() else []:
                if line.endswith(" " + ref):
                    return line.split()[0][:10]
            return None
        return head[:10]
    except (OSError, IndexError):
        return None


RESULTS_HEADER = """# Benchmark results

Written by `python bench/compare.py --suite <cpu|gpu> --write-results [--note "..."]`: one section per (suite,
machine), replaced when the suite runs again on that machine. Each section names the device, the versions and the
date, and says what moved the numbers since the previous run. Ratios ("speed vs HF": transformers' time ÷ ours;
"memory vs HF": our peak ÷ transformers' peak) compare both sides measured in the same run on the same machine;
see bench/README.md for the method.
"""


def _raw_path(suite: str, device: str) -> Path:
    return BENCH_DIR / "results" / f"{suite}-{_slug(device)}.json"


def save_report(report: dict[str, Any], note: str, partial: bool) -> dict[str, Any]:
    """Keeps the raw report in bench/results/; a partial run (`--only ...`) replaces just the parts it measured,
    each part keeping the date and machine floors of the run that measured it."""
    report = dict(report, commit=_git_head())
    raw = _raw_path(report["suite"], report["info"]["device_name"])
    measured = [s for s in SECTIONS if s in report]
    if partial and raw.exists():
        old = json.loads(raw.read_text())
        merged = dict(old, info=report["info"], date=report["date"], suite_settings=report["suite_settings"])
        merged["commit"] = report["commit"]
        merged["note"] = note or old.get("note", "")
        dates = dict(old.get("section_dates", {}))
        infos = dict(old.get("section_info", {}))
        for section in SECTIONS:
            if section in old and section not in infos:
                infos[section] = old["info"]
            if section in old and section not in dates:
                dates[section] = old["date"]
        for section in measured:
            merged[section] = report[section]
            dates[section] = report["date"]
            infos[section] = report["info"]
        merged["section_dates"], merged["section_info"] = dates, infos
        report = merged
    else:
        report["note"] = note
        report["section_dates"] = {s: report["date"] for s in measured}
    raw.parent.mkdir(exist_ok=True)
    raw.write_text(json.dumps(report, indent=1) + "\n")
    return report


def write_section(report: dict[str, Any]) -> Path:
    """Replaces (or appends) this (suite, device) section of RESULTS.md and its scaling-curve PNG."""
    device = report["info"]["device_name"]
    key = f"{report['suite']} | {device}"
    lines = render(report)
    png = BENCH_DIR / f"scaling-{report['suite']}-{_slug(device)}.png"
    has_png = plot_scaling(report, png)
    dates = report.get("section_dates", {})
    distinct = sorted(set(dates.values()))
    if len(distinct) > 1:
        when = "; ".join(f"{', '.join(s for s in SECTIONS if dates.get(s) == d)} on {d}" for d in distinct)
    else:
        when = report["date"]
    commit = report.get("commit")
    body = [
        f"<!-- bench:begin {key} -->",
        f"## `{report['suite']}` suite on {device}",
        "",
        f"Measured {when}" + (f" (last run at commit {commit})" if commit else "") + ".",
        "",
        f"**What moved the numbers**: {report.get('note') or '(not stated; rerun with --note)'}",
        "",
        *lines,
    ]
    if has_png:
        body += ["", f"![scaling curves, {key}]({png.name})"]
    body += [f"<!-- bench:end {key} -->"]
    text = RESULTS_FILE.read_text() if RESULTS_FILE.exists() else RESULTS_HEADER
    pattern = re.compile(
        rf"<!-- bench:begin {re.escape(key)} -->.*?<!-- bench:end {re.escape(key)} -->", flags=re.DOTALL
    )
    block = "\n".join(body)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS_FILE.write_text(text)
    return RESULTS_FILE
