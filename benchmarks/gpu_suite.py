"""Every GPU figure the project needs, in one process, in at most 8 minutes including set-up (issue 22).

  1. The FLUX.1-dev transformer architecture at full size (19 double + 38 single blocks, 24 heads × 128,
     random bf16 weights made on the GPU) in a real FluxPipeline, 1024² (4096 image + 512 text tokens),
     the 28-step denoising loop (prompt embeddings given, latent output: no text encoder, no VAE decode).
     Variants, timed in interleaved rounds after one warm-up each: eager; regional compile; compile +
     float8 (torchao float8_dynamic); compile + our Triton attention (qk bf16, int8); compile + FBCache
     at a threshold T found on the model (the 40th percentile of the per-step distances of one
     generation at threshold 0, so about 40 % of the steps can cache); the whole stack (compile + float8
     + Triton int8 + FBCache at its own T). Seconds per generation (median, min-max), speedup against
     eager, and MFU from counted FLOPs (the formula is in the table; cached steps count block 0 only)
     against the GPU's dense bf16 peak.
  2. FBCache's hook overhead at threshold 0 (never caches; output bit for bit the uncached one), eager
     and compiled; and the cost of the cache's one host read-back per step: the relative L1 distance on
     FLUX-size residuals (1, 4096, 3072) bf16 with `.item()` against without (one synchronise at the end).
  3. Our Triton attention (bf16, int8 QK) against torch's SDPA flash, efficient and cuDNN kernels at
     FLUX's shape (1, 24, 4608, 128) and Wan 2.1 1.3B 480p 81 frames' (1, 12, 32760, 128): TFLOP/s
     (4·B·H·N²·D / time) and max |error| against the math kernel in float32. A kernel that does not
     run is a row saying why.
  4. Peak GPU memory of every variant of 1 and 2 (torch.cuda.max_memory_allocated, reset before each
     timed generation).
  5. `torchrun --nproc_per_node=1 -m accel ... parallel=mesh device=cuda` once (the NCCL launch path),
     its exit status, `stats.parallel` and time per image; beside it the multi-GPU projection of
     BENCHMARKS.md, labelled as a projection.
  6. The time budget: set-up and total wall time. Variants that would not fit are rows saying
     "skipped: time budget"; the table and the JSON are rewritten after every section, so a run killed
     at the 10-minute limit keeps what it measured.

On a GPU (one H100 or H200), from the repository root:

    timeout 540 python benchmarks/gpu_suite.py          # -> benchmarks/out/gpu_suite-DATE-TIME/

writes `gpu_suite.md` (one table, ready to paste into BENCHMARKS.md) and `gpu_suite.json` (the raw
numbers). `--dry-run` runs the same code at toy sizes on the CPU (1 double + 2 single blocks, 2 heads
× 64, 64 image tokens, 4 steps, 1 round; Triton in its interpreter, torchrun on gloo) and prints the
same rows; tests/test_gpu_suite.py runs it.
"""
from __future__ import annotations

import os
import sys
import time

STARTED = time.monotonic()  # the budget counts from here: imports and set-up are part of it
DRY_RUN = "--dry-run" in sys.argv[1:]
if DRY_RUN:
    # before triton is first imported (torch may import it): our kernel then runs in Triton's interpreter
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # modest on a shared CPU

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import accel  # noqa: E402
from attention import TORCH_KERNELS, contenders, milliseconds  # noqa: E402  benchmarks/attention.py
from common import timed  # noqa: E402

IMPORTS_S = time.monotonic() - STARTED

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480.0  # the whole GPU run, set-up included
TORCHRUN_RESERVE_S = 45.0  # kept free for the torchrun section, which runs after the FLUX variants
TORCHRUN_TIMEOUT_S = 150.0
WARMUP_ALLOWANCE_S = 40.0  # what a warm-up that compiles may take, beyond one generation
FLUX_RESERVE_S = 150.0  # kept free by the attention kernels (§3) for FLUX's variants, which run after them

FLUX_DEV = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, in_channels=64, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_TOY = dict(FLUX_DEV, num_layers=1, num_single_layers=2, attention_head_dim=64, num_attention_heads=2,
                joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 28, 28))

# Dense (not sparse) bf16 tensor-core peaks, TFLOP/s, by the name torch reports; the first match wins.
# H100 SXM reports itself as "NVIDIA H100 80GB HBM3".
DENSE_BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 80GB HBM3", 989.0), ("H100 SXM", 989.0))

# BENCHMARKS.md, "Projection, not a measurement" (issue 10: `python benchmarks/parallel_comm.py --project`):
# FLUX.1-dev 1024², 28 compiled steps, from xDiT's published 4.30 s on one H100 SXM.
# (GPUs, style, comm GB/step/GPU, comm ms/step, step ms, 28 steps s, speedup)
PARALLEL_PROJECTION = (
    (2, "ulysses", 1.63, 8.1, 84.9, 2.38, 1.81),
    (2, "ring", 1.63, 5.5, 82.3, 2.31, 1.87),
    (4, "ulysses", 1.23, 7.0, 45.4, 1.27, 3.39),
    (4, "ring", 2.44, 9.6, 48.0, 1.34, 3.20),
    (8, "ulysses", 0.73, 5.5, 24.7, 0.69, 6.21),
    (8, "ring", 2.85, 14.2, 33.4, 0.93, 4.60),
)


@dataclass(frozen=True)
class Sizes:
    """What a mode measures: the GPU run at full size, the dry run at toy sizes on the CPU."""

    device: str
    dtype: torch.dtype
    transformer: dict
    pixels: int  # height = width
    text_tokens: int
    steps: int
    warmup_steps: int  # a warm-up compiles every graph a variant needs; it need not run all the steps
    rounds: int
    attention_shapes: dict  # row label -> (batch, heads, tokens, head dim)
    residual_shape: tuple
    readback_calls: int
    torchrun_device: str


GPU_SIZES = Sizes(
    device="cuda", dtype=torch.bfloat16, transformer=FLUX_DEV, pixels=1024, text_tokens=512, steps=28,
    warmup_steps=2, rounds=3,
    attention_shapes={"FLUX.1 1024²": (1, 24, 4608, 128), "Wan 2.1 1.3B 480p 81 frames": (1, 12, 32760, 128)},
    residual_shape=(1, 4096, 3072), readback_calls=300, torchrun_device="cuda")
DRY_SIZES = Sizes(
    device="cpu", dtype=torch.bfloat16, transformer=FLUX_TOY, pixels=128, text_tokens=16, steps=4,
    warmup_steps=2, rounds=1,
    attention_shapes={"FLUX.1 1024²": (1, 2, 96, 64), "Wan 2.1 1.3B 480p 81 frames": (1, 2, 130, 64)},
    residual_shape=(1, 64, 128), readback_calls=30, torchrun_device="cpu")


# -- the report: one table, rewritten after every section --------------------------------------------------

COLUMNS = ("§", "measurement", "result", "vs reference", "peak GPU memory", "MFU / TFLOP/s", "detail")
CELL_NAMES = {"result": "result", "versus": "vs reference", "memory": "peak GPU memory", "mfu": "MFU / TFLOP/s",
              "detail": "detail"}
NOT_REACHED = "not reached (the run stopped before this row)"


class Report:
    """The table's rows (planned up front, so both modes print the same rows) and the raw numbers."""

    def __init__(self, out_dir: Path, meta: dict):
        self.out_dir = out_dir
        self.rows: dict[str, dict[str, str]] = {}
        self.data: dict[str, Any] = {"meta": meta, "budget": {}, "flux": {}, "overhead": {}, "readback": {},
                                     "attention": {}, "parallel": {}, "rows": []}
        self.header: list[str] = []

    def plan(self, section: int, name: str) -> None:
        self.rows[name] = {column: "" for column in COLUMNS}
        self.rows[name].update({"§": str(section), "measurement": name, "result": NOT_REACHED})

    def set(self, name: str, **cells: str) -> None:
        row = self.rows[name]  # a KeyError here is a row that was not planned: both modes must plan it
        for key, value in cells.items():
            row[CELL_NAMES[key]] = str(value)

    def markdown(self) -> str:
        lines = [*self.header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for row in self.rows.values():
            lines.append("| " + " | ".join(row[c].replace("|", "\\|") for c in COLUMNS) + " |")
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        self.data["rows"] = list(self.rows.values())
        raw = json.dumps(self.data, indent=1, default=str)
        for name, text in (("gpu_suite.md", self.markdown()), ("gpu_suite.json", raw)):
            partial = self.out_dir / (name + ".partial")
            partial.write_text(text)
            partial.replace(self.out_dir / name)  # never a half-written file, even when killed


class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds

    @staticmethod
    def elapsed() -> float:
        return time.monotonic() - STARTED

    def allows(self, seconds: float, reserve: float = 0.0) -> bool:
        return self.elapsed() + seconds + reserve <= self.seconds

    def skipped(self) -> str:
        return f"skipped: time budget ({self.elapsed():.0f} s of {self.seconds:.0f} s used)"


def why_not(err: BaseException, device: str) -> str:
    """A row's words for a variant or kernel that does not run here."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = text.split(". ")[0]  # the first sentence says it; torch's messages go on
    if isinstance(err, accel.AccelError) and "is not allowed: " in text:
        # "quant.kind='float8_dynamic' is not allowed: needs a CUDA GPU of ... (details)" -> the need itself
        return f"n/a on {device}: {text.split('is not allowed: ', 1)[1].split(' (')[0]}"
    if isinstance(err, accel.AccelError):
        return f"n/a on {device}: {text[:160]}"
    return f"does not run: {type(err).__name__}: {text[:160]}"


def gigabytes(n_bytes: Optional[int]) -> str:
    return "n/a (cpu)" if n_bytes is None else f"{n_bytes / 2 ** 30:.1f} GiB"


def spread(seconds: list[float]) -> str:
    """Median (min-max)."""
    return f"{statistics.median(seconds):.3f} ({min(seconds):.3f}-{max(seconds):.3f})"


# -- device facts ----------------------------------------------------------------------------------------

def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> Optional[int]:
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def device_name(device: str) -> str:
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s))"


def dense_bf16_peak(device: str) -> Optional[float]:
    """FLOP/s, or None for a device whose peak this script does not know."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in DENSE_BF16_PEAK_TFLOPS if key in name), None)


def versions() -> dict[str, str]:
    import diffusers
    import torchao
    import triton

    return {"torch": torch.__version__, "cuda": torch.version.cuda or "none", "diffusers": diffusers.__version__,
            "torchao": torchao.__version__, "triton": triton.__version__, "python": platform.python_version()}


# -- FLOPs of the FLUX transformer, counted from its architecture ------------------------------------------

FLOPS_FORMULA = ("2·in·out per token of every nn.Linear (image, text or joint tokens as the layer sees them; 1 "
                 "token for the time/guidance/pooled embedders and the AdaLN modulations) + 4·N²·d per head per "
                 "block for attention (N = image + text tokens); a step = outside the blocks + every block, a "
                 "cached step = outside + block 0")


def flux_flops(config: dict, image_tokens: int, text_tokens: int) -> dict[str, float]:
    """FLOPs of one denoising step of FluxTransformer2DModel (batch 1), by part.

    D = heads·head_dim, M = 4·D (the MLP), N = image + text tokens. Double block: AdaLN 2·(2·D·6D),
    attention projections 2·N·4D² (q, k, v, out on either stream), MLPs 2·N·2DM. Single block: AdaLN
    2·D·3D, q/k/v 2·N·3D², proj_mlp 2·N·DM, proj_out 2·N·(D+M)·D. Attention per block 4·N²·head_dim·heads.
    Outside the blocks: x_embedder, context_embedder, the time/guidance/pooled-text embedders (256→D→D
    twice, P→D→D), norm_out's modulation (D→2D) and proj_out (D→in_channels)."""
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    d = heads * head_dim
    m = 4 * d
    n = image_tokens + text_tokens
    channels, joint, pooled = config["in_channels"], config["joint_attention_dim"], config["pooled_projection_dim"]
    attention = 4 * n ** 2 * head_dim * heads
    double_linear = 2 * 2 * d * 6 * d + 2 * n * 4 * d * d + 2 * n * 2 * d * m
    single_linear = 2 * d * 3 * d + 2 * n * 3 * d * d + 2 * n * d * m + 2 * n * (d + m) * d
    timestep_embedder = 2 * (256 * d + d * d)  # sinusoidal 256 -> D -> D; the guidance embedder is another
    embedders = timestep_embedder * (2 if config.get("guidance_embeds") else 1) + 2 * (pooled * d + d * d)
    outside = (2 * image_tokens * channels * d + 2 * text_tokens * joint * d + embedders + 2 * d * 2 * d
               + 2 * image_tokens * d * channels)
    doubles, singles = config["num_layers"], config["num_single_layers"]
    linear = outside + doubles * double_linear + singles * single_linear
    attention_total = (doubles + singles) * attention
    return {"linear": linear, "attention": attention_total, "step": linear + attention_total,
            "cached_step": outside + double_linear + attention, "outside": outside,
            "double_block_linear": double_linear, "single_block_linear": single_linear,
            "attention_per_block": attention}


def counted_flops(pipe, call: dict) -> dict[str, float]:
    """torch's own FLOP counter over one step: the check on the formula (matmuls; and attention where
    the counter knows the SDPA kernel torch picked: CUDA's, not the CPU's)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        pipe(**{**call, "num_inference_steps": 1}, generator=torch.Generator("cpu").manual_seed(0))
    by_op = {str(op): count for op, count in counter.get_flop_counts()["Global"].items()}
    attention = sum(count for op, count in by_op.items() if "attention" in op)
    return {"total": counter.get_total_flops(), "attention": attention,
            "linear": counter.get_total_flops() - attention, "by_op": by_op}


# -- the FLUX pipeline -----------------------------------------------------------------------------------

def randomize_(model: torch.nn.Module) -> None:
    """Normal weights at the scale of nn.Linear's default init (std 1/sqrt(3·fan_in)), zero biases: the
    residual stream grows only by the blocks' gated sums, so bf16 activations stay finite."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, (3 * param.shape[1]) ** -0.5)
            elif name.endswith("bias"):
                param.zero_()


def flux_transformer(sizes: Sizes):
    """FLUX's transformer made directly on the device, in the run's dtype: nothing is written or loaded."""
    from diffusers import FluxTransformer2DModel

    default = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(sizes.dtype)
    try:
        with torch.device(sizes.device):
            transformer = FluxTransformer2DModel(**sizes.transformer).eval()
    finally:
        torch.set_default_dtype(default)
    randomize_(transformer)
    return transformer


def latent_vae():
    """A tiny 4-block VAE: scale factor 8 as FLUX's, so 1024² gives 64×64 packed latents, 4096 tokens. It
    only sets the latent size: with output_type="latent" it never decodes."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(4, 4, 4, 4),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=4)


def flux_pipeline(sizes: Sizes):
    """A real diffusers FluxPipeline (accel hooks its __call__) around the full-size transformer; its text
    encoders are the tiny ones, as prompt embeddings are given."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from accel.models.tiny.parts import tiny_clip, tiny_t5

    text_encoder, tokenizer = tiny_clip()
    text_encoder_2, tokenizer_2 = tiny_t5()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)  # FLUX.1-dev's
    pipe = FluxPipeline(scheduler=scheduler, vae=latent_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=flux_transformer(sizes))
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.to(sizes.device).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_tokens(pipe, pixels: int) -> int:
    return (pixels // pipe.vae_scale_factor // 2) ** 2  # FLUX packs 2×2 latents into one token


def denoising_call(pipe, sizes: Sizes) -> dict:
    config = sizes.transformer
    generator = torch.Generator("cpu").manual_seed(1)
    prompt_embeds = torch.randn(1, sizes.text_tokens, config["joint_attention_dim"], generator=generator)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=generator)
    return dict(prompt_embeds=prompt_embeds.to(sizes.device, sizes.dtype),
                pooled_prompt_embeds=pooled.to(sizes.device, sizes.dtype), num_inference_steps=sizes.steps,
                height=sizes.pixels, width=sizes.pixels, max_sequence_length=sizes.text_tokens, guidance_scale=3.5,
                output_type="latent")


# -- the variants ----------------------------------------------------------------------------------------

COMPILE = {"compile": {"strategy": "torch"}}
FLOAT8 = {"quant": {"strategy": "torchao", "kind": "float8_dynamic"}}


def triton_attention(qk: str) -> dict:
    return {"attention": {"strategy": "accel_triton", "qk": qk}}


def fbcache(threshold: float) -> dict:
    return {"cache": {"strategy": "fbcache", "residual_diff_threshold": threshold}}


CACHED_PERCENTILE = 40  # the threshold lets steps closer than this percentile of the distances cache


@dataclass
class Variant:
    name: str
    section: int
    stages: dict
    calibrated: bool = False  # FBCache at a threshold found on this very stack
    overhead_of: Optional[str] = None  # the uncached variant it is compared with (hook overhead)
    status: str = NOT_REACHED
    threshold: Optional[float] = None
    distances: list = field(default_factory=list)
    warmup_s: Optional[float] = None
    warmup_stats: dict = field(default_factory=dict)  # what the warm-up's run did (the compile stage's graphs)
    times: list = field(default_factory=list)  # seconds per generation, one per round
    apply_remove_s: list = field(default_factory=list)
    peak_bytes: Optional[int] = None
    stats: dict = field(default_factory=dict)
    latents: Optional[torch.Tensor] = None

    def recipe(self) -> dict:
        return {**self.stages, **fbcache(self.threshold)} if self.calibrated else self.stages

    @property
    def ran(self) -> bool:
        return bool(self.times)

    @property
    def graphs(self) -> Optional[str]:
        """What its compiled graphs depend on (None: nothing compiled); variants that share it share graphs."""
        if "compile" not in self.stages:
            return None
        return json.dumps({stage: self.stages.get(stage) for stage in ("quant", "attention")}, sort_keys=True)

    def round_estimate(self, fallback: Optional[float]) -> float:
        """Seconds its next timed generation will take with apply and remove: the last one's, else `fallback`."""
        if not self.times:
            return fallback or 0.0
        return self.times[-1] + (self.apply_remove_s[-1] if self.apply_remove_s else 0.0)


# Warm-ups run in this order: when time runs short, the variants left out are the ones that compile graphs
# of their own (the table keeps the order of flux_variants()).
RUN_ORDER = ("eager", "compile", "eager + fbcache@0 (hook overhead)", "compile + fbcache@0 (hook overhead)",
             "compile + fbcache@T", "compile + fp8", "whole stack: compile + fp8 + triton int8 + fbcache@T",
             "compile + triton bf16", "compile + triton int8")


def flux_variants() -> list[Variant]:
    """In the table's order."""
    return [
        Variant("eager", 1, {}),
        Variant("compile", 1, COMPILE),
        Variant("compile + fp8", 1, {**COMPILE, **FLOAT8}),
        Variant("compile + triton bf16", 1, {**COMPILE, **triton_attention("bf16")}),
        Variant("compile + triton int8", 1, {**COMPILE, **triton_attention("int8")}),
        Variant("compile + fbcache@T", 1, COMPILE, calibrated=True),
        Variant("whole stack: compile + fp8 + triton int8 + fbcache@T", 1,
                {**COMPILE, **FLOAT8, **triton_attention("int8")}, calibrated=True),
        Variant("eager + fbcache@0 (hook overhead)", 2, fbcache(0.0), overhead_of="eager"),
        Variant("compile + fbcache@0 (hook overhead)", 2, {**COMPILE, **fbcache(0.0)}, overhead_of="compile"),
    ]


def calibrate(pipe, variant: Variant, call: dict) -> None:
    """One generation of the variant's stack with FBCache at 0 (every step computed, every distance
    measured): its threshold is the distances' 40th percentile. Also the variant's warm-up."""
    with accel.apply(pipe, {**variant.stages, **fbcache(0.0)}) as run:
        timed(pipe, call)
        variant.warmup_stats = run.stats()
    variant.distances = [d for d in variant.warmup_stats["cache"]["diffs"][0] if d is not None]
    variant.threshold = float(np.percentile(variant.distances, CACHED_PERCENTILE))


def warm_up(pipe, variant: Variant, call: dict, sizes: Sizes) -> None:
    """A generation of `warmup_steps` (enough to compile every graph); eager runs every step, as its time
    is the budget's first estimate of a generation."""
    start = time.perf_counter()
    try:
        if variant.calibrated:
            calibrate(pipe, variant, call)
        else:
            steps = sizes.steps if not variant.stages else sizes.warmup_steps
            with accel.apply(pipe, variant.recipe()) as run:
                timed(pipe, {**call, "num_inference_steps": steps})
                variant.warmup_stats = run.stats()
        variant.status = "ok"
    except Exception as err:  # noqa: BLE001  a variant that cannot run here gets a row saying why
        variant.status = why_not(err, sizes.device)
        log_failure(variant.name, err)
    variant.warmup_s = time.perf_counter() - start


def timed_round(pipe, variant: Variant, call: dict, device: str) -> None:
    start = time.perf_counter()
    try:
        with accel.apply(pipe, variant.recipe()) as run:
            reset_peak_memory(device)
            latents, seconds = timed(pipe, call)
            peak = peak_memory(device)
            variant.stats = run.stats()
    except Exception as err:  # noqa: BLE001
        variant.status = why_not(err, device)
        log_failure(variant.name, err)
        return
    variant.times.append(seconds)
    variant.apply_remove_s.append(time.perf_counter() - start - seconds)
    variant.latents = latents
    if peak is not None:
        variant.peak_bytes = max(variant.peak_bytes or 0, peak)


def log_failure(what: str, err: BaseException) -> None:
    print(f"gpu_suite: {what}: {type(err).__name__}: {err}".splitlines()[0], file=sys.stderr, flush=True)
    if not isinstance(err, accel.AccelError):
        traceback.print_exc(file=sys.stderr)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # after an out-of-memory error the next variant starts clean


def run_variants(pipe, variants: list[Variant], call: dict, sizes: Sizes, budget: Budget, report: Report,
                 on_progress: Callable[[], None]) -> None:
    """Warm every variant up, then time them in interleaved rounds, each round starting one variant later."""
    eager_estimate = None
    for variant in variants:
        warmed = [v for v in variants if v.status == "ok"]
        one_round = sum(v.round_estimate(eager_estimate) for v in [*warmed, variant])
        compiles = variant.graphs is not None and variant.graphs not in {v.graphs for v in warmed}
        if eager_estimate is not None:  # eager goes first, whatever the time: its generation is the yardstick
            # room for this warm-up (and its compiling), one round of every variant warmed so far, and torchrun
            warm_up_s = eager_estimate + (WARMUP_ALLOWANCE_S if compiles else 0.0)
            if not budget.allows(one_round + warm_up_s, TORCHRUN_RESERVE_S):
                variant.status = budget.skipped()
                continue
        warm_up(pipe, variant, call, sizes)
        if variant.name == "eager" and variant.status == "ok":
            eager_estimate = variant.warmup_s
        on_progress()
    active = [v for v in variants if v.status == "ok"]
    for round_index in range(sizes.rounds):
        shift = round_index % max(1, len(active))
        for variant in active[shift:] + active[:shift]:
            if variant.status != "ok":
                continue
            if not budget.allows(variant.round_estimate(eager_estimate), TORCHRUN_RESERVE_S):
                report.data["budget"]["rounds_cut"] = f"round {round_index + 1} stopped before {variant.name}"
                on_progress()
                return
            timed_round(pipe, variant, call, sizes.device)
        on_progress()


def mfu(variant: Variant, flops: dict, steps: int, peak: Optional[float]) -> tuple[float, Optional[float]]:
    """FLOPs one generation really ran (a cached step: outside the blocks and block 0), and its MFU."""
    cache = variant.stats.get("cache")
    cached = cache["cached"] if cache else 0
    work = (steps - cached) * flops["step"] + cached * flops["cached_step"]
    seconds = statistics.median(variant.times)
    return work, (work / seconds / peak if peak else None)


def relative_l2(latents: torch.Tensor, reference: torch.Tensor) -> float:
    return ((latents.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12)).item()


def variant_row(report: Report, variant: Variant, by_name: dict, flops: dict, sizes: Sizes,
                peak: Optional[float]) -> None:
    if not variant.ran:
        warmed_only = f"skipped: time budget (warmed up in {variant.warmup_s or 0:.1f} s; no round fitted)"
        report.set(variant.name, result=warmed_only if variant.status == "ok" else variant.status)
        return
    eager = by_name["eager"]
    median = statistics.median(variant.times)
    details = [f"{len(variant.times)} round(s), warm-up {variant.warmup_s:.2f} s"]
    if variant.overhead_of:
        base = by_name[variant.overhead_of]
        versus = f"{100 * (median / statistics.median(base.times) - 1):+.2f} % over {base.name}" if base.ran else "n/a"
        same = torch.equal(variant.latents, base.latents) if base.ran else None
        details.insert(0, f"output bit-identical to {base.name}: {'yes' if same else 'NO' if same is False else 'n/a'}")
    else:
        versus = f"{statistics.median(eager.times) / median:.2f}x" if eager.ran else "n/a"
        if eager.ran and variant is not eager:
            details.insert(0, f"latents vs eager: rel. L2 {relative_l2(variant.latents, eager.latents):.2e}")
    cache = variant.stats.get("cache")
    if variant.calibrated and cache:
        details.insert(0, f"T={variant.threshold:.4g} (the {CACHED_PERCENTILE}th percentile of "
                          f"{len(variant.distances)} distances at 0); cached {cache['cached']}/{cache['calls']} steps "
                          f"({100 * cache['cached'] / cache['calls']:.0f} %), map {cache['hit_map'][0]}")
    compiled = variant.warmup_stats.get("compile")
    if compiled:
        details.append(f"compile at warm-up: {compiled['graphs']} new graphs, {compiled['graph_breaks']} breaks")
    if not torch.isfinite(variant.latents.float()).all():
        details.append("latents NOT finite")
    if variant.status != "ok":  # a later round failed
        details.append(variant.status)
    work, utilisation = mfu(variant, flops, sizes.steps, peak)
    mfu_text = f"{100 * utilisation:.1f} %" if utilisation is not None else "n/a, peak unknown"
    report.set(variant.name, result=f"{spread(variant.times)} s per generation", versus=versus,
               memory=gigabytes(variant.peak_bytes), mfu=f"{mfu_text} ({work / 1e12:.3g} TFLOP)",
               detail="; ".join(details))


def flux_section(sizes: Sizes, budget: Budget, report: Report) -> tuple[Optional[float], Optional[str]]:
    """Sections 1, 2 (hook overhead) and 4. Returns the compiled (else eager) time per step and which
    it is, for the read-back's share of a step."""
    start = time.perf_counter()
    pipe = flux_pipeline(sizes)
    call = denoising_call(pipe, sizes)
    tokens = image_tokens(pipe, sizes.pixels)
    report.data["budget"]["flux_setup_s"] = round(time.perf_counter() - start, 2)
    flops = flux_flops(sizes.transformer, tokens, sizes.text_tokens)
    counted = counted_flops(pipe, call)
    peak = dense_bf16_peak(sizes.device)
    variants = flux_variants()
    by_name = {v.name: v for v in variants}

    def on_progress():
        for variant in variants:
            variant_row(report, variant, by_name, flops, sizes, peak)
        report.data["flux"]["variants"] = {v.name: variant_data(v) for v in variants}
        report.data["overhead"] = {v.overhead_of: variant_data(v) for v in variants if v.overhead_of}
        report.write()

    blocks = sizes.transformer["num_layers"] + sizes.transformer["num_single_layers"]
    report.data["flux"].update(image_tokens=tokens, text_tokens=sizes.text_tokens, steps=sizes.steps, blocks=blocks,
                               flops=flops, counted_flops=counted, peak_flops=peak)
    attention_check = (f"attention {counted['attention'] / flops['attention']:.4f}" if counted["attention"]
                       else "attention not counted here (the CPU's SDPA kernel is unknown to the counter)")
    report.set(FLOPS_ROW, result=f"{flops['step'] / 1e12:.4g} TFLOP",
               versus=f"FlopCounterMode / formula: linear {counted['linear'] / flops['linear']:.4f}, "
                            f"{attention_check}",
               mfu="n/a, peak unknown" if peak is None else f"peak {peak / 1e12:.0f} TFLOP/s dense bf16",
               detail=f"{FLOPS_FORMULA}; linear {flops['linear'] / 1e12:.4g} T + attention "
                      f"{flops['attention'] / 1e12:.4g} T; cached step {flops['cached_step'] / 1e12:.4g} T; "
                      f"{blocks} blocks, {tokens} image + {sizes.text_tokens} text tokens")
    report.write()
    run_variants(pipe, sorted(variants, key=lambda v: RUN_ORDER.index(v.name)), call, sizes, budget, report,
                 on_progress)
    on_progress()
    reference = next((v for v in (by_name["compile"], by_name["eager"]) if v.ran), None)
    step_s = statistics.median(reference.times) / sizes.steps if reference else None
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return step_s, (reference.name if reference else None)


def variant_data(variant: Variant) -> dict:
    known = variant.threshold is not None or not variant.calibrated
    return {"status": variant.status, "recipe": variant.recipe() if known else variant.stages,
            "times_s": variant.times, "median_s": statistics.median(variant.times) if variant.times else None,
            "apply_remove_s": variant.apply_remove_s, "warmup_s": variant.warmup_s,
            "warmup_stats": variant.warmup_stats, "peak_bytes": variant.peak_bytes, "threshold": variant.threshold,
            "distances_at_0": variant.distances, "stats": variant.stats}


# -- section 2: the cache's read-back ---------------------------------------------------------------------

READBACK_REPEATS = 5


def readback_section(sizes: Sizes) -> dict:
    """Per call, the relative L1 distance FBCache takes each step, read back with .item() (the host waits
    for the device) against left on the device (synchronised once after all calls)."""
    generator = torch.Generator("cpu").manual_seed(2)
    before = torch.randn(sizes.residual_shape, generator=generator).to(sizes.device, sizes.dtype)
    now = before + 0.1 * torch.randn(sizes.residual_shape, generator=generator).to(sizes.device, sizes.dtype)

    def distance():
        return (now - before).abs().mean() / before.abs().mean().clamp_min(1e-12)

    def per_call(read_back: bool) -> float:
        synchronize(sizes.device)
        start = time.perf_counter()
        for _ in range(sizes.readback_calls):
            value = distance()
            if read_back:
                value.item()
        synchronize(sizes.device)
        return (time.perf_counter() - start) / sizes.readback_calls

    per_call(True), per_call(False)  # warm-up
    samples = {"with_item_s": [], "device_only_s": []}
    for _ in range(READBACK_REPEATS):  # alternated, so a drifting machine moves both alike
        samples["with_item_s"].append(per_call(True))
        samples["device_only_s"].append(per_call(False))
    result = {name: statistics.median(values) for name, values in samples.items()}
    result.update(samples=samples, shape=list(sizes.residual_shape), calls=sizes.readback_calls,
                  dtype=str(sizes.dtype))
    return result


def readback_rows(report: Report, result: dict, step_s: Optional[float], step_of: Optional[str]) -> None:
    shape = "×".join(map(str, result["shape"]))
    extra = result["with_item_s"] - result["device_only_s"]
    share = f"{100 * extra / step_s:.3f} % of a step ({step_of}: {1e3 * step_s:.1f} ms)" if step_s else "n/a"
    report.set("read-back: relative L1 with .item()", result=f"{1e6 * result['with_item_s']:.1f} µs per call",
               detail=f"residuals {shape} {result['dtype'][len('torch.'):]}, median of {READBACK_REPEATS} × {result['calls']} calls")
    report.set("read-back: relative L1 on the device only", result=f"{1e6 * result['device_only_s']:.1f} µs per call",
               detail="synchronised once after all calls")
    report.set("read-back: cost per step", result=f"{1e6 * extra:+.1f} µs", versus=share,
               detail="one read-back per step (FBCache's decision)")
    report.data["readback"] = {**result, "cost_per_step_s": extra, "step_s": step_s, "step_of": step_of}


# -- section 3: attention kernels --------------------------------------------------------------------------

KERNELS = ("ours bf16", "ours int8 QK", *TORCH_KERNELS)


def math_reference(q, k, v, chunk: int = 1024) -> torch.Tensor:
    """torch's math SDPA kernel in float32, `chunk` query rows at a time (rows are independent), so that
    Wan's 32760² scores never have to fit at once."""
    k, v = k.float(), v.float()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    with sdpa_kernel([SDPBackend.MATH]):
        for start in range(0, q.shape[2], chunk):
            out[:, :, start:start + chunk] = F.scaled_dot_product_attention(q[:, :, start:start + chunk].float(), k, v)
    return out


def attention_section(sizes: Sizes, budget: Budget, report: Report, peak: Optional[float]) -> None:
    kernels = contenders()  # ours, torch's SDPA kernels, and SageAttention where it imports
    device = torch.device(sizes.device)
    for label, shape in sizes.attention_shapes.items():
        if not budget.allows(0.0, TORCHRUN_RESERVE_S + FLUX_RESERVE_S):
            for name in KERNELS:
                report.set(f"{label}: {name}", result=budget.skipped())
            continue
        generator = torch.Generator("cpu").manual_seed(0)
        q, k, v = (torch.randn(shape, generator=generator).to(device, torch.bfloat16) for _ in range(3))
        expected = math_reference(q, k, v)
        flops = 4 * math.prod(shape) * shape[2]  # 4·B·H·N²·D
        measured = {}
        for name, kernel in kernels.items():
            measured[name] = kernel_figures(kernel, q, k, v, expected, flops, device)
        flash_ms = measured.get("torch SDPA flash", {}).get("ms")
        for name, figures in measured.items():
            kernel_row(report, f"{label}: {name}", shape, figures, flash_ms, peak)
        report.data["attention"][label] = {"shape": list(shape), "flops": flops, "kernels": measured}
        del q, k, v, expected
        report.write()


def kernel_figures(kernel, q, k, v, expected, flops: float, device: torch.device) -> dict:
    try:
        error = (kernel(q, k, v).float() - expected).abs().max().item()  # also its warm-up (and our autotuning)
        ms = milliseconds(lambda: kernel(q, k, v), device)
    except Exception as err:  # noqa: BLE001  a kernel that does not run here gets a row saying why
        return {"status": why_not(err, device.type)}
    return {"status": "ok", "ms": ms, "tflops": flops / ms / 1e9, "max_abs_error": error}


def kernel_row(report: Report, row: str, shape: tuple, figures: dict, flash_ms: Optional[float],
               peak: Optional[float]) -> None:
    if figures["status"] != "ok":
        report.set(row, result=figures["status"], detail=f"shape {tuple(shape)}")
        return
    share = f" ({100 * figures['tflops'] * 1e12 / peak:.1f} % of peak)" if peak else ""
    report.set(row, result=f"{figures['ms']:.3f} ms",
               versus=f"{flash_ms / figures['ms']:.3g}x SDPA flash's speed" if flash_ms else "n/a (no SDPA flash)",
               mfu=f"{figures['tflops']:.4g} TFLOP/s{share}",
               detail=f"max abs error {figures['max_abs_error']:.2e} vs math SDPA in fp32; shape {tuple(shape)}")


# -- section 5: the torchrun launch path -------------------------------------------------------------------

def torchrun_section(sizes: Sizes, out_dir: Path, report: Report) -> None:
    run_dir = out_dir / "torchrun_run"
    accel_args = ["recipe=flux_fbcache", "model=flux_tiny", "parallel=mesh", f"device={sizes.torchrun_device}",
                  "steps=4", "warmup=0", f"hydra.run.dir={run_dir}"]
    launcher = ["--standalone", "--nproc_per_node=1", "-m", "accel", *accel_args]
    shown = "torchrun " + " ".join(shlex.quote(a) for a in launcher)
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path,
           **({"OMP_NUM_THREADS": "1"} if sizes.device == "cpu" else {})}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", *launcher], cwd=out_dir, env=env,
                              capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        report.set(TORCHRUN_ROW, result=f"timed out after {TORCHRUN_TIMEOUT_S:.0f} s", detail=shown)
        report.data["parallel"]["torchrun"] = {"command": shown, "timed_out": True}
        return
    wall = time.perf_counter() - start
    (out_dir / "torchrun.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    result = {"command": shown, "exit_status": done.returncode, "wall_s": wall}
    report_file = run_dir / "report.json"
    if report_file.exists():
        run = json.loads(report_file.read_text())
        result["stats_parallel"] = run.get("stats", {}).get("parallel")
        result["per_image_s"] = run.get("timings", {}).get("accelerated", {}).get("per_image_s")
        result["error"] = run.get("error")
    parallel = result.get("stats_parallel")
    backend = (parallel or {}).get("backend", "not named in stats.parallel")
    per_image = f"{result['per_image_s']:.4f} s per image" if result.get("per_image_s") else "no time per image"
    tail = "" if done.returncode == 0 else f"; {result.get('error') or first_error(done.stderr)}"
    report.set(TORCHRUN_ROW, result=f"exit {done.returncode}", versus=per_image,
               detail=f"backend {backend}; stats.parallel {json.dumps(parallel)}; wall {wall:.1f} s; `{shown}`{tail}")
    report.data["parallel"]["torchrun"] = result


def first_error(stderr: str) -> str:
    """The line of a failed run's stderr that names the error (not the launcher's own traceback)."""
    lines = [line.strip() for line in stderr.splitlines() if "Error" in line and "ChildFailedError" not in line]
    return lines[0][:200] if lines else "no error line in stderr (see torchrun.log)"


def projection_rows(report: Report) -> None:
    for gpus, style, comm_gb, comm_ms, step_ms, seconds, speedup in PARALLEL_PROJECTION:
        report.set(projection_name(gpus, style), result=f"{seconds:.2f} s per 28 steps (projection, not measured)",
                   versus=f"{speedup:.2f}x one H100",
                   detail=f"comm {comm_gb} GB/step/GPU, {comm_ms} ms/step; step {step_ms} ms; BENCHMARKS.md issue 10, "
                          "from xDiT's 4.30 s on one H100 SXM")
    report.data["parallel"]["projection_not_measured"] = [
        dict(zip(("gpus", "style", "comm_gb_per_step_per_gpu", "comm_ms_per_step", "step_ms", "seconds_28_steps",
                  "speedup"), row)) for row in PARALLEL_PROJECTION]


def projection_name(gpus: int, style: str) -> str:
    return f"{gpus} GPUs {style} (projection, not measured)"


# -- the run ---------------------------------------------------------------------------------------------

FLOPS_ROW = "FLOPs per step (analytic)"
TORCHRUN_ROW = "torchrun --nproc_per_node=1 (the distributed launch path)"
SETUP_ROW = "set-up (imports, device, building the model)"
TOTAL_ROW = "total wall time"


def plan_rows(report: Report, sizes: Sizes) -> None:
    report.plan(1, FLOPS_ROW)
    for variant in flux_variants():  # section 1's, then section 2's
        report.plan(variant.section, variant.name)
    for name in ("read-back: relative L1 with .item()", "read-back: relative L1 on the device only",
                 "read-back: cost per step"):
        report.plan(2, name)
    for label in sizes.attention_shapes:
        for name in KERNELS:
            report.plan(3, f"{label}: {name}")
    report.plan(5, TORCHRUN_ROW)
    for gpus, style, *_ in PARALLEL_PROJECTION:
        report.plan(5, projection_name(gpus, style))
    report.plan(6, SETUP_ROW)
    report.plan(6, TOTAL_ROW)


def header(sizes: Sizes, meta: dict, peak: Optional[float]) -> list[str]:
    v = meta["versions"]
    mode = "dry run at toy sizes on the CPU" if DRY_RUN else "GPU run"
    config = sizes.transformer
    dtype = str(sizes.dtype)[len("torch."):]
    peak_text = (f"{peak / 1e12:.0f} TFLOP/s dense bf16 ({meta['device']})" if peak else
                 "unknown for this device: MFU is n/a")
    return [
        f"### {meta['device']}, torch {v['torch']} (CUDA {v['cuda']}), diffusers {v['diffusers']}, torchao "
        f"{v['torchao']}, triton {v['triton']}, {meta['date']} — GPU suite ({mode})",
        "",
        f"Command (from the repository root): `{meta['command']}`.",
        f"FLUX.1 transformer architecture ({config['num_layers']} double + {config['num_single_layers']} single "
        f"blocks, {config['num_attention_heads']} heads × {config['attention_head_dim']}, random {dtype} "
        f"weights), {sizes.pixels}² px, {sizes.text_tokens} text tokens, {sizes.steps} steps, denoising loop only "
        f"(prompt embeddings given, latent output); {sizes.rounds} interleaved round(s) after one warm-up per "
        f"variant: {sizes.warmup_steps} steps, enough to compile (eager: every step, its time is the budget's "
        "first estimate; a cached variant: its threshold's calibration run, every step).",
        f"MFU peak: {peak_text}; MFU counts bf16-equivalent work against the bf16 peak for float8 variants too. Peak "
        "GPU memory: torch.cuda.max_memory_allocated, reset before each timed generation (weights included).",
        "The §5 multi-GPU rows are a projection copied from BENCHMARKS.md, not measured here.",
    ]


def output_folder(requested: Optional[str]) -> Path:
    """The folder asked for (or benchmarks/out/gpu_suite-DATE-TIME), or, when it already holds something,
    the first free one with a suffix: an earlier run's figures are never overwritten."""
    base = Path(requested) if requested else ROOT / "benchmarks" / "out" / \
        f"gpu_suite-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    candidate, suffix = base, 0
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        suffix += 1
        candidate = base.with_name(f"{base.name}-{suffix}")
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)  # DRY_RUN reads argv
    parser.add_argument("--dry-run", action="store_true",
                        help="the same code at toy sizes on the CPU (Triton's interpreter, gloo), to check the script")
    parser.add_argument("--out", help="output folder (default benchmarks/out/gpu_suite-DATE-TIME; never overwritten)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-time budget, set-up included")
    return parser.parse_args()


def start_device(sizes: Sizes) -> float:
    """Seconds to bring the device up (the CUDA context and the first allocation); part of the set-up."""
    start = time.perf_counter()
    if sizes.device == "cuda":
        torch.cuda.init()
        torch.ones(1, device="cuda").sum().item()
    else:
        torch.set_num_threads(1)  # a dry run shares its CPU
    return time.perf_counter() - start


def allow_every_variant_its_graphs() -> None:
    """One process compiles each block class once per variant (plain, float8, two attention kernels and the
    whole stack; the single blocks twice, for two input strides): more entries per function than dynamo
    keeps by default (8), past which the last variants would not run compiled as their rows say."""
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, and the older one
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
            return


def run_metadata(sizes: Sizes, budget: Budget) -> dict:
    return {"mode": "dry-run" if DRY_RUN else "gpu", "device": device_name(sizes.device), "versions": versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]), "budget_s": budget.seconds,
            "sizes": {"transformer": sizes.transformer, "pixels": sizes.pixels, "text_tokens": sizes.text_tokens,
                      "steps": sizes.steps, "warmup_steps": sizes.warmup_steps, "rounds": sizes.rounds,
                      "dtype": str(sizes.dtype)}}


def main() -> None:
    args = parse_args()
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_suite.py measures a CUDA GPU and none is here; --dry-run runs the same code at toy "
                 "sizes on the CPU")
    device_s = start_device(sizes)
    allow_every_variant_its_graphs()
    budget = Budget(args.budget_s)
    out_dir = output_folder(args.out)
    peak = dense_bf16_peak(sizes.device)
    report = Report(out_dir, run_metadata(sizes, budget))
    report.header = header(sizes, report.data["meta"], peak)
    plan_rows(report, sizes)
    projection_rows(report)
    report.write()
    print(f"gpu_suite: writing to {out_dir}", flush=True)

    readback = readback_section(sizes)
    readback_rows(report, readback, None, None)
    report.write()
    attention_section(sizes, budget, report, peak)
    step_s, step_of = flux_section(sizes, budget, report)
    readback_rows(report, readback, step_s, step_of)
    flux_setup_s = report.data["budget"]["flux_setup_s"]
    setup_s = IMPORTS_S + device_s + flux_setup_s
    report.set(SETUP_ROW, result=f"{setup_s:.1f} s",
               detail=f"imports {IMPORTS_S:.1f} s, device {device_s:.1f} s, FLUX pipeline {flux_setup_s:.1f} s")
    report.write()
    if budget.allows(TORCHRUN_RESERVE_S / 2):
        torchrun_section(sizes, out_dir, report)
    else:
        report.set(TORCHRUN_ROW, result=budget.skipped())
    elapsed = budget.elapsed()
    report.set(TOTAL_ROW, result=f"{elapsed:.0f} s", versus=f"budget {budget.seconds:.0f} s",
               detail=report.data["budget"].get("rounds_cut", "every planned round ran"))
    report.data["budget"].update(budget_s=budget.seconds, imports_s=IMPORTS_S, device_s=device_s, setup_s=setup_s,
                                 elapsed_s=elapsed,
                                 skipped=[name for name, row in report.rows.items() if "skipped" in row["result"]])
    report.write()
    print(report.markdown())
    print(f"gpu_suite: {out_dir / 'gpu_suite.md'} and {out_dir / 'gpu_suite.json'}")


if __name__ == "__main__":
    main()
