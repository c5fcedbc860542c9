"""Our caches side by side with peers' caches on model=flux_toy, in one process: the same pipeline
weights, prompts and seed; interleaved rounds; median times, hits, PSNR/SSIM and task accuracy.

Peers, each where it installs (optional extras; a missing one is reported, never faked):
  - diffusers' own hooks (`transformer.enable_cache`): FirstBlockCacheConfig, TaylorSeerCacheConfig,
    MagCacheConfig (mag_ratios calibrated here on one held-out prompt with diffusers' own
    `calibrate=True` mode, the procedure its docstring gives for a model without published ratios);
  - cache-dit (`cache_dit.enable_cache`): DBCache F1B0 and F8B0, with and without its TaylorSeer
    calibrator (order 1);
  - ParaAttention (`para_attn.first_block_cache.diffusers_adapters.apply_cache_on_pipe`).

Every setting gets its own freshly loaded pipeline, and its own subclass of the pipeline class:
cache-dit and ParaAttention patch `pipe.__class__.__call__` (the class, not the instance), so without
that every pipeline in the process would run through every peer's wrapper (and ParaAttention would
keep the first threshold it saw). diffusers' `disable_cache()` leaves block forwards wrapped, so no
pipeline is reused after a cache comes off.

"Blocks computed" is counted the same way for every method, by forward hooks on the leaf layers each
transformer block runs only when it really computes: its attention's `to_q` and its MLP (`ff` of a
double block, `proj_mlp` of a single one). "last block skipped" is the number of denoiser calls in which
the last single block's attention did not run; "own stats" is what the method's own API reports.

Quality is against the baseline's images from the same seed and prompts: PSNR, SSIM (scikit-image) and
the toy task's accuracy (accel.toy.checker: does the image show the shape, colour, size and place its
prompt asks for). torch runs on --threads threads (default 1): on a small CPU shared with other work,
two threads contend and a generation takes several times longer and varies far more.

    python benchmarks/peers.py [--rounds 5] [--steps 28] [--prompts 4] [--threads 1] [--only SUBSTRING ...]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # cache-dit logs every step's decision at info

import torch

import accel
from accel import metrics
from accel.toy import shapes
from common import timed

# Four fixed prompts of the toy set (every shape, colour and size, four places), and a fifth one,
# held out, on which MagCache's ratios are calibrated.
PROMPTS = ("a large red circle at the top left", "a small blue square at the center",
           "a large green triangle at the bottom right", "a small yellow circle at the right",
           "a large blue triangle at the top", "a small green square at the bottom left")
CALIBRATION_PROMPT = "a large yellow square at the bottom"
QUALITY_LEVELS_DB = (60.0, 55.0, 50.0, 45.0, 40.0)  # PSNR floors at which the summary compares the fastest settings


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux_toy")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4, help=f"how many of the fixed prompts (1-{len(PROMPTS)}), one batch")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only the settings whose name contains one of these (the baseline always runs)")
    parser.add_argument("--list", action="store_true", help="list the settings and exit")
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------- pipelines

def load_pipe(args: argparse.Namespace):
    cfg = accel.compose(None, [f"model={args.model}", "cache=none"])
    pipe = accel.load_pipeline(cfg.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    # its own class, so peers that patch `pipe.__class__.__call__` patch this pipeline only
    pipe.__class__ = type(pipe.__class__.__name__, (pipe.__class__,), {})
    return cfg, pipe


def call_kwargs(cfg, args, prompts) -> dict:
    return dict(prompt=list(prompts), num_inference_steps=args.steps, height=cfg.model.height, width=cfg.model.width,
                guidance_scale=cfg.model.guidance_scale, output_type="np")


class BlockCounter:
    """Counts, per generation, the denoiser calls and the attention and MLP evaluations of every block,
    by forward hooks on leaf layers that run only when a block really computes."""

    def __init__(self, transformer):
        self.calls = 0
        self.attention = 0
        self.mlp = 0
        self.last_attention = 0
        doubles, singles = list(transformer.transformer_blocks), list(transformer.single_transformer_blocks)
        self.n_blocks = len(doubles) + len(singles)
        self.handles = [transformer.register_forward_hook(self._count("calls"))]
        for block in doubles + singles:
            self.handles.append(block.attn.to_q.register_forward_hook(self._count("attention")))
            mlp = block.ff if hasattr(block, "ff") else block.proj_mlp
            self.handles.append(mlp.register_forward_hook(self._count("mlp")))
        self.handles.append(singles[-1].attn.to_q.register_forward_hook(self._count("last_attention")))

    def _count(self, name: str):
        def hook(module, inputs, output):
            setattr(self, name, getattr(self, name) + 1)
        return hook

    def reset(self) -> None:
        self.calls = self.attention = self.mlp = self.last_attention = 0

    def snapshot(self) -> dict:
        full = max(1, self.calls * self.n_blocks)
        return {"calls": self.calls, "last_skipped": self.calls - self.last_attention,
                "attention_pct": 100 * self.attention / full, "mlp_pct": 100 * self.mlp / full}


# ------------------------------------------------------------------------------------------------ methods

@dataclass
class Method:
    name: str
    family: str  # "baseline", "ours", "diffusers", "cache-dit", "ParaAttention"
    setup: Callable[[Any, Any], Callable[[], str]]  # (cfg, pipe) -> a function that reports the method's own stats
    status: str = "ok"  # or "not installed: ...", "failed to apply: ...", "failed at run: ..."
    pipe: Any = None
    call: dict = field(default_factory=dict)
    own_stats: Optional[Callable[[], str]] = None
    counter: Optional[BlockCounter] = None
    times: list = field(default_factory=list)
    images: Any = None
    counts: Optional[dict] = None
    own: str = "-"


def no_stats() -> str:
    return "-"


def ours(model: str, overrides: list[str]):
    def setup(cfg, pipe):
        recipe = accel.compose(None, [f"model={model}", *overrides])
        run = accel.apply(pipe, recipe)

        def stats() -> str:
            cache = run.stats()["cache"]
            return f"{cache['computed']} computed / {cache['cached']} cached"
        return stats
    return setup


def diffusers_hook(make_config: Callable[[], Any]):
    def setup(cfg, pipe):
        pipe.transformer.enable_cache(make_config())
        return no_stats
    return setup


def cache_dit_setup(fn: int, bn: int, threshold: float, taylorseer: bool, warmup: int | None = None):
    def setup(cfg, pipe):
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
        extra = {} if warmup is None else {"max_warmup_steps": warmup}
        cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(Fn_compute_blocks=fn, Bn_compute_blocks=bn,
                                                                residual_diff_threshold=threshold, **extra),
                               calibrator_config=calibrator)

        def stats() -> str:
            found = cache_dit.summary(pipe, logging=False)
            return f"{len(found[0].cached_steps or [])} cached steps" if found else "-"
        return stats
    return setup


def para_attn_setup(**kwargs):
    def setup(cfg, pipe):
        from para_attn.first_block_cache.diffusers_adapters import apply_cache_on_pipe

        apply_cache_on_pipe(pipe, **kwargs)
        return no_stats
    return setup


def magcache_ratios(cfg, args) -> list[float]:
    """MagCache's magnitude ratios for this model and step count, by diffusers' own calibration mode
    (one uncached run that prints them), on the held-out prompt, same seed."""
    from diffusers import MagCacheConfig

    _, pipe = load_pipe(args)
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=args.steps))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        timed(pipe, call_kwargs(cfg, args, [CALIBRATION_PROMPT]))
    found = re.search(r"Calibration Complete.*?\n(\[[^\]]*\])", printed.getvalue(), re.S)
    if found is None:
        raise RuntimeError(f"diffusers' MagCache calibration printed no ratios: {printed.getvalue()[-300:]!r}")
    return [float(x) for x in found.group(1).strip("[]").split(",")]


def methods(cfg, args) -> list[Method]:
    rows = [Method("baseline (no cache)", "baseline", lambda cfg, pipe: no_stats)]

    def add_ours(name, *overrides):
        rows.append(Method(f"ours {name}", "ours", ours(args.model, list(overrides))))

    for t, forecast in ((0.08, None), (0.2, None), (0.2, 1), (0.2, 2), (0.3, 2)):
        taylor = ["cache.forecast=taylor", f"cache.forecast_order={forecast}"] if forecast else []
        add_ours(f"fbcache {t}" + (f" +taylor{forecast}" if forecast else ""), "cache=fbcache",
                 f"cache.residual_diff_threshold={t}", *taylor)
    add_ours("mbcache F8B0 0.08", "cache=mbcache", "cache.residual_diff_threshold=0.08", "cache.first_blocks=8",
             "cache.last_blocks=0")
    for t, forecast in ((0.4, None), (0.4, 1), (0.5, 1), (0.6, None), (0.6, 1)):
        taylor = ["cache.forecast=taylor", f"cache.forecast_order={forecast}"] if forecast else []
        add_ours(f"teacache {t}" + (f" +taylor{forecast}" if forecast else ""), "cache=teacache",
                 f"cache.rel_l1_threshold={t}", *taylor)

    # diffusers' own hooks
    try:
        from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
    except ImportError as why:
        rows.append(Method("diffusers hooks", "diffusers", None, status=f"not installed: {why}"))
    else:
        for t in (0.05, 0.08, 0.2, 0.3):
            rows.append(Method(f"diffusers FirstBlockCache {t}" + (" (default)" if t == 0.05 else ""), "diffusers",
                               diffusers_hook(lambda t=t: FirstBlockCacheConfig(threshold=t))))
        rows.append(Method("diffusers TaylorSeer interval 5 (default)", "diffusers",
                           diffusers_hook(lambda: TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32))))
        for interval in (3, 8):
            rows.append(Method(f"diffusers TaylorSeer interval {interval}", "diffusers",
                               diffusers_hook(lambda i=interval: TaylorSeerCacheConfig(
                                   cache_interval=i, taylor_factors_dtype=torch.float32))))
        wanted = [t for t in (0.06, 0.24, 0.5)
                  if not args.only or any(s in f"diffusers MagCache {t}" for s in args.only)]
        try:
            ratios = magcache_ratios(cfg, args) if wanted and not args.list else []
        except Exception as why:  # noqa: BLE001 - reported in the table
            rows.append(Method("diffusers MagCache", "diffusers", None, status=f"failed to calibrate: {why}"))
        else:
            for t in wanted:
                rows.append(Method(f"diffusers MagCache {t}" + (" (default)" if t == 0.06 else ""), "diffusers",
                                   diffusers_hook(lambda t=t: MagCacheConfig(threshold=t, mag_ratios=ratios,
                                                                             num_inference_steps=args.steps))))

    # cache-dit
    try:
        import cache_dit  # noqa: F401
    except ImportError as why:
        rows.append(Method("cache-dit", "cache-dit", None, status=f"not installed: {why} (pip install cache-dit)"))
    except Exception as why:  # noqa: BLE001 - installed but broken here: reported in the table
        rows.append(Method("cache-dit", "cache-dit", None, status=f"failed to import: {one_line(why)}"))
    else:
        for fn, thresholds in ((1, (0.08, 0.2, 0.3)), (8, (0.08,))):
            for t in thresholds:
                for ts in (False, True):
                    label = f"cache-dit DBCache F{fn}B0 {t}" + (" +TaylorSeer1" if ts else "")
                    rows.append(Method(label, "cache-dit", cache_dit_setup(fn, 0, t, ts)))
        # its default 8 warm-up steps cap its hits: also its best F1B0 setting with 3
        for t in (0.2, 0.3):
            rows.append(Method(f"cache-dit DBCache F1B0 {t} +TaylorSeer1 warmup 3", "cache-dit",
                               cache_dit_setup(1, 0, t, True, warmup=3)))

    # ParaAttention
    try:
        import para_attn.first_block_cache.diffusers_adapters  # noqa: F401
    except ImportError as why:
        rows.append(Method("ParaAttention", "ParaAttention", None,
                           status=f"not installed: {why} (pip install para-attn)"))
    except Exception as why:  # noqa: BLE001 - installed but broken here: reported in the table
        rows.append(Method("ParaAttention", "ParaAttention", None, status=f"failed to import: {one_line(why)}"))
    else:
        for t in (0.08, 0.12):
            rows.append(Method(f"ParaAttention FBCache {t}", "ParaAttention",
                               para_attn_setup(residual_diff_threshold=t)))
        rows.append(Method("ParaAttention FBCache 0.12 +TaylorSeer", "ParaAttention",
                           para_attn_setup(residual_diff_threshold=0.12, enable_taylorseer=True)))

    if args.only:
        rows = [m for m in rows if m.family == "baseline" or any(s in m.name for s in args.only)]
    return rows


def one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:160]


def prepare(method: Method, args, prompts) -> None:
    """Load the method's own pipeline, apply the method, warm it up once."""
    if method.status != "ok":
        return
    cfg, pipe = load_pipe(args)
    try:
        method.own_stats = method.setup(cfg, pipe)
    except Exception as why:  # noqa: BLE001 - reported in the table
        method.status = f"failed to apply: {one_line(why)}"
        return
    method.pipe, method.call = pipe, call_kwargs(cfg, args, prompts)
    method.counter = BlockCounter(pipe.transformer)
    try:
        timed(pipe, method.call)
    except Exception as why:  # noqa: BLE001 - reported in the table
        frames = traceback.extract_tb(why.__traceback__)
        where = next((f for f in reversed(frames) if f"{os.sep}torch{os.sep}" not in f.filename), frames[-1])
        package = where.filename.split("site-packages" + os.sep)[-1]
        method.status = f"failed at run: {one_line(why)} (in {package}:{where.lineno})"
        method.pipe = None


# ------------------------------------------------------------------------------------------------- report

def fmt_db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.1f}"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("torch", "diffusers", "transformers", "cache-dit", "para-attn"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} not installed")
    return ", ".join(found)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if not 1 <= args.prompts <= len(PROMPTS):
        sys.exit(f"--prompts takes 1 to {len(PROMPTS)}")
    prompts = PROMPTS[: args.prompts]
    known = {s.prompt for s in shapes.ALL_SCENES}
    assert all(p in known for p in (*PROMPTS, CALIBRATION_PROMPT)), "prompts must come from the toy set"

    cfg, _ = load_pipe(args)
    rows = methods(cfg, args)
    if args.list:
        print("\n".join(f"{m.family}: {m.name} [{m.status}]" for m in rows))
        return
    started = time.perf_counter()
    for method in rows:
        prepare(method, args, prompts)
    active = [m for m in rows if m.status == "ok"]
    baseline = rows[0]
    if baseline.status != "ok":
        sys.exit(f"the baseline did not run: {baseline.status}")

    for round_index in range(args.rounds):
        shift = round_index % len(active)  # each round starts with a different method
        for method in active[shift:] + active[:shift]:
            method.counter.reset()
            images, seconds = timed(method.pipe, method.call)
            method.times.append(seconds)
            method.images, method.counts = images, method.counter.snapshot()
            method.own = method.own_stats()

    reference = baseline.images
    base_median = statistics.median(baseline.times)
    results = []
    for method in active:
        q = metrics.metrics(["psnr", "ssim", "task_accuracy"], method.images, reference, prompts=list(prompts))
        median = statistics.median(method.times)
        results.append((method, median, base_median / median, q))

    cpu = platform.processor() or platform.machine()
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"cpu ({cpu}, {os.cpu_count()} cores), {torch.get_num_threads()} torch thread(s)")
    print(f"device {device}; {versions()}")
    print(f"model {args.model} ({baseline.counter.n_blocks} blocks, {cfg.model.dtype}, {cfg.model.height}x{cfg.model.width} px); "
          f"{args.steps} steps; {len(prompts)} prompt(s) in one batch, seed 0; {args.rounds} interleaved rounds after one "
          f"warm-up each; baseline median {base_median:.3f} s per batch; wall time {time.perf_counter() - started:.0f} s")
    print()
    print("| setting | family | median s (min-max) | speedup | last block skipped | blocks computed attn/MLP | own stats "
          "| PSNR dB | SSIM | task acc |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method, median, speedup, q in results:
        c = method.counts
        psnr = "ref" if method is baseline else fmt_db(q["psnr"])
        ssim = "ref" if method is baseline else f"{q['ssim']:.4f}"
        work = (f"{c['attention_pct']:.0f}%" if abs(c["attention_pct"] - c["mlp_pct"]) < 0.5
                else f"{c['attention_pct']:.0f}% / {c['mlp_pct']:.0f}%")
        print(f"| {method.name} | {method.family} | {median:.3f} ({min(method.times):.3f}-{max(method.times):.3f}) | "
              f"{speedup:.2f}x | {c['last_skipped']}/{c['calls']} | {work} | {method.own} | {psnr} | {ssim} | "
              f"{q['task_accuracy']:.2f} |")
    for method in rows:
        if method.status != "ok":
            print(f"| {method.name} | {method.family} | {method.status} | | | | | | | |")

    print()
    base_accuracy = results[0][3]["task_accuracy"]
    base_min = min(baseline.times)
    print(f"Equal quality: the fastest setting of ours and of any peer whose PSNR against the baseline reaches each "
          f"level (speedup of medians; in brackets, of the fastest round); baseline task accuracy {base_accuracy:.2f}.")
    for level in QUALITY_LEVELS_DB:
        fits = [r for r in results if r[0] is not baseline and r[3]["psnr"] >= level]
        best_ours = max((r for r in fits if r[0].family == "ours"), key=lambda r: r[2], default=None)
        best_peer = max((r for r in fits if r[0].family not in ("ours", "baseline")), key=lambda r: r[2], default=None)
        if best_ours is None or best_peer is None:
            print(f"- PSNR >= {level:.0f} dB: ours {best_ours[0].name if best_ours else 'none'}; "
                  f"best peer {best_peer[0].name if best_peer else 'none'}: no comparison")
            continue

        def describe(r) -> str:
            method, _, speedup, q = r
            return (f"{method.name} {speedup:.2f}x [{base_min / min(method.times):.2f}x] "
                    f"({fmt_db(q['psnr'])} dB, acc {q['task_accuracy']:.2f})")
        ratio = best_ours[2] / best_peer[2]
        ratio_min = min(best_peer[0].times) / min(best_ours[0].times)
        print(f"- PSNR >= {level:.0f} dB: {describe(best_ours)} vs best peer {describe(best_peer)} -> {ratio:.2f}x "
              f"[{ratio_min:.2f}x]: {'meets' if ratio >= 1.3 else 'misses'} the 1.3x aim")

if __name__ == "__main__":
    main()
