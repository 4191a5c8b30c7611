"""Sphinx configuration of the endoarss book: the guides of docs/ and the executed notebooks, offline.

Build it with ``python scripts/notebook_outputs.py book`` (``make book``): that stages this folder and the executed
notebooks of ``results/executed/`` (as ``notebooks/``, never executed again) into a temporary source tree and runs
Sphinx with ``-W`` (a warning is an error) into ``results/book/``. Running ``sphinx-build docs ...`` directly builds
the guides without the notebooks (and warns that ``notebooks/*`` matches nothing).

Reading the book needs no network: the theme (furo) ships its assets, the search is Sphinx's own (a local
``searchindex.js``), no widget JavaScript is loaded (the executed notebooks keep no widget state), and MathJax, the
one remote script Sphinx would add, is only added to pages with math: the notebooks' outputs have none
(``tests/test_book.py`` checks every page for remote script, style and image sources).
"""
from __future__ import annotations

project = "endoarss"
author = "the endoarss authors"
copyright = "the endoarss authors, MIT licence"
html_title = "endoarss: notebooks and guides"

extensions = ["myst_nb"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "img/README*"]
root_doc = "index"
smartquotes = False  # titles and text exactly as the notebooks and guides write them

# The notebooks are shown as executed by `make executed` (stamped with their commit): never run again here.
nb_execution_mode = "off"
nb_ipywidgets_js = {}  # no require.js / widget manager from a CDN (the executed notebooks keep no widget state)
nb_merge_streams = True
myst_heading_anchors = 3  # `[...](page.md#a-heading)` links resolve

SYNTHETIC = ("Every result in this book comes from <strong>SYNTHETIC data</strong> and the project's "
             "<strong>synthetic-pretrained backbone</strong> (<code>synthdino_vit_mini14</code>, not DINOv2): it shows "
             "the method and the pipeline at work and reproduces nothing of the paper.")

html_theme = "furo"
html_theme_options = {"announcement": SYNTHETIC, "navigation_with_keys": True}
html_static_path: list[str] = []
html_show_sourcelink = False
html_copy_source = False
html_last_updated_fmt = None
