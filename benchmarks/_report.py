"""Shared output of the benchmark scripts: a Markdown table, then all figures as one JSON line."""
from __future__ import annotations

import json
import platform
from typing import Callable, Sequence


def cpu_name() -> str:
    """The CPU as /proc/cpuinfo names it, with its family and model numbers (a model name such as
    "AMD EPYC" alone does not tell Zen 3 from Zen 4); the platform's processor string elsewhere."""
    try:
        fields: dict[str, str] = {}
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown CPU"
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def print_report(rows: Sequence[dict], columns: Sequence[tuple[str, Callable[[dict], str]]],
                 meta: dict | None = None) -> None:
    """Print ``rows`` as a Markdown table (``columns``: header and cell formatter) and, as the
    last line, the rows as one JSON list -- or, with ``meta`` (machine, command, ...), one JSON
    object ``{**meta, "rows": rows}``."""
    print("| " + " | ".join(h for h, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(fmt(r) for _, fmt in columns) + " |")
    print(json.dumps(list(rows) if meta is None else {**meta, "rows": list(rows)}))
