"""A small instruct-style Hugging Face checkpoint built here, nothing downloaded: a byte-level BPE
tokenizer trained with `tokenizers` on the texts it will see, a ChatML chat template (Qwen's format:
`<|im_start|>role\\n...<|im_end|>`), and a randomly initialised Qwen2 sized by `TinyModelConfig`.

It stands in for the instruct models people bring (same files, same Auto classes, same template
machinery) where none can be downloaded: the tests, and the CPU recipe `configs/recipes/
reasoning-gym-cpu.yaml`, whose warm start teaches it the answer format. Build one with

    python -m orchard.rollout.instruct_model DIRECTORY [--config CONFIG.yaml] [--vocab-size 1024]

which trains the tokenizer on the prompts and answers of CONFIG's data sources (default: the demo's).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

from orchard.config import TinyModelConfig

#: ChatML as Qwen2.5's instruct checkpoints write it (without their default system message).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
END_OF_TEXT, TURN_START, TURN_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


def train_chat_tokenizer(texts: Iterable[str], *, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (every byte stays encodable), with the ChatML control
    tokens as special tokens, `<|endoftext|>` as end-of-sequence and padding, and the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT, TURN_START, TURN_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[TURN_START, TURN_END],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_instruct_model(
    tokenizer: PreTrainedTokenizerFast, tiny: TinyModelConfig, *, seed: int = 0
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 over `tokenizer`'s vocabulary (tied embeddings, as the tiny model)."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": tiny.rope_theta},
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config).eval()


def write_reward_model(
    directory: str | Path, texts: Iterable[str], tiny: TinyModelConfig, *, vocab_size: int = 1024, seed: int = 0
) -> Path:
    """A randomly initialised Qwen2 sequence classifier with one label (a reward model's shape) and its
    ChatML tokenizer trained on `texts`, saved to `directory`: what `reward_models.<name>.path` loads."""
    tokenizer = train_chat_tokenizer(texts, vocab_size=vocab_size)
    config = build_instruct_model(tokenizer, tiny, seed=seed).config
    config.num_labels, config.tie_word_embeddings = 1, False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForSequenceClassification(config).eval()
    path = Path(directory)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def write_instruct_model(
    directory: str | Path, texts: Iterable[str], tiny: TinyModelConfig, *, vocab_size: int = 1024, seed: int = 0
) -> Path:
    """Train the tokenizer on `texts`, build the model, save both (with the template) to `directory`."""
    tokenizer = train_chat_tokenizer(texts, vocab_size=vocab_size)
    model = build_instruct_model(tokenizer, tiny, seed=seed)
    path = Path(directory)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def corpus_of(config_path: str | None, *, prompts: int = 4000) -> list[str]:
    """Prompt texts and reference solutions (else answers) of a run config's data sources (the demo's when
    None), rendered with its prompt template and system prompt: what the tokenizer will see most."""
    from orchard.config import DEMO_CONFIG, load_config
    from orchard.verifiers.sources import PromptPool

    config = load_config(config_path or DEMO_CONFIG, ["data.held_out_size=0"])
    pool = PromptPool.from_config(config.data)
    texts = []
    for prompt in pool.sample_train(prompts, random.Random(config.data.seed)):
        texts.append(config.data.prompt_template.format(prompt=prompt.text))
        texts.append(prompt.solution or prompt.answer)
    if config.data.system_prompt:
        texts.append(config.data.system_prompt)
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--config", help="run config whose data trains the tokenizer (default: the demo)")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--max-positions", type=int, default=1024)
    args = parser.parse_args()
    tiny = TinyModelConfig(
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=4 * args.hidden_size,
        max_position_embeddings=args.max_positions,
    )
    path = write_instruct_model(args.directory, corpus_of(args.config), tiny, vocab_size=args.vocab_size)
    print(f"wrote {path}: Qwen2 {tiny.hidden_size} wide, {tiny.num_layers} layers, ChatML template")


if __name__ == "__main__":
    main()
