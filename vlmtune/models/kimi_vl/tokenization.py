"""Kimi-VL's tokenizer without remote code.

The official checkpoints ship a tiktoken vocabulary (``tiktoken.model``: ``base64(token bytes) rank`` per line,
163,584 ranks) and ``tokenization_moonshot.py``. :class:`KimiVLTokenizer` reads that file with transformers' own
``TikTokenConverter`` (byte-level BPE whose merges come from the ranks, ``ignore_merges`` as tiktoken does), given
Kimi's pre-tokenizer split (:data:`PAT_STR`: runs of Han characters apart from other letters) and the 256 special
tokens that follow the ranks (names from ``tokenizer_config.json``'s ``added_tokens_decoder``, the rest
``<|reserved_token_{id}|>``). It needs neither remote code nor the ``tiktoken`` package, and saves the official
files again (``tiktoken.model``, ``tokenizer_config.json`` with the special tokens, ``tokenizer_class``
``TikTokenTokenizer``) besides a ``tokenizer.json`` for fast reloading.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import ClassVar

from transformers import TokenizersBackend
from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

VOCAB_FILE = "tiktoken.model"
NUM_RESERVED_SPECIAL_TOKENS = 256
OFFICIAL_TOKENIZER_CLASS = "TikTokenTokenizer"  # the remote code's class name, kept in saved tokenizer_config.json
# Kimi's tiktoken split pattern (Moonlight / Kimi-VL / Kimi-K2 tokenizers): Han runs, letters (with optional
# contractions) excluding Han, 1-3 digit numbers, punctuation runs, newlines, spaces.
PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """A tiktoken vocabulary file: one ``base64(token) rank`` pair per line."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{number} is not a tiktoken vocabulary line ('<base64 token> <rank>'): "
                             f"{line[:80]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the ranks are not 0..{len(ranks) - 1} each once")
    return ranks


def write_tiktoken_ranks(path: str | os.PathLike, ranks: dict[bytes, int]) -> None:
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ordered]
    Path(path).write_text("".join(lines), encoding="ascii")


class _RanksFromFile(TikTokenConverter):
    """transformers' TikTokenConverter, reading the vocabulary file itself (no ``tiktoken`` package needed)."""

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        return read_tiktoken_ranks(tiktoken_url)


def special_token_names(num_base_tokens: int, named: dict[int, str]) -> list[str]:
    """The 256 special tokens after the ranks, in id order: their names where given, else reserved names."""
    ids = range(num_base_tokens, num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS)
    outside = sorted(set(named) - set(ids))
    if outside:
        raise ValueError(f"special token ids {outside[:5]} lie outside {ids.start}..{ids.stop - 1}, the 256 ids that "
                         f"follow the {num_base_tokens} ranks of the tiktoken vocabulary")
    return [named.get(i, f"<|reserved_token_{i}|>") for i in ids]


class KimiVLTokenizer(TokenizersBackend):
    vocab_files_names: ClassVar[dict[str, str]] = {"vocab_file": VOCAB_FILE, "tokenizer_file": "tokenizer.json"}
    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]

    @classmethod
    def _convert_from_tiktoken(cls, vocab_file: str, local_kwargs: dict) -> dict:
        """``tiktoken.model`` (an official checkpoint, no tokenizer.json) -> the backend tokenizer."""
        named = {int(i): t["content"] if isinstance(t, dict) else str(t)
                 for i, t in (local_kwargs.get("added_tokens_decoder") or {}).items()}
        num_base = len(read_tiktoken_ranks(vocab_file))
        specials = special_token_names(num_base, named)
        converter = _RanksFromFile(vocab_file=vocab_file, pattern=PAT_STR, extra_special_tokens=specials)
        local_kwargs["tokenizer_object"] = converter.converted()
        return local_kwargs

    def tiktoken_ranks(self) -> dict[bytes, int]:
        """The byte-level BPE vocabulary (special tokens excluded) as tiktoken ranks."""
        byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        vocab = self.backend_tokenizer.get_vocab(with_added_tokens=False)
        return {bytes(byte_of[c] for c in token): i for token, i in vocab.items()}

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        path = Path(save_directory) / ((filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        write_tiktoken_ranks(path, self.tiktoken_ranks())
        return (str(path),)

    def save_pretrained(self, save_directory, *args, **kwargs) -> tuple[str, ...]:
        """transformers' files (tokenizer.json, tokenizer_config.json), then the official layout on top:
        ``tiktoken.model``, and in tokenizer_config.json the special tokens by id and the official class name."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        prefix = kwargs.get("filename_prefix")
        vocab = self.save_vocabulary(str(save_directory), prefix)
        config_path = Path(save_directory) / ((prefix + "-" if prefix else "") + "tokenizer_config.json")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        specials = sorted(self.added_tokens_decoder.items())
        config["added_tokens_decoder"] = {str(i): token.__getstate__() for i, token in specials}
        config["tokenizer_class"] = OFFICIAL_TOKENIZER_CLASS
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return (*files, *vocab)
