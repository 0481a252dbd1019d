"""Every learner algorithm option through the real trainer: DeepSpeed on its CPU accelerator, a tiny
Qwen2, one or two optimizer steps each. Each test sets up a batch in which the option decides the
outcome (a step taken or skipped, a count, a loss that differs), so a trainer ignoring it fails."""

from __future__ import annotations

import math

import pytest
import torch

from orchard.config import DEMO_CONFIG, LearnerConfig, load_config
from orchard.learner.algorithms import disco_loss, disco_scores
from orchard.learner.batching import build_sft_tensors, build_training_tensors, sequence_logprobs, sequence_scores
from orchard.learner.trainer import GRPOTrainer
from orchard.records import Completion, Group, Prompt
from orchard.rollout.model import build_model
from tests.integration.trainer_setup import MODEL_CONFIG, TOKENIZER, restore_environment  # noqa: F401

TEMPERATURE = 1.0
MAX_LENGTH = 8


def solution_tokens(solution: str) -> list[int]:
    return TOKENIZER.encode(solution) + [TOKENIZER.eos_id]


def make_trainer(**learner: object) -> GRPOTrainer:
    return GRPOTrainer(
        build_model(MODEL_CONFIG, TOKENIZER, seed=0),
        LearnerConfig(**{"lr": 1e-2, "micro_batch_size": 4, **learner}),
        pad_id=TOKENIZER.pad_id,
        seed=0,
        temperature=TEMPERATURE,
        max_length=MAX_LENGTH,
        solution_tokens=solution_tokens,
    )


def completion(text: str, reward: float, **fields: object) -> Completion:
    return Completion(
        text=text,
        token_ids=TOKENIZER.encode(text),
        logprobs=[-2.0] * len(text),
        policy_version=0,
        reward=reward,
        correct=reward >= 1.0,
        **fields,
    )


def group(name: str, completions: list[Completion], *, prompt: str = "12+34=", solution: str | None = None) -> Group:
    return Group(
        prompt=Prompt(id=name, text=prompt, answer="46", distribution="test", solution=solution),
        prompt_token_ids=[TOKENIZER.bos_id, *TOKENIZER.encode(prompt)],
        completions=completions,
        id=name,
    )


def signal_group(name: str = "signal") -> Group:
    return group(name, [completion("46", 1.0), completion("45", 0.0), completion("4", 0.0), completion("466", 1.0)])


def weights(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    return trainer.export_weights()


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    return max(float((before[name] - after[name]).abs().max()) for name in before)


# ------------------------------------------------------------------------------------------ advantages


@pytest.mark.parametrize(
    ("advantage", "aggregation"),
    [
        ("grpo", "token-mean"),
        ("dr_grpo", "seq-mean-token-sum-norm"),
        ("lite_ppo", "token-mean"),
        ("rloo", "seq-mean-token-mean"),
    ],
)
def test_each_advantage_estimator_trains(advantage, aggregation):
    trainer = make_trainer(advantage=advantage, aggregation=aggregation)
    before = weights(trainer)
    result = trainer.train_step([signal_group("a"), signal_group("b")])
    assert not result.skipped and math.isfinite(result.loss)
    assert changed(before, weights(trainer)) > 0


def test_estimators_give_different_steps():
    # grpo scales group 1's advantages by 1/std, dr_grpo does not: the losses differ
    losses = {}
    for advantage, aggregation in (("grpo", "token-mean"), ("dr_grpo", "seq-mean-token-sum-norm")):
        batch = [signal_group("a"), group("b", [completion("46", 3.0), completion("4", 0.0)])]
        losses[advantage] = make_trainer(advantage=advantage, aggregation=aggregation).train_step(batch).loss
    assert losses["grpo"] != pytest.approx(losses["dr_grpo"])


def test_a_trainer_refuses_an_inconsistent_config():
    with pytest.raises(ValueError, match="learner.aggregation"):
        make_trainer(advantage="dr_grpo")


# ------------------------------------------------------------------------------------------ reward shaping


def length_only_group() -> Group:
    """Every completion correct; only their lengths (2, 4, 6, 8 tokens) differ."""
    return group("lengths", [completion(text, 1.0) for text in ("46", "46  ", "46    ", "46      ")])


def test_overlong_punishment_turns_length_into_signal():
    assert make_trainer().train_step([length_only_group()]).skip_reason == "no signal"
    # L_max 8, L_cache 4: lengths 6 and 8 get −0.5 and −1, so the group has signal
    trainer = make_trainer(overlong={"enabled": True, "cache_length": 4})
    before = weights(trainer)
    result = trainer.train_step([length_only_group()])
    assert not result.skipped
    assert changed(before, weights(trainer)) > 0


def test_truncated_completions_can_be_masked_out_of_the_loss():
    truncated = group(
        "cut", [completion("4646", 1.0, finish_reason="length"), completion("0000", 0.0, finish_reason="length")]
    )
    flat = group("flat", [completion("46", 1.0), completion("46", 1.0)])
    assert not make_trainer().train_step([truncated, flat]).skipped
    result = make_trainer(overlong={"mask_truncated": True}).train_step([truncated, flat])
    assert result.skip_reason == "no signal" and result.masked_truncated == 2


def test_dler_truncation_zeroes_long_completions():
    assert make_trainer(advantage="lite_ppo").train_step([length_only_group()]).skip_reason == "no signal"
    # L_T = 4: the 6- and 8-token completions get reward 0
    trainer = make_trainer(advantage="lite_ppo", length_penalty={"enabled": True, "target_length": 4})
    result = trainer.train_step([length_only_group()])
    assert not result.skipped and result.advantages_abs_mean > 0
    assert result.completion_length_mean == (2 + 4 + 6 + 8) / 4


# ------------------------------------------------------------------------------------------ Lp-Reg and KL


def test_lp_reg_regularises_tokens_and_changes_the_loss():
    plain = make_trainer().train_step([signal_group()])
    # the untrained model is near uniform: a proxy that cuts at half the max probability removes some
    # tokens, so the sampled ones it keeps get more mass than the policy gives them
    regularised = make_trainer(lp_reg={"enabled": True, "min_p": 0.5, "low_fraction": 1.0, "coef": 5.0})
    result = regularised.train_step([signal_group()])
    assert not result.skipped and result.lp_reg_tokens > 0
    assert result.loss != pytest.approx(plain.loss)
    assert plain.lp_reg_tokens == 0


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_to_the_reference_with_each_estimator(kind):
    trainer = make_trainer(kl_coef=0.5, kl_kind=kind)
    assert trainer.reference is not None
    first = trainer.train_step([signal_group()])
    second = trainer.train_step([signal_group()])
    assert first.kl == pytest.approx(0.0, abs=1e-6)  # the policy is still the reference
    assert second.kl != pytest.approx(0.0, abs=1e-6)
    if kind != "k1":
        assert second.kl > 0
    assert make_trainer(kl_coef=0.0).reference is None


# ------------------------------------------------------------------------------------------ hints


def hinted_group(behaviour_logprob: float) -> Group:
    completions = [completion("46", 1.0, source="hint"), completion("45", 0.0, source="hint")]
    for hinted in completions:
        hinted.logprobs = [behaviour_logprob] * len(hinted.token_ids)
    return group("hinted", completions)


def test_hinted_samples_train_against_the_bare_prompt_with_their_own_clip():
    # behaviour logprob −12 under the hinted context: the bare-prompt ratio is far above 1 + ε
    wide = make_trainer(hints={"clip_high": 1e6}).train_step([hinted_group(-12.0)])
    usual = make_trainer().train_step([hinted_group(-12.0)])
    assert wide.hinted_sequences == usual.hinted_sequences == 2
    assert not wide.skipped and not usual.skipped
    assert usual.clip_fraction > 0 and wide.clip_fraction < usual.clip_fraction
    assert wide.loss < usual.loss  # the positive sample's ratio is no longer cut at 1.28


# ------------------------------------------------------------------------------------------ HPT


def all_fail_group(name: str = "hard", solution: str | None = "46") -> Group:
    return group(name, [completion("45", 0.0), completion("44", 0.0)], solution=solution)


def solution_logprob(trainer: GRPOTrainer) -> float:
    tensors = build_sft_tensors([([TOKENIZER.bos_id, *TOKENIZER.encode("12+34=")], solution_tokens("46"))], 0)
    with torch.no_grad():
        logprobs, _ = sequence_logprobs(trainer.engine.module, tensors.input_ids, tensors.attention_mask)
    return float((logprobs * tensors.completion_mask).sum())


def test_hpt_trains_all_fail_prompts_on_their_solution():
    assert make_trainer().train_step([all_fail_group()]).skip_reason == "no signal"
    trainer = make_trainer(hpt={"enabled": True})
    before = solution_logprob(trainer)
    result = trainer.train_step([all_fail_group(), signal_group()])
    assert not result.skipped and result.sft_groups == 1 and result.sft_loss > 0
    second = trainer.train_step([all_fail_group()])
    assert not second.skipped and second.sft_groups == 1
    assert solution_logprob(trainer) > before
    assert second.sft_loss < result.sft_loss


def test_hpt_leaves_prompts_without_solution_or_above_threshold_to_rl():
    trainer = make_trainer(hpt={"enabled": True, "pass_rate_threshold": 0.25})
    result = trainer.train_step(
        [all_fail_group(solution=None), group("easy", signal_group().completions, solution="46")]
    )
    assert result.sft_groups == 0 and not result.skipped
    # with the gate at 0.5 the half-solved group switches to SFT too
    trainer = make_trainer(hpt={"enabled": True, "pass_rate_threshold": 0.5})
    assert trainer.train_step([group("easy", signal_group().completions, solution="46")]).sft_groups == 1


def test_hpt_needs_a_solution_encoder():
    with pytest.raises(ValueError, match="solution_tokens"):
        GRPOTrainer(
            build_model(MODEL_CONFIG, TOKENIZER, seed=0),
            LearnerConfig(hpt={"enabled": True}),
            pad_id=TOKENIZER.pad_id,
            seed=0,
            temperature=1.0,
            max_length=MAX_LENGTH,
        )


# ------------------------------------------------------------------------------------------ tree trajectories


def test_tree_trajectories_train_on_their_token_values():
    # learner.tree_advantage node_values: equal outcome rewards give no outcome signal, but the steps' values differ
    trajectories = [
        completion("46", 1.0, source="tree", token_values=[0.5, 1.0]),
        completion("47", 1.0, source="tree", token_values=[0.5, -1.0]),
    ]
    assert make_trainer().train_step([group("plain", [completion("46", 1.0), completion("47", 1.0)])]).skipped
    trainer = make_trainer(tree_advantage="node_values")
    before = weights(trainer)
    result = trainer.train_step([group("tree", trajectories)])
    assert not result.skipped and result.tree_sequences == 2
    assert changed(before, weights(trainer)) > 0


def test_tree_trajectories_train_on_prefix_credit():
    # the default, prefix credit: the shared first token "4" gets no advantage, "6" and "7" all of it
    trajectories = [
        completion("46", 1.0, source="tree", token_values=[0.5, 1.0]),
        completion("47", 0.0, source="tree", token_values=[0.5, -1.0]),
    ]
    trainer = make_trainer()
    before = weights(trainer)
    result = trainer.train_step([group("tree", trajectories)])
    assert not result.skipped and result.tree_sequences == 2
    assert changed(before, weights(trainer)) > 0


# ------------------------------------------------------------------------------------------ DisCO


def disco_batch() -> list[Group]:
    """A group with two correct and two incorrect answers, and one with only incorrect ones (no signal)."""
    return [signal_group("a"), all_fail_group("b")]


def disco_reference(trainer: GRPOTrainer, batch: list[Group], **options: object) -> tuple[torch.Tensor, torch.Tensor]:
    """`disco_loss` and the log-L scores of `batch` under the trainer's current weights, outside the trainer."""
    tensors = build_training_tensors(batch, TOKENIZER.pad_id)
    with torch.no_grad():
        logprobs, _ = sequence_logprobs(trainer.engine.module, tensors.input_ids, tensors.attention_mask, TEMPERATURE)
    correct = torch.tensor([c.correct for g in batch for c in g.completions])
    mask = tensors.completion_mask
    loss, _ = disco_loss(logprobs, tensors.old_logprobs, mask, correct, tensors.group_index, **options)
    return loss, disco_scores(logprobs, tensors.old_logprobs, mask, "log_l")


@pytest.mark.parametrize(("score", "robust", "tau"), [("log_l", True, 10.0), ("l_ratio", False, 1.0)])
def test_disco_step_loss_is_the_pure_functions_and_micro_batches_do_not_change_it(score, robust, tau):
    # behaviour logprobs −2.0 per token, far from the learner's: the KL is above δ and the penalty acts
    options = {"score": score, "robust": robust, "tau": tau, "delta": 1e-4, "beta": 1.0}
    split, whole = (make_trainer(objective="disco", disco=options, micro_batch_size=size) for size in (1, 8))
    expected, _ = disco_reference(split, disco_batch(), **options)
    results = [trainer.train_step(disco_batch()) for trainer in (split, whole)]
    for result in results:
        assert not result.skipped and result.clip_fraction == 0.0
        assert result.loss == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    # the gradient accumulated over one-sequence micro-batches is the whole batch's: the same update up to
    # float32 summation order, which Adam's first step (about lr = 1e-2 per weight) magnifies to ~1e-6
    assert changed(weights(split), weights(whole)) < 1e-4


def test_disco_step_raises_the_correct_answers_scores():
    trainer = make_trainer(objective="disco", disco={"tau": 1.0})
    batch = [on_policy_group(trainer)]  # KL 0 at the start: the discriminative term drives the step
    _, before = disco_reference(trainer, batch)
    result = trainer.train_step(batch)
    assert not result.skipped and result.mismatch_abs_max < 1e-5
    _, after = disco_reference(trainer, batch)
    correct = torch.tensor([c.correct for c in batch[0].completions])
    assert bool((after[correct] > before[correct]).all())
    assert float(after[correct].mean() - after[~correct].mean()) > float(
        before[correct].mean() - before[~correct].mean()
    )


def test_disco_skips_batches_without_a_correct_and_an_incorrect_answer():
    trainer = make_trainer(objective="disco")
    assert trainer.train_step([all_fail_group(), length_only_group()]).skip_reason == "no signal"


def test_disco_refuses_options_made_for_the_clipped_ratio():
    with pytest.raises(ValueError, match=r"learner.lp_reg.enabled: objective 'disco'.*learner.tis_cap"):
        make_trainer(objective="disco", lp_reg={"enabled": True}, recompute_old_logprobs=True, tis_cap=2.0)


# ------------------------------------------------------------------------------------------ PPO's critic


def ppo_trainer(**critic: object) -> GRPOTrainer:
    return make_trainer(advantage="gae", dynamic_sampling=False, critic={"lr": 1e-2, **critic})


def critic_values(trainer: GRPOTrainer, batch: list[Group]) -> torch.Tensor:
    return trainer._critic_values(build_training_tensors(batch, TOKENIZER.pad_id))


def predictable_batch() -> list[Group]:
    """Two prompts, one answered right every time and one wrong every time: a return the prompt alone
    predicts, so a critic can learn it exactly (and GRPO sees no signal in either group)."""
    right = group("right", [completion("46", 1.0) for _ in range(4)])
    wrong = group("wrong", [completion(text, 0.0) for text in ("1", "12", "123", "7")], prompt="99+99=")
    return [right, wrong]


@pytest.mark.parametrize("stage", [0, 3])
def test_ppo_trains_the_critic_towards_the_returns_and_exports_only_the_policy(stage):
    trainer = make_trainer(advantage="gae", zero_stage=stage, critic={"lr": 3e-3})
    before = weights(trainer)
    batch = predictable_batch()
    results = [trainer.train_step(batch) for _ in range(8)]
    assert not any(result.skipped for result in results)  # groups without GRPO signal train under PPO
    losses = [result.value_loss for result in results]
    assert losses[-1] < 0.25 * losses[0], losses  # the critic learns the returns
    assert results[0].value_explained_variance == pytest.approx(0.0)  # a zero head: values 0 at first
    assert results[-1].value_explained_variance > 0.5
    assert all(result.critic_grad_norm > 0 and result.critic_skipped == 0 for result in results)
    after = weights(trainer)
    assert set(after) == set(before) and changed(before, after) > 0  # the policy's keys only, and it trained
    tensors = build_training_tensors(batch, TOKENIZER.pad_id)
    values = trainer._critic_values(tensors)
    mask = tensors.completion_mask > 0
    right, wrong = (
        values[(tensors.group_index == 0).unsqueeze(-1) & mask],
        values[(tensors.group_index == 1).unsqueeze(-1) & mask],
    )
    assert float(right.mean()) > float(wrong.mean()) + 0.5  # the value of a prompt answered right is higher


def test_the_value_clip_acts_from_the_critics_second_epoch():
    batch = [signal_group()]
    first = ppo_trainer(lr=1e-3, epochs=1, value_clip=1e-3).train_step(batch)
    assert first.value_clip_fraction == 0.0  # one pass: the values are those the advantages came from
    several = ppo_trainer(lr=1e-3, epochs=3, value_clip=1e-3).train_step(batch)
    assert several.value_clip_fraction > 0.5
    unclipped = ppo_trainer(lr=1e-3, epochs=3, value_clip=None).train_step(batch)
    assert unclipped.value_clip_fraction == 0.0
    assert unclipped.value_loss < several.value_loss  # the clip held the critic back


def test_the_critic_is_checkpointed_and_restored(tmp_path):
    batch = [signal_group(), all_fail_group()]
    trainer = ppo_trainer()
    for _ in range(2):
        trainer.train_step(batch)
    trainer.save_checkpoint(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "critic" / "latest").is_file()
    saved_values = critic_values(trainer, batch)
    continued = trainer.train_step(batch)

    restored = ppo_trainer()
    assert not torch.equal(critic_values(restored, batch), saved_values)
    restored.load_checkpoint(tmp_path / "ckpt")
    torch.testing.assert_close(critic_values(restored, batch), saved_values, rtol=0, atol=0)
    again = restored.train_step(batch)  # the same step as the original's: critic and its optimizer restored
    assert again.value_loss == pytest.approx(continued.value_loss, rel=1e-6)
    assert again.loss == pytest.approx(continued.loss, rel=1e-6)
    assert changed(weights(trainer), weights(restored)) < 1e-6


def test_a_checkpoint_without_a_critic_is_refused_by_a_ppo_learner(tmp_path):
    plain = make_trainer()
    plain.train_step([signal_group()])
    plain.save_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no critic .* without learner.advantage 'gae'"):
        ppo_trainer().load_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("recipe", sorted((DEMO_CONFIG.parent / "algorithms").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_recipe_trains(recipe):
    config = load_config(recipe)
    trainer = GRPOTrainer(
        build_model(MODEL_CONFIG, TOKENIZER, seed=0),
        config.learner.model_copy(update={"micro_batch_size": 4}),
        pad_id=TOKENIZER.pad_id,
        seed=0,
        temperature=1.0,
        max_length=config.rollout.max_new_tokens,
        solution_tokens=solution_tokens,
    )
    before = weights(trainer)
    result = trainer.train_step([signal_group(), all_fail_group(), length_only_group()])
    assert not result.skipped and math.isfinite(result.loss)
    assert changed(before, weights(trainer)) > 0
    assert result.sft_groups == (1 if config.learner.hpt.enabled else 0)


# ------------------------------------------------------------------------------------------ rollout correction


def on_policy_group(trainer: GRPOTrainer, name: str = "on-policy", *, shift: float = 0.0) -> Group:
    """`signal_group` whose behaviour logprobs are the trainer's own for its current weights, plus `shift`."""
    built = signal_group(name)
    from orchard.learner.batching import build_training_tensors

    tensors = build_training_tensors([built], TOKENIZER.pad_id)
    with torch.no_grad():
        own, _ = sequence_logprobs(trainer.engine.module, tensors.input_ids, tensors.attention_mask, TEMPERATURE)
    prompt_length = len(built.prompt_token_ids)
    for row, item in enumerate(built.completions):
        values = own[row, prompt_length : prompt_length + len(item.token_ids)]
        item.logprobs = [float(value) + shift for value in values]
        item.policy_version = trainer.policy_version
    return built


def test_the_mismatch_of_behaviour_and_learner_logprobs_is_measured_on_the_learners_own_version():
    trainer = make_trainer()
    result = trainer.train_step([on_policy_group(trainer)])
    assert result.mismatch_tokens == 8 and result.mismatch_abs_max < 1e-5 and result.mismatch_k3 < 1e-10

    shifted = on_policy_group(trainer, shift=-0.1)  # the engine thought every token 10 % less likely
    stale = signal_group("stale")  # behaviour logprobs of version 0, two versions ago: not compared
    result = trainer.train_step([shifted, stale])
    assert result.mismatch_tokens == 8
    assert result.mismatch_abs_mean == pytest.approx(0.1, abs=1e-4)
    assert result.mismatch_k3 == pytest.approx(math.exp(0.1) - 0.1 - 1, rel=1e-3)


def test_recomputed_old_logprobs_make_the_ratio_one_and_tis_weighs_the_behaviour():
    plain, recomputed, corrected = (
        make_trainer(),
        make_trainer(recompute_old_logprobs=True),
        make_trainer(recompute_old_logprobs=True, tis_cap=2.0),
    )
    # behaviour logprobs of -2.0 per token, far from the learner's: the plain ratio clips, the recomputed one is 1
    plain_result = plain.train_step([signal_group()])
    recomputed_result = recomputed.train_step([signal_group()])
    corrected_result = corrected.train_step([signal_group()])
    assert plain_result.clip_fraction > 0.3
    assert recomputed_result.clip_fraction == 0.0 and corrected_result.clip_fraction == 0.0
    assert recomputed_result.tis_weight_mean == 0.0  # off
    # π_learner / π_behaviour = exp(log π + 2) > 1 for tokens the learner finds likelier than e^-2 ≈ 0.135
    assert 0 < corrected_result.tis_weight_mean <= 2.0
    assert corrected_result.loss != pytest.approx(recomputed_result.loss)
    assert changed(weights(recomputed), weights(corrected)) > 0


# ------------------------------------------------------------------------------------------ multi-turn


def tool_group(name: str, observation_logprob: float) -> Group:
    """Multi-turn completions: a call, the tool's observation (logprobs `observation_logprob`, which the
    learner must never read), and an answer; rewards differ so the group has signal."""
    completions = []
    for index, (call, output, answer, reward) in enumerate([("1+2", "3", "3", 1.0), ("1+2", "3", "4", 0.0)]):
        head = TOKENIZER.encode(f"<python>print({call})</python>")
        observation = TOKENIZER.encode(f"<output>{output}</output>")
        tail = TOKENIZER.encode(answer)
        tokens = head + observation + tail
        completions.append(
            Completion(
                text=TOKENIZER.decode(tokens),
                token_ids=tokens,
                logprobs=[-2.0 - 0.1 * index] * len(head)
                + [observation_logprob] * len(observation)
                + [-1.5] * len(tail),
                policy_version=0,
                reward=reward,
                observation_spans=[(len(head), len(head) + len(observation))],
            )
        )
    return Group(
        prompt=Prompt(id=name, text="1+2=", answer="3", distribution="tools"),
        prompt_token_ids=TOKENIZER.encode("1+2="),
        completions=completions,
        id=name,
    )


def test_observation_tokens_weigh_nothing_in_the_loss_the_kl_and_the_entropy():
    """Two learners, the same multi-turn group but for the logprobs recorded on its observation tokens:
    the same step, to the bit. The entropy is the mean over the policy's own tokens alone."""
    config = {"kl_coef": 0.5, "micro_batch_size": 4}
    first, second = make_trainer(**config), make_trainer(**config)
    group = tool_group("calls", observation_logprob=0.0)
    tensors = build_training_tensors([group], TOKENIZER.pad_id)
    with torch.no_grad():
        scores = sequence_scores(first.engine.module, tensors.input_ids, tensors.attention_mask, TEMPERATURE)
    mask = tensors.completion_mask
    expected_entropy = float((scores.entropy * mask).sum() / mask.sum())

    a = first.train_step([group])
    b = second.train_step([tool_group("calls", observation_logprob=-40.0)])
    policy_tokens = sum(c.policy_token_count for c in group.completions)
    assert a.num_tokens == b.num_tokens == policy_tokens < group.num_tokens
    assert (a.loss, a.kl, a.entropy) == (b.loss, b.kl, b.entropy)
    assert a.entropy == pytest.approx(expected_entropy, rel=1e-5)
    assert weights(first).keys() == weights(second).keys()
    assert all(torch.equal(weights(first)[k], weights(second)[k]) for k in weights(first))
