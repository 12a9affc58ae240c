import torch  # noqa: F401  (loads libtorch before the native module)
from blip_peft._blip_peft import _BlipModel
