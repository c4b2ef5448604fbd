"""The house rules, checked on the source: no import cycles between attnlab's modules, every
attnlab import at the top of its module (no hidden function-level imports), no source function
longer than about a screen."""

import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "attnlab"
MAX_FUNCTION_LINES = 80
LONG_FUNCTIONS: dict[str, str] = {}  # "module:function" -> why it may be longer


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return found


def attnlab_imports(node, known: set[str]) -> list[str]:
    """The attnlab modules an import statement names (``from attnlab.x import y`` names x, or x.y
    when y is itself a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "attnlab"]
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "attnlab":
        subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
        return subs or [node.module]
    return []


def test_no_import_cycles_and_every_attnlab_import_is_at_the_top():
    found = modules()
    known = set(found)
    graph, nested = {}, []
    for name, tree in found.items():
        graph[name] = {m for stmt in tree.body for m in attnlab_imports(stmt, known) if m != name}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                nested += [f"{name}:{node.name} imports {m}" for inner in ast.walk(node)
                           for m in attnlab_imports(inner, known)]
    assert not nested, "function-level imports of attnlab modules:\n" + "\n".join(sorted(set(nested)))
    cycles = []

    def visit(module, path, on_path, done):
        on_path.add(module)
        for target in sorted(graph.get(module, ())):
            if target in on_path:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in done:
                visit(target, path + [target], on_path, done)
        on_path.discard(module)
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module], set(), done)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_function_is_longer_than_a_screen():
    long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and f"{name}:{node.name}" not in LONG_FUNCTIONS:
                    long.append(f"{name}:{node.name} has {lines} lines")
    assert not long, "\n".join(long)
