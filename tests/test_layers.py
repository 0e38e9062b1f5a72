"""The code's shape, kept by tests: layers that only point down (import-linter's contract in
pyproject.toml), no import cycle, no private name imported from another module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "slmops"


def test_layer_contract_is_kept():
    result = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], capture_output=True, text=True,
                            cwd=SRC.parents[1])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 kept, 0 broken" in result.stdout


def test_no_import_cycle():
    import grimp

    graph = grimp.build_graph("slmops")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != module and not imported.startswith(module + ".") and not module.startswith(imported + ".") \
                    and graph.chain_exists(importer=imported, imported=module):
                cycles.append(f"{module} <-> {imported}")
    assert not cycles


def test_no_private_name_crosses_modules():
    crossing = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slmops"):
                crossing += [f"{path.relative_to(SRC)}: {a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.endswith("__")]
    assert not crossing


def test_no_two_modules_share_a_name():
    """Outside slmops.cli, whose modules are named after the commands they parse."""
    names: dict[str, list[str]] = {}
    for path in SRC.rglob("*.py"):
        if path.name != "__init__.py" and path.parent.name != "cli":
            names.setdefault(path.stem, []).append(str(path.relative_to(SRC)))
    assert {k: v for k, v in names.items() if len(v) > 1} == {}
