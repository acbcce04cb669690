"""The embedder: ResNet trunk up to layer4 -> global avg + max pooling (summed) -> Linear -> L2 norm.

`trunk()` and `head()` are separate so feature-level Metrix can mix layer4 maps computed once and
run only the head on the mixes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from retrieval.config import ModelConfig
from retrieval.errors import UsageError, UserError

TRUNK_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet18-half": 256}
# Trunks that are a torchvision ResNet at a fraction of its width (no published weights: trained from scratch).
# ResNet-18 at half width has about a quarter of the multiply-adds: a CPU-sized trunk for small images (the demo).
_SLIM = {"resnet18-half": ("resnet18", 32)}
_WEIGHTS_ENUM = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
}


class PretrainedWeightsError(UserError, RuntimeError):
    """ImageNet weights could not be obtained; the message says how to supply a local file."""


def _slim_resnet(base: str, width: int) -> torchvision.models.ResNet:
    """torchvision's `base` ResNet with `width` channels in its first stage (64 in torchvision), doubling per
    stage as there; its own blocks and initialisation."""
    net = getattr(torchvision.models, base)(weights=None)
    block = type(net.layer1[0])
    depths = [len(layer) for layer in (net.layer1, net.layer2, net.layer3, net.layer4)]
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.layer1 = net._make_layer(block, width, depths[0])
    net.layer2 = net._make_layer(block, 2 * width, depths[1], stride=2)
    net.layer3 = net._make_layer(block, 4 * width, depths[2], stride=2)
    net.layer4 = net._make_layer(block, 8 * width, depths[3], stride=2)
    for m in net.modules():  # torchvision's initialisation of a ResNet
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def _build_trunk(arch: str) -> torchvision.models.ResNet:
    if arch in _SLIM:
        return _slim_resnet(*_SLIM[arch])
    return getattr(torchvision.models, arch)(weights=None)


def _load_trunk_weights(net: nn.Module, arch: str, pretrained: str) -> None:
    if pretrained in ("none", "", None):
        return
    if arch not in _WEIGHTS_ENUM:
        raise PretrainedWeightsError(f"{arch} has no pretrained weights; train it from scratch with --pretrained none")
    if pretrained == "imagenet":
        weights = getattr(torchvision.models, _WEIGHTS_ENUM[arch]).IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=True)
        except Exception as exc:  # no network, proxy, bad cache...
            raise PretrainedWeightsError(
                f"could not download torchvision's ImageNet weights for {arch} ({exc}). "
                f"Download {weights.url} on a machine with internet access and pass the file with "
                f"--pretrained PATH (or place it in torch's hub cache, {torch.hub.get_dir()}/checkpoints/), "
                "or train from scratch with --pretrained none."
            ) from exc
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise PretrainedWeightsError(
                f"pretrained weights file not found: {path}. Pass a torchvision {arch} state_dict (.pth), "
                "'imagenet' to download, or 'none'."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise PretrainedWeightsError(f"weights {pretrained} do not fit {arch}: {str(exc)[:500]}") from exc
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"weights {pretrained} do not fit {arch}: missing {missing[:5]}, unexpected {list(unexpected)[:5]}"
        )


class Embedder(nn.Module):
    """ResNet -> (avg + max pool) -> Linear(C -> D) -> L2 norm.  forward: (B, 3, H, W) -> emb (B, D)."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or ModelConfig()
        if cfg.arch not in TRUNK_CHANNELS:
            raise UsageError(f"unknown arch {cfg.arch!r}; choose one of {sorted(TRUNK_CHANNELS)}")
        self.cfg = cfg
        net = _build_trunk(cfg.arch)
        _load_trunk_weights(net, cfg.arch, cfg.pretrained)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = TRUNK_CHANNELS[cfg.arch]
        self.embedding = nn.Linear(self.channels, cfg.embedding_size)
        nn.init.kaiming_normal_(self.embedding.weight, mode="fan_out")
        nn.init.zeros_(self.embedding.bias)

    @property
    def embedding_size(self) -> int:
        return self.embedding.out_features

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) normalised -> layer4 maps (B, C, h, w)."""
        x = self.stem(images)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    @staticmethod
    def pool(fmap: torch.Tensor) -> torch.Tensor:
        """layer4 maps (B, C, h, w) -> (B, C): global average + global max, summed (as the official code)."""
        return fmap.mean(dim=(2, 3)) + fmap.amax(dim=(2, 3))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled (B, C) -> emb (B, D) L2-normalised."""
        return F.normalize(self.embedding(pooled), dim=1)

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        """layer4 maps (B, C, h, w) -> emb (B, D) L2-normalised."""
        return self.project(self.pool(fmap))

    def forward(self, images: torch.Tensor, return_maps: bool = False, follow_up=None):
        """images -> emb (B, D); with return_maps, (layer4 maps (B, C, h, w), emb); with follow_up, (emb, emb2)
        where emb2 embeds the images follow_up(emb.detach()) returns.

        return_maps lets feature-level Metrix, and follow_up input-level Metrix (mixes chosen from the clean
        embeddings), do their work in one forward call, which is what DistributedDataParallel needs.
        """
        fmap = self.trunk(images)
        emb = self.head(fmap)
        if follow_up is not None:
            return emb, self.head(self.trunk(follow_up(emb.detach())))
        return (fmap, emb) if return_maps else emb

    def trunk_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("embedding.")]

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.embedding.parameters())


def freeze_batchnorm(model: nn.Module, train_affine: bool = False) -> None:
    """Put every BatchNorm in eval mode (frozen statistics, the official CUB/Cars recipe); its affine
    parameters are frozen too unless `train_affine` (the official code after warm-up).

    Call after every `model.train()`, which would switch them back.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(train_affine)


def fingerprint_state(state: dict[str, torch.Tensor]) -> str:
    """A short content hash of weights: identical weights give identical fingerprints on any device.

    Indexes and ONNX files record it so a gallery is never searched with a different embedder.
    """
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    return fingerprint_state(model.state_dict())
