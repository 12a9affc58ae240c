"""blip_peft: fine-tune BLIP image captioning with LoRA and generate captions, fast.

The API mirrors transformers + peft; the work runs in a Rust core on libtorch.
"""

# ruff: noqa: E402  (the imports below must follow the CPU capability cap and torch)

# The CPU capability cap (if any) goes to torch, MKL and oneDNN before they choose their code.
from blip_peft import _cpu_capability

_cpu_capability.apply()

# torch must be imported next: it loads the libtorch libraries the native module links against.
import torch  # noqa: F401, I001

_cpu_capability.check()

from blip_peft import _blip_peft, distributed, metrics  # noqa: I001
from blip_peft._cpu_capability import cpu_has_bf16
from blip_peft._blip_peft import BlipPeftError, BlipPeftInternalError
from blip_peft.configuration import BlipConfig
from blip_peft.answering import answer
from blip_peft.captioning import generate
from blip_peft.evaluation import evaluate
from blip_peft.data import ImageCaptionDataset
from blip_peft.demo import bundled_model_path
from blip_peft.training import TrainResult, flush_denormals, train
from blip_peft.processing import (
    AutoProcessor,
    BatchEncoding,
    BlipImageProcessor,
    BlipProcessor,
    BlipTokenizer,
)
from blip_peft.peft_model import (
    LoraConfig,
    LoraModel,
    PeftConfig,
    PeftModel,
    get_peft_model,
    hotswap_adapter,
    lora_targets,
)
from blip_peft.modeling import (
    AutoModelForImageTextToText,
    AutoModelForVision2Seq,
    BlipForConditionalGeneration,
    BlipForConditionalGenerationModelOutput,
    ModelOutput,
)
from blip_peft.modeling_vqa import (
    AutoModelForVisualQuestionAnswering,
    BlipForQuestionAnswering,
    BlipTextVisionModelOutput,
)
from blip_peft.generation import GenerationConfig
from blip_peft.modeling_retrieval import (
    BlipForImageTextRetrieval,
    BlipImageTextMatchingModelOutput,
    RetrievalLossOutput,
)
from blip_peft.retrieval import RankResult, RetrievalTrainResult, rank, train_retrieval

__version__: str = _blip_peft.__version__

__all__ = [
    "answer",
    "cpu_has_bf16",
    "evaluate",
    "flush_denormals",
    "AutoModelForImageTextToText",
    "AutoModelForVision2Seq",
    "AutoModelForVisualQuestionAnswering",
    "AutoProcessor",
    "BatchEncoding",
    "BlipConfig",
    "BlipForConditionalGeneration",
    "BlipForConditionalGenerationModelOutput",
    "BlipForQuestionAnswering",
    "BlipTextVisionModelOutput",
    "BlipForImageTextRetrieval",
    "BlipImageTextMatchingModelOutput",
    "RankResult",
    "RetrievalLossOutput",
    "rank",
    "RetrievalTrainResult",
    "train_retrieval",
    "GenerationConfig",
    "ModelOutput",
    "BlipImageProcessor",
    "BlipPeftError",
    "BlipPeftInternalError",
    "ImageCaptionDataset",
    "TrainResult",
    "train",
    "BlipProcessor",
    "BlipTokenizer",
    "LoraConfig",
    "LoraModel",
    "PeftConfig",
    "PeftModel",
    "get_peft_model",
    "hotswap_adapter",
    "lora_targets",
    "__version__",
    "bundled_model_path",
    "distributed",
    "metrics",
    "generate",
]
