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
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from accel import cli
from accel.errors import ConfigError, require
from accel.schema import to_dataclass

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
        require(len(chosen) == 1, "target", ", ".join(f"target.{c}" for c in chosen) or "none",
                "exactly one of target.min_psnr=DB, target.speedup=X or target.accuracy=A")
        require(self.min_psnr is None or self.min_psnr > 0, "target.min_psnr", self.min_psnr, "> 0 dB")
        require(self.speedup is None or self.speedup > 0, "target.speedup", self.speedup, "> 0")
        require(self.accuracy is None or 0 <= self.accuracy <= 1, "target.accuracy", self.accuracy, "0 to 1")

    @property
    def name(self) -> str:
        return next(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    @property
    def value(self) -> float:
        return getattr(self, self.name)

    def describe(self) -> str:
        return {"min_psnr": f"PSNR >= {self.value:g} dB on every prompt", "speedup": f"speedup >= {self.value:g}x",
                "accuracy": f"task accuracy >= {self.value:g}"}[self.name]


@dataclass
class Search:
    """How to search."""

    trials: int = 24
    kinds: list[str] = field(default_factory=lambda: ["fbcache", "mbcache", "teacache"])
    forecast: bool = True  # also try Taylor forecasting (order 1 and 2)
    prompts: str = "auto"  # a prompt set of accel.calibrate: auto, photo or toy
    prompt_count: int = 3
    rounds: int = 3  # interleaved rounds timing the chosen setting against the baseline
    seed: int = 0
    dir: Optional[str] = None  # output folder; null: tune/DATE/TIME

    def __post_init__(self):
        require(self.trials >= 1, "tune.trials", self.trials, ">= 1")
        for kind in self.kinds:
            require(kind in SPACES, "tune.kinds", kind, f"a list of {', '.join(SPACES)}")
        require(len(self.kinds) >= 1, "tune.kinds", self.kinds, f"a non-empty list of {', '.join(SPACES)}")
        require(self.prompt_count >= 1, "tune.prompt_count", self.prompt_count, ">= 1")
        require(self.rounds >= 1, "tune.rounds", self.rounds, ">= 1")


# The search space of each cache kind: trial -> the cache node it proposes. Block counts bound Fn/Bn.
def _fbcache(trial, blocks: int) -> dict:
    return {"strategy": "fbcache",
            "residual_diff_threshold": trial.suggest_float("fbcache.residual_diff_threshold", 0.02, 0.6, log=True)}


def _mbcache(trial, blocks: int) -> dict:
    first = trial.suggest_int("mbcache.first_blocks", 1, max(1, min(8, blocks - 1)))
    last = trial.suggest_int("mbcache.last_blocks", 0, max(0, min(4, blocks - 1 - first)))
    return {"strategy": "mbcache", "first_blocks": first, "last_blocks": last,
            "residual_diff_threshold": trial.suggest_float("mbcache.residual_diff_threshold", 0.02, 0.6, log=True)}


def _teacache(trial, blocks: int) -> dict:
    return {"strategy": "teacache",
            "rel_l1_threshold": trial.suggest_float("teacache.rel_l1_threshold", 0.1, 2.0, log=True)}


@dataclass(frozen=True)
class Kind:
    """A cache kind the search covers: what a trial proposes, and how many blocks a hit still runs."""

    propose: Callable[[Any, int], dict]
    blocks_on_hit: Callable[[dict], int]


SPACES: dict[str, Kind] = {
    "fbcache": Kind(_fbcache, lambda cache: 1),  # the probe block
    "mbcache": Kind(_mbcache, lambda cache: cache["first_blocks"] + cache["last_blocks"]),
    "teacache": Kind(_teacache, lambda cache: 0),  # its probe is block 0's input modulation alone
}
def block_work_speedup(cache: dict, computed: int, calls: int, blocks: int) -> float:
    """The baseline's block evaluations over those of `cache`, whose computed calls run every block
    and whose hits run the blocks its kind still needs."""
    blocks_run = computed * blocks + (calls - computed) * SPACES[cache["strategy"]].blocks_on_hit(cache)
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


def prompts_for(cfg: DictConfig, search: Search, target: Target) -> tuple[str, list[str]]:
    """The prompt set and the prompts a tune measures; refuses an accuracy target off the toy task."""
    from accel.calibrate import prompt_set

    name, prompts = prompt_set(search.prompts, cfg.model)
    if target.name == "accuracy" and name != "toy":
        raise ConfigError(f"target.accuracy={target.value} is not allowed here: task accuracy is scored on "
                          f"the toy shapes task (model=flux_toy), and these are the {name} prompts")
    return name, list(prompts[:search.prompt_count])


class Tuner:
    """The pipeline, its prompts and their baselines, and one measured evaluation per setting."""

    def __init__(self, cfg: DictConfig, search: Search, target: Target):
        from accel.job import quiet_loading, generation_kwargs
        from accel.models.adapters import for_pipeline
        from accel.models.loading import load_pipeline, resolve_device

        self.cfg, self.search, self.target = cfg, search, target
        self.prompt_set, self.prompts = prompts_for(cfg, search, target)
        self.device = resolve_device(cfg.device)
        quiet_loading()
        self.pipe = load_pipeline(cfg.model, cfg.device)
        self.pipe.set_progress_bar_config(disable=True)
        adapter = for_pipeline(self.pipe)
        self.blocks = len(adapter.blocks(adapter.denoiser(self.pipe)))
        self.kwargs = generation_kwargs(cfg, self.pipe)
        self.warm_each = cfg.compile.strategy != "none"  # a compiled setting's first call compiles
        self.baseline_recipe = self.recipe({"strategy": "none"})
        self.references, self.baseline_s = self.measure_baseline()

    def recipe(self, cache: dict) -> dict:
        """The user's recipe with `cache` in place of its cache stage."""
        from accel import registry

        stages = {stage: OmegaConf.to_container(self.cfg[stage], resolve=True) for stage in registry.STAGES}
        return {**stages, "cache": cache}

    def generate(self, prompt: str):
        from accel.job import timed_generation

        images, seconds, _ = timed_generation(self.pipe, {**self.kwargs, "prompt": prompt}, self.cfg.seed, self.device)
        return images, seconds

    def run_prompt(self, recipe: dict, prompt: str) -> tuple[Any, float, dict]:
        """One generation of `prompt` under `recipe`: images, seconds, the cache's stats."""
        import accel

        with accel.apply(self.pipe, recipe) as run:
            if self.warm_each:
                self.generate(prompt)
            images, seconds = self.generate(prompt)
            return images, seconds, run.stats().get("cache", {})

    def run_prompts(self, recipe: dict) -> list[tuple[Any, float, dict]]:
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
        from accel import metrics

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
        from accel.metrics import task_accuracy

        if self.prompt_set != "toy":
            return None
        return statistics.mean(task_accuracy(ref, p) for ref, p in zip(self.references, self.prompts))

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
    """Optuna's TPE over SPACES, constrained to the target; every trial lands in `trials_file` as it ends."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings, target = tuner.search, tuner.target
    evidence: list[Evidence] = []

    def objective(trial) -> float:
        kind = trial.suggest_categorical("kind", settings.kinds)
        cache = SPACES[kind].propose(trial, tuner.blocks)
        if settings.forecast:
            cache.update(FORECASTS[trial.suggest_categorical("forecast", list(FORECASTS))])
        found = tuner.evaluate(cache)
        evidence.append(found)
        write_trials(evidence, target, trials_file)
        trial.set_constraint("target", found.violation(target))  # feasible at <= 0: TPE learns the boundary
        mark = "meets" if found.violation(target) <= 0 else "misses"
        print(f"  trial {trial.number + 1:>2}/{settings.trials}: {found.describe()}  [{mark} the target]", flush=True)
        return found.objective(target)

    with warnings.catch_warnings():  # multivariate/group TPE is marked experimental; it models the
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # kinds' own spaces jointly
        sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=min(10, settings.trials),
                                             multivariate=True, group=True)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(objective, n_trials=settings.trials)
    return evidence


def choose(evidence: list[Evidence], target: Target) -> tuple[Evidence, bool]:
    """The best setting that meets the target, or else the one that came closest; and whether it met it."""
    met = [e for e in evidence if e.violation(target) <= 0]
    if met:
        # the best objective; among equals, the one that computes least
        return max(met, key=lambda e: (e.objective(target), -e.computed)), True
    return min(evidence, key=lambda e: e.violation(target)), False


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
    from accel import report

    environment = report.environment(tuner.device)
    psnr = ", ".join("inf" if math.isinf(p) else f"{p:.2f}" for p in chosen.psnr)
    lines = [
        f"Tuned by: {command}",
        f"On {datetime.now():%Y-%m-%d %H:%M}, {environment['device_name']} ({environment['device']}), "
        f"accel {environment['accel']}, torch {environment['torch']}, diffusers {environment['diffusers']}",
        f"Target: {tuner.target.describe()}: {verdict}",
        f"Search: {tuner.search.trials} Optuna TPE trials (seed {tuner.search.seed}) over "
        f"{', '.join(tuner.search.kinds)}" + (", with and without Taylor forecasting" if tuner.search.forecast else ""),
        f"Prompts ({tuner.prompt_set}, seed {tuner.cfg.seed}): " + " | ".join(tuner.prompts),
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


def tune(cfg: DictConfig, search_settings: Search, target: Target, command: str) -> int:
    from accel.job import write_replay_recipe
    from accel.registry import build_config

    folder = cli.claim_folder(Path(search_settings.dir or datetime.now().strftime(TUNE_DIR)))
    print(f"accel.tune: {target.describe()}; {search_settings.trials} trials; folder {folder}", flush=True)
    tuner = Tuner(cfg, search_settings, target)
    print(f"  baseline: {tuner.baseline_s:.3f} s over {len(tuner.prompts)} prompts ({tuner.prompt_set})", flush=True)
    evidence = search(tuner, folder / "trials.csv")
    chosen, met = choose(evidence, target)
    verified = tuner.verify(chosen.cache)
    verdict = "MET" if met else "NOT MET by any setting tried; this is the closest found"
    if met and target.name == "speedup" and verified["speedup"] < target.value:
        met, verdict = False, (f"NOT MET as measured: it saves {chosen.work_speedup:.2f}x of the block work, "
                               f"but the whole generation ran {verified['speedup']:.2f}x faster")
    cache = dataclasses.asdict(build_config("cache", chosen.cache))
    tuned = cfg.copy()
    with open_dict(tuned):
        tuned.cache = cache
    path = folder / "tuned.yaml"
    write_replay_recipe(tuned, path, header=evidence_header(tuner, chosen, verdict, verified, command))
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
        except Exception as err:
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
        from accel.config import compose
        from accel import doctor

        overrides, search_settings, target = parse(argv)
        cfg = compose(None, overrides)
        doctor.check(cfg)
        prompts_for(cfg, search_settings, target)  # before any folder or weights
        command = "python -m accel.tune " + " ".join(argv)
        outcome["code"] = tune(cfg, search_settings, target, command)

    cli.plain(run)
    sys.exit(outcome.get("code", 0))


if __name__ == "__main__":
    main()
