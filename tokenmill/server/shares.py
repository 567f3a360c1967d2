"""Who holds and wants how much of the server, per tenant: the fair-share bookkeeping behind
admission (server/admission.py), and the headroom it keeps for the tenants that are not flooding."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from tokenmill.tenants import Tenant

_RESERVE_WINDOW_S = 10.0  # a tenant that asked within this long keeps headroom (fair share)
# How long a tenant's peak (the most places it wanted at once) is remembered while it keeps asking.
# A steady Poisson load at 1/s beside a flood has bursts of 6-8 arrivals in 3 s a minute apart;
# with a 10 s memory the headroom had shrunk back to 3 places by each burst, and the burst's
# requests waited for the flood's places (0.3-1.8 s to a first token).
_PEAK_MEMORY_S = 60.0


@dataclass
class Recent:
    """A tenant seen lately: when, and the most places it wanted at once (held plus queued)."""

    tenant: Tenant
    seen: float
    peak: int
    peak_at: float


@dataclass
class Shares:
    """Places held and queued per tenant group, and who has asked lately."""

    active: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    queued: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    recent: dict[str, Recent] = field(default_factory=dict)
    standing: list[Tenant] = field(default_factory=list)  # named in the key file: one place each

    def held(self, tenant: Tenant) -> float:
        return self.active[tenant.group] / tenant.weight

    def claimed(self, tenant: Tenant, extra: int = 0) -> float:
        return (self.active[tenant.group] + self.queued[tenant.group] + extra) / tenant.weight

    def arrived(self, tenant: Tenant, places: int, now: float) -> None:
        wanted = self.active[tenant.group] + self.queued[tenant.group] + places
        seen = self.recent.get(tenant.group)
        if seen is None or now - seen.peak_at > _PEAK_MEMORY_S or wanted >= seen.peak:
            self.recent[tenant.group] = Recent(tenant, now, wanted, now)
        else:
            seen.seen = now
        for group in [g for g, r in self.recent.items() if now - r.seen > _RESERVE_WINDOW_S]:
            del self.recent[group]

    def reserved_for_others(self, tenant: Tenant, capacity: int, now: float) -> int:
        """Free places kept for the other tenants seen lately: each may claim up to its weighted
        share of the capacity, as far as twice its recent peak plus one needs (room to grow: a
        steady tenant's requests overlap more when the server is loaded and each takes longer,
        and a place kept back is only refilled when another frees), less what it holds."""
        live = [r for r in self.recent.values() if now - r.seen <= _RESERVE_WINDOW_S]
        weights = sum(r.tenant.weight for r in live if r.tenant.group != tenant.group) + tenant.weight
        reserve = 0
        for r in live:
            if r.tenant.group == tenant.group:
                continue
            share = math.floor(capacity * r.tenant.weight / weights)
            reserve += max(0, min(share, 2 * r.peak + 1) - self.active[r.tenant.group])
        return reserve + self._standing_for_others(tenant, capacity, {r.tenant.group for r in live})

    def _standing_for_others(self, tenant: Tenant, capacity: int, live: set[str]) -> int:
        """One place kept for each named tenant not seen lately, so its first request does not
        wait for a flood's borrowed places to come back; a quarter of the capacity at most, of
        which a named tenant holding nothing may take one itself."""
        idle = [t for t in self.standing if t.group != tenant.group and t.group not in live]
        taking_mine = any(t.group == tenant.group for t in self.standing) and not self.active[tenant.group]
        return max(0, min(sum(1 for t in idle if not self.active[t.group]), capacity // 4 - taking_mine))
