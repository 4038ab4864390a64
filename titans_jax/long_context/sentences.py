"""A small, deterministic English sentence splitter (RULER and BABILong use nltk's punkt model,
which is a network download; this is a rule-based stand-in, good enough to place needles and
facts between sentences).

Rules, in order:
1. Paragraph breaks (a blank line) always end a sentence.
2. Inside a paragraph, a sentence ends after `.`, `!` or `?` (a run of them, e.g. `?!` or `...`)
   plus any closing quotes/brackets, when whitespace follows and the next word does not start
   with a lower-case letter.
3. ...except after a known abbreviation (`Mr.`, `Dr.`, `e.g.`, `etc.` before a capital, ...) or a
   single-letter initial (`E. B. White`, `U.S.`), where a period does not end the sentence.
4. Whitespace inside each sentence is collapsed to single spaces (as RULER does for the essays).

`split_sentences(text)` returns the sentences; `SPLITTER_VERSION` names these rules (it is part
of every haystack fingerprint, so changing a rule changes the evaluation-set keys).
"""

from __future__ import annotations

import re

SPLITTER_VERSION = "titans-sentences-v1"

# Lower-cased, without the final period. A period after one of these does not end a sentence.
ABBREVIATIONS = frozenset("""
mr mrs ms dr prof sr jr st mt ft gen col capt lt sgt rev hon gov pres sen rep messrs mme mlle
vs etc e.g i.e cf viz al approx dept est fig vol no nos pp ch sec inc ltd co corp bros
jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri sat sun
""".split())

_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")
# A candidate end: terminal punctuation run, optional closers, then whitespace.
_CANDIDATE = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s)")
_WHITESPACE = re.compile(r"\s+")
_WORD_BEFORE = re.compile(r"([A-Za-z][A-Za-z.]*)$")
_NEXT_CHAR = re.compile(r"\s*(\S)")


def _is_boundary(paragraph: str, match: re.Match) -> bool:
    following = _NEXT_CHAR.match(paragraph, match.end())
    if following is None:
        return True
    if following.group(1).islower():
        return False
    punct = match.group(0)
    if punct[0] != "." or punct.startswith(".."):
        return True  # ! ? and ellipses before a capital end the sentence
    if punct != ".":
        return True  # a closing quote/bracket after the period: `"Go."` ends the sentence
    word = _WORD_BEFORE.search(paragraph[max(0, match.start() - 32):match.start()])
    if word is None:
        return True  # after a number or a symbol
    token = word.group(1)
    if len(token) == 1 and token.isupper():
        return False  # an initial: "E. B. White"
    if token.lower() in ABBREVIATIONS:
        return False
    if "." in token and all(len(part) <= 1 for part in token.split(".")):
        return False  # "U.S." "e.g." style dotted abbreviations
    return True


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, whitespace-normalised, empty ones dropped (see the module doc)."""
    sentences = []
    for paragraph in _PARAGRAPH.split(text):
        start = 0
        for match in _CANDIDATE.finditer(paragraph):
            if _is_boundary(paragraph, match):
                sentence = _WHITESPACE.sub(" ", paragraph[start:match.end()]).strip()
                if sentence:
                    sentences.append(sentence)
                start = match.end()
        tail = _WHITESPACE.sub(" ", paragraph[start:]).strip()
        if tail:
            sentences.append(tail)
    return sentences


__all__ = ["ABBREVIATIONS", "SPLITTER_VERSION", "split_sentences"]
