"""The layering ``lib/__init__.py`` and ``docs/architecture.md`` describe: each subpackage of ``lib`` imports only
the ones before it, ``lib`` never imports the server side (``apps``, ``infers``, ``trainers``, ``monailabel``), and
the tests may use the benchmarks' reference code but not the other way round."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["common", "modeling", "guard", "io", "serving", "training", "loop"]
SERVER_SIDE = ("apps", "infers", "trainers", "monailabel")


def imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports, at any depth (function-level imports included)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def test_lib_subpackages_import_only_earlier_layers() -> None:
    wrong = []
    for layer, name in enumerate(LAYERS):
        for path in sorted((ROOT / "lib" / name).glob("*.py")):
            for module in imported_modules(path):
                parts = module.split(".")
                if parts[0] == "lib" and len(parts) > 1 and parts[1] in LAYERS and LAYERS.index(parts[1]) > layer:
                    wrong.append(f"{path.relative_to(ROOT)} imports {module}")
                if parts[0] in SERVER_SIDE:
                    wrong.append(f"{path.relative_to(ROOT)} imports the server side: {module}")
    assert not wrong, "\n".join(wrong)


def test_every_lib_module_is_in_a_layer() -> None:
    loose = [p.name for p in (ROOT / "lib").glob("*.py") if p.name != "__init__.py"]
    packages = {p.name for p in (ROOT / "lib").iterdir() if (p / "__init__.py").is_file()}
    assert not loose and packages == set(LAYERS), (loose, packages)


def test_benchmarks_do_not_import_tests() -> None:
    wrong = [
        f"{path.name} imports {module}"
        for path in sorted((ROOT / "benchmarks").glob("*.py"))
        for module in imported_modules(path)
        if module.split(".")[0] == "tests"
    ]
    assert not wrong, wrong
