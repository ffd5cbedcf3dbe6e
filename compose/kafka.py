"""A single-node Kafka (KRaft, combined broker+controller) on loopback, without Docker.

The broker's jars come from Maven Central through ``compose/kafka/pom.xml`` and are cached
per version; each stack gets its own config, data and log under its run directory.

A node is its directory: the first :func:`start` picks its ports and cluster id, records them
in ``node.json`` and formats storage; every later start reuses both, so a broker stopped with
:func:`stop` comes back on its data (topics and records kept) at the same address.

CLI: ``python -m compose.kafka fetch [--lib-dir DIR]`` gathers the jars (prints the lib dir).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas.topics import ALL, Topic

KAFKA_VERSION = "4.0.2"
POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
# Written last into the lib dir: its presence means the copy finished and lists what it holds.
_MANIFEST = ".complete"
_READY_TIMEOUT_S = 90.0
# Topic-level error code for "already exists" (Kafka protocol error 36).
_TOPIC_ALREADY_EXISTS = 36
_JVM_OPTS = (
    "-Xms256m",
    "-Xmx768m",
    # The broker this script starts lives for a test run, the demo or a benchmark: minutes, not
    # days. Its C2 compiler threads were half of its CPU for all of that (bench.claim_gate:
    # 14.6 of 29.6 CPU-s), so it runs C1 code only: slower per record, but next to nothing
    # spent compiling. The serial collector: no concurrent marking threads on a 2-core box,
    # which G1 ran after every upload (its 512 KiB records are humongous objects to G1).
    # A long-lived broker (docker-compose) keeps Kafka's defaults: its C2 warm-up pays back.
    "-XX:TieredStopAtLevel=1",
    "-XX:+UseSerialGC",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
    # slf4j-simple: timestamps make the run log usable when chasing a slow start.
    "-Dorg.slf4j.simpleLogger.showDateTime=true",
    "-Dorg.slf4j.simpleLogger.dateTimeFormat=HH:mm:ss.SSS",
)
# Per node dir: its cluster id and ports, fixed at the first start (see the module docstring).
_NODE_FILE = "node.json"
# Popen handles of brokers this process started, kept so they are never garbage-collected
# while running (ResourceWarning) and so stop() can reap them instead of leaving zombies.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def default_lib_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "cannonade" / f"kafka-{KAFKA_VERSION}" / "lib"


def _lib_complete(lib_dir: Path) -> bool:
    manifest = lib_dir / _MANIFEST
    if not manifest.is_file():
        return False
    names = [n for n in manifest.read_text().splitlines() if n]
    return bool(names) and all((lib_dir / n).is_file() for n in names)


def fetch_jars(lib_dir: Path | None = None) -> Path:
    """Gather the broker's runtime jars into ``lib_dir`` (skipped when already complete).

    Maven copies into a sibling temp dir which is renamed into place, so a concurrent or
    interrupted fetch never leaves a half-filled lib dir that looks usable.
    """
    lib_dir = (lib_dir or default_lib_dir()).expanduser().resolve()
    if _lib_complete(lib_dir):
        return lib_dir
    if shutil.which("mvn") is None:
        raise RuntimeError("mvn not found: run compose/bootstrap.sh (installs maven)")
    lib_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lib-", dir=lib_dir.parent))
    try:
        cmd = [
            "mvn",
            "-B",
            "-q",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={tmp}",
        ]
        # Output is kept for errors only: on success -q still prints stray ANSI resets.
        mvn = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if mvn.returncode != 0:
            out = "\n".join((mvn.stdout + mvn.stderr).splitlines()[-60:])
            raise RuntimeError(f"mvn copy-dependencies failed (rc={mvn.returncode}):\n{out}")
        jars = sorted(p.name for p in tmp.glob("*.jar"))
        if not any(n.startswith("kafka_2.13-") for n in jars):
            raise RuntimeError(f"maven produced no kafka_2.13 jar in {tmp}")
        (tmp / _MANIFEST).write_text("\n".join(jars) + "\n")
        if lib_dir.exists():  # incomplete leftover (or a racing fetch just finished)
            if _lib_complete(lib_dir):
                return lib_dir
            shutil.rmtree(lib_dir)
        try:
            os.rename(tmp, lib_dir)
        except OSError:
            if not _lib_complete(lib_dir):  # lost a race to a complete copy: fine
                raise
        return lib_dir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_HANDED_OUT: set[int] = set()


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports for servers started later. They are taken below the
    kernel's ephemeral range: a port bound to 0 comes from that range, and an outgoing
    connection could take it before its server binds it. None is handed out twice."""
    floor = _ephemeral_floor()
    chosen: list[int] = []
    while len(chosen) < count:
        port = secrets.choice(range(max(1024, floor - 12000), floor))
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        chosen.append(port)
    return chosen


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class KafkaNode:
    """A started broker: what a stack records about it."""

    pid: int
    port: int
    controller_port: int
    kafka_dir: Path

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def write_config(kafka_dir: Path, port: int, controller_port: int) -> Path:
    """server.properties for one combined KRaft node; data and logs stay under kafka_dir."""
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        # Static voters: format must then run WITHOUT --standalone (mixing the two fails).
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(kafka_dir / "data"),
        # One broker: every internal topic must accept a single replica.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Fewer internal partitions (default 50) and no join delay: first group join is quick.
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.num.partitions": "4",
        "group.initial.rebalance.delay.ms": "0",
        # A restarted node cannot register until its previous incarnation's session expires
        # (DUPLICATE_BROKER_REGISTRATION): 3 s rather than the default 9 s bounds that wait.
        "broker.session.timeout.ms": "3000",
        "broker.heartbeat.interval.ms": "1000",
        "num.network.threads": "2",  # 2-core box
        "num.io.threads": "2",
        # Topics come from the catalog with explicit partition counts; a typo must fail loudly.
        "auto.create.topics.enable": "false",
        # Request bodies up to 10 MiB plus framing; topics carry the same limit.
        "message.max.bytes": "16777216",
        "replica.fetch.max.bytes": "16777216",
        # The log cleaner looks for compactable logs every second (default 15 s), so erasure
        # tombstones and changelog cleanup take effect soon after a segment rolls.
        "log.cleaner.backoff.ms": "1000",
    }
    path = kafka_dir / "server.properties"
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    return path


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("java not found: run compose/bootstrap.sh (installs a JRE)")
    return java


def random_cluster_id() -> str:
    """16 random bytes, base64url without padding: the 22-char form Kafka expects. Never one
    starting with '-': StorageTool's argument parser would read it as an option (seen here)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def format_storage(lib_dir: Path, config: Path, cluster_id: str, log: Path) -> None:
    cmd = [
        _java(),
        "-Xmx256m",
        "-cp",
        f"{lib_dir}/*",
        "kafka.tools.StorageTool",
        "format",
        "-t",
        cluster_id,
        "-c",
        str(config),
        "--ignore-formatted",
    ]
    with log.open("ab") as out:
        rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out).returncode
    if rc != 0:
        raise RuntimeError(f"kafka storage format failed (rc={rc}):\n{_tail(log)}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass(frozen=True)
class _Identity:
    """What must not change across restarts of a node: clients and data depend on it."""

    cluster_id: str
    port: int
    controller_port: int


def formatted(kafka_dir: Path) -> bool:
    """True once StorageTool has formatted the node's data dir."""
    return (kafka_dir / "data" / "meta.properties").is_file()


def _formatted_cluster_id(kafka_dir: Path) -> str | None:
    try:
        lines = (kafka_dir / "data" / "meta.properties").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() == "cluster.id":
            return value.strip()
    return None


def _identity(kafka_dir: Path, ports: tuple[int, int] | None) -> _Identity:
    """The node's recorded identity, or a new one recorded now (before formatting)."""
    path = kafka_dir / _NODE_FILE
    try:
        data = json.loads(path.read_text())
        ident = _Identity(str(data["cluster_id"]), int(data["port"]), int(data["controller_port"]))
    except FileNotFoundError:
        port, controller_port = ports or free_ports(2)
        # Data formatted without a node.json (a dir from before it existed) keeps its id.
        cluster_id = _formatted_cluster_id(kafka_dir) or random_cluster_id()
        ident = _Identity(cluster_id, port, controller_port)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(ident)) + "\n")
        os.replace(tmp, path)
        return ident
    if ports is not None and ports != (ident.port, ident.controller_port):
        raise ValueError(
            f"{kafka_dir} listens on {ident.port}/{ident.controller_port}, not {ports}: "
            "a node keeps its ports"
        )
    return ident


def recorded_pid(kafka_dir: Path) -> int | None:
    """The pid of the broker last started in kafka_dir (running or not)."""
    try:
        return int((kafka_dir / "kafka.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def start(
    kafka_dir: Path, lib_dir: Path | None = None, ports: tuple[int, int] | None = None
) -> KafkaNode:
    """Launch the node of kafka_dir detached (own session); returns once spawned.

    ``ports`` = (client, controller) apply to a new node only (free loopback ports when
    omitted); an existing node starts on its data with its recorded ports and cluster id.
    A node that is already running is returned as is.
    """
    lib_dir = fetch_jars(lib_dir)
    kafka_dir.mkdir(parents=True, exist_ok=True)
    ident = _identity(kafka_dir, ports)
    pid = recorded_pid(kafka_dir)
    if pid is not None and is_running(pid, kafka_dir):
        return KafkaNode(pid, ident.port, ident.controller_port, kafka_dir)
    config = write_config(kafka_dir, ident.port, ident.controller_port)
    log = kafka_dir / "kafka.log"
    # Formatting again would fail: StorageTool checks the id against meta.properties.
    if not formatted(kafka_dir):
        format_storage(lib_dir, config, ident.cluster_id, log)
    out = log.open("ab")
    try:
        # start_new_session: the broker is its own process group, so `down` can signal the
        # whole group and a Ctrl-C in the launching terminal does not reach it.
        proc = subprocess.Popen(
            [_java(), *_JVM_OPTS, "-cp", f"{lib_dir}/*", "kafka.Kafka", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=kafka_dir,
        )
    finally:
        out.close()
    _CHILDREN[proc.pid] = proc
    # Written at once so a `down` after a failed `up` can still find and stop the broker.
    (kafka_dir / "kafka.pid").write_text(f"{proc.pid}\n")
    return KafkaNode(proc.pid, ident.port, ident.controller_port, kafka_dir)


def _zombie_or_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _reap(pid: int) -> None:
    # Only brokers this process spawned: waiting on anyone else's child would steal its
    # exit status. Others are reaped by their parent or init (and count as gone as zombies).
    proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:
        _CHILDREN.pop(pid, None)


def is_running(pid: int, kafka_dir: Path | None = None) -> bool:
    """True if pid is alive (not a zombie) and, given kafka_dir, is that dir's broker.

    The command-line check guards against signalling an unrelated process that reused a pid
    recorded by an old stack.
    """
    _reap(pid)
    if _zombie_or_gone(pid):
        _reap(pid)  # it may have exited between the two looks
        return False
    if kafka_dir is None:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"kafka.Kafka" in cmdline and str(kafka_dir / "server.properties").encode() in cmdline


async def wait_ready(
    bootstrap: str,
    pid: int | None = None,
    log: Path | None = None,
    ceiling_s: float = _READY_TIMEOUT_S,
) -> None:
    """Wait until the TCP port accepts, then until an admin metadata call succeeds."""
    host, port_s = first_address(bootstrap)
    deadline = time.monotonic() + ceiling_s

    def check_alive() -> None:
        if pid is not None and not is_running(pid):
            raise RuntimeError(
                f"kafka (pid {pid}) exited during startup:\n{_tail(log) if log else ''}"
            )

    while not port_open(int(port_s), host):
        check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"kafka port {bootstrap} not open after {ceiling_s:.0f}s")
        await asyncio.sleep(0.1)
    last: Exception | None = None
    while time.monotonic() < deadline:
        check_alive()
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            cluster = await admin.describe_cluster()
            if cluster.get("brokers"):
                return
        except Exception as exc:  # broker still starting: not leader yet, not registered...
            last = exc
        finally:
            await admin.close()
        await asyncio.sleep(0.2)
    raise TimeoutError(f"kafka at {bootstrap} not ready after {ceiling_s:.0f}s: {last!r}")


def first_address(bootstrap: str) -> tuple[str, str]:
    """(host, port) of the first broker of a ``host:port[,host:port…]`` list."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    return host, port


def replication_for(brokers: int) -> int:
    """Copies of each partition: three where the cluster has them, else one per broker."""
    return max(1, min(3, brokers))


def _topic_config(topic: Topic, copies: int = 1) -> dict[str, str]:
    config = {"max.message.bytes": str(topic.max_message_bytes), **topic.config}
    if topic.compacted:
        config["cleanup.policy"] = "compact"
    if copies >= 3:
        # Every producer sends with acks=all, which waits only for the replicas in sync: with
        # the broker's default of one, an acknowledged record can live on the leader alone
        # and die with it. Two of three keeps it through the loss of any one broker.
        config["min.insync.replicas"] = str(copies - 1)
    return config


async def create_topics(
    bootstrap: str, topics: Iterable[Topic] = ALL, leader_wait_s: float = 30.0
) -> list[str]:
    """Create the catalog's topics (existing ones are left alone); returns names created.

    Waits until every partition has a leader, so producers can write right after.
    """
    topics = list(topics)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        copies = replication_for(len((await admin.describe_cluster()).get("brokers", [])))
        new = [
            NewTopic(t.name, t.partitions, copies, topic_configs=_topic_config(t, copies))
            for t in topics
            if t.name not in existing
        ]
        created: list[str] = []
        if new:
            response = await admin.create_topics(new)
            for name, code, *rest in response.topic_errors:
                if code == 0:
                    created.append(name)
                elif code != _TOPIC_ALREADY_EXISTS:  # a concurrent creator is fine
                    msg = rest[0] if rest else ""
                    raise RuntimeError(f"creating topic {name} failed: error {code} {msg}")
        deadline = time.monotonic() + leader_wait_s
        names = [t.name for t in topics]
        while True:
            described = await admin.describe_topics(names)
            if all(
                d["error_code"] == 0
                and d["partitions"]
                and all(p["leader"] >= 0 for p in d["partitions"])
                for d in described
            ):
                return created
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic partitions without a leader after {leader_wait_s:.0f}s")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


def stop(kafka_dir: Path, timeout: float = 30.0) -> None:
    """Stop the node of kafka_dir, keeping its data: SIGTERM the broker's process group (a
    clean shutdown), SIGKILL it after ``timeout``. A no-op when it is not running."""
    pid = recorded_pid(kafka_dir)
    if pid is None or not is_running(pid, kafka_dir):
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)  # the broker leads its own session: pgid == pid
        except ProcessLookupError:
            return
        if _wait_exit(pid, wait):
            return
    raise RuntimeError(f"kafka pid {pid} survived SIGKILL")


def _wait_exit(pid: int, wait: float) -> bool:
    proc = _CHILDREN.get(pid)
    if proc is not None:  # our child: wait() reaps it, so no zombie is left behind
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            return False
        _CHILDREN.pop(pid, None)
        return True
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not is_running(pid):
            return True
        time.sleep(0.05)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compose.kafka")
    sub = parser.add_subparsers(dest="cmd", required=True)
    fetch = sub.add_parser("fetch", help="gather the broker jars from Maven Central (cached)")
    fetch.add_argument("--lib-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.cmd == "fetch":
        target = (args.lib_dir or default_lib_dir()).expanduser().resolve()
        if _lib_complete(target):
            print(f"kafka {KAFKA_VERSION} jars: cached in {target}")
        else:
            t0 = time.monotonic()
            print(f"kafka {KAFKA_VERSION} jars: fetching with maven into {target}", flush=True)
            fetch_jars(target)
            print(f"kafka {KAFKA_VERSION} jars: done in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
