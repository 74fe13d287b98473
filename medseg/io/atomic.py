"""Atomic writes: write to a temporary file beside the destination, then rename it into place."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(dest: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` if the block succeeds.

    A crash inside the block leaves ``dest`` untouched (and no file that looks complete).

    Args:
        dest: The final path.
        suffix: Suffix of the temporary file (defaults to the destination's full suffix,
            so writers that pick a format from the name, like ``.nii.gz``, still work).

    Yields:
        The temporary path to write to.

    Examples:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_path(d / "a.txt") as tmp:
        ...     _ = tmp.write_text("hello")
        >>> (d / "a.txt").read_text()
        'hello'
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(dest.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".tmp{suffix}", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(dest: str | Path, text: str) -> None:
    """Write text to ``dest`` atomically.

    Args:
        dest: The final path.
        text: The content (UTF-8).
    """
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(dest: str | Path, data: bytes) -> None:
    """Write bytes to ``dest`` atomically.

    Args:
        dest: The final path.
        data: The content.
    """
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
