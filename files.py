"""Writing files so that a crash or a full disk never leaves a half-written one: the one atomic writer."""
from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", fsync: bool = False, **open_kwargs) -> Iterator[IO]:
    """Yield a file object for a temporary file beside ``path``; on a clean exit it replaces ``path``
    (``os.replace``), on any error it is removed and ``path`` is left as it was.

    ``mode`` is ``"w"`` (text, UTF-8 unless ``encoding`` is given) or ``"wb"``; ``fsync`` flushes to the disk
    first (checkpoints). The file gets the permissions of an ordinary new file (``mkstemp`` makes it private)."""
    path = pathlib.Path(path)
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path, text: str) -> None:
    """``pathlib.Path.write_text``, atomically."""
    with atomic_write(path) as f:
        f.write(text)
