"""FlashAttention-2-style attention forward in Triton, with an optional 8-bit QK^T (SageAttention's idea).

`attention(query, key, value, attn_mask=None, scale=None, qk="bf16")` takes what torch's
`scaled_dot_product_attention` takes from a diffusion transformer: (batch, heads, tokens, head dim)
float16 or bfloat16 tensors of any strides, text and image tokens as one sequence, no causal mask, no
dropout, and optionally a per-key mask (boolean or additive, broadcastable to (batch, 1, 1, keys)).
Each program owns BLOCK_M query rows of one (batch, head) and streams BLOCK_N key/value rows at a
time through an online softmax in float32, in base 2 (the softmax scale and log2(e) are folded into
the scores); the output has the input's dtype. Head dims up to 256 are padded to a power of two.

qk="bf16" computes Q·K^T in the input's half type. qk="int8" first smooths K by subtracting its mean
over tokens (per batch and head: that shifts every score of a query row by the same amount, which
softmax ignores, and leaves int8's 255 levels to K's spread instead of its offset), quantises K per
32 rows (a small kernel) and Q per BLOCK_M rows (in the attention kernel, as each program loads its
rows) to int8 with one float scale per block, and computes S = Q·K^T in int32 times the two scales
(the softmax scale and log2(e) folded into Q's); P·V stays in the input's half type.

`attention_problem(...)` says why a call is not one the kernel takes (None if it takes it), in words
a user can act on. Inference only: there is no backward. The kernel is the custom op
`accel::triton_attention`, so torch.compile traces a call to it as one node, without a graph break.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import math
from types import SimpleNamespace
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels need triton; `unavailable()` says so
    triton = tl = None

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
# rows of K that share one int8 scale (Q's: the BLOCK_M rows of a program); a tile of BLOCK_N keys reads
# the scale of each of its columns, so the two need not match
K_QUANT_ROWS = 32
K_QUANT_BLOCKS_PER_PROGRAM = 4  # a program of the quantizing kernel takes 4 · 32 rows
HALF_TYPES = (torch.float16, torch.bfloat16)
QK_KINDS = ("bf16", "int8")
SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

# (BLOCK_M, BLOCK_N, num_warps, num_stages) that autotune chooses from on a GPU; a config that does not
# fit the GPU's shared memory (large head dims) is skipped by the autotuner
GPU_CONFIGS = ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2))
INTERPRETER_CONFIG = (128, 64, 4, 1)  # one config: the interpreter is for tests, and tuning it would time numpy

launches: collections.Counter = collections.Counter()  # kernel launches per qk kind, counted as they run


@torch.compiler.assume_constant_result  # dynamo cannot trace triton's reading of the environment
def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter on the CPU (TRITON_INTERPRET=1), as it reads it now."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


def unavailable(device: torch.device) -> Optional[str]:
    """Why the kernel cannot run on `device` here; None if it can."""
    if triton is None:
        return "it needs the triton package (pip install triton; Linux)"
    if interpreting():
        return None if device.type == "cpu" else (
            f"with TRITON_INTERPRET=1 Triton runs kernels in its interpreter on CPU tensors, not on {device}")
    if device.type != "cuda":
        return (f"its Triton kernel needs a CUDA GPU, not {device} (set TRITON_INTERPRET=1 to run it in Triton's "
                "interpreter on the CPU: slow, for tests)")
    return None


def _block_d(head_dim: int, qk_int8: bool) -> int:
    # tl.dot takes K dims of 16 or more, 32 or more for int8 operands
    return max(32 if qk_int8 else 16, triton.next_power_of_2(head_dim))


# ---------------------------------------------------------------------------------------------------------------------
# The kernels. Plain functions, jitted on first launch (`_kernels`): triton.jit decides at decoration
# whether a kernel is compiled or interpreted, and TRITON_INTERPRET may be set after this module loads.
# For the same reason they use only Triton's builtins: its standard library (tl.zeros, tl.max, tl.sum)
# was jitted when triton was imported, perhaps before TRITON_INTERPRET was set, and the interpreter cannot
# call those compiled versions. Reductions go through tl.reduce with the standard library's combine
# functions, which the interpreter recognises by identity and which are what tl.max and tl.sum call.
# ---------------------------------------------------------------------------------------------------------------------


def _attention_forward(
        Q, K, V, Out, KeyBias, KScale,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_bias_b, heads, N_Q, N_K, n_k_scales, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QK_INT8: tl.constexpr, HAS_BIAS: tl.constexpr,
        K_ROWS: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr):
    start_m = tl.program_id(0)
    batch_head = tl.program_id(1).to(tl.int64)  # int64: batch · stride can pass 2^31 elements
    batch = batch_head // heads
    head = batch_head % heads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N_Q
    d_valid = offs_d < HEAD_DIM

    q = tl.load(Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_valid[:, None] & d_valid[None, :], other=0)
    if QK_INT8:
        q = q.to(tl.float32)
        q_scale = tl.maximum(tl.reduce(tl.abs(q), None, tl.standard._elementwise_max), 1e-30) / 127.0
        q = q / q_scale
        q = tl.where(q >= 0, q + 0.5, q - 0.5).to(tl.int8)  # rounded half away from zero; |q| <= 127
        q_scale *= qk_scale
    elif DOT_IN_FP32:
        q = q.to(tl.float32)
    k_ptrs = K + batch * stride_kb + head * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + batch * stride_vb + head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of the scores (base 2)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)  # running row sum of exp2(score - m_i)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        n_valid = start_n + offs_n < N_K
        if EVEN_N and HEAD_DIM == BLOCK_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_valid[:, None] & n_valid[None, :], other=0)
            v = tl.load(v_ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0)
        if QK_INT8:
            k_scale = tl.load(KScale + batch_head * n_k_scales + (start_n + offs_n) // K_ROWS, mask=n_valid,
                              other=0)
            s = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32) * (q_scale * k_scale)[None, :]
        else:
            if DOT_IN_FP32:
                k = k.to(tl.float32)
            s = tl.dot(q, k) * qk_scale
        if HAS_BIAS:
            bias = tl.load(KeyBias + batch * stride_bias_b + start_n + offs_n, mask=n_valid, other=float("-inf"))
            s += bias[None, :]
        if not EVEN_N:
            s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
        # a row whose keys so far are all masked subtracts 0, so exp2 gives 0 rather than NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        p = p.to(V.dtype.element_ty)
        if DOT_IN_FP32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None])
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row with every key masked gives 0, as torch's math does
    tl.store(Out + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


def _quantize_key_blocks(K, Mean, Out, Scale, stride_kb, stride_kh, stride_kn, stride_kd, heads, N, n_scales,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, BLOCKS: tl.constexpr):
    """int8 of BLOCKS blocks of ROWS rows of one (batch, head) of K less K's mean over tokens, one scale
    per block."""
    program = tl.program_id(0)
    batch_head = tl.program_id(1).to(tl.int64)  # int64: batch_head · N · HEAD_DIM can pass 2^31
    batch = batch_head // heads
    head = batch_head % heads
    offs_n = program * BLOCKS * ROWS + tl.arange(0, BLOCKS * ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    valid = (offs_n < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    x = tl.load(K + batch * stride_kb + head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=valid, other=0).to(tl.float32)
    mean = tl.load(Mean + batch_head * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0)
    x = tl.where(valid, x - mean[None, :], 0.0)
    block_max = tl.reduce(tl.reshape(tl.abs(x), (BLOCKS, ROWS * BLOCK_D)), 1, tl.standard._elementwise_max)
    scale = tl.maximum(block_max, 1e-30) / 127.0
    x = tl.reshape(tl.reshape(x, (BLOCKS, ROWS, BLOCK_D)) / scale[:, None, None], (BLOCKS * ROWS, BLOCK_D))
    rounded = tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int8)  # half away from zero; |x| <= 127
    tl.store(Out + batch_head * N * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :], rounded, mask=valid)
    offs_scale = program * BLOCKS + tl.arange(0, BLOCKS)
    tl.store(Scale + batch_head * n_scales + offs_scale, scale, mask=offs_scale < n_scales)


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool) -> SimpleNamespace:
    """The kernels, compiled or interpreted, jitted once per mode."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in ((INTERPRETER_CONFIG,) if interpret else GPU_CONFIGS)]
    even_n = triton.heuristics({"EVEN_N": lambda args: args["N_K"] % args["BLOCK_N"] == 0})
    attention = triton.autotune(configs, key=["N_Q", "N_K", "HEAD_DIM", "QK_INT8", "HAS_BIAS"], cache_results=True)(
        even_n(triton.jit(_attention_forward)))
    return SimpleNamespace(attention=attention, quantize_key=triton.jit(_quantize_key_blocks))


# ---------------------------------------------------------------------------------------------------------------------
# The custom op and its Python entry point
# ---------------------------------------------------------------------------------------------------------------------


def _quantize_key(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """key (batch, heads, tokens, head dim) less its mean over tokens, as contiguous int8, and a float32
    scale per K_QUANT_ROWS rows of each head."""
    batch, heads, tokens, head_dim = key.shape
    mean = key.mean(dim=2, dtype=torch.float32).contiguous()
    out = torch.empty((batch, heads, tokens, head_dim), dtype=torch.int8, device=key.device)
    n_scales = triton.cdiv(tokens, K_QUANT_ROWS)
    scales = torch.empty((batch * heads, n_scales), dtype=torch.float32, device=key.device)
    blocks = K_QUANT_BLOCKS_PER_PROGRAM
    _kernels(interpreting()).quantize_key[(triton.cdiv(n_scales, blocks), batch * heads)](
        key, mean, out, scales, *key.stride(), heads, tokens, n_scales, HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim, True), ROWS=K_QUANT_ROWS, BLOCKS=blocks)
    return out, scales


@torch.library.custom_op("accel::triton_attention", mutates_args=())
def triton_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_bias: Optional[torch.Tensor],
                     scale: float, qk_int8: bool) -> torch.Tensor:
    """The kernel on checked inputs: `key_bias` is None or a float32 (batch, keys) additive bias."""
    # custom_op rather than triton_op: the interpreter's kernels cannot be traced by wrap_triton, and an
    # opaque node costs inductor nothing around a kernel that is a whole attention
    batch, heads, n_q, head_dim = query.shape
    n_k = key.shape[2]
    out = torch.empty((batch, heads, n_q, head_dim), dtype=query.dtype, device=query.device)
    interpret = interpreting()
    if key_bias is not None:
        key_bias = key_bias * LOG2E  # the kernel's scores are in base 2
    placeholder = out  # for the pointers a variant does not read
    k_scales = placeholder
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        if qk_int8:
            key, k_scales = _quantize_key(key)

        def grid(meta):
            return triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads

        _kernels(interpret).attention[grid](
            query, key, value, out, placeholder if key_bias is None else key_bias, k_scales,
            *query.stride(), *key.stride(), *value.stride(), *out.stride(),
            0 if key_bias is None else key_bias.stride(0), heads, n_q, n_k, k_scales.shape[-1],
            scale * LOG2E, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim, qk_int8), QK_INT8=qk_int8,
            HAS_BIAS=key_bias is not None, K_ROWS=K_QUANT_ROWS,
            # Triton 3.9's interpreter multiplies bf16 tiles as their raw uint16 bits; fp32 tiles holding the
            # same half values give the same products exactly (and it sums in fp32 either way)
            DOT_IN_FP32=interpret)
    launches["int8" if qk_int8 else "bf16"] += 1
    return out


@triton_attention.register_fake
def _(query, key, value, key_bias, scale, qk_int8):
    return query.new_empty(query.shape)


def _shape(tensor: torch.Tensor) -> str:
    return f"({', '.join(str(size) for size in tensor.shape)})"


def attention_problem(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False) -> Optional[str]:
    """Why the kernel does not take this `scaled_dot_product_attention` call; None if it does."""
    tensors = {"query": query, "key": key, "value": value}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            shape = _shape(tensor) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            return f"{name} is {shape}: the kernel takes (batch, heads, tokens, head dim) tensors"
    if query.dtype not in HALF_TYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        dtypes = "/".join(str(t.dtype).replace("torch.", "") for t in tensors.values())
        return f"query/key/value are {dtypes}: the kernel takes float16 or bfloat16, the same for all three"
    if key.device != query.device or value.device != query.device:
        return f"query/key/value are on {query.device}/{key.device}/{value.device}: one device for all three"
    problem = unavailable(query.device)
    if problem is not None:
        return f"the kernel does not run here: {problem}"
    if dropout_p != 0.0:
        return f"dropout_p={dropout_p}: the kernel is inference only and takes no dropout"
    if is_causal:
        return "is_causal=True: the kernel is non-causal (a diffusion transformer attends to every token)"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
        return "inputs require grad: the kernel is inference only (it has no backward); call it under torch.no_grad()"
    (batch, heads, _, head_dim), (_, kv_heads, n_k, _) = query.shape, key.shape
    if key.shape[0] != batch or value.shape[0] != batch:
        return f"query/key/value shapes {_shape(query)}/{_shape(key)}/{_shape(value)} differ in batch"
    if kv_heads != heads or value.shape[1] != heads:
        return (f"query has {heads} heads and key/value {kv_heads}/{value.shape[1]}: the kernel takes no grouped-query "
                "attention (GQA); key and value need as many heads as query")
    if value.shape[2] != n_k:
        return f"key has {n_k} tokens and value {value.shape[2]}: they need the same"
    if key.shape[3] != head_dim or value.shape[3] != head_dim:
        return f"query/key/value head dims {head_dim}/{key.shape[3]}/{value.shape[3]}: the kernel takes one head dim"
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim}: the kernel takes head dims up to {MAX_HEAD_DIM}"
    if attn_mask is not None:
        mask_shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
        per_key = (attn_mask.dim() <= 4 and mask_shape[0] in (1, batch) and mask_shape[1:3] == (1, 1)
                   and mask_shape[3] in (1, n_k))
        if not per_key:
            return (f"attn_mask of shape {_shape(attn_mask)}: the kernel takes only a per-key mask, broadcastable "
                    f"to (batch, 1, 1, keys) = ({batch}, 1, 1, {n_k})")
        if attn_mask.device != query.device:
            return f"attn_mask is on {attn_mask.device} and query on {query.device}: one device for both"
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            return f"attn_mask of dtype {attn_mask.dtype}: a mask is boolean (True: attend) or additive float"
    return None


def _key_bias(attn_mask: Optional[torch.Tensor], batch: int, n_k: int) -> Optional[torch.Tensor]:
    """A per-key mask as a float32 (batch, keys) additive bias: 0 where a boolean mask attends, -inf elsewhere."""
    if attn_mask is None:
        return None
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    mask = mask.expand(batch, 1, 1, n_k).reshape(batch, n_k)
    if mask.dtype == torch.bool:
        return torch.zeros((batch, n_k), dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float().contiguous()


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, qk: str = "bf16") -> torch.Tensor:
    """softmax(query·key^T·scale + mask)·value by our Triton kernel; a ValueError says what it does not take."""
    if qk not in QK_KINDS:
        raise ValueError(f"qk={qk!r}: one of {', '.join(QK_KINDS)}")
    problem = attention_problem(query, key, value, attn_mask)
    if problem is not None:
        raise ValueError(problem)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    key_bias = _key_bias(attn_mask, query.shape[0], key.shape[2])
    return torch.ops.accel.triton_attention(query, key, value, key_bias, scale, qk == "int8")
