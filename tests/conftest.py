"""Shared pytest setup: the tests dir on sys.path (for reference_oracle) and deterministic threads."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
