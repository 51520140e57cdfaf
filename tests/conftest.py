"""Shared pytest setup: the tests dir on sys.path (for the helper modules), deterministic threads, no silent skips.

With ``MONAI_GRADICON_FORBID_SKIPS=1`` (set by ``scripts/run_tests.sh``) a run that skipped any test
exits non-zero: CI reports every test as run, or fails.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "deploy_sdk: needs the MONAI Deploy App SDK (runs in the separate .venv-deploy environment)"
    )


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("MONAI_GRADICON_FORBID_SKIPS") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and session.exitstatus == 0:
        names = ", ".join(getattr(r, "nodeid", "?") for r in skipped[:10])
        print(f"\nMONAI_GRADICON_FORBID_SKIPS=1: {len(skipped)} test(s) skipped ({names}); failing the run.", file=sys.stderr)
        session.exitstatus = 1
