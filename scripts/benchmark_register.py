"""Benchmark one ``register`` call against ``icon_registration``'s ``itk_wrapper.register_pair`` (same weights).

A synthetic 3D pair at the knee network shape (80×192×192 voxels, 0.7×0.36×0.36 mm) is written to a
temporary folder. Each measurement runs in its own subprocess (so peak memory = that process's peak
RSS) on CPU with ``--threads`` torch threads (default 2, this machine's cores; the same for both):

* ours: ``monai_gradicon.app.register(moving, fixed, "knee", out, weights=<the .trch>)`` — the knee
  bundle's pipeline: reads both files, preprocesses (1st/99th percentile window), predicts Φ_AB and
  Φ_BA, writes warped image, displacement fields, ITK transforms (both directions), report;
* reference: ``itk.imread`` both files, ``itk_wrapper.register_pair`` (Φ_AB and Φ_BA), then
  ``itk.transformwrite`` of Φ_AB and an ITK linear resampling of the moving image written to disk
  (what ``unigradicon-register`` does).

The batch figure registers ``--batch-pairs`` pairs (default 4; the moving blob shifted differently in each):

* ours: ``register_pairs`` (``monai-gradicon register-batch``) on their datalist, ``--batch-size`` pairs per
  network call (default: all of them), the model loaded once;
* reference: one ``itk_wrapper.register_pair`` call per pair, as above, the network built once;

and prints ``register_batch_seconds_per_pair`` (wall time / pairs).

Both networks hold the same random weights (a reference four-step GradICON network with perturbed
weights, imported into ours with ``load_reference_weights``). Instance optimisation uses Adam lr 2e-5
on the full GradICON objective in both (``--io-steps`` in the second ``register`` call; the reference's
default is 50, which takes long on CPU).

The io figure, ``register_io_seconds_per_step``, is measured in one process with the calls interleaved
(see :func:`_io_steps_interleaved`): the marginal cost of an Adam step of each side's own IO routine.

Usage::

    python scripts/benchmark_register.py --io-steps 2 --figures single,io
    python scripts/benchmark_register.py --figures batch --batch-pairs 4 --batch-size 4   # the batch figure only

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


def _write_pair(folder: str, pairs: int = 1) -> None:
    """``moving.nii.gz``/``fixed.nii.gz`` (+ ``moving_<k>.nii.gz`` for ``k < pairs``, ``pairs.json``) and ``weights.trch``."""
    import nibabel as nib
    import torch

    from icon_registration.pretrained_models.lung_ct import make_network

    shape = tuple(reversed(KNEE_SHAPE_ITK))  # nibabel (i, j, k)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    affine = np.diag([*SPACING, 1.0])
    shifts = [("moving", 0.06), ("fixed", 0.0)] + [(f"moving_{k}", 0.03 + 0.02 * k) for k in range(pairs)]
    for name, shift in shifts:
        r = grid - np.array([shift, 0.0, 0.0])
        image = np.exp(-np.sum((r / [0.5, 0.35, 0.6]) ** 2, -1)) + 0.3 * np.sin(6 * r[..., 0]) * np.cos(5 * r[..., 1])
        nib.save(nib.Nifti1Image((200 * image).astype(np.float32), affine), os.path.join(folder, f"{name}.nii.gz"))
    entries = [{"id": f"pair{k}", "moving": f"moving_{k}.nii.gz", "fixed": "fixed.nii.gz"} for k in range(pairs)]
    with open(os.path.join(folder, "pairs.json"), "w", encoding="utf-8") as f:
        json.dump({"testing": entries}, f)
    torch.manual_seed(0)
    reference = make_network()
    with torch.no_grad():
        for p in reference.regis_net.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    torch.save(reference.regis_net.state_dict(), os.path.join(folder, "weights.trch"))


def _reference_network(folder: str):
    """The reference's four-step network with the benchmark weights, on the knee grid, in eval mode."""
    import torch

    from icon_registration.pretrained_models.lung_ct import make_network

    net = make_network()
    weights = torch.load(os.path.join(folder, "weights.trch"), map_location="cpu", weights_only=True)
    net.regis_net.load_state_dict(weights, strict=True)
    net.assign_identity_map([1, 1, *KNEE_SHAPE_ITK])
    net.eval()
    return net


def _reference_register(net, moving: str, fixed: str, out: str, io_steps: int) -> None:
    """What ``unigradicon-register`` does: read, ``register_pair``, write both transforms and the warped image."""
    import itk

    from icon_registration import itk_wrapper

    image_A = itk.imread(moving, itk.F)
    image_B = itk.imread(fixed, itk.F)
    os.makedirs(out, exist_ok=True)
    phi_AB, phi_BA = itk_wrapper.register_pair(net, image_A, image_B, finetune_steps=io_steps or None)
    itk.transformwrite([phi_AB], os.path.join(out, "transform.hdf5"))
    itk.transformwrite([phi_BA], os.path.join(out, "inverse_transform.hdf5"))
    interpolator = itk.LinearInterpolateImageFunction.New(image_A)
    warped = itk.resample_image_filter(
        image_A, transform=phi_AB, interpolator=interpolator, use_reference_image=True, reference_image=image_B
    )
    itk.imwrite(warped, os.path.join(out, "warped_moving.nii.gz"))


def _child(kind: str, folder: str, io_steps: int, batch_size: int = 1, threads: int = 2) -> dict:
    import torch

    torch.set_num_threads(threads)
    moving, fixed = os.path.join(folder, "moving.nii.gz"), os.path.join(folder, "fixed.nii.gz")
    if kind in ("ours", "ours_batch"):
        from monai_gradicon.app import load_registration_model, register, register_pairs

        model = load_registration_model("knee", weights=os.path.join(folder, "weights.trch"), device="cpu")
        started = time.perf_counter()
        if kind == "ours":
            register(moving, fixed, model, os.path.join(folder, f"ours_{io_steps}"), io_steps=io_steps, progress=False)
        else:
            register_pairs(model, os.path.join(folder, "pairs.json"), os.path.join(folder, "ours_batch"), batch_size=batch_size, progress=False)
        seconds = time.perf_counter() - started
    else:
        net = _reference_network(folder)
        started = time.perf_counter()
        if kind == "reference":
            _reference_register(net, moving, fixed, os.path.join(folder, f"reference_{io_steps}"), io_steps)
        else:
            with open(os.path.join(folder, "pairs.json"), encoding="utf-8") as f:
                entries = json.load(f)["testing"]
            for entry in entries:
                _reference_register(
                    net, os.path.join(folder, entry["moving"]), os.path.join(folder, entry["fixed"]),
                    os.path.join(folder, "reference_batch", entry["id"]), 0,
                )
        seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"seconds": seconds, "peak_mb": peak_mb}


def _measure(kind: str, folder: str, steps: int, batch_size: int = 1, threads: int = 2) -> dict:
    """One measurement in its own process (``threads`` torch threads)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    command = [sys.executable, __file__, "--child", kind, "--folder", folder, "--io-steps", str(steps),
               "--batch-size", str(batch_size), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} with {steps} IO steps failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _io_steps_interleaved(folder: str, repeats: int, threads: int) -> tuple[float, float]:
    """Seconds per instance-optimisation step, ours and the reference's, in this process, calls interleaved.

    Each side's own IO routine runs on the network-grid pair with 1 and with 3 Adam steps — ours
    ``instance_optimize`` on what ``prepare_pair`` gives, the reference's ``itk_wrapper.finetune_execute``
    on what ``register_pair`` gives it (its trilinear resize of the ITK arrays) — and a step costs
    ``(t(3) - t(1)) / 2``: the weight copy, the final evaluation and the first step's allocations cancel.
    Order ours(1), reference(1), ours(3), reference(3), ``repeats`` times after one warm-up each; medians.
    """
    import contextlib
    import io
    import statistics

    import itk
    import torch
    import torch.nn.functional as F

    from icon_registration import itk_wrapper

    from monai_gradicon.app import load_registration_model
    from monai_gradicon.app.instance_optimization import DEFAULT_IO_LEARNING_RATE, instance_optimize
    from monai_gradicon.app.register import prepare_pair

    torch.set_num_threads(threads)
    moving, fixed = os.path.join(folder, "moving.nii.gz"), os.path.join(folder, "fixed.nii.gz")
    model = load_registration_model("knee", weights=os.path.join(folder, "weights.trch"), device="cpu")
    pair = prepare_pair(model, moving, fixed, device="cpu")
    objective = model.objective("lncc")
    net = _reference_network(folder)
    resized = [
        F.interpolate(torch.Tensor(np.array(itk.imread(path, itk.F)))[None, None], size=KNEE_SHAPE_ITK, mode="trilinear", align_corners=False)
        for path in (moving, fixed)
    ]

    def ours(steps: int) -> None:
        instance_optimize(model.deformation, model.network, pair.A, pair.B, objective, steps, DEFAULT_IO_LEARNING_RATE,
                          progress=False, generator=torch.Generator().manual_seed(0))

    def reference(steps: int) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints the loss of every step
            itk_wrapper.finetune_execute(net, *resized, steps, DEFAULT_IO_LEARNING_RATE)

    ours(1)
    reference(1)
    per_step: dict[str, list[float]] = {"ours": [], "reference": []}
    for _ in range(repeats):
        seconds = {}
        for steps in (1, 3):
            for name, fn in (("ours", ours), ("reference", reference)):
                started = time.perf_counter()
                fn(steps)
                seconds[name, steps] = time.perf_counter() - started
        for name in per_step:
            per_step[name].append((seconds[name, 3] - seconds[name, 1]) / 2)
    return statistics.median(per_step["ours"]), statistics.median(per_step["reference"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--io-steps", type=int, default=2, help="instance-optimisation steps of the second register call")
    parser.add_argument("--figures", default="single,io,batch",
                        help="comma-separated: single (one register), io (seconds per IO step, in process), batch (register-batch)")
    parser.add_argument("--repeats", type=int, default=2, help="repetitions of the io figure (median)")
    parser.add_argument("--batch-pairs", type=int, default=4, help="pairs of the batch figure")
    parser.add_argument("--batch-size", type=int, default=0, help="pairs per network call in the batch figure (0: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every measurement (ours and reference alike)")
    parser.add_argument("--child", choices=["ours", "reference", "ours_batch", "reference_batch"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.folder, args.io_steps, args.batch_size, args.threads)))
        return
    figures = set(args.figures.split(","))
    if not figures or not figures <= {"single", "io", "batch"}:
        parser.error(f"--figures takes single, io and/or batch, got {args.figures!r}")
    batch_size = args.batch_size or args.batch_pairs
    step_counts = sorted({0, args.io_steps}) if "single" in figures else []
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        _write_pair(folder, args.batch_pairs)
        for steps in step_counts:
            for kind in ("ours", "reference"):
                results[(kind, steps)] = _measure(kind, folder, steps, threads=args.threads)
        if "batch" in figures:
            for kind in ("ours_batch", "reference_batch"):
                results[(kind, 0)] = _measure(kind, folder, 0, batch_size, args.threads)
    rows = []
    for steps in step_counts:
        label = "no_io" if steps == 0 else f"io{steps}"
        for measure, unit in (("seconds", "s"), ("peak_mb", "MB")):
            ours, reference = results[("ours", steps)][measure], results[("reference", steps)][measure]
            figure = f"register_{label}_{'wall_time_s' if measure == 'seconds' else 'peak_memory_mb'}"
            print(f"{figure}: ours={ours:.2f} reference={reference:.2f} ratio={ours / reference:.3f}")
            rows.append((figure, ours, reference, unit))
    if "io" in figures:
        with tempfile.TemporaryDirectory() as folder:
            _write_pair(folder, 1)
            per_step = _io_steps_interleaved(folder, args.repeats, args.threads)
        print(f"register_io_seconds_per_step: ours={per_step[0]:.2f} reference={per_step[1]:.2f} ratio={per_step[0] / per_step[1]:.3f}")
        rows.append(("register_io_seconds_per_step", *per_step, "s"))
    if "batch" in figures:
        ours, reference = (results[(k, 0)]["seconds"] / args.batch_pairs for k in ("ours_batch", "reference_batch"))
        print(f"register_batch_seconds_per_pair: ours={ours:.2f} reference={reference:.2f} ratio={ours / reference:.3f}")
        rows.append(("register_batch_seconds_per_pair", ours, reference, "s"))
        memory = [results[(k, 0)]["peak_mb"] for k in ("ours_batch", "reference_batch")]
        print(f"register_batch_peak_memory_mb: ours={memory[0]:.2f} reference={memory[1]:.2f} ratio={memory[0] / memory[1]:.3f}")
        rows.append(("register_batch_peak_memory_mb", *memory, "MB"))
    print()
    print(
        f"CPU, {args.threads} torch thread(s), load average {os.getloadavg()}, knee shape {KNEE_SHAPE_ITK}, same weights; IO steps = {args.io_steps}; "
        f"batch: {args.batch_pairs} pairs, {batch_size} per network call"
    )
    print(f"{'figure':40s} {'ours':>10s} {'reference':>10s} {'ratio':>7s}")
    for figure, ours, reference, unit in rows:
        print(f"{figure:40s} {ours:9.2f}{unit:1s} {reference:9.2f}{unit:1s} {ours / reference:7.3f}")


if __name__ == "__main__":
    main()
