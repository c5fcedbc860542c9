"""parallel=mesh on real processes (torchrun, gloo): Ulysses, Ring, both, and CFG parallel give the
single-process output within float32 reordering (1e-5: sharded attention sums its keys in another
order) and, with FBCache, the same hit map; collectives inside compiled blocks break no graph; a rank
that dies or stalls ends the job; only rank 0 writes. Every case runs once per process group
(tests/distributed_cases.py) to keep the suite's time down on 2 cores."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import accel
from accel.errors import ConfigError
from accel.families import FAMILIES

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5
# every sequence-parallel family's own case, then the cases of their own set-up (tests/distributed_cases.py)
TWO = [*(f"{name}_ulysses" for name, family in sorted(FAMILIES.items()) if family.adapter.sequence is not None),
       "flux_ring", "flux_ulysses_compiled", "flux_true_cfg", "sd35_ulysses_padded", "sd35_cfg_batched", "wan_cfg",
       "hunyuan_ring_masked"]
FOUR = ["flux_ulysses_ring", "flux_cfg_ulysses", "wan_ulysses_ring"]


def torchrun(processes: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--standalone", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_cases(tmp_path_factory, processes: int, cases: list[str]) -> dict:
    results = tmp_path_factory.mktemp(f"parallel{processes}") / "results.json"
    done = torchrun(processes, "tests/distributed_cases.py", str(results), *cases)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(results.read_text())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_cases(tmp_path_factory, 2, TWO)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return run_cases(tmp_path_factory, 4, FOUR)


def _same_distances(seen: list, reference: list) -> bool:
    """Every distance a rank's cache measured equals the single process's (sums over the whole sequence,
    reduced across the ranks, differ from one process's only in float32 summation order)."""
    return len(seen) == len(reference) and all(
        (a is None and b is None) or (a is not None and b is not None and abs(a - b) <= 1e-5 * (1 + abs(b)))
        for a, b in zip(seen, reference))


def _check_case(result: dict, name: str) -> None:
    for rank, seen in enumerate(result["ranks"]):
        assert seen["max_abs_diff"] <= TOLERANCE, (name, rank, seen)
        if seen["reference_hits"] is None:
            continue
        if seen["parallel"].get("cfg_branch_of_rank") is not None and not seen["parallel"]["batched"]:
            # separate-call CFG: each rank runs one branch from step 1 on; that branch's map is the reference's
            branch = seen["parallel"]["cfg_branch_of_rank"]
            assert seen["hits"][branch] == seen["reference_hits"][branch], (name, rank, seen)
            assert _same_distances(seen["diffs"][branch], seen["reference_diffs"][branch]), (name, rank, seen)
        else:
            assert seen["hits"] == seen["reference_hits"], (name, rank, seen)
            for mine, reference in zip(seen["diffs"], seen["reference_diffs"], strict=True):
                assert _same_distances(mine, reference), (name, rank, seen)


@pytest.mark.parametrize("name", TWO)
def test_two_processes_match_one(two_ranks, name):
    _check_case(two_ranks[name], name)


@pytest.mark.parametrize("name", FOUR)
def test_four_processes_ulysses_ring_and_cfg_match_one(four_ranks, name):
    _check_case(four_ranks[name], name)


def test_every_rank_decides_the_same_and_caching_happened(two_ranks):
    for name in ("flux_ulysses", "flux_ring", "hunyuan_ring_masked"):
        maps = [seen["hits"] for seen in two_ranks[name]["ranks"]]
        assert maps[0] == maps[1] and "H" in maps[0][0], (name, maps)


def test_collectives_inside_compiled_blocks_break_no_graph(two_ranks):
    assert all(seen["graph_breaks"] == 0 for seen in two_ranks["flux_ulysses_compiled"]["ranks"])


def test_tokens_that_do_not_divide_are_padded(two_ranks):
    # SD3's text is 77 CLIP + 256 T5 tokens: odd, so one padding token on the last rank, masked
    assert two_ranks["sd35_ulysses_padded"]["ranks"][0]["parallel"]["padded_tokens"] == 1


@pytest.mark.parametrize("how, expect", [("die", "exitcode  : 17"), ("stall", "Timed out waiting 5000ms")])
def test_a_rank_that_dies_or_stalls_ends_the_job(how, expect):
    start = time.monotonic()
    done = torchrun(2, "tests/distributed_cases.py", "-", f"{how}:1", timeout=300)
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert expect in done.stderr, done.stderr[-3000:]
    assert "Root Cause" in done.stderr  # torchrun names the rank that failed first
    assert elapsed < 120  # never a hang: the stalled rank sleeps 60 s past a 5 s timeout, loading included


@pytest.mark.slow
def test_torchrun_main_job_writes_once_from_rank_0_with_per_rank_timings(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           "-m", "accel", "recipe=flux_fbcache", "model=flux_tiny", "parallel=ulysses2", "steps=2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = list(tmp_path.glob("outputs/*/*/report.json"))
    assert len(reports) == 1 and done.stdout.count("accel: run folder") == 1
    report = json.loads(reports[0].read_text())
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    assert report["stats"]["parallel"]["degrees"] == {"cfg": 1, "ring": 1, "ulysses": 2}
    assert "ulysses 2 over 2 ranks" in done.stdout


def test_degrees_compose_from_the_command_line_on_any_recipe():
    cfg = accel.compose("flux_fbcache", ["parallel.ulysses=2", "parallel.ring=2"])
    assert (cfg.parallel.strategy, cfg.parallel.ulysses, cfg.parallel.ring) == ("mesh", 2, 2)
    assert accel.compose(None, ["parallel=ulysses2_ring2"]).parallel.ring == 2


@pytest.mark.parametrize("override, fragment", [
    ("parallel.ulysses=0", "parallel.ulysses=0 is not allowed"),
    ("parallel.backend=mpi", "parallel.backend='mpi' is not allowed"),
])
def test_bad_degrees_fail_at_compose(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        accel.compose(None, [override])


@pytest.mark.parametrize("overrides, fragment", [
    (["model=flux_tiny", "parallel=ulysses2"], "ulysses=2 = 2 processes, but 1 were launched"),
    (["model=flux_tiny", "parallel.ulysses=3", "parallel.cfg=1"], "ulysses=3 does not divide the model's 2 attention "
                                                                  "heads: use a ulysses degree among [1, 2]"),
    (["model=sdxl_tiny", "parallel=ring2"], "has no sequence parallelism"),
    # SDXL's UNet config has no head count: the doctor says what SDXL gets instead of failing on it
    (["model=sdxl_tiny", "parallel=ulysses2"], "sdxl's UNet2DConditionModel has no sequence parallelism"),
])
def test_the_doctor_refuses_meshes_that_cannot_work(overrides, fragment):
    from accel.doctor import diagnose

    problems = diagnose(accel.compose(None, overrides))
    assert any(fragment in p and p.startswith("parallel.") for p in problems), problems


def test_sharded_attention_with_a_kernel_that_bypasses_torchs_sdpa_is_refused_at_compose():
    with pytest.raises(ConfigError, match=r"^parallel=mesh cannot run with attention=diffusers: sharded attention "
                                          r"runs through torch's SDPA"):
        accel.compose(None, ["parallel=ulysses2", "attention=diffusers", "attention.backend=flash"])
    # diffusers' native backend calls torch's SDPA by its name: sharded attention takes it
    assert accel.compose(None, ["parallel=ulysses2", "attention=diffusers"]).attention.backend == "native"
