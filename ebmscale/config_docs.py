"""The configuration reference, docs/config.md, rendered from the dataclasses in :mod:`ebmscale.config_schema`.

The page is generated, never edited by hand: ``ebmscale config-docs --out docs/config.md`` (or
``make docs``) rewrites it, and ``tests/unit/test_config_docs.py`` fails when the checked-in page
differs from :func:`render_config_docs`. Sections and keys come from walking the dataclass tree,
so a new field or section appears without touching this module. Config layer: stdlib and
ebmscale.config only.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from ebmscale.config import Config

_HEADER = """\
<!-- Generated from ebmscale/config_schema.py by `ebmscale config-docs --out docs/config.md` (`make docs`).
     Do not edit: tests/unit/test_config_docs.py fails when this page and the dataclasses differ. -->
# Configuration reference

A typed dataclass tree (`ebmscale/config_schema.py`) with one section per table below. Every field has a
default and a help text. Recipes are YAML files in `configs/`; any field can be overridden with
dotted `key=value` arguments anywhere on the command line, parsed as YAML (`optim.lr=1e-4`,
`optim.betas=[0,0.999]`, `model.spectral_norm=true`):

```bash
ebmscale train --config configs/toy_8gaussians.yaml sampler.steps=40 optim.lr=1e-3
ebmscale train --dry-run model.width=32        # print the resolved config and exit
ebmscale info --config configs/jem_cifar10.yaml  # parameter count, asked and resolved settings
```

Unknown keys, wrong types, values out of range and inconsistent combinations fail before any work
starts with one line naming the key (e.g. `unknown config key 'model.widht'`, exit status 2). The
resolved config is written to `<run_dir>/config.yaml`, and what the `auto` settings resolved to on
the machine to `<run_dir>/runtime.yaml`. Cross-field rules (which objectives allow which
backends and precisions, for instance) are checked by `ebmscale.config.validate`; the
columns below give each field's own type, choices and range. The same keys, defaults and help texts
as Python tuples: `python -c "from ebmscale.config_docs import describe; [print(*r) for r in describe()]"`.

"""


def _sections(cls: type, prefix: str = "") -> list[tuple[str, list[tuple[dataclasses.Field, Any]]]]:
    """(dotted prefix, [(field, default)]) for every dataclass of the tree that has leaf fields,
    depth first, in declaration order."""
    inst = cls()
    leaves: list[tuple[dataclasses.Field, Any]] = []
    nested: list[tuple[str, list[tuple[dataclasses.Field, Any]]]] = []
    for f in dataclasses.fields(cls):
        value = getattr(inst, f.name)
        if dataclasses.is_dataclass(value):
            nested += _sections(type(value), f"{prefix}{f.name}.")
        else:
            leaves.append((f, value))
    return ([(prefix, leaves)] if leaves else []) + nested


def config_fields(cls: type = Config) -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, default) of every leaf field of the config tree, in page order."""
    return [(prefix + f.name, f, default) for prefix, leaves in _sections(cls) for f, default in leaves]


def describe(cls: type = Config) -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every leaf field, in page order."""
    return [(key, default, f.metadata.get("help", "")) for key, f, default in config_fields(cls)]


def _number(v: float | int) -> str:
    if isinstance(v, float):
        short = f"{v:g}"
        return short if "e" in short and float(short) == v else repr(v)
    return str(v)


def _literal(v: Any) -> str:
    """A value as it would be written in YAML or on the command line."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return _number(v)
    if isinstance(v, str):
        return v if v else "''"
    return json.dumps(v)


def _type_name(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def _allowed(f: dataclasses.Field) -> str:
    """Type, choices and range of a field, e.g. ``int, ≥ 0`` or ``float in (0, 1]``."""
    m = f.metadata
    if m.get("choices"):
        return ", ".join(f"`{_literal(c)}`" for c in m["choices"])
    lo, hi, open_lo = m.get("min"), m.get("max"), m.get("min_exclusive", False)
    if lo is not None and hi is not None:
        return f"{_type_name(f)} in {'(' if open_lo else '['}{_number(lo)}, {_number(hi)}]"
    if lo is not None:
        return f"{_type_name(f)}, {'>' if open_lo else '≥'} {_number(lo)}"
    if hi is not None:
        return f"{_type_name(f)}, ≤ {_number(hi)}"
    return _type_name(f)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: pipes escaped everywhere (GFM requires it inside
    code spans too), and outside code spans the characters that would start emphasis or an HTML tag."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # even parts lie outside `code spans`
        parts[i] = parts[i].replace("\\", "\\\\").replace("*", "\\*").replace("<", "&lt;")
    return "`".join(parts).replace("|", "\\|").replace("\n", " ")


def render_config_docs(root: type = Config) -> str:
    """docs/config.md: a header, then per section of the dataclass tree ``root`` a table of key,
    default, allowed values and help. Deterministic (declaration order, no timestamps)."""
    out = [_HEADER]
    sections = _sections(root)
    names = [prefix.rstrip(".") or "top level" for prefix, _ in sections]
    out.append("Sections: " + ", ".join(f"[`{n}`](#{n.replace('.', '').replace(' ', '-')})" for n in names) + ".\n")
    for name, (prefix, leaves) in zip(names, sections):
        out.append(f"\n## {name}\n\n")
        out.append("| key | default | allowed | help |\n|---|---|---|---|\n")
        for f, default in leaves:
            row = [f"`{prefix}{f.name}`", f"`{_literal(default)}`", _allowed(f), f.metadata.get("help", "")]
            out.append("| " + " | ".join(_cell(c) for c in row) + " |\n")
    return "".join(out)
