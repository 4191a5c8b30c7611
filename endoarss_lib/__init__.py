"""endoarss_lib: data, models, metrics and training for EndoARSS (activity recognition + semantic segmentation).

Public API: ``make_synthetic``, ``MTLDataset``, ``build_model``, ``fit``, ``preset``, ``TrainConfig``,
``get_weighting``, ``classification_metrics``, ``segmentation_metrics``, ``list_pretrained``, ``get_pretrained``;
the evaluation pass is ``endoarss_lib.engine.evaluate`` (``endoarss_lib.evaluate`` is the command line that evaluates
a checkpoint: ``python -m endoarss_lib.evaluate --help``).
Importing the package changes nothing outside it (no environment variables are set).
"""
from .version import __version__

from .config import TrainConfig, preset  # noqa: E402
from .data import MTLDataset, make_synthetic  # noqa: E402
from .engine import fit  # noqa: E402
from .metrics import classification_metrics, segmentation_metrics  # noqa: E402
from .models import build_model, get_pretrained, list_pretrained  # noqa: E402
from .weighting import get_weighting  # noqa: E402

__all__ = ["make_synthetic", "MTLDataset", "build_model", "fit", "preset", "TrainConfig",
           "get_weighting", "classification_metrics", "segmentation_metrics", "list_pretrained", "get_pretrained",
           "__version__"]
