"""Device decisions that must agree everywhere: autocast precision (training and the torch embedding backend)
and which device a generator or tensor lives on. No GPU here: CUDA devices are compared as torch.device
objects, and the CUDA runtime's answers (bf16 support, current device) are set by the test."""

from __future__ import annotations

import types

import pytest
import torch

from retrieval.config import ModelConfig
from retrieval.devices import resolve_amp, same_device
from retrieval.preprocess import Preprocessing
from retrieval.embed.torch_backend import TorchBackend
from retrieval.errors import UsageError
from retrieval.model import Embedder
from training.metrix import sample_beta


@pytest.mark.parametrize("bf16_supported,expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_is_bf16_only_on_a_gpu_that_supports_it(monkeypatch, bf16_supported, expected) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    cuda = torch.device("cuda", 0)
    assert resolve_amp("auto", cuda) is expected
    assert resolve_amp("bf16", cuda) is torch.bfloat16 and resolve_amp("fp16", cuda) is torch.float16
    assert resolve_amp("none", cuda) is None
    assert all(resolve_amp(amp, torch.device("cpu")) is None for amp in ("auto", "bf16", "fp16", "none"))
    with pytest.raises(UsageError, match="unknown amp setting 'fp8'"):
        resolve_amp("fp8", cuda)


def test_the_torch_backend_resolves_its_precision_as_training_does() -> None:
    model = Embedder(ModelConfig(arch="resnet18", embedding_size=8, pretrained="none"))
    prep = Preprocessing(image_size=32, resize_size=32)
    for amp in ("auto", "bf16", "none"):  # a CPU embeds in float32 whatever the setting
        backend = TorchBackend(model, prep, device="cpu", amp_dtype=amp)
        assert backend.amp_dtype is None and backend.device == "cpu"
        assert backend.embed_tensor(torch.randn(2, 3, 32, 32)).dtype.name == "float32"
    assert TorchBackend(model, prep, device="cpu", amp_dtype=None).amp_dtype is None
    with pytest.raises(UsageError, match="unknown amp setting"):
        TorchBackend(model, prep, device="cpu", amp_dtype="half")


def test_same_device_tells_gpus_apart_and_reads_a_bare_cuda_as_the_current_gpu(monkeypatch) -> None:
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert same_device(cuda0, "cuda:0") and not same_device(cuda1, cuda0)
    assert not same_device("cpu", cuda0) and same_device("cpu", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert same_device("cuda", cuda1) and not same_device("cuda", cuda0)


def test_a_mixing_generator_on_another_gpu_is_refused_before_any_draw() -> None:
    """cuda:1's generator for a batch on cuda:0 would draw on the wrong GPU (or fail inside a capture)."""
    on_gpu1 = types.SimpleNamespace(device=torch.device("cuda", 1))  # a generator's device, without a GPU
    with pytest.raises(ValueError, match="lives on cuda:1 but the batch is on cuda:0"):
        sample_beta(2.0, (4,), torch.device("cuda", 0), generator=on_gpu1)  # type: ignore[arg-type]
    lam = sample_beta(2.0, (4,), torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert lam.shape == (4,) and bool(((lam >= 0) & (lam <= 1)).all())
