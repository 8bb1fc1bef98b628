"""Every file distill writes goes through here: atomic, checksummed, and with one-line errors when the disk refuses.

- Atomic: a temp file in the same folder, fsync, ``os.replace``, fsync of the folder. A kill at any instant
  leaves the old file or the complete new one, never a mix.
- Checksummed: JSON files carry a "sha256" of their own content (``checked_json`` / ``read_checked_json``);
  safetensors files carry one in their metadata (checkpoint.py); folders of many files list them in a manifest.
  A file whose bytes do not match is refused with one line naming it, never used and never silently discarded.
- Disk full, file too big, quota, read-only or lost permission: :class:`WriteError`, one line naming the path and
  the fix. It is a UserError (exit 2), and the runner keeps its ``.partial`` folder for ``--resume``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from distill.errors import UserError

__all__ = ["AtomicTarget", "WriteError", "atomic_write_bytes", "atomic_write_text", "checked_json",
           "file_sha256", "read_checked_json", "writing"]

CHECKSUM_KEY = "sha256"
_FIXES = {
    errno.ENOSPC: ("no space left on its disk", "free some space there or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free some space there or write elsewhere"),
    errno.EFBIG: ("the file is too large for its file system", "write to another file system"),
    errno.EACCES: ("permission denied", "make the folder writable or write elsewhere"),
    errno.EPERM: ("operation not permitted", "make the folder writable or write elsewhere"),
    errno.EROFS: ("the file system is read-only", "write to a writable folder"),
    errno.EIO: ("an input/output error (the disk or its connection failed)", "check the disk or write elsewhere"),
}


class WriteError(UserError):
    """Writing a file failed for a reason of the disk, not of the program (full, too big, no permission)."""


def write_error(path, e: OSError) -> WriteError | None:
    """The one-line error for an OSError of the disk, or None for any other OSError (a bug: let it surface)."""
    if e.errno not in _FIXES:
        return None
    what, fix = _FIXES[e.errno]
    return WriteError(f"cannot write {path}: {what}; {fix}, then run the same command again (a run continues with "
                      "--resume; what was already written is kept)")


@contextmanager
def writing(path):
    """Turn the disk's refusals inside the block into a WriteError naming `path`."""
    try:
        yield
    except OSError as e:
        err = write_error(path, e)  # the file the user knows of, not a temp name
        if err is None:
            raise
        raise err from None


def fsync_dir(path: Path) -> None:
    """Make a rename/creation inside ``path`` durable (best effort; not possible on Windows)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


class AtomicTarget:
    """Context manager giving a temp path next to ``path``; on success it is fsynced and moved over ``path``.
    On any failure the temp file is removed and ``path`` keeps its previous content; OSErrors of the disk become
    a WriteError."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self) -> Path:
        parent = self.path.parent
        with writing(self.path):
            parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=str(parent), prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                with writing(self.path):
                    _fsync_file(self.tmp)
                    os.replace(self.tmp, self.path)
            except BaseException:
                self.tmp.unlink(missing_ok=True)
                raise
            fsync_dir(self.path.parent)
            return False
        self.tmp.unlink(missing_ok=True)
        err = write_error(self.path, exc) if isinstance(exc, OSError) else None
        if err is not None:
            raise err from None
        return False


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or the complete new one."""
    with AtomicTarget(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()


def atomic_write_text(path, text: str) -> None:
    """UTF-8 version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(obj: dict) -> str:
    """sha256 of a JSON object's canonical text (sorted keys): the same before writing and after reading back."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def checked_json(obj: dict, indent: int | None = None, **dump) -> str:
    """JSON text of `obj` with a "sha256" key over the rest, which read_checked_json verifies."""
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    return json.dumps({**body, CHECKSUM_KEY: _digest(body)}, indent=indent, **dump) + "\n"


def read_checked_json(path, fix: str, required: bool = True) -> dict:
    """The JSON object in `path`, its checksum verified; UserError naming `path` and `fix` if it is damaged.
    required=False accepts a file without a checksum (written by an older distill or by hand)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is damaged (not readable JSON: {type(e).__name__}); {fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is damaged (not a JSON object); {fix}")
    if CHECKSUM_KEY not in obj:
        if required:
            raise UserError(f"{path} is damaged (it has no checksum); {fix}")
        return obj
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    if obj[CHECKSUM_KEY] != _digest(body):
        raise UserError(f"{path} is damaged or corrupt (its sha256 does not match its content); {fix}")
    return body


# ----------------------------------------------------------------------------- folders: one manifest of sha256s
SUMS = "SHA256SUMS"  # `sha256sum -c SHA256SUMS` checks it too


def seal(folder, leave_out=()) -> None:
    """Write folder/SHA256SUMS listing the sha256 of every file under `folder`, but temp files of writes and what
    lies under the top-level names `leave_out` (about to be removed)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS and not _is_temp(p)
                   and p.relative_to(folder).parts[0] not in leave_out)
    atomic_write_text(folder / SUMS, "".join(f"{file_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files))


def _is_temp(p: Path) -> bool:
    return p.name.startswith(".") and p.name.endswith(".tmp")


def remove_temp_files(folder) -> None:
    """Delete the temp files that writes killed before their rename left under `folder` (SIGKILL runs no cleanup)."""
    for p in Path(folder).rglob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)


def check_sealed(folder, fix: str, names=None) -> None:
    """Check `names` (default: every file listed) against folder/SHA256SUMS, if the folder has one (folders written
    before it existed have none). A damaged or missing file is a UserError naming it and `fix`."""
    folder = Path(folder)
    sums = folder / SUMS
    if not sums.is_file():
        return
    listed = {}
    for line in sums.read_text(encoding="utf-8", errors="replace").splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise UserError(f"{sums} is damaged (a line is not '<sha256>  <file>'); {fix}")
        listed[name] = digest
    for name in listed if names is None else [n for n in names if n in listed]:
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path} is missing (listed in {sums}); {fix}")
        if file_sha256(path) != listed[name]:
            raise UserError(f"{path} is damaged (its sha256 differs from {sums}); {fix}")
