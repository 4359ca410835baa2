"""Prompt files for tracing: text lines, or JSONL objects with `text` or `input_ids`."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_prompts(path: str | os.PathLike, tokenizer=None) -> list[list[int]]:
    """Token-id lists, one per prompt. Text needs `tokenizer`; `input_ids` are taken as they are.

    A `.jsonl` file (or one whose first line is a JSON object) is read as JSONL; otherwise every
    non-empty line is one text prompt.
    """
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no prompts in the file")
    is_jsonl = path.suffix == ".jsonl" or lines[0].lstrip().startswith("{")
    sequences = []
    for number, line in enumerate(lines, start=1):
        if not is_jsonl:
            sequences.append(_encode(line, tokenizer, path, number))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if "input_ids" in record:
            ids = record["input_ids"]
            if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise ValueError(f"{path}:{number}: input_ids must be a non-empty list of non-negative ints")
            sequences.append(ids)
        elif isinstance(record.get("text"), str):
            sequences.append(_encode(record["text"], tokenizer, path, number))
        else:
            raise ValueError(f"{path}:{number}: a JSONL prompt needs a 'text' string or an 'input_ids' list")
    return sequences


def _encode(text: str, tokenizer, path: Path, number: int) -> list[int]:
    if tokenizer is None:
        raise ValueError(f"{path}:{number}: text prompts need the model directory's tokenizer, and none was found")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{path}:{number}: the prompt tokenizes to nothing")
    return ids
