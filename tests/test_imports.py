"""The package's layering, read from its source: no import cycles between spp's modules (module-level and
function-local imports alike), spp modules imported at the top of each module (a function-local import only
where a lazy load is the point, each listed here with its reason), and the model libraries behind
spp/models/."""
import ast
import os
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "spp")
# (module, function): why it imports an spp module inside a function
LAZY = {("spp", "__getattr__"): "spp.MaskedAttention & co. load timm's modules (and keep_cpu_memory the run "
                                "plumbing) on first use, so `import spp` loads neither"}


def _modules() -> Dict[str, str]:
    mods = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                mods[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _imports(mods: Dict[str, str]) -> List[Tuple[str, str, str]]:
    """``(importer, imported spp module, function or "")`` for every import of an spp module."""
    out = []
    for module, path in mods.items():
        tree = ast.parse(open(path).read())
        owner = {}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    owner.setdefault(id(node), fn.name)
        package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target not in mods and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in mods and target != module:
                    out.append((module, target, owner.get(id(node), "")))
    return out


def _cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_spp_modules():
    mods = _modules()
    assert "spp.models.decoder" in mods and "spp.family" in mods
    edges: Dict[str, Set[str]] = {m: set() for m in mods}
    for importer, imported, _ in _imports(mods):
        edges[importer].add(imported)
    assert sum(map(len, edges.values())) > 100      # the reader sees the package's imports
    cycles = _cycles(edges)
    assert not cycles, f"import cycles between spp modules: {cycles}; move what both need into a lower module"


def test_spp_modules_are_imported_at_the_top():
    local = [(m, t, fn) for m, t, fn in _imports(_modules()) if fn and (m, fn) not in LAZY]
    assert not local, (f"function-local imports of spp modules: {local}; import them at the top of the module "
                       "(or, where a lazy load is the point, list the function in tests/test_imports.py's LAZY)")


def test_model_libraries_are_imported_at_module_level_only_in_spp_models():
    """timm and transformers load when a model of theirs is used: no module outside spp/models/ imports them at
    its top."""
    offenders = []
    for module, path in _modules().items():
        if module.startswith("spp.models"):
            continue
        for node in ast.parse(open(path).read()).body:
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [(module, n) for n in names if n.split(".")[0] in ("timm", "transformers", "peft", "lm_eval")]
    assert not offenders, offenders


@pytest.mark.parametrize("module", ["spp.cli", "spp.commands.family", "spp.commands.eval", "spp.commands.search", "spp.commands.retrain", "spp.demo_llm"])
def test_the_commands_load_no_model_library(module):
    import subprocess
    import sys
    code = f"import sys, {module}; print(sorted(m for m in ('timm', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_docs_design_places_every_module():
    """docs/design.md's layer list names every module of spp (by its dotted name, or its file or short name on
    its package's line), so a new module gets a place in the map."""
    import re
    design = open(os.path.join(os.path.dirname(PACKAGE), "docs", "design.md")).read()
    block = design.split("## Layers", 1)[1].split("```")[1]
    missing = [m for m in _modules() if m != "spp" and m not in block
               and not re.search(rf"\b{re.escape(m.rsplit('.', 1)[1])}\b", block)]
    assert not missing, f"modules docs/design.md's layers do not place: {missing}"
