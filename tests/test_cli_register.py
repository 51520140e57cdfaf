"""The ``monai-gradicon`` command: bad input gives one error line, exit code 2, and no result files."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from registration_helpers import blob_intensity, oblique_affine, save, world_points, write_tiny_bundle

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


def test_register_command_writes_outputs(files, capsys):
    from monai_gradicon.cli import main

    root, good, bundle = files
    out = root / "ok"
    assert main(["register", "--moving", good, "--fixed", good, "--bundle", bundle, "--out", str(out), "--quiet"]) == 0
    assert "registered in" in capsys.readouterr().out
    assert {"warped_moving.nii.gz", "displacement_mm.nii.gz", "transform.h5", "inverse_transform.h5", "report.json"} <= set(os.listdir(out))


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
    pytest.importorskip("icon_registration")
    import json

    from monai_gradicon.cli import main
    from monai_gradicon.registration_model import load_registration_model
    from reference_oracle import reference_network

    torch.manual_seed(0)
    reference = reference_network(3, (0,))
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.01)
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
    moving, fixed = torch.rand(1, 1, 17, 17, 17), torch.rand(1, 1, 17, 17, 17)
    with torch.no_grad():
        ours = model.network.step.net(moving, fixed)
        theirs = reference.net(moving, fixed)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert main(["convert-weights", "--source", str(tmp_path / "none.trch"), "--out", str(out)]) == 2
