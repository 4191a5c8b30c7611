"""endoarss_lib: data, models, metrics and training for EndoARSS (activity recognition + semantic segmentation).

Public API: ``make_synthetic``, ``MTLDataset``, ``build_model``, ``fit``, ``preset``, ``TrainConfig``,
``get_weighting``, ``classification_metrics``, ``segmentation_metrics``, ``list_pretrained``, ``get_pretrained``;
the evaluation pass is ``endoarss_lib.training.engine.evaluate`` (``endoarss_lib.evaluate`` is the command line that
evaluates a checkpoint: ``python -m endoarss_lib.evaluate --help``).

Layout (data flows one way; ``tests/test_layout.py`` enforces it): ``version``, ``coerce``, ``atomic``, ``cli`` ->
``data`` -> ``metrics`` -> ``tasks`` -> ``models``, ``weighting`` -> ``config`` -> ``training`` -> ``evidence``,
``evaluation`` -> ``robustness`` -> ``experiments``, ``foundation`` -> the commands ``train`` and ``evaluate``.
The modules that moved into subpackages keep their old paths (``endoarss_lib.engine`` is
``endoarss_lib.training.engine``, with a DeprecationWarning): see :mod:`endoarss_lib._compat`.
Importing the package changes nothing outside it (no environment variables are set).
"""
import logging

from . import _compat
from .config import TrainConfig, preset
from .data import MTLDataset, make_synthetic
from .metrics import classification_metrics, segmentation_metrics
from .models import build_model, get_pretrained, list_pretrained
from .training.engine import fit
from .version import __version__
from .weighting import get_weighting

_compat.install()
logging.getLogger(__name__).addHandler(logging.NullHandler())  # a library logs, the application shows: see
# endoarss_lib.training.console.show_progress (the command lines call it)

__all__ = ["make_synthetic", "MTLDataset", "build_model", "fit", "preset", "TrainConfig",
           "get_weighting", "classification_metrics", "segmentation_metrics", "list_pretrained", "get_pretrained",
           "__version__"]


def __getattr__(name: str):
    """The old module paths as attributes (``endoarss_lib.engine``): imported through :mod:`._compat` with a warning."""
    return _compat.moved_attribute(name)
