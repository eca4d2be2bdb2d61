"""Whose live KV a dry page pool takes, and how much: one device's rule between models.

When a model needs pages (a wake, or its KV cache growing) and the pool has none free,
the pool asks each other model's KV cache to give some back. A model with nothing
running sleeps instead (its caller decides that); a busy one that is not stepping this
round preempts running requests — recomputed later — by this rule:

- for a model of higher priority: all it is asked for;
- for a model of lower priority, or on nobody's behalf: nothing;
- between equals: only what it holds beyond its fair share, in whole page groups (it
  frees memory a group at a time), and only while the taker holds less than that share.
  Equals preempting each other freely would recompute forever; a model kept from the
  memory it lent out would wait on the other's whole backlog; and a lender that gave a
  whole group for a smaller excess would fall below its share and take the group back —
  measured on the CPU validation before the rounding: two models passed one group back
  and forth every 0.2 s, a preemption each time.

The fair share is the budget less the weights of the models with work, split evenly
among them. The live worker (`DeviceWorker._relieve`) and the simulator
(`SimGPU._relieve`) both call these two functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVClaim:
    """One model as the rule sees it: its priority, the KV pages it owns now, and the
    pages of one of its page groups (what it gives back at a time)."""

    priority: int
    kv_pages: int
    group_pages: int = 1


def fair_kv_share(budget_pages: int, weight_pages: Sequence[int]) -> int:
    """KV pages per model with work: the budget less their weights (one entry per such
    model, pages), split evenly; 0 when the weights alone fill the budget."""
    return max(0, budget_pages - sum(weight_pages)) // max(1, len(weight_pages))


def kv_to_lend(lender: KVClaim, taker: KVClaim | None, share: int, wanted: int) -> int:
    """Pages a busy `lender` preempts so that `taker` (None: nobody in particular) can
    have `wanted` more (see the module's rule)."""
    if wanted <= 0 or taker is None or lender.priority > taker.priority:
        return 0
    if lender.priority < taker.priority:
        return wanted
    group = max(1, lender.group_pages)
    excess = (lender.kv_pages - share) // group * group
    if taker.kv_pages >= share or excess <= 0:
        return 0
    return min(wanted, excess)
