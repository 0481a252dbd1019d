"""The GRPO-family learner: one DeepSpeed optimizer step per batch of groups.

`GRPOTrainer.train_step(groups)` turns groups into padded tensors (`learner.batching`), shapes the
rewards (DAPO overlong punishment, DLER truncation), computes advantages with the configured
estimator (per-token ones for tree trajectories; with `advantage: gae`, GAE from PPO's critic, a
`learner.critic.ValueModel` trained by a second DeepSpeed engine on the clipped value loss after
the policy's update) and picks the rows and SFT examples
(`learner.signals`), then the PPO-clip loss with its options (Lp-Reg,
hinted samples' clip range, KL to a reference) or DisCO's objective (`learner.objective`), adds
HPT's SFT loss for the groups it switches (`learner.algorithms`), accumulates gradients over micro-batches and takes one optimizer step
through a real `deepspeed.initialize` engine (ZeRO stage 0-3 from `LearnerConfig`). On a machine
without CUDA DeepSpeed runs on its CPU accelerator as a single-rank process group. A model built in
bfloat16 (`model.dtype: bfloat16`, the GPU recipes) trains in DeepSpeed's bf16 mode (fp32 master
weights and optimizer state, bf16 forward and backward); any other dtype trains in that dtype. With
`learner.lora` the model is wrapped with LoRA adapters first (`learner.lora`): only they are in the
optimizer, the KL reference is the base with the adapters off, and every export is the merged policy.

Micro-batching never changes the result: micro-batch `j` contributes `loss_j · w_j` with
`w_j = tokens_j / tokens` (token-mean) or `w_j = sequences_j / sequences` (the per-sequence
aggregations, counting only sequences with a completion token), so the accumulated gradient is the gradient of the loss aggregated over the whole
batch, whatever `micro_batch_size` is. HPT's SFT examples form their own micro-batches weighted by
their share of the SFT tokens, so the step's loss is `Σ α·L_RL + β·L_SFT`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from orchard.config import LearnerConfig
from orchard.learner.algorithms import (
    active_rows,
    aggregate,
    disco_objective,
    disco_penalty,
    disco_scores,
    explained_variance,
    gspo_loss_terms,
    hint_clip_ranges,
    kl_penalty,
    logprob_mismatch,
    lp_reg_loss,
    masked_mean,
    policy_loss_terms,
    sft_loss,
    truncated_importance_weights,
    value_loss_terms,
)
from orchard.learner.batching import (
    TrainingTensors,
    build_sft_tensors,
    build_training_tensors,
    micro_batch_rows,
    sequence_logprobs,
    sequence_scores,
    shard_groups,
)
from orchard.learner.critic import ValueModel
from orchard.learner.lora import add_adapters, merged_state_dict
from orchard.learner.signals import gae_signals, select_signals, shaped_rewards, token_advantages
from orchard.records import Group


@dataclass
class StepResult:
    """What one `train_step` did. Plain numbers only, so `dataclasses.asdict(result)` is JSON-serialisable.

    On a skipped step the weights did not change and `skip_reason` says why (`non_finite` when the loss
    or the gradients were NaN or infinite); statistics that were not computed, or came out non-finite,
    are 0.0 (the offending value is quoted in `skip_reason`).
    """

    loss: float  # the batch's aggregated loss (policy loss + kl_coef · KL)
    kl: float  # mean per-token KL estimate to the reference (0.0 when kl_coef is 0: no reference)
    entropy: float  # mean entropy of the policy's next-token distribution over completion tokens
    clip_fraction: float  # share of completion tokens whose clipped PPO term was active
    grad_norm: float  # global gradient norm before clipping
    num_sequences: int
    num_tokens: int  # completion tokens trained on
    advantages_abs_mean: float  # mean |Â| over sequences (DUMP's learnability signal)
    seconds: float
    skipped: bool
    skip_reason: str | None = None
    non_finite: bool = False  # skipped because the loss or the gradient norm was NaN or infinite
    sft_loss: float = 0.0  # HPT: token-mean NLL of the switched groups' solutions (0.0 when none)
    sft_groups: int = 0  # HPT: groups trained on their reference solution
    lp_reg_tokens: int = 0  # Lp-Reg: tokens regularised towards the proxy
    masked_truncated: int = 0  # overlong filtering: truncated completions left out of the loss
    hinted_sequences: int = 0  # completions sampled with a hint in context
    tree_sequences: int = 0  # tree-search trajectories in the batch (their advantages: learner.tree_advantage)
    completion_length_mean: float = 0.0  # mean completion tokens of the batch (DLER reports it beside accuracy)
    # rollout–training mismatch on the tokens sampled by the learner's own version (`logprob_mismatch`)
    mismatch_k3: float = 0.0
    mismatch_abs_mean: float = 0.0
    mismatch_abs_max: float = 0.0
    mismatch_tokens: int = 0
    tis_weight_mean: float = 0.0  # mean truncated importance weight over the RL tokens (learner.tis_cap)
    padding_share: float = 0.0  # share of the tokens the micro-batches computed that were padding
    # PPO's critic (advantage 'gae'; 0 otherwise): its token-mean clipped value loss over its epochs' last
    # pass, the share of tokens whose clipped term was the larger, how much of the returns the values the
    # advantages came from explain, and its gradient norm; critic_skipped 1 when its update was not applied
    value_loss: float = 0.0
    value_clip_fraction: float = 0.0
    value_explained_variance: float = 0.0
    critic_grad_norm: float = 0.0
    critic_skipped: int = 0


def _finite_or_zero(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def prepare_deepspeed_environment() -> None:
    """Make `import deepspeed` and `deepspeed.initialize` work in a plain single process.

    Without CUDA, DeepSpeed is told to use its CPU accelerator (it must be set before the import).
    Without an initialised `torch.distributed`, the environment of a one-rank process group is set
    (a free local port); with one, its rank variables are restated; variables already set, e.g. by a
    launcher, win.
    """
    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    else:
        # An existing process group (an earlier trainer in this process) whose environment was since
        # cleared: DeepSpeed still reads the rank variables, so they are restated from the group.
        rank = torch.distributed.get_rank()
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(torch.distributed.get_world_size()))
        os.environ.setdefault("LOCAL_RANK", str(rank))


def deepspeed_config(config: LearnerConfig, *, bf16: bool, lr: float | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for `config` (the learning rate `lr` instead of `config.lr` when given:
    the critic's).

    - Optimizer: AdamW with `torch_adam`, i.e. `torch.optim.AdamW`, which works for every ZeRO stage
      on the CPU accelerator with nothing to compile (DeepSpeed's FusedAdam needs a built op, and its
      CPU Adam is only used with optimizer offload, which is not configured).
    - Gradient accumulation is driven by the trainer, which marks the last micro-batch of a step as
      the accumulation boundary (`set_gradient_accumulation_boundary`), because the number of
      micro-batches varies with the batch. So `gradient_accumulation_steps` is 1 and
      `train_micro_batch_size_per_gpu` is the micro-batch size; DeepSpeed's own micro-step counter
      and its loss division by the accumulation steps are not used.
    """
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": config.lr if lr is None else lr, "weight_decay": config.weight_decay, "torch_adam": True},
        },
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class GRPOTrainer:
    """Trains `model` with the PPO-clip policy loss (or DisCO's objective) of `config` on groups of scored completions.

    `temperature` must be the sampler's: the current policy's logprobs are computed from
    `logits / temperature`, as the behaviour logprobs were. `max_length` is Dr. GRPO's constant
    `L_max` (`seq-mean-token-sum-norm`) and the default length of the overlong and truncation
    options, normally the longest completion (rollout.max_new_tokens). `solution_tokens` encodes a
    reference solution as the completion tokens the model should produce (HPT needs it). The model
    stays in eval mode (no dropout), so on-policy importance ratios are exactly 1.

    Counters: `step` counts `train_step` calls, `policy_version` the optimizer updates applied.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: LearnerConfig,
        *,
        pad_id: int,
        seed: int,
        temperature: float,
        max_length: int,
        solution_tokens: Callable[[str], list[int]] | None = None,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive (use 1.0 for greedy rollouts), got {temperature}")
        if max_length <= 0:
            raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
        problems = config.problems(max_length)
        if problems:
            raise ValueError("; ".join(f"learner.{path}: {message}" for path, message in problems))
        if config.hpt.enabled and solution_tokens is None:
            raise ValueError("learner.hpt needs solution_tokens, the tokenizer's encoding of a reference solution")
        self.config = config
        self.solution_tokens = solution_tokens
        self.pad_id = pad_id
        self.temperature = temperature
        self.max_length = max_length
        self.step = 0
        self.policy_version = 0

        prepare_deepspeed_environment()
        import deepspeed

        self._deepspeed = deepspeed
        torch.manual_seed(seed)
        bf16 = next(model.parameters()).dtype == torch.bfloat16
        # The reference is copied before DeepSpeed takes the model (ZeRO-3 partitions it in place). With
        # LoRA the frozen base is the reference: the policy with its adapters switched off.
        reference = copy.deepcopy(model) if config.kl_coef > 0 and not config.lora.enabled else None
        # PPO's critic starts from the initial policy's decoder; with LoRA it is a full copy of the base
        critic = ValueModel.from_policy(model) if config.advantage == "gae" else None
        if config.lora.enabled:
            model = add_adapters(model, config.lora)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(config, bf16=bf16),
        )
        self.device = self.engine.device
        self.reference: torch.nn.Module | None = None
        if reference is not None:
            dtype = torch.bfloat16 if bf16 else next(reference.parameters()).dtype
            reference = reference.to(device=self.device, dtype=dtype).eval()
            reference.requires_grad_(False)
            self.reference = reference
        self.critic: Any = None  # a DeepSpeed engine of its own, with its own optimizer
        if critic is not None:
            self.critic, _, _, _ = deepspeed.initialize(
                model=critic,
                model_parameters=list(critic.parameters()),
                config=deepspeed_config(config, bf16=bf16, lr=config.critic.lr),
            )

    # ------------------------------------------------------------------------------------ training

    def train_step(self, groups: Sequence[Group], *, inject_nonfinite: bool = False) -> StepResult:
        """One optimizer step over all completions of `groups` (or a skipped step, see StepResult).

        `inject_nonfinite` (fault injection, `faults.nonfinite_loss_at_steps`): the loss becomes NaN, as a
        broken batch's would, and the step takes the non-finite path."""
        started = time.perf_counter()
        _check_rewards(groups)
        tensors = build_training_tensors(groups, self.pad_id)
        rewards = shaped_rewards(self.config, tensors, self.max_length)
        old_values = returns = None
        if self.critic is not None:
            old_values = self._critic_values(tensors)
            advantages, returns, sequence_advantages = gae_signals(self.config, tensors, rewards, old_values)
        else:
            advantages, sequence_advantages = token_advantages(self.config, tensors, rewards)
        self.step += 1
        signals = select_signals(self.config, groups, tensors, self.solution_tokens)
        keep, rl_weights, sft_examples = signals.keep, signals.rl_weights, signals.sft_examples
        summary = {
            "num_sequences": tensors.num_sequences,
            "num_tokens": tensors.num_tokens,
            "advantages_abs_mean": float(sequence_advantages.abs().mean()),
            "sft_groups": len(sft_examples),
            "masked_truncated": int(tensors.truncated.sum()) if self.config.overlong.mask_truncated else 0,
            "hinted_sequences": int(tensors.hinted.sum()),
            "tree_sequences": int(tensors.tree.sum()),
            "completion_length_mean": float(tensors.lengths.float().mean()),
        }

        def skipped(reason: str, non_finite: bool = False, **stats: float) -> StepResult:
            values = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0}
            values.update({name: _finite_or_zero(value) for name, value in stats.items()})
            return StepResult(
                **values,
                **summary,
                seconds=time.perf_counter() - started,
                skipped=True,
                skip_reason=reason,
                non_finite=non_finite,
            )

        rows = keep.nonzero().squeeze(-1)
        rl = tensors.select(rows) if len(rows) else None
        disco = self.config.objective == "disco"
        if disco and tensors.tree is not None and bool(tensors.tree.any()):
            raise ValueError(
                "learner.objective 'disco' scores whole answers by correctness; tree trajectories"
                " (rollout.strategy 'mcts') train on per-token values: use objective 'grpo' with them"
            )
        correct = _correct_rows(groups, tensors)[rows] if disco else None
        if disco:  # a group needs a correct and an incorrect answer to discriminate (DisCO's valid groups)
            rl_signal = (
                rl is not None
                and rl.num_tokens > 0
                and disco_objective(torch.zeros(len(rows)), correct, rl.group_index)[1] > 0
            )
        else:
            rl_signal = rl is not None and rl.num_tokens > 0 and bool((advantages[rows] != 0).any())
        if not rl_signal and not sft_examples:
            return skipped("no signal" if tensors.num_tokens else "no completion tokens")

        totals = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "clipped": 0.0, "sft": 0.0, "lp_reg": 0, "tis": 0.0}
        mismatch = {"k3": 0.0, "abs_sum": 0.0, "abs_max": 0.0, "tokens": 0}
        rank, world = data_parallel()
        jobs: list[tuple[str, TrainingTensors, Tensor, float]] = []  # (kind, micro-batch, its advantages, weight)
        plan: DiscoPlan | None = None
        if rl_signal and disco:
            mine = own_rows(rl.group_index, rl.attention_mask.sum(-1), len(groups), rank, world)
            share = rl.select(mine)
            chunks = self._micro_batches(share)
            plan = self._disco_plan(share, chunks, correct[mine], rl)
            totals["loss"] = plan.loss / world  # every rank holds the whole loss; the sum below is it once
            jobs += [("disco", share.select(chunk), plan.row_weights[chunk], 1.0) for chunk in chunks]
        elif rl_signal:
            # this rank's share: whole groups; weights relative to the whole batch (every rank's rows)
            mine = own_rows(rl.group_index, rl.attention_mask.sum(-1), len(groups), rank, world)
            share = rl.select(mine)
            rl_advantages, rl_row_weights = advantages[rows][mine], rl_weights[rows][mine]
            for chunk in self._micro_batches(share):
                micro = share.select(chunk)
                if self.config.aggregation == "token-mean":
                    weight = micro.num_tokens / rl.num_tokens
                else:  # rows without a completion token count in no denominator (`active_rows`)
                    weight = active_rows(micro.completion_mask) / active_rows(rl.completion_mask)
                width = micro.input_ids.shape[1]
                scaled_advantages = rl_advantages[chunk, :width] * rl_row_weights[chunk].unsqueeze(-1)
                jobs.append(("rl", micro, scaled_advantages, weight))
        if sft_examples:
            sft = build_sft_tensors([(prompt, solution) for prompt, solution, _ in sft_examples], self.pad_id)
            sft_weights = torch.tensor([weight for *_, weight in sft_examples])
            mine = own_rows(torch.arange(len(sft_examples)), sft.attention_mask.sum(-1), len(sft_examples), rank, world)
            share = sft.select(mine)
            for chunk in self._micro_batches(share):
                micro = share.select(chunk)
                jobs.append(("sft", micro, sft_weights[mine][chunk], micro.num_tokens / sft.num_tokens))
        real = sum(int(micro.attention_mask.sum()) for _, micro, _, _ in jobs)
        if world > 1:  # ZeRO's collectives need as many forward/backward passes on every rank
            jobs += idle_jobs(rl if rl_signal else None, sft if sft_examples else None, len(jobs))
        computed = sum(micro.attention_mask.numel() for _, micro, _, _ in jobs)
        nonfinite_loss: str | None = None
        rl_tokens = rl.num_tokens if rl_signal else 0
        for index, (kind, micro, micro_advantages, weight) in enumerate(jobs):
            if kind == "rl":
                loss, stats = self._micro_batch_loss(micro, micro_advantages)
            elif kind == "disco" and plan is not None:
                loss, stats = self._disco_micro_batch_loss(micro, micro_advantages, plan.kl_weight)
            else:
                loss, stats = self._sft_micro_batch_loss(micro, micro_advantages)
            if inject_nonfinite:
                loss = loss * math.nan
            # DeepSpeed averages the ranks' gradients; each rank's share of the sum is scaled up to match
            scaled = loss * (weight * world)
            self.engine.set_gradient_accumulation_boundary(index == len(jobs) - 1)
            if not torch.isfinite(scaled):
                if nonfinite_loss is None:
                    what = "loss" if kind == "rl" else "SFT loss"
                    nonfinite_loss = f"non-finite {what} ({float(loss.detach())}) in micro-batch {index}"
                # NaN gradients make the norm check refuse the step on every rank (ZeRO's own overflow
                # check discards everything accumulated; stage 0's check below); the remaining
                # micro-batches still run, as the other ranks' collectives expect them
                self.engine.backward(scaled * math.nan, scale_wrt_gas=False)
                continue
            self.engine.backward(scaled, scale_wrt_gas=False)
            if kind != "disco":  # DisCO's micro-batches carry a surrogate; its loss is the plan's
                totals["loss"] += float(scaled.detach()) / world
            if kind in ("rl", "disco"):
                totals["kl"] += stats["kl_sum"]
                totals["entropy"] += stats["entropy_sum"]
                totals["clipped"] += stats["clip_fraction"] * micro.num_tokens
                totals["lp_reg"] += stats["lp_reg_tokens"]
                totals["tis"] += stats["tis_weight_sum"]
                seen = stats["mismatch"]
                if seen["tokens"]:
                    mismatch["k3"] += seen["k3"] * seen["tokens"]
                    mismatch["abs_sum"] += seen["abs_mean"] * seen["tokens"]
                    mismatch["abs_max"] = max(mismatch["abs_max"], seen["abs_max"])
                    mismatch["tokens"] += seen["tokens"]
            else:
                totals["sft"] += stats["sft_loss"] * weight
        if world > 1:  # the step's figures over every rank's share
            summed = all_reduce_sum(
                [*totals.values(), *(mismatch[k] for k in ("k3", "abs_sum", "tokens")), computed, real]
            )
            totals = dict(zip(totals, summed[: len(totals)], strict=True))
            mismatch["k3"], mismatch["abs_sum"], tokens = summed[len(totals) : len(totals) + 3]
            mismatch["tokens"], totals["lp_reg"] = int(tokens), int(totals["lp_reg"])
            computed, real = summed[-2:]
            mismatch["abs_max"] = all_reduce_max(mismatch["abs_max"])
        summary["padding_share"] = 1.0 - real / max(1, computed)

        applied, grad_norm = self._optimizer_step(self.engine)
        tokens = max(rl_tokens, 1)
        stats = {
            "loss": totals["loss"],
            "kl": totals["kl"] / tokens,
            "entropy": totals["entropy"] / tokens,
            "clip_fraction": totals["clipped"] / tokens,
            "grad_norm": grad_norm,
        }
        summary["sft_loss"] = totals["sft"]
        summary["lp_reg_tokens"] = totals["lp_reg"]
        summary["tis_weight_mean"] = totals["tis"] / tokens if self.config.tis_cap is not None else 0.0
        compared = max(mismatch["tokens"], 1)
        summary["mismatch_k3"] = mismatch["k3"] / compared
        summary["mismatch_abs_mean"] = mismatch["abs_sum"] / compared
        summary["mismatch_abs_max"] = mismatch["abs_max"]
        summary["mismatch_tokens"] = mismatch["tokens"]
        if nonfinite_loss is not None:
            return skipped(nonfinite_loss, non_finite=True, grad_norm=grad_norm)
        if not applied:
            return skipped(f"non-finite gradient norm ({grad_norm})", non_finite=True, **stats)
        self.policy_version += 1
        if self.critic is not None and rl_signal:
            assert old_values is not None and returns is not None
            summary.update(self._critic_step(rl, old_values[rows], returns[rows], len(groups)))
        return StepResult(**stats, **summary, seconds=time.perf_counter() - started, skipped=False)

    # ------------------------------------------------------------------------------------ signals

    def _micro_batches(self, tensors: TrainingTensors) -> list[Tensor]:
        """Row indices of each micro-batch (`micro_batch_rows`: by `max_tokens_per_micro_batch` when set,
        else `micro_batch_size` rows)."""
        return micro_batch_rows(
            tensors.attention_mask.sum(-1),
            max_sequences=self.config.micro_batch_size,
            max_tokens=self.config.max_tokens_per_micro_batch,
        )

    def _micro_batch_loss(self, micro: TrainingTensors, advantages: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The micro-batch's RL loss aggregated over itself alone, and sums for the step's statistics.

        `advantages` is [n, width], already multiplied by each row's HPT weight α."""
        config = self.config
        input_ids = micro.input_ids.to(self.device)
        attention_mask = micro.attention_mask.to(self.device)
        mask = micro.completion_mask.to(self.device)
        advantages = advantages.to(self.device)
        behaviour_logprobs = micro.old_logprobs.to(self.device)
        scores = sequence_scores(
            self.engine,
            input_ids,
            attention_mask,
            self.temperature,
            proxy_min_p=config.lp_reg.min_p if config.lp_reg.enabled else None,
        )
        logprobs = scores.logprobs
        # Every micro-batch of a step runs on the weights before its one update, so the learner's own old
        # logprobs are this forward's values (`recompute_old_logprobs`), without a second pass.
        old_logprobs = logprobs.detach() if config.recompute_old_logprobs else behaviour_logprobs
        same_version = micro.policy_versions == self.policy_version if micro.policy_versions is not None else None
        compared = mask if same_version is None else mask * same_version.to(self.device).unsqueeze(-1)
        if micro.hinted is not None:  # sampled in another context: not a measure of the engine
            compared = compared * (~micro.hinted).to(self.device).unsqueeze(-1)
        mismatch = logprob_mismatch(logprobs, behaviour_logprobs, compared)
        clip_low, clip_high = hint_clip_ranges(
            micro.hinted,
            clip_low=config.clip_low,
            clip_high=config.clip_high,
            hint_clip_low=config.hints.clip_low,
            hint_clip_high=config.hints.clip_high,
        )
        if config.objective.startswith("gspo"):
            per_token, _, clipped = gspo_loss_terms(
                logprobs,
                old_logprobs,
                advantages,
                mask,
                clip_low=config.gspo.clip_low,
                clip_high=config.gspo.clip_high,
                token_level=config.objective == "gspo_token",
            )
        else:
            per_token, _, clipped = policy_loss_terms(
                logprobs,
                old_logprobs,
                advantages,
                mask,
                clip_low=clip_low.to(self.device),
                clip_high=clip_high.to(self.device),
            )
        lp_reg_tokens = 0
        if config.lp_reg.enabled:
            per_token, selected = lp_reg_loss(
                per_token,
                logprobs,
                old_logprobs,
                scores.proxy_logprobs,
                advantages,
                mask,
                coef=config.lp_reg.coef,
                low_fraction=config.lp_reg.low_fraction,
            )
            lp_reg_tokens = int(selected.sum())
        tis_weight_sum = 0.0
        if config.tis_cap is not None:
            weights = truncated_importance_weights(logprobs, behaviour_logprobs, config.tis_cap)
            per_token = per_token * weights
            tis_weight_sum = float((weights * mask).sum())
        loss = aggregate(per_token, mask, config.aggregation, self.max_length)
        kl_sum = 0.0
        if config.kl_coef > 0:
            reference_logprobs = self._reference_logprobs(input_ids, attention_mask)
            kl = kl_penalty(logprobs, reference_logprobs, config.kl_kind)
            loss = loss + config.kl_coef * aggregate(kl, mask, config.aggregation, self.max_length)
            kl_sum = float((kl.detach() * mask).sum())
        return loss, {
            "kl_sum": kl_sum,
            "entropy_sum": float((scores.entropy * mask).sum()),
            "clip_fraction": float(masked_mean(clipped.to(per_token.dtype), mask)),
            "lp_reg_tokens": lp_reg_tokens,
            "tis_weight_sum": tis_weight_sum,
            "mismatch": mismatch,
        }

    def _disco_logprobs(self, micro: TrainingTensors) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The micro-batch's logprobs under the current weights, its old logprobs, completion mask and entropy."""
        scores = sequence_scores(
            self.engine, micro.input_ids.to(self.device), micro.attention_mask.to(self.device), self.temperature
        )
        logprobs = scores.logprobs
        behaviour = micro.old_logprobs.to(self.device)
        old_logprobs = logprobs.detach() if self.config.recompute_old_logprobs else behaviour
        return logprobs, old_logprobs, micro.completion_mask.to(self.device), scores.entropy

    def _disco_plan(
        self, share: TrainingTensors, chunks: list[Tensor], correct: Tensor, rl: TrainingTensors
    ) -> DiscoPlan:
        """DisCO's loss over the whole batch and its derivatives, from a forward pass without gradients.

        DisCO's loss is not a sum over micro-batches (the robust term mixes a group's answers, the
        penalty squares the batch's KL), so each micro-batch instead backpropagates the linear surrogate
        `Σ_i w_i·s_i + c·Σ_{i,t} m·(log π_old − log π_θ)` with `w_i = ∂loss/∂s_i` and `c = ∂loss/∂(that sum)`
        taken here at the step's weights: the accumulated gradient is then exactly the gradient of the
        batch's loss, whatever the micro-batches. Costs one forward pass without gradients per micro-batch.
        Each rank holds whole groups, so its groups' terms are its own; the KL and the objective's value
        are summed over the ranks."""
        options = self.config.disco
        scores = torch.zeros(share.num_sequences, dtype=torch.float64)
        kl_sum = 0.0
        _, world = data_parallel()
        # ZeRO's gathers need as many forward passes on every rank, agreed on before the first of them
        passes = int(all_reduce_max(float(len(chunks)))) if world > 1 else len(chunks)
        with torch.no_grad():
            for chunk in chunks:
                logprobs, old_logprobs, mask, _ = self._disco_logprobs(share.select(chunk))
                scores[chunk] = disco_scores(logprobs, old_logprobs, mask, options.score).double().cpu()
                kl_sum += float(((old_logprobs - logprobs) * mask).sum())
            for _ in range(passes - len(chunks)):
                self._disco_logprobs(rl.select(torch.tensor([0])))
        leaf = scores.clone().requires_grad_(True)
        objective, _ = disco_objective(leaf, correct, share.group_index, robust=options.robust, tau=options.tau)
        num_groups = int(torch.unique(rl.group_index).numel())
        (row_weights,) = torch.autograd.grad(-objective / num_groups, leaf)
        objective_value = float(objective.detach())
        if world > 1:
            kl_sum, objective_value = all_reduce_sum([kl_sum, objective_value])
        kl = kl_sum / rl.num_tokens
        penalty = float(disco_penalty(torch.tensor(kl), delta=options.delta, beta=options.beta))
        excess = max(kl - options.delta, 0.0)
        return DiscoPlan(
            row_weights=row_weights.float(),
            kl_weight=2.0 * options.beta * excess / rl.num_tokens,
            loss=-objective_value / num_groups + penalty,
        )

    def _disco_micro_batch_loss(
        self, micro: TrainingTensors, row_weights: Tensor, kl_weight: float
    ) -> tuple[Tensor, dict[str, float]]:
        """The micro-batch's share of DisCO's gradient as the surrogate of `_disco_plan`, and its statistics."""
        logprobs, old_logprobs, mask, entropy = self._disco_logprobs(micro)
        scores = disco_scores(logprobs, old_logprobs, mask, self.config.disco.score)
        kl_sum = ((old_logprobs - logprobs) * mask).sum()
        surrogate = (row_weights.to(self.device, scores.dtype) * scores).sum() + kl_weight * kl_sum
        behaviour = micro.old_logprobs.to(self.device)
        same_version = micro.policy_versions == self.policy_version if micro.policy_versions is not None else None
        compared = mask if same_version is None else mask * same_version.to(self.device).unsqueeze(-1)
        return surrogate, {
            "kl_sum": 0.0,
            "entropy_sum": float((entropy * mask).sum()),
            "clip_fraction": 0.0,
            "lp_reg_tokens": 0,
            "tis_weight_sum": 0.0,
            "mismatch": logprob_mismatch(logprobs, behaviour, compared),
        }

    def _reference_logprobs(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logprobs of the tokens under the KL reference: the initial policy's copy, or with LoRA the base."""
        with torch.no_grad():
            if self.reference is not None:
                return sequence_logprobs(self.reference, input_ids, attention_mask, self.temperature)[0]
            with self.engine.module.disable_adapter():
                return sequence_logprobs(self.engine, input_ids, attention_mask, self.temperature)[0]

    def _sft_micro_batch_loss(self, micro: TrainingTensors, weights: Tensor) -> tuple[Tensor, dict[str, float]]:
        """HPT: β-weighted token-mean NLL of the reference solutions in the micro-batch."""
        mask = micro.completion_mask.to(self.device)
        logprobs, _ = sequence_logprobs(
            self.engine, micro.input_ids.to(self.device), micro.attention_mask.to(self.device), self.temperature
        )
        plain = sft_loss(logprobs, mask)
        weighted = -masked_mean(logprobs * weights.to(self.device).unsqueeze(-1), mask)
        return weighted, {"sft_loss": float(plain.detach())}

    # ------------------------------------------------------------------------------------ critic

    def _critic_values(self, tensors: TrainingTensors) -> Tensor:
        """[N, L] the critic's values of every row before this step's update, without gradients. Every
        rank computes all rows (the same passes on each, as ZeRO-3's gathers need): GAE's whitening is
        over the whole batch."""
        values = torch.zeros(tensors.input_ids.shape, dtype=torch.float32)
        with torch.no_grad():
            for chunk in self._micro_batches(tensors):
                micro = tensors.select(chunk)
                width = micro.input_ids.shape[1]
                computed = self.critic(micro.input_ids.to(self.device), micro.attention_mask.to(self.device))
                values[chunk, :width] = computed.float().cpu()
        return values * tensors.completion_mask

    def _critic_step(self, rl: TrainingTensors, old_values: Tensor, returns: Tensor, groups: int) -> dict[str, float]:
        """`critic.epochs` optimizer steps of the critic on the clipped value loss (token-mean over the RL
        rows `rl`, this rank's whole groups), and the figures of the step's StepResult. `old_values` and
        `returns` are the rows' [n, L] values before the update and GAE's targets."""
        options = self.config.critic
        width = rl.input_ids.shape[1]
        explained = explained_variance(old_values[:, :width], returns[:, :width], rl.completion_mask)
        rank, world = data_parallel()
        mine = own_rows(rl.group_index, rl.attention_mask.sum(-1), groups, rank, world)
        chunks = [mine[chunk] for chunk in self._micro_batches(rl.select(mine))]  # rows of `rl`
        passes = int(all_reduce_max(float(len(chunks)))) if world > 1 else len(chunks)
        skipped = False  # any epoch's update not applied (non-finite gradients)
        totals, norm = {"loss": 0.0, "clipped": 0.0}, 0.0
        for _ in range(options.epochs):
            totals = {"loss": 0.0, "clipped": 0.0}
            for index in range(passes):  # passes beyond this rank's chunks: weight 0, for ZeRO's collectives
                chunk = chunks[index] if index < len(chunks) else torch.tensor([0])
                micro = rl.select(chunk)
                weight = micro.num_tokens / rl.num_tokens if index < len(chunks) else 0.0
                cells = (chunk, slice(0, micro.input_ids.shape[1]))
                mask = micro.completion_mask.to(self.device)
                values = self.critic(micro.input_ids.to(self.device), micro.attention_mask.to(self.device))
                per_token, clipped = value_loss_terms(
                    values,
                    old_values[cells].to(self.device),
                    returns[cells].to(self.device),
                    mask,
                    clip=options.value_clip,
                )
                loss = masked_mean(per_token, mask)
                self.critic.set_gradient_accumulation_boundary(index == passes - 1)
                self.critic.backward(loss * (weight * world), scale_wrt_gas=False)
                totals["loss"] += float(loss.detach()) * weight
                totals["clipped"] += float(clipped.sum()) if weight else 0.0
            if world > 1:
                totals = dict(zip(totals, all_reduce_sum(list(totals.values())), strict=True))
            applied, norm = self._optimizer_step(self.critic)
            skipped = skipped or not applied
        return {
            "critic_skipped": int(skipped),
            "value_loss": _finite_or_zero(totals["loss"]),
            "value_clip_fraction": totals["clipped"] / max(rl.num_tokens, 1),
            "critic_grad_norm": _finite_or_zero(norm),
            "value_explained_variance": explained,
        }

    def _optimizer_step(self, engine: Any) -> tuple[bool, float]:
        """Apply `engine`'s accumulated gradients unless their norm is non-finite; (applied, norm before clipping)."""
        if self.config.zero_stage == 0:
            # Stage 0 steps a plain optimizer that would apply NaN gradients: check first.
            gradients = [p.grad for p in engine.module.parameters() if p.grad is not None]
            norm = (
                float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in gradients])))
                if gradients
                else 0.0
            )
            if not math.isfinite(norm):
                engine.zero_grad()
                return False, norm
            engine.step()
            return True, norm
        # ZeRO optimizers compute the norm themselves and skip the update (clearing the
        # gradients) when it is not finite.
        engine.step()
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        return bool(engine.was_step_applied()) and math.isfinite(norm), norm

    # ------------------------------------------------------------------------------------ weights

    def export_weights(self) -> dict[str, Tensor]:
        """The full policy state dict on the CPU (a copy), with the model's own key names.

        Under ZeRO-3 the partitioned parameters are gathered first. Keys are exactly those of
        `model.state_dict()` (with tied embeddings, whatever the model reports); with LoRA those of the
        base model, each adapted weight merged (`learner.lora.merged_state_dict`).
        """
        with self._gathered():
            return _cpu_copy(self._policy_state())

    def live_weights(self) -> dict[str, Tensor]:
        """`export_weights` without the copy where there is one to spare: the module's own tensors when
        nothing is gathered or merged, so they must be read before the next step changes them."""
        if self.config.zero_stage == 3:
            return self.export_weights()
        return self._policy_state()

    def _policy_state(self) -> dict[str, Tensor]:
        module = self.engine.module
        return merged_state_dict(module) if self.config.lora.enabled else module.state_dict()

    def save_model(self, directory: str | Path) -> dict[str, Tensor]:
        """The policy as a Hugging Face model under `directory/model` (merged with LoRA) and, with LoRA,
        the adapter alone under `directory/adapter` (for `PeftModel.from_pretrained` on the base).
        Every rank calls it (ZeRO-3 gathers); rank 0 writes. Returns the weights written (rank 0; {} elsewhere)."""
        if data_parallel()[0] != 0:
            self.join_gather()
            return {}
        module = self.engine.module
        with self._gathered():
            weights = _cpu_copy(self._policy_state())
            if self.config.lora.enabled:
                module.save_pretrained(str(Path(directory) / "adapter"))
        base = module.get_base_model() if self.config.lora.enabled else module
        # transformers removes the tied keys from the dict it is given: give it its own
        base.save_pretrained(str(Path(directory) / "model"), state_dict=dict(weights))
        return weights

    def join_gather(self) -> None:
        """What a rank other than the exporting one does where that rank gathers the parameters (ZeRO-3):
        take part in the gather, compute and copy nothing."""
        with self._gathered():
            pass

    def _gathered(self) -> contextlib.AbstractContextManager[Any]:
        """Every parameter whole inside the context: ZeRO-3 gathers its partitions (all ranks must enter)."""
        if self.config.zero_stage != 3:
            return contextlib.nullcontext()
        return self._deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)

    def save_checkpoint(self, path: str | Path) -> Path:
        """A DeepSpeed checkpoint (weights, optimizer, counters) under `path`, tagged `step<N>`."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(
            str(directory),
            tag=f"step{self.step}",
            client_state={"step": self.step, "policy_version": self.policy_version},
        )
        if self.critic is not None:  # PPO's critic: its weights and optimizer beside the policy's
            self.critic.save_checkpoint(str(directory / CRITIC_DIRECTORY), tag=f"step{self.step}")
        rank, world = data_parallel()
        if rank == 0:  # the optimizer state is sharded by rank: a resume needs as many ranks
            (directory / RANKS_FILE).write_text(json.dumps({"learner_ranks": world}))
        return directory

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the newest checkpoint `save_checkpoint` wrote under `path`, counters included. A
        checkpoint written by another number of learner ranks is refused, naming both."""
        ranks_file = Path(path) / RANKS_FILE
        if ranks_file.is_file():
            saved = json.loads(ranks_file.read_text())["learner_ranks"]
            world = data_parallel()[1]
            if saved != world:
                raise ValueError(
                    f"checkpoint {path} was written by {saved} learner ranks and this learner has {world}: DeepSpeed's "
                    f"optimizer state is partitioned by rank; resume with cluster.learner_ranks={saved}"
                )
        critic_path = Path(path) / CRITIC_DIRECTORY
        if self.critic is not None and not (critic_path / "latest").is_file():
            raise FileNotFoundError(
                f"checkpoint {path} holds no critic ({critic_path} has no 'latest' file): it was written by a run"
                " without learner.advantage 'gae'; resume it with that run's advantage, or start a new run"
            )
        load_path, client_state = self.engine.load_checkpoint(str(path))
        if load_path is None:
            raise FileNotFoundError(
                f"no DeepSpeed checkpoint under {path} (expected a 'latest' file written by save_checkpoint)"
            )
        if self.critic is not None:
            self.critic.load_checkpoint(str(critic_path))
        self.step = int(client_state.get("step", 0))
        self.policy_version = int(client_state.get("policy_version", 0))


#: Beside a checkpoint: how many data-parallel ranks wrote it.
RANKS_FILE = "learner_ranks.json"
#: Inside a checkpoint: the critic's own DeepSpeed checkpoint (advantage 'gae').
CRITIC_DIRECTORY = "critic"


@dataclass
class DiscoPlan:
    """DisCO's step, worked out before its backward passes (`GRPOTrainer._disco_plan`)."""

    row_weights: Tensor  # [n] ∂loss/∂s_i for this rank's rows
    kl_weight: float  # ∂loss/∂Σ_{i,t} m·(log π_old − log π_θ), the same on every rank
    loss: float  # the batch's DisCO loss at the step's weights


def _correct_rows(groups: Sequence[Group], tensors: TrainingTensors) -> Tensor:
    """The verifier's pass of every row, in `build_training_tensors`' order (groups, then completions)."""
    correct = torch.tensor([c.correct for group in groups for c in group.completions], dtype=torch.bool)
    if correct.shape[0] != tensors.num_sequences:
        raise ValueError(f"{correct.shape[0]} completions for {tensors.num_sequences} rows")
    return correct


def data_parallel() -> tuple[int, int]:
    """This process's data-parallel rank and the number of ranks (0, 1 without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def own_rows(group_index: Tensor, lengths: Tensor, groups: int, rank: int, world: int) -> Tensor:
    """The rows (of sequences `lengths` long, of groups `group_index`) that data-parallel `rank` of
    `world` trains: whole groups, balanced by tokens (`shard_groups`)."""
    if world == 1:
        return torch.arange(len(group_index))
    tokens = torch.zeros(groups, dtype=torch.long).index_add_(0, group_index, lengths.long())
    share = shard_groups(tokens.tolist(), world)[rank]
    return torch.isin(group_index, torch.tensor(share, dtype=group_index.dtype)).nonzero().squeeze(-1)


def idle_jobs(
    rl: TrainingTensors | None, sft: TrainingTensors | None, count: int
) -> list[tuple[str, TrainingTensors, Tensor, float]]:
    """Micro-batches of weight 0 (one row of the batch) that bring this rank's count of forward and
    backward passes up to the largest of any rank's, so that every rank takes part in each of ZeRO's
    gathers and reductions; they change no gradient."""
    most = int(all_reduce_max(float(count)))
    first = torch.tensor([0])
    if rl is not None:
        micro = rl.select(first)
        job = ("rl", micro, torch.zeros(1, micro.input_ids.shape[1]), 0.0)
    else:
        job = ("sft", sft.select(first), torch.zeros(1), 0.0)
    return [job] * (most - count)


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """`values` summed over every data-parallel rank."""
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor.tolist()


def all_reduce_max(value: float) -> float:
    """The largest `value` of any data-parallel rank."""
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor.item())


def _cpu_copy(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state_dict.items()}


def _check_rewards(groups: Sequence[Group]) -> None:
    for group in groups:
        for index, completion in enumerate(group.completions):
            if not math.isfinite(completion.reward):
                raise ValueError(
                    f"group {group.id} (prompt {group.prompt.id}) has non-finite reward {completion.reward!r} on"
                    f" completion {index}; rewards must be finite numbers, check the verifier and reward shaping"
                )
