"""GradICON mixed into MONAI pipelines: MONAI nets through the adapters, plain loop, SupervisedTrainer, the example."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from monai.engines import IterationEvents, SupervisedTrainer
from monai.losses import LocalNormalizedCrossCorrelationLoss
from monai.networks.blocks import Warp
from monai.networks.nets import GlobalNet, LocalNet, VoxelMorph, VoxelMorphUNet
from monai.utils import CommonKeys

from monai_gradicon.data import SyntheticPairDataset
from monai_gradicon.engines import BidirectionalRegistration, GradICONTrainingLoss  # the bundles' training pieces
from monai_gradicon.engines.any_network import PairNetwork, inverse_consistency_error
from monai_gradicon.losses import GradICONLoss, ICONLoss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these small 3D trainings thrash with more on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pairs(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = SyntheticPairDataset((SIZE,) * 3, length=count, kind="phantom", max_displacement=2.0, seed=seed)
    items = [data[i] for i in range(count)]
    return torch.stack([i["moving"] for i in items]), torch.stack([i["fixed"] for i in items])


def _localnet(seed: int = 0, out_kernel_initializer: str = "kaiming_uniform") -> LocalNet:
    torch.manual_seed(seed)
    return LocalNet(
        spatial_dims=3,
        in_channels=2,
        out_channels=3,
        num_channel_initial=2,
        extract_levels=(0, 1, 2),
        out_kernel_initializer=out_kernel_initializer,
    )


@pytest.mark.parametrize(
    "make_net,input_mode,output_index",
    [
        (lambda: _localnet(), "concat", None),
        (lambda: GlobalNet(image_size=[SIZE] * 3, spatial_dims=3, in_channels=2, num_channel_initial=2, depth=2), "concat", None),
        (lambda: VoxelMorph(VoxelMorphUNet(3, 2, 4, (4, 8, 8, 8), (8, 4)), integration_steps=3), "pair", 1),
    ],
    ids=["LocalNet", "GlobalNet", "VoxelMorph"],
)
def test_monai_networks_run_both_directions(make_net, input_mode, output_index):
    model = BidirectionalRegistration(PairNetwork(make_net(), input_mode=input_mode, output_index=output_index))
    moving, fixed = _pairs(2, seed=1)
    out = model(moving, fixed)
    assert set(out) == {"moving", "fixed", "phi_AB", "phi_BA"}
    assert out["phi_AB"].shape == out["phi_BA"].shape == (2, 3, SIZE, SIZE, SIZE)
    # the single-tensor form [moving, fixed] (SupervisedTrainer's "image") gives the same result
    stacked = model(torch.cat([moving, fixed], 1))
    torch.testing.assert_close(stacked["phi_AB"], out["phi_AB"])
    torch.testing.assert_close(stacked["fixed"], fixed)
    # the direction is right: ddf_BA is the network called with the images swapped
    torch.testing.assert_close(out["phi_BA"], model.network(fixed, moving))
    lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3)
    loss = GradICONTrainingLoss(lncc, lmbda=1.5, regularizer=GradICONLoss(3, generator=torch.Generator().manual_seed(3)))
    total = loss(out)
    # the same objective written out with MONAI's Warp and the perturbation the generator drew
    xi = torch.randn((1, 3, SIZE, SIZE, SIZE), generator=torch.Generator().manual_seed(3))
    warp = Warp(padding_mode="border")
    similarity = lncc(warp(moving, out["phi_AB"]), fixed) + lncc(warp(fixed, out["phi_BA"]), moving)
    regularizer = GradICONLoss(3)(out["phi_AB"], out["phi_BA"], noise=xi)
    expected = similarity + 1.5 * regularizer
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    if float(out["phi_AB"].abs().max()) > 1e-3:  # GlobalNet starts at the identity affine: no regulariser yet
        assert float(regularizer.detach()) > 0
    terms = loss.last_terms.scalars()
    assert set(terms) == {"total", "similarity", "regularizer", "transform_magnitude", "folds"}
    assert terms["similarity"] == pytest.approx(float(similarity.detach()), rel=1e-5)
    assert terms["regularizer"] == pytest.approx(float(regularizer.detach()), rel=1e-5)
    # its gradient reaches the network through both directions: the same as the written-out objective's
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(total, params, retain_graph=True)
    want = torch.autograd.grad(expected, params)
    assert params and any(float(g.abs().max()) > 0 for g in want)
    # (our warp samples at float32-rounded grid points, MONAI's Warp at exact ones: ~5e-6 of the gradient's scale)
    scale = max(float(g.abs().max()) for g in want)
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got, g_want, rtol=1e-3, atol=1e-4 * scale)


def test_adapter_errors_are_clear():
    moving, fixed = torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8)
    voxelmorph = VoxelMorph(VoxelMorphUNet(3, 2, 4, (4, 8, 8, 8), (8, 4)), integration_steps=0)
    with pytest.raises(ValueError, match=r"returned a tuple of 2 items; pass output_index"):
        PairNetwork(voxelmorph)(moving, fixed)
    with pytest.raises(ValueError, match=r"output_index 2 is out of range for 2 outputs"):
        PairNetwork(voxelmorph, output_index=2)(moving, fixed)
    two_channel = LocalNet(spatial_dims=3, in_channels=2, out_channels=2, num_channel_initial=2, extract_levels=(0, 1))
    with pytest.raises(ValueError, match=r"the network's DDF must have shape \(B, 3, H, W, D\).*got \(1, 2, 8, 8, 8\)"):
        PairNetwork(two_channel, input_mode="concat")(moving, fixed)
    with pytest.raises(ValueError, match=r"input_mode must be one of \('pair', 'concat'\), got 'stacked'"):
        PairNetwork(two_channel, input_mode="stacked")
    with pytest.raises(ValueError, match=r"moving and fixed must have the same shape"):
        PairNetwork(two_channel, input_mode="concat")(moving, torch.rand(1, 1, 8, 8, 10))
    with pytest.raises(ValueError, match=r"moving must be a \(B, C, H, W\) or \(B, C, H, W, D\) tensor, got \(8, 8, 8\)"):
        PairNetwork(two_channel, input_mode="concat")(torch.rand(8, 8, 8), torch.rand(8, 8, 8))
    with pytest.raises(ValueError, match=r"net must be a torch.nn.Module, got function"):
        PairNetwork(lambda m, f: m)
    with pytest.raises(ValueError, match=r"ddf_BA must have shape \(2, 3, 8, 8, 8\), got \(2, 3, 8, 8, 9\)"):
        inverse_consistency_error(torch.zeros(2, 3, 8, 8, 8), torch.zeros(2, 3, 8, 8, 9))


LR = 2e-2  # Adam step size of the short trainings below


def _train_plain(net, moving, fixed, regularizer, lmbda, steps):
    """Plain PyTorch loop: LNCC both directions (+ λ·regulariser when given). Returns the loss history."""
    model = BidirectionalRegistration(PairNetwork(net, input_mode="concat"))
    lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    if regularizer is not None:
        objective = GradICONTrainingLoss(lncc, lmbda, regularizer=regularizer)
    warp = Warp(padding_mode="border")
    history = []
    for step in range(steps):
        index = torch.tensor([step % len(moving), (step + 1) % len(moving)])
        pred = model(moving[index], fixed[index])
        if regularizer is not None:
            loss = objective(pred)
        else:  # the same two-direction similarity, no regulariser
            loss = lncc(warp(pred["moving"], pred["phi_AB"]), pred["fixed"]) + lncc(
                warp(pred["fixed"], pred["phi_BA"]), pred["moving"]
            )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss))
    return history


def test_localnet_gradicon_training_lowers_loss_and_is_more_inverse_consistent():
    moving, fixed = _pairs(4, seed=2)
    initial = _localnet(seed=3, out_kernel_initializer="zeros")  # start from the identity, as MONAI tutorials can
    steps = 30
    gradicon_net, plain_net = copy.deepcopy(initial), copy.deepcopy(initial)
    history = _train_plain(gradicon_net, moving, fixed, GradICONLoss(3, generator=torch.Generator().manual_seed(0)), 5.0, steps)
    _train_plain(plain_net, moving, fixed, None, 0.0, steps)
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5, history
    errors, gradient_errors, displacement = {}, {}, {}
    with torch.no_grad():
        for name, net in (("gradicon", gradicon_net), ("none", plain_net)):
            out = BidirectionalRegistration(PairNetwork(net, input_mode="concat"))(moving, fixed)
            errors[name] = float(inverse_consistency_error(out["phi_AB"], out["phi_BA"]).mean())
            gradient_errors[name] = float(GradICONLoss(3, generator=torch.Generator().manual_seed(1))(out["phi_AB"], out["phi_BA"]))
            displacement[name] = float(out["phi_AB"].norm(dim=1).mean())
    assert displacement["gradicon"] > 0.05, displacement  # it did learn to move, not collapse to the identity
    # ‖Φ_AB∘Φ_BA − Id‖ in voxels (measured 0.34 vs 0.55) and its gradient form, Eq. 2 (measured 4e-4 vs 4e-2)
    assert errors["gradicon"] < 0.8 * errors["none"], errors
    assert gradient_errors["gradicon"] < 0.1 * gradient_errors["none"], gradient_errors


def test_supervised_trainer_matches_the_plain_loop():
    moving, fixed = _pairs(4, seed=4)
    initial = _localnet(seed=5)
    lmbda, steps, batch = 2.0, 3, 2

    def make_loss():
        return GradICONTrainingLoss(
            LocalNormalizedCrossCorrelationLoss(spatial_dims=3), lmbda, regularizer=ICONLoss(3, generator=torch.Generator().manual_seed(7))
        )

    # plain loop
    plain = BidirectionalRegistration(PairNetwork(copy.deepcopy(initial), input_mode="concat"))
    plain_loss = make_loss()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.05)
    plain_losses = []
    for step in range(steps):
        index = slice((step * batch) % 4, (step * batch) % 4 + batch)
        loss = plain_loss(plain(moving[index], fixed[index]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        plain_losses.append(float(loss))

    # monai.engines.SupervisedTrainer: image = [moving, fixed] stacked, label unused by the loss
    network = BidirectionalRegistration(PairNetwork(copy.deepcopy(initial), input_mode="concat"))
    data = [{"image": torch.cat([m, f]), "label": f} for m, f in zip(moving, fixed)]
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)
    trainer_losses = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        epoch_length=2,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.05),
        loss_function=make_loss(),
    )
    trainer.add_event_handler(
        IterationEvents.LOSS_COMPLETED, lambda engine: trainer_losses.append(float(engine.state.output[CommonKeys.LOSS]))
    )
    trainer.run()  # 2 epochs x 2 iterations; the first `steps` iterations see the plain loop's batches
    assert len(trainer_losses) == 4
    torch.testing.assert_close(torch.tensor(trainer_losses[:steps]), torch.tensor(plain_losses), rtol=1e-5, atol=1e-6)


def test_example_script_quick_run():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "examples", "localnet_gradicon.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.split()}
    for run in ("identity", "bending", "gradicon"):
        assert run in lines, result.stdout
        lncc, folds, ic_error = (float(v) for v in lines[run][1:4])
        assert -1.0 <= lncc <= 0.0 and 0.0 <= folds <= 100.0 and ic_error >= 0.0
    assert float(lines["identity"][3]) == 0.0 and float(lines["identity"][4]) == 0.0
    for run in ("bending", "gradicon"):  # trained from the zero-initialised output layer: they learned to move
        assert float(lines[run][4]) > 1e-3 and float(lines[run][3]) > 0.0, lines[run]


def test_library_page_snippets_run():
    """The code blocks of docs/library.md's mix-in section (the swap, the SupervisedTrainer recipe) run as written."""
    page = open(os.path.join(ROOT, "docs", "library.md"), encoding="utf-8").read()
    text = page.split("\n## Use GradICON in an existing MONAI registration pipeline\n", 1)[1].split("\n## ", 1)[0]
    blocks = [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]
    assert len(blocks) == 2
    swap: dict = {}
    torch.manual_seed(0)  # the snippets draw from torch's global RNG
    exec(compile(blocks[0], "docs/library.md:swap", "exec"), swap)
    assert swap["loss"].ndim == 0 and torch.isfinite(swap["loss"])
    missing = [n for n, p in swap["net"].named_parameters() if p.grad is None or not float(p.grad.abs().max()) > 0]
    assert not missing, missing
    # the loss is the two-direction similarity plus the GradICON term of the two DDFs
    with torch.no_grad():
        warp, lncc = Warp(), swap["lncc"]
        moving, fixed = swap["moving"], swap["fixed"]
        similarity = lncc(warp(moving, swap["ddf_ab"]), fixed) + lncc(warp(fixed, swap["ddf_ba"]), moving)
        reg = GradICONLoss(3, generator=torch.Generator().manual_seed(1))(swap["ddf_ab"], swap["ddf_ba"])
    assert 0.5 * float(reg) < float(swap["loss"].detach() - similarity) < 2 * float(reg)  # another draw of the perturbation
    recipe: dict = {}
    exec(compile(blocks[1], "docs/library.md:trainer", "exec"), recipe)
    assert recipe["trainer"].state.iteration == 2
    output = recipe["trainer"].state.output  # decollated: one dict per batch item
    assert all(torch.isfinite(torch.as_tensor(item[CommonKeys.LOSS])) for item in output)
