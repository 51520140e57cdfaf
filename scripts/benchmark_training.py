"""Seconds per GradICON training iteration: MONAI SupervisedTrainer with our pieces vs the reference.

Figure ``knee_4step_train_iteration_80x96x96``: one training iteration of the knee 4-step network
(quarter/half/full/full U-Nets, 70.7 M parameters) on a 1×1×80×96×96 pair on CPU — both directions,
the symmetric GradICON objective (MSE, λ = 0.2), backward and an Adam step:

* ours: ``monai.engines.SupervisedTrainer`` with ``BidirectionalRegistration`` + ``GradICONTrainingLoss``
  (exactly what the bundles run; one ``trainer.run()`` of one iteration, engine overhead included);
* reference: ``icon_registration.GradientICON`` (1.1.9) around the twin network
  (``tests/reference_oracle.py``) with the same weights (imported with ``load_reference_weights``),
  ``loss = model(A, B).all_loss; loss.backward(); optimizer.step()``.

Calls are interleaved (ours, reference, ours, ...) after one warm-up each, so that load from other
processes hits both alike; the median is reported. ``knee_4step_train_iteration_<shape>_reference_layout``
is the same with our U-Nets built with ``channels_last=False`` (the reference's memory layout and rounding;
the default is channels-last).

Figure ``knee_4step_train_iteration_<peak shape>_peak_mib`` (default 160×192×192): the peak memory of
one such iteration, each measurement in its own child process (resident-set growth during the
iteration: Linux VmHWM reset through /proc/self/clear_refs, glibc's mmap threshold fixed so freed
tensors leave the resident set), ours with ``checkpoint_activations=True`` and without
(``..._no_checkpoint_peak_mib``), against the reference; children run one after the other.

Prints ``<figure>: ours=<value> reference=<value> ratio=<ours/reference>`` then a table and the load.

    python scripts/benchmark_training.py [--repeats 3] [--threads 2] [--shape 80 96 96] [--peak-shape 160 192 192]
    python scripts/benchmark_training.py --quick      # tiny sizes, seconds (smoke test)

About 2 minutes for the timing and 6 for the 160×192×192 peaks (~12 GiB for the reference) on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import icon_registration as icon  # noqa: E402
from monai.engines import SupervisedTrainer  # noqa: E402
from reference_oracle import reference_network  # noqa: E402

from benchmark_reference import _measure_once as measure_once  # noqa: E402  (this folder is on sys.path)

from monai_gradicon.engines import BidirectionalRegistration, GradICONTrainingLoss, PairToDDF  # noqa: E402
from monai_gradicon.networks import load_reference_weights, multistep_network  # noqa: E402


LEVELS = [(2, 1, 0, 0)]  # the knee layout; --quick: one U-Net (0,)


def _networks(checkpoint: bool = False, channels_last: bool = True):
    """The reference twin network with perturbed weights and ours holding the same weights."""
    torch.manual_seed(0)
    ref_net = reference_network(3, LEVELS[0])
    for p in ref_net.parameters():  # non-trivial weights (the U-Nets start at the identity otherwise)
        p.data.add_(0.01 * torch.randn_like(p))
    ours_net = multistep_network(3, LEVELS[0], checkpoint_activations=checkpoint, channels_last=channels_last)
    return ref_net, load_reference_weights(ours_net, ref_net.state_dict())


def _iterations(shape, checkpoint: bool = False, channels_last: bool = True):
    """``(ours, reference)``: callables running one training iteration each on a fixed random pair."""
    g = torch.Generator().manual_seed(0)
    image_a = torch.rand((1, 1) + shape, generator=g)
    image_b = torch.rand((1, 1) + shape, generator=g)
    ref_net, ours_net = _networks(checkpoint, channels_last)

    # ours: the bundle's SupervisedTrainer, one iteration per run()
    wrapper = PairToDDF(ours_net, spatial_dims=3)
    ours_opt = torch.optim.Adam(ours_net.parameters(), lr=1e-4)
    batch = [{"image": torch.cat([image_a, image_b], 1)[0], "label": image_b[0]}]
    loader = torch.utils.data.DataLoader(batch, batch_size=1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=loader,
        network=BidirectionalRegistration(wrapper),
        optimizer=ours_opt, loss_function=GradICONTrainingLoss(torch.nn.MSELoss(), 0.2, spatial_dims=3),
        decollate=False,
    )

    def ours() -> None:
        trainer.run()

    # reference: icon_registration's GradientICON training step
    ref_model = icon.GradientICON(ref_net, icon.SSD(), 0.2)
    ref_model.assign_identity_map([1, 1, *shape])
    ref_model.train()
    ref_opt = torch.optim.Adam(ref_model.regis_net.parameters(), lr=1e-4)

    def reference() -> None:
        ref_opt.zero_grad()
        ref_model(image_a, image_b).all_loss.backward()
        ref_opt.step()

    return ours, reference


def _child_peak(kind: str, shape) -> dict:
    """One iteration of ``kind`` in this (fresh) process: resident-set growth (MiB) and seconds."""
    ours, reference = _iterations(shape, checkpoint=kind == "ours_checkpoint")
    seconds, peak_mib = measure_once(reference if kind == "reference" else ours)
    return {"peak_mib": peak_mib, "seconds": seconds}


def _time_interleaved(ours, reference, repeats: int) -> tuple[float, float, dict]:
    samples: dict[str, list[float]] = {"ours": [], "reference": []}
    ours()
    reference()
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("reference", reference)):
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return statistics.median(samples["ours"]), statistics.median(samples["reference"]), samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, default=[80, 96, 96])
    parser.add_argument("--peak-shape", type=int, nargs=3, default=[160, 192, 192])
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--no-timing", action="store_true", help="only the peak-memory children")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    parser.add_argument("--child-peak", choices=["ours", "ours_checkpoint", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        LEVELS[0] = (0,)
        args.shape, args.peak_shape, args.repeats = [17, 17, 17], [17, 17, 17], 1
    if args.child_peak:
        print(json.dumps(_child_peak(args.child_peak, tuple(args.peak_shape))))
        return
    shape = tuple(args.shape)
    rows = []
    for suffix, channels_last in () if args.no_timing else (("", True), ("_reference_layout", False)):
        o, r, samples = _time_interleaved(*_iterations(shape, channels_last=channels_last), args.repeats)
        figure = f"knee_4step_train_iteration_{'x'.join(map(str, shape))}{suffix}"
        print(f"{figure}: ours={o:.3f} reference={r:.3f} ratio={o / r:.3f}")
        rows.append((figure, o, r, "s", samples))
    if not args.no_peak:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
        peaks = {}
        for kind in ("ours_checkpoint", "reference", "ours"):
            command = [sys.executable, __file__, "--child-peak", kind, "--threads", str(args.threads),
                       "--peak-shape", *map(str, args.peak_shape)] + (["--quick"] if args.quick else [])
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"peak-memory child {kind} failed:\n{done.stderr[-3000:]}")
            peaks[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        name = f"knee_4step_train_iteration_{'x'.join(map(str, args.peak_shape))}"
        ref = peaks["reference"]
        for figure, kind in ((f"{name}_peak_mib", "ours_checkpoint"), (f"{name}_no_checkpoint_peak_mib", "ours")):
            o = peaks[kind]["peak_mib"]
            print(f"{figure}: ours={o:.1f} reference={ref['peak_mib']:.1f} ratio={o / ref['peak_mib']:.3f}")
            rows.append((figure, o, ref["peak_mib"], "MiB", None))
        o = peaks["ours_checkpoint"]["seconds"]
        print(f"{name}_checkpoint_seconds: ours={o:.3f} reference={ref['seconds']:.3f} ratio={o / ref['seconds']:.3f}")
        rows.append((f"{name}_checkpoint_seconds", o, ref["seconds"], "s", None))
    print()
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}; load average {os.getloadavg()}")
    print("| figure | ours | reference | ratio |")
    print("|---|---|---|---|")
    for figure, o, r, unit, samples in rows:
        print(f"| {figure} | {o:.3f} {unit} | {r:.3f} {unit} | {o / r:.3f} |")
        if samples:
            print("samples:", {k: [round(v, 3) for v in vs] for k, vs in samples.items()})


if __name__ == "__main__":
    main()
