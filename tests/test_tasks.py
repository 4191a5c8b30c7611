"""The task registry: every registered task's metrics on a tiny evaluation, their directions on closed-form cases, the
one result-key parser, and a toy task registered here that trains end to end through fit() and is removed again."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from endoarss_lib import tasks as registry
from endoarss_lib.config import ConfigError, preset
from endoarss_lib.data import MTLDataset, make_loader, make_synthetic
from endoarss_lib.metrics import ClassificationMeter
from endoarss_lib.models import ModelConfig
from endoarss_lib.tasks import (DEFAULT_TASKS, IMAGE_CLASSIFICATION, TASKS, Check, Metric, Task, add_targets,
                                delta_m_keys, get_task, headline_keys, higher_is_better, main_keys, metric_info,
                                register_task, split_key, unregister_task)
from endoarss_lib.training.engine import evaluate, fit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROOT = Path(__file__).resolve().parents[1]
SIZE = 56


@pytest.fixture(scope="module")
def tiny_test_set(tmp_path_factory):
    root = make_synthetic(tmp_path_factory.mktemp("tasks") / "esd", "mtlesd", n_train=0, n_test=8, image_size=SIZE)
    return MTLDataset(root, "test", dataset="mtlesd", image_size=SIZE)


def _batches(dataset, tasks):
    """The loader's batches in order, each with every task's target (derived ones included)."""
    return [add_targets(b, tasks, dataset.spec) for b in make_loader(dataset, 4, shuffle=False)]


def _logits(target: torch.Tensor, num_classes: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Logits whose decoded prediction is the truth (``perfect``), the truth with every third entry wrong plus some
    noise (``noisy``), or constant (``collapse``: class 0 everywhere, or no label for a multi-label target)."""
    if target.is_floating_point():  # multi-label (B, C) in {0, 1}
        if kind == "collapse":
            return torch.full_like(target, -6.0)
        if kind == "noisy":
            target = target.clone()
            target.view(-1)[::3] = 1 - target.view(-1)[::3]
        return (2 * target - 1) * 6.0 + (torch.randn(target.shape, generator=generator) if kind == "noisy" else 0)
    target = target.long().clamp(0, num_classes - 1)
    if kind == "noisy":
        target = target.clone()
        target.view(-1)[::3] = (target.view(-1)[::3] + 1) % num_classes
    one_hot = F.one_hot(target, num_classes).movedim(-1, 1).float() * 4.0
    if kind == "collapse":
        one_hot = torch.zeros_like(one_hot)
        one_hot[:, 0] = 1.0
    elif kind == "noisy":
        one_hot = one_hot + torch.randn(one_hot.shape, generator=generator) * 0.5
    return one_hot


class _Replay(torch.nn.Module):
    """A 'model' that returns prepared outputs for the coming batches, in order."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = iter(outputs)

    def forward(self, images):
        return next(self.outputs)


def _evaluate(dataset, kind: str, tasks=None, distances=True):
    tasks = tuple(TASKS) if tasks is None else tasks
    g = torch.Generator().manual_seed(0)
    classes = {t: get_task(t).num_classes(dataset.spec) for t in tasks}
    outputs = [{t: _logits(b[get_task(t).target], classes[t], kind, g) for t in tasks}
               for b in _batches(dataset, tasks)]
    return evaluate(_Replay(outputs), make_loader(dataset, 4, shuffle=False), torch.device("cpu"), tasks,
                    distances=distances, amp="off")


# -- every registered task, every metric ------------------------------------------------------------------------

def test_every_registered_metric_is_finite_on_a_tiny_evaluation(tiny_test_set):
    ev = _evaluate(tiny_test_set, "noisy")
    for t, task in TASKS.items():
        assert task.num_classes(tiny_test_set.spec) is not None, t
        for m in task.metrics:
            key = f"{t}_{m.name}"
            assert key in ev and math.isfinite(ev[key]), (key, ev.get(key))


def test_metrics_that_need_distances_are_the_ones_left_undefined_without_them(tiny_test_set):
    ev = _evaluate(tiny_test_set, "noisy", distances=False)
    for t, task in TASKS.items():
        for m in task.metrics:
            # without boundary distances / SSIM these are NaN; every other metric is still computed
            assert math.isnan(ev[f"{t}_{m.name}"]) == m.needs_distances, (t, m.name)


QUALITY_UNITS = {"fraction": 1.0, "pixels": 0.0, "rate": 0.0}


def test_directions_match_closed_form_cases(tiny_test_set):
    """A perfect prediction scores the closed-form best value of every Delta_m / headline metric (1 for fractions,
    0 for distances) and is at least as good as a noisy and a constant prediction on every quality metric, in the
    direction the registry declares (strictly better than the noisy one on the Delta_m metrics)."""
    perfect, noisy, collapse = (_evaluate(tiny_test_set, kind) for kind in ("perfect", "noisy", "collapse"))
    for t, task in TASKS.items():
        for m in task.metrics:
            key = f"{t}_{m.name}"
            assert higher_is_better(key) is m.higher_is_better
            if m.delta_m or m.headline:
                assert perfect[key] == pytest.approx(QUALITY_UNITS[m.unit], abs=1e-9), key
            for other in (noisy, collapse):
                if m.quality and math.isfinite(other[key]):
                    assert (perfect[key] >= other[key]) if m.higher_is_better else (perfect[key] <= other[key]), key
            if m.delta_m:
                assert (perfect[key] > noisy[key]) if m.higher_is_better else (perfect[key] < noisy[key]), key


def test_prior_and_degeneracy_rules_on_a_constant_prediction(tiny_test_set):
    """A constant prediction never beats a task's prior predictor, and every task calls it degenerate; a perfect
    one beats the prior and is not degenerate (the rules notebooks caption tables with)."""
    perfect, collapse = _evaluate(tiny_test_set, "perfect"), _evaluate(tiny_test_set, "collapse")
    for t, task in TASKS.items():
        def get(ev):
            return lambda metric: ev.get(f"{t}_{metric}")
        assert task.beats_prior(get(perfect)) and not task.beats_prior(get(collapse)), t
        assert task.degeneracy(get(perfect)) is None and task.degeneracy(get(collapse)), t


def test_prior_predictor_output_decodes_to_a_constant_prediction(tiny_test_set):
    for t, task in TASKS.items():
        if task.prior_output is None:
            continue
        out = task.prior_output(tiny_test_set, task.num_classes(tiny_test_set.spec))
        pred = task.decode(torch.stack([out, out]))
        assert torch.equal(pred[0], pred[1])


# -- keys ---------------------------------------------------------------------------------------------------------

def test_split_key_is_the_one_parser():
    assert split_key("test_seg_hd95") == ("test", "seg", "hd95")
    assert split_key("val_cls_macro_f1") == ("val", "cls", "macro_f1")
    assert split_key("seg_miou") == ("", "seg", "miou")
    assert split_key("A_m1", registered=False) == ("", "A", "m1")
    with pytest.raises(KeyError, match="not a result key of a registered task"):
        split_key("test_depth_rmse")
    with pytest.raises(ValueError, match="no <task>_ prefix"):  # a KeyError that is also a ValueError
        split_key("accuracy", registered=False)
    import endoarss_lib.metrics as metrics
    import endoarss_lib.models as models

    assert not hasattr(metrics, "metric_task") and not hasattr(models, "TASKS")  # the duplicates are gone


def test_main_delta_m_and_headline_keys_follow_the_registry():
    assert main_keys() == [f"test_{t}_{m.name}" for t in DEFAULT_TASKS for m in get_task(t).metrics if m.main]
    assert delta_m_keys() == {"test_cls_accuracy": True, "test_cls_macro_f1": True, "test_seg_miou": True,
                              "test_seg_dice": True, "test_seg_hd95": False}
    assert headline_keys() == ["cls_accuracy", "seg_miou"]
    assert higher_is_better("val_seg_hd") is False and higher_is_better("test_cls_accuracy") is True
    task, metric = metric_info("test_seg_ssim")
    assert task.name == "seg" and metric.needs_distances
    with pytest.raises(KeyError, match="declares no metric"):
        metric_info("cls_iou")


def test_no_task_name_branching_outside_the_registry():
    """Engine, evaluation, models, results and config iterate the registry: no comparison with a task name."""
    pattern = re.compile(r"""(==|!=)\s*["'](cls|seg)["']|["'](cls|seg)["']\s+(not\s+)?in\s""")
    offenders = []
    for path in (ROOT / "endoarss_lib").rglob("*.py"):
        if path.name in ("tasks.py", "released.py"):  # the registry itself; the released architecture's own names
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


# -- validation ---------------------------------------------------------------------------------------------------

def test_model_tasks_are_validated_against_the_registry():
    with pytest.raises(ValueError, match=r"tasks=\('cls', 'depth'\) must be distinct names from"):
        ModelConfig(backbone="vit_tiny_patch14", tasks=("cls", "depth"), num_activities=3)
    with pytest.raises(ConfigError, match="must be distinct names from"):
        preset("smoke", model={"tasks": ["seg", "seg"]})
    with pytest.raises(ValueError, match="num_activities must be an int >= 2 for task 'cls'"):
        ModelConfig(backbone="vit_tiny_patch14", tasks=("cls",))


def test_register_task_checks_what_a_task_must_carry():
    cls = get_task("cls")
    with pytest.raises(ValueError, match="already registered"):
        register_task(cls)
    with pytest.raises(ValueError, match="without '_'"):
        register_task(dataclasses.replace(cls, name="tool_use"))
    with pytest.raises(ValueError, match=r"lacks \['loss_fn'\]"):
        register_task(dataclasses.replace(cls, name="toy", loss_fn=None))
    with pytest.raises(ValueError, match="reads undeclared metrics"):
        register_task(dataclasses.replace(cls, name="toy", prior=Check("auc", ">", 0.5)))
    with pytest.raises(ValueError, match="default tasks"):
        unregister_task("seg")
    assert "toy" not in TASKS


def test_add_targets_derives_only_what_is_missing():
    batch = {"image": torch.zeros(2, 3, 4, 4), "label": torch.tensor([0, 1]), "mask": torch.zeros(2, 4, 4).long()}
    assert add_targets(batch, DEFAULT_TASKS) is batch
    with pytest.raises(KeyError, match="no 'label'"):
        add_targets({"image": batch["image"]}, ("cls",))


# -- a toy task, registered here, trained end to end ----------------------------------------------------------------

def _coverage_target(batch, spec):
    """Yes/no: does foreground cover more than 3 % of the image's valid pixels?"""
    mask = batch["mask"]
    valid = (mask != 255).flatten(1).sum(1).clamp(min=1)
    return ((((mask > 0) & (mask != 255)).flatten(1).sum(1) / valid) > 0.03).long()


def _coverage_majority(values):
    cm = np.asarray(values["confusion"])
    return float(cm.sum(1).max() / cm.sum()) if cm.sum() else float("nan")


TOY = Task("coverage", "toy: is more than 3 % of the image foreground?", classes_field="", target="coverage",
           metrics=(Metric("accuracy", True, "AC", delta_m=True, headline=True),
                    Metric("majority_accuracy", True, "majority AC", main=False, compute=_coverage_majority)),
           prior=Check("accuracy", ">", "majority_accuracy"), derive_target=_coverage_target, fixed_classes=2,
           **{**IMAGE_CLASSIFICATION, "prior_output": None, "display": None})


@pytest.fixture
def toy_task():
    register_task(TOY)
    try:
        yield TOY
    finally:
        unregister_task(TOY.name)


def test_a_toy_task_registered_in_a_test_trains_end_to_end(tmp_path, toy_task):
    cfg = preset("smoke", out_dir=str(tmp_path / "runs"), epochs=1, image_size=SIZE, synthetic_n_train=16,
                 synthetic_n_test=8, batch_size=8, progress=False, weighting="db_mtl",
                 model={"backbone": "vit_tiny_patch14", "arch": "tesla", "tasks": ["cls", "seg", "coverage"]})
    assert cfg.model.task_classes == {"coverage": 2} and cfg.model.classes_of("coverage") == 2
    row = fit(cfg)
    assert row["tasks"] == "cls+seg+coverage"
    for key in ("test_coverage_accuracy", "test_coverage_majority_accuracy", "val_coverage_accuracy",
                "test_cls_accuracy", "test_seg_miou"):
        assert math.isfinite(row[key]), key
    # the toy accuracy is the accuracy of the model's coverage answers against the derived targets
    from endoarss_lib.evaluation.inference import load_run_model

    model = load_run_model(row["run_dir"])
    test = MTLDataset(cfg.data_root_path(), "test", dataset="mtlesd", image_size=SIZE)
    meter = ClassificationMeter(2)
    with torch.no_grad():
        for batch in make_loader(test, 8):
            meter.update(model(batch["image"])["coverage"].argmax(1), _coverage_target(batch, test.spec))
    assert row["test_coverage_accuracy"] == pytest.approx(meter.compute()["accuracy"])
    assert "coverage" in model.heads and model.backbone.num_groups == 3  # TESLA: one adapter group per task


def test_the_toy_task_is_gone_after_the_test():
    assert "coverage" not in TASKS and set(DEFAULT_TASKS) <= set(TASKS)
    with pytest.raises(ConfigError):
        preset("smoke", model={"tasks": ["cls", "coverage"]})


# -- instrument presence (the third registered task) ----------------------------------------------------------------

def test_presence_targets_are_the_instrument_classes_in_each_mask(tiny_test_set):
    from endoarss_lib.data import get_spec

    esd = get_spec("synthetic_mtlesd")
    assert [esd.seg_classes[c] for c in esd.instrument_classes] == ["injection_needle", "electrosurgical_knife"]
    for name in ("mtlendovis", "mtlendovis_gen", "synthetic_mtlendovis", "synthetic_mtlendovis_gen"):
        spec = get_spec(name)  # EndoVis: every class but background is an instrument type, in one id space
        assert spec.instrument_classes == tuple(range(1, spec.num_seg_classes)) and spec.num_instruments == 7
    assert get_spec("mtlesd").num_instruments is None  # the real MTLESD's categories are not named
    batch = _batches(tiny_test_set, ("presence",))[0]
    masks = batch["mask"].numpy()
    expected = [[float(np.isin(c, m)) for c in esd.instrument_classes] for m in masks]
    assert batch["presence"].tolist() == expected
    assert batch["presence"].sum(1).min() >= 1  # every synthetic ESD scene holds its activity's instrument


def test_presence_needs_a_dataset_that_names_its_instruments():
    with pytest.raises(ConfigError, match="'presence' needs the dataset's num_instruments.*'mtlesd'"):
        preset("smoke", synthetic=False, data_root="/nowhere", model={"tasks": ["cls", "presence"]})
    assert preset("smoke", model={"tasks": ["cls", "seg", "presence"]}).model.task_classes == {"presence": 2}
    assert preset("smoke").model.task_classes == {}  # the default stays the paper's two tasks


PRESENCE_RUNS = [("tesla", "ew"), ("hps", "ew"), ("mmoe", "ew"), ("dselect_k", "ew"), ("single", "ew"),
                 ("tesla", "db_mtl"), ("tesla", "aligned_mtl"), ("tesla", "moco"), ("tesla", "stch"),
                 ("tesla", "gm_coord")]


@pytest.mark.parametrize("arch,weighting", PRESENCE_RUNS, ids=["-".join(r) for r in PRESENCE_RUNS])
def test_presence_trains_with_every_architecture_and_weighting(tmp_path, arch, weighting):
    tasks = ["presence"] if arch == "single" else ["cls", "seg", "presence"]
    cfg = preset("smoke", dataset="mtlendovis", out_dir=str(tmp_path / "runs"), epochs=1, image_size=SIZE,
                 synthetic_n_train=24, synthetic_n_test=8, batch_size=8, progress=False, weighting=weighting,
                 model={"backbone": "vit_tiny_patch14", "arch": arch, "tasks": tasks})
    row = fit(cfg)
    assert row["tasks"] == "+".join(tasks) and cfg.model.classes_of("presence") == 7
    for key in ("test_presence_map", "test_presence_macro_f1", "test_presence_chance_map", "val_presence_map"):
        assert math.isfinite(row[key]), key
    assert 0 <= row["test_presence_chance_map"] <= 1 and 0 <= row["test_presence_map"] <= 1
    if arch == "tesla":
        from endoarss_lib.evaluation.inference import load_run_model

        model = load_run_model(row["run_dir"])
        assert model.backbone.num_groups == 3 and {"presence"} <= {model._owner(n) for n, _ in
                                                                   model.named_parameters() if ".tesla_" in n}


def test_the_example_in_docs_tasks_md_registers_a_working_task():
    text = (ROOT / "docs" / "tasks.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    try:
        exec(compile(code, "docs/tasks.md", "exec"), {})
        task = get_task("coverage")
        mask = torch.zeros(2, 10, 10, dtype=torch.long)
        mask[0, :2, :2] = 3  # 4 % foreground
        mask[1, 0, :2] = 1  # 2 % foreground
        assert add_targets({"mask": mask}, ("coverage",), spec=None)["coverage"].tolist() == [1, 0]
        cfg = preset("smoke", model={"backbone": "vit_tiny_patch14", "tasks": ["cls", "seg", "coverage"]})
        assert cfg.model.task_classes == {"coverage": 2} and "test_coverage_accuracy" in main_keys(cfg.tasks)
    finally:
        if "coverage" in TASKS:
            unregister_task("coverage")


def test_presence_without_a_spec_says_what_to_pass():
    with pytest.raises(ValueError, match="pass spec="):
        add_targets({"mask": torch.zeros(1, 4, 4, dtype=torch.long)}, ("presence",))


def test_a_tasks_frame_output_is_checked_when_registered():
    cls = get_task("cls")
    with pytest.raises(ValueError, match="frame_output='pixels'"):
        register_task(dataclasses.replace(cls, name="toy", frame_output="pixels"))
    assert "toy" not in TASKS
    # the paper's tasks and presence say what one image's output is
    assert {t: get_task(t).frame_output for t in ("cls", "seg", "presence")} == {
        "cls": "label", "seg": "mask", "presence": "labels"}
    logits = torch.tensor([2.0, -1.0, 0.5])
    torch.testing.assert_close(get_task("cls").frame_probabilities(logits), torch.softmax(logits, 0))
    torch.testing.assert_close(get_task("presence").frame_probabilities(logits), 1 / (1 + torch.exp(-logits)))
