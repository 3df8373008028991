"""The run folder's lock: one writer at a time, stale locks taken over, real second processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from keras_lean.pipeline.lock import LOCK_NAME, LockInfo, RunLockedError, lock_holder, run_lock

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from keras_lean.pipeline.lock import run_lock
    with run_lock(sys.argv[1], "finetune"):
        print("held", flush=True)
        sys.stdin.readline()  # until the test closes our stdin
    """
)


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/run's lock until the test ends."""
    folder = tmp_path / "run"
    folder.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield folder, proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_records_the_holder_and_is_removed_after(tmp_path):
    with run_lock(tmp_path, "finetune") as lock:
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert info["command"] == "finetune" and info["started_at"]
        assert lock.note is None
        assert lock_holder(tmp_path) == LockInfo(**info)
    assert not (tmp_path / LOCK_NAME).exists()
    assert lock_holder(tmp_path) is None


def test_a_second_process_is_refused_with_the_holders_pid(holder):
    folder, proc = holder
    with pytest.raises(RunLockedError, match=rf"in use by pid {proc.pid} on .*`finetune`"):
        with run_lock(folder, "finetune"):
            pass
    assert lock_holder(folder).pid == proc.pid  # the refusal left the holder's lock alone


def test_the_lock_is_free_again_when_the_holder_ends(holder):
    folder, proc = holder
    proc.stdin.close()
    proc.wait(timeout=30)
    with run_lock(folder, "finetune") as lock:
        assert lock_holder(folder).pid == os.getpid()
        assert lock.note is None  # released cleanly: nothing stale to take over


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path):
    pid = _dead_pid()
    stale = LockInfo(pid, socket.gethostname(), "2026-01-01T00:00:00+00:00", "finetune")
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale.__dict__))
    with run_lock(tmp_path, "finetune") as lock:
        assert lock.note is not None and f"pid {pid}" in lock.note and "stale" in lock.note
        assert lock_holder(tmp_path).pid == os.getpid()


def test_a_lock_file_from_another_host_is_refused(tmp_path):
    other = LockInfo(12345, "some-other-host", "2026-01-01T00:00:00+00:00", "finetune")
    (tmp_path / LOCK_NAME).write_text(json.dumps(other.__dict__))
    with pytest.raises(RunLockedError, match="pid 12345 on some-other-host"):
        with run_lock(tmp_path, "finetune"):
            pass


def test_nested_use_in_one_process_shares_the_lock(tmp_path):
    with run_lock(tmp_path, "run", create=True):
        with run_lock(tmp_path, "finetune"):
            assert lock_holder(tmp_path).command == "run"
        assert (tmp_path / LOCK_NAME).exists()  # the outer block still holds it
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with run_lock(tmp_path, "finetune"):
            raise RuntimeError("boom")
    with run_lock(tmp_path, "finetune") as lock:
        assert lock.note is None


@pytest.mark.parametrize(
    "text", ["", "{", '{"pid": "x"}', "[]"], ids=["empty", "partial", "bad-pid", "not-a-dict"]
)
def test_unreadable_lock_records_parse_to_none(text):
    assert LockInfo.parse(text) is None


def test_a_missing_folder_is_not_created_unless_asked(tmp_path):
    missing = tmp_path / "nope"
    with run_lock(missing, "finetune") as lock:
        assert lock.path == missing / LOCK_NAME and lock.note is None
    assert not missing.exists()  # the step itself says which step to run first
    with run_lock(missing, "run", create=True):
        assert lock_holder(missing).command == "run"
    assert missing.is_dir() and not (missing / LOCK_NAME).exists()
