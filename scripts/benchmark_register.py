"""Benchmark one ``register`` call against ``icon_registration``'s ``itk_wrapper.register_pair`` (same weights).

A synthetic 3D pair at the knee network shape (80×192×192 voxels, 0.7×0.36×0.36 mm) is written to a
temporary folder. Each measurement runs in its own subprocess (so peak memory = that process's peak
RSS) on CPU with one torch thread:

* ours: ``monai_gradicon.app.register(moving, fixed, "knee", out, weights=<the .trch>)`` — the knee
  bundle's pipeline: reads both files, preprocesses (1st/99th percentile window), predicts Φ_AB and
  Φ_BA, writes warped image, displacement fields, ITK transforms (both directions), report;
* reference: ``itk.imread`` both files, ``itk_wrapper.register_pair`` (Φ_AB and Φ_BA), then
  ``itk.transformwrite`` of Φ_AB and an ITK linear resampling of the moving image written to disk
  (what ``unigradicon-register`` does).

Both networks hold the same random weights (a reference four-step GradICON network with perturbed
weights, imported into ours with ``load_reference_weights``). Instance optimisation uses Adam lr 2e-5
on the full GradICON objective in both (``--io-steps``; the reference's default is 50, which takes
a long time on CPU, so fewer steps can be asked for and the per-step time is reported too).

Usage::

    python scripts/benchmark_register.py --io-steps 50

Prints ``<figure>: ours=<value> reference=<value> ratio=<ours/reference>`` per figure, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

KNEE_SHAPE_ITK = (80, 192, 192)  # (k, j, i) as the reference's identity map
SPACING = (0.36, 0.36, 0.7)  # along i, j, k in mm


def _write_pair(folder: str) -> None:
    import nibabel as nib
    import torch

    from icon_registration.pretrained_models.lung_ct import make_network

    shape = tuple(reversed(KNEE_SHAPE_ITK))  # nibabel (i, j, k)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    affine = np.diag([*SPACING, 1.0])
    for name, shift in (("moving", 0.06), ("fixed", 0.0)):
        r = grid - np.array([shift, 0.0, 0.0])
        image = np.exp(-np.sum((r / [0.5, 0.35, 0.6]) ** 2, -1)) + 0.3 * np.sin(6 * r[..., 0]) * np.cos(5 * r[..., 1])
        nib.save(nib.Nifti1Image((200 * image).astype(np.float32), affine), os.path.join(folder, f"{name}.nii.gz"))
    torch.manual_seed(0)
    reference = make_network()
    with torch.no_grad():
        for p in reference.regis_net.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    torch.save(reference.regis_net.state_dict(), os.path.join(folder, "weights.trch"))


def _child(kind: str, folder: str, io_steps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    moving, fixed = os.path.join(folder, "moving.nii.gz"), os.path.join(folder, "fixed.nii.gz")
    if kind == "ours":
        from monai_gradicon.app import load_registration_model, register

        model = load_registration_model("knee", weights=os.path.join(folder, "weights.trch"), device="cpu")
        started = time.perf_counter()
        register(moving, fixed, model, os.path.join(folder, f"ours_{io_steps}"), io_steps=io_steps, progress=False)
        seconds = time.perf_counter() - started
    else:
        import itk

        from icon_registration import itk_wrapper
        from icon_registration.pretrained_models.lung_ct import make_network

        net = make_network()
        weights = torch.load(os.path.join(folder, "weights.trch"), map_location="cpu", weights_only=True)
        net.regis_net.load_state_dict(weights, strict=True)
        net.assign_identity_map([1, 1, *KNEE_SHAPE_ITK])
        net.eval()
        started = time.perf_counter()
        image_A = itk.imread(moving, itk.F)
        image_B = itk.imread(fixed, itk.F)
        out = os.path.join(folder, f"reference_{io_steps}")
        os.makedirs(out, exist_ok=True)
        phi_AB, phi_BA = itk_wrapper.register_pair(net, image_A, image_B, finetune_steps=io_steps or None)
        itk.transformwrite([phi_AB], os.path.join(out, "transform.hdf5"))
        itk.transformwrite([phi_BA], os.path.join(out, "inverse_transform.hdf5"))
        interpolator = itk.LinearInterpolateImageFunction.New(image_A)
        warped = itk.resample_image_filter(
            image_A, transform=phi_AB, interpolator=interpolator, use_reference_image=True, reference_image=image_B
        )
        itk.imwrite(warped, os.path.join(out, "warped_moving.nii.gz"))
        seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"seconds": seconds, "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--io-steps", type=int, default=50, help="instance-optimisation steps for the second figure")
    parser.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.folder, args.io_steps)))
        return
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        _write_pair(folder)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        for steps in (0, args.io_steps):
            for kind in ("ours", "reference"):
                command = [sys.executable, __file__, "--child", kind, "--folder", folder, "--io-steps", str(steps)]
                done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"{kind} with {steps} IO steps failed:\n{done.stderr[-3000:]}")
                results[(kind, steps)] = json.loads(done.stdout.strip().splitlines()[-1])
    rows = []
    for steps in (0, args.io_steps):
        label = "no_io" if steps == 0 else f"io{steps}"
        for measure, unit in (("seconds", "s"), ("peak_mb", "MB")):
            ours, reference = results[("ours", steps)][measure], results[("reference", steps)][measure]
            figure = f"register_{label}_{'wall_time_s' if measure == 'seconds' else 'peak_memory_mb'}"
            print(f"{figure}: ours={ours:.2f} reference={reference:.2f} ratio={ours / reference:.3f}")
            rows.append((figure, ours, reference, unit))
    if args.io_steps:
        per_step = [
            (results[(k, args.io_steps)]["seconds"] - results[(k, 0)]["seconds"]) / args.io_steps for k in ("ours", "reference")
        ]
        print(f"register_io_seconds_per_step: ours={per_step[0]:.2f} reference={per_step[1]:.2f} ratio={per_step[0] / per_step[1]:.3f}")
        rows.append(("register_io_seconds_per_step", *per_step, "s"))
    print()
    print(f"CPU, 1 torch thread, knee shape {KNEE_SHAPE_ITK}, same weights; IO steps = {args.io_steps}")
    print(f"{'figure':40s} {'ours':>10s} {'reference':>10s} {'ratio':>7s}")
    for figure, ours, reference, unit in rows:
        print(f"{figure:40s} {ours:9.2f}{unit:1s} {reference:9.2f}{unit:1s} {ours / reference:7.3f}")


if __name__ == "__main__":
    main()
