"""Where the portal's web server keeps a request body too large for its memory buffer (a
document sent back): a private directory on a memory file system, so no disk holds it in clear.

waitress copies a request body over 512 KB into a temporary file until the request is
complete, and names no directory: Python's temporary directory decides. `serve` points that at
a directory of its own, created here and removed at stop."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from mailbridge.config import ConfigError

log = logging.getLogger(__name__)

KEY = "[web] body_buffer_dir"
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
# Looked at in this order when the key is not set: systemd's RuntimeDirectory= (a tmpfs under
# /run, private to the service), then the shared-memory file system most Linux systems mount.
SHARED_MEMORY = "/dev/shm"  # noqa: S108 - a memory file system, checked before use


def filesystem_type(path: str | os.PathLike, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The type of the file system `path` is on ("tmpfs", "ext4", ...), from the kernel's
    mount table; None where there is none to read (not Linux)."""
    target = os.path.realpath(path)
    best, kind = "", None
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        # "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue":
        # the mount point is the fifth field; the type follows the lone "-".
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        mount_point = _unescape(fields[4])
        here = fields[fields.index("-", 6) + 1]
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, kind = mount_point, here
    return kind


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in mount points as octal escapes.
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def in_memory(path: str | os.PathLike) -> bool:
    return filesystem_type(path) in MEMORY_FILESYSTEMS


def _found(environ: Mapping[str, str]) -> list[str]:
    """Where to look when the key is not set, in order."""
    runtime_dirs = environ.get("RUNTIME_DIRECTORY", "")
    return [*([runtime_dirs.split(":")[0]] if runtime_dirs else []), SHARED_MEMORY]


def _usable(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


class BodyBuffers:
    """The directory, made the process's temporary directory while the portal runs: chosen
    (and a wrong setting refused) when the service is built, created when the portal starts,
    removed when it stops."""

    def __init__(self, configured: str, environ: Mapping[str, str]) -> None:
        self.base: str | None = None
        self.path: Path | None = None
        self._previous: str | None = None
        if configured:
            if not os.path.isdir(configured):
                raise ConfigError(f"{KEY}: {configured} is not a directory")
            if not _usable(configured):
                raise ConfigError(f"{KEY}: {configured} is not writable by this user")
            if not in_memory(configured):
                log.warning("%s: %s is not a memory file system: a request body over 512 KB "
                            "(documents sent back) is written there in clear while it "
                            "arrives; it should be a tmpfs or on an encrypted disk",
                            KEY, configured)
            self.base = configured
            return
        self.base = next((base for base in _found(environ)
                          if _usable(base) and in_memory(base)), None)
        if self.base is None:
            log.warning("%s: no memory file system found (tried %s): a request body over "
                        "512 KB (documents sent back) is held in a temporary file on disk "
                        "while it arrives; set the key to a tmpfs directory",
                        KEY, ", ".join(_found(environ)))

    def open(self) -> None:
        if self.base is None or self.path is not None:
            return
        try:
            self.path = Path(tempfile.mkdtemp(prefix="mailbridge-bodies-", dir=self.base))
        except OSError as exc:
            raise ConfigError(f"{KEY}: cannot create a directory in {self.base} "
                              f"({exc.strerror or type(exc).__name__})") from None
        self._previous = tempfile.tempdir
        tempfile.tempdir = str(self.path)  # mkdtemp made it 0700

    def close(self) -> None:
        """The process's temporary directory as it was; the directory removed."""
        if self.path is None:
            return
        if tempfile.tempdir == str(self.path):
            # Another portal's directory, stopped meanwhile, is no place to go back to.
            previous = self._previous
            tempfile.tempdir = previous if previous is None or os.path.isdir(previous) else None
        shutil.rmtree(self.path, ignore_errors=True)
        self.path = None
