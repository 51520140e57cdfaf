"""Two-direction training pieces: wrapper, loss adapter, export wrapper, metrics, transforms, pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_gradicon.engines import (
    BidirectionalRegistration,
    FoldPercentageMetric,
    GradICONTrainingLoss,
    PairToDDF,
    latest_checkpoint,
)
from monai_gradicon.losses import GradICONLoss, GradICONObjective, SelfAdaptiveNCCLoss
from monai_gradicon.networks import GradICONUNet, multistep_network
from monai_gradicon.transforms import WarpWithDDFd, load_pair_datalist
from monai_gradicon.visualize import checkerboard, grid_image, overview_image, save_overview_png


def small_net(spatial_dims: int):
    net = multistep_network(
        spatial_dims, (1, 0), subnetwork=lambda: GradICONUNet(spatial_dims, down_channels=(4, 4, 4), up_channels=(4, 4, 4))
    )
    g = torch.Generator().manual_seed(0)
    for p in net.parameters():  # leave the zero-initialised identity so that the maps are not trivial
        p.data.normal_(0, 0.05, generator=g)
    return net


def _rand(*shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_training_loss_equals_objective_on_both_directions(spatial_dims):
    net = small_net(spatial_dims).eval()
    shape = (2, 1) + (18,) * spatial_dims
    a, b = _rand(*shape, seed=1), _rand(*shape, seed=2)
    noise_shape = (1, spatial_dims) + (18,) * spatial_dims
    noise = torch.randn(noise_shape, generator=torch.Generator().manual_seed(3))
    loss = GradICONTrainingLoss(torch.nn.MSELoss(), lmbda=0.2, spatial_dims=spatial_dims)
    reg = loss.objective.regularizer
    assert isinstance(reg, GradICONLoss) and reg.spatial_dims == spatial_dims and loss.objective.lmbda == 0.2
    pred = BidirectionalRegistration(PairToDDF(net, spatial_dims))(torch.cat([a, b], 1))
    torch.testing.assert_close(pred["moving"], a, rtol=0, atol=0)
    expected = GradICONObjective(torch.nn.MSELoss(), GradICONLoss(spatial_dims), 0.2)(
        a, b, net.deformation(a, b), net.deformation(b, a), noise
    )
    got = loss.objective(pred["moving"], pred["fixed"], pred["phi_AB"], pred["phi_BA"], noise)
    torch.testing.assert_close(got.total, expected.total)
    assert float(expected.regularizer.detach()) > 0
    # gradients reach the registration network through both directions, and they are the objective's
    params = list(net.parameters())
    got_grads = torch.autograd.grad(got.total, params)
    expected_grads = torch.autograd.grad(expected.total, params)
    for (name, _), g_got, g_expected in zip(net.named_parameters(), got_grads, expected_grads):
        assert float(g_expected.abs().max()) > 0, name
        torch.testing.assert_close(g_got, g_expected, msg=lambda m: f"{name}: {m}")
    # the trainer's call draws ξ from the regulariser's generator; its log values are the objective's terms
    seeded = GradICONTrainingLoss(
        torch.nn.MSELoss(), 0.2, regularizer=GradICONLoss(spatial_dims, generator=torch.Generator().manual_seed(9))
    )
    total = seeded(pred, None)
    xi = torch.randn(noise_shape, generator=torch.Generator().manual_seed(9))
    same = loss.objective(pred["moving"], pred["fixed"], pred["phi_AB"], pred["phi_BA"], xi)
    torch.testing.assert_close(total, same.total)
    logged = seeded.log_values()
    assert set(logged) == {"similarity", "regularizer", "transform_magnitude", "folds"}
    for key, value in logged.items():
        assert value == pytest.approx(float(getattr(same, key).detach().mean()), rel=1e-6, abs=1e-12), key


def test_training_loss_logs_self_adaptive_gammas():
    net = small_net(3).eval()
    a, b = _rand(2, 1, 18, 18, 18, seed=4), _rand(2, 1, 18, 18, 18, seed=5)
    loss = GradICONTrainingLoss(SelfAdaptiveNCCLoss(3, num_scales=4, alpha=0.1, beta=1.3), lmbda=0.1,
                                regularizer=GradICONLoss(3, generator=torch.Generator().manual_seed(0)))
    loss(BidirectionalRegistration(net)(a, b))
    values = loss.log_values()
    assert [k for k in values if k.startswith("gamma_")] == ["gamma_1", "gamma_2", "gamma_3", "gamma_4"]
    assert all(0.0 <= values[f"gamma_{q}"] <= 1.0 for q in range(1, 5))
    # the logged γ are the batch means of the last similarity call (warped fixed image against the moving one)
    again = SelfAdaptiveNCCLoss(3, num_scales=4, alpha=0.1, beta=1.3)
    again(loss.last_terms.warped_fixed, a)
    expected = again.gammas.float().mean(0).tolist()
    assert [values[f"gamma_{q}"] for q in range(1, 5)] == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert len({round(v, 4) for v in expected}) > 1  # not a constant that a wrong key could also give


def test_training_loss_rejects_a_plain_ddf():
    loss = GradICONTrainingLoss(torch.nn.MSELoss(), lmbda=1.0, spatial_dims=2)
    with pytest.raises(ValueError, match="BidirectionalRegistration"):
        loss(torch.zeros(1, 2, 8, 8), None)


def test_pair_to_ddf_is_transparent_for_checkpoints():
    net = small_net(2)
    wrapper = PairToDDF(net, spatial_dims=2)
    assert wrapper.state_dict().keys() == net.state_dict().keys()
    other = PairToDDF(small_net(2).apply(lambda m: None), spatial_dims=2)
    for p in other.network.parameters():
        p.data.zero_()
    other.load_state_dict(net.state_dict())
    x = _rand(1, 2, 16, 16, seed=6)
    ddf = wrapper.eval()(x)
    assert float(ddf.abs().max()) > 0.05  # a real deformation, not the identity both would give untrained
    torch.testing.assert_close(other.eval()(x), ddf)
    torch.testing.assert_close(ddf, net.eval()(x[:, :1], x[:, 1:]))  # channel 0 is moving, channel 1 fixed
    with pytest.raises(ValueError, match=r"\[moving, fixed\].*got shape \(1, 3, 16, 16\)"):
        wrapper(torch.zeros(1, 3, 16, 16))


def test_fold_metric():
    ddf = torch.zeros(1, 2, 10, 10)
    ddf[0, 0, 5:, :] = -3.0  # a step backwards: folds along axis 0
    metric = FoldPercentageMetric()
    metric(ddf, ddf)
    # rows 4 -> 5 map to 4 -> 2: the 9 cells of row 4 (of 9 x 9 forward-difference cells) fold
    assert float(metric.aggregate()) == pytest.approx(100.0 * 9 / 81, rel=1e-6)
    metric.reset()
    metric(torch.zeros(1, 2, 10, 10), None)
    assert float(metric.aggregate()) == 0.0


def test_warp_with_ddf_matches_shift():
    image = torch.arange(64.0).reshape(1, 8, 8)
    ddf = torch.zeros(2, 8, 8)
    ddf[1] = 1.0
    out = WarpWithDDFd("moving", output_keys="warped", reference_key=None)({"moving": image, "pred": ddf})["warped"]
    torch.testing.assert_close(out[0, :, :-1], image[0, :, 1:])


def test_datalist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="datalist file not found"):
        load_pair_datalist(str(tmp_path / "none.json"))
    (tmp_path / "d.json").write_text('{"training": [{"moving": "a.nii.gz", "fixed": "b.nii.gz"}]}')
    with pytest.raises(FileNotFoundError, match=r"entry 0 key 'moving'.*a\.nii\.gz"):
        load_pair_datalist(str(tmp_path / "d.json"))
    with pytest.raises(ValueError, match="no section 'validation'"):
        load_pair_datalist(str(tmp_path / "d.json"), "validation")
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "b.nii.gz").write_bytes(b"x")
    entries = load_pair_datalist(str(tmp_path / "d.json"))
    assert entries[0]["moving"] == str(tmp_path / "a.nii.gz")


def test_latest_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        latest_checkpoint(str(tmp_path))
    for n in (2, 10, 9):
        (tmp_path / f"training_checkpoint_epoch={n}.pt").write_bytes(b"")
    assert latest_checkpoint(str(tmp_path)).endswith("epoch=10.pt")


def test_pictures(tmp_path):
    a, b = np.zeros((8, 8)), np.ones((8, 8))
    board = checkerboard(a, b, tiles=2)
    assert board[0, 0] == 0 and board[0, 7] == 1 and board[7, 7] == 0
    flat = grid_image(np.zeros((2, 16, 16)), spacing=4)
    assert flat[0, 0] == 0 and flat[1, 1] == 1 and flat[4, 2] == 0
    shifted = grid_image(np.ones((2, 16, 16)), spacing=4)
    assert shifted[3, 3] == 0 and shifted[0, 1] == 1
    moving, fixed, warped = (_rand(1, 8, 8, 8, seed=s) for s in (7, 8, 9))
    picture = overview_image(moving, fixed, warped, torch.zeros(3, 8, 8, 8))
    assert picture.shape == (8, 40)

    def middle(volume):  # the middle slice along the last axis, scaled to [0, 1]
        x = volume[0, :, :, 4].numpy()
        return (x - x.min()) / (x.max() - x.min())

    panels = [picture[:, 8 * k : 8 * (k + 1)] for k in range(5)]
    np.testing.assert_allclose(panels[0], middle(fixed), atol=1e-6)
    np.testing.assert_allclose(panels[1], middle(moving), atol=1e-6)
    np.testing.assert_allclose(panels[2], middle(warped), atol=1e-6)
    np.testing.assert_allclose(panels[3], checkerboard(middle(warped), middle(fixed), tiles=8), atol=1e-6)
    np.testing.assert_array_equal(panels[4], grid_image(np.zeros((2, 8, 8)), spacing=4))
    ramp = np.tile(np.linspace(0, 1, 8), (8, 1))
    path = save_overview_png(str(tmp_path / "o.png"), ramp[None], ramp.T[None], ramp[None], np.zeros((2, 8, 8)))
    import matplotlib.image

    png = matplotlib.image.imread(path)
    assert png.shape[:2] == (340, 1500)  # figsize (15, 3.4) at 100 dpi
    grey = png[..., :3].mean(-1)
    assert grey.min() < 0.1 and grey.max() > 0.9 and 0.05 < float((grey < 0.5).mean()) < 0.6  # drawn panels on white


def test_supervised_trainer_with_gradient_accumulation_and_terms_handler():
    """The stock SupervisedTrainer runs the two-direction step; accumulation_steps=2 steps the optimizer every 2nd iteration."""
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    from monai_gradicon.engines import GradICONTermsHandler

    net = small_net(2)
    data = [{"image": _rand(2, 16, 16, seed=10 + i), "label": _rand(1, 16, 16, seed=20 + i)} for i in range(4)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    regularizer = GradICONLoss(2, generator=torch.Generator().manual_seed(0))
    loss = GradICONTrainingLoss(torch.nn.MSELoss(), lmbda=1.0, regularizer=regularizer)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=loader,
        network=BidirectionalRegistration(PairToDDF(net, 2)), optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=loss, decollate=False, accumulation_steps=2,
        train_handlers=[GradICONTermsHandler(loss)],
    )
    snapshots, losses = [], []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: snapshots.append([p.detach().clone() for p in net.parameters()])
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    before = [p.detach().clone() for p in net.parameters()]
    trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(before, snapshots[0]))  # no step after iteration 1
    assert any(not torch.equal(a, b) for a, b in zip(before, snapshots[1]))  # one step after iteration 2
    assert {"similarity", "regularizer", "folds"} <= set(trainer.state.output)
    assert "train_similarity" in trainer.state.metrics
    # the epoch mean of the trainer's loss, which the one-line epoch summary prints
    assert len(losses) == 2 and trainer.state.metrics["train_loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)
