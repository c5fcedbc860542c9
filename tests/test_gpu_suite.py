"""benchmarks/gpu_suite.py --dry-run: the GPU suite's own code path at toy sizes on the CPU, so the one command
a lent GPU runs has not rotted by the time one is lent (issue 22)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_suite.py"

FLUX_ROWS = ["FLOPs per step (analytic)", "eager", "compile", "compile + fp8", "compile + triton bf16",
             "compile + triton int8", "compile + fbcache@T", "whole stack: compile + fp8 + triton int8 + fbcache@T"]
OVERHEAD_ROWS = ["eager + fbcache@0 (hook overhead)", "compile + fbcache@0 (hook overhead)",
                 "read-back: relative L1 with .item()", "read-back: relative L1 on the device only",
                 "read-back: cost per step"]
KERNEL_ROWS = [f"{shape}: {kernel}" for shape in ("FLUX.1 1024²", "Wan 2.1 1.3B 480p 81 frames")
               for kernel in ("ours bf16", "ours int8 QK", "torch SDPA flash", "torch SDPA efficient", "torch SDPA cuDNN")]
PARALLEL_ROWS = ["torchrun --nproc_per_node=1 (the distributed launch path)",
                 *[f"{gpus} GPUs {style} (projection, not measured)" for gpus in (2, 4, 8) for style in ("ulysses", "ring")]]
BUDGET_ROWS = ["set-up (imports, device, building the model)", "total wall time"]
ROWS = [(1, name) for name in FLUX_ROWS] + [(2, name) for name in OVERHEAD_ROWS] + [(3, name) for name in KERNEL_ROWS] \
    + [(5, name) for name in PARALLEL_ROWS] + [(6, name) for name in BUDGET_ROWS]
NO_FLOAT8 = "n/a on cpu: needs a CUDA GPU of compute capability >= 8.9"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite") / "out"
    done = subprocess.run([sys.executable, str(SUITE), "--dry-run", "--out", str(out)], cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    data = json.loads((out / "gpu_suite.json").read_text())
    return done.stdout, (out / "gpu_suite.md").read_text(), data, {row["measurement"]: row for row in data["rows"]}


def test_the_table_has_every_row_in_order_and_is_printed(dry_run):
    stdout, markdown, _, rows = dry_run
    table = [line for line in markdown.splitlines() if line.startswith("| ")][1:]  # less the header row
    assert [tuple(cell.strip() for cell in line.split(" | ")[:2]) for line in table] == \
        [(f"| {section}", name) for section, name in ROWS]
    assert markdown in stdout  # printed as written
    assert "Command (from the repository root): `python " in markdown and "--dry-run" in markdown
    assert "torch 2." in markdown and "(CUDA " in markdown


def test_the_json_holds_the_raw_numbers(dry_run):
    _, _, data, rows = dry_run
    assert set(data) == {"meta", "budget", "flux", "overhead", "readback", "attention", "parallel", "rows"}
    assert {"mode", "device", "versions", "date", "command", "sizes"} <= set(data["meta"])
    assert data["meta"]["mode"] == "dry-run"
    assert {"budget_s", "setup_s", "elapsed_s", "skipped"} <= set(data["budget"]) and data["budget"]["skipped"] == []
    variants = data["flux"]["variants"]
    assert set(variants) == set(FLUX_ROWS[1:]) | set(OVERHEAD_ROWS[:2])
    assert len(variants["eager"]["times_s"]) == 1  # the dry run's one round
    assert {"step", "linear", "attention", "cached_step"} <= set(data["flux"]["flops"])
    assert set(data["overhead"]) == {"eager", "compile"}
    assert {"with_item_s", "device_only_s", "cost_per_step_s", "step_s"} <= set(data["readback"])
    assert set(data["attention"]) == {"FLUX.1 1024²", "Wan 2.1 1.3B 480p 81 frames"}
    assert data["parallel"]["torchrun"]["exit_status"] == 0
    assert len(data["parallel"]["projection_not_measured"]) == 6
    assert [row["measurement"] for row in data["rows"]] == [name for _, name in ROWS]


def test_what_runs_on_the_cpu_is_measured(dry_run):
    _, _, data, rows = dry_run
    for name in ("eager", "compile", "compile + triton bf16", "compile + triton int8", "compile + fbcache@T",
                 *OVERHEAD_ROWS[:2]):
        assert rows[name]["result"].endswith("s per generation"), rows[name]
        assert "latents NOT finite" not in rows[name]["detail"]
    for name in OVERHEAD_ROWS[:2]:  # threshold 0 never caches: the uncached output bit for bit
        assert "bit-identical to " in rows[name]["detail"] and ": yes" in rows[name]["detail"], rows[name]
        assert "% over " in rows[name]["vs reference"]
    # the formula is torch's own count of the matmuls (its CPU attention kernel it does not count)
    assert "linear 1.0000" in rows["FLOPs per step (analytic)"]["vs reference"]
    assert "distances at 0); cached " in rows["compile + fbcache@T"]["detail"]
    assert data["flux"]["variants"]["compile + triton int8"]["stats"]["attention"]["kernel_calls"] > 0
    for name in ("ours bf16", "ours int8 QK"):  # in Triton's interpreter
        assert rows[f"FLUX.1 1024²: {name}"]["result"].endswith(" ms"), rows[f"FLUX.1 1024²: {name}"]
        assert "max abs error" in rows[f"FLUX.1 1024²: {name}"]["detail"]
    assert rows[PARALLEL_ROWS[0]]["result"] == "exit 0"
    assert "s per image" in rows[PARALLEL_ROWS[0]]["vs reference"]
    assert not [name for name, row in rows.items() if row["result"].startswith(("not reached", "skipped"))]


def test_what_needs_a_gpu_says_so_instead_of_crashing(dry_run):
    _, _, _, rows = dry_run
    assert rows["compile + fp8"]["result"] == NO_FLOAT8
    assert rows["whole stack: compile + fp8 + triton int8 + fbcache@T"]["result"] == NO_FLOAT8
    for name in ("torch SDPA efficient", "torch SDPA cuDNN"):
        assert rows[f"FLUX.1 1024²: {name}"]["result"].startswith("does not run: ")
    assert rows["eager"]["peak GPU memory"] == "n/a (cpu)" and "n/a, peak unknown" in rows["eager"]["MFU / TFLOP/s"]


def test_both_modes_plan_the_same_rows_and_an_output_folder_is_never_reused(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "gpu_suite.md").write_text("an earlier run")
    (tmp_path / "empty").mkdir()
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(SUITE.parent)!r})
        import gpu_suite as suite
        names = []
        for sizes in (suite.GPU_SIZES, suite.DRY_SIZES):
            report = suite.Report(Path("."), {{}})
            suite.plan_rows(report, sizes)
            names.append(list(report.rows))
        assert names[0] == names[1], names
        root = Path({str(tmp_path)!r})
        print(suite.output_folder(str(root / "taken")).name, suite.output_folder(str(root / "empty")).name,
              suite.output_folder(str(root / "new")).name)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["taken-1", "empty", "new"]
    assert (tmp_path / "taken" / "gpu_suite.md").read_text() == "an earlier run"
