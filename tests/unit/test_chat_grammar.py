"""Chat rendering, the tool-call grammar and tool-call parsing (``constraints.tools``, ``engine.prompts``).

The grammar is checked for what it admits with llguidance itself over a byte-level tokenizer, so no
model is needed.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import pytest
from pydantic import BaseModel, ValidationError

from langchain_ananke.protocol import ChatMessage, GenerateRequest, ToolCall, ToolSpec
from modal_service.constraints.tools import CALL_CLOSE, CALL_OPEN, is_call, parse_tool_calls, tool_grammar
from modal_service.constraints.verify import check_tool_calls
from modal_service.engine.prompts import render_chat, renders_tools, template_tools, to_template_messages
from tests.unit.byte_tokenizer import BYTE_TOKENIZER

WEATHER = ToolSpec.model_validate(
    {
        "function": {
            "name": "get_weather",
            "description": "Weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        }
    }
)
ADD = ToolSpec.model_validate(
    {
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        }
    }
)
TOOLS = [WEATHER, ADD]
USER = ChatMessage(role="user", content="Weather in Paris?")


def call(name: str, arguments: dict[str, Any]) -> str:
    return CALL_OPEN + json.dumps({"name": name, "arguments": arguments}, separators=(",", ":")) + CALL_CLOSE


def qwen_call(name: str, arguments: dict[str, Any]) -> str:
    """A call as Qwen2.5's chat template lays it out: on its own line, ``json.dumps`` spacing."""
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments})}\n{CALL_CLOSE}"


PARIS = call("get_weather", {"city": "Paris"})
SUM = call("add", {"a": 1, "b": 2})
QWEN_PARIS = qwen_call("get_weather", {"city": "Paris"})
QWEN_SUM = qwen_call("add", {"a": 1, "b": 2})


# ----------------------------------------------------------------------------- to_template_messages


def test_messages_without_tools_pass_through() -> None:
    messages = [
        ChatMessage(role="system", content="Be brief."),
        USER,
        ChatMessage(role="assistant", content="Sunny."),
        ChatMessage(role="tool", content="18C", tool_call_id="call_1"),
    ]
    assert to_template_messages(messages, None, "auto") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "tool", "content": "18C"},
    ]


def test_tools_create_a_system_turn() -> None:
    out = to_template_messages([USER], TOOLS, "auto")
    assert [m["role"] for m in out] == ["system", "user"]
    system = out[0]["content"]
    assert system.startswith("You have access to these tools:\n")
    assert json.dumps(WEATHER.function.model_dump(exclude_none=True)) in system
    assert json.dumps(ADD.function.model_dump(exclude_none=True)) in system
    assert CALL_OPEN in system
    assert CALL_CLOSE in system
    assert out[1] == {"role": "user", "content": "Weather in Paris?"}


def test_tools_are_appended_to_an_existing_system_turn() -> None:
    messages = [ChatMessage(role="system", content="You are terse."), USER]
    out = to_template_messages(messages, TOOLS, "auto")
    assert [m["role"] for m in out] == ["system", "user"]
    head, _, tail = out[0]["content"].partition("\n\n")
    assert head == "You are terse."
    assert tail.startswith("You have access to these tools:")
    assert messages[0].content == "You are terse."


@pytest.mark.parametrize(
    ("tool_choice", "rule"),
    [
        ("auto", "Call a tool when it helps; otherwise answer in plain text."),
        ("required", "You must call one of these tools."),
        ("add", "You must call the tool add."),
    ],
)
def test_tool_choice_rule_in_the_system_turn(tool_choice: str, rule: str) -> None:
    assert rule in to_template_messages([USER], TOOLS, tool_choice)[0]["content"]


@pytest.mark.parametrize("tools", [None, [], TOOLS])
def test_tool_choice_none_adds_no_instructions(tools: list[ToolSpec] | None) -> None:
    assert to_template_messages([USER], tools, "none") == [{"role": "user", "content": "Weather in Paris?"}]


def test_assistant_tool_calls_are_rendered_in_the_call_format() -> None:
    calls = [
        ToolCall(id="call_1", name="get_weather", arguments={"city": "Paris"}),
        ToolCall(id="call_2", name="add", arguments={"a": 1, "b": 2}),
    ]
    messages = [USER, ChatMessage(role="assistant", content="Checking. ", tool_calls=calls)]
    out = to_template_messages(messages, None, "auto")
    assert out[1] == {
        "role": "assistant",
        "content": 'Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
    }
    assert [c.name for c in parse_tool_calls(out[1]["content"])] == ["get_weather", "add"]


def test_non_ascii_arguments_are_rendered_verbatim() -> None:
    calls = [ToolCall(id="c", name="get_weather", arguments={"city": "Zürich"})]
    out = to_template_messages([ChatMessage(role="assistant", tool_calls=calls)], None, "auto")
    assert "Zürich" in out[0]["content"]


# ----------------------------------------------------------------------------- native tool rendering

CONVERSATION = [
    USER,
    ChatMessage(
        role="assistant",
        content="Checking.",
        tool_calls=[ToolCall(id="call_1", name="get_weather", arguments={"city": "Paris"})],
    ),
    ChatMessage(role="tool", content="18C", tool_call_id="call_1"),
]


def test_native_rendering_keeps_calls_and_results_structured() -> None:
    assert to_template_messages(CONVERSATION, TOOLS, "auto", native_tools=True) == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "content": "18C", "tool_call_id": "call_1"},
    ]


@pytest.mark.parametrize(
    ("tool_choice", "answer", "line"),
    [
        ("auto", {"type": "integer"}, True),
        ("auto", None, False),
        ("required", {"type": "integer"}, False),
        ("add", {"type": "integer"}, False),
        ("none", {"type": "integer"}, False),
    ],
)
def test_native_rendering_adds_only_the_answer_schema_line(
    tool_choice: str, answer: dict[str, Any] | None, line: bool
) -> None:
    out = to_template_messages([USER], TOOLS, tool_choice, answer, native_tools=True)
    expected = [{"role": "user", "content": "Weather in Paris?"}]
    if line:
        schema_line = (
            'When you call no tool, give the final answer as JSON matching this schema: {"type": "integer"}'
        )
        expected.insert(0, {"role": "system", "content": schema_line})
    assert out == expected


def test_native_answer_line_joins_an_existing_system_turn() -> None:
    system = ChatMessage(role="system", content="You are terse.")
    out = to_template_messages([system, USER], TOOLS, "auto", {"type": "integer"}, native_tools=True)
    head, _, tail = out[0]["content"].partition("\n\n")
    assert (out[0]["role"], head) == ("system", "You are terse.")
    assert tail.startswith("When you call no tool, give the final answer as JSON")


@pytest.mark.parametrize(
    ("tools", "tool_choice", "expected"),
    [
        (None, "auto", None),
        ([], "auto", None),
        (TOOLS, "none", None),
        ([ADD], "required", [{"type": "function", "function": ADD.function.model_dump(exclude_none=True)}]),
    ],
)
def test_template_tools(
    tools: list[ToolSpec] | None, tool_choice: str, expected: list[dict[str, Any]] | None
) -> None:
    assert template_tools(tools, tool_choice) == expected


SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's chat_template.jinja
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOOLS_TEMPLATE = "{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}"


@pytest.mark.parametrize(
    ("template", "renders"),
    [
        (SMOLLM2_TEMPLATE, False),
        (TOOLS_TEMPLATE, True),
        (None, False),
        ("", False),
        ("{% for m in messages %}{{ m['tools'] }}{% endfor %}", False),  # a message's key, not the variable
        ({"default": SMOLLM2_TEMPLATE}, False),
        ({"default": SMOLLM2_TEMPLATE, "tool_use": TOOLS_TEMPLATE}, True),
        ("{% generation %}{{ tools }}{% endgeneration %}", True),  # transformers' own tag
    ],
)
def test_renders_tools(template: str | dict[str, str] | None, renders: bool) -> None:
    assert renders_tools(template) is renders


class _RecordingTokenizer:
    def __init__(self, chat_template: str | None) -> None:
        self.chat_template = chat_template
        self.calls: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        self.calls.append((messages, kwargs))
        return "rendered"


def test_a_template_without_tools_gets_the_hand_written_prompt() -> None:
    tok = _RecordingTokenizer(SMOLLM2_TEMPLATE)
    assert render_chat(tok, CONVERSATION, TOOLS, "auto", {"type": "integer"}) == "rendered"
    assert tok.calls == [
        (
            to_template_messages(CONVERSATION, TOOLS, "auto", {"type": "integer"}),
            {"tokenize": False, "add_generation_prompt": True},
        )
    ]


def test_a_template_with_tools_gets_them_its_own_way() -> None:
    tok = _RecordingTokenizer(TOOLS_TEMPLATE)
    render_chat(tok, CONVERSATION, TOOLS, "auto")
    assert tok.calls == [
        (
            to_template_messages(CONVERSATION, TOOLS, "auto", native_tools=True),
            {"tools": template_tools(TOOLS, "auto"), "tokenize": False, "add_generation_prompt": True},
        )
    ]


# ----------------------------------------------------------------------------- tool_grammar


TOKENIZER = BYTE_TOKENIZER


def admits(grammar: str, text: str) -> bool:
    matcher = llguidance.LLMatcher(TOKENIZER, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    return matcher.consume_tokens(list(text.encode())) and matcher.is_accepting()


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "start"),
    [
        ("auto", True, "start: TEXT | call+"),
        ("auto", False, "start: TEXT | call"),
        ("required", True, "start: call+"),
        ("required", False, "start: call"),
        ("add", True, "start: call+"),
        ("add", False, "start: call"),
    ],
)
def test_tool_grammar_start_rule(tool_choice: str, parallel: bool, start: str) -> None:
    grammar = tool_grammar(TOOLS, tool_choice, parallel)
    assert grammar is not None
    assert grammar.splitlines()[0] == start
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_lark(grammar), TOKENIZER
    )
    assert not is_error, messages


@pytest.mark.parametrize("parallel", [True, False])
def test_tool_grammar_none_is_off(parallel: bool) -> None:
    assert tool_grammar(TOOLS, "none", parallel) is None


def test_named_tool_grammar_has_only_that_tool() -> None:
    grammar = tool_grammar(TOOLS, "add", False)
    assert grammar is not None
    assert '"const": "add"' in grammar
    assert "get_weather" not in grammar


def test_tool_grammar_does_not_mutate_the_tool_schemas() -> None:
    before = WEATHER.model_dump()
    tool_grammar(TOOLS, "auto", True)
    assert WEATHER.model_dump() == before


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "text", "admitted"),
    [
        ("auto", True, "It is sunny in Paris.", True),
        ("auto", True, "line one\nline two with <b>", True),
        ("auto", True, PARIS, True),
        ("auto", True, PARIS + SUM, True),
        ("auto", False, PARIS + SUM, False),
        ("auto", True, " leading space", False),
        ("auto", True, "<b>html</b>", False),
        ("auto", True, "Sure! " + PARIS, True),  # admitted as TEXT: only a leading call is constrained
        ("required", True, "It is sunny.", False),
        ("required", True, SUM, True),
        ("required", False, SUM, True),
        ("required", False, SUM + SUM, False),
        ("add", False, SUM, True),
        ("add", False, PARIS, False),
        ("auto", True, call("get_time", {}), False),
        ("auto", True, call("add", {"a": 1}), False),
        ("auto", True, call("add", {"a": 1, "b": "2"}), False),
        ("auto", True, call("get_weather", {"city": "Paris", "units": "C"}), False),
        ("auto", True, PARIS[:-1], False),
        ("auto", True, QWEN_PARIS, True),
        ("auto", True, QWEN_PARIS + "\n" + QWEN_SUM, True),
        ("auto", True, QWEN_PARIS + "\n", True),
        ("auto", False, QWEN_PARIS + "\n" + QWEN_SUM, False),
        ("required", False, QWEN_SUM, True),
        ("add", False, QWEN_SUM, True),
        ("add", False, QWEN_PARIS, False),
        ("required", True, CALL_OPEN + "\n\n" + QWEN_SUM.removeprefix(CALL_OPEN + "\n"), False),
        ("required", True, "\n" + QWEN_SUM, False),
        ("required", True, SUM + "\n" + SUM + "\n", False),  # compact calls are not newline-separated
        ("required", True, CALL_OPEN + "\n" + SUM.removeprefix(CALL_OPEN), False),
        ("required", True, QWEN_SUM.replace("\n" + CALL_CLOSE, CALL_CLOSE), False),
        ("required", True, CALL_OPEN + '{"name": "add", "arguments": {"a": 1,"b": 2}}' + CALL_CLOSE, False),
        ("required", True, CALL_OPEN + '{"name":  "add", "arguments": {"a": 1, "b": 2}}' + CALL_CLOSE, False),
        ("required", True, CALL_OPEN + '{ "name": "add", "arguments": {"a": 1, "b": 2}}' + CALL_CLOSE, False),
        ("auto", True, qwen_call("add", {"a": 1, "b": 2, "c": 3}), False),
    ],
)
def test_tool_grammar_admits(tool_choice: str, parallel: bool, text: str, admitted: bool) -> None:
    grammar = tool_grammar(TOOLS, tool_choice, parallel)
    assert grammar is not None
    assert admits(grammar, text) is admitted


def test_tool_without_parameters_takes_an_empty_object() -> None:
    now = ToolSpec.model_validate({"function": {"name": "now"}})
    grammar = tool_grammar([now], "required", False)
    assert grammar is not None
    assert admits(grammar, call("now", {}))
    assert not admits(grammar, call("now", {"tz": "UTC"}))


# ----------------------------------------------------------------------------- parse_tool_calls


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no calls here", []),
        (PARIS, [("get_weather", {"city": "Paris"})]),
        (PARIS + SUM, [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]),
        (
            "Let me check.\n" + PARIS + "\nand\n" + SUM,
            [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})],
        ),
        (
            '<tool_call>\n{"name": "add",\n "arguments": {"a": 1, "b": 2}}\n</tool_call>',
            [("add", {"a": 1, "b": 2})],
        ),
        (call("get_weather", {"city": "Zürich"}), [("get_weather", {"city": "Zürich"})]),
        (
            QWEN_PARIS + "\n" + QWEN_SUM + "\n",
            [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})],
        ),
    ],
)
def test_parse_tool_calls(text: str, expected: list[tuple[str, dict[str, Any]]]) -> None:
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls] == expected
    assert all(c.id.startswith("call_") for c in calls)
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "add", "arguments": {"a": 1,}}',
        "not json",
        '["add", {"a": 1}]',
        '{"name": "add", "arguments": "{\\"a\\": 1}"}',
        '{"name": "add"}',
    ],
    ids=["bad-json", "not-json", "list", "string-arguments", "no-arguments"],
)
def test_parse_tool_calls_rejects_malformed(body: str) -> None:
    with pytest.raises(ValueError, match=r"malformed tool call|Expecting|Expected"):
        parse_tool_calls(PARIS + CALL_OPEN + body + CALL_CLOSE)


def test_parse_tool_calls_rejects_a_call_without_a_name() -> None:
    with pytest.raises(ValueError, match="malformed tool call"):
        parse_tool_calls(CALL_OPEN + '{"arguments": {"a": 1}}' + CALL_CLOSE)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (PARIS, True),
        (QWEN_PARIS, True),
        ("\n" + QWEN_PARIS, True),
        ('{"result": 1}', False),
        ("Sure! " + PARIS, False),
        ("It is sunny.", False),
        ("", False),
    ],
)
def test_is_call(text: str, expected: bool) -> None:
    assert is_call(text) is expected


def test_grammar_output_round_trips_through_the_parser() -> None:
    grammar = tool_grammar(TOOLS, "auto", True)
    assert grammar is not None
    text = PARIS + SUM
    assert admits(grammar, text)
    assert [c.name for c in parse_tool_calls(text)] == ["get_weather", "add"]


# ----------------------------------------------------------------------------- $ref in tool parameters
# A tool's parameters sit inside the call schema (as its ``arguments``), so their local refs must be
# rebased to resolve as in the caller's schema: before, ``#/$defs/Loc`` was looked up at the call
# schema's root (llguidance: "Pointer '/$defs/Loc' does not exist") and ``#`` meant the whole call.


class Loc(BaseModel):
    city: str
    country: str


class Trip(BaseModel):
    origin: Loc
    stops: list[Loc]


def tool(name: str, parameters: dict[str, Any]) -> ToolSpec:
    return ToolSpec.model_validate({"function": {"name": name, "parameters": parameters}})


def compiled(grammar: str | None) -> str:
    """The grammar, checked to compile (an unresolvable ``$ref`` is a compile error)."""
    assert grammar is not None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_lark(grammar), TOKENIZER
    )
    assert not is_error, messages
    return grammar


PARIS_LOC = {"city": "Paris", "country": "FR"}
DRAFT7 = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "definitions": {"Unit": {"enum": ["C", "F"]}},
    "properties": {"city": {"type": "string"}, "unit": {"$ref": "#/definitions/Unit"}},
    "required": ["city", "unit"],
}
RECURSIVE = {"properties": {"city": {"type": "string"}, "next": {"$ref": "#"}}}


@pytest.mark.parametrize(
    ("parameters", "arguments", "admitted"),
    [
        (Trip.model_json_schema(), {"origin": PARIS_LOC, "stops": [PARIS_LOC]}, True),
        (Trip.model_json_schema(), {"origin": PARIS_LOC, "stops": []}, True),
        (Trip.model_json_schema(), {"origin": {"city": "Paris"}, "stops": []}, False),
        (Trip.model_json_schema(), {"origin": PARIS_LOC, "stops": [{"country": "FR"}]}, False),
        (DRAFT7, {"city": "Paris", "unit": "C"}, True),
        (DRAFT7, {"city": "Paris", "unit": "K"}, False),
        (RECURSIVE, {"city": "Paris", "next": {"city": "Lyon", "next": {}}}, True),
        (RECURSIVE, {"city": "Paris", "next": {"name": "trip", "arguments": {}}}, False),
        (RECURSIVE, {"city": "Paris", "next": {"city": 1}}, False),
        # A root ``$ref`` (draft-7 generators): no additionalProperties beside it, which would forbid
        # every property of the referenced schema.
        ({"$ref": "#/definitions/L", "definitions": {"L": Loc.model_json_schema()}}, PARIS_LOC, True),
        ({"$ref": "#/definitions/L", "definitions": {"L": Loc.model_json_schema()}}, {"city": "P"}, False),
        # A schema with its own ``$id`` is a resource: its refs resolve against it and are left alone.
        ({**Loc.model_json_schema(), "$id": "urn:example:loc"}, PARIS_LOC, True),
    ],
)
def test_tool_parameter_refs_resolve_as_in_the_callers_schema(
    parameters: dict[str, Any], arguments: dict[str, Any], admitted: bool
) -> None:
    grammar = compiled(tool_grammar([tool("trip", parameters)], "required", False))
    assert admits(grammar, call("trip", arguments)) is admitted
    assert admits(grammar, qwen_call("trip", arguments)) is admitted
    if admitted:  # the independent check reads the caller's own schema, and passes what the grammar admits
        assert check_tool_calls(call("trip", arguments), {"trip": parameters}).satisfied


def test_tools_whose_defs_share_a_name_keep_their_own() -> None:
    ints = tool(
        "ints",
        {"type": "object", "properties": {"v": {"$ref": "#/$defs/V"}}, "$defs": {"V": {"type": "integer"}}},
    )
    strs = tool(
        "strs",
        {"type": "object", "properties": {"v": {"$ref": "#/$defs/V"}}, "$defs": {"V": {"type": "string"}}},
    )
    grammar = compiled(tool_grammar([ints, strs], "required", True))
    assert admits(grammar, call("ints", {"v": 1}) + call("strs", {"v": "a"}))
    assert not admits(grammar, call("ints", {"v": "a"}))
    assert not admits(grammar, call("strs", {"v": 1}))


def test_rebasing_refs_does_not_mutate_the_tool_schema() -> None:
    trip = tool("trip", Trip.model_json_schema())
    before = trip.model_dump()
    tool_grammar([trip], "auto", True)
    assert trip.model_dump() == before


def test_refs_in_data_and_property_names_are_kept_apart() -> None:
    # A property named like a data keyword holds a schema (its ref is rebased); ``const`` holds data.
    parameters = {
        "type": "object",
        "properties": {"default": {"$ref": "#/$defs/V"}, "tag": {"const": {"$ref": "#"}}},
        "required": ["default", "tag"],
        "$defs": {"V": {"type": "integer"}},
    }
    grammar = compiled(tool_grammar([tool("t", parameters)], "required", False))
    assert admits(grammar, call("t", {"default": 1, "tag": {"$ref": "#"}}))
    assert not admits(grammar, call("t", {"default": "x", "tag": {"$ref": "#"}}))


def test_a_tool_without_refs_gets_the_same_call_schema() -> None:
    # Unchanged for tools without refs (the compile cache and its timings stay as they were).
    grammar = tool_grammar([ADD], "add", False)
    assert grammar is not None
    arguments = {**ADD.function.parameters, "additionalProperties": False}
    assert f'"arguments": {json.dumps(arguments)}' in grammar


@pytest.mark.parametrize(
    "parameters", [{"type": "string"}, {"type": "array", "items": {}}, {"type": ["object", "null"]}]
)
def test_tool_parameters_that_are_not_an_object_schema_are_refused(parameters: dict[str, Any]) -> None:
    request = {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [WEATHER.model_dump(), tool("lookup", parameters).model_dump()],
    }
    with pytest.raises(
        ValidationError, match=r"tool 'lookup': function\.parameters must be a JSON Schema for an object"
    ):
        GenerateRequest.model_validate(request)
