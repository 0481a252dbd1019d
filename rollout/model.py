"""The policy model: a tiny Qwen2 built from `ModelConfig.tiny`, or a local Hugging Face checkpoint.

Both are `transformers.Qwen2ForCausalLM` (kind 'hf' may be any causal LM the learner can train, but the
torch engine reads Qwen2's parameter layout), saved in Hugging Face format so any tool can load them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from orchard.config import ModelConfig, TinyModelConfig
from orchard.rollout.tokenizer import CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_qwen2_config(
    tiny: TinyModelConfig, tokenizer: Tokenizer, *, attn_implementation: Literal["eager", "sdpa"] = "sdpa"
) -> Qwen2Config:
    """The Hugging Face config of the tiny model: Qwen2 with tied embeddings and `tokenizer`'s vocabulary."""
    config = Qwen2Config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": tiny.rope_theta},
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )
    config._attn_implementation = attn_implementation
    return config


def build_model(
    config: ModelConfig,
    tokenizer: Tokenizer,
    *,
    seed: int = 0,
    attn_implementation: Literal["eager", "sdpa"] = "sdpa",
) -> Qwen2ForCausalLM:
    """The policy of `config` in eval mode, in `config.dtype`.

    kind 'tiny': a randomly initialised Qwen2 (initialised under `torch.manual_seed(seed)`, so every
    process that builds it gets the same weights; the global RNG state is restored afterwards).
    kind 'hf': `AutoModelForCausalLM.from_pretrained(config.path)`, local files only.
    """
    dtype = DTYPES[config.dtype]
    if config.kind == "tiny":
        hf_config = tiny_qwen2_config(config.tiny, tokenizer, attn_implementation=attn_implementation)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(hf_config)
        model = model.to(dtype)
    elif config.kind == "hf":
        assert config.path is not None  # ModelConfig validates this
        path = Path(config.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.path {path} holds no config.json; it must be a local Hugging Face checkpoint directory"
            )
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, local_files_only=True, attn_implementation=attn_implementation
        )
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"model at {path} has vocab_size {model.config.vocab_size} but its tokenizer has "
                f"{tokenizer.vocab_size} tokens; they must come from the same checkpoint"
            )
    else:
        raise ValueError(f"model.kind {config.kind!r} is not buildable; use 'tiny' or 'hf'")
    model.eval()
    return model


def hidden_size(config: ModelConfig) -> int:
    """The width of the model's hidden states, without building it (a checkpoint's config.json)."""
    if config.kind == "tiny":
        return config.tiny.hidden_size
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(config.path).hidden_size)


def load_model_and_tokenizer(
    config: ModelConfig, *, seed: int = 0
) -> tuple[Qwen2ForCausalLM, CharTokenizer | HFTokenizer]:
    """`load_tokenizer(config)` and the model built for it."""
    tokenizer = load_tokenizer(config)
    return build_model(config, tokenizer, seed=seed), tokenizer


def save_model(model: PreTrainedModel, tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Write `model` and `tokenizer` into `directory` in Hugging Face format (safetensors + config).

    The result loads back with `ModelConfig(kind="hf", path=directory)`.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(path)
    return path
