"""benchmarks/bench_ingest.py's profile table names functions where they live (a module split must update it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parent.parent


def _profile_points() -> list[tuple[str, str, str]]:
    """PROFILE_POINTS read from the benchmark's source (importing it would pin this process to one thread)."""
    tree = ast.parse((ROOT / "benchmarks" / "bench_ingest.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PROFILE_POINTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("no PROFILE_POINTS in benchmarks/bench_ingest.py")


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_profile_points_name_functions_defined_in_files_with_that_suffix():
    sources = [*(ROOT / "pipeline").rglob("*.py"), *Path(pydicom.__file__).parent.rglob("*.py")]
    points = _profile_points()
    assert points
    for suffix, func, _ in points:
        where = [p for p in sources if str(p).endswith(suffix) and func in _functions(p)]
        assert where, f"PROFILE_POINTS entry ({suffix!r}, {func!r}): no {suffix} in pipeline/ or pydicom defines {func}"
