"""Temporary names for atomic writes that end with the permissions the user's umask gives.

Every artifact is written to a temporary name beside its destination and renamed into place. The
rename keeps the temporary file's mode, and `tempfile.mkstemp` / `mkdtemp` create theirs private
(0600 / 0700) whatever the umask. Run folders are shared between people and CI, so the temporary
names made here get the mode a plain `open(path, "w")` / `os.mkdir(path)` would have given:
0666 / 0777 less the umask (0644 / 0755 with the usual 022).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = [
    "atomic_write_bytes",
    "default_mode",
    "give_default_modes",
    "temp_dir_beside",
    "temp_file_beside",
    "umask",
]


def umask() -> int:
    """The process' current umask, read without changing it where the OS allows."""
    try:  # Linux >= 4.7 shows it; reading it otherwise means setting it for an instant
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode a new file (or folder) gets under the current umask."""
    return (0o777 if directory else 0o666) & ~umask()


def temp_file_beside(path: Path, suffix: str = "") -> Path:
    """Creates an empty temporary file in `path`'s folder, with the umask's file mode."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, default_mode())
    return Path(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` through a temporary file in the same folder and a rename.

    Args:
        path: destination file.
        data: the bytes to write.

    Returns:
        The destination as a `Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def temp_dir_beside(path: Path, suffix: str = ".tmp") -> Path:
    """Creates a temporary folder in `path`'s folder, with the umask's folder mode."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))
    os.chmod(tmp, default_mode(directory=True))
    return tmp


def give_default_modes(root: Path) -> None:
    """Gives `root` and everything under it the umask's modes (executable files keep x bits).

    For trees written by tools that pick their own modes (TensorFlow creates SavedModel folders
    0755 whatever the umask).
    """
    file_mode, dir_mode = default_mode(), default_mode(directory=True)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, dir_mode)
        else:
            executable = path.stat().st_mode & 0o111
            os.chmod(path, file_mode | (executable & dir_mode))
