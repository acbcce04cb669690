"""Feature-level Metrix pooling in two Triton kernels: no mixed map and no int64 index grid in memory.

`training.metrix.mixed_pool` needs, for every mix m = (i, j, lam) and channel c, the embedder's pooling
(global average + global max) of the mixed map lam * a + (1 - lam) * b, where a = maps[i, c] and
b = maps[j, c] hold P = h * w positions.  In plain PyTorch that means materialising the mixed maps
chunk by chunk to find the argmax, then gathering through (M, C) int64 index tensors, and a backward
pass of the same size: on a GPU it costs several times the mixing arithmetic.  Here:

    forward   one program per (mix, channel block) reads the two (channel block x P) source tiles
              (cache-resident: each source map serves 2B mixes), mixes them in float32, and writes
              the pooled value and the int32 argmax: (M, C) float32 + (M, C) int32;
    backward  the average part is a reduction of the upstream gradient ((M, C) -> (B, C)); the max
              part sends lam * g and (1 - lam) * g to the two source positions with atomic adds.

The gradient is exactly the one autograd gives through amax of the materialised mix, the first position
winning ties.  Atomic float additions make the gradient's last bits depend on scheduling;
`mixed_pool` keeps the PyTorch path when deterministic algorithms are requested.
"""

from __future__ import annotations

import torch

try:  # Triton ships with PyTorch's CUDA builds; without it the PyTorch path is used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None
    tl = None


def available(device: torch.device) -> bool:
    """Whether the fused kernels can run for tensors on `device`."""
    return triton is not None and device.type == "cuda" and not torch.are_deterministic_algorithms_enabled()


if triton is not None:

    @triton.jit
    def _pool_forward(maps, first, second, lam, out, argmax,
                      C, P, stride_b, stride_c, stride_p,
                      BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        m = tl.program_id(0)
        cb = tl.program_id(1)
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        p = tl.arange(0, BLOCK_P)
        c_ok = c < C
        ok = c_ok[:, None] & (p < P)[None, :]
        i = tl.load(first + m).to(tl.int64)
        j = tl.load(second + m).to(tl.int64)
        w = tl.load(lam + m).to(tl.float32)
        offsets = c[:, None].to(tl.int64) * stride_c + p[None, :].to(tl.int64) * stride_p
        a = tl.load(maps + i * stride_b + offsets, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(maps + j * stride_b + offsets, mask=ok, other=0.0).to(tl.float32)
        mixed = tl.where(ok, b + w * (a - b), float("-inf"))
        best = tl.argmax(mixed, axis=1)  # first maximum, as amax's gradient of the reference
        top = tl.max(mixed, axis=1)
        avg = (tl.sum(a, axis=1) * w + tl.sum(b, axis=1) * (1.0 - w)) / P
        tl.store(out + m * C + c, avg + top, mask=c_ok)
        tl.store(argmax + m * C + c, best.to(tl.int32), mask=c_ok)

    @triton.jit
    def _pool_backward_max(grad, first, second, lam, argmax, grad_maps,
                           C, stride_b, stride_c, stride_p,
                           BLOCK_C: tl.constexpr):
        m = tl.program_id(0)
        cb = tl.program_id(1)
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        i = tl.load(first + m).to(tl.int64)
        j = tl.load(second + m).to(tl.int64)
        w = tl.load(lam + m).to(tl.float32)
        g = tl.load(grad + m * C + c, mask=c_ok, other=0.0).to(tl.float32)
        p = tl.load(argmax + m * C + c, mask=c_ok, other=0).to(tl.int64)
        offsets = c.to(tl.int64) * stride_c + p * stride_p
        tl.atomic_add(grad_maps + i * stride_b + offsets, g * w, mask=c_ok)
        tl.atomic_add(grad_maps + j * stride_b + offsets, g * (1.0 - w), mask=c_ok)


def _launch_shape(channels: int, positions: int) -> tuple[int, int]:
    block_p = max(16, triton.next_power_of_2(positions))
    block_c = max(1, min(64, 4096 // block_p))  # a (channels x positions) tile of at most 4096 values
    return block_c, block_p


class FusedMixedPool(torch.autograd.Function):
    """(maps (B, C, P), first (M,), second (M,), lam (M,)) -> pooled mixes (M, C) float32."""

    @staticmethod
    def forward(ctx, maps: torch.Tensor, first: torch.Tensor, second: torch.Tensor,  # type: ignore[override]
                lam: torch.Tensor) -> torch.Tensor:
        batch, channels, positions = maps.shape
        count = first.shape[0]
        first = first.to(torch.int32).contiguous()
        second = second.to(torch.int32).contiguous()
        lam = lam.to(torch.float32).contiguous()
        out = torch.empty(count, channels, device=maps.device, dtype=torch.float32)
        argmax = torch.empty(count, channels, device=maps.device, dtype=torch.int32)
        block_c, block_p = _launch_shape(channels, positions)
        if count > 0:
            grid = (count, triton.cdiv(channels, block_c))
            _pool_forward[grid](maps, first, second, lam, out, argmax, channels, positions,
                                *maps.stride(), BLOCK_C=block_c, BLOCK_P=block_p)
        ctx.save_for_backward(first, second, lam, argmax)
        ctx.maps_meta = (maps.shape, maps.stride(), maps.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:  # type: ignore[override]
        first, second, lam, argmax = ctx.saved_tensors
        shape, strides, dtype = ctx.maps_meta
        batch, channels, positions = shape
        grad = grad.to(torch.float32).contiguous()
        # average part: every position of a source map gets (its mixes' weighted gradient) / P
        weighted_first = grad * lam[:, None]
        grad_avg = torch.zeros(batch, channels, device=grad.device, dtype=torch.float32)
        grad_avg.index_add_(0, first.long(), weighted_first)
        grad_avg.index_add_(0, second.long(), grad - weighted_first)
        grad_maps = torch.empty_strided(shape, strides, device=grad.device, dtype=torch.float32)
        grad_maps.copy_((grad_avg / positions)[:, :, None].expand(shape))
        block_c, _ = _launch_shape(channels, positions)
        if first.shape[0] > 0:
            grid = (first.shape[0], triton.cdiv(channels, block_c))
            _pool_backward_max[grid](grad, first, second, lam, argmax, grad_maps, channels,
                                     *grad_maps.stride(), BLOCK_C=block_c)
        return grad_maps.to(dtype), None, None, None


def fused_mixed_pool(maps: torch.Tensor, first: torch.Tensor, second: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Pooled (global avg + global max) mixes lam * maps[first] + (1 - lam) * maps[second]: (M, C) float32."""
    if triton is None:
        raise RuntimeError("the fused Metrix pooling needs Triton (it ships with PyTorch's CUDA builds)")
    return FusedMixedPool.apply(maps, first, second, lam)


__all__ = ["available", "fused_mixed_pool"]
