"""The package's shape, checked so that it cannot drift back (docs/code.md, issue 18's acceptance):

* imports point downward only: base -> components -> wiring -> trainer -> entry points (a module may
  import its own layer or a lower one, never a higher one; imports inside functions count too);
* ray only in buffer/ray_host.py, accelerate/deepspeed only in parallel.py, argparse only in cli/;
* no module over 450 lines, trainer.py not over 300.

Parsed with ``ast`` (nothing is imported), so the test takes well under a second.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "ebmscale"

# Top-level module or subpackage of ebmscale -> layer. A new top-level module must be given one here.
LAYERS: dict[str, int] = {
    # base: configuration, process group, resolved runtime, small helpers
    **dict.fromkeys(["config", "config_schema", "config_rules", "config_docs", "dist", "performance", "utils", "metrics",
                     "runguard"], 0),
    # components
    **dict.fromkeys(["models", "sampling", "objectives", "buffer", "data", "optim"], 1),
    # wiring: data parallelism, checkpoints, evaluation, and the pieces a trainer is made of
    **dict.fromkeys(["parallel", "checkpoint", "checkpoint_manager", "eval", "report", "monitor", "guards",
                     "train_state", "loop"], 2),
    "trainer": 3,
    "cli": 4,
}
LAYER_NAMES = ["base", "components", "wiring", "trainer", "entry points"]

# Third-party packages that one place only may import (package -> the files allowed, or a folder).
ONLY_IN = {"ray": ("buffer/ray_host.py",), "accelerate": ("parallel.py",), "deepspeed": ("parallel.py",),
           "argparse": ("cli/",)}

MAX_LINES = 450
MAX_LINES_OF = {"trainer.py": 300}
# Over the limit for now, with the reason and the most lines allowed (it may shrink, not grow);
# nothing else may be added here. ray_host.py was split to 449 lines, then node-loss recovery
# (re-homing shards, re-sending lost calls) landed in it; the mailbox bookkeeping has since moved
# to buffer/mailbox.py (671 -> 621 lines). What is left over 450 is Ray calls, and "only
# ray_host.py imports ray" keeps it in one file until that rule is revisited (e.g. a second Ray
# module for starting/joining/waiting on Ray).
TOO_LONG_FOR_NOW = {"buffer/ray_host.py": 621}


def _modules() -> list[pathlib.Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: pathlib.Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, at any depth; ``from ebmscale
    import dist`` gives ``ebmscale.dist``, relative imports are resolved."""
    package = ["ebmscale", *path.relative_to(PACKAGE).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[:len(package) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out += [(node.lineno, f"{base}.{a.name}" if base == "ebmscale" else base) for a in node.names]
    return out


def _layer_of(rel: str) -> int:
    top = rel.split("/")[0].removesuffix(".py")
    if top == "__init__":
        return 0
    assert top in LAYERS, f"ebmscale/{rel}: give '{top}' a layer in LAYERS of tests/unit/test_structure.py"
    return LAYERS[top]


def test_every_module_is_in_a_layer_and_imports_point_downward():
    bad = []
    for path in _modules():
        rel = _rel(path)
        mine = _layer_of(rel)
        for line, name in _imports(path):
            parts = name.split(".")
            if parts[0] != "ebmscale" or len(parts) == 1:
                continue
            theirs = _layer_of(parts[1] + ("/" if (PACKAGE / parts[1]).is_dir() else ".py"))
            if theirs > mine:
                bad.append(f"ebmscale/{rel}:{line} ({LAYER_NAMES[mine]}) imports {name} ({LAYER_NAMES[theirs]})")
    assert not bad, "imports pointing upward:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", sorted(ONLY_IN))
def test_third_party_imports_stay_in_their_one_place(package):
    allowed = ONLY_IN[package]
    bad = []
    for path in _modules():
        rel = _rel(path)
        if any(rel == a or (a.endswith("/") and rel.startswith(a)) for a in allowed):
            continue
        bad += [f"ebmscale/{rel}:{line} imports {name}" for line, name in _imports(path)
                if name.split(".")[0] == package]
    assert not bad, f"{package} may be imported only in {', '.join(allowed)}:\n" + "\n".join(bad)


def test_no_module_is_too_long():
    bad = []
    for path in _modules():
        rel = _rel(path)
        n = len(path.read_text().splitlines())
        limit = TOO_LONG_FOR_NOW.get(rel) or MAX_LINES_OF.get(rel, MAX_LINES)
        if n > limit:
            bad.append(f"ebmscale/{rel}: {n} lines (at most {limit}): split it along a seam")
    assert not bad, "\n".join(bad)


def test_the_checks_see_what_they_check():
    """The parser finds the imports the rules are about (so that the tests above cannot pass by
    finding nothing)."""
    names = {name for _, name in _imports(PACKAGE / "trainer.py")}
    assert {"ebmscale.dist", "ebmscale.loop", "ebmscale.parallel"} <= names
    assert "ray" in {name for _, name in _imports(PACKAGE / "buffer" / "ray_host.py")}
    assert "argparse" in {name for _, name in _imports(PACKAGE / "cli" / "__init__.py")}
    assert {"ebmscale.buffer.client", "ebmscale.buffer.replay"} <= {n for _, n in _imports(PACKAGE / "buffer" / "__init__.py")}
    assert _layer_of("cli/__init__.py") > _layer_of("trainer.py") > _layer_of("loop.py") > _layer_of("data/stream.py")
