"""The shape of the package: one error family, no import cycles, a loop that reads in one screen."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import vlmtune
from vlmtune import errors

PACKAGE = Path(vlmtune.__file__).parent
# The modules one training step reads through stay short: no function over this many lines.
STEP_MODULES = ("train.py", "encode.py", "batching.py", "loss.py")
MAX_FUNCTION_LINES = 60


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(path: Path) -> set[str]:
    """Every vlmtune module `path` imports when it runs, imports inside functions included; imports under
    ``if TYPE_CHECKING:`` are annotations only and never execute."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vlmtune"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlmtune"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from vlmtune import x` (a module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_no_import_cycles():
    mods = {}
    for info in pkgutil.walk_packages([str(PACKAGE)], "vlmtune."):
        spec = importlib.util.find_spec(info.name)
        mods[info.name] = Path(spec.origin)
    graph = {name: {m for m in runtime_imports(path) if m in mods and m != name} for name, path in mods.items()}
    cycles, state = [], {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                walk(dep, [*path, dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_user_facing_error_is_a_vlmtune_error():
    """The CLI catches VlmtuneError (exit 2, one message): an error class outside that family would reach a user
    as a traceback. SampleError is the one exception: a bad sample is skipped and counted, never raised to the CLI."""
    defined = []
    for info in pkgutil.walk_packages([str(PACKAGE)], "vlmtune."):
        if info.name == "vlmtune.__main__":  # runs the CLI
            continue
        module = importlib.import_module(info.name)
        defined += [obj for _, obj in inspect.getmembers(module, inspect.isclass)
                    if issubclass(obj, BaseException) and obj.__module__.startswith("vlmtune")]
    assert {c.__name__ for c in defined} >= {"RecipeError", "DataError", "PackingError", "DistributedError"}
    outside = {c.__qualname__ for c in defined if not issubclass(c, errors.VlmtuneError)} - {"SampleError"}
    assert not outside, f"derive these from vlmtune.errors.VlmtuneError: {sorted(outside)}"


def test_the_step_modules_have_short_functions():
    long = []
    for name in STEP_MODULES:
        tree = ast.parse((PACKAGE / name).read_text())
        long += [f"{name}:{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
                 if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                 and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"split these (at most {MAX_FUNCTION_LINES} lines): {long}"
