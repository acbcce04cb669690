"""`retrieval train --deterministic` killed with SIGKILL mid-epoch and again during a checkpoint write,
then resumed, ends with exactly the weights, optimiser state and metrics of an uninterrupted run; the
half-written checkpoint the kill left is removed by the resumed run, which says so."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.fakes import make_image_folder

EPOCHS = 3
TIMING = {"images_per_s", "epoch_time_s", "eval_time_s"}


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "retrieval", "train", "--dataset", "folder", "--data-root", str(data),
            "--arch", "resnet18", "--embedding-size", "8", "--image-size", "16", "--pretrained", "none",
            "--batch-size", "8", "--sampler", "random", "--epochs", str(EPOCHS), "--warmup-epochs", "1",
            "--eval-every", "1", "--workers", "0", "--device", "cpu", "--seed", "5", "--deterministic",
            "--out", str(out), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "COLUMNS": "120"}


class Run:
    """A training subprocess whose stderr (progress bars) is collected as it comes."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
        self.err = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        while chunk := self.proc.stderr.read1(4096):
            self.err += chunk

    def kill_when(self, condition, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended before it could be killed:\n{self.err.decode()[-2000:]}"
            assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
            time.sleep(0.001)
        self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def wait(self, timeout: float = 300.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("folder") / "data", classes=8, per_class=6, size=24)


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _assert_same_state(a: dict, b: dict, where: str = "") -> None:
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_killed_twice_and_resumed_equals_uninterrupted(data: Path, tmp_path: Path) -> None:
    straight_out, killed_out = tmp_path / "straight", tmp_path / "killed"
    straight = Run(_args(data, straight_out))  # runs alongside the interrupted one

    # 1. killed in the middle of epoch 2 (epoch 1's checkpoint is written; epoch 2 has begun stepping)
    first = Run(_args(data, killed_out))
    mid_epoch = re.compile(rb"epoch 2/%d:\s+\d+%%\|[^|\r]*\|\s*[1-9]\d*/" % EPOCHS)
    first.kill_when(lambda: (killed_out / "last.pt").is_file() and mid_epoch.search(first.err) is not None)
    assert torch.load(killed_out / "last.pt", weights_only=True)["epoch"] == 1

    # 2. resumed, then killed while it writes its next checkpoint
    def writing_checkpoint() -> bool:
        return any(p.stat().st_size > 0 for p in killed_out.glob(".last.pt.*.tmp") if p.exists())

    second = Run(_args(data, killed_out, "--resume", "last"))
    second.kill_when(writing_checkpoint)
    leftovers = list(killed_out.glob(".last.pt.*.tmp"))
    assert leftovers, "the kill came after the checkpoint was renamed into place"
    for path in leftovers:  # as old as a leftover found by a later run would be
        os.utime(path, (time.time() - 60, time.time() - 60))

    # 3. resumed to the end
    third = Run(_args(data, killed_out, "--resume", "last"))
    assert third.wait() == 0, third.err.decode()[-3000:]
    assert straight.wait() == 0, straight.err.decode()[-3000:]
    assert not list(killed_out.glob(".*.tmp"))
    assert f"removed {leftovers[0]}".encode() in third.err

    a = torch.load(straight_out / "last.pt", weights_only=True)
    b = torch.load(killed_out / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == EPOCHS
    _assert_same_state(a["model"], b["model"], "model")
    for payload in (a, b):  # wall-clock figures are the only numbers allowed to differ
        payload["extra"]["best_metrics"] = {k: v for k, v in payload["extra"]["best_metrics"].items() if k not in TIMING}
        payload["metrics"] = {k: v for k, v in payload["metrics"].items() if k not in TIMING}
    _assert_same_state(a["extra"], b["extra"], "extra")  # optimiser, scheduler, loss parameters, every RNG
    assert a["metrics"] == b["metrics"]
    assert a["fingerprint"] == b["fingerprint"]
    assert _metrics(straight_out) == _metrics(killed_out)
