"""A process SIGKILLed in the middle of writing a checkpoint leaves the last good one intact.

A real subprocess (adaptation_kill_child.py) adapts a tiny model and checkpoints every round into one
folder. The test polls that folder for the temporary file of a checkpoint being written
(`.robot@N.pt.XXXX.tmp`), kills the child with SIGKILL at once or a few milliseconds later, and then
checks what a restarted node would read: latest.json parses and names a file that loads and passes its
sha256 check, and every visible checkpoint is whole. A temporary file still there after the kill proves
the kill landed mid-write; that must happen at least once. Each run resumes from what the last left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hiera_perception.adaptation import Adapter
from hiera_perception.checkpoint import load_checkpoint, load_model

HERE = Path(__file__).resolve().parent
CHILD = HERE / "adaptation_kill_child.py"
DELAYS_S = (0.0, 0.002, 0.01)  # from seeing the temp file to the kill
RETRIES = 3  # more immediate kills, only if none of the above landed mid-write (a very fast disk)


def temp_files(folder: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(folder) if e.name.startswith(".robot@") and e.name.endswith(".tmp")}
    except FileNotFoundError:
        return set()


def wait_for_write(folder: Path, proc: subprocess.Popen, old: set[str], timeout_s: float = 120.0) -> str:
    """Poll until a new checkpoint temp file appears while a good version (latest.json) exists."""
    latest = folder / "latest.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if latest.exists():
            new = temp_files(folder) - old
            if new:
                return new.pop()
        if proc.poll() is not None:
            raise AssertionError(f"the child died on its own (rc {proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.0005)  # a 5 MB write + fsync lasts milliseconds; finer polling only steals the child's CPU
    raise AssertionError("no checkpoint write seen within the timeout")


def check_folder(folder: Path) -> int:
    """What a restart reads must be whole: returns the version latest.json names."""
    record = json.loads((folder / "latest.json").read_text())
    path = Adapter.latest(folder)
    assert path is not None and path.name == record["file"], record
    ck = load_checkpoint(path)  # raises on a sha256 mismatch or a truncated file
    assert ck.version == record["version"] and ck.model_id == "robot"
    model = load_model(path, device="cpu")
    assert model.version == record["version"]
    for p in folder.glob("robot@*.pt"):  # no visible checkpoint is ever half written
        load_checkpoint(p)
    return record["version"]


def test_sigkill_while_writing_a_checkpoint(tmp_path):
    out = tmp_path / "versions"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    mid_write = 0
    last_version = 0
    for attempt, delay in enumerate(DELAYS_S + (0.0,) * RETRIES):
        if attempt >= len(DELAYS_S) and mid_write:
            break
        before = temp_files(out)
        proc = subprocess.Popen([sys.executable, str(CHILD), str(out), str(attempt)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            seen = wait_for_write(out, proc, before)
            if delay:
                time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        left = temp_files(out) - before
        assert left <= {seen}, left  # at most the one write that was cut off
        mid_write += bool(left)
        version = check_folder(out)
        assert version >= max(last_version, 1)  # resumed, never went back
        last_version = version
    assert mid_write >= 1, "no kill landed in the middle of a checkpoint write"
