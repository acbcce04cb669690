"""Training-step throughput of Metrix at each mixing level, as a ratio to the plain step of the same run.

Synthetic tensors (no data loading), one process, one model and optimiser shared by all variants.
On a GPU: bf16 autocast and channels_last; on a CPU: float32.  For each loss it measures a full step
(forward, clean + mixed loss, backward, Adam) for --mixup none, embedding, feature, input with the
product's own objective (training.objective), and prints images/s, the ratio to `none`, the number of
mixes per step and peak memory (torch.cuda.max_memory_allocated on GPU, peak RSS on CPU).

    python benchmarks/train_step.py                                   # ResNet-50, batch 100, 224 px
    python benchmarks/train_step.py --arch resnet18 --size 64 --batch 32 --steps 3    # a quick CPU run
    python benchmarks/train_step.py --loss all --rounds 3 --check-sync                # GPU report
    python benchmarks/train_step.py --modes eager,compiled,graphs,both --check-sync     # step modes side by side

Targets on GPU: feature >= 0.90x and embedding >= 0.95x of `none`, with the full pair set.
Imports only torch, torchvision, numpy and this project.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.config import LossConfig, MixupConfig, ModelConfig, RunConfig  # noqa: E402
from retrieval.devices import torch_device  # noqa: E402
from retrieval.model import Embedder  # noqa: E402
from training import catalog  # noqa: E402
from training.levels import level as mixing_level, level_names  # noqa: E402
from training.objective import build_objective  # noqa: E402
from training.step import GRAPH_WARMUP_STEPS, StepParts, build_step, set_optimizer_for_graphs  # noqa: E402

LEVELS = level_names()
VARIANTS = (*LEVELS, "feature:torch")  # feature:torch = feature level with the PyTorch pooling path
TARGETS = {"embedding": 0.95, "feature": 0.90, "feature:torch": 0.90}
MODES = ("eager", "compiled", "graphs", "both")


def _reset_peak_rss() -> None:
    try:  # Linux: writing 5 resets the peak RSS (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _labels(batch: int, classes: int, per_class: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Random batches (per_class 0, as CUB/Cars) or class-balanced P x K batches (as SOP/In-Shop)."""
    if per_class > 0:
        groups = -(-batch // per_class)
        chosen = torch.randperm(classes, generator=generator)[:groups]
        return chosen.repeat_interleave(per_class)[:batch].to(device)
    return torch.randint(0, classes, (batch,), generator=generator).to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the first round")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the variants this many times; report the median")
    parser.add_argument("--loss", default=catalog.DEFAULT_LOSS, choices=[*catalog.loss_names(), "all"])
    parser.add_argument("--levels", default=",".join(LEVELS),
                        help=f"comma-separated subset of {','.join(VARIANTS)} (feature:torch: the feature "
                             "level with the PyTorch pooling instead of the fused kernels)")
    parser.add_argument("--classes", type=int, default=100, help="classes the synthetic labels are drawn from")
    parser.add_argument("--per-class", type=int, default=0, help="0: random labels; K > 0: class-balanced batches of K per class")
    parser.add_argument("--max-pairs", type=int, default=0, help="0: every (positive, negative) pair (input level: one mix per image)")
    parser.add_argument("--pair-kind", default="random", choices=catalog.PAIR_KINDS)
    parser.add_argument("--lam-per", default="batch", choices=catalog.LAMBDA_PER)
    parser.add_argument("--chunk-elements", type=int, default=0,
                        help="feature level: mixed-map elements held at once (0: the product default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--compile-loss", action="store_true",
                        help="same as replacing eager by compiled in --modes (kept for older scripts)")
    parser.add_argument("--modes", default="eager",
                        help="comma-separated step modes measured side by side: eager, compiled (loss terms "
                             "torch.compile'd), graphs (whole-step CUDA graph), both (compiled loss inside the graph)")
    parser.add_argument("--check-sync", action="store_true", help="CUDA: run one step per variant with sync debug mode 'error'")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    args = parser.parse_args(argv)

    device = torch_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    channels_last = device.type == "cuda" and not args.no_channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    for lv in levels:
        if lv not in VARIANTS:
            parser.error(f"unknown level {lv!r}; choose from {VARIANTS}")
    losses = list(catalog.loss_names()) if args.loss == "all" else [args.loss]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name} | torch {torch.__version__} | {args.arch} batch {args.batch} at {args.size}px | "
          f"precision {precision} | channels_last {channels_last} | compile {args.compile} | "
          f"modes {args.modes}{' (compiled loss)' if args.compile_loss else ''}")
    print(f"labels: {'balanced ' + str(args.per_class) + ' per class' if args.per_class else 'random'} from {args.classes} classes | "
          f"pair kind {args.pair_kind} | lam per {args.lam_per} | max_pairs {args.max_pairs}")

    torch.manual_seed(0)
    host_gen = torch.Generator().manual_seed(0)
    device_gen = torch.Generator(device=device).manual_seed(0)
    model = Embedder(ModelConfig(arch=args.arch, embedding_size=args.embedding_size, pretrained="none")).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    runner: torch.nn.Module = torch.compile(model) if args.compile else model

    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    label_batches = [_labels(args.batch, args.classes, args.per_class, host_gen, device) for _ in range(8)]

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {MODES}")
    if args.compile_loss:  # the older flag: the compiled-loss mode
        modes = ["compiled" if m == "eager" else m for m in modes]
    if device.type != "cuda" and any(m in ("graphs", "both") for m in modes):
        print("note: CUDA graphs need a CUDA device; the graphs and both modes are skipped on this machine")
        modes = [m for m in modes if m not in ("graphs", "both")]
    if not modes:
        parser.error("no mode left to measure on this device")

    all_ok = True
    for loss_name in losses:
        runners, optimisers = {}, {}
        for mode in modes:
            for level in levels:
                cfg = RunConfig(loss=LossConfig(name=loss_name), mixup=MixupConfig(
                    level=level.split(":")[0], pair_kind=args.pair_kind, lam_per=args.lam_per, max_pairs=args.max_pairs))
                objective = build_objective(cfg, args.classes, args.embedding_size).to(device)
                if args.chunk_elements > 0:
                    objective.chunk_elements = args.chunk_elements
                if level == "feature:torch":
                    objective.fused_pool = False
                if mode in ("compiled", "both"):
                    objective.compile_losses()
                opt = torch.optim.Adam(list(model.parameters()) + list(objective.parameters()), lr=1e-5)
                graphs = mode in ("graphs", "both")
                set_optimizer_for_graphs(opt, capturable=graphs)
                parts = StepParts(runner, objective, opt, torch.amp.GradScaler(device.type, enabled=False),
                                  device_gen, amp_dtype, grad_clip=10.0)
                runners[mode, level] = build_step(parts, use_graphs=graphs)
                optimisers[mode, level] = opt

        def step(key: tuple[str, str], i: int) -> None:
            runners[key](images, label_batches[i % len(label_batches)])

        keys = [(mode, level) for mode in modes for level in levels]
        for key in keys:  # graphs: warm-up steps, capture and a first replay happen here
            for i in range(max(args.warmup, GRAPH_WARMUP_STEPS + 1 if key[0] in ("graphs", "both") else 0)):
                step(key, i)
        _sync(device)

        rates: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
        peaks: dict[tuple[str, str], int] = {k: 0 for k in keys}
        for _ in range(args.rounds):
            for key in keys:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                else:
                    _reset_peak_rss()
                _sync(device)
                start = time.perf_counter()
                for i in range(args.steps):
                    step(key, i)
                _sync(device)
                elapsed = time.perf_counter() - start
                rates[key].append(args.batch * args.steps / elapsed)
                peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss()
                peaks[key] = max(peaks[key], peak)

        sync_status = {}
        if args.check_sync and device.type == "cuda":
            for key in keys:
                _sync(device)
                torch.cuda.set_sync_debug_mode("error")
                try:
                    step(key, 0)
                    sync_status[key] = "no sync"
                except RuntimeError as exc:
                    sync_status[key] = f"SYNC: {str(exc).splitlines()[0][:60]}"
                    all_ok = False
                finally:
                    torch.cuda.set_sync_debug_mode("default")

        mem_label = "peak GPU MiB" if device.type == "cuda" else "peak RSS MiB"
        eager_base = statistics.median(rates[modes[0], "none"]) if (modes[0], "none") in rates else None
        print(f"\nloss {loss_name}")
        print(f"{'mode':<9} {'mixup':<13} {'images/s':>10} {'vs none':>8} {'target':>7} {'vs ' + modes[0] + ' none':>14} "
              f"{'mixes/step':>11} {mem_label:>13}" + ("  sync" if sync_status else ""))
        for mode in modes:
            base = statistics.median(rates[mode, "none"]) if (mode, "none") in rates else None
            for level in levels:
                rate = statistics.median(rates[mode, level])
                ratio = rate / base if base else float("nan")
                target = TARGETS.get(level)
                mixes = 0 if level == "none" else (
                    mixing_level(level.split(":")[0]).max_pairs(args.max_pairs, args.batch) or args.batch * args.batch)
                flag = ""
                if target is not None and base:
                    flag = f"{target:.2f}" + ("" if ratio >= target else "!")
                vs_first = rate / eager_base if eager_base else float("nan")
                print(f"{mode:<9} {level:<13} {rate:>10.1f} {ratio:>7.3f}x {flag:>7} {vs_first:>13.3f}x "
                      f"{mixes:>11d} {peaks[mode, level] / 2**20:>13.0f}"
                      + (f"  {sync_status.get((mode, level), '')}" if sync_status else ""))
        if len(modes) > 1:
            for level in levels:
                best = max(modes, key=lambda m: statistics.median(rates[m, level]))
                print(f"fastest for {level}: {best}")
    if device.type != "cuda":
        print("\nCPU run: the GPU targets (feature >= 0.90x, embedding >= 0.95x) apply to GPU measurements only.")
    return 0 if all_ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
