"""Build the API reference from the docstrings (pdoc) and check that every public name of spp has one.

    make docs                                   # = python scripts/build_docs.py --out docs/api
    python scripts/build_docs.py --check-only   # the check alone (the test suite runs it)

Public names: what a module's ``__all__`` lists (or, without one, the functions and classes it defines
whose names do not start with ``_``), and the public methods those classes define themselves. Exits 1 and
lists every public name without a docstring.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
import warnings
from typing import List

import spp


def modules() -> List[str]:
    """spp and every module under it (``spp.__main__`` runs the CLI on import: left out)."""
    names = [m.name for m in pkgutil.walk_packages(spp.__path__, "spp.") if not m.name.endswith("__main__")]
    return ["spp", *sorted(names)]


def public(module) -> List[tuple]:
    """``(qualified name, object)`` of a module's public functions and classes and those classes' own methods."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, obj in vars(module).items() if not n.startswith("_")
                 and (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module.__name__]
    out = []
    for name in names:
        obj = getattr(module, name)
        if inspect.ismodule(obj):
            continue
        out.append((f"{module.__name__}.{name}", obj))
        if inspect.isclass(obj) and obj.__module__ == module.__name__:
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and inspect.isfunction(member) and not _inherits_doc(obj, attr):
                    out.append((f"{module.__name__}.{name}.{attr}", member))
    return out


def _inherits_doc(cls, attr: str) -> bool:
    """An override of a documented base-class method (``ModelFamily.geometry``, ``Task.loss``) is documented there."""
    return any(getattr(getattr(base, attr, None), "__doc__", None) for base in cls.__mro__[1:])


def undocumented() -> List[str]:
    missing = []
    for name in modules():
        for qualified, obj in public(importlib.import_module(name)):
            if not (inspect.getdoc(obj) or "").strip():
                missing.append(qualified)
    return sorted(set(missing))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/api", help="where the HTML goes (default docs/api, not committed)")
    parser.add_argument("--check-only", action="store_true", help="check the docstrings, build nothing")
    args = parser.parse_args()
    missing = undocumented()
    if missing:
        print(f"{len(missing)} public names have no docstring:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    if args.check_only:
        print(f"every public name of {len(modules())} modules has a docstring")
        return 0
    import pdoc

    for name in ("PrunedAttention", "MaskedAttention", "MaskedMlp", "keep_cpu_memory"):
        getattr(spp, name)   # names spp loads on first use: resolved, so the reference lists them
    pdoc.render.configure(docformat="restructuredtext", footer_text=f"spp {spp.__version__}")
    with warnings.catch_warnings():   # string annotations pdoc cannot evaluate are shown as written
        warnings.filterwarnings("ignore", message="Error parsing type annotation")
        pdoc.pdoc(*modules(), output_directory=__import__("pathlib").Path(args.out))
    print(f"wrote {args.out}/index.html ({len(modules())} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
