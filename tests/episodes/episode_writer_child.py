"""A writer process for the crash and concurrency tests (run as a script, killed with SIGKILL).

Every frame's content is a function of (episode, frame) so a test can check any committed
row without keeping a copy. The process prints progress lines on stdout (flushed at once);
the test waits for a line, then kills it.

Usage: python episode_writer_child.py SPEC_JSON
  spec: {"path", "mode", "episodes", "length", "partial", "create", "frame_sleep", "hang_at"}
  modes:
    hang_mid_episode  commit `episodes` episodes, add `partial` frames, print READY, sleep
    hang_in_flush     like hang_mid_episode, but sleep inside flush number `hang_at` of the
                      partial episode after its first array is written (prints IN_FLUSH)
    hang_in_commit    commit `episodes`, then hang in the next end_episode after meta/episode_ends
                      is appended and before the commit record is replaced (prints IN_COMMIT)
    hang_after_commit like hang_in_commit, but after the commit record, before stats/info
    stream            write `episodes` episodes, printing COMMITTED <n> after each, sleeping
                      `frame_sleep` s per frame
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dreamrt.episodes import writer as writer_module
from dreamrt.episodes.format import COMMIT_FILE
from dreamrt.episodes.writer import EpisodeWriter, create_store, open_writer

FEATURES = {
    "observation.state": {"dtype": "float32", "shape": [3]},
    "observation.images.cam": {"dtype": "uint8", "shape": [8, 8, 3]},
    "action": {"dtype": "float32", "shape": [2]},
}
CHUNK = 4  # image chunk and flush size: many flushes in short episodes
FLUSH = 8


def make_frame(episode: int, t: int) -> dict[str, np.ndarray]:
    return {
        "observation.state": np.array([episode, t, episode * 1000 + t], np.float32),
        "observation.images.cam": np.full((8, 8, 3), (episode * 31 + t) % 256, np.uint8),
        "action": np.array([t * 0.5, -episode], np.float32),
    }


def task_of(episode: int) -> str:
    return f"task {episode % 3}"


def say(line: str) -> None:
    print(line, flush=True)


def hang() -> None:
    while True:
        time.sleep(1)


def main() -> None:
    spec = json.loads(sys.argv[1])
    mode = spec["mode"]
    if spec.get("create", True):
        w = create_store(
            spec["path"], FEATURES, fps=10, chunk_frames=CHUNK, lowdim_chunk_frames=16, flush_frames=FLUSH
        )
    else:
        w = open_writer(spec["path"], flush_frames=FLUSH)
    first = w.num_episodes
    n_full = spec.get("episodes", 2)
    length = spec.get("length", 13)
    for e in range(first, first + (n_full if mode != "stream" else 0)):
        for t in range(length):
            w.add_frame(make_frame(e, t), task_of(e))
        w.end_episode()
    e = w.num_episodes

    if mode in ("hang_mid_episode", "hang_in_flush"):
        if mode == "hang_in_flush":
            original = EpisodeWriter._write_rows
            keys_written = {"n": 0}

            def slow_write_rows(self, key, arr, start, rows):
                original(self, key, arr, start, rows)
                keys_written["n"] += 1
                if keys_written["n"] == 1 + spec["hang_at"] * len(self._arrays):
                    say(f"IN_FLUSH {self._flushed}")
                    hang()

            EpisodeWriter._write_rows = slow_write_rows
        for t in range(spec["partial"]):
            w.add_frame(make_frame(e, t), task_of(e))
        say(f"READY {w._flushed}")
        hang()

    if mode in ("hang_in_commit", "hang_after_commit"):
        if mode == "hang_in_commit":
            original_write = writer_module.write_json_atomic

            def stalled_write(path, obj, fsync=False):
                if path.name == COMMIT_FILE.split("/")[-1]:
                    say("IN_COMMIT")
                    hang()
                original_write(path, obj, fsync)

            writer_module.write_json_atomic = stalled_write
        else:

            def stalled_derived(self):
                say("IN_DERIVED")
                hang()

            EpisodeWriter._write_derived = stalled_derived
        for t in range(length):
            w.add_frame(make_frame(e, t), task_of(e))
        w.end_episode()
        raise AssertionError("should have hung")

    if mode == "stream":
        sleep = spec.get("frame_sleep", 0.0)
        for e in range(first, first + n_full):
            for t in range(length):
                w.add_frame(make_frame(e, t), task_of(e))
                if sleep:
                    time.sleep(sleep)
            w.end_episode()
            say(f"COMMITTED {w.num_episodes}")
        w.close()
        say("DONE")


# ---------------------------------------------------------------- helpers for the tests


def spawn(spec: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_line(proc: subprocess.Popen, prefix: str, timeout: float = 60.0) -> str:
    """Block until the child prints a line starting with ``prefix``; fail if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) before {prefix!r}: {proc.stderr.read()}")
    raise AssertionError(f"child did not print {prefix!r} within {timeout} s")


def sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    proc.stdout.close()
    proc.stderr.close()


def assert_episode(store, index: int, length: int) -> None:
    """Committed episode ``index`` holds exactly make_frame(index, t) for t < length."""
    ep = store.get_episode(index)
    assert ep.length == length, (index, ep.length, length)
    want = [make_frame(index, t) for t in range(length)]
    for key in FEATURES:
        np.testing.assert_array_equal(ep[key], np.stack([w[key] for w in want]), err_msg=f"{key} ep {index}")
    np.testing.assert_array_equal(ep["frame_index"], np.arange(length))
    np.testing.assert_array_equal(ep["episode_index"], np.full(length, index))
    assert ep.tasks == [task_of(index)]


if __name__ == "__main__":
    main()
