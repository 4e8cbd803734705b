"""The dependency rule of README's architecture section, checked on the imports of every module in pipeline/.

base modules import only base modules; a stage imports base modules and its own package; composers
may import stages and base modules (and each other, but not the CLI); only `tracking` imports mlflow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"

BASE = {"pipeline", "pipeline.config", "pipeline.errors", "pipeline.io", "pipeline.records", "pipeline.stats"}
STAGES = {
    "pipeline.adapt",
    "pipeline.evaluate",
    "pipeline.finetune",
    "pipeline.ingest",
    "pipeline.prepare",
    "pipeline.synthetic",
    "pipeline.tracking",
}
COMPOSERS = {
    "pipeline.run",
    "pipeline.score",
    "pipeline.report",
    "pipeline.study",
    "pipeline.compare",
    "pipeline.cli",
    "pipeline.__main__",
}
ENTRY_POINTS = {"pipeline.cli", "pipeline.__main__"}  # nothing imports these but __main__


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str:
    """The base module, stage or composer a module belongs to: `pipeline.ingest.dicom` → `pipeline.ingest`."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            if name == "pipeline":  # `from pipeline import tracking` imports the submodule
                out += [(node.lineno, f"pipeline.{alias.name}") for alias in node.names if alias.name != "__version__"]
    return out


def violations(root: Path = PIPELINE) -> list[str]:
    """Every import in `root` that breaks the dependency rule, as 'file:line: why'."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        unit = _unit(module)
        where = f"{path.relative_to(root.parent)}"
        if unit not in BASE | STAGES | COMPOSERS:
            problems.append(f"{where}: {unit} is not classified as base, stage or composer (add it to this test)")
            continue
        for line, name in _imports(path, module):
            top = name.split(".")[0]
            if top == "mlflow" and unit != "pipeline.tracking":
                problems.append(f"{where}:{line}: imports mlflow; only pipeline.tracking may")
            if top != "pipeline" or name == "pipeline":
                continue
            target = _unit(name)
            if target in ENTRY_POINTS and module != "pipeline.__main__":
                problems.append(f"{where}:{line}: imports the CLI {name}")
            elif unit in BASE and target not in BASE:
                problems.append(f"{where}:{line}: base module {unit} imports {name} (base imports only base)")
            elif unit in STAGES and target not in BASE and target != unit:
                problems.append(f"{where}:{line}: stage {unit} imports {name} (a stage imports only base modules)")
    return problems


def test_pipeline_follows_the_dependency_rule() -> None:
    assert violations() == []


def test_every_classified_unit_exists() -> None:
    present = {_unit(_module_name(p, PIPELINE)) for p in PIPELINE.rglob("*.py")}
    missing = (BASE | STAGES | COMPOSERS) - present - {"pipeline.study"}  # study: a planned composer
    assert missing == set()


@pytest.mark.parametrize(
    ("relpath", "source", "expected"),
    [
        ("finetune/probe.py", "from pipeline.adapt import state_sha256\n", "stage pipeline.finetune imports"),
        ("finetune/probe.py", "from ..adapt import x\n", "stage pipeline.finetune imports pipeline.adapt"),
        ("records.py", "def f():\n    from pipeline.prepare import make_spec\n", "base module pipeline.records"),
        ("config.py", "from pipeline import tracking\n", "base module pipeline.config imports pipeline.tracking"),
        ("run.py", "import mlflow\n", "only pipeline.tracking may"),
        ("report/audit.py", "from pipeline.cli import main\n", "imports the CLI"),
        ("newthing.py", "x = 1\n", "not classified"),
    ],
)
def test_checker_catches_each_kind_of_violation(tmp_path: Path, relpath: str, source: str, expected: str) -> None:
    root = tmp_path / "pipeline"
    (root / relpath).parent.mkdir(parents=True, exist_ok=True)
    (root / "__init__.py").write_text("")
    (root / relpath).write_text(source)
    found = violations(root)
    assert len(found) == 1
    assert expected in found[0]


def test_allowed_imports_pass(tmp_path: Path) -> None:
    root = tmp_path / "pipeline"
    files = {
        "__init__.py": "__version__ = '0'\n",
        "records.py": "from pipeline.errors import DataError\n",
        "ingest/manifest.py": "from pipeline.ingest.dicom import x\nfrom pipeline.io import write_bytes\n",
        "ingest/dicom.py": "from . import nifti\nfrom .nifti import y\n",
        "tracking.py": "import mlflow\n",
        "run.py": "from pipeline import tracking\nfrom pipeline.finetune import finetune\n",
        "__main__.py": "from pipeline.cli import main\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    assert violations(root) == []


def test_no_module_imports_another_modules_private_names() -> None:
    """A name shared between modules is public (no leading underscore): its module owns a contract."""
    private = []
    for path in sorted(PIPELINE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("pipeline")):
                names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                private += [f"{path.relative_to(PIPELINE.parent)}:{node.lineno}: {n}" for n in names]
    assert private == []


def test_errors_keep_their_cause() -> None:
    """`raise X from None` hides the cause that `--debug` shows; errors chain with `from exc`."""
    hidden = []
    for path in sorted(PIPELINE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.cause, ast.Constant) and node.cause.value is None:
                hidden.append(f"{path.relative_to(PIPELINE.parent)}:{node.lineno}")
    assert hidden == []
