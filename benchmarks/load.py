"""Other load on the machine while a benchmark measures: CPU seconds of this process tree against everyone else's.

Moved out of ``jobs/benchmark.py`` (issue 11) so that every stage can wrap its timings in one.
"""

from __future__ import annotations

import os
import threading
import time


def _read_processes() -> dict[int, tuple[int, float, int]]:
    """``{pid: (parent pid, CPU seconds so far, start time in ticks)}`` for every process, from ``/proc``."""
    ticks = os.sysconf("SC_CLK_TCK")
    processes = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                text = stat.read()
        except OSError:  # the process ended between listing and reading
            continue
        fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
        processes[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks, int(fields[19]))
    return processes


class CpuLoadMonitor:
    """CPU seconds spent, while it runs, by this benchmark's process tree and by every other process.

    Ray workers, the raylet and the moto server are descendants of this process; anything else (another user's
    job on a shared machine) is foreign load, which makes the timings it overlaps unreliable: the table says so.
    Linux only (``/proc``); elsewhere the figures are None.
    """

    _first_done: bool  # set by __enter__; read by _sample once the first sample is in

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.own_cpu_s: float | None = None
        self.foreign_cpu_s: float | None = None
        self.wall_s = 0.0
        self._seen: dict[tuple[int, int], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        processes = _read_processes()
        children: dict[int, list[int]] = {}
        for pid, (parent, _, _) in processes.items():
            children.setdefault(parent, []).append(pid)
        own, stack = set(), [os.getpid()]
        while stack:
            pid = stack.pop()
            own.add(pid)
            stack.extend(children.get(pid, []))
        for pid, (_, cpu_s, started) in processes.items():
            key = (pid, started)  # a pid can be reused; its start time tells the two apart
            previous = self._seen.get(key)
            self._seen[key] = cpu_s
            if previous is None:
                # New since the last sample: count it all if it started after we did, else only from now on.
                previous = 0.0 if self._first_done and started >= self._start_ticks else cpu_s
            delta = cpu_s - previous
            if pid in own:
                self.own_cpu_s = (self.own_cpu_s or 0.0) + delta
            else:
                self.foreign_cpu_s = (self.foreign_cpu_s or 0.0) + delta
        self._first_done = True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> CpuLoadMonitor:
        if not os.path.isdir("/proc/self"):
            return self
        with open("/proc/uptime", encoding="ascii") as uptime:
            self._start_ticks = int(float(uptime.read().split()[0]) * os.sysconf("SC_CLK_TCK"))
        self._first_done = False
        self.own_cpu_s, self.foreign_cpu_s = 0.0, 0.0
        self._sample()
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="cpu-load-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall_s = time.perf_counter() - self._started

    def to_dict(self) -> dict[str, float | None]:
        cores = None if self.foreign_cpu_s is None or self.wall_s <= 0 else self.foreign_cpu_s / self.wall_s
        own = None if self.own_cpu_s is None or self.wall_s <= 0 else self.own_cpu_s / self.wall_s
        return {"wall_s": self.wall_s, "own_cpu_s": self.own_cpu_s, "foreign_cpu_s": self.foreign_cpu_s,
                "own_cores": own, "foreign_cores": cores}


