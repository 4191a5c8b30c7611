"""endoarss_lib: data, models, metrics and training for EndoARSS (activity recognition + semantic segmentation).

Public API: ``make_synthetic``, ``MTLDataset``, ``build_model``, ``fit``, ``evaluate``, ``preset``, ``TrainConfig``,
``get_weighting``, ``classification_metrics``, ``segmentation_metrics``.
"""
import os as _os

# No model or data hub is reachable from the machines this project runs on: fail fast instead of retrying for a
# minute. Users with internet opt in with ENDOARSS_ALLOW_HUB=1.
if _os.environ.get("ENDOARSS_ALLOW_HUB") != "1":
    _os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"

from .config import TrainConfig, preset  # noqa: E402
from .data import MTLDataset, make_synthetic  # noqa: E402
from .engine import evaluate, fit  # noqa: E402
from .metrics import classification_metrics, segmentation_metrics  # noqa: E402
from .models import build_model  # noqa: E402
from .weighting import get_weighting  # noqa: E402

__all__ = ["make_synthetic", "MTLDataset", "build_model", "fit", "evaluate", "preset", "TrainConfig",
           "get_weighting", "classification_metrics", "segmentation_metrics", "__version__"]
