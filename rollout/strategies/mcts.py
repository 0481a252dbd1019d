"""DeepSearch's tree rules: Monte Carlo tree search over reasoning steps (docs/algorithms.md §8).

Source: Wu et al., 2025, "DeepSearch: Overcome the Bottleneck of Reinforcement Learning with Verifiable
Rewards via Monte Carlo Tree Search"; reference code smiles724/DeepSearch, `deepsearch/utils/mcts.py`
(`MCTSNode.update`, `MCTSAgent.backup_and_selection`, `select_global_best_node`) and
`deepsearch/rollout/sglang_mcts_wrapper.py` (defaults, step-wise scores). The sibling mean-std
normalisation of those scores (`advantage_fn.py`) is the learner's (`learner.algorithms.tree_advantages`).

A tree per prompt; the root is the prompt, every other node one step of at most `chunk_tokens` tokens
(or up to a step delimiter). Everything here is a pure function of nodes and numbers:

- expansion width with depth decay (`expansion_width`), terminal scores (`terminal_score`) and the
  one terminal of an expansion that is recorded (`choose_terminal`: correct > wrong complete >
  incomplete, then the most confident path);
- backup with the reference's success override (`backup`, `update_value`);
- local UCT selection (`select_child`) and the global frontier (`frontier`, `frontier_priority`,
  `select_frontier`);
- per-step scores of a recorded path and their spread over its tokens (`step_scores`, `token_values`).

Two ways to add children are supported (`orchard.config.MCTSConfig.expansion`; the search itself is
`rollout.strategies.tree_search`):

- **'sample'** (the reference): W_d children sampled from the policy at once. Short steps repeat, so
  a repeated step joins its sibling (`find_child`) and the draw is spent for nothing.
- **'prior'**: steps are one token, and a node's children are its most probable next tokens, added a
  few at a time. Expanding a node the first time asks the engine for the policy's most probable next
  tokens there (the node's `prior`, `untried`); its children take them in order of probability
  (`take_prior`). No draw is spent on a step the tree already holds, and the frontier priority can see
  how probable a node's next untried step is (`Node.confidence`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from orchard.protocols import GenerationOutput

#: A node's untried next tokens: `(token id, logprob)`, most probable first.
Prior = list[tuple[int, float]]

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
    path_logprob: float = 0.0  # sum of the logprobs of every token from the root down to this node
    prior: Prior | None = None  # 'prior' expansion: untried next tokens (None until first expanded)

    @property
    def q(self) -> float:
        """Q(node) = value / visits (0 before any visit)."""
        return self.value / self.visits if self.visits else 0.0

    @property
    def entropy(self) -> float:
        """H(s): the step's −mean logprob, the reference's proxy for mean token entropy."""
        return -sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0

    @property
    def next_logprob(self) -> float:
        """The logprob of this node's most probable untried next token: 0 before its prior is known (no
        step can be more probable), −inf once every candidate of the prior is a child."""
        if self.prior is None:
            return 0.0
        return self.prior[0][1] if self.prior else -math.inf

    @property
    def confidence(self) -> float:
        """The policy's confidence in extending this node: log π of its path plus log π of its most
        probable untried next token (the path alone while the prior is unknown)."""
        return self.path_logprob + self.next_logprob

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
        path_logprob=parent.path_logprob + sum(output.logprobs),
    )
    child.terminal = finished or child.depth >= max_depth
    parent.children.append(child)
    return child


def find_child(parent: Node, token_ids: Sequence[int]) -> Node | None:
    """The child of `parent` whose step is exactly `token_ids`, if any."""
    wanted = list(token_ids)
    return next((child for child in parent.children if child.token_ids == wanted), None)


def untried(candidates: Sequence[tuple[int, float]], node: Node) -> Prior:
    """`candidates` (the engine's most probable next tokens at `node`) as its prior: finite logprobs
    only, most probable first, without the first tokens of children it already has."""
    taken = {child.token_ids[0] for child in node.children if child.token_ids}
    kept = [(int(token), float(logprob)) for token, logprob in candidates if math.isfinite(logprob)]
    return sorted((c for c in kept if c[0] not in taken), key=lambda c: -c[1])


def take_prior(node: Node, count: int) -> Prior:
    """Pop the `count` most probable untried tokens of `node`'s prior (fewer when it runs out)."""
    if node.prior is None:
        raise ValueError("take_prior needs the node's prior; ask the engine for its next tokens first")
    taken, node.prior = node.prior[:count], node.prior[count:]
    return taken


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
    lambda_confidence: float = 0.0,
) -> float:
    """F(s) = λ1·tanh(Q(parent)) + λ4·tanh(Q(s)) + λ2·H(s) + λ3·depth_bonus(s) + λc·confidence(s).

    The first four terms are `select_global_best_node` of the reference (H(s) only with
    `entropy_bonus`). λc·confidence(s), log π of the node's path and of its most probable untried
    next token (`Node.confidence`), is ours: with short steps the reference's terms cannot tell a
    probable continuation from an improbable one (every node on a failing tree has a negative parent
    value), and the search spends its budget on steps the policy almost never takes. λc = 0 is the
    reference's priority.
    """
    parent_q = node.parent.q if node.parent is not None else 0.0
    score = lambda_parent_value * math.tanh(parent_q) + lambda_value * math.tanh(node.q)
    if entropy_bonus:
        score += lambda_entropy * node.entropy
    if lambda_confidence:
        score += lambda_confidence * node.confidence
    return score + lambda_depth * depth_bonus(node.depth, depth_bonus_kind, max_depth)


def frontier(root: Node, width_at: Callable[[int], int], widening: int = 1) -> list[Node]:
    """Every node of the tree that may still get children, in depth-first order: non-terminal, fewer than
    `widening`·W_d steps drawn from it (fewer than W_d children in the reference, where every draw is
    a child), and with untried tokens left when its prior is known. With expansion 'sample' the root
    is on it only once it may be widened (it is full after the first expansion otherwise)."""
    nodes, stack = [], [root]
    while stack:
        node = stack.pop()
        if not node.terminal and node.samples < widening * width_at(node.depth) and node.prior != []:
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
