"""``register_pairs`` / ``monai-gradicon register-batch``: many pairs, several per network call, equal to ``register``.

Three pairs on different grids (shapes, oblique affines, one with a label map) registered with
``batch_size=2`` (a batch of two, then one of one) write the same fields and images as three separate
``register`` calls: tolerance 1e-5 mm on the displacements (and 1e-5 on the warped intensities, which
lie in [−0.9, 1.1]); the fields are several mm and differ between pairs, so a pair given another pair's
slice of the batch, or the wrong direction, fails by millimetres. With instance optimisation each pair
is optimised alone (its own seeded perturbation, the weights restored after it). A pair with bad input
is reported in ``summary.csv`` and the others are written; the command exits 2 naming it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from registration_helpers import blob_intensity, oblique_affine, read_field, save, world_points, write_random_weights, write_tiny_bundle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("displacement_mm.nii.gz", "inverse_displacement_mm.nii.gz")
IMAGES = ("warped_moving.nii.gz", "inverse_warped_fixed.nii.gz")
FIELD_TOLERANCE_MM = 1e-5


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Three pairs: one grid for both; two different oblique grids with a label map; a third pair of other shapes."""
    root = tmp_path_factory.mktemp("pairs")
    grids = [
        (oblique_affine(), (22, 26, 18), oblique_affine(), (22, 26, 18), np.array([3.0, -2.0, 0.0])),
        (oblique_affine(), (22, 26, 18), oblique_affine(spacing=(1.0, 1.4, 2.0), angles=(-0.15, 0.35, -0.3)), (24, 20, 21),
         np.array([2.5, -1.5, 1.0])),
        (oblique_affine(spacing=(1.6, 1.1, 1.9), angles=(0.1, 0.2, -0.4), origin=(5.0, -3.0, 0.0)), (18, 23, 20),
         oblique_affine(spacing=(1.3, 1.3, 1.3), angles=(0.0, -0.3, 0.1), origin=(6.0, -2.0, 1.0)), (21, 19, 24),
         np.array([-2.0, 1.0, 2.5])),
    ]
    entries = []
    for number, (fixed_affine, fixed_shape, moving_affine, moving_shape, shift) in enumerate(grids):
        fixed_points, moving_points = world_points(fixed_affine, fixed_shape), world_points(moving_affine, moving_shape)
        centre = fixed_points.reshape(-1, 3).mean(0)
        if number == 1:  # centre the moving grid on the fixed one
            moving_affine[:3, 3] = centre - moving_affine[:3, :3] @ ((np.array(moving_shape) - 1) / 2.0)
            moving_points = world_points(moving_affine, moving_shape)
        moving_blob = blob_intensity(moving_points, centre + shift)
        entry = {
            "id": f"pair{number}",
            "fixed": save(str(root / f"fixed{number}.nii.gz"), blob_intensity(fixed_points, centre), fixed_affine),
            "moving": save(str(root / f"moving{number}.nii.gz"), moving_blob, moving_affine),
        }
        if number == 1:
            labels = (moving_blob > 0.6).astype(np.float32) + (moving_blob > 1.0)
            entry["moving_label"] = save(str(root / "labels1.nii.gz"), labels, moving_affine)
        entries.append(entry)
    return root, entries


TWO_STEP_NETWORK = {  # Eq. 6 with two steps (a coarse one on the half grid): the composition runs on batches too
    "_target_": "monai_gradicon.networks.multistep_network", "spatial_dims": 3, "levels": [1, 0],
    "subnetwork": {"_target_": "monai_gradicon.networks.GradICONUNet", "_mode_": "callable", "spatial_dims": 3,
                   "down_channels": [8, 8, 8], "up_channels": [8, 8, 8]},
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny bundle: a two-step GradICON network of U-Nets with BatchNorm (eval mode), seeded weights that deform.

    The last convolutions are ``write_random_weights``' smooth ones plus N(0, 0.01²) on every tap, so the
    output depends on the U-Net's BatchNorm'd features: with batch statistics (train mode) the pairs of a
    batch would change each other's maps.
    """
    path = write_tiny_bundle(str(tmp_path_factory.mktemp("bundle") / "tiny"), network_def=TWO_STEP_NETWORK)
    weights = write_random_weights(path, seed=1, kind="smooth")
    state = torch.load(weights, weights_only=True)
    generator = torch.Generator().manual_seed(2)
    for key in [k for k in state if k.endswith("last_conv.weight")]:  # the U-Net's features (after BatchNorm) count too
        state[key] += torch.randn(state[key].shape, generator=generator) * 0.01
    torch.save(state, weights)
    return path


@pytest.fixture(scope="module")
def model(bundle):
    from monai_gradicon.app import load_registration_model

    return load_registration_model(bundle, device="cpu")


@pytest.fixture(scope="module")
def separate(pairs, model, tmp_path_factory):
    """Each pair registered by its own ``register`` call."""
    from monai_gradicon.app import register

    out = tmp_path_factory.mktemp("separate")
    return {
        e["id"]: register(e["moving"], e["fixed"], model, out / e["id"], moving_labels=e.get("moving_label"), progress=False)
        for e in pairs[1]
    }


def _datalist(path, entries) -> str:
    path.write_text(json.dumps({"testing": entries}))
    return str(path)


def _image(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


def _summary(out) -> list[dict]:
    with open(os.path.join(out, "summary.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_batch_of_two_writes_what_separate_register_calls_write(pairs, model, separate, tmp_path):
    """``batch_size=2``, one worker process: every output of every pair equals its own ``register`` call.

    The three forward fields are all > 1 mm on average and differ pairwise by more than 1 mm somewhere
    (on the fixed grids they share in shape), so a slice mix-up would be seen; the summary has one row
    per pair with the values of that pair's report.json.
    """
    from monai_gradicon.app import register_pairs

    root, entries = pairs
    out = tmp_path / "batch"
    reports = register_pairs(model, _datalist(tmp_path / "pairs.json", entries), str(out), batch_size=2, num_workers=1, progress=False)
    assert [r["moving"] for r in reports] == [e["moving"] for e in entries]
    for entry in entries:
        direct = separate[entry["id"]]
        for name in FIELDS:
            batch_field = read_field(str(out / entry["id"] / name))
            direct_field = read_field(os.path.join(os.path.dirname(direct.files["report"]), name))
            assert np.linalg.norm(direct_field, axis=0).mean() > 1.0
            np.testing.assert_allclose(batch_field, direct_field, rtol=0, atol=FIELD_TOLERANCE_MM)
        for name in IMAGES + (("warped_moving_labels.nii.gz",) if "moving_label" in entry else ()):
            np.testing.assert_allclose(_image(out / entry["id"] / name), _image(os.path.join(os.path.dirname(direct.files["report"]), name)),
                                       rtol=0, atol=1e-5)
    assert os.path.isfile(out / "pair1" / "warped_moving_labels.nii.gz") and not os.path.exists(out / "pair0" / "warped_moving_labels.nii.gz")
    first, second = read_field(str(out / "pair0" / FIELDS[0])), read_field(str(out / "pair1" / FIELDS[0]))
    assert np.abs(first - second).max() > 1.0  # same fixed grid: the batch's two slices really differ
    rows = _summary(out)
    assert [row["id"] for row in rows] == ["pair0", "pair1", "pair2"] and {row["status"] for row in rows} == {"ok"}
    for row, entry in zip(rows, entries):
        report = json.loads((out / entry["id"] / "report.json").read_text())
        assert int(row["folds"]) == report["forward"]["folds"]
        assert float(row["folds_percent"]) == pytest.approx(report["forward"]["folds_percent"], abs=1e-12)
        assert float(row["ncc_before"]) == pytest.approx(report["similarity"]["before"], abs=1e-12)
        assert float(row["ncc_after"]) == pytest.approx(report["similarity"]["after"], abs=1e-12)
        assert float(row["ncc_after"]) != pytest.approx(float(row["ncc_before"]), abs=1e-4)
        assert float(row["max_displacement_mm"]) == pytest.approx(report["max_displacement_mm"], abs=1e-9)
        assert float(row["max_displacement_mm"]) == pytest.approx(np.linalg.norm(read_field(str(out / entry["id"] / FIELDS[0])), axis=0).max(), rel=1e-5)
        assert float(row["seconds"]) == pytest.approx(report["runtime_seconds"]["total"], abs=1e-9)
        direct = separate[entry["id"]].report
        assert report["forward"]["folds"] == direct["forward"]["folds"]
        assert report["similarity"]["after"] == pytest.approx(direct["similarity"]["after"], abs=1e-6)
    listing = json.loads((out / "registrations.json").read_text())
    assert listing == [{"id": e["id"], "report": str(out / e["id"] / "report.json")} for e in entries]


def test_instance_optimisation_runs_pair_by_pair_like_register(pairs, model, separate, tmp_path):
    """``io_steps=1``: the second pair equals ``register(..., io_steps=1)`` on it alone (1e-5 mm) after the first.

    This fails if the weights optimised on the first pair leak into the second, or the perturbation seed
    is not restarted per pair; both optimised fields differ from the plain ones by more than the tolerance.
    """
    from monai_gradicon.app import register, register_pairs

    root, entries = pairs
    first, second = entries[2], entries[0]
    out = tmp_path / "io"
    reports = register_pairs(model, _datalist(tmp_path / "pairs.json", [first, second]), str(out), io_steps=1, batch_size=2, progress=False)
    assert [r["instance_optimization"]["steps"] for r in reports] == [1, 1]
    for entry in (first, second):
        field = read_field(str(out / entry["id"] / FIELDS[0]))
        assert np.abs(field - read_field(separate[entry["id"]].files["displacement"])).max() > 100 * FIELD_TOLERANCE_MM
    direct = register(second["moving"], second["fixed"], model, tmp_path / "direct", io_steps=1, progress=False)
    np.testing.assert_allclose(read_field(str(out / second["id"] / FIELDS[0])), read_field(direct.files["displacement"]),
                               rtol=0, atol=FIELD_TOLERANCE_MM)
    np.testing.assert_allclose(read_field(str(out / second["id"] / FIELDS[1])), read_field(direct.files["inverse_displacement"]),
                               rtol=0, atol=FIELD_TOLERANCE_MM)
    report = json.loads((out / second["id"] / "report.json").read_text())
    ours, alone = report["instance_optimization"], direct.report["instance_optimization"]
    assert ours.keys() == alone.keys()
    for key, value in alone.items():
        assert ours[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key


def test_a_bad_pair_is_reported_and_the_good_ones_are_written(pairs, model, separate, tmp_path):
    """A missing file, a label map on another grid and a mask the bundle does not use fail alone.

    ``FailedPairsError`` (an ``InputError``) names the three, after the two good pairs were written
    (equal to ``register``); their rows say ``failed`` with the error, registrations.json too.
    """
    from monai_gradicon.app import FailedPairsError, InputError, register_pairs

    root, entries = pairs
    bad = [
        {"id": "missing", "moving": str(root / "nowhere.nii.gz"), "fixed": entries[0]["fixed"]},
        {"id": "labels", "moving": entries[0]["moving"], "fixed": entries[0]["fixed"], "moving_label": entries[1]["moving_label"]},
        {"id": "mask", "moving": entries[0]["moving"], "fixed": entries[0]["fixed"], "moving_mask": entries[0]["moving"],
         "fixed_mask": entries[0]["fixed"]},
    ]
    listed = [bad[0], entries[0], bad[1], bad[2], entries[2]]
    out = tmp_path / "out"
    with pytest.raises(FailedPairsError) as failed:
        register_pairs(model, _datalist(tmp_path / "pairs.json", listed), str(out), batch_size=2, progress=False)
    message = str(failed.value)
    assert isinstance(failed.value, InputError)
    assert message.startswith("3 of 5 pairs failed")
    assert "'missing': moving image file not found" in message and "'labels': moving label map" in message
    assert "'mask': the 'tiny' model does not use masks" in message
    assert sorted(os.listdir(out)) == ["pair0", "pair2", "registrations.json", "summary.csv"]
    for entry in (entries[0], entries[2]):
        np.testing.assert_allclose(read_field(str(out / entry["id"] / FIELDS[0])), read_field(separate[entry["id"]].files["displacement"]),
                                   rtol=0, atol=FIELD_TOLERANCE_MM)
    rows = _summary(out)
    assert [(r["id"], r["status"]) for r in rows] == [
        ("missing", "failed"), ("pair0", "ok"), ("labels", "failed"), ("mask", "failed"), ("pair2", "ok"),
    ]
    assert "must lie on the grid" in rows[2]["error"] and rows[1]["error"] == "" and rows[0]["folds"] == ""
    assert [r["status"] for r in failed.value.rows] == [r["status"] for r in rows]
    assert [r["fixed"] for r in failed.value.reports] == [entries[0]["fixed"], entries[2]["fixed"]]
    listing = json.loads((out / "registrations.json").read_text())
    assert "nowhere.nii.gz" in listing[0]["error"] and listing[1] == {"id": "pair0", "report": str(out / "pair0" / "report.json")}


def test_datalist_and_option_errors_are_bad_input_before_any_pair_runs(pairs, model, tmp_path):
    from monai_gradicon.app import InputError, register_pairs

    root, entries = pairs
    datalist = _datalist(tmp_path / "pairs.json", entries)
    twice = _datalist(tmp_path / "twice.json", [entries[0], dict(entries[1], id="pair0")])
    cases = [
        ({"datalist_file": datalist, "batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"datalist_file": datalist, "num_workers": -1}, "num_workers must be an integer >= 0, got -1"),
        ({"datalist_file": datalist, "io_steps": 1.5}, "io_steps must be an integer >= 0, got 1.5"),
        ({"datalist_file": datalist, "section": "training"}, "has no section 'training'"),
        ({"datalist_file": twice}, r"pair ids must be unique .* repeats \['pair0'\]"),
    ]
    for arguments, message in cases:
        with pytest.raises(InputError, match=message):
            register_pairs(model, out=str(tmp_path / "out"), progress=False, **arguments)
    assert not os.path.exists(tmp_path / "out")


def test_a_network_that_cannot_batch_is_refused_not_broadcast(pairs, tmp_path):
    """A network returning one field for two pairs would give both the same map: refused, naming --batch-size 1."""
    from torch import nn

    from monai_gradicon.app import InputError, RegistrationModel, register_pairs
    from registration_helpers import TINY_SHAPE, scan_preprocessing

    class _OneField(nn.Module):
        def forward(self, moving, fixed):
            return torch.zeros(1, 3, *moving.shape[2:])

    model = RegistrationModel(network=_OneField(), scan_preprocessing=scan_preprocessing(TINY_SHAPE), name="single")
    datalist = _datalist(tmp_path / "pairs.json", pairs[1][:2])
    with pytest.raises(InputError, match=r"batch sizes \[1\] for 2 pairs.*--batch-size 1"):
        register_pairs(model, datalist, str(tmp_path / "out"), batch_size=2, progress=False)
    register_pairs(model, datalist, str(tmp_path / "one"), batch_size=1, progress=False)
    assert np.abs(read_field(str(tmp_path / "one" / "pair0" / FIELDS[0]))).max() < FIELD_TOLERANCE_MM  # the zero field


def test_register_batch_command_exit_codes_and_summary_table(pairs, bundle, tmp_path, capsys):
    """Through ``cli.main``: 0 and a table with one line per pair; 2 with one error line naming the failed pair; 2 for bad options."""
    from monai_gradicon.app.cli import main

    root, entries = pairs
    datalist = _datalist(tmp_path / "pairs.json", entries[:2])
    out = tmp_path / "cli"
    assert main(["register-batch", "--pairs", datalist, "--out", str(out), "--bundle", bundle, "--batch-size", "2", "--device", "cpu", "--quiet"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].split()[:2] == ["id", "status"] and [line.split()[:2] for line in lines[1:3]] == [["pair0", "ok"], ["pair1", "ok"]]
    row = _summary(out)[1]
    assert f"{float(row['ncc_after']):.4f}" in lines[2] and f"{float(row['max_displacement_mm']):.3f}" in lines[2]
    assert captured.err == ""

    broken = _datalist(tmp_path / "broken.json", [entries[0], {"id": "gone", "moving": str(root / "gone.nii.gz"), "fixed": entries[0]["fixed"]}])
    code = main(["register-batch", "--pairs", broken, "--out", str(tmp_path / "partial"), "--bundle", bundle, "--quiet"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.count("\n") == 1 and captured.err.startswith("monai-gradicon: error: 1 of 2 pairs failed ('gone': moving image file not found")
    assert "gone" in captured.out and "failed" in captured.out
    assert os.path.isfile(tmp_path / "partial" / "pair0" / "displacement_mm.nii.gz")

    for option, message in ((["--batch-size", "0"], "batch_size must be an integer >= 1"), (["--section", "validation"], "no section 'validation'")):
        code = main(["register-batch", "--pairs", datalist, "--out", str(tmp_path / "bad"), "--bundle", bundle, "--quiet", *option])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_internal_error_in_a_batch_exits_1_not_as_bad_input(pairs, tmp_path, capsys):
    from monai_gradicon.app.cli import main
    from registration_helpers import broken_network

    bundle = write_tiny_bundle(str(tmp_path / "broken"), network_def={"_target_": "registration_helpers.broken_network"})
    torch.save(broken_network().state_dict(), os.path.join(bundle, "models", "model.pt"))
    datalist = _datalist(tmp_path / "pairs.json", pairs[1][:1])
    code = main(["register-batch", "--pairs", datalist, "--out", str(tmp_path / "out"), "--bundle", bundle, "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "RuntimeError: broken_network: a bug inside forward" in err and "monai-gradicon: error:" not in err


def test_monai_bundle_run_registers_a_datalist_in_batches(pairs, bundle, separate, tmp_path):
    """``python -m monai.bundle run --config_file configs/inference.json`` with a ``run`` of ``register_pairs(batch_size=2)``.

    A separate process with one thread: equal to ``register`` within 1e-4 mm (float sums may round otherwise).
    """
    import shutil

    root, entries = pairs
    run_bundle = str(tmp_path / "run_bundle")
    shutil.copytree(bundle, run_bundle)
    config_file = os.path.join(run_bundle, "configs", "inference.json")
    config = json.load(open(config_file))
    config.update({
        "datalist_file": "", "output_dir": "", "num_threads": 1, "initialize": ["$torch.set_num_threads(@num_threads)"],
        "imports": ["$import torch", "$import monai_gradicon", "$import monai_gradicon.app"],
        "run": ["$monai_gradicon.app.register_pairs(@registration_model, @datalist_file, @output_dir, section='testing', batch_size=2)"],
    })
    json.dump(config, open(config_file, "w"), indent=1)
    datalist = _datalist(tmp_path / "pairs.json", entries[:2])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file, "--bundle_root", run_bundle,
         "--datalist_file", datalist, "--output_dir", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for entry in entries[:2]:
        np.testing.assert_allclose(read_field(str(tmp_path / "run" / entry["id"] / FIELDS[0])),
                                   read_field(separate[entry["id"]].files["displacement"]), rtol=0, atol=1e-4)
    assert [row["id"] for row in _summary(tmp_path / "run")] == ["pair0", "pair1"]
