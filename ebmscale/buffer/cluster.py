"""Where a Ray cluster is and how to authenticate to it, without importing ray (ray_host.py is
the only module that does): the cluster file of this node, the address ``buffer.ray_address``
means, the token files.

Authentication is always by token, and the token always comes from a file ebmscale points
``RAY_AUTH_TOKEN_PATH`` at (an embedded instance writes one into its session directory; a cluster
started with launch/ray/head.sh has its own), never from ``$HOME``.
"""
from __future__ import annotations

import os

from ebmscale.config import ConfigError

TOKEN_FILE = "auth_token"
# What launch/ray/head.sh writes when RAY_AUTH_TOKEN_PATH is not set (relative to where it runs).
CLUSTER_TOKEN_FILE = ".ray_auth_token"


def current_cluster_file() -> str:
    """Where `ray start` records the running cluster of this node (Ray's default temp dir:
    $RAY_TMPDIR, else $TMPDIR, else /tmp, then ray/ray_current_cluster)."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(base, "ray", "ray_current_cluster")


def cluster_address(address: str) -> str:
    """host:port of the cluster ``address`` means ('auto': $RAY_ADDRESS or this node's cluster)."""
    if address != "auto":
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        with open(current_cluster_file()) as fh:
            return fh.read().strip()
    except OSError:
        raise ConfigError("buffer.ray_address=auto found no running Ray cluster on this node (start one with "
                          "launch/ray/head.sh and launch/ray/worker.sh, or set RAY_ADDRESS)") from None


def write_token(path: str, token: str) -> None:
    """Write an authentication token to ``path``, readable by its owner only (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, token.encode())
    finally:
        os.close(fd)


def use_token_file(path: str) -> None:
    """Authenticate this process (and the Ray processes it starts) with the token in ``path``."""
    os.environ["RAY_AUTH_TOKEN_PATH"] = os.path.abspath(path)
    os.environ.pop("RAY_AUTH_TOKEN", None)


def use_cluster_token(target: str) -> None:
    """Find the token of a cluster started with launch/ray/head.sh: $RAY_AUTH_TOKEN, the file
    $RAY_AUTH_TOKEN_PATH names, or ./.ray_auth_token (head.sh's default)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or (CLUSTER_TOKEN_FILE if os.path.isfile(CLUSTER_TOKEN_FILE) else "")
    if not path:
        raise ConfigError(f"the Ray cluster at '{target}' needs its authentication token: set RAY_AUTH_TOKEN_PATH to "
                          "the file launch/ray/head.sh wrote (or RAY_AUTH_TOKEN to the token)")
    if not os.path.isfile(path):
        raise ConfigError(f"RAY_AUTH_TOKEN_PATH '{path}' does not exist (the token of the Ray cluster at '{target}')")
    use_token_file(path)
