"""
The shipped alert rules and Grafana dashboard (C{contrib/}) use only metrics
the daemon exposes, and the new C{/metrics} families carry what the journal
and the forwarder report; C{promtool check rules} validates the rule file.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Mapping, Set

import pytest
from prometheus_client.exposition import generate_latest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from mixingest.funnel import Funnel
from mixingest.journal.writer import FSYNC_BUCKETS
from mixingest.metrics import Metrics, PublicSite
from tests.test_api import MemoryQueue

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "contrib" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "mixingest.json"
_NAME = re.compile(r"\b((?:mixingest|process)_[a-z0-9_]+)")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
_STANDARD = {"up"}


def writer(**overrides: Any) -> Dict[str, Any]:
    status: Dict[str, Any] = {
        "healthy": True,
        "segments": 2,
        "bytes": 4096,
        "fsyncs": 3,
        "fsyncFailures": 1,
        "lastFsyncSeconds": 0.002,
        "possiblyLost": 0,
        "fsyncBuckets": [0, 1, 2] + [0] * (len(FSYNC_BUCKETS) - 2),
        "fsyncSecondsTotal": 0.0045,
    }
    status.update(overrides)
    return status


FORWARDING: Dict[str, Any] = {
    "backend": "forwarding",
    "healthy": True,
    "forwarder": {
        "state": "waiting",
        "reason": "remote down",
        "forwarded": 7,
        "skippedInDoubt": 0,
        "failures": 3,
        "checkpointFailures": 0,
        "uncommitted": [],
        "queues": {
            "events": {"forwarded": 7, "failed": 100, "journaled": 19, "lagSeconds": 42.5},
            "people": {"forwarded": 0, "failed": 0, "journaled": 0, "lagSeconds": 0.0},
        },
    },
    "diverted": ["events"],
    "backlog": {"events": 12, "people": 0},
    "remote": {"backend": "redis", "healthy": False},
    "journal": {
        "backend": "journal",
        "bytes": 8192,
        "maxBytes": 1 << 30,
        "full": False,
        "queues": {"events": writer(), "people": writer(healthy=False, fsyncBuckets=None)},
        "groups": {},
        "retention": None,
    },
}


JOURNAL_ONLY: Dict[str, Any] = {
    **FORWARDING["journal"],
    "groups": {
        "events": {"loader": {"nextSeq": 8, "lagItems": 3, "lagSeconds": 12.5, "lastCommit": 1e9}}
    },
    "retention": {"droppedSegments": 2, "droppedBytes": 4096, "expiredGroups": 0, "refusing": []},
}
"""The journal-only daemon's status: consumer groups and retention."""


class StatusQueue(MemoryQueue):
    def __init__(self, status: Mapping[str, Any]) -> None:
        super().__init__()
        self._status = status

    def status(self) -> Mapping[str, Any]:
        return self._status

    def ready(self) -> bool:
        return True

    def put(self, queue: str, items: Any) -> Deferred[None]:
        return succeed(None)


def exposed() -> str:
    """
    The exposition of a daemon's registry with every collector a real one
    has: the funnel's over a store-and-forward queue, the public site's.
    """
    metrics = Metrics()
    Funnel(StatusQueue(FORWARDING), Clock(), metrics=metrics)
    PublicSite(MemoryQueue(), metrics=metrics, clock=Clock())  # type: ignore[arg-type]
    metrics.refusedEarly(408)
    metrics.answered(b"/track", 200, 0.01)
    metrics.wrote("events", 0.01)
    return generate_latest(metrics.registry).decode()


def exposedNames() -> Set[str]:
    """
    Every series name the registry can produce, samples or not yet, in
    store-and-forward or journal-only mode.
    """
    names: Set[str] = set()
    for status in (FORWARDING, JOURNAL_ONLY):
        metrics = Metrics()
        Funnel(StatusQueue(status), Clock(), metrics=metrics)
        PublicSite(MemoryQueue(), metrics=metrics, clock=Clock())  # type: ignore[arg-type]
        for family in metrics.registry.collect():
            names.add(family.name)
            names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
            names.update(sample.name for sample in family.samples)
    return names


def referenced(text: str) -> Set[str]:
    return set(_NAME.findall(text))


def dashboardExpressions() -> List[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found: List[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard)
    return found


def test_alertsUseExposedMetrics() -> None:
    used = referenced(ALERTS.read_text())
    assert len(used) >= 8
    assert used - exposedNames() == set()


def test_dashboardUsesExposedMetrics() -> None:
    expressions = dashboardExpressions()
    assert len(expressions) >= 12
    used = set().union(*map(referenced, expressions))
    assert used - exposedNames() == set()


def test_checkCatchesAMissingMetric() -> None:
    """
    The control: a name the daemon does not expose is seen.
    """
    assert referenced("rate(mixingest_no_such_thing_total[5m])") - exposedNames() == {
        "mixingest_no_such_thing_total"
    }


def test_alertsCoverWhatTheIssueAsks() -> None:
    alerts = set(re.findall(r"alert: (\w+)", ALERTS.read_text()))
    assert {
        "MixingestQueueDiverted",
        "MixingestBacklogGrowing",
        "MixingestFsyncSlow",
        "MixingestNotReady",
        "MixingestRefusalsSpiking",
        "MixingestConsumerGroupLagging",
        "MixingestRetentionRefusing",
        "MixingestRetentionDropping",
    } <= alerts


def test_newFamilies() -> None:
    text = exposed()
    assert 'mixingest_journal_queue_bytes{queue="events"} 4096.0' in text
    assert 'mixingest_journal_queue_segments{queue="people"} 2.0' in text
    assert 'mixingest_journal_writer_healthy{queue="events"} 1.0' in text
    assert 'mixingest_journal_writer_healthy{queue="people"} 0.0' in text
    assert 'mixingest_journal_fsync_failures_total{queue="events"} 1.0' in text
    bucket = f'{{le="{FSYNC_BUCKETS[1]}",queue="events"}} 1.0'
    assert "mixingest_journal_fsync_duration_seconds_bucket" + bucket in text
    assert 'mixingest_journal_fsync_duration_seconds_bucket{le="+Inf",queue="events"} 3.0' in text
    assert 'mixingest_journal_fsync_duration_seconds_count{queue="events"} 3.0' in text
    assert 'mixingest_forwarding_backlog_events{queue="events"} 12.0' in text
    assert 'mixingest_forwarding_diverted{queue="events"} 1.0' in text
    assert 'mixingest_forwarding_diverted{queue="people"} 0.0' in text
    assert 'mixingest_forwarding_forwarded_events_total{queue="events"} 7.0' in text
    assert 'mixingest_forwarding_failed_events_total{queue="events"} 100.0' in text
    assert 'mixingest_forwarding_journaled_events_total{queue="events"} 19.0' in text
    assert 'mixingest_forwarding_lag_seconds{queue="events"} 42.5' in text
    assert 'mixingest_forwarding_lag_seconds{queue="people"} 0.0' in text
    assert "mixingest_forwarding_consecutive_failures 3.0" in text
    assert "mixingest_remote_up 0.0" in text
    assert 'mixingest_early_refusals_total{code="408"} 1.0' in text
    assert re.search(r'mixingest_build_info\{python="[^"]+",version="[^"]+"\} 1\.0', text)
    assert "_created" not in text


def test_promtoolChecksTheRules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed: apt-get install prometheus")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(ALERTS.read_text().replace("expr: mixingest_ready == 0", "expr: ready ==="))
    control = subprocess.run(
        [promtool, "check", "rules", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert control.returncode != 0, "promtool must see a broken expression"
