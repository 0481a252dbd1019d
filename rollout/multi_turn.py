"""Trajectories in turns: the policy writes, calls a tool, reads its output, and writes on.

`TurnLoop.run` advances every trajectory of a batch in lockstep through an engine's `generate`: each
turn generates until the policy closes a tool call (`call_close`, a stop string of every turn), an
ordinary stop string or end-of-sequence, or the token budget. A closed call runs (`rollout.tools`;
the calls of a turn concurrently, `tool_threads` at once), its output is appended as observation
tokens (logprob 0, recorded in `observation_spans` so the learner trains on none of them), and the
trajectory goes into the next turn with the whole sequence as its prompt (the torch engine continues
it from the keys and values it kept, vLLM from its prefix cache). A trajectory ends

- with its final answer: a turn that ends without closing a call ("stop", or "length" when the
  budget cut it);
- at the budget: `max_new_tokens` counts every token after the prompt, observations included
  ("length"; an observation that does not fit is cut to the room left);
- at a call it may not make: past `max_tool_calls`, or in its `max_turns`-th turn ("length": cut, not
  answered).

The verifier reads the final turn's text (`Trajectory.answer`), the policy's answer after what the
tools showed it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from orchard.config import MultiTurnConfig
from orchard.protocols import GenerationOutput, SamplingParams
from orchard.records import observed_tokens
from orchard.rollout.tokenizer import Tokenizer
from orchard.rollout.tools import Tool, ToolOutput, call_tool

Generate = Callable[[list[list[int]], SamplingParams], list[GenerationOutput]]

#: `TurnLoop.parse_call`'s answer for a turn that stopped at the start of a call's opening.
OPENING = "opening"


@dataclass(frozen=True)
class ToolCall:
    """One call a trajectory made: which tool, how it ended (`rollout.tools.TOOL_OUTCOMES`), and the
    error when the tool itself raised."""

    tool: str
    outcome: str
    error: str | None = None


@dataclass
class Trajectory:
    """One multi-turn completion of `prompt_ids` as it grows."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    observation_spans: list[tuple[int, int]] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    turns: int = 0
    #: Where the current turn began in `token_ids` (a turn may take several generations, see `TurnLoop`).
    turn_start: int = 0
    finish_reason: str = "length"
    #: The final turn's text, what the verifier reads.
    answer: str = ""

    @property
    def policy_tokens(self) -> int:
        return len(self.token_ids) - observed_tokens(self.observation_spans)


class TurnLoop:
    """Runs trajectories of `config`'s tools through an engine (see the module docstring)."""

    def __init__(self, config: MultiTurnConfig, tools: dict[str, Tool], tokenizer: Tokenizer) -> None:
        self.config = config
        self.tools = tools
        self.tokenizer = tokenizer
        self.close_marks = config.close_marks()
        self._pool = ThreadPoolExecutor(max_workers=config.tool_threads, thread_name_prefix="tool")

    def run(self, generate: Generate, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Trajectory]:
        """A trajectory per prompt (token ids), sampled with `params` (its `max_new_tokens` is the budget
        of the whole trajectory, its stop strings end the final answer)."""
        trajectories = [Trajectory(list(prompt)) for prompt in prompts]
        budget = params.max_new_tokens
        turn_params = dataclasses.replace(params, stop=(*params.stop, *self.close_marks.values()), resumable=True)
        active = list(range(len(trajectories)))
        while active:
            rooms = [budget - len(trajectories[i].token_ids) for i in active]
            outputs = generate(
                [trajectories[i].prompt_ids + trajectories[i].token_ids for i in active],
                dataclasses.replace(turn_params, max_new_tokens=max(rooms)),
            )
            calls: list[tuple[int, str, str]] = []
            going_on = []
            for index, output, room in zip(active, outputs, rooms, strict=True):
                call = self._take_turn(trajectories[index], output, room)
                if call == OPENING:
                    going_on.append(index)
                elif call is not None:
                    calls.append((index, *call))
            results = self._pool.map(
                lambda c: call_tool(self.tools[c[1]], c[2], max_chars=self.config.tool_output_chars), calls
            )
            active = going_on
            for (index, tool, _), result in zip(calls, results, strict=True):
                if self._observe(trajectories[index], tool, result, budget):
                    active.append(index)
        return trajectories

    def _take_turn(self, trajectory: Trajectory, output: GenerationOutput, room: int) -> tuple[str, str] | str | None:
        """Append a generation's tokens to the turn; the call to run `(tool, call text)`, OPENING when the
        generation stopped at a close mark that begins a call's opening (a fenced block's ```: the turn
        goes on), or None when the trajectory ended."""
        tokens, logprobs = output.token_ids[:room], output.logprobs[:room]
        cut = len(output.token_ids) > room
        before = self.tokenizer.decode(trajectory.token_ids[trajectory.turn_start :])  # this turn's earlier generations
        resumed = len(trajectory.token_ids) > trajectory.turn_start
        trajectory.token_ids += tokens
        trajectory.logprobs += logprobs
        trajectory.turns += int(not resumed)
        text = before + self.tokenizer.decode(tokens)
        call = None if cut or output.finish_reason != "stop" else self.parse_call(text)
        if call == OPENING:
            return OPENING
        if call is None:
            trajectory.finish_reason = "length" if cut else output.finish_reason
            trajectory.answer = text if cut else before + (output.text or self.tokenizer.decode(tokens))
            return None
        if len(trajectory.calls) >= self.config.max_tool_calls or trajectory.turns >= self.config.max_turns:
            trajectory.finish_reason, trajectory.answer = "length", text
            return None
        return call

    def parse_call(self, text: str) -> tuple[str, str] | str | None:
        """`(tool, call text)` when the turn's `text` ends with a closed call of a configured tool; OPENING
        when it ends with a close mark that no opening precedes but that begins an opening (a fenced
        block, whose ``` both opens and closes); else None."""
        opens = False
        for tool, close in self.close_marks.items():
            end = text.rfind(close)
            if end < 0 or text[end + len(close) :].strip():
                continue
            opening = self.config.call_open.replace("{tool}", tool)
            start = text.rfind(opening, 0, end)
            if start >= 0:
                return tool, text[start + len(opening) : end]
            opens = opens or opening.startswith(close)
        return OPENING if opens else None

    def _observe(self, trajectory: Trajectory, tool: str, result: ToolOutput, budget: int) -> bool:
        """Append a call's observation; whether the trajectory goes on (there is room left)."""
        trajectory.calls.append(ToolCall(tool, result.outcome, result.error))
        tokens = self.tokenizer.encode(self.config.observation.replace("{output}", result.text))
        start = len(trajectory.token_ids)
        tokens = tokens[: budget - start]
        if tokens:
            trajectory.token_ids += tokens
            trajectory.logprobs += [0.0] * len(tokens)
            trajectory.observation_spans.append((start, start + len(tokens)))
        trajectory.turn_start = len(trajectory.token_ids)  # the next turn begins after the observation
        if len(trajectory.token_ids) >= budget:
            trajectory.finish_reason, trajectory.answer = "length", ""
            return False
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def demonstration(config: MultiTurnConfig, tool_call: dict[str, str], answer: str) -> tuple[str, str, str]:
    """A whole trajectory, for a warm start to show the call format: the call of `tool_call` (`{"tool",
    "call", "output"}`, as procedural prompts carry it) as the policy writes it, its observation, and
    `answer`; apart, so that the observation can be shown without being trained on."""
    tool = tool_call["tool"]
    call = config.call_open.replace("{tool}", tool) + tool_call["call"] + config.call_close.replace("{tool}", tool)
    return call, config.observation.replace("{output}", str(tool_call["output"])), answer


def count_calls(trajectories: Sequence[Trajectory]) -> Counter[tuple[str, str]]:
    """Calls by (tool, outcome)."""
    return Counter((call.tool, call.outcome) for t in trajectories for call in t.calls)
