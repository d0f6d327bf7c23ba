"""Reading ``/metrics`` in tests: Prometheus text -> sample values, and deltas between two scrapes."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """One ``/metrics`` body, parsed."""

    def __init__(self, text: str) -> None:
        self.text = text
        families = text_string_to_metric_families(text)
        self.samples = [(s.name, s.labels, s.value) for family in families for s in family.samples]

    def names(self) -> set[str]:
        return {name for name, _, _ in self.samples}

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels`` (0 when there are none)."""
        return sum(
            v for n, have, v in self.samples if n == name and all(have.get(k) == x for k, x in labels.items())
        )

    def delta(self, before: Scrape, name: str, **labels: str) -> float:
        return self.value(name, **labels) - before.value(name, **labels)
