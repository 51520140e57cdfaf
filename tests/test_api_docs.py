"""The API reference: docs/api.md is generated from the docstrings, and every public name is documented.

A public name is one in a package's ``__all__``. Its docstring must exist; a function or class that takes
arguments must have an ``Args:`` section naming each of them; a function that returns a value (and a
module's ``forward``) must have a ``Returns:`` section; the method's names (losses, networks, the
two-direction engines) must cite the paper (an equation or section); see
``generate_api_docs.docstring_gaps``. There are none, and a new one fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import generate_api_docs  # noqa: E402


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


def test_every_public_name_is_fully_documented():
    gaps = sorted(generate_api_docs.docstring_gaps())
    assert not gaps, "public names with incomplete docstrings (add Args/Returns/paper reference):\n" + "\n".join(gaps)
