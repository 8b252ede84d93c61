"""Where the portal keeps a large request body while it arrives: the mount table read right,
a memory file system found (systemd's runtime directory first), a private directory made the
process's temporary directory and removed at stop, and an operator told when there is none."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import tempfile

import pytest

from mailbridge.config import ConfigError
from mailbridge.web import body_buffers
from mailbridge.web.body_buffers import BodyBuffers, filesystem_type

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=1024k
40 27 0:30 / /srv/clinic\\040data rw,relatime shared:7 master:2 - xfs /dev/vdb rw
41 27 0:31 / /run rw,nosuid - tmpfs tmpfs rw,mode=755
42 41 0:32 / /run/media rw - vfat /dev/sdb1 rw
43 24 0:33 / /dev/shm rw,relatime - ext4 /dev/vdc rw
"""


@pytest.fixture
def mountinfo(tmp_path):
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    return str(path)


@pytest.mark.parametrize(("path", "kind"), [
    ("/var/lib/mailbridge", "ext4"),          # only the root file system holds it
    ("/run/mailbridge", "tmpfs"),
    ("/run/media/usb", "vfat"),                # the longest mount point wins
    ("/run/mediafiles", "tmpfs"),              # a prefix of the name is not a parent
    ("/srv/clinic data/uploads", "xfs"),       # spaces come octal-escaped
    ("/dev/shm/x", "ext4"),                    # a later mount on the same point hides one
])
def test_the_mount_table_says_which_file_system_holds_a_path(mountinfo, path, kind):
    assert filesystem_type(path, mountinfo) == kind


def test_no_mount_table_means_unknown(tmp_path):
    assert filesystem_type("/", str(tmp_path / "missing")) is None


def test_the_shared_memory_mount_here_is_recognised():
    if not os.path.isdir("/dev/shm"):  # noqa: S108
        pytest.skip("no /dev/shm on this system")
    assert filesystem_type("/dev/shm") == "tmpfs"  # noqa: S108


@pytest.fixture
def memory_dir():
    """A directory on this machine's tmpfs, standing in for systemd's RuntimeDirectory."""
    if not body_buffers.in_memory("/dev/shm"):  # noqa: S108
        pytest.skip("no memory file system at /dev/shm")
    path = tempfile.mkdtemp(prefix="mailbridge-test-", dir="/dev/shm")  # noqa: S108
    yield path
    os.rmdir(path)


def test_systemds_runtime_directory_is_taken_first_and_cleaned_up(memory_dir):
    before = tempfile.tempdir
    buffers = BodyBuffers("", {"RUNTIME_DIRECTORY": f"{memory_dir}:/elsewhere"})
    assert tempfile.tempdir == before  # chosen, not used yet: the portal has not started
    buffers.open()
    try:
        assert buffers.path is not None and str(buffers.path.parent) == os.path.realpath(memory_dir)
        assert stat.S_IMODE(buffers.path.stat().st_mode) == 0o700
        assert tempfile.gettempdir() == str(buffers.path)
        with tempfile.TemporaryFile() as spilled:  # what waitress does with a large body
            spilled.write(b"%PDF-1.4 signed plan of care")
    finally:
        buffers.close()
    assert tempfile.tempdir == before
    assert os.listdir(memory_dir) == []


def test_a_configured_directory_that_is_missing_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"\[web\] body_buffer_dir: .* is not a directory"):
        BodyBuffers(str(tmp_path / "missing"), {})


def test_a_configured_directory_that_cannot_be_written_names_the_key(tmp_path):
    """A read-only tmpfs: not writable even for root (as CI runs)."""
    locked = tmp_path / "read-only"
    locked.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(locked)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(ConfigError, match=r"\[web\] body_buffer_dir: .* not writable"):
            BodyBuffers(str(locked), {})
    finally:
        subprocess.run(["umount", str(locked)], check=False)


def test_a_configured_disk_directory_is_used_with_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    buffers = BodyBuffers(str(tmp_path), {})
    buffers.open()
    try:
        assert buffers.path is not None and buffers.path.parent == tmp_path
    finally:
        buffers.close()
    assert "[web] body_buffer_dir" in caplog.text and "not a memory file system" in caplog.text


def test_without_a_memory_file_system_the_operator_is_told(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(body_buffers, "SHARED_MEMORY", str(tmp_path / "no-shm"))
    before = tempfile.tempdir
    buffers = BodyBuffers("", {"RUNTIME_DIRECTORY": str(tmp_path)})  # a disk, not memory
    buffers.open()
    assert buffers.path is None and tempfile.tempdir == before
    assert "no memory file system found" in caplog.text
    assert "[web] body_buffer_dir" in caplog.text


def test_two_portals_in_one_process_leave_no_dangling_temporary_directory(memory_dir):
    before = tempfile.tempdir
    first = BodyBuffers("", {"RUNTIME_DIRECTORY": memory_dir})
    first.open()
    second = BodyBuffers("", {"RUNTIME_DIRECTORY": memory_dir})
    second.open()
    first.close()  # the second one's directory stays in use
    assert tempfile.gettempdir() == str(second.path)
    second.close()  # the first one's directory is gone: not back to it
    assert tempfile.tempdir in (before, None)
    with tempfile.TemporaryFile():
        pass
