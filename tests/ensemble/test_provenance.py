"""ensemble.provenance.git_commit on a real git repository in a temporary folder."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from ensemble.provenance import git_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}  # fmt: skip
    out = subprocess.run(["git", "-C", str(repo), *args], env=env, check=True,
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip()


def test_commit_dirty_mark_and_outside_a_checkout(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    assert git_commit(outside) == "unknown"
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "other").mkdir()
    _git(repo, "init", "-q")
    (repo / "pkg" / "a.py").write_text("x = 1\n")
    (repo / "other" / "b.py").write_text("y = 1\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    head = _git(repo, "rev-parse", "HEAD")
    assert git_commit(repo / "pkg") == head
    (repo / "other" / "b.py").write_text("y = 2\n")  # another folder's change: still clean
    (repo / "pkg" / "new.py").write_text("")  # untracked files do not count
    assert git_commit(repo / "pkg") == head
    (repo / "pkg" / "a.py").write_text("x = 2\n")
    assert git_commit(repo / "pkg") == head + "+dirty"
