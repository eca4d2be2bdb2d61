"""One model's inference engine: requests, continuous batching, model runner, sampler."""

from prism.engine.engine import Engine, EngineConfig
from prism.engine.llm import LLM
from prism.engine.output import CompletionOutput, RequestOutput
from prism.engine.request import FinishReason, Request, RequestStatus
from prism.engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "Engine",
    "EngineConfig",
    "FinishReason",
    "Request",
    "RequestOutput",
    "RequestStatus",
    "SamplingParams",
]
