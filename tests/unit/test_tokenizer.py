import json
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchard.config import ModelConfig
from orchard.rollout.tokenizer import (
    CHAR_TOKENIZER_FILE,
    REPLACEMENT_CHAR,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_from_directory,
)

VOCABULARY_TEXT = "\n" + "".join(chr(code) for code in range(32, 127))


@pytest.fixture(scope="module")
def tokenizer() -> CharTokenizer:
    return CharTokenizer()


def test_special_ids_and_vocabulary_size(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == 4 + len(VOCABULARY_TEXT) == 100
    assert isinstance(tokenizer, Tokenizer)


def test_round_trip_of_the_whole_vocabulary(tokenizer):
    ids = tokenizer.encode(VOCABULARY_TEXT)
    assert ids == list(range(4, tokenizer.vocab_size))  # one token per character, no special tokens added
    assert tokenizer.decode(ids) == VOCABULARY_TEXT


@given(st.text(alphabet=string.printable.replace("\r", "").replace("\t", "").replace("\x0b", "").replace("\x0c", "")))
def test_round_trip_of_printable_ascii_and_newlines(text):
    tokenizer = CharTokenizer()
    assert tokenizer.decode(tokenizer.encode(text)) == text


@given(st.text())
def test_any_text_encodes_to_in_vocabulary_ids_one_per_character(text):
    tokenizer = CharTokenizer()
    ids = tokenizer.encode(text)
    assert len(ids) == len(text)
    assert all(0 <= token < tokenizer.vocab_size for token in ids)


def test_unknown_characters_encode_to_unk_and_decode_to_replacement_char(tokenizer):
    ids = tokenizer.encode("a\té€🍎b")
    assert ids[1:-1] == [tokenizer.unk_id] * 4
    assert tokenizer.decode(ids) == "a" + REPLACEMENT_CHAR * 4 + "b"


def test_special_tokens_are_skipped_on_decode(tokenizer):
    a, b = tokenizer.encode("ab")
    ids = [tokenizer.bos_id, a, tokenizer.pad_id, b, tokenizer.eos_id, tokenizer.pad_id]
    assert tokenizer.decode(ids) == "ab"
    assert tokenizer.decode([tokenizer.eos_id]) == ""
    assert tokenizer.decode([]) == ""


@pytest.mark.parametrize("bad_id", [100, 999, 2**40, -1, -100])
def test_ids_outside_the_vocabulary_decode_to_replacement_char_instead_of_raising(tokenizer, bad_id):
    # A completion holding nonsense ids is scored as wrong by its verifier; it must not crash the worker.
    assert (
        tokenizer.decode([tokenizer.encode("x")[0], bad_id, tokenizer.encode("y")[0]]) == "x" + REPLACEMENT_CHAR + "y"
    )


def test_decode_accepts_any_integer_sequence(tokenizer):
    torch = pytest.importorskip("torch")
    numpy = pytest.importorskip("numpy")
    ids = tokenizer.encode("hi")
    assert tokenizer.decode(torch.tensor(ids)) == "hi"
    assert tokenizer.decode(numpy.array(ids)) == "hi"
    assert tokenizer.decode(tuple(ids)) == "hi"


def test_encode_rejects_non_strings(tokenizer):
    with pytest.raises(TypeError, match="needs a str"):
        tokenizer.encode(b"bytes")


def test_save_pretrained_from_pretrained_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "checkpoint")
    loaded = CharTokenizer.from_pretrained(tmp_path / "checkpoint")
    text = "12+30=42\nok"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert isinstance(tokenizer_from_directory(tmp_path / "checkpoint"), CharTokenizer)


def test_from_pretrained_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="save a CharTokenizer there"):
        CharTokenizer.from_pretrained(tmp_path)
    (tmp_path / CHAR_TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CharTokenizer.from_pretrained(tmp_path)
    CharTokenizer().save_pretrained(tmp_path)
    payload = json.loads((tmp_path / CHAR_TOKENIZER_FILE).read_text())
    payload["characters"] = payload["characters"][::-1]
    (tmp_path / CHAR_TOKENIZER_FILE).write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="'characters' differs"):
        CharTokenizer.from_pretrained(tmp_path)


def test_load_tokenizer_for_kind_tiny_is_the_char_tokenizer():
    assert isinstance(load_tokenizer(ModelConfig(kind="tiny")), CharTokenizer)


def test_load_tokenizer_for_kind_hf_reads_the_checkpoint_directory(tmp_path):
    CharTokenizer().save_pretrained(tmp_path)
    assert isinstance(load_tokenizer(ModelConfig(kind="hf", path=str(tmp_path))), CharTokenizer)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(ModelConfig(kind="hf", path=str(tmp_path / "missing")))


# --------------------------------------------------------------------------------------- HFTokenizer


@pytest.fixture(scope="module")
def hf_tokenizer() -> HFTokenizer:
    """A word-level Hugging Face tokenizer built offline: 4 special tokens, then 4 words."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "hello": 4, "world": 5, "1": 6, "2": 7}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    return HFTokenizer(fast)


def test_hf_tokenizer_interface(hf_tokenizer):
    assert (hf_tokenizer.vocab_size, hf_tokenizer.pad_id, hf_tokenizer.bos_id, hf_tokenizer.eos_id) == (8, 0, 1, 2)
    assert hf_tokenizer.encode("hello world") == [4, 5]  # no special tokens added
    assert hf_tokenizer.decode([1, 4, 5, 2, 0]) == "hello world"  # special tokens skipped


@pytest.mark.parametrize("bad_id", [8, 999, -1])
def test_hf_tokenizer_decodes_ids_outside_the_vocabulary_to_replacement_char(hf_tokenizer, bad_id):
    text = hf_tokenizer.decode([4, bad_id, 5])
    assert REPLACEMENT_CHAR in text and "hello" in text and "world" in text


def test_hf_tokenizer_round_trip_through_a_directory(hf_tokenizer, tmp_path):
    hf_tokenizer.save_pretrained(tmp_path)
    loaded = tokenizer_from_directory(tmp_path)
    assert isinstance(loaded, HFTokenizer)
    assert loaded.encode("hello 1 2") == hf_tokenizer.encode("hello 1 2") == [4, 6, 7]
    assert loaded.eos_id == hf_tokenizer.eos_id


@given(st.text())
def test_the_hugging_face_form_encodes_every_text_to_the_same_ids(text):
    tokenizer = CharTokenizer()
    assert _hf_char_tokenizer().encode(text, add_special_tokens=False) == tokenizer.encode(text)


@given(st.text())
def test_the_hugging_face_form_decodes_like_the_character_tokenizer(text):
    tokenizer = CharTokenizer()
    ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id, tokenizer.pad_id]
    assert _hf_char_tokenizer().decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)


def test_a_saved_character_tokenizer_loads_with_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    CharTokenizer().save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded.decode([CharTokenizer().unk_id]) == REPLACEMENT_CHAR
    assert len(loaded) == CharTokenizer().vocab_size
    assert loaded.encode("12+3=\n", add_special_tokens=False) == CharTokenizer().encode("12+3=\n")
    assert isinstance(tokenizer_from_directory(tmp_path), CharTokenizer)  # Orchard still reads its own file


_HF_CHAR_TOKENIZER = []


def _hf_char_tokenizer():
    if not _HF_CHAR_TOKENIZER:
        _HF_CHAR_TOKENIZER.append(CharTokenizer().to_hf())
    return _HF_CHAR_TOKENIZER[0]
