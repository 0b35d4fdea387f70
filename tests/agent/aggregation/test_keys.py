"""`outrider keys` through the real console script, and clear errors for bad key files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent.aggregation.keys import (
    KeyFileError,
    aggregator_keys,
    authorized_keys,
    load_pair,
    node_keys,
)
from tests.helpers import outrider


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_command_makes_loadable_private_files(tmp_path: Path) -> None:
    """The directory is 0700, secrets 0600, and both ends can load what they need."""
    directory = tmp_path / "keys"
    result = outrider("keys", str(directory))
    assert result.returncode == 0, result.stderr
    assert "node.key_secret" in result.stdout and "aggregator.key" in result.stdout
    assert mode(directory) == 0o700
    assert mode(directory / "aggregator.key_secret") == 0o600
    assert mode(directory / "node.key_secret") == 0o600
    node_pair, server_key = node_keys(directory)
    aggregator_pair, trusted = aggregator_keys(directory)
    assert server_key == aggregator_pair.public
    assert node_pair.public in trusted


def test_keys_command_refuses_to_overwrite(tmp_path: Path) -> None:
    """Existing keys are kept unless --force: nodes holding them would be locked out."""
    directory = tmp_path / "keys"
    assert outrider("keys", str(directory)).returncode == 0
    before = load_pair(directory / "node.key_secret")
    again = outrider("keys", str(directory))
    assert again.returncode != 0
    assert "already exist" in again.stderr and "--force" in again.stderr
    assert "Traceback" not in again.stderr
    assert load_pair(directory / "node.key_secret") == before
    assert outrider("keys", str(directory), "--force").returncode == 0
    assert load_pair(directory / "node.key_secret") != before
    assert mode(directory / "node.key_secret") == 0o600


def test_keys_help_says_which_file_goes_where() -> None:
    """The help names what the aggregator and each node keep."""
    result = outrider("keys", "--help")
    assert result.returncode == 0
    for name in ("aggregator.key_secret", "node.key_secret", "aggregator.key", "*.key"):
        assert name in result.stdout


def test_bad_key_files_are_named(tmp_path: Path) -> None:
    """A missing or corrupt file is a one-line error that names it."""
    with pytest.raises(KeyFileError, match=r"node\.key_secret is missing"):
        node_keys(tmp_path)
    (tmp_path / "node.key_secret").write_text("not a certificate\n")
    with pytest.raises(KeyFileError, match=r"node\.key_secret is not a CURVE certificate"):
        load_pair(tmp_path / "node.key_secret")
    (tmp_path / "node.key_secret").write_text('curve\n    public-key = "short"\n')
    with pytest.raises(KeyFileError, match="malformed key"):
        load_pair(tmp_path / "node.key_secret")
    with pytest.raises(KeyFileError, match="does not exist"):
        authorized_keys(tmp_path / "nowhere")
    with pytest.raises(KeyFileError, match=r"no public keys \(\*\.key\)"):
        authorized_keys(tmp_path)
