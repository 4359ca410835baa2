"""Printing results: one JSON object on stdout with --json, else rich tables on stdout."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

console = Console()


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(_plain(data), indent=2) + "\n")


def key_value_table(title: str, rows: dict) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in rows.items():
        table.add_row(str(key), _format(value))
    return table


def rows_table(title: str, columns: Sequence[str], rows: Sequence[Sequence]) -> Table:
    """A table with no vertical rules (so more columns fit 80 characters); numbers right-aligned."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(columns))]
    for column, is_number in zip(columns, numeric):
        table.add_column(column, justify="right" if is_number else "left")
    for row in rows:
        table.add_row(*(_format(value) for value in row))
    return table


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value)
    return str(value)


def stats_tables(stats: dict) -> list[Table]:
    """The runtime's counters: one summary table and one row per MoE layer."""
    summary = {
        "hit rate": stats["hit_rate"],
        "hits / misses": f"{stats['hits']} / {stats['misses']}",
        "loads": stats["loads"],
        "bytes loaded": stats["bytes_loaded"],
        "prefetches issued / used": f"{stats['prefetches_issued']} / {stats['prefetches_used']}",
        "stall seconds": stats["stall_seconds"],
        "slots": f"{stats['num_slots']} ({stats['slot_pool_bytes']} B on {stats['device']})",
        "compute path": stats["compute_path"],
        "policy": stats["policy"] + (f" (evicting with {stats['policy_leader']})" if "policy_leader" in stats else ""),
    }
    if stats.get("policy_fit_tokens"):
        summary["policy fitted on"] = f"{stats['policy_fit_tokens']} tokens of your task"
    rows = [
        (i, layer["hit_rate"], layer["hits"], layer["misses"], layer["loads"], layer["waves"], layer["stall_seconds"] * 1e3)
        for i, layer in enumerate(stats["per_layer"])
    ]
    per_layer = rows_table("per MoE layer", ("layer", "hit rate", "hits", "misses", "loads", "waves", "stall ms"), rows)
    return [key_value_table("offloading", summary), per_layer]
