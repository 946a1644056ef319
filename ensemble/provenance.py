"""The code's identity, recorded with what it produced (cube attributes, report headers)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit(package: str | Path) -> str:
    """HEAD of the git checkout that holds the folder ``package``, with "+dirty" when
    tracked files under ``package`` differ from it (the code that ran is then not that
    commit); "unknown" outside a git checkout or without git."""
    here = Path(package).resolve()

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=5
        )

    try:
        head = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if changed.stdout.strip() else "")
