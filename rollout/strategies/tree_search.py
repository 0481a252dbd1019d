"""DeepSearch's search loop: one tree per prompt, advanced an expansion at a time, trees in lockstep.

The rules are `rollout.strategies.mcts`. One round of a search: expand the current node (W_d sampled
steps with expansion 'sample'; its `children_per_expansion` most probable untried one-token steps with
'prior'); score the terminal children with the verifier; keep one of them (correct > wrong complete >
incomplete, lowest −mean logprob); back its value up; record its path as a trajectory; then continue
from the best child by UCT when no terminal was reached, else from the best node of the whole tree's
frontier. The search ends after `terminate_num` trajectories (and, with `until_solved`, once one of
them is correct), when its token budget cannot pay for another expansion, or when no node is left to
expand.

`TreeSearch.request()` says what the tree needs from the engine next — sampled steps
(`ExpansionRequest`) or the most probable next tokens at a node (`PriorRequest`; expansions from a
prior already known need no engine call) — and `receive` takes the answer. `run_searches` serves
every live tree of a round with one engine call per kind of request (and step length), so a batch of
prompts is searched with as few engine calls as its deepest tree needs.

Defaults (in `orchard.config.MCTSConfig`) follow the reference code where it has them: λ_puct 2.0,
backup_threshold 0.1, incomplete_score −1.0, λ1 0.4, λ2 0.4 with the entropy term off
(involve_uncertainty_bonus), λ3 0.01, λ4 0.0, depth bonus 'sqrt', frontier restricted to nodes with
fewer than W_d children (force_to_frontier), argmax selection (deterministic_sample), backtrack
'global' (UCT from the root is not implemented). Not from the reference, chosen with
`bench/deepsearch.py --sweep` on the demo's short answers: expansion 'prior' (one-token steps, one
child per expansion, up to 16 per node) with the confidence term λc = 1 in the frontier priority.
Expansion 'sample' with longer steps (or a step delimiter such as a newline) is the reference's
search, for reasoning in lines; there a repeated step joins its sibling (`merge_duplicates`) and an
exhausted tree may draw W_d more per node while budget is left (`widen_when_exhausted`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from orchard.config import MCTSConfig
from orchard.protocols import GenerationOutput, SamplingParams, VerifierResult
from orchard.rollout.strategies.mcts import (
    Node,
    add_child,
    backup,
    choose_terminal,
    expansion_width,
    find_child,
    frontier,
    select_child,
    select_frontier,
    step_scores,
    take_prior,
    terminal_score,
    token_values,
    untried,
)

#: `generate(prefixes, params) -> one output per prefix`, e.g. `TorchEngine.generate`.
Generate = Callable[[list[list[int]], SamplingParams], list[GenerationOutput]]
#: `next_tokens(prefixes, params, top_k) -> per prefix, its most probable next tokens with their
#: logprobs`, e.g. `TorchEngine.next_token_logprobs`.
NextTokens = Callable[[list[list[int]], SamplingParams, int], list[list[tuple[int, float]]]]
#: `verify(completion text) -> VerifierResult` for the prompt being searched.
Verify = Callable[[str], VerifierResult]


# ------------------------------------------------------------------------------------------ results


@dataclass
class Trajectory:
    """A recorded root-to-terminal path: what the learner trains on, with behaviour logprobs."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    correct: bool
    reward: float
    score: float  # terminal value: +1, −1 or incomplete_score
    finished: bool  # ended with eos or a stop string (else cut at max_depth)
    step_lengths: list[int]
    step_values: list[float] = field(default_factory=list)  # `step_scores` once the search ended

    @property
    def token_values(self) -> list[float]:
        """The step scores spread over the tokens of their steps."""
        return token_values(self.step_values, self.step_lengths)

    @property
    def entropy(self) -> float:
        return -sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0


@dataclass
class SearchResult:
    """What one prompt's search found and what it cost."""

    trajectories: list[Trajectory]
    nodes_expanded: int  # expansions: a node getting new children
    nodes_generated: int  # children created
    tokens_generated: int  # tokens of every child created (the search's budget counts these)
    engine_calls: int  # requests this tree had answered (generate or next-token calls)
    stopped: str  # "terminate_num", "budget" or "exhausted"

    @property
    def solved(self) -> bool:
        return any(t.correct for t in self.trajectories)


# ------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class SearchSettings:
    """`MCTSConfig` resolved against the rollout's limits."""

    chunk_tokens: int
    max_depth: int
    max_new_tokens: int
    expansion_width: int
    min_width: int
    width_decay: int
    lambda_puct: float
    lambda_parent_value: float
    lambda_entropy: float
    lambda_depth: float
    lambda_value: float
    depth_bonus: str
    entropy_bonus: bool
    backup_threshold: float
    incomplete_score: float
    terminate_num: int
    budget_tokens: int
    advantage_temperature: float
    step_delimiter: str | None = None
    merge_duplicates: bool = True
    widen_when_exhausted: bool = True
    until_solved: bool = True
    expansion: str = "prior"
    children_per_expansion: int = 1
    prior_top_k: int = 16
    lambda_confidence: float = 1.0

    @classmethod
    def from_config(
        cls,
        config: MCTSConfig,
        *,
        max_new_tokens: int,
        group_size: int,
        budget_tokens: int | None = None,
        terminate_num: int | None = None,
    ) -> SearchSettings:
        """Derived values: max_depth = ceil(max_new_tokens / chunk_tokens); terminate_num = group_size;
        budget = 4 × group_size × max_new_tokens; explicit arguments win over the config."""
        max_depth = config.max_depth or math.ceil(max_new_tokens / config.chunk_tokens)
        return cls(
            chunk_tokens=config.chunk_tokens,
            max_depth=max_depth,
            max_new_tokens=min(max_new_tokens, max_depth * config.chunk_tokens),
            expansion_width=config.expansion_width,
            min_width=config.min_width,
            width_decay=config.width_decay,
            lambda_puct=config.lambda_puct,
            lambda_parent_value=config.lambda_parent_value,
            lambda_entropy=config.lambda_entropy,
            lambda_depth=config.lambda_depth,
            lambda_value=config.lambda_value,
            depth_bonus=config.depth_bonus,
            entropy_bonus=config.entropy_bonus,
            backup_threshold=config.backup_threshold,
            incomplete_score=config.incomplete_score,
            terminate_num=terminate_num or config.terminate_num or group_size,
            budget_tokens=budget_tokens or config.budget_tokens or 4 * group_size * max_new_tokens,
            advantage_temperature=config.advantage_temperature,
            step_delimiter=config.step_delimiter,
            merge_duplicates=config.merge_duplicates,
            widen_when_exhausted=config.widen_when_exhausted,
            until_solved=config.until_solved,
            expansion=config.expansion,
            children_per_expansion=config.children_per_expansion,
            prior_top_k=config.prior_top_k,
            lambda_confidence=config.lambda_confidence,
        )


# ------------------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class ExpansionRequest:
    """Expansion 'sample': `count` steps sampled after `prefix` (prompt + path tokens), each at most
    `max_new_tokens` long. Answered with `count` `GenerationOutput`s."""

    prefix: list[int]
    count: int
    max_new_tokens: int


@dataclass(frozen=True)
class PriorRequest:
    """Expansion 'prior': the policy's `top_k` most probable next tokens after `prefix`, answered with
    `(token id, logprob)` pairs (`Engine.next_token_logprobs`)."""

    prefix: list[int]
    top_k: int


Request = ExpansionRequest | PriorRequest


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else None


def token_step(
    token: int, logprob: float, *, text: str, eos_token_ids: set[int], stops: Sequence[str]
) -> GenerationOutput:
    """The one-token step `token` (whose text is `text`) in the engines' conventions: it ends the answer
    ("stop") at eos or when its text holds a stop string (the text kept is what comes before it)."""
    if token in eos_token_ids:
        return GenerationOutput(token_ids=[token], logprobs=[logprob], finish_reason="stop", text="")
    stop_at = _first_stop(text, stops)
    if stop_at is not None:
        return GenerationOutput(token_ids=[token], logprobs=[logprob], finish_reason="stop", text=text[:stop_at])
    return GenerationOutput(token_ids=[token], logprobs=[logprob], finish_reason="length", text=text)


def kept_trajectories(recorded: Sequence[Node], terminate_num: int) -> list[Node]:
    """The recorded terminals a search returns, at most `terminate_num`, in recording order: every
    correct one first (earliest first), then the earliest wrong ones — with expansion 'prior' those
    are the policy's most probable answers, the confident negatives DeepSearch trains against. A
    search stopped at `terminate_num` returns all it recorded."""
    correct = [node for node in recorded if node.correct][:terminate_num]
    wrong = [node for node in recorded if not node.correct][: terminate_num - len(correct)]
    kept = {id(node) for node in correct + wrong}
    return [node for node in recorded if id(node) in kept]


# ------------------------------------------------------------------------------------------ the search


class TreeSearch:
    """The search tree of one prompt, advanced one expansion at a time.

    `request()` says what the engine must answer next (None when the search is over); `receive(answer)`
    takes that answer, adds children, scores terminals, backs up and selects the next node.
    `run_searches` is the loop; `result()` the trajectories with their per-step scores.

    `decode` turns token ids into text: expansion 'prior' needs it (its steps are tokens chosen from
    the engine's next-token candidates, without text), and so does a step delimiter (to tell a step
    that ended at the delimiter from one that ended the answer). `stop` holds the rollout's stop
    strings, which end the answer.
    """

    def __init__(
        self,
        prompt_token_ids: Sequence[int],
        verify: Verify,
        settings: SearchSettings,
        *,
        decode: Callable[[Sequence[int]], str] | None = None,
        eos_token_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("a search needs at least one prompt token (e.g. bos)")
        if settings.expansion not in ("prior", "sample"):
            raise ValueError(f"expansion {settings.expansion!r} is unknown; use 'prior' or 'sample'")
        if settings.expansion == "prior" and (settings.chunk_tokens != 1 or settings.step_delimiter):
            raise ValueError(
                f"expansion 'prior' takes one-token steps, got chunk_tokens={settings.chunk_tokens} and step delimiter"
                f" {settings.step_delimiter!r}; use chunk_tokens 1 without a delimiter, or expansion 'sample'"
            )
        if any(not isinstance(text, str) or not text for text in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        if decode is None and (settings.step_delimiter or settings.expansion == "prior"):
            raise ValueError(
                "expansion 'prior' and a step delimiter need `decode` (a step chosen from the engine's next tokens"
                " comes without text; the delimiter must be told from the end of the answer)"
            )
        self.prompt_token_ids = list(prompt_token_ids)
        self.verify = verify
        self.settings = settings
        self.decode = decode
        self.eos_token_ids = set(eos_token_ids)
        self.stops = tuple(stop) + ((settings.step_delimiter,) if settings.step_delimiter else ())
        self.root = Node()
        self.current: Node | None = self.root
        self.recorded: list[Node] = []
        self.nodes_expanded = 0
        self.nodes_generated = 0
        self.tokens_generated = 0
        self.engine_calls = 0
        self.stopped: str | None = None
        self.widening = 1  # every node may be drawn from widening·W_d times
        self._pending: Request | None = None

    # -------------------------------------------------------------------------------------- helpers

    def width_at(self, depth: int) -> int:
        s = self.settings
        return expansion_width(
            depth, width=s.expansion_width, max_depth=s.max_depth, min_width=s.min_width, decay=s.width_decay
        )

    def _capacity(self, node: Node) -> int:
        """Draws `node` may still take before it is full."""
        return self.widening * self.width_at(node.depth) - node.samples

    def _step_tokens(self, node: Node) -> int:
        """A step's token limit: the chunk, or what is left of max_new_tokens below `node`."""
        used = sum(len(n.token_ids) for n in node.path())
        return max(1, min(self.settings.chunk_tokens, self.settings.max_new_tokens - used))

    def _prefix(self, node: Node) -> list[int]:
        return self.prompt_token_ids + [t for n in node.path() for t in n.token_ids]

    def _full_text(self, node: Node) -> str:
        return "".join(n.text for n in node.path())

    @property
    def done(self) -> bool:
        return self.stopped is not None

    def _enough_recorded(self) -> bool:
        """`terminate_num` trajectories recorded, one of them correct unless `until_solved` is off."""
        if len(self.recorded) < self.settings.terminate_num:
            return False
        return not self.settings.until_solved or any(node.correct for node in self.recorded)

    # ----------------------------------------------------------------------------------- the loop

    def _node_to_expand(self) -> Node | None:
        """The current node, or the frontier's best once it is full; widened once the tree is exhausted."""
        node = self.current
        if node is not None and (self._capacity(node) <= 0 or node.prior == []):
            node = self.current = self._select_frontier()
        if node is None and self.settings.widen_when_exhausted and not self.root.terminal:
            self.widening += 1
            node = self.current = self._select_frontier()
        return node

    def request(self) -> Request | None:
        """The next request (the same one until `receive`), or None once the search is over. With
        expansion 'prior', expansions from a prior already known need no engine call and happen here."""
        while self._pending is None and not self.done:
            if self._enough_recorded():
                self.stopped = "terminate_num"
                break
            node = self._node_to_expand()
            if node is None:
                self.stopped = "exhausted"
                break
            step = self._step_tokens(node)
            affordable = (self.settings.budget_tokens - self.tokens_generated) // step
            if affordable <= 0:
                self.stopped = "budget"
                break
            if self.settings.expansion == "sample":
                count = min(self._capacity(node), affordable)
                self._pending = ExpansionRequest(prefix=self._prefix(node), count=count, max_new_tokens=step)
            elif node.prior is None:
                self._pending = PriorRequest(prefix=self._prefix(node), top_k=self.settings.prior_top_k)
            else:
                self._expand_from_prior(
                    node, min(self.settings.children_per_expansion, self._capacity(node), affordable)
                )
        return self._pending

    def _expand_from_prior(self, node: Node, count: int) -> None:
        """Give `node` its next `count` children: one-token steps, its most probable untried tokens."""
        assert self.decode is not None
        steps = [
            token_step(token, logprob, text=self.decode([token]), eos_token_ids=self.eos_token_ids, stops=self.stops)
            for token, logprob in take_prior(node, count)
        ]
        self._add_children(node, steps)

    def receive(self, answer: Sequence[GenerationOutput] | Sequence[tuple[int, float]]) -> None:
        """The engine's answer to the pending request: the sampled steps of an `ExpansionRequest`, the
        `(token id, logprob)` candidates of a `PriorRequest`."""
        pending = self._pending
        if pending is None or self.current is None:
            raise RuntimeError("receive() without a pending request(); call request() first")
        self._pending = None
        self.engine_calls += 1
        if isinstance(pending, PriorRequest):
            self.current.prior = untried(answer, self.current)  # type: ignore[arg-type]
            return
        if len(answer) != pending.count:
            raise ValueError(f"expected {pending.count} outputs for the pending expansion, got {len(answer)}")
        self._add_children(self.current, answer)  # type: ignore[arg-type]

    def _step_text(self, output: GenerationOutput) -> tuple[str, bool]:
        """The step's text and whether it ended the answer (eos or a stop string, not the delimiter)."""
        if output.finish_reason != "stop":
            return output.text, False
        delimiter = self.settings.step_delimiter
        if delimiter and self.decode is not None:
            ids = [t for t in output.token_ids if t not in self.eos_token_ids]
            ended_at_eos = len(ids) < len(output.token_ids)
            if not ended_at_eos and self.decode(ids).endswith(delimiter):
                return output.text + delimiter, False
        return output.text, True

    def _add_children(self, node: Node, outputs: Sequence[GenerationOutput]) -> None:
        """Add new steps below `node` (merging repeated ones), score the terminals, back up and select."""
        self.nodes_expanded += 1
        candidates: list[Node] = []
        for output in outputs:
            if len(output.token_ids) != len(output.logprobs):
                raise ValueError("every generated token needs its logprob")
            self.tokens_generated += len(output.token_ids)
            node.samples += 1
            if self.settings.merge_duplicates:
                same = find_child(node, output.token_ids)
                if same is not None:
                    if same not in candidates and not same.recorded:
                        candidates.append(same)
                    continue
            text, finished = self._step_text(output)
            child = add_child(node, output, text=text, finished=finished, max_depth=self.settings.max_depth)
            self.nodes_generated += 1
            if child.terminal:
                result = self.verify(self._full_text(child))
                child.correct, child.reward = bool(result.correct), float(result.reward)
                child.score = terminal_score(
                    correct=child.correct, finished=child.finished, incomplete_score=self.settings.incomplete_score
                )
            candidates.append(child)
        self._backup_and_select(node, candidates)

    def _backup_and_select(self, node: Node, candidates: list[Node]) -> None:
        s = self.settings
        chosen = choose_terminal(candidates)
        for child in candidates:
            if not child.terminal:
                child.visits += 1  # intermediate candidates: a visit, no value (`update(0.0)`)
        if chosen is not None:
            assert chosen.score is not None
            backup(chosen, chosen.score, backup_threshold=s.backup_threshold)
            chosen.recorded = True
            self.recorded.append(chosen)
            if self._enough_recorded():
                self.current = None
                self.stopped = "terminate_num"
                return
            self.current = self._select_frontier()
            return
        self.current = select_child(node, s.lambda_puct) or self._select_frontier()

    def _select_frontier(self) -> Node | None:
        s = self.settings
        return select_frontier(
            frontier(self.root, self.width_at, self.widening),
            lambda_parent_value=s.lambda_parent_value,
            lambda_entropy=s.lambda_entropy,
            lambda_depth=s.lambda_depth,
            lambda_value=s.lambda_value,
            depth_bonus_kind=s.depth_bonus,
            max_depth=s.max_depth,
            entropy_bonus=s.entropy_bonus,
            lambda_confidence=s.lambda_confidence,
        )

    def result(self) -> SearchResult:
        """The recorded trajectories (`kept_trajectories`, in recording order) with step scores from the
        final tree and token values (raw; the learner normalises them per prompt)."""
        s = self.settings
        trajectories = []
        for leaf in kept_trajectories(self.recorded, s.terminate_num):
            path = leaf.path()
            trajectories.append(
                Trajectory(
                    token_ids=[t for n in path for t in n.token_ids],
                    logprobs=[lp for n in path for lp in n.logprobs],
                    text=self._full_text(leaf),
                    correct=leaf.correct,
                    reward=leaf.reward,
                    score=float(leaf.score if leaf.score is not None else s.incomplete_score),
                    finished=leaf.finished,
                    step_lengths=[len(n.token_ids) for n in path],
                    step_values=step_scores(leaf, temperature=s.advantage_temperature),
                )
            )
        return SearchResult(
            trajectories=trajectories,
            nodes_expanded=self.nodes_expanded,
            nodes_generated=self.nodes_generated,
            tokens_generated=self.tokens_generated,
            engine_calls=self.engine_calls,
            stopped=self.stopped or "running",
        )


def run_searches(
    searches: Sequence[TreeSearch],
    generate: Generate,
    params: SamplingParams,
    *,
    next_tokens: NextTokens | None = None,
) -> list[SearchResult]:
    """Advance every search until each is over. Each round serves the live trees' requests with one
    `next_tokens` call for all prior requests and one `generate` call per distinct step length for all
    sampled steps (each `ExpansionRequest` repeats its prefix `count` times; the engine prefills a
    repeated prefix once). `params` gives the temperature, top-p and stop strings (the searches' step
    delimiter is added to them); its seed, when set, is advanced every call."""
    delimiters = {search.settings.step_delimiter for search in searches}
    if len(delimiters) > 1:
        raise ValueError(f"searches run together must share one step delimiter, got {sorted(map(repr, delimiters))}")
    delimiter = next(iter(delimiters), None)
    if delimiter and delimiter not in params.stop:
        params = replace(params, stop=(*params.stop, delimiter))
    calls = 0

    def seeded(length: int) -> SamplingParams:
        nonlocal calls
        seed = None if params.seed is None else params.seed + calls
        calls += 1
        return replace(params, max_new_tokens=length, seed=seed)

    while True:
        live = [(search, request) for search in searches if (request := search.request()) is not None]
        if not live:
            return [search.result() for search in searches]
        priors = [(search, request) for search, request in live if isinstance(request, PriorRequest)]
        if priors:
            if next_tokens is None:
                raise ValueError("expansion 'prior' needs `next_tokens`, the engine's next_token_logprobs")
            top_k = max(request.top_k for _, request in priors)
            answers = next_tokens([list(request.prefix) for _, request in priors], seeded(1), top_k)
            if len(answers) != len(priors):
                raise ValueError(f"next_tokens returned {len(answers)} answers for {len(priors)} prefixes")
            for (search, request), answer in zip(priors, answers, strict=True):
                search.receive(list(answer)[: request.top_k])
        sampled = [(search, request) for search, request in live if isinstance(request, ExpansionRequest)]
        for length in sorted({request.max_new_tokens for _, request in sampled}):
            batch = [(search, request) for search, request in sampled if request.max_new_tokens == length]
            prefixes = [list(request.prefix) for _, request in batch for _ in range(request.count)]
            outputs = generate(prefixes, seeded(length))
            if len(outputs) != len(prefixes):
                raise ValueError(f"generate returned {len(outputs)} outputs for {len(prefixes)} prefixes")
            start = 0
            for search, request in batch:
                search.receive(outputs[start : start + request.count])
                start += request.count


def search(
    prompt_token_ids: Sequence[int],
    generate: Generate,
    verify: Verify,
    settings: SearchSettings,
    params: SamplingParams,
    *,
    next_tokens: NextTokens | None = None,
    decode: Callable[[Sequence[int]], str] | None = None,
    eos_token_ids: Sequence[int] = (),
) -> SearchResult:
    """One prompt's tree search to the end (see `TreeSearch`)."""
    tree = TreeSearch(prompt_token_ids, verify, settings, decode=decode, eos_token_ids=eos_token_ids, stop=params.stop)
    return run_searches([tree], generate, params, next_tokens=next_tokens)[0]
