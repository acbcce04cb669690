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

First use: Triton compiles a kernel per specialisation (dtype, channels, positions, strides) when it is first
launched, and that can fail on a given GPU or installation (no C compiler for the launcher, a PTX version the
driver rejects, too little shared memory).  `ready` runs each new specialisation once on a few of the real
mixes, forward and backward, and compares with the plain formula; if that raises or disagrees, the device
uses the PyTorch path for the rest of the process and one warning says why.
"""

from __future__ import annotations

import contextlib
import logging

import torch

try:  # Triton ships with PyTorch's CUDA builds; without it the PyTorch path is used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None
    tl = None


log = logging.getLogger(__name__)
CHECK_MIXES = 8  # mixes a first-use check runs through the kernels
_checked: set[tuple[object, ...]] = set()  # kernel specialisations that ran once and matched the formula
_unusable: dict[str, str] = {}  # device -> why the kernels are not used there


def available(device: torch.device) -> bool:
    """Whether the fused kernels may run for tensors on `device` (a failed first-use check rules them out)."""
    return (
        triton is not None
        and device.type == "cuda"
        and not torch.are_deterministic_algorithms_enabled()
        and str(device) not in _unusable
    )


def fallback_reason(device: torch.device) -> str | None:
    """Why a first-use check ruled the kernels out on `device`, or None."""
    return _unusable.get(str(device))


def ready(maps: torch.Tensor, first: torch.Tensor, second: torch.Tensor, lam: torch.Tensor) -> bool:
    """Whether `mixed_pool` should use the fused kernels for these (B, C, P) maps: available on their device
    and, for a new kernel specialisation, checked once (`checked`)."""
    return available(maps.device) and checked(maps, first, second, lam)


def checked(maps: torch.Tensor, first: torch.Tensor, second: torch.Tensor, lam: torch.Tensor) -> bool:
    """Run a new kernel specialisation once on a few of these mixes and compare with the formula.

    True when it matched now or before, or when it cannot be checked here (inside a CUDA graph capture,
    where the check's host sync is not allowed: a failure there fails the capture, whose eager fallback
    then checks). False when it raised or disagreed: the device is marked and one warning says why.
    """
    key = (str(maps.device), maps.dtype, tuple(maps.shape[1:]), tuple(maps.stride()))
    if str(maps.device) in _unusable:
        return False
    if key in _checked or first.shape[0] == 0:
        return True
    if maps.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return True
    try:
        problem = _check_kernels(maps, first[:CHECK_MIXES], second[:CHECK_MIXES], lam[:CHECK_MIXES])
    except Exception as exc:
        problem = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    if problem is None:
        _checked.add(key)
        return True
    _unusable[str(maps.device)] = problem
    log.warning(
        "the fused Metrix pooling kernels cannot run on %s (%s); using the PyTorch pooling path", maps.device, problem
    )
    return False


def _check_kernels(maps: torch.Tensor, first: torch.Tensor, second: torch.Tensor, lam: torch.Tensor) -> str | None:
    """Forward and backward of a few mixes against the plain formula; what disagrees, or None."""
    # Copies (normal tensors even when the caller runs under inference_mode) keep the check off the step's graph.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(maps.device.type, enabled=False):
        source = maps.detach().clone().requires_grad_(True)
        first, second, lam = first.clone(), second.clone(), lam.detach().clone()
        pooled = FusedMixedPool.apply(source, first, second, lam)
        pooled.backward(torch.ones_like(pooled))
        pooled = pooled.detach()
    with torch.no_grad():
        a, b = maps[first].float(), maps[second].float()  # (k, C, P)
        w = lam.float()[:, None]
        mixed = b + w[:, :, None] * (a - b)
        expected = (a.sum(2) * w + b.sum(2) * (1.0 - w)) / maps.shape[2] + mixed.amax(2)
        if not torch.allclose(pooled, expected, rtol=1e-3, atol=1e-3):
            return f"pooled values differ from the formula by up to {(pooled - expected).abs().max().item():.3g}"
        # Per source map and channel, the gradient summed over positions does not depend on where the
        # maximum is: 2 x (the mix weights it enters with), for an upstream gradient of ones.
        weight = torch.zeros(maps.shape[0], device=maps.device, dtype=torch.float32)
        weight.index_add_(0, first.long(), lam.float()).index_add_(0, second.long(), 1.0 - lam.float())
        grad = source.grad.float().sum(2) if source.grad is not None else torch.zeros_like(weight)[:, None]
        if not torch.allclose(grad, 2.0 * weight[:, None].expand_as(grad), rtol=2e-2, atol=1e-3):
            return "gradients differ from the formula"
    return None


if triton is not None:

    @triton.jit
    def _pool_forward(
        maps,
        first,
        second,
        lam,
        out,
        argmax,
        C,
        P,
        stride_b,
        stride_c,
        stride_p,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        m = tl.program_id(0).to(tl.int64)  # m * C overflows int32 at large M * C
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
    def _pool_backward_max(
        grad, first, second, lam, argmax, grad_maps, C, stride_b, stride_c, stride_p, BLOCK_C: tl.constexpr
    ):
        m = tl.program_id(0).to(tl.int64)
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


def _on(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Triton launches on the current CUDA device: make it the tensors' own (cuda:1 under torchrun, say)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch_shape(channels: int, positions: int) -> tuple[int, int]:
    block_p = max(16, triton.next_power_of_2(positions))
    block_c = max(1, min(64, 4096 // block_p))  # a (channels x positions) tile of at most 4096 values
    return block_c, block_p


class FusedMixedPool(torch.autograd.Function):
    """(maps (B, C, P), first (M,), second (M,), lam (M,)) -> pooled mixes (M, C) float32."""

    @staticmethod
    def forward(ctx, maps: torch.Tensor, first: torch.Tensor, second: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
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
            with _on(maps.device):
                _pool_forward[grid](
                    maps,
                    first,
                    second,
                    lam,
                    out,
                    argmax,
                    channels,
                    positions,
                    *maps.stride(),
                    BLOCK_C=block_c,
                    BLOCK_P=block_p,
                )
        ctx.save_for_backward(first, second, lam, argmax)
        ctx.maps_meta = (maps.shape, maps.stride(), maps.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
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
            with _on(grad.device):
                _pool_backward_max[grid](
                    grad, first, second, lam, argmax, grad_maps, channels, *grad_maps.stride(), BLOCK_C=block_c
                )
        return grad_maps.to(dtype), None, None, None


def fused_mixed_pool(maps: torch.Tensor, first: torch.Tensor, second: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Pooled (global avg + global max) mixes lam * maps[first] + (1 - lam) * maps[second]: (M, C) float32."""
    if triton is None:
        raise RuntimeError("the fused Metrix pooling needs Triton (it ships with PyTorch's CUDA builds)")
    return FusedMixedPool.apply(maps, first, second, lam)


__all__ = ["available", "checked", "fallback_reason", "fused_mixed_pool", "ready"]
