"""The house: every import points down a floor, no module imports in a circle, no module runs
over 400 lines without saying why at its top.

Run alone with ``pytest tests/unit/test_layers.py``; a failure names the importing module, the
line and the floors involved. Imports inside functions and under ``TYPE_CHECKING`` count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "idla"

# Top to bottom (../shared/DESIGN.md, the README's "How it works"). Parts on one floor do not
# import each other; a part imports only from the floors below it and from its own folder.
FLOORS: list[tuple[str, ...]] = [
    ("cli",),
    ("bench",),
    ("pool",),
    ("jobs",),
    ("fl", "serve"),
    ("agent",),
    ("elastic",),
    ("sync",),
    ("plan",),
    ("profile",),
    ("runtime",),
    ("compress", "emulate", "demo"),
    ("errors", "report"),
]
FLOOR_OF = {part: height for height, parts in enumerate(reversed(FLOORS)) for part in parts}
MAX_LINES = 400
REASON_MARK = "Longer than 400 lines because"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported idla module, line) for every import in the file, wherever it stands."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from idla.x import y` imports module idla.x.y when y is a module
            candidates = [f"{module}.{alias.name}" for alias in node.names] + [module]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate in known:
                found.append((candidate, node.lineno))
    return found


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, list[tuple[str, int]]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_every_part_has_a_floor() -> None:
    parts = {_part(name) for name in _modules()} - {""}
    assert parts <= set(FLOOR_OF), f"parts without a floor: {sorted(parts - set(FLOOR_OF))}"


def test_imports_point_down() -> None:
    upward = []
    for name, imports in _graph().items():
        part = _part(name)
        if not part:  # idla/__init__.py: the public API, above every floor
            continue
        for target, line in imports:
            other = _part(target)
            if other == part:
                continue
            if not other or FLOOR_OF[other] >= FLOOR_OF[part]:
                upward.append(f"{name}:{line} imports {target} ({part} -> {other or 'idla'})")
    assert not upward, "imports that do not point down a floor:\n" + "\n".join(upward)


def test_no_import_circles() -> None:
    graph = {name: sorted({t for t, _ in imports if t != name})
             for name, imports in _graph().items()}
    # a package's __init__ re-exporting its own modules is not a circle through them
    state: dict[str, int] = {}
    circles: list[str] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in graph[node]:
            if target.startswith(node + "."):
                continue
            if state.get(target) == 1:
                circles.append(" -> ".join([*trail[trail.index(target):], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_long_modules_say_why() -> None:
    long = []
    for name, path in _modules().items():
        text = path.read_text()
        lines = text.count("\n")
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if lines > MAX_LINES and REASON_MARK not in docstring:
            long.append(f"{name}: {lines} lines")
    assert not long, f"modules over {MAX_LINES} lines without '{REASON_MARK}' at the top: {long}"


def test_the_checker_sees_an_upward_import() -> None:
    known = {"idla.runtime.group", "idla.agent.agent"}
    source = PACKAGE / "runtime" / "group.py"
    imports = _imports("idla.runtime.group", source, known)
    assert all(target != "idla.agent.agent" for target, _ in imports)
    fake = Path(__file__).with_name("_layers_probe.py")
    try:
        fake.write_text("def f():\n    from idla.agent.agent import Agent\n")
        assert _imports("idla.runtime.probe", fake, known) == [("idla.agent.agent", 2)]
    finally:
        fake.unlink()


def _public(module: str) -> set[str]:
    init = PACKAGE.parent / Path(*module.split(".")) / "__init__.py"
    tree = ast.parse(init.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            names: set[str] = set()
            for item in node.value.elts:  # type: ignore[attr-defined]
                if isinstance(item, ast.Constant):
                    names.add(item.value)
                elif isinstance(item, ast.Starred):  # *sorted(_LAZY)
                    names |= _lazy_names(tree)
            return names
    raise AssertionError(f"{module} has no __all__")


def _lazy_names(tree: ast.Module) -> set[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_LAZY":
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}  # type: ignore[attr-defined]
    return set()


def test_examples_use_only_public_names() -> None:
    """A user's script reads like the examples: names from `idla` and the packages' own
    `__all__` (idla.fl, idla.demo), never a module inside them."""
    private = []
    for example in sorted((PACKAGE.parents[1] / "examples").glob("*.py")):
        for node in ast.walk(ast.parse(example.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("idla"):
                module = node.module or ""
                if module not in {"idla", "idla.fl", "idla.demo"}:
                    private.append(f"{example.name}:{node.lineno} imports {module}")
                    continue
                missing = {a.name for a in node.names} - _public(module)
                private += [f"{example.name}:{node.lineno} imports {module}.{name}"
                            for name in sorted(missing)]
    assert not private, "examples reach past the public API:\n" + "\n".join(private)
