"""A throwaway Redis Cluster (N masters, optionally N replicas) on free loopback ports.

Each node is a :class:`RedisServer` started with ``--cluster-enabled yes``; the cluster is
formed with ``redis-cli --cluster create`` and is ready once every node reports
``cluster_state:ok``. :meth:`RedisCluster.close` kills every node and removes their
directories. Helpers for fault tests: :meth:`kill_master` (SIGKILL, then wait for its
replica's promotion) and :meth:`move_slot` (a live slot migration, as ``reshard`` does).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from typing import Sequence

import redis

from support.redis_server import RedisServer, free_port


def redis_cli_binary() -> str:
    path = shutil.which("redis-cli")
    if path is None:
        raise RuntimeError("redis-cli is not installed; `apt-get install -y redis-tools`")
    return path


class RedisCluster:
    """``masters`` masters, each with ``replicas_per_master`` replicas, all on 127.0.0.1."""

    def __init__(self, masters: int = 3, replicas_per_master: int = 1,
                 extra_args: Sequence[str] = ()) -> None:
        if masters < 1:
            raise ValueError("a cluster needs at least one master")
        self.masters = masters
        self.replicas_per_master = replicas_per_master
        count = masters * (1 + replicas_per_master)
        self.bus_ports = [free_port() for _ in range(count)]
        self.nodes = [
            RedisServer([
                "--cluster-enabled", "yes",
                "--cluster-node-timeout", "1000",
                # the node's cluster config lives in its own dir (RedisServer's --dir)
                "--cluster-config-file", "nodes.conf",
                # the bus port is port+10000 by default: past 65535 for a high free port
                "--cluster-port", str(bus_port),
                # a replica of a failed master takes over at once, however stale
                "--cluster-replica-validity-factor", "0",
                *extra_args,
            ])
            for bus_port in self.bus_ports
        ]

    # -- addresses ---------------------------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis+cluster://`` naming every node (one reachable node would be enough)."""
        return "redis+cluster://" + ",".join(self.addresses)

    def client(self, node: RedisServer) -> redis.Redis:
        """A plain (non-cluster) client on one node; the caller closes it."""
        return redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5)

    def alive_nodes(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.process and node.process.poll() is None]

    def primaries(self) -> list[RedisServer]:
        """The live nodes that are masters now (failovers change which)."""
        found = []
        for node in self.alive_nodes():
            client = self.client(node)
            try:
                if client.info("replication")["role"] == "master":
                    found.append(node)
            finally:
                client.close()
        return found

    def node_of_slot(self, slot: int) -> RedisServer:
        """The live master serving ``slot`` (as the first live node sees it)."""
        by_port = {node.port: node for node in self.alive_nodes()}
        client = self.client(self.alive_nodes()[0])
        try:
            for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return by_port[int(master[1])]
        finally:
            client.close()
        raise LookupError(f"slot {slot} is not served")

    @staticmethod
    def key_slot(key: str) -> int:
        from redis.crc import key_slot
        return key_slot(key.encode())

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> "RedisCluster":
        try:
            for node in self.nodes:
                node.start()
            if self.masters >= 3:
                subprocess.run(
                    [redis_cli_binary(), "--cluster", "create", *self.addresses,
                     "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"],
                    check=True, capture_output=True, timeout=timeout,
                )
            else:
                self._create_small(timeout)  # redis-cli wants 3 masters at least
            self.wait_ok(timeout)
            self.wait_replicas_synced(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _create_small(self, timeout: float) -> None:
        """A cluster of 1 or 2 masters by hand: each master gets an equal share of the
        slots, every node meets the first, each replica follows its master."""
        masters, replicas = self.nodes[:self.masters], self.nodes[self.masters:]
        share = 16384 // self.masters
        for index, master in enumerate(masters):
            client = self.client(master)
            try:
                end = 16383 if index == self.masters - 1 else (index + 1) * share - 1
                client.execute_command("CLUSTER ADDSLOTSRANGE", index * share, end)
            finally:
                client.close()
        for node in self.nodes[1:]:
            client = self.client(node)
            try:
                client.execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[0].port, self.bus_ports[0])
            finally:
                client.close()
        deadline = time.monotonic() + timeout
        for index, replica in enumerate(replicas):
            master = masters[index % self.masters]
            client, master_client = self.client(replica), self.client(master)
            try:
                master_id = master_client.execute_command("CLUSTER MYID")
                while True:  # until the replica has heard of its master through the meet
                    try:
                        client.execute_command("CLUSTER REPLICATE", master_id)
                        break
                    except redis.ResponseError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
            finally:
                client.close()
                master_client.close()

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node reports ``cluster_state:ok`` and agrees all 16384 slots are
        served by live masters."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._all_ok():
                return
            time.sleep(0.05)
        raise RuntimeError(f"cluster not ok within {timeout}s")

    def _all_ok(self) -> bool:
        alive_ports = {node.port for node in self.alive_nodes()}
        for node in self.alive_nodes():
            client = self.client(node)
            try:
                if client.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                    return False
                covered = 0
                for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
                    if int(master[1]) not in alive_ports:
                        return False
                    covered += end - start + 1
                if covered != 16384:
                    return False
            except redis.RedisError:
                return False
            finally:
                client.close()
        return True

    def wait_replicas_synced(self, timeout: float = 30.0) -> None:
        """Until every live replica's link to its master is up (so a kill can fail over)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = False
            for node in self.alive_nodes():
                client = self.client(node)
                try:
                    replication = client.info("replication")
                    if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                        pending = True
                except redis.RedisError:
                    pending = True
                finally:
                    client.close()
            if not pending:
                return
            time.sleep(0.05)
        raise RuntimeError(f"replicas not in sync within {timeout}s")

    def flushall(self) -> None:
        """FLUSHALL on every live master (data and loaded functions gone)."""
        for node in self.primaries():
            client = self.client(node)
            try:
                client.flushall()
                client.function_flush()
            finally:
                client.close()

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
            node.close()

    def __enter__(self) -> "RedisCluster":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- faults ------------------------------------------------------------------------

    def kill_master(self, master: RedisServer, timeout: float = 30.0) -> RedisServer:
        """SIGKILL ``master``; wait until one of its replicas is promoted and the cluster is
        ok again. Returns the promoted replica."""
        client = self.client(master)
        try:
            my_id = client.execute_command("CLUSTER MYID")
            my_id = my_id.decode() if isinstance(my_id, bytes) else my_id
        finally:
            client.close()
        replicas = []
        for node in self.alive_nodes():
            if node is master:
                continue
            c = self.client(node)
            try:
                replication = c.info("replication")
                if replication["role"] == "slave" and int(replication["master_port"]) == master.port:
                    replicas.append(node)
            finally:
                c.close()
        if not replicas:
            raise RuntimeError(f"master {master.port} ({my_id}) has no replica to promote")
        master.kill()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for replica in replicas:
                c = self.client(replica)
                try:
                    if c.info("replication")["role"] == "master":
                        self.wait_ok(max(1.0, deadline - time.monotonic()))
                        return replica
                except redis.RedisError:
                    pass
                finally:
                    c.close()
            time.sleep(0.05)
        raise RuntimeError(f"no replica of {master.port} promoted within {timeout}s")

    def move_slot(self, slot: int, target: RedisServer, batch: int = 100) -> None:
        """Migrate ``slot`` (its keys too) from its master to master ``target``, as
        ``redis-cli --cluster reshard`` does: IMPORTING/MIGRATING, MIGRATE in batches,
        then SETSLOT NODE on both ends and every other master."""
        source = self.node_of_slot(slot)
        if source is target:
            return
        src, dst = self.client(source), self.client(target)
        try:
            source_id = src.execute_command("CLUSTER MYID")
            target_id = dst.execute_command("CLUSTER MYID")
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
            while True:
                keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000,
                                    "REPLACE", "KEYS", *keys)
            dst.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
            src.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
            for node in self.primaries():
                if node is source or node is target:
                    continue
                other = self.client(node)
                try:
                    other.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
                finally:
                    other.close()
        finally:
            src.close()
            dst.close()
