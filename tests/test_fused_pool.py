"""The fused (Triton) feature-level Metrix pooling against the PyTorch path: values and gradients.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in a child process because the
setting is read when the kernels are defined), and so does the first-use check that sends a device whose
kernels fail or disagree to the PyTorch path; on a CUDA machine they are also compared compiled, in
bfloat16, at a ResNet-like shape, and at more than 2^31 outputs (64-bit offsets).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

INTERPRETER_CHECK = textwrap.dedent(
    """
    import itertools
    import torch
    from training import fused_pool
    from training.metrix import mixed_pool, plan_pairs

    labels = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    cases = itertools.product([0, 9], ["batch", "pair"], [False, True], [(3, 3), (1, 5)])
    for budget, lam_per, channels_last, (h, w) in cases:
        gen = torch.Generator().manual_seed(budget + h)
        fmap = torch.randn(7, 5, h, w, generator=gen)
        if channels_last:
            fmap = fmap.contiguous(memory_format=torch.channels_last)
        t = plan_pairs(labels, pair_kind="both", max_pairs=budget, lam_per=lam_per, generator=gen)
        ref_in, fused_in = fmap.clone().requires_grad_(True), fmap.clone().requires_grad_(True)
        ref = mixed_pool(ref_in, t, fused=False)
        ours = mixed_pool(fused_in, t, fused=True)
        weights = torch.randn(ref.shape, generator=gen)
        (ref * weights).sum().backward()
        (ours * weights).sum().backward()
        case = (budget, lam_per, channels_last, h, w)
        assert ours.dtype == torch.float32 and ours.shape == ref.shape, case
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case}: {m}")
        torch.testing.assert_close(fused_in.grad, ref_in.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case}: {m}")

    # ties: a constant map's maximum is its first position, for the value and for the gradient
    fmap = torch.ones(3, 2, 2, 2, requires_grad=True)
    t = plan_pairs(torch.tensor([0, 1, 2]), pair_kind="both")
    out = mixed_pool(fmap, t, fused=True)
    out.sum().backward()
    torch.testing.assert_close(out, torch.full_like(out, 2.0))
    ref_in = torch.ones(3, 2, 2, 2, requires_grad=True)
    mixed_pool(ref_in, t, fused=False).sum().backward()
    torch.testing.assert_close(fmap.grad, ref_in.grad)
    print("fused pooling matches")
    """
)


FIRST_USE_CHECK = textwrap.dedent(
    """
    import torch
    import triton
    import triton.language as tl
    from training import fused_pool
    from training.metrix import plan_pairs

    labels = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    gen = torch.Generator().manual_seed(0)
    t = plan_pairs(labels, pair_kind="both", generator=gen)
    cpu = torch.device("cpu")

    # the real kernels pass, once per specialisation
    assert fused_pool.checked(torch.randn(7, 5, 9, generator=gen), t.first, t.second, t.lam)
    assert fused_pool.fallback_reason(cpu) is None

    @triton.jit
    def forgets_the_maximum(grad, first, second, lam, argmax, grad_maps, C, stride_b, stride_c, stride_p,
                            BLOCK_C: tl.constexpr):
        pass  # a backward kernel that adds nothing: the gradient loses its max part

    fused_pool._pool_backward_max = forgets_the_maximum
    assert fused_pool.checked(torch.randn(7, 5, 9, generator=gen), t.first, t.second, t.lam)  # checked before
    assert not fused_pool.checked(torch.randn(7, 6, 9, generator=gen), t.first, t.second, t.lam)  # new: caught
    assert "gradients differ" in fused_pool.fallback_reason(cpu)
    assert not fused_pool.checked(torch.randn(7, 5, 9, generator=gen), t.first, t.second, t.lam)  # device ruled out
    print("broken kernel refused")

    class DoesNotCompile:
        def __getitem__(self, grid):
            raise RuntimeError("PTX .version 8.7 does not support .target sm_120\\nptxas fatal")

    fused_pool._unusable.clear()
    fused_pool._pool_forward = DoesNotCompile()
    assert not fused_pool.checked(torch.randn(7, 7, 9, generator=gen), t.first, t.second, t.lam)
    assert fused_pool.fallback_reason(cpu) == "RuntimeError: PTX .version 8.7 does not support .target sm_120"
    print("compile error refused")
    """
)


def _run_in_interpreter(script: str) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_fused_kernels_match_the_pytorch_pooling_in_the_interpreter() -> None:
    done = _run_in_interpreter(INTERPRETER_CHECK)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fused pooling matches" in done.stdout


def test_kernels_that_fail_or_disagree_on_first_use_give_way_to_the_pytorch_path_saying_why_once() -> None:
    done = _run_in_interpreter(FIRST_USE_CHECK)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "broken kernel refused" in done.stdout and "compile error refused" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if "fused Metrix pooling kernels cannot run" in line]
    assert len(warnings) == 2, done.stderr  # one per failure, not one per call
    assert warnings[0].endswith("(gradients differ from the formula); using the PyTorch pooling path")


def test_fused_path_is_off_on_cpu_and_under_deterministic_algorithms() -> None:
    from training import fused_pool

    assert not fused_pool.available(torch.device("cpu"))
    if torch.cuda.is_available():
        assert fused_pool.available(torch.device("cuda"))
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            assert not fused_pool.available(torch.device("cuda"))
        finally:
            torch.use_deterministic_algorithms(previous)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a CUDA device")
def test_fused_pooling_on_cuda_in_bfloat16_matches_float32_mixing() -> None:
    from training.metrix import mixed_pool, plan_pairs

    gen = torch.Generator(device="cuda").manual_seed(0)
    labels = torch.randint(0, 8, (24,), device="cuda", generator=gen)
    # values k/8 and lam k/16: every product and sum below is exact in float32, so both paths see the
    # same maxima and the same (first) position among ties, whatever order they compute in
    levels = torch.randint(0, 16, (24, 256, 7, 7), device="cuda", generator=gen)
    fmap = (levels / 8).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    t = plan_pairs(labels, pair_kind="both", lam_per="pair", generator=gen)
    t = t._replace(lam=(t.lam * 16).round() / 16)
    fused_in = fmap.clone().requires_grad_(True)
    ours = mixed_pool(fused_in, t)  # auto: the fused kernels, after their first-use check
    # reference: the PyTorch path on the same bf16 values upcast, so both mix in float32
    ref_in = fmap.float().requires_grad_(True)
    ref = mixed_pool(ref_in, t, fused=False)
    weights = torch.randn(ref.shape, device="cuda", generator=gen)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert fused_in.grad.dtype == torch.bfloat16
    torch.testing.assert_close(fused_in.grad, ref_in.grad.to(torch.bfloat16))
    from training import fused_pool

    assert fused_pool.fallback_reason(fmap.device) is None  # the first-use check accepted the kernels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a CUDA device")
def test_fused_pooling_addresses_more_than_2_31_pooled_values() -> None:
    """M * C beyond int32: the kernels' output and gradient offsets are 64-bit (about 45 GB of GPU memory)."""
    from training.fused_pool import fused_mixed_pool

    if torch.cuda.mem_get_info()[0] < 48 * 1024**3:
        pytest.skip("needs about 48 GB of free GPU memory")
    channels, count = 32768, 65537  # the last mix starts at offset 65536 * 32768 = 2^31
    gen = torch.Generator(device="cuda").manual_seed(0)
    maps = torch.randn(4, channels, 1, device="cuda", generator=gen).requires_grad_(True)  # P = 1 position
    first = torch.zeros(count, dtype=torch.long, device="cuda")
    second = torch.ones(count, dtype=torch.long, device="cuda")
    lam = torch.full((count,), 0.5, device="cuda")
    first[-1], second[-1], lam[-1] = 2, 3, 0.25
    out = fused_mixed_pool(maps, first, second, lam)
    # one position: average and maximum are both the mix itself
    expected_last = 2 * (0.25 * maps[2, :, 0] + 0.75 * maps[3, :, 0])
    torch.testing.assert_close(out[-1], expected_last.detach())
    torch.testing.assert_close(out[0], (maps[0, :, 0] + maps[1, :, 0]).detach())
    out.backward(torch.ones_like(out))
    del out
    grad = maps.grad[:, :, 0]
    for row, value in enumerate([65536.0, 65536.0, 0.5, 1.5]):  # 2 x the weights each map enters with
        torch.testing.assert_close(grad[row], torch.full_like(grad[row], value))
