"""Garbage-collector pauses in the node's two processes under marker floods (issue 7 item 9).

A full (generation-2) collection walks every tracked Python object with the GIL held, stalling every
thread of its process. This starts the installed node with a `gc.callbacks` hook (a sitecustomize module
on PYTHONPATH, in a temporary folder) that logs each generation-2 collection of every process, publishes
the reliability benchmark's 5,000-marker flood every `--period` s for `--seconds` while timing GetIK
refusals (an unknown tip link, timeout 0.05 s) at the node, and reports, per process, the collections
after both engines had loaded: count, p50 and max duration (and younger collections that took over 1 ms).

    set +u; source install/setup.bash; set -u
    .venv/bin/python bench/gc_pauses.py --seconds 60 --out bench/results/gc_pauses.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability import Fuzzer, NodeUnderTest  # noqa: E402

HOOK = '''import gc, os, sys, time
_started = []
def _log(phase, info):
    if phase == "start":
        _started.append(time.perf_counter())
    elif _started:
        duration_ms = 1000 * (time.perf_counter() - _started.pop())
        if info.get("generation") == 2 or duration_ms > 1.0:
            with open(os.path.join({folder!r}, "gc_%d.log" % os.getpid()), "a") as log:
                log.write("%.3f %.3f %s %d\\n" % (time.time(), duration_ms, os.path.basename(sys.argv[0] if sys.argv else ""), info.get("generation")))
gc.callbacks.append(_log)
'''


def summary(durations: list[float]) -> dict[str, float | int]:
    return {"count": len(durations), "p50_ms": statistics.median(durations) if durations else 0.0, "max_ms": max(durations, default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--period", type=float, default=0.5, help="seconds between floods")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gc_pauses.json"))
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="mace_gc_")
    Path(folder, "sitecustomize.py").write_text(HOOK.format(folder=folder))
    # The node's processes start with the hook; this one is running already and stays unhooked.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")]))
    isolation = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_DOMAIN_ID": str(random.randint(1, 101))}
    os.environ.update(isolation)
    fuzzer = Fuzzer(0)
    node = NodeUnderTest(["-p", "scene:=box"], isolation, Path(folder, "node.log"))
    node.ready(fuzzer)
    ready_at = time.time()
    publisher = node.client.node.create_publisher(type(fuzzer.flood), node.topics()["markers"], 10)
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            publisher.publish(fuzzer.flood)
            stop.wait(args.period)

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    elapsed = []
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        request = fuzzer.valid_ik()
        request.tip_link, request.timeout_s = "no_such_link", 0.05
        elapsed.append(float(node.client.get_ik(request, timeout_s=5.0).elapsed_s))
        time.sleep(0.01)
    stop.set()
    flooder.join()
    node.client.close()
    node.process.stop(5.0)
    processes: dict[str, dict[str, list[float]]] = {}
    for log in Path(folder).glob("gc_*.log"):
        rows = [line.split() for line in log.read_text().splitlines()]
        name = next((row[2] for row in rows if len(row) > 3), log.stem)
        if name in ("mace_node", "intake.py"):
            processes[name] = {kind: [float(row[1]) for row in rows if float(row[0]) >= ready_at and (row[3] == "2") == (kind == "full")]
                               for kind in ("full", "younger_over_1ms")}
    result = {"command": "python bench/gc_pauses.py " + " ".join(sys.argv[1:]), "seconds": args.seconds, "flood_period_s": args.period,
              "collections_after_ready": {name: {kind: summary(durations) for kind, durations in kinds.items()}
                                          for name, kinds in sorted(processes.items())},
              "refusals": {"count": len(elapsed), "node_elapsed_p50_s": statistics.median(elapsed), "node_elapsed_max_s": max(elapsed)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
