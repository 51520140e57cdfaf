"""Paper Sec. 6.2 / Fig. 4 and Fig. 2 on CPU, with synthetic vessel trees in place of DRIVE.

Ablation: GradICON networks with P in {1, 2, 4} sub-networks x similarity in {NCC, the plain mean of
NCC over the self-adaptive pyramid ("multi_avg"), the parameter-free self-adaptive NCC of Eq. 7
("multi_adaptive")} are trained on the same set of vessel-tree pairs whose true deformation is
known (as in the paper, results are on the training pairs: the question is whether accurate,
regular maps can be learned for tree-like structures, not generalisation). We record, over
training, the deformation error against the truth (over all pixels, and over vessel pixels of the
fixed image only, where the images carry information) and the displacement magnitude (mean
Euclidean norms in [0, 1] units, like Fig. 4b/c) and the % of pixels with det J < 0 (Fig. 4d).

Fig. 2: the weights of the five NCC terms of the self-adaptive loss (Q = 4) during an
optimisation-based registration of one pair (a smooth B-spline-like displacement optimised with
Adam), for the parameter-free (Eq. 7) and greedy (Eq. 8, alpha 0.1, beta 1.3) forms.

Writes to ``<out>``: ``ablation_curves.csv``, ``ablation_summary.csv``, ``adaptive_weights.csv``,
``ablation.png`` (Fig. 4b-d analogue), ``ablation_examples.png`` (Fig. 4a analogue),
``adaptive_weights.png`` (Fig. 2a/b analogue), ``training_gammas.csv`` (the self-adaptive weights
seen while training the multi_adaptive networks).

    python scripts/results/ablation_vessels.py            # full CPU run (~15-20 min wall on a loaded 2-core machine, 1 thread)
    python scripts/results/ablation_vessels.py --quick    # a few seconds, for the test
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from monai_gradicon.data.vessels import vessel_pairs  # noqa: E402
from monai_gradicon.losses import GradICONLoss, GradICONObjective, NCCLoss, SelfAdaptiveNCCLoss  # noqa: E402
from monai_gradicon.maps import fold_percentage, warp  # noqa: E402
from monai_gradicon.networks import GradICONUNet, multistep_network  # noqa: E402

LEVELS = {1: (0,), 2: (1, 0), 4: (3, 2, 1, 0)}
SIMILARITIES = ("single", "multi_avg", "multi_adaptive")


class MultiScaleMeanNCCLoss(torch.nn.Module):
    """``mean_i (1 − NCC)`` over the ``Q + 1`` scales of :meth:`SelfAdaptiveNCCLoss.pyramid` (equal weights)."""

    def __init__(self, spatial_dims: int, num_scales: int = 4) -> None:
        super().__init__()
        self.pyramid = SelfAdaptiveNCCLoss(spatial_dims, num_scales=num_scales).pyramid
        self.ncc = NCCLoss(spatial_dims)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        terms = [self.ncc(a, b) for a, b in zip(self.pyramid(pred), self.pyramid(target))]
        return torch.stack(terms).mean()


def make_similarity(name: str, num_scales: int) -> torch.nn.Module:
    if name == "single":
        return NCCLoss(2)
    if name == "multi_avg":
        return MultiScaleMeanNCCLoss(2, num_scales)
    return SelfAdaptiveNCCLoss(2, num_scales=num_scales)


@torch.no_grad()
def evaluate(net: torch.nn.Module, pairs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Deformation error / magnitude in [0, 1] units (mean Euclidean norm), % folds, NCC after warping."""
    net.eval()
    ddf = net(pairs["moving"], pairs["fixed"])
    net.train()
    scale = torch.tensor([n - 1 for n in ddf.shape[2:]], dtype=ddf.dtype).view(1, -1, 1, 1)
    error_map = ((ddf - pairs["ddf"]) / scale).norm(dim=1)
    error = error_map.flatten(1).mean(1)
    on_vessels = (pairs["fixed"][:, 0] > 0.5).float()  # where the images carry information
    vessel_error = (error_map * on_vessels).flatten(1).sum(1) / on_vessels.flatten(1).sum(1).clamp_min(1)
    magnitude = (ddf / scale).norm(dim=1).flatten(1).mean(1)
    warped = warp(pairs["moving"], ddf)
    ncc = 1 - NCCLoss(2, reduction="none")(warped, pairs["fixed"])
    return {
        "deformation_error": float(error.mean()),
        "deformation_error_vessels": float(vessel_error.mean()),
        "displacement_magnitude": float(magnitude.mean()),
        "folds_pct": float(fold_percentage(ddf).mean()),
        "ncc": float(ncc.mean()),
    }


def optimise_adaptive(pairs: dict[str, torch.Tensor], iterations: int, alpha: float | None, beta: float, num_scales: int) -> list[dict]:
    """Fig. 2: register pair 0 by optimising a smooth displacement (12x12 control grid, bicubic); record the scale weights."""
    moving, fixed = pairs["moving"][:1], pairs["fixed"][:1]
    size = moving.shape[-1]
    control = torch.zeros(1, 2, 12, 12, requires_grad=True)
    loss_fn = SelfAdaptiveNCCLoss(2, num_scales=num_scales, alpha=alpha, beta=beta)
    optimizer = torch.optim.Adam([control], lr=0.1)
    rows = []
    for it in range(iterations):
        ddf = F.interpolate(control, size=(size, size), mode="bicubic", align_corners=True)
        loss = loss_fn(warp(moving, ddf), fixed)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        weights = loss_fn.scale_weights[0].tolist()
        row = {"form": "parameter-free" if alpha is None else f"greedy (alpha={alpha}, beta={beta})", "iteration": it, "loss": float(loss.detach())}
        row.update({f"w{i}": w for i, w in enumerate(weights)})
        rows.append(row)
    return rows


def plot_weights(rows: list[dict], num_scales: int, out: Path) -> None:
    forms = list(dict.fromkeys(r["form"] for r in rows))
    fig, axes = plt.subplots(1, len(forms), figsize=(6 * len(forms), 4), squeeze=False)
    names = ["full"] + ["smooth" if i == 1 else f"smooth 1/{2 ** (i - 1)}" for i in range(1, num_scales + 1)]
    for ax, form in zip(axes[0], forms):
        sel = [r for r in rows if r["form"] == form]
        its = [r["iteration"] for r in sel]
        for i, name in enumerate(names):
            ax.plot(its, [r[f"w{i}"] for r in sel], label=name)
        ax.plot(its, [sum(r[f"w{i}"] for i in range(num_scales + 1)) for r in sel], "k:", label="total")
        ax.set_title(f"weights of the NCC terms, {form}")
        ax.set_xlabel("optimisation iteration")
        ax.set_ylim(-0.05, 1.1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "adaptive_weights.png", dpi=110)
    plt.close(fig)


def plot_curves(rows: list[dict], truth_magnitude: float, out: Path) -> None:
    fig, axes = plt.subplots(1, 5, figsize=(24, 4.2))
    colors = {1: "C0", 2: "C1", 4: "C2"}
    styles = {"single": ":", "multi_avg": "--", "multi_adaptive": "-"}
    keys = ("deformation_error", "deformation_error_vessels", "displacement_magnitude", "folds_pct", "ncc")
    titles = ("deformation error vs truth, all pixels", "deformation error on vessel pixels", "displacement magnitude ([0,1] units)",
              "% pixels with det J < 0", "NCC after warping")
    for p in LEVELS:
        for sim in SIMILARITIES:
            sel = [r for r in rows if r["P"] == p and r["similarity"] == sim]
            if not sel:
                continue
            for ax, key in zip(axes, keys):
                ax.plot([r["epoch"] for r in sel], [r[key] for r in sel], colors[p] + styles[sim], label=f"net-{p} {sim}")
    axes[2].axhline(truth_magnitude, color="k", lw=0.8, label="ground truth")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("epoch (all training pairs once)")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=110)
    plt.close(fig)


def plot_examples(nets: dict, pairs: dict[str, torch.Tensor], out: Path) -> None:
    moving, fixed = pairs["moving"][:1], pairs["fixed"][:1]
    fig, axes = plt.subplots(3, 4, figsize=(10, 7.5))
    for ax, (title, img) in zip(axes[:, 0], [("moving", moving), ("fixed", fixed), ("|moving - fixed|", (moving - fixed).abs())]):
        ax.imshow(img[0, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
    with torch.no_grad():
        for (p, sim), net in nets.items():
            net.eval()
            warped = warp(moving, net(moving, fixed))
            ax = axes[SIMILARITIES.index(sim), 1 + list(LEVELS).index(p)]
            ax.imshow((warped - fixed).abs()[0, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"|warped - fixed| net-{p} {sim}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "ablation_examples.png", dpi=100)
    plt.close(fig)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny run for tests (32 px, 2 epochs)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (DRIVE: 565x584)")
    parser.add_argument("--pairs", type=int, default=20, help="training pairs (paper: 20)")
    parser.add_argument("--epochs", type=int, default=100, help="epochs per network (paper: 1000)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-displacement", type=float, default=5.0, help="largest true displacement, pixels")
    parser.add_argument("--lmbda", type=float, default=1.0, help="GradICON weight")
    parser.add_argument("--eval-every", type=int, default=10, help="epochs")
    parser.add_argument("--weights-iterations", type=int, default=300, help="Fig. 2 optimisation iterations (paper: 1000)")
    parser.add_argument("--weights-displacement", type=float, default=12.0,
                        help="largest true displacement (pixels) of the Fig. 2 pair: large, so that coarse scales matter first")
    parser.add_argument("--parts", choices=("all", "weights", "ablation"), default="all", help="run only one experiment")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "ablation_vessels")
    args = parser.parse_args(argv)
    channels = ((16, 32, 64, 64), (16, 32, 32, 32))
    num_scales = 4
    if args.quick:
        args.size, args.pairs, args.epochs, args.batch, args.eval_every, args.weights_iterations = 32, 4, 2, 2, 1, 5
        args.weights_displacement = 4.0
        channels = ((4, 8), (4, 8))
        num_scales = 3
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = vessel_pairs(args.pairs, args.size, args.max_displacement, seed=args.seed)
    scale = torch.tensor([args.size - 1] * 2, dtype=torch.float32).view(1, 2, 1, 1)
    truth_magnitude = float((pairs["ddf"] / scale).norm(dim=1).mean())

    weight_rows: list[dict] = []
    if args.parts in ("all", "weights"):
        fig2_pair = vessel_pairs(1, args.size, args.weights_displacement, seed=args.seed + 5, control_points=3)
        weight_rows = optimise_adaptive(fig2_pair, args.weights_iterations, None, 1.3, num_scales)
        weight_rows += optimise_adaptive(fig2_pair, args.weights_iterations, 0.1, 1.3, num_scales)
        write_csv(weight_rows, args.out / "adaptive_weights.csv")
        plot_weights(weight_rows, num_scales, args.out)
        if args.parts == "weights":
            return {"curves": [], "summary": [], "weights": weight_rows}

    rows, gamma_rows, nets = [], [], {}
    for p, levels in LEVELS.items():
        for sim in SIMILARITIES:
            torch.manual_seed(args.seed)
            down, up = channels
            net = multistep_network(2, levels, subnetwork=lambda: GradICONUNet(2, down_channels=down, up_channels=up))
            similarity = make_similarity(sim, num_scales)
            noise = torch.Generator().manual_seed(args.seed + 1)
            objective = GradICONObjective(similarity, GradICONLoss(2, generator=noise), args.lmbda)
            optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
            order = torch.Generator().manual_seed(args.seed + 2)
            elapsed = 0.0
            for epoch in tqdm(range(args.epochs + 1), desc=f"net-{p} {sim}", mininterval=5):
                if epoch % args.eval_every == 0 or epoch == args.epochs:
                    rows.append({"P": p, "similarity": sim, "epoch": epoch, "seconds": round(elapsed, 2), **evaluate(net, pairs)})
                if epoch == args.epochs:
                    break
                start = time.perf_counter()
                for idx in torch.randperm(args.pairs, generator=order).split(args.batch):
                    a, b = pairs["moving"][idx], pairs["fixed"][idx]
                    terms = objective(a, b, net.deformation(a, b), net.deformation(b, a))
                    optimizer.zero_grad()
                    terms.total.backward()
                    optimizer.step()
                    if sim == "multi_adaptive":
                        weights = similarity.scale_weights.mean(0).tolist()
                        gamma_rows.append({"P": p, "epoch": epoch, **{f"w{i}": w for i, w in enumerate(weights)}})
                elapsed += time.perf_counter() - start
            nets[(p, sim)] = net

    write_csv(rows, args.out / "ablation_curves.csv")
    summary = [r for r in rows if r["epoch"] == args.epochs]
    for r in summary:
        r["truth_magnitude"] = truth_magnitude
    write_csv(summary, args.out / "ablation_summary.csv")
    write_csv(gamma_rows, args.out / "training_gammas.csv")
    plot_curves(rows, truth_magnitude, args.out)
    plot_examples(nets, pairs, args.out)
    print(f"ground-truth displacement magnitude: {truth_magnitude:.4f} ([0,1] units)")
    print(f"{'network':<24}{'def. error':>11}{'on vessels':>11}{'magnitude':>11}{'% folds':>9}{'NCC':>7}{'train s':>9}")
    for r in summary:
        print(f"{'net-' + str(r['P']) + ' ' + r['similarity']:<24}{r['deformation_error']:>11.4f}"
              f"{r['deformation_error_vessels']:>11.4f}{r['displacement_magnitude']:>11.4f}"
              f"{r['folds_pct']:>9.3f}{r['ncc']:>7.3f}{r['seconds']:>9.1f}")
    return {"curves": rows, "summary": summary, "weights": weight_rows}


if __name__ == "__main__":
    main()
