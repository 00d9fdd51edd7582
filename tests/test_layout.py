"""The house rules, checked on the source: imports flow one way, one loop, small files."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "mtp"

# Floors, bottom up; a module may import its own floor and those below it.
FLOORS = [
    {"errors", "files"},
    {"config"},
    {"model", "data"},
    {"decode"},
    {"train", "rl", "checkpoint", "sharding", "metrics"},
    {"programs", "evals"},
    {"run"},
]


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        yield name, path, ast.parse(path.read_text())


def _mtp_imports(tree, module_level_only: bool):
    nodes = tree.body if module_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mtp"):
            yield node.module, node
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mtp"):
                    yield alias.name, node


def _floor(module: str) -> int:
    top = module.split(".")[1] if "." in module else "mtp"
    return next(i for i, f in enumerate(FLOORS) if top in f)


def test_no_module_imports_a_floor_above_its_own():
    bad = []
    for name, _, tree in _modules():
        if name == "mtp":
            continue
        for target, node in _mtp_imports(tree, module_level_only=False):
            if target != "mtp" and _floor(target) > _floor(name):
                bad.append(f"{name}:{node.lineno} imports {target}")
    assert not bad, bad


def test_no_import_cycle_among_mtp_modules():
    graph = {}
    for name, _, tree in _modules():
        graph[name] = {t for t, _ in _mtp_imports(tree, module_level_only=False)}
    state = {}

    def visit(n, stack):
        state[n] = "open"
        for m in graph.get(n, ()):
            if m not in graph:
                continue
            if state.get(m) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [n, m]))
            if m not in state:
                visit(m, stack + [n])
        state[n] = "done"

    for n in graph:
        if n not in state:
            visit(n, [])


def test_no_function_local_import_of_mtp_outside_the_entry_point():
    bad = []
    for name, _, tree in _modules():
        if name == "mtp.run":
            continue
        top = {id(n) for _, n in _mtp_imports(tree, module_level_only=True)}
        for target, node in _mtp_imports(tree, module_level_only=False):
            if id(node) not in top:
                bad.append(f"{name}:{node.lineno} imports {target} inside a function")
    assert not bad, bad


def test_no_module_holds_token_ids_as_constants():
    pattern = re.compile(r"\b(PAD|BOS|EOS|THINK_OPEN|THINK_CLOSE|PAUSE)_ID\b")
    bad = [f"{n}: {m.group()}" for n, p, _ in _modules() for m in pattern.finditer(p.read_text())]
    assert not bad, bad


def test_decode_has_one_while_loop_and_files_stay_small():
    texts = {n: p.read_text() for n, p, _ in _modules()}
    loops = [n for n, text in texts.items() if n.startswith("mtp.decode") and "while_loop(" in text]
    assert loops == ["mtp.decode.engine"], loops
    lines = {n: len(text.splitlines()) for n, text in texts.items()}
    assert not [f"{n}: {k}" for n, k in lines.items() if k > 400]
