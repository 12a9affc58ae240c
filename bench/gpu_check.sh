#!/usr/bin/env bash
# The one prepared script for the GPU machine (see ../shared/GPU.md): CUDA tests, the side-by-side GPU suite
# and the profiles, with every log kept under $OUT (or bench/gpu-logs). Carry the built module
# (python/blip_peft/_blip_peft.abi3.so) with the working tree; torch, transformers and peft are on the machine.
# Each stage is time-boxed (seconds: GPU_TESTS_S, GPU_PROFILE_S, GPU_SUITE_S) so that a lease of ~15 minutes,
# machine start included, always gets every stage's log back, even when one of them hangs or runs long.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS="${OUT:-bench/gpu-logs}"
mkdir -p "$LOGS"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
stage() { echo "--- $1 ($(date -u +%T))"; }

stage env
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import sys, torch, transformers, peft; print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name(0))"
  python3 -c "import torch, blip_peft; print('blip_peft sees CUDA:', blip_peft._blip_peft.cuda_is_available())"
} 2>&1 | tee "$LOGS/env.txt"

stage "CUDA tests"
timeout "${GPU_TESTS_S:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 \
  | tee "$LOGS/gpu-tests.txt"

stage "profiles"
timeout "${GPU_PROFILE_S:-90}" python3 bench/profile_step.py --device cuda --dtype bfloat16 --out "$LOGS/profiles" \
  2>&1 | tee "$LOGS/profile.txt"

stage "side-by-side suite"
timeout "${GPU_SUITE_S:-240}" python3 bench/compare.py --suite gpu --only train,generate --job-timeout 100 \
  --json "$LOGS/gpu-suite.json" 2>&1 | tee "$LOGS/gpu-suite.txt"

stage summary
grep -E "passed|failed|error" "$LOGS/gpu-tests.txt" | tail -n 3
tail -n 40 "$LOGS/gpu-suite.txt"
