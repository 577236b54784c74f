"""A build of another commit of botline, to measure before and after in one run.

``python -m bench --baseline-commit 140364c`` adds a target ``botline@140364c``: that
commit's source (``git archive``, so the repository's worktrees are left alone) in
``bench/.baselines/<sha>/src``, with a virtual environment of its own beside it. The
libraries are the same pinned versions as this checkout's (its ``requirements.lock``, or
that commit's when it has one), so that only botline's own code differs. Built once per
commit and kept; delete the folder to rebuild.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import sys
import tarfile

from bench.procs import BenchError, Processes
from bench.targets import ROOT, Build, run_logged

BASELINES = ROOT / "bench" / ".baselines"


async def _git(*args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        "git",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    if proc.returncode != 0:
        raise BenchError(f"git {' '.join(args)}: {err.decode().strip()}")
    return out


async def build(procs: Processes, revision: str) -> Build:
    """The build of ``revision`` (any name git knows), made first if needed."""
    sha = (await _git("rev-parse", "--verify", f"{revision}^{{commit}}")).decode().strip()
    home = BASELINES / sha
    src, venv = home / "src", home / "venv"
    stamp = home / ".bench-built"
    found = Build(f"botline@{sha[:7]}", src, venv / "bin")
    if stamp.exists():
        return found
    print(f"building botline at {sha[:7]} into {home} (once)", file=sys.stderr)
    shutil.rmtree(home, ignore_errors=True)
    src.mkdir(parents=True)
    archive = await _git("archive", "--format=tar", sha)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(src, filter="data")
    # The project's interpreter: a venv made from a venv is based on the base Python.
    await run_logged(procs, "baseline-venv", [sys.executable, "-m", "venv", str(venv)], 300)
    lock = src / "requirements.lock"
    if not lock.exists():
        lock = ROOT / "requirements.lock"
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    pip.append("--disable-pip-version-check")
    await run_logged(procs, "baseline-deps", [*pip, "--require-hashes", "-r", str(lock)], 1500)
    await run_logged(procs, "baseline-botline", [*pip, "--no-deps", str(src)], 600)
    stamp.write_text(sha + "\n")
    return found
