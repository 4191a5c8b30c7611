"""What notebooks and scripts work with: :mod:`.experiment` (``Experiment``: checked parameters -> run configs ->
result rows), :mod:`.sweep` (grids of notebook runs: ``python -m endoarss_lib.experiments.sweep``), :mod:`.results`
(result tables, seeds summarised, Delta_m, comparisons), :mod:`.viz` (figures) and :mod:`.bench` (throughput, memory
and GFLOPs of models and corruptions).

Layer: the top of the library; it may use every layer below (training, evaluation, robustness, evidence) and nothing
in the library imports it.
"""
