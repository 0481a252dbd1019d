import pytest
import torch
from transformers import Qwen2ForCausalLM

from orchard.config import ModelConfig, TinyModelConfig
from orchard.rollout.model import build_model, load_model_and_tokenizer, save_model, tiny_qwen2_config
from orchard.rollout.tokenizer import CharTokenizer

SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tokenizer() -> CharTokenizer:
    return CharTokenizer()


def small_config(**fields) -> ModelConfig:
    return ModelConfig(tiny=SMALL, **fields)


def assert_same_weights(left: torch.nn.Module, right: torch.nn.Module) -> None:
    left_state, right_state = left.state_dict(), right.state_dict()
    assert left_state.keys() == right_state.keys()
    for name, tensor in left_state.items():
        assert torch.equal(tensor, right_state[name]), name


def test_build_model_tiny_is_a_tied_qwen2_with_the_tokenizers_vocabulary(tokenizer):
    model = build_model(small_config(), tokenizer)
    assert isinstance(model, Qwen2ForCausalLM)
    assert not model.training
    config = model.config
    assert config.vocab_size == tokenizer.vocab_size
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 4)
    assert (config.num_key_value_heads, config.intermediate_size) == (2, 64)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.shape == (tokenizer.vocab_size, 32)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_build_model_demo_defaults_run_a_forward_pass(tokenizer):
    model = build_model(ModelConfig(), tokenizer)
    with torch.no_grad():
        logits = model(torch.tensor([[tokenizer.bos_id, *tokenizer.encode("1+2=")]])).logits
    assert logits.shape == (1, 5, tokenizer.vocab_size)
    assert torch.isfinite(logits).all()


def test_build_model_honours_dtype(tokenizer):
    model = build_model(small_config(dtype="bfloat16"), tokenizer)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_initialisation_is_deterministic_under_a_seed_and_leaves_the_global_rng_alone(tokenizer):
    torch.manual_seed(123)
    expected_next_draw = torch.rand(3)
    torch.manual_seed(123)
    first = build_model(small_config(), tokenizer, seed=7)
    assert torch.equal(torch.rand(3), expected_next_draw)  # the global RNG state was restored
    assert_same_weights(first, build_model(small_config(), tokenizer, seed=7))
    other = build_model(small_config(), tokenizer, seed=8)
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_save_model_then_load_as_kind_hf_round_trips_weights_and_tokenizer(tokenizer, tmp_path):
    model = build_model(small_config(), tokenizer, seed=3)
    with torch.no_grad():  # weights unlike any fresh initialisation, as after training
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    path = save_model(model, tokenizer, tmp_path / "checkpoint")
    assert (path / "config.json").is_file()

    loaded, loaded_tokenizer = load_model_and_tokenizer(ModelConfig(kind="hf", path=str(path)))
    assert isinstance(loaded, Qwen2ForCausalLM)
    assert isinstance(loaded_tokenizer, CharTokenizer)
    assert not loaded.training
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    assert_same_weights(model, loaded)
    ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode("7*6=")]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_kind_hf_loads_in_the_configured_dtype(tokenizer, tmp_path):
    save_model(build_model(small_config(), tokenizer), tokenizer, tmp_path)
    model, _ = load_model_and_tokenizer(ModelConfig(kind="hf", path=str(tmp_path), dtype="bfloat16"))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_kind_hf_without_a_checkpoint_says_what_is_missing(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_model(ModelConfig(kind="hf", path=str(tmp_path)), tokenizer)


def test_kind_hf_with_a_smaller_vocabulary_than_its_tokenizer_is_refused(tokenizer, tmp_path):
    class SmallVocabulary:
        vocab_size, pad_id, bos_id, eos_id = 50, 0, 1, 2

    model = Qwen2ForCausalLM(tiny_qwen2_config(SMALL, SmallVocabulary()))
    save_model(model, tokenizer, tmp_path)
    with pytest.raises(ValueError, match="vocab_size 50 but its tokenizer has 100 tokens"):
        load_model_and_tokenizer(ModelConfig(kind="hf", path=str(tmp_path)))
