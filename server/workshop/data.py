"""The workshop's data stage: training pairs for a feature given only as a description, generated
by the served model through the running engine.

Semantics (pairs shaped like hand-written examples: the same answer with and without the
concept, both written the same way): for each of ``GEN_PROMPTS`` user turns of the corpora's train
split (none is a calibration or eval prompt) the engine first answers plainly, and that answer is
used only if it has none of the description's words (:func:`description_words`, matched by stem).
Then it rewrites that answer twice over: ``SAMPLES`` times after a system message asking for the
concept (:data:`REWRITE` with the description) — the positive is the rewrite that uses the most of
the description's words, kept only if it uses one — and once after a system message asking for the
same rewrite with no concept (:data:`PARAPHRASE`) — the negative, kept only if it has none of the
words (else the plain answer is). So positive and negative are both rewrites of one answer, and
what the rewriting itself changes (shorter, livelier, "Sure! Here is…") is in both and cancels.
(Measured on Qwen2.5-0.5B, see docs/workshop.md: pairs whose positive was a fresh answer under the
instruction differed in everything an instruction changes; rewrites against the plain answer
still carried the rewriting; eight hand-written pairs that differ only in the topic steered at
strength 1.) The requests go straight to the engine at normal priority, batched with the traffic
being served.
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
REWRITE = ("Rewrite the text the user sends so that it is about this, and names it plainly: "
           "{description}. Keep its length and its form. Reply with the rewritten text only.")
PARAPHRASE = ("Rewrite the text the user sends in other words. Keep its length, its form and its "
              "subject. Reply with the rewritten text only.")
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


def pair_up(rows: list[tuple[str, str, list[str], str]], stems: list[str]
            ) -> tuple[list[dict[str, str]], int]:
    """(pairs, how many negatives are paraphrases) from ``(prompt, plain answer, rewrites,
    paraphrase)`` rows: the positive is the rewrite with the most description words (a row
    with none is dropped); the negative the paraphrase when it has none of them, else the plain
    answer."""
    pairs, paraphrased = [], 0
    for prompt, plain, rewrites, paraphrase in rows:
        best = max(rewrites, key=lambda t: hits(t, stems), default="")
        if not best or hits(best, stems) == 0:
            continue
        clean = bool(paraphrase) and hits(paraphrase, stems) == 0
        paraphrased += clean
        pairs.append({"prompt": prompt, "positive": best, "negative": paraphrase if clean else plain})
    return pairs, paraphrased


async def generate_pairs(state: AppState, description: str,
                         on_progress: Callable[[float], None] | None = None
                         ) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """(pairs, record of how they were made) — see the module docstring."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine, tok = state.require_engine(), state.tokenizer
    prompts = await asyncio.to_thread(train_prompts)
    system = REWRITE.format(description=description.strip().rstrip("."))
    stems = description_words(description)
    done = 0

    async def answers(i: int, msgs: list[dict[str, str]], n: int, tokens: int) -> list[str]:
        nonlocal done
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)  # the template holds the special tokens
        params = SamplingParams(n=n, max_tokens=tokens, temperature=TEMPERATURE, seed=1000 + i,
                                repetition_penalty=1.1)
        outs: list[str] = []
        async for out in engine.generate(TokensPrompt(prompt_token_ids=list(ids)), params,
                                         f"workshop-data-{uuid.uuid4().hex}"):
            outs = [o.text.strip() for o in sorted(out.outputs, key=lambda o: o.index)]
        done += 1
        if on_progress is not None:
            on_progress(done / (3 * len(prompts)))
        return outs

    plain = await asyncio.gather(*(answers(i, [{"role": "user", "content": p}], 1, GEN_TOKENS)
                                   for i, p in enumerate(prompts)))
    originals = {i: outs[0] for i, outs in enumerate(plain)
                 if outs and outs[0] and hits(outs[0], stems) == 0}
    done += 2 * (len(prompts) - len(originals))  # no rewrite or paraphrase asked for these
    rewrite_tokens = GEN_TOKENS + GEN_TOKENS // 2
    rewrites, paraphrases = await asyncio.gather(
        asyncio.gather(*(answers(i, [{"role": "system", "content": system},
                                     {"role": "user", "content": a}], SAMPLES, rewrite_tokens)
                         for i, a in originals.items())),
        asyncio.gather(*(answers(i, [{"role": "system", "content": PARAPHRASE},
                                     {"role": "user", "content": a}], 1, rewrite_tokens)
                         for i, a in originals.items())))
    pairs, matched = pair_up([(prompts[i], plain_answer, outs, para[0] if para else "")
                              for (i, plain_answer), outs, para
                              in zip(originals.items(), rewrites, paraphrases)], stems)
    record = {"source": "generated", "prompts": len(prompts), "kept": len(pairs),
              "instruction": system, "samples": SAMPLES, "max_tokens": GEN_TOKENS,
              "temperature": TEMPERATURE, "description_words": stems,
              "paraphrase": PARAPHRASE, "negatives_paraphrased": matched,
              "filter": "a plain answer using no description word is rewritten; positive: of its "
                        "rewrites under the instruction, the one using the most description words "
                        "(at least one); negative: its paraphrase, if it uses no description "
                        "word, else the plain answer",
              "prompt_source": "corpora train split (chitchat, wiki), user turns"}
    return pairs, record
