"""The package's shape, as docs/architecture.md draws it: stages import only stages below them (or
beside them), no import circle, modules and functions a reader can hold in their head."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tmad_ray"

# Lowest first. A module may import its own layer and the layers below, never one above.
LAYERS = [
    ["tmad_ray.errors", "tmad_ray.storage", "tmad_ray.cluster", "tmad_ray.plots", "tmad_ray.schema",
     "tmad_ray.config", "tmad_ray.recipe"],
    ["tmad_ray.data"],
    ["tmad_ray.models"],
    ["tmad_ray.distill"],
    ["tmad_ray.tracking", "tmad_ray.tracking_queue"],
    ["tmad_ray.train"],
    ["tmad_ray.serving"],
    ["tmad_ray.search"],
    ["tmad_ray.study", "tmad_ray.preflight"],
    ["tmad_ray.bench"],
    ["tmad_ray.cli", "tmad_ray.__main__", "tmad_ray.serving_entry"],
]
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60
WHOLE = "Long on purpose:"  # a longer function says why in its docstring


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at the top or inside functions alike."""
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tmad_ray"):
                for alias in node.names:  # `from tmad_ray import tracking` imports tmad_ray.tracking
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("tmad_ray")}
        # a package's (empty) __init__ is not a stage
        graph[name] = {d for d in deps if d in mods and d != name and mods[d].name != "__init__.py"}
    return graph


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in layer):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
                  for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))


def circles(graph: dict[str, set[str]]) -> list[str]:
    """Every import circle a depth-first walk meets, as ``a -> b -> a``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                found.append(" -> ".join(path[path.index(d):] + [m, d]))
            elif d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return found


def test_every_import_goes_down_or_sideways():
    problems = upward(imports(modules()))
    assert not problems, "\n".join(problems)


def test_no_import_circle():
    problems = circles(imports(modules()))
    assert not problems, "\n".join(problems)


def test_the_checks_see_an_upward_import_and_a_circle(tmp_path, monkeypatch):
    """The two checks above, on a package built to break them (a function-level import counts)."""
    pkg = tmp_path / "tmad_ray"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("def f():\n    from tmad_ray.cli import main\n")
    (pkg / "data" / "b.py").write_text("from tmad_ray.data import a\n")
    (pkg / "cli.py").write_text("from tmad_ray.data.b import x\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", pkg)
    graph = imports(modules())
    assert graph["tmad_ray.data.a"] == {"tmad_ray.cli"} and graph["tmad_ray.data.b"] == {"tmad_ray.data.a"}
    assert upward(graph) == ["tmad_ray.data.a (layer 1) imports tmad_ray.cli (layer 10)"]
    assert circles(graph) == ["tmad_ray.cli -> tmad_ray.data.b -> tmad_ray.data.a -> tmad_ray.cli"]


def test_modules_and_functions_stay_readable():
    too_long = []
    for name, path in modules().items():
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(source.splitlines())} lines > {MAX_MODULE_LINES}")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and WHOLE not in (ast.get_docstring(node) or ""):
                    too_long.append(f"{name}.{node.name}: {n} lines > {MAX_FUNCTION_LINES}, and its docstring "
                                    f"does not say why ({WHOLE!r})")
    assert not too_long, "\n".join(too_long)
