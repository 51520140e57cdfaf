"""The API reference: docs/api.md is generated from the docstrings, and every public name is documented.

A public name is one in a package's ``__all__``. Its docstring must exist; a function or class that takes
arguments must have an ``Args:`` section naming each of them; a function that returns a value (and a
module's ``forward``) must have a ``Returns:`` section; the method's names (losses, networks, the
two-direction engines) must cite the paper (an equation or section); see
``generate_api_docs.docstring_gaps``. Gaps found when this test was written are recorded in
tests/api_docstring_gaps.txt for the owners to close; the test fails if a new gap appears *or* a recorded
one is closed without updating the file (so the list only shrinks).
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import generate_api_docs  # noqa: E402


def _known_gaps() -> set[str]:
    path = generate_api_docs.GAPS_FILE
    lines = open(path, encoding="utf-8").read().splitlines() if os.path.exists(path) else []
    return {line for line in lines if line and not line.startswith("#")}


def test_generated_page_lists_every_public_name():
    text = generate_api_docs.render()
    modules, _ = generate_api_docs.public_modules()
    names = {m.__name__ for m in modules}
    assert {"monai_gradicon.losses", "monai_gradicon.maps", "monai_gradicon.engines"} <= names
    for module in modules:
        assert f"## {module.__name__}\n" in text
        for name, _ in generate_api_docs.public_names(module):
            assert f"### `{name}" in text, (module.__name__, name)
    assert "### `GradICONLoss(spatial_dims: 'int', delta: 'float' = 0.001" in text
    assert "### `PairNetwork(" in text and "#### `GradICONLoss.forward(" in text


def test_committed_api_page_is_up_to_date():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "generate_api_docs.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-1500:] + "\nregenerate with: python scripts/generate_api_docs.py"


def test_mixin_names_are_fully_documented():
    gaps = generate_api_docs.docstring_gaps()
    mine = {g for g in gaps if g.startswith(("monai_gradicon.engines:PairNetwork", "monai_gradicon.engines:inverse_consistency_error"))}
    mine |= {g for g in gaps if g.startswith(("monai_gradicon.losses:GradICONLoss:", "monai_gradicon.losses:GradICONLoss.forward"))}
    assert not mine, sorted(mine)


def test_docstring_gaps_only_shrink():
    gaps, known = generate_api_docs.docstring_gaps(), _known_gaps()
    new, fixed = sorted(gaps - known), sorted(known - gaps)
    assert not new, "public names with incomplete docstrings (add Args/Returns/paper reference):\n" + "\n".join(new)
    assert not fixed, "closed gaps: run python scripts/generate_api_docs.py --write-gaps\n" + "\n".join(fixed)
