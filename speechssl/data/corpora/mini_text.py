"""The mini corpus's text: a built-in English vocabulary, a small sentence grammar and keyword lists.

Sentences are drawn from a handful of templates over word classes (a few hundred words in all), so a
tiny ASR model sees every word many times while no two utterances share a transcript. Transcripts are
normalised LibriSpeech-style by ``normalize_transcript``: upper case, no punctuation, apostrophes kept.
"""
from __future__ import annotations

import re

import numpy as np

from speechssl.constants import KEYWORDS
from speechssl.data.corpora.prepare import SILENCE, UNKNOWN

# SUPERB keyword spotting (Speech Commands v0.01): the ten KEYWORDS; the rest of the words are "_unknown_".
UNKNOWN_WORDS = ("bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin", "nine",
                 "one", "seven", "sheila", "six", "three", "tree", "two", "wow", "zero")
KS_CLASSES = KEYWORDS + (UNKNOWN, SILENCE)

_w = str.split
NAMES = _w("john mary peter anna thomas laura david susan robert emma james alice henry grace oliver "
           "sophie daniel ruth martin helen george clara edward nora frank lucy")
ADJECTIVES = _w("old young small large red green blue yellow bright dark quiet loud warm cold heavy light "
                "clean dirty happy sad tired busy strange famous simple careful gentle angry little tall "
                "short new broken wooden golden silver empty full soft hard rich poor clever lazy brave "
                "kind proud wild calm sharp thin round")
# Nouns with regular plurals only, so the grammar can inflect them.
NOUNS = _w("farmer teacher doctor baker sailor painter student driver singer soldier neighbour child "
           "king queen friend brother sister mother father dog cat horse bird fish rabbit window door "
           "table chair basket letter book garden river bridge road village market kitchen forest field "
           "mountain island ship boat train car bottle cup plate apple orange flower tree stone wall "
           "lamp clock candle coat hat shoe key box bag bell song story picture bread cake map ring")
PLACES = _w("market kitchen garden village forest river station harbour library school church "
            "office castle valley meadow cottage hall square")
# (base form, past tense) of transitive verbs.
VERBS_T = [tuple(p.split("/")) for p in _w(
    "carry/carried paint/painted find/found bring/brought open/opened close/closed watch/watched "
    "build/built clean/cleaned fix/fixed push/pushed pull/pulled drop/dropped lift/lifted hold/held "
    "sell/sold buy/bought hide/hid follow/followed visit/visited call/called help/helped draw/drew "
    "read/read move/moved wash/washed fill/filled catch/caught throw/threw keep/kept leave/left "
    "borrow/borrowed cover/covered count/counted touch/touched want/wanted see/saw take/took")]
# (base form, past tense) of intransitive verbs.
VERBS_I = [tuple(p.split("/")) for p in _w(
    "sleep/slept wait/waited laugh/laughed smile/smiled run/ran walk/walked sing/sang dance/danced "
    "listen/listened work/worked rest/rested shout/shouted jump/jumped swim/swam climb/climbed "
    "arrive/arrived travel/travelled whisper/whispered cry/cried stay/stayed play/played fall/fell")]
ADVERBS = _w("quickly slowly quietly loudly happily sadly carefully gently early late together again "
             "alone outside inside today soon suddenly finally always never often")
PREPOSITIONS = _w("near under behind beside across into over through along around past toward inside "
                  "outside beyond between")
TIMES = ["in the morning", "at night", "yesterday", "last week", "after dinner", "before noon",
         "on monday", "on friday", "in the evening", "every day", "in the spring", "last summer",
         "at dawn", "tomorrow", "this afternoon"]
PRONOUNS = _w("he she they we i you")
DETERMINERS = _w("the a this that every my your his her our their one some")
NEGATIVES = ["didn't", "couldn't", "wouldn't", "won't", "can't", "don't"]
COLOURS = ("red", "green", "blue", "yellow", "golden", "silver")


def normalize_transcript(text: str) -> str:
    """LibriSpeech-style transcript: upper case, only letters, apostrophes inside words and single spaces."""
    text = text.upper().replace("’", "'")
    text = re.sub(r"[^A-Z' ]+", " ", text)
    text = re.sub(r"(?<![A-Z])'|'(?![A-Z])", " ", text)  # drop quote marks, keep DIDN'T and JOHN'S
    return " ".join(text.split())


def _plural(noun: str) -> str:
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


class SentenceGrammar:
    """Draws varied English sentences from the built-in vocabulary with a numpy ``Generator``."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def _pick(self, items):
        return items[int(self.rng.integers(len(items)))]

    def _maybe(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def noun_phrase(self, adjective_p: float = 0.5) -> str:
        if self._maybe(0.15):
            return self._pick(NAMES)
        if self._maybe(0.2):
            words = [self._pick(["the", "some", "two", "three", "many", "those", "our", "their"])]
            if self._maybe(adjective_p):
                words.append(self._pick(ADJECTIVES))
            words.append(_plural(self._pick(NOUNS)))
            return " ".join(words)
        words = [self._pick(DETERMINERS)]
        if self._maybe(adjective_p):
            words.append(self._pick(ADJECTIVES))
        words.append(self._pick(NOUNS))
        phrase = " ".join(words)
        return "an" + phrase[1:] if phrase.startswith("a ") and phrase[2] in "aeiou" else phrase

    def _tail(self) -> str:
        parts = []
        if self._maybe(0.45):
            parts.append(f"{self._pick(PREPOSITIONS)} the {self._pick(PLACES)}")
        if self._maybe(0.3):
            parts.append(self._pick(TIMES))
        return " ".join(parts)

    def sentence(self) -> str:
        """One sentence of roughly 4 to 13 words (not yet normalised), from one of nine templates."""
        t = int(self.rng.integers(9))
        vt, vi = self._pick(VERBS_T), self._pick(VERBS_I)
        subj = self.noun_phrase()
        pick, phrase = self._pick, self.noun_phrase
        templates = (  # each draws its words left to right when called
            lambda: f"{subj} {vt[1]} {phrase()} {self._tail()}",
            lambda: f"{subj} {vi[1]} {pick(ADVERBS)} {self._tail()}",
            lambda: f"{pick(PRONOUNS)} {pick(NEGATIVES)} {vt[0]} {phrase()} {self._tail()}",
            lambda: f"did {subj} {vt[0]} {phrase()}",
            lambda: f"{pick(NAMES)} said that {phrase()} {vi[1]} {pick(ADVERBS)}",
            lambda: f"there was {phrase(0.9)} {pick(PREPOSITIONS)} the {pick(PLACES)}",
            lambda: f"{pick(PRONOUNS)} will {vt[0]} {phrase()} {pick(TIMES)}",
            lambda: f"{pick(NAMES)}'s {pick(NOUNS)} was {pick(ADJECTIVES)} and {pick(ADJECTIVES)}",
            lambda: f"it's {pick(ADJECTIVES)} {self._tail() or pick(TIMES)}",
        )
        return " ".join(templates[t]().split())

    def short_sentence(self) -> str:
        """A sentence of 3 to 7 words, for the emotion clips, from one of five templates."""
        t = int(self.rng.integers(5))
        pick = self._pick
        templates = (
            lambda: f"{self.noun_phrase(0.3)} {pick(VERBS_I)[1]} {pick(ADVERBS)}",
            lambda: f"{pick(PRONOUNS)} {pick(VERBS_T)[1]} {self.noun_phrase(0.3)}",
            lambda: f"the {pick(NOUNS)} is {pick(ADJECTIVES)}",
            lambda: f"{pick(NAMES)} {pick(VERBS_I)[1]} {pick(TIMES)}",
            lambda: f"where is the {pick(ADJECTIVES)} {pick(NOUNS)}",
        )
        return templates[t]()

    def unique_sentences(self, n: int, short: bool = False, exclude: set[str] | None = None) -> list[str]:
        """``n`` sentences whose normalised transcripts are pairwise different (and not in ``exclude``)."""
        seen = set(exclude or ())
        out: list[str] = []
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise RuntimeError(f"the grammar cannot produce {n} distinct sentences")
            s = self.short_sentence() if short else self.sentence()
            key = normalize_transcript(s)
            if key not in seen:
                seen.add(key)
                out.append(s)
        return out


def vocabulary() -> set[str]:
    """Every normalised word the grammar and the keyword lists can produce (for documentation and tests)."""
    words: set[str] = set()
    for group in (NAMES, ADJECTIVES, PLACES, ADVERBS, PREPOSITIONS, PRONOUNS, DETERMINERS, NEGATIVES,
                  KEYWORDS, UNKNOWN_WORDS, COLOURS):
        words.update(group)
    words.update(NOUNS)
    words.update(_plural(n) for n in NOUNS)
    for base, past in VERBS_T + VERBS_I:
        words.update((base, past))
    for t in TIMES:
        words.update(t.split())
    words.update(["an", "two", "three", "many", "those", "did", "said", "that", "there", "was", "will", "and",
                  "it's", "is", "where", "the"])
    words.update(f"{n}'s" for n in NAMES)
    return {normalize_transcript(w) for w in words}
