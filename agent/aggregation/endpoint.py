"""TCP endpoints of the aggregation tier, and when plain TCP is allowed on one.

Traffic between nodes is CURVE-encrypted and authenticated. Plain TCP is
only for a host's own loopback (a one-machine job, tests) or when the
operator says ``insecure`` out loud.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path


def split_tcp(endpoint: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` -> (HOST, PORT); a bad endpoint is a ValueError saying so."""
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"aggregation endpoint {endpoint!r} must be tcp://HOST:PORT")
    host, colon, port = endpoint[len("tcp://") :].rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"aggregation endpoint {endpoint!r} must be tcp://HOST:PORT")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: traffic that never leaves this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def use_curve(endpoint: str, keys_dir: Path | None, insecure: bool, role: str) -> bool:
    """Whether the socket must run CURVE; ValueError when it must but has no keys."""
    host, _ = split_tcp(endpoint)
    if keys_dir is not None:
        return True
    if is_loopback(host) or insecure:
        return False
    raise ValueError(
        f"the {role} endpoint {endpoint} is not on loopback, so it needs CURVE keys: "
        "make them with `outrider keys DIR` and pass that directory (or --insecure, "
        "`insecure: true` in the config, for plain TCP on a network you trust)"
    )


def split_host_port(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); ValueError if not."""
    text = value.strip()
    if text.startswith("tcp://"):
        text = text[len("tcp://") :]
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = default_host, text
    host = host.strip("[]") or default_host
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{value!r} is not [HOST:]PORT") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is out of range")
    return host, number


def tcp_url(host: str, port: int) -> str:
    """The ZeroMQ endpoint of ``host:port`` (IPv6 hosts in brackets)."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
