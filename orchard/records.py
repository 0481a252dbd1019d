"""Records that cross process boundaries: prompts, completions, groups, batches.

Every record has an explicit, versioned msgpack serialisation (`to_bytes` / `from_bytes`); nothing
is pickled into Redis. A `Group` — all completions of one prompt — is the unit of storage, because
group-relative losses need every completion of a prompt together.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack

#: Bumped whenever the wire layout of `Group` changes; readers refuse versions they do not know.
SCHEMA_VERSION = 4
#: Older layouts this build still reads (their records lack fields added since; defaults apply).
READABLE_SCHEMAS = (1, 2, 3, 4)
#: Roles a chat message of a prompt may have.
CHAT_ROLES = ("system", "user", "assistant")

#: Where a completion came from. "sample": plain sampling from the prompt; "hint": sampled with a
#: hint in context but trained as if the context had none (its logprobs are the hinted behaviour
#: policy's, so the importance ratio corrects for the hint); "tree": a trajectory recorded by tree
#: search; "cache": a cached solution mixed back into a later group.
COMPLETION_SOURCES = ("sample", "hint", "tree", "cache")


def observed_tokens(spans: list[tuple[int, int]]) -> int:
    """How many tokens the observation spans `[start, end)` of a multi-turn completion cover."""
    return sum(end - start for start, end in spans)


class RecordError(ValueError):
    """A serialised record could not be read (wrong schema version, missing or malformed field)."""


@dataclass(frozen=True)
class ChatMessage:
    """One message of a prompt given as a conversation."""

    role: str  # one of CHAT_ROLES
    content: str

    def __post_init__(self) -> None:
        if self.role not in CHAT_ROLES:
            raise RecordError(f"chat message role {self.role!r} is not one of {CHAT_ROLES}")
        if not isinstance(self.content, str):
            raise RecordError(f"chat message content must be a string, got {type(self.content).__name__}")


@dataclass(frozen=True)
class Prompt:
    """One task instance: what the model is asked and what the verifier checks against.

    `text` is the question itself: the whole prompt, or, for a prompt given as chat `messages`, the
    content of its last user message (what verifiers, hints and evaluation read). How either reaches
    the model (chat template, system prompt, prompt template) is `rollout.prompts.PromptRenderer`'s
    business, not the record's.
    """

    id: str
    text: str
    answer: str
    distribution: str
    metadata: dict[str, Any] = field(default_factory=dict)
    #: A reference solution, written as the model should write it (for SFT signals such as HPT).
    solution: str | None = None
    #: Hints from abstract to concrete, for prompts whose every sample fails (Guide, Scaf-GRPO).
    hints: tuple[str, ...] = ()
    #: The prompt as a conversation (system, earlier turns, the user's question last); empty for a
    #: prompt given as plain text.
    messages: tuple[ChatMessage, ...] = ()


@dataclass
class Completion:
    """One sampled completion with the behaviour policy's per-token logprobs."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    policy_version: int
    finish_reason: str = "stop"  # "stop" (stop string or end-of-sequence) or "length"
    reward: float = 0.0
    correct: bool = False
    verifier_error: str | None = None
    source: str = "sample"  # one of COMPLETION_SOURCES
    #: Per-token scores of a tree trajectory (the value of the step each token belongs to); None
    #: for outcome-rewarded completions, whose every token gets the completion's advantage.
    token_values: list[float] | None = None
    #: Multi-turn trajectories: `[start, end)` ranges of `token_ids` that a tool wrote (observations),
    #: in order. The policy did not sample them: their logprobs are 0 and the learner gives them no
    #: loss, KL or entropy, and counts only the other tokens.
    observation_spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def policy_token_count(self) -> int:
        """Tokens the policy sampled: all but the observations'."""
        return len(self.token_ids) - observed_tokens(self.observation_spans)

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise RecordError(
                f"completion has {len(self.token_ids)} token ids but {len(self.logprobs)} logprobs;"
                " the engine must return one logprob per generated token"
            )
        if self.source not in COMPLETION_SOURCES:
            raise RecordError(f"completion source {self.source!r} is not one of {COMPLETION_SOURCES}")
        if self.token_values is not None and len(self.token_values) != len(self.token_ids):
            raise RecordError(
                f"completion has {len(self.token_ids)} token ids but {len(self.token_values)} token values"
            )
        spans = [tuple(span) for span in self.observation_spans]  # msgpack returns lists
        previous_end = 0
        for span in spans:
            if len(span) != 2 or not all(isinstance(i, int) for i in span):
                raise RecordError(f"observation span {list(span)!r} is not a pair of token indices [start, end)")
            start, end = span
            if not previous_end <= start < end <= len(self.token_ids):
                raise RecordError(
                    f"observation spans {[list(s) for s in spans]} must be ordered, non-empty and non-overlapping"
                    f" ranges of the completion's {len(self.token_ids)} tokens"
                )
            previous_end = end
        self.observation_spans = spans  # type: ignore[assignment]


@dataclass
class Group:
    """All completions of one prompt, generated by one worker, stamped with the policy version."""

    prompt: Prompt
    prompt_token_ids: list[int]
    completions: list[Completion]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    worker: str = ""
    created_at: float = 0.0

    @property
    def policy_version(self) -> int:
        """The oldest policy version that produced any completion of the group."""
        return min((c.policy_version for c in self.completions), default=0)

    @property
    def rewards(self) -> list[float]:
        return [c.reward for c in self.completions]

    @property
    def pass_rate(self) -> float:
        if not self.completions:
            return 0.0
        return sum(c.correct for c in self.completions) / len(self.completions)

    @property
    def has_signal(self) -> bool:
        """True when rewards differ inside the group, so group-relative advantages are non-zero."""
        rewards = self.rewards
        return bool(rewards) and max(rewards) != min(rewards)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)

    def to_bytes(self) -> bytes:
        # Built by hand: `dataclasses.asdict` deep-copies every list and costs ~10x the packing.
        prompt = self.prompt
        payload = {
            "schema": SCHEMA_VERSION,
            "prompt": {
                "id": prompt.id,
                "text": prompt.text,
                "answer": prompt.answer,
                "distribution": prompt.distribution,
                "metadata": prompt.metadata,
                "solution": prompt.solution,
                "hints": list(prompt.hints),
                "messages": [[message.role, message.content] for message in prompt.messages],
            },
            "prompt_token_ids": self.prompt_token_ids,
            "completions": [
                {
                    "text": c.text,
                    "token_ids": c.token_ids,
                    "logprobs": c.logprobs,
                    "policy_version": c.policy_version,
                    "finish_reason": c.finish_reason,
                    "reward": c.reward,
                    "correct": c.correct,
                    "verifier_error": c.verifier_error,
                    "source": c.source,
                    "token_values": c.token_values,
                    "observation_spans": c.observation_spans,
                }
                for c in self.completions
            ],
            "id": self.id,
            "worker": self.worker,
            "created_at": self.created_at,
        }
        return msgpack.packb(payload, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> Group:
        try:
            payload = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as error:  # msgpack raises several unrelated types
            raise RecordError(f"group payload is not valid msgpack: {error}") from error
        if not isinstance(payload, dict):
            raise RecordError(f"group payload must be a map, got {type(payload).__name__}")
        schema = payload.pop("schema", None)
        if schema not in READABLE_SCHEMAS:
            raise RecordError(f"group schema version {schema!r} is not supported (this build reads {READABLE_SCHEMAS})")
        try:
            prompt_fields = payload.pop("prompt")
            messages = tuple(ChatMessage(role, content) for role, content in prompt_fields.get("messages", ()))
            prompt = Prompt(**{**prompt_fields, "hints": tuple(prompt_fields.get("hints", ())), "messages": messages})
            completions = [Completion(**c) for c in payload.pop("completions")]
            return cls(prompt=prompt, completions=completions, **payload)
        except (KeyError, TypeError, ValueError) as error:
            raise RecordError(f"group payload is malformed: {error}") from error
