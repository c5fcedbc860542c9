"""Sequence parallelism over a denoiser's blocks: each rank runs every block on its slice of the tokens.

Block 0's inputs are split (image and text streams alike, each padded to a multiple of the ranks),
every block's per-token side inputs (rotary embeddings, HunyuanVideo's text mask) are sliced to
match, attention runs over the whole sequence through `accel.parallel.attention`, and the last
block's outputs are gathered, so everything before and after the blocks (embeddings, final norm,
projection) sees full tensors. What an architecture passes where is its adapter's `SequencePlan`.

Padding tokens never count: attention masks them as keys, the gather drops them, and a cache's
distance leaves them out.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from accel import intercept
from accel.errors import AccelError
from accel.models.adapters import BoundBlock, SequencePlan
from accel.parallel import traffic
from accel.parallel.attention import sharded_attention


def _pad_to(x: torch.Tensor, length: int, dim: int, value=0) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


class SequenceLayout:
    """How one denoiser call's streams are split: each stream padded to `shards` equal slices; which
    tokens are real; and the key masks attention needs, in the order the shards line up after a gather."""

    def __init__(self, plan: SequencePlan, shards: int, shard: int, hidden_len: int, encoder_len: Optional[int],
                 model_mask: Optional[torch.Tensor], device: torch.device):
        self.plan, self.shards, self.shard = plan, shards, shard
        self.hidden_len, self.encoder_len = hidden_len, encoder_len
        self.hidden_local = math.ceil(hidden_len / shards)
        self.encoder_local = math.ceil(encoder_len / shards) if encoder_len is not None else None
        self.padded = self.hidden_local * shards - hidden_len + (
            self.encoder_local * shards - encoder_len if encoder_len is not None else 0)
        positions = torch.arange(self.hidden_local * shards, device=device)
        self.hidden_valid = positions < hidden_len
        self.encoder_valid = (torch.arange(self.encoder_local * shards, device=device) < encoder_len
                              if encoder_len is not None else None)
        self._key_masks = self._build_key_masks(model_mask)

    # -- slicing ------------------------------------------------------------------------------------
    def local(self, x: torch.Tensor, stream: str, dim: int = 1, value=0) -> torch.Tensor:
        size = self.hidden_local if stream == "hidden" else self.encoder_local
        x = _pad_to(x, size * self.shards, dim, value)
        return x.narrow(dim, self.shard * size, size)

    def local_rotary(self, rotary):
        """This shard's rows of rotary embeddings (a tensor or a tuple of them, e.g. (cos, sin))."""
        if isinstance(rotary, (tuple, list)):
            return type(rotary)(self.local_rotary(r) for r in rotary)
        dim = self.plan.rotary_dim
        if self.plan.rotary_covers == "hidden":
            return self.local(rotary, "hidden", dim)
        # the joint sequence, text first (FLUX): slice each stream's part and put them back in that order
        text, image = rotary.split([self.encoder_len, self.hidden_len], dim=dim)
        return torch.cat([self.local(text, "encoder", dim), self.local(image, "hidden", dim)], dim=dim)

    # -- masks ------------------------------------------------------------------------------------
    def _joint_local(self, hidden: torch.Tensor, encoder: torch.Tensor, shard: int) -> torch.Tensor:
        h = hidden[..., shard * self.hidden_local:(shard + 1) * self.hidden_local]
        e = encoder[..., shard * self.encoder_local:(shard + 1) * self.encoder_local]
        return torch.cat([e, h] if self.plan.joint == "encoder_first" else [h, e], dim=-1)

    def _build_key_masks(self, model_mask: Optional[torch.Tensor]) -> dict[int, Optional[torch.Tensor]]:
        masks: dict[int, Optional[torch.Tensor]] = {}
        hidden_valid = self.hidden_valid.view(1, -1)
        if self.encoder_len is None:
            masks[self.hidden_local] = hidden_valid.view(1, 1, 1, -1) if self.padded else None
            return masks
        encoder_valid = self.encoder_valid.view(1, -1)
        if self.plan.joint is not None:
            h, e = hidden_valid, encoder_valid
            if model_mask is not None:  # (B, hidden + encoder), in the model's own hidden-first order
                h = h & _pad_to(model_mask[:, :self.hidden_len], h.shape[-1], 1, False)
                e = e & _pad_to(model_mask[:, self.hidden_len:], e.shape[-1], 1, False)
            joint = torch.cat([self._joint_local(h, e, j) for j in range(self.shards)], dim=-1)
            needed = self.padded or model_mask is not None
            masks[self.hidden_local + self.encoder_local] = joint[:, None, None, :] if needed else None
        else:  # separate streams: self-attention over image tokens, cross-attention to text tokens
            for length, valid in ((self.hidden_local, hidden_valid), (self.encoder_local, encoder_valid)):
                mask = valid.view(1, 1, 1, -1) if self.padded else None
                if length in masks and not _same(masks[length], mask):
                    masks[length] = _AMBIGUOUS
                else:
                    masks[length] = mask
        return masks

    def key_mask(self, key_length: int) -> Optional[torch.Tensor]:
        """The mask over every shard's keys, for attention whose local keys number `key_length`."""
        mask = self._key_masks.get(key_length, _UNKNOWN)
        if mask is _UNKNOWN or mask is _AMBIGUOUS:
            raise AccelError(f"parallel: an attention with {key_length} keys per rank does not match this call's "
                             f"sharded streams (image {self.hidden_local}, text {self.encoder_local} per rank); "
                             "choose a resolution whose token count divides by the sequence degree")
        return mask

    def hidden_weight(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Where a per-token tensor of this shard's image slice is real (1) or padding (0), or None if all real."""
        if not self.padded or x.dim() < 2 or x.shape[1] != self.hidden_local:
            return None
        local = self.hidden_valid[self.shard * self.hidden_local:(self.shard + 1) * self.hidden_local]
        return local.view(1, -1, *([1] * (x.dim() - 2))).to(x.dtype)


_UNKNOWN, _AMBIGUOUS = object(), object()


def _same(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@dataclass
class _Bound:
    block: BoundBlock
    signature: inspect.Signature


class SequenceShards:
    """Layers on a denoiser's blocks that split the streams at the first and gather them after the last."""

    def __init__(self, blocks: list[BoundBlock], plan: SequencePlan, group: dist.ProcessGroup, shards: int,
                 shard: int):
        self.blocks = [_Bound(b, inspect.signature(b.module.forward)) for b in blocks]
        self.plan, self.group, self.shards, self.shard = plan, group, shards, shard
        self.layout: Optional[SequenceLayout] = None
        self._undo = contextlib.ExitStack()
        for index, bound in enumerate(self.blocks):
            self._undo.callback(intercept.around(bound.block.module, "forward", "sequence", self._layer(index, bound)))

    def _layer(self, index: int, bound: _Bound):
        last = index == len(self.blocks) - 1

        def layer(inner, *args, **kwargs):
            out = inner(**self._local_arguments(index, bound, args, kwargs))
            return self._gather(bound.block, out) if last else out

        return layer

    def _local_arguments(self, index: int, bound: _Bound, args: tuple, kwargs: dict) -> dict:
        """The block's arguments, by name, with this rank's slice of every per-token input."""
        io, plan = bound.block.io, self.plan
        arguments = bound.signature.bind_partial(*args, **kwargs).arguments
        if index == 0:
            hidden = arguments[io.hidden_arg]
            encoder = arguments.get(io.encoder_arg)
            mask = arguments.get(plan.mask_arg) if plan.mask_arg else None
            if mask is not None:
                mask = mask.reshape(mask.shape[0], -1).bool()
            self.layout = SequenceLayout(plan, self.shards, self.shard, hidden.shape[1],
                                         encoder.shape[1] if encoder is not None else None, mask, hidden.device)
            arguments[io.hidden_arg] = self.layout.local(hidden, "hidden")
        if self.layout is None:
            raise AccelError("parallel: a block ran before the denoiser's first block: its inputs were never split")
        # the text stream, where block 0 gets it, or every block when blocks do not hand it on (Wan)
        encoder = arguments.get(io.encoder_arg)
        if encoder is not None and (index == 0 or io.encoder_out is None):
            arguments[io.encoder_arg] = self.layout.local(encoder, "encoder")
        for name in plan.rotary_args:
            if arguments.get(name) is not None:
                arguments[name] = self.layout.local_rotary(arguments[name])
        if plan.mask_arg and plan.mask_arg in arguments:
            arguments[plan.mask_arg] = None  # attention takes the gathered key mask from the layout
        return arguments

    def _gather(self, block: BoundBlock, out):
        hidden, encoder = block.io.outputs(out)
        layout = self.layout
        hidden = self._gather_stream(hidden, layout.hidden_len)
        if encoder is not None:
            encoder = self._gather_stream(encoder, layout.encoder_len)
        return block.io.pack(hidden, encoder)

    def _gather_stream(self, x: torch.Tensor, length: int) -> torch.Tensor:
        return gather_tokens(x, self.group, self.shards)[:, :length]

    def relative_l1(self, now: torch.Tensor, before: torch.Tensor, group: dist.ProcessGroup) -> float:
        """The relative L1 distance of this call's per-token tensors as if unsharded (padding left out)."""
        weight = self.layout.hidden_weight(now) if self.layout is not None else None
        return reduced_relative_l1(now, before, group, weight)

    def remove(self) -> None:
        self._undo.close()
        self.layout = None


def gather_tokens(x: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """(B, L, ...) slices of every rank of `group` → (B, size·L, ...), in rank order."""
    traffic.add("gather", x, size - 1)
    gathered = funcol.wait_tensor(funcol.all_gather_single(x.movedim(1, 0).contiguous(), 0, group))
    return gathered.movedim(0, 1)


def reduced_relative_l1(now: torch.Tensor, before: torch.Tensor, group: dist.ProcessGroup,
                        weight: Optional[torch.Tensor] = None) -> float:
    """mean|now − before| / mean|before| over what every rank of `group` holds: the two sums are reduced
    across the ranks, then read back once, so every rank takes the same decision."""
    diff, base = (now - before).abs(), before.abs()
    if weight is not None:
        diff, base = diff * weight, base * weight
    sums = funcol.wait_tensor(funcol.all_reduce(torch.stack([diff.sum(), base.sum()]).float(), "sum", group))
    return (sums[0] / sums[1].clamp_min(1e-12)).item()


def check_heads(heads: int, ulysses: int) -> Optional[str]:
    """Why Ulysses of this degree cannot split these heads, with the degrees that can; None if it can."""
    if heads % ulysses == 0:
        return None
    fitting = [d for d in range(1, heads + 1) if heads % d == 0]
    return (f"ulysses={ulysses} does not divide the model's {heads} attention heads: use a ulysses degree among "
            f"{fitting}, or ring for the rest (ring has no such limit)")


def route_layer(shards: SequenceShards, ulysses, ring):
    """The attention-route layer running every block attention over the whole sharded sequence."""
    def layer(call_next, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
        if is_causal or dropout_p or enable_gqa:
            raise AccelError("parallel: sharded attention takes non-causal attention without dropout or GQA; "
                             f"got is_causal={is_causal}, dropout_p={dropout_p}, enable_gqa={enable_gqa}")
        key_mask = shards.layout.key_mask(key.shape[2])
        return sharded_attention(query, key, value, key_mask=key_mask, ulysses=ulysses, ring=ring, scale=scale,
                                 sdpa=lambda q, k, v, attn_mask, scale: call_next(q, k, v, attn_mask=attn_mask,
                                                                                  scale=scale))

    return layer

