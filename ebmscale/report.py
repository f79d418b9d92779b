"""``ebmscale report RUN_DIR``: the whole run on one self-contained static HTML page.

The page holds the training curves (loss, energy gap, gradient norm), FID over steps, the buffer
health figures, the sample grids over time, the evaluation results found in the run directory,
the checkpoints with their steps, and the config (as asked, and as resolved where the run
directory records it). Everything is inline -- curves as SVG drawn here (no plotting library, a few ms
per curve), images as base64 PNG data URIs, CSS in the page, no script -- so the file can be
mailed, archived or opened offline. A piece that is absent (no FID, no TensorBoard, deleted
checkpoints, a run that never logged) is said on the page instead of failing the report.

Reads only files (no model, no device), so it runs on a copy of a run directory anywhere.
"""
from __future__ import annotations

import base64
import glob
import html
import json
import math
import os
import re
import time
from typing import Any

from ebmscale.checkpoint import list_checkpoints
from ebmscale.utils import atomic_write_bytes

REPORT_FILE = "report.html"
MAX_GRID_STEPS = 12  # sample grids over time: at most this many steps (evenly spread, always the last)
_STEP_PNG = re.compile(r"^(?:(buffer|classes)-)?step-(\d+)\.png$")
# Files other tasks may write with the resolved runtime settings (asked config: config.yaml).
RESOLVED_GLOBS = ("resolved*.yaml", "resolved*.yml", "resolved*.json", "runtime*.yaml", "runtime*.json")

CURVES = [  # (title, metric names)
    ("Loss", ["loss"]),
    ("Energy gap E(x-) - E(x+)", ["energy_gap", "energy_gap_y"]),
    ("Energies", ["e_pos", "e_neg"]),
    ("Parameter-gradient norm", ["grad_norm"]),
]
HEALTH = [
    ("Chain age (sampler steps)", ["buffer_age_mean", "buffer_age_max"]),
    ("Re-initialised fraction since the last log", ["buffer_reinit_frac"]),
    ("Diversity (mean pairwise distance / sqrt(dim))", ["buffer_diversity"]),
    ("Fill (share of evolved chains)", ["buffer_fill", "buffer_fill_class_min"]),
]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


class RunDirError(FileNotFoundError):
    """The path is not a run directory; the message names it."""


# --------------------------------------------------------------------------- reading
def read_jsonl(path: str) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (a run killed mid-write) is skipped."""
    out = []
    with open(path) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def series(records: list[dict], name: str) -> list[tuple[float, float]]:
    """(step, value) of ``name`` over the records, finite values only."""
    pts = []
    for rec in records:
        v, s = rec.get(name), rec.get("step")
        if isinstance(v, (int, float)) and isinstance(s, (int, float)) and math.isfinite(v):
            pts.append((float(s), float(v)))
    return pts


# --------------------------------------------------------------------------- drawing
def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.4g}" if v != 0 else "0"


def svg_chart(title: str, lines: dict[str, list[tuple[float, float]]], width: int = 460, height: int = 250,
              log_y: bool = False) -> str:
    """A line chart of ``lines`` (name -> points) as inline SVG, with axes, ticks and a legend."""
    lines = {k: v for k, v in lines.items() if v}
    if log_y:
        lines = {k: [(x, math.log10(y)) for x, y in v if y > 0] for k, v in lines.items()}
    xs = [x for v in lines.values() for x, _ in v]
    ys = [y for v in lines.values() for _, y in v]
    left, right, top, bottom = 58, 12, 34, 34
    pw, ph = width - left - right, height - top - bottom
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    else:
        pad = (y1 - y0) * 0.05
        y0, y1 = y0 - pad, y1 + pad
    px = lambda x: left + (x - x0) / (x1 - x0) * pw  # noqa: E731
    py = lambda y: top + (1 - (y - y0) / (y1 - y0)) * ph  # noqa: E731
    title += " (log scale)" if log_y else ""
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="8" y="12" class="ct">{html.escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>']
    for t in _ticks(y0, y1):
        y = py(t)
        label = _fmt(10 ** t) if log_y else _fmt(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{left - 4}" y="{y + 4:.1f}" class="tl" text-anchor="end">{label}</text>')
    for t in _ticks(x0, x1):
        x = px(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}" class="axis"/>'
                   f'<text x="{x:.1f}" y="{top + ph + 16}" class="tl" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 3}" class="tl" text-anchor="middle">step</text>')
    legend_x = left + pw  # legend entries right-aligned in the title row, right to left
    for i, (name, pts) in enumerate(lines.items()):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        if len(pts) == 1:
            out.append(f'<circle cx="{px(pts[0][0]):.1f}" cy="{py(pts[0][1]):.1f}" r="3" fill="{colour}"/>')
        else:
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
    for i, name in reversed(list(enumerate(lines))):
        out.append(f'<text x="{legend_x}" y="{top - 6}" class="tl" text-anchor="end" '
                   f'fill="{COLOURS[i % len(COLOURS)]}">{html.escape(name)}</text>')
        legend_x -= 6 * len(name) + 12
    out.append("</svg>")
    return "".join(out)


def _img(path: str, alt: str, max_width: int = 360) -> str:
    """A PNG inline, shown enlarged (pixelated) when small: 8x8 digit grids stay readable."""
    with open(path, "rb") as fh:
        raw = fh.read()
    # A PNG's width and height sit at bytes 16-24 (the IHDR chunk).
    width = int.from_bytes(raw[16:20], "big") if raw[:8] == b"\x89PNG\r\n\x1a\n" else max_width
    shown = min(max_width, width * max(1, max_width // max(width, 1)))
    data = base64.b64encode(raw).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" width="{shown}" alt="{html.escape(alt)}">'


def _missing(text: str) -> str:
    return f'<p class="missing">{html.escape(text)}</p>'


# --------------------------------------------------------------------------- sections
def _config_section(run_dir: str, missing: list[str]) -> str:
    parts = ["<h2>Config</h2>"]
    asked = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(asked):
        with open(asked) as fh:
            parts.append(f"<details open><summary>Asked (config.yaml)</summary><pre>{html.escape(fh.read())}</pre>"
                         "</details>")
    else:
        missing.append("config.yaml (the asked config)")
        parts.append(_missing("No config.yaml in the run directory."))
    resolved = sorted({p for g in RESOLVED_GLOBS for p in glob.glob(os.path.join(run_dir, g))})
    if resolved:
        for p in resolved:
            with open(p) as fh:
                parts.append(f"<details open><summary>Resolved ({html.escape(os.path.basename(p))})</summary>"
                             f"<pre>{html.escape(fh.read())}</pre></details>")
    else:
        parts.append(_missing("No resolved settings recorded in this run directory (only the asked config); "
                              "the resolved device and precision are printed at the start of training."))
    return "".join(parts)


def _curves(records: list[dict], specs: list[tuple[str, list[str]]]) -> str:
    charts = []
    for title, names in specs:
        lines = {n: series(records, n) for n in names}
        if any(lines.values()):
            charts.append(svg_chart(title, lines, log_y=title.startswith("Parameter-gradient")))
    return '<div class="charts">' + "".join(charts) + "</div>"


def _class_fill(records: list[dict]) -> str:
    """The last record's per-class fill as a table (one column per class)."""
    last = next((r for r in reversed(records) if "buffer_fill_class0" in r), None)
    if last is None:
        return ""
    cells = []
    c = 0
    while f"buffer_fill_class{c}" in last:
        v = last[f"buffer_fill_class{c}"]
        cells.append((c, v if isinstance(v, (int, float)) else math.nan))
        c += 1
    head = "".join(f"<th>{k}</th>" for k, _ in cells)
    row = "".join(f"<td>{v:.2f}</td>" for _, v in cells)
    return (f"<p>Per-class fill at step {last.get('step')}:</p><table class='kv'><tr><th>class</th>{head}</tr>"
            f"<tr><th>fill</th>{row}</tr></table>")


def _sample_steps(run_dir: str) -> dict[int, dict[str, str]]:
    """step -> {'negatives'|'buffer'|'classes': png path} from ``samples/``."""
    found: dict[int, dict[str, str]] = {}
    folder = os.path.join(run_dir, "samples")
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            m = _STEP_PNG.match(name)
            if m:
                found.setdefault(int(m.group(2)), {})[m.group(1) or "negatives"] = os.path.join(folder, name)
    return found


def _pick(steps: list[int], k: int) -> list[int]:
    if len(steps) <= k:
        return steps
    idx = sorted({round(i * (len(steps) - 1) / (k - 1)) for i in range(k)})
    return [steps[i] for i in idx]


def _samples_section(run_dir: str, missing: list[str]) -> str:
    found = _sample_steps(run_dir)
    parts = ["<h2>Samples over time</h2>"]
    if not found:
        missing.append("sample grids (samples/step-*.png)")
        return "".join(parts) + _missing("No sample grids in samples/ (train.sample_every=0 and a run that did not "
                                         "finish, or the files were removed).")
    steps = sorted(found)
    shown = _pick(steps, MAX_GRID_STEPS)
    if len(shown) < len(steps):
        parts.append(f"<p>{len(shown)} of {len(steps)} steps shown.</p>")
    kinds = [k for k in ("negatives", "buffer", "classes") if any(k in found[s] for s in shown)]
    labels = {"negatives": "negatives (latest chains)", "buffer": "buffer draw", "classes": "one row per class"}
    parts.append("<table class='grids'><tr><th>step</th>" + "".join(f"<th>{labels[k]}</th>" for k in kinds) + "</tr>")
    for s in shown:
        cells = "".join(f"<td>{_img(found[s][k], f'{k} at step {s}') if k in found[s] else ''}</td>" for k in kinds)
        parts.append(f"<tr><th>{s}</th>{cells}</tr>")
    parts.append("</table>")
    return "".join(parts)


def _eval_section(run_dir: str, missing: list[str]) -> str:
    files = sorted(glob.glob(os.path.join(run_dir, "eval_*.json")))
    parts = ["<h2>Evaluation results</h2>"]
    if not files:
        missing.append("evaluation results (eval_*.json, written by `ebmscale eval ...`)")
        return "".join(parts) + _missing("No eval_*.json in the run directory (run `ebmscale eval ...` on it).")
    for path in files:
        name = os.path.basename(path)[len("eval_"):-len(".json")]
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            parts.append(f"<h3>{html.escape(name)}</h3>" + _missing(f"unreadable: {exc}"))
            continue
        parts.append(f"<h3>{html.escape(name)}</h3>{_table(data)}")
    return "".join(parts)


def _table(data: Any) -> str:
    """A JSON object as a key/value table (nested values as compact JSON)."""
    if not isinstance(data, dict):
        return f"<pre>{html.escape(json.dumps(data, indent=1))}</pre>"
    rows = []
    for k, v in data.items():
        text = _fmt(v) if isinstance(v, float) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        if len(text) > 300:
            text = text[:300] + " ..."
        rows.append(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(text)}</td></tr>")
    return "<table class='kv'>" + "".join(rows) + "</table>"


def _checkpoint_section(run_dir: str, missing: list[str]) -> str:
    parts = ["<h2>Checkpoints</h2>"]
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        missing.append("checkpoints (none under checkpoints/: deleted, or never written)")
        return "".join(parts) + _missing("No checkpoint under checkpoints/ (deleted, or never written).")
    rows = "".join(f"<tr><td>{step}</td><td>{html.escape(os.path.relpath(path, run_dir))}</td>"
                   f"<td>{'complete' if done else 'incomplete (no completion marker: not used for resume)'}</td></tr>"
                   for step, path, done in ckpts)
    return "".join(parts) + f"<table class='kv'><tr><th>step</th><th>path</th><th>state</th></tr>{rows}</table>"


def _tensorboard_note(run_dir: str, missing: list[str]) -> str:
    events = glob.glob(os.path.join(run_dir, "tb", "**", "events.out.tfevents.*"), recursive=True)
    if events:
        return (f"<p>TensorBoard: {len(events)} event file(s) under <code>tb/</code> "
                f"(<code>tensorboard --logdir {html.escape(os.path.join(run_dir, 'tb'))}</code>).</p>")
    missing.append("TensorBoard event files (train.tensorboard=false, or tb/ removed)")
    return _missing("No TensorBoard event files under tb/ (train.tensorboard=false, or removed).")


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
h3{font-size:15px}.sub{color:#666;margin-top:0}pre{background:#f6f6f6;padding:8px;max-height:360px;overflow:auto;
font-size:12px}.missing{color:#a05a00;background:#fff6e6;padding:6px 10px;border-left:3px solid #e0a030}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{background:#fff;border:1px solid #eee}
.chart .ct{font-size:13px;font-weight:600;fill:#222}.chart .tl{font-size:10px;fill:#555}
.chart .frame{fill:none;stroke:#bbb}.chart .grid{stroke:#eee}.chart .axis{stroke:#999}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}.grids img{image-rendering:pixelated}summary{cursor:pointer;font-weight:600}
"""


def build_report(run_dir: str) -> str:
    """The HTML page of ``run_dir`` (see the module docstring). Raises :class:`RunDirError` when
    the path holds nothing of a run."""
    run_dir = os.path.abspath(run_dir)
    if not os.path.isdir(run_dir):
        raise RunDirError(f"run directory '{run_dir}' does not exist")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not any(os.path.exists(os.path.join(run_dir, n)) for n in ("config.yaml", "metrics.jsonl", "checkpoints")):
        raise RunDirError(f"'{run_dir}' is not an ebmscale run directory (no config.yaml, metrics.jsonl or "
                          "checkpoints/)")
    missing: list[str] = []
    records = read_jsonl(metrics_path) if os.path.isfile(metrics_path) else []
    # What a watcher looks for first (curves, health, samples) comes first; the config closes the page.
    body = ["<h2>Training curves</h2>"]
    if records:
        body.append(_curves(records, CURVES))
    else:
        missing.append("metrics (metrics.jsonl)")
        body.append(_missing("No metrics.jsonl records: the run logged nothing yet."))
    body.append(_tensorboard_note(run_dir, missing))
    body.append("<h2>FID over steps</h2>")
    fid_path = os.path.join(run_dir, "fid.jsonl")
    fid = series(read_jsonl(fid_path), "fid") if os.path.isfile(fid_path) else series(records, "fid")
    if fid:
        body.append('<div class="charts">' + svg_chart("FID", {"fid": fid}) + "</div>"
                    + _table({f"step {int(s)}": v for s, v in fid}))
    else:
        missing.append("FID (train.fid_every=0: no fid.jsonl)")
        body.append(_missing("No FID measured during training (train.fid_every=0); see `ebmscale eval fid`."))
    body.append("<h2>Replay buffer health</h2>")
    if any("buffer_age_mean" in r for r in records):
        body.append(_curves(records, HEALTH) + _class_fill(records))
    else:
        missing.append("buffer health (no persistent chains, or a run from before it was logged)")
        body.append(_missing("No buffer health figures (the run keeps no persistent chains, or predates them)."))
    body += [_samples_section(run_dir, missing), _eval_section(run_dir, missing),
             _checkpoint_section(run_dir, missing), _config_section(run_dir, missing)]
    last = records[-1] if records else {}
    summary = [f"run directory <code>{html.escape(run_dir)}</code>",
               f"report written {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"]
    if last:
        summary.append(f"last logged step {last.get('step')}")
    missing_html = ("<h2>Missing from this run directory</h2><ul>"
                    + "".join(f"<li>{html.escape(m)}</li>" for m in missing) + "</ul>") if missing else ""
    title = f"ebmscale run report: {os.path.basename(run_dir)}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head><body>'
            f'<h1>{html.escape(title)}</h1><p class="sub">{" · ".join(summary)}</p>{missing_html}'
            + "".join(body) + "</body></html>\n")


def write_report(run_dir: str, out: str | None = None) -> str:
    """Write :func:`build_report` to ``out`` (default ``<run_dir>/report.html``) atomically."""
    page = build_report(run_dir).encode("utf-8")
    out = out or os.path.join(run_dir, REPORT_FILE)
    atomic_write_bytes(out, page)
    return out
