"""Local image files, opened one path component at a time beneath `InputPolicy.local_files_root`."""

from __future__ import annotations

import errno
import os
import stat
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from ..config import InputPolicy
from ..errors import ImageInputError
from .checks import check_encoded_size, preview

__all__ = [
    "file_url_to_path",
    "read_local_file",
]

# --------------------------------------------------------------------------
# Local files


def _files_root(policy: InputPolicy) -> tuple[Path, Path]:
    """The allowed folder as written (absolute) and with symlinks resolved."""
    if policy.local_files_root is None:  # InputPolicy refuses this; a model_construct()ed one may not
        raise ImageInputError(
            "Local image files need InputPolicy.local_files_root, the folder paths must lie in. "
            "Set it, e.g. InputPolicy(allow_local_files=True, local_files_root=\"/srv/images\")."
        )
    written = Path(os.path.abspath(policy.local_files_root))
    try:
        real = written.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise ImageInputError(
            f"InputPolicy.local_files_root ({str(written)!r}) does not exist. Set it to an existing folder."
        ) from exc
    if not real.is_dir():
        raise ImageInputError(
            f"InputPolicy.local_files_root ({str(written)!r}) is not a folder. Set it to a folder."
        )
    return written, real


_MAX_SYMLINKS = 40  # as Linux's own limit
_O_COMMON = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_O_FOLDER = _O_COMMON | getattr(os, "O_DIRECTORY", 0)
# O_NONBLOCK: opening a FIFO must not hang; O_NOCTTY: a terminal must not become ours.
_O_FILE = _O_COMMON | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)


def _below(path: Path, roots: tuple[Path, Path]) -> list[str] | None:
    """The components of absolute `path` below one of `roots`, or None when it is not under them."""
    for root in roots:
        if path.is_relative_to(root):
            return list(path.relative_to(root).parts)
    return None


def _outside(shown: str, root: Path, via_link: bool) -> ImageInputError:
    if via_link:
        return ImageInputError(
            f"The image path {shown!r} leads outside the allowed folder {str(root)!r} "
            "through a symlink. Give a path to a regular file inside the folder."
        )
    return ImageInputError(
        f"The image path {shown!r} lies outside the allowed folder {str(root)!r} "
        "(InputPolicy.local_files_root). Move the file into that folder or set local_files_root."
    )


def _readlink(name: str, folder_fd: int) -> str | None:
    """The target of the symlink `name` in `folder_fd`, or None if it is not a symlink (now)."""
    try:
        return os.readlink(name, dir_fd=folder_fd)
    except (OSError, ValueError):
        return None


def _open_error(shown: str, root: Path, exc: OSError) -> ImageInputError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return ImageInputError(
            f"The image file {shown!r} does not exist (looked in {str(root)!r}). Check the path."
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ImageInputError(
            f"Cannot open the image file {shown!r} ({exc.strerror}). Check its permissions."
        )
    return ImageInputError(f"The image path {shown!r} cannot be resolved ({exc.strerror}). Check the path.")


def _open_beneath(root_fd: int, parts: Sequence[str], shown: str, roots: tuple[Path, Path]) -> int:
    """A descriptor for the entry at `parts` beneath the open folder `root_fd`, never leaving it.

    Each component is opened relative to its parent's descriptor with
    `O_NOFOLLOW`, so a folder swapped for a symlink between two steps is seen
    rather than followed. A symlink met on the way is read and its target
    walked the same way: kept inside the root (an absolute target must name
    the root's path) it is followed, at most `_MAX_SYMLINKS` times; '..' never
    climbs above the root. Shortcut, stated: a folder already opened that is
    then moved out of the root by someone who can write outside it is still
    read from.
    """
    real_root = roots[1]
    folders: list[int] = []  # descriptors walked into, below the root
    pending = [p for p in reversed(parts) if p not in ("", ".")]
    links = 0
    try:
        while pending:
            name = pending.pop()
            here = folders[-1] if folders else root_fd
            if name == "..":
                if not folders:
                    raise _outside(shown, real_root, via_link=links > 0)
                os.close(folders.pop())
                continue
            try:
                fd = os.open(name, _O_FOLDER if pending else _O_FILE, dir_fd=here)
            except OSError as exc:
                target = _readlink(name, here)
                if target is None:
                    raise _open_error(shown, real_root, exc) from exc
                links += 1
                if links > _MAX_SYMLINKS:
                    raise ImageInputError(
                        f"The image path {shown!r} cannot be resolved (more than {_MAX_SYMLINKS} symlinks, "
                        "probably a loop). Check the path."
                    ) from exc
                steps = Path(target).parts
                if os.path.isabs(target):
                    below = _below(Path(target), roots)
                    if below is None:
                        raise _outside(shown, real_root, via_link=True) from exc
                    while folders:
                        os.close(folders.pop())
                    steps = tuple(below)
                pending.extend(p for p in reversed(steps) if p not in ("", "."))
                continue
            if not pending:
                return fd
            folders.append(fd)
        # The path names a folder (e.g. "sub/.."): its descriptor, for the caller to refuse.
        return os.dup(folders[-1] if folders else root_fd)
    finally:
        for fd in folders:
            os.close(fd)


def _read_fd(fd: int, shown: str, max_bytes: int) -> bytes:
    """At most `max_bytes` from `fd`, a regular file (checked on the descriptor itself)."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ImageInputError(f"{shown!r} is not a regular file. Give the path of an image file.")
    check_encoded_size(info.st_size, max_bytes)
    with os.fdopen(fd, "rb", closefd=False) as f:
        data = f.read(max_bytes + 1)  # the file may have grown since fstat
    check_encoded_size(len(data), max_bytes)
    return data


def read_local_file(path: str | os.PathLike[str], policy: InputPolicy | None = None) -> bytes:
    """The bytes of a local image file, under `policy`'s local-file rules.

    Refused unless `policy.allow_local_files`. Relative paths are taken from
    `policy.local_files_root` (required); absolute ones must lie in it. The
    file is opened one component at a time beneath the root folder's
    descriptor (`O_NOFOLLOW` on each), so swapping a folder for a symlink
    while we open cannot lead outside; symlinks that stay inside are followed.
    """
    policy = policy or InputPolicy()
    shown = os.fspath(path)
    if not policy.allow_local_files:
        raise ImageInputError(
            f"Reading images from local files is off by default, so {preview(shown)} was not read "
            "(a string is taken as a path when it is not a data URL, an http(s) URL or base64 image data). "
            "Pass the image as bytes or a PIL image, or set InputPolicy(allow_local_files=True, "
            "local_files_root=...)."
        )
    if os.open not in os.supports_dir_fd or not hasattr(os, "O_NOFOLLOW"):
        raise ImageInputError(
            "Reading local image files needs openat() and O_NOFOLLOW (Linux, macOS, BSD), which this "
            "platform lacks. Pass the image as bytes instead."
        )
    if "\x00" in shown:
        raise ImageInputError(f"The image path {shown!r} cannot be resolved (it holds a NUL byte). Check the path.")
    written_root, real_root = _files_root(policy)
    roots = (real_root, written_root)
    candidate = Path(shown) if os.path.isabs(shown) else written_root / shown
    # Lexical check first, so a missing file outside the root reads as "outside",
    # never "not found" (no probing of what exists elsewhere).
    lexical = Path(os.path.normpath(candidate))
    if _below(lexical, roots) is None:
        raise _outside(shown, real_root, via_link=False)
    # Walked as written ('..' included, physically); a path that only reaches the root through
    # '..' outside it is walked in its lexical form. Either way the walk cannot leave the root.
    parts = _below(candidate, roots) or _below(lexical, roots) or []
    root_fd = os.open(real_root, _O_FOLDER)
    try:
        fd = _open_beneath(root_fd, parts, shown, roots)
    finally:
        os.close(root_fd)
    try:
        return _read_fd(fd, shown, policy.max_image_bytes)
    finally:
        os.close(fd)


def file_url_to_path(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    if parsed.netloc not in ("", "localhost"):
        raise ImageInputError(
            f"The file URL {preview(url)} names a remote host ({parsed.netloc!r}). "
            "Use file:///absolute/path for a local file."
        )
    return urllib.request.url2pathname(parsed.path)
