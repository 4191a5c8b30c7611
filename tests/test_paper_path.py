"""The paper path is safe: a frozen DINOv2 backbone without weights does not start, ``model.pretrained=random`` asks
for random init explicitly (same results hash as before), and the paper-scale grid files of Tables II-VII parse and
expand without training anything. Fast: no DINOv2-size model is trained; one ViT-S/14 is built once."""
from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import pytest

from endoarss_lib import train
from endoarss_lib.config import ConfigError, TrainConfig, load_config, preset, require_backbone_weights
from endoarss_lib.experiments.sweep import expand, load_grid
from endoarss_lib.models.backbones import BACKBONES, OFFICIAL_WEIGHTS, build_backbone, needs_weights
from endoarss_lib.models.pretrained import weights_transforms
from endoarss_lib.models.weights import RandomInitWarning

REPO = Path(__file__).resolve().parents[1]
GRIDS = REPO / "results" / "grids"
# tests/test_config_diagnostics.py pins this hash for preset("paper", data_root="/x") (pretrained false)
PAPER_HASH = "0fb24a1f21e3"


@pytest.fixture
def no_training(monkeypatch):
    """engine.fit replaced: records the configs it was given, trains nothing."""
    calls = []
    monkeypatch.setattr("endoarss_lib.training.engine.fit", lambda cfg: calls.append(cfg) or {"ok": True})
    return calls


# ------------------------------------------------------------------------------------- refusing random DINOv2
@pytest.mark.parametrize("argv", [["--preset", "paper", "data_root=/x"],
                                  ["--preset", "released", "data_root=/x", "dataset=mtlendovis"],
                                  ["--preset", "paper", "data_root=/x", "model.pretrained=false"],
                                  ["--preset", "smoke", "model.backbone=dinov2_vitb14"]])
def test_a_frozen_dinov2_without_weights_does_not_start(argv, no_training, capsys):
    assert train.main(argv) == 2  # a config error (exit status 2), before anything trains
    assert no_training == []
    err = capsys.readouterr().err
    for text in ("dinov2_vitb14_pretrain.pth",
                 "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
                 "facebookresearch/dinov2", "vit_base_patch14_dinov2.lvd142m",
                 "model.pretrained=/path/to/dinov2_vitb14_pretrain.pth", "model.pretrained=random",
                 "sha256: not known"):  # no digest is recorded in the project: the message says so, invents none
        assert text in err, (text, err)


@pytest.mark.parametrize("text", ["preset: paper\ndata_root: /x\n",
                                  # what --print-config of the paper preset says: false is the preset's default
                                  "preset: paper\ndata_root: /x\nmodel: {backbone: dinov2_vitb14, pretrained: false}\n"])
def test_the_config_file_route_is_refused_too(text, tmp_path, no_training, capsys):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(text)
    assert train.main(["--config", str(cfg_file)]) == 2 and no_training == []
    assert "model.pretrained=random" in capsys.readouterr().err
    cfg_file.write_text(text.replace("data_root: /x\n", "data_root: /x\nmodel.pretrained: random\n"))
    assert train.main(["--config", str(cfg_file)]) == 0 and no_training[0].model.pretrained == "random"


@pytest.mark.parametrize("word", ["random", "Random", " RANDOM "])
def test_random_written_explicitly_starts_with_the_old_hash(word, no_training):
    assert train.main(["--preset", "paper", "data_root=/x", f"model.pretrained={word}"]) == 0
    (cfg,) = no_training
    assert cfg.model.pretrained == "random"
    assert cfg.results_hash() == PAPER_HASH  # the same run folder as pretrained=false had
    assert cfg.input_normalization() == "imagenet"  # DINOv2's published convention, as for pretrained=false
    again = TrainConfig(**cfg.to_dict())  # a run folder's config.json reads back as the same explicit choice
    assert again.model.pretrained == "random" and again.results_hash() == PAPER_HASH
    require_backbone_weights(again)


def test_weights_given_start(tmp_path, no_training):
    weights = tmp_path / "dinov2_vitb14_pretrain.pth"
    weights.write_bytes(b"not read here")  # the check needs the path only; loading is the model's strict business
    assert train.main(["--preset", "paper", "data_root=/x", f"model.pretrained={weights}"]) == 0
    assert no_training[0].model.pretrained == str(weights)
    assert train.main(["--preset", "paper", "data_root=/x", "model.pretrained=true"]) == 0  # the hub: at build time


def test_print_config_and_configs_in_code_still_work():
    cfg = preset("paper", data_root="/x")  # configs are made and hashed as before; only starting a run is refused
    assert cfg.model.pretrained is False and cfg.results_hash() == PAPER_HASH
    with pytest.raises(ConfigError, match="model.pretrained=random"):
        require_backbone_weights(cfg)
    assert train.main(["--preset", "paper", "data_root=/x", "--print-config"]) == 0


def test_which_backbones_need_weights():
    dinov2 = [n for n in BACKBONES if n.startswith("dinov2")]
    assert sorted(OFFICIAL_WEIGHTS) == sorted(dinov2)
    for name in dinov2:
        assert needs_weights(name, False) and needs_weights(name, None)
        assert not needs_weights(name, "random") and not needs_weights(name, True)
        assert not needs_weights(name, "/w/file.pth")
    # trainable or test-size backbones, and the bundled stand-in, are not refused
    for name in ("resnet101", "resnet_tiny", "vit_tiny_patch14", "vit_mini_patch14"):
        assert not needs_weights(name, False), name
    require_backbone_weights(preset("smoke"))  # the default: bundled weights
    require_backbone_weights(load_config(None, ["model.backbone=resnet_tiny", "image_size=56"]))


def test_random_keeps_the_random_init_warning_and_ignores_a_file_named_like_it(tmp_path, monkeypatch):
    with pytest.warns(RandomInitWarning, match="dinov2_vits14_pretrain.pth"):
        bb = build_backbone("dinov2_vits14", image_size=56, pretrained="random")
    assert bb.weights == {"source": "random init", "sha256": None} and bb.pretrained_random_init
    monkeypatch.chdir(tmp_path)  # a record "random.json" in the working directory is not a weights record
    (tmp_path / "random.json").write_text(json.dumps({"file": "random", "mean": [0, 0, 0], "std": [1, 1, 1]}))
    assert weights_transforms("random", "dinov2_vitb14").normalize == "imagenet"


def test_a_tiny_backbone_takes_random_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bb = build_backbone("vit_tiny_patch14", image_size=28, pretrained="random")
    assert bb.pretrained_random_init


# ------------------------------------------------------------------------------------- paper-scale grids
# grid file -> (notebook, dataset, notebook runs it expands to: one per seed)
PAPER_GRIDS = {
    "table2_paper.yaml": ("notebooks/02_main_results.ipynb", "mtlesd", 3),
    "table3_paper.yaml": ("notebooks/02_main_results.ipynb", "mtlendovis", 3),
    "table4_paper.yaml": ("notebooks/03_generalisation.ipynb", None, 3),
    "table5_paper.yaml": ("notebooks/04_ablation_components.ipynb", "mtlesd", 3),
    "table6_paper.yaml": ("notebooks/05_ablation_rank.ipynb", "mtlesd", 3),
    "table7_paper.yaml": ("notebooks/06_robustness.ipynb", "mtlesd", 3),
}


def _declared_parameters(notebook: Path) -> set[str]:
    """The names the notebook's ``parameters`` cell assigns (read with ast: papermill's own listing drops the
    parameters annotated ``X | None``, see docs/notebook_parameters.md)."""
    cells = json.loads(notebook.read_text())["cells"]
    (cell,) = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    names = set()
    for node in ast.parse("".join(cell["source"])).body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_every_paper_table_has_a_grid():
    assert {p.name for p in GRIDS.glob("table*_paper.yaml")} == set(PAPER_GRIDS)


@pytest.mark.parametrize("name", sorted(PAPER_GRIDS))
def test_paper_grids_parse_and_expand_at_paper_scale(name, tmp_path):
    notebook, dataset, runs = PAPER_GRIDS[name]
    grid = load_grid(GRIDS / name)
    assert grid.notebook == notebook and grid.name == name[:-len(".yaml")]
    configs = expand(grid, REPO)  # what --dry-run lists; nothing runs
    assert len(configs) == runs
    declared = _declared_parameters(REPO / notebook)
    seeds = []
    for config in configs:
        p = config.parameters
        assert set(p) <= declared, sorted(set(p) - declared)  # every parameter is one the notebook reads
        assert p["image_size"] == 224 and p["epochs"] == 200 and p["device"] == "cuda"  # paper Sec. IV-B
        assert p["backbone"] == "dinov2_vitb14" and p["weights"]["dinov2_vitb14"].endswith("dinov2_vitb14_pretrain.pth")
        assert p["data_root"].startswith("/") and p["scale"] == "demonstration"
        if dataset is not None:
            assert p["dataset"] == dataset
        if "variants" in p:
            from endoarss_lib.evidence.variants import VARIANTS
            assert set(p["variants"]) <= set(VARIANTS) and "EndoARSS" in p["variants"]
        seeds += p["seeds"]
    assert sorted(seeds) == [0, 1, 2]  # the paper-style three seeds, one notebook run (one GPU) each


def test_the_sweep_dry_run_lists_a_paper_grid(capsys, tmp_path):
    from endoarss_lib.experiments import sweep

    assert sweep.main([str(GRIDS / "table6_paper.yaml"), "--dry-run", "--root", str(REPO)]) == 0
    out = capsys.readouterr().out
    assert "sweep table6_paper: 3 configurations of 05_ablation_rank.ipynb" in out
    assert out.count('"image_size": 224') == 3
