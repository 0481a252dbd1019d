"""`PromptSampler`: the driver's one place for choosing prompts and judging groups.

Composes, as the config asks:
1. a distribution for each prompt: by source weight (`uniform`) or by DUMP's UCB scheduler (`ucb`);
2. a prompt of it; with PCL selection, `k·B` candidates are drawn and the `B` whose predicted pass
   rate is nearest `τ` are kept; with GAIN-RL selection (`gain`), the prompt is drawn from a Gaussian
   over a pool ranked once by the starting policy's angle concentration (no distribution is chosen
   first, so it is not combined with `ucb`);
3. after rollout, every group feeds the scheduler (|advantage| of each completion, filtered groups
   included: a distribution whose groups all pass or all fail must look unlearnable), the value
   model (the group's pass rate, before training on it the model's error is measured) and GAIN-RL
   (pass rates until the next learner step, which moves its Gaussian's mean);
4. `filter_reason` says which groups are dropped before the buffer (difficulty band, dynamic sampling).

Its whole state is JSON (`state_dict`), which the driver keeps in the buffer's named state, so a
restarted driver continues the same curriculum.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from statistics import fmean
from typing import Any

import numpy as np
import torch

from orchard.config import CurriculumConfig
from orchard.learner.algorithms import group_advantages
from orchard.records import Group, Prompt
from orchard.services.curriculum.filtering import group_filter_reason
from orchard.services.curriculum.gain import GainSelector, gain_candidates
from orchard.services.curriculum.ucb import UCBScheduler
from orchard.services.curriculum.value_model import PromptValueModel, nearest_to_target
from orchard.verifiers.sources import PromptPool

#: Version 2 added `gain`; a version 1 state (written before it) loads as one without it.
STATE_VERSION = 2
READABLE_STATE_VERSIONS = (1, 2)
#: Policy states kept for chosen prompts until their groups are observed (oldest dropped beyond).
MAX_CHOSEN_STATES = 4096


def absolute_advantages(group: Group, std: str) -> list[float]:
    """|Â| of each completion of `group`, normalised as the learner will (batch std: group std here)."""
    rewards = torch.tensor(group.rewards, dtype=torch.float64)
    index = torch.zeros(len(group.rewards), dtype=torch.long)
    return group_advantages(rewards, index, std="group" if std == "batch" else std).abs().tolist()


class PromptSampler:
    def __init__(
        self,
        pool: PromptPool,
        config: CurriculumConfig,
        *,
        advantage_std: str = "group",
        dynamic_sampling: bool = True,
        state_dimension: int = 0,
        seed: int = 0,
    ) -> None:
        """`state_dimension`: the width of the policy's hidden states (`pcl.features: policy`); `seed`: the
        run's, which draws GAIN-RL's pool from a procedural source."""
        self.pool = pool
        self.config = config
        self.advantage_std = advantage_std
        self.dynamic_sampling = dynamic_sampling
        self.scheduler = (
            UCBScheduler(
                pool.distributions,
                window=config.ucb.window,
                exploration=config.ucb.exploration,
                temperature=config.ucb.temperature,
                min_probability=config.ucb.min_probability,
            )
            if config.scheduler == "ucb"
            else None
        )
        self.value_model = (
            PromptValueModel(
                dimension=config.pcl.dimension,
                lr=config.pcl.lr,
                epochs=config.pcl.epochs,
                state_dimension=state_dimension if config.pcl.features == "policy" else 0,
            )
            if config.selection == "pcl"
            else None
        )
        #: With `selection: gain`, the pool to rank; the driver ranks it (`gain.rank`) or a saved state does.
        self.gain = (
            GainSelector(gain_candidates(pool, config.gain.pool_size, seed), config.gain)
            if config.selection == "gain"
            else None
        )
        #: With `pcl.features: policy`, the policy's hidden states of prompts (set by the driver once it
        #: holds an engine); the states a candidate was chosen by are the ones its outcome trains.
        self.prompt_states: Callable[[Sequence[Prompt]], np.ndarray] | None = None
        self._chosen_states: dict[str, np.ndarray] = {}
        band = config.difficulty_filter
        self.band = (band.low, band.high) if band.enabled else None
        self.selection_seconds = 0.0  # value-model prediction and training: what PCL pays to choose
        self.candidates_scored = 0
        self.value_errors: list[float] = []

    # ------------------------------------------------------------------------------ choosing
    def probabilities(self) -> dict[str, float]:
        """Probability of drawing each distribution next."""
        if self.scheduler is not None:
            return self.scheduler.probabilities()
        if self.gain is not None and self.gain.is_ranked:
            return self.gain.distribution_probabilities()
        return self.pool.distribution_probabilities()

    def next_prompts(self, count: int, rng: random.Random) -> list[Prompt]:
        if self.gain is not None:
            started = time.perf_counter()
            chosen = self.gain.next_prompts(count, rng)
            self.selection_seconds += time.perf_counter() - started
            return chosen
        if self.value_model is None:
            return [self._draw(rng) for _ in range(count)]
        candidates = [self._draw(rng) for _ in range(count * self.config.pcl.pool_factor)]
        started = time.perf_counter()
        states = self._states(candidates)
        predictions = self.value_model.predict(candidates, states)
        chosen = nearest_to_target(predictions.tolist(), self.config.pcl.target, count)
        if states is not None:
            self._chosen_states.update((candidates[index].id, states[index]) for index in chosen)
            for stale in list(self._chosen_states)[: max(0, len(self._chosen_states) - MAX_CHOSEN_STATES)]:
                del self._chosen_states[stale]  # chosen but never observed (a call lost with its worker)
        self.selection_seconds += time.perf_counter() - started
        self.candidates_scored += len(candidates)
        return [candidates[index] for index in chosen]

    def _states(self, prompts: Sequence[Prompt]) -> np.ndarray | None:
        if self.value_model is None or self.value_model.state_dimension == 0:
            return None
        if self.prompt_states is None:
            raise RuntimeError("curriculum.pcl.features 'policy' needs the policy's hidden states; none were given")
        return self.prompt_states(prompts)

    def _draw(self, rng: random.Random) -> Prompt:
        if self.scheduler is None:
            return self.pool.sample_train(1, rng)[0]
        return self.pool.sample_from(self.scheduler.sample(rng), rng)

    # ------------------------------------------------------------------------------ learning
    def observe(self, groups: Sequence[Group]) -> None:
        """Feed one rollout call's groups (all of them, kept or not) to the scheduler, the value model and
        GAIN-RL."""
        if self.gain is not None:
            self.gain.observe(groups)
        if self.scheduler is not None:
            for group in groups:
                self.scheduler.observe(group.prompt.distribution, absolute_advantages(group, self.advantage_std))
        if self.value_model is not None and groups:
            started = time.perf_counter()
            prompts = [g.prompt for g in groups]
            states = None
            if self.value_model.state_dimension:
                # the states each prompt was chosen by; prompts chosen elsewhere (rescues) are read now
                known = [self._chosen_states.pop(p.id, None) for p in prompts]
                missing = [p for p, state in zip(prompts, known, strict=True) if state is None]
                fresh = iter(self._states(missing) if missing else [])
                states = np.stack([state if state is not None else next(fresh) for state in known])
            error = self.value_model.update(prompts, [g.pass_rate for g in groups], states)
            self.selection_seconds += time.perf_counter() - started
            self.value_errors.append(error)

    def filter_reason(self, group: Group) -> str | None:
        return group_filter_reason(group, dynamic_sampling=self.dynamic_sampling, band=self.band)

    def on_learner_step(self) -> dict[str, float]:
        """Recompute the scheduler's probabilities (DUMP: after every learner step) and move GAIN-RL's mean by
        the groups observed since the last step; returns the distributions' probabilities."""
        if self.scheduler is not None:
            self.scheduler.update()
        if self.gain is not None:
            self.gain.on_learner_step()
        return self.probabilities()

    def value_model_error(self, recent: int = 8) -> float | None:
        """Mean |predicted − observed pass rate| over the last `recent` batches, each measured before training on it."""
        if not self.value_errors:
            return None
        return fmean(self.value_errors[-recent:])

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "value_model": self.value_model.state_dict() if self.value_model else None,
            "gain": self.gain.state_dict() if self.gain else None,
            "value_errors": self.value_errors[-64:],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") not in READABLE_STATE_VERSIONS:
            raise ValueError(f"curriculum state version {state.get('version')} is not one of {READABLE_STATE_VERSIONS}")
        if (
            (state["scheduler"] is None) != (self.scheduler is None)
            or (state["value_model"] is None) != (self.value_model is None)
            or (state.get("gain") is None) != (self.gain is None)
        ):
            raise ValueError("the saved curriculum state was made with another curriculum config")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.value_model is not None:
            self.value_model.load_state_dict(state["value_model"])
        if self.gain is not None:
            self.gain.load_state_dict(state["gain"])
        self.value_errors = list(state.get("value_errors", []))

    def to_bytes(self) -> bytes:
        return json.dumps(self.state_dict()).encode()

    def load_bytes(self, payload: bytes) -> None:
        self.load_state_dict(json.loads(payload))
