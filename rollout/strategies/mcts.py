"""DeepSearch: Monte Carlo tree search over reasoning steps inside RLVR training (ALGORITHMS.md §8).

Source: Wu et al., 2025, "DeepSearch: Overcome the Bottleneck of Reinforcement Learning with Verifiable
Rewards via Monte Carlo Tree Search"; reference code smiles724/DeepSearch, `deepsearch/utils/mcts.py`
(`MCTSNode.update`, `MCTSAgent.backup_and_selection`, `select_global_best_node`) and
`deepsearch/rollout/sglang_mcts_wrapper.py` (defaults, step-wise scores); the sibling mean-std
normalisation of those scores (`advantage_fn.py`) is the learner's (`learner.algorithms.tree_advantages`). Defaults (in `orchard.config.MCTSConfig`) are that code's: λ_puct 2.0,
backup_threshold 0.1, incomplete_score −1.0, λ1 0.4, λ2 0.4, λ3 0.01, λ4 0.0, depth bonus 'sqrt',
frontier restricted to nodes with fewer than W_d children (force_to_frontier), argmax selection
(deterministic_sample), backtrack 'global' (the alternative, UCT from the root, is not implemented),
expansion width 8 (its run script), the entropy term λ2·H(s) of the paper's formula off
(involve_uncertainty_bonus; `MCTSConfig.entropy_bonus` turns it on). Chosen for the demo's short
answers, not from the reference: 2-token steps, a width decaying by 4 per level down to 2, and two
adaptations (`merge_duplicates`: a step identical to a sibling joins it; `widen_when_exhausted`:
when every node has had its W_d draws but budget is left, each may draw W_d more);
`bench/deepsearch.py --sweep` measures each against its alternative.

A tree per prompt; the root is the prompt, every other node one step of at most `chunk_tokens`
tokens (or up to a step delimiter) sampled from the current policy with its token logprobs. One
round of a search: expand the current node with W_d children in one generate call; score the
terminal children with the verifier; keep one of them (correct > wrong complete > incomplete,
lowest −mean logprob); back its value up; record its path as a trajectory; then continue from the
best child by UCT when no terminal was reached, else from the best node of the whole tree's
frontier. The search ends after `terminate_num` trajectories, when its token budget cannot pay for
another expansion, or when no node is left to expand.

Everything below `TreeSearch` is a pure function of nodes and numbers. `TreeSearch` drives any
`generate(prefixes, params) -> outputs` callable (`TorchEngine.generate`, or a fake in tests);
`run_searches` advances several trees in lockstep so one generate call serves all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from orchard.config import MCTSConfig
from orchard.protocols import GenerationOutput, SamplingParams, VerifierResult

#: `generate(prefixes, params) -> one output per prefix`, e.g. `TorchEngine.generate`.
Generate = Callable[[list[list[int]], SamplingParams], list[GenerationOutput]]
#: `verify(completion text) -> VerifierResult` for the prompt being searched.
Verify = Callable[[str], VerifierResult]

# ------------------------------------------------------------------------------------------------- nodes


@dataclass(eq=False)
class Node:
    """One step of a path: its tokens and their behaviour logprobs; the root holds the prompt."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    depth: int = 0
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    visits: int = 0
    value: float = 0.0
    terminal: bool = False
    finished: bool = False  # the step ended the answer (eos or a stop string), not only the depth limit
    correct: bool = False
    reward: float = 0.0  # the verifier's reward of the path's text (terminal nodes)
    score: float | None = None  # terminal value: +1, −1 or incomplete_score
    recorded: bool = False  # backed up and recorded as a trajectory (the reference's final_backup)
    samples: int = 0  # steps drawn from this node (children, plus duplicates merged into them)

    @property
    def q(self) -> float:
        """Q(node) = value / visits (0 before any visit)."""
        return self.value / self.visits if self.visits else 0.0

    @property
    def entropy(self) -> float:
        """H(s): the step's −mean logprob, the reference's proxy for mean token entropy."""
        return -sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0

    def path(self) -> list[Node]:
        """Nodes from the first step below the root down to this one."""
        nodes = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]

    def path_entropy(self) -> float:
        """−mean logprob over every token of the path (the whole trajectory)."""
        logprobs = [lp for node in self.path() for lp in node.logprobs]
        return -sum(logprobs) / len(logprobs) if logprobs else 0.0


def add_child(parent: Node, output: GenerationOutput, *, text: str, finished: bool, max_depth: int) -> Node:
    """Attach one generated step below `parent`; terminal when it ends the answer or reaches max_depth."""
    child = Node(
        token_ids=list(output.token_ids),
        logprobs=list(output.logprobs),
        text=text,
        depth=parent.depth + 1,
        parent=parent,
        finished=finished,
    )
    child.terminal = finished or child.depth >= max_depth
    parent.children.append(child)
    return child


def find_child(parent: Node, token_ids: Sequence[int]) -> Node | None:
    """The child of `parent` whose step is exactly `token_ids`, if any."""
    wanted = list(token_ids)
    return next((child for child in parent.children if child.token_ids == wanted), None)


# ---------------------------------------------------------------------------------------- pure rules


def expansion_width(depth: int, *, width: int, max_depth: int, min_width: int = 1, decay: int = 0) -> int:
    """W_d = max(min_width, W − ⌊d / ⌊max_depth / W⌋⌋ · decay); W when `decay` is 0.

    `get_expansion_width_at_depth` of the reference (its dynamic_width_config); a step size of 0
    (max_depth < W) counts as 1.
    """
    if decay <= 0:
        return width
    step = max(1, max_depth // width)
    return max(min_width, width - (depth // step) * decay)


def terminal_score(*, correct: bool, finished: bool, incomplete_score: float) -> float:
    """+1 for a correct answer, −1 for a wrong complete one, `incomplete_score` for a path cut off at
    max_depth without finishing (a cut-off path whose text the verifier accepts still counts +1)."""
    if correct:
        return 1.0
    return -1.0 if finished else incomplete_score


def choose_terminal(candidates: Sequence[Node]) -> Node | None:
    """The one terminal of an expansion that is backed up and recorded: correct ones if any, else the
    wrong complete ones, else the incomplete ones; of those the lowest path entropy (most confident).
    Ties keep the first. None when no candidate is terminal."""
    terminals = [node for node in candidates if node.terminal]
    if not terminals:
        return None
    for keep in (
        lambda node: node.correct,
        lambda node: node.finished and not node.correct,
        lambda node: True,
    ):
        kept = [node for node in terminals if keep(node)]
        if kept:
            return min(kept, key=lambda node: node.path_entropy())
    return None


def backup_weight(depth: int, path_length: int, backup_threshold: float) -> float:
    """w = max((d+1)/L, backup_threshold), L = leaf depth + 1."""
    return max((depth + 1) / path_length, backup_threshold)


def update_value(value: float, v: float, weight: float) -> float:
    """One node's new value after a terminal value `v` passed through it with `weight`.

    Same sign (or zero): value + w·v. A success below a negative node overrides it: w·v. A failure
    below a positive node leaves it unchanged (`MCTSNode.update`).
    """
    if value * v >= 0:
        return value + weight * v
    if v > 0:
        return weight * v
    return value


def backup(leaf: Node, v: float, *, backup_threshold: float) -> None:
    """Back a recorded terminal's value `v` up from `leaf` to the root: every node on the path gets
    visits += 1 and `update_value` with its depth's weight."""
    path_length = leaf.depth + 1
    node: Node | None = leaf
    while node is not None:
        node.visits += 1
        node.value = update_value(node.value, v, backup_weight(node.depth, path_length, backup_threshold))
        node = node.parent


def uct_score(child: Node, parent_visits: int, lambda_puct: float) -> float:
    """Q + λ_puct · sqrt(ln N_parent / N_child); the exploration term is 0 before either is visited."""
    if parent_visits == 0 or child.visits == 0:
        return child.q
    return child.q + lambda_puct * math.sqrt(math.log(parent_visits) / child.visits)


def select_child(node: Node, lambda_puct: float) -> Node | None:
    """Local selection: the non-terminal child of highest UCT score (first on ties); None when every
    child is terminal."""
    best, best_score = None, -math.inf
    for child in node.children:
        if child.terminal:
            continue
        score = uct_score(child, node.visits, lambda_puct)
        if score > best_score:
            best, best_score = child, score
    return best


def depth_bonus(depth: int, kind: str, max_depth: int) -> float:
    """'constant': depth; 'log': log(depth+1); 'sqrt': sqrt(depth / max_depth)."""
    if kind == "constant":
        return float(depth)
    if kind == "log":
        return math.log(depth + 1)
    if kind == "sqrt":
        return math.sqrt(depth / max_depth)
    raise ValueError(f"depth bonus {kind!r} is unknown; use 'constant', 'log' or 'sqrt'")


def frontier_priority(
    node: Node,
    *,
    lambda_parent_value: float,
    lambda_entropy: float,
    lambda_depth: float,
    lambda_value: float,
    depth_bonus_kind: str,
    max_depth: int,
    entropy_bonus: bool = True,
) -> float:
    """F(s) = λ1·tanh(Q(parent)) + λ4·tanh(Q(s)) + λ2·H(s) + λ3·depth_bonus(s) (`select_global_best_node`)."""
    parent_q = node.parent.q if node.parent is not None else 0.0
    score = lambda_parent_value * math.tanh(parent_q) + lambda_value * math.tanh(node.q)
    if entropy_bonus:
        score += lambda_entropy * node.entropy
    return score + lambda_depth * depth_bonus(node.depth, depth_bonus_kind, max_depth)


def frontier(root: Node, width_at: Callable[[int], int], widening: int = 1) -> list[Node]:
    """Every non-terminal node of the tree with fewer than `widening`·W_d steps drawn from it (fewer
    than W_d children in the reference, where every draw is a child), in depth-first order. The root
    is on it only once it may be widened (it is full after the first expansion otherwise)."""
    nodes, stack = [], [root]
    while stack:
        node = stack.pop()
        if not node.terminal and node.samples < widening * width_at(node.depth):
            nodes.append(node)
        stack.extend(reversed(node.children))
    return nodes


def select_frontier(nodes: Sequence[Node], **priority: object) -> Node | None:
    """Global selection: the node of highest `frontier_priority` (first on ties), None when empty."""
    best, best_score = None, -math.inf
    for node in nodes:
        score = frontier_priority(node, **priority)  # type: ignore[arg-type]
        if score > best_score:
            best, best_score = node, score
    return best


def step_scores(leaf: Node, *, temperature: float = 1.0) -> list[float]:
    """Per-step scores of a recorded path from the tree's node values (root excluded): tanh(value / T)
    for every step but the last, the terminal's own value for the last (`use_step_wise_score` with
    `adv_temperature`, `q_value_max` 1)."""
    values = [node.value for node in leaf.path()]
    return [math.tanh(v / temperature) for v in values[:-1]] + values[-1:]


def token_values(step_values: Sequence[float], step_lengths: Sequence[int]) -> list[float]:
    """Each step's score on each of its tokens: the per-token values a tree trajectory carries to the
    learner (`Completion.token_values`), which normalises them per prompt (`learner.algorithms.tree_advantages`)."""
    return [value for value, length in zip(step_values, step_lengths, strict=True) for _ in range(length)]


# ------------------------------------------------------------------------------------------ the search


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
    nodes_expanded: int  # expansion rounds: nodes that had children generated
    nodes_generated: int  # children created
    tokens_generated: int
    generate_calls: int
    stopped: str  # "terminate_num", "budget" or "exhausted"

    @property
    def solved(self) -> bool:
        return any(t.correct for t in self.trajectories)


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
        )


@dataclass(frozen=True)
class ExpansionRequest:
    """`count` continuations of `prefix` (prompt + path tokens), each at most `max_new_tokens` long."""

    prefix: list[int]
    count: int
    max_new_tokens: int


class TreeSearch:
    """The search tree of one prompt, advanced one expansion at a time.

    `request()` says what to generate next (None when the search is over); `receive(outputs)` adds
    those outputs as children, scores terminals, backs up and selects the next node. `run_searches`
    is the loop; `result()` the trajectories with their per-step scores.

    `decode` turns token ids into text; it is only needed with a step delimiter (to tell a step that
    ended at the delimiter from one that ended the answer) and defaults to the outputs' own text.
    """

    def __init__(
        self,
        prompt_token_ids: Sequence[int],
        verify: Verify,
        settings: SearchSettings,
        *,
        decode: Callable[[Sequence[int]], str] | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("a search needs at least one prompt token (e.g. bos)")
        if settings.step_delimiter and decode is None:
            raise ValueError("a step delimiter needs `decode` to tell the delimiter from the end of the answer")
        self.prompt_token_ids = list(prompt_token_ids)
        self.verify = verify
        self.settings = settings
        self.decode = decode
        self.eos_token_ids = set(eos_token_ids)
        self.root = Node()
        self.current: Node | None = self.root
        self.recorded: list[Node] = []
        self.nodes_expanded = 0
        self.nodes_generated = 0
        self.tokens_generated = 0
        self.generate_calls = 0
        self.stopped: str | None = None
        self.widening = 1  # every node may be drawn from widening·W_d times
        self._pending: ExpansionRequest | None = None

    # -------------------------------------------------------------------------------------- helpers

    def width_at(self, depth: int) -> int:
        s = self.settings
        return expansion_width(
            depth, width=s.expansion_width, max_depth=s.max_depth, min_width=s.min_width, decay=s.width_decay
        )

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

    # ----------------------------------------------------------------------------------- the loop

    def request(self) -> ExpansionRequest | None:
        """The next expansion (the same request until `receive`), or None once the search is over."""
        if self._pending is not None or self.done:
            return self._pending
        if len(self.recorded) >= self.settings.terminate_num:
            self.stopped = "terminate_num"
            return None
        node = self.current
        if node is not None and node.samples >= self.widening * self.width_at(node.depth):
            node = self.current = self._select_frontier()  # only when a width shrank under a full node
        if node is None and self.settings.widen_when_exhausted and not self.root.terminal:
            self.widening += 1
            node = self.current = self._select_frontier()
        if node is None:
            self.stopped = "exhausted"
            return None
        need = self.widening * self.width_at(node.depth) - node.samples
        step = self._step_tokens(node)
        affordable = (self.settings.budget_tokens - self.tokens_generated) // step
        count = min(need, affordable)
        if count <= 0:
            self.stopped = "budget" if affordable <= 0 else "exhausted"
            return None
        self._pending = ExpansionRequest(prefix=self._prefix(node), count=count, max_new_tokens=step)
        return self._pending

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

    def receive(self, outputs: Sequence[GenerationOutput]) -> None:
        """Add the pending request's outputs as children of the current node, then back up and select."""
        pending = self._pending
        if pending is None or self.current is None:
            raise RuntimeError("receive() without a pending request(); call request() first")
        if len(outputs) != pending.count:
            raise ValueError(f"expected {pending.count} outputs for the pending expansion, got {len(outputs)}")
        self._pending = None
        node = self.current
        self.nodes_expanded += 1
        self.generate_calls += 1
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
            if len(self.recorded) >= s.terminate_num:
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
        )

    def result(self) -> SearchResult:
        """The recorded trajectories (in recording order) with step scores from the final tree and
        token values (raw; the learner normalises them per prompt)."""
        s = self.settings
        trajectories = []
        for leaf in self.recorded:
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
            generate_calls=self.generate_calls,
            stopped=self.stopped or "running",
        )


def run_searches(searches: Sequence[TreeSearch], generate: Generate, params: SamplingParams) -> list[SearchResult]:
    """Advance every search until each is over. Each round asks every live tree for its expansion and
    serves all of them with one generate call per distinct step length (usually one), each request's
    `count` rows repeating its prefix (the engine prefills a repeated prefix once). `params` gives the
    temperature, top-p and stop strings; its seed, when set, is advanced every call."""
    calls = 0
    while True:
        requests = [(search, search.request()) for search in searches]
        live = [(search, request) for search, request in requests if request is not None]
        if not live:
            return [search.result() for search in searches]
        for length in sorted({request.max_new_tokens for _, request in live}):
            batch = [(search, request) for search, request in live if request.max_new_tokens == length]
            prefixes = [list(request.prefix) for _, request in batch for _ in range(request.count)]
            seed = None if params.seed is None else params.seed + calls
            outputs = generate(prefixes, replace(params, max_new_tokens=length, seed=seed))
            calls += 1
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
    decode: Callable[[Sequence[int]], str] | None = None,
    eos_token_ids: Sequence[int] = (),
) -> SearchResult:
    """One prompt's tree search to the end (see `TreeSearch`)."""
    tree = TreeSearch(prompt_token_ids, verify, settings, decode=decode, eos_token_ids=eos_token_ids)
    return run_searches([tree], generate, params)[0]
