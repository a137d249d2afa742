"""The workshop's data stage: training pairs for a feature given only as a description, generated
by the served model through the running engine.

Semantics (AxBench's concept data, as ``steer pack gen-data`` makes it, with the description's
own words as the binary scorer): for each of ``GEN_PROMPTS`` user turns of the corpora's train
split (none is a calibration or eval prompt) the engine answers ``SAMPLES`` times after a system
message that asks for the concept (:data:`INSTRUCTION` with the description) and once after none.
The positive is the instructed answer that uses the most of the description's words
(:func:`description_words`, matched by stem), kept only if it uses one; the negative is the plain
answer, kept only if it uses none. (A small model often drifts from an instruction: measured on
SmolLM2-135M, unfiltered pairs for "the ocean" taught a feature that did not move a held-out
ocean scorer at all; see docs/workshop.md.) The requests go straight to the engine at normal
priority, batched with the traffic being served.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from server.state import AppState

GEN_PROMPTS = 48
SAMPLES = 4
"""Instructed answers per prompt (the plain answer is one)."""
GEN_TOKENS = 64
TEMPERATURE = 0.8
INSTRUCTION = ("Whatever the user says, make your whole reply about this, and name it plainly: "
               "{description}")
_WORD = re.compile(r"[a-z]+")
_STOP = frozenset("""a about above after again all also an and any are as at be been being both but by
can could did do does doing for from had has have how if in into is it its just like made make
makes more most my no not of on or other our out over own same she should so some such talk talks
talking than that the their them then there these they this those through to too under up use
uses very was we were what when where which while who why will with would you your""".split())


def description_words(description: str) -> list[str]:
    """The stems of the description's content words (3+ letters, no function words)."""
    stems = {_stem(w) for w in _WORD.findall(description.lower()) if len(w) >= 3 and w not in _STOP}
    return sorted(stems)


def _stem(word: str) -> str:
    """A crude stem (plural, -ing, -ed cut), enough to match "beaches"/"beach", "sailing"/"sail"."""
    if word.endswith("ing") and len(word) >= 6:
        return word[:-3]
    if word.endswith("ed") and len(word) >= 5:
        return word[:-2]
    if word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) >= 4:
        return word[:-1]
    return word


def hits(text: str, stems: list[str]) -> int:
    """How many words of ``text`` have one of ``stems``."""
    wanted = set(stems)
    return sum(_stem(w) in wanted for w in _WORD.findall(text.lower()))


def train_prompts(n: int = GEN_PROMPTS) -> list[str]:
    """The first ``n`` user turns of the corpora's train split (round-robin, fixed order)."""
    from steering.builders import corpora

    out: list[str] = []
    for _, conv in corpora.interleave(["chitchat", "wiki"], "train"):
        text = next((m["content"] for m in conv if m["role"] == "user" and m["content"].strip()), None)
        if text and len(text) < 400:
            out.append(text)
        if len(out) >= n:
            break
    return out


async def generate_pairs(state: AppState, description: str,
                         on_progress: Callable[[float], None] | None = None
                         ) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """(pairs, record of how they were made) — see the module docstring."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine, tok = state.require_engine(), state.tokenizer
    prompts = await asyncio.to_thread(train_prompts)
    system = INSTRUCTION.format(description=description)
    stems = description_words(description)
    done = 0

    async def answers(i: int, prompt: str, instructed: bool) -> list[str]:
        nonlocal done
        msgs = ([{"role": "system", "content": system}] if instructed else []) \
            + [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)  # the template holds the special tokens
        params = SamplingParams(n=SAMPLES if instructed else 1, max_tokens=GEN_TOKENS,
                                temperature=TEMPERATURE, seed=1000 + i, repetition_penalty=1.1)
        outs: list[str] = []
        async for out in engine.generate(TokensPrompt(prompt_token_ids=list(ids)), params,
                                         f"workshop-data-{uuid.uuid4().hex}"):
            outs = [o.text.strip() for o in sorted(out.outputs, key=lambda o: o.index)]
        done += 1
        if on_progress is not None:
            on_progress(done / (2 * len(prompts)))
        return outs

    res = await asyncio.gather(*(answers(i, p, s) for s in (True, False) for i, p in enumerate(prompts)))
    pairs = []
    for prompt, instructed, plain in zip(prompts, res[:len(prompts)], res[len(prompts):]):
        best = max(instructed, key=lambda t: hits(t, stems), default="")
        neg = plain[0] if plain else ""
        if best and neg and hits(best, stems) > 0 and hits(neg, stems) == 0:
            pairs.append({"prompt": prompt, "positive": best, "negative": neg})
    record = {"source": "generated", "prompts": len(prompts), "kept": len(pairs),
              "instruction": system, "samples": SAMPLES, "max_tokens": GEN_TOKENS,
              "temperature": TEMPERATURE, "description_words": stems,
              "filter": "positive: the instructed answer using the most description words (at least "
                        "one); negative: the plain answer, using none",
              "prompt_source": "corpora train split (chitchat, wiki), user turns"}
    return pairs, record
