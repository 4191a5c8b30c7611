"""Shared test set-up: generated data go to a temporary folder, never into the repository."""
import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _data_home(tmp_path_factory):
    previous = os.environ.get("ENDOARSS_DATA")
    os.environ["ENDOARSS_DATA"] = str(tmp_path_factory.mktemp("endoarss_data"))
    yield
    if previous is None:
        os.environ.pop("ENDOARSS_DATA", None)
    else:
        os.environ["ENDOARSS_DATA"] = previous
