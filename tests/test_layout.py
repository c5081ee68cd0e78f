"""The package's layout as a contract: small modules and functions, one home per file format, the core
independent of slides and stores, no module reaching into another's private names (nor the tests)."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "smoothsal"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
CORE = ("models", "smoothing", "attribution", "metrics")  # the method itself: no slides, tiles, stores
DATA_SIDE = ("slides", "tissue", "grid", "annotations", "tiles", "tiling", "store", "container", "heatmaps",
             "saliency", "stitching", "report", "viewer", "napari", "evaluation", "demo", "seams", "overlap",
             "qupath")  # fmt: skip
FORMAT_CALLS = {"read_parquet", "to_parquet", "open_group"}
FORMAT_HOMES = {"tiles.py", "store.py", "container.py"}  # the tile table, the saliency output, the container


def modules() -> dict[str, Path]:
    """Dotted name → file of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(path: Path, name: str) -> list[tuple[str, str | None]]:
    """(module, imported name or None) of every import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out += [(base, alias.name) for alias in node.names]
    return out


def test_no_module_over_500_lines_and_no_function_over_80():
    long_modules, long_functions = [], []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append((name, len(text.splitlines())))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append((f"{name}.{node.name}", lines))
    assert not long_modules, long_modules
    assert not long_functions, long_functions


def test_import_rules():
    """The library never imports the CLI; the core imports nothing of the data side; nobody imports a
    private name of another module (`from .x import _y`)."""
    problems = []
    for name, path in modules().items():
        for module, what in imported(path, name):
            if not name.startswith("smoothsal.cli") and module.startswith("smoothsal.cli"):
                problems.append(f"{name} imports the CLI ({module})")
            core, data_side = name.split(".")[-1] in CORE, module.split(".")[1:2] in [[d] for d in DATA_SIDE]
            if core and module.startswith("smoothsal.") and data_side:
                problems.append(f"core module {name} imports {module}")
            if module.startswith("smoothsal") and what and what.startswith("_") and not what.startswith("__"):
                problems.append(f"{name} imports the private name {module}.{what}")
    assert not problems, problems


def private_uses(path: Path) -> list[str]:
    """Private names of smoothsal modules a file reaches: imported, or as an attribute of a module."""
    tree = ast.parse(path.read_text())
    aliases = set()  # local names bound to smoothsal modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("smoothsal"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{node.module}.{alias.name}")
                aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name.startswith("smoothsal")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases | {"ss", "smoothsal"}:
                found.append(ast.unparse(node))
    return found


def test_no_private_names_are_reached_from_other_modules_or_the_tests():
    uses = {
        str(p.relative_to(ROOT)): private_uses(p)
        for p in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py")]
    }
    assert {k: v for k, v in uses.items() if v} == {}


def test_each_file_format_is_read_and_written_in_one_module():
    """The tile table (tiles.py), the saliency store and its results table (store.py), the heatmap
    container (container.py): nothing else in the package calls Parquet or Zarr group I/O."""
    calls = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in FORMAT_CALLS
                and path.name not in FORMAT_HOMES
            ):
                calls.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.attr}")
    assert not calls, calls
