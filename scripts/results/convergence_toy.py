"""Paper Sec. 6.1 / Fig. 3 / Sec. A.1.1 on CPU: convergence of {GradICON, ICON} x {1-step, 4-step}.

Four networks learn to register outlined triangles and circles with MSE (Adam, lr 1e-3; lambda 0.2
for GradICON, 1024 for ICON). Every ``--eval-every`` steps each network registers a fixed held-out
set of pairs and we record the MSE after warping, the Dice of the warped filled shape masks and the
percentage of pixels with a negative Jacobian determinant.

Writes ``<out>/convergence.csv`` (one row per network and evaluation), ``<out>/summary.csv`` (the
last evaluation of each network), ``<out>/convergence.png`` (Fig. 3 analogue) and
``<out>/examples.png`` (held-out pairs registered by the four trained networks).

    python scripts/results/convergence_toy.py            # full CPU run (~15-20 min wall on a loaded 2-core machine, 1 thread)
    python scripts/results/convergence_toy.py --quick    # a few seconds, for the test
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
from tqdm import tqdm  # noqa: E402

from monai_gradicon.data import triangles_and_circles  # noqa: E402
from monai_gradicon.losses import GradICONLoss, GradICONObjective, ICONLoss  # noqa: E402
from monai_gradicon.maps import fold_percentage, warp  # noqa: E402
from monai_gradicon.networks import GradICONUNet, multistep_network  # noqa: E402

CONFIGS = [  # (regulariser, architecture)
    ("GradICON", "1-step"),
    ("GradICON", "4-step"),
    ("ICON", "1-step"),
    ("ICON", "4-step"),
]
LEVELS = {"1-step": (0,), "4-step": (3, 2, 1, 0)}
LAMBDA = {"GradICON": 0.2, "ICON": 1024.0}


def dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dice of two binary masks per batch element ``(B,)``."""
    inter = (a * b).flatten(1).sum(1)
    return 2 * inter / (a.flatten(1).sum(1) + b.flatten(1).sum(1)).clamp_min(1)


def build(architecture: str, channels: tuple[tuple[int, ...], tuple[int, ...]]) -> torch.nn.Module:
    down, up = channels
    return multistep_network(2, LEVELS[architecture], subnetwork=lambda: GradICONUNet(2, down_channels=down, up_channels=up))


@torch.no_grad()
def evaluate(net: torch.nn.Module, held_out: dict[str, torch.Tensor], batch: int) -> dict[str, float]:
    """Mean MSE, Dice and % folds of ``net`` on the held-out pairs (eval mode, batches of ``batch``)."""
    net.eval()
    mse, dsc, folds = [], [], []
    for start in range(0, held_out["moving"].shape[0], batch):
        sl = slice(start, start + batch)
        moving, fixed = held_out["moving"][sl], held_out["fixed"][sl]
        ddf = net(moving, fixed)
        warped = warp(moving, ddf)
        mse.append(((warped - fixed) ** 2).flatten(1).mean(1))
        warped_mask = (warp(held_out["moving_mask"][sl], ddf) > 0.5).float()
        dsc.append(dice(warped_mask, held_out["fixed_mask"][sl]))
        folds.append(fold_percentage(ddf))
    net.train()
    return {"mse": float(torch.cat(mse).mean()), "dice": float(torch.cat(dsc).mean()), "folds_pct": float(torch.cat(folds).mean())}


def make_pairs(count: int, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    images, masks = triangles_and_circles(2 * count, size, hollow=True, generator=generator)
    return {"moving": images[:count], "fixed": images[count:], "moving_mask": masks[:count], "fixed_mask": masks[count:]}


def plot(rows: list[dict], out: Path, x_label: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {("GradICON", "4-step"): "C0-", ("GradICON", "1-step"): "C0--", ("ICON", "4-step"): "C3-", ("ICON", "1-step"): "C3--"}
    for (method, arch), style in styles.items():
        sel = [r for r in rows if r["method"] == method and r["network"] == arch]
        if not sel:
            continue
        steps = [r["step"] for r in sel]
        for ax, key in zip(axes, ("mse", "dice", "folds_pct")):
            ax.plot(steps, [r[key] for r in sel], style, label=f"{method} {arch}")
    for ax, title in zip(axes, ("similarity: MSE after warping (held out)", "Dice of warped shape masks", "% pixels with det J < 0")):
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=110)
    plt.close(fig)


def plot_examples(nets: dict, held_out: dict[str, torch.Tensor], out: Path, count: int = 3) -> None:
    fig, axes = plt.subplots(count, 2 + len(nets), figsize=(2.2 * (2 + len(nets)), 2.2 * count), squeeze=False)
    with torch.no_grad():
        warped = {}
        for name, net in nets.items():
            net.eval()
            warped[name] = warp(held_out["moving"][:count], net(held_out["moving"][:count], held_out["fixed"][:count]))
    for i in range(count):
        panels = [("moving", held_out["moving"][i, 0]), ("fixed", held_out["fixed"][i, 0])]
        panels += [(f"{m} {a}", warped[(m, a)][i, 0]) for (m, a) in nets]
        for ax, (title, img) in zip(axes[i], panels):
            ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "examples.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny run for tests (32 px, 6 steps)")
    parser.add_argument("--size", type=int, default=48, help="image side in pixels (paper: 128)")
    parser.add_argument("--steps", type=int, default=400, help="Adam steps per network")
    parser.add_argument("--batch", type=int, default=16, help="pairs per step")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--held-out", type=int, default=48, help="held-out evaluation pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "convergence_toy")
    args = parser.parse_args(argv)
    channels = ((16, 32, 64, 128), (16, 32, 64, 64))
    if args.quick:
        args.size, args.steps, args.batch, args.eval_every, args.held_out = 32, 6, 4, 3, 8
        channels = ((4, 8, 8), (4, 8, 8))
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    held_out = make_pairs(args.held_out, args.size, torch.Generator().manual_seed(10_000 + args.seed))

    rows: list[dict] = []
    nets = {}
    for method, arch in CONFIGS:
        torch.manual_seed(args.seed)
        net = build(arch, channels)
        noise = torch.Generator().manual_seed(args.seed + 1)  # the evaluation-point perturbation
        regularizer = GradICONLoss(2, generator=noise) if method == "GradICON" else ICONLoss(2, generator=noise)
        objective = GradICONObjective(torch.nn.MSELoss(), regularizer, LAMBDA[method])
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        data = torch.Generator().manual_seed(args.seed)  # the same training stream for all four networks
        elapsed, train = 0.0, {"similarity": float("nan"), "regularizer": float("nan")}
        for step in tqdm(range(args.steps + 1), desc=f"{method} {arch}", mininterval=5):
            if step % args.eval_every == 0 or step == args.steps:
                rows.append({"method": method, "network": arch, "step": step, "seconds": round(elapsed, 2),
                             **evaluate(net, held_out, max(args.batch, 16)), "train_similarity": train["similarity"],
                             "train_regularizer": train["regularizer"]})
            if step == args.steps:
                break
            start = time.perf_counter()
            pairs = make_pairs(args.batch, args.size, data)
            a, b = pairs["moving"], pairs["fixed"]
            terms = objective(a, b, net.deformation(a, b), net.deformation(b, a))
            optimizer.zero_grad()
            terms.total.backward()
            optimizer.step()
            elapsed += time.perf_counter() - start
            train = terms.scalars()
        nets[(method, arch)] = net

    fields = list(rows[0])
    with open(args.out / "convergence.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    last = [r for r in rows if r["step"] == args.steps]
    with open(args.out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(last)
    plot(rows, args.out, f"training step (batch {args.batch} pairs of {args.size}x{args.size})")
    plot_examples(nets, held_out, args.out)
    print(f"{'network':<18}{'step':>6}{'MSE':>10}{'Dice':>8}{'% folds':>9}{'train s':>9}")
    for r in last:
        print(f"{r['method'] + ' ' + r['network']:<18}{r['step']:>6}{r['mse']:>10.5f}{r['dice']:>8.3f}{r['folds_pct']:>9.3f}{r['seconds']:>9.1f}")
    return rows


if __name__ == "__main__":
    main()
