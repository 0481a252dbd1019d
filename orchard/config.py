"""`RunConfig`: the one typed configuration of a run, loaded from YAML with `--set` overrides.

Every option is declared here with its default and a description; the resolved config is saved
with every run as `config.yaml`. Unknown keys are errors, so a typo never silently does nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


class ConfigError(ValueError):
    """A config is invalid. `problems` holds one `(dotted.path, message)` per bad field."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = [f"  {path}: {message}" for path, message in problems]
        super().__init__("invalid config:\n" + "\n".join(lines))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(Section):
    """A small Qwen2-style decoder built from this config (no download)."""

    hidden_size: int = Field(128, ge=8, description="Width of the residual stream.")
    num_layers: int = Field(4, ge=1, description="Decoder layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads.")
    num_kv_heads: int = Field(2, ge=1, description="Key/value heads (grouped-query attention).")
    intermediate_size: int = Field(512, ge=8, description="MLP width.")
    max_position_embeddings: int = Field(256, ge=16, description="Longest sequence the model sees.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be divisible by num_kv_heads {self.num_kv_heads}")
        return self


class ModelConfig(Section):
    kind: Literal["tiny", "hf"] = Field(
        "tiny",
        description="'tiny': built from `tiny` with the character tokenizer; 'hf': a Hugging Face checkpoint at `path`.",
    )
    path: str | None = Field(None, description="Hugging Face checkpoint directory (kind 'hf').")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Parameter dtype.")

    @model_validator(mode="after")
    def _path_for_hf(self) -> ModelConfig:
        if self.kind == "hf" and not self.path:
            raise ValueError("model.kind 'hf' needs model.path, a Hugging Face checkpoint directory")
        return self


class ProceduralSource(Section):
    kind: Literal["procedural"] = "procedural"
    families: list[str] = Field(
        default_factory=lambda: ["addition", "multiplication", "sorting", "reversal", "counting"],
        description="Procedural task families; each family is one distribution.",
    )
    difficulties: list[int] = Field(default_factory=lambda: [1, 2], description="Difficulty levels drawn uniformly.")
    weight: float = Field(1.0, gt=0, description="Relative weight of this source when prompts are drawn.")


class FieldMapping(Section):
    """Where a record's parts are, by dotted path into the record (`reward_model.ground_truth`). A list
    tries each path in turn; the defaults read Orchard's own layout and verl's preprocessed one
    (`prompt` as chat messages, `reward_model.ground_truth`, `data_source`)."""

    prompt: str | list[str] = Field(
        "prompt", description="The prompt: a string, or a list of {role, content} chat messages."
    )
    answer: str | list[str] = Field(
        ["answer", "reward_model.ground_truth"], description="The reference answer the verifier checks against."
    )
    distribution: str | list[str] | None = Field(
        ["distribution", "data_source"],
        description="The distribution (curriculum arm) of the record; None or absent: the file's name.",
    )
    solution: str | list[str] | None = Field(
        "solution", description="Optional reference solution written as the model should write it (HPT)."
    )
    hints: str | list[str] | None = Field("hints", description="Optional list of hints, abstract to concrete.")
    id: str | list[str] | None = Field("id", description="Optional unique id; absent: file name and row.")

    def paths(self, part: str) -> list[str]:
        """The dotted paths tried for `part`, in order (empty when the part is not mapped)."""
        value = getattr(self, part)
        if value is None:
            return []
        return [value] if isinstance(value, str) else list(value)


class TableSource(Section):
    """What every file-backed source shares: its verifier, weight, limits, handling of bad rows and
    field mapping."""

    verifier: str = Field("math", description="Verifier name or dotted path `module:callable`.")
    weight: float = Field(1.0, gt=0, description="Relative weight of this source when prompts are drawn.")
    on_bad_line: Literal["skip", "error"] = Field(
        "skip",
        description="A malformed or oversized row: 'skip' it (reported as file:row with the reason) or stop with"
        " an 'error'.",
    )
    max_prompt_chars: int = Field(32_000, ge=1, description="Longest prompt accepted (all messages together).")
    max_answer_chars: int = Field(4_000, ge=1, description="Longest answer accepted.")
    fields: FieldMapping = Field(default_factory=FieldMapping, description="Where each part of a record is.")


class JsonlSource(TableSource):
    kind: Literal["jsonl"] = "jsonl"
    path: str = Field(..., description="JSONL file, one record per line (fields: see `fields`).")


class ParquetSource(TableSource):
    kind: Literal["parquet"] = "parquet"
    path: str = Field(..., description="A Parquet file, or a directory whose *.parquet files are read in name order.")


class HFDatasetSource(TableSource):
    kind: Literal["hf_dataset"] = "hf_dataset"
    path: str = Field(..., description="A Hugging Face dataset written by `save_to_disk` (a Dataset or DatasetDict).")
    split: str | None = Field("train", description="The split of a DatasetDict; None for a single Dataset.")


class ReasoningGymDataset(Section):
    """One reasoning-gym generator: one distribution of the curricula."""

    name: str = Field(..., description="reasoning-gym dataset name, e.g. 'basic_arithmetic', 'leg_counting'.")
    size: int = Field(500, ge=1, description="Prompts generated (held-out ones included).")
    seed: int = Field(0, description="Generator seed.")
    config: dict[str, Any] = Field(default_factory=dict, description="The generator's own options.")


class ReasoningGymSource(Section):
    kind: Literal["reasoning_gym"] = "reasoning_gym"
    datasets: list[ReasoningGymDataset] = Field(..., min_length=1, description="Generators, one distribution each.")
    weight: float = Field(1.0, gt=0, description="Relative weight of this source when prompts are drawn.")
    instruction: str | None = Field(
        None,
        description="Text put after every question, asking for the answer as <answer>...</answer> (the verifier"
        " reads the last such tag); None: reasoning-gym's own default system prompt, less its first sentence"
        " (about 70 words; a short one suits small models on CPU).",
    )

    @field_validator("instruction")
    @classmethod
    def _asks_for_tags(cls, value: str | None) -> str | None:
        if value is not None and not ("<answer>" in value and "</answer>" in value):
            raise ValueError("must show the answer format, <answer> and </answer>: the verifier reads that tag")
        return value


PromptSource = Annotated[
    ProceduralSource | JsonlSource | ParquetSource | HFDatasetSource | ReasoningGymSource, Field(discriminator="kind")
]


class DataConfig(Section):
    sources: list[PromptSource] = Field(
        default_factory=lambda: [ProceduralSource()], description="Where prompts come from."
    )
    held_out_size: int = Field(200, ge=0, description="Prompts reserved for evaluation, never trained on.")
    seed: int = Field(1234, description="Seed of prompt generation and the held-out split.")
    chat_template: str = Field(
        "auto",
        description="How prompts become tokens with a Hugging Face tokenizer: 'auto' renders them through the"
        " tokenizer's chat template when it has one (`apply_chat_template(..., add_generation_prompt=True)`), 'none'"
        " sends the text as it is, or the path of a Jinja template file to use instead. The character tokenizer"
        " has no template.",
    )
    system_prompt: str | None = Field(
        None, description="A system message put before every prompt rendered through a chat template."
    )
    prompt_template: str = Field(
        "{prompt}",
        description="Text around each prompt (its last user message), e.g. '{prompt} Put the final answer within"
        " \\boxed{{}}.'; `{prompt}` is replaced, other braces are doubled as in str.format.",
    )

    @field_validator("prompt_template")
    @classmethod
    def _template_has_prompt(cls, value: str) -> str:
        try:
            rendered = value.format(prompt="\x00")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"must be a str.format template whose only field is {{prompt}} (double other braces): {error}"
            ) from None
        if "\x00" not in rendered:
            raise ValueError("must contain {prompt}, where the prompt's text goes")
        return value


class SolutionCacheConfig(Section):
    """DeepSearch's adaptive replay: correct tree-found solutions kept per prompt (docs/algorithms.md §8)."""

    enabled: bool = Field(True, description="Cache correct tree-found solutions and mix them into later groups.")
    max_per_prompt: int = Field(4, ge=1, description="Solutions kept per prompt; the oldest policy versions go first.")
    register_threshold: float = Field(
        0.25,
        ge=0,
        le=1,
        description="buffer_register_threshold: a solution is admitted while the policy's own pass rate on the prompt"
        " is at most this; once a plain group's pass rate exceeds it, the prompt's entries retire (the reference's"
        " register_replay_buffer.py default).",
    )
    max_version_lag: int | None = Field(
        None, ge=0, description="Entries older than this many policy versions retire at lookup (None: never)."
    )
    mix_per_group: int = Field(1, ge=0, description="Cached solutions substituted into each later group of the prompt.")


class MCTSConfig(Section):
    """DeepSearch tree search (Wu et al., 2025; smiles724/DeepSearch, `deepsearch/utils/mcts.py` and
    `deepsearch/rollout/sglang_mcts_wrapper.py`): defaults are the reference code's unless noted."""

    expansion: Literal["prior", "sample"] = Field(
        "prior",
        description="How a node gets children. 'prior' (not in the reference): one-token steps, the node's most"
        " probable untried next tokens (asked of the engine once per node), `children_per_expansion` at a time, so"
        " no draw repeats a step the tree holds. 'sample': W_d steps of up to `chunk_tokens` tokens (or to"
        " `step_delimiter`) sampled at once, the reference's expansion, for reasoning in long steps."
        " bench/deepsearch.py --sweep measures both.",
    )
    chunk_tokens: int = Field(
        1,
        ge=1,
        description="Tokens per reasoning step (fixed chunks; the reference's step_response_length); expansion"
        " 'prior' needs 1.",
    )
    step_delimiter: str | None = Field(
        None,
        description="Expansion 'sample': a step also ends at this string (e.g. a newline), at most chunk_tokens long.",
    )
    max_depth: int | None = Field(
        None, ge=1, description="Steps in the deepest path; None: ceil(rollout.max_new_tokens / chunk_tokens)."
    )
    expansion_width: int = Field(
        16,
        ge=1,
        description="W: children of an expanded node ('sample': drawn at once; the reference's run uses 8) or the"
        " most a node gets before the tree is widened ('prior').",
    )
    min_width: int = Field(2, ge=1, description="Lowest width when the width decays with depth (reference: 1).")
    width_decay: int = Field(
        0, ge=0, description="W_d = max(min_width, W − ⌊d / ⌊max_depth/W⌋⌋·decay); 0 keeps W (the reference's default)."
    )
    children_per_expansion: int = Field(
        1,
        ge=1,
        description="Expansion 'prior': children a node gets per expansion (at most W_d in all before widening).",
    )
    prior_top_k: int = Field(
        16,
        ge=1,
        le=20,
        description="Expansion 'prior': next tokens asked of the engine per node (vLLM's engines return at most"
        " rollout.vllm.max_logprobs, raised to this when smaller).",
    )
    lambda_confidence: float = Field(
        1.0,
        description="λc: weight of the policy's confidence in the frontier priority, log π of the node's path plus"
        " log π of its most probable untried next token (the path alone with expansion 'sample'); not in the"
        " reference, whose priority is λc = 0.",
    )
    lambda_puct: float = Field(2.0, ge=0, description="λ_puct of local UCT selection Q + λ·sqrt(ln N_parent / N).")
    lambda_parent_value: float = Field(0.4, description="λ1: weight of tanh(Q(parent)) in the frontier priority.")
    lambda_entropy: float = Field(0.4, description="λ2: weight of the step's entropy H(s) in the frontier priority.")
    lambda_depth: float = Field(0.01, description="λ3: weight of the depth bonus in the frontier priority.")
    lambda_value: float = Field(0.0, description="λ4: weight of tanh(Q(s)) in the frontier priority.")
    depth_bonus: Literal["constant", "log", "sqrt"] = Field(
        "sqrt", description="depth_bonus(s): 'constant' = depth, 'log' = log(depth+1), 'sqrt' = sqrt(depth/max_depth)."
    )
    entropy_bonus: bool = Field(
        False,
        description="Include λ2·H(s) in the frontier priority (the paper's formula); off by default as in the"
        " reference code (involve_uncertainty_bonus).",
    )
    merge_duplicates: bool = Field(
        True,
        description="Expansion 'sample': a step identical to a sibling joins it instead of becoming a second node"
        " (not in the reference, whose long steps rarely repeat; short answers repeat often and would be expanded"
        " twice).",
    )
    widen_when_exhausted: bool = Field(
        True,
        description="When no node is left to expand but budget is, allow W_d more draws per node (not in the"
        " reference, where budget runs out first; a short answer's tree is small).",
    )
    backup_threshold: float = Field(0.1, ge=0, le=1, description="Lowest backup weight max((d+1)/L, threshold).")
    incomplete_score: float = Field(-1.0, description="Terminal value of a path cut at max_depth without an answer.")
    terminate_num: int | None = Field(
        None, ge=1, description="Trajectories recorded per prompt before the search ends; None: rollout.group_size."
    )
    until_solved: bool = Field(
        True,
        description="A search with terminate_num trajectories but no correct one goes on while its budget lasts, and"
        " returns the correct ones and the earliest wrong ones, terminate_num in all (not in the reference, which"
        " stops at terminate_num: one-token steps record a wrong answer every few tokens, long before the budget).",
    )
    budget_tokens: int | None = Field(
        None,
        ge=1,
        description="Generated tokens a prompt's search may spend; None: 4 × group_size × max_new_tokens"
        " (what four plain groups may spend).",
    )
    advantage_temperature: float = Field(
        1.0, gt=0, description="Non-final step values enter token scores as tanh(value / T) (adv_temperature)."
    )
    search_token_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="In a run, all-fail prompts are routed to tree search only while the search's generated tokens"
        " are at most this share of all generated tokens (a search costs several groups' tokens; at 1 the"
        " search may crowd plain sampling out). Not in the reference, which searches a fixed hard subset.",
    )
    cache: SolutionCacheConfig = Field(
        default_factory=SolutionCacheConfig, description="Solutions found by tree search, replayed into later groups."
    )

    @model_validator(mode="after")
    def _prior_steps_are_tokens(self) -> MCTSConfig:
        if self.expansion == "prior" and (self.chunk_tokens != 1 or self.step_delimiter is not None):
            raise ValueError(
                f"expansion 'prior' takes one-token steps (chunk_tokens 1, no step_delimiter), got chunk_tokens"
                f" {self.chunk_tokens} and step_delimiter {self.step_delimiter!r}; set expansion 'sample' for longer steps"
            )
        return self


class VLLMConfig(Section):
    """vLLM engine settings (rollout.engine 'vllm', on GPUs or CPUs); passed to `vllm.LLM` as named."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weight and activation dtype of the engine; 'auto': model.dtype."
    )
    gpu_memory_utilization: float = Field(
        0.85,
        gt=0,
        le=1,
        description="Share of each engine GPU's memory vLLM may take (weights + KV cache); on CPUs kv_cache_bytes"
        " sizes the cache instead.",
    )
    kv_cache_bytes: int | None = Field(
        None,
        ge=1 << 20,
        description="KV cache size in bytes; None: on GPUs what gpu_memory_utilization leaves, on CPUs 256 MiB"
        " (vLLM's CPU build would otherwise reserve a share of host memory).",
    )
    block_size: int | None = Field(
        None,
        ge=1,
        description="Tokens per KV-cache block, the unit of prefix caching; None: vLLM's (16 on GPUs, 128 on CPUs).",
    )
    max_logprobs: int = Field(
        20,
        ge=1,
        description="Most logprobs a request may ask for (DeepSearch's candidates). Re-scoring cached solutions at a"
        " temperature other than 1, or with top_p < 1, needs the whole vocabulary: set it to the vocabulary size.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (one bundle of this many GPUs each).")
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of shared prefixes (a group's completions share their prompt)."
    )
    max_model_len: int | None = Field(None, ge=16, description="Longest prompt + completion; None: the model's.")
    enforce_eager: bool = Field(False, description="Skip CUDA graph capture (faster start, slower decode).")


class MultiTurnConfig(Section):
    """Rollouts in turns with tool calls: generation stops where the policy closes a tool call, the call
    runs (the built-in `python` tool in the process sandbox of `verifiers/sandbox.py`), its output is
    appended as an observation, and generation continues (`rollout/multi_turn.py`; docs/algorithms.md §10).
    `rollout.max_new_tokens` bounds the whole trajectory after the prompt, observations included."""

    enabled: bool = Field(False, description="Sample trajectories with tool calls instead of single answers.")
    max_turns: int = Field(
        4, ge=1, description="Policy turns (generations) per trajectory; a call in the last is not run."
    )
    max_tool_calls: int = Field(3, ge=0, description="Tool calls per trajectory; a further call ends it.")
    tool_output_chars: int = Field(
        512,
        ge=8,
        description="Characters of a tool's output kept in the observation; longer output is cut and flagged.",
    )
    tools: list[str] = Field(
        default_factory=lambda: ["python"],
        min_length=1,
        description="Tools the policy may call: 'python' (the sandbox), or a user's tool as a dotted path"
        " 'package.module:function' (a function of the call's text returning the observation's text).",
    )
    call_open: str = Field(
        "<{tool}>", min_length=1, description="What opens a call; `{tool}` stands for the tool's name."
    )
    call_close: str = Field(
        "</{tool}>", min_length=1, description="What closes a call (generation stops there); `{tool}` as in call_open."
    )
    observation: str = Field(
        "<output>{output}</output>",
        description="How a call's output is appended to the trajectory; `{output}` stands for the output.",
    )
    tool_seconds: float = Field(5.0, gt=0, le=600, description="Wall-clock limit of one tool call.")
    tool_memory_mb: int = Field(512, ge=64, description="Address space of a `python` tool call, MiB.")
    tool_threads: int = Field(2, ge=1, description="Tool calls run at once per worker.")

    @model_validator(mode="after")
    def _templates_hold_their_fields(self) -> MultiTurnConfig:
        if "{output}" not in self.observation:
            raise ValueError(f"observation {self.observation!r} must contain '{{output}}', where the output goes")
        return self

    def close_marks(self) -> dict[str, str]:
        """Per tool (by the name the policy calls it), the text that closes its call (a stop string of every turn)."""
        return {tool_name(tool): self.call_close.replace("{tool}", tool_name(tool)) for tool in self.tools}


def tool_name(tool: str) -> str:
    """How the policy names `tool` in a call: the built-in's name, or a dotted path's last part."""
    return tool.rpartition(":")[2].rpartition(".")[2]


class AutoscaleConfig(Section):
    """Rollout workers added while the learner waits for data, removed while they outpace it
    (services/run/autoscale.py). Every decision is an event and a metric."""

    min: int = Field(1, ge=1, description="Fewest rollout workers the policy keeps.")
    max: int = Field(4, ge=1, description="Most rollout workers the policy adds up to.")
    target_learner_idle: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="A worker is added while the learner's idle share over the window exceeds this (it waits for"
        " data) and the workers are busy.",
    )
    max_worker_idle: float = Field(
        0.5,
        gt=0,
        le=1,
        description="A worker is removed while the workers' idle share over the window exceeds this (the learner"
        " cannot take what they would make) or groups went stale in the buffer.",
    )
    window_seconds: float = Field(
        20.0, gt=0, description="The span each decision looks back on; it starts again after every change."
    )

    @model_validator(mode="after")
    def _bounds_are_ordered(self) -> AutoscaleConfig:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) exceeds max ({self.max})")
        return self


class RolloutConfig(Section):
    engine: Literal["torch", "vllm"] = Field("torch", description="Generation engine of the workers.")
    num_workers: int = Field(1, ge=1, description="RolloutWorker actors.")
    group_size: int = Field(8, ge=1, description="Completions per prompt (G).")
    prompts_per_call: int = Field(8, ge=1, description="Prompts a worker generates per call.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(16, ge=1, description="Longest completion.")
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="Stop strings (not included in the text).")
    strategy: Literal["sample", "mcts"] = Field(
        "sample",
        description="Rollout strategy: 'sample' draws group_size completions per prompt; 'mcts' runs DeepSearch's"
        " tree search (section `mcts`) on the prompts routed to it.",
    )
    num_cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs reserved per worker.")
    torch_threads: int = Field(1, ge=1, description="Intra-op threads of each worker's torch engine.")
    autoscale: AutoscaleConfig | None = Field(
        None,
        description="Add and remove rollout workers during the run by the learner's and the workers' idle"
        " shares (None: the number changes only on request, `orchard scale`).",
    )
    mcts: MCTSConfig = Field(default_factory=MCTSConfig, description="DeepSearch tree search (strategy 'mcts').")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="vLLM engine settings (engine 'vllm').")
    multi_turn: MultiTurnConfig = Field(
        default_factory=MultiTurnConfig, description="Trajectories with tool calls (multi-turn rollouts)."
    )

    @model_validator(mode="after")
    def _stops_leave_tool_calls_whole(self) -> RolloutConfig:
        turns = self.multi_turn
        if not turns.enabled:
            return self
        if self.strategy != "sample":
            raise ValueError(f"multi_turn works with strategy 'sample' (got {self.strategy!r})")
        names = [tool_name(tool) for tool in turns.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"multi_turn.tools {turns.tools} name one tool twice ({names})")
        texts = {"call_open": turns.call_open, "call_close": turns.call_close}  # what the policy writes
        for stop in self.stop:
            for field_name, text in texts.items():
                if stop and stop in text.replace("{tool}", names[0]):
                    raise ValueError(
                        f"stop string {stop!r} occurs in multi_turn.{field_name} {text!r}: generation would stop inside"
                        " a tool call; remove it from rollout.stop or change the call's format"
                    )
        return self


class BufferConfig(Section):
    backend: Literal["auto", "redis", "memory"] = Field(
        "auto", description="'redis' needs `redis_url` or a redis-server binary; 'auto' falls back to 'memory'."
    )
    redis_url: str | None = Field(None, description="Existing Redis; None starts a private redis-server.")
    namespace: str | None = Field(None, description="Key prefix; defaults to the run id.")
    max_staleness: int = Field(1, ge=0, description="Oldest usable sample: learner version minus this (0 = on-policy).")
    capacity_groups: int = Field(
        64,
        ge=1,
        description="Groups ready or in flight beyond which workers wait (backpressure); the run admits fewer"
        " when more could not be trained before going stale (services/run/admission.py).",
    )
    reconnect_seconds: float = Field(
        30.0, gt=0, description="How long a lost Redis connection is retried, with backoff, before the run fails."
    )


class OverlongConfig(Section):
    """DAPO's overlong reward shaping and overlong filtering (docs/algorithms.md §3)."""

    enabled: bool = Field(
        False,
        description="Add DAPO's soft overlong punishment to each reward: 0 up to max_length − cache_length tokens,"
        " then linearly down to −1 at max_length, −1 beyond.",
    )
    max_length: int | None = Field(
        None, ge=2, description="L_max in tokens; None: rollout.max_new_tokens (DAPO: the generation limit)."
    )
    cache_length: int | None = Field(
        None,
        ge=1,
        description="L_cache, the soft zone before L_max; None: a fifth of L_max (DAPO: 4096 of 20480), at least 1.",
    )
    mask_truncated: bool = Field(
        False,
        description="Overlong filtering: completions cut off by the length limit (finish_reason 'length') are left"
        " out of the loss; they still count in their group's advantages.",
    )

    def resolved_lengths(self, max_new_tokens: int) -> tuple[int, int]:
        """(L_max, L_cache) with the defaults filled in."""
        max_length = self.max_length if self.max_length is not None else max_new_tokens
        cache_length = self.cache_length if self.cache_length is not None else max(1, max_length // 5)
        return max_length, cache_length


class LengthPenaltyConfig(Section):
    """DLER's truncation length penalty (docs/algorithms.md §4)."""

    enabled: bool = Field(
        False,
        description="Reward 0 for a completion longer than target_length or cut off before it finished. DLER pairs it"
        " with batch-wise normalisation, so it needs learner.advantage 'lite_ppo'.",
    )
    target_length: int | None = Field(None, ge=1, description="L_T in tokens; None: rollout.max_new_tokens.")


class LpRegConfig(Section):
    """Lp-Reg, low-probability regularisation (Huang et al., 2025, arXiv:2510.03222; docs/algorithms.md §5).

    Defaults are the reference recipe's (CarlanLark/Lp-Reg-dev, recipe/lp_reg: minp_p_threshold 0.02,
    logp_neg_k_percent 0.01, ppo_kl_coef 1)."""

    enabled: bool = Field(False, description="Regularise low-probability negative-advantage tokens towards π_proxy.")
    coef: float = Field(1.0, ge=0, description="β_lp: weight of the KL term towards the proxy on regularised tokens.")
    min_p: float = Field(
        0.02,
        gt=0,
        le=1,
        description="κ: the proxy keeps tokens with probability ≥ κ · (the position's largest probability), a min-p cut"
        " relative to the max, and renormalises; tokens below are presumed noise and never regularised.",
    )
    low_fraction: float = Field(
        0.01,
        gt=0,
        le=1,
        description="ρ: share of a micro-batch's negative-advantage tokens, those with the lowest probability, that are"
        " candidates (at least one).",
    )


class HintsConfig(Section):
    """Hinted completions for all-fail prompts (Guide, arXiv:2506.13923; Scaf-GRPO, arXiv:2510.19807)."""

    enabled: bool = Field(
        False,
        description="Sample a prompt whose plain group failed every sample again with its hints in context, most"
        " abstract first (the lowest tier with a success is kept), and train on those completions against the bare"
        " prompt; prompts without hints are left alone.",
    )
    after_failures: int = Field(
        1,
        ge=1,
        description="Scaf-GRPO's stall check, simplified: a prompt is hinted once this many of its plain groups have"
        " failed every sample (counted in the driver's memory, not across restarts).",
    )
    clip_low: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="ε_low for the off-policy ratio π_θ(o|q)/π_old(o|q,h) of hinted samples; None: learner.clip_low.",
    )
    clip_high: float | None = Field(
        None, ge=0, description="ε_high for hinted samples' ratio; None: learner.clip_high (Guide clips it as usual)."
    )


class HPTConfig(Section):
    """HPT: per prompt, the SFT loss of its reference solution instead of the RL loss when its pass rate is low
    (Lv et al., 2025, arXiv:2509.04419; docs/algorithms.md §6)."""

    enabled: bool = Field(
        False,
        description="Switch groups at or below pass_rate_threshold to the SFT loss when the prompt has a solution.",
    )
    pass_rate_threshold: float = Field(
        0.0, ge=0, le=1, description="γ as a pass rate: switch when p ≤ γ (the paper's gate: 0 correct of 8)."
    )
    sft_coef: float = Field(1.0, ge=0, description="β: weight of the SFT loss (token-mean NLL of the solution).")
    rl_coef: float = Field(1.0, ge=0, description="α: weight of the RL loss of the groups that are not switched.")
    mix: bool = Field(
        False,
        description="Keep the RL loss (weight α) on switched groups too, α·L_RL + β·L_SFT, instead of replacing it.",
    )


class LoraConfig(Section):
    """LoRA through `peft` (Hu et al., 2021, arXiv:2106.09685): the base weights stay frozen and each targeted
    linear layer learns W + (α/r)·B·A; only A and B train and live in the optimizer. The rollout engines and
    the checkpoint's `model/` receive the merged weights; `adapter/` holds the adapter alone."""

    rank: int = Field(0, ge=0, description="r, the adapters' rank; 0: no LoRA, every weight trains.")
    alpha: float = Field(16.0, gt=0, description="α: the merged update is (α/r)·B·A.")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the adapters' input while training (the engines never drop): above 0 the"
        " learner's logprobs of a sample are noisy, so on-policy importance ratios differ from 1.",
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names (or name suffixes, as peft matches them) that get adapters; 'all-linear': every"
        " linear layer but the output head. A layer whose weight is tied to another (tied embeddings) is refused.",
    )

    @field_validator("target_modules")
    @classmethod
    def _some_target(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("name at least one module to adapt (e.g. ['q_proj', 'v_proj']), or 'all-linear'")
        return value

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class DiscoConfig(Section):
    """DisCO's discriminative objective (Li et al., 2025, arXiv:2505.12366; `learner.algorithms.disco_loss`):
    per prompt, raise the scores of correct answers above those of incorrect ones, with the KL divergence to
    the old policy held near δ by a squared-hinge penalty instead of PPO's clip. Defaults: the reference
    recipes (Optimization-AI/DisCO, scripts/train/run_disco_logL_*_8k.sh)."""

    score: Literal["log_l", "l_ratio"] = Field(
        "log_l",
        description="s_θ(o, q): 'log_l' the length-normalised log-likelihood (1/|o|)·Σ log π_θ; 'l_ratio' the"
        " length-normalised likelihood ratio (1/|o|)·Σ π_θ/π_old.",
    )
    robust: bool = Field(
        True,
        description="DisCO: τ·log mean exp(s/τ) over the incorrect answers (distributionally robust); false:"
        " their mean score (DisCO-b).",
    )
    tau: float = Field(
        10.0, gt=0, description="τ of the robust term (the reference uses 10 with log_l and 1 with l_ratio)."
    )
    delta: float = Field(1e-4, ge=0, description="δ: the KL to the old policy (token mean, k1) left unpenalised.")
    beta: float = Field(
        1e3,
        ge=0,
        description="β of the penalty β·max(KL − δ, 0)² (the paper's form; the reference's surrogate has half its"
        " gradient, so its β = 1e3 matches 500 here).",
    )


#: Advantage estimators of `learner.advantage` and the `advantage_std` each implies (docs/algorithms.md §1).
#: REINFORCE++'s are normalised over the batch: group-centred with the batch std is their closest per-group reading.
ADVANTAGE_STD = {
    "grpo": "group",
    "dr_grpo": "none",
    "lite_ppo": "batch",
    "rloo": "none",
    "reinforce_pp": "batch",
    "reinforce_pp_baseline": "batch",
    "gae": "batch",
}


class CriticConfig(Section):
    """PPO's learned critic and GAE (`learner.advantage: gae`; docs/algorithms.md §1, "PPO with a critic").

    The critic is a copy of the initial policy's decoder with a scalar head (`learner.critic.ValueModel`),
    trained by a DeepSpeed engine of its own (same ZeRO stage, its own AdamW) on the clipped value loss."""

    lr: float = Field(1e-4, gt=0, description="Adam learning rate of the critic.")
    gamma: float = Field(1.0, ge=0, le=1, description="γ, the discount over completion tokens.")
    lam: float = Field(0.95, ge=0, le=1, description="λ of GAE (1: Monte Carlo returns minus V; 0: one-step TD).")
    value_clip: float | None = Field(
        0.2,
        gt=0,
        description="ε_v: the new value may move at most this far from the value the advantages were computed"
        " with, in the loss's clipped term (null: no clipping).",
    )
    epochs: int = Field(
        1,
        ge=1,
        description="Critic optimizer steps per learner step, each over the whole batch (the value clip acts"
        " from the second on).",
    )
    normalize_advantages: bool = Field(
        True, description="Whiten the GAE advantages over the batch's completion tokens (mean 0, std 1)."
    )


class GSPOConfig(Section):
    """GSPO's sequence-ratio clip range (Zheng et al., 2025, arXiv:2507.18071; `learner.algorithms.gspo_loss_terms`)."""

    clip_low: float = Field(3e-4, ge=0, lt=1, description="ε_low of the sequence ratio (the paper's 3e-4).")
    clip_high: float = Field(4e-4, ge=0, description="ε_high of the sequence ratio (the paper's 4e-4).")


class LearnerConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage.")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    groups_per_step: int = Field(16, ge=1, description="Groups per learner step (B).")
    micro_batch_size: int = Field(64, ge=1, description="Sequences per forward/backward micro-batch.")
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=1,
        description="Build micro-batches by tokens instead of `micro_batch_size` sequences: rows sorted by length,"
        " each micro-batch at most this many tokens (rows × its longest row; a longer row goes alone), so little"
        " padding is computed (verl's dynamic batch size). The result of a step does not depend on it.",
    )
    advantage: Literal["grpo", "dr_grpo", "lite_ppo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae"] = Field(
        "grpo",
        description="Advantage estimator: 'grpo' (r − group mean) / group std; 'dr_grpo' r − group mean (no std; needs"
        " aggregation 'seq-mean-token-sum-norm', Dr. GRPO's constant length normaliser); 'lite_ppo' (r − group"
        " mean) / batch std; 'rloo' r − mean of the group's other rewards; 'reinforce_pp' REINFORCE++'s"
        " (r − batch mean) / batch std; 'reinforce_pp_baseline' r − group mean, then normalised over the batch;"
        " 'gae' PPO's per-token GAE advantages from a learned critic (learner.critic).",
    )
    critic: CriticConfig = Field(
        default_factory=CriticConfig, description="PPO's critic and GAE, used when advantage is 'gae'."
    )
    tree_advantage: Literal["prefix_credit", "node_values", "outcome"] = Field(
        "prefix_credit",
        description="Advantages of DeepSearch's tree trajectories: 'prefix_credit' the estimator's outcome"
        " advantage of each trajectory placed on the tokens where it parts from its siblings"
        " (`learner.algorithms.prefix_credit`, ours); 'node_values' the tree's step values normalised by the"
        " mean and std of the trajectories' final scores (the reference's sibling mean-std); 'outcome' the"
        " estimator's outcome advantage on every token. bench/deepsearch.py --train compares them.",
    )
    objective: Literal["grpo", "disco", "gspo", "gspo_token"] = Field(
        "grpo",
        description="The policy loss: 'grpo' the PPO-clip surrogate on advantages (with the options above and below);"
        " 'disco' DisCO's discriminative objective with a KL constraint (learner.disco), which uses neither"
        " advantages, clipping nor aggregation; 'gspo' GSPO's sequence-level ratio, length-normalised and clipped"
        " per sequence (learner.gspo; aggregation 'seq-mean-token-mean'); 'gspo_token' its token variant, the"
        " same ratio in value with per-token advantages and gradients.",
    )
    disco: DiscoConfig = Field(default_factory=DiscoConfig, description="DisCO, used when objective is 'disco'.")
    gspo: GSPOConfig = Field(default_factory=GSPOConfig, description="GSPO's clip range (objective 'gspo*').")
    clip_low: float = Field(0.2, ge=0, lt=1, description="PPO clip ε_low.")
    clip_high: float = Field(0.28, ge=0, description="PPO clip ε_high (DAPO clip-higher; 0.2 = GRPO).")
    aggregation: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="Loss aggregation over tokens and sequences."
    )
    kl_coef: float = Field(
        0.0, ge=0, description="β of the KL penalty to the reference (0: no KL and no reference model kept)."
    )
    kl_kind: Literal["k1", "k2", "k3"] = Field(
        "k3", description="KL estimator with δ = log π_ref − log π_θ: k1 −δ, k2 ½δ², k3 exp(δ) − δ − 1."
    )
    dynamic_sampling: bool = Field(True, description="DAPO: drop groups whose rewards are all equal.")
    recompute_old_logprobs: bool = Field(
        False,
        description="PPO's old logprobs are the learner's own logprobs of each sample under its weights before the"
        " step's update (verl's and OpenRLHF's recomputation), not the rollout engine's: the ratio then measures the"
        " update alone, and what separates engine from learner (other kernels, bf16, staleness, a hint in context)"
        " is left to tis_cap. One update per batch, so it costs no extra forward pass. Off: the engine's logprobs,"
        " which agree with the learner's within 1e-5 per token in float32 on CPUs (bench/rollout_mismatch.py).",
    )
    tis_cap: float | None = Field(
        None,
        gt=0,
        description="Truncated importance sampling: each token's loss times min(π_learner / π_behaviour, tis_cap)"
        " (verl, OpenRLHF and slime use 2); needs recompute_old_logprobs. None: off.",
    )
    overlong: OverlongConfig = Field(default_factory=OverlongConfig, description="DAPO overlong shaping and filtering.")
    length_penalty: LengthPenaltyConfig = Field(
        default_factory=LengthPenaltyConfig, description="DLER truncation length penalty."
    )
    lp_reg: LpRegConfig = Field(default_factory=LpRegConfig, description="Lp-Reg low-probability regularisation.")
    hints: HintsConfig = Field(default_factory=HintsConfig, description="Training on hinted completions.")
    hpt: HPTConfig = Field(default_factory=HPTConfig, description="HPT switch between SFT and RL signals.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters instead of full fine-tuning.")
    torch_threads: int = Field(1, ge=1, description="Intra-op threads of the learner.")
    num_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved for the learner.")

    @property
    def advantage_std(self) -> str:
        """The normalisation the estimator implies ('group', 'batch' or 'none'), for |Â| outside the learner."""
        return ADVANTAGE_STD[self.advantage]

    def problems(self, max_new_tokens: int) -> list[tuple[str, str]]:
        """Combinations of options that do not fit, as `(path inside learner, message)`; empty when fine.
        `max_new_tokens` is rollout.max_new_tokens, the default of the length options."""
        found: list[tuple[str, str]] = []
        if self.advantage == "dr_grpo" and self.aggregation != "seq-mean-token-sum-norm":
            found.append(
                (
                    "aggregation",
                    f"advantage 'dr_grpo' removes the length normalisation too: set aggregation to"
                    f" 'seq-mean-token-sum-norm' (got {self.aggregation!r}), or choose another advantage",
                )
            )
        if self.overlong.enabled:
            max_length, cache_length = self.overlong.resolved_lengths(max_new_tokens)
            if cache_length >= max_length:
                found.append(
                    (
                        "overlong.cache_length",
                        f"the soft zone L_cache ({cache_length}) must be shorter than L_max ({max_length})",
                    )
                )
        if self.tis_cap is not None and not self.recompute_old_logprobs:
            found.append(
                (
                    "tis_cap",
                    "truncated importance sampling weighs π_learner / π_behaviour, which is 1 unless the old"
                    " logprobs are the learner's own: set recompute_old_logprobs true, or tis_cap null",
                )
            )
        if self.length_penalty.enabled and self.advantage != "lite_ppo":
            found.append(
                (
                    "advantage",
                    f"DLER's length_penalty normalises rewards batch-wise: set advantage to 'lite_ppo'"
                    f" (got {self.advantage!r})",
                )
            )
        found += self._disco_problems()
        found += self._gspo_problems()
        found += self._gae_problems()
        return found

    def _gae_problems(self) -> list[tuple[str, str]]:
        """GAE gives every token its own advantage from the critic: objectives that take one score or one
        advantage per sequence have no use for it."""
        if self.advantage != "gae":
            return []
        if self.objective in ("disco", "gspo"):
            return [
                (
                    "objective",
                    f"advantage 'gae' gives each token its own advantage and objective {self.objective!r} takes"
                    " one per sequence: use objective 'grpo' (PPO-clip) or 'gspo_token' with it",
                )
            ]
        return []

    def _gspo_problems(self) -> list[tuple[str, str]]:
        """GSPO's loss is a mean over sequences of a sequence-level ratio: token-level options do not apply."""
        if not self.objective.startswith("gspo"):
            return []
        found = []
        if self.aggregation != "seq-mean-token-mean":
            found.append(
                (
                    "aggregation",
                    f"objective {self.objective!r} averages each sequence's loss over its tokens, then over sequences:"
                    f" set aggregation to 'seq-mean-token-mean' (got {self.aggregation!r})",
                )
            )
        for path, on in (("lp_reg.enabled", self.lp_reg.enabled), ("hints.enabled", self.hints.enabled)):
            if on:
                found.append(
                    (
                        path,
                        f"objective {self.objective!r} clips the sequence's ratio, and {path} acts on token ratios:"
                        " turn it off, or set objective to 'grpo'",
                    )
                )
        return found

    def _disco_problems(self) -> list[tuple[str, str]]:
        """Options of the PPO-clip loss that DisCO's objective has nothing to apply to."""
        if self.objective != "disco":
            return []
        clashes = {
            "lp_reg.enabled": self.lp_reg.enabled,
            "hints.enabled": self.hints.enabled,
            "hpt.enabled": self.hpt.enabled,
            "tis_cap": self.tis_cap is not None,
            "kl_coef": self.kl_coef > 0,
            "overlong.enabled": self.overlong.enabled,
            "length_penalty.enabled": self.length_penalty.enabled,
        }
        return [
            (
                path,
                f"objective 'disco' scores answers by correctness with its own KL constraint, so {path} (made for"
                " the PPO-clip loss on advantages) has nothing to act on: turn it off, or set objective to 'grpo'",
            )
            for path, clashes_with_disco in clashes.items()
            if clashes_with_disco
        ]


class UCBConfig(Section):
    """DUMP's UCB scheduler over distributions (docs/algorithms.md §7)."""

    window: int = Field(
        300, ge=1, description="Recent samples per distribution whose mean |advantage| is its learnability."
    )
    exploration: float = Field(1.0, ge=0, description="c: weight of the exploration term sqrt(2 ln(N+1) / (n_d+1)).")
    temperature: float = Field(0.1, gt=0, description="T of softmax(score / T), the sampling probabilities.")
    min_probability: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Floor of each distribution's probability: p_min + (1 − D·p_min)·softmax (0: DUMP's rule). A"
        " distribution failed everywhere at first keeps being drawn now and then, so rare successes can start it.",
    )


class PCLConfig(Section):
    """PCL's prompt selection by a value model of the policy's pass rate (docs/algorithms.md §7)."""

    pool_factor: int = Field(4, ge=1, description="k: candidates drawn per prompt kept (pool of k·B).")
    target: float = Field(0.5, ge=0, le=1, description="τ: keep the candidates whose predicted pass rate is nearest.")
    lr: float = Field(0.5, gt=0, description="Value model learning rate.")
    epochs: int = Field(4, ge=1, description="Gradient passes over each batch of observed pass rates.")
    dimension: int = Field(4096, ge=16, description="Hashed feature dimension of the value model.")
    features: Literal["text", "policy"] = Field(
        "text",
        description="What the value model reads: 'text' (hashed character n-grams and the distribution) or"
        " 'policy' (those plus the policy's hidden state at the prompt's last token; torch engine only).",
    )
    refresh_steps: int = Field(
        1,
        ge=1,
        description="With features 'policy': the driver's copy of the policy takes the newest weights every N steps.",
    )


class DifficultyFilterConfig(Section):
    """Balanced online difficulty filtering (docs/algorithms.md §7)."""

    enabled: bool = Field(False, description="Drop groups whose pass rate is outside [low, high].")
    low: float = Field(0.2, ge=0, le=1, description="Lowest pass rate kept.")
    high: float = Field(0.8, ge=0, le=1, description="Highest pass rate kept.")

    @model_validator(mode="after")
    def _ordered(self) -> DifficultyFilterConfig:
        if self.low > self.high:
            raise ValueError(f"low {self.low} must not exceed high {self.high}")
        return self


#: GAIN-RL's defaults are the reference's rank units on GSM8K's 7473 training prompts (σ 1000, n 500,
#: adjustment in [0, 1000]) as fractions of the ranked pool, so they scale with its size.
GSM8K_TRAIN_PROMPTS = 7473


class GainConfig(Section):
    """GAIN-RL's prompt selection by the starting policy's angle concentration (docs/algorithms.md §7).

    `std`, `step`, `adj_min` and `adj_max` are fractions of the ranked pool's size `N` (rank units are
    the fraction times `N`); the defaults are the reference's figures for GSM8K (N = 7473) divided by 7473."""

    pool_size: int = Field(
        8192,
        ge=1,
        description="Training prompts ranked once at the start: a finite pool (dataset files, reasoning-gym) is"
        " ranked whole up to this many (a random subset of this many, by the run's seed, beyond it); a pool with"
        " a procedural source draws this many prompts once with the run's seed (repeated prompts counted once).",
    )
    std: float = Field(
        round(1000 / GSM8K_TRAIN_PROMPTS, 4),
        gt=0,
        description="σ of the Gaussian over rank positions, as a fraction of the pool (1000/7473 ≈ 0.1338).",
    )
    step: float = Field(
        round(500 / GSM8K_TRAIN_PROMPTS, 4),
        ge=0,
        description="n of the mean's update n·tanh(α(acc − β)) + n·tanh(α·ang), as a fraction of the pool"
        " (500/7473 ≈ 0.0669).",
    )
    alpha: float = Field(2.0, ge=0, description="α: slope of both tanh terms of the mean's update.")
    beta: float = Field(
        0.5, ge=0, le=1, description="β: the batch accuracy at which the accuracy term of the update is 0."
    )
    adj_min: float = Field(
        0.0,
        ge=-1,
        le=1,
        description="Smallest move of the mean per learner step, as a fraction of the pool (0: it never moves back).",
    )
    adj_max: float = Field(
        round(1000 / GSM8K_TRAIN_PROMPTS, 4),
        ge=-1,
        le=1,
        description="Largest move of the mean per learner step, as a fraction of the pool (1000/7473 ≈ 0.1338).",
    )
    inter_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of C_inter (question tokens against the context before them) in C = C_intra +"
        " w·C_inter; the paper's sum is 1, the reference's preprocessing uses 8.",
    )
    batch_size: int = Field(
        64,
        ge=1,
        description="Prompts per prefill forward pass of the ranking (prompts of similar length batched together).",
    )

    @model_validator(mode="after")
    def _adjustment_ordered(self) -> GainConfig:
        if self.adj_min > self.adj_max:
            raise ValueError(f"adj_min {self.adj_min} must not exceed adj_max {self.adj_max}")
        return self


class CurriculumConfig(Section):
    """Which prompts are rolled out and which groups reach the learner; composable."""

    scheduler: Literal["uniform", "ucb"] = Field(
        "uniform", description="'uniform': distributions by source weight; 'ucb': DUMP's scheduler."
    )
    ucb: UCBConfig = Field(default_factory=UCBConfig)
    selection: Literal["none", "pcl", "gain"] = Field(
        "none",
        description="'pcl': keep the candidates predicted nearest τ; 'gain': GAIN-RL, a Gaussian over the"
        " prompts ranked by the starting policy's angle concentration, its mean moved by each batch's accuracy.",
    )
    pcl: PCLConfig = Field(default_factory=PCLConfig)
    gain: GainConfig = Field(default_factory=GainConfig)
    difficulty_filter: DifficultyFilterConfig = Field(default_factory=DifficultyFilterConfig)

    @model_validator(mode="after")
    def _gain_ranks_the_whole_pool(self) -> CurriculumConfig:
        if self.selection == "gain" and self.scheduler == "ucb":
            raise ValueError(
                "curriculum.selection 'gain' draws every prompt from one ranking of the whole pool, so it cannot"
                " follow the distribution curriculum.scheduler 'ucb' picks first: set curriculum.scheduler: uniform"
            )
        return self


class CheckpointConfig(Section):
    every_steps: int = Field(
        50,
        ge=0,
        description="Checkpoint every this many learner steps (0: only on request and at the end). Trained "
        "groups are acknowledged in the buffer only at a checkpoint, so a run resumed from its last checkpoint "
        "trains again exactly the groups trained after it.",
    )
    keep_last: int = Field(3, ge=0, description="Newest checkpoints kept on disk (0: keep every one).")
    on_error: Literal["fail", "keep_previous"] = Field(
        "fail",
        description="When a checkpoint cannot be written (disk full, read-only or unwritable directory): 'fail' "
        "ends the run as failed with the reason, the previous checkpoint intact, so no training is done that "
        "could not be saved; 'keep_previous' logs and counts the failure, keeps the previous checkpoint, leaves "
        "the groups trained since it unacknowledged (a resume trains them again) and goes on. A checkpoint that "
        "was not completely written is never taken as one.",
    )


class SupervisionConfig(Section):
    max_worker_restarts: int = Field(
        3, ge=0, description="Restarts of one rollout worker that died before the run gives up and fails."
    )
    max_learner_restarts: int = Field(
        2, ge=0, description="Restarts of a learner that died (from the last checkpoint) before the run fails."
    )
    max_nonfinite_steps: int = Field(
        3,
        ge=0,
        description="Consecutive learner steps skipped for non-finite loss or gradients before the run fails "
        "(0: never give up). Each is logged with its batch's group ids.",
    )


#: The environment variable that must be "1" for a config with `faults` set to load.
FAULT_INJECTION_ENV = "ORCHARD_FAULT_INJECTION"


class FaultsConfig(Section):
    """Fault injection, for tests of the run's own fault handling; never for training.

    A config that sets any of these loads only where the environment says so
    (`ORCHARD_FAULT_INJECTION=1`), so that a production config copied from a test cannot carry one."""

    nonfinite_loss_at_steps: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list,
        description="Learner steps (1-based, as in metrics.jsonl) whose loss is made NaN, as a broken batch would;"
        " the step is skipped and counted as non-finite. Needs ORCHARD_FAULT_INJECTION=1.",
    )
    learner_step_delay_seconds: float = Field(
        0.0,
        ge=0,
        description="Added to every learner step, as a slow learner would take. Needs ORCHARD_FAULT_INJECTION=1.",
    )
    rollout_delay_seconds: float = Field(
        0.0,
        ge=0,
        description="Added to every rollout call, as a slow worker would take. Needs ORCHARD_FAULT_INJECTION=1.",
    )
    rollout_delay_by_worker: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict,
        description="Seconds added to the rollout calls of the named workers (e.g. {worker-1: 10}), on top of"
        " rollout_delay_seconds: one slow worker among fast ones. Needs ORCHARD_FAULT_INJECTION=1.",
    )

    @model_validator(mode="after")
    def _allowed_here(self) -> FaultsConfig:
        injected = [name for name, value in self if value]
        if injected and os.environ.get(FAULT_INJECTION_ENV) != "1":
            raise ValueError(
                f"faults.{injected[0]} injects failures for tests and is refused unless"
                f" {FAULT_INJECTION_ENV}=1 is set; remove the faults section from a training config"
            )
        return self


class WarmStartConfig(Section):
    steps: int = Field(300, ge=0, description="Supervised steps on reference answers before RL (0: none).")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    cache_dir: str | None = Field(None, description="Where the warm-started model is cached; default ~/.cache/orchard.")
    tool_demonstrations: float = Field(
        1.0,
        ge=0,
        le=1,
        description="With rollout.multi_turn: the share of the prompts carrying a tool call (`metadata.tool_call`)"
        " whose target demonstrates the call; the others show the bare answer, so that RL learns when to call.",
    )
    seed: int | None = Field(
        None,
        description="Seed of the supervised stage's example order; None: the run's seed. A fixed seed gives runs of"
        " several seeds one warm start, so that they differ in their RL only.",
    )


class EvalConfig(Section):
    every_steps: int = Field(10, ge=1, description="Greedy held-out evaluation interval in learner steps.")
    num_prompts: int = Field(200, ge=1, description="Held-out prompts evaluated (at most held_out_size).")
    samples: int = Field(
        4,
        ge=0,
        description="Rollouts written to samples.jsonl at every evaluation, as the model saw them (rendered prompt,"
        " completion, reward, distribution); 0: none.",
    )


class TensorBoardConfig(Section):
    enabled: bool = Field(False, description="Write every metrics.jsonl figure and the samples as TensorBoard events.")
    directory: str | None = Field(None, description="Event directory; None: runs/<id>/tensorboard.")


class MLflowConfig(Section):
    enabled: bool = Field(False, description="Log every metrics.jsonl figure, the config and the samples to MLflow.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; None: a local file store in runs/<id>/mlruns."
    )
    experiment: str = Field("orchard", description="MLflow experiment name.")


class WandbConfig(Section):
    enabled: bool = Field(False, description="Log every metrics.jsonl figure and the samples to Weights & Biases.")
    project: str = Field("orchard", description="W&B project.")
    mode: Literal["offline", "online"] = Field(
        "offline", description="'offline' writes runs/<id>/wandb only (sync later with `wandb sync`)."
    )


class LoggingConfig(Section):
    """Experiment trackers that receive what `metrics.jsonl` and `samples.jsonl` receive."""

    tensorboard: TensorBoardConfig = Field(default_factory=TensorBoardConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class ControlConfig(Section):
    host: str = Field("127.0.0.1", description="Control plane bind address; a non-loopback address needs a token.")
    port: int = Field(8470, ge=0, le=65535, description="Control plane port (0: any free port).")
    token: SecretStr | None = Field(
        None,
        description="Bearer token every mutating route requires (ORCHARD_TOKEN in the environment wins). "
        "Never written to config.yaml or printed.",
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body the control plane accepts.")
    max_active_runs: int = Field(
        1,
        ge=1,
        description="Runs the control plane trains at once (`orchard serve --max-active-runs`); more than one"
        " needs cluster.placement_groups in each, so that every run holds its own reservation.",
    )

    def resolved_token(self) -> str | None:
        """The token in force: ORCHARD_TOKEN when set and non-empty, else `token`."""
        from_environment = os.environ.get("ORCHARD_TOKEN")
        if from_environment:
            return from_environment
        return self.token.get_secret_value() if self.token is not None else None


class WeightSyncConfig(Section):
    transport: Literal["auto", "shared_memory", "object_store", "nccl"] = Field(
        "auto",
        description=(
            "How the learner's new weights reach the rollout workers. 'shared_memory': a segment in /dev/shm"
            " written once per version and copied from by every reader (one node only); 'object_store': the"
            " Ray object store (works across nodes); 'nccl': a bucketed broadcast from the learner into every"
            " worker over a torch.distributed group of their own (NCCL on GPUs, gloo on CPUs;"
            " rollout/weight_broadcast.py); 'auto': shared memory when the Ray cluster is a single"
            " node and /dev/shm exists, else the object store."
        ),
    )
    bucket_mb: float = Field(
        256.0,
        gt=0,
        description="Transport 'nccl': bytes per broadcast bucket in MiB; each side holds one bucket besides the weights.",
    )
    timeout_seconds: float = Field(
        600.0, gt=0, description="Transport 'nccl': how long a member waits for the others in a broadcast."
    )

    @property
    def bucket_bytes(self) -> int:
        return max(1, int(self.bucket_mb * 2**20))


class RewardModelConfig(Section):
    """A Hugging Face sequence-classification checkpoint served by Ray actors as a verifier; a data source
    uses it with `verifier: reward_model:<name>` (verifiers/reward_model.py, rollout/reward_models.py)."""

    path: str = Field(..., description="Directory of the checkpoint (one label) and its tokenizer.")
    rule: str | None = Field(None, description="A rule verifier combined with the model (name or dotted path).")
    combine: Literal["sum", "gate"] = Field(
        "sum",
        description="With `rule`: 'sum' rule_weight·rule + model_weight·model; 'gate' the model's score where the"
        " rule accepts the answer, the rule's reward where it does not.",
    )
    rule_weight: float = Field(1.0, description="Weight of the rule verifier's reward under 'sum'.")
    model_weight: float = Field(1.0, description="Weight of the model's score under 'sum'.")
    transform: Literal["sigmoid", "raw"] = Field(
        "sigmoid", description="The score: sigmoid of the label's logit (0–1, like rule rewards), or the logit."
    )
    num_actors: int = Field(1, ge=1, description="Ray actors serving the model; a call's batch is split over them.")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs of each actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs of each actor.")
    batch_size: int = Field(32, ge=1, description="Completions per forward pass.")
    max_length: int = Field(1024, ge=8, description="Tokens of prompt and completion read (longer is truncated).")
    timeout_seconds: float = Field(
        60.0, gt=0, description="A batch not scored in this time is a verifier error of its groups (dropped)."
    )
    load_timeout_seconds: float = Field(300.0, gt=0, description="How long the run waits for the actors to load.")


class ClusterConfig(Section):
    """Ray placement groups for the rollout engines and the learner (services/placement.py)."""

    placement_groups: bool = Field(
        False,
        description="Reserve a placement group for the rollout workers (a bundle each) and one for the learner"
        " before creating them; the run waits until the cluster can hold both.",
    )
    rollout_gpus_per_worker: int = Field(
        0,
        ge=0,
        description="GPUs in each rollout worker's bundle (0: CPU only; vLLM: rollout.vllm.tensor_parallel_size).",
    )
    learner_gpus: int = Field(0, ge=0, le=1, description="GPUs of each learner rank's bundle (0: CPU).")
    learner_ranks: int = Field(
        1,
        ge=1,
        description="Data-parallel DeepSpeed ranks of the learner, one actor and one bundle each: each trains on"
        " its share of the batch (whole groups, balanced by tokens), the loss normalised over the whole batch, so"
        " N ranks take the step one rank would (ZeRO-3 also shards parameters, gradients and optimizer state"
        " across them). A checkpoint resumes only with the number of ranks that wrote it. More than 1 needs"
        " cluster.placement_groups and weight_sync transport 'object_store' or 'nccl'.",
    )
    rollout_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement strategy of the rollout bundles."
    )
    learner_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="Ray placement strategy of the learner's bundles (STRICT_PACK: one node)."
    )
    ready_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="How long to wait for the cluster to hold the placement groups (the run is pending meanwhile,"
        " saying so), and for the bundles of rollout workers added during the run.",
    )
    max_rollout_workers: int | None = Field(
        None, ge=1, description="Quota: the most rollout workers the run may have, by request or autoscaling."
    )
    max_cpus: float | None = Field(
        None, gt=0, description="Quota: the most Ray CPUs the run's actors may reserve (learner and workers)."
    )
    max_gpus: float | None = Field(
        None, ge=0, description="Quota: the most GPUs the run's actors may reserve (learner and workers)."
    )


class RunConfig(Section):
    """A whole run. `orchard check` prints the resolved form."""

    name: str = Field("orchard", description="Run name; the run id is derived from it.")
    seed: int = Field(0, description="Seed of sampling and training.")
    max_steps: int = Field(100, ge=1, description="Learner steps before the run finishes.")
    max_minutes: float | None = Field(None, gt=0, description="Wall-clock limit of the RL phase.")
    runs_dir: str = Field("runs", description="Where run directories are created.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    supervision: SupervisionConfig = Field(default_factory=SupervisionConfig)
    warmstart: WarmStartConfig = Field(default_factory=WarmStartConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Experiment trackers.")
    control: ControlConfig = Field(default_factory=ControlConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    reward_models: dict[str, RewardModelConfig] = Field(
        default_factory=dict, description="Reward models by name, for sources with `verifier: reward_model:<name>`."
    )
    faults: FaultsConfig = Field(default_factory=FaultsConfig, description="Fault injection (tests only).")

    @model_validator(mode="after")
    def _gpu_settings_agree(self) -> RunConfig:
        tensor_parallel = self.rollout.vllm.tensor_parallel_size
        gpus = self.cluster.rollout_gpus_per_worker
        if self.rollout.engine == "vllm" and self.cluster.placement_groups and gpus != tensor_parallel:
            raise ValueError(
                f"cluster.rollout_gpus_per_worker ({gpus}) must equal rollout.vllm.tensor_parallel_size"
                f" ({tensor_parallel}): each vLLM engine gets one bundle of that many GPUs"
            )
        if self.curriculum.pcl.features == "policy" and self.rollout.engine == "vllm":
            raise ValueError(
                "curriculum.pcl.features: 'policy' reads the policy's hidden states from the driver's torch engine,"
                " and a vLLM run holds none (vLLM exposes no hidden states): use features 'text'"
            )
        if self.rollout.multi_turn.enabled and self.learner.hints.enabled:
            raise ValueError(
                "rollout.multi_turn and learner.hints cannot be combined: hinted rollouts are single answers;"
                " turn one of them off"
            )
        if (
            self.learner.objective == "gspo"
            and self.rollout.strategy == "mcts"
            and self.learner.tree_advantage != "outcome"
        ):
            raise ValueError(
                "learner.objective 'gspo' takes one advantage per sequence, and tree trajectories (rollout.strategy"
                f" 'mcts') carry per-token ones (learner.tree_advantage {self.learner.tree_advantage!r}): use"
                " objective 'gspo_token', or tree_advantage 'outcome'"
            )
        if self.learner.advantage == "gae" and self.rollout.strategy == "mcts":
            raise ValueError(
                "learner.advantage 'gae' takes every token's advantage from the critic, and tree trajectories"
                " (rollout.strategy 'mcts') carry their own (learner.tree_advantage): use rollout.strategy 'sample'"
                " with 'gae', or another advantage with 'mcts'"
            )
        for index, source in enumerate(self.data.sources):
            named = str(getattr(source, "verifier", ""))
            if named.startswith("reward_model:") and named.removeprefix("reward_model:") not in self.reward_models:
                raise ValueError(
                    f"data.sources.{index}.verifier {named!r} names no reward model of reward_models"
                    f" ({sorted(self.reward_models) or 'none configured'})"
                )
        self.check_quota(self.rollout.num_workers, field="rollout.num_workers")
        if self.rollout.autoscale is not None:
            self.check_quota(self.rollout.autoscale.max, field="rollout.autoscale.max")
        if self.cluster.learner_ranks > 1 and not self.cluster.placement_groups:
            raise ValueError(
                "cluster.learner_ranks > 1 needs cluster.placement_groups: true (rank 0's bundle names the rendezvous node)"
            )
        if self.cluster.learner_ranks > 1 and self.weight_sync.transport not in ("object_store", "nccl"):
            raise ValueError(
                f"cluster.learner_ranks > 1 needs weight_sync.transport 'object_store' or 'nccl' (got {self.weight_sync.transport!r})"
            )
        return self

    def resources(self, workers: int) -> dict[str, float]:
        """The Ray CPUs and GPUs the run's actors reserve with `workers` rollout workers."""
        cluster = self.cluster
        worker_gpus = cluster.rollout_gpus_per_worker
        return {
            "CPU": self.learner.num_cpus * cluster.learner_ranks + self.rollout.num_cpus_per_worker * workers,
            "GPU": float(cluster.learner_gpus * cluster.learner_ranks + worker_gpus * workers),
        }

    def check_quota(self, workers: int, *, field: str = "workers") -> None:
        """Raises ValueError naming the quota (`cluster.max_*`) that `workers` rollout workers would exceed."""
        cluster = self.cluster
        if cluster.max_rollout_workers is not None and workers > cluster.max_rollout_workers:
            raise ValueError(
                f"{field}: {workers} rollout workers exceed the run's quota cluster.max_rollout_workers="
                f"{cluster.max_rollout_workers}"
            )
        needed = self.resources(workers)
        for resource, quota in (("CPU", cluster.max_cpus), ("GPU", cluster.max_gpus)):
            if quota is not None and needed[resource] > quota + 1e-9:
                raise ValueError(
                    f"{field}: {workers} rollout workers and the learner reserve {needed[resource]:g} {resource}s,"
                    f" over the run's quota cluster.max_{resource.lower()}s={quota:g}"
                )

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, value: str) -> str:
        if not value or not all(ch.isalnum() or ch in "-_." for ch in value):
            raise ValueError("name may hold only letters, digits, '-', '_' and '.'")
        return value


def _problems(error: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for item in error.errors():
        parts = [str(part) for part in item["loc"] if not str(part).startswith("function-")]
        # pydantic puts the union member's tag in locations inside `sources`; keep the user's path
        tags = {"procedural", "jsonl", "parquet", "hf_dataset", "reasoning_gym"}
        path = ".".join(part for index, part in enumerate(parts) if not (part in tags and parts[index - 1].isdigit()))
        problems.append((path or "<root>", item["msg"]))
    return problems


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError([(text, "an override must look like key.path=value")])
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([(key or text, "empty key in override")])
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as error:
        raise ConfigError([(key, f"value {raw!r} is not valid YAML: {error}")]) from error
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError([(".".join(path), f"'{part}' is not a section, cannot set a key inside it")])
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (the embedded demo when `path` is None) and apply `--set` overrides."""
    source = Path(path) if path is not None else DEMO_CONFIG
    try:
        text = source.read_text()
    except OSError as error:
        raise ConfigError([("<file>", f"cannot read {source}: {error.strerror}")]) from error
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError([("<file>", f"{source} is not valid YAML: {error}")]) from error
    if not isinstance(data, dict):
        raise ConfigError([("<root>", f"{source} must hold a mapping, got {type(data).__name__}")])
    return config_from_dict(apply_overrides(data, overrides or []))


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_problems(error)) from None
    problems = [
        (f"learner.{path}", message) for path, message in config.learner.problems(config.rollout.max_new_tokens)
    ]
    if problems:
        raise ConfigError(problems)
    return config


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML, without secrets (the control token is left out)."""
    return yaml.safe_dump(config.model_dump(mode="json", exclude={"control": {"token"}}), sort_keys=False)
