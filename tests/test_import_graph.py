"""No import cycles under velocis/: every `import` (at the top of a module or inside a function)
is an edge, a package's __init__ is its own node, and the graph must be acyclic. Cycles are what
made parts reach back into the model (mtp.py importing the decoder) and forced lazy imports."""
import ast
from pathlib import Path

import velocis

ROOT = Path(velocis.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """velocis modules `path` imports: `import a.b`, `from a import b` (b a module or a name in a)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in known else base)
    return {m for m in out if m in known and m != name}


def test_no_import_cycles():
    mods = modules()
    known = set(mods)
    graph = {name: imports(path, name, known) for name, path in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_imports():
    """The test can fail: it finds the edges it should (a top-level and a function-level import)."""
    mods = modules()
    g = imports(mods["velocis.models.decoder"], "velocis.models.decoder", set(mods))
    assert "velocis.models.block" in g and "velocis.models.mtp" in g
    g = imports(mods["velocis.cli"], "velocis.cli", set(mods))
    assert "velocis.errors" in g
