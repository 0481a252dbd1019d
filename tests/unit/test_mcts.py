"""DeepSearch tree search: the pure rules by hand-computed values, and whole searches of both expansions
('sample', 'prior') on fake engines."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from orchard.config import MCTSConfig
from orchard.protocols import GenerationOutput, SamplingParams, VerifierResult
from orchard.rollout.strategies.mcts import (
    Node,
    backup,
    backup_weight,
    choose_terminal,
    depth_bonus,
    expansion_width,
    frontier,
    frontier_priority,
    select_child,
    select_frontier,
    step_scores,
    take_prior,
    terminal_score,
    token_values,
    uct_score,
    untried,
    update_value,
)
from orchard.rollout.strategies.tree_search import (
    PriorRequest,
    SearchSettings,
    TreeSearch,
    kept_trajectories,
    run_searches,
    search,
    token_step,
)


def chain(depth: int) -> list[Node]:
    """root and a path of `depth` steps below it."""
    nodes = [Node()]
    for d in range(1, depth + 1):
        node = Node(token_ids=[d], logprobs=[-0.5], depth=d, parent=nodes[-1])
        nodes[-1].children.append(node)
        nodes.append(node)
    return nodes


def priority_weights(**overrides: object) -> dict[str, object]:
    """`frontier_priority`'s weights: the reference's λ1..λ4 and sqrt depth bonus, max depth 4."""
    return {
        "lambda_parent_value": 0.4,
        "lambda_entropy": 0.4,
        "lambda_depth": 0.01,
        "lambda_value": 0.0,
        "depth_bonus_kind": "sqrt",
        "max_depth": 4,
        **overrides,
    }


def leaf_under(parent: Node, *, logprob: float = -0.5, terminal: bool = True) -> Node:
    node = Node(token_ids=[99], logprobs=[logprob], depth=parent.depth + 1, parent=parent, terminal=terminal)
    parent.children.append(node)
    return node


# ------------------------------------------------------------------------------------------ expansion


def test_expansion_width_decays_with_depth_down_to_min_width():
    # W = 4, max_depth 8: step ⌊8/4⌋ = 2, so the width drops by `decay` every 2 levels.
    widths = [expansion_width(d, width=4, max_depth=8, min_width=2, decay=1) for d in range(8)]
    assert widths == [4, 4, 3, 3, 2, 2, 2, 2]
    assert [expansion_width(d, width=4, max_depth=8) for d in range(8)] == [4] * 8  # no decay by default
    assert expansion_width(5, width=8, max_depth=4, min_width=1, decay=1) == 3  # step size 0 counts as 1


def test_terminal_scores():
    assert terminal_score(correct=True, finished=True, incomplete_score=-1.0) == 1.0
    assert terminal_score(correct=False, finished=True, incomplete_score=-0.5) == -1.0
    assert terminal_score(correct=False, finished=False, incomplete_score=-0.5) == -0.5
    assert terminal_score(correct=True, finished=False, incomplete_score=-0.5) == 1.0


def test_one_terminal_is_kept_correct_then_wrong_then_incomplete_lowest_entropy():
    root = Node()
    confident_wrong = leaf_under(root, logprob=-0.1)
    confident_wrong.finished = True
    unsure_correct = leaf_under(root, logprob=-2.0)
    unsure_correct.finished, unsure_correct.correct = True, True
    sure_correct = leaf_under(root, logprob=-0.3)
    sure_correct.finished, sure_correct.correct = True, True
    incomplete = leaf_under(root, logprob=-0.01)
    intermediate = leaf_under(root, logprob=-0.001, terminal=False)
    assert choose_terminal(root.children) is sure_correct
    assert choose_terminal([confident_wrong, incomplete, intermediate]) is confident_wrong
    assert choose_terminal([incomplete, intermediate]) is incomplete
    assert choose_terminal([intermediate]) is None


# --------------------------------------------------------------------------------------------- backup


def test_backup_weights_and_values_by_hand():
    root, a, b, leaf = chain(3)
    leaf.terminal = True
    assert [backup_weight(d, 4, 0.1) for d in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert backup_weight(0, 20, 0.1) == 0.1  # (0+1)/20 = 0.05 is below the threshold
    backup(leaf, -1.0, backup_threshold=0.1)
    assert [n.value for n in (root, a, b, leaf)] == [-0.25, -0.5, -0.75, -1.0]
    assert [n.visits for n in (root, a, b, leaf)] == [1, 1, 1, 1]

    # A success below negative nodes overrides their past failures: value = w·v.
    success = leaf_under(b)
    backup(success, 1.0, backup_threshold=0.1)
    assert [n.value for n in (root, a, b, success)] == [0.25, 0.5, 0.75, 1.0]
    assert [n.visits for n in (root, a, b)] == [2, 2, 2]
    assert math.isclose(a.q, 0.25)

    # A failure below positive nodes leaves their values; visits still count.
    failure = leaf_under(b)
    backup(failure, -1.0, backup_threshold=0.1)
    assert [n.value for n in (root, a, b)] == [0.25, 0.5, 0.75]
    assert [n.visits for n in (root, a, b)] == [3, 3, 3]
    assert failure.value == -1.0

    # Same sign accumulates.
    assert update_value(0.5, 1.0, 0.25) == 0.75
    assert update_value(-0.5, -1.0, 0.25) == -0.75
    assert update_value(0.0, -1.0, 0.5) == -0.5


# ------------------------------------------------------------------------------------ 'prior' expansion


def test_a_prior_holds_the_untried_tokens_most_probable_first():
    node = Node()
    leaf_under(node).token_ids = [7]  # a child already starts with token 7
    prior = untried([(3, -0.5), (7, -0.1), (5, -2.0), (9, -math.inf), (4, -0.2)], node)
    assert prior == [(4, -0.2), (3, -0.5), (5, -2.0)]
    node.prior = prior
    assert take_prior(node, 2) == [(4, -0.2), (3, -0.5)] and node.prior == [(5, -2.0)]
    assert take_prior(node, 5) == [(5, -2.0)] and node.prior == []
    with pytest.raises(ValueError, match="prior"):
        take_prior(Node(), 1)


def test_confidence_is_the_paths_logprob_and_the_best_untried_tokens():
    root = Node()
    a = Node(token_ids=[1], logprobs=[-0.5], depth=1, parent=root, path_logprob=-0.5)
    b = Node(token_ids=[2], logprobs=[-1.0], depth=1, parent=root, path_logprob=-1.0)
    root.children = [a, b]
    assert a.next_logprob == 0.0 and a.confidence == -0.5  # prior unknown: no step can be more probable
    a.prior = [(4, -1.0), (5, -2.0)]
    assert a.confidence == -1.5
    weights = priority_weights(lambda_parent_value=0.0, lambda_entropy=0.0)
    assert frontier_priority(a, **weights, lambda_confidence=2.0) == pytest.approx(2.0 * -1.5 + 0.01 * 0.5)
    assert frontier_priority(a, **weights) == pytest.approx(0.01 * 0.5)  # λc = 0: the reference's priority
    assert select_frontier([a, b], **weights, lambda_confidence=1.0) is b  # −1.0 beats −1.5
    a.prior = []  # every candidate is a child: off the frontier, wherever its width allows more
    assert a.next_logprob == -math.inf
    assert frontier(root, lambda depth: 4) == [root, b]


def test_token_steps_end_the_answer_at_eos_and_stop_strings():
    eos = {9}
    assert token_step(9, -0.1, text="", eos_token_ids=eos, stops=()) == GenerationOutput([9], [-0.1], "stop", "")
    assert token_step(4, -0.2, text="a\n", eos_token_ids=eos, stops=("\n",)) == GenerationOutput(
        [4], [-0.2], "stop", "a"
    )
    assert token_step(5, -0.3, text="5", eos_token_ids=eos, stops=("\n",)) == GenerationOutput(
        [5], [-0.3], "length", "5"
    )


# ------------------------------------------------------------------------------------------ selection


def test_local_uct_selection():
    parent = Node(visits=4)
    low = Node(depth=1, parent=parent, visits=2, value=-0.2)
    high = Node(depth=1, parent=parent, visits=1, value=0.1)
    done = Node(depth=1, parent=parent, visits=1, value=5.0, terminal=True)
    parent.children = [low, high, done]
    assert uct_score(high, 4, 2.0) == pytest.approx(0.1 + 2.0 * math.sqrt(math.log(4) / 1))
    assert uct_score(low, 4, 2.0) == pytest.approx(-0.1 + 2.0 * math.sqrt(math.log(4) / 2))
    assert select_child(parent, 2.0) is high  # the terminal child is never selected
    assert uct_score(Node(visits=0), 4, 2.0) == 0.0  # no exploration term before a visit
    for child in (low, high):
        child.terminal = True
    assert select_child(parent, 2.0) is None


def test_frontier_priority_and_global_selection():
    root = Node(visits=2, value=-0.5)
    a = Node(token_ids=[1], logprobs=[-0.2], depth=1, parent=root, visits=2, value=0.6, samples=2)
    b = Node(token_ids=[2], logprobs=[-1.5, -0.5], depth=1, parent=root, visits=1)
    a_child = Node(token_ids=[3], logprobs=[-0.1], depth=2, parent=a, visits=1)
    a_done = Node(token_ids=[4], logprobs=[-0.1], depth=2, parent=a, terminal=True)
    root.children, a.children = [a, b], [a_child, a_done]
    root.samples = 2
    weights = priority_weights()
    # b: 0.4·tanh(Q(root) = −0.25) + 0.4·H(= 1.0) + 0.01·sqrt(1/4)
    assert frontier_priority(b, **weights) == pytest.approx(0.4 * math.tanh(-0.25) + 0.4 * 1.0 + 0.01 * 0.5)
    # a_child: 0.4·tanh(Q(a) = 0.3) + 0.4·0.1 + 0.01·sqrt(2/4)
    assert frontier_priority(a_child, **weights) == pytest.approx(
        0.4 * math.tanh(0.3) + 0.4 * 0.1 + 0.01 * math.sqrt(0.5)
    )
    assert frontier_priority(b, **weights, entropy_bonus=False) == pytest.approx(0.4 * math.tanh(-0.25) + 0.005)
    # The whole tree's frontier: non-terminal nodes with fewer than W_d draws (a is full at W = 2).
    nodes = frontier(root, lambda depth: 2)
    assert nodes == [a_child, b]
    assert select_frontier(nodes, **weights) is b  # its uncertainty outweighs a_child's better parent
    assert select_frontier(nodes, **{**weights, "lambda_entropy": 0.0}) is a_child
    assert frontier(root, lambda depth: 2, widening=2) == [root, a, a_child, b]
    assert select_frontier([], **weights) is None
    assert [depth_bonus(3, kind, 12) for kind in ("constant", "log", "sqrt")] == [3.0, math.log(4), 0.5]


# ----------------------------------------------------------------------------------------- advantages


def test_step_scores_and_token_values():
    root, a, leaf = chain(2)
    leaf.terminal = True
    backup(leaf, 1.0, backup_threshold=0.1)  # L = 3: a gets 2/3, leaf 1
    assert step_scores(leaf) == pytest.approx([math.tanh(2 / 3), 1.0])
    assert step_scores(leaf, temperature=2.0) == pytest.approx([math.tanh(1 / 3), 1.0])
    # each step's score on each of its tokens, unnormalised (the learner normalises per prompt)
    assert token_values([0.5, 1.0], [2, 1]) == [0.5, 0.5, 1.0]
    assert token_values([-0.2, -1.0], [1, 2]) == [-0.2, -1.0, -1.0]
    assert token_values([], []) == []
    with pytest.raises(ValueError):
        token_values([0.5], [1, 2])


# ------------------------------------------------------------------------------------- whole searches

EOS = 9
ANSWER = [5, 6, 7]


class FakeEngine:
    """Deterministic: the n-th row of a prefix in a call draws 5 + (n + k) % 3 as its k-th token, so three
    rows of one-token steps reach every digit string of 5, 6, 7; a completion ends (eos) after three tokens. Logprobs are −0.1·token so tests can check them."""

    def __init__(self, prompt_length: int) -> None:
        self.prompt_length = prompt_length
        self.calls: list[tuple[int, int]] = []

    def generate(self, prefixes, params: SamplingParams) -> list[GenerationOutput]:
        self.calls.append((len(prefixes), params.max_new_tokens))
        outputs, row_of = [], {}
        for prefix in prefixes:
            row = row_of[tuple(prefix)] = row_of.get(tuple(prefix), -1) + 1
            done = len(prefix) - self.prompt_length
            tokens = []
            for k in range(params.max_new_tokens):
                if done + k >= 3:
                    tokens.append(EOS)
                    break
                tokens.append(5 + (row + k) % 3)
            finished = tokens[-1] == EOS
            text = "".join(str(t) for t in tokens if t != EOS)
            outputs.append(
                GenerationOutput(
                    token_ids=tokens,
                    logprobs=[-0.1 * t for t in tokens],
                    finish_reason="stop" if finished else "length",
                    text=text,
                )
            )
        return outputs


def verify(text: str) -> VerifierResult:
    correct = text == "".join(map(str, ANSWER))
    return VerifierResult(reward=float(correct), correct=correct)


def settings(**overrides) -> SearchSettings:
    config = MCTSConfig(expansion="sample", chunk_tokens=1, expansion_width=3, width_decay=0, **overrides)
    return SearchSettings.from_config(config, max_new_tokens=4, group_size=20, budget_tokens=200)


def test_full_search_records_trajectories_with_their_tokens_and_logprobs():
    engine = FakeEngine(prompt_length=2)
    result = search([1, 2], engine.generate, verify, settings(), SamplingParams(seed=3))
    assert result.stopped == "terminate_num"
    assert len(result.trajectories) == 20
    assert result.solved
    for trajectory in result.trajectories:
        assert trajectory.logprobs == [-0.1 * t for t in trajectory.token_ids]
        assert sum(trajectory.step_lengths) == len(trajectory.token_ids)
        assert len(trajectory.token_values) == len(trajectory.token_ids)
        assert trajectory.token_values[-1] == trajectory.step_values[-1]
        assert trajectory.correct == (trajectory.text == "567")
        assert trajectory.score == (1.0 if trajectory.correct else -1.0)
    texts = [t.text for t in result.trajectories]
    assert len(set(texts)) == len(texts)  # identical steps are merged, so no path is recorded twice
    # Every expansion is one generate call of W rows at the chunk length.
    assert all(rows <= 3 and length == 1 for rows, length in engine.calls)
    assert result.engine_calls == result.nodes_expanded == len(engine.calls)
    assert result.tokens_generated <= 200
    # the final step's value of a recorded terminal is its backed-up value: +1 or −1 after one visit
    assert all(t.step_values[-1] == pytest.approx(t.score) for t in result.trajectories if t.step_lengths)


def test_search_stops_within_its_token_budget():
    engine = FakeEngine(prompt_length=2)
    tight = SearchSettings.from_config(
        MCTSConfig(expansion="sample", chunk_tokens=2, expansion_width=4),
        max_new_tokens=4,
        group_size=16,
        budget_tokens=13,
    )
    result = search([1, 2], engine.generate, lambda text: VerifierResult(0.0, False), tight, SamplingParams())
    assert result.stopped == "budget"
    assert result.tokens_generated <= 13
    assert not result.solved


def test_lockstep_searches_share_generate_calls():
    engine = FakeEngine(prompt_length=2)
    trees = [TreeSearch([1, p], verify, settings()) for p in (2, 3, 4)]
    results = run_searches(trees, engine.generate, SamplingParams(seed=1))
    assert len(engine.calls) == max(r.engine_calls for r in results)  # one call per round serves every tree
    assert sum(r.engine_calls for r in results) > len(engine.calls)
    assert all(r.solved for r in results)


def test_step_delimiter_ends_a_step_but_not_the_answer():
    prompt = [1]

    def generate(prefixes, params):
        assert "|" in params.stop  # run_searches adds the step delimiter to the stop strings
        outputs = []
        for prefix in prefixes:
            if len(prefix) == 1:  # first step: "5" then the delimiter token 0
                outputs.append(GenerationOutput([5, 0], [-0.1, -0.2], "stop", "5"))
            else:
                outputs.append(GenerationOutput([6, EOS], [-0.3, -0.4], "stop", "6"))
        return outputs

    decode = lambda ids: "".join("|" if t == 0 else str(t) for t in ids)  # noqa: E731
    config = MCTSConfig(expansion="sample", chunk_tokens=4, expansion_width=1, min_width=1, step_delimiter="|")
    tree_settings = SearchSettings.from_config(config, max_new_tokens=8, group_size=1, budget_tokens=50)
    result = search(
        prompt,
        generate,
        lambda text: VerifierResult(float(text == "5|6"), text == "5|6"),
        tree_settings,
        SamplingParams(),
        decode=decode,
        eos_token_ids=(EOS,),
    )
    assert [t.text for t in result.trajectories] == ["5|6"]
    assert result.trajectories[0].token_ids == [5, 0, 6, EOS]
    assert result.trajectories[0].step_lengths == [2, 2]
    assert result.solved


# ------------------------------------------------------------------------------ whole 'prior' searches

#: Next-token candidates of FakePriorEngine at each answer position: digits, then eos after two.
DIGITS = [(5, -0.2), (6, -0.9), (7, -2.0)]
AFTER_TWO = [(EOS, -0.1), (5, -3.0)]


class FakePriorEngine:
    """The policy of a two-digit answer: at each of the first two positions 5, 6, 7 with logprobs
    −0.2, −0.9, −2.0; then eos (−0.1) or another 5 (−3.0); eos only after three tokens."""

    def __init__(self, prompt_length: int) -> None:
        self.prompt_length = prompt_length
        self.calls: list[list[list[int]]] = []

    def next_tokens(self, prefixes, params: SamplingParams, top_k: int):
        self.calls.append([list(prefix) for prefix in prefixes])
        answers = []
        for prefix in prefixes:
            done = len(prefix) - self.prompt_length
            answers.append((DIGITS if done < 2 else AFTER_TWO if done == 2 else [(EOS, -0.01)])[:top_k])
        return answers

    def generate(self, prefixes, params):
        raise AssertionError("expansion 'prior' samples nothing")


def digits(ids) -> str:
    return "".join(str(t) for t in ids if t != EOS)


def prior_settings(**overrides) -> SearchSettings:
    config = MCTSConfig(**{"expansion_width": 4, **overrides})
    return SearchSettings.from_config(config, max_new_tokens=4, group_size=30, budget_tokens=60)


def all_nodes(root: Node) -> list[Node]:
    nodes, stack = [], [root]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.children)
    return nodes


def test_prior_search_tries_answers_most_probable_first_without_repeating_a_step():
    engine = FakePriorEngine(prompt_length=2)
    target = lambda text: VerifierResult(float(text == "67"), text == "67")  # noqa: E731
    tree = TreeSearch([1, 2], target, prior_settings(), decode=digits, eos_token_ids=(EOS,))
    result = run_searches([tree], engine.generate, SamplingParams(), next_tokens=engine.next_tokens)[0]
    assert result.solved
    texts = [t.text for t in result.trajectories]
    assert texts[0] == "55"  # the policy's most probable answer is tried first
    assert len(set(texts)) == len(texts)
    for node in all_nodes(tree.root):
        tokens = [child.token_ids[0] for child in node.children]
        assert len(tokens) == len(set(tokens)), "a node's children start with different tokens"
        assert all(len(child.token_ids) == 1 for child in node.children)
        if node.parent is not None:
            assert node.path_logprob == pytest.approx(node.parent.path_logprob + node.logprobs[0])
    for trajectory in result.trajectories:
        assert set(trajectory.step_lengths) == {1}
        positions = [dict(DIGITS), dict(DIGITS), dict(AFTER_TWO), {EOS: -0.01}]
        expected = [position[token] for position, token in zip(positions, trajectory.token_ids, strict=False)]
        assert trajectory.logprobs == pytest.approx(expected)
        assert trajectory.correct == (trajectory.text == "67")
    # one token per node; each node's candidates are asked for once, one prefix a call for one tree
    assert result.tokens_generated == result.nodes_generated == len(all_nodes(tree.root)) - 1 <= 60
    asked = [tuple(prefix) for call in engine.calls for prefix in call]
    assert len(asked) == len(set(asked)) == result.engine_calls


def test_prior_search_stops_within_its_token_budget_and_when_exhausted():
    engine = FakePriorEngine(prompt_length=2)
    never = lambda text: VerifierResult(0.0, False)  # noqa: E731
    tight = SearchSettings.from_config(MCTSConfig(), max_new_tokens=4, group_size=30, budget_tokens=7)
    result = search([1, 2], engine.generate, never, tight, SamplingParams(), next_tokens=engine.next_tokens, decode=digits, eos_token_ids=(EOS,))  # fmt: skip
    assert result.stopped == "budget" and result.tokens_generated == 7 and not result.solved
    roomy = SearchSettings.from_config(MCTSConfig(), max_new_tokens=4, group_size=100, budget_tokens=1000)
    result = search([1, 2], engine.generate, never, roomy, SamplingParams(), next_tokens=engine.next_tokens, decode=digits, eos_token_ids=(EOS,))  # fmt: skip
    # every candidate tried: 3 + 9 two-digit prefixes, 9 eos + 9 third digits, 9 eos after those
    assert result.stopped == "exhausted" and result.tokens_generated == 3 + 9 + 18 + 9
    assert len(result.trajectories) == 18


def test_lockstep_prior_searches_share_next_token_calls():
    engine = FakePriorEngine(prompt_length=2)
    target = lambda text: VerifierResult(float(text == "67"), text == "67")  # noqa: E731
    trees = [TreeSearch([1, p], target, prior_settings(), decode=digits, eos_token_ids=(EOS,)) for p in (2, 3, 4)]
    results = run_searches(trees, engine.generate, SamplingParams(), next_tokens=engine.next_tokens)
    assert all(r.solved for r in results)
    assert len(engine.calls) == max(r.engine_calls for r in results)
    assert max(len(call) for call in engine.calls) == 3  # one call serves the three trees


def test_prior_expansion_needs_one_token_steps_decode_and_next_tokens():
    with pytest.raises(ValueError, match="one-token steps"):
        MCTSConfig(expansion="prior", chunk_tokens=2)
    with pytest.raises(ValueError, match="one-token steps"):
        MCTSConfig(step_delimiter="\n")
    never = lambda text: VerifierResult(0.0, False)  # noqa: E731
    with pytest.raises(ValueError, match="need `decode`"):
        TreeSearch([1], never, prior_settings())
    two_token = SearchSettings.from_config(
        MCTSConfig(expansion="sample", chunk_tokens=2), max_new_tokens=4, group_size=2
    )
    with pytest.raises(ValueError, match="one-token steps"):
        TreeSearch([1], never, replace(two_token, expansion="prior"), decode=digits)
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        TreeSearch([1], never, prior_settings(), decode=digits, stop=("",))
    tree = TreeSearch([1], never, prior_settings(), decode=digits)
    assert isinstance(tree.request(), PriorRequest)
    with pytest.raises(ValueError, match="needs `next_tokens`"):
        run_searches([tree], FakePriorEngine(1).generate, SamplingParams())


def test_searches_run_together_share_one_step_delimiter():
    def tree(delimiter):
        config = MCTSConfig(expansion="sample", chunk_tokens=2, step_delimiter=delimiter)
        tree_settings = SearchSettings.from_config(config, max_new_tokens=4, group_size=2)
        return TreeSearch([1], lambda text: VerifierResult(0.0, False), tree_settings, decode=digits)

    with pytest.raises(ValueError, match="share one step delimiter"):
        run_searches([tree("|"), tree("\n")], FakeEngine(1).generate, SamplingParams())


def test_a_search_goes_on_until_solved_and_keeps_the_solution_and_the_first_wrong_answers():
    engine = FakePriorEngine(prompt_length=2)
    target = lambda text: VerifierResult(float(text == "67"), text == "67")  # noqa: E731

    def run(until_solved: bool):
        config = MCTSConfig(until_solved=until_solved)
        tree_settings = SearchSettings.from_config(config, max_new_tokens=4, group_size=2, budget_tokens=60)
        return search([1, 2], engine.generate, target, tree_settings, SamplingParams(), next_tokens=engine.next_tokens, decode=digits, eos_token_ids=(EOS,))  # fmt: skip

    reference = run(until_solved=False)  # stops at terminate_num = 2 recorded trajectories
    assert [t.text for t in reference.trajectories] == ["55", "65"] and not reference.solved
    solved = run(until_solved=True)
    assert solved.solved and solved.stopped == "terminate_num"
    assert [t.text for t in solved.trajectories] == ["55", "67"]  # the first wrong answer, then the solution
    assert solved.tokens_generated > reference.tokens_generated


def test_kept_trajectories_prefer_correct_ones_then_the_earliest_wrong_ones():
    nodes = [Node(correct=flag) for flag in (False, False, True, False, True, True)]
    assert kept_trajectories(nodes, 3) == [nodes[2], nodes[4], nodes[5]]
    assert kept_trajectories(nodes, 4) == [nodes[0], nodes[2], nodes[4], nodes[5]]
    assert kept_trajectories(nodes, 10) == nodes
    assert kept_trajectories(nodes[:2], 1) == [nodes[0]]
