"""How many records a holder's data file holds, counted without torch, transformers, pandas or datasets, for
``ewtune config check``'s rule that the budget's delta lies below 1/N (Dwork and Roth 2014, section 2.3: with
delta >= 1/N, "publish each record with probability delta" is (0, delta)-DP and reveals a record outright).

The loader (:func:`ewtune.agent.data.read_table`) reads CSV with pandas and JSON Lines and Parquet with Arrow
through Hugging Face ``datasets``, which takes seconds to import. :func:`count_records` counts the same records
the way those readers see them, or answers ``None`` whenever it cannot vouch for the file (a row longer than
the header, a line of whitespace only, a bad quote, text that is not UTF-8, JSON that is not one object per
line or that changes a column's type, a damaged Parquet footer...); the configuration check then reads the
file with the loader itself, so its verdict and message on such a file are the loader's. What a count here
cannot see: a CSV whose column types change between pandas' chunks of 10,000 rows, which ``datasets`` refuses
to convert; the daemon's start reports that file when it reads it.

Imports neither torch, transformers, pandas nor flwr (Arrow is imported for JSON Lines and Parquet only).
"""

from __future__ import annotations

import csv
from pathlib import Path


def count_records(path: str | Path) -> int | None:
    """The records of the data file ``path`` as the loader reads them, or None when this count cannot tell
    (module docstring): an unknown format, an unreadable file, one the loader might read otherwise or refuse,
    or one without records (``datasets`` refuses a file of no rows, "corresponds to no data")."""
    counter = _COUNTERS.get(Path(path).suffix.lower())
    if counter is None:
        return None
    try:
        records = counter(Path(path))
    except (OSError, UnicodeDecodeError, csv.Error, ValueError):  # pyarrow's ArrowInvalid is a ValueError
        return None
    return records or None


def _csv_records(path: Path) -> int | None:
    """Data rows after the header, as pandas' C reader counts them with ``datasets``' options (UTF-8, ``"``
    quotes doubled inside quotes, blank lines skipped); None for what pandas may read otherwise: a row longer
    than the header (pandas then takes the first column as an index, or refuses), a line of whitespace only
    (pandas skips it, Python's reader cannot tell it from a quoted blank), a quote in an odd place, no header."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = csv.reader(handle, strict=True)
        header = next((row for row in rows if row), None)
        if header is None:
            return None
        records = 0
        for row in rows:
            if not row:
                continue
            if len(row) > len(header) or (len(row) == 1 and row[0] and not row[0].strip()):
                return None
            records += 1
    return records


def _json_lines_records(path: Path) -> int | None:
    """Objects of a JSON Lines file, read by Arrow's JSON reader as ``datasets`` reads it (blank lines skipped);
    Arrow refuses, and so this count gives up on, a JSON array, a scalar line or a column that changes type."""
    import pyarrow.json  # here: only a JSON Lines file needs Arrow (0.25 s to import)

    return sum(batch.num_rows for batch in pyarrow.json.open_json(path))


def _parquet_records(path: Path) -> int:
    """Rows of a Parquet file, from its footer (``datasets`` reads the same file through Arrow)."""
    import pyarrow.parquet  # here: only a Parquet file needs Arrow (0.4 s to import)

    with pyarrow.parquet.ParquetFile(path) as parquet:
        return parquet.metadata.num_rows


_COUNTERS = {".csv": _csv_records, ".jsonl": _json_lines_records, ".json": _json_lines_records,
             ".parquet": _parquet_records}
