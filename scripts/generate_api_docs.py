"""Render the docstrings of monai_gradicon's public API (each package's ``__all__``) into docs/api.md.

Usage:
    python scripts/generate_api_docs.py            # writes docs/api.md
    python scripts/generate_api_docs.py --check    # exit 1 if docs/api.md is out of date
    python scripts/generate_api_docs.py --gaps     # list public names with incomplete docstrings

The page lists, per package, every name in ``__all__`` with its signature and docstring; for classes
also the public methods they define (``forward`` first). Packages are found by walking
``monai_gradicon``; one that cannot be imported here (e.g. an optional dependency is missing) is named
in the page instead of silently dropped.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import re
import sys
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "docs", "api.md")
PACKAGE = "monai_gradicon"
# names that implement the method must cite the paper (an equation or a section)
PAPER_MODULES = ("monai_gradicon.losses", "monai_gradicon.networks")
PAPER_NAMES = {"PairNetwork", "inverse_consistency_error", "BidirectionalRegistration", "GradICONTrainingLoss"}
CITATION = re.compile(r"\b(Eq\.|Eqs\.|Equation|Sec\.|Section|paper)", re.IGNORECASE)


def public_modules() -> tuple[list[ModuleType], dict[str, str]]:
    """The importable modules/packages of ``monai_gradicon`` that declare ``__all__``, and those that failed.

    A module whose names are all re-exported by its parent package is left out (documented once, under
    the package). Returns ``(modules sorted by name, {name: import error})``.
    """
    root = importlib.import_module(PACKAGE)
    found: dict[str, ModuleType] = {}
    failed: dict[str, str] = {}
    for info in pkgutil.walk_packages(root.__path__, prefix=PACKAGE + ".", onerror=lambda name: None):
        if info.name.rsplit(".", 1)[-1].startswith("_") or ".__main__" in info.name:
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception as error:  # an optional dependency missing here: say so in the page
            failed[info.name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            continue
        if hasattr(module, "__all__"):
            found[info.name] = module
    keep = []
    for name, module in sorted(found.items()):
        parent = found.get(name.rsplit(".", 1)[0])
        if parent is not None and set(module.__all__) <= set(parent.__all__):
            continue
        keep.append(module)
    return keep, failed


def public_names(module: ModuleType) -> list[tuple[str, object]]:
    """``(name, object)`` for every name in ``module.__all__``, in that order."""
    return [(name, getattr(module, name)) for name in module.__all__]


def _signature(obj: object) -> str:
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return re.sub(r" at 0x[0-9a-f]+", "", text)


def _methods(cls: type) -> list[tuple[str, object]]:
    """Public methods and properties defined in ``cls`` itself (``forward`` first)."""
    members = [(n, v) for n, v in vars(cls).items() if not n.startswith("_") and (inspect.isfunction(v) or isinstance(v, (property, classmethod, staticmethod)))]
    return sorted(members, key=lambda item: (item[0] != "forward", list(vars(cls)).index(item[0])))


def _parameters(obj: object) -> list[str]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in signature.parameters.values() if p.name not in ("self", "cls") and p.kind not in skip]


def _documented_arguments(doc: str) -> set[str]:
    """Names listed in the ``Args:`` section of a Google-style docstring."""
    match = re.search(r"^\s*(Args|Arguments|Parameters):\s*$(.*?)(?=^\s*[A-Z][A-Za-z ]+:\s*$|\Z)", doc, re.M | re.S)
    if not match:
        return set()
    return set(re.findall(r"^\s{2,}\**(\w+)\**\s*(?:\([^)]*\))?:", match.group(2), re.M))


def _returns_value(func: object) -> bool:
    try:
        annotation = inspect.signature(func).return_annotation
    except (TypeError, ValueError):
        return False
    return annotation not in (inspect.Signature.empty, None, "None")


def docstring_gaps() -> set[str]:
    """``"module:name: problem"`` for every public callable missing a required docstring part.

    Required: a docstring; an ``Args:`` entry per argument (functions, class constructors); ``Returns:``
    for functions annotated to return a value and for an ``nn.Module``'s own ``forward``; a paper
    equation/section for the method's names (:data:`PAPER_MODULES`, :data:`PAPER_NAMES`).

    Returns:
        the set of gaps, one string each.
    """
    from torch import nn

    modules, _ = public_modules()
    gaps: set[str] = set()
    seen: set[int] = set()
    for module in modules:
        for name, obj in public_names(module):
            if not callable(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            where = f"{module.__name__}:{name}"
            doc = inspect.getdoc(obj) or ""
            if inspect.isclass(obj) and "__init__" in vars(obj):
                doc = doc + "\n" + (inspect.getdoc(vars(obj)["__init__"]) or "")
            if not doc.strip():
                gaps.add(f"{where}: no docstring")
                continue
            missing = sorted(set(_parameters(obj)) - _documented_arguments(doc))
            if missing:
                gaps.add(f"{where}: Args misses {', '.join(missing)}")
            if inspect.isfunction(obj) and _returns_value(obj) and not re.search(r"^\s*Returns?:", doc, re.M):
                gaps.add(f"{where}: no Returns")
            if inspect.isclass(obj) and issubclass(obj, nn.Module) and "forward" in vars(obj):
                if not re.search(r"^\s*Returns?:", inspect.getdoc(obj.forward) or "", re.M):
                    gaps.add(f"{where}.forward: no Returns")
            if (module.__name__.startswith(PAPER_MODULES) or name in PAPER_NAMES) and not CITATION.search(doc):
                gaps.add(f"{where}: cites no paper equation/section")
    return gaps


def _block(doc: str | None) -> list[str]:
    """A docstring as a fenced text block (keeps the Args/Returns layout on any Markdown renderer)."""
    if not doc:
        return ["*(no docstring)*", ""]
    fence = "`" * 3
    return [fence + "text", doc.replace(fence, "~~~"), fence, ""]


def render() -> str:
    """The whole docs/api.md text."""
    modules, failed = public_modules()
    lines = [
        "# API reference",
        "",
        "<!-- generated by scripts/generate_api_docs.py from the docstrings; do not edit by hand -->",
        "",
        "Every public name (each package's `__all__`). Displacements follow MONAI's convention: a DDF is",
        "`(B, D, *spatial)` in voxel units, channel i along spatial axis i, `Warp()(moving, ddf_AB) ≈ fixed`.",
        "Equations refer to Tian, Greer et al., *GradICON: Approximate Diffeomorphisms via Gradient Inverse",
        "Consistency*, CVPR 2023.",
        "",
    ]
    lines += [f"- [`{m.__name__}`](#{m.__name__.replace('.', '')})" for m in modules]
    lines.append("")
    for module in modules:
        lines += [f"## {module.__name__}", ""]
        if module.__doc__:
            lines += _block(inspect.cleandoc(module.__doc__))
        for name, obj in public_names(module):
            kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "constant"
            signature = _signature(obj) if callable(obj) else ""
            lines += [f"### `{name}{signature}`", "", f"*{kind}*", ""]
            lines += _block(inspect.getdoc(obj))
            if inspect.isclass(obj):
                for method_name, method in _methods(obj):
                    target = method.fget if isinstance(method, property) else getattr(method, "__func__", method)
                    label = f"{name}.{method_name}" + ("" if isinstance(method, property) else _signature(target))
                    lines += [f"#### `{label}`", ""]
                    lines += _block(inspect.getdoc(target))
    if failed:
        lines += ["## Not importable where this page was generated", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in sorted(failed.items())]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _importable_part(text: str) -> str:
    """The page without its environment-dependent 'Not importable' section."""
    return text.split("## Not importable where this page was generated")[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md differs from the docstrings")
    parser.add_argument("--gaps", action="store_true", help="print public names with incomplete docstrings")
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args(argv)
    if args.gaps:
        gaps = sorted(docstring_gaps())
        print("\n".join(gaps) if gaps else "no gaps")
        return 0
    text = render()
    if args.check:
        current = open(args.output, encoding="utf-8").read() if os.path.exists(args.output) else ""
        if _importable_part(current) != _importable_part(text):
            print(f"{args.output} is out of date: run python scripts/generate_api_docs.py", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
