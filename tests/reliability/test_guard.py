"""The request guard in process (no engine, no model): ordering of refusals, limits, slots."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from modal_service.engine.engine import Engine, EngineConfig
from modal_service.http.app import create_app
from modal_service.http.guard import Admission, json_depth_exceeds
from modal_service.limits import Limits


@pytest.mark.parametrize(
    ("text", "limit", "deep"),
    [
        ('{"a": [1, 2, {"b": 3}]}', 3, False),
        ('{"a": [1, 2, {"b": 3}]}', 2, True),
        ('{"a": "[[[[[[[[[[{{{{{{"}', 2, False),  # brackets inside strings do not count
        ('{"a": "x\\"[[[[[[[[", "b": [[1]]}', 3, False),  # nor after an escaped quote
        ("[" * 101 + "]" * 101, 100, True),
        ("[" * 100 + "]" * 100, 100, False),
        ('{"a": [}', 5, False),  # malformed: left to the JSON parser (400)
        ("", 1, False),
    ],
)
def test_json_depth(text: str, limit: int, deep: bool) -> None:
    assert json_depth_exceeds(text.encode(), limit) is deep


def test_json_depth_is_fast_on_a_large_body() -> None:
    import time

    body = json.dumps({"prompt": "x" * 2_000_000}).encode()
    started = time.perf_counter()
    assert not json_depth_exceeds(body, 100)
    nested = b"[" * 1_000_000 + b"]" * 1_000_000
    assert json_depth_exceeds(nested, 100)
    assert time.perf_counter() - started < 2


def _app(api_key: str | None = None, **limits: int) -> TestClient:
    engine = Engine(EngineConfig(model="/nowhere/tiny"))
    app = create_app(engine, api_key=api_key, limits=Limits(**limits), start_engine=False)
    return TestClient(app, raise_server_exceptions=False)


def test_loading_engine_is_503_with_retry_after() -> None:
    with _app() as client:
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "loading"
        for path in ("/generate_api", "/v1/chat/completions", "/v1/completions"):
            r = client.post(path, json={"prompt": "x"})
            assert r.status_code == 503, path
            assert r.json()["error"]["code"] == "engine_unavailable"
            assert r.headers["retry-after"] == "5"
        assert client.get("/openapi.json").status_code == 200  # needs no engine


def test_auth_is_checked_before_anything_else() -> None:
    with _app(api_key="k") as client:
        r = client.post("/generate_api", content=b"x" * (3 << 20))
        assert r.status_code == 401  # not 413: an anonymous client cannot make us read its body
        assert client.get("/openapi.json").status_code == 401
        assert client.get("/health").status_code == 503  # open, and honest: loading
        r = client.post("/generate_api", json={"prompt": "x"}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 503


def test_body_limits_announced_and_streamed() -> None:
    with _app(max_body_bytes=1000) as client:
        assert client.post("/openapi.json", content=b"x" * 1001).status_code == 413
        r = client.post("/openapi.json", content=iter([b"x" * 600, b"x" * 600]))
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "body_too_large"
        bad = client.post("/openapi.json", content=b"x", headers={"content-length": "abc"})
        assert bad.status_code in (400, 413)


def test_draining_refuses_new_work() -> None:
    with _app() as client:
        client.app.state.admission.draining = True  # type: ignore[attr-defined]
        r = client.post("/generate_api", json={"prompt": "x"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "shutting_down"
        assert r.headers["retry-after"]


def test_slots_are_bounded_and_release_once() -> None:
    admission = Admission(2)
    a, b = admission.slot().__enter__(), admission.slot().__enter__()
    with pytest.raises(Exception, match="2 requests in flight"):
        admission.slot().__enter__()
    a.release()
    a.release()  # idempotent: the guard releases whatever the request still holds
    assert admission.inflight == 1
    b.__exit__(None, None, None)
    assert admission.inflight == 0


class VLLMValidationError(ValueError):
    """Stands in for vllm.exceptions.VLLMValidationError (matched by name)."""


def test_unhandled_errors_are_answered_not_reraised() -> None:
    """Starlette's outermost handler re-raises after answering (uvicorn then resets the keep-alive
    connection); the guard answers instead, so nothing escapes the app."""
    engine = Engine(EngineConfig(model="/nowhere/tiny"))
    app = create_app(engine, start_engine=False)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaput")

    @app.get("/reject")
    async def reject() -> None:
        raise VLLMValidationError("The decoder prompt cannot be empty")

    with TestClient(app, raise_server_exceptions=True) as client:
        r = client.get("/boom")
        assert r.status_code == 500
        assert r.json()["error"] == {
            "code": "internal_error",
            "message": "RuntimeError: kaput",
            "detail": None,
        }
        r = client.get("/reject")
        assert r.status_code == 422
        assert "prompt cannot be empty" in r.json()["error"]["message"]


ROUTES = [
    ("/generate_api", {"prompt": "x"}),
    ("/generate_api", {"prompt": "x", "stream": True}),
    ("/generate_api", {"prompt": ["x", "y"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True}),
    ("/v1/completions", {"prompt": "x"}),
    ("/v1/completions", {"prompt": "x", "stream": True}),
]


@pytest.mark.parametrize(("path", "body"), ROUTES)
def test_planning_runs_inside_the_admission_slot_on_every_route(path: str, body: dict[str, object]) -> None:
    """Planning (tokenize, compile) holds a slot on every route, streaming or not: with the slots all
    taken it never starts (429), and while it runs the request is counted in flight."""
    from modal_service.errors import ApiError

    with _app(max_inflight=1) as client:
        app = client.app
        app.state.engine.state = "ok"  # type: ignore[attr-defined]
        admission, lifecycle = app.state.admission, app.state.lifecycle  # type: ignore[attr-defined]
        seen: list[int] = []

        async def plan(_req: object) -> list[object]:
            seen.append(admission.inflight)
            raise ApiError(422, "invalid_constraint", "planned")

        lifecycle.generator.aplan = plan
        r = client.post(path, json=body)
        assert (r.status_code, r.json()["error"]["message"]) == (422, "planned")
        assert seen == [1]  # planned while holding the one slot
        assert admission.inflight == 0  # and released
        admission.inflight = 1  # another request holds the only slot
        r = client.post(path, json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (429, "overloaded")
        assert seen == [1]  # no planning, so no compile, above the bound
        admission.inflight = 0  # (the app's shutdown waits for in-flight requests)
