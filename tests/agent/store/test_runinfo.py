"""What run.json and the run directory record about how a run was made: git, packages, env.

Real git repositories in temporary directories, real installed distributions.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from agent.store import runinfo
from probe import protocol
from probe.identity import trainer_environment
from tests.agent.cli.test_commands import git, git_repo


def dirty_repo(work: Path) -> str:
    """A repository with one committed file changed, one staged new file and one untracked."""
    work.mkdir()
    (work / "train.py").write_text("lr = 0.1\n")
    commit = git_repo(work)
    (work / "train.py").write_text("lr = 0.3\n")
    (work / "staged.py").write_text("batch = 64\n")
    git(work, "add", "staged.py")
    (work / "notes.txt").write_text("not in git\n")
    return commit


def test_dirty_repo_writes_patch_and_lists_untracked(tmp_path: Path) -> None:
    """Unstaged and staged changes go to git.patch; untracked files are named, not copied."""
    commit = dirty_repo(tmp_path / "work")
    run_dir = tmp_path / "run"
    info = runinfo.git_info(tmp_path / "work", run_dir)
    assert info is not None
    patch = (run_dir / runinfo.GIT_PATCH).read_bytes()
    assert info == {
        "commit": commit,
        "branch": git(tmp_path / "work", "rev-parse", "--abbrev-ref", "HEAD"),
        "dirty": True,
        "untracked": ["notes.txt"],
        "untracked_count": 1,
        "patch": "git.patch",
        "patch_bytes": len(patch),
        "truncated": False,
    }
    assert b"-lr = 0.1\n+lr = 0.3\n" in patch
    assert b"+batch = 64\n" in patch
    assert b"not in git" not in patch
    # the patch rebuilds the working tree from the commit
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(tmp_path / "work"), str(clone))
    git(clone, "apply", str(run_dir / runinfo.GIT_PATCH))
    assert (clone / "train.py").read_text() == "lr = 0.3\n"
    assert (clone / "staged.py").read_text() == "batch = 64\n"


def test_clean_repo_has_no_patch(tmp_path: Path) -> None:
    """A clean tree: dirty False, patch null, and an old git.patch in the run dir removed."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text("lr = 0.1\n")
    git_repo(work)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / runinfo.GIT_PATCH).write_text("from a previous attempt\n")
    info = runinfo.git_info(work, run_dir)
    assert info is not None
    assert (info["dirty"], info["patch"], info["patch_bytes"], info["truncated"]) == (
        False,
        None,
        0,
        False,
    )
    assert info["untracked"] == [] and info["untracked_count"] == 0
    assert not (run_dir / runinfo.GIT_PATCH).exists()


def test_huge_diff_is_cut_at_the_cap_and_flagged(tmp_path: Path) -> None:
    """A diff over 1 MiB: git.patch holds its first MAX_PATCH_BYTES; run.json the full size."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "weights.txt").write_text("0\n")
    git_repo(work)
    (work / "weights.txt").write_text("".join(f"{i:012d}\n" for i in range(200_000)))
    run_dir = tmp_path / "run"
    info = runinfo.git_info(work, run_dir)
    assert info is not None
    written = (run_dir / runinfo.GIT_PATCH).read_bytes()
    assert len(written) == runinfo.MAX_PATCH_BYTES
    assert info["truncated"] is True
    assert info["patch"] == "git.patch"
    assert info["patch_bytes"] > 2_600_000  # 200k lines of 14 bytes, plus headers
    assert written.startswith(b"diff --git a/weights.txt b/weights.txt\n")


def test_outside_a_repository_git_is_none(tmp_path: Path) -> None:
    """No repository: git is None and nothing is written."""
    run_dir = tmp_path / "run"
    assert runinfo.git_info(tmp_path, run_dir) is None
    assert not run_dir.exists()


def test_requirements_txt_pins_installed_packages(tmp_path: Path) -> None:
    """requirements.txt holds sorted name==version lines; run.json only the count and file."""
    info = runinfo.collect(None, tmp_path)
    lines = (tmp_path / runinfo.REQUIREMENTS).read_text().splitlines()
    assert f"msgpack=={importlib.metadata.version('msgpack')}" in lines
    assert lines == sorted(lines, key=str.lower)
    assert info["packages"]["file"] == "requirements.txt"
    assert info["packages"]["count"] == len(lines) > 10
    assert "msgpack" not in str(info)


def test_requirements_are_read_again_once_a_package_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs of one agent share the scan of installed packages until sys.path changes: a
    distribution installed between two runs is in the second run's requirements.txt."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    runinfo.write_requirements(tmp_path / "first")
    runinfo.write_requirements(tmp_path / "second")
    first = (tmp_path / "first" / runinfo.REQUIREMENTS).read_text()
    assert (tmp_path / "second" / runinfo.REQUIREMENTS).read_text() == first
    assert "outrider-installed-later" not in first
    dist_info = site / "outrider_installed_later-1.2.dist-info"
    dist_info.mkdir()  # what pip install leaves: the directory on sys.path changes
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: outrider-installed-later\nVersion: 1.2\n"
    )
    runinfo.write_requirements(tmp_path / "third")
    third = (tmp_path / "third" / runinfo.REQUIREMENTS).read_text().splitlines()
    assert "outrider-installed-later==1.2" in third
    assert len(third) == len(first.splitlines()) + 1


def test_trainer_environment_keeps_settings_and_drops_secrets() -> None:
    """NCCL/CUDA/torchrun variables are kept; anything named like a credential never is."""
    environ = {
        "NCCL_DEBUG": "INFO",
        "CUDA_VISIBLE_DEVICES": "0,1",
        "OMP_NUM_THREADS": "4",
        "WORLD_SIZE": "8",
        "MASTER_ADDR": "10.0.0.1",
        "SLURM_JOB_ID": "1234",
        "MY_SECRET_KEY": "hunter2",
        "HF_TOKEN": "hf_abc",
        "NCCL_IB_AUTH_TOKEN": "x",
        "TORCH_API_KEY": "y",
        "CUDA_PASSWORD": "z",
        "HOME": "/home/me",
        "PATH": "/usr/bin",
    }
    assert trainer_environment(environ) == {
        "CUDA_VISIBLE_DEVICES": "0,1",
        "MASTER_ADDR": "10.0.0.1",
        "NCCL_DEBUG": "INFO",
        "OMP_NUM_THREADS": "4",
        "SLURM_JOB_ID": "1234",
        "WORLD_SIZE": "8",
    }


def test_trainer_environment_is_bounded() -> None:
    """Values are cut to MAX_TRAINER_ENV_CHARS and at most MAX_TRAINER_ENV_VARS are kept."""
    environ = {f"NCCL_SETTING_{i:04d}": "v" * 10_000 for i in range(1000)}
    kept = trainer_environment(environ)
    assert len(kept) == protocol.MAX_TRAINER_ENV_VARS
    assert {len(value) for value in kept.values()} == {protocol.MAX_TRAINER_ENV_CHARS}


def test_agent_filters_a_hello_environment_again() -> None:
    """A probe that sends secrets or junk still gets only the allowed names into run.json."""
    body = {"environment": {"NCCL_DEBUG": "WARN", "HF_TOKEN": "hf", "HOME": "/", 3: "x"}}
    assert runinfo.environment_from_hello(body) == {"NCCL_DEBUG": "WARN"}
    assert runinfo.environment_from_hello({"environment": ["NCCL_DEBUG"]}) == {}
    assert runinfo.environment_from_hello({}) == {}
