"""Reference checkpoints load strictly and reproduce the reference's output (4-step knee/lung layout)."""

from __future__ import annotations

import icon_registration as icon
import icon_registration.losses as icon_losses
import pytest
import torch
from reference_oracle import perturb_reference_weights, reference_loss, reference_network

from monai_gradicon.maps import map_to_ddf
from monai_gradicon.networks import (
    convert_reference_state_dict,
    four_step_network,
    load_reference_weights,
    multistep_network,
)


@pytest.fixture(scope="module")
def saved_reference_model(tmp_path_factory):
    """The reference lung/knee model (GradientICONSparse, LNCC σ=5, λ=1.5) with random weights, saved as released."""
    torch.manual_seed(0)  # the reference's default initialisation
    regis_net = perturb_reference_weights(reference_network(3, (2, 1, 0, 0)), torch.Generator().manual_seed(0), std=0.01, last_std=0.002, batch_norm=True)
    model = reference_loss("sparse", regis_net, icon.LNCC(sigma=5), 1.5, (1, 1, 65, 66, 67)).eval()
    path = tmp_path_factory.mktemp("weights") / "lung_model_weights_step_2.trch"
    torch.save(model.regis_net.state_dict(), path)
    return model, path


def test_released_layout_keys_are_the_documented_ones(saved_reference_model):
    _, path = saved_reference_model
    keys = torch.load(path, weights_only=True).keys()
    prefixes = {"netPhi.netPhi.net.netPhi.net.net.", "netPhi.netPhi.net.netPsi.net.", "netPhi.netPsi.net.", "netPsi.net."}
    assert {next(p for p in prefixes if k.startswith(p)) for k in keys} == prefixes
    assert sum(v.numel() for k, v in torch.load(path, weights_only=True).items() if "batchNorms" not in k or
               k.endswith(("weight", "bias"))) == 70_680_916


def test_loaded_four_step_network_gives_the_reference_ddf(saved_reference_model):
    model, path = saved_reference_model
    net = load_reference_weights(four_step_network(3), path).eval()
    g = torch.Generator().manual_seed(4)
    a = torch.rand((1, 1, 65, 66, 67), generator=g)
    b = torch.roll(a, 3, dims=2)
    with torch.no_grad():
        out = model(a, b)
        ddf = net(a, b)
    reference_ddf = map_to_ddf(model.phi_AB_vectorfield)
    assert reference_ddf.abs().max() > 0.05  # the random weights really deform
    torch.testing.assert_close(ddf, reference_ddf, rtol=1e-5, atol=2e-5)
    assert out.all_loss.isfinite()


def test_a_state_dict_with_the_regis_net_prefix_also_loads(saved_reference_model):
    model, _ = saved_reference_model
    net = load_reference_weights(four_step_network(3), model.state_dict())
    for (name, p), q in zip(net.named_parameters(), model.regis_net.parameters()):
        assert torch.equal(p, q), name


def test_mismatched_layout_is_an_error_naming_keys(saved_reference_model):
    _, path = saved_reference_model
    with pytest.raises(ValueError, match=r"not filled .*step\.second\.net"):
        load_reference_weights(four_step_network(3), {k: v for k, v in torch.load(path).items() if not k.startswith("netPsi.")})
    with pytest.raises(ValueError, match=r"141 key\(s\) without a counterpart"):
        load_reference_weights(four_step_network(3, include_last_step=False), path)
    with pytest.raises(FileNotFoundError, match="missing.trch"):
        load_reference_weights(four_step_network(3), "missing.trch")


def test_two_dimensional_checkpoint_loads_into_two_dimensional_net():
    torch.manual_seed(0)  # the reference's default initialisation
    g = torch.Generator().manual_seed(1)
    regis_net = perturb_reference_weights(reference_network(2, (1, 0)), g, std=0.02, last_std=0.005, batch_norm=True)
    net = load_reference_weights(multistep_network(2, (1, 0)), regis_net.state_dict()).eval()
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in regis_net.parameters()) == 2 * 4_756_902
    state = net.state_dict()
    converted = convert_reference_state_dict(regis_net.state_dict(), net)
    assert converted.keys() == state.keys() and all(state[k].equal(v) for k, v in converted.items())
    # and the loaded network is the reference's: the same DDF on a pair (eval mode: the loaded BatchNorm statistics)
    shape = (37, 42)
    model = reference_loss("sparse", regis_net, icon_losses.LNCC(sigma=2), 1.5, (1, 1, *shape)).eval()
    a = torch.rand((1, 1, *shape), generator=g)
    b = torch.roll(a, 3, dims=-1)
    with torch.no_grad():
        model(a, b)
        ddf = net(a, b)
    reference_ddf = map_to_ddf(model.phi_AB_vectorfield)
    assert float(reference_ddf.abs().max()) > 0.1
    torch.testing.assert_close(ddf, reference_ddf, rtol=1e-5, atol=1e-5)
