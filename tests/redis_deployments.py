"""Redis deployments started by the tests: a primary with a replica and three sentinels, and a 3-master cluster.

Every process listens on 127.0.0.1 on a free port, in a directory of the test's own.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from conftest import DOCS, free_port, missing_tool, wait_until


def require(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            missing_tool(tool, "apt-get install redis-server redis-tools")


def cli(port: int, *args: str, **options: str) -> str:
    """redis-cli's answer (raw) to one command sent to 127.0.0.1:``port``."""
    extra = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    done = subprocess.run(["redis-cli", "-p", str(port), *extra, "--raw", *args], capture_output=True, text=True,
                          timeout=10)
    return done.stdout.strip()


def acl_words(name: str, password: str, prefix: str, cluster: bool = False) -> list[str]:
    """docs/redis-tls-acl.md's ACL SETUSER line for user ``name`` on ``prefix`` (plus what a cluster adds)."""
    page = (DOCS / "redis-tls-acl.md").read_text()
    (line,) = re.findall(r"^ACL SETUSER agent-runner .*$", page, re.MULTILINE)
    words = (line.replace(" agent-runner ", f" {name} ").replace(">PASSWORD", f">{password}")
             .replace("~agent-runner:*", f"~{prefix}:*").replace("&agent-runner:*", f"&{prefix}:*").split())
    if cluster:
        words += re.search(r"add `(\+cluster\|slots\s+\+command)`", page)[1].split()  # type: ignore[index]
    return words


class Node:
    """One redis-server (or sentinel: ``sentinel=True``) started from a config file of its own."""

    def __init__(self, directory: Path, lines: list[str], sentinel: bool = False) -> None:
        self.port = free_port()
        self.directory = directory / str(self.port)
        self.directory.mkdir(parents=True)
        config = self.directory / "redis.conf"
        config.write_text("\n".join([f"port {self.port}", "bind 127.0.0.1", f"dir {self.directory}",
                                     'save ""', *lines]) + "\n")
        argv = ["redis-server", str(config)] + (["--sentinel"] if sentinel else [])
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: cli(self.port, "PING") == "PONG", 10, f"redis on {self.port}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class SentinelSet:
    """A primary, one replica and three sentinels watching it as ``master``."""

    MASTER = "mymaster"

    def __init__(self, directory: Path) -> None:
        require("redis-server", "redis-cli")
        self.primary = Node(directory, [])
        self.replica = Node(directory, [f"replicaof 127.0.0.1 {self.primary.port}"])
        self.sentinels = [Node(directory, [
            f"sentinel monitor {self.MASTER} 127.0.0.1 {self.primary.port} 2",
            f"sentinel down-after-milliseconds {self.MASTER} 1000",
            f"sentinel failover-timeout {self.MASTER} 5000"], sentinel=True) for _ in range(3)]
        wait_until(lambda: "master_link_status:up" in cli(self.replica.port, "INFO", "replication"), 10,
                   "the replica in sync")
        wait_until(lambda: all(cli(s.port, "SENTINEL", "REPLICAS", self.MASTER).count(str(self.replica.port))
                               and cli(s.port, "SENTINEL", "SENTINELS", self.MASTER).count("127.0.0.1") >= 2
                               for s in self.sentinels), 15, "the sentinels to know the replica and each other")
        self.url = ("redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
                    + f"/{self.MASTER}/0")

    def master_port(self) -> int:
        return int(cli(self.sentinels[0].port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER).split()[1])

    def stop(self) -> None:
        for node in [*self.sentinels, self.replica, self.primary]:
            node.kill()


class ClusterSet:
    """Three masters, each with one replica, made into a cluster by redis-cli."""

    def __init__(self, directory: Path) -> None:
        require("redis-server", "redis-cli")
        self.nodes = [Node(directory, ["cluster-enabled yes", "cluster-node-timeout 1000",
                                       "cluster-config-file nodes.conf", f"cluster-port {free_port()}"])  # port+10000 may be past 65535
                      for _ in range(6)]
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        wait_until(lambda: all("cluster_state:ok" in cli(n.port, "CLUSTER", "INFO") for n in self.nodes), 20,
                   "the cluster to be ok")
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def slot_of(self, key: str) -> int:
        return int(cli(self.nodes[0].port, "CLUSTER", "KEYSLOT", key))

    def shards(self) -> list[dict[str, Any]]:
        """CLUSTER NODES as dicts: port, id, flags, master id, slots (a list of 'a-b' or 'a')."""
        rows = []
        for line in cli(self.nodes[0].port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            rows.append({"id": fields[0], "port": int(fields[1].split("@")[0].rsplit(":", 1)[1]),
                         "flags": fields[2], "master": fields[3], "slots": fields[8:]})
        return rows

    def owner(self, slot: int) -> dict[str, Any]:
        for row in self.shards():
            if "master" in row["flags"] and "fail" not in row["flags"]:
                for span in row["slots"]:
                    low, _, high = span.partition("-")
                    if not span.startswith("[") and int(low) <= slot <= int(high or low):
                        return row
        raise AssertionError(f"no master owns slot {slot}")

    def move_slot(self, slot: int) -> int:
        """Migrate ``slot`` and its keys to another master (as redis-cli --cluster reshard does); its new port."""
        source = self.owner(slot)
        target = next(row for row in self.shards()
                      if "master" in row["flags"] and "fail" not in row["flags"] and row["id"] != source["id"])
        cli(target["port"], "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source["id"])
        cli(source["port"], "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target["id"])
        while keys := cli(source["port"], "CLUSTER", "GETKEYSINSLOT", str(slot), "100").split():
            cli(source["port"], "MIGRATE", "127.0.0.1", str(target["port"]), "", "0", "5000", "KEYS", *keys)
        for row in (target, source):
            cli(row["port"], "CLUSTER", "SETSLOT", str(slot), "NODE", target["id"])
        return int(target["port"])

    def fail_over(self, slot: int) -> int:
        """CLUSTER FAILOVER on a replica of the slot's master: the replica becomes its master; its port."""
        master = self.owner(slot)
        replica = wait_until(lambda: next((row for row in self.shards() if row["master"] == master["id"]), None),
                             20, "a replica of the slot's master")
        assert cli(replica["port"], "CLUSTER", "FAILOVER") == "OK"
        wait_until(lambda: self.owner(slot)["port"] == replica["port"], 20, "the replica to take over")
        return int(replica["port"])

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
