"""Text scorers for steering evaluation: pure Python, no model, no activations.

Each :class:`Scorer` maps one generated text to a float. They read only the text, so a feature
cannot grade itself: positivity is VADER's compound score, topics and styles are lexicon or
regex rates, refusal is a phrase match. ``SCORERS`` holds them by name; ``FEATURE_SCORERS``
maps the bundled features (and SAE latents ``<concept>_latent``) to the scorer that measures
their concept, and :func:`scorer_for` resolves a feature name (bare or ``pack/feature``).

Rates are "per 100 words" so short and long outputs compare; 0/1 scorers (``binary``) average
to the share of outputs that show the thing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Scorer", "SCORERS", "FEATURE_SCORERS", "scorer_for", "words"]

_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased words (letters, with inner apostrophes: ``don't``, ``c'est``)."""
    return [w.lower().replace("’", "'") for w in _WORD.findall(text)]


@dataclass(frozen=True)
class Scorer:
    """A named text → float measure.

    ``unit`` says what the number is; ``binary`` scorers return 0 or 1 per text.
    ``needs_full_output`` scorers (length) are only meaningful on answers that ended by themselves.
    """

    name: str
    description: str
    unit: str
    fn: Callable[[str], float]
    binary: bool = False
    #: Scores the whole answer (length): the harness gives it room to finish (``long_max_tokens``).
    needs_full_output: bool = False
    #: The system message that asks for the concept in words: the prompting baseline
    #: (``steer eval --baseline prompt``). None: the scorer measures no concept (repetition).
    instruction: str | None = None

    def __call__(self, text: str) -> float:
        return float(self.fn(text))


def _per100(hits: float, n_words: int) -> float:
    return 100.0 * hits / max(n_words, 1)


def _phrase_regex(phrases: Iterable[str]) -> re.Pattern[str]:
    """One case-insensitive regex matching any of ``phrases`` on word boundaries."""
    alts = sorted((re.escape(p).replace(r"\ ", r"\s+").replace("'", "['’]") for p in phrases), key=len, reverse=True)
    return re.compile(r"(?<![\w])(?:" + "|".join(alts) + r")(?![\w])", re.IGNORECASE)


def _count(pattern: re.Pattern[str], text: str) -> int:
    return len(pattern.findall(text))


# --- positivity -------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def positivity(text: str) -> float:
    """VADER compound sentiment in [-1, 1] (0 for empty text)."""
    if not text.strip():
        return 0.0
    return float(_vader().polarity_scores(text)["compound"])


# --- topics -----------------------------------------------------------------------------------

_GOLDEN_GATE = re.compile(
    r"golden[\s-]*gate|san\s+francisco|\bbridges?\b(?!\s+(?:the|a|this|that)\s+gaps?)|\bmarin\b", re.IGNORECASE)


def golden_gate(text: str) -> float:
    """1 if the text mentions the Golden Gate Bridge's topic (Golden Gate, San Francisco, a bridge)."""
    return 1.0 if _GOLDEN_GATE.search(text) else 0.0


_OCEAN = re.compile(
    r"\b(?:oceans?|seas?|seaside|seashore|waves?|tides?|beach(?:es)?|coast(?:s|al|line)?|shores?|surf|"
    r"marine|sail(?:s|ing|ors?)?|boats?|harbou?rs?|reefs?|whales?|dolphins?|underwater|sandy)\b",
    re.IGNORECASE)


def ocean(text: str) -> float:
    """1 if the text is about the sea (ocean, waves, tides, beaches, sailing, marine life). For
    workshop features (docs/workshop.md): never used to make or calibrate one, only to judge it."""
    return 1.0 if _OCEAN.search(text) else 0.0


_PIRATE = _phrase_regex([
    "arr", "arrr", "arrrr", "ahoy", "avast", "matey", "mateys", "me hearties", "hearties", "ye", "yer",
    "aye", "aye aye", "yo ho", "yo-ho", "shiver me timbers", "landlubber", "landlubbers", "scallywag",
    "scallywags", "buccaneer", "buccaneers", "pirate", "pirates", "plunder", "booty", "doubloon",
    "doubloons", "treasure", "grog", "swashbuckler", "swashbuckling", "captain", "cap'n", "ship",
    "ships", "sail", "sails", "sailing", "seas", "sea", "parrot", "plank", "cutlass", "jolly roger",
    "me ship", "o'", "be ye", "'tis", "ol'", "me lad", "lass", "lassie", "savvy", "blimey", "bilge",
    "crew", "deck", "anchor", "galleon", "mast", "scurvy", "rum",
])
_DROPPED_G = re.compile(r"\b[a-z]{2,}in['’](?=\s|[.,!?;:]|$)", re.IGNORECASE)


def pirate(text: str) -> float:
    """Pirate-speak words (arr, matey, ye, treasure, ship, o', dropped-g 'sailin'') per 100 words."""
    return _per100(_count(_PIRATE, text) + _count(_DROPPED_G, text), len(words(text)))


_CODE_PATTERNS = [
    re.compile(r"```"),                                    # fenced blocks
    re.compile(r"`[^`\n]+`"),                              # inline code
    re.compile(r"\b(?:def|class|import|return|elif|lambda|const|let|var|function|public|static|void|"
               r"int|println|printf|console\.log|print|async|await|struct|fn|#include|SELECT|FROM|WHERE)\b"),
    re.compile(r"\w+\([^()\n]{0,40}\)"),                   # calls: f(x)
    re.compile(r"[{};]\s*$", re.MULTILINE),                # braces / semicolons ending lines
    re.compile(r"==|!=|<=|>=|=>|->|\+=|&&|\|\|"),          # operators
    re.compile(r"\b[a-z]+_[a-z_]+\b|\b[a-z]+[A-Z][a-zA-Z]+\b"),  # snake_case / camelCase identifiers
    re.compile(r"\b(?:python|javascript|java|typescript|sql|html|css|api|json|variable|function|"
               r"algorithm|compiler|syntax|code|coding|programming|programmer|script|debug|array|"
               r"integer|boolean|git|github|database|repository|runtime|backend|frontend)\b", re.IGNORECASE),
]


def code(text: str) -> float:
    """Code signals (fences, `inline`, keywords, calls, operators, identifiers, programming terms) per 100 words."""
    hits = sum(_count(p, text) for p in _CODE_PATTERNS)
    return _per100(hits, max(len(words(text)), 1))


# French function words that are not also common English words (no "a", "on", "plus", "de"?
# "de" stays: it is rare in English prose outside names).
_FRENCH = frozenset("""
le la les l' un une des du de d' au aux et est sont ou où mais donc ni car je tu il elle nous vous
ils elles on ne pas plus que qui quoi dont ce cet cette ces c'est c' qu' j' n' s' m' t' mon ma mes
ton ta tes son sa ses notre nos votre vos leur leurs dans sur sous avec pour par sans chez entre
vers être avoir fait faire très bien aussi comme tout tous toute toutes y en été était avait suis
es sommes êtes ont ai as avons avez peut cela ça ici là oui non merci bonjour moi toi lui eux
""".split()) - {"on", "plus", "as", "es", "ma", "son", "ne", "sur", "tout"}
_FRENCH_ELISION = re.compile(r"\b[cdjlmnst]['’]\w", re.IGNORECASE)
_ACCENTED = re.compile(r"[àâçéèêëîïôûùüÿœæ]", re.IGNORECASE)


def french(text: str) -> float:
    """Share of words that are French function words (le, la, est, je, c'est, …), in [0, 1]."""
    ws = words(text)
    if not ws:
        return 0.0
    hits = 0
    for w in ws:
        if w in _FRENCH or (len(w) > 2 and w[1] == "'" and w[0] in "cdjlmnst") or w.startswith("qu'"):
            hits += 1
    return hits / len(ws)


# --- style ------------------------------------------------------------------------------------

_FORMAL = _phrase_regex([
    "therefore", "furthermore", "moreover", "however", "thus", "hence", "regarding", "accordingly",
    "consequently", "nevertheless", "sincerely", "kindly", "respectfully", "please", "assist",
    "assistance", "provide", "ensure", "require", "requires", "request", "inquire", "delighted",
    "pleased", "appreciate", "acknowledge", "regards", "dear", "shall", "whom", "utilize", "facilitate",
    "obtain", "additionally", "subsequently", "aforementioned", "convenience", "endeavor", "endeavour",
    "pertaining", "wherein", "hereby", "commence", "professional", "comprehensive", "significant",
    "individuals", "in addition", "in order to", "with respect to", "i am", "i would", "i shall",
    "do not", "cannot", "it is", "we are",
])
_INFORMAL = _phrase_regex([
    "hey", "hi", "yo", "lol", "lmao", "omg", "tbh", "btw", "imo", "gonna", "wanna", "gotta", "kinda",
    "sorta", "yeah", "yep", "nope", "nah", "cool", "awesome", "stuff", "guys", "dude", "u", "ur", "thx",
    "pls", "plz", "lmk", "rn", "ok", "okay", "totally", "super", "pretty much", "wow", "haha", "y'all",
    "ain't", "ya", "gotcha", "cuz", "'cause", "chill", "hang out", "grab", "folks", "buddy",
])
_CONTRACTION = re.compile(r"\b\w+['’](?:m|re|s|ve|ll|d|t)\b", re.IGNORECASE)


def formality(text: str) -> float:
    """Formal markers minus informal ones (slang, contractions, '!') per 100 words, plus 2 × (mean word length − 4.5).

    Positive is formal ("I would be pleased to assist"), negative casual ("hey lol gonna").
    """
    ws = words(text)
    if not ws:
        return 0.0
    formal = _count(_FORMAL, text)
    informal = _count(_INFORMAL, text) + _count(_CONTRACTION, text) + text.count("!")
    mean_len = sum(len(w) for w in ws) / len(ws)
    return _per100(formal - informal, len(ws)) + 2.0 * (mean_len - 4.5)


_HEDGES = _phrase_regex([
    "might", "may", "perhaps", "possibly", "possible", "probably", "likely", "unlikely", "maybe",
    "seems", "seem", "seemed", "appears", "appear", "could", "somewhat", "arguably", "i think",
    "i believe", "i guess", "i suppose", "it depends", "depends on", "generally", "typically",
    "usually", "often", "sometimes", "tend to", "tends to", "not sure", "i'm not sure", "uncertain",
    "approximately", "roughly", "suggest", "suggests", "relatively", "fairly", "rather",
    "in some cases", "to some extent", "more or less", "kind of", "sort of", "it's possible",
    "not necessarily", "potentially", "presumably", "apparently", "conceivably", "would", "can be",
    "depending on", "a variety of factors", "various factors", "going forward", "at this point in time",
    "in due course", "it could be argued", "to a certain extent", "may or may not", "consider",
    "considering", "worth considering", "subject to", "perspectives", "results may vary",
])


def hedging(text: str) -> float:
    """Hedges and caveats (might, perhaps, probably, it depends, depending on, potentially, …) per 100 words."""
    return _per100(_count(_HEDGES, text), len(words(text)))


_REFUSAL = re.compile(
    r"\b(?:i['’]?\s?a?m\s+sorry|sorry,?\s+but|i\s+apologi[sz]e|i\s+(?:can['’]?not|can['’]t|won['’]t|"
    r"will\s+not|must\s+(?:decline|refuse)|am\s+unable|['’]m\s+unable|am\s+not\s+able|['’]m\s+not\s+able|"
    r"(?:do\s+not|don['’]t)\s+feel\s+comfortable|['’]m\s+not\s+comfortable|am\s+not\s+comfortable|"
    r"['’]m\s+afraid|am\s+afraid)|i['’]m\s+unable|as\s+an\s+ai\b|unable\s+to\s+(?:help|assist|provide|"
    r"comply|fulfill)|not\s+(?:able|allowed|permitted)\s+to|(?:can['’]t|cannot)\s+(?:help|assist|provide|"
    r"comply|do\s+that|answer)|not\s+appropriate|decline\s+(?:this|that|your))", re.IGNORECASE)


def refusal(text: str) -> float:
    """1 if the text contains a refusal or apology phrase ("I'm sorry, but", "I can't help", "as an AI", …)."""
    return 1.0 if _REFUSAL.search(text) else 0.0


def verbosity(text: str) -> float:
    """Number of words."""
    return float(len(words(text)))


_HUMOR = _phrase_regex([
    "haha", "hahaha", "hehe", "lol", "lmao", "rofl", "joke", "jokes", "joking", "kidding", "funny",
    "hilarious", "humor", "humour", "humorous", "laugh", "laughs", "laughing", "laughed", "laughter",
    "pun", "puns", "punchline", "giggle", "giggles", "chuckle", "chuckles", "silly", "goofy", "witty",
    "wit", "comedy", "comedian", "amusing", "hysterical", "ridiculous", "absurd", "tickle", "banter",
    "why did the", "knock knock", "walks into a bar", "just kidding", "no pun intended", "wink",
    "prank", "sarcasm", "sarcastic", "clown", "quirky", "whimsical", "cheeky",
])
_LAUGH_EMOJI = re.compile("[\U0001F602\U0001F923\U0001F606\U0001F604\U0001F609\U0001F61C\U0001F61D]")


def humor(text: str) -> float:
    """Humor markers (joke, funny, laugh, pun, haha, 'why did the', 😂, …) per 100 words."""
    return _per100(_count(_HUMOR, text) + _count(_LAUGH_EMOJI, text), len(words(text)))


_INTENSIFIERS = _phrase_regex([
    "so", "very", "really", "absolutely", "totally", "incredibly", "super", "extremely", "truly",
    "amazing", "amazingly", "awesome", "incredible", "fantastic", "wonderful", "thrilled", "excited",
    "exciting", "love", "wow", "yay", "woohoo", "best", "ever", "can't wait", "cannot wait", "epic",
    "brilliant", "spectacular", "blast", "delighted", "thrilling", "unbelievable", "stunning",
    "awesome", "let's go", "oh my",
])
_CAPS_WORD = re.compile(r"\b[A-Z]{3,}\b")


def enthusiasm(text: str) -> float:
    """Exclamation marks, intensifiers (so, really, amazing, thrilled, can't wait, …) and ALL-CAPS words per 100 words."""
    caps = [w for w in _CAPS_WORD.findall(text) if w not in {"I", "AI", "USA", "API", "HTML", "CSS", "SQL"}]
    hits = text.count("!") + _count(_INTENSIFIERS, text) + len(caps)
    return _per100(hits, len(words(text)))


# --- fluency ----------------------------------------------------------------------------------


def repetition(text: str, n: int = 3) -> float:
    """Share of word n-grams (n = 3) that repeat an earlier one, in [0, 1]: 0 = no loops."""
    ws = words(text)
    grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


SCORERS: dict[str, Scorer] = {s.name: s for s in [
    Scorer("positivity", "VADER compound sentiment (vaderSentiment)", "compound in [-1, 1]", positivity,
           instruction="Answer in a warm, positive and upbeat tone."),
    Scorer("golden_gate", "mentions the Golden Gate Bridge topic (Golden Gate, San Francisco, bridge)",
           "share of outputs", golden_gate, binary=True,
           instruction="Bring the Golden Gate Bridge in San Francisco into your answer."),
    Scorer("pirate", "pirate-speak lexicon (arr, matey, ye, treasure, o', sailin')", "per 100 words", pirate,
           instruction="Answer the way a pirate talks."),
    Scorer("code", "code and programming signals (fences, keywords, calls, operators, terms)", "per 100 words", code,
           instruction="Answer with a code example."),
    Scorer("french", "French function-word share (le, la, est, je, c'est, …)", "share of words", french,
           instruction="Answer in French."),
    Scorer("formality", "formal minus informal markers (+ word-length term)", "per 100 words", formality,
           instruction="Answer in a formal, professional register."),
    Scorer("hedging", "hedge words and phrases (might, perhaps, it depends, …)", "per 100 words", hedging,
           instruction="Answer cautiously, hedging what you say."),
    Scorer("refusal", "refusal / apology phrase (I'm sorry, but; I can't help; as an AI)", "share of outputs",
           refusal, binary=True,
           instruction="Politely refuse to answer the request."),
    Scorer("verbosity", "length of the output", "words", verbosity, needs_full_output=True,
           instruction="Answer at length, in detail."),
    Scorer("humor", "humor lexicon (joke, funny, laugh, pun, haha, …)", "per 100 words", humor,
           instruction="Answer with humor."),
    Scorer("enthusiasm", "exclamation marks, intensifiers and ALL-CAPS words", "per 100 words", enthusiasm,
           instruction="Answer with great enthusiasm."),
    Scorer("ocean", "mentions the sea (ocean, waves, tides, beaches, sailing, marine life)",
           "share of outputs", ocean, binary=True,
           instruction="Bring the ocean and the sea into your answer."),
    Scorer("repetition", "repeated word 3-grams (degenerate loops)", "share of 3-grams", repetition),
]}

#: Bundled feature name (bare) → the scorer that measures its concept.
FEATURE_SCORERS: dict[str, str] = {
    **{name: name for name in ("formality", "positivity", "enthusiasm", "hedging", "verbosity", "humor",
                               "pirate", "french", "golden_gate", "refusal", "code")},
    **{f"{name}_latent": name for name in ("formality", "positivity", "enthusiasm", "hedging", "verbosity",
                                           "humor", "pirate", "french", "golden_gate", "refusal", "code")},
}


def scorer_for(feature_name: str) -> Scorer | None:
    """The scorer for a feature (``golden_gate``, ``smollm2-tone/golden_gate``, ``golden_gate_latent``), or None."""
    bare = feature_name.rsplit("/", 1)[-1]
    name = FEATURE_SCORERS.get(bare)
    if name is None and bare.endswith("_latent"):
        name = FEATURE_SCORERS.get(bare[: -len("_latent")])
    return SCORERS.get(name) if name else None
