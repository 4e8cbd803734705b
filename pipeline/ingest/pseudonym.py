"""Keyed-hash pseudonyms (HMAC-SHA256) and the local key file they are derived from."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from pipeline.errors import ConfigError

KEY_ENV = "MEDXFER_KEY_FILE"
DEFAULT_KEY_FILE = "~/.medxfer/pseudonym.key"
PREFIXES = {"subject": "sub-", "study": "stu-", "series": "ser-", "image": "img-"}
_KEY_HEX_CHARS = 64


def resolve_key_file(key_file: str | Path | None, out: str | Path) -> Path:
    """Where the pseudonym key lives: `key_file`, else $MEDXFER_KEY_FILE, else ~/.medxfer/pseudonym.key.

    Args:
        key_file: Explicit key file path, or None.
        out: The manifest output directory; the key must never be stored inside it.

    Returns:
        The absolute key file path (it may not exist yet).

    Raises:
        ConfigError: If the key file would lie inside `out`.
    """
    raw = key_file or os.environ.get(KEY_ENV) or DEFAULT_KEY_FILE
    path = Path(raw).expanduser().resolve()
    out_dir = Path(out).expanduser().resolve()
    if path == out_dir or out_dir in path.parents:
        raise ConfigError(
            f"pseudonym key file {path} lies inside the manifest directory {out_dir}; the key must "
            "stay outside everything that is shared. Fix: pass key_file (--key-file) or set "
            f"${KEY_ENV} to a path outside {out_dir}, e.g. {DEFAULT_KEY_FILE}"
        )
    return path


def load_or_create_key(path: Path) -> tuple[bytes, list[str]]:
    """Read the 32-byte HMAC key (hex text) at `path`, creating it (mode 0600) on first use.

    Args:
        path: Key file path from `resolve_key_file`.

    Returns:
        The key bytes and a list of warnings (e.g. permissions wider than 0600). The key is
        never logged.

    Raises:
        ConfigError: If the file exists but does not hold 64 hex characters.
    """
    if not path.exists():
        _create_key(path)
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if len(text) != _KEY_HEX_CHARS or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ConfigError(
            f"pseudonym key file {path} must hold {_KEY_HEX_CHARS} hex characters (32 random bytes); "
            f"found {len(text)} characters. Fix: restore the original key (pseudonyms and splits "
            "depend on it) or move the file away so a new key is created"
        )
    warnings = []
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        warnings.append("the pseudonym key file is readable by other users: chmod 600 it")
    return bytes.fromhex(text), warnings


def _create_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # created concurrently by another run: use that one
        return
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(secrets.token_bytes(32).hex() + "\n")


def digest(key: bytes, domain: str, value: str) -> str:
    """Full HMAC-SHA256 hex digest of `domain:value` (domain-separated, so kinds never collide)."""
    return hmac.new(key, f"{domain}:{value}".encode(), hashlib.sha256).hexdigest()


def pseudonym(key: bytes, kind: str, value: str) -> str:
    """Pseudonym of `value`: prefix for `kind` (subject/study/series/image) + 16 hex characters.

    Args:
        key: HMAC key from `load_or_create_key`.
        kind: One of "subject", "study", "series", "image".
        value: The identifier in clear (never stored).

    Returns:
        e.g. ``"sub-3f1c0a9be2d47a10"``.
    """
    return PREFIXES[kind] + digest(key, kind, value)[:16]


def source_ref(key: bytes, rel_path: str) -> str:
    """The pseudonymised reference of an archive file (keyed hash of its relative path): ``src-`` + 16 hex.

    Archive paths can carry patient names and IDs, so messages and shared tables name files by
    this reference; the local quarantine files map it back to the path.
    """
    return "src-" + digest(key, "source-ref", rel_path)[:16]


def unit_interval(key: bytes, domain: str, value: str) -> float:
    """A number uniform in [0, 1) derived from the keyed hash of `domain:value`."""
    return int(digest(key, domain, value)[:16], 16) / 2**64


def key_id(key: bytes) -> str:
    """A short, non-reversible fingerprint of the key, so two manifests can be checked for the same key."""
    return digest(key, "key-id", "medxfer")[:12]
