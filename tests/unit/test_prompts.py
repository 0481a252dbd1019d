"""What the model sees of a prompt: chat templates, system prompt, prompt template, hints, and the tokens
that end an answer, with the character tokenizer and with an instruct tokenizer built here."""

from __future__ import annotations

import pytest

from orchard.config import DataConfig, TinyModelConfig
from orchard.records import ChatMessage, Prompt
from orchard.rollout.instruct_model import CHATML_TEMPLATE, write_instruct_model
from orchard.rollout.prompts import PromptFormat, PromptFormatError, PromptRenderer, encode_prompt
from orchard.rollout.tokenizer import CharTokenizer, HFTokenizer

QUESTION = Prompt(id="q", text="12+34=", answer="46", distribution="addition/d1")
CHAT = Prompt(
    id="c",
    text="What is 6*7?",
    answer="42",
    distribution="gsm",
    messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "What is 6*7?")),
)


@pytest.fixture(scope="module")
def instruct(tmp_path_factory) -> HFTokenizer:
    corpus = ["What is 6*7? Put the final answer within \\boxed{}.", "12+34=", "46", "Be brief.", "42"] * 20
    directory = write_instruct_model(
        tmp_path_factory.mktemp("instruct"),
        corpus,
        TinyModelConfig(hidden_size=32, num_heads=1, num_kv_heads=1),
        vocab_size=300,
    )
    return HFTokenizer.from_pretrained(directory)


def test_the_character_tokenizer_sees_the_prompt_as_before():
    renderer = PromptRenderer(CharTokenizer())
    assert renderer.template is None and renderer.stop_token_ids == (CharTokenizer().eos_id,)
    assert renderer.encode(QUESTION) == encode_prompt(CharTokenizer(), "12+34=")
    assert renderer.encode(QUESTION, hint="starts with 4") == encode_prompt(CharTokenizer(), "starts with 4\n12+34=")
    assert renderer.encode_answer("46") == [*CharTokenizer().encode("46"), CharTokenizer().eos_id]


def test_plain_text_with_a_system_prompt_and_a_prompt_template():
    prompt_format = PromptFormat(system_prompt="Answer with digits.", prompt_template="Q: {prompt} A:")
    renderer = PromptRenderer(CharTokenizer(), prompt_format)
    assert renderer.text(QUESTION) == "Answer with digits.\n\nQ: 12+34= A:"
    assert renderer.text(CHAT) == "Be brief.\n\nQ: What is 6*7? A:"  # the prompt's own system message wins


def test_an_instruct_tokenizer_renders_through_its_chat_template(instruct):
    prompt_format = PromptFormat.from_config(
        DataConfig(
            system_prompt="You are helpful.", prompt_template="{prompt} Put the final answer within \\boxed{{}}."
        )
    )
    renderer = PromptRenderer(instruct, prompt_format)
    assert renderer.template == CHATML_TEMPLATE
    expected = (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\n12+34= Put the final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert renderer.text(QUESTION) == expected
    ids = renderer.encode(QUESTION)
    im_start = instruct.encode("<|im_start|>")
    assert len(im_start) == 1 and ids[: len(im_start)] == im_start  # control tokens, not their characters
    assert ids.count(im_start[0]) == 3
    assert instruct.decode(ids) == instruct.decode(instruct.encode(expected))
    hinted = renderer.text(CHAT, hint="think of 6*7")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in hinted and "You are helpful." not in hinted
    assert "<|im_start|>user\nthink of 6*7\nWhat is 6*7? Put the final answer" in hinted


def test_answers_end_at_the_templates_end_of_turn_token(instruct):
    renderer = PromptRenderer(instruct)
    [end_of_turn] = instruct.encode("<|im_end|>")
    assert renderer.stop_token_ids == (instruct.eos_id, end_of_turn)
    assert renderer.answer_end_id == end_of_turn
    assert renderer.encode_answer("42")[-1] == end_of_turn


def test_chat_template_none_and_a_template_file(instruct, tmp_path):
    plain = PromptRenderer(instruct, PromptFormat(chat_template="none"))
    assert plain.template is None and plain.text(CHAT) == "Be brief.\n\nWhat is 6*7?"
    assert plain.stop_token_ids == (instruct.eos_id,)
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}[assistant] ")
    custom = PromptRenderer(instruct, PromptFormat(chat_template=str(template)))
    assert custom.text(QUESTION) == "[user] 12+34= [assistant] "


def test_bad_template_settings_are_refused_with_the_field(tmp_path):
    with pytest.raises(PromptFormatError, match="data.chat_template: 'missing.jinja' is neither"):
        PromptRenderer(CharTokenizer(), PromptFormat(chat_template="missing.jinja"))
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    with pytest.raises(PromptFormatError, match="needs a Hugging Face tokenizer"):
        PromptRenderer(CharTokenizer(), PromptFormat(chat_template=str(template)))
    only_system = Prompt(id="s", text="x", answer="1", distribution="d", messages=(ChatMessage("system", "x"),))
    with pytest.raises(PromptFormatError, match="prompt 's' has chat messages but no user message"):
        PromptRenderer(CharTokenizer()).text(only_system)
    with pytest.raises(ValueError, match="must contain \\{prompt\\}"):
        DataConfig(prompt_template="no placeholder")


def test_the_question_span_separates_the_question_from_its_context(instruct):
    plain = PromptRenderer(CharTokenizer(), PromptFormat(system_prompt="Answer.", prompt_template="Q: {prompt} A:"))
    ids, span = plain.encode_with_question(QUESTION)
    assert ids == plain.encode(QUESTION)
    assert span == (1 + len("Answer.\n\nQ: "), 1 + len("Answer.\n\nQ: 12+34="))  # after the BOS token
    assert PromptRenderer(CharTokenizer()).encode_with_question(QUESTION)[1] == (1, 7)  # nothing before it
    chat = PromptRenderer(instruct, PromptFormat(prompt_template="{prompt} Put the final answer within \\boxed{{}}."))
    ids, (start, end) = chat.encode_with_question(CHAT)
    assert ids == chat.encode(CHAT)
    assert instruct.decode(ids[start:end]).strip() == "What is 6*7?"
    assert "Be brief." in instruct.decode(ids[:start]) and "boxed" in instruct.decode(ids[end:])
    odd = Prompt(id="o", text="missing", answer="", distribution="d", messages=(ChatMessage("user", "other"),))
    assert chat.encode_with_question(odd)[1] is None  # the rendered text does not hold the question
