"""The rollout worker: generates groups of completions, scores them, stamps the policy version.

`RolloutWorkerCore` is a plain object (tested without Ray); `RolloutWorker` is the same class as a
Ray actor. Weights arrive through `load_weights` between generation calls: an actor runs one
method at a time, so a swap never lands in the middle of a generation.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from orchard.config import ModelConfig, RewardModelConfig, RolloutConfig
from orchard.protocols import BroadcastEngine, SamplingParams, Verifier, VerifierResult
from orchard.records import Completion, Group, Prompt
from orchard.rollout.engines.torch_engine import TorchEngine
from orchard.rollout.model import build_model
from orchard.rollout.multi_turn import Trajectory, TurnLoop, count_calls
from orchard.rollout.prompts import PromptFormat, PromptRenderer
from orchard.rollout.reward_models import RewardModelVerifier
from orchard.rollout.strategies.tree_search import SearchSettings, TreeSearch, run_searches
from orchard.rollout.tokenizer import load_tokenizer
from orchard.rollout.tools import load_tools
from orchard.rollout.weight_broadcast import BroadcastTicket
from orchard.verifiers.registry import get_verifier, safe_verify
from orchard.verifiers.reward_model import reward_model_name


def tool_counts(outputs: Sequence[Any]) -> dict[str, Any]:
    """A rollout's `tool_calls` and `tool_errors` (empty unless its outputs are trajectories)."""
    trajectories = [o for o in outputs if isinstance(o, Trajectory)]
    errors = [f"{call.tool}: {call.error}" for t in trajectories for call in t.calls if call.outcome == "raised"]
    return {"tool_calls": dict(count_calls(trajectories)), "tool_errors": errors}


def verifier_name(prompt: Prompt) -> str:
    """Which verifier scores `prompt`: its own `metadata['verifier']`, else the procedural checker."""
    return str(prompt.metadata.get("verifier", "procedural"))


@dataclass
class RolloutResult:
    """What one `rollout` call produced, with the cost of producing it."""

    groups: list[Group]
    worker: str
    policy_version: int
    generated_tokens: int
    generate_seconds: float
    verify_seconds: float
    verifier_errors: list[str] = field(default_factory=list)
    #: "sample" (`rollout`), "mcts" (`search`) or "hint" (`rollout_with_hints`).
    strategy: str = "sample"
    #: Tree search only: nodes expanded (one generate request each) over all prompts of the call.
    nodes_expanded: int = 0
    #: Tree search only: ids of the prompts searched that recorded no trajectory (no group returned).
    unsearched_prompts: list[str] = field(default_factory=list)
    #: Hinted rollouts only: per group id, the hint tier (0 = most abstract) whose samples the group holds.
    hint_tiers: dict[str, int] = field(default_factory=dict)
    #: Plain rollouts asked to `score` completions: (prompt token ids, completion token ids) -> the
    #: policy's logprob of each completion token, by the weights that generated the groups.
    solution_logprobs: dict[tuple[tuple[int, ...], tuple[int, ...]], list[float]] = field(default_factory=dict)
    #: Multi-turn rollouts: tool calls by (tool, outcome), and the errors of tools that raised.
    tool_calls: dict[tuple[str, str], int] = field(default_factory=dict)
    tool_errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class WeightsLoaded:
    """A worker's answer to a weight load: the policy version it now holds, how long the load took, and
    whether it was skipped (it already held that version or a newer one)."""

    version: int
    seconds: float = 0.0
    skipped: bool = False


@dataclass
class EvalResult:
    """Greedy correctness of each prompt, by the policy version that answered."""

    correct: list[bool]
    policy_version: int
    completions: list[str]


class RolloutWorkerCore:
    def __init__(
        self,
        worker_id: str,
        model_config: ModelConfig,
        rollout_config: RolloutConfig,
        *,
        seed: int = 0,
        prompt_format: PromptFormat | None = None,
        delay_seconds: float = 0.0,
        reward_models: Mapping[str, tuple[RewardModelConfig, Sequence[Any]]] | None = None,
    ) -> None:
        """`prompt_format`: how prompts are rendered (`data.chat_template`, `system_prompt`,
        `prompt_template`; `rollout.prompts`); default: the tokenizer's chat template when it has one.
        `delay_seconds`: added to every `rollout` call (`faults.rollout_delay_seconds`: a slow worker, in tests).
        `reward_models`: the settings and Ray actors of each reward model a prompt's verifier may name
        (`reward_model:<name>`)."""
        torch.set_num_threads(rollout_config.torch_threads)
        torch.manual_seed(seed)
        self.worker_id = worker_id
        self.config = rollout_config
        self.tokenizer = load_tokenizer(model_config)
        self.renderer = PromptRenderer(self.tokenizer, prompt_format)
        self.engine = build_engine(
            model_config, rollout_config, self.tokenizer, seed=seed, eos_token_ids=self.renderer.stop_token_ids
        )
        self._broadcast: tuple[Any, tuple, int] | None = None  # (group, layout, bucket bytes): transport 'nccl'
        multi_turn = rollout_config.multi_turn
        self.turns = TurnLoop(multi_turn, load_tools(multi_turn), self.tokenizer) if multi_turn.enabled else None
        self._verifiers: dict[str, Verifier] = {}
        self._calls = 0
        self._seed = seed
        self._delay_seconds = delay_seconds
        self._reward_models = dict(reward_models or {})

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    def load_weights(self, version: int, state_dict: Mapping[str, Any] | Any) -> WeightsLoaded:
        """Swap in policy `version`; returns the version now held and how long the swap took.

        `state_dict` is a dict of arrays or tensors (the object-store path) or a weight source such as
        a shared-memory `WeightHandle`. A weight source whose writer has moved on loads the newest
        complete version, so the version returned may exceed `version`; a later request for a version
        this worker already holds or has passed is then answered without a copy (`skipped`).
        """
        started = time.perf_counter()
        if isinstance(state_dict, BroadcastTicket):
            return self._receive_broadcast(state_dict.version, started)
        if (
            not isinstance(state_dict, Mapping)
            and self.engine.weights_valid
            and self.engine.has_loaded_weights
            and version <= self.engine.policy_version
        ):
            return WeightsLoaded(self.engine.policy_version, skipped=True)
        loaded = self.engine.load_weights(state_dict, version)
        return WeightsLoaded(loaded, time.perf_counter() - started)

    def join_weight_broadcast(
        self,
        host: str,
        port: int,
        first_rank: int,
        world_size: int,
        layout: tuple,
        bucket_bytes: int,
        *,
        backend: str,
        timeout_s: float,
    ) -> list[int]:
        """Join the learner's weight-broadcast group (`rollout/weight_broadcast.py`); returns the ranks
        taken: one for the torch engine, one per tensor-parallel GPU worker for vLLM."""
        from orchard.rollout.weight_broadcast import BroadcastGroup

        if self._broadcast is not None:
            self._broadcast[0].close()
        if self.engine.receives_broadcast:
            if not isinstance(self.engine, BroadcastEngine):
                raise TypeError(f"{type(self.engine).__name__} receives broadcasts but is no BroadcastEngine")
            ranks = self.engine.join_broadcast(host, port, first_rank, world_size, timeout_s)
            self._broadcast = (None, tuple(layout), bucket_bytes)
            return ranks
        group = BroadcastGroup.join(host, port, first_rank, world_size, backend=backend, timeout_s=timeout_s)
        self._broadcast = (group, tuple(layout), bucket_bytes)
        return [first_rank]

    def _receive_broadcast(self, version: int, started: float) -> WeightsLoaded:
        """Take `version` from the broadcast the learner is sending. Always takes part, even when the
        engine refuses the version, so the learner and the other workers are not left waiting."""
        from orchard.rollout.weight_broadcast import BroadcastSource

        if self._broadcast is None:
            raise RuntimeError(f"rollout worker {self.worker_id} got a broadcast version but joined no broadcast group")
        group, layout, bucket_bytes = self._broadcast
        if group is None:  # the engine's own worker processes receive it (vLLM on GPUs)
            loaded = self.engine.receive_broadcast(version, layout, bucket_bytes)
        else:
            source = BroadcastSource(group, version, layout, bucket_bytes)
            try:
                loaded = self.engine.load_weights(source, version)
            finally:
                source.drain()
        return WeightsLoaded(loaded, time.perf_counter() - started)

    def _check_weights(self) -> None:
        if not self.engine.weights_valid:
            raise RuntimeError(
                f"rollout worker {self.worker_id} holds no consistent weights (its last weight copy was torn); "
                "it must load weights again before it generates"
            )

    def _verifier(self, prompt: Prompt) -> Verifier:
        name = verifier_name(prompt)
        if name not in self._verifiers:
            model = reward_model_name(name)
            if model is None:
                self._verifiers[name] = get_verifier(name)
            elif model in self._reward_models:
                self._verifiers[name] = RewardModelVerifier(model, *self._reward_models[model])
            else:
                raise ValueError(f"prompt {prompt.id} names reward model {model!r}, which this run does not serve")
        return self._verifiers[name]

    def _verify_all(self, items: Sequence[tuple[Prompt, str]]) -> list[VerifierResult]:
        """Each (prompt, answer) verified; a verifier that scores in batches (a reward model) gets one call
        for all of its items."""
        results: list[VerifierResult | None] = [None] * len(items)
        by_verifier: dict[int, tuple[Verifier, list[int]]] = {}
        for index, (prompt, _) in enumerate(items):
            verifier = self._verifier(prompt)
            by_verifier.setdefault(id(verifier), (verifier, []))[1].append(index)
        for verifier, indices in by_verifier.values():
            verify_many = getattr(verifier, "verify_many", None)
            if verify_many is not None:
                for index, result in zip(indices, verify_many([items[i] for i in indices]), strict=True):
                    results[index] = result
            else:
                for index in indices:
                    results[index] = safe_verify(verifier, *items[index])
        return results

    def _params(self, *, greedy: bool) -> SamplingParams:
        self._calls += 1
        return SamplingParams(
            temperature=0.0 if greedy else self.config.temperature,
            top_p=1.0 if greedy else self.config.top_p,
            max_new_tokens=self.config.max_new_tokens,
            stop=tuple(self.config.stop),
            seed=self._seed * 1_000_003 + self._calls,
        )

    def _scored(
        self, prompt: Prompt, outputs: Sequence[Any], version: int, errors: list[str], *, source: str = "sample"
    ) -> list[Completion]:
        """A completion of `prompt` for each engine output or multi-turn `Trajectory`, verified (a
        trajectory on its final answer); verifier errors go to `errors`."""
        read = []
        for output in outputs:
            if isinstance(output, Trajectory):
                read.append((self.tokenizer.decode(output.token_ids), output.answer, output.observation_spans))
            else:
                text = output.text or self.tokenizer.decode(output.token_ids)
                read.append((text, text, []))
        results = self._verify_all([(prompt, answer) for _, answer, _ in read])
        completions = []
        for output, (text, _, spans), result in zip(outputs, read, results, strict=True):
            if result.error:
                errors.append(f"{prompt.id}: {result.error}")
            completions.append(
                Completion(
                    text=text,
                    token_ids=list(output.token_ids),
                    logprobs=list(output.logprobs),
                    policy_version=version,
                    finish_reason=output.finish_reason,
                    reward=result.reward,
                    correct=result.correct,
                    verifier_error=result.error,
                    source=source,
                    observation_spans=list(spans),
                )
            )
        return completions

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Any]:
        """Engine outputs, or with `rollout.multi_turn` trajectories with tool calls."""
        if self.turns is None:
            return self.engine.generate(prompts, params)
        return self.turns.run(self.engine.generate, prompts, params)

    def rollout(
        self,
        prompts: Sequence[Prompt],
        group_size: int | None = None,
        score: Mapping[str, Sequence[Sequence[int]]] | None = None,
    ) -> RolloutResult:
        """Generate `group_size` completions of every prompt, score them, return one group each.

        `score`: completions (token ids) by prompt id whose logprobs under this policy the caller wants
        too (cached solutions it may mix into the groups), returned in `solution_logprobs`."""
        self._check_weights()
        group_size = group_size or self.config.group_size
        prompt_ids = self.renderer.encode_many(prompts)
        batch = [ids for ids in prompt_ids for _ in range(group_size)]
        version = self.engine.policy_version
        started = time.perf_counter()
        if self._delay_seconds:
            time.sleep(self._delay_seconds)
        outputs = self._generate(batch, self._params(greedy=False))
        generated = time.perf_counter()
        groups, errors = [], []
        for index, prompt in enumerate(prompts):
            completions = self._scored(prompt, outputs[index * group_size : (index + 1) * group_size], version, errors)
            groups.append(
                Group(
                    prompt=prompt,
                    prompt_token_ids=prompt_ids[index],
                    completions=completions,
                    worker=self.worker_id,
                    created_at=time.time(),
                )
            )
        return RolloutResult(
            groups=groups,
            worker=self.worker_id,
            policy_version=version,
            generated_tokens=sum(o.policy_tokens if isinstance(o, Trajectory) else len(o.token_ids) for o in outputs),
            generate_seconds=generated - started,
            verify_seconds=time.perf_counter() - generated,
            verifier_errors=errors,
            solution_logprobs=self._score(prompts, prompt_ids, score or {}),
            **tool_counts(outputs),
        )

    def _score(
        self, prompts: Sequence[Prompt], prompt_ids: Sequence[list[int]], score: Mapping[str, Sequence[Sequence[int]]]
    ) -> dict[tuple[tuple[int, ...], tuple[int, ...]], list[float]]:
        """The policy's logprobs of the completions `score` names for `prompts`, in one engine call."""
        pairs = [
            (tuple(ids), tuple(completion))
            for prompt, ids in zip(prompts, prompt_ids, strict=True)
            for completion in score.get(prompt.id, ())
        ]
        if not pairs:
            return {}
        scored = self.engine.token_logprobs([(list(p), list(c)) for p, c in pairs], self._scoring_params())
        return dict(zip(pairs, scored, strict=True))

    def _scoring_params(self) -> SamplingParams:
        """The sampling distribution whose logprobs `generate` reports (temperature and top-p)."""
        return SamplingParams(
            temperature=self.config.temperature, top_p=self.config.top_p, max_new_tokens=self.config.max_new_tokens
        )

    def rollout_with_hints(self, prompts: Sequence[Prompt], group_size: int | None = None) -> RolloutResult:
        """Sample prompts whose plain samples all failed again with a hint in context (Guide, Scaf-GRPO).

        Tiers go from the prompt's most abstract hint to its most concrete; a prompt moves to the next
        tier only while every sample of the current one fails, and its group holds the samples of the
        lowest tier that produced a success (else of its last tier). Completions are recorded against
        the bare prompt's tokens with the logprobs they were sampled with in the hinted context
        (source "hint"), so the learner's ratio is π_θ(o|q) / π_old(o|q,h). Prompts without hints get
        no group.
        """
        self._check_weights()
        group_size = group_size or self.config.group_size
        version = self.engine.policy_version
        chosen: dict[str, tuple[int, list[Completion]]] = {}
        errors: list[str] = []
        generated_tokens, generate_seconds, verify_seconds = 0, 0.0, 0.0
        tiers = max((len(p.hints) for p in prompts), default=0)
        for tier in range(tiers):
            todo = [
                p
                for p in prompts
                if tier < len(p.hints) and not (p.id in chosen and any(c.correct for c in chosen[p.id][1]))
            ]
            if not todo:
                break
            contexts = [self.renderer.encode(p, hint=p.hints[tier]) for p in todo]
            started = time.perf_counter()
            outputs = self.engine.generate(
                [ids for ids in contexts for _ in range(group_size)], self._params(greedy=False)
            )
            generated = time.perf_counter()
            generate_seconds += generated - started
            generated_tokens += sum(len(o.token_ids) for o in outputs)
            for index, prompt in enumerate(todo):
                samples = outputs[index * group_size : (index + 1) * group_size]
                chosen[prompt.id] = (tier, self._scored(prompt, samples, version, errors, source="hint"))
            verify_seconds += time.perf_counter() - generated
        groups, hint_tiers = [], {}
        for prompt in prompts:
            if prompt.id not in chosen:
                continue
            tier, completions = chosen.pop(prompt.id)
            group = Group(
                prompt=prompt,
                prompt_token_ids=self.renderer.encode(prompt),
                completions=completions,
                worker=self.worker_id,
                created_at=time.time(),
            )
            hint_tiers[group.id] = tier
            groups.append(group)
        return RolloutResult(
            groups=groups,
            worker=self.worker_id,
            policy_version=version,
            generated_tokens=generated_tokens,
            generate_seconds=generate_seconds,
            verify_seconds=verify_seconds,
            verifier_errors=errors,
            strategy="hint",
            hint_tiers=hint_tiers,
        )

    def prompt_states(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """The policy's hidden state at the last token of each rendered prompt (`TorchEngine.prompt_states`);
        an engine that exposes none (vLLM) raises `NotImplementedError` naming it."""
        self._check_weights()
        states = getattr(self.engine, "prompt_states", None)
        if states is None:
            raise NotImplementedError(f"the {type(self.engine).__name__} exposes no hidden states")
        return states(self.renderer.encode_many(prompts))

    def evaluate(self, prompts: Sequence[Prompt]) -> EvalResult:
        """Greedy answers to `prompts`, checked by their verifiers."""
        self._check_weights()
        outputs = self._generate(self.renderer.encode_many(prompts), self._params(greedy=True))
        if self.turns is None:
            answers = texts = [o.text or self.tokenizer.decode(o.token_ids) for o in outputs]
        else:
            answers, texts = [o.answer for o in outputs], [self.tokenizer.decode(o.token_ids) for o in outputs]
        correct = [result.correct for result in self._verify_all(list(zip(prompts, answers, strict=True)))]
        return EvalResult(correct=correct, policy_version=self.engine.policy_version, completions=texts)

    def search(
        self,
        prompts: Sequence[Prompt],
        *,
        budget_tokens: int | None = None,
        terminate_num: int | None = None,
    ) -> RolloutResult:
        """DeepSearch tree search (`rollout.strategies.tree_search`, settings from `rollout.mcts`) on every prompt,
        all trees advanced in lockstep through the engine; one group per prompt of its recorded
        trajectories, stamped with the policy version and carrying their behaviour logprobs.

        `budget_tokens` (generated tokens per prompt) and `terminate_num` (trajectories per prompt)
        override the config. A completion's `reward` is its verifier reward, as in `rollout`; its
        source is "tree" and its `token_values` are the scores of the tree steps its tokens belong to
        (from the final tree's node values, unnormalised; the learner uses them with
        `learner.tree_advantage: node_values`, docs/algorithms.md §8). A prompt whose search recorded
        nothing gets no group.
        """
        self._check_weights()
        settings = SearchSettings.from_config(
            self.config.mcts,
            max_new_tokens=self.config.max_new_tokens,
            group_size=self.config.group_size,
            budget_tokens=budget_tokens,
            terminate_num=terminate_num,
        )
        prompt_ids = self.renderer.encode_many(prompts)
        version = self.engine.policy_version
        errors: list[str] = []
        verify_seconds = 0.0

        def verifier_of(prompt: Prompt):
            verifier = self._verifier(prompt)

            def verify(text: str):
                nonlocal verify_seconds
                started = time.perf_counter()
                result = safe_verify(verifier, prompt, text)
                verify_seconds += time.perf_counter() - started
                if result.error:
                    errors.append(f"{prompt.id}: {result.error}")
                return result

            return verify

        trees = [
            TreeSearch(
                ids,
                verifier_of(prompt),
                settings,
                decode=self.tokenizer.decode,
                eos_token_ids=self.engine.eos_token_ids,
                stop=self.config.stop,
            )
            for prompt, ids in zip(prompts, prompt_ids, strict=True)
        ]
        started = time.perf_counter()
        results = run_searches(
            trees, self.engine.generate, self._params(greedy=False), next_tokens=self.engine.next_token_logprobs
        )
        elapsed = time.perf_counter() - started
        groups, unsearched = [], []
        for prompt, ids, result in zip(prompts, prompt_ids, results, strict=True):
            if not result.trajectories:
                unsearched.append(prompt.id)
                continue
            completions = [
                Completion(
                    text=t.text,
                    token_ids=list(t.token_ids),
                    logprobs=list(t.logprobs),
                    policy_version=version,
                    finish_reason="stop" if t.finished else "length",
                    reward=t.reward,
                    correct=t.correct,
                    source="tree",
                    token_values=t.token_values,
                )
                for t in result.trajectories
            ]
            group = Group(
                prompt=prompt,
                prompt_token_ids=ids,
                completions=completions,
                worker=self.worker_id,
                created_at=time.time(),
            )
            groups.append(group)
        return RolloutResult(
            groups=groups,
            worker=self.worker_id,
            policy_version=version,
            generated_tokens=sum(r.tokens_generated for r in results),
            generate_seconds=elapsed - verify_seconds,
            verify_seconds=verify_seconds,
            verifier_errors=errors,
            strategy="mcts",
            nodes_expanded=sum(r.nodes_expanded for r in results),
            unsearched_prompts=unsearched,
        )

    def token_logprobs(self, prompt_token_ids: Sequence[int], completion_token_ids: Sequence[int]) -> list[float]:
        """The current policy's logprob of each completion token, as the engine reports them when it
        samples (`Engine.token_logprobs`)."""
        self._check_weights()
        return self.engine.token_logprobs([(prompt_token_ids, completion_token_ids)], self._scoring_params())[0]

    def ping(self) -> str:
        return self.worker_id

    def pid(self) -> int:
        """The process this worker runs in (for supervision and fault tests)."""
        return os.getpid()


def build_engine(
    model_config: ModelConfig,
    rollout_config: RolloutConfig,
    tokenizer: Any,
    *,
    seed: int,
    eos_token_ids: tuple[int, ...] | None = None,
) -> Any:
    """The worker's engine: vLLM (`rollout.engine: vllm`) or the torch engine, on the GPU when this
    process was given one, else on the CPU.

    vLLM starts from a Hugging Face checkpoint directory: `model.path` for kind 'hf'; for kind 'tiny' the
    model built from its config, written once with its tokenizer (in Hugging Face form too) to a cache
    directory (`_tiny_checkpoint`). Either way the run's weights arrive through `load_weights` before the
    first generation. `eos_token_ids` end a completion (default: the tokenizer's eos; a chat template
    adds its end-of-turn token, `PromptRenderer.stop_token_ids`)."""
    eos_token_ids = tuple(eos_token_ids) if eos_token_ids is not None else (tokenizer.eos_id,)
    if rollout_config.engine == "vllm":
        from orchard.rollout.engines.vllm import VLLMEngine

        settings = rollout_config.vllm
        path = str(model_config.path) if model_config.kind == "hf" else _tiny_checkpoint(model_config, tokenizer)
        return VLLMEngine(
            path,
            dtype=model_config.dtype if settings.dtype == "auto" else settings.dtype,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            kv_cache_bytes=settings.kv_cache_bytes,
            block_size=settings.block_size,
            max_logprobs=max(settings.max_logprobs, rollout_config.mcts.prior_top_k),
            tensor_parallel_size=settings.tensor_parallel_size,
            enable_prefix_caching=settings.enable_prefix_caching,
            max_model_len=settings.max_model_len,
            enforce_eager=settings.enforce_eager,
            seed=seed,
            eos_token_ids=eos_token_ids,
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return TorchEngine(build_model(model_config, tokenizer), tokenizer, device=device, eos_token_ids=eos_token_ids)


def _tiny_checkpoint(model_config: ModelConfig, tokenizer: Any) -> str:
    """A Hugging Face checkpoint of the tiny model of `model_config` for vLLM to start from, kept under
    `$ORCHARD_CACHE` (default `~/.cache/orchard`) by the hash of the config and reused: its weights are
    only a placeholder until the run's first `load_weights`. Written to a temporary directory and
    renamed into place, so workers starting together never read a half-written one."""
    import hashlib
    import json
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from orchard.rollout.model import save_model

    key = hashlib.sha256(json.dumps(model_config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]
    root = Path(os.environ.get("ORCHARD_CACHE", Path.home() / ".cache" / "orchard")) / "engine-checkpoints"
    directory = root / key
    if not (directory / "config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        save_model(build_model(model_config, tokenizer), tokenizer, staging)
        try:
            staging.rename(directory)
        except OSError:  # another worker got there first
            shutil.rmtree(staging, ignore_errors=True)
    return str(directory)


#: The Ray actor. Restarts are the driver's decision, so the actor itself does not auto-restart.
RolloutWorker = ray.remote(RolloutWorkerCore)
