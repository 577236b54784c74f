"""The botline metrics a Grafana dashboard and Prometheus alert rules query.

The metrics engineer's test checks each against a live ``/metrics``; here we
only extract them. Histogram series (``_bucket``, ``_sum``, ``_count``) are
named by their histogram.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "botline.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

# A metric name not inside a quoted label value: botline_ followed by name characters.
_NAME = re.compile(r"(?<![A-Za-z0-9_:])botline_[A-Za-z0-9_]*")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_SUFFIXES = ("_bucket", "_sum", "_count")


def metric_names(expressions: Iterable[str]) -> set[str]:
    """Every ``botline_*`` metric that these PromQL expressions query."""
    found = set()
    for expr in expressions:
        for name in _NAME.findall(_QUOTED.sub('""', expr)):
            for suffix in _SUFFIXES:
                if name.endswith(suffix):
                    name = name.removesuffix(suffix)
                    break
            found.add(name)
    return found


def _exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def dashboard_expressions(path: Path = DASHBOARD) -> list[str]:
    """The PromQL of every panel target in a Grafana dashboard."""
    return list(_exprs(json.loads(path.read_text())))


def alert_expressions(path: Path = ALERTS) -> list[str]:
    """The PromQL of every rule in a Prometheus rules file."""
    data = yaml.safe_load(path.read_text())
    return [rule["expr"] for group in data["groups"] for rule in group["rules"]]


def queried_metrics() -> set[str]:
    """Every botline metric the dashboard and the alert rules query."""
    return metric_names(dashboard_expressions() + alert_expressions())
