"""Reading training files. Every malformed record is reported with its file and line number.

Causal LM: a plain-text file is one document; a JSONL file holds one {"text": ...} document per line.
"""

from __future__ import annotations

import json
from pathlib import Path

from gemma2.errors import (
    DataError,
)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from None


def read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file; errors name file:line."""
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {line[:80]!r}")
        records.append((number, record))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def read_text_documents(path: str | Path) -> list[str]:
    """Documents of a .txt file (the whole file) or a .jsonl file ({"text": ...} per line)."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        text = read_text(path)
        if not text.strip():
            raise DataError(f"{path}: the file is empty")
        return [text]
    documents = []
    for number, record in read_records(path):
        if not isinstance(record.get("text"), str):
            raise DataError(f'{path}:{number}: expected an object with a "text" string, got {record!r}'[:300])
        documents.append(record["text"])
    return documents
