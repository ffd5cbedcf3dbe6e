"""CPU and memory of process trees over a measured window, from /proc (Linux only).

Used by ``bench.peer``. A watched process counts with all its descendants, so a PostgreSQL
postmaster stands for the whole cluster. CPU is exact even though backends come and go: a
process's ``cutime + cstime`` (fields 16-17 of ``/proc/<pid>/stat``) accumulate the CPU of the
children it has reaped, so

    tree CPU(t) = Σ over the root and its live descendants of (utime + stime + cutime + cstime)

grows by exactly the CPU the tree used between two samples, whichever backends exited
(or started) in between.

Memory: at the start of a window every watched process's peak RSS (VmHWM) is reset by writing
``5`` to ``/proc/<pid>/clear_refs``, so VmHWM read at the end is the peak within the window.
For a tree of several processes (PostgreSQL) summing VmHWMs would count shared memory once per
process and miss exited backends, so trees are also sampled at ~1 Hz for the sum of their
proportional set sizes (PSS, ``smaps_rollup``), which splits shared pages among the processes
mapping them; the largest sum is the tree's peak.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcInfo:
    ppid: int
    cpu_ticks: int  # utime + stime + cutime + cstime


def read_stat(path: str | Path) -> tuple[str, list[str]] | None:
    """A ``/proc/<pid>/stat`` (or a thread's ``task/<tid>/stat``): its name and the fields
    after it (``fields[0]`` is field 3, the state); None once the process has exited."""
    try:
        stat = Path(path).read_text()
    except OSError:
        return None
    head, _, tail = stat.rpartition(")")  # the name may hold spaces and parentheses
    return head.split("(", 1)[1], tail.split()


def snapshot() -> dict[int, ProcInfo]:
    """Every live process's parent and cumulative CPU (its own plus reaped children's)."""
    procs: dict[int, ProcInfo] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        if (stat := read_stat(Path(entry.path, "stat"))) is None:
            continue  # exited meanwhile
        fields = stat[1]
        ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
        procs[int(entry.name)] = ProcInfo(int(fields[1]), ticks)
    return procs


def tree(root: int, procs: dict[int, ProcInfo]) -> list[int]:
    """root and its live descendants (root first), or [] when root is gone."""
    if root not in procs:
        return []
    children: dict[int, list[int]] = {}
    for pid, info in procs.items():
        children.setdefault(info.ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tree_cpu_s(root: int, procs: dict[int, ProcInfo]) -> float | None:
    pids = tree(root, procs)
    return sum(procs[p].cpu_ticks for p in pids) / _TICK if pids else None


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0; needs the right to write clear_refs)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def box_busy_s() -> float:
    """CPU seconds the whole box has been busy (all CPUs, everything but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _TICK


# A JVM names its threads; these prefixes of /proc/<pid>/task/*/comm (15 characters at most)
# sort a broker's CPU into what it spends compiling, collecting and serving requests.
_JVM_THREAD_GROUPS = (
    ("JIT compiler", ("C1 CompilerThre", "C2 CompilerThre")),
    ("GC and VM", ("GC Thread", "G1 ", "VM Thread", "VM Periodic")),
    ("request handling", ("data-plane-kafk",)),
)


def jvm_threads(pid: int) -> dict[int, tuple[str, float]]:
    """A JVM's live threads: tid -> (group, CPU seconds); see ``_JVM_THREAD_GROUPS``, the rest
    is "other". {} when the process is gone."""
    threads: dict[int, tuple[str, float]] = {}
    try:
        tasks = list(os.scandir(f"/proc/{pid}/task"))
    except OSError:
        return {}
    for task in tasks:
        if (stat := read_stat(Path(task.path, "stat"))) is None:
            continue  # exited meanwhile
        name, fields = stat
        group = next(
            (g for g, prefixes in _JVM_THREAD_GROUPS if name.startswith(prefixes)), "other"
        )
        threads[int(task.name)] = (group, (int(fields[11]) + int(fields[12])) / _TICK)
    return threads


def jvm_thread_cpu_s(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds by thread group between two samples of :func:`jvm_threads`, thread by
    thread: the JVM starts and retires compiler threads as it goes, so group totals would go
    down when one exits. A thread that exited in between takes its share with it (an
    undercount, small for a broker's long-lived pools)."""
    groups: dict[str, float] = {}
    for tid, (group, seconds) in after.items():
        used = seconds - before.get(tid, (group, 0.0))[1]
        groups[group] = groups.get(group, 0.0) + used
    return {group: round(seconds, 1) for group, seconds in groups.items()}


def self_cpu_s() -> float:
    """CPU seconds this process has used (user + system)."""
    t = os.times()
    return t.user + t.system


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


@dataclass
class Window:
    """One measured window over named process trees: ``start()`` ... ``stop()``."""

    roots: dict[str, int]  # name -> root pid
    sample_every_s: float = 1.0
    cpu_before: dict[str, float] = field(default_factory=dict)
    pss_peak_kib: dict[str, int] = field(default_factory=dict)
    load_before: list[float] = field(default_factory=list)
    box_before: float = 0.0
    hwm_reset: bool = True
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.load_before = loadavg()
        self.box_before = box_busy_s()
        procs = snapshot()
        for root in self.roots.values():
            for pid in tree(root, procs):
                self.hwm_reset &= reset_peak_rss(pid)
        self._sample_pss(procs)
        self.cpu_before = {
            name: cpu
            for name, root in self.roots.items()
            if (cpu := tree_cpu_s(root, procs)) is not None
        }
        self._thread = threading.Thread(target=self._sampler, name="pss-sampler", daemon=True)
        self._thread.start()

    def _sample_pss(self, procs: dict[int, ProcInfo]) -> None:
        for name, root in self.roots.items():
            total = sum(pss_kib(pid) for pid in tree(root, procs))
            if total > self.pss_peak_kib.get(name, 0):
                self.pss_peak_kib[name] = total

    def _sampler(self) -> None:
        while not self._stop.wait(self.sample_every_s):
            self._sample_pss(snapshot())

    def stop(self) -> dict[str, object]:
        """CPU seconds per tree, peak RSS of the root, peak PSS sum of the tree, load."""
        procs = snapshot()
        box_s = box_busy_s() - self.box_before
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample_pss(procs)
        cpu: dict[str, float] = {}
        hwm: dict[str, float] = {}
        processes: dict[str, int] = {}
        for name, root in self.roots.items():
            after = tree_cpu_s(root, procs)
            if after is not None and name in self.cpu_before:
                cpu[name] = round(after - self.cpu_before[name], 2)
            if (kib := _status_kib(root, "VmHWM:")) is not None:
                hwm[name] = round(kib / 1024, 1)
            processes[name] = len(tree(root, procs))
        return {
            "cpu_s": cpu,
            "peak_rss_mib": hwm,  # the root process only
            "peak_pss_tree_mib": {k: round(v / 1024, 1) for k, v in self.pss_peak_kib.items()},
            "processes_at_end": processes,
            "peak_rss_reset": self.hwm_reset,
            "box_busy_cpu_s": round(box_s, 2),  # every process on the box, ours or not
            "load_before": self.load_before,
            "load_after": loadavg(),
        }


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on a local TCP port (None if not found or not ours).

    Finds the listening socket's inode in /proc/net/tcp{,6}, then the process holding it. For
    a forking server (PostgreSQL) backends inherit the socket, so the oldest holder, the
    parent of the rest, is returned."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(parts[9])
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    holders: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
            if any(os.readlink(fd.path) in targets for fd in fds):
                holders.append(int(entry.name))
        except OSError:
            continue
    if not holders:
        return None
    procs = snapshot()
    roots = [p for p in holders if procs.get(p, ProcInfo(0, 0)).ppid not in holders]
    return min(roots or holders)


def address_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``host:port`` bootstrap or a ``postgresql://`` URL."""
    if "://" in address:
        parts = urllib.parse.urlsplit(address)
        return (parts.hostname or "localhost", parts.port or 5432)
    host, _, port = address.split(",")[0].rpartition(":")
    return (host or "localhost", int(port.split("/")[0])) if port.isdigit() else None


def is_local(host: str) -> bool:
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        return False
    return addr.startswith("127.") or addr in (
        "0.0.0.0",
        socket.gethostbyname(socket.gethostname()),
    )
