"""Communication per denoising step and rank, computed from the attention shapes and measured by
accel's own collectives, for Ulysses, Ring and CFG parallel; and a step-time projection for FLUX.1-dev.

    torchrun --nproc_per_node=2 benchmarks/parallel_comm.py            # measured vs computed, tiny FLUX
    python benchmarks/parallel_comm.py --project                        # FLUX 1024² on 1-8 H100s (paper)

Bytes are what one rank receives. Per attention of B·H heads of size D over Nq queries and Nk keys
(element size e), across P ranks:
  Ulysses: 4 all-to-alls (q, k, v, output), each receiving (P−1)/P of a 1/P slice:
           (P−1)/P² · B·H·D·e · (2·Nq + 2·Nk)
  Ring:    P−1 hops of this rank's key and value slices: (P−1) · 2·B·H·(Nk/P)·D·e
and once per denoiser call the gather of the blocks' outputs, (P−1) slices of (B, N/P, C) per stream.
CFG (separate calls): each rank receives the other branches' outputs once per step.
"""
from __future__ import annotations

import argparse
import os

import torch


def attention_bytes(style: str, p: int, b: int, h: int, d: int, nq: int, nk: int, e: int) -> float:
    if style == "ulysses":
        return (p - 1) / p**2 * b * h * d * e * (2 * nq + 2 * nk)
    return (p - 1) * 2 * b * h * (nk / p) * d * e


def flux_step_bytes(style: str, p: int, *, blocks: int, heads: int, head_dim: int, image: int, text: int,
                    width: int, e: int, b: int = 1) -> float:
    """One FLUX denoiser call: one joint attention per block, then the gather of both streams."""
    n = image + text
    gather = (p - 1) * b * (n / p) * width * e
    return blocks * attention_bytes(style, p, b, heads, head_dim, n, n, e) + gather


def measured(args) -> None:
    import torch.distributed as dist

    import accel
    from accel.parallel import traffic

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    p, rank = dist.get_world_size(), dist.get_rank()
    cfg = accel.compose(None, [f"model={args.model}"])
    pipe = accel.load_pipeline(cfg.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    config = pipe.transformer.config
    call = {"prompt": "a red fox", "num_inference_steps": args.steps, "height": cfg.model.height,
            "width": cfg.model.width, "output_type": "latent"}
    image = (cfg.model.height // pipe.vae_scale_factor // 2) * (cfg.model.width // pipe.vae_scale_factor // 2)
    text = 512
    shape = dict(blocks=config.num_layers + config.num_single_layers, heads=config.num_attention_heads,
                 head_dim=config.attention_head_dim, image=image, text=text,
                 width=config.num_attention_heads * config.attention_head_dim, e=pipe.transformer.dtype.itemsize)
    rows = []
    for style in ("ulysses", "ring", "cfg"):
        degrees = {style: p}
        options = dict(call, negative_prompt="blurry", true_cfg_scale=4.0) if style == "cfg" else call
        with accel.apply(pipe, {"parallel": {"strategy": "mesh", **degrees}}):
            traffic.reset()
            pipe(**options, generator=torch.Generator("cpu").manual_seed(0))
            got = sum(traffic.received.values())
        if style == "cfg":  # the first step runs every branch on every rank; later steps exchange outputs
            computed = (args.steps - 1) * (p - 1) * image * pipe.transformer.config.in_channels * shape["e"]
        else:
            computed = args.steps * flux_step_bytes(style, p, **shape)
        rows.append((style, got / args.steps, computed / args.steps))
    if rank == 0:
        print(f"{args.model}, {p} ranks, {args.steps} steps, {image} image + {text} text tokens, "
              f"{shape['blocks']} blocks, {shape['heads']}×{shape['head_dim']} heads, {pipe.transformer.dtype}")
        print("| style | measured bytes/step/rank | computed | ratio |\n|---|---|---|---|")
        for style, got, computed in rows:
            print(f"| {style} | {got:,.0f} | {computed:,.0f} | {got / computed:.3f} |")
    dist.destroy_process_group()


def projection(args) -> None:
    """FLUX.1-dev 1024² on P H100s: a model, not a measurement."""
    flux = dict(blocks=57, heads=24, head_dim=128, image=4096, text=512, width=3072, e=2)
    step_s = args.single_gpu_s / 28
    print(f"FLUX.1-dev 1024², bf16, 28 steps; one GPU: {args.single_gpu_s} s ({step_s * 1000:.1f} ms/step, "
          f"{args.single_gpu_source}); link {args.link_gbs} GB/s per GPU, {args.latency_us} µs per collective; "
          "compute divides by P, communication does not overlap it (pessimistic)")
    print("| GPUs | style | comm GB/step/GPU | comm ms/step | step ms | 28 steps s | speedup |\n|---|---|---|---|---|---|---|")
    for p in (2, 4, 8):
        for style in ("ulysses", "ring"):
            volume = flux_step_bytes(style, p, **flux)
            collectives = flux["blocks"] * (4 if style == "ulysses" else p - 1) + 2
            comm_s = volume / (args.link_gbs * 1e9) + collectives * args.latency_us * 1e-6
            step = step_s / p + comm_s
            print(f"| {p} | {style} | {volume / 1e9:.2f} | {comm_s * 1000:.1f} | {step * 1000:.1f} | "
                  f"{28 * step:.2f} | {step_s / step:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux_tiny")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--project", action="store_true", help="print the FLUX 1024² multi-GPU projection")
    parser.add_argument("--single-gpu-s", type=float, default=4.30)
    parser.add_argument("--single-gpu-source", default="xDiT's published compiled H100 figure, not measured here")
    parser.add_argument("--link-gbs", type=float, default=350.0, help="achieved all-to-all bandwidth per GPU")
    parser.add_argument("--latency-us", type=float, default=15.0)
    args = parser.parse_args()
    projection(args) if args.project else measured(args)


if __name__ == "__main__":
    main()
