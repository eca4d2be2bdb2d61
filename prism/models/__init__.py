"""Model code and weight loading for the Llama family (Llama, Mistral, Qwen2, Qwen3)."""

from prism.models.attention import AttentionBackend, AttentionMetadata, KVCache, write_kv_cache
from prism.models.chat_template import ChatTemplate, ChatTemplateError
from prism.models.checkpoint import Checkpoint, LoadFormat, open_checkpoint
from prism.models.config import ModelConfig, RopeScaling
from prism.models.default import default_model_path
from prism.models.detokenizer import IncrementalDetokenizer
from prism.models.llama import LlamaModel
from prism.models.loader import LoadedModel, load_model
from prism.models.presets import PRESETS
from prism.models.tokenizer import Tokenizer
from prism.models.torch_attention import TorchAttention
from prism.models.weights import (
    WeightLoadError,
    WeightSpec,
    allocate_weights,
    copy_weights,
    init_dummy_weights,
    weight_specs,
)

__all__ = [
    "PRESETS",
    "AttentionBackend",
    "AttentionMetadata",
    "ChatTemplate",
    "ChatTemplateError",
    "Checkpoint",
    "IncrementalDetokenizer",
    "KVCache",
    "LlamaModel",
    "LoadFormat",
    "LoadedModel",
    "ModelConfig",
    "RopeScaling",
    "Tokenizer",
    "TorchAttention",
    "WeightLoadError",
    "WeightSpec",
    "allocate_weights",
    "copy_weights",
    "default_model_path",
    "init_dummy_weights",
    "load_model",
    "open_checkpoint",
    "weight_specs",
    "write_kv_cache",
]
