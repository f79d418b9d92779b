"""Shared output of the benchmark scripts: a Markdown table, then all figures as one JSON line."""
from __future__ import annotations

import json
import platform
from typing import Callable, Sequence


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


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for the figures' machine."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()
