"""CPU and kernel counters the worker reads around its timed loop.

The wall clock of a shared 2-CPU machine cannot resolve a 1% slowdown; CPU
time spent on the telemetry's behalf can. These are read inside the trainer
process: its training thread, its other threads, its telemetry threads and
child processes, and the agent with its children.
"""

from __future__ import annotations

import resource
import threading
import time
from typing import Any

from _common import agent_cpu, agent_cpu_by_part


def agent_cpu_s(pid: int) -> float:
    """CPU seconds of the agent and its children (W&B's service process) so far."""
    return sum(agent_cpu(pid))


def helper_cpu(me: Any, torch_threads: set[int]) -> dict[tuple[str, int], float]:
    """CPU seconds so far of the trainer's telemetry threads (those started after torch's:
    the probe's sender and ZeroMQ's, TensorBoard's and W&B's writers) and of its child
    processes (W&B's service), by thread or process id."""
    import psutil

    cpu: dict[tuple[str, int], float] = {}
    try:
        for thread in me.threads():
            if thread.id not in torch_threads and thread.id != threading.get_native_id():
                cpu[("thread", thread.id)] = thread.user_time + thread.system_time
        for child in me.children(recursive=True):
            times = child.cpu_times()
            cpu[("process", child.pid)] = times.user + times.system
    except psutil.Error:
        pass
    return cpu


def kernel_counts(thread: Any, process: Any) -> dict[str, float]:
    """Costs the trainer pays outside telemetry code, from ``getrusage`` of the training
    thread and the process: page faults (the allocator returning and re-faulting memory),
    system time, and the training thread being switched out."""
    return {
        "thread_faults": thread.ru_minflt + thread.ru_majflt,
        "process_faults": process.ru_minflt + process.ru_majflt,
        "thread_system_s": thread.ru_stime,
        "thread_voluntary_switches": thread.ru_nvcsw,
        "thread_involuntary_switches": thread.ru_nivcsw,
    }


class LoopCounters:
    """The counters at the start of the timed loop, and what they moved by at its end.

    Create it once torch has started its thread pools and before the telemetry
    starts any thread: the threads alive then are torch's, any later one is the
    telemetry's. Call from the training thread. The process's CPU window
    encloses the training thread's (read before it at the start, after it at
    the end), so the other threads' share never comes out negative.
    """

    def __init__(self, agent_pid: int) -> None:
        import psutil

        self.me = psutil.Process()
        self.torch_threads = {t.id for t in self.me.threads()}
        self.agent_pid = agent_pid

    def start(self) -> None:
        pid = self.agent_pid
        self.agent_start = agent_cpu_s(pid) if pid else 0.0
        self.parts_start = agent_cpu_by_part(pid) if pid else {}
        self.helpers_start = helper_cpu(self.me, self.torch_threads)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu_start = usage.ru_utime + usage.ru_stime
        self.kernel_start = kernel_counts(resource.getrusage(resource.RUSAGE_THREAD), usage)
        self.thread_start = time.thread_time()

    def stop(self) -> dict[str, Any]:
        """What each counter moved by since :meth:`start`, under the result file's keys."""
        pid = self.agent_pid
        agent_loop_s = agent_cpu_s(pid) - self.agent_start if pid else 0.0
        parts_end = agent_cpu_by_part(pid) if pid else {}
        helpers_end = helper_cpu(self.me, self.torch_threads)
        helpers_loop_s = sum(
            cpu - self.helpers_start.get(key, 0.0) for key, cpu in helpers_end.items()
        )
        thread_s = time.thread_time() - self.thread_start
        kernel_thread = resource.getrusage(resource.RUSAGE_THREAD)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        kernel_end = kernel_counts(kernel_thread, usage)
        cpu_s = usage.ru_utime + usage.ru_stime - self.cpu_start
        return {
            "agent_loop_cpu_s": agent_loop_s,  # the agent's and its children's CPU in the loop
            "agent_parts_cpu_s": {
                k: v - self.parts_start.get(k, 0.0) for k, v in parts_end.items()
            },
            "helpers_loop_cpu_s": helpers_loop_s,  # telemetry threads and child processes
            "trainer_cpu_s": cpu_s,
            "other_threads_cpu_s": cpu_s - thread_s,
            "kernel": {key: value - self.kernel_start[key] for key, value in kernel_end.items()},
        }
