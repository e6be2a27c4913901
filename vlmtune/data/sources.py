"""Where rows come from: a .json/.jsonl/.parquet file, a local folder, or a Hugging Face Hub dataset id."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.errors import DataError

if TYPE_CHECKING:
    from vlmtune.config import DataSource

# owner/name, as on the Hub; anything with a data-file suffix is a mistyped path, not a hub id.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt")


class Rows(list):
    """Rows read with the stdlib json module: plain dicts that may differ in keys, never pushed through
    Arrow (which forces one schema on heterogeneous content parts). Has ``column_names`` like a Dataset."""

    @cached_property
    def column_names(self) -> list[str]:
        return list(dict.fromkeys(k for row in self if isinstance(row, dict) for k in row))


def load_rows(spec: DataSource, where: str) -> tuple[Sequence[dict], Path | None]:
    """The rows of ``spec`` (the first ``spec.limit``) and the folder relative image paths start from."""
    path = Path(spec.source).expanduser()
    ctx = f"{where} (source {spec.source!r})"
    if path.is_file():
        rows, base_dir = _load_file(path, ctx, where), path.parent
    elif path.is_dir():
        rows, base_dir = _load_dataset(ctx, where, spec.split, str(path)), path
    elif _HUB_ID.fullmatch(spec.source) and not spec.source.lower().endswith(_FILE_SUFFIXES):
        hint = _hub_hint(spec.source, where)
        rows, base_dir = _load_dataset(ctx, where, spec.split, spec.source, hint), None
    else:
        raise DataError(f"{ctx}: file or folder not found (looked at {str(path.absolute())!r}); fix "
                        f"{where}.source: a .json/.jsonl/.parquet file, a folder, or a Hub id (owner/name)")
    return _limit(rows, spec.limit), base_dir


def _limit(rows: Any, limit: int | None) -> Any:
    if limit is None or limit >= len(rows):
        return rows
    return Rows(rows[:limit]) if isinstance(rows, Rows) else rows.select(range(limit))


def _load_file(path: Path, ctx: str, where: str) -> Sequence[dict]:
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        rows = _read_json(path, ctx)
    elif suffix == ".parquet":
        rows = _load_dataset(ctx, where, "train", "parquet", data_files=str(path))
    else:
        raise DataError(f"{ctx}: unsupported file type {suffix!r}; use a .json, .jsonl or .parquet file")
    if not len(rows):
        raise DataError(f"{ctx}: the file holds no rows")
    return rows


def _decode_text(path: Path, ctx: str) -> str:
    """The file as UTF-8 text (a BOM allowed), or a DataError naming the line, the bytes and the likely encoding."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        looks, iconv = _guess_encoding(data)
        raise DataError(f"{ctx}: the file is not UTF-8: bytes {data[e.start:e.end + 3]!r} at line {line} "
                        f"(byte {e.start}); it looks like {looks}. Save it as UTF-8, e.g. "
                        f"`iconv -f {iconv} -t utf-8 {path.name} > fixed{path.suffix}`") from None


def _guess_encoding(data: bytes) -> tuple[str, str]:
    """(what the bytes look like, its iconv name), from one test of the bytes."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16 (it starts with a UTF-16 byte-order mark)", "utf-16"
    if data[:200].count(b"\x00") > len(data[:200]) // 4:
        return "UTF-16 or UTF-32 (every other byte is zero)", "utf-16"
    return "Latin-1 / Windows-1252 (an 8-bit Western encoding)", "cp1252"


def _read_json(path: Path, ctx: str) -> Rows:
    text = _decode_text(path, ctx)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" after line 1: JSON Lines under a .json name, read below
                raise DataError(f"{ctx}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}; "
                                "fix the file") from e
        else:
            if not isinstance(data, list):
                raise DataError(f"{ctx}: the file holds one JSON {type(data).__name__}; expected a list of "
                                "records, or JSON Lines (one record per line)")
            return _records(data, [f"item {i}" for i in range(len(data))], ctx)
    records, labels = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{ctx}: invalid JSON at line {n}, column {e.colno}: {e.msg}; each line of a "
                            ".jsonl file must be one complete JSON object") from e
        labels.append(f"line {n}")
    return _records(records, labels, ctx)


def _records(records: list, labels: list[str], ctx: str) -> Rows:
    for record, at in zip(records, labels, strict=True):
        if not isinstance(record, dict):
            raise DataError(f"{ctx}: {at} is a {type(record).__name__}, not a JSON object (one record per "
                            "object with the format's keys, e.g. {\"messages\": [...], \"images\": [...]})")
    return Rows(records)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _load_dataset(ctx: str, where: str, split: str, path: str, hub_hint: str | None = None,
                  **kwargs: Any) -> Any:
    """datasets.load_dataset, its failures turned into a DataError that says what to do."""
    import datasets  # heavy: imported only when a dataset is actually loaded

    try:
        return datasets.load_dataset(path, split=split, **kwargs)
    except ValueError as e:
        if "Unknown split" not in str(e):
            raise DataError(f"{ctx}: could not load the data ({_first_line(e)})") from e
        found = re.search(r"Should be one of (\[.*?\])", str(e))
        splits = found.group(1) if found else "(unknown)"
        raise DataError(f"{ctx}: split {split!r} not found; available splits: {splits}; set {where}.split "
                        "to one of them") from e
    except Exception as e:  # ConnectionError (offline), DatasetNotFoundError, DatasetGenerationError, ...
        if hub_hint:
            raise DataError(f"{ctx}: could not load the dataset from the Hugging Face Hub ({_first_line(e)}). "
                            f"{hub_hint}") from e
        raise DataError(f"{ctx}: could not load the data ({_first_line(e)}); a folder must hold a Hub-style "
                        "dataset (e.g. data/train-00000-of-00001.parquet); for JSON data set the source to the "
                        ".json/.jsonl file itself") from e


def _hub_hint(source: str, where: str) -> str:
    local = "./" + source.split("/")[-1]
    return ("This machine may be offline (HF_HUB_OFFLINE=1 or no network) or the id may be wrong. Get a "
            f"local copy where there is network, e.g. `hf download {source} --repo-type dataset --local-dir "
            f"{local}`, and set {where}.source: {local}")
