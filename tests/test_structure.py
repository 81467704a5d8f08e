"""The package's shape: no import circle among its modules (function-level imports included) and no module past 450
lines but the three that each hold one concept (docs/contributing.md, "Where things live").

Read from the source with `ast`, without importing it. Every `import` / `from ... import` statement counts wherever it
stands: at the top, inside a function (a circle hidden by a function-level import is a circle deferred to run time,
not gone) and under `if TYPE_CHECKING:` (a type named from a module above is a dependency on it all the same). A
module's package `__init__` is not counted as imported by the module itself (importing `a.b` runs `a/__init__.py`,
which may import `a.b`: that is Python's package loading, not a circle), nor are dynamic imports by name
(`importlib.import_module(f".{name}")` in the package root's lazy `__getattr__`).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "trl_retmask"
MAX_LINES = 450
ONE_CONCEPT_PAST_MAX = {"config.py", "pairs.py", "generation/vllm.py"}
"""Each one concept (issue 29): the config dataclass; pair generation; the vLLM backend (TRL's own
`trl/generation/vllm_generation.py` is 754 lines for the same one)."""


def package_modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package under `root`, by its dotted name (a package by its `__init__.py`)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its source (relative and absolute imports alike)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                source = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import sub` imports the submodule `pkg.sub`; `from mod import name` imports `mod`.
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` where c is a name: its nearest module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports, function-level and TYPE_CHECKING imports included."""
    modules = package_modules(root)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / f"{name}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


# ------------------------------------------------------------------------------------------------ the reader
def test_a_circle_closed_in_a_function_or_a_type_checking_block_is_found(tmp_path):
    """Top-level a -> b, b -> c only inside a function, c -> a only under TYPE_CHECKING: one circle of three."""
    pkg = write_package(
        tmp_path,
        {
            "__init__": "",
            "a": "from .b import x\n",
            "b": "def f():\n    from .c import y\n",
            "c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n",
            "d": "import os\nfrom pkg.a import x\n",
        },
    )
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}, "pkg.d": {"pkg.a"}}
    assert circles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_a_package_init_importing_its_submodules_is_no_circle(tmp_path):
    """`sub/__init__` importing `sub.e`, and `sub.e` a sibling, is package loading, not a circle; `sub.f` importing
    a module that imports `sub` closes one."""
    files = {
        "__init__": "",
        "sub/__init__": "from .e import z\nfrom .f import w\n",
        "sub/e": "from . import f\n",
        "sub/f": "W = 1\n",
    }
    assert circles(import_graph(write_package(tmp_path / "one", files))) == []
    files = {**files, "top": "from .sub import z\n", "sub/f": "import pkg.top\n"}
    graph = import_graph(write_package(tmp_path / "two", files))
    assert graph["pkg.sub.e"] == {"pkg.sub.f"} and graph["pkg.sub.f"] == {"pkg.top"}
    assert circles(graph) == [["pkg.sub", "pkg.sub.e", "pkg.sub.f", "pkg.top"]]


# ------------------------------------------------------------------------------------------------ the package
def test_no_import_circle_among_the_package_modules():
    """Issue 29: heads <-> masking/scores closed through function-level imports; the vocabulary (`heads`, `layout`)
    now sits below what uses it, and `selection` above the scores."""
    graph = import_graph()
    assert circles(graph) == []
    assert {"trl_retmask.heads", "trl_retmask.layout", "trl_retmask.selection", "trl_retmask.niah_samples"} <= set(
        graph
    )
    assert graph["trl_retmask.heads"] <= {"trl_retmask.layout", "trl_retmask.validation"}


def test_the_library_modules_import_nothing_from_the_cli():
    """The command line sits on top: `locks` imported `scripts` (for the stage names) so a lock's owner record could
    name the stage; the stage is now handed down by `run_stage` (`locks.running_stage`)."""
    cli = {m for m in import_graph() if m == "trl_retmask.cli" or m.startswith("trl_retmask.scripts")}
    upward = {m: deps & cli for m, deps in import_graph().items() if m not in cli and deps & cli}
    assert upward == {}
    assert "trl_retmask.locks" in import_graph()["trl_retmask.scripts"]  # the direction the stage travels


def test_moved_names_still_import_from_their_old_modules():
    """Callers written before the split keep working: `masking` re-exports the layout, `niah` the sample builder."""
    from trl_retmask import layout, masking, niah, niah_samples

    assert masking.head_layout is layout.head_layout and masking.attention_modules is layout.attention_modules
    moved = set(niah_samples.__all__) - {n for n in niah_samples.__all__ if n.startswith("DEFAULT_")}
    assert moved <= set(niah.__all__)
    assert all(getattr(niah, n) is getattr(niah_samples, n) for n in moved)


def test_no_module_past_450_lines_but_the_one_concept_ones():
    lengths = {
        str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines()) for p in package_modules().values()
    }
    over = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert set(over) <= ONE_CONCEPT_PAST_MAX, over
