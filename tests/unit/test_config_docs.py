"""docs/config.md is generated from the config dataclasses (ebmscale/config_docs.py) and must match them."""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

from ebmscale.cli import main
from ebmscale.config import _f
from ebmscale.config_docs import config_fields, render_config_docs

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "config.md"


def test_docs_config_md_matches_the_dataclasses():
    assert PAGE.exists(), "docs/config.md is missing: run `make docs` (ebmscale config-docs --out docs/config.md)"
    actual, expected = PAGE.read_text(encoding="utf-8"), render_config_docs()
    if actual != expected:
        diff = "".join(list(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True),
                                                 "docs/config.md (checked in)", "rendered from ebmscale/config_schema.py"))[:40])
        raise AssertionError("docs/config.md is stale: the config dataclasses changed. Run `make docs` "
                             "(ebmscale config-docs --out docs/config.md) and commit the result.\n" + diff)


def test_every_config_field_has_a_help_text():
    fields = config_fields()
    assert len(fields) > 50
    missing = [key for key, f, _ in fields if not str(f.metadata.get("help", "")).strip()]
    assert not missing, f"config fields without a help text (give them one with _f(..., help)): {missing}"


def test_every_field_gets_one_row_in_its_section():
    text = render_config_docs()
    for key, _, _ in config_fields():
        section = key.rsplit(".", 1)[0]
        rows = [line for line in text.splitlines() if line.startswith(f"| `{key}` |")]
        assert len(rows) == 1, key
        # the row sits under its own section's heading
        assert text.rfind(f"\n## {section}\n", 0, text.index(rows[0])) == text.rfind("\n## ", 0, text.index(rows[0]))


@dataclasses.dataclass
class _Inner:
    mode: str = _f("a", "pick a | b", choices=("a", "b", ""))
    rate: float = _f(0.5, "a rate <x> in *units*", min=0.0, max=1.0, min_exclusive=True)


@dataclasses.dataclass
class _Leafy:
    depth: int = _f(3, "how deep", min=1)
    tags: list = _f(["x"], "tags")
    inner: _Inner = dataclasses.field(default_factory=_Inner)


@dataclasses.dataclass
class _Root:
    top: _Leafy = dataclasses.field(default_factory=_Leafy)
    flag: bool = _f(True, "a root-level switch")


def test_sections_come_from_the_dataclass_tree_and_cells_are_escaped():
    text = render_config_docs(_Root)
    assert text == render_config_docs(_Root)  # deterministic
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## top level", "## top", "## top.inner"]
    assert "| `top.depth` | `3` | int, ≥ 1 | how deep |" in text
    assert '| `top.tags` | `["x"]` | list | tags |' in text
    # pipes escaped (a raw one would split the cell), '' shown for the empty choice, HTML and emphasis defused
    assert "| `top.inner.mode` | `a` | `a`, `b`, `''` | pick a \\| b |" in text
    assert "| `top.inner.rate` | `0.5` | float in (0.0, 1.0] | a rate &lt;x> in \\*units\\* |" in text
    assert "| `flag` | `true` | bool | a root-level switch |" in text


def test_cli_writes_the_page(tmp_path, capsys):
    out = tmp_path / "config.md"
    assert main(["config-docs", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render_config_docs()
    assert main(["config-docs"]) == 0
    assert capsys.readouterr().out == render_config_docs()
    assert main(["config-docs", "--out", str(tmp_path / "missing" / "config.md")]) == 2
    assert "missing" in capsys.readouterr().err


def test_make_docs_regenerates_the_page():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    rule = makefile.split("\ndocs:", 1)[1].split("\n\n", 1)[0]
    assert "config-docs --out docs/config.md" in rule
