"""The training console: what a run says while it runs, through the standard :mod:`logging` module.

The package only *emits* log records (loggers under ``endoarss_lib``, e.g. ``endoarss_lib.training.engine``); the
package logger has a ``NullHandler``, so a library user sees nothing unless logging is configured. The command lines
(``endoarss-train``, ``-sweep``, ``-evaluate``, ``-pretrain``) and notebooks show the records on stderr with
:func:`show_progress`::

    from endoarss_lib.training.console import show_progress
    show_progress()            # INFO: one start line per run, one line per epoch, warnings
    show_progress("verbose")   # DEBUG as well (loader settings, every step's losses, checkpoints written)
    show_progress("quiet")     # warnings and errors only (and no progress bars)

What a training run logs (``endoarss_lib.training.engine.fit``): a start line (run folder, device and why it was
chosen, data and split sizes, model, trainable / total parameters, backbone weights, precision, epochs and batch
size; ``resume`` instead of ``start`` for a resumed run), one line per epoch (training losses, the validation
headline metrics and the selection score, epoch time and ETA), early stopping, and an end line with the test
numbers. The lines are plain text, one record each, so a non-interactive (cluster) log holds them as they are.

Progress bars (tqdm) are drawn only where someone watches them: a terminal or a Jupyter kernel, with the run's
``progress`` option on and the console not quiet (:func:`bars_wanted`); in a log file the epoch lines replace them.
"""
from __future__ import annotations

import logging
import math
import sys
from contextlib import contextmanager

__all__ = ["show_progress", "hide_progress", "showing_progress", "shown_level", "log_level", "bars_wanted", "duration", "start_line", "epoch_line",
           "LOGGER", "FORMAT", "WORKER_FORMAT", "DATEFMT"]

LOGGER = "endoarss_lib"  # the package logger: every logger of the package is below it
FORMAT = "%(asctime)s %(levelname)s %(message)s"
WORKER_FORMAT = "%(asctime)s %(levelname)s [pid %(process)d] %(message)s"  # runs trained at once in a local pool
DATEFMT = "%Y-%m-%d %H:%M:%S"
LEVELS = {"debug": logging.DEBUG, "verbose": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "quiet": logging.WARNING, "error": logging.ERROR}


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is when a record is emitted (a notebook's, or a
    test's captured stream), like :data:`logging.lastResort`."""

    def __init__(self, level: int = logging.NOTSET):
        logging.Handler.__init__(self, level)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.setStream; the stream is always the current sys.stderr
        pass


def log_level(level: str | int | bool | None) -> int:
    """A logging level from ``level``: a name (``debug`` / ``verbose``, ``info``, ``warning`` / ``quiet``,
    ``error``, any case), a number, or True (INFO) / False (WARNING). ValueError naming the choices otherwise."""
    if isinstance(level, bool):
        return logging.INFO if level else logging.WARNING
    if isinstance(level, int):
        return level
    if isinstance(level, str) and level.strip().lower() in LEVELS:
        return LEVELS[level.strip().lower()]
    raise ValueError(f"level={level!r}: expected one of {', '.join(LEVELS)} (or a logging level number)")


def _handler() -> logging.Handler | None:
    return next((h for h in logging.getLogger(LOGGER).handlers if isinstance(h, _StderrHandler)), None)


def shown_level() -> int | None:
    """The level :func:`show_progress` set, None when its handler is not installed (what a pool's workers copy)."""
    return logging.getLogger(LOGGER).level if _handler() is not None else None


def show_progress(level: str | int | bool = "info", fmt: str = FORMAT) -> logging.Handler:
    """Show the package's log lines on stderr from ``level`` up (:func:`log_level`: ``"info"`` by default,
    ``"verbose"`` for debug lines, ``"quiet"`` for warnings only). Calling it again changes the level; there is
    never more than one such handler. ``fmt``: the line format (:data:`FORMAT`; a local pool's workers use
    :data:`WORKER_FORMAT`, whose process id tells parallel runs apart). The records still propagate to the root logger, so where logging is already
    configured (``logging.basicConfig``) set the ``endoarss_lib`` logger's level instead of calling this.
    :func:`hide_progress` undoes it."""
    value = log_level(level)
    logger = logging.getLogger(LOGGER)
    handler = _handler()
    if handler is None:
        handler = _StderrHandler()
        logger.addHandler(handler)
    handler.setFormatter(logging.Formatter(fmt, DATEFMT))
    logger.setLevel(value)
    return handler


def hide_progress() -> None:
    """Remove the handler :func:`show_progress` installed and reset the package logger's level."""
    logger = logging.getLogger(LOGGER)
    handler = _handler()
    if handler is not None:
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


@contextmanager
def showing_progress(level: str | int | bool = "info"):
    """:func:`show_progress` for the duration of a block (a command's ``main``); the package logger's previous
    handler and level come back afterwards, so calling a command's ``main`` in a process changes nothing there."""
    logger = logging.getLogger(LOGGER)
    before, level_before = _handler(), logger.level
    handler = show_progress(level)
    try:
        yield handler
    finally:
        if before is None:
            logger.removeHandler(handler)
        logger.setLevel(level_before)


def _interactive() -> bool:
    """Someone watches: stderr is a terminal, or this is a Jupyter kernel (tqdm.auto draws widgets there)."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # a closed or unusual stream
        pass
    return "ipykernel" in sys.modules


def bars_wanted(progress: bool) -> bool:
    """Whether to draw progress bars: the ``progress`` option is on, someone watches (a terminal or a notebook;
    in a redirected log the per-epoch lines say the same without the carriage returns), and the console was not
    made quiet with :func:`show_progress`."""
    handler = _handler()
    quiet = handler is not None and logging.getLogger(LOGGER).getEffectiveLevel() > logging.INFO
    return bool(progress) and not quiet and _interactive()


def duration(seconds: float) -> str:
    """``4.2 s``, ``3 min 05 s``, ``2 h 07 min`` (``?`` for a value that is not a finite number)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _number(value) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def start_line(*, resumed_epoch: int, folder, device: str, dataset: str, sizes: dict, backbone: str, arch: str,
               tasks, trainable: int, total: int, weights: dict, precision: str, epochs: int, batch_size: int,
               world: int = 1, grad_accum: int = 1) -> str:
    """The one line a run starts with (``start`` or ``resume from epoch k/N``)."""
    head = f"resume from epoch {resumed_epoch}/{epochs}" if resumed_epoch else "start"
    split_sizes = ", ".join(f"{s} {n}" for s, n in sizes.items())
    share = f" ({100 * trainable / total:.2f}%)" if total else ""
    sha = weights.get("sha256")
    name = weights.get("name") or weights.get("source") or "random init"
    weights_text = f"{name} (sha256 {sha[:12]})" if sha else str(name)
    batch = f"batch {batch_size}" + (f" x {world} processes" if world > 1 else "") + \
            (f", {grad_accum} steps accumulated" if grad_accum > 1 else "")
    return (f"{head}: run {folder} | device {device} | data {dataset} ({split_sizes} images) | model {backbone} "
            f"{arch}, tasks {'+'.join(tasks)} | parameters {trainable:,} trainable of {total:,}{share} | weights "
            f"{weights_text} | precision {precision} | {epochs} epochs, {batch}")


def epoch_line(*, epoch: int, epochs: int, losses: dict, split: str, metrics: dict, select: str, score: float,
               best: bool, seconds: float, eta: float | None) -> str:
    """The line of one finished epoch: ``epoch i/N | train loss <task> <mean loss> ... | val <metric> <value> ...
    score <selection score> (best) | <epoch time>, ETA <time>``; the score is shown when selection uses ``score``
    (otherwise the selection metric is among ``metrics``), ``(best)`` marks the epoch selected so far."""
    loss_text = " ".join(f"{t} {_number(v)}" for t, v in losses.items())
    metric_text = " ".join(f"{k} {_number(v)}" for k, v in metrics.items())
    score_text = f" score {_number(score)}" if select == "score" else ""
    eta_text = "" if eta is None else f", ETA {duration(eta)}"
    return (f"epoch {epoch}/{epochs} | train loss {loss_text} | {split} {metric_text}{score_text}"
            f"{' (best)' if best else ''} | {duration(seconds)}{eta_text}")
