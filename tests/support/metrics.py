"""Reading a service's ``/metrics`` as a test does: scrape, then compare samples."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Scrape:
    """One scrape: every sample by name and labels, and the metric families' names."""

    samples: dict[tuple[str, Labels], float]
    families: frozenset[str]
    text: str

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
        wanted = set(labels.items())
        return sum(v for (n, got), v in self.samples.items() if n == name and wanted <= set(got))

    def label_values(self) -> set[str]:
        """Every label value of every sample."""
        return {value for (_, labels) in self.samples for _, value in labels}

    def names(self) -> set[str]:
        """Every sample name (``_total``, ``_bucket``, ``_count``... included) and family."""
        return {n for n, _ in self.samples} | set(self.families)


def parse(text: str) -> Scrape:
    """Parse Prometheus' text format."""
    samples: dict[tuple[str, Labels], float] = {}
    families = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples, frozenset(families), text)


async def scrape(http: aiohttp.ClientSession, base_url: str) -> Scrape:
    """GET ``/metrics`` and parse it; it must answer 200 in Prometheus' text format."""
    async with http.get(f"{base_url}/metrics") as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return parse(await resp.text())
