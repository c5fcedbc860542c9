"""Our Triton attention kernel (accel/kernels/attention.py) against torch's SDPA kernels and SageAttention,
measured side by side in one run.

Kernels: at FLUX.1's shape at 1024² (batch 1, 24 heads, 4096 image + 512 text tokens, head dim 128) and
Wan2.1 1.3B's at 480p, 81 frames (12 heads, 32760 tokens, 128): time, TFLOPS (4·B·H·N²·D / time) and the
max and mean |error| against a float32 reference, for ours (bf16, int8 Q·K^T), torch SDPA's flash,
memory-efficient and cuDNN kernels (torch.nn.attention.sdpa_kernel), and `sageattention.sageattn` where
it imports. bf16 inputs from N(0, 1).

End to end (--e2e): the full-size FLUX.1-dev transformer architecture (19 double- and 38 single-stream
blocks, 24 heads of 128; random weights, bf16) inside the tiny FLUX pipeline, 4096 image + 512 text tokens
(as at 1024²: the tiny VAE downsamples by 2, so 256² pixels), regional torch.compile, time per step of
the denoising loop for torch's SDPA against ours; rounds alternate the variants.

    python benchmarks/attention.py [--e2e] [--rounds 3] [--steps 28]
    python benchmarks/attention.py --interpret-smoke   # no GPU: tiny shapes in Triton's interpreter, checks the script
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {  # (batch, heads, tokens, head dim)
    "FLUX.1 1024² (24 heads, 4096+512 tokens)": (1, 24, 4608, 128),
    "Wan2.1 1.3B 480p 81 frames (12 heads, 32760 tokens)": (1, 12, 32760, 128),
}
SMOKE_SHAPES = {"smoke (2 heads, 100 tokens)": (1, 2, 100, 64)}
TORCH_KERNELS = {"torch SDPA flash": SDPBackend.FLASH_ATTENTION, "torch SDPA efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "torch SDPA cuDNN": SDPBackend.CUDNN_ATTENTION}
FLUX_DEV_BLOCKS = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                       guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def contenders() -> dict:
    from accel.kernels.attention import attention

    found = {"ours bf16": lambda q, k, v: attention(q, k, v, qk="bf16"),
             "ours int8 QK": lambda q, k, v: attention(q, k, v, qk="int8")}
    for name, backend in TORCH_KERNELS.items():
        def run(q, k, v, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        found[name] = run
    try:
        from sageattention import sageattn

        found["sageattention"] = lambda q, k, v: sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    except ImportError:
        print("sageattention does not import here: its row is left out")
    return found


def reference(q, k, v, chunk: int = 1024) -> torch.Tensor:
    """softmax(q·k^T/sqrt(d))·v in float32, `chunk` queries at a time so the scores fit in memory."""
    k, v = k.float(), v.float()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for start in range(0, q.shape[2], chunk):
        scores = q[:, :, start:start + chunk].float() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        out[:, :, start:start + chunk] = scores.softmax(dim=-1) @ v
    return out


def milliseconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def kernel_table(shapes: dict, device: torch.device) -> None:
    kernels = contenders()
    print("| shape | kernel | ms | TFLOPS | max error | mean error |")
    print("|---|---|---|---|---|---|")
    for shape_name, (batch, heads, tokens, head_dim) in shapes.items():
        generator = torch.Generator(device).manual_seed(0)
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=generator, device=device, dtype=torch.bfloat16)
                   for _ in range(3))
        expected = reference(q, k, v)
        flops = 4 * batch * heads * tokens ** 2 * head_dim
        for name, fn in kernels.items():
            try:
                error = (fn(q, k, v).float() - expected).abs()  # also the warm-up (and our autotuning)
                ms = milliseconds(lambda: fn(q, k, v), device)
            except Exception as err:  # noqa: BLE001  a kernel that does not run here gets a row saying why
                why = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
                print(f"| {shape_name} | {name} | does not run: {why} | | | |")
                continue
            print(f"| {shape_name} | {name} | {ms:.3f} | {flops / ms / 1e9:.1f} | {error.max().item():.2e} | "
                  f"{error.mean().item():.2e} |", flush=True)


def full_size_flux_transformer(pipe):
    """FLUX.1-dev's transformer architecture with random weights, in bf16 on the pipeline's device; its
    input and text projections take the tiny pipeline's latents and text embeddings (a rounding error of
    its compute, and it spares fabricating 12B parameters on disk)."""
    from diffusers import FluxTransformer2DModel

    small = pipe.transformer.config
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(pipe.device):
            return FluxTransformer2DModel(**FLUX_DEV_BLOCKS, in_channels=small.in_channels,
                                          joint_attention_dim=small.joint_attention_dim,
                                          pooled_projection_dim=small.pooled_projection_dim).eval()
    finally:
        torch.set_default_dtype(default_dtype)


def end_to_end(args, smoke: bool) -> None:
    import accel
    from common import describe, load, timed

    args.model = "flux_tiny"
    args.overrides = ["model.dtype=bfloat16", *args.overrides]
    cfg, pipe = load(args)
    if smoke:
        size, text_tokens, compile_ = 32, 32, {"strategy": "torch", "backend": "eager"}
    else:
        pipe.transformer = full_size_flux_transformer(pipe)
        size, text_tokens, compile_ = 256, 512, {"strategy": "torch", "backend": "inductor"}
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt("a red fox in fresh snow", prompt_2=None, device=pipe.device,
                                                      max_sequence_length=text_tokens)
    call = dict(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, num_inference_steps=args.steps,
                height=size, width=size, max_sequence_length=text_tokens, output_type="latent")
    variants = {"torch SDPA (auto)": {"compile": compile_},
                "ours bf16": {"attention": {"strategy": "accel_triton", "qk": "bf16"}, "compile": compile_},
                "ours int8 QK": {"attention": {"strategy": "accel_triton", "qk": "int8"}, "compile": compile_}}
    latents, times = {}, {name: [] for name in variants}
    for name, recipe in variants.items():  # warm-up: compiles each variant's graphs
        with accel.apply(pipe, recipe):
            latents[name] = timed(pipe, call)[0]
    for _ in range(args.rounds):
        for name, recipe in variants.items():
            with accel.apply(pipe, recipe):
                times[name].append(timed(pipe, call)[1] / args.steps)
    n_blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    tokens = (size // 4) ** 2 + text_tokens
    print(describe(pipe, cfg, args, n_blocks) + f"; {tokens} tokens; compile {compile_['backend']} (blocks)")
    print("| variant | time per step, median (min-max) | vs torch SDPA | latents vs SDPA's, max rel. error |")
    print("|---|---|---|---|")
    baseline = latents["torch SDPA (auto)"].float()
    sdpa = statistics.median(times["torch SDPA (auto)"])
    for name, per_step in times.items():
        median = statistics.median(per_step)
        error = ((latents[name].float() - baseline).abs().max() / baseline.abs().max()).item()
        print(f"| {name} | {1e3 * median:.1f} ms ({1e3 * min(per_step):.1f}-{1e3 * max(per_step):.1f}) | "
              f"{sdpa / median:.2f}x | {error:.2e} |")


def main() -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--e2e", action="store_true", help="also time the full-size FLUX transformer per step")
    own.add_argument("--interpret-smoke", action="store_true",
                     help="no GPU needed: tiny shapes in Triton's interpreter on the CPU, to check this script runs")
    mine, rest = own.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    from common import parse_args

    args = parse_args(__doc__, rounds=3)
    if mine.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # our kernels read it when they launch
        args.device, args.steps, args.rounds = "cpu", 2, 1
        device, shapes = torch.device("cpu"), SMOKE_SHAPES
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py measures GPU kernels and needs a CUDA GPU; --interpret-smoke runs tiny "
                 "shapes in Triton's interpreter on the CPU to check the script itself")
    else:
        device, shapes = torch.device("cuda"), SHAPES
        print(f"device {torch.cuda.get_device_name()}; torch {torch.__version__}")
    kernel_table(shapes, device)
    if mine.e2e or mine.interpret_smoke:
        end_to_end(args, smoke=mine.interpret_smoke)


if __name__ == "__main__":
    main()
