"""Real Milvus servers for the Milvus store's tests, on free loopback ports.

Two servers, both from their own environment, .venv-milvus (made by `make test`; METRIX_MILVUS_VENV names another):
milvus-lite depends on faiss-cpu, which must never enter the project's environment.
- `milvus-lite server`: the Milvus Lite gRPC server (the issue's test server, one per test module).
- `milvus-server`: Milvus 2.3.5 standalone (the Go server with its query, data and index nodes in one process and an
  embedded etcd), the server a deployment runs; it builds IVF_PQ, which Milvus Lite refuses. Its embedded etcd
  listens on the fixed peer port 2380, so one runs per machine at a time.
"""

from __future__ import annotations

import os
import signal
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


def standalone_command() -> Path:
    return milvus_venv() / "bin" / "milvus-server"


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
    yield from _serve([str(server_command()), "server", "--data-dir", str(data_dir), "--host", "127.0.0.1",
                       "--port", str(port)], port, data_dir.parent / "milvus-server.log", "Milvus Lite")


def run_standalone(data_dir: Path) -> Iterator[str]:
    """Start Milvus standalone (`milvus-server`, its proxy on a free port; it finds free ports for its other
    services itself), yield its URI once it answers, stop it and its children after."""
    port = _free_port()
    yield from _serve([str(standalone_command()), "--data", str(data_dir), "--proxy-port", str(port)], port,
                      data_dir.parent / "milvus-standalone.log", "Milvus standalone")


def _serve(command: list[str], port: int, log_path: Path, what: str) -> Iterator[str]:
    log = open(log_path, "wb")
    # a session of its own: the standalone launcher starts the server as a child, and both must stop
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {what} server did not start: see {log.name}")
            time.sleep(0.2)
        yield uri
    finally:
        _stop_group(proc)
        log.close()


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group; SIGKILL to whatever is left once the launcher exits (or after 15 s)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
