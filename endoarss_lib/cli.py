"""What every command-line tool of the package shares: the name it was invoked by, ``--version`` and ``--debug``, and
errors shown as one message that names the file or field, what was expected and what to do (never a traceback,
unless ``--debug``), with the exit codes of ``docs/troubleshooting.md``:

* 0: done;
* 1: the command ran but failed on something on disk: data, weights, a checkpoint or run folder, a folder locked by
  another live process, a full or read-only disk, a diverged training (and an unexpected error: a bug to report);
* 2: the command itself is wrong: a bad option, config value or grid file (fix the command and rerun);
* 130: interrupted (Ctrl-C); rerunning the same command resumes where a training stopped.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

from .atomic import why_not_written
from .version import __version__

__all__ = ["prog", "add_standard_options", "add_verbosity_options", "verbosity", "run_command", "say",
           "describe_os_error", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def prog(module: str, script: str) -> str:
    """The command's name as the user invoked it: ``script`` (``endoarss-train``) when run as that console script,
    else ``python -m <module>``."""
    invoked = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return script if Path(invoked).stem == script else f"python -m {module}"


def add_standard_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--version`` (the package version) and ``--debug`` (tracebacks instead of one-line errors)."""
    parser.add_argument("--version", action="version", version=f"%(prog)s (endoarss) {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full Python traceback of an error (for bug reports) instead of the message")
    return parser


def add_verbosity_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``-q/--quiet`` (warnings and errors only, no progress bars) and ``-v/--verbose`` (debug lines too) for the
    command's log lines on stderr; :func:`verbosity` reads them."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true",
                       help="log warnings and errors only (no start / epoch lines, no progress bars)")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="log debug lines too (the resolved config, loader settings, every step's losses)")
    return parser


def verbosity(args: argparse.Namespace) -> str:
    """The log level the command line asks for: ``quiet``, ``verbose`` or ``info``."""
    return "quiet" if getattr(args, "quiet", False) else "verbose" if getattr(args, "verbose", False) else "info"


def say(text: str, file=None) -> None:
    """Print ``text`` even when it holds characters the terminal cannot encode (a non-UTF-8 file name is shown
    with backslash escapes instead of failing)."""
    file = file or sys.stderr
    encoding = getattr(file, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding, "replace"), file=file)


def describe_os_error(exc: OSError) -> str:
    """An OSError as a message naming the file, saying what happened and what to do."""
    path = exc.filename if getattr(exc, "filename", None) is not None else None
    if path is None:
        return str(exc)
    path = os.fsdecode(path)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG):
        return f"{path}: {exc.strerror}: {why_not_written(path, exc)}"
    if exc.errno == errno.ENOTDIR:
        return f"{path}: {exc.strerror}: a file stands where a folder is expected; check the path"
    if exc.errno == errno.EISDIR:
        return f"{path}: {exc.strerror}: a folder stands where a file is expected; check the path"
    return f"{path}: {exc.strerror or exc}"


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def run_command(body: Callable[[], int], debug: bool = False, failures: tuple = (), usage: tuple = ()) -> int:
    """Run a command's work and return its exit code: an exception of ``failures`` (or any OSError) is exit 1, one of
    ``usage`` exit 2, Ctrl-C 130, anything else exit 1 as an unexpected error; each printed as ``error: <message>``
    without a traceback (``debug``: the exception propagates with its traceback). Warnings are printed as one
    ``warning: ...`` line."""
    if debug:
        return body()
    show = warnings.formatwarning
    warnings.formatwarning = _warning_line
    try:
        return body()
    except KeyboardInterrupt:
        say("interrupted. Rerunning the same command resumes a training from its last finished epoch")
        return EXIT_INTERRUPTED
    except failures as exc:
        say(f"error: {describe_os_error(exc) if isinstance(exc, OSError) else exc}")
        return EXIT_FAILED
    except usage as exc:
        say(f"error: {exc}")
        return EXIT_USAGE
    except OSError as exc:
        say(f"error: {describe_os_error(exc)}")
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - the last resort: one line instead of a traceback
        say(f"error: unexpected {type(exc).__name__}: {exc}\n(this is probably a bug: rerun with --debug to see the "
            f"traceback, and report it with the command line)")
        return EXIT_FAILED
    finally:
        warnings.formatwarning = show
