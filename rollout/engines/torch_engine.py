"""`TorchEngine`: batched generation with a KV cache in plain torch, for CPU workers and tests.

The forward pass is a compact re-implementation of Hugging Face's `Qwen2ForCausalLM` that reads the HF
model's own parameters (same names), so the learner (which trains the HF model) and the engine always
agree on the weights; `tests/unit/test_torch_engine.py` checks the logits match. It is much faster
than `model.generate` on CPU because each step is a handful of fused ops with no per-step Python
bookkeeping of HF's cache and generation machinery (`bench/engine.py` prints the ratio).

Generation: the prompts are left-padded and prefilled in one forward into a preallocated cache
of `prompt length + max_new_tokens` slots; then one token per step. Positions count from each
prompt's first real token (`position = slot - pad count`), as if the sequence were unpadded, which is
what the learner sees. Finished rows are dropped from the batch once a quarter of it has finished.

Stop strings: the completion's `text` ends before the first stop string; its `token_ids` and `logprobs`
keep every token up to and including the token that completed the stop string (as vLLM does), so the
learner also trains the decision to stop. An eos token is likewise kept in `token_ids` (not in `text`).
Both finish with reason "stop"; running out of `max_new_tokens` is "length".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, Qwen2ForCausalLM

from orchard.protocols import GenerationOutput, SamplingParams
from rollout.tokenizer import Tokenizer

#: Compact the batch once this fraction of its rows has finished (a gather of every cache tensor costs
#: about as much as one decode step, so compacting on every finish would not pay).
COMPACT_FRACTION = 0.25


class TorchEngine:
    """Implements `orchard.protocols.Engine` on a Qwen2-layout `transformers` model."""

    def __init__(
        self,
        model: Qwen2ForCausalLM,
        tokenizer: Tokenizer,
        *,
        device: str | torch.device = "cpu",
        max_batch_size: int = 256,
        eos_token_ids: Sequence[int] | None = None,
        policy_version: int = 0,
    ) -> None:
        """`eos_token_ids`: tokens that end a completion (default: the tokenizer's eos; `()` for none)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_token_ids = (tokenizer.eos_id,) if eos_token_ids is None else tuple(eos_token_ids)
        self.policy_version = policy_version
        self._read_geometry(model.config)
        self._parameters = dict(self.model.named_parameters(remove_duplicate=False))
        # Tied embeddings appear in `state_dict()` as `lm_head.weight` too; accept either name.
        self._aliases = {"lm_head.weight": "model.embed_tokens.weight"} if self._tied else {}
        self._pack()

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Any], config: PretrainedConfig, tokenizer: Tokenizer, **kwargs: Any
    ) -> TorchEngine:
        """An engine over a fresh `Qwen2ForCausalLM(config)` holding `state_dict`."""
        engine = cls(Qwen2ForCausalLM(config), tokenizer, **kwargs)
        engine.load_weights(state_dict, engine.policy_version)
        return engine

    def _read_geometry(self, config: PretrainedConfig) -> None:
        rope = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": config.rope_theta}
        problems = []
        if rope.get("rope_type", "default") != "default":
            problems.append(f"rope_type {rope['rope_type']!r} (only 'default' RoPE is implemented)")
        if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
            problems.append("sliding-window layers (only full attention is implemented)")
        if config.hidden_act != "silu":
            problems.append(f"hidden_act {config.hidden_act!r} (only SwiGLU with silu is implemented)")
        if problems:
            raise ValueError("TorchEngine cannot run this model: " + "; ".join(problems))
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        self.max_positions = config.max_position_embeddings
        self.eps = config.rms_norm_eps
        self._tied = bool(config.tie_word_embeddings)
        # RoPE exactly as HF computes it (float32 frequencies, `cat(freqs, freqs)`), so logits match.
        inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
        freqs = torch.arange(self.max_positions, dtype=torch.float)[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = next(self.model.parameters()).dtype
        self._cos = emb.cos().to(self.device, dtype)
        self._sin = emb.sin().to(self.device, dtype)

    def _pack(self) -> None:
        """Fuse q/k/v and gate/up projections into single matmuls (fewer ops per step).

        The fused tensors are copies: call `refresh()` after changing the model's parameters other than
        through `load_weights`.
        """
        get = self._parameters.__getitem__
        self._layers = []
        for index in range(self.num_layers):
            prefix = f"model.layers.{index}."
            attn = prefix + "self_attn."
            biases = [self._parameters.get(attn + f"{name}_proj.bias") for name in "qkv"]
            qkv_weight = torch.cat([get(attn + f"{name}_proj.weight") for name in "qkv"])
            qkv_bias = torch.cat(biases) if all(b is not None for b in biases) else None
            self._layers.append(
                (
                    get(prefix + "input_layernorm.weight"),
                    qkv_weight,
                    qkv_bias,
                    get(attn + "o_proj.weight"),
                    get(prefix + "post_attention_layernorm.weight"),
                    torch.cat([get(prefix + "mlp.gate_proj.weight"), get(prefix + "mlp.up_proj.weight")]),
                    get(prefix + "mlp.down_proj.weight"),
                )
            )
        self._embed = get("model.embed_tokens.weight")
        self._final_norm = get("model.norm.weight")
        self._lm_head = self._embed if self._tied else get("lm_head.weight")

    refresh = _pack

    # ----------------------------------------------------------------------------------------- forward

    def _forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: list[tuple[torch.Tensor, torch.Tensor]],
        start: int,
    ) -> torch.Tensor:
        """Hidden states after the final norm, `[batch, new, hidden]`; writes K/V into `cache` at `start`.

        `mask[b, 0, i, j]` says whether query `i` of row `b` may attend to cache slot `j < start + new`.
        """
        batch, new = token_ids.shape
        end = start + new
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        cos = self._cos[positions].unsqueeze(1)  # [batch, 1, new, head_dim]
        sin = self._sin[positions].unsqueeze(1)
        x = F.embedding(token_ids, self._embed)
        for layer, (in_norm, qkv_w, qkv_b, o_w, post_norm, gate_up_w, down_w) in enumerate(self._layers):
            h = F.rms_norm(x, (self.hidden_size,), in_norm, self.eps)
            q, k, v = F.linear(h, qkv_w, qkv_b).split((q_size, kv_size, kv_size), dim=-1)
            q = _rotate(q.view(batch, new, heads, head_dim).transpose(1, 2), cos, sin)
            k = _rotate(k.view(batch, new, kv_heads, head_dim).transpose(1, 2), cos, sin)
            k_cache, v_cache = cache[layer]
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = v.view(batch, new, kv_heads, head_dim).transpose(1, 2)
            attn = F.scaled_dot_product_attention(
                q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask, enable_gqa=kv_heads != heads
            )
            x = x + F.linear(attn.transpose(1, 2).reshape(batch, new, q_size), o_w)
            gate, up = F.linear(F.rms_norm(x, (self.hidden_size,), post_norm, self.eps), gate_up_w).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, down_w)
        return F.rms_norm(x, (self.hidden_size,), self._final_norm, self.eps)

    def _new_cache(self, batch: int, slots: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (batch, self.num_kv_heads, slots, self.head_dim)
        options = {"dtype": self._embed.dtype, "device": self.device}
        return [(torch.zeros(shape, **options), torch.zeros(shape, **options)) for _ in range(self.num_layers)]

    @torch.inference_mode()
    def logits(self, token_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[batch, length, vocab]` of left-padded `token_ids` (float32), for tests and scoring.

        Positions count from each row's first unmasked token, as in generation.
        """
        token_ids = token_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(token_ids, dtype=torch.bool)
        valid = attention_mask.to(self.device, torch.bool)
        batch, length = token_ids.shape
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self._forward(token_ids, positions, _prefill_mask(valid), self._new_cache(batch, length), 0)
        return F.linear(hidden, self._lm_head).float()

    # -------------------------------------------------------------------------------------- generation

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[GenerationOutput]:
        """One completion per prompt (prompts are token ids; the caller adds any bos token)."""
        validate_params(params)
        prompt_lists = [list(map(int, prompt)) for prompt in prompts]
        for index, prompt in enumerate(prompt_lists):
            if not prompt:
                raise ValueError(f"prompt {index} is empty; a prompt needs at least one token (e.g. bos)")
            if min(prompt) < 0 or max(prompt) >= self.vocab_size:
                bad = next(t for t in prompt if not 0 <= t < self.vocab_size)
                raise ValueError(f"prompt {index} holds token id {bad}, outside the vocabulary [0, {self.vocab_size})")
            if len(prompt) + params.max_new_tokens > self.max_positions:
                raise ValueError(
                    f"prompt {index} has {len(prompt)} tokens; with max_new_tokens={params.max_new_tokens} it "
                    f"exceeds the model's max_position_embeddings={self.max_positions}"
                )
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()).item())
        generator = torch.Generator(device=self.device).manual_seed(seed)
        outputs: list[GenerationOutput] = []
        for first in range(0, len(prompt_lists), self.max_batch_size):
            outputs += self._generate_batch(prompt_lists[first : first + self.max_batch_size], params, generator)
        return outputs

    @torch.inference_mode()
    def _generate_batch(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator
    ) -> list[GenerationOutput]:
        batch, steps = len(prompts), params.max_new_tokens
        prompt_length = max(len(prompt) for prompt in prompts)
        slots = prompt_length + steps
        pad_id = self.tokenizer.pad_id
        token_ids = torch.tensor([[pad_id] * (prompt_length - len(p)) + p for p in prompts], device=self.device)
        pad_counts = torch.tensor([prompt_length - len(p) for p in prompts], device=self.device)
        valid = torch.ones(batch, slots, dtype=torch.bool, device=self.device)
        valid[:, :prompt_length] = torch.arange(prompt_length, device=self.device) >= pad_counts[:, None]
        positions = (torch.arange(prompt_length, device=self.device) - pad_counts[:, None]).clamp(min=0)
        cache = self._new_cache(batch, slots)
        hidden = self._forward(token_ids, positions, _prefill_mask(valid[:, :prompt_length]), cache, 0)[:, -1]

        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        finish: list[str | None] = [None] * batch
        texts: list[str | None] = [None] * batch
        eos = torch.tensor(self.eos_token_ids, device=self.device, dtype=torch.long)
        rows = list(range(batch))  # original index of each row still in the batch
        alive = torch.ones(batch, dtype=torch.bool, device=self.device)
        for step in range(steps):
            logits = F.linear(hidden, self._lm_head).float()
            sampled, sampled_logprobs = sample_next(logits, params.temperature, params.top_p, generator)
            ended = torch.isin(sampled, eos) if len(eos) else torch.zeros_like(alive)
            for row, token, logprob, is_eos, is_alive in zip(
                rows, sampled.tolist(), sampled_logprobs.tolist(), ended.tolist(), alive.tolist(), strict=True
            ):
                if not is_alive:
                    continue
                tokens[row].append(token)
                logprobs[row].append(logprob)
                if is_eos:
                    finish[row] = "stop"
                elif params.stop:
                    cut = find_stop(self.tokenizer, tokens[row], params.stop)
                    if cut is not None:
                        finish[row], texts[row] = "stop", cut
            alive = torch.tensor([finish[row] is None for row in rows], device=self.device)
            remaining = int(alive.sum())
            if remaining == 0 or step == steps - 1:
                break
            if len(rows) - remaining >= max(1, COMPACT_FRACTION * len(rows)):
                keep = alive.nonzero().squeeze(1)
                rows = [rows[i] for i in keep.tolist()]
                cache = [(k.index_select(0, keep), v.index_select(0, keep)) for k, v in cache]
                valid, pad_counts, sampled = valid[keep], pad_counts[keep], sampled[keep]
                alive = alive[keep]
            slot = prompt_length + step
            hidden = self._forward(
                sampled[:, None], (slot - pad_counts)[:, None], valid[:, None, None, : slot + 1], cache, slot
            )[:, -1]
        return [
            GenerationOutput(
                token_ids=tokens[row],
                logprobs=logprobs[row],
                finish_reason=finish[row] or "length",
                text=texts[row] if texts[row] is not None else self.tokenizer.decode(tokens[row]),
            )
            for row in range(batch)
        ]

    # ----------------------------------------------------------------------------------------- weights

    def load_weights(self, state_dict: Mapping[str, torch.Tensor | np.ndarray], version: int) -> None:
        """Copy `state_dict` into the model's tensors in place and become policy `version`.

        All names and shapes are checked before anything is copied, so a refused update leaves the
        engine unchanged. Every parameter must be present (`lm_head.weight` may be omitted when tied).
        """
        if version < self.policy_version:
            raise ValueError(
                f"weights version {version} is older than the engine's policy_version {self.policy_version}; "
                "versions must not go backwards"
            )
        updates: dict[str, torch.Tensor] = {}
        problems: list[str] = []
        seen: set[str] = set()
        for name, value in state_dict.items():
            target_name = self._aliases.get(name, name)
            if target_name not in self._parameters:
                problems.append(f"unknown parameter {name!r}")
                continue
            seen.add(target_name)
            tensor = torch.from_numpy(np.asarray(value)) if isinstance(value, np.ndarray) else value
            if not isinstance(tensor, torch.Tensor):
                problems.append(f"{name!r} is a {type(value).__name__}, not a tensor or numpy array")
                continue
            expected = tuple(self._parameters[target_name].shape)
            if tuple(tensor.shape) != expected:
                problems.append(f"{name!r} has shape {tuple(tensor.shape)}, the model's is {expected}")
                continue
            if name != target_name and target_name in state_dict:
                continue  # the tied alias of a tensor given under its own name
            updates[target_name] = tensor
        required = set(self._parameters) - set(self._aliases)
        missing = sorted(required - seen)
        problems += [f"missing parameter {name!r}" for name in missing]
        if problems:
            shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
            raise ValueError(f"load_weights refused version {version}: {shown}")
        with torch.no_grad():
            for name, tensor in updates.items():
                self._parameters[name].copy_(tensor)
        self._pack()
        self.policy_version = version


def validate_params(params: SamplingParams) -> None:
    """Raise `ValueError` naming the first field of `params` an engine cannot honour."""
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise ValueError(f"SamplingParams.temperature must be a finite number >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {params.top_p}")
    if not isinstance(params.max_new_tokens, int) or params.max_new_tokens < 1:
        raise ValueError(f"SamplingParams.max_new_tokens must be an int >= 1, got {params.max_new_tokens!r}")
    if isinstance(params.stop, str) or not all(isinstance(stop, str) and stop for stop in params.stop):
        raise ValueError(f"SamplingParams.stop must be a tuple of non-empty strings, got {params.stop!r}")
    if params.seed is not None and not isinstance(params.seed, int):
        raise ValueError(f"SamplingParams.seed must be an int or None, got {params.seed!r}")


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens `[batch]` and their logprobs `[batch]` from float32 `logits` `[batch, vocab]`.

    logprob = log_softmax(logits / T)[token] with T = 1 when greedy (`temperature == 0`, argmax). This is
    the untruncated distribution, the one the learner recomputes from the same logits; top-p only
    restricts which tokens may be drawn (Holtzman et al. 2020: keep the smallest prefix of tokens sorted
    by probability whose mass reaches `top_p`). Drawing uses the exponential race
    `argmax_i p_i / E_i, E_i ~ Exp(1)`, which picks i with probability p_i / sum(p).
    """
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, F.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    logprobs = F.log_softmax(logits / temperature, -1)
    # Clamped so an exact zero draw cannot make 0/0 = NaN, which argmax would pick.
    noise = torch.empty_like(logprobs).exponential_(generator=generator).clamp_(min=1e-20)
    if top_p < 1:
        sorted_logprobs, order = logprobs.sort(-1, descending=True)
        probs = sorted_logprobs.exp()
        kept = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
        tokens = order.gather(-1, (kept / noise).argmax(-1, keepdim=True)).squeeze(-1)
    else:
        tokens = (logprobs.exp() / noise).argmax(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def find_stop(tokenizer: Tokenizer, token_ids: Sequence[int], stops: Sequence[str]) -> str | None:
    """The completion's text before its first stop string, or None when it holds none yet.

    Called after every new token, so a new occurrence ends in the last token and starts within the last
    `len(stop)` tokens (each decodes to at least one character): decoding that tail first avoids
    decoding the whole completion at every step.
    """
    tail = tokenizer.decode(token_ids[-(max(map(len, stops)) + 2) :])
    if not any(stop in tail for stop in stops):
        return None
    text = tokenizer.decode(token_ids)
    cuts = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return text[: min(cuts)] if cuts else None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in HF's half-split layout: `x·cos + rotate_half(x)·sin` (Su et al. 2021, RoFormer)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """`[batch, 1, length, length]`: causal and not padding; every query also sees itself, so a padding
    query's softmax is never over an empty set (which would put NaN into the cache)."""
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]
