"""The fused (Triton) feature-level Metrix pooling against the PyTorch path: values and gradients.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in a child process because the
setting is read when the kernels are defined); on a CUDA machine they are also compared compiled, in
bfloat16, at a ResNet-like shape.
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


def test_fused_kernels_match_the_pytorch_pooling_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fused pooling matches" in done.stdout


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
    ours = mixed_pool(fused_in, t)  # auto: the fused kernels
    # reference: the PyTorch path on the same bf16 values upcast, so both mix in float32
    ref_in = fmap.float().requires_grad_(True)
    ref = mixed_pool(ref_in, t, fused=False)
    weights = torch.randn(ref.shape, device="cuda", generator=gen)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert fused_in.grad.dtype == torch.bfloat16
    torch.testing.assert_close(fused_in.grad, ref_in.grad.to(torch.bfloat16))
