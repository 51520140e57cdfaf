"""Real 3D MR benchmark on CPU: a small GradICON network vs classic registration tools.

The image is real: the MNI152 2009a symmetric T1 template and its grey/white matter probability
maps, which ship inside the ``nilearn`` wheel (``nilearn/datasets/data/*.nii.gz``); nothing is
downloaded at run time. It is cropped around the brain and average-pooled to a ``5 mm`` grid of
``40^3`` voxels (``--voxel``); tissue labels are the arg-max of (background, GM, WM).

Pairs with a known deformation: a "subject" is the template warped by a random smooth
diffeomorphism ``S = T ∘ ψ`` (a stationary velocity field integrated by scaling and squaring), and
its pair is ``F = S ∘ (id + v)`` with another diffeomorphism ``v`` (sampled from ``T`` in one
interpolation), so the true MONAI DDF of the pair (moving ``S``, fixed ``F``) is exactly ``v``.
Independent Gaussian noise is added to both images.

A small 2-step GradICON network (MSE, lambda 0.2, as the paper's knee model; ``--similarity lncc``
switches to LNCC) is trained on freshly drawn pairs (one per step); it and
the baselines then register the same held-out pairs. Reported per method: Dice of the warped
GM and WM labels, ground-truth deformation error in mm (mean and 95th percentile inside the
brain), % voxels with det J <= 0, seconds per pair. Baselines (each skipped with a note in the CSV
when its package is absent): ANTs SyN (``antspyx``), SimpleITK diffeomorphic demons, elastix
B-spline (``itk-elastix``).

Writes ``<out>/per_pair.csv``, ``<out>/summary.csv``, ``<out>/training.csv``, ``<out>/slices.png``.

    python scripts/results/real_mri_benchmark.py            # full CPU run (~15-20 min wall on a loaded 2-core machine, 1 thread)
    python scripts/results/real_mri_benchmark.py --quick    # tiny, for the test
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from monai_gradicon.data import random_smooth_ddf  # noqa: E402
from monai_gradicon.losses import GradICONLoss, GradICONObjective, LNCCLoss  # noqa: E402
from monai_gradicon.maps import jacobian_determinant, warp  # noqa: E402
from monai_gradicon.networks import GradICONUNet, multistep_network  # noqa: E402

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
TISSUES = {1: "GM", 2: "WM"}


def nilearn_data_dir() -> Path:
    """The folder of NIfTI files inside the installed nilearn package (no import of nilearn itself)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed: `pip install nilearn==0.14.1` (its wheel ships the MNI152 template).")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [f for f in TEMPLATE_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"expected {missing} in {folder} (nilearn package data), not found.")
    return folder


def load_template(voxel_mm: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The T1 template in [0, 1] ``(1, 1, size^3)`` and its tissue labels (0 bg, 1 GM, 2 WM), on a ``voxel_mm`` grid."""
    folder = nilearn_data_dir()
    volumes = {k: np.asarray(nib.load(folder / f).get_fdata(dtype=np.float32)) for k, f in TEMPLATE_FILES.items()}
    zooms = nib.load(folder / TEMPLATE_FILES["t1"]).header.get_zooms()[:3]
    if any(abs(z - 1.0) > 1e-3 for z in zooms):
        raise ValueError(f"expected the 1 mm MNI152 template, got voxel size {zooms}.")
    brain = np.argwhere(volumes["t1"] > 0)
    centre = ((brain.min(0) + brain.max(0)) // 2).astype(int)
    extent = voxel_mm * size
    crop = {}
    for k, v in volumes.items():
        out = np.zeros((extent,) * 3, np.float32)
        src, dst = [], []
        for axis in range(3):
            lo = centre[axis] - extent // 2
            s0, s1 = max(lo, 0), min(lo + extent, v.shape[axis])
            src.append(slice(s0, s1))
            dst.append(slice(s0 - lo, s1 - lo))
        out[tuple(dst)] = v[tuple(src)]
        crop[k] = torch.from_numpy(out)[None, None]
    pooled = {k: F.avg_pool3d(v, voxel_mm) for k, v in crop.items()}
    t1 = pooled["t1"] / pooled["t1"].max()
    gm, wm = pooled["gm"] / 255.0, pooled["wm"] / 255.0
    labels = torch.argmax(torch.cat([1 - gm - wm, gm, wm], 1), 1, keepdim=True).float()
    return t1, labels


def diffeomorphism(shape: tuple[int, ...], max_velocity: float, generator: torch.Generator, squarings: int = 6) -> torch.Tensor:
    """A DDF ``(1, 3, *shape)`` (voxels) of ``exp(velocity)`` by scaling and squaring: invertible by construction."""
    ddf = random_smooth_ddf(shape, max_velocity, control_points=5, generator=generator) / 2**squarings
    for _ in range(squarings):
        ddf = ddf + warp(ddf, ddf)
    return ddf


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """DDF of ``(id + outer) ∘ (id + inner)``: ``inner + outer(x + inner)``."""
    return inner + warp(outer, inner)


def make_pair(template: torch.Tensor, labels: torch.Tensor, max_subject: float, max_pair: float, noise: float, g: torch.Generator) -> dict:
    shape = tuple(template.shape[2:])
    subject = diffeomorphism(shape, max_subject, g)
    truth = diffeomorphism(shape, max_pair, g)
    total = compose(subject, truth)  # F = T ∘ (id + subject) ∘ (id + truth)
    pair = {
        "moving": warp(template, subject),
        "fixed": warp(template, total),
        "moving_label": warp(labels, subject, mode="nearest"),
        "fixed_label": warp(labels, total, mode="nearest"),
        "ddf": truth,
    }
    for k in ("moving", "fixed"):
        pair[k] = pair[k] + noise * torch.randn(pair[k].shape, generator=g)
    return pair


def dice_per_tissue(warped: torch.Tensor, fixed: torch.Tensor) -> dict[str, float]:
    out = {}
    for value, name in TISSUES.items():
        a, b = warped == value, fixed == value
        out[f"dice_{name}"] = float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))
    return out


def score(ddf: torch.Tensor, pair: dict, voxel_mm: float) -> dict[str, float]:
    """Dice of warped labels, GT error (mm) inside the fixed brain, % det J <= 0."""
    warped_labels = warp(pair["moving_label"], ddf, mode="nearest")
    brain = pair["fixed_label"][0, 0] > 0
    error = ((ddf - pair["ddf"]) * voxel_mm).norm(dim=1)[0][brain]
    start = ((pair["ddf"]) * voxel_mm).norm(dim=1)[0][brain]
    det = jacobian_determinant(ddf)
    return {
        **dice_per_tissue(warped_labels, pair["fixed_label"]),
        "gt_error_mm": float(error.mean()),
        "gt_error_p95_mm": float(torch.quantile(error, 0.95)),
        "truth_magnitude_mm": float(start.mean()),
        "folds_pct": float((det <= 0).float().mean() * 100),
    }


# ---------------------------------------------------------------- classic baselines (each returns a voxel DDF)


OUTSIDE = -1.0e6  # value of coordinate images outside the moving image
ITERATIONS = {"demons": 100, "elastix": 100}  # per level; --quick lowers them


def _to_itk_order(a: torch.Tensor) -> np.ndarray:
    """(1, 1, X, Y, Z) tensor -> numpy (Z, Y, X), so that ITK's x axis is our axis 0."""
    return np.ascontiguousarray(a[0, 0].numpy().transpose(2, 1, 0)).astype(np.float32)


def _coordinate_images(shape: tuple[int, ...], voxel_mm: float) -> list[torch.Tensor]:
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) * voxel_mm for n in shape], indexing="ij")
    return [g[None, None] for g in grids]


def sitk_demons(pair: dict, voxel_mm: float) -> torch.Tensor:
    import SimpleITK as sitk

    def image(t):
        im = sitk.GetImageFromArray(_to_itk_order(t))
        im.SetSpacing((voxel_mm,) * 3)
        return im

    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetNumberOfIterations(ITERATIONS["demons"])
    demons.SetStandardDeviations(1.5)
    fixed, moving = image(pair["fixed"]), image(pair["moving"])
    # 3-level pyramid: shrink 4, 2, 1, passing the field up
    field = None
    for shrink in (4, 2, 1):
        f = sitk.Shrink(fixed, [shrink] * 3) if shrink > 1 else fixed
        m = sitk.Shrink(moving, [shrink] * 3) if shrink > 1 else moving
        if field is not None:
            field = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
            field = demons.Execute(f, m, field)
        else:
            field = demons.Execute(f, m)
    disp = sitk.GetArrayFromImage(field)  # (Z, Y, X, 3), physical (mm), component c along our axis c
    return torch.from_numpy(disp.transpose(3, 2, 1, 0).copy())[None] / voxel_mm


def ants_syn(pair: dict, voxel_mm: float) -> torch.Tensor:
    import ants

    def image(t):
        return ants.from_numpy(t[0, 0].numpy().astype(np.float32), spacing=(voxel_mm,) * 3)

    fixed, moving = image(pair["fixed"]), image(pair["moving"])
    result = ants.registration(fixed=fixed, moving=moving, type_of_transform="SyN")
    coords = []
    for c in _coordinate_images(tuple(pair["fixed"].shape[2:]), voxel_mm):
        warped = ants.apply_transforms(fixed, image(c), result["fwdtransforms"], interpolator="linear", defaultvalue=OUTSIDE)
        coords.append(torch.from_numpy(warped.numpy()))
    return _ddf_from_coordinates(coords, voxel_mm)


def elastix_bspline(pair: dict, voxel_mm: float) -> torch.Tensor:
    import itk

    def image(t):
        im = itk.GetImageFromArray(_to_itk_order(t))
        im.SetSpacing((voxel_mm,) * 3)
        return im

    params = itk.ParameterObject.New()
    bspline = params.GetDefaultParameterMap("bspline", 3)
    bspline["MaximumNumberOfIterations"] = [str(ITERATIONS["elastix"])]
    bspline["FinalGridSpacingInPhysicalUnits"] = [str(4 * voxel_mm)]
    params.AddParameterMap(bspline)
    fixed, moving = image(pair["fixed"]), image(pair["moving"])
    _, transform = itk.elastix_registration_method(fixed, moving, parameter_object=params, log_to_console=False)
    transform.SetParameter("FinalBSplineInterpolationOrder", "1")
    transform.SetParameter("DefaultPixelValue", str(OUTSIDE))
    coords = []
    for c in _coordinate_images(tuple(pair["fixed"].shape[2:]), voxel_mm):
        warped = itk.transformix_filter(image(c), transform)
        coords.append(torch.from_numpy(itk.GetArrayFromImage(warped).transpose(2, 1, 0).copy()))
    return _ddf_from_coordinates(coords, voxel_mm)


def _ddf_from_coordinates(coords: list[torch.Tensor], voxel_mm: float) -> torch.Tensor:
    """Warped coordinate images (mm) -> voxel DDF; points mapped outside the image keep the nearest valid value."""
    shape = coords[0].shape
    identity = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    outside = torch.stack(coords).le(OUTSIDE / 2).any(0)
    ddf = torch.stack([c / voxel_mm - i for c, i in zip(coords, identity)])[None]
    return torch.where(outside, torch.zeros_like(ddf), ddf)


def baseline_missing(module: str) -> str:
    """Why a baseline cannot run here ('' when it can): its package is absent or lacks the needed API."""
    try:
        if module == "ants":
            import ants  # noqa: F401
        elif module == "SimpleITK":
            import SimpleITK  # noqa: F401
        else:
            import itk

            itk.elastix_registration_method  # noqa: B018  (itk without itk-elastix lacks it)
    except (ImportError, AttributeError) as error:
        package = {"ants": "antspyx", "SimpleITK": "SimpleITK", "itk": "itk-elastix"}[module]
        return f"package {package} is not installed ({type(error).__name__}: {error})"
    return ""


BASELINES = {"ANTs SyN (antspyx)": ("ants", ants_syn), "SimpleITK diffeomorphic demons": ("SimpleITK", sitk_demons),
             "elastix B-spline (itk-elastix)": ("itk", elastix_bspline)}


# ---------------------------------------------------------------- main


def plot_slices(pair: dict, results: dict[str, torch.Tensor], out: Path) -> None:
    z = pair["fixed"].shape[-1] // 2
    panels = [("moving", pair["moving"]), ("fixed", pair["fixed"])] + [(k, warp(pair["moving"], v)) for k, v in results.items()]
    fig, axes = plt.subplots(2, len(panels), figsize=(2.6 * len(panels), 5.4))
    for j, (title, img) in enumerate(panels):
        axes[0, j].imshow(img[0, 0, :, :, z].T.numpy(), cmap="gray", origin="lower", vmin=0, vmax=1)
        axes[0, j].set_title(title, fontsize=8)
        axes[1, j].imshow((img - pair["fixed"])[0, 0, :, :, z].T.abs().numpy(), cmap="magma", origin="lower", vmin=0, vmax=0.5)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1, 0].set_ylabel("|image - fixed|")
    fig.tight_layout()
    fig.savefig(out / "slices.png", dpi=100)
    plt.close(fig)


def write_csv(rows: list[dict], path: Path) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny run for tests (8 mm, 24^3, 3 steps, 1 pair)")
    parser.add_argument("--voxel", type=int, default=5, help="voxel size in mm of the working grid")
    parser.add_argument("--size", type=int, default=40, help="voxels per axis of the working grid")
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--test-pairs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    parser.add_argument("--max-subject", type=float, default=3.0, help="velocity amplitude (voxels) of the subject warps")
    parser.add_argument("--max-pair", type=float, default=2.5, help="velocity amplitude (voxels) of the true pair warps")
    parser.add_argument("--noise", type=float, default=0.02)
    parser.add_argument("--similarity", choices=("lncc", "mse"), default="mse", help="MSE (as the paper's knee model) or LNCC (sigma 2 voxels)")
    parser.add_argument("--lmbda", type=float, default=0.2, help="GradICON weight (paper knee: 0.2)")
    parser.add_argument("--baselines", default="all", help="comma list of ants,SimpleITK,itk or 'all' or 'none'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "real_mri")
    args = parser.parse_args(argv)
    channels = ((8, 16, 32), (8, 16, 16))
    if args.quick:
        args.voxel, args.size, args.steps, args.batch, args.test_pairs = 8, 24, 3, 1, 1
        channels = ((4, 8), (4, 8))
        ITERATIONS.update(demons=5, elastix=10)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))
    os.environ.setdefault("ANTS_RANDOM_SEED", str(args.seed))
    args.out.mkdir(parents=True, exist_ok=True)

    template, labels = load_template(args.voxel, args.size)
    draw = lambda g: make_pair(template, labels, args.max_subject, args.max_pair, args.noise, g)  # noqa: E731
    test_generator = torch.Generator().manual_seed(10_000 + args.seed)
    test_pairs = [draw(test_generator) for _ in range(args.test_pairs)]

    # ---- train a small 2-step GradICON network on fresh pairs
    torch.manual_seed(args.seed)
    down, up = channels
    net = multistep_network(3, (1, 0), subnetwork=lambda: GradICONUNet(3, down_channels=down, up_channels=up))
    similarity = LNCCLoss(3, sigma=2) if args.similarity == "lncc" else torch.nn.MSELoss()
    objective = GradICONObjective(similarity, GradICONLoss(3, generator=torch.Generator().manual_seed(args.seed + 1)), args.lmbda)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    train_generator = torch.Generator().manual_seed(args.seed)
    training, start = [], time.perf_counter()
    for step in tqdm(range(args.steps), desc="train 3D GradICON", mininterval=5):
        batch = [draw(train_generator) for _ in range(args.batch)]
        a = torch.cat([p["moving"] for p in batch])
        b = torch.cat([p["fixed"] for p in batch])
        terms = objective(a, b, net.deformation(a, b), net.deformation(b, a))
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
        training.append({"step": step, "seconds": round(time.perf_counter() - start, 2), **terms.scalars()})
    train_seconds = time.perf_counter() - start
    write_csv(training, args.out / "training.csv")

    # ---- register the held-out pairs with every method
    wanted = None if args.baselines == "all" else {s.strip() for s in args.baselines.split(",") if s.strip() and s != "none"}
    rows, example = [], {}
    net.eval()
    methods = [("identity", None, lambda p, v: torch.zeros_like(p["ddf"])),
               ("GradICON 2-step (ours, trained here)", None, None)]
    methods += [(name, module, fn) for name, (module, fn) in BASELINES.items()]
    for name, module, fn in methods:
        if module is not None:
            if wanted is not None and module not in wanted:
                continue
            missing = baseline_missing(module)
            if missing:
                rows.append({"method": name, "pair": "all", "note": f"not run: {missing}"})
                print(f"{name}: not run: {missing}")
                continue
        for index, pair in enumerate(tqdm(test_pairs, desc=name, mininterval=5)):
            t0 = time.perf_counter()
            if fn is None:
                with torch.no_grad():
                    ddf = net(pair["moving"], pair["fixed"])
            else:
                ddf = fn(pair, float(args.voxel)).float()
            seconds = time.perf_counter() - t0
            rows.append({"method": name, "pair": index, "seconds": round(seconds, 3), **score(ddf, pair, float(args.voxel)), "note": ""})
            if index == 0:
                example[name] = ddf
    write_csv(rows, args.out / "per_pair.csv")

    summary = []
    for name in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == name and r["pair"] != "all"]
        if not sel:
            summary.append({"method": name, "note": next(r["note"] for r in rows if r["method"] == name)})
            continue
        keys = ("dice_GM", "dice_WM", "gt_error_mm", "gt_error_p95_mm", "folds_pct", "seconds")
        summary.append({"method": name, "pairs": len(sel), **{k: round(float(np.mean([r[k] for r in sel])), 4) for k in keys},
                        "truth_magnitude_mm": round(float(np.mean([r["truth_magnitude_mm"] for r in sel])), 4),
                        "note": f"train {train_seconds:.0f} s, {args.steps} steps x {args.batch} pairs" if name.startswith("GradICON") else ""})
    write_csv(summary, args.out / "summary.csv")
    plot_slices(test_pairs[0], example, args.out)

    ours = next(s for s in summary if s["method"].startswith("GradICON"))
    for s in summary:
        if "dice_GM" in s and s is not ours and s["method"] != "identity":
            for key in ("dice_GM", "gt_error_mm", "seconds"):
                ratio = ours[key] / s[key] if s[key] else float("nan")
                print(f"{key} vs {s['method']}: ours={ours[key]:.4f} reference={s[key]:.4f} ratio={ratio:.3f}")
    print(f"\n{args.size}^3 at {args.voxel} mm, {len(test_pairs)} held-out pairs; GradICON trained {train_seconds:.0f} s")
    print(f"{'method':<38}{'Dice GM':>8}{'Dice WM':>8}{'err mm':>8}{'p95 mm':>8}{'% fold':>8}{'s/pair':>8}")
    for s in summary:
        if "dice_GM" in s:
            print(f"{s['method']:<38}{s['dice_GM']:>8.3f}{s['dice_WM']:>8.3f}{s['gt_error_mm']:>8.2f}{s['gt_error_p95_mm']:>8.2f}{s['folds_pct']:>8.3f}{s['seconds']:>8.2f}")
        else:
            print(f"{s['method']:<38}{s['note']}")
    return {"per_pair": rows, "summary": summary, "training": training}


if __name__ == "__main__":
    main()
