"""Schema -> constraint conversion and constrained output -> objects (``langchain_ananke.parsers``)."""

from __future__ import annotations

import copy
import typing
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForLLMRun
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult, Generation
from langchain_core.runnables import RunnableLambda
from langchain_core.utils.function_calling import convert_to_json_schema
from pydantic import BaseModel, Field
from pydantic.v1 import BaseModel as BaseModelV1
from typing_extensions import TypedDict

from langchain_ananke.errors import AnankeError, ConstraintNotSatisfiedError
from langchain_ananke.parsers import (
    AnankeOutputParser,
    Choice,
    Grammar,
    JsonSchema,
    Regex,
    TokenMask,
    structured_runnable,
    to_constraints,
    to_json_schema,
)
from langchain_ananke.parsers.constraints import answer_schema, close_objects, schema_name
from langchain_ananke.protocol import Constraints

# ----------------------------------------------------------------------------- fixtures


class Person(BaseModel):
    """A person."""

    name: str
    age: int


class Node(BaseModel):
    """A recursive tree."""

    value: int
    children: list[Node] = []


class Movie(TypedDict):
    title: str
    year: int


class StdlibMovie(typing.TypedDict):
    title: str
    year: int


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["tags"],
}
FUNCTION = {"name": "search", "description": "Search the web.", "parameters": SCHEMA}
TOOL = {"type": "function", "function": FUNCTION}


# ----------------------------------------------------------------------------- to_constraints


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Regex("[0-9]{3}"), {"regex": "[0-9]{3}"}),
        (Grammar('start: "a"'), {"grammar": 'start: "a"'}),
        (Choice(("yes", "no")), {"choice": ["yes", "no"]}),
        (JsonSchema(SCHEMA), {"json_schema": SCHEMA}),
        (JsonSchema(SCHEMA, whitespace="flexible"), {"json_schema": SCHEMA, "whitespace": "flexible"}),
        (TokenMask(allowed_tokens=(1, 2)), {"token_mask": {"allowed_tokens": [1, 2]}}),
        (TokenMask(forbidden_tokens=[9]), {"token_mask": {"forbidden_tokens": [9]}}),
        ({"regex": "a+"}, {"regex": "a+"}),
        ({"json_object": True}, {"json_object": True}),
        ({"regex_patterns": ["a", "b"]}, {"regex_patterns": ["a", "b"]}),
        (
            {"json_schema": SCHEMA, "whitespace": "flexible"},
            {"json_schema": SCHEMA, "whitespace": "flexible"},
        ),
        (Constraints(choice=["x"]), {"choice": ["x"]}),
    ],
)
def test_to_constraints(value: Any, expected: dict[str, Any]) -> None:
    assert to_constraints(value).model_dump(exclude_defaults=True) == expected


def test_to_constraints_returns_a_given_constraints_object_as_is() -> None:
    given = Constraints(regex="a")
    assert to_constraints(given) is given


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (
            {"regex": "a", "grammar": 'start: "a"'},
            "exactly one constraint per request, got 2: regex, grammar",
        ),
        ({}, "constraints is empty"),
        ({"pattern": "a"}, "invalid constraints"),
        ({"choice": []}, "must be a non-empty list"),
        (Choice(()), "must be a non-empty list"),
        (TokenMask(), "token_mask needs"),
    ],
)
def test_to_constraints_rejects_bad_input_with_value_error(value: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        to_constraints(value)


@pytest.mark.parametrize("value", ["[0-9]+", 42, ["a"], None])
def test_to_constraints_rejects_other_types(value: Any) -> None:
    with pytest.raises(TypeError, match="not a constraint"):
        to_constraints(value)


@pytest.mark.parametrize(
    "make",
    [
        lambda schema: {"json_schema": schema},
        JsonSchema,
    ],
    ids=["dict", "JsonSchema"],
)
def test_to_constraints_never_shares_or_mutates_the_callers_schema(make: Any) -> None:
    schema = copy.deepcopy(SCHEMA)
    constraints = to_constraints(make(schema))
    assert constraints.json_schema is not None
    constraints.json_schema["properties"]["tags"]["items"]["type"] = "integer"
    constraints.json_schema["required"].append("other")
    assert schema == SCHEMA


# ----------------------------------------------------------------------------- to_json_schema


def test_to_json_schema_pydantic_class() -> None:
    schema = to_json_schema(Person)
    assert schema["type"] == "object"
    assert schema["title"] == "Person"
    assert set(schema["properties"]) == {"name", "age"}
    assert schema["properties"]["age"]["type"] == "integer"
    assert sorted(schema["required"]) == ["age", "name"]


def test_to_json_schema_recursive_pydantic_class_uses_defs() -> None:
    schema = to_json_schema(Node)
    assert "Node" in schema["$defs"]
    assert schema["$ref"] == "#/$defs/Node"
    node = schema["$defs"]["Node"]
    assert node["properties"]["children"]["items"] == {"$ref": "#/$defs/Node"}


@pytest.mark.parametrize(
    "typed_dict",
    [
        pytest.param(
            Movie,
        ),
        pytest.param(
            StdlibMovie,
        ),
    ],
    ids=["typing_extensions", "typing"],
)
def test_to_json_schema_typeddict(typed_dict: type) -> None:
    schema = to_json_schema(typed_dict)
    assert schema["type"] == "object"
    assert schema["properties"]["title"]["type"] == "string"
    assert schema["properties"]["year"]["type"] == "integer"
    assert sorted(schema["required"]) == ["title", "year"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (SCHEMA, SCHEMA),
        (FUNCTION, SCHEMA),
        (TOOL, SCHEMA),
        ({"type": "string"}, {"type": "string"}),
    ],
    ids=["json-schema", "function", "tool", "scalar-schema"],
)
def test_to_json_schema_dicts(value: dict[str, Any], expected: dict[str, Any]) -> None:
    original = copy.deepcopy(value)
    schema = to_json_schema(value)
    assert schema == expected
    schema["required"] = ["changed"]
    schema.setdefault("properties", {})["new"] = {}
    assert value == original


@pytest.mark.parametrize(
    "value",
    [
        {"name": "now", "description": "The current time."},
        {"type": "function", "function": {"name": "now", "description": "The current time."}},
    ],
    ids=["function", "tool"],
)
def test_to_json_schema_function_without_parameters_is_an_empty_object(value: dict[str, Any]) -> None:
    assert to_json_schema(value) == {"type": "object", "properties": {}}


class PersonV1(BaseModelV1):
    name: str
    age: int


def test_to_json_schema_pydantic_v1_class() -> None:
    schema = to_json_schema(PersonV1)
    assert schema["properties"]["age"]["type"] == "integer"
    assert sorted(schema["required"]) == ["age", "name"]


@pytest.mark.parametrize(
    ("strict", "closed"), [(None, True), (True, True), (False, False)], ids=["default", "strict", "open"]
)
def test_answer_schema_closes_objects_unless_strict_is_false(strict: bool | None, closed: bool) -> None:
    schema = answer_schema(Person, strict)
    assert ("additionalProperties" in schema) is closed
    assert schema == (close_objects(to_json_schema(Person)) if closed else to_json_schema(Person))


@pytest.mark.parametrize("value", ["a string", 3, Person(name="a", age=1), int, ["list"]])
def test_to_json_schema_rejects_unsupported(value: Any) -> None:
    with pytest.raises(TypeError, match="unsupported schema"):
        to_json_schema(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Person, "Person"),
        (Movie, "Movie"),
        (TOOL, "search"),
        (FUNCTION, "search"),
        ({"title": "Invoice", "type": "object"}, "Invoice"),
        (SCHEMA, "output"),
        ({"type": "function", "function": {"description": "no name"}}, "output"),
        ("not a schema", "output"),
    ],
)
def test_schema_name(value: Any, expected: str) -> None:
    assert schema_name(value) == expected


# ----------------------------------------------------------------------------- AnankeOutputParser


def chat_generation(text: str, **metadata: Any) -> ChatGeneration:
    return ChatGeneration(message=AIMessage(content=text, response_metadata=metadata))


SATISFIED = {"constraint_satisfied": True, "finish_reason": "stop"}
UNSATISFIED = {
    "constraint_satisfied": False,
    "constraint_error": "generation stopped at max_tokens before the constraint completed",
    "finish_reason": "length",
}


@pytest.mark.parametrize(
    ("parser", "text", "expected"),
    [
        (
            AnankeOutputParser(target="pydantic", pydantic_model=Person),
            '{"name": "Ada", "age": 36}',
            Person(name="Ada", age=36),
        ),
        (AnankeOutputParser(target="json"), '{"a": [1, 2, {"b": null}]}', {"a": [1, 2, {"b": None}]}),
        (AnankeOutputParser(target="json"), "[1, 2]", [1, 2]),
        (AnankeOutputParser(target="text"), "  not json {", "  not json {"),
    ],
    ids=["pydantic", "json-object", "json-array", "text"],
)
@pytest.mark.parametrize(
    "metadata", [SATISFIED, {}, {"constraint_satisfied": None}], ids=["ok", "none", "unchecked"]
)
def test_parser_targets(
    parser: AnankeOutputParser, text: str, expected: Any, metadata: dict[str, Any]
) -> None:
    assert parser.parse_result([chat_generation(text, **metadata)]) == expected


@pytest.mark.parametrize("target", ["json", "text", "pydantic"])
def test_unsatisfied_output_raises(target: Any) -> None:
    parser = AnankeOutputParser(target=target, pydantic_model=Person if target == "pydantic" else None)
    text = '{"name": "Ada", "age": 3'
    with pytest.raises(ConstraintNotSatisfiedError, match="max_tokens") as info:
        parser.parse_result([chat_generation(text, **UNSATISFIED)])
    error = info.value
    assert isinstance(error, OutputParserException)
    assert isinstance(error, AnankeError)
    assert error.finish_reason == "length"
    assert error.llm_output == text


def test_unsatisfied_plain_generation_raises_from_generation_info() -> None:
    parser = AnankeOutputParser(target="text")
    with pytest.raises(ConstraintNotSatisfiedError, match="constraint not satisfied"):
        parser.parse_result([Generation(text="abc", generation_info={"constraint_satisfied": False})])


def test_unsatisfied_is_not_checked_while_partial() -> None:
    parser = AnankeOutputParser(target="json")
    generation = chat_generation('{"a": 1, "b": "x', **UNSATISFIED)
    assert parser.parse_result([generation], partial=True) == {"a": 1, "b": "x"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ("   ", None),
        ("{", {}),
        ('{"a": 1', {"a": 1}),
        ('{"a": 1, "b": "hel', {"a": 1, "b": "hel"}),
        ('{"a": [1, 2', {"a": [1, 2]}),
        ('{"a": {"b": true}}', {"a": {"b": True}}),
    ],
)
def test_partial_json(text: str, expected: Any) -> None:
    assert AnankeOutputParser(target="json").parse_result([Generation(text=text)], partial=True) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"name": "Ada"', None),
        ('{"name": "Ada", "age": 3', Person(name="Ada", age=3)),
    ],
)
def test_partial_pydantic_is_none_until_valid(text: str, expected: Person | None) -> None:
    parser = AnankeOutputParser(target="pydantic", pydantic_model=Person)
    assert parser.parse_result([Generation(text=text)], partial=True) == expected


@pytest.mark.parametrize(
    ("parser", "text", "match"),
    [
        (AnankeOutputParser(target="json"), '{"a": 1', "output is not JSON"),
        (AnankeOutputParser(target="json"), "hello", "output is not JSON"),
        (
            AnankeOutputParser(target="pydantic", pydantic_model=Person),
            '{"name": "Ada"}',
            "output does not validate as Person",
        ),
        (
            AnankeOutputParser(target="pydantic", pydantic_model=Person),
            '{"name": "Ada", "age": "old"}',
            "output does not validate as Person",
        ),
    ],
)
def test_invalid_output_raises_output_parser_exception(
    parser: AnankeOutputParser, text: str, match: str
) -> None:
    with pytest.raises(OutputParserException, match=match) as info:
        parser.parse_result([chat_generation(text, **SATISFIED)])
    assert not isinstance(info.value, ConstraintNotSatisfiedError)
    assert info.value.llm_output == text


def test_parse_plain_text() -> None:
    assert AnankeOutputParser(target="json").parse('{"x": 1}') == {"x": 1}


@pytest.mark.parametrize(
    ("calls", "expected"),
    [
        ([{"name": "Person", "args": {"name": "Ada", "age": 36}, "id": "1"}], Person(name="Ada", age=36)),
        (
            [
                {"name": "other", "args": {}, "id": "0"},
                {"name": "Person", "args": {"name": "B", "age": 2}, "id": "1"},
            ],
            Person(name="B", age=2),
        ),
    ],
)
def test_tool_target(calls: list[dict[str, Any]], expected: Person) -> None:
    parser = AnankeOutputParser(target="tool", pydantic_model=Person, tool_name="Person")
    message = AIMessage(content="", tool_calls=calls)
    assert parser.parse_result([ChatGeneration(message=message)]) == expected


def test_tool_target_without_the_call_raises() -> None:
    parser = AnankeOutputParser(target="tool", tool_name="Person")
    message = AIMessage(content="I'd rather not.")
    with pytest.raises(OutputParserException, match="did not call Person"):
        parser.parse_result([ChatGeneration(message=message)])
    assert parser.parse_result([ChatGeneration(message=message)], partial=True) is None


def test_streamed_json_yields_growing_partials_then_the_final_value() -> None:
    chunks = ['{"na', 'me": "A', 'da", "ag', 'e": 36}']
    out = list(AnankeOutputParser(target="json").transform(iter(chunks)))
    assert out[-1] == {"name": "Ada", "age": 36}
    assert {"name": "A"} in out
    assert all(isinstance(item, dict) for item in out)


def test_streamed_messages_check_the_final_metadata() -> None:
    chunks = [
        AIMessageChunk(content='{"a": '),
        AIMessageChunk(content="1", response_metadata=UNSATISFIED),
    ]
    parser = AnankeOutputParser(target="json")
    seen: list[Any] = []
    with pytest.raises(ConstraintNotSatisfiedError):
        seen.extend(parser.transform(iter(chunks)))
    assert seen == [{}, {"a": 1}]


async def test_astreamed_messages_check_the_final_metadata() -> None:
    async def chunks() -> Any:
        yield AIMessageChunk(content='{"a": ')
        yield AIMessageChunk(content="1}", response_metadata=SATISFIED)

    out = [item async for item in AnankeOutputParser(target="json").atransform(chunks())]
    assert out[-1] == {"a": 1}


def test_stream_with_no_output_raises() -> None:
    with pytest.raises(OutputParserException, match="no output"):
        list(AnankeOutputParser(target="json").transform(iter([])))


# ----------------------------------------------------------------------------- structured_runnable


class FixedChatModel(BaseChatModel):
    """Answers every call with one fixed message and records the keywords it was called with."""

    reply: AIMessage
    calls: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "fixed"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.calls.append(kwargs)
        return ChatResult(generations=[ChatGeneration(message=self.reply)])

    def bind_tools(self, tools: Any, *, tool_choice: str | None = None, **kwargs: Any) -> Any:
        return self.bind(tools=tools, tool_choice=tool_choice, **kwargs)


def fixed(text: str, metadata: dict[str, Any], **extra: Any) -> FixedChatModel:
    return FixedChatModel(reply=AIMessage(content=text, response_metadata=metadata, **extra), calls=[])


def test_structured_runnable_binds_the_schema_and_parses() -> None:
    model = fixed('{"name": "Ada", "age": 36}', SATISFIED)
    assert structured_runnable(model, Person).invoke("who?") == Person(name="Ada", age=36)
    assert model.calls[0]["constraints"] == Constraints(json_schema=close_objects(Person.model_json_schema()))


def test_structured_runnable_binds_the_tracing_schema_already_converted() -> None:
    # LangChain converts ls_structured_output_format["schema"] on every call; a class would rebuild
    # its JSON Schema each time, a converted dict passes through unchanged.
    runnable = structured_runnable(fixed("{}", SATISFIED), Person)
    fmt = runnable.first.kwargs["ls_structured_output_format"]  # type: ignore[attr-defined]
    assert fmt == {
        "kwargs": {"method": "json_schema", "strict": None},
        "schema": convert_to_json_schema(Person),
    }
    assert convert_to_json_schema(fmt["schema"]) == fmt["schema"]


def test_structured_runnable_json_mode_returns_a_dict() -> None:
    model = fixed('{"name": "Ada", "age": 36}', SATISFIED)
    assert structured_runnable(model, SCHEMA, method="json_mode").invoke("x") == {"name": "Ada", "age": 36}
    assert model.calls[0]["constraints"] == Constraints(json_object=True)


@pytest.mark.parametrize(
    ("schema", "kind"),
    [(Regex("[0-9]+"), "regex"), (Choice(["1", "2"]), "choice"), (Grammar('start: "1"'), "grammar")],
)
def test_structured_runnable_text_constraints_return_the_string(schema: Any, kind: str) -> None:
    model = fixed("1", SATISFIED)
    assert structured_runnable(model, schema).invoke("x") == "1"
    assert model.calls[0]["constraints"].kind == kind


def test_structured_runnable_raises_when_unsatisfied() -> None:
    model = fixed('{"name": "Ada", "age"', UNSATISFIED)
    with pytest.raises(ConstraintNotSatisfiedError):
        structured_runnable(model, Person).invoke("x")


def test_include_raw_success() -> None:
    model = fixed('{"name": "Ada", "age": 36}', SATISFIED)
    out = structured_runnable(model, Person, include_raw=True).invoke("x")
    assert set(out) == {"raw", "parsed", "parsing_error"}
    assert isinstance(out["raw"], AIMessage)
    assert out["raw"].content == '{"name": "Ada", "age": 36}'
    assert out["parsed"] == Person(name="Ada", age=36)
    assert out["parsing_error"] is None


@pytest.mark.parametrize(
    ("text", "metadata", "error"),
    [
        ('{"name": "Ada", "age"', UNSATISFIED, ConstraintNotSatisfiedError),
        ('{"name": "Ada"}', SATISFIED, OutputParserException),
    ],
    ids=["unsatisfied", "invalid"],
)
def test_include_raw_reports_the_parsing_error(text: str, metadata: dict[str, Any], error: type) -> None:
    model = fixed(text, metadata)
    out = structured_runnable(model, Person, include_raw=True).invoke("x")
    assert set(out) == {"raw", "parsed", "parsing_error"}
    assert out["raw"].content == text
    assert out["raw"].response_metadata["constraint_satisfied"] is metadata["constraint_satisfied"]
    assert out["parsed"] is None
    assert isinstance(out["parsing_error"], error)


def test_function_calling_forces_the_tool_and_parses_its_arguments() -> None:
    call = {"name": "Person", "args": {"name": "Ada", "age": 36}, "id": "call_1"}
    model = fixed("", SATISFIED, tool_calls=[call])
    assert structured_runnable(model, Person, method="function_calling").invoke("x") == Person(
        name="Ada", age=36
    )
    kwargs = model.calls[0]
    assert kwargs["tool_choice"] == "Person"
    assert kwargs["parallel_tool_calls"] is False
    assert kwargs["tools"][0]["function"]["name"] == "Person"
    assert kwargs["tools"][0]["function"]["parameters"] == close_objects(Person.model_json_schema())
    assert kwargs["tools"][0]["function"]["description"] == "A person."


def test_function_calling_needs_bind_tools() -> None:
    model = RunnableLambda(lambda _: AIMessage(content="{}"))
    with pytest.raises(ValueError, match="needs a chat model"):
        structured_runnable(model, Person, method="function_calling")


def test_unknown_method_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        structured_runnable(fixed("{}", SATISFIED), Person, method="xml")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        (
            {"type": "object", "properties": {"a": {"type": "string"}}},
            {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False},
        ),
        (
            {"type": "object", "properties": {}, "additionalProperties": True},
            {"type": "object", "properties": {}, "additionalProperties": True},
        ),
        (
            {"$defs": {"x": {"type": "object", "properties": {"b": {}}}}, "$ref": "#/$defs/x"},
            {
                "$defs": {"x": {"type": "object", "properties": {"b": {}}, "additionalProperties": False}},
                "$ref": "#/$defs/x",
            },
        ),
        (
            {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]},
            {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]},
        ),
        (
            {"type": "array", "items": {"type": "object", "properties": {"c": {}}}},
            {
                "type": "array",
                "items": {"type": "object", "properties": {"c": {}}, "additionalProperties": False},
            },
        ),
    ],
)
def test_close_objects(schema: dict[str, Any], expected: dict[str, Any]) -> None:
    original = copy.deepcopy(schema)
    assert close_objects(schema) == expected
    assert schema == original


# ------------------------------------------------------------------ the structured runnable
class CallbackCount(BaseCallbackHandler):
    def __init__(self) -> None:
        self.chains = 0
        self.models = 0

    def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
        self.chains += 1

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        self.models += 1


def test_structured_runnable_is_the_model_piped_into_the_parser() -> None:
    runnable = structured_runnable(fixed('{"name": "Ada", "age": 36}', SATISFIED), Person)
    counts = CallbackCount()
    assert runnable.invoke("who?", {"callbacks": [counts]}) == Person(name="Ada", age=36)
    assert (counts.models, counts.chains) == (1, 2)  # one model run, in a sequence with the parser


async def test_structured_runnable_ainvoke_and_abatch() -> None:
    runnable = structured_runnable(fixed('{"name": "Ada", "age": 36}', SATISFIED), Person)
    assert await runnable.ainvoke("x") == Person(name="Ada", age=36)
    assert await runnable.abatch(["x", "y"]) == [Person(name="Ada", age=36)] * 2


def test_structured_runnable_raises_the_parsers_errors() -> None:
    with pytest.raises(ConstraintNotSatisfiedError):
        structured_runnable(fixed('{"name": "Ada"', UNSATISFIED), Person).invoke("x")
    with pytest.raises(OutputParserException):
        structured_runnable(fixed('{"name": 1}', SATISFIED), Person).invoke("x")


def test_structured_runnable_batch_returns_exceptions_when_asked() -> None:
    runnable = structured_runnable(fixed('{"name": "Ada"', UNSATISFIED), Person)
    out = runnable.batch(["x", "y"], return_exceptions=True)
    assert [type(o) for o in out] == [ConstraintNotSatisfiedError] * 2
    with pytest.raises(ConstraintNotSatisfiedError):
        runnable.batch(["x"])


def test_structured_runnable_streams_partials_through_the_parser() -> None:
    runnable = structured_runnable(fixed('{"name": "Ada", "age": 36}', SATISFIED), SCHEMA)
    chunks = list(runnable.stream("x"))
    assert chunks[-1] == {"name": "Ada", "age": 36}
    assert isinstance(runnable.last, AnankeOutputParser)  # type: ignore[attr-defined]


def test_structured_runnable_composes_like_any_runnable() -> None:
    runnable = structured_runnable(fixed('{"name": "Ada", "age": 36}', SATISFIED), Person)
    chain = RunnableLambda(lambda x: f"who is {x}?") | runnable | RunnableLambda(lambda p: p.name)
    assert chain.invoke("Ada") == "Ada"
