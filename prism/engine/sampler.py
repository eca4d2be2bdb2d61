"""`Sampler`: logits of the requests that sample this step → their next tokens.

Order, as the big engines apply it: penalties (repetition on the whole sequence,
frequency and presence on the output) → temperature → min-p → top-k → top-p → a draw.
Greedy rows take the argmax of the penalised logits. Seeded requests draw from their
own generator, so their output does not depend on what else is in the batch. Logprobs
are those of the model's raw distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prism.engine.request import Request, TokenLogprobs


@dataclass(frozen=True, slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


@dataclass(frozen=True, slots=True)
class PendingSample:
    """Tokens drawn on the device, not yet read back."""

    tokens: torch.Tensor  # [N] int64, on the device
    raw: torch.Tensor  # [N, V] float32: the model's logits, for logprobs
    host: torch.Tensor  # [N] int64: `tokens` copied to (pinned) host memory, in stream order
    ready: torch.cuda.Event | None  # recorded after that copy (CUDA)

    @classmethod
    def of(cls, tokens: torch.Tensor, raw: torch.Tensor) -> PendingSample:
        """Queue the copy of `tokens` to the host right behind their draw. Reading them
        back later waits for this copy only: a `tolist()` on the device tensor would
        queue its copy behind whatever was launched since (a decode step ahead) and
        wait for that too."""
        if not tokens.is_cuda:
            return cls(tokens, raw, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(tokens, raw, host, ready)


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> SampleResult:
        """logits: [N, V] (any float dtype) for requests[i] → one token each."""
        return self.collect(self.launch(logits, requests), requests)

    def launch(self, logits: torch.Tensor, requests: Sequence[Request]) -> PendingSample:
        """Queue the draws on the current stream; nothing waits for the device."""
        logits = logits.float()
        raw = logits
        logits = self._apply_penalties(logits, requests)
        greedy = [i for i, r in enumerate(requests) if r.params.greedy]
        if len(greedy) == len(requests):
            return PendingSample.of(logits.argmax(dim=-1), raw)
        tokens = torch.empty(len(requests), dtype=torch.long, device=logits.device)
        if greedy:
            rows = torch.tensor(greedy, device=logits.device)
            tokens[rows] = logits[rows].argmax(dim=-1)
        for i, req in enumerate(requests):
            if not req.params.greedy:
                tokens[i] = self._draw(logits[i], req)
        return PendingSample.of(tokens, raw)

    @staticmethod
    def uses_history(req: Request) -> bool:
        """Whether drawing `req`'s next token reads its tokens so far (penalties)."""
        p = req.params
        return p.repetition_penalty != 1.0 or bool(p.frequency_penalty or p.presence_penalty)

    def collect(self, pending: PendingSample, requests: Sequence[Request]) -> SampleResult:
        """Read the tokens back (this waits for their copy) and the logprobs asked for."""
        if pending.ready is not None:
            pending.ready.synchronize()
        token_list = pending.host.tolist()
        return SampleResult(token_list, self._logprobs(pending.raw, requests, token_list))

    # ---- steps ---------------------------------------------------------------------------

    def _apply_penalties(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        rows = [
            i
            for i, r in enumerate(requests)
            if r.params.repetition_penalty != 1.0
            or r.params.frequency_penalty
            or r.params.presence_penalty
        ]
        if not rows:
            return logits
        logits = logits.clone()
        vocab = logits.shape[-1]
        for i in rows:
            p = requests[i].params
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(requests[i].token_ids)), device=row.device)
                seen = seen[seen < vocab]
                vals = row[seen]
                row[seen] = torch.where(
                    vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
                )
            output = requests[i].output_token_ids
            if output and (p.frequency_penalty or p.presence_penalty):
                counts = torch.bincount(torch.tensor(output, device=row.device), minlength=vocab)[
                    :vocab
                ].to(row.dtype)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        return logits

    def _draw(self, row: torch.Tensor, req: Request) -> torch.Tensor:
        """One token from row [V] under req's temperature, min-p, top-k and top-p. Every
        valid parameter gives a distribution: logits are shifted so the largest is 0
        before dividing by the temperature (no overflow however small it is), a penalty
        that overflowed counts as -inf/+max, and top-p always keeps the top token."""
        p = req.params
        row = torch.nan_to_num(row, nan=-torch.inf, posinf=torch.finfo(row.dtype).max)
        probs = torch.softmax((row - row.max()) / p.temperature, dim=-1)
        if p.min_p > 0.0:
            probs = torch.where(probs < p.min_p * probs.max(), 0.0, probs)
        if p.top_k > 0 and p.top_k < probs.shape[-1]:
            kth = torch.topk(probs, p.top_k).values[-1]
            probs = torch.where(probs < kth, 0.0, probs)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            mass_before = sorted_probs.cumsum(-1) - sorted_probs
            cut = mass_before >= p.top_p * sorted_probs.sum()
            cut[0] = False  # the top token is always in the nucleus
            sorted_probs[cut] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        generator = req.generator or self._generator(row.device)
        return torch.multinomial(probs, 1, generator=generator)[0]

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            self._generators[device] = gen
        return self._generators[device]

    @staticmethod
    def _logprobs(
        raw: torch.Tensor, requests: Sequence[Request], tokens: list[int]
    ) -> list[TokenLogprobs | None]:
        wanted = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        out: list[TokenLogprobs | None] = [None] * len(requests)
        if not wanted:
            return out
        logprobs = torch.log_softmax(raw[wanted], dim=-1)
        for row, i in enumerate(wanted):
            n = requests[i].params.logprobs or 0
            top = torch.topk(logprobs[row], n) if n else None
            pairs = (
                tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else ()
            )
            out[i] = TokenLogprobs(tokens[i], float(logprobs[row, tokens[i]]), pairs)
        return out
