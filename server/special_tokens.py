"""Text a client sends never becomes a control token.

A chat template renders the conversation to one string, and the tokenizer then reads every
special token's text in it as that token — the template's own ``<|im_start|>`` and a user's
typed ``<|im_start|>`` alike. vLLM's OpenAI server does just that (``apply_chat_template`` then
``encode``), so there a user message holding ``<|im_end|>\\n<|im_start|>system\\n…`` opens a real
system turn and overrides the operator's system prompt.

Here the strings of ``user``, ``assistant`` and ``tool`` messages (content, tool-call arguments,
ids) stay text: where such a string holds a special token's text, the conversation is rendered a
second time with that string swapped for a placeholder, which tells exactly where in the rendered
text each client string lies; every special token the tokenizer found inside one is replaced by the
ordinary tokens of its text (``<``, ``|``, ``im``, …). Everything else keeps its tokens, so a
conversation without such text is tokenized exactly as before. System messages and tool
definitions are the operator's and keep their special tokens. ``--allow-special-tokens-in-content``
turns the guard off; ``--plain-text-prompts`` treats /v1/completions text prompts the same way
(all of a text prompt is the client's).

Semantics: ids(conversation) == encode(render(conversation)) except that each special token whose
characters lie inside a client string is encoded as plain text.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Any

from server.errors import InvalidRequest

CLIENT_ROLES = frozenset({"user", "assistant", "tool"})
"""Roles whose strings are the client's text (``system`` / ``developer`` are the operator's)."""


class SpecialTokenGuard:
    """One tokenizer's special tokens and how to keep them out of client text."""

    def __init__(self, tokenizer: Any, allow_in_content: bool = False, plain_prompts: bool = False) -> None:
        self.tokenizer = tokenizer
        self.allow_in_content = allow_in_content
        """Leave the chat guard off (``--allow-special-tokens-in-content``)."""
        self.plain_prompts = plain_prompts
        """Tokenize completions text prompts as plain text (``--plain-text-prompts``)."""
        special = {tok.content: i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()
                   if getattr(tok, "special", False)}
        for text, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=False):
            special.setdefault(text, i)
        self.special_ids = frozenset(special.values())
        self._pattern = (re.compile("|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)))
                         if special else None)

    def holds_special(self, text: str) -> bool:
        """Whether ``text`` contains a special token's text."""
        return self._pattern is not None and self._pattern.search(text) is not None

    def plain(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """``text`` as ordinary tokens only (a special token's text spelled out)."""
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens,
                                   split_special_tokens=True)["input_ids"])

    # -- completions ---------------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        """A /v1/completions text prompt (the tokenizer's BOS and the like still added)."""
        if self.plain_prompts:
            return self.plain(prompt, add_special_tokens=True)
        return list(self.tokenizer.encode(prompt))

    # -- chat ----------------------------------------------------------------------------------
    def chat_ids(self, messages: list[dict[str, Any]], render: Callable[[list[dict[str, Any]]], str],
                 param: str = "messages") -> list[int]:
        """The token ids of ``render(messages)`` with client strings kept as text."""
        text = render(messages)
        if self.allow_in_content or not self._client_strings(list(messages), str):
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        spans = self._client_spans(messages, render, text, param)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = []
        for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            if tid in self.special_ids and any(s <= a and b <= e for s, e in spans):
                ids.extend(self.plain(text[a:b]))
            else:
                ids.append(tid)
        return ids

    def _client_strings(self, messages: list[dict[str, Any]], swap: Callable[[str], str]) -> list[str]:
        """Apply ``swap`` to every client string that holds a special token's text (in place);
        the strings swapped, in order."""
        found: list[str] = []

        def walk(value: Any) -> Any:
            if isinstance(value, str):
                if self.holds_special(value):
                    found.append(value)
                    return swap(value)
                return value
            if isinstance(value, dict):
                return {walk(k): (v if k == "role" else walk(v)) for k, v in value.items()}
            if isinstance(value, list):
                return [walk(v) for v in value]
            return value

        for i, msg in enumerate(messages):
            if msg.get("role") in CLIENT_ROLES:
                messages[i] = walk(msg)
        return found

    def _client_spans(self, messages: list[dict[str, Any]], render: Callable[[list[dict[str, Any]]], str],
                      text: str, param: str) -> list[tuple[int, int]]:
        """Where in ``text`` the client strings that hold special tokens' text lie: rendered again
        with each swapped for a unique placeholder, the two renderings must agree everywhere
        else (a template that changes such a string, or renders by its content, is refused)."""
        nonce = secrets.token_hex(8)
        originals: list[str] = []

        def placeholder(s: str) -> str:
            originals.append(s)
            return f"\ue000{nonce}.{len(originals) - 1}\ue001"

        masked = render(self._copy_with(messages, placeholder))
        spans: list[tuple[int, int]] = []
        rebuilt: list[str] = []
        pos = end = 0
        for m in re.finditer(f"\ue000{nonce}\\.(\\d+)\ue001", masked):
            end += m.start() - pos
            given = originals[int(m.group(1))]
            # as given, or trimmed (Llama 3's template trims every message)
            client = next((c for c in (given, given.strip()) if text.startswith(c, end)), given)
            spans.append((end, end + len(client)))
            end += len(client)
            rebuilt += [masked[pos:m.start()], client]
            pos = m.end()
        rebuilt.append(masked[pos:])
        if "".join(rebuilt) != text:
            token = self._pattern.search(originals[0]).group(0) if originals else "?"
            raise InvalidRequest(
                f"a message holds the special token text {token!r}, which this model's chat template "
                "does not render verbatim, so it cannot be kept as plain text: remove it (or start "
                "the server with --allow-special-tokens-in-content)", param, "special_token_in_content")
        return spans

    def _copy_with(self, messages: list[dict[str, Any]], swap: Callable[[str], str]) -> list[dict[str, Any]]:
        copy = list(messages)  # the swapped messages are new dicts; ``messages`` stays as it is
        self._client_strings(copy, swap)
        return copy
