"""Separate local Ray nodes for the tests that need their own cluster (job submission, elastic growth).

A plain module, not a test file: tests add the tests/ folder to sys.path and `import ray_nodes`
(pytest runs with --import-mode=importlib). Every node is a `ray start --block` child process on
ports the OS handed out, with its own session, stopped by its PID (never `ray stop`, which would
stop every cluster on the machine).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_ports(count: int) -> list[int]:
    """`count` distinct ports the OS reports free (all bound at once, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def node_port_flags() -> list[str]:
    """`ray start` flags that put every per-node service on a free port (several nodes, one machine)."""
    node_manager, agent_http, agent_grpc, runtime_env_agent, metrics = free_ports(5)
    return [f"--node-manager-port={node_manager}", f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env_agent}",
            f"--metrics-export-port={metrics}", "--min-worker-port=0", "--max-worker-port=0"]


def start(args: list[str], log_path: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """`ray start --block ARGS` in its own session, output to `log_path`; `extra_env`: this node's own
    variables (its processes, Ray workers included, inherit them)."""
    env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
           **(extra_env or {})}
    env.pop("RAY_ADDRESS", None)
    if "--head" not in args:  # a joining node is a client of the head's token-authenticated GCS
        env["RAY_AUTH_MODE"] = "token"
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=log_path.parent)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (`ray start --block` then stops its raylet, GCS and dashboard), SIGKILL of its session if
    that hangs."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the session started here, nothing else
        process.wait(timeout=30)


def start_node(args: list[str], log_path: Path, attempts: int = 3,
               extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """`start`, waiting for "Ray runtime started" and retrying: Ray gives a raylet 30 s to register
    with the GCS, which a heavily loaded machine can miss ("The current node timed out during startup")."""
    for _ in range(attempts):
        process = start(args, log_path, extra_env)
        deadline = time.time() + 240
        while time.time() < deadline:
            if "Ray runtime started" in log_path.read_text():
                return process
            if process.poll() is not None:
                break
            time.sleep(1)
        stop(process)
    raise RuntimeError(f"ray start {' '.join(args)} failed {attempts} times:\n{log_path.read_text()[-3000:]}")


def start_head(temp_dir: Path, num_cpus: int, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    """A head node without a dashboard, on free ports, its session under `temp_dir` (keep that path
    short: socket paths have a length limit); returns the process and its GCS port."""
    gcs, client = free_ports(2)
    process = start_node(["--head", f"--port={gcs}", f"--ray-client-server-port={client}", "--include-dashboard=false",
                          f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", *node_port_flags()],
                         temp_dir / "head.log", extra_env=extra_env)
    return process, gcs
