"""The ``medseg`` command. Each subcommand calls the library; heavy modules load lazily.

The subcommands live in :mod:`medseg.commands` (one module per group, registered on import);
:class:`medseg.commands.app.Commands` turns errors into exit statuses: 0 success, 1 when some scans
failed, 2 when the run could not start.
"""

from __future__ import annotations

import sys

from medseg.commands import data, evaluate, export, predict, train  # noqa: F401  (register their commands)
from medseg.commands.app import app
from medseg.commands.import_model import import_app
from medseg.commands.predict import track_app
from medseg.commands.watch import watch_command
from medseg.review.cli import review_app

app.add_typer(import_app, name="import")
app.add_typer(track_app, name="track")
app.command("watch")(watch_command)
app.add_typer(review_app)

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``medseg`` console script (errors become exit codes in ``Commands``)."""
    sys.exit(app())


if __name__ == "__main__":
    main()
