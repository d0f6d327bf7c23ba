"""``ChatAnanke``'s model profile, offline: static capabilities at once, token limits fetched lazily.

:class:`ServiceProfile` is tested with a plain fetch function; ``ChatAnanke`` with an
``httpx.MockTransport`` only to inject faults (an unreachable or failing service) and to prove that
construction sends nothing. The limits read from the real service are checked in
``tests/integration/test_agents.py``.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from langchain_ananke import AnankeClient, ChatAnanke
from langchain_ananke.errors import AnankeConnectionError, AnankeError
from langchain_ananke.llms import _profile
from langchain_ananke.llms._profile import CAPABILITIES, ServiceProfile, token_limits
from langchain_ananke.protocol import ModelList

BASE = "http://ananke.test"
LIMITS = {"max_input_tokens": 8192, "max_output_tokens": 4096}


class Fetch:
    """A fetch function that answers ``results`` in order (an exception is raised), counting calls."""

    def __init__(self, *results: dict[str, int] | Exception) -> None:
        self.results = list(results)
        self.calls = 0

    def __call__(self) -> dict[str, int]:
        result = self.results[min(self.calls, len(self.results) - 1)]
        self.calls += 1
        if isinstance(result, Exception):
            raise result
        return result


def armed(fetch: Callable[[], dict[str, int]]) -> ServiceProfile:
    profile = ServiceProfile(fetch)
    profile.arm()
    return profile


# ----------------------------------------------------------------------------- token_limits


@pytest.mark.parametrize(
    ("card", "expected"),
    [
        ({"id": "m", "max_model_len": 8192, "max_output_tokens": 4096}, LIMITS),
        ({"id": "m", "max_model_len": 2048}, {"max_input_tokens": 2048}),
        ({"id": "m", "max_output_tokens": 64}, {"max_output_tokens": 64}),
        ({"id": "m"}, {}),
    ],
    ids=["both", "context-only", "output-only", "neither"],
)
def test_token_limits(card: dict[str, Any], expected: dict[str, int]) -> None:
    assert token_limits(ModelList.model_validate({"data": [card]})) == expected


def test_token_limits_of_an_empty_list() -> None:
    assert token_limits(ModelList(data=[])) == {}


# ----------------------------------------------------------------------------- ServiceProfile


def test_inert_until_armed() -> None:
    fetch = Fetch(LIMITS)
    profile = ServiceProfile(fetch)
    assert set(profile) == set(CAPABILITIES)  # what langchain-core checks during construction
    assert profile.get("max_input_tokens") is None
    assert fetch.calls == 0


@pytest.mark.parametrize("key", ["structured_output", "tool_calling", "tool_choice"])
def test_static_capabilities_need_no_fetch(key: str) -> None:
    fetch = Fetch(LIMITS)
    profile = armed(fetch)
    assert profile.get(key) is True
    assert profile[key] is True
    assert key in profile
    assert fetch.calls == 0


@pytest.mark.parametrize(
    "read",
    [
        lambda p: p["max_input_tokens"],
        lambda p: p.get("max_output_tokens"),
        lambda p: "max_input_tokens" in p,
        dict,
        lambda p: {**p},
        lambda p: list(p.items()),
        len,
        repr,
        lambda p: p.copy(),
    ],
    ids=["getitem", "get", "in", "dict", "unpack", "items", "len", "repr", "copy"],
)
def test_a_limit_or_whole_mapping_read_fetches_once(read: Callable[[ServiceProfile], Any]) -> None:
    fetch = Fetch(LIMITS)
    profile = armed(fetch)
    read(profile)
    read(profile)
    assert fetch.calls == 1
    assert dict(profile) == CAPABILITIES | LIMITS


def test_limits_the_service_does_not_give_stay_absent_without_refetching() -> None:
    fetch = Fetch({"max_input_tokens": 2048})
    profile = armed(fetch)
    assert profile.get("max_output_tokens") is None
    assert profile["max_input_tokens"] == 2048
    assert fetch.calls == 1


def test_a_failed_fetch_keeps_the_static_profile_and_retries_after_a_pause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(_profile.time, "monotonic", lambda: now[0])
    fetch = Fetch(AnankeConnectionError("cannot reach"), LIMITS)
    profile = armed(fetch)
    assert profile.get("max_input_tokens") is None
    with pytest.raises(KeyError):
        profile["max_output_tokens"]
    assert dict(profile) == CAPABILITIES
    assert fetch.calls == 1  # no new request on every lookup while the service is down
    now[0] += _profile.RETRY_AFTER_FAILURE_S
    assert profile["max_input_tokens"] == 8192
    assert fetch.calls == 2


def test_keys_the_caller_set_win_over_the_service() -> None:
    profile = armed(Fetch(LIMITS))
    profile["max_input_tokens"] = 1000
    assert profile["max_input_tokens"] == 1000
    assert profile["max_output_tokens"] == 4096


@pytest.mark.parametrize(
    "clone",
    [
        copy.copy,
        copy.deepcopy,
        lambda p: pickle.loads(pickle.dumps(p)),  # noqa: S301 - our own bytes
    ],
    ids=["copy", "deepcopy", "pickle"],
)
def test_copies_are_plain_dicts_of_what_is_known(clone: Callable[[Any], Any]) -> None:
    fetch = Fetch(LIMITS)
    profile = armed(fetch)
    assert clone(profile) == CAPABILITIES
    assert type(clone(profile)) is dict
    assert fetch.calls == 0


# ----------------------------------------------------------------------------- ChatAnanke


def failing_client(requests: list[httpx.Request], answer: httpx.Response | Exception) -> AnankeClient:
    """An ``AnankeClient`` whose every request gets ``answer``, recording what was sent."""

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if isinstance(answer, Exception):
            raise answer
        return answer

    client = AnankeClient(BASE)
    client._client = httpx.Client(base_url=BASE, transport=httpx.MockTransport(handle))
    return client


def test_construction_and_strategy_choice_send_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    requests: list[httpx.Request] = []
    monkeypatch.setattr(
        ChatAnanke, "client", property(lambda self: failing_client(requests, httpx.ConnectError("down")))
    )
    llm = ChatAnanke(base_url=BASE)
    assert isinstance(llm.profile, ServiceProfile)
    # What langchain.agents reads to pick ProviderStrategy.
    assert llm.profile.get("structured_output") is True
    assert requests == []


@pytest.mark.parametrize(
    "answer",
    [
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("read timed out"),
        httpx.Response(401, json={"error": {"code": "unauthorized", "message": "missing key"}}),
        httpx.Response(503, json={"error": {"code": "engine_unavailable", "message": "loading"}}),
        httpx.Response(404, json={"detail": "Not Found"}),
        httpx.Response(200, json={"data": [{"max_model_len": "big"}]}),
        httpx.Response(200, text="not json"),
    ],
    ids=["unreachable", "timeout", "401", "503", "no-route", "wrong-shape", "not-json"],
)
def test_an_unusable_service_leaves_the_static_profile(answer: httpx.Response | Exception) -> None:
    llm = ChatAnanke(base_url=BASE)
    requests: list[httpx.Request] = []
    llm._client = failing_client(requests, answer)
    assert llm.profile is not None
    assert llm.profile.get("max_input_tokens") is None
    assert dict(llm.profile) == CAPABILITIES
    assert [(r.method, r.url.path) for r in requests] == [("GET", "/v1/models")]  # once, no retries


def test_a_profile_the_caller_gives_is_kept() -> None:
    llm = ChatAnanke(base_url=BASE, profile={"structured_output": False, "max_input_tokens": 512})
    assert llm.profile == {"structured_output": False, "max_input_tokens": 512}
    assert not isinstance(llm.profile, ServiceProfile)


def test_the_fetch_error_type_is_what_the_profile_tolerates() -> None:
    # The profile swallows AnankeError only; the client must translate every failure into it.
    requests: list[httpx.Request] = []
    with pytest.raises(AnankeError):
        failing_client(requests, httpx.UnsupportedProtocol("no scheme")).models()
