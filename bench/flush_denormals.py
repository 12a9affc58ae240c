"""How much of the CPU training step goes to denormal floats, for transformers + peft and for our model in
the tutorial's torch loop, with and without flush-to-zero (FTZ/DAZ) on every thread.

`blip_peft.train` sets FTZ/DAZ on the calling thread and on libtorch's OpenMP threads while it runs (see
src/train/denormals.rs). `torch.set_flush_denormal(True)` alone only affects the calling thread; here the
FTZ rows also set it on each OpenMP thread (through libgomp's GOMP_parallel), so they show what the other two
implementations reach when they too avoid the denormal slow path. Real shapes, random weights, LoRA r=16
(dropout 0.05) on the attention and MLP layers of both towers, batch 2, 24 tokens, float32, AdamW + clipping.

    python bench/flush_denormals.py
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import ctypes, os, sys, time, warnings
    warnings.filterwarnings("ignore")
    import torch
    sys.path.insert(0, "bench")
    from shapes import CONFIGS, TARGET_MODULES
    import transformers
    transformers.logging.set_verbosity_error()
    impl, ftz = sys.argv[1], sys.argv[2] == "1"
    text, vision = CONFIGS["base"]
    config = transformers.BlipConfig(text_config=dict(text), vision_config=dict(vision))
    torch.manual_seed(0)
    lora = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGET_MODULES)
    if impl == "hf":
        import peft
        model = peft.get_peft_model(transformers.BlipForConditionalGeneration(config), peft.LoraConfig(**lora))
    else:
        import blip_peft as bp
        model = bp.get_peft_model(bp.BlipForConditionalGeneration.from_config(config.to_dict()), bp.LoraConfig(**lora))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5)
    g = torch.Generator().manual_seed(0)
    px = torch.randn(2, 3, 384, 384, generator=g)
    ids = torch.randint(1000, 30000, (2, 24), generator=g)
    def step():
        out = model(pixel_values=px, input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    if ftz:
        gomp = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1"))
        callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: torch.set_flush_denormal(True))
        torch.set_flush_denormal(True)
        gomp.GOMP_parallel(callback, None, 0, 0)
    step()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(min(times))
""")


def main() -> None:
    names = {"hf": "transformers + peft", "ours": "blip_peft + torch loop"}
    print("| implementation | FTZ/DAZ on every thread | s/step (best of 3) |")
    print("|---|---|---|")
    for impl in ("hf", "ours"):
        for ftz in (False, True):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, impl, "1" if ftz else "0"], check=True, capture_output=True, text=True
            ).stdout
            print(f"| {names[impl]} | {'yes' if ftz else 'no'} | {float(out.strip().splitlines()[-1]):.2f} |")


if __name__ == "__main__":
    main()
