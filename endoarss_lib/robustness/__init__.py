"""Robustness under the paper's 19 corruptions x 5 severities (Sec. IV-C5, Table VII, Fig. 6).

* :mod:`.corruptions`: the pixel transforms (``corrupt(image, name, severity, seed)``);
* :mod:`.corrupted_sets`: whole corrupted test sets, cached on disk and built in parallel;
* :mod:`.evaluation`: a trained model evaluated on every (corruption, severity) cell (:func:`evaluate_corruptions`);
* :mod:`.report`: the paper's views of those rows (Table VII, per-severity means, corruption errors).

Layer: above training and evaluation, below the experiments.

Before the layout of subpackages, ``endoarss_lib.robustness`` was the module now at :mod:`.evaluation`; its names
are still found here (with a DeprecationWarning naming :mod:`endoarss_lib.robustness.evaluation`).
"""
from __future__ import annotations

import importlib
import warnings

_EVALUATION_NAMES = ("CLEAN", "EVAL_VERSION", "evaluate_corruptions", "model_key", "pooled_outcomes")


def __getattr__(name: str):
    if name in _EVALUATION_NAMES:
        warnings.warn(f"endoarss_lib.robustness.{name} moved to endoarss_lib.robustness.evaluation.{name}: import it "
                      f"from there", DeprecationWarning, stacklevel=2)
        value = globals()[name] = getattr(importlib.import_module(f"{__name__}.evaluation"), name)  # warn once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
