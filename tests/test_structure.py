"""The shape of the code (issue 29), read from its syntax tree, not run: imports at module level only (a function that
imports hides a dependency or a cycle), optional dependencies through one door, no import cycle, files a reader can
hold in their head."""

import ast
from pathlib import Path

DGSS = Path(__file__).resolve().parents[1] / "dgss"
FILES = sorted(DGSS.rglob("*.py"))
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(DGSS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in FILES}


def imports_in_functions(tree: ast.AST) -> list[int]:
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            found += [n.lineno for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def test_no_import_inside_a_function():
    bad = [
        f"{p.relative_to(DGSS.parent)}:{line}"
        for p in FILES
        for line in imports_in_functions(ast.parse(p.read_text()))
    ]
    assert not bad, (
        f"imports inside functions (move them to the top; optional packages: compat.optional_module): {bad}"
    )


def test_run_time_imports_only_through_the_optional_module_door():
    """``importlib.import_module`` only in ``dgss.compat.optional_module`` (optional packages), in the methods
    package's discovery of its own modules, and in the front door's first-use imports (``dgss.load_method``)."""
    allowed = {DGSS / "compat.py", DGSS / "methods" / "__init__.py", DGSS / "__init__.py"}
    bad = []
    for p in FILES:
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", None)) in (
                "import_module",
                "__import__",
            ):
                if p not in allowed:
                    bad.append(f"{p.relative_to(DGSS.parent)}:{n.lineno}")
    assert not bad, bad


def dgss_imports(path: Path) -> set[str]:
    """The dgss modules ``path`` imports (a name imported from a package counts as its module when it is one)."""
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name.startswith("dgss")}
        elif isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("dgss"):
            for a in n.names:
                full = f"{n.module}.{a.name}"
                out.add(full if full in MODULES else n.module)
    return {m for m in out if m in MODULES and m != "dgss.conf"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w) :] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    """A package's ``__init__`` importing its own modules is not a cycle (they are its parts)."""
    graph = {}
    for name, path in MODULES.items():
        deps = dgss_imports(path)
        if path.name == "__init__.py":
            deps = {d for d in deps if not d.startswith(name + ".")}
        graph[name] = {d for d in deps if d != name}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_file_over_400_lines_and_fishertunes_wiring_within_300():
    long = {
        str(p.relative_to(DGSS.parent)): n
        for p in FILES
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long
    assert len((DGSS / "methods" / "fishertune" / "method.py").read_text().splitlines()) <= 300


def test_imports_in_functions_are_found():
    tree = ast.parse("import os\n\ndef f():\n    import json\n    return json\n")
    assert imports_in_functions(tree) == [4]


def test_the_front_door_gives_the_public_entry_points():
    import dgss
    from dgss.config import build_method
    from dgss.eval import evaluate
    from dgss.restore import load_method

    assert dgss.load_method is load_method
    assert dgss.build_method is build_method and dgss.evaluate is evaluate
    assert dgss.__version__ and set(dgss.__all__) == {
        "__version__",
        "build_method",
        "evaluate",
        "load_method",
    }
    # a command's module keeps its name: the front door never shadows dgss.train, dgss.predict, dgss.merge
    from dgss import merge, predict, train

    assert all(hasattr(m, "main") for m in (merge, predict, train))


def test_test_modules_share_code_through_the_helpers_package_only():
    """A test module never imports another (``from test_methods import ...`` runs that module's tests' imports and
    ties unrelated files together); shared builders live in ``tests/helpers``."""
    bad = []
    for p in sorted((DGSS.parent / "tests").glob("*.py")):
        for n in ast.walk(ast.parse(p.read_text())):
            names = (
                [a.name for a in n.names]
                if isinstance(n, ast.Import)
                else [n.module or ""]
                if isinstance(n, ast.ImportFrom)
                else []
            )
            bad += [
                f"{p.name}:{n.lineno} {m}" for m in names if m.split(".")[0].startswith(("test_", "conftest"))
            ]
    assert not bad, bad


def test_the_docstring_examples_of_the_pure_modules_hold():
    """The torchmetrics-style pure pieces carry a doctested example each (FisherTune's schedule, statistics and
    selection, the model's input, the renamed-option lookup, the optimizer recipe, the signature schemas)."""
    import doctest

    import dgss.methods.fishertune.schedule
    import dgss.methods.fishertune.score
    import dgss.methods.fishertune.selection
    import dgss.methods.fishertune.statistics
    import dgss.methods.input
    import dgss.methods.recipe
    import dgss.options
    import dgss.schemas

    modules = [dgss.methods.fishertune.schedule, dgss.methods.fishertune.score, dgss.methods.fishertune.selection,
               dgss.methods.fishertune.statistics, dgss.methods.input, dgss.methods.recipe, dgss.options, dgss.schemas]  # fmt: skip
    results = [doctest.testmod(m, verbose=False) for m in modules]
    assert all(r.failed == 0 for r in results) and all(r.attempted > 0 for r in results)
