"""What the model sees of a prompt: its conversation rendered through the tokenizer's chat template (or
as plain text), with the run's system prompt and prompt template, and the tokens that end an answer.

A `Prompt` is a question (`text`) or a conversation (`messages`, the question last). `PromptRenderer`
turns it into token ids the same way for rollouts, hinted rollouts, evaluation, tree search and the
supervised warm start, so the policy is trained and judged on exactly what it is sampled from:

1. the conversation: the prompt's messages, or one user message holding its text; the last user
   message's content goes through `data.prompt_template` (e.g. `"{prompt} Put the final answer within
   \\boxed{}."`), a hint (Guide, Scaf-GRPO) goes on its own line before that content, and
   `data.system_prompt` becomes the first message unless the conversation has a system message;
2. with a chat template (`data.chat_template: auto` and a Hugging Face tokenizer that carries one, or
   a template file), `tokenizer.apply_chat_template(conversation, add_generation_prompt=True)` gives
   the text, which is encoded without adding special tokens again (the template writes its own);
   without one, the messages' contents joined by blank lines, with the beginning-of-sequence token
   first (what the character tokenizer's demo model was trained on).

A completion ends at the tokenizer's end-of-sequence token and, with a chat template, at the template's
end-of-turn token (`stop_token_ids`), found by rendering a finished assistant turn and reading the
special token the template writes after its content (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchard.config import DataConfig
from orchard.records import ChatMessage, Prompt
from orchard.rollout.tokenizer import CharTokenizer, Tokenizer


class PromptFormatError(ValueError):
    """A chat-template setting that cannot be used with the run's tokenizer."""


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of plain text as the model sees it: beginning-of-sequence, then the text."""
    ids = tokenizer.encode(text)
    bos = getattr(tokenizer, "bos_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def hinted_prompt_text(text: str, hint: str) -> str:
    """The content a hinted sample is generated from: the hint on its own line, then the question."""
    return f"{hint}\n{text}"


@dataclass(frozen=True)
class PromptFormat:
    """The run's `data.chat_template`, `data.system_prompt` and `data.prompt_template`."""

    chat_template: str = "auto"  # "auto", "none" or the path of a Jinja template file
    system_prompt: str | None = None
    prompt_template: str = "{prompt}"

    @classmethod
    def from_config(cls, data: DataConfig) -> PromptFormat:
        return cls(data.chat_template, data.system_prompt, data.prompt_template)


def conversation(prompt: Prompt, prompt_format: PromptFormat, hint: str | None = None) -> list[ChatMessage]:
    """The messages the model is given for `prompt` (step 1 of the module docstring)."""
    messages = list(prompt.messages) or [ChatMessage("user", prompt.text)]
    last_user = max((index for index, message in enumerate(messages) if message.role == "user"), default=None)
    if last_user is None:
        raise PromptFormatError(f"prompt {prompt.id!r} has chat messages but no user message")
    content = prompt_format.prompt_template.format(prompt=messages[last_user].content)
    if hint is not None:
        content = hinted_prompt_text(content, hint)
    messages[last_user] = ChatMessage("user", content)
    if prompt_format.system_prompt is not None and not any(message.role == "system" for message in messages):
        messages.insert(0, ChatMessage("system", prompt_format.system_prompt))
    return messages


def resolve_chat_template(tokenizer: Tokenizer, setting: str) -> str | None:
    """The Jinja chat template to render with, or None for plain text: 'none' → None; 'auto' → the
    tokenizer's own template (None for the character tokenizer or a tokenizer without one); a path →
    that file's text, which needs a Hugging Face tokenizer to apply it."""
    if setting == "none":
        return None
    if setting == "auto":
        return getattr(tokenizer, "chat_template", None) or None
    path = Path(setting)
    if not path.is_file():
        raise PromptFormatError(
            f"data.chat_template: {setting!r} is neither 'auto', 'none' nor a readable template file"
        )
    if isinstance(tokenizer, CharTokenizer):
        raise PromptFormatError(
            "data.chat_template: a template file needs a Hugging Face tokenizer (model.kind 'hf'); the character"
            " tokenizer has no chat format"
        )
    return path.read_text(encoding="utf-8")


class PromptRenderer:
    """Renders prompts for one tokenizer and prompt format (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, prompt_format: PromptFormat | None = None) -> None:
        self.tokenizer = tokenizer
        self.format = prompt_format or PromptFormat()
        self.template = resolve_chat_template(tokenizer, self.format.chat_template)
        end_of_turn = self._end_of_turn_ids()
        #: Tokens that end a completion: end-of-sequence, and the template's end-of-turn token.
        self.stop_token_ids = (tokenizer.eos_id, *end_of_turn)
        #: The token a reference answer ends with in supervised targets (warm start, HPT): the one the
        #: model should write to end its turn.
        self.answer_end_id = end_of_turn[0] if end_of_turn else tokenizer.eos_id

    def text(self, prompt: Prompt, hint: str | None = None) -> str:
        """The prompt exactly as the model reads it (special tokens of the template included)."""
        messages = conversation(prompt, self.format, hint)
        if self.template is None:
            return "\n\n".join(message.content for message in messages)
        return self.tokenizer.apply_chat_template(messages, self.template)  # type: ignore[attr-defined]

    def encode(self, prompt: Prompt, hint: str | None = None) -> list[int]:
        """The prompt's token ids (what the engine is given and the learner trains after)."""
        if self.template is None:
            return encode_prompt(self.tokenizer, self.text(prompt, hint))
        # the template wrote its own special tokens as text; the tokenizer reads them back as those tokens
        return self.tokenizer.encode(self.text(prompt, hint))

    def encode_many(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        return [self.encode(prompt) for prompt in prompts]

    def encode_with_question(self, prompt: Prompt) -> tuple[list[int], tuple[int, int] | None]:
        """The prompt's token ids (as `encode`) and the `[start, end)` range of them that holds its question
        (`prompt.text`, the last user message's content): what comes before is context (system prompt,
        earlier turns, the template's text), what comes after is the template's instruction and turn end.

        The range is found by encoding the rendered text up to each end of the question's last occurrence
        and counting the tokens those encodings share with the whole: a token that spans a boundary counts
        as after it. None when the rendered text does not hold the question verbatim or it has no tokens."""
        ids = self.encode(prompt)
        text = self.text(prompt)
        at = text.rfind(prompt.text) if prompt.text else -1
        if at < 0:
            return ids, None
        start = self._shared_prefix(text[:at], ids)
        end = self._shared_prefix(text[: at + len(prompt.text)], ids)
        return ids, ((start, end) if end > start else None)

    def _shared_prefix(self, text: str, ids: Sequence[int]) -> int:
        """How many leading tokens of `ids` the encoding of `text` (a prefix of the rendered prompt) shares."""
        prefix = encode_prompt(self.tokenizer, text) if self.template is None else self.tokenizer.encode(text)
        shared = 0
        for token, expected in zip(prefix, ids, strict=False):
            if token != expected:
                break
            shared += 1
        return shared

    def encode_answer(self, answer: str) -> list[int]:
        """A reference answer as supervised target tokens, ended as the model should end its turn."""
        return [*self.tokenizer.encode(answer), self.answer_end_id]

    def _end_of_turn_ids(self) -> tuple[int, ...]:
        """The special token the template writes right after an assistant message's content."""
        if self.template is None:
            return ()
        marker = "ORCHARD-END-OF-ANSWER"
        turns = [ChatMessage("user", "?"), ChatMessage("assistant", marker)]
        render = self.tokenizer.apply_chat_template  # type: ignore[attr-defined]
        rendered = render(turns, self.template, add_generation_prompt=False)
        after = rendered.split(marker, 1)[1] if marker in rendered else ""
        ids = self.tokenizer.encode(after) if after else []
        special = self.tokenizer.special_ids  # type: ignore[attr-defined]
        first = next((token for token in ids if token in special), None)
        return () if first is None or first == self.tokenizer.eos_id else (first,)
