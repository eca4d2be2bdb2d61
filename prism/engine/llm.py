"""`LLM`: the offline API — prompts in, completions out."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prism.engine.engine import Engine, EngineConfig
from prism.engine.output import CompletionOutput
from prism.engine.sampling_params import SamplingParams
from prism.models.default import default_model_path


class LLM:
    """`LLM(model).generate(prompts, params)`; `model=None` is the embedded default."""

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        load_format: str = "auto",
        config: EngineConfig | None = None,
    ) -> None:
        source = model if model is not None else str(default_model_path())
        self.engine = Engine.create(
            source, device=device, dtype=dtype, config=config, load_format=load_format
        )

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        """Run every prompt to completion (continuous batching); outputs in prompt order."""
        batch: Sequence[str | list[int]]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            batch = [prompts]  # type: ignore[list-item]
        else:
            batch = prompts  # type: ignore[assignment]
        if params is None or isinstance(params, SamplingParams):
            per_prompt = [params or SamplingParams()] * len(batch)
        else:
            per_prompt = list(params)
        ids: list[str] = []
        try:
            for p, sp in zip(batch, per_prompt, strict=True):
                ids.append(self.engine.add_request(p, sp))
        except Exception:
            for request_id in ids:  # refuse the batch whole: nothing may outlive this call
                self.engine.abort(request_id)
            raise
        results: dict[str, CompletionOutput] = {}
        for request_id in ids:
            req = self.engine.request(request_id)
            assert req is not None
            results[request_id] = CompletionOutput(
                request_id, list(req.prompt_token_ids), [], "", None, 0
            )
        while self.engine.has_unfinished():
            for out in self.engine.step():
                done = results[out.request_id]
                done.token_ids += out.new_token_ids
                done.text += out.text_delta
                done.logprobs += out.logprobs
                if out.finished:
                    done.finish_reason = out.finish_reason
                    done.num_cached_tokens = out.num_cached_tokens
        return [results[i] for i in ids]

    def chat(
        self, messages: list[dict[str, str]], params: SamplingParams | None = None
    ) -> CompletionOutput:
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not tokenizer.has_chat_template:
            raise ValueError("this model has no chat template")
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        return self.generate([ids], params)[0]
