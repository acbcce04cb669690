"""Every command's common mistakes, through the real command line (`python -m retrieval`, a subprocess):
one unwrapped `error:` line on stderr (and perhaps a `hint:`), nothing on stdout, the documented exit
status (retrieval.errors), never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from retrieval.index.build import build_index
from retrieval.embed.spec import EmbedderSpec, open_embedder
from retrieval.index.config import IndexConfig
from retrieval.data import load_dataset
from retrieval.errors import EXIT_ERROR, EXIT_USAGE
from tests.fakes import make_fake_inshop, make_image_folder, write_nasty_images

TINY = dict(arch="resnet18", embedding_size=16, image_size=32, seed=0)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}  # a narrow, non-terminal output used to wrap errors
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "retrieval", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # a deep folder, so that messages naming files are longer than 80 columns
    base = tmp_path_factory.mktemp("cli") / ("a-long-folder-name-so-paths-exceed-eighty-columns-" * 2).rstrip("-")
    base.mkdir()
    inshop = make_fake_inshop(base / "inshop", train_items=2, test_items=4, per_item=3)
    index = base / "index"
    backend = open_embedder(EmbedderSpec.untrained(**TINY), "cpu")
    build_index(load_dataset("inshop", inshop), backend, index, IndexConfig(use_gpu=False), progress=False)
    corrupt = base / "corrupt-index"
    corrupt.mkdir()
    for f in index.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "index.faiss").write_bytes((index / "index.faiss").read_bytes()[:40])
    folder5 = make_image_folder(base / "five-classes", classes=10, per_class=3)  # 5 train classes
    nasty = write_nasty_images(base / "nasty")
    (base / "dir.jpg").mkdir()
    os.mkfifo(base / "fifo.jpg")
    return {"base": base, "inshop": inshop, "index": index, "corrupt": corrupt, "folder5": folder5,
            "truncated": nasty["truncated"]}


# (name, args with {placeholders}, exit status, words the error line must contain)
CASES = [
    ("train: balanced batch needs more classes", "train --dataset folder --data-root {folder5} --sampler balanced "
     "--batch-size 40 --images-per-class 2 --pretrained none --arch resnet18 --epochs 1 --device cpu --workers 0 "
     "--out {base}/run --quiet", EXIT_USAGE, "classes"),
    ("train: unknown dataset", "train --dataset nosuch", EXIT_USAGE, "nosuch"),
    ("train: unknown --set key", "train --dataset cub --set train.nosuch=1", EXIT_USAGE, "train.nosuch"),
    ("train: missing dataset", "train --dataset cub --data-root {base}/missing --pretrained none --device cpu",
     EXIT_ERROR, "missing"),
    ("train: missing resume checkpoint", "train --resume {base}/nothing.pt", EXIT_USAGE, "nothing.pt"),
    ("train: bad option value", "train --dataset cub --epochs 0", EXIT_USAGE, "--epochs"),
    ("index: no embedder", "index --dataset inshop --data-root {inshop} --out {base}/x", EXIT_USAGE, "--untrained"),
    ("index: conflicting embedders", "index --dataset inshop --data-root {inshop} --untrained --checkpoint {base}/c.pt",
     EXIT_USAGE, "--untrained"),
    ("index: missing dataset", "index --dataset cub --data-root {base}/missing --untrained --out {base}/x",
     EXIT_ERROR, "missing"),
    ("index: add a missing image", "index --add {base}/missing.jpg --out {index} --device cpu", EXIT_ERROR,
     "missing.jpg"),
    ("embed: no embedder", "embed --dataset inshop --data-root {inshop} --out {base}/parts", EXIT_USAGE,
     "--checkpoint"),
    ("search: missing index", "search {truncated} --index {base}/missing", EXIT_ERROR, "missing"),
    ("search: no image given", "search --index {index}", EXIT_USAGE, "images"),
    ("search: truncated image", "search {truncated} --index {index} --device cpu", EXIT_ERROR, "truncated.jpg"),
    ("search: a directory named x.jpg", "search {base}/dir.jpg --index {index} --device cpu", EXIT_ERROR,
     "is a directory"),
    ("search: a FIFO named x.jpg", "search {base}/fifo.jpg --index {index} --device cpu", EXIT_ERROR, "FIFO"),
    ("search: corrupt index", "search {truncated} --index {corrupt} --device cpu", EXIT_ERROR, "index.faiss"),
    ("evaluate: missing index", "evaluate --index {base}/missing", EXIT_ERROR, "missing"),
    ("evaluate: bad --ks", "evaluate --index {index} --ks a,b", EXIT_USAGE, "--ks"),
    ("export: missing checkpoint", "export --checkpoint {base}/missing.pt --out {base}/m.onnx", EXIT_ERROR,
     "missing.pt"),
    ("serve: missing index", "serve --index {base}/missing", EXIT_ERROR, "missing"),
    ("serve: unknown backend", "serve --index {index} --backend tensorflow", EXIT_USAGE, "tensorflow"),
    ("prepare: missing dataset", "prepare --dataset cub --data-root {base}/missing --out {base}/cache", EXIT_ERROR,
     "missing"),
    ("datasets: unknown dataset", "datasets nosuch", EXIT_USAGE, "nosuch"),
    ("datasets: wrong layout", "datasets cub --root {inshop}", EXIT_ERROR, "cub"),
    ("unknown command", "nosuch", EXIT_USAGE, "nosuch"),
]


@pytest.fixture(scope="module")
def results(setup: dict[str, Path]) -> dict[str, subprocess.CompletedProcess]:
    """All cases at once, two at a time (each is mostly interpreter start-up)."""

    def one(case: tuple) -> subprocess.CompletedProcess:
        return run_cli(*case[1].format(**setup).split(), cwd=setup["base"])

    with ThreadPoolExecutor(2) as pool:
        return dict(zip([c[0] for c in CASES], pool.map(one, CASES)))


@pytest.mark.parametrize("name,args,status,words", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_error_line_on_stderr(results, setup, name, args, status, words) -> None:
    res = results[name]
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
    assert res.stdout == "", f"stdout should be empty on failure, got {res.stdout!r}"
    assert res.returncode == status, (res.returncode, res.stderr)
    lines = res.stderr.splitlines()
    assert lines and lines[0].startswith("error: "), res.stderr
    assert words in lines[0], lines[0]
    # anything after the error line is the hint: no continuation of a wrapped error line
    assert all(not line.startswith(" ") for line in lines[:2]), res.stderr
    if len(lines) > 1:
        assert lines[1].startswith("hint: "), res.stderr


def test_a_bug_prints_its_traceback_and_says_so(tmp_path: Path) -> None:
    code = ("import retrieval.cli as c, typer\n"
            "@c.app.command('boom')\n"
            "def boom() -> None:\n"
            "    raise ZeroDivisionError('x')\n"
            "c.handle_errors(c.app)\n"
            "c.main()\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", code, "boom"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 70 and "Traceback" in res.stderr and "ZeroDivisionError" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: internal error (ZeroDivisionError); this is a bug")


def _run_with_closed_stdout(argv: list[str]) -> subprocess.CompletedProcess:
    """Run with standard output a pipe nobody reads any more (`retrieval ... | head` after head exited)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        return subprocess.run([sys.executable, *argv], stdout=write_end, stderr=subprocess.PIPE, text=True, env=env,
                              timeout=120)
    finally:
        os.close(write_end)


def test_output_into_a_closed_pipe_ends_quietly() -> None:
    """`retrieval index --help | head -3`, or a command printing more than its reader takes: no traceback, no
    error line, a failure status."""
    res = _run_with_closed_stdout(["-m", "retrieval", "index", "--help"])
    assert res.stderr == "" and res.returncode != 0, res.stderr
    code = ("import retrieval.cli as c\n"
            "@c.app.command('talk')\n"
            "def talk() -> None:\n"
            "    print('a line of output\\n' * 20000)\n"
            "c.handle_errors(c.app)\n"
            "c.main()\n")
    res = _run_with_closed_stdout(["-c", code, "talk"])
    assert res.stderr == "" and res.returncode == EXIT_ERROR, res.stderr


def test_an_abort_while_the_command_line_is_read_is_one_line(tmp_path: Path) -> None:
    """Typer turns the end of input at a prompt (or Ctrl-C) while options are parsed into Abort: one line, 130."""
    code = ("import typer, retrieval.cli as c\n"
            "def ask(value: str) -> str:\n"
            "    raise EOFError  # what input() raises at the end of input\n"
            "@c.app.command('ask')\n"
            "def ask_command(name: str = typer.Option('x', '--name', callback=ask)) -> None:\n"
            "    print(name)\n"
            "c.handle_errors(c.app)\n"
            "c.main()\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", code, "ask"], capture_output=True, text=True, env=env, timeout=120)
    # (Typer first ends the prompt's line with a newline)
    assert res.returncode == 130 and res.stderr.strip() == "error: interrupted" and res.stdout == "", res.stderr
