"""Idle resident memory of the processes that never run a model: an events+cpu worker and beat.

Starts each role for real (``enrich worker --queues events,cpu`` with its prefork children, and
``enrich beat``) on a fresh data directory with the embedded PostgreSQL and broker, waits until it
has settled, then reads from outside, in /proc: the resident set of the whole process tree and
whether any process of the tree has the torch / transformers / xgrammar native libraries mapped.

    .venv/bin/python infra/bench/idle_rss.py [--settle 40] [--repo PATH]

``--repo`` measures another checkout with this checkout's virtual environment (how the "before"
figure of a restructuring is taken: ``git worktree add /tmp/base <commit>``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = {"torch": "libtorch", "transformers": "/transformers/", "xgrammar": "xgrammar"}


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def mapped_heavy(pid: int) -> set[str]:
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    found = {name for name, marker in HEAVY.items() if marker in maps}
    if "transformers" not in found:  # pure-Python package: look for its open source files instead
        try:
            fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            fds = []
        if any("/transformers/" in f for f in fds):
            found.add("transformers")
    return found


def measure(role: str, argv: list[str], repo: Path, settle: float) -> dict[str, object]:
    data = Path(tempfile.mkdtemp(prefix="rss-" + role.split()[0].replace("+", "-") + "-"))
    env = {**os.environ, "ENRICH_DATA_DIR": str(data), "ENRICH_MODELS__PROFILE": "tiny",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(repo)}
    env.pop("ENRICH_BROKER__URL", None)
    env.pop("ENRICH_DB__URL", None)
    python = str(REPO / ".venv" / "bin" / "python")
    subprocess.run([python, "-m", "workers", "db", "upgrade"], cwd=repo, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen([python, "-m", "workers", *argv], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(settle)
        pids = [p for p in tree(proc.pid) if Path(f"/proc/{p}/cmdline").exists()]
        # The embedded PostgreSQL is started by the role but is not part of it.
        pids = [p for p in pids if b"postgres" not in Path(f"/proc/{p}/cmdline").read_bytes()[:200]]
        total = sum(rss_kib(p) for p in pids)
        heavy = sorted(set().union(*(mapped_heavy(p) for p in pids))) if pids else []
        return {"role": role, "processes": len(pids), "rss_mib": round(total / 1024, 1), "heavy": heavy}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-f", f"{data}/pgdata"], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settle", type=float, default=40.0, help="seconds to wait before reading")
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout to measure (default: this one)")
    args = parser.parse_args()
    rows = [measure("events+cpu worker", ["worker", "--queues", "events,cpu"], args.repo, args.settle),
            measure("beat", ["beat"], args.repo, args.settle)]
    print(f"{'role':<20} {'procs':>5} {'RSS MiB':>9}  heavy libraries mapped")
    for r in rows:
        print(f"{r['role']:<20} {r['processes']:>5} {r['rss_mib']:>9}  {', '.join(r['heavy']) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
