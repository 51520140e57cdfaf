"""Register scans at the paper's native sizes and report the time and peak memory (RSS) of each stage.

Cases (synthetic smooth volumes written as NIfTI; the networks get seeded random weights, so the
fields are real deformations):

* ``knee``: OAI DESS grid 384×384×160 at 0.365×0.365×0.7 mm, the knee bundle (network 80×192×192);
* ``lung``: a 512×512×600 CT at 0.68×0.68×0.5 mm with lung masks, the lung bundle (network 175³).

Stages, from ``report.json``'s ``runtime_seconds`` and a 20 ms RSS sampler in this process:
reading + preprocessing (both scans to the network grid), the network (Φ_AB and Φ_BA), and resampling
+ writing (every fixed and moving voxel through the exact composed maps, the NIfTI/ITK files).
Prints one line per figure: ``<case>_<stage>: seconds=<s> peak_rss_gib=<GiB>``.

    python scripts/benchmark_full_size.py [--cases knee lung] [--threads 2] [--out /tmp/full_size]
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import nibabel as nib
import numpy as np
import torch

CASES = {
    "knee": {"bundle": "knee", "shape": (384, 384, 160), "spacing": (0.365, 0.365, 0.7), "masks": False},
    "lung": {"bundle": "lung", "shape": (512, 512, 600), "spacing": (0.68, 0.68, 0.5), "masks": True},
}


class RssSampler(threading.Thread):
    """Samples this process's resident set size every ``period`` seconds: ``[(t, bytes)]``."""

    def __init__(self, period: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.period, self.samples, self.running = period, [], True

    def run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while self.running:
            with open("/proc/self/statm") as f:
                self.samples.append((time.perf_counter(), int(f.read().split()[1]) * page))
            time.sleep(self.period)

    def peak(self, start: float, stop: float) -> float:
        values = [rss for t, rss in self.samples if start <= t <= stop]
        return max(values) / 2**30 if values else float("nan")


def synthetic_scan(shape, spacing, shift_mm, seed: int) -> np.ndarray:
    """A smooth volume (sum of Gaussian blobs, world coordinates) in [0, 1000]."""
    rng = np.random.default_rng(seed)
    axes = [(np.arange(n, dtype=np.float32) - n / 2) * s for n, s in zip(shape, spacing)]
    extent = np.array([n * s for n, s in zip(shape, spacing)], dtype=np.float32)
    volume = np.zeros(shape, np.float32)
    for _ in range(6):
        centre = (rng.random(3) - 0.5) * 0.6 * extent + np.asarray(shift_mm)
        width = extent * (0.08 + 0.1 * rng.random(3))
        g = [np.exp(-(((a - c) / w) ** 2)).astype(np.float32) for a, c, w in zip(axes, centre, width)]
        volume += 1000.0 * g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
    return np.clip(volume, 0.0, 1000.0)


def perturbed_model(bundle: str, seed: int):
    from monai_gradicon.app import load_registration_model
    from monai_gradicon.networks import GradICONUNet

    model = load_registration_model(bundle, allow_untrained=True, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for unet in [m for m in model.network.modules() if isinstance(m, GradICONUNet)]:
            unet.last_conv.weight.copy_(torch.randn(unet.last_conv.weight.shape, generator=generator) * 1e-3)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="/tmp/monai_gradicon_full_size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from monai_gradicon.app import register

    for name in args.cases:
        case = CASES[name]
        folder = os.path.join(args.out, name)
        os.makedirs(folder, exist_ok=True)
        affine = np.diag([*case["spacing"], 1.0])
        files = {}
        for role, shift, seed in (("moving", (3.0, -2.0, 1.5), 1), ("fixed", (0.0, 0.0, 0.0), 2)):
            volume = synthetic_scan(case["shape"], case["spacing"], shift, seed)
            if name == "lung":
                volume = volume - 1000.0  # HU: air −1000, blobs towards 0
                files[f"{role}_mask"] = os.path.join(folder, f"{role}_mask.nii.gz")
                nib.save(nib.Nifti1Image((volume > -990.0).astype(np.uint8), affine), files[f"{role}_mask"])
            files[role] = os.path.join(folder, f"{role}.nii.gz")
            nib.save(nib.Nifti1Image(volume, affine), files[role])
            del volume
        model = perturbed_model(case["bundle"], seed=0)
        sampler = RssSampler()
        sampler.start()
        started = time.perf_counter()
        outputs = register(
            files["moving"], files["fixed"], model, os.path.join(folder, "result"), progress=False,
            moving_mask=files.get("moving_mask"), fixed_mask=files.get("fixed_mask"),
        )
        sampler.running = False
        sampler.join()
        times = outputs.report["runtime_seconds"]
        # the report's runtime_seconds are stage durations; the RSS sampler needs their cumulative marks
        marks = [0.0, times["preprocessing"], times["preprocessing"] + times["network"], times["total"]]
        stages = ("read_preprocess", "network", "resample_write")
        for stage, t0, t1 in zip(stages, marks[:-1], marks[1:]):
            print(f"{name}_{stage}: seconds={t1 - t0:.1f} peak_rss_gib={sampler.peak(started + t0, started + t1):.2f}")
        print(f"{name}_total: seconds={times['total']:.1f} peak_rss_gib={sampler.peak(started, started + times['total']):.2f} "
              f"voxels={int(np.prod(case['shape']))} max_displacement_mm={outputs.report['max_displacement_mm']:.2f}")


if __name__ == "__main__":
    main()
