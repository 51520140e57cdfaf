"""The bundle is the source of truth: four ways to register a pair give one displacement; full-size scans pass.

* ``monai-gradicon register``, ``monai-gradicon evaluate``, the MONAI Deploy app's registration step and
  ``python -m monai.bundle run --config_file configs/inference.json`` all take their model from the bundle's
  ``registration_model``: on one pair and one weights file they write the same displacement field (≤ 1e-4 mm;
  the bundle run is a separate process with one thread, float sums may round differently).
* The released models' preprocessing runs at the paper's native sizes, OAI DESS 384×384×160 and a
  512×512×600 CT (more voxels than ``torch.quantile`` accepts), and equals an independent numpy/F.interpolate
  computation of the same chain.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from registration_helpers import blob_intensity, oblique_affine, save, world_points

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"image_shape": [34, 34, 34], "levels": [1, 0], "unet_down_channels": [8] * 5, "unet_up_channels": [8] * 5}


def shrunk_knee_bundle(root: str) -> str:
    """A copy of the knee bundle on a tiny grid with seeded random weights at its own ``weights_file`` path."""
    from monai_gradicon.app import load_registration_model
    from monai_gradicon.networks import GradICONUNet

    source = os.path.join(REPO, "bundles", "gradicon_knee_mri")
    shutil.copytree(os.path.join(source, "configs"), os.path.join(root, "configs"))
    os.makedirs(os.path.join(root, "models"))
    path = os.path.join(root, "configs", "inference.json")
    config = json.load(open(path))
    config.update(TINY)
    json.dump(config, open(path, "w"), indent=1)
    model = load_registration_model(root, allow_untrained=True, device="cpu")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for unet in [m for m in model.network.modules() if isinstance(m, GradICONUNet)]:
            unet.last_conv.weight.copy_(torch.randn(unet.last_conv.weight.shape, generator=generator) * 0.05)
    torch.save(model.network.state_dict(), os.path.join(root, "models", "knee_model_weights_step_2.trch"))
    return root


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    fixed_affine = oblique_affine()
    moving_affine = oblique_affine(spacing=(1.0, 1.3, 2.2), angles=(-0.1, 0.3, -0.2), origin=(-18.0, 12.0, 9.0))
    fixed_pts, moving_pts = world_points(fixed_affine, (22, 26, 18)), world_points(moving_affine, (24, 20, 21))
    centre = fixed_pts.reshape(-1, 3).mean(0)
    folder = root / "input"
    folder.mkdir()
    fixed = save(str(folder / "fixed.nii.gz"), 100.0 * blob_intensity(fixed_pts, centre), fixed_affine)
    moving = save(str(folder / "moving.nii.gz"), 100.0 * blob_intensity(moving_pts, centre + np.array([2.0, -1.0, 1.0])), moving_affine)
    datalist = root / "pairs.json"
    datalist.write_text(json.dumps({"testing": [{"moving": moving, "fixed": fixed, "id": "p"}]}))
    return root, folder, moving, fixed, str(datalist)


def test_register_evaluate_deploy_and_bundle_run_give_the_same_displacement(pair, tmp_path):
    from monai_gradicon.app.cli import main
    from monai_gradicon.app.deploy import find_pair, run_registration

    root, folder, moving, fixed, datalist = pair
    bundle = shrunk_knee_bundle(str(tmp_path / "knee"))
    assert main(["register", "--moving", moving, "--fixed", fixed, "--bundle", bundle, "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    assert main(["evaluate", "--pairs", datalist, "--out", str(tmp_path / "evaluate"), "--bundle", bundle, "--quiet"]) == 0
    run_registration(find_pair(str(folder)), str(tmp_path / "deploy"), bundle, device="cpu")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", os.path.join(bundle, "configs", "inference.json"),
         "--bundle_root", bundle, "--datalist_file", datalist, "--output_dir", str(tmp_path / "bundle_run"), "--num_threads", "1"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    fields = {
        name: np.asarray(nib.load(tmp_path / sub / "displacement_mm.nii.gz").dataobj)
        for name, sub in (("cli", "cli"), ("evaluate", "evaluate/p"), ("deploy", "deploy"), ("bundle_run", "bundle_run/p"))
    }
    reference = fields["cli"]
    assert np.linalg.norm(reference, axis=-1).max() > 1.0  # mm: a real deformation, not the identity
    for name, field in fields.items():
        assert np.abs(field - reference).max() < 1e-4, name
    reports = [json.load(open(tmp_path / sub / "report.json")) for sub in ("cli", "evaluate/p", "deploy", "bundle_run/p")]
    assert {r["weights"] for r in reports} == {os.path.join(bundle, "models", "knee_model_weights_step_2.trch")}


@pytest.mark.parametrize(
    "bundle, shape, spacing",
    [("knee", (384, 384, 160), (0.365, 0.365, 0.7)), ("lung", (512, 512, 600), (0.68, 0.68, 0.5))],
    ids=["knee-384x384x160", "lung-512x512x600"],
)
def test_full_size_scans_pass_the_bundle_preprocessing(bundle, shape, spacing):
    """The released models' scan preprocessing at native size equals numpy + F.interpolate of the same chain.

    knee: 1st/99th percentile → [0, 1] clamped (``np.percentile``, linear interpolation, as MONAI); lung:
    HU clamp [−1000, 0] → [0, 1] × (mask > 0); then the ITK array order (index axes reversed) and a
    trilinear ``align_corners=False`` resize to the network grid. Tolerance 1e-5 (float32 arithmetic).
    """
    from monai.data import MetaTensor

    from monai_gradicon.app import load_registration_model

    model = load_registration_model(bundle, allow_untrained=True, device="cpu")
    generator = torch.Generator().manual_seed(0)
    affine = np.diag([*spacing, 1.0])
    if bundle == "knee":
        image = torch.rand((1, *shape), generator=generator) * 800.0
        expected = np.asarray(image[0])
        low, high = np.percentile(expected, [1, 99])
        expected = np.clip((expected - low) / (high - low), 0.0, 1.0)
        scan = {"image": MetaTensor(image, affine=torch.as_tensor(affine)), "axcodes": "RAS"}
    else:
        image = torch.rand((1, *shape), generator=generator) * 1400.0 - 1100.0
        mask = torch.zeros((1, *shape))
        mask[:, 64:448, 96:416, 50:550] = 1.0
        expected = np.clip((np.asarray(image[0]) + 1000.0) / 1000.0, 0.0, 1.0) * (np.asarray(mask[0]) > 0)
        scan = {"image": MetaTensor(image, affine=torch.as_tensor(affine)), "mask": MetaTensor(mask, affine=torch.as_tensor(affine)), "axcodes": "RAS"}
    assert image.numel() > 2**24 or bundle == "knee"  # the CT has more voxels than torch.quantile accepts
    network_input, geometry, _ = model.prepare(scan)
    oracle = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(expected.transpose(2, 1, 0), dtype=np.float32))[None, None],
        size=model.network_shape, mode="trilinear", align_corners=False,
    )
    assert tuple(network_input.shape) == (1, 1, *model.network_shape)
    assert geometry.image_shape == shape and geometry.axis_order == (2, 1, 0)
    assert float(network_input.std()) > 0.05
    assert float((network_input - oracle).abs().max()) < 1e-5
