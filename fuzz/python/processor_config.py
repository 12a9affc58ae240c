"""atheris (libFuzzer for Python) target: the processor's config files, `preprocessor_config.json` (older
layout) and `processor_config.json` (transformers 5 layout, the `image_processor` entry), as
`BlipImageProcessor.from_pretrained` reads them, then one small image through the loaded processor. Any
bytes must give a processor or a clear exception (ValueError, TypeError, FileNotFoundError, MemoryError);
anything else (KeyError, AttributeError, OverflowError, a panic...) is a crash.

    PYTHONPATH=python:<atheris> python fuzz/python/processor_config.py fuzz/work/processor_config_py \
        fuzz/corpus/processor_config_json -runs=1000000

The settings themselves are read by the core, fuzzed by the cargo-fuzz target `processor_config_json` at
libFuzzer's speed; this target checks the Python layer around it."""

from __future__ import annotations

import json
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    import numpy as np

    import blip_peft as bp

FOLDER = tempfile.mkdtemp(prefix="blip_peft_fuzz_processor_", dir=os.environ.get("FUZZ_TMP"))
IMAGE = np.full((7, 5, 3), 100, dtype=np.uint8)
CLEAR = (ValueError, TypeError, FileNotFoundError, MemoryError)


def test_one_input(data: bytes) -> None:
    layout = "processor_config.json" if data[:1] == b"P" else "preprocessor_config.json"
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = os.path.join(FOLDER, name)
        if os.path.exists(path):
            os.remove(path)
    with open(os.path.join(FOLDER, layout), "wb") as f:
        f.write(data[1:] if layout == "processor_config.json" else data)
    try:
        processor = bp.BlipImageProcessor.from_pretrained(FOLDER)
    except CLEAR:
        return
    size = processor.size
    if isinstance(size, dict) and all(isinstance(v, int) and 0 < v <= 512 for v in size.values()):
        try:
            processor(IMAGE, return_tensors="np")
        except CLEAR:
            pass
    json.dumps(processor.to_dict())


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
