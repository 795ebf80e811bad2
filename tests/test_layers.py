"""The package's imports point one way and form no cycle, read from the source with `ast` (nothing is imported).

Layers, lowest first; a module may import its own layer or lower ones, never a higher one:
    0 validation and params   fastattn.params
    1 backends                fastattn.ops, fastattn.backends.* (a backend's kernels live in its folder)
    2 dispatch                fastattn.dispatch
    3 public surfaces         fastattn (the package), functional, kvcache (+ rotary), packed, padding, nn, patch,
                              blocks, distributed.*, integrations.*, models.*, compat.*
    4 tools                   fastattn.benchmark.*, fastattn.info
Imports inside functions of fastattn's own modules are not allowed (they hide cycles), except the Triton kernel
modules, which import triton and are loaded only when a Triton backend runs."""
import ast
import os

import fastattn

PKG_DIR = os.path.dirname(fastattn.__file__)
LAYERS = [("fastattn.params",),
          ("fastattn.ops", "fastattn.backends"),
          ("fastattn.dispatch",),
          ("fastattn", "fastattn.functional", "fastattn.kvcache", "fastattn.rotary", "fastattn.packed",
           "fastattn.padding", "fastattn.nn", "fastattn.blocks", "fastattn.distributed",
           "fastattn.integrations", "fastattn.models", "fastattn.compat"),
          ("fastattn.benchmark", "fastattn.info")]
LAZY_OK = ("fastattn.backends.triton.kernels",)  # imports triton: loaded when a Triton backend runs
# Function-level imports that remain in modules this change does not own; delete an entry when its import moves
# to the top of the module (the test fails on a stale entry).
KNOWN_LAZY = {("fastattn.benchmark.env", "fastattn"),
              ("fastattn.benchmark.check", "fastattn.benchmark.inputs"),
              ("fastattn.benchmark.cli", "fastattn.benchmark.model"),
              ("fastattn.benchmark.model", "fastattn.models.bert"), ("fastattn.benchmark.model", "fastattn.models.gpt2")}


def _modules():
    """module name -> (path, is_package)"""
    out = {}
    for root, _, files in os.walk(PKG_DIR):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG_DIR))[:-3].split(os.sep)
                pkg = rel[-1] == "__init__"
                out[".".join(rel[:-1] if pkg else rel)] = (path, pkg)
    return out


MODULES = _modules()


def _resolve(importer: str, is_pkg: bool, node) -> list:
    """The fastattn modules an import statement loads (a `from x import y` may name a submodule y)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "fastattn"]
    base = node.module or ""
    if node.level:
        parts = importer.split(".")
        parts = parts if is_pkg else parts[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    if base.split(".")[0] != "fastattn":
        return []
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        if sub in MODULES:
            out.append(sub)
        elif not _is_extension(sub):  # a name defined in base (the C++ extension imports nothing of ours)
            out.append(base)
    return out


def _is_extension(mod: str) -> bool:
    folder = os.path.join(os.path.dirname(PKG_DIR), *mod.split(".")[:-1])
    leaf = mod.split(".")[-1] + "."
    return os.path.isdir(folder) and any(f.startswith(leaf) and f.endswith((".so", ".pyd")) for f in os.listdir(folder))


def _graph():
    """(edges: importer -> {imported, with the packages a module outside them must initialise}, lazy imports)"""
    edges, lazy = {}, set()
    for name, (path, is_pkg) in MODULES.items():
        tree = ast.parse(open(path).read(), path)
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        deps = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = _resolve(name, is_pkg, node)
            if id(node) in in_function:
                lazy |= {(name, t) for t in targets}
                continue
            for t in targets:
                deps.add(t)
                parts = t.split(".")
                for i in range(2, len(parts)):  # importing a.b.c runs a.b's __init__ unless we are inside a.b
                    parent = ".".join(parts[:i])
                    if not (name + ".").startswith(parent + "."):
                        deps.add(parent)
        edges[name] = {d for d in deps if d != name}
    return edges, lazy


def _layer(mod: str) -> int:
    best, level = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{mod} is in no layer: add it to LAYERS"
    return level


def test_every_module_has_a_layer():
    for mod in MODULES:
        _layer(mod)


def test_no_upward_imports():
    edges, _ = _graph()
    bad = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
           for a, deps in sorted(edges.items()) for b in sorted(deps) if _layer(b) > _layer(a)]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    edges, _ = _graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    # the package __init__ imports everything and every submodule's import runs it first: that is not a cycle
    cycles = [c for c in cycles if not c.startswith("fastattn -> ") and " -> fastattn -> " not in c]
    assert not cycles, "\n".join(cycles)


def test_no_function_level_imports_of_our_modules():
    _, lazy = _graph()
    found = {(a, b) for a, b in lazy if not any(b == p or b.startswith(p + ".") for p in LAZY_OK)}
    assert found <= KNOWN_LAZY, "imports inside functions (move them to the top): " + str(sorted(found - KNOWN_LAZY))
    assert KNOWN_LAZY <= found, "stale KNOWN_LAZY entries (fixed; delete them): " + str(sorted(KNOWN_LAZY - found))


def test_tests_import_only_from_support():
    """Test modules share helpers through tests/support, never by importing each other."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    local = {f[:-3] for f in os.listdir(tests_dir) if f.endswith(".py")} | {
        d for d in os.listdir(tests_dir) if os.path.isdir(os.path.join(tests_dir, d)) and d != "support"}
    bad = []
    for f in sorted(os.listdir(tests_dir)):
        if not f.endswith(".py"):
            continue
        for node in ast.walk(ast.parse(open(os.path.join(tests_dir, f)).read())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{f}: {n}" for n in names if n.split(".")[0] in local]
    assert not bad, "\n".join(bad)
