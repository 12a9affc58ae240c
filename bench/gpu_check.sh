#!/usr/bin/env bash
# The one prepared script for the GPU machine (see ../shared/GPU.md): CUDA tests, the side-by-side GPU suite
# and the profiles, with every log kept under $OUT (or bench/gpu-logs). Carry the built module
# (python/blip_peft/_blip_peft.abi3.so) with the working tree; torch, transformers and peft are on the machine.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS="${OUT:-bench/gpu-logs}"
mkdir -p "$LOGS"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, blip_peft; print(torch.__version__, torch.cuda.get_device_name(0), blip_peft._blip_peft.cuda_is_available())" 2>&1 | tee "$LOGS/env.txt"
python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$LOGS/gpu-tests.txt"
python3 bench/profile_step.py --device cuda --dtype bfloat16 --out "$LOGS/profiles" 2>&1 | tee "$LOGS/profile.txt"
python3 bench/compare.py --suite gpu --only train,generate --json "$LOGS/gpu-suite.json" 2>&1 | tee "$LOGS/gpu-suite.txt"
echo "--- summary"; tail -n 3 "$LOGS/gpu-tests.txt"; tail -n 40 "$LOGS/gpu-suite.txt"
