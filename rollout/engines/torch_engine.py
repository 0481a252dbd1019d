"""`TorchEngine`: batched generation with a KV cache in torch, for CPU workers and tests.

The forward pass is a compact re-implementation of Hugging Face's `Qwen2ForCausalLM` that reads the HF
model's own parameters (same names), so the learner (which trains the HF model) and the engine always
agree on the weights; `tests/unit/test_torch_engine.py` checks the logits match. On CPU it beats
`model.generate` where per-step overhead matters (the demo-sized model), because the cache is
preallocated (HF's dynamic cache copies itself on every step) and a decode step is a handful of fused
ops: one GEMM for q/k/v and one for gate/up, RoPE on q and k together, attention as two batched
matmuls, residual adds fused into the output GEMMs. On larger models both are bound by the same weight
matmuls. `bench/engine.py` prints both rates and that matmul floor.

Generation of a float32 model on the CPU goes through a compiled forward pass instead
(`rollout/engines/kernels.py`, `csrc/forward.cpp`; `fused_kernel=False` turns it off, and a machine
without a C++ compiler falls back to the torch path with a warning): the same computation, all layers
in one call, with the same BLAS matmuls and everything between them in C++ loops, so a decode step pays
no per-op Python cost; its prefill skips padding positions instead of masking them. The tests check it
against the torch path to float32 rounding. `logits` (scoring, tests) always runs in torch.

Generation: the prompts are left-padded and prefilled in one forward into a preallocated cache
of `prompt length + max_new_tokens` slots (its last layer computes only the last position, the one
that is sampled from; a prompt repeated in the batch, as in a rollout's groups, is prefilled once and
its cache copied to each of its rows); then one token per step. Positions count from each
prompt's first real token (`position = slot - pad count`), as if the sequence were unpadded, which is
what the learner sees. Each step's tokens and logprobs go into preallocated tables; rows are checked for
eos and stop strings every `FINISH_CHECK_INTERVAL` steps (a row that finished in between runs on until
then and its extra tokens are dropped, so the result is the same), and finished rows are dropped from
the batch once a quarter of it has finished. Sampling noise is drawn for many steps at once, indexed by
each row's original position, so a row's draws do not depend on when the batch is compacted.

Stop strings: the completion's `text` ends before the first stop string; its `token_ids` and `logprobs`
keep every token up to and including the token that completed the stop string (as vLLM does), so the
learner also trains the decision to stop. An eos token is likewise kept in `token_ids` (not in `text`).
Both finish with reason "stop"; running out of `max_new_tokens` is "length". Sampling and stop
strings live in `rollout/engines/sampling.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, Qwen2ForCausalLM

from orchard.protocols import GenerationOutput, SamplingParams
from orchard.rollout.engines.continuation import KeptPrefixes, window_mask
from orchard.rollout.engines.engine_weights import EngineWeights, FusedLayer
from orchard.rollout.engines.kernels import forward_tokens_kernel
from orchard.rollout.engines.sampling import find_stop, gumbel_noise, sample_next, top_next_tokens, validate_params
from orchard.rollout.tokenizer import Tokenizer

#: Compact the batch once this fraction of its rows has finished (a gather of the cache costs about as
#: much as one decode step, so compacting on every finish would not pay).
COMPACT_FRACTION = 0.25
#: Look for finished rows (eos, stop strings) every this many steps rather than after each one; a row
#: that finished in between runs on until the check, its extra tokens dropped. Saves the per-step host
#: sync on an accelerator; the finish step found is the same.
FINISH_CHECK_INTERVAL = 4
#: Gumbel noise for sampling is drawn for as many steps at once as fit in this many elements.
NOISE_CHUNK_ELEMENTS = 1 << 20


class TorchEngine(EngineWeights):
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
        fused_kernel: bool = True,
    ) -> None:
        """`eos_token_ids`: tokens that end a completion (default: the tokenizer's eos; `()` for none).
        `fused_kernel`: generate with a float32 model on the CPU through the compiled forward pass of
        `rollout/engines/kernels.py` when it builds (False: always plain torch; the same results to
        float32 rounding)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_token_ids = (tokenizer.eos_id,) if eos_token_ids is None else tuple(eos_token_ids)
        self.policy_version = policy_version
        self.has_loaded_weights = False
        #: Broadcast weights arrive through `load_weights` (a weight source), never by the engine itself.
        self.receives_broadcast = False
        self._read_geometry(model.config)
        self._parameters = dict(self.model.named_parameters(remove_duplicate=False))
        # Tied embeddings appear in `state_dict()` as `lm_head.weight` too; accept either name.
        self._aliases = {"lm_head.weight": "model.embed_tokens.weight"} if self._tied else {}
        if any(name.endswith(("o_proj.bias", "mlp.gate_proj.bias", "mlp.down_proj.bias")) for name in self._parameters):
            raise ValueError("TorchEngine cannot run this model: biases outside q/k/v are not implemented")
        #: Keys and values kept for the next call to continue from (`SamplingParams.resumable`).
        self._kept = KeptPrefixes()
        #: Prompt tokens run through the model by `generate` so far (kept prefixes not counted).
        self.prefilled_tokens = 0
        self.refresh()
        self._kernel = forward_tokens_kernel() if fused_kernel else None

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
        # HF's `x·cos + rotate_half(x)·sin` with rotate_half(x) = (-x2, x1) equals
        # `x·cos + swap_halves(x)·(-sin, sin)`, which needs no negation per step.
        inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
        freqs = torch.arange(self.max_positions, dtype=torch.float)[:, None] * inv_freq
        dtype = next(self.model.parameters()).dtype
        cos = torch.cat((freqs, freqs), dim=-1).cos()
        signed_sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
        # `[position, 2, head_dim]`: one gather per forward fetches both tables.
        self._rope_table = torch.stack((cos, signed_sin), dim=1).to(self.device, dtype)

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the fused weights from the model's parameters.

        They are copies: call this after changing the model's parameters other than through
        `load_weights` (which calls it).
        """
        get = self._parameters.__getitem__
        layers = []
        for index in range(self.num_layers):
            prefix = f"model.layers.{index}."
            attn = prefix + "self_attn."
            biases = [self._parameters.get(attn + f"{name}_proj.bias") for name in "qkv"]
            layers.append(
                FusedLayer(
                    input_norm=get(prefix + "input_layernorm.weight").detach(),
                    qkv_weight=torch.cat([get(attn + f"{name}_proj.weight") for name in "qkv"]),
                    qkv_bias=torch.cat(biases) if all(b is not None for b in biases) else None,
                    output_weight_t=get(attn + "o_proj.weight").detach().t(),
                    post_norm=get(prefix + "post_attention_layernorm.weight").detach(),
                    gate_up_weight=torch.cat(
                        [get(prefix + "mlp.gate_proj.weight"), get(prefix + "mlp.up_proj.weight")]
                    ),
                    down_weight_t=get(prefix + "mlp.down_proj.weight").detach().t(),
                )
            )
        self._layers = layers
        self._kept.clear()  # computed by the weights replaced
        self._embed = get("model.embed_tokens.weight").detach()
        self._final_norm = get("model.norm.weight").detach()
        self._lm_head = self._embed if self._tied else get("lm_head.weight").detach()

    # ----------------------------------------------------------------------------------------- forward

    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin at `positions`, shaped to broadcast over the heads of `_rope`."""
        table = self._rope_table[positions]  # [..., 2, head_dim]
        return table[..., 0:1, :], table[..., 1:2, :]

    def _rope(self, qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """q and k of `qkv` (`[..., (heads + 2 kv_heads) * head_dim]`) rotated, `[..., heads + kv_heads, head_dim]`."""
        heads = self.num_heads + self.num_kv_heads
        qk = qkv[..., : heads * self.head_dim].unflatten(-1, (heads, self.head_dim))
        half = self.head_dim // 2
        return torch.addcmul(qk * cos, torch.cat((qk[..., half:], qk[..., :half]), dim=-1), signed_sin)

    def _forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: torch.Tensor,
        start: int,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Hidden states after the final norm, `[batch, new, hidden]`; writes K/V into `cache` at `start`.

        `mask[b, 0, i, j]` says whether query `i` of row `b` may attend to cache slot `j < start + new`.
        `last_only` (prefill): the last layer computes attention and MLP for the last position only
        (`[batch, 1, hidden]`), the only one generation reads; every position's keys and values are
        still cached. Used for prefill and scoring; `_decode` is the one-token-per-row fast path.
        """
        batch, new = token_ids.shape
        end = start + new
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        rope = self._rope_tables(positions)
        x = F.embedding(token_ids, self._embed)
        for index, layer in enumerate(self._layers):
            h = F.rms_norm(x, (self.hidden_size,), layer.input_norm, self.eps)
            qkv = F.linear(h, layer.qkv_weight, layer.qkv_bias)
            rotated = self._rope(qkv, *rope)  # [batch, new, heads + kv_heads, head_dim]
            cache[index, 0, :, :, start:end] = rotated[:, :, heads:].transpose(1, 2)
            cache[index, 1, :, :, start:end] = (
                qkv[..., (heads + kv_heads) * head_dim :].unflatten(-1, (kv_heads, head_dim)).transpose(1, 2)
            )
            queries = rotated[:, :, :heads]
            if last_only and index == self.num_layers - 1:
                x, queries, mask = x[:, -1:], queries[:, -1:], mask[:, :, -1:]
            attn = F.scaled_dot_product_attention(
                queries.transpose(1, 2),
                cache[index, 0, :, :, :end],
                cache[index, 1, :, :, :end],
                attn_mask=mask,
                enable_gqa=kv_heads != heads,
            )
            x = x + attn.transpose(1, 2).reshape(batch, x.shape[1], heads * head_dim) @ layer.output_weight_t
            h = F.rms_norm(x, (self.hidden_size,), layer.post_norm, self.eps)
            gate, up = F.linear(h, layer.gate_up_weight).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ layer.down_weight_t
        return F.rms_norm(x, (self.hidden_size,), self._final_norm, self.eps)

    def _decode(
        self, token_ids: torch.Tensor, pad_counts: torch.Tensor, mask: torch.Tensor, cache: torch.Tensor, slot: int
    ) -> torch.Tensor:
        """`_forward` for one new token per row at cache `slot`: hidden states `[batch, hidden]`.

        Row `b` attends to slots `pad_counts[b]` to `slot` (its earlier slots are left padding), at
        position `slot - pad_counts[b]`. The compiled kernel does the whole step in one call when it is
        available for this model (`_kernel_weights`); otherwise `_decode_torch`.
        """
        weights = self._kernel_weights()
        if weights is None:
            return self._decode_torch(token_ids, slot - pad_counts, mask[..., : slot + 1].flatten(0, 1), cache, slot)
        batch = token_ids.shape[0]
        rows = torch.arange(batch, device=self.device)
        slots = torch.full((batch,), slot, device=self.device)
        return self._kernel(
            token_ids, rows, slots, pad_counts, _EVERY_TOKEN, self._embed, weights, self._rope_table, cache,
            self.num_heads, self.num_kv_heads, self.eps,
        )  # fmt: skip

    def _prefill(
        self, token_ids: torch.Tensor, valid: torch.Tensor, pad_counts: torch.Tensor, cache: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states `[batch, hidden]` of the last position of left-padded `token_ids` (`valid` marks
        the real tokens, `pad_counts` their number per row), every position's keys and values written
        into `cache` from slot 0. The compiled kernel skips the padding positions altogether."""
        weights = self._kernel_weights()
        if weights is None:
            positions = (torch.arange(token_ids.shape[1], device=self.device) - pad_counts[:, None]).clamp(min=0)
            return self._forward(token_ids, positions, _prefill_mask(valid), cache, 0, last_only=True)[:, -1]
        rows, slots = valid.nonzero(as_tuple=True)  # row-major: each row's tokens in increasing slots
        last_tokens = valid.sum(-1).cumsum(0) - 1
        return self._kernel(
            token_ids[valid], rows, slots, pad_counts, last_tokens, self._embed, weights, self._rope_table, cache,
            self.num_heads, self.num_kv_heads, self.eps,
        )  # fmt: skip

    def _kernel_weights(self) -> list[torch.Tensor] | None:
        """The weights in the compiled kernel's order (each `FusedLayer`'s fields, an empty tensor for a
        missing bias, then the final norm), rebuilt when the layers change; None when the kernel is
        not built or cannot run this model (float32 on the CPU only)."""
        if self._kernel is None or self.device.type != "cpu" or self._embed.dtype != torch.float32:
            return None
        if self._kernel_layers is not self._layers:
            no_bias = torch.empty(0, device=self.device)
            weights = [no_bias if tensor is None else tensor for layer in self._layers for tensor in layer]
            weights.append(self._final_norm)
            norms = [
                self._final_norm,
                self._embed,
                *(t for layer in self._layers for t in (layer.input_norm, layer.post_norm)),
            ]
            usable = all(t.dtype == torch.float32 for t in weights) and all(t.is_contiguous() for t in norms)
            self._kernel_weight_list = weights if usable else None
            self._kernel_layers = self._layers
        return self._kernel_weight_list

    def _decode_torch(
        self, token_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: torch.Tensor, slot: int
    ) -> torch.Tensor:
        """`_decode` in plain torch. `mask` is additive, `[batch * kv_heads, 1, slot + 1]` (0 to attend,
        -inf for padding). Attention is two batched matmuls over `[batch * kv_heads]` with the query
        heads of a group as rows, so grouped-query attention needs no repeated keys.
        """
        batch = token_ids.shape[0]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        group = heads // kv_heads
        scale = head_dim**-0.5
        rope = self._rope_tables(positions)
        # Views of every layer's cache, taken once per step: the new token's slot, and keys (transposed)
        # and values up to it with (row, kv head) flattened into the batch of the matmuls.
        new_keys, new_values = cache[:, 0, :, :, slot], cache[:, 1, :, :, slot]
        keys_t = cache[:, 0, :, :, : slot + 1].flatten(1, 2).transpose(2, 3)
        values = cache[:, 1, :, :, : slot + 1].flatten(1, 2)
        x = F.embedding(token_ids, self._embed)
        for index, layer in enumerate(self._layers):
            h = F.rms_norm(x, (self.hidden_size,), layer.input_norm, self.eps)
            qkv = F.linear(h, layer.qkv_weight, layer.qkv_bias)
            rotated = self._rope(qkv, *rope)  # [batch, heads + kv_heads, head_dim]
            new_keys[index].copy_(rotated[:, heads:])
            new_values[index].copy_(qkv[:, (heads + kv_heads) * head_dim :].view(batch, kv_heads, head_dim))
            queries = rotated[:, :heads].reshape(batch * kv_heads, group, head_dim)
            scores = torch.baddbmm(mask, queries, keys_t[index], alpha=scale)
            attn = torch.bmm(scores.softmax(-1), values[index])
            x = torch.addmm(x, attn.view(batch, heads * head_dim), layer.output_weight_t)
            h = F.rms_norm(x, (self.hidden_size,), layer.post_norm, self.eps)
            gate, up = F.linear(h, layer.gate_up_weight).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate).mul_(up), layer.down_weight_t)
        return F.rms_norm(x, (self.hidden_size,), self._final_norm, self.eps)

    def _new_cache(self, batch: int, slots: int) -> torch.Tensor:
        """Keys and values of every layer, `[layers, 2, batch, kv_heads, slots, head_dim]`, uninitialised:
        the prefill writes every prompt slot (the compiled kernel's prefill all but the padding slots,
        which its decode steps never read) and each decode step writes its slot before attending to it."""
        shape = (self.num_layers, 2, batch, self.num_kv_heads, slots, self.head_dim)
        return torch.empty(shape, dtype=self._embed.dtype, device=self.device)

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
        if length > self.max_positions:
            raise ValueError(
                f"sequences of {length} tokens exceed the model's max_position_embeddings={self.max_positions}"
            )
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self._forward(token_ids, positions, _prefill_mask(valid), self._new_cache(batch, length), 0)
        return F.linear(hidden, self._lm_head).float()

    @torch.inference_mode()
    def token_logprobs(
        self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], params: SamplingParams
    ) -> list[list[float]]:
        """Per `(prompt, completion)`, the logprob `generate` reports under `params` for each completion
        token: `log_softmax(logits / T)` of the full distribution (T = 1 when greedy; top-p only limits
        what is drawn), from one forward of `prompt + completion` per batch of sequences."""
        validate_params(params)
        temperature = params.temperature if params.temperature > 0 else 1.0
        answers: list[list[float]] = []
        for first in range(0, len(sequences), self.max_batch_size):
            chunk = [(list(map(int, p)), list(map(int, c))) for p, c in sequences[first : first + self.max_batch_size]]
            token_ids, pad_counts, valid = self._left_pad([prompt + completion for prompt, completion in chunk])
            logprobs = F.log_softmax(self.logits(token_ids, valid) / temperature, -1)
            width = token_ids.shape[1]
            for row, (_, completion) in enumerate(chunk):
                start = width - len(completion)  # left padding: the completion ends the row
                targets = token_ids[row, start:, None]
                answers.append(logprobs[row, start - 1 : width - 1].gather(-1, targets).squeeze(-1).tolist())
        return answers

    # -------------------------------------------------------------------------------------- generation

    def next_token_logprobs(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, top_k: int
    ) -> list[list[tuple[int, float]]]:
        """Per prompt, the `top_k` most probable next tokens under `params`' temperature and top-p, as
        `(token id, logprob)` most probable first, with the logprobs `generate` reports for a sampled
        token (`sampling.top_next_tokens`). One prefill per batch, no cache kept."""
        validate_params(params)
        prompt_lists = [list(map(int, prompt)) for prompt in prompts]
        self._check_prompts(prompt_lists, new_tokens=1)
        answers: list[list[tuple[int, float]]] = []
        for first in range(0, len(prompt_lists), self.max_batch_size):
            answers += self._next_token_batch(prompt_lists[first : first + self.max_batch_size], params, top_k)
        return answers

    @torch.inference_mode()
    def _next_token_batch(
        self, prompts: list[list[int]], params: SamplingParams, top_k: int
    ) -> list[list[tuple[int, float]]]:
        token_ids, pad_counts, valid = self._left_pad(prompts)
        hidden = self._prefill(token_ids, valid, pad_counts, self._new_cache(len(prompts), token_ids.shape[1]))
        logits = F.linear(hidden, self._lm_head).float()
        return top_next_tokens(logits, params.temperature, params.top_p, top_k)

    @torch.inference_mode()
    def prompt_states(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """The policy's final-norm hidden state at each prompt's last token, `[len(prompts), hidden]`
        float32: what it has read when it starts to answer (one prefill per batch, no cache kept).
        PCL's value model can read prompts through it (`curriculum.pcl.features: policy`)."""
        prompt_lists = [list(map(int, prompt)) for prompt in prompts]
        self._check_prompts(prompt_lists, new_tokens=1)
        states = []
        for first in range(0, len(prompt_lists), self.max_batch_size):
            batch = prompt_lists[first : first + self.max_batch_size]
            token_ids, pad_counts, valid = self._left_pad(batch)
            states.append(self._prefill(token_ids, valid, pad_counts, self._new_cache(len(batch), token_ids.shape[1])))
        return torch.cat(states).float().cpu()

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`prompts` left-padded to the longest: token ids `[batch, length]`, each row's padding count
        `[batch]`, and the mask of real tokens `[batch, length]`."""
        length = max(len(prompt) for prompt in prompts)
        pad_id = self.tokenizer.pad_id
        token_ids = torch.tensor([[pad_id] * (length - len(p)) + p for p in prompts], device=self.device)
        pad_counts = torch.tensor([length - len(p) for p in prompts], device=self.device)
        return token_ids, pad_counts, torch.arange(length, device=self.device) >= pad_counts[:, None]

    def _check_prompts(self, prompts: list[list[int]], *, new_tokens: int) -> None:
        """Raise `ValueError` naming the first prompt that is empty, holds a token outside the vocabulary,
        or is too long for the model with `new_tokens` more."""
        for index, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {index} is empty; a prompt needs at least one token (e.g. bos)")
            if min(prompt) < 0 or max(prompt) >= self.vocab_size:
                bad = next(t for t in prompt if not 0 <= t < self.vocab_size)
                raise ValueError(f"prompt {index} holds token id {bad}, outside the vocabulary [0, {self.vocab_size})")
            if len(prompt) + new_tokens > self.max_positions:
                raise ValueError(
                    f"prompt {index} has {len(prompt)} tokens; with max_new_tokens={new_tokens} it "
                    f"exceeds the model's max_position_embeddings={self.max_positions}: shorten the prompt "
                    "or lower max_new_tokens"
                )

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[GenerationOutput]:
        """One completion per prompt (prompts are token ids; the caller adds any bos token)."""
        validate_params(params)
        prompt_lists = [list(map(int, prompt)) for prompt in prompts]
        self._check_prompts(prompt_lists, new_tokens=params.max_new_tokens)
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()).item())
        generator = torch.Generator(device=self.device).manual_seed(seed)
        kept, self._kept = self._kept, KeptPrefixes()  # what the last call kept lives for this call only
        outputs: list[GenerationOutput] = []
        for first in range(0, len(prompt_lists), self.max_batch_size):
            chunk = prompt_lists[first : first + self.max_batch_size]
            outputs += self._generate_batch(chunk, params, generator, kept)
        return outputs

    @torch.inference_mode()
    def _generate_batch(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator, kept: KeptPrefixes
    ) -> list[GenerationOutput]:
        batch, steps = len(prompts), params.max_new_tokens
        prompt_length = max(len(prompt) for prompt in prompts)
        slots = prompt_length + steps
        device = self.device
        # A rollout repeats each prompt once per completion of its group: prefill each distinct prompt once,
        # then give every row a copy of its prompt's cache.
        distinct: dict[tuple[int, ...], int] = {}
        source = [distinct.setdefault(tuple(prompt), len(distinct)) for prompt in prompts]
        token_ids, pad_counts, prompt_valid = self._left_pad([list(prompt) for prompt in distinct])
        cache = self._new_cache(len(distinct), slots)
        prefixes = [kept.longest_prefix(prompt) for prompt in distinct] if len(kept) else []
        if prefixes and all(prefix is not None for prefix in prefixes):
            hidden = self._continue(token_ids, prompt_valid, pad_counts, cache, prefixes)  # type: ignore[arg-type]
        else:
            hidden = self._prefill(token_ids, prompt_valid, pad_counts, cache)
            self.prefilled_tokens += int(prompt_valid.sum())
        if len(distinct) < batch:
            rows_of = torch.tensor(source, device=device)
            cache, hidden = cache.index_select(2, rows_of), hidden[rows_of]
            pad_counts, prompt_valid = pad_counts[rows_of], prompt_valid[rows_of]
        # Additive decode mask, one row per (sequence, kv head) as `_decode` wants it.
        decode_mask = torch.zeros(batch, self.num_kv_heads, 1, slots, dtype=cache.dtype, device=device)
        decode_mask[:, :, 0, :prompt_length].masked_fill_(~prompt_valid[:, None], float("-inf"))

        # Tokens and logprobs of every row (original order) and step; a row's entries past its finish
        # step are dropped. `rows` holds the original index of each row still in the batch.
        token_table = torch.zeros(batch, steps, dtype=torch.long, device=device)
        logprob_table = torch.zeros(batch, steps, dtype=torch.float32, device=device)
        lengths = [steps] * batch
        finish: list[str | None] = [None] * batch
        texts: list[str | None] = [None] * batch
        eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=device)
        stop_tokens: list[list[int]] = [[] for _ in prompts]  # only filled with stop strings
        rows = list(range(batch))
        row_index: slice | torch.Tensor = slice(None)  # indexes the tables at `rows`
        finished_in_batch = 0
        checked = 0  # steps before this one have been checked for finished rows
        sampling = params.temperature > 0
        noise_steps = max(1, min(steps, NOISE_CHUNK_ELEMENTS // max(1, batch * self.vocab_size)))
        noise = None
        for step in range(steps):
            logits = F.linear(hidden, self._lm_head).float()
            step_noise = None
            if sampling:
                if step % noise_steps == 0:
                    shape = (min(noise_steps, steps - step), batch, self.vocab_size)
                    noise = gumbel_noise(shape, generator, device)
                step_noise = noise[step % noise_steps, row_index]  # each row's own noise, wherever it sits
            sampled, sampled_logprobs = sample_next(logits, params.temperature, params.top_p, generator, step_noise)
            token_table[row_index, step] = sampled
            logprob_table[row_index, step] = sampled_logprobs
            last = step == steps - 1
            if (eos.numel() or params.stop) and (last or step + 1 - checked >= FINISH_CHECK_INTERVAL):
                new = token_table[row_index, checked : step + 1]
                for row, finish_step, text in self._finished_rows(new, rows, checked, eos, params, stop_tokens, finish):
                    finish[row], lengths[row], texts[row] = "stop", finish_step + 1, text
                    finished_in_batch += 1
                    if params.resumable and text is not None:  # ended on a stop string: may be continued
                        position = rows.index(row)
                        # every token but the last has its keys and values in the cache by now
                        sequence = prompts[row] + token_table[row, :finish_step].tolist()
                        first_slot = int(pad_counts[position])
                        end = first_slot + len(sequence)
                        self._kept.keep(sequence, cache[:, :, position, :, first_slot:end].clone())
                checked = step + 1
            if last or finished_in_batch == len(rows):
                break
            if finished_in_batch >= max(1, COMPACT_FRACTION * len(rows)):
                keep_list = [i for i, row in enumerate(rows) if finish[row] is None]
                keep = torch.tensor(keep_list, device=device)
                rows = [rows[i] for i in keep_list]
                row_index = torch.tensor(rows, device=device)
                finished_in_batch = 0
                cache = cache.index_select(2, keep)
                decode_mask, pad_counts, sampled = decode_mask[keep], pad_counts[keep], sampled[keep]
            slot = prompt_length + step
            hidden = self._decode(sampled, pad_counts, decode_mask, cache, slot)
        all_tokens, all_logprobs = token_table.tolist(), logprob_table.tolist()
        outputs = []
        for row in range(batch):
            token_ids = all_tokens[row][: lengths[row]]
            outputs.append(
                GenerationOutput(
                    token_ids=token_ids,
                    logprobs=all_logprobs[row][: lengths[row]],
                    finish_reason=finish[row] or "length",
                    text=texts[row] if texts[row] is not None else self.tokenizer.decode(token_ids),
                )
            )
        return outputs

    def _continue(
        self,
        token_ids: torch.Tensor,
        valid: torch.Tensor,
        pad_counts: torch.Tensor,
        cache: torch.Tensor,
        prefixes: list[torch.Tensor],
    ) -> torch.Tensor:
        """`_prefill` for prompts that each extend a kept sequence: its keys and values are copied into
        the row's slots, and only the window of the longest new part runs through the model (a row
        whose new part is shorter has some of its kept tokens computed again, identically)."""
        length = token_ids.shape[1]
        window = 1
        for row, prefix in enumerate(prefixes):
            first = int(pad_counts[row])
            kept = prefix.shape[3]
            # the window attends over every slot before it, padding masked: masked, but never garbage,
            # since a masked NaN still poisons the weighted sum (0 · NaN)
            cache[:, :, row, :, :first] = 0
            cache[:, :, row, :, first : first + kept] = prefix
            window = max(window, length - first - kept)
        start = length - window
        positions = (torch.arange(start, length, device=self.device) - pad_counts[:, None]).clamp(min=0)
        hidden = self._forward(token_ids[:, start:], positions, window_mask(valid, start), cache, start, last_only=True)
        self.prefilled_tokens += int(valid[:, start:].sum())
        return hidden[:, -1]

    def _finished_rows(
        self,
        new: torch.Tensor,
        rows: list[int],
        first_step: int,
        eos: torch.Tensor,
        params: SamplingParams,
        stop_tokens: list[list[int]],
        finish: list[str | None],
    ) -> list[tuple[int, int, str | None]]:
        """Rows of the batch that finished among the tokens `new` (`[rows in the batch, steps]`, from
        step `first_step` on) and had not finished before: `(row, step, text before the stop string)`,
        with the step of the eos token (text None) or of the token that completed a stop string."""
        if not params.stop:
            hits = torch.isin(new, eos)
            candidates = hits.any(-1).nonzero().flatten().tolist()
            if not candidates:
                return []
            first_hits = hits.int().argmax(-1).tolist()  # argmax returns the first maximum
            return [(rows[i], first_step + first_hits[i], None) for i in candidates if finish[rows[i]] is None]
        eos_ids = set(self.eos_token_ids)
        done = []
        for i, tokens in enumerate(new.tolist()):
            row = rows[i]
            if finish[row] is not None:
                continue
            for offset, token in enumerate(tokens):
                stop_tokens[row].append(token)
                if token in eos_ids:
                    done.append((row, first_step + offset, None))
                    break
                cut = find_stop(self.tokenizer, stop_tokens[row], params.stop)
                if cut is not None:
                    done.append((row, first_step + offset, cut))
                    break
        return done


#: `forward_tokens`'s `outputs` for the hidden states of every token.
_EVERY_TOKEN = torch.empty(0, dtype=torch.long)


def _prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """`[batch, 1, length, length]`: causal and not padding; every query also sees itself, so a padding
    query's softmax is never over an empty set (which would put NaN into the cache)."""
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]
