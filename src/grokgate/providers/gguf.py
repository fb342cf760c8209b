"""What grokgate reads from a GGUF file's metadata itself, before llama.cpp loads it: how many bytes one token of
its vocabulary can stand for, and the context it was trained for.

providers/local.py refuses a prompt that cannot fit a slot whatever its tokens (more bytes than the slot's tokens
can stand for) without tokenising it. That bound is exact only if each token stands for at most `token_bytes` bytes
of the text the tokenizer was given, so this module says a number only for vocabularies where that holds:

- `gpt2` (byte-level BPE: Qwen, Llama 3, GPT-2...): a normal token's text spells bytes, one character per byte, in
  GPT-2's byte alphabet; any other token (control, user-defined) is matched as its own UTF-8 text;
- `llama` (SentencePiece with byte fallback): a piece's UTF-8 text is never shorter than the bytes it stands for
  (a space is the 3-byte `▁`, a byte token is `<0xAB>`).

Other tokenizers (WordPiece, Unigram with its normaliser) may drop or merge input text, so no byte bound holds:
`None`. The format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian; version 1, with
32-bit lengths, is not read).
"""

from __future__ import annotations

import logging
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("grokgate.local")

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
# Fixed-size value types: struct format by GGUF type id.
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NORMAL = 1  # tokenizer.ggml.token_type: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte


def _byte_alphabet() -> frozenset[str]:
    """The 256 characters GPT-2's byte-level BPE spells bytes with (its `bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [256 + n for n in range(256 - len(printable))]
    return frozenset(chr(c) for c in printable + shifted)


_BYTE_ALPHABET = _byte_alphabet()


class GGUFError(ValueError):
    """The file is not a GGUF this reader understands."""


@dataclass(frozen=True, slots=True)
class VocabularyFacts:
    tokenizer: str | None  # tokenizer.ggml.model
    token_bytes: int | None  # the most bytes of input one token stands for; None where no such bound holds
    context_length: int | None  # <architecture>.context_length: llama.cpp caps a slot's context at it


class _Reader:
    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.at = 0

    def unpack(self, fmt: str) -> Any:
        values = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> bytes:
        size = self.unpack("Q")
        end = self.at + size
        if end > len(self.data):
            raise GGUFError("a string runs past the end of the file")
        value = self.data[self.at:end]
        self.at = end
        return value

    def value(self, kind: int, keep: bool) -> Any:
        """The value of type `kind`, or None having skipped it (`keep` False)."""
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("IQ")
            if item == _STRING:
                if keep:
                    return [self.string() for _ in range(count)]
                for _ in range(count):
                    size = self.unpack("Q")  # (not `self.at += ...`: unpack moves `at` first)
                    self.at += size
                return None
            if item not in _FIXED:
                raise GGUFError(f"an array of type {item} is not read")
            fmt = f"{count}{_FIXED[item]}"
            if not keep:
                self.at += struct.calcsize("<" + fmt)
                return None
            return list(self.unpack(fmt)) if count != 1 else [self.unpack(fmt)]
        if kind not in _FIXED:
            raise GGUFError(f"a value of type {kind} is not read")
        return self.unpack(_FIXED[kind])


def read_metadata(path: Path, wanted: Callable[[str], bool]) -> dict[str, Any]:
    """The metadata values whose keys are `wanted` in the GGUF at `path` (strings as bytes, arrays as lists); the
    others are skipped, not decoded."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        reader = _Reader(data)
        try:
            if data[:4] != _MAGIC:
                raise GGUFError("not a GGUF file")
            version, _tensors, count = reader.unpack("4xIQQ")
            if version < 2:
                raise GGUFError(f"GGUF version {version} is not read")
            found: dict[str, Any] = {}
            for _ in range(count):
                key = reader.string().decode("utf-8", "replace")
                kind = reader.unpack("I")
                keep = wanted(key)
                value = reader.value(kind, keep)
                if keep:
                    found[key] = value
            return found
        except struct.error as exc:
            raise GGUFError(f"the metadata is cut short ({exc})") from None


def vocabulary_facts(path: Path) -> VocabularyFacts:
    """What providers/local.py's prompt bound needs from the model at `path` (raises GGUFError, OSError)."""
    keys = {"general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"}
    meta = read_metadata(path, lambda key: key in keys or key.endswith(".context_length"))
    arch = meta.get("general.architecture", b"").decode("utf-8", "replace")
    context_key = f"{arch}.context_length"
    tokenizer = meta["tokenizer.ggml.model"].decode("utf-8", "replace") if "tokenizer.ggml.model" in meta else None
    context = meta.get(context_key)
    tokens: list[bytes] = meta.get("tokenizer.ggml.tokens") or []
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    return VocabularyFacts(tokenizer=tokenizer, token_bytes=_token_bytes(tokenizer, tokens, types),
                           context_length=int(context) if isinstance(context, int) and context > 0 else None)


def _token_bytes(tokenizer: str | None, tokens: list[bytes], types: list[int]) -> int | None:
    if tokenizer not in ("gpt2", "llama") or not tokens or len(types) != len(tokens):
        return None
    longest = 0
    for text, kind in zip(tokens, types, strict=True):
        size = len(text)  # UTF-8 bytes: never fewer than the bytes the token stands for
        if tokenizer == "gpt2" and kind == _NORMAL and size > longest:
            spelled = text.decode("utf-8", "replace")
            if _BYTE_ALPHABET.issuperset(spelled):
                size = len(spelled)  # one character of GPT-2's byte alphabet per byte
        longest = max(longest, size)
    return longest or None
