"""benchmarks/gpu_checks.sh, the one run that exercises the CUDA code paths: it must select every test that
needs a GPU, and write its logs where it is told to, from wherever it is started."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_checks.sh"


def _listed_cuda_tests() -> list[str]:
    """The node ids of the script's CUDA_TESTS array."""
    block = re.search(r"^CUDA_TESTS=\((.*?)^\)", SCRIPT.read_text(), re.MULTILINE | re.DOTALL)
    assert block, "gpu_checks.sh has no CUDA_TESTS=( ... ) list"
    return block.group(1).split()


def _cuda_dependent_tests() -> set[str]:
    """Tests whose outcome depends on a CUDA device: skipped without one (a skip mark or a `pytest.skip`), or
    with a branch that only runs on one. Found as calls of torch.cuda.is_available() in the test function,
    its decorators, or a module-level mark the decorators name (like `cuda_only = pytest.mark.skipif(...)`)."""
    found = set()
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        cuda_marks = {
            target.id
            for node in tree.body if isinstance(node, ast.Assign) and "cuda.is_available()" in ast.unparse(node.value)
            for target in node.targets if isinstance(target, ast.Name)
        }
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test"):
                continue
            decorators = [ast.unparse(d) for d in node.decorator_list]
            if ("cuda.is_available()" in ast.unparse(node)
                    or any("cuda.is_available()" in d or d in cuda_marks for d in decorators)):
                found.add(f"tests/{path.name}::{node.name}")
    return found


def test_the_gpu_run_selects_every_test_that_needs_a_gpu_and_only_those() -> None:
    listed = _listed_cuda_tests()
    assert len(listed) == len(set(listed)), "a test is listed twice"
    needed = _cuda_dependent_tests()
    assert "tests/test_step.py::test_every_replay_draws_fresh_pairs_and_lam" in needed  # the scan sees marks
    assert needed - set(listed) == set(), "CUDA tests missing from CUDA_TESTS in benchmarks/gpu_checks.sh"
    assert set(listed) - needed == set(), "CUDA_TESTS names tests that do not exist or do not need CUDA"


def test_an_unknown_step_name_is_refused_before_anything_runs(tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(SCRIPT), "logs"], cwd=tmp_path, env={**os.environ, "ONLY": "cuda_test"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "unknown step 'cuda_test'" in done.stderr and "cuda_tests" in done.stderr
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_a_relative_log_folder_receives_the_logs_of_the_cuda_tests(tmp_path: Path) -> None:
    """Started from another folder with LOG_DIR relative to it; on a CPU every CUDA test skips or passes."""
    env = {**os.environ, "ONLY": "cuda_tests", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "out/logs"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    log = tmp_path / "out" / "logs" / "cuda_tests.log"
    assert log.is_file(), done.stdout + done.stderr
    assert "=== cuda_tests: rc=0" in done.stdout, done.stdout + log.read_text()
    text = log.read_text()
    for node_id in _listed_cuda_tests():  # -v: one line per test as it runs
        assert re.search(re.escape(node_id) + r"(\[[^\]]*\])? (PASSED|SKIPPED)", text), node_id
