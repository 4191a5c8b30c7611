"""Training: one engine that fits a run config and the pieces it is built from.

* :mod:`.engine`: ``fit(config)``, the training step, the evaluation pass, checkpoints and the run folder;
* :mod:`.rows`: the one result-row schema every run, evaluation and robustness cell writes;
* :mod:`.losses`: the task losses and MEJO's CGL; :mod:`.distributed`: data-parallel training under ``torchrun``;
* :mod:`.diagnostics`: task-gradient conflict; :mod:`.tblog`: the TensorBoard log;
* :mod:`.runner`: a set of named run configs fitted in this process or a local pool (one job per GPU).

Layer: above the data, the task registry, the models, the weighting methods and the run config; below evaluation,
robustness and the experiments. The weighting methods stay in :mod:`endoarss_lib.weighting` (beside the models):
the run config validates weighting names and options, and the engine imports the config.
"""
