"""Rows of a dataset on disk, each with where it came from (for error messages).

Formats, chosen by what `path` is:

* a directory saved with ``datasets`` (``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``),
  read with ``datasets.load_from_disk``; of a ``DatasetDict``, the split asked for is read
  (``train``; for held-out rows ``test``, else ``validation``);
* ``.parquet``: read with pyarrow;
* ``.json``: a JSON array of objects;
* anything else: JSON Lines, one object per line (blank lines skipped, a UTF-8 BOM allowed).

Each row comes back as ``(record, line)``: the object and its line (JSON Lines) or record
number (the other formats, counting from 1). A file that cannot be read raises
:class:`~sortedrl.errors.InputFileError` naming the file and, where there is one, the line.
Nothing here touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sortedrl.errors import InputFileError

Row = tuple[Any, int]

HELD_OUT_SPLITS = ("test", "validation")  # of a saved DatasetDict, in order of preference


def _json_problem(e: Exception) -> str:
    """What json.loads rejected beyond syntax: deep nesting, an integer too long to convert."""
    if isinstance(e, RecursionError):
        return "invalid JSON: nested too deeply"
    return f"invalid JSON: {str(e)[:200]}"


def _read_jsonl(path: Path) -> list[Row]:
    rows: list[Row] = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputFileError(
                str(path), f"not valid UTF-8 ({e.reason} at byte {e.start})", lineno
            ) from None
        if lineno == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            rows.append((json.loads(text), lineno))
        except json.JSONDecodeError as e:
            raise InputFileError(
                str(path), f"invalid JSON: {e.msg} (column {e.colno})", lineno
            ) from None
        except (ValueError, RecursionError) as e:
            raise InputFileError(str(path), _json_problem(e), lineno) from None
    return rows


def _read_json_array(path: Path) -> list[Row]:
    try:
        text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise InputFileError(str(path), f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        return []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputFileError(
            str(path), f"invalid JSON: {e.msg} (column {e.colno})", e.lineno
        ) from None
    except (ValueError, RecursionError) as e:
        raise InputFileError(str(path), _json_problem(e)) from None
    if not isinstance(obj, list):
        raise InputFileError(str(path), "expected a JSON array of objects (or use .jsonl)")
    return [(o, i) for i, o in enumerate(obj, start=1)]


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputFileError(
            str(path), "reading Parquet needs pyarrow (pip install pyarrow), or convert to .jsonl"
        ) from None
    try:
        rows = pq.read_table(str(path)).to_pylist()
    except Exception as e:
        raise InputFileError(str(path), f"cannot read Parquet: {e}") from None
    return [(o, i) for i, o in enumerate(rows, start=1)]


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a directory written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    )


def saved_splits(path: Path) -> list[str] | None:
    """The split names of a saved DatasetDict, None for a single saved Dataset."""
    index = path / "dataset_dict.json"
    if not index.is_file():
        return None
    try:
        splits = json.loads(index.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputFileError(str(index), f"not a readable DatasetDict index ({e})") from None
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise InputFileError(str(index), "field 'splits': expected a list of split names")
    return splits


def _read_saved(path: Path, split: str) -> tuple[str, list[Row]]:
    try:
        import datasets
    except ImportError:
        raise InputFileError(
            str(path), "reading a saved dataset needs datasets (pip install datasets)"
        ) from None
    splits = saved_splits(path)
    where = str(path)
    if splits is not None:
        wanted = [split] if split == "train" else list(HELD_OUT_SPLITS)
        found = next((s for s in wanted if s in splits), None)
        if found is None:
            raise InputFileError(
                str(path),
                f"has no {' or '.join(repr(s) for s in wanted)} split "
                f"(splits: {', '.join(splits) or 'none'})",
            )
        path, where = path / found, str(path / found)
    try:
        ds = datasets.load_from_disk(str(path))
        rows = ds.to_list()
    except Exception as e:  # datasets raises many kinds of errors for a damaged directory
        raise InputFileError(where, f"cannot read the saved dataset: {e}") from None
    return where, [(o, i) for i, o in enumerate(rows, start=1)]


def read_rows(path: str | Path, split: str = "train") -> tuple[str, list[Row]]:
    """`(source, rows)` of the data at `path`; `source` names the file (or split directory).

    `split` matters only for a saved DatasetDict: ``train`` reads its train split, anything
    else its held-out split (``test``, else ``validation``).
    """
    p = Path(path)
    if is_saved_dataset(p):
        source, rows = _read_saved(p, split)
    elif p.is_dir():
        raise InputFileError(
            str(p), "is a directory, not a data file (nor a dataset saved with save_to_disk)"
        )
    elif not p.is_file():
        raise InputFileError(str(p), "no such file")
    else:
        source = str(p)
        suffix = p.suffix.lower()
        if suffix == ".parquet":
            rows = _read_parquet(p)
        elif suffix == ".json":
            rows = _read_json_array(p)
        else:
            rows = _read_jsonl(p)
    if not rows:
        raise InputFileError(source, "is empty (no records)")
    return source, rows
