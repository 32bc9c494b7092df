"""The package's one import rule: imports point down the floors, and no module imports itself in a cycle.

Floor 0 (no torch): errors, paths, config, tokenizer. Floor 1, the core: attention, cache, model,
heads, outputs, sampling, pretrained. Floor 2, transforms of a built model: quant, backends,
distributed. Floor 3: io, convert. Floor 4: engine, generation. Floor 5, applications: server, cli,
train, recipes. The core never imports ctypes or torch.distributed; floor 0 never imports torch.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gemma2"

FLOORS = {
    "errors": 0,
    "paths": 0,
    "config": 0,
    "tokenizer": 0,
    "sentencepiece_bpe": 0,
    "attention": 1,
    "cache": 1,
    "model": 1,
    "heads": 1,
    "outputs": 1,
    "sampling": 1,
    "pretrained": 1,
    "quant": 2,
    "backends": 2,
    "distributed": 2,
    "io": 3,
    "convert": 3,
    "engine": 4,
    "generation": 4,
    "server": 5,
    "cli": 5,
    "train": 5,
    "recipes": 5,
}
# The package's front door and `python -m gemma2` see every floor.
EXEMPT = {"__init__", "__main__"}
# Lazy imports (inside a function) that keep a familiar name on a model: from_pretrained and
# save_pretrained read and write through io, generate() runs the engine's generation loop.
# Gemma2Config.from_pretrained / to_json_file read and write config.json through io too.
LAZY_EXCEPTIONS = {("pretrained", "io"), ("heads", "generation"), ("config", "io"), ("tokenizer", "io")}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found["gemma2." + ".".join(parts)] = path
    return found


def top(name: str) -> str:
    """The floor key of a module name: gemma2.backends.cpu.kernels -> backends."""
    return name.split(".")[1]


def imports(path: Path, name: str) -> list[tuple[str, bool, int]]:
    """(imported module, at module level?, line) for every import in a file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, module_level: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, module_level, True)  # type-only imports: no runtime edge
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False, type_checking)
                continue
            if not type_checking and isinstance(child, ast.Import):
                found.extend((alias.name, module_level, child.lineno) for alias in child.names)
            elif not type_checking and isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                found.append((base, module_level, child.lineno))
                # `from gemma2 import quant` imports the submodule gemma2.quant
                if base == "gemma2":
                    found.extend((f"gemma2.{alias.name}", module_level, child.lineno) for alias in child.names)
            visit(child, module_level, type_checking)

    visit(tree, True, False)
    return found


MODULES = modules()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name: str) -> None:
    own = top(name) if name != "gemma2" else "__init__"
    if own in EXEMPT or name == "gemma2":
        return
    assert own in FLOORS, f"{name}: give the module a floor in this test (and the layout)"
    problems = []
    for target, module_level, line in imports(MODULES[name], name):
        floor_zero = own in ("errors", "paths", "config", "tokenizer", "sentencepiece_bpe")
        if floor_zero and module_level and target.split(".")[0] == "torch":
            problems.append(f"line {line}: floor 0 imports torch (it must import without torch)")
        if FLOORS[own] == 1 and (target == "ctypes" or target.startswith("torch.distributed")):
            problems.append(f"line {line}: the core imports {target}")
        if not target.startswith("gemma2.") or target in ("gemma2",):
            continue
        other = top(target)
        # Inside backends/: one backend never imports another (the package itself, the shared seam,
        # may be imported by each, and its __init__ hands out the backends).
        mine, theirs = name.split(".")[2:3], target.split(".")[2:3]
        if own == other == "backends" and mine and theirs and mine != theirs:
            problems.append(f"line {line}: one backend imports another ({target})")
        if other in EXEMPT or other not in FLOORS or other == own:
            continue
        if FLOORS[other] > FLOORS[own] and not (not module_level and (own, other) in LAZY_EXCEPTIONS):
            problems.append(f"line {line}: floor {FLOORS[own]} imports {target} (floor {FLOORS[other]})")
    assert not problems, f"{name}:\n" + "\n".join(problems)


def test_module_level_imports_have_no_cycles() -> None:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, module_level, _ in imports(path, name):
            if module_level and target in graph and target != name:
                graph[name].add(target)
    # A package imports its own submodules from its __init__: that is not a cycle between floors.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)


def test_no_source_file_is_much_past_500_lines() -> None:
    long = {
        str(path.relative_to(PACKAGE)): n
        for path in PACKAGE.rglob("*")
        if path.suffix in (".py", ".c") and (n := len(path.read_text(encoding="utf-8").splitlines())) > 560
    }
    assert not long, f"split these files: {long}"


def test_every_data_file_of_the_package_is_installed() -> None:
    """Files the package reads at run time (C sources and headers, the demo model) are package data."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["gemma2"]
    missing = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*")
        if path.is_file()
        and path.suffix not in (".py", ".pyc")
        and "__pycache__" not in path.parts
        and not any(fnmatch.fnmatch(str(path.relative_to(PACKAGE)), pattern) for pattern in patterns)
    ]
    assert not missing, f"add to [tool.setuptools.package-data] in pyproject.toml: {missing}"
