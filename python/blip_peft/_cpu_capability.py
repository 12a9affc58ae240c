"""`BLIP_PEFT_CPU_CAPABILITY`: run the code an older x86 CPU runs, torch's and ours alike.

torch (`ATEN_CPU_CAPABILITY`), MKL, oneDNN and our own kernels each pick their code for the CPU they find, so
one machine only ever exercises one set of paths. With `BLIP_PEFT_CPU_CAPABILITY=avx2` in the environment
before Python starts, a machine with AVX-512 runs what an AVX2-only machine runs: this module passes the cap on
to the three libraries before any of them has chosen (each reads its variable at its first use, so setting it
from `import blip_peft` still works when `torch` was imported first, as long as it computed nothing yet), and
the native core reads the same variable for its kernels. `make test` runs the instruction-set-dependent tests
a second time this way.
"""

from __future__ import annotations

import os

ENV = "BLIP_PEFT_CPU_CAPABILITY"

# What each library is told for each cap (torch's names for the paths; MKL's and oneDNN's for theirs). oneDNN
# capped at AVX2 reports no bfloat16 support, so torch takes the bf16 matmul path an AVX2-only CPU takes.
_LIBRARY_SETTINGS = {
    "avx512": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
_ORDER = ["default", "avx2", "avx512"]


def requested() -> str | None:
    """The cap asked for in the environment (lower case), or None; a ValueError for a name we do not know."""
    value = os.environ.get(ENV)
    if value is None or not value.strip():
        return None
    name = value.strip().lower()
    if name not in _LIBRARY_SETTINGS:
        raise ValueError(f"{ENV}={value!r} is not a CPU capability: use one of {', '.join(_ORDER)} (or unset it)")
    return name


def apply() -> None:
    """Pass the requested cap on to torch, MKL and oneDNN (a variable the user set already is left alone)."""
    name = requested()
    if name is not None:
        for key, setting in _LIBRARY_SETTINGS[name].items():
            os.environ.setdefault(key, setting)


def check() -> None:
    """After torch is loaded: refuse to run on a higher path than asked for (torch had already chosen)."""
    import torch

    name = requested()
    if name is None:
        return
    chosen = torch.backends.cpu.get_cpu_capability().lower()
    chosen = "avx512" if chosen.startswith("avx512") else chosen
    if chosen in _ORDER and _ORDER.index(chosen) > _ORDER.index(name):
        raise RuntimeError(
            f"{ENV}={name} came too late: torch already runs its {chosen} code in this process. Set the variable "
            "in the environment before Python starts (e.g. `BLIP_PEFT_CPU_CAPABILITY=avx2 python -m pytest`)."
        )


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX-BF16, detected with cpuid) and
    `BLIP_PEFT_CPU_CAPABILITY` leaves torch's libraries at AVX-512: where ``train(mixed_precision="bf16")`` and
    ``torch.autocast("cpu", torch.bfloat16)`` run bf16 matmuls instead of converting to float32.
    `blip_peft._blip_peft.cpu_bf16_support()` says which of the two the CPU has."""
    from blip_peft import _blip_peft

    return bool(_blip_peft.cpu_bf16_support()["usable"])
