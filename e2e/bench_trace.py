"""B5-trace: where the first packet's time goes while weir answers its miss.

Runs the B5 setup (two namespaces, node A in on-demand mode) under
`perf record` with scheduler and syscall tracepoints, and splits each first
packet's wait into stages by the timestamps of the events on its path:

  ping sendto() enter -> kernel wakes weir-miss      (neighbour code, app_solicit notification)
  wake -> weir-miss returns from recv()               (waiting for a CPU: the pinging task runs on)
  recv() return -> sendto() of the answer enter       (weir's userspace work)
  answer sendto() enter -> ping woken by the reply    (fdb + neighbour writes, then the queued
                                                       packet's whole round trip, in that sendto)
  ping woken -> ping running                          (waiting for a CPU again)

Tracepoints add a few microseconds each, so the stages sum to more than the
untraced penalty; they say where the time goes, not how much there is.
"""

import re
import shutil
import statistics
import subprocess
import time

import bench
import bench_ondemand
import proclab as lab  # noqa: E402  (the bench keeps process agents; see BENCHMARKS.md)

EVENTS = "sched:sched_switch,sched:sched_waking,syscalls:sys_enter_sendto,syscalls:sys_exit_recvfrom"
STAGES = ["miss notification", "waiting for a CPU", "weir userspace", "writes + packet round trip",
          "ping waiting for a CPU"]


def stages_of(perf_script_text, responder="weir-miss"):
    """Per first packet, the five stage durations in microseconds."""
    events = []
    for line in perf_script_text.splitlines():
        m = re.match(r"\s*(\S.*?)\s+\d+\s+\[\d+\]\s+([\d.]+):\s+(\S+):\s*(.*)", line)
        if m:
            events.append((m.group(1), float(m.group(2)) * 1e6, m.group(3), m.group(4)))
    out = []
    for i, (comm, t0, name, _) in enumerate(events):
        if comm != "ping" or name != "syscalls:sys_enter_sendto":
            continue
        marks = []  # woken, running, sending, reply, ping running
        for comm2, t, name2, rest in events[i + 1:]:
            if t - t0 > 3000:
                break
            want = len(marks)
            if want == 0 and name2 == "sched:sched_waking" and f"comm={responder}" in rest:
                marks.append(t)
            elif want == 0 and name2 == "sched:sched_waking" and "comm=ping" in rest:
                break  # a later packet: answered from the cache, no miss
            elif want == 1 and comm2 == responder and name2 == "syscalls:sys_exit_recvfrom":
                marks.append(t)
            elif want == 2 and comm2 == responder and name2 == "syscalls:sys_enter_sendto":
                marks.append(t)
            elif want == 3 and name2 == "sched:sched_waking" and "comm=ping" in rest:
                marks.append(t)
            elif want == 4 and name2 == "sched:sched_switch" and "next_comm=ping " in rest:
                marks.append(t)
                break
        if len(marks) == 5:
            points = [t0] + marks
            out.append([b - a for a, b in zip(points, points[1:])])
    return out


def traced(name, run, responder, trials):
    """Runs one B5 block under perf; its report line."""
    data = lab.STATE / "bench" / f"b5-trace-{name}.data"
    perf = subprocess.Popen(["perf", "record", "-q", "-a", "-e", EVENTS, "-o", str(data)], stderr=subprocess.DEVNULL)
    time.sleep(1)
    try:
        pen, _, lost, _ = run()
    finally:
        perf.send_signal(2)
        perf.wait()
    text = subprocess.run(["perf", "script", "-i", str(data)], capture_output=True, text=True).stdout
    per_packet = stages_of(text, responder)
    parts = [f"{name}: {len(per_packet)} of {trials} first packets traced (median penalty under tracing "
             f"{statistics.median(pen):.3f} ms, {lost} lost)"]
    for k, stage in enumerate(STAGES):
        col = sorted(p[k] for p in per_packet)
        if col:
            label = stage.replace("weir ", "responder ")
            parts.append(f"{label}: median {statistics.median(col):.0f} us (p10 {bench.pct(col, 10):.0f}, "
                         f"p90 {bench.pct(col, 90):.0f})")
    return ", ".join(parts)


def bench_ondemand_trace(trials=60):
    """weir and the C responder (the same two writes), one after the other."""
    if not shutil.which("perf"):
        bench.report("B5-trace", "SKIPPED: needs `perf` (Debian: linux-perf)")
        return
    d = bench_ondemand.pair_up()
    b = bench_ondemand.pair_agent(bench_ondemand.PAIR_B, "b", "full", d)
    try:
        weir = traced("weir", lambda: bench_ondemand.weir_block(d, trials), "weir-miss", trials)
        command, fdb_too = bench_ondemand.baselines()["c"]
        c = traced("c", lambda: bench_ondemand.baseline_block(command, fdb_too, trials), "miss_responder", trials)
    finally:
        b.terminate()
        b.wait()
        bench_ondemand.pair_down()
    bench.report("B5-trace", f"{weir}; {c}")


def main():
    lab.PROFILE = "release"
    lab.ensure_packages()
    lab.ensure_weir_built()
    bench_ondemand_trace()
