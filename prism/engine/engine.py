"""`Engine`: one model served with continuous batching on an elastic KV cache.

`step()` is schedule → run → sample → postprocess. The device worker splits it in three
(`schedule`, `launch_step`, `complete_step`) to queue several models' steps on their own
CUDA streams before waiting for any. The engine does not know other models exist: it
asks its `ElasticKVCache` for blocks and reports what it holds.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from prism.engine.kv_manager import KVBlockManager
from prism.engine.model_runner import ModelRunner
from prism.engine.output import RequestOutput
from prism.engine.request import FinishReason, Request, RequestStatus, TokenLogprobs
from prism.engine.sampler import PendingSample, Sampler
from prism.engine.sampling_params import SamplingParams
from prism.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from prism.engine.stop_checker import StopChecker
from prism.kvcache import ElasticKVCache, KVCacheConfig
from prism.kvcache.victims import group_to_empty
from prism.memory import PagePool, make_vmm
from prism.models.attention import AttentionBackend
from prism.models.config import ModelConfig
from prism.models.llama import LlamaModel
from prism.models.loader import load_model
from prism.models.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class StepInFlight:
    """A launched step: the requests that sample a token, their draws on the device, and
    an event after the step's last kernel (CUDA). An `ahead` step was launched before
    the step it follows was read back (`EngineConfig.decode_ahead`): requests that end
    meanwhile keep their blocks in `hold` until it has run."""

    requests: list[Request]
    pending: PendingSample | None
    done: torch.cuda.Event | None
    ahead: bool = False
    hold: list[Request] = field(default_factory=list)

    def ready(self) -> bool:
        """Whether `complete_step` would return without waiting for the device."""
        return self.done is None or self.done.query()


@dataclass(frozen=True, slots=True)
class EngineConfig:
    name: str = "default"  # the model's name (its tenant name in the page pool)
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    kv_cache_bytes: int = 1 << 30  # the most KV memory this model may map
    prefix_caching: bool = True
    host_page_size: int = 64 << 10  # HostVMM page size on the CPU (CUDA uses 2 MiB)
    seed: int = 0  # for requests without their own seed
    # decode batch sizes captured as CUDA graphs (CUDA only); () runs every step eagerly
    cuda_graph_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    # token counts of steps with prefill chunks captured as CUDA graphs (CUDA only; those
    # above max_num_batched_tokens are dropped); () launches those steps layer by layer.
    # The graphs share one memory pool, as large as the biggest size's activations.
    # H200: a 1B model's 128-token prefill 5.9 -> 1.6 ms, an 8B's within 5%. Sizes are
    # 128 apart above 256, so a step pads by under 12% there: with powers of two an 8B's
    # 1,100-token step replayed the 2,048 graph, 43.2 ms against 26.4 ms eager.
    cuda_graph_tokens: tuple[int, ...] = (64, 128, 256, *range(384, 2049, 128))
    # `step()` launches the next decode step before reading back this one's tokens when
    # that step is certain (every running request decodes, nothing waits, no penalties or
    # logprobs), so the host's work for a step runs while the device computes the one
    # before; a request that stops meanwhile has one token computed for nothing.
    decode_ahead: bool = True
    # KV for a request's whole prompt at admission (`SchedulerConfig.reserve_prompt`)
    reserve_prompt: bool = True

    @property
    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(
            self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len,
            self.reserve_prompt,
        )  # fmt: skip


class Engine:
    def __init__(
        self,
        model: LlamaModel,
        tokenizer: Tokenizer | None,
        kv_cache: ElasticKVCache,
        config: EngineConfig,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.kv_cache = kv_cache
        self.config = config
        self.kv = KVBlockManager(kv_cache, config.block_size, prefix_caching=config.prefix_caching)
        if config.prefix_caching:  # other models' growth may take whole groups of prefixes
            kv_cache.prefix_cache = self.kv
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.runner = ModelRunner(
            model, kv_cache.kv_caches, config.block_size, config.max_model_len
        )
        self.sampler = Sampler(config.seed)
        self.eos_ids = set(model.config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self._requests: dict[str, Request] = {}
        self._text: dict[str, StopChecker] = {}
        self._ids = itertools.count()
        self._ahead: StepInFlight | None = None  # a decode step launched ahead (`step()`)
        self._carry: list[RequestOutput] = []  # its outputs, when read back outside `step()`
        capacity = kv_cache.max_tokens_held
        if config.max_model_len > capacity:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the KV cache's "
                f"{capacity} tokens; raise kv_cache_bytes or lower max_model_len"
            )
        if any(t < 2 for t in config.cuda_graph_tokens):
            raise ValueError(f"cuda_graph_tokens {config.cuda_graph_tokens} must be 2 or more")
        tokens = [t for t in config.cuda_graph_tokens if t <= config.max_num_batched_tokens]
        self.runner.capture(
            [s for s in config.cuda_graph_sizes if s <= config.max_num_seqs],
            tokens,
            config.max_num_seqs,
        )

    @classmethod
    def create(
        cls,
        source: str | ModelConfig,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        config: EngineConfig | None = None,
        pool: PagePool | None = None,
        load_format: str = "auto",
        attention: AttentionBackend | None = None,
    ) -> Engine:
        """Load a model (HF directory, GGUF file or preset name with load_format="dummy")
        and give it an elastic KV cache in `pool` (a private pool if None)."""
        config = config or EngineConfig()
        dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
        if attention is None and device.startswith("cuda"):
            from prism.models.triton_attention import TritonAttention

            attention = TritonAttention()
        loaded = load_model(
            source,
            dtype=dtype,
            device=device,
            load_format=load_format,  # type: ignore[arg-type]
            attention=attention,
        )
        if pool is None:
            page = config.host_page_size if device == "cpu" else None
            pool = PagePool(make_vmm(device, page), config.kv_cache_bytes)
        mc = loaded.config
        kv_config = KVCacheConfig(
            name=config.name,
            num_layers=mc.num_layers,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            block_size=config.block_size,
            dtype=dtype,
            max_tokens=config.kv_cache_bytes
            // (2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * dtype.itemsize),
            max_pages=config.kv_cache_bytes // pool.page_size,
        )
        return cls(loaded.model, loaded.tokenizer, ElasticKVCache(kv_config, pool), config)

    # ---- requests --------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a request; `arrival_time` (time.monotonic) when it arrived before now
        (held while its model woke, say): deadlines and first-come order count from it."""
        params = params or SamplingParams()
        ids = self._tokenize(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        limit = self.config.max_model_len
        if len(ids) >= limit:
            raise ValueError(
                f"prompt has {len(ids)} tokens; this model takes at most {limit - 1} "
                f"(max_model_len {limit} includes at least one output token)"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = Request(request_id, ids, params)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        if params.seed is not None:
            req.generator = torch.Generator(device=self.model.device)
            req.generator.manual_seed(params.seed)
        self._requests[request_id] = req
        if self.tokenizer is not None:
            self._text[request_id] = StopChecker(self.tokenizer, ids, params)
        self.scheduler.add(req)
        return request_id

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; None if it is not known."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        output = self._finish(req, FinishReason.ABORT, [], [])
        self._drop_unwanted_ahead()
        return output

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._carry)

    def release_memory(self, pages: int) -> int:
        """Give KV pages back to the pool for another model: cached prefixes first, then
        running requests are preempted (by recompute) a page group at a time — the owners
        of the group that costs the least recompute to empty (`group_to_empty`). Returns
        pages freed."""
        self._drain_ahead()  # no block of a step still running may move
        self.kv.reset_prefix_cache()
        released = self.kv_cache.trim(0)
        while released < pages:
            victims = self._cheapest_group_owners()
            if not victims:
                break
            for req in victims:
                self.scheduler.preempt(req)
            self.kv.reset_prefix_cache()  # the victims' full blocks went to the prefix cache
            released += self.kv_cache.trim(0)
        return released

    def _cheapest_group_owners(self) -> list[Request]:
        running = {req.request_id: req for req in self.scheduler.running}
        blocks = {rid: req.block_ids for rid, req in running.items()}
        return [running[rid] for rid in group_to_empty(blocks, self.kv_cache.blocks_per_group)]

    def request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # ---- the step ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One whole step: schedule, run, sample, postprocess (waits for the device).
        While the device runs it, the KV cache's warm reserve is mapped up again, so the
        next steps' growth takes mapped pages instead of driver calls (a worker does the
        same for all its models: `PagePool.refill_reserves`). With `decode_ahead`, the
        next decode step is launched before this one is read back (see `_launch_ahead`);
        the next call then starts from it instead of scheduling."""
        if self._ahead is not None:
            step: StepInFlight | None = self._ahead
            self._ahead = None
        else:
            step = self.launch_step(self.schedule())
        if self.config.decode_ahead:
            self._ahead = self._launch_ahead(step)
        self.kv_cache.refill_reserve()
        outputs = self._carry + self.complete_step(step)
        self._carry = []
        self._drop_unwanted_ahead()
        return outputs

    def _launch_ahead(self, step: StepInFlight | None) -> StepInFlight | None:
        """The decode step after `step`, launched before `step`'s tokens are read back, if
        it is certain: `step` sampled every running request, none of its tokens can be
        the last by length, nothing waits to be admitted, and no request needs its own
        history on the host to sample (penalties) or its logits kept (logprobs). Each
        request's newest token is taken on the device from `step`'s draws."""
        if step is None or step.pending is None or self.scheduler.waiting:
            return None
        requests = step.requests
        running = self.scheduler.running
        if len(requests) != len(running):
            return None
        members = {r.request_id for r in requests}
        limit = self.config.max_model_len
        for req in running:
            p = req.params
            if (
                req.request_id not in members
                or req.num_computed_tokens != req.num_tokens
                or req.num_output_tokens + 1 >= p.max_tokens
                or req.num_tokens + 1 >= limit
                or p.logprobs is not None
                or self.sampler.uses_history(req)
            ):
                return None
        for req in requests:  # a slot for the position the token being drawn will take
            if not self.kv.allocate(req, 1):
                return None
        logits = self.runner.execute_ahead(requests, step.pending.tokens)
        for req in requests:
            req.num_computed_tokens += 1  # its blocks are published when its token is known
        pending = self.sampler.launch(logits, requests)
        return StepInFlight(list(requests), pending, self._done_event(), ahead=True)

    def _drop_unwanted_ahead(self) -> None:
        """Every request of the step ahead has ended (stopped or aborted): nothing it
        computes is wanted, so wait for it now and let its blocks go."""
        if self._ahead is not None and all(r.is_finished for r in self._ahead.requests):
            self._drain_ahead()

    def _drain_ahead(self) -> None:
        """Wait for a step launched ahead and keep its outputs for the next `step()`."""
        if self._ahead is not None:
            step, self._ahead = self._ahead, None
            self._carry += self.complete_step(step)

    def schedule(self) -> ScheduledBatch:
        """Choose this step's requests and give them KV blocks. Every memory change of the
        step (allocation, preemption, reclaim from others) happens here."""
        return self.scheduler.schedule()

    def launch_step(self, batch: ScheduledBatch) -> StepInFlight | None:
        """Queue `batch`'s forward and sampling on the current stream and return without
        waiting for the device; `complete_step` waits and makes the outputs. Between the
        two, the batch's blocks must stay as they are (no preemption, no unmapping)."""
        if not batch:
            return None
        logits, rows = self.runner.execute(batch)
        self._advance(batch)
        sampled = [batch.requests[i] for i in rows]
        pending = self.sampler.launch(logits, sampled) if sampled else None
        return StepInFlight(sampled, pending, self._done_event())

    def _done_event(self) -> torch.cuda.Event | None:
        """An event after what has been queued so far on the current stream (CUDA)."""
        if self.runner.device.type != "cuda":
            return None
        done = torch.cuda.Event()
        done.record()
        return done

    def complete_step(self, step: StepInFlight | None) -> list[RequestOutput]:
        if step is None:
            return []
        if step.done is not None:
            step.done.synchronize()  # whatever stream the step was launched on
        for req in step.hold:  # ended while this step ran: its blocks are free now
            self.kv.free(req)
        if step.pending is None:
            return []
        result = self.sampler.collect(step.pending, step.requests)
        outputs = []
        for req, token, lp in zip(step.requests, result.token_ids, result.logprobs, strict=True):
            if req.is_finished:
                continue  # stopped or aborted after this step was launched ahead
            outputs.append(self._append(req, token, lp, commit=step.ahead))
        return outputs

    def _advance(self, batch: ScheduledBatch) -> None:
        for req, count in zip(batch.requests, batch.num_tokens, strict=True):
            req.num_computed_tokens += count
            self.kv.commit(req)

    def _append(
        self, req: Request, token: int, logprobs: TokenLogprobs | None, *, commit: bool = False
    ) -> RequestOutput:
        req.token_ids.append(token)
        if commit:  # a step launched ahead publishes its blocks once their tokens are known
            self.kv.commit(req)
        new_logprobs = [logprobs] if logprobs is not None else []
        req.logprobs += new_logprobs
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        reason = self._finish_reason(req, token)
        if reason is not None:
            return self._finish(req, reason, [token], new_logprobs)
        text = self._text.get(req.request_id)
        delta = text.release(finished=False) if text else ""
        return self._output(req, [token], delta, new_logprobs)

    def _finish_reason(self, req: Request, token: int) -> FinishReason | None:
        p = req.params
        if token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            return FinishReason.STOP
        text = self._text.get(req.request_id)
        if text is not None and text.add(token):
            return FinishReason.STOP
        if req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(
        self, req: Request, reason: FinishReason, tokens: list[int], logprobs: list[TokenLogprobs]
    ) -> RequestOutput:
        if req.status is not RequestStatus.FINISHED:
            ahead = self._ahead
            if ahead is not None and any(r is req for r in ahead.requests):
                self.scheduler.finish(req, free=False)  # the step ahead still writes its KV
                ahead.hold.append(req)
            else:
                self.scheduler.finish(req)
        req.finish_reason = reason
        text = self._text.pop(req.request_id, None)
        delta = text.release(finished=True) if text else ""
        self._requests.pop(req.request_id, None)
        return self._output(req, tokens, delta, logprobs)

    @staticmethod
    def _output(
        req: Request, tokens: list[int], delta: str, logprobs: list[TokenLogprobs]
    ) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=tokens,
            text_delta=delta,
            finished=req.is_finished,
            finish_reason=req.finish_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_tokens,
            logprobs=logprobs,
        )

    def close(self) -> None:
        self._drain_ahead()
        self._carry = []  # nobody steps a closed engine: its outputs go with it
        for request_id in list(self._requests):
            self.abort(request_id)
        self.kv.reset_prefix_cache()
        self.kv_cache.close()
