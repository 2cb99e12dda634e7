"""A reader opened while a writer process appends sees only whole, committed episodes."""

import time

from episode_writer_child import assert_episode, spawn, wait_line

from dreamrt.episodes import open_store
from dreamrt.episodes.inspect import verify_store

LENGTH = 11


def test_reader_during_writes(tmp_path):
    path = tmp_path / "s.zarr"
    episodes = 12
    proc = spawn(
        {"path": str(path), "mode": "stream", "episodes": episodes, "length": LENGTH, "frame_sleep": 0.002}
    )
    try:
        wait_line(proc, "COMMITTED 1")
        store = open_store(path)
        seen = [store.num_episodes]
        checked = 0
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            store.refresh()
            fresh = open_store(path)  # a reader opened mid-write, too
            assert fresh.num_episodes >= store.num_episodes - 1
            seen.append(store.num_episodes)
            # every committed episode is complete and exact, including the newest
            for i in range(checked, store.num_episodes):
                assert_episode(store, i, LENGTH)
            checked = max(checked, store.num_episodes - 1)  # re-check the newest next time too
            assert store.num_frames == LENGTH * store.num_episodes
            assert store.stats["action"]["count"] == store.num_frames
            time.sleep(0.01)  # leave the 2 cores to the writer now and then
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "DONE" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert seen == sorted(seen) and len(set(seen)) > 3  # readers saw the store grow, never shrink
    store.refresh()
    assert store.num_episodes == episodes
    for i in range(episodes):
        assert_episode(store, i, LENGTH)
    assert verify_store(path)[0] == []
