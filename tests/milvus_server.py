"""A real Milvus Lite gRPC server for the Milvus store's tests, on a free loopback port.

The server runs from its own environment, .venv-milvus (made by `make test`; METRIX_MILVUS_VENV names another):
milvus-lite depends on faiss-cpu, which must never enter the project's environment.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0


def milvus_venv() -> Path:
    return Path(os.environ.get("METRIX_MILVUS_VENV", REPO / ".venv-milvus"))


def server_command() -> Path:
    return milvus_venv() / "bin" / "milvus-lite"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(uri: str) -> bool:
    from pymilvus import MilvusClient

    try:
        MilvusClient(uri=uri, timeout=2).list_collections()
        return True
    except Exception:
        return False


def run_server(data_dir: Path) -> Iterator[str]:
    """Start `milvus-lite server` on a free loopback port, yield its URI once it answers, stop it after."""
    port = _free_port()
    log = open(data_dir.parent / "milvus-server.log", "wb")
    proc = subprocess.Popen([str(server_command()), "server", "--data-dir", str(data_dir), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Milvus Lite server did not start: see {log.name}")
            time.sleep(0.2)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
