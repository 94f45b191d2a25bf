"""Writing files safely: every file flexikern writes goes through `atomic_write`.

    with atomic_write("out/grid.png") as tmp:      # a unique temporary name next to the file
        image.save(tmp)                            # write it however the format needs
    # out/grid.png is now the new file; on any error it is the old one (or absent), untouched

Readers see the old file or the new one, never a half-written one (write, fsync, `os.replace`);
two writers never share a temporary name (pid and a random part); a failed write removes its
temporary file and raises `OSError` naming the path and the cause, e.g. "no space left on device
while writing runs/a/checkpoint.pt; the previous checkpoint.pt is intact".
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_write", "staged_folder"]


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder (same suffix, so writers that infer the format
    from it work), then fsync it and rename it onto `path`. The folder must exist.

    Raises OSError (same errno) naming `path` when writing fails; the temporary file is removed.
    """
    path = Path(path)
    existed = path.exists()
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, e, existed) from e
        raise


def _write_error(path: Path, e: OSError, existed: bool) -> OSError:
    cause = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e) or type(e).__name__)
    kept = f"the previous {path.name} is intact" if existed else f"no {path.name} was written"
    message = f"{cause} while writing {path}; {kept}"
    return OSError(e.errno, message) if e.errno is not None else OSError(message)


@contextmanager
def staged_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary folder next to `path`; after the block, move each of its entries into
    `path` (made if absent), replacing an entry of the same name whole, and remove it.

    Nothing of `path` changes until the block has written everything; on an error inside the block
    the temporary folder is removed and `path` is as it was. Entries of `path` the block did not
    write are kept. Raises NotADirectoryError if `path` is a file.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path}: a file, not a folder; pass a new or existing folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.with_name(f".{path.name}.{tag}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        path.mkdir(exist_ok=True)
        for entry in sorted(tmp.iterdir()):
            target = path / entry.name
            old = path / f".{entry.name}.{tag}.old"
            if target.exists():
                os.replace(target, old)
            os.replace(entry, target)
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
