"""Run folders are claimed atomically: processes racing for one folder each get their own, and a folder
that holds something is never written into."""
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from accel.cli import claim_folder
from accel.errors import AccelError

RACERS = 8


def _race(target: str, barrier, results) -> None:
    barrier.wait()
    folder = claim_folder(Path(target))
    time.sleep(0.5)  # a run writes its first file a while after it claimed its folder
    (folder / f"{os.getpid()}.txt").write_text("mine")
    results.put(str(folder))


def test_processes_racing_for_one_folder_each_get_their_own(tmp_path):
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(RACERS), context.Queue()
    target = tmp_path / "run"
    target.mkdir()  # an empty folder is free, but to one claimant only
    racers = [context.Process(target=_race, args=(str(target), barrier, results)) for _ in range(RACERS)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=60)
    claimed = [results.get(timeout=5) for _ in racers]
    assert len(set(claimed)) == RACERS
    for folder in claimed:
        assert len(list(Path(folder).glob("*.txt"))) == 1  # its claimant's file alone


def test_a_folder_that_holds_something_is_never_claimed(tmp_path):
    held = tmp_path / "run"
    held.mkdir()
    (held / "notes.txt").write_text("someone's")
    assert claim_folder(held) == tmp_path / "run.1"
    assert claim_folder(held) == tmp_path / "run.2"
    assert sorted(p.name for p in held.iterdir()) == ["notes.txt"]


def test_a_folder_that_cannot_be_made_is_one_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(AccelError, match=r"^cannot create the run folder .*a-file/run: Not a directory; set "
                                         r"hydra.run.dir"):
        claim_folder(blocker / "run")
