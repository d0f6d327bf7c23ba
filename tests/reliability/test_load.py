"""Load: admission control under a burst, and the server's memory around it.

The quick version (CI, ``integration``): 60 requests, 16 at a time, against a server admitting 4.
The full version (``stress``): 500 requests, 64 at a time, each refusal retried after Retry-After;
``python -m bench.stress.load`` runs the same burst against a server it starts, with a report.
"""

from __future__ import annotations

import asyncio

import pytest

from bench.stress.load import burst, summary
from tests.reliability.conftest import MAX_INFLIGHT, Service

MIB = 1 << 20


def _run_burst(service: Service, requests: int, concurrency: int, retries: int) -> None:
    before = service.process.rss_bytes() if service.process else None
    report = asyncio.run(
        burst(
            service.url,
            requests=requests,
            concurrency=concurrency,
            headers=service.headers,
            request_timeout=300,
            retries=retries,
        )
    )
    after = service.process.rss_bytes() if service.process else None
    print(summary(report))
    if before and after:
        print(
            f"server RSS main {before['main'] // MIB} -> {after['main'] // MIB} MiB, "
            f"tree {before['tree'] // MIB} -> {after['tree'] // MIB} MiB ({after['processes']} processes)"
        )
    assert report.failures == [], report.failures[:5]
    assert report.lost == 0
    assert report.server_errors == 0
    assert report.outcomes["ok"] > 0
    assert report.outcomes["ok"] + report.outcomes["refused"] == requests
    health = service.health()
    print(f"health after: {health}")
    assert health["status"] == "ok"
    assert health["inflight"] == 0
    assert health["engine_unfinished"] == 0
    if before and after:
        # Loose bound: catches a leak of the size of the responses, not allocator noise.
        assert after["main"] - before["main"] < 512 * MIB


@pytest.mark.integration
def test_burst_gets_answers_or_honest_refusals(service: Service) -> None:
    """60 requests, 16 at a time, 4 admitted: every one is a valid answer or 429 + Retry-After."""
    _run_burst(service, requests=60, concurrency=16, retries=3)


@pytest.mark.integration
def test_burst_saw_refusals_at_the_bound(service: Service) -> None:
    """More concurrent requests than the bound: some are refused at once, none wait unbounded."""
    report = asyncio.run(
        burst(service.url, requests=3 * MAX_INFLIGHT, concurrency=3 * MAX_INFLIGHT, headers=service.headers)
    )
    assert report.outcomes["refused"] > 0, summary(report)
    assert report.statuses["429"] == report.outcomes["refused"]
    assert report.lost == 0


@pytest.mark.stress
def test_stress_burst_500_by_64(service: Service) -> None:
    """The issue's burst: 500 requests, 64 concurrent, refusals retried after Retry-After."""
    _run_burst(service, requests=500, concurrency=64, retries=50)
