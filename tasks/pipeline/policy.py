"""Enrichment policy: which stages run for a product, per tenant and per category, narrowed by the event.

A marketplace that only wants dedup and similarity (or a tenant whose merchants supply complete
attributes) should not pay for grounding and listing generation. The policy names the stages that
run; the operator's settings (``ENRICH_ENRICHMENT__*``) give the ceiling per tenant, per category
and per tenant and category, and a product event's optional ``hints.stages`` can only narrow it
(a merchant may opt out of work, never into work its operator switched off).

Two rules keep every policy meaningful: ``dedup`` and ``embeddings`` always run (images are stored,
linked and deduplicated by the fetch stage for every product, and the vectors are the output every
product gets), and a listing is generated only from a grounded crop and always verified, so
``listing`` and ``verification`` go together and need ``grounding``. That leaves three policies:
``full`` (every stage), ``dedup+grounding+embeddings`` (the grounded crops embedded, no listing) and
``dedup+embeddings`` (whole photos embedded, no detector or VLM work: "embeddings-only").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class EnrichStage(StrEnum):
    dedup = "dedup"
    grounding = "grounding"
    listing = "listing"
    verification = "verification"
    embeddings = "embeddings"


ALL_STAGES: frozenset[str] = frozenset(s.value for s in EnrichStage)
REQUIRED: frozenset[str] = frozenset({EnrichStage.dedup.value, EnrichStage.embeddings.value})


class InvalidPolicy(ValueError):
    """A stage set no product can run with; the message says which rule it breaks."""


def check_stages(stages: Iterable[str]) -> frozenset[str]:
    """The stage set, validated: unknown names and impossible combinations raise ``InvalidPolicy``."""
    chosen = frozenset(str(s) for s in stages)
    unknown = sorted(chosen - ALL_STAGES)
    if unknown:
        raise InvalidPolicy(f"unknown enrichment stage(s) {unknown}; expected some of {sorted(ALL_STAGES)}")
    missing = sorted(REQUIRED - chosen)
    if missing:
        raise InvalidPolicy(f"enrichment stages {missing} always run (images are deduplicated and embedded "
                            f"for every product); got {sorted(chosen)}")
    generating = chosen & {EnrichStage.listing.value, EnrichStage.verification.value}
    if generating and generating != {EnrichStage.listing.value, EnrichStage.verification.value}:
        raise InvalidPolicy("'listing' and 'verification' go together (every generated attribute is verified "
                            f"against the photo); got {sorted(chosen)}")
    if generating and EnrichStage.grounding.value not in chosen:
        raise InvalidPolicy(f"'listing' needs 'grounding' (the listing model reads the grounded crop); "
                            f"got {sorted(chosen)}")
    return chosen


def policy_name(stages: frozenset[str]) -> str:
    """``full``, or the stages joined by '+' in pipeline order (``dedup+embeddings``)."""
    if stages == ALL_STAGES:
        return "full"
    return "+".join(s.value for s in EnrichStage if s.value in stages)


def generates_listing(stages: frozenset[str]) -> bool:
    return EnrichStage.listing.value in stages


@dataclass(frozen=True)
class PolicyTable:
    """The configured ceilings; ``resolve`` picks the most specific one and narrows it by the hint.

    Precedence: ``tenant/category`` key, then tenant, then category, then the default."""

    default: frozenset[str] = ALL_STAGES
    by_tenant: Mapping[str, frozenset[str]] = field(default_factory=dict)
    by_category: Mapping[str, frozenset[str]] = field(default_factory=dict)
    by_tenant_category: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, default: Iterable[str] = ALL_STAGES, *, by_tenant: Mapping[str, Iterable[str]] | None = None,
           by_category: Mapping[str, Iterable[str]] | None = None,
           by_tenant_category: Mapping[str, Iterable[str]] | None = None) -> PolicyTable:
        def checked(table: Mapping[str, Iterable[str]] | None, what: str) -> dict[str, frozenset[str]]:
            out = {}
            for key, stages in (table or {}).items():
                try:
                    out[key] = check_stages(stages)
                except InvalidPolicy as exc:
                    raise InvalidPolicy(f"{what} {key!r}: {exc}") from None
            return out

        for key in by_tenant_category or {}:
            if key.count("/") != 1 or not all(key.split("/")):
                raise InvalidPolicy(f"tenant/category key {key!r} must be 'TENANT/CATEGORY'")
        return cls(check_stages(default), checked(by_tenant, "tenant"), checked(by_category, "category"),
                   checked(by_tenant_category, "tenant/category"))

    def ceiling(self, tenant_id: str, category: str) -> frozenset[str]:
        for table, key in ((self.by_tenant_category, f"{tenant_id}/{category}"), (self.by_tenant, tenant_id),
                           (self.by_category, category)):
            if key in table:
                return table[key]
        return self.default

    def resolve(self, tenant_id: str, category: str, hint: Iterable[str] | None = None) -> frozenset[str]:
        """The stages that run. A hint may only remove stages; what it removes must still leave a
        valid policy, or the configured ceiling applies unchanged (the hint is ignored, never fatal:
        it was valid against the contract when the event was accepted)."""
        ceiling = self.ceiling(tenant_id, category)
        if hint is None:
            return ceiling
        try:
            return check_stages(ceiling & frozenset(hint) | REQUIRED)
        except InvalidPolicy:
            return ceiling
