"""The layout the packages promise: stages side by side that never import one another, support
packages that never reach up into a stage, and no import cycles. Read from the source (every
`import` statement, at any depth), so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
STAGE_NAMES = ("data", "train", "merge", "convert", "quantize", "ladder", "smoke")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules a file imports: `from pipeline.x import y` names pipeline.x.y when that
    is a module, else pipeline.x."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return found & modules


@pytest.fixture(scope="module")
def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: project_imports(path, set(files)) - {name} for name, path in files.items()}


def test_every_stage_lives_in_the_stages_package_and_the_table_names_it(import_graph):
    from pipeline.stages import STAGES

    assert tuple(STAGES) == STAGE_NAMES
    for name, spec in STAGES.items():
        assert spec.module == f"pipeline.stages.{name}" and spec.module in import_graph


def test_no_stage_imports_another_stage(import_graph):
    stages = {f"pipeline.stages.{name}" for name in STAGE_NAMES}
    crossings = {(a, b) for a in stages for b in import_graph[a] & stages}
    assert not crossings


def test_support_packages_never_import_a_stage_or_the_cli(import_graph):
    upward = {
        (module, target)
        for module, targets in import_graph.items()
        if not module.startswith("pipeline.stages") and module != "pipeline.__main__"
        for target in targets
        if target.startswith("pipeline.stages") or target == "pipeline.__main__"
    }
    assert not upward


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target] if target in path else [node, target]
            if target not in state and (cycle := visit(target, [*path, target])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_there_are_no_import_cycles(import_graph):
    assert find_cycle(import_graph) is None


def test_the_cycle_check_finds_a_cycle_when_there_is_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
