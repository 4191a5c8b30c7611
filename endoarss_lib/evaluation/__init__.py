"""Evaluation of finished runs: :mod:`.inference` (load a run's selected model, predict, evaluate it on its own or
another dataset, the prior predictor) and :mod:`.paper` (the paper's tables as data, with our rows beside them).

The evaluation pass itself is :func:`endoarss_lib.training.engine.evaluate` (training selects epochs with it); the
metrics are :mod:`endoarss_lib.metrics`, below the task registry. Layer: above training, below robustness and the
experiments. ``python -m endoarss_lib.evaluate`` is the command line that evaluates the authors' checkpoint.
"""
