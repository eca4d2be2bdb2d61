"""Reclaim policies: whom the page pool takes memory from when it runs dry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from prism.memory.tenant import ReclaimLevel, TenantAccount


@dataclass(frozen=True, slots=True)
class ReclaimStep:
    tenant: TenantAccount
    level: ReclaimLevel
    pages: int  # at most this many pages from this tenant at this level


class ReclaimPolicy(ABC):
    """Lists, in order, where `requester` may take pages from; the pool stops once it
    has `need`."""

    @abstractmethod
    def plan(
        self, requester: TenantAccount, need: int, tenants: Sequence[TenantAccount]
    ) -> list[ReclaimStep]: ...


class DefaultReclaimPolicy(ReclaimPolicy):
    """Warm reserves, then idle free pages, then live memory of lower-priority tenants.

    Within a level, lower priority gives first, then the larger holder. Live memory
    (PRESSURE) is taken only from tenants of priority no higher than the requester's,
    except when the requester is below its guaranteed minimum: then anyone above their
    own minimum gives. Nobody is taken below their minimum.
    """

    def plan(
        self, requester: TenantAccount, need: int, tenants: Sequence[TenantAccount]
    ) -> list[ReclaimStep]:
        others = [t for t in tenants if t is not requester and t.consumer is not None]
        others.sort(key=lambda t: (t.priority, -t.num_owned))
        guaranteed = requester.num_owned < requester.min_pages
        # What each tenant may still give above its minimum, summed over all levels.
        room = {t.name: t.num_owned - t.min_pages for t in others}
        steps: list[ReclaimStep] = []
        for level in ReclaimLevel:
            for tenant in others:
                outranks = tenant.priority > requester.priority
                if level is ReclaimLevel.PRESSURE and outranks and not guaranteed:
                    continue
                pages = min(self._takeable(tenant, level), room[tenant.name])
                if pages > 0:
                    room[tenant.name] -= pages
                    steps.append(ReclaimStep(tenant, level, pages))
        return steps

    @staticmethod
    def _takeable(tenant: TenantAccount, level: ReclaimLevel) -> int:
        assert tenant.consumer is not None
        above_min = tenant.num_owned - tenant.min_pages
        return max(0, min(tenant.consumer.reclaimable(level), above_min))
