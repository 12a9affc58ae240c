"""BLIP_PEFT_CPU_CAPABILITY caps torch's, MKL's, oneDNN's and our own kernels' code path together, so one
machine can run what a machine with fewer instructions runs (`make test` reruns the `cpu_isa` tests with
`avx2`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import blip_peft as bp

ORDER = ["default", "avx2", "avx512"]

REPORT = (
    "import json, torch, blip_peft as bp; print(json.dumps({'torch': torch.backends.cpu.get_cpu_capability(), "
    "'onednn_bf16': torch.ops.mkldnn._is_mkldnn_bf16_supported(), **bp._blip_peft.kernel_code_paths()}))"
)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    caps = ("BLIP_PEFT_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
    environ = {k: v for k, v in os.environ.items() if k not in caps}
    return subprocess.run([sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True)


def _level(name: str) -> int:
    name = name.lower()
    return ORDER.index("avx512" if name.startswith("avx512") else name)


@pytest.mark.parametrize("cap", ["avx2", "default"])
def test_the_cap_reaches_torch_onednn_and_our_kernels(cap: str) -> None:
    run = _python(REPORT, BLIP_PEFT_CPU_CAPABILITY=cap.upper())  # any letter case
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen["cap"] == cap
    assert _level(seen["torch"]) <= _level(cap)
    assert not seen["onednn_bf16"]  # torch takes the bf16 matmul path of a CPU without AVX-512
    assert seen["decoding"] in ("torch", *ORDER[1 : _level(cap) + 1])
    assert _level(seen["resize"]) <= _level(cap)
    if cap == "default":
        assert seen["decoding"] == "torch" and seen["resize"] == "default"


def test_without_the_cap_everything_takes_the_best_path_the_cpu_has() -> None:
    run = _python(REPORT)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen["cap"] == "avx512"  # no cap
    if "avx512" in seen["torch"].lower():
        assert seen["decoding"] == "avx512"


def test_torchs_own_variable_caps_our_kernels_too() -> None:
    run = _python(REPORT, ATEN_CPU_CAPABILITY="avx2")
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen["cap"] == "avx2" and _level(seen["torch"]) <= 1 and seen["decoding"] != "avx512"


def test_an_unknown_name_is_a_clear_error() -> None:
    run = _python("import blip_peft", BLIP_PEFT_CPU_CAPABILITY="avx3")
    assert run.returncode != 0
    assert "ValueError: BLIP_PEFT_CPU_CAPABILITY='avx3' is not a CPU capability: use one of" in run.stderr


def test_a_cap_set_after_torch_chose_its_path_is_refused() -> None:
    code = (
        "import os, torch; chosen = torch.backends.cpu.get_cpu_capability()\n"
        "if 'AVX512' not in chosen: raise SystemExit(3)\n"
        "os.environ['BLIP_PEFT_CPU_CAPABILITY'] = 'avx2'; import blip_peft"
    )
    run = _python(code)
    if run.returncode == 3:
        pytest.skip("this CPU has no AVX-512, so torch's choice is already within the cap")
    assert run.returncode != 0
    assert "came too late: torch already runs its avx512 code" in run.stderr


@pytest.mark.cpu_isa
def test_this_process_runs_within_the_cap() -> None:
    """In `make test`'s second run (BLIP_PEFT_CPU_CAPABILITY=avx2) every library here is within the cap."""
    paths = bp._blip_peft.kernel_code_paths()
    cap = os.environ.get("BLIP_PEFT_CPU_CAPABILITY", "avx512").lower()
    assert paths["cap"] == cap
    assert _level(torch.backends.cpu.get_cpu_capability()) <= _level(cap)
    assert paths["decoding"] == "torch" or _level(paths["decoding"]) <= _level(cap)
    assert _level(paths["resize"]) <= _level(cap)
