"""What /proc says about processes: their trees, listening ports, CPU time and memory
(Linux only; no extra dependency)."""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterable
from pathlib import Path


def listening_ports(pid: int) -> set[int]:
    """TCP ports process `pid` listens on."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                cols = row.split()
                if len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes:
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a supervisor's workers), from the parent pids."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    tree = [pid]
    for parent in tree:  # grows as it goes: breadth first
        tree.extend(children.get(parent, ()))
    return tree


def start_time(pid: int) -> str | None:
    """When process `pid` started (in clock ticks since boot), None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def busy_cpu_seconds() -> float:
    """CPU time all processes on the machine have used so far (from /proc/stat)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds(live: Iterable[int]) -> float:
    """CPU time of this process, its reaped children (wrk, stopped proxies) and the `live`
    processes it started (each with its descendants: a supervisor's workers)."""
    mine = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = mine.ru_utime + mine.ru_stime + reaped.ru_utime + reaped.ru_stime
    for pid in live:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += process_cpu_seconds(pid)
    return total


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time process `pid` and its descendants have used so far.

    A descendant that has ended counts once its parent has reaped it (a supervisor reaps its
    workers), through the parent's cutime and cstime.
    """
    ticks = 0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            if member == pid:
                raise
            continue  # a descendant that ended meanwhile
        ticks += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_kb(pids: list[int], field_name: str, source: str = "status") -> int:
    """The sum of a /proc/<pid>/`source` figure (status: VmRSS, VmHWM; smaps_rollup: Pss) over `pids`."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    total += int(line.split()[1])
                    break
    return total


def pss_kb(pids: list[int]) -> int:
    """Their proportional set size: a page shared by k processes counts 1/k in each."""
    return memory_kb(pids, "Pss", "smaps_rollup")
