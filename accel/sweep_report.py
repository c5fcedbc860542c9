"""The summary a sweep (`python -m accel -m ...`) ends with, in its sweep folder.

`summary.md` and `summary.csv` (a row per job: overrides, status, times, speedup, hits, quality),
`tradeoff.png` (speedup against quality, the Pareto front marked), `grid.png` (every job's first
output, labelled with its settings and times), `hitmap.png` (steps × jobs, cached steps dark) and
`index.html`, which shows them all. Jobs are read back from their folders' report.json; a job that
failed is a row saying where it stopped, and the others still report.
"""
from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from hydra.experimental.callback import Callback

@dataclass
class Job:
    """One job of a sweep, as its folder (or its failure before it had one) tells it."""

    num: int
    overrides: list[str]
    report: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None  # why it failed, when it did
    folder: Optional[Path] = None

    @property
    def failed(self) -> bool:
        return self.error is not None or "failed_at" in self.report

    def swept(self, keys: list[str]) -> list[str]:
        """Its overrides of `keys` (those the sweep varies), or all of them."""
        return [o for o in self.overrides if o.partition("=")[0] in keys] or self.overrides

    def settings(self, keys: list[str]) -> str:
        return " ".join(self.swept(keys))

    def why(self) -> str:
        if "failed_at" in self.report:
            return f"stopped during {self.report['failed_at']}: {self.report.get('error', '')}"
        return self.error or ""

    def per_image_s(self) -> Optional[float]:
        return self.report.get("timings", {}).get("accelerated", {}).get("per_image_s")

    def baseline(self) -> dict:
        return self.report.get("baseline", {})

    def quality(self, name: str) -> Optional[float]:
        value = self.baseline().get("quality", {}).get(name)
        return math.inf if value == "inf" else value

    def cache(self) -> dict:
        return self.report.get("stats", {}).get("cache", {})

    def first_output(self, stem: str) -> Optional[Path]:
        """Its first saved output named `stem` (image, or baseline under compare), if any."""
        outputs = [o for o in self.report.get("outputs", []) if o.startswith(f"{stem}_")]
        return self.folder / outputs[0] if outputs and self.folder else None


def collect(sweep_dir: Path, failures: dict[int, tuple[list[str], str]]) -> list[Job]:
    """Every job of the sweep: those with a folder (report.json, .hydra/overrides.yaml) and those
    that failed before they had one (`failures`: job number → (overrides, error))."""
    jobs = {num: Job(num, overrides, error=error) for num, (overrides, error) in failures.items()}
    for folder in sweep_dir.iterdir():
        if not (folder.is_dir() and folder.name.isdigit()):
            continue
        num = int(folder.name)
        overrides_file = folder / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        job = jobs.setdefault(num, Job(num, overrides or []))
        job.folder = folder
        if (folder / "report.json").exists():
            job.report = json.loads((folder / "report.json").read_text())
        elif job.error is None:
            job.error = "no report.json: the job stopped before it wrote one"
    return [jobs[num] for num in sorted(jobs)]


COLUMNS = ("job", "settings", "status", "per_image_s", "baseline_s", "speedup", "measurable", "computed", "cached",
           "psnr_db", "ssim", "task_accuracy", "stopped")


def rows(jobs: list[Job]) -> list[dict[str, Any]]:
    """A row per job; `settings` are its overrides of the keys the sweep varies."""
    keys = _varying(jobs)
    table = []
    for job in jobs:
        cache, base = job.cache(), job.baseline()
        table.append({
            "job": job.num, "settings": job.settings(keys), "status": "failed" if job.failed else "ok",
            "per_image_s": job.per_image_s(), "baseline_s": base.get("timings", {}).get("per_image_s"),
            "speedup": base.get("speedup"), "measurable": base.get("measurable"),
            "computed": cache.get("computed"), "cached": cache.get("cached"),
            "psnr_db": job.quality("psnr"), "ssim": job.quality("ssim"),
            "task_accuracy": job.quality("task_accuracy"), "stopped": job.why(),
        })
    return table


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


def common_overrides(jobs: list[Job]) -> str:
    """The overrides every job shares (the table's rows show the rest)."""
    shared = set(jobs[0].overrides).intersection(*(j.overrides for j in jobs[1:])) if jobs else set()
    return " ".join(o for o in jobs[0].overrides if o in shared) if jobs else ""


def write_tables(table: list[dict], sweep_dir: Path, common: str) -> None:
    with open(sweep_dir / "summary.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in table)
    lines = [f"Every job: `{common}`", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in table:
        cells = [_cell(row[c]).replace("|", "\\|") for c in COLUMNS]
        if row["status"] == "failed":
            cells[2] = "**FAILED**"
        if row["measurable"] is False:
            cells[COLUMNS.index("speedup")] += " (no measurable difference)"
        lines.append("| " + " | ".join(cells) + " |")
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (both larger is better), by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i][0])


def _plotting():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _compared(jobs: list[Job]) -> list[Job]:
    return [j for j in jobs if not j.failed and j.baseline().get("speedup") is not None
            and j.quality("psnr") is not None]


def _point(job: Job, ceiling: float) -> tuple[float, float]:
    return job.baseline()["speedup"], min(job.quality("psnr"), ceiling)


def front_of(jobs: list[Job], ceiling: float = math.inf) -> list[Job]:
    """The jobs on the Pareto front of speedup against PSNR, by speedup. A speedup whose timing ranges
    overlap the baseline's is noise, not a speedup: such a job is never on the front."""
    real = [j for j in _compared(jobs) if j.baseline().get("measurable", True)]
    return [real[i] for i in pareto_front([_point(j, ceiling) for j in real])]


def plot_tradeoff(jobs: list[Job], path: Path) -> Optional[str]:
    """Speedup against PSNR, the Pareto front joined. Returns why there is no plot, when there is none."""
    measured = _compared(jobs)
    if not measured:
        return "no job compared against its baseline: sweep with compare=true for speed against quality"
    plt = _plotting()
    finite = [j.quality("psnr") for j in measured if math.isfinite(j.quality("psnr"))]
    ceiling = (max(finite) if finite else 40.0) + 5  # identical outputs (inf dB) are drawn above the rest
    points = [_point(j, ceiling) for j in measured]
    noise = [p for j, p in zip(measured, points) if not j.baseline().get("measurable", True)]
    real = [p for j, p in zip(measured, points) if j.baseline().get("measurable", True)]
    figure, axes = plt.subplots(figsize=(7, 5))
    axes.scatter([p[0] for p in real], [p[1] for p in real], color="tab:blue", zorder=2)
    if noise:
        axes.scatter([p[0] for p in noise], [p[1] for p in noise], facecolors="none", edgecolors="grey", zorder=2,
                     label="no measurable difference (timing ranges overlap)")
    front = [_point(j, ceiling) for j in front_of(jobs, ceiling)]
    axes.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", marker="o",
              markerfacecolor="none", markersize=11, zorder=1, label="Pareto front")
    for job, (x, y) in zip(measured, points):
        axes.annotate(f"#{job.num}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if any(math.isinf(j.quality("psnr")) for j in measured):
        axes.axhline(ceiling, color="grey", linestyle=":", linewidth=1, label="identical to baseline (inf dB)")
    axes.set_xlabel("speedup over the baseline (median of interleaved rounds)")
    axes.set_ylabel("PSNR against the baseline (dB)")
    axes.set_title("speed against quality; the labels are job numbers (summary.md)")
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


def _load_image(path: Optional[Path]):
    """An output's pixels (a GIF's first frame), or None."""
    if path is None or not path.exists():
        return None
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _varying(jobs: list[Job]) -> list[str]:
    """The override keys whose values differ between jobs, in the order first seen."""
    values: dict[str, set] = {}
    for job in jobs:
        for override in job.overrides:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    return [key for key, seen in values.items() if len(seen) > 1]


def _value(job: Job, key: str) -> str:
    return next((o.partition("=")[2] for o in job.overrides if o.partition("=")[0] == key), "")


def _caption(job: Job, keys: list[str]) -> str:
    """Job number, its swept settings (last part of each key, wrapped), time, speedup and PSNR."""
    import textwrap

    settings = " ".join(f"{o.partition('=')[0].rsplit('.', 1)[-1]}={o.partition('=')[2]}" for o in job.swept(keys))
    settings = "\n".join(textwrap.wrap(settings, 34))
    if job.failed:
        return f"#{job.num} {settings}\nFAILED ({job.report.get('failed_at', 'compose')})"
    speed = f"{job.per_image_s():.3g} s"
    if job.baseline().get("speedup") is not None:
        speed += f", {job.baseline()['speedup']:.2f}x"
    psnr = job.quality("psnr")
    quality = "" if psnr is None else ("  inf dB" if math.isinf(psnr) else f"  {psnr:.1f} dB")
    return f"#{job.num} {settings}\n{speed}{quality}"


def plot_grid(jobs: list[Job], path: Path) -> None:
    """Every job's first output: a rows × columns grid over the first two swept keys when the
    sweep varies exactly two, else a row per five jobs; the baseline first when there is one."""
    plt = _plotting()
    keys = _varying(jobs)
    if len(keys) == 2:
        rows_of = sorted({_value(j, keys[0]) for j in jobs}, key=_sortable)
        columns_of = sorted({_value(j, keys[1]) for j in jobs}, key=_sortable)
        place = {j.num: (rows_of.index(_value(j, keys[0])), columns_of.index(_value(j, keys[1]))) for j in jobs}
        n_rows, n_columns = len(rows_of), len(columns_of)
    else:
        n_columns = min(5, len(jobs))
        n_rows = math.ceil(len(jobs) / n_columns)
        place = {j.num: divmod(i, n_columns) for i, j in enumerate(jobs)}
    baseline = next(filter(None, (j.first_output("baseline") for j in jobs)), None)
    offset = 1 if baseline is not None else 0
    figure, axes = plt.subplots(n_rows, n_columns + offset, squeeze=False,
                                figsize=(2.6 * (n_columns + offset), 2.9 * n_rows))
    for ax in axes.flat:
        ax.axis("off")
    if baseline is not None:
        axes[0][0].imshow(_load_image(baseline))
        axes[0][0].set_title("baseline", fontsize=8)
    for job in jobs:
        row, column = place[job.num]
        ax = axes[row][column + offset]
        pixels = None if job.failed else _load_image(job.first_output("image"))
        if pixels is None:
            ax.text(0.5, 0.5, "failed" if job.failed else "no image", ha="center", va="center", color="tab:red")
        else:
            ax.imshow(pixels)
        ax.set_title(_caption(job, keys), fontsize=7, color="tab:red" if job.failed else "black")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _sortable(value: str):
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def plot_hitmap(jobs: list[Job], path: Path) -> Optional[str]:
    """Which steps each job computed (light) and took from the cache (dark), a row per job and branch."""
    keys = _varying(jobs)
    labelled = [(f"#{j.num} {j.settings(keys)}" + (f" [branch {b}]" if len(j.cache()['hit_map']) > 1 else ""),
                 line) for j in jobs if not j.failed and j.cache().get("hit_map")
                for b, line in enumerate(j.cache()["hit_map"])]
    if not labelled:
        return "no job used a block cache"
    import numpy as np

    plt = _plotting()
    width = max(len(line) for _, line in labelled)
    grid = np.full((len(labelled), width), np.nan)
    for row, (_, line) in enumerate(labelled):
        grid[row, :len(line)] = [1.0 if c == "H" else 0.0 for c in line]
    from matplotlib.colors import ListedColormap

    figure, axes = plt.subplots(figsize=(max(6, 0.25 * width + 4), 0.35 * len(labelled) + 1.2))
    axes.imshow(grid, cmap=ListedColormap(["#cfe0f3", "#1f3b57"]), vmin=0, vmax=1, aspect="auto",
                interpolation="nearest")
    axes.set_xticks(np.arange(-0.5, width), minor=True)
    axes.set_yticks(np.arange(-0.5, len(labelled)), minor=True)
    axes.grid(which="minor", color="white", linewidth=1)
    axes.tick_params(which="minor", length=0)
    axes.set_yticks(range(len(labelled)), [label for label, _ in labelled], fontsize=7)
    axes.set_xlabel("denoising step (dark: cached, light: computed)")
    axes.set_xticks(range(0, width, max(1, width // 14)))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def write_index(sweep_dir: Path, table: list[dict], common: str, missing: dict[str, str]) -> None:
    header = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr{}>{}</tr>".format(' class="failed"' if row["status"] == "failed" else "",
                               "".join(f"<td>{html.escape(_cell(row[c]))}</td>" for c in COLUMNS))
        for row in table)
    pictures = "".join(
        f"<h2>{html.escape(title)}</h2>" + (f"<p>{html.escape(missing[name])}</p>" if name in missing
                                            else f'<img src="{name}" alt="{html.escape(title)}">')
        for name, title in (("tradeoff.png", "Speed against quality"), ("grid.png", "Outputs"),
                            ("hitmap.png", "Cache hits per step")))
    failed = sum(row["status"] == "failed" for row in table)
    (sweep_dir / "index.html").write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>accel sweep {html.escape(sweep_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:90%}}
td,th{{border:1px solid #ccc;padding:3px 6px}} tr.failed td{{background:#fdd}} img{{max-width:100%}}</style>
</head><body><h1>Sweep {html.escape(str(sweep_dir))}</h1>
<p>{len(table)} jobs, {failed} failed. The table as <a href="summary.csv">CSV</a> and
<a href="summary.md">markdown</a>; each job's folder holds its report.json and images.
Every job: <code>{html.escape(common)}</code></p>
<table><tr>{header}</tr>{body}</table>{pictures}</body></html>
""")


def read_failures(sweep_dir: Path) -> dict[int, tuple[list[str], str]]:
    """The failed jobs accel's sweeper wrote down (hydra_plugins/accel_sweep.py): number -> (overrides, why)."""
    path = sweep_dir / "failed_jobs.json"
    if not path.exists():
        return {}
    return {f["num"]: (f["overrides"], f["error"]) for f in json.loads(path.read_text()) if f["num"] is not None}


def write(sweep_dir: Path, failures: dict[int, tuple[list[str], str]]) -> list[Job]:
    """Write the whole summary into `sweep_dir`; returns the jobs it read."""
    jobs = collect(sweep_dir, failures)
    table, common = rows(jobs), common_overrides(jobs)
    write_tables(table, sweep_dir, common)
    missing = {}
    for name, why in (("tradeoff.png", plot_tradeoff(jobs, sweep_dir / "tradeoff.png")),
                      ("hitmap.png", plot_hitmap(jobs, sweep_dir / "hitmap.png"))):
        if why:
            missing[name] = why
    if any(not j.failed for j in jobs):
        plot_grid(jobs, sweep_dir / "grid.png")
    else:
        missing["grid.png"] = "every job failed"
    write_index(sweep_dir, table, common, missing)
    return jobs


class SweepReport(Callback):
    """Hydra callback: at the end of a multirun, the summary above (a failure here is one line, not
    a lost sweep: every job's own folder is already written)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        try:
            jobs = write(sweep_dir, read_failures(sweep_dir))
        except Exception as err:  # noqa: BLE001  the jobs' results are already safe in their folders
            print(f"accel: the sweep summary could not be written: {type(err).__name__}: {err}")
            return
        print(f"accel: sweep summary of {len(jobs)} jobs: {sweep_dir / 'index.html'} (and summary.md, summary.csv)")
