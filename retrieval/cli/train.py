"""`retrieval train`: train an embedder with a paper preset, overridable by a config file and flags.

Resolution order (later wins): the preset for (dataset, loss, mixup) -- or the checkpoint's config when
resuming -- then the --config JSON file, then the named flags, then --set KEY=VALUE; retrieval.config_resolve
does it, this module parses and prints.
Multi-GPU: `torchrun --nproc_per_node N "$(which retrieval)" train ...` (see REPRODUCE.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

import typer

from retrieval.config_resolve import resolve_config
from retrieval.data import dataset_choices
from retrieval.errors import ConfigError
from training import catalog, levels


def _resume_path(resume: str, out_dir: str | None) -> Path:
    """--resume PATH (a checkpoint), DIR (its last.pt), or 'last' (the run folder's last.pt)."""
    from training.run_files import LAST_CHECKPOINT, resume_checkpoint

    if resume in ("last", "auto"):
        if not out_dir:
            raise ConfigError("--resume last needs --out (the run folder holding last.pt)")
        resume = str(Path(out_dir) / LAST_CHECKPOINT)
    path = resume_checkpoint(resume)
    if not path.is_file():
        raise ConfigError(
            f"--resume: checkpoint not found: {path}; pass a checkpoint, a run folder or 'last' with --out"
        )
    return path


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_command(
        dataset: Optional[str] = typer.Option(None, "--dataset", help=f"{dataset_choices()}."),
        data_root: Optional[str] = typer.Option(
            None,
            "--data-root",
            help="Dataset folder in its official layout (demo: generated into data/demo if left out).",
        ),
        loss: Optional[str] = typer.Option(
            None, "--loss", help=f"{catalog.described(catalog.LOSSES)}. Default {catalog.DEFAULT_LOSS}."
        ),
        mixup: Optional[str] = typer.Option(
            None, "--mixup", help=f"Metrix level: {catalog.described(levels.LEVELS)}. Default {levels.DEFAULT_LEVEL}."
        ),
        config_file: Optional[Path] = typer.Option(
            None, "--config", help="JSON file shaped like the printed config; flags override it."
        ),
        epochs: Optional[int] = typer.Option(None, "--epochs", min=1),
        lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate of trunk and embedding layer."),
        batch_size: Optional[int] = typer.Option(
            None, "--batch-size", min=2, help="Global batch size (all GPUs together)."
        ),
        image_size: Optional[int] = typer.Option(
            None,
            "--image-size",
            min=16,
            help="Training crop and test centre crop (the test resize follows at 256/224 unless --resize-size is "
            "given).",
        ),
        resize_size: Optional[int] = typer.Option(
            None, "--resize-size", min=16, help="Test-time short-side resize (default: image size x 256/224)."
        ),
        sampler: Optional[str] = typer.Option(None, "--sampler", help="random or balanced (P classes x K images)."),
        images_per_class: Optional[int] = typer.Option(
            None, "--images-per-class", min=1, help="K of balanced batches."
        ),
        arch: Optional[str] = typer.Option(None, "--arch", help="resnet18, resnet34, resnet50 or resnet101."),
        embedding_size: Optional[int] = typer.Option(None, "--embedding-size", min=2),
        pretrained: Optional[str] = typer.Option(
            None, "--pretrained", help="imagenet, none, or a local torchvision weights file."
        ),
        lr_step: Optional[int] = typer.Option(None, "--lr-step", min=1, help="StepLR period in epochs."),
        lr_gamma: Optional[float] = typer.Option(None, "--lr-gamma", help="StepLR factor."),
        weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
        warmup_epochs: Optional[int] = typer.Option(
            None, "--warmup-epochs", min=0, help="Epochs training only the embedding layer and loss parameters."
        ),
        freeze_bn: Optional[bool] = typer.Option(
            None, "--freeze-bn/--no-freeze-bn", help="Keep BatchNorm in eval mode with frozen affine parameters."
        ),
        bn_affine_after_warmup: Optional[bool] = typer.Option(
            None,
            "--bn-affine-after-warmup/--no-bn-affine-after-warmup",
            help="With --freeze-bn, train BatchNorm's scale and shift once warm-up ends (the official code).",
        ),
        proxy_lr_mult: Optional[float] = typer.Option(
            None, "--proxy-lr-mult", help="Loss parameters' (proxies') lr multiplier."
        ),
        grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Gradient value clipping threshold."),
        mix_weight: Optional[float] = typer.Option(None, "--mix-weight", help="w in clean + w * mixed."),
        mix_alpha: Optional[float] = typer.Option(None, "--mix-alpha", help="lam ~ Beta(alpha, alpha)."),
        lam_per: Optional[str] = typer.Option(
            None, "--lam-per", help="batch (one lam per batch, as the paper) or pair."
        ),
        pair_kind: Optional[str] = typer.Option(
            None,
            "--pair-kind",
            help="random (official code: one kind per step; the table presets), both (the paper's V(a); demo and "
            "folders), positive or anchor.",
        ),
        input_pairs: Optional[str] = typer.Option(
            None,
            "--input-pairs",
            help="Input-level mixes: hardest (each positive with the anchor's closest negatives, as the official "
            "code) or random.",
        ),
        hard_negatives: Optional[int] = typer.Option(
            None,
            "--hard-negatives",
            min=1,
            help="Input level, hardest: closest negatives mixed per (anchor, positive) pair.",
        ),
        max_pairs: Optional[int] = typer.Option(
            None, "--max-pairs", min=0, help="Mixes per batch; 0 = every (positive, negative) combination."
        ),
        amp: Optional[str] = typer.Option(
            None, "--amp", help="auto (bf16 on GPU), bf16, fp16 or none. CPU trains in float32."
        ),
        compile_model: Optional[bool] = typer.Option(
            None, "--compile/--no-compile", help="torch.compile trunk and head."
        ),
        compile_loss: Optional[bool] = typer.Option(
            None,
            "--compile-loss/--no-compile-loss",
            help="torch.compile the loss terms and embedding-level mixing (fewer kernel launches per step). Opt-in "
            "(default off).",
        ),
        cuda_graphs: Optional[bool] = typer.Option(
            None,
            "--cuda-graphs/--no-cuda-graphs",
            help="Replay the whole training step from a CUDA graph. Opt-in (default off): not yet validated on a GPU "
            "by benchmarks/gpu_checks.sh. Applies where the step qualifies (CUDA, one process, bf16/fp32, no "
            "--compile, no deterministic algorithms; otherwise eager, with the reason printed); if capture or "
            "replay fails, training continues eagerly and says why.",
        ),
        channels_last: Optional[bool] = typer.Option(
            None, "--channels-last/--no-channels-last", help="channels_last memory format on GPU."
        ),
        eval_every: Optional[int] = typer.Option(
            None, "--eval-every", min=0, help="Evaluate every N epochs (always after the last; 0 = only then)."
        ),
        out: Optional[str] = typer.Option(None, "--out", help="Run folder for checkpoints and metrics."),
        seed: Optional[int] = typer.Option(None, "--seed"),
        device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
        workers: Optional[int] = typer.Option(None, "--workers", min=0, help="DataLoader worker processes."),
        max_steps_per_epoch: Optional[int] = typer.Option(
            None, "--max-steps-per-epoch", min=0, help="Cap steps per epoch (0 = full epochs)."
        ),
        cache: Optional[str] = typer.Option(
            None, "--cache", help="Decoded-image cache folder written by `retrieval prepare`."
        ),
        sets: list[str] = typer.Option(
            [], "--set", help="Any other setting: SECTION.KEY=VALUE, e.g. loss.ms_alpha=2 (repeatable)."
        ),
        resume: Optional[str] = typer.Option(
            None,
            "--resume",
            help="Continue exactly from a checkpoint: PATH, a run folder, or 'last' (--out's last.pt).",
        ),
        evaluate_before: bool = typer.Option(
            False, "--eval-before", help="Also evaluate the untrained model (logged as epoch 0)."
        ),
        print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as JSON and exit."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
        deterministic: Optional[bool] = typer.Option(
            None,
            "--deterministic/--no-deterministic",
            help="Bit-identical reruns and resumes: deterministic algorithms only, fixed cuBLAS workspace, no cuDNN "
            "autotuning, seeded loader workers (slower on GPU). See README, 'Exact resume'.",
        ),
    ) -> None:
        """Train an embedder with Metrix; writes last.pt, best.pt, metrics.jsonl/csv to the run folder."""
        from rich.console import Console

        console = Console(stderr=False)
        is_main = int(os.environ.get("RANK", "0")) == 0
        flags: dict[str, dict[str, Any]] = {
            "data": dict(root=data_root, image_size=image_size, resize_size=resize_size, batch_size=batch_size,
                         sampler=sampler, images_per_class=images_per_class, workers=workers, cache=cache),
            "model": dict(arch=arch, embedding_size=embedding_size, pretrained=pretrained),
            "mixup": dict(weight=mix_weight, alpha=mix_alpha, lam_per=lam_per, pair_kind=pair_kind, max_pairs=max_pairs,
                          input_pairs=input_pairs, hard_negatives=hard_negatives),
            "train": dict(epochs=epochs, lr=lr, weight_decay=weight_decay, lr_step=lr_step, lr_gamma=lr_gamma,
                          warmup_epochs=warmup_epochs, freeze_bn=freeze_bn,
                          bn_affine_after_warmup=bn_affine_after_warmup, proxy_lr_mult=proxy_lr_mult,
                          grad_clip=grad_clip, seed=seed, amp=amp, channels_last=channels_last,
                          compile=compile_model, compile_loss=compile_loss, cuda_graphs=cuda_graphs,
                          eval_every=eval_every, out_dir=out, device=device, max_steps_per_epoch=max_steps_per_epoch,
                          deterministic=deterministic),
        }  # fmt: skip
        resume_path, resume_config = None, None
        if resume is not None:
            resume_path = _resume_path(resume, out)
            from retrieval.checkpoint import load_checkpoint  # torch: only once the checkpoint is known to exist

            resume_config = load_checkpoint(resume_path)["config"]
        cfg = resolve_config(
            dataset=dataset, loss=loss, mixup=mixup, config_file=config_file,
            resume_config=resume_config, flags=flags, sets=sets,
        )  # fmt: skip
        if out is None and resume is None and cfg.train.out_dir == "runs/default":
            # one folder per results-table cell, so runs of different cells never overwrite each other
            run_name = f"{cfg.data.dataset}-{cfg.loss.name}-{cfg.mixup.level}"
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=f"runs/{run_name}"))
        if print_config:
            if is_main:
                print(json.dumps(cfg.to_dict(), indent=2))
            raise typer.Exit()

        from training.trainer import train

        result = train(cfg, progress=not quiet, resume=resume_path, evaluate_before=evaluate_before)
        if is_main:
            console.print(result.summary(), highlight=False, soft_wrap=True)
