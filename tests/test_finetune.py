"""Fine-tuning a released model with ``python -m monai.bundle run`` (bundles/common/finetune.json).

Real subprocesses on the uniGradICON bundle, shrunk through the settings its inference.json exposes
(2-step network of narrow U-Nets on 34^3), starting from weights written by the authors' own module tree
in their release format (a ``.trch`` state dict of ``regis_net``), on tiny NIfTI pairs with oblique affines.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import icon_registration as icon
import icon_registration.networks as icon_networks
import numpy as np
import pytest
import torch
from reference_oracle import perturb_reference_weights, reference_loss, reference_network
from registration_helpers import blob_intensity, oblique_affine, save, world_points
from test_bundles import BUNDLES, bundle_cmd, ok

SHAPE = [34, 34, 34]
CHANNELS = [8, 8, 8, 8, 8]
SMALL = {"image_shape": SHAPE, "levels": [1, 0], "unet_down_channels": CHANNELS, "unet_up_channels": CHANNELS}
SMALL_ARGS = [a for k, v in SMALL.items() for a in (f"--{k}", json.dumps(v))] + ["--num_threads", "1"]


def finetune_configs(bundle: str) -> list[str]:
    """inference.json, the shared recipe, the bundle's finetune.json: the composition the bundles document."""
    return [os.path.join(BUNDLES, bundle, "configs", "inference.json"), os.path.join(BUNDLES, "common", "finetune.json"),
            os.path.join(BUNDLES, bundle, "configs", "finetune.json")]


def finetune(tmp: str, *args: str, bundle: str = "unigradicon", bundle_root: str | None = None) -> subprocess.CompletedProcess:
    config = "[" + ",".join(f"'{f}'" for f in finetune_configs(bundle)) + "]"
    return bundle_cmd(tmp, bundle, config, "--bundle_root", bundle_root or os.path.join(BUNDLES, bundle), *SMALL_ARGS, *args)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Released-format weights (.trch) and a datalist of two NIfTI pairs (one CT in HU, one MR naming its modality)."""
    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    unet = lambda: icon_networks.UNet2(len(CHANNELS), [[2, *CHANNELS], CHANNELS], 3)  # noqa: E731  twin of GradICONUNet
    regis_net = perturb_reference_weights(reference_network(3, SMALL["levels"], unet), torch.Generator().manual_seed(0), std=0.02, last_std=0.03)
    model = reference_loss("sparse", regis_net, icon.LNCC(sigma=5), 1.5, [1, 1, *SHAPE])
    weights = root / "Step_2_final.trch"
    torch.save(model.regis_net.state_dict(), weights)

    entries = []
    for i, (angles, spacing) in enumerate([((0.3, -0.2, 0.25), (2.1, 1.8, 2.6)), ((-0.4, 0.3, -0.1), (1.9, 2.4, 2.0))]):
        names = {}
        for key, shift in (("moving", np.array([4.0, -3.0, 2.0])), ("fixed", np.zeros(3))):
            affine = oblique_affine(spacing=spacing, angles=angles)
            shape = (20, 22, 18) if key == "moving" else (18, 21, 23)
            pattern = blob_intensity(world_points(affine, shape), affine[:3, 3] + np.array([18.0, 20.0, 19.0]) + shift)
            array = pattern * 900.0 - 400.0 if i == 0 else pattern * 300.0 + 50.0  # CT in HU, MR in arbitrary units
            names[key] = save(str(root / f"pair{i}_{key}.nii.gz"), array, affine)
        if i == 1:
            names["modality"] = "mri"
        entries.append(names)
    datalist = root / "pairs.json"
    datalist.write_text(json.dumps({"training": entries}))
    return {"root": root, "weights": str(weights), "datalist": str(datalist), "entries": entries}


def _released_state(weights: str) -> dict:
    from monai_gradicon.app import load_registration_model

    return {k: v.clone() for k, v in load_registration_model("unigradicon", weights=weights, device="cpu", overrides=SMALL).network.state_dict().items()}


def _parameters(state: dict, like: torch.nn.Module) -> dict:
    names = {n for n, _ in like.named_parameters()}
    return {k: v for k, v in state.items() if k in names}


def test_training_items_are_what_register_feeds_the_network(data):
    """Each pair reaches the network as prepare_pair gives it, with the pair's modality, else the bundle default."""
    from monai.bundle import ConfigParser

    from monai_gradicon.app import load_registration_model, prepare_pair

    parser = ConfigParser()
    parser.read_config(finetune_configs("unigradicon"))
    parser.update({"bundle_root": os.path.join(BUNDLES, "unigradicon"), "weights_file": data["weights"], "datalist_file": data["datalist"],
                   "device": "$torch.device('cpu')", **SMALL})
    dataset = parser.get_parsed_content("train#dataset")
    assert len(dataset) == 2
    for index, modality in ((0, "ct"), (1, "mri")):
        entry = data["entries"][index]
        model = load_registration_model("unigradicon", weights=data["weights"], device="cpu", overrides={**SMALL, "modality": modality})
        pair = prepare_pair(model, entry["moving"], entry["fixed"])
        item = dataset[index]["image"]
        assert item.shape == (2, *SHAPE)
        torch.testing.assert_close(item, torch.cat([pair.A, pair.B], 1)[0], rtol=0, atol=0)
        other = load_registration_model("unigradicon", weights=data["weights"], device="cpu",
                                        overrides={**SMALL, "modality": "mri" if modality == "ct" else "ct"})
        other_pair = prepare_pair(other, entry["moving"], entry["fixed"])
        assert not torch.allclose(item, torch.cat([other_pair.A, other_pair.B], 1)[0])  # the modality matters here


def _chain(error: BaseException) -> str:
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__
    return " | ".join(messages)


@pytest.mark.parametrize(
    "bundle, with_masks, message",
    [("gradicon_lung_ct", False, "lacks key(s) ['moving_mask', 'fixed_mask']"), ("gradicon_knee_mri", True, "does not use masks")],
)
def test_the_bundle_mask_policy_applies_to_training_pairs(data, tmp_path, bundle, with_masks, message):
    """lung: training pairs without masks are refused; knee: pairs with masks are (the registration policy)."""
    from monai.bundle import ConfigParser

    entries = [{"moving": e["moving"], "fixed": e["fixed"]} for e in data["entries"]]
    if with_masks:
        entries[1].update(moving_mask=entries[1]["moving"], fixed_mask=entries[1]["fixed"])
    (tmp_path / "pairs.json").write_text(json.dumps({"training": entries}))
    parser = ConfigParser()
    parser.read_config(finetune_configs(bundle))
    parser.update({"bundle_root": os.path.join(BUNDLES, bundle), "weights_file": data["weights"],
                   "datalist_file": str(tmp_path / "pairs.json"), "device": "$torch.device('cpu')", **SMALL})
    with pytest.raises(RuntimeError) as raised:
        parser.get_parsed_content("train#dataset")
    assert message in _chain(raised.value)
    assert ("entry 1" if with_masks else "entry 0") in _chain(raised.value)


@pytest.mark.parametrize("bundle", ["gradicon_knee_mri", "gradicon_lung_ct", "gradicon_brain_mri", "unigradicon", "multigradicon"])
def test_every_released_bundle_builds_its_finetuning_trainer(data, tmp_path, bundle):
    """The composition each bundle documents builds a trainer whose network is the bundle's, loaded from the file, and its objective."""
    from monai.bundle import ConfigParser

    from monai_gradicon.losses import GradICONLoss, LNCCLoss

    entries = [{"moving": e["moving"], "fixed": e["fixed"]} for e in data["entries"]]
    if bundle == "gradicon_lung_ct":
        entries = [{**e, "moving_mask": e["moving"], "fixed_mask": e["fixed"]} for e in entries]
    (tmp_path / "pairs.json").write_text(json.dumps({"training": entries}))
    parser = ConfigParser()
    parser.read_config(finetune_configs(bundle))
    parser.update({"bundle_root": os.path.join(BUNDLES, bundle), "weights_file": data["weights"],
                   "datalist_file": str(tmp_path / "pairs.json"), "device": "$torch.device('cpu')", **SMALL})
    trainer = parser.get_parsed_content("train#trainer")
    model = parser.get_parsed_content("registration_model")
    assert trainer.network.network is model.network and model.weights == os.path.abspath(data["weights"])
    assert trainer.optimizer.param_groups[0]["lr"] == 2e-5 and trainer.state.max_epochs == 10
    objective = trainer.loss_function.objective
    assert isinstance(objective.similarity, LNCCLoss) and isinstance(objective.regularizer, GradICONLoss)
    assert objective.lmbda == 1.5 and objective.regularizer.sparse and objective.similarity.sigma == 5
    assert len(trainer.data_loader.dataset) == 2


def test_finetune_starts_from_the_released_weights_and_resumes(data, tmp_path):
    """(a) lr 0: the parameters after one epoch are the released file's; (c) default lr: model.pt loads in
    register's model and differs from the start; (d) --resume continues the iteration count."""
    from monai_gradicon.app import load_registration_model

    released = _released_state(data["weights"])
    common = ["--weights_file", data["weights"], "--datalist_file", data["datalist"], "--epochs", "1"]

    frozen = tmp_path / "frozen"
    frozen.mkdir()
    ok(finetune(str(frozen), *common, "--learning_rate", "0.0"))
    start = torch.load(frozen / "models" / "model.pt", weights_only=True)
    like = load_registration_model("unigradicon", weights=data["weights"], device="cpu", overrides=SMALL).network
    params = _parameters(released, like)
    assert len(params) > 10 and set(start) == set(released)
    for key, value in params.items():
        torch.testing.assert_close(start[key], value, rtol=0, atol=0, msg=key)
    # and, without our key translation, the same tensors as the authors' file holds
    buffers = ("running_mean", "running_var", "num_batches_tracked", "identity_map")
    theirs = [v for k, v in torch.load(data["weights"], weights_only=True).items() if not k.endswith(buffers)]
    assert sorted((tuple(v.shape), float(v.double().sum())) for v in theirs) == sorted(
        (tuple(start[k].shape), float(start[k].double().sum())) for k in params
    )

    tuned_dir = tmp_path / "tuned"
    tuned_dir.mkdir()
    log = ok(finetune(str(tuned_dir), *common))
    assert "Training epochs 1..1 from iteration 0." in log
    (summary,) = re.findall(r"Epoch: 1/1 -- .*", log)
    for name in ("train_loss", "train_similarity", "train_regularizer"):
        assert re.search(rf"{name}: -?[0-9.]+", summary), summary
    tuned = load_registration_model("unigradicon", weights=str(tuned_dir / "models" / "model.pt"), device="cpu", overrides=SMALL)
    changed = [k for k, v in _parameters(tuned.network.state_dict(), like).items() if not torch.equal(v, params[k])]
    assert len(changed) > len(params) // 2, changed

    log = ok(finetune(str(tuned_dir), *common[:-1], "2", "--resume", "True"))
    assert "Training epochs 2..2 from iteration 2." in log and "Epoch: 1/2" not in log
    checkpoint = torch.load(tuned_dir / "models" / "training_checkpoint_epoch=2.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 4 and checkpoint["trainer"]["max_epochs"] == 2
    assert float(next(iter(checkpoint["optimizer"]["state"].values()))["step"]) == 4  # Adam went on from its saved state
    resumed = torch.load(tuned_dir / "models" / "model.pt", weights_only=True)
    assert any(not torch.equal(resumed[k], tuned.network.state_dict()[k]) for k in params)


def test_weights_that_do_not_fit_fail_naming_the_file(data, tmp_path):
    """A released-format file with one key missing and one extra is refused (no partial load, no training)."""
    state = torch.load(data["weights"], weights_only=True)
    dropped = sorted(state)[0]
    state.pop(dropped)
    state["netPsi.net.extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad_weights.trch"
    torch.save(state, bad)
    proc = finetune(str(tmp_path), "--weights_file", str(bad), "--datalist_file", data["datalist"], "--epochs", "1")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"InputError: weights file {str(bad)!r} does not fit the network" in out, out[-3000:]
    assert not os.path.exists(tmp_path / "models")


def test_missing_weights_name_the_release_asset(data, tmp_path):
    """No weights file where the bundle expects it: the message names the release URL and the destination."""
    import shutil

    bundle = tmp_path / "unigradicon"  # a copy without models/: what a fresh checkout has
    (bundle / "models").mkdir(parents=True)
    shutil.copy(os.path.join(BUNDLES, "unigradicon", "large_files.yml"), bundle)
    proc = finetune(str(tmp_path), "--datalist_file", data["datalist"], "--epochs", "1", bundle_root=str(bundle))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "no trained weights for 'unigradicon'" in out, out[-3000:]
    assert "https://github.com/uncbiag/uniGradICON/releases/download/" in out and str(bundle / "models" / "Step_2_final.trch") in out
    assert not os.path.exists(tmp_path / "models")
