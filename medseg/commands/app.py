"""The ``medseg`` command group: its one error policy, exit statuses and the failure message.

Exit status: 0 success; 1 when some scans failed; 2 when the run could not start (bad arguments,
config or model, an output folder that cannot be written). :class:`Commands` is the one place that
turns the library's errors into that status and a one-line message on stderr.
"""

from __future__ import annotations

import errno
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup


class Commands(TyperGroup):
    """medseg's subcommands, run under its one error policy.

    Errors that mean the run could not start or go on — medseg's own (:class:`~medseg.errors.MedsegError`:
    a bad config, spec, model or argument) and the operating system's (an output folder that cannot be
    made or written) — end the command with exit status 2 and one line on stderr, never a traceback.
    Anything else is a bug and keeps its traceback.
    """

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]  # typer passes its Context
        """Run the chosen subcommand, turning errors that stop it into exit status 2 and one line."""
        from medseg.errors import MedsegError

        try:
            return super().invoke(ctx)
        except (MedsegError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                raise  # a closed pipe (``medseg ... | head``): click ends quietly
            fail(one_line(exc))


app = typer.Typer(
    cls=Commands,
    name="medseg",
    help="Medical image segmentation: load, preprocess, tile, model, stitch, refine, export, track.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_SOME_FAILED = 1
EXIT_CANNOT_START = 2


def fail(message: str, code: int = EXIT_CANNOT_START) -> NoReturn:
    typer.secho(f"medseg: error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def one_line(exc: BaseException) -> str:
    """The message of an error that stopped a command, on one line, naming the file where there is one."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        text = f"cannot use {where}{exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())
