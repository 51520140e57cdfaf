"""The result scripts of scripts/results/ run end to end in --quick mode and write sane outputs.

Each script runs as a real subprocess (as a user would run it) into a temporary folder; the test
then reads the CSVs back and checks that every metric is finite and within its valid range, and
that the figures are non-empty PNG files. The full runs are not part of the test suite.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "results"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_quick(script: str, out: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{script} --quick failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def read_csv(path: Path) -> list[dict[str, str]]:
    assert path.is_file(), f"missing {path}"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, f"{path} has no rows"
    return rows


def assert_png(path: Path) -> None:
    assert path.is_file(), f"missing {path}"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000, f"{path} is not a real PNG figure"


def value(row: dict[str, str], key: str, low: float, high: float) -> float:
    x = float(row[key])
    assert math.isfinite(x), f"{key}={row[key]} is not finite in {row}"
    assert low <= x <= high, f"{key}={x} outside [{low}, {high}] in {row}"
    return x


def test_convergence_toy_quick(tmp_path: Path) -> None:
    stdout = run_quick("convergence_toy.py", tmp_path)
    rows = read_csv(tmp_path / "convergence.csv")
    configs = {(r["method"], r["network"]) for r in rows}
    assert configs == {("GradICON", "1-step"), ("GradICON", "4-step"), ("ICON", "1-step"), ("ICON", "4-step")}
    for r in rows:
        value(r, "mse", 0, 1)  # outline images live in [0, 1]
        value(r, "dice", 0, 1)
        value(r, "folds_pct", 0, 100)
    summary = read_csv(tmp_path / "summary.csv")
    assert len(summary) == 4 and all(int(r["step"]) == 6 for r in summary)
    assert_png(tmp_path / "convergence.png")
    assert_png(tmp_path / "examples.png")
    assert "GradICON 4-step" in stdout


def test_ablation_vessels_quick(tmp_path: Path) -> None:
    run_quick("ablation_vessels.py", tmp_path)
    summary = read_csv(tmp_path / "ablation_summary.csv")
    assert {(int(r["P"]), r["similarity"]) for r in summary} == {
        (p, s) for p in (1, 2, 4) for s in ("single", "multi_avg", "multi_adaptive")
    }
    for r in read_csv(tmp_path / "ablation_curves.csv"):
        value(r, "deformation_error", 0, 1.5)  # [0, 1] units: at most the image diagonal
        value(r, "deformation_error_vessels", 0, 1.5)
        value(r, "displacement_magnitude", 0, 1.5)
        value(r, "folds_pct", 0, 100)
        value(r, "ncc", -1, 1)
    truth = value(summary[0], "truth_magnitude", 1e-4, 1)
    weights = read_csv(tmp_path / "adaptive_weights.csv")
    assert {r["form"].split(" ")[0] for r in weights} == {"parameter-free", "greedy"}
    for r in weights:
        ws = [float(v) for k, v in r.items() if k.startswith("w")]
        assert all(0 <= w <= 1 for w in ws) and abs(sum(ws) - 1) < 1e-5, r  # a convex blend of the scales
    for r in read_csv(tmp_path / "training_gammas.csv"):
        assert abs(sum(float(v) for k, v in r.items() if k.startswith("w")) - 1) < 1e-5
    assert truth > 0
    for name in ("ablation.png", "ablation_examples.png", "adaptive_weights.png"):
        assert_png(tmp_path / name)


def test_real_mri_benchmark_quick(tmp_path: Path) -> None:
    stdout = run_quick("real_mri_benchmark.py", tmp_path)
    summary = read_csv(tmp_path / "summary.csv")
    methods = [r["method"] for r in summary]
    assert methods[0] == "identity" and methods[1].startswith("GradICON")
    assert len(methods) == 5, methods  # identity, ours and the three baselines (run or reported as not run)
    ran = [r for r in summary if r.get("dice_GM")]
    for r in ran:
        value(r, "dice_GM", 0, 1)
        value(r, "dice_WM", 0, 1)
        value(r, "gt_error_mm", 0, 200)
        value(r, "folds_pct", 0, 100)
        value(r, "seconds", 0, 600)
    identity = ran[0]
    assert float(identity["gt_error_mm"]) > 0.1, "the synthetic pair must need a deformation"
    assert float(identity["folds_pct"]) == 0.0
    for r in summary:
        if not r.get("dice_GM"):
            assert r["note"].startswith("not run:"), r  # a skipped baseline says why
    for r in read_csv(tmp_path / "training.csv"):
        value(r, "total", 0, 100)
    assert_png(tmp_path / "slices.png")
    assert "identity" in stdout


@pytest.mark.parametrize("size", [16, 48])
def test_vessel_pairs_ground_truth(size: int) -> None:
    import torch

    from monai_gradicon.data.vessels import vessel_pairs, vessel_tree
    from monai_gradicon.maps import fold_percentage, warp

    pairs = vessel_pairs(3, size, max_displacement=size / 16, seed=3)
    assert pairs["moving"].shape == (3, 1, size, size) and pairs["ddf"].shape == (3, 2, size, size)
    assert 0 <= float(pairs["moving"].min()) and float(pairs["moving"].max()) <= 1
    assert 0.02 < float(pairs["moving"].mean()) < 0.6  # a tree, neither empty nor filled
    torch.testing.assert_close(warp(pairs["moving"], pairs["ddf"]), pairs["fixed"])  # the truth is the DDF
    assert float(pairs["ddf"].abs().max()) == pytest.approx(size / 16, rel=1e-5)
    assert float(fold_percentage(pairs["ddf"]).max()) == 0.0
    again = vessel_pairs(3, size, max_displacement=size / 16, seed=3)
    torch.testing.assert_close(again["fixed"], pairs["fixed"])  # seeded
    other = vessel_tree(size, torch.Generator().manual_seed(4))
    assert not torch.equal(other, pairs["moving"][0])
    with pytest.raises(ValueError, match="size must be >= 8"):
        vessel_tree(4)
    with pytest.raises(ValueError, match="count must be >= 1"):
        vessel_pairs(0, size, 1.0)
