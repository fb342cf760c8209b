"""The longest prompt the embedded engine could hold, in characters, so that `LocalEngine.check` refuses a longer
one before any worker thread tokenises it (llama.cpp tokenises a prompt whole before it compares its length with
the slot's context: seconds of a worker for megabytes, all for a refusal).

The bound is exact: no token stands for more than `token_bytes` bytes (read from the model's vocabulary,
providers/gguf.py), a character is at least one byte, and the chat template copies each message's text whole and
only adds, so a prompt of more than slot tokens x token_bytes characters of text is more tokens than the slot holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from grokgate.core.errors import GatewayError
from grokgate.providers.gguf import GGUFError, vocabulary_facts
from grokgate.providers.local_errors import too_long
from grokgate.schemas.chat import ChatCompletionRequest, TextPart

log = logging.getLogger("grokgate.local")

# Before the model's vocabulary is read, the bytes one token is taken to stand for at most. A prompt it refuses
# would not be served anyway: a 503 follows while the model loads, and a retry after the load would be too long
# for any vocabulary we know (Qwen 2.5's longest token is 128 bytes: 128 spaces).
UNREAD_TOKEN_BYTES = 1024

# Characters per token above which a prompt is likely too long for its slot (prose and code run at 3 to 5 per token;
# long runs of spaces or dashes more): such prompts of one tenant are tokenised one at a time (providers/local_slots.py
# `TenantLane`). Only when they run changes, never whether.
LONG_CHARS_PER_TOKEN = 8


def slot_tokens(ctx_per_slot: int, trained: int | None) -> int:
    """The tokens one slot holds: llama.cpp rounds a slot's context up to a multiple of 256 (measured with this
    build: 300 per slot gives 512) and caps it at the model's training context (`n_ctx_slot` in llama.cpp's
    tools/server/server-context.cpp). Rounding up errs on the side of letting a prompt through."""
    padded = -(-ctx_per_slot // 256) * 256
    return min(padded, trained) if trained else padded


def message_chars(request: ChatCompletionRequest) -> int:
    """At most the bytes of the prompt's text as the engine renders it: the messages' text and their tool calls,
    which the chat template and providers/local_tools.py `render_messages` copy whole (a call's arguments stripped
    of surrounding whitespace). Images are refused before the engine; a message's name is not rendered."""
    total = 0
    for message in request.messages:
        content = message.content
        if isinstance(content, str):
            total += len(content)
        elif content:
            total += sum(len(part.text) for part in content if isinstance(part, TextPart))
        for call in message.tool_calls or ():
            total += len(call.function.name) + len(call.function.arguments.strip())
    return total


@dataclass(frozen=True, slots=True)
class PromptBound:
    slot_tokens: int
    token_bytes: int | None  # None: no bound holds for this model's tokenizer, nothing is refused

    @classmethod
    def unread(cls, ctx_per_slot: int) -> PromptBound:
        """Until the model's vocabulary is read."""
        return cls(slot_tokens(ctx_per_slot, None), UNREAD_TOKEN_BYTES)

    @classmethod
    def of_model(cls, path: Path, ctx_per_slot: int) -> PromptBound:
        try:
            facts = vocabulary_facts(path)
        except (GGUFError, OSError) as exc:
            log.warning("no prompt length bound: the vocabulary of %s could not be read (%s)", path.name, exc)
            return cls(slot_tokens(ctx_per_slot, None), None)
        if facts.token_bytes is None:
            log.warning("no prompt length bound: the %s tokenizer of %s may drop input text", facts.tokenizer,
                        path.name)
        return cls(slot_tokens(ctx_per_slot, facts.context_length), facts.token_bytes)

    @property
    def max_chars(self) -> int | None:
        return self.slot_tokens * self.token_bytes if self.token_bytes is not None else None

    def is_long(self, chars: int) -> bool:
        """Whether a prompt of `chars` characters is likely too long for a slot (LONG_CHARS_PER_TOKEN)."""
        return chars > self.slot_tokens * LONG_CHARS_PER_TOKEN

    def refusal(self, chars: int) -> GatewayError | None:
        """The error for a prompt of at least `chars` characters, None if it may fit."""
        limit = self.max_chars
        if limit is None or self.token_bytes is None or chars <= limit:
            return None
        return too_long(chars, limit, self.slot_tokens, self.token_bytes)
