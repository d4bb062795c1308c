"""Times visualize.py end to end (a fresh process, as a user runs it) on IRCAD patient 1's label map:
the default 120-frame 1280x720 orbit. Prints the wall and CPU time, peak memory, the video's size
and the machine's load average (other processes slow the wall time down), then one JSON line (every
run, the machine, the commit, the date). One contender only, so there is nothing to interleave.

    python bench/bench_visualize.py [--input LABEL] [--repeat N] [-- extra visualize.py flags]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchutil import describe_machine, provenance, summary  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=str(ROOT.parent / "shared/data/real/ircad_p1/label.nii.gz"),
                   help="label map to render (default: IRCAD patient 1)")
    p.add_argument("--repeat", type=int, default=1, help="runs; the best and the median are reported")
    p.add_argument("extra", nargs="*", help="more visualize.py flags, after --")
    args = p.parse_args()
    times = []
    prov = provenance(os.cpu_count() or 1)  # visualize.py's VTK and encoder use every core
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.mp4"
        cmd = [sys.executable, str(ROOT / "visualize.py"), "--input", args.input, "--output", str(out), "--quiet",
               *args.extra]
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            times.append(time.perf_counter() - start)
        size_mb = out.stat().st_size / 1e6
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_mb = usage.ru_maxrss / 1024
    cpu_s = (usage.ru_utime + usage.ru_stime) / len(times)  # the machine's load does not change it much
    wall = summary(times)
    print(f"machine: {describe_machine(prov)}")
    print(f"command: {' '.join(cmd[1:])}")
    print(f"wall time: best {wall['min']:.1f} s, median {wall['median']:.1f} s over {len(times)} run(s); "
          f"CPU time {cpu_s:.1f} s per run; peak memory {peak_mb:.0f} MB; video {size_mb:.1f} MB; "
          f"load average before/after {load[0]:.1f}/{os.getloadavg()[0]:.1f}")
    print(json.dumps({"bench": "bench_visualize", **prov, "command": cmd[1:], "wall_s": wall, "cpu_s_per_run": cpu_s,
                      "peak_rss_mb": peak_mb, "video_mb": size_mb}))


if __name__ == "__main__":
    main()
