"""learner.batching: padding layout, and that position t of every tensor is about token t."""

from __future__ import annotations

import math

import pytest
import torch

from orchard.config import ModelConfig, TinyModelConfig
from orchard.learner.batching import build_training_tensors, sequence_logprobs
from orchard.records import Completion, Group, Prompt
from orchard.rollout.model import build_model
from orchard.rollout.tokenizer import CharTokenizer


def completion(token_ids: list[int], logprobs: list[float], reward: float = 0.0) -> Completion:
    return Completion(text="", token_ids=token_ids, logprobs=logprobs, policy_version=0, reward=reward)


def group(prompt_ids: list[int], completions: list[Completion], name: str = "g") -> Group:
    prompt = Prompt(id=f"prompt-{name}", text="", answer="", distribution="d")
    return Group(prompt=prompt, prompt_token_ids=prompt_ids, completions=completions, id=name)


def two_groups() -> list[Group]:
    return [
        group([1, 5, 6], [completion([7, 8], [-0.1, -0.2], 1.0), completion([9], [-0.3], 0.0)], "a"),
        group([1, 4], [completion([10, 11, 12], [-0.4, -0.5, -0.6], 0.5)], "b"),
    ]


def test_layout_of_training_tensors():
    tensors = build_training_tensors(two_groups(), pad_id=0)
    assert tensors.input_ids.tolist() == [[1, 5, 6, 7, 8], [1, 5, 6, 9, 0], [1, 4, 10, 11, 12]]
    assert tensors.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert tensors.completion_mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0], [0, 0, 1, 1, 1]]
    # the behaviour logprob of token t sits at position t
    torch.testing.assert_close(
        tensors.old_logprobs,
        torch.tensor([[0, 0, 0, -0.1, -0.2], [0, 0, 0, -0.3, 0], [0, 0, -0.4, -0.5, -0.6]]),
    )
    assert tensors.rewards.tolist() == [1.0, 0.0, 0.5]
    assert tensors.group_index.tolist() == [0, 0, 1]
    assert tensors.num_sequences == 3 and tensors.num_tokens == 6


def test_select_trims_to_the_micro_batch():
    micro = build_training_tensors(two_groups(), pad_id=0).select(torch.tensor([1]))
    assert micro.input_ids.tolist() == [[1, 5, 6, 9]]
    assert micro.completion_mask.tolist() == [[0, 0, 0, 1]]
    assert micro.rewards.tolist() == [0.0] and micro.group_index.tolist() == [0]


@pytest.mark.parametrize(
    ("groups", "pad_id", "message"),
    [
        ([], 0, "at least one group"),
        ([group([1], [completion([2], [-1.0])])], -1, "pad_id must be a non-negative"),
        ([group([1], [], "empty")], 0, "group empty .* has no completions"),
        ([group([], [completion([2], [-1.0])], "bare")], 0, "group bare .* has no prompt tokens"),
    ],
)
def test_build_training_tensors_errors(groups, pad_id, message):
    with pytest.raises(ValueError, match=message):
        build_training_tensors(groups, pad_id=pad_id)


class NextTokenModel(torch.nn.Module):
    """Vocabulary of 3. After token x it predicts (x+1) mod 3 with probability 1/2, each other token 1/4.

    `scale` multiplies the logits (1.0 leaves them as they are) so the logprobs have a gradient.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, input_ids, attention_mask, use_cache=False):
        probabilities = torch.full((*input_ids.shape, 3), 0.25)
        probabilities.scatter_(-1, ((input_ids + 1) % 3).unsqueeze(-1), 0.5)
        return type("Output", (), {"logits": probabilities.log() * self.scale})()


def test_sequence_logprobs_are_aligned_with_the_tokens():
    # 0 → 1 is the likely step (log ½), 1 → 0 is not (log ¼); position 0 has no prediction (0).
    input_ids = torch.tensor([[0, 1, 2, 0], [2, 1, 0, 0]])
    logprobs, entropy = sequence_logprobs(NextTokenModel(), input_ids, torch.ones_like(input_ids))
    half, quarter = math.log(0.5), math.log(0.25)
    # row 0: 0→1 likely, 1→2 likely, 2→0 likely; row 1: 2→1 no, 1→0 no, 0→0 no
    torch.testing.assert_close(logprobs, torch.tensor([[0, half, half, half], [0, quarter, quarter, quarter]]))
    # H(½, ¼, ¼) = ½ ln 2 + ½ ln 4 = 1.0397208 at every predicted position
    torch.testing.assert_close(entropy, torch.tensor([[0.0] + [1.0397208] * 3] * 2))
    assert logprobs.requires_grad and not entropy.requires_grad


def test_temperature_divides_the_logits():
    # temperature 2: p ∝ √p → (√½, ½, ½) / (√½ + 1) → likely 0.4142136 (ln −0.8813736), other 0.2928932 (ln −1.2279471)
    input_ids = torch.tensor([[0, 1, 0]])
    logprobs, _ = sequence_logprobs(NextTokenModel(), input_ids, torch.ones_like(input_ids), temperature=2.0)
    torch.testing.assert_close(logprobs, torch.tensor([[0.0, -0.8813736, -1.2279471]]))


def test_sequence_logprobs_errors():
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature must be positive"):
        sequence_logprobs(NextTokenModel(), ids, torch.ones_like(ids), temperature=0.0)
    with pytest.raises(ValueError, match=r"must both be \[N, L\]"):
        sequence_logprobs(NextTokenModel(), ids, torch.ones(1, 2, dtype=torch.long))


def test_a_real_model_reproduces_its_own_sampling_logprobs():
    """Behaviour logprobs computed one token at a time (as a sampler does) equal the batched,
    right-padded recomputation at every completion position: the on-policy ratio is exactly 1."""
    tokenizer = CharTokenizer()
    tiny = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
    model = build_model(ModelConfig(tiny=tiny), tokenizer)
    temperature = 0.7

    def sampled(prompt: list[int], tokens: list[int]) -> Completion:
        logprobs = []
        with torch.no_grad():
            for index, token in enumerate(tokens):
                prefix = torch.tensor([prompt + tokens[:index]])
                logits = model(input_ids=prefix).logits[0, -1] / temperature
                logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        return completion(tokens, logprobs)

    prompt_a, prompt_b = tokenizer.encode("12+3="), tokenizer.encode("7*8=")
    groups = [
        group(prompt_a, [sampled(prompt_a, tokenizer.encode("15")), sampled(prompt_a, tokenizer.encode("9999"))], "a"),
        group(prompt_b, [sampled(prompt_b, tokenizer.encode("56"))], "b"),
    ]
    tensors = build_training_tensors(groups, pad_id=tokenizer.pad_id)
    with torch.no_grad():
        logprobs, _ = sequence_logprobs(model, tensors.input_ids, tensors.attention_mask, temperature)
    mask = tensors.completion_mask.bool()
    torch.testing.assert_close(logprobs[mask], tensors.old_logprobs[mask], atol=1e-5, rtol=1e-5)


def test_micro_batches_by_sequences_or_by_a_token_budget():
    from orchard.learner.batching import micro_batch_rows, padding_share

    # rows 0..5 of lengths 10, 2, 9, 3, 2, 1; longest first: 0 (10), 2 (9), 3 (3), 1 (2), 4 (2), 5 (1)
    lengths = torch.tensor([10, 2, 9, 3, 2, 1])
    fixed = micro_batch_rows(lengths, max_sequences=3)
    assert [rows.tolist() for rows in fixed] == [[0, 2, 3], [1, 4, 5]]
    # computed 3·10 + 3·2 = 36 tokens for 27 real ones: 9/36 padding
    assert padding_share(lengths, fixed) == pytest.approx(9 / 36)
    # budget 20: ⌊20/10⌋ = 2 rows of width 10, then ⌊20/3⌋ = 6 ≥ the 4 left
    budget = micro_batch_rows(lengths, max_sequences=3, max_tokens=20)
    assert [rows.tolist() for rows in budget] == [[0, 2], [3, 1, 4, 5]]
    assert all(len(rows) * int(lengths[rows].max()) <= 20 for rows in budget)
    # computed 2·10 + 4·3 = 32 for 27: 5/32 padding
    assert padding_share(lengths, budget) == pytest.approx(5 / 32)
    # a row longer than the budget goes alone; every row is in exactly one micro-batch
    alone = micro_batch_rows(lengths, max_sequences=3, max_tokens=4)
    assert [rows.tolist() for rows in alone][:2] == [[0], [2]]
    assert sorted(int(row) for rows in alone for row in rows) == list(range(6))
    assert micro_batch_rows(torch.tensor([], dtype=torch.long), max_sequences=3) == []  # no rows, no micro-batch


def test_groups_are_shared_whole_among_ranks_balanced_by_tokens():
    from orchard.learner.batching import shard_groups

    # tokens 50, 10, 40, 30: largest first — 50 → rank 0; 40 → rank 1; 30 → rank 1 (40 < 50); 10 → rank 0 (50 < 70)
    assert shard_groups([50, 10, 40, 30], 2) == [[0, 1], [2, 3]]
    assert shard_groups([5, 5, 5], 1) == [[0, 1, 2]]
    assert shard_groups([7], 3) == [[0], [], []]  # fewer groups than ranks: some ranks train nothing
    with pytest.raises(ValueError, match="ranks must be at least 1"):
        shard_groups([1], 0)


def test_a_rank_takes_the_rows_of_its_groups():
    from orchard.learner.trainer import own_rows

    group_index = torch.tensor([0, 0, 1, 1, 2, 2])  # three groups of two rows
    lengths = torch.tensor([9, 9, 1, 1, 5, 5])  # group tokens 18, 2, 10: rank 0 gets group 0, rank 1 groups 1, 2
    assert own_rows(group_index, lengths, 3, 0, 2).tolist() == [0, 1]
    assert own_rows(group_index, lengths, 3, 1, 2).tolist() == [2, 3, 4, 5]
    assert own_rows(group_index, lengths, 3, 0, 1).tolist() == [0, 1, 2, 3, 4, 5]
