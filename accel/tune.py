"""`python -m accel.tune recipe=NAME [overrides] target.min_psnr=35 [tune.trials=24 ...]`: the fastest
cache setting that meets a quality target (or the best quality at a speed target), found with Optuna.

Targets, exactly one:
  target.min_psnr=DB     every prompt's output at least DB of PSNR against the uncached baseline's, as fast as possible
  target.accuracy=A      toy task accuracy (model=flux_toy) at least A, as fast as possible
  target.speedup=X       at least X times faster than the baseline, with the best worst-prompt PSNR

The search (Optuna's TPE sampler, seeded) covers the cache kind (tune.kinds), its threshold, Fn/Bn
for mbcache and Taylor forecasting (tune.forecast), each trial's quality measured over a few prompts
against the baseline of the same seed. Trials are ranked by the block evaluations they save, which is
exact, where a trial's seconds on a busy machine can make a setting that caches nothing look faster
than one that does; the chosen setting is then timed against the baseline in interleaved rounds, and
written as a ready recipe whose header holds the evidence. A target no setting meets (or a speed
target the measured time misses) writes the best found, says so, and exits with code 3.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import statistics
import sys
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from accel import metrics, registry
from accel import report as reports
from accel.api import apply, load_pipeline
from accel.cli import claim_folder
from accel.config import compose
from accel.doctor import check as doctor_check
from accel.errors import ConfigError, one_line_errors, require
from accel.job import generation_kwargs, quiet_loading, timed_generation, write_replay_recipe
from accel.prompts import prompt_set
from accel.families import for_pipeline
from accel.models.loading import resolve_device
from accel.recipe import Recipe
from accel.schema import to_dataclass
from accel.strategies.cache_controls import CacheControls

TUNE_DIR = "tune/%Y-%m-%d/%H-%M-%S-%f"
NOT_MET = 3  # exit code: no setting met the target (the best found is written)
PSNR_CAP = 100.0  # identical outputs (inf dB) count as this in the search


@dataclass
class Target:
    """What the chosen setting must reach; exactly one field set."""

    min_psnr: Optional[float] = None  # dB against the baseline, for every prompt
    speedup: Optional[float] = None  # times faster than the recipe without its cache
    accuracy: Optional[float] = None  # toy task accuracy in [0, 1], over the prompts (model=flux_toy)

    def __post_init__(self):
        chosen = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        require(len(chosen) == 1, "one of", ", ".join(f"target.{c}" for c in chosen) or "none",
                "exactly one of target.min_psnr=DB, target.speedup=X or target.accuracy=A")
        require(self.min_psnr is None or self.min_psnr > 0, "min_psnr", self.min_psnr, "> 0 dB")
        require(self.speedup is None or self.speedup > 1, "speedup", self.speedup,
                "> 1: the uncached model already runs at 1x, so a lower target asks for nothing")
        require(self.accuracy is None or 0 <= self.accuracy <= 1, "accuracy", self.accuracy, "0 to 1")

    @property
    def name(self) -> str:
        return next(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    @property
    def value(self) -> float:
        return getattr(self, self.name)

    def describe(self) -> str:
        return {"min_psnr": f"PSNR >= {self.value:g} dB on every prompt", "speedup": f"speedup >= {self.value:g}x",
                "accuracy": f"task accuracy >= {self.value:g}"}[self.name]


def searchable_kinds() -> list[str]:
    """The cache kinds that declare a search space (accel.strategies.cache_controls)."""
    return [s.name for s in registry.strategies("cache") if issubclass(s.config_cls, CacheControls)
            and s.config_cls.search_space is not CacheControls.search_space]


@dataclass
class Search:
    """How to search."""

    trials: int = 24
    kinds: Optional[list[str]] = None  # null: every cache kind that declares a search space
    forecast: bool = True  # also try Taylor forecasting (order 1 and 2)
    prompts: str = "auto"  # a prompt set of accel.calibrate: auto, photo or toy
    prompt_count: int = 3
    rounds: int = 3  # interleaved rounds timing the chosen setting against the baseline
    seed: int = 0
    dir: Optional[str] = None  # output folder; null: tune/DATE/TIME

    def __post_init__(self):
        kinds = searchable_kinds()
        if self.kinds is None:
            self.kinds = kinds
        require(self.trials >= 1, "trials", self.trials, ">= 1")
        for kind in self.kinds:
            require(kind in kinds, "kinds", kind, f"a list of {', '.join(kinds)}")
        require(len(self.kinds) >= 1, "kinds", self.kinds, f"a non-empty list of {', '.join(kinds)}")
        require(self.prompt_count >= 1, "prompt_count", self.prompt_count, ">= 1")
        require(self.rounds >= 1, "rounds", self.rounds, ">= 1")


def cache_config(cache: dict) -> CacheControls:
    return registry.build_config("cache", cache)[0]


def block_work_speedup(cache: dict, computed: int, calls: int, blocks: int) -> float:
    """The baseline's block evaluations over those of `cache`, whose computed calls run every block
    and whose hits run the blocks its kind still needs."""
    blocks_run = computed * blocks + (calls - computed) * cache_config(cache).blocks_on_hit()
    return calls * blocks / max(blocks_run, 1)


FORECASTS = {"none": {"forecast": "none"}, "taylor1": {"forecast": "taylor", "forecast_order": 1},
             "taylor2": {"forecast": "taylor", "forecast_order": 2}}


@dataclass
class Evidence:
    """What one setting did over the prompts."""

    cache: dict
    seconds: float
    psnr: list[float]
    ssim: list[float]
    accuracy: Optional[float]
    computed: int
    calls: int
    speedup: float = 0.0  # measured: the baseline's seconds at the start over these seconds (noisy)
    work_speedup: float = 0.0  # the baseline's block evaluations over these: what the search ranks by

    @property
    def worst_psnr(self) -> float:
        return min(self.psnr)

    def violation(self, target: Target) -> float:
        """How far from the target, relative to it; <= 0 when met."""
        reached = {"min_psnr": self.worst_psnr, "speedup": self.work_speedup, "accuracy": self.accuracy}[target.name]
        return (target.value - reached) / max(target.value, 1e-9)

    def objective(self, target: Target) -> float:
        return min(self.worst_psnr, PSNR_CAP) if target.name == "speedup" else self.work_speedup

    def describe(self) -> str:
        settings = " ".join(f"{k}={_short(v)}" for k, v in self.cache.items() if k != "strategy")
        psnr = "inf" if math.isinf(self.worst_psnr) else f"{self.worst_psnr:.1f}"
        accuracy = "" if self.accuracy is None else f", accuracy {self.accuracy:.2f}"
        return (f"{self.cache['strategy']} {settings}: {self.work_speedup:.2f}x less block work "
                f"({self.speedup:.2f}x measured), PSNR worst {psnr} dB{accuracy}, {self.computed}/{self.calls} calls computed")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def prompts_for(recipe: Recipe, search: Search, target: Target) -> tuple[str, list[str]]:
    """The prompt set and the prompts a tune measures; refuses an accuracy target off the toy task."""
    name, prompts = prompt_set(search.prompts, recipe.model)
    if target.name == "accuracy" and name != "toy":
        raise ConfigError(f"target.accuracy={target.value} is not allowed here: task accuracy is scored on "
                          f"the toy shapes task (model=flux_toy), and these are the {name} prompts")
    return name, list(prompts[:search.prompt_count])


class Tuner:
    """The pipeline, its prompts and their baselines, and one measured evaluation per setting."""

    def __init__(self, recipe: Recipe, search: Search, target: Target):
        self.base, self.search, self.target = recipe, search, target
        self.prompt_set, self.prompts = prompts_for(recipe, search, target)
        self.device = resolve_device(recipe.job.device)
        quiet_loading()
        self.pipe = load_pipeline(recipe.model, recipe.job.device)
        self.pipe.set_progress_bar_config(disable=True)
        adapter = for_pipeline(self.pipe)
        self.blocks = len(adapter.blocks(adapter.denoiser(self.pipe)))
        self.kwargs = generation_kwargs(recipe, self.pipe)
        self.warm_each = recipe.compile.strategy != "none"  # a compiled setting's first call compiles
        self.baseline_recipe = self.recipe({"strategy": "none"})
        self.references, self.baseline_s = self.measure_baseline()

    def recipe(self, cache: dict) -> Recipe:
        """The user's recipe with `cache` in place of its cache stage."""
        return self.base.replace(cache=cache_config(cache))

    def generate(self, prompt: str):
        images, seconds, _ = timed_generation(self.pipe, {**self.kwargs, "prompt": prompt}, self.base.job.seed,
                                              self.device)
        return images, seconds

    def run_prompt(self, recipe: Recipe, prompt: str) -> tuple[Any, float, dict]:
        """One generation of `prompt` under `recipe`: images, seconds, the cache's stats."""
        with apply(self.pipe, recipe) as run:
            if self.warm_each:
                self.generate(prompt)
            images, seconds = self.generate(prompt)
            return images, seconds, run.stats().get("cache", {})

    def run_prompts(self, recipe: Recipe) -> list[tuple[Any, float, dict]]:
        """Every prompt once under `recipe`: (images, seconds, cache stats) each."""
        return [self.run_prompt(recipe, prompt) for prompt in self.prompts]

    def measure_baseline(self) -> tuple[list, float]:
        """The baseline's outputs (every trial's reference) and seconds, after a warm-up."""
        self.run_prompts(self.baseline_recipe)
        runs = self.run_prompts(self.baseline_recipe)
        return [images for images, _, _ in runs], sum(seconds for _, seconds, _ in runs)

    def evaluate(self, cache: dict) -> Evidence:
        """`cache` over the prompts. Ranked by the block evaluations it saves, which noise on a busy
        machine cannot blur into a no-op looking fast; its seconds are kept beside that."""
        runs = self.run_prompts(self.recipe(cache))
        names = ["psnr", "ssim"] + (["task_accuracy"] if self.prompt_set == "toy" else [])
        figures = [metrics.metrics(names, images, ref, prompts=p) for (images, _, _), ref, p in
                   zip(runs, self.references, self.prompts)]
        accuracy = statistics.mean(f["task_accuracy"] for f in figures) if self.prompt_set == "toy" else None
        computed, calls = (sum(stats.get(key, 0) for _, _, stats in runs) for key in ("computed", "calls"))
        seconds = sum(r[1] for r in runs)
        return Evidence(cache, seconds, [f["psnr"] for f in figures], [f["ssim"] for f in figures], accuracy,
                        computed, calls, speedup=self.baseline_s / seconds,
                        work_speedup=block_work_speedup(cache, computed, calls, self.blocks))

    def baseline_accuracy(self) -> Optional[float]:
        if self.prompt_set != "toy":
            return None
        return statistics.mean(metrics.task_accuracy(ref, p) for ref, p in zip(self.references, self.prompts))

    def verify(self, cache: dict) -> dict:
        """The chosen setting against the baseline in interleaved rounds: median speedup and its range."""
        base, fast, tuned = [], [], self.recipe(cache)
        for _ in range(self.search.rounds):
            base.append(sum(seconds for _, seconds, _ in self.run_prompts(self.baseline_recipe)))
            fast.append(sum(seconds for _, seconds, _ in self.run_prompts(tuned)))
        return {"speedup": statistics.median(base) / statistics.median(fast),
                "range": [min(base) / max(fast), max(base) / min(fast)], "rounds": self.search.rounds,
                "baseline_s": statistics.median(base), "tuned_s": statistics.median(fast)}


def search(tuner: Tuner, trials_file: Path) -> list[Evidence]:
    """Optuna's TPE over the kinds' own search spaces, constrained to the target; every trial lands in
    `trials_file` as it ends, and a bar counts the trials."""
    import optuna
    from tqdm.auto import tqdm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings, target = tuner.search, tuner.target
    evidence: list[Evidence] = []

    def objective(trial) -> float:
        kind = trial.suggest_categorical("kind", settings.kinds)
        cache = {"strategy": kind, **registry.get("cache", kind).config_cls.search_space(trial, tuner.blocks)}
        if settings.forecast:
            cache.update(FORECASTS[trial.suggest_categorical("forecast", list(FORECASTS))])
        found = tuner.evaluate(cache)
        evidence.append(found)
        write_trials(evidence, target, trials_file)
        trial.set_constraint("target", found.violation(target))  # feasible at <= 0: TPE learns the boundary
        mark = "meets" if found.violation(target) <= 0 else "misses"
        bar.write(f"  trial {trial.number + 1:>2}/{settings.trials}: {found.describe()}  [{mark} the target]")
        bar.update()
        return found.objective(target)

    with warnings.catch_warnings():  # multivariate/group TPE is marked experimental; it models the
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # kinds' own spaces jointly
        sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=min(10, settings.trials),
                                             multivariate=True, group=True)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    with tqdm(total=settings.trials, desc="accel.tune trials", leave=False) as bar:
        study.optimize(objective, n_trials=settings.trials)
    return evidence


def choose(evidence: list[Evidence], target: Target) -> tuple[Evidence, bool]:
    """The best setting that meets the target and caches something, or else the one that came closest;
    and whether it met it. A setting that caches nothing is the uncached model, not a tuned result."""
    caching = [e for e in evidence if e.computed < e.calls] or evidence
    met = [e for e in caching if e.violation(target) <= 0 and e.computed < e.calls]
    if met:
        # the best objective; among equals, the one that computes least
        return max(met, key=lambda e: (e.objective(target), -e.computed)), True
    return min(caching, key=lambda e: e.violation(target)), False


def write_trials(evidence: list[Evidence], target: Target, path: Path) -> None:
    columns = ["trial", "cache", "work_speedup", "measured_speedup", "seconds", "worst_psnr_db", "mean_ssim", "accuracy", "computed", "calls",
               "meets_target"]
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        for n, e in enumerate(evidence, start=1):
            cache = " ".join(f"{k}={_short(v)}" for k, v in e.cache.items())
            writer.writerow([n, cache, f"{e.work_speedup:.4f}", f"{e.speedup:.4f}", f"{e.seconds:.4f}", f"{e.worst_psnr:.3f}",
                             f"{statistics.mean(e.ssim):.5f}", "" if e.accuracy is None else f"{e.accuracy:.3f}",
                             e.computed, e.calls, e.violation(target) <= 0])


def evidence_header(tuner: Tuner, chosen: Evidence, verdict: str, verified: dict, command: str) -> list[str]:
    environment = reports.environment(tuner.device)
    psnr = ", ".join("inf" if math.isinf(p) else f"{p:.2f}" for p in chosen.psnr)
    lines = [
        f"Tuned by: {command}",
        f"On {datetime.now():%Y-%m-%d %H:%M}, {environment['device_name']} ({environment['device']}), "
        f"accel {environment['accel']}, torch {environment['torch']}, diffusers {environment['diffusers']}",
        f"Target: {tuner.target.describe()}: {verdict}",
        f"Search: {tuner.search.trials} Optuna TPE trials (seed {tuner.search.seed}) over "
        f"{', '.join(tuner.search.kinds)}" + (", with and without Taylor forecasting" if tuner.search.forecast else ""),
        f"Prompts ({tuner.prompt_set}, seed {tuner.base.job.seed}): " + " | ".join(tuner.prompts),
        f"Chosen: {chosen.describe()}",
        f"Speedup re-measured in {verified['rounds']} interleaved rounds: {verified['speedup']:.2f}x "
        f"(range {verified['range'][0]:.2f}-{verified['range'][1]:.2f}x; baseline {verified['baseline_s']:.3f} s, "
        f"tuned {verified['tuned_s']:.3f} s over the prompts)",
        f"PSNR per prompt (dB): {psnr}; mean SSIM {statistics.mean(chosen.ssim):.4f}",
    ]
    if chosen.accuracy is not None:
        lines.append(f"Task accuracy {chosen.accuracy:.2f} (baseline {tuner.baseline_accuracy():.2f})")
    lines.append("Every trial: trials.csv beside this file")
    return lines


def verdict_of(chosen: Evidence, met: bool, target: Target, verified: dict, uncached_meets: bool) -> tuple[bool, str]:
    """Whether the target was met, as measured, and what to say about it. A setting that caches nothing
    is never the answer: it is the uncached model."""
    if not met:
        uncached = " (the uncached model meets it, caching nothing)" if uncached_meets else ""
        caches = "; the closest found caches nothing" if chosen.computed == chosen.calls else ", this is the closest found"
        return False, f"NOT MET by any setting tried that caches a step{uncached}{caches}"
    if target.name == "speedup" and verified["speedup"] < target.value:
        return False, (f"NOT MET as measured: it saves {chosen.work_speedup:.2f}x of the block work, "
                       f"but the whole generation ran {verified['speedup']:.2f}x faster")
    return True, "MET"


def tune(recipe: Recipe, search_settings: Search, target: Target, command: str) -> int:
    folder = claim_folder(Path(search_settings.dir or datetime.now().strftime(TUNE_DIR)), marker="trials.csv")
    print(f"accel.tune: {target.describe()}; {search_settings.trials} trials; folder {folder}", flush=True)
    tuner = Tuner(recipe, search_settings, target)
    print(f"  baseline: {tuner.baseline_s:.3f} s over {len(tuner.prompts)} prompts ({tuner.prompt_set})", flush=True)
    evidence = search(tuner, folder / "trials.csv")
    chosen, met = choose(evidence, target)
    verified = tuner.verify(chosen.cache)
    uncached_meets = target.name == "min_psnr" or (target.name == "accuracy" and
                                                   tuner.baseline_accuracy() >= target.value)
    met, verdict = verdict_of(chosen, met, target, verified, uncached_meets)
    path = folder / "tuned.yaml"
    write_replay_recipe(tuner.recipe(chosen.cache), path,
                        header=evidence_header(tuner, chosen, verdict, verified, command))
    print(f"accel.tune: {'chosen' if met else 'THE TARGET WAS NOT MET (' + verdict + ')'}: {chosen.describe()}")
    print(f"  re-measured: {verified['speedup']:.2f}x (range {verified['range'][0]:.2f}-{verified['range'][1]:.2f}x "
          f"over {verified['rounds']} interleaved rounds)")
    print(f"  recipe: {path}\n  use it: ACCEL_RECIPES={folder} python -m accel recipe=tuned")
    return 0 if met else NOT_MET


def parse(argv: list[str]) -> tuple[list[str], Search, Target]:
    """Split the command line into recipe overrides, `tune.*` and `target.*` (checked here)."""
    ours = {"tune": [], "target": []}
    overrides = []
    for argument in argv:
        group = argument.split(".", 1)[0]
        (ours[group] if group in ours and "." in argument.split("=", 1)[0] else overrides).append(argument)
    nodes = {}
    for group, dotlist in ours.items():
        try:
            nodes[group] = OmegaConf.to_container(OmegaConf.from_dotlist([a.split(".", 1)[1] for a in dotlist]))
        except Exception as err:  # noqa: BLE001  OmegaConf's grammar errors, as one line
            raise ConfigError(f"{group}: {str(err).splitlines()[0]}") from None
    search_settings = to_dataclass(Search, nodes["tune"], where="tune.", label="tune")
    if "target" not in {a.split(".", 1)[0] for a in argv}:
        raise ConfigError("no target: give one of target.min_psnr=DB, target.speedup=X or target.accuracy=A")
    target = to_dataclass(Target, nodes["target"], where="target.", label="target")
    return overrides, search_settings, target


def main() -> None:
    argv = sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    outcome = {}

    def run() -> None:
        overrides, search_settings, target = parse(argv)
        recipe = compose(None, overrides)
        doctor_check(recipe)
        prompts_for(recipe, search_settings, target)  # before any folder or weights
        command = "python -m accel.tune " + " ".join(argv)
        outcome["code"] = tune(recipe, search_settings, target, command)

    one_line_errors(run)
    sys.exit(outcome.get("code", 0))


if __name__ == "__main__":
    main()
