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
processes hits both alike; the median is reported. Prints
``<figure>: ours=<s> reference=<s> ratio=<ours/reference>`` then a table.

    python scripts/benchmark_training.py [--repeats 3] [--threads 2] [--shape 80 96 96]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import icon_registration as icon  # noqa: E402
from monai.engines import SupervisedTrainer  # noqa: E402
from reference_oracle import reference_network  # noqa: E402

from monai_gradicon.engines import BidirectionalRegistration, GradICONTrainingLoss, PairToDDF  # noqa: E402
from monai_gradicon.networks import four_step_network, load_reference_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, default=[80, 96, 96])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    g = torch.Generator().manual_seed(0)
    image_a = torch.rand((1, 1) + shape, generator=g)
    image_b = torch.rand((1, 1) + shape, generator=g)

    torch.manual_seed(0)
    ref_net = reference_network(3, (2, 1, 0, 0))
    for p in ref_net.parameters():  # non-trivial weights (the U-Nets start at the identity otherwise)
        p.data.add_(0.01 * torch.randn_like(p))
    ours_net = load_reference_weights(four_step_network(3), ref_net.state_dict())

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

    samples: dict[str, list[float]] = {"ours": [], "reference": []}
    ours()
    reference()
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("reference", reference)):
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    o, r = statistics.median(samples["ours"]), statistics.median(samples["reference"])
    figure = f"knee_4step_train_iteration_{'x'.join(map(str, shape))}"
    print(f"{figure}: ours={o:.3f} reference={r:.3f} ratio={o / r:.3f}")
    print()
    print(f"| figure | ours (s) | reference (s) | ratio | threads | repeats |")
    print(f"|---|---|---|---|---|---|")
    print(f"| {figure} | {o:.3f} | {r:.3f} | {o / r:.3f} | {args.threads} | {args.repeats} |")
    print("samples:", {k: [round(v, 3) for v in vs] for k, vs in samples.items()})


if __name__ == "__main__":
    main()
