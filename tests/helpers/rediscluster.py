"""A real Redis Cluster on loopback ports, for tests and the scaling benchmark.

Each node is a ``redis-server --cluster-enabled yes`` in its own directory under
a temp dir; ``redis-cli --cluster create`` joins them and hands out the slots.
Ports are found free by binding port 0, then checked again by redis-server
itself (a node whose port was taken in between fails to start, and the whole
cluster is retried on new ports).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.cluster import ClusterNode, RedisCluster

START_TIMEOUT_S = 30.0


def available() -> str | None:
    """Why a cluster cannot be started here, or None if it can."""
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            return f"{binary} is not on PATH"
    return None


def _free_ports(n: int) -> list[int]:
    # The cluster bus listens on port + 10000: keep both below 65536.
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536 and port not in ports:
            ports.append(port)
    return ports


def _wait(predicate: object, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis cluster: timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Node:
    port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None
    cluster_enabled: bool = True

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=5)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes" if self.cluster_enabled else "no",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--dir",
                str(self.folder),
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                "redis.log",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def alive(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            return False
        c = self.client()
        try:
            return bool(c.ping())
        except redis.RedisError:
            return False
        finally:
            c.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def plain_server(folder: Path) -> Node:
    """A plain (not cluster) redis-server on a free loopback port, started."""
    node = Node(_free_ports(1)[0], folder, cluster_enabled=False)
    node.start()
    _wait(node.alive, f"plain redis-server on {node.port}")
    return node


@dataclass
class Cluster:
    """``masters`` primaries, each with ``replicas`` replicas, on loopback."""

    folder: Path
    masters: int = 3
    replicas: int = 0
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> Cluster:
        for attempt in (1, 2, 3):
            try:
                self._start()
                return self
            except RuntimeError:
                self.stop()
                if attempt == 3:
                    raise
        raise AssertionError("unreachable")

    def _start(self) -> None:
        count = self.masters * (1 + self.replicas)
        self.nodes = [Node(port, self.folder / str(port)) for port in _free_ports(count)]
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            _wait(node.alive, f"node {node.port} to start")
        if self.masters == 1 and self.replicas == 0:
            # redis-cli --cluster create wants 3 masters: one node takes every slot.
            c = self.nodes[0].client()
            try:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            finally:
                c.close()
            _wait(self.is_ready, "the one-node cluster to serve its slots")
            return
        create = [
            "redis-cli",
            "--cluster",
            "create",
            *(f"127.0.0.1:{n.port}" for n in self.nodes),
            "--cluster-replicas",
            str(self.replicas),
            "--cluster-yes",
        ]
        result = subprocess.run(create, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            output = (result.stdout + result.stderr)[-2000:]
            raise RuntimeError(f"redis-cli --cluster create failed: {output}")
        _wait(self.is_ready, "the cluster to agree on its slots")

    def is_ready(self) -> bool:
        for node in self.nodes:
            if not node.alive():
                continue
            c = node.client()
            try:
                info = c.cluster("info")
                if info.get("cluster_state") != "ok":
                    return False
                if int(info.get("cluster_slots_ok", 0)) != 16384:
                    return False
                if int(info.get("cluster_known_nodes", 0)) < len(
                    [n for n in self.nodes if n.alive()]
                ):
                    return False
            except redis.RedisError:
                return False
            finally:
                c.close()
        return True

    def client(self) -> RedisCluster:
        """A client that starts from any node still up (one may have been killed)."""
        alive = [ClusterNode("127.0.0.1", n.port) for n in self.nodes if n.alive()]
        return RedisCluster(startup_nodes=alive, decode_responses=True)

    def primaries(self) -> list[Node]:
        """The nodes that serve slots now."""
        c = self.client()
        try:
            ports = {n.port for n in c.get_primaries()}
        finally:
            c.close()
        return [n for n in self.nodes if n.port in ports]

    def node_id(self, node: Node) -> str:
        c = node.client()
        try:
            return str(c.cluster("myid"))
        finally:
            c.close()

    def owner(self, slot: int) -> Node:
        """The primary serving ``slot`` now."""
        c = self.client()
        try:
            port = c.nodes_manager.get_node_from_slot(slot).port
        finally:
            c.close()
        return next(n for n in self.nodes if n.port == port)

    def migrate_slot(self, slot: int, target: Node) -> int:
        """Move ``slot`` and its keys to ``target`` as ``redis-cli --cluster reshard``
        does (SETSLOT IMPORTING/MIGRATING, MIGRATE batches, SETSLOT NODE); how many
        keys moved. Clients see ASK and TRYAGAIN while it runs, MOVED after."""
        source = self.owner(slot)
        if source.port == target.port:
            return 0
        src, dst = source.client(), target.client()
        moved = 0
        try:
            src_id, dst_id = self.node_id(source), self.node_id(target)
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while True:
                keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10)
                if not keys:
                    break
                src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
            for node in self.primaries():
                c = node.client()
                try:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
                finally:
                    c.close()
        finally:
            src.close()
            dst.close()
        return moved

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
