"""The ``monai-gradicon`` command: bad input gives one error line, exit code 2, and no result files.

An internal failure (a bug, out of memory) exits with code 1 and its traceback, never with the wording of
bad input; the mask policy of a bundle and its missing weights are bad input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dependencies import require_reference
from registration_helpers import (
    AUTHORS_CONVENTION,
    blob_intensity,
    oblique_affine,
    read_field,
    save,
    world_points,
    write_large_files,
    write_random_weights,
    write_tiny_bundle,
)

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
    save(str(root / "mask.nii.gz"), (image > 0.3).astype(np.float32), affine)
    bundle = write_tiny_bundle(str(root / "bundle"))
    write_random_weights(bundle)  # a bundle with weights: the errors below are about the inputs, not the weights
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
        ("modality for a bundle without one", {"modality": "mri"}, "has no setting 'modality'"),
        ("unknown modality", {"modality": "pet"}, "modality must be 'ct' or 'mri', got 'pet'"),
        ("unknown bundle name", {"bundle": "kneee"}, "bundle must be one of .* got 'kneee'"),
    ],
)
def test_bad_input_one_error_line_nonzero_exit_no_outputs(files, capsys, case, extra, message):
    from monai_gradicon.app.cli import main

    root, good, bundle = files
    args = {"moving": good, "fixed": good, "bundle": bundle, "out": str(root / f"out_{case.replace(' ', '_')}")}
    args.update({k: (str(root / v) if k not in ("bundle", "modality") else v) for k, v in extra.items()})
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
    from monai_gradicon.app.cli import main
    from monai_gradicon.app import register

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
    """The module form of the entry point (python -m monai_gradicon.app.cli) fails with code 2 on a missing file."""
    root, good, bundle = files
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "monai_gradicon.app.cli", "register", "--moving", str(tmp_path / "nope.nii"), "--fixed", good,
         "--bundle", bundle, "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("monai-gradicon: error: moving image file not found")
    assert not (tmp_path / "o").exists()


def test_convert_weights_imports_reference_checkpoint(tmp_path, capsys):
    """A reference (icon_registration) 1-step checkpoint becomes the bundle's model.pt; outputs then agree."""
    require_reference()

    from monai_gradicon.app.cli import main
    from monai_gradicon.app import load_registration_model
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
    write_tiny_bundle(str(bundle), shape=(17, 17, 17), convention=AUTHORS_CONVENTION)  # the authors' weights need theirs
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


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("monai-gradicon: error:")]


def test_untrained_bundle_is_refused_with_one_line_naming_the_file_and_runs_when_allowed(files, tmp_path, capsys):
    """No weights file: exit 2, one line naming it (and, with a ``large_files.yml``, the URL and where to put it).

    ``--allow-untrained`` runs it, and the report says the result is not a registration.
    """
    from monai_gradicon.app.cli import main

    root, good, _ = files
    bundle = write_tiny_bundle(str(tmp_path / "untrained"))
    weights = os.path.join(bundle, "models", "model.pt")
    argv = ["register", "--moving", good, "--fixed", good, "--bundle", bundle, "--quiet"]
    assert main(argv + ["--out", str(tmp_path / "refused")]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and weights in errors[0] and "--allow-untrained" in errors[0], errors
    assert not (tmp_path / "refused").exists()
    write_large_files(bundle, "https://example.org/w.pt")
    assert main(argv + ["--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    errors = _error_lines(err)
    assert len(errors) == 1 and len(err.strip().splitlines()) == 1, err
    assert "https://example.org/w.pt" in errors[0] and f"put it at {weights}" in errors[0], errors[0]
    assert not (tmp_path / "refused").exists()
    assert main(argv + ["--out", str(tmp_path / "allowed"), "--allow-untrained"]) == 0
    report = json.loads((tmp_path / "allowed" / "report.json").read_text())
    assert report["weights"] is None
    assert any("not a registration" in note for note in report["notes"]), report["notes"]


MASK_CASES = [
    # policy, masks given, exit code, message of the one error line
    ("unused", ("moving", "fixed"), 2, "does not use masks"),
    ("unused", ("fixed",), 2, "does not use masks"),
    ("required", (), 2, "give both --moving-mask and --fixed-mask"),
    ("required", ("moving",), 2, "give both --moving-mask and --fixed-mask"),
    ("optional", ("fixed",), 2, "give masks for both images or for none"),
    ("optional", ("moving", "fixed"), 0, None),
    ("optional", (), 0, None),
]


@pytest.mark.parametrize("policy, given, code, message", MASK_CASES, ids=[f"{p}-{'+'.join(g) or 'none'}" for p, g, _, _ in MASK_CASES])
def test_masks_against_the_bundle_policy_are_refused_with_one_line(files, tmp_path, capsys, policy, given, code, message):
    """Masks a bundle does not use, a required mask missing, one optional mask of two: exit 2, one line, no outputs."""
    from monai_gradicon.app.cli import main

    root, good, _ = files
    intensity = [{"_target_": "monai_gradicon.transforms.ApplyMaskd", "keys": "image", "mask_key": "mask",
                  "required": policy == "required"}] if policy != "unused" else None
    bundle = write_tiny_bundle(str(tmp_path / "bundle"), masks=policy, intensity=intensity)
    write_random_weights(bundle)
    out = tmp_path / "out"
    argv = ["register", "--moving", good, "--fixed", good, "--bundle", bundle, "--out", str(out), "--quiet"]
    for role in given:
        argv += [f"--{role}-mask", str(root / "mask.nii.gz")]
    assert main(argv) == code
    err = capsys.readouterr().err
    if code == 2:
        errors = _error_lines(err)
        assert len(errors) == 1 and len(err.strip().splitlines()) == 1, err
        assert message in errors[0], errors[0]
        assert not out.exists() or os.listdir(out) == []
    else:
        report = json.loads((out / "report.json").read_text())
        assert report["masks"] == {"policy": policy, "moving": "moving" in given, "fixed": "fixed" in given}


@pytest.mark.parametrize("failure, hint", [("runtime", None), ("memory", "out of memory")])
def test_internal_error_exits_1_with_traceback_never_as_bad_input(files, tmp_path, capsys, failure, hint):
    """A network that fails inside ``forward`` (a bug, or out of memory) is an internal error, not bad input.

    Exit code 1, the traceback (down to the raising ``forward``), a last line ``monai-gradicon: internal
    error: <type>`` (with the out-of-memory hint for a MemoryError), no ``monai-gradicon: error:`` line,
    and no result files.
    """
    import torch

    from monai_gradicon.app.cli import main
    from registration_helpers import broken_network

    root, good, _ = files
    bundle = write_tiny_bundle(str(tmp_path / "broken"), network_def={"_target_": "registration_helpers.broken_network",
                                                                      "failure": failure})
    torch.save(broken_network(failure).state_dict(), os.path.join(bundle, "models", "model.pt"))
    out = tmp_path / "out"
    code = main(["register", "--moving", good, "--fixed", good, "--bundle", bundle, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback (most recent call last)" in err and "in forward" in err, err
    expected = {"runtime": "RuntimeError: broken_network: a bug inside forward", "memory": "MemoryError: cannot allocate"}[failure]
    assert expected in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"monai-gradicon: internal error: {'RuntimeError' if failure == 'runtime' else 'MemoryError'}"), last
    assert (hint in last) if hint else ("out of memory" not in last)
    assert _error_lines(err) == []
    assert not out.exists() or os.listdir(out) == []
