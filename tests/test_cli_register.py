"""The ``monai-gradicon`` command: bad input gives one error line, exit code 2, and no result files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dependencies import require_reference
from registration_helpers import blob_intensity, oblique_affine, read_field, save, world_points, write_random_weights, write_tiny_bundle

SHAPE = (22, 26, 18)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    affine = oblique_affine()
    points = world_points(affine, SHAPE)
    image = blob_intensity(points, points.reshape(-1, 3).mean(0))
    good = save(str(root / "good.nii.gz"), image, affine)
    nan = image.copy()
    nan[3, 4, 5] = np.nan
    save(str(root / "nan.nii.gz"), nan, affine)
    save(str(root / "flat.nii.gz"), np.ones((30, 30), np.float32), np.eye(4))
    save(str(root / "labels_small.nii.gz"), np.ones((10, 10, 10), np.float32), affine)
    (root / "notes.nii.gz").write_text("this is not an image")
    (root / "a_file").write_text("x")
    bundle = write_tiny_bundle(str(root / "bundle"))
    return root, good, bundle


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("missing file", {"moving": "missing.nii.gz"}, "moving image file not found"),
        ("non-image file", {"moving": "notes.nii.gz"}, "could not read moving image"),
        ("2D image for a 3D bundle", {"fixed": "flat.nii.gz"}, "is a 2D image .* a 3D image is expected"),
        ("label grid mismatch", {"moving_labels": "labels_small.nii.gz"}, "must lie on the grid"),
        ("NaN in image", {"moving": "nan.nii.gz"}, "1 NaN/inf voxel"),
        ("unwritable output", {"out": "a_file/result"}, "output folder .* is not writable"),
    ],
)
def test_bad_input_one_error_line_nonzero_exit_no_outputs(files, capsys, case, extra, message):
    from monai_gradicon.cli import main

    root, good, bundle = files
    args = {"moving": good, "fixed": good, "bundle": bundle, "out": str(root / f"out_{case.replace(' ', '_')}")}
    args.update({k: (str(root / v) if k != "bundle" else v) for k, v in extra.items()})
    argv = ["register"] + [f"--{k.replace('_', '-')}={v}" for k, v in args.items()] + ["--quiet"]
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("monai-gradicon: error:")]
    assert code == 2
    assert len(errors) == 1, err
    import re

    assert re.search(message, errors[0]), errors[0]
    out = args["out"]
    assert not os.path.isdir(out) or os.listdir(out) == []


def test_register_command_writes_what_register_writes(files, tmp_path, capsys):
    """The command passes every option on: its files equal ``register``'s with the same arguments.

    A real pair (the blob shifted by 3.6 mm) and deforming ``"smooth"`` weights (mean 3.9 mm), with
    labels, 2 instance-optimisation steps at lr 1e-3 and seed 3: a dropped or swapped argument (moving
    and fixed, the learning rate, the seed, the labels) changes the field or the report.
    """
    from monai_gradicon.cli import main
    from monai_gradicon.register import register

    root, good, _ = files
    affine = oblique_affine()
    points = world_points(affine, SHAPE)
    shifted = blob_intensity(points, points.reshape(-1, 3).mean(0) + np.array([3.0, -2.0, 0.0]))
    moving = save(str(tmp_path / "moving.nii.gz"), shifted, affine)
    labels = save(str(tmp_path / "labels.nii.gz"), (shifted > 0.6).astype(np.float32), affine)
    bundle = write_tiny_bundle(str(tmp_path / "bundle"))
    write_random_weights(bundle)
    out = tmp_path / "cli"
    argv = ["register", "--moving", moving, "--fixed", good, "--bundle", bundle, "--out", str(out), "--moving-labels", labels,
            "--io-steps", "2", "--io-lr", "1e-3", "--seed", "3", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    expected = register(moving, good, bundle, tmp_path / "api", moving_labels=labels, io_steps=2, io_learning_rate=1e-3,
                        device="cpu", progress=False, seed=3)
    assert {"warped_moving.nii.gz", "displacement_mm.nii.gz", "transform.h5", "inverse_transform.h5", "report.json",
            "warped_moving_labels.nii.gz"} <= set(os.listdir(out))
    field = read_field(str(out / "displacement_mm.nii.gz"))
    assert np.linalg.norm(field, axis=0).mean() > 1.0
    np.testing.assert_allclose(field, read_field(expected.files["displacement"]), atol=1e-5)
    np.testing.assert_allclose(read_field(str(out / "inverse_displacement_mm.nii.gz")),
                               read_field(expected.files["inverse_displacement"]), atol=1e-5)
    report = json.loads((out / "report.json").read_text())
    assert report["instance_optimization"]["steps"] == 2 and report["instance_optimization"]["learning_rate"] == 1e-3
    assert report["instance_optimization"]["objective_after"] == pytest.approx(
        expected.report["instance_optimization"]["objective_after"], rel=1e-5)
    assert report["moving"] == os.path.abspath(moving) and report["moving_labels"] == os.path.abspath(labels)
    assert f"folds {report['forward']['folds']} " in printed and "registered in" in printed
    # another seed gives another GradICON perturbation, hence other optimised weights: the seed is used
    assert main(argv[:-3] + ["--seed", "4", "--out", str(tmp_path / "cli_seed4"), "--quiet"]) == 0
    other = read_field(str(tmp_path / "cli_seed4" / "displacement_mm.nii.gz"))
    assert np.abs(other - field).max() > 1e-4


def test_console_script_exit_code(files, tmp_path):
    """The installed entry point (python -m monai_gradicon.cli) fails with code 2 on a missing file."""
    root, good, bundle = files
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "monai_gradicon.cli", "register", "--moving", str(tmp_path / "nope.nii"), "--fixed", good,
         "--bundle", bundle, "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("monai-gradicon: error: moving image file not found")
    assert not (tmp_path / "o").exists()


def test_convert_weights_imports_reference_checkpoint(tmp_path, capsys):
    """A reference (icon_registration) 1-step checkpoint becomes the bundle's model.pt; outputs then agree."""
    require_reference()

    from monai_gradicon.cli import main
    from monai_gradicon.registration_model import load_registration_model
    from reference_oracle import reference_network

    with torch.random.fork_rng():  # the reference network initialises from the global RNG
        torch.manual_seed(0)
        reference = reference_network(3, (0,))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.01)
    torch.save(reference.state_dict(), tmp_path / "ref.trch")
    bundle = tmp_path / "bundle"
    write_tiny_bundle(str(bundle), shape=(17, 17, 17))
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    del config["network_def"]["subnetwork"]  # default GradICONUNet = reference tallUNet2
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    out = bundle / "models" / "model.pt"
    assert main(["convert-weights", "--source", str(tmp_path / "ref.trch"), "--out", str(out), "--bundle", str(bundle)]) == 0
    model = load_registration_model(str(bundle), device="cpu")
    assert model.weights == str(out)
    reference.eval()
    moving = torch.rand(1, 1, 17, 17, 17, generator=generator)
    fixed = torch.rand(1, 1, 17, 17, 17, generator=generator)
    with torch.no_grad():
        ours = model.network.step.net(moving, fixed)
        theirs = reference.net(moving, fixed)
    assert theirs.abs().max() > 1e-3  # a real output, far above the tolerance (an unloaded network gives 0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert main(["convert-weights", "--source", str(tmp_path / "none.trch"), "--out", str(out)]) == 2
