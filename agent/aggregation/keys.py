"""CURVE keys of the aggregation tier: who may send to the aggregator, and to whom.

``outrider keys DIR`` makes two key pairs. The aggregator keeps
``aggregator.key_secret`` and trusts every ``*.key`` (public key) in its
keys directory; each node keeps ``node.key_secret`` and ``aggregator.key``
(the aggregator's public key, so a node only talks to the real aggregator).
One node key can serve the whole job; an operator who wants one per node
makes more pairs (``outrider keys`` in another directory) and copies each
public ``.key`` file into the aggregator's directory under its own name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

AGGREGATOR: str = "aggregator"
NODE: str = "node"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"


class KeyFileError(ValueError):
    """A key file is missing or not a CURVE certificate; the message names the file."""


class CurveUnavailable(ValueError):
    """This libzmq was built without CURVE."""


@dataclass(frozen=True)
class KeyPaths:
    directory: Path
    aggregator_public: Path
    aggregator_secret: Path
    node_public: Path
    node_secret: Path


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # z85, 40 characters
    secret: bytes


def require_curve() -> None:
    if not zmq.has("curve"):
        raise CurveUnavailable(
            f"this libzmq ({zmq.zmq_version()}) was built without CURVE; install a pyzmq "
            "wheel (they bundle libzmq with CURVE) or a libzmq built with libsodium"
        )


def paths(directory: Path) -> KeyPaths:
    return KeyPaths(
        directory,
        directory / f"{AGGREGATOR}{PUBLIC_SUFFIX}",
        directory / f"{AGGREGATOR}{SECRET_SUFFIX}",
        directory / f"{NODE}{PUBLIC_SUFFIX}",
        directory / f"{NODE}{SECRET_SUFFIX}",
    )


def create_keys(directory: Path, *, force: bool = False) -> KeyPaths:
    """Make the aggregator's and the nodes' key pairs in ``directory`` (0700, secrets 0600).

    Refuses to replace existing keys unless ``force``: nodes holding the old
    ones would be locked out.
    """
    require_curve()
    made = paths(directory)
    existing = [
        str(p)
        for p in (
            made.aggregator_public,
            made.aggregator_secret,
            made.node_public,
            made.node_secret,
        )
        if p.exists()
    ]
    if existing and not force:
        raise KeyFileError(
            f"keys already exist ({', '.join(existing)}); use --force to replace them "
            "(nodes holding the old keys will be refused)"
        )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    for name in (AGGREGATOR, NODE):
        zmq.auth.create_certificates(directory, name)
        (directory / f"{name}{SECRET_SUFFIX}").chmod(0o600)
        (directory / f"{name}{PUBLIC_SUFFIX}").chmod(0o644)
    return made


def _read(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as exc:
        if not path.exists():
            raise KeyFileError(
                f"key file {path} is missing (make keys with `outrider keys`)"
            ) from None
        raise KeyFileError(f"key file {path} is not a CURVE certificate: {exc}") from None
    if not _is_key(public) or (secret is not None and not _is_key(secret)):
        raise KeyFileError(f"key file {path} holds a malformed key (40 z85 characters expected)")
    return public, secret


def _is_key(key: bytes) -> bool:
    if len(key) != 40:
        return False
    try:
        z85.decode(key)
    except (ValueError, KeyError, TypeError):
        return False
    return True


def load_public(path: Path) -> bytes:
    """A public key (z85) from a ``.key`` or ``.key_secret`` file."""
    return _read(path)[0]


def load_pair(path: Path) -> KeyPair:
    """A key pair from a ``.key_secret`` file."""
    public, secret = _read(path)
    if secret is None:
        raise KeyFileError(f"key file {path} has no secret key (use the .key_secret file)")
    return KeyPair(public, secret)


def authorized_keys(directory: Path) -> dict[bytes, Path]:
    """Every public key the aggregator accepts: each ``*.key`` file in its keys directory."""
    if not directory.is_dir():
        raise KeyFileError(f"keys directory {directory} does not exist")
    keys = {load_public(path): path for path in sorted(directory.glob(f"*{PUBLIC_SUFFIX}"))}
    if not keys:
        raise KeyFileError(f"no public keys (*.key) in {directory}: no node could connect")
    return keys


def node_keys(directory: Path) -> tuple[KeyPair, bytes]:
    """What a node needs: its own pair and the aggregator's public key."""
    require_curve()
    made = paths(directory)
    return load_pair(made.node_secret), load_public(made.aggregator_public)


def aggregator_keys(directory: Path) -> tuple[KeyPair, dict[bytes, Path]]:
    """What the aggregator needs: its own pair and the nodes' public keys."""
    require_curve()
    return load_pair(paths(directory).aggregator_secret), authorized_keys(directory)
