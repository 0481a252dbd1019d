"""Tokenizers behind one small interface: a character tokenizer for the tiny demo model, and a wrapper
around a Hugging Face tokenizer for real checkpoints.

Both expose `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `encode(text) -> list[int]` (no special tokens
added) and `decode(ids) -> str` (special tokens skipped; an id outside the vocabulary decodes to U+FFFD
instead of raising), plus `save_pretrained` / `from_pretrained`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from orchard.config import ModelConfig

#: Decoded in place of an id the vocabulary does not hold, so that a completion made of nonsense ids is
#: scored as wrong by its verifier instead of crashing the worker.
REPLACEMENT_CHAR = "\ufffd"

CHAR_TOKENIZER_FILE = "orchard_char_tokenizer.json"
CHAR_TOKENIZER_FORMAT = 1


@runtime_checkable
class Tokenizer(Protocol):
    """What the engine, worker and learner need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save_pretrained(self, directory: str | Path) -> None: ...


class CharTokenizer:
    """One token per character: `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3, then '\\n' and printable ASCII.

    Characters outside the vocabulary encode to `<unk>`. `<pad>`, `<bos>` and `<eos>` decode to nothing;
    `<unk>` and ids outside the vocabulary decode to U+FFFD, so a lost character stays visible.
    """

    SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
    CHARACTERS = "\n" + "".join(chr(code) for code in range(32, 127))

    def __init__(self) -> None:
        self._id_of = {char: index + len(self.SPECIAL_TOKENS) for index, char in enumerate(self.CHARACTERS)}
        # Index = token id; special tokens decode to "" so `decode` skips them with one lookup.
        self._text_of = ["", "", "", REPLACEMENT_CHAR, *self.CHARACTERS]

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIAL_TOKENS) + len(self.CHARACTERS)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"CharTokenizer.encode needs a str, got {type(text).__name__}")
        unk = self.unk_id
        return [self._id_of.get(char, unk) for char in text]

    def decode(self, ids: Sequence[int]) -> str:
        text_of, size = self._text_of, len(self._text_of)
        return "".join(text_of[i] if 0 <= i < size else REPLACEMENT_CHAR for i in map(int, ids))

    def to_hf(self) -> Any:
        """The same tokenizer as a `transformers.PreTrainedTokenizerFast`, for tools that read only Hugging
        Face tokenizers (vLLM, `AutoTokenizer`): a word-level model over single characters, decoded by
        concatenation. It encodes every string to the same ids and decodes them to the same text:
        `<pad>`, `<bos>` and `<eos>` are special tokens (skipped with `skip_special_tokens`), and the
        unknown token is the replacement character itself, an ordinary token."""
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as FastTokenizer
        from transformers import PreTrainedTokenizerFast

        vocabulary = {token: index for index, token in enumerate(self.SPECIAL_TOKENS[: self.unk_id])}
        vocabulary[REPLACEMENT_CHAR] = self.unk_id
        vocabulary.update(self._id_of)
        fast = FastTokenizer(models.WordLevel(vocab=vocabulary, unk_token=REPLACEMENT_CHAR))
        fast.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        fast.decoder = decoders.Fuse()
        fast.add_special_tokens(["<pad>", "<bos>", "<eos>"])
        return PreTrainedTokenizerFast(tokenizer_object=fast, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `orchard_char_tokenizer.json` (what `from_pretrained` reads) and the Hugging Face form
        (`to_hf`), so that a checkpoint of the tiny model loads in vLLM and `AutoTokenizer` too."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.to_hf().save_pretrained(str(path))
        payload = {
            "format": CHAR_TOKENIZER_FORMAT,
            "kind": "char",
            "special_tokens": list(self.SPECIAL_TOKENS),
            "characters": self.CHARACTERS,
        }
        (path / CHAR_TOKENIZER_FILE).write_text(json.dumps(payload, indent=1))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> CharTokenizer:
        file = Path(directory) / CHAR_TOKENIZER_FILE
        try:
            payload = json.loads(file.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{file} not found: save a CharTokenizer there with save_pretrained") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{file} is not valid JSON: {error}") from None
        tokenizer = cls()
        expected = {"special_tokens": list(cls.SPECIAL_TOKENS), "characters": cls.CHARACTERS}
        for key, value in expected.items():
            if payload.get(key) != value:
                raise ValueError(
                    f"{file}: field {key!r} differs from this CharTokenizer's vocabulary; "
                    "the file was written by an incompatible version"
                )
        return tokenizer


class HFTokenizer:
    """A Hugging Face tokenizer with the `CharTokenizer` interface (for `model.kind: hf`)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token; set eos_token in its config")
        # Many causal LMs ship without a pad token; eos is the usual stand-in and is never attended to.
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._special = set(tokenizer.all_special_ids)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> HFTokenizer:
        from transformers import AutoTokenizer

        path = Path(directory)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist (only local paths are supported)")
        return cls(AutoTokenizer.from_pretrained(str(path), local_files_only=True))

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    @property
    def pad_id(self) -> int:
        return int(self._pad_id)

    @property
    def bos_id(self) -> int | None:
        return self._tokenizer.bos_token_id

    @property
    def eos_id(self) -> int:
        return int(self._tokenizer.eos_token_id)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"HFTokenizer.encode needs a str, got {type(text).__name__}")
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        size = self.vocab_size
        pieces: list[str] = []
        run: list[int] = []
        for token in map(int, ids):
            if 0 <= token < size:
                if token not in self._special:
                    run.append(token)
                continue
            # An id outside the vocabulary would make the HF tokenizer raise or return garbage.
            pieces.append(self._tokenizer.decode(run))
            pieces.append(REPLACEMENT_CHAR)
            run = []
        pieces.append(self._tokenizer.decode(run))
        return "".join(pieces)

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own chat template (Jinja), if its checkpoint carries one."""
        return getattr(self._tokenizer, "chat_template", None) or None

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of special and added tokens (a chat template's control tokens among them)."""
        return frozenset(self._special) | frozenset(self._tokenizer.get_added_vocab().values())

    def apply_chat_template(self, messages: Sequence[Any], template: str, *, add_generation_prompt: bool = True) -> str:
        """`messages` (objects with `role` and `content`) rendered by `template` as text, ending with the
        assistant's turn opened when `add_generation_prompt`."""
        conversation = [{"role": message.role, "content": message.content} for message in messages]
        return self._tokenizer.apply_chat_template(
            conversation, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def save_pretrained(self, directory: str | Path) -> None:
        self._tokenizer.save_pretrained(str(directory))


def load_tokenizer(config: ModelConfig) -> CharTokenizer | HFTokenizer:
    """The tokenizer of `config`: the character tokenizer for kind 'tiny', the checkpoint's for 'hf'."""
    if config.kind == "tiny":
        return CharTokenizer()
    if config.kind == "hf":
        assert config.path is not None  # ModelConfig validates this
        # A checkpoint of a tiny model (saved with `save_model`) carries the character tokenizer.
        return tokenizer_from_directory(config.path)
    raise ValueError(f"model.kind {config.kind!r} has no tokenizer; use 'tiny' or 'hf'")


def tokenizer_from_directory(directory: str | Path) -> CharTokenizer | HFTokenizer:
    """Whichever tokenizer `save_pretrained` wrote into `directory` (e.g. a checkpoint)."""
    if (Path(directory) / CHAR_TOKENIZER_FILE).exists():
        return CharTokenizer.from_pretrained(directory)
    return HFTokenizer.from_pretrained(directory)
