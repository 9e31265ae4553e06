"""A disposable Redis Cluster of three masters, from the local `redis-server` binary.

No replicas: a killed master is restarted *empty* on its port with its `nodes.conf`
(which `redis-server` writes itself), so it rejoins owning the same slots with none of
its data. That is harsher than a failover — a promoted replica keeps everything but the
last unreplicated writes; a restarted-empty master loses every stream, group and marker
of its slots — and it costs three processes instead of six on a small machine. The
other masters keep serving their slots meanwhile (`cluster-require-full-coverage no`).

Every wait is bounded; `stop()` kills every server (a whole process group each).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import redis

from tests.integration.processes import wait_for


def free_ports(n: int) -> list[int]:
    """n free loopback ports whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class RedisClusterServers:
    def __init__(self, workdir: Path, masters: int = 3, node_timeout_ms: int = 2000) -> None:
        binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if binary is None or cli is None:
            raise FileNotFoundError("redis-server and redis-cli are needed for a cluster")
        self.binary, self.cli = binary, cli
        self.workdir = workdir
        self.node_timeout_ms = node_timeout_ms
        self.ports = free_ports(masters)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        for port in self.ports:
            self.start_node(port)
        self._create()
        self.wait_ok()

    def start_node(self, port: int) -> None:
        node_dir = self.workdir / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        log = (node_dir / "redis.log").open("ab")
        args = {
            "--port": str(port),
            "--bind": "127.0.0.1",
            "--cluster-enabled": "yes",
            "--cluster-config-file": "nodes.conf",
            "--cluster-node-timeout": str(self.node_timeout_ms),
            "--cluster-require-full-coverage": "no",
            "--save": "",
            "--appendonly": "no",
            "--dir": str(node_dir),
        }
        self.procs[port] = subprocess.Popen(
            [self.binary, *(part for pair in args.items() for part in pair)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, killed as one
        )
        log.close()
        wait_for(lambda: self._answers(port), 10, f"redis-server on {port} to answer PING")

    def _create(self) -> None:
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        done = subprocess.run(
            [self.cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"cluster create failed:\n{done.stdout!r}\n{done.stderr!r}")

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every node says cluster_state:ok and knows every slot is served."""
        wait_for(
            lambda: all(self._state(p) == "ok" for p in self.ports),
            timeout,
            "cluster_state:ok on every node",
            interval=0.1,
            on_timeout=self.describe,
        )

    def kill(self, port: int) -> None:
        """SIGKILL one node: no shutdown, no save."""
        proc = self.procs.get(port)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def restart_empty(self, port: int) -> None:
        """Start a killed node again: same port and node id (nodes.conf), no data."""
        self.start_node(port)

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)

    # -- looking ----------------------------------------------------------------------------

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=2)

    def _answers(self, port: int) -> bool:
        proc = self.procs[port]
        if proc.poll() is not None:
            log = (self.workdir / str(port) / "redis.log").read_text(errors="replace")
            raise AssertionError(f"redis-server on {port} exited at start:\n{log[-2000:]}")
        c = self.client(port)
        try:
            return bool(c.ping())
        except redis.ConnectionError:
            return False
        finally:
            c.close()

    def _state(self, port: int) -> str | None:
        c = self.client(port)
        try:
            info = c.execute_command("CLUSTER", "INFO")
        except redis.RedisError:
            return None
        finally:
            c.close()
        text = info.decode() if isinstance(info, bytes) else str(info)
        fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
        if fields.get("cluster_slots_ok") != "16384":
            return "incomplete"
        return fields.get("cluster_state")

    def master_of(self, key: str) -> int:
        """The port of the master serving `key`'s slot."""
        c = self.client(self.ports[0])
        try:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(primary[1])
        finally:
            c.close()
        raise AssertionError(f"no master serves slot of {key!r}")

    def describe(self) -> str:
        out = []
        for port in self.ports:
            state = self._state(port)
            out.append(f"node {port}: {state}")
        return "\n".join(out)
