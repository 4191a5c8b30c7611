"""endoarss_lib: data, models, metrics and training for EndoARSS (activity recognition + semantic segmentation)."""
import os as _os

# No model or data hub is reachable from the machines this project runs on: fail fast instead of retrying for a
# minute. Users with internet opt in with ENDOARSS_ALLOW_HUB=1.
if _os.environ.get("ENDOARSS_ALLOW_HUB") != "1":
    _os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
