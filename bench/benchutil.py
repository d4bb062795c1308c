"""Shared by the benchmarks: what a figure was measured on (machine, commit, date) and summaries of
repeats that ran interleaved (A B A B ...), so that load from other processes on a shared machine
falls on every contender alike and the ratio of medians holds still."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IRCAD_CT = ROOT.parent / "shared" / "data" / "real" / "ircad_p1" / "image.nii.gz"  # the benchmarks' default CT


def parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's argument parser: described by its docstring's first line, defaults in the help."""
    return argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """HEAD's hash, with "+dirty" when tracked files differ from it ("unknown" outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def provenance(threads: int) -> dict:
    """{"date" (UTC, ISO 8601), "commit", "machine": {cpu, cores, torch, threads, python,
    load_average (1 min, at the call)}}: what the JSON line of every benchmark carries."""
    import torch

    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": git_commit(),
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                        "threads": threads, "python": platform.python_version(),
                        "load_average": round(os.getloadavg()[0], 2)}}


def describe_machine(p: dict) -> str:
    m = p["machine"]
    return (f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} thread(s), "
            f"load average {m['load_average']}; commit {p['commit'][:12]}; {p['date']}")


def summary(values: list[float]) -> dict:
    """{"min", "median", "all"} of repeated measurements (seconds or any unit)."""
    return {"min": min(values), "median": statistics.median(values), "all": list(values)}


def ratio_of_medians(ours: list[float], theirs: list[float]) -> float:
    return statistics.median(ours) / statistics.median(theirs)
