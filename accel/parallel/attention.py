"""Attention over a sequence sharded across ranks: Ulysses, Ring, and the two combined.

Every rank holds its own slice of the tokens (queries, keys and values alike). Ulysses trades the
token split for a head split with one all-to-all, attends over the whole sequence for its heads, and
trades back. Ring keeps the token split and passes key/value slices around the ring, merging the
partial results by their log-sum-exp. Combined, Ulysses runs inside each ring position first.

Attention is non-causal here, so the order of keys does not matter as long as each key keeps its
own value and mask bit: the gathered sequence is the ranks' slices one after another, and the key
mask handed in (`SequenceLayout.key_mask`) is already in that order. Collectives are torch's
functional ones, which dynamo traces without a graph break.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from accel.parallel import traffic


def heads_to_tokens(x: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """(B, H, L, D) with this rank's L tokens → (B, H/size, size·L, D) with this rank's heads."""
    b, h, l, d = x.shape
    x = x.reshape(b, size, h // size, l, d).permute(1, 0, 2, 3, 4).contiguous()
    traffic.add("ulysses", x, (size - 1) / size)  # all but its own chunk
    x = funcol.wait_tensor(funcol.all_to_all_single(x, None, None, group))  # chunk i to rank i, j from j
    return x.reshape(size, b, h // size, l, d).permute(1, 2, 0, 3, 4).reshape(b, h // size, size * l, d)


def tokens_to_heads(x: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """The inverse of `heads_to_tokens`: (B, H/size, size·L, D) → (B, H, L, D)."""
    b, h_local, n, d = x.shape
    l = n // size
    x = x.reshape(b, h_local, size, l, d).permute(2, 0, 1, 3, 4).contiguous()
    traffic.add("ulysses", x, (size - 1) / size)
    x = funcol.wait_tensor(funcol.all_to_all_single(x, None, None, group))
    return x.reshape(size, b, h_local, l, d).permute(1, 0, 2, 3, 4).reshape(b, size * h_local, l, d)


def attention_with_lse(q, k, v, mask: Optional[torch.Tensor], scale: Optional[float]):
    """Attention output and its log-sum-exp per query (float32), for merging partial results.
    `mask`: bool, True where a key may be attended, broadcastable to (B, H, Lq, Lk)."""
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        return out, lse.float()
    if q.device.type == "cuda":
        if bias is not None:
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, scale=scale)[:2]
        return out, lse[..., : q.shape[2]].float()
    scores = (q.float() @ k.float().transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype), lse


def ring_attention(q, k, v, key_mask: Optional[torch.Tensor], group: dist.ProcessGroup, size: int, rank: int,
                   scale: Optional[float]) -> torch.Tensor:
    """Attention of this rank's queries over every rank's keys, the key/value slices passed around the
    ring `size - 1` times. `key_mask`: (B|1, 1, 1, size·Lk) bool in rank order, or None."""
    chunk = k.shape[2]
    out, lse = None, None
    to_next = [(i + 1) % size for i in range(size)]
    for hop in range(size):
        source = (rank - hop) % size  # whose keys this rank holds now
        mask = None if key_mask is None else key_mask[..., source * chunk:(source + 1) * chunk]
        part, part_lse = attention_with_lse(q, k, v, mask, scale)
        # a slice whose keys are all masked (padding only) gives no weight, and NaN outputs: drop them
        part = torch.where(torch.isfinite(part_lse).unsqueeze(-1), part.float(), 0.0)
        if out is None:
            out, lse = part, part_lse
        else:
            merged = torch.logaddexp(lse, part_lse)
            out = out * torch.exp(lse - merged).unsqueeze(-1) + part * torch.exp(part_lse - merged).unsqueeze(-1)
            lse = merged
        if hop + 1 < size:
            kv = torch.stack([k, v])  # permute_tensor sends whole flat tensors
            traffic.add("ring", kv)
            kv = funcol.wait_tensor(funcol.permute_tensor(kv.flatten(), to_next, group)).view(kv.shape)
            k, v = kv[0], kv[1]
    return out.to(q.dtype)


def sharded_attention(q, k, v, *, key_mask: Optional[torch.Tensor], ulysses: Optional[tuple], ring: Optional[tuple],
                      scale: Optional[float], sdpa) -> torch.Tensor:
    """Attention over the whole sequence from this rank's token slice. `ulysses` / `ring`: (group, size,
    rank) of each mesh dimension in use, or None. `sdpa` runs the plain attention (the next layer)."""
    if ulysses is not None:
        group, size, _ = ulysses
        q, k, v = (heads_to_tokens(t, group, size) for t in (q, k, v))
    if ring is not None:
        group, size, rank = ring
        out = ring_attention(q, k, v, key_mask, group, size, rank, scale)
    else:
        mask = None if key_mask is None else key_mask
        out = sdpa(q, k, v, attn_mask=mask, scale=scale)
    if ulysses is not None:
        group, size, _ = ulysses
        out = tokens_to_heads(out, group, size)
    return out
