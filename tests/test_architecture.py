"""The package's folders are the chain: an import may only reach down it, never up, and there is no import loop.

images -> activations -> dictionary -> metrics and pictures. Each top-level room has a rank; a module may import
modules of its own rank or lower. Lazy imports inside functions count too: they are still a dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "c2mf_cli"

# rank of each top-level room of c2mf_cli (a module or a subpackage)
RANKS = {
    "errors": 0, "progress": 0, "devices": 0, "_io": 0, "distributed": 0,
    "inputs": 1,
    "artifacts": 2,
    "methods": 3,
    "metrics": 4,
    "render": 5,
    "stages": 6,
    "report": 7, "api": 7,
    "demo": 8,
    "commands": 9, "cli": 9,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the c2mf_cli modules (or packages) that `path` imports, at any depth of the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "c2mf_cli")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "c2mf_cli":
                continue
            for a in node.names:  # `from .x import y` may name a submodule y
                sub = f"{target}.{a.name}"
                found.add(sub if _exists(sub) else target)
    return found


def _exists(module: str) -> bool:
    p = PACKAGE.parent.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


# Upward imports still to remove, each with the issue that removes it. The test fails if one disappears without
# being struck from this list, so the list cannot rot.
KNOWN_UPWARD: set[str] = set()


def test_every_room_has_a_rank():
    rooms = {_room(m) for m in _graph()} - {None}
    assert rooms <= set(RANKS), f"rooms without a rank (add them to RANKS and docs/architecture.md): {rooms - set(RANKS)}"


def test_no_import_runs_up_the_chain():
    upward = []
    for module, targets in _graph().items():
        room = _room(module)
        if room is None:  # c2mf_cli/__init__.py re-exports the public API from every room
            continue
        for t in targets:
            troom = _room(t)
            if troom is not None and RANKS[troom] > RANKS[room]:
                upward.append(f"{module} -> {t}")
    new = sorted(set(upward) - KNOWN_UPWARD)
    assert not new, "imports that run back up the chain:\n" + "\n".join(new)
    gone = sorted(KNOWN_UPWARD - set(upward))
    assert not gone, "fixed upward imports still listed in KNOWN_UPWARD (strike them): " + ", ".join(gone)


def test_no_import_loop():
    full = _graph()
    graph = {m: {t for t in ts if t in full} for m, ts in full.items() if _room(m) is not None}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The graph reader itself: a relative import that climbs the chain is found (guards against a blind test)."""
    src = PACKAGE / "artifacts" / "dictionary.py"
    text = src.read_text()
    tree_imports = _imports(src)
    assert "c2mf_cli.errors" in tree_imports, "the reader must resolve `from ..errors import` to c2mf_cli.errors"
    fake = PACKAGE / "artifacts" / "_architecture_probe.py"
    try:
        fake.write_text("def f():\n    from ..stages import evaluate\n")
        assert "c2mf_cli.stages.evaluate" in _imports(fake)
    finally:
        fake.unlink()
    assert text == src.read_text()


DOC = PACKAGE.parent / "docs" / "architecture.md"


def _documented_files() -> set[str]:
    """The .py files the tree in docs/architecture.md draws, as paths relative to the repository root."""
    text = DOC.read_text()
    block = text[text.index("```\nc2mf_cli/") + 4:]
    block = block[: block.index("```")]
    found: set[str] = set()
    folders: list[tuple[int, str]] = []  # (indent, folder path)
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        first = line.split()[0]
        while folders and folders[-1][0] >= indent:
            folders.pop()
        parent = folders[-1][1] if folders else ""
        if first.endswith("/"):
            here = parent + first
            folders.append((indent, here))
        else:
            here = parent
        for name in re.findall(r"\b[\w]+\.py\b", line):
            found.add(here + name)
    return found


def test_the_tree_in_docs_architecture_is_true():
    actual = {str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
              if p.name != "__init__.py" or p.parent == PACKAGE}
    drawn = _documented_files()
    assert drawn == actual, (f"docs/architecture.md draws files that do not exist: {sorted(drawn - actual)}; "
                             f"and misses: {sorted(actual - drawn)}")
