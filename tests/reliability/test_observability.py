"""``/metrics`` and request ids on this folder's service (an API key, ``--max-inflight 4``, a log file).

- A 429 burst moves the admission counters by exactly the refusals the clients saw.
- ``/metrics`` needs the key.
- A run's log lines carry each request's id (the access log's too, and a disconnect's), and never its
  prompt or the key; the disconnect is counted as one that aborted engine work.
"""

from __future__ import annotations

import concurrent.futures
import uuid

import httpx
import pytest

from tests.prometheus_text import Scrape
from tests.reliability.conftest import MAX_INFLIGHT, Service, chat, wait_until

pytestmark = pytest.mark.integration

#: Lower-case words only: never ends early, so each admitted request holds its slot for a while.
SLOW = {"prompt": chat("Tell a long story."), "max_tokens": 200, "constraints": {"regex": "[a-z ]{1000}"}}


def scrape(service: Service) -> Scrape:
    with service.client() as http:
        r = http.get("/metrics")
    assert r.status_code == 200
    return Scrape(r.text)


def _idle(service: Service) -> bool:
    health = service.health()
    return health["inflight"] == 0 and health["engine_unfinished"] == 0


def test_a_429_burst_moves_the_counters_by_exactly_the_refusals(service: Service) -> None:
    wait_until(lambda: _idle(service), 60)
    before = scrape(service)
    burst = 3 * MAX_INFLIGHT

    def send(_: int) -> int:
        with service.client() as http:
            return http.post("/generate_api", json=SLOW).status_code

    with concurrent.futures.ThreadPoolExecutor(burst) as pool:
        codes = list(pool.map(send, range(burst)))
    after = scrape(service)
    refused, answered = codes.count(429), codes.count(200)
    assert refused + answered == burst, codes
    assert refused >= burst - 2 * MAX_INFLIGHT  # the bound held: at most the slots' worth got in at once

    route = {"route": "/generate_api"}
    assert after.delta(before, "ananke_admission_rejections_total", reason="overloaded") == refused
    assert after.delta(before, "ananke_requests_total", **route, status="429", code="overloaded") == refused
    assert after.delta(before, "ananke_requests_total", **route, status="200", code="ok") == answered
    assert after.delta(before, "ananke_constraints_total", kind="regex", mode="exact") == answered
    assert after.delta(before, "vllm:request_success_total") == answered
    assert after.value("ananke_inflight_requests") == 0
    assert after.value("ananke_inflight_limit") == MAX_INFLIGHT


def test_metrics_need_the_key(service: Service) -> None:
    r = httpx.get(f"{service.url}/metrics", timeout=10)
    assert r.status_code == 401
    assert r.headers["x-request-id"]
    assert scrape(service).value("ananke_engine_ready") == 1


def test_log_lines_carry_the_request_id_and_never_the_prompt_or_key(service: Service) -> None:
    if service.external:
        pytest.skip("reads the log of a server this session started")
    wait_until(lambda: _idle(service), 60)
    marker = f"secret-prompt-{uuid.uuid4().hex}"
    ok_id, bad_id, left_id = (f"obs-{name}-{uuid.uuid4().hex[:8]}" for name in ("ok", "bad", "left"))
    before = scrape(service)
    with service.client() as http:
        ok = http.post(
            "/generate_api", json={"prompt": chat(marker), "max_tokens": 2}, headers={"X-Request-ID": ok_id}
        )
        assert ok.status_code == 200
        bad = http.post(
            "/generate_api", json={"prompt": marker, "max_tokens": 99_999}, headers={"X-Request-ID": bad_id}
        )
        assert bad.status_code == 422
        # A stream the client leaves after a few tokens: the engine request is aborted.
        body = {**SLOW, "prompt": chat(marker), "stream": True}
        with http.stream("POST", "/generate_api", json=body, headers={"X-Request-ID": left_id}) as r:
            lines = r.iter_lines()
            while not next(lines).startswith('data: {"event":"token"'):
                pass
    wait_until(lambda: _idle(service), 10)
    wait_until(lambda: left_id in service.log_text(), 10)
    after = scrape(service)
    log = service.log_text().splitlines()

    def lines_for(rid: str) -> list[str]:
        return [line for line in log if f"[{rid}]" in line]

    assert any('"POST /generate_api HTTP/1.1" 200' in line for line in lines_for(ok_id))
    assert any('"POST /generate_api HTTP/1.1" 422' in line for line in lines_for(bad_id))
    assert any("client disconnected; request cancelled" in line for line in lines_for(left_id))
    text = "\n".join(log)
    assert marker not in text
    assert service.api_key not in text
    assert after.delta(before, "ananke_client_disconnects_total", engine_aborted="true") == 1
    assert (
        after.delta(
            before, "ananke_requests_total", route="/generate_api", status="200", code="client_disconnected"
        )
        == 1
    )
