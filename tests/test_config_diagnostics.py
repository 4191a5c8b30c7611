"""Training configs (presets, overrides, YAML) and the task-conflict statistics."""
from __future__ import annotations

import math

import pytest
import torch

from endoarss_lib.config import PRESETS, TrainConfig, apply_overrides, load_config, preset
from endoarss_lib.training.diagnostics import block_of, conflict_record, pair_stats, task_gradient_matrix


def test_presets_carry_the_paper_and_released_values():
    paper = preset("paper", dataset="mtlesd")
    assert (paper.batch_size, paper.epochs, paper.lr, paper.scheduler) == (16, 200, 1e-4, "none")
    assert preset("paper", dataset="mtlendovis").lr == 1e-3
    released = preset("released")
    assert (released.batch_size, released.epochs, released.lr, released.step_size, released.gamma,
            released.weight_decay) == (32, 150, 1.1e-3, 100, 0.5, 1e-4)
    assert paper.model.backbone == "dinov2_vitb14" and paper.model.sma and paper.model.arch == "tesla"
    assert set(PRESETS) == {"smoke", "paper", "released"}


def test_overrides_and_yaml(tmp_path):
    cfg = apply_overrides(preset("smoke"), ["epochs=5", "model.arch=hps", "weighting=db_mtl",
                                            "weighting_hparams={beta: 0.8}"])
    assert cfg.epochs == 5 and cfg.model.arch == "hps" and cfg.weighting_hparams == {"beta": 0.8}
    path = tmp_path / "run.yaml"
    path.write_text("preset: smoke\nweighting: moco\nmodel: {arch: mmoe}\n")
    loaded = load_config(path, ["seed=3"])
    assert (loaded.weighting, loaded.model.arch, loaded.model.backbone, loaded.seed) == (
        "moco", "mmoe", "vit_mini_patch14", 3)


def test_bad_configs_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="epochs=0"):
        preset("smoke", epochs=0)
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=0.0)
    with pytest.raises(ValueError, match="unknown config field 'epoch'"):
        apply_overrides(preset("smoke"), ["epoch=3"])
    with pytest.raises(ValueError, match="preset='fast'"):
        preset("fast")
    path = tmp_path / "bad.yaml"
    path.write_text("preset: smoke\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown config field\(s\) \['learning_rate'\]"):
        load_config(path)


def test_results_hash_ignores_paths_but_not_hyperparameters():
    a = preset("smoke")
    assert a.results_hash() == preset("smoke", out_dir="/elsewhere", progress=False).results_hash()
    assert a.results_hash() != preset("smoke", lr=1e-4).results_hash()


def test_pair_stats_closed_form():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    stats = pair_stats(e1, e2)
    assert stats["cosine"] == 0.0 and stats["magnitude_similarity"] == pytest.approx(4 / 5)
    assert pair_stats(e1, -3 * e1)["cosine"] == pytest.approx(-1.0)
    assert pair_stats(e1, e1)["magnitude_similarity"] == 1.0
    assert math.isnan(pair_stats(e1, torch.zeros(2))["cosine"])


def test_task_gradient_matrix_matches_manual_gradients():
    torch.manual_seed(0)
    w_block = torch.nn.Parameter(torch.randn(3))
    w_other = torch.nn.Parameter(torch.randn(2))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    x = torch.randn(3)
    l1 = (w_block * x).sum() ** 2 + (w_other * frozen).sum()
    l2 = (w_block.sin()).sum() + w_other.pow(2).sum()
    named = [("backbone.blocks.1.attn.qkv.lora_A", w_block), ("sma.fusion.weight", w_other), ("frozen", frozen)]
    grads, slices = task_gradient_matrix([l1, l2], named)
    assert grads.shape == (2, 5)
    expected = torch.cat([2 * (w_block * x).sum() * x, frozen]).detach()
    torch.testing.assert_close(grads[0], expected)
    torch.testing.assert_close(grads[1], torch.cat([w_block.cos(), 2 * w_other]).detach())
    assert list(slices) == ["block01", "sma"]
    row = conflict_record(grads, slices)
    assert row["block01/cosine"] == pytest.approx(pair_stats(grads[0, :3], grads[1, :3])["cosine"])


def test_block_of_names():
    assert block_of("backbone.vit.blocks.10.attn.qkv.lora_B.0") == "block10"
    assert block_of("backbone.sma.ema.conv1x1.weight") == "sma"
    assert block_of("heads.seg.aspp.0.weight") == "heads"


def test_results_hash_of_unchanged_configurations_is_stable():
    """The run store keys finished runs by this hash: a new field must not move existing runs (values pinned when
    the hash was fixed; a field added later enters the hash only away from its HASH_STABLE_DEFAULTS value)."""
    from endoarss_lib.config import HASH_STABLE_DEFAULTS

    from endoarss_lib.data import synthetic

    assert preset("paper", data_root="/x").results_hash() == "0fb24a1f21e3"
    for key, default in HASH_STABLE_DEFAULTS.items():
        assert key.startswith("model.") or key in preset("smoke").to_dict() or key == "synthetic_generator", key
    # synthetic runs: pinned for the generator version 1.0 (with the bundled weights of sha256 87bbc7121cf7: the
    # weights are in the hash, so new weights give new run folders too), and a new generator version gives new ones
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synthetic, "GENERATOR_VERSION", "1.0")
        assert preset("smoke").results_hash() == "98da88dffd11"
        assert preset("smoke", model={"arch": "hps"}, seed=3, epochs=8).results_hash() == "6e9cfb1ffbd2"
        old = preset("smoke").results_hash()
        mp.setattr(synthetic, "GENERATOR_VERSION", "9.9")
        assert preset("smoke").results_hash() != old
