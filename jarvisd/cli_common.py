"""What the CLI's commands share: loading the config, reaching the database."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

    from config import ConfigError, LoadedConfig

__all__ = [
    "START_HINT",
    "NoConfig",
    "Refused",
    "Unreachable",
    "call_daemon",
    "client_session",
    "daemon_endpoint",
    "database_dsn",
    "load",
    "reach",
    "recorded_addresses",
    "redis_url",
    "run_call",
    "tell_daemons",
    "token_from",
    "with_database",
]


class NoConfig(Exception):
    """No configuration file was found and the environment does not make a
    complete one: say where jarvisd looked and how to make one."""

    def __init__(self, err: ConfigError) -> None:
        from config.loader import DEFAULT_SYSTEM_CONFIG

        self.err = err
        local = Path.cwd() / "jarvisd.toml"
        self.named = named = sorted(k for k in os.environ if k.startswith("JARVISD_") and "__" in k)
        super().__init__(
            f"no configuration found (looked for {local} and {DEFAULT_SYSTEM_CONFIG})\n"
            "  jarvisd init                 writes ./jarvisd.toml: embedded PostgreSQL and "
            "Valkey under ./var\n"
            "  jarvisd --config PATH ...    names one (or JARVISD_CONFIG=PATH)"
            + (f"\nthe environment names {', '.join(named)}, which is not enough:" if named else "")
        )


def load(args: argparse.Namespace) -> LoadedConfig:
    """The configuration ``--config`` names, else the default one; NoConfig
    when there is none and the environment does not make one."""
    from config import ConfigError, load_settings
    from config.loader import default_config_path

    path = Path(args.config) if getattr(args, "config", None) else None
    try:
        return load_settings(path)
    except ConfigError as err:
        explicit = path is not None or os.environ.get("JARVISD_CONFIG")
        if not explicit and not default_config_path().exists():
            raise NoConfig(err) from err
        raise


@contextlib.asynccontextmanager
async def database_dsn(loaded: LoadedConfig) -> AsyncIterator[str]:
    """The configured database's DSN. In embedded mode: the running daemon's
    server if there is one, else the embedded server started for the duration
    of the command (and stopped after it)."""
    import asyncpg

    from actors.embedded import EmbeddedPostgres, RunAs

    s = loaded.settings
    if not s.embedded_postgres:
        assert s.postgres.dsn is not None
        yield s.postgres.dsn
        return
    pg = EmbeddedPostgres(
        Path(s.daemon.state_dir),
        run_as=RunAs.resolve(s.embedded.postgres_user),
        bin_dir=s.embedded.postgres_bin_dir,
        start_timeout=s.embedded.start_timeout,
    )
    try:
        probe = await asyncpg.connect(pg.dsn, timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        probe = None
    if probe is not None:
        await probe.close()
        yield pg.dsn
        return
    await pg.start()
    try:
        yield pg.dsn
    finally:
        await pg.stop()


async def with_database(loaded: LoadedConfig, work: Any) -> Any:
    """Run ``work(conn)`` on one connection to the configured database."""
    import asyncpg

    async with database_dsn(loaded) as dsn:
        conn = await asyncpg.connect(dsn, timeout=loaded.settings.postgres.connect_timeout)
        try:
            return await work(conn)
        finally:
            await conn.close()


def redis_url(loaded: LoadedConfig) -> str:
    """The configured Redis: the embedded server's socket, or redis.url."""
    from actors.embedded import EmbeddedValkey, RunAs

    s = loaded.settings
    if s.embedded_redis:
        server = EmbeddedValkey(
            Path(s.daemon.state_dir), run_as=RunAs.resolve(s.embedded.postgres_user)
        )
        return server.url
    assert s.redis.url is not None
    return s.redis.url


async def tell_daemons(loaded: LoadedConfig, what: Any) -> None:
    """Tell every daemon on the configured Redis that a caller changed (the
    CLI changed a user or a token), so that none trusts a cached identity,
    and that they read the agents again (a user disabled may be an agent).
    No Redis answering means no daemon runs: nothing to tell."""
    import sys

    from actors.bus import agents_channel
    from actors.redis_link import REDIS_FAILURES, connect_redis
    from jarvisd.principals import encode_invalidation, internal_channel

    s = loaded.settings
    client = connect_redis(redis_url(loaded), s.redis, name="jarvisd-cli", timeout=2)
    try:
        await client.publish(internal_channel(s.redis.prefix), encode_invalidation(what))
        await client.publish(agents_channel(s.redis.prefix), b"changed")
    except REDIS_FAILURES as exc:
        if not s.embedded_redis:
            print(f"jarvisd: could not tell running daemons ({exc})", file=sys.stderr)
    finally:
        await client.aclose()


def recorded_addresses(state_dir: Path) -> list[str]:
    """Where the daemon on ``state_dir`` said it listens (its instance lock
    file): the sockets systemd passed it, or a port set by a variable, which
    the config file does not know."""
    from jarvisd.instance import LOCK_FILE

    try:
        lines = (state_dir / LOCK_FILE).read_text().splitlines()
        pid = int(lines[0])
    except (OSError, UnicodeError, ValueError, IndexError):
        return []  # no file (or not ours to read), or no pid yet
    if pid <= 0:
        return []  # kill(0) or a negative pid would name a process group
    # Not its lock (a probe could make a starting daemon think the state
    # directory taken): whether the process it names is alive.
    try:
        os.kill(pid, 0)
    except PermissionError:
        pass  # alive, as another user
    except OSError:
        return []  # left by a daemon that is gone
    return lines[2].split() if len(lines) > 2 else []


def daemon_endpoint(
    loaded: LoadedConfig, token: str | None
) -> tuple[str | None, str, dict[str, str]]:
    """(Unix socket or None, base URL, headers) of the running daemon: a Unix
    socket (the local admin, by peer credentials) unless a token is given,
    else a TCP port with the token. Where the daemon recorded its addresses
    those come first, then the configuration's."""
    http = loaded.settings.http
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    recorded = recorded_addresses(Path(loaded.settings.daemon.state_dir))
    sockets = [a.removeprefix("http://unix:").rstrip(":") for a in recorded if "unix:" in a]
    if http.unix_socket:
        sockets.append(http.unix_socket)
    if not token:
        for path in sockets:
            if Path(path).exists():
                return path, "http://localhost", headers
    tcp = [a for a in recorded if a.startswith("http://") and "unix:" not in a]
    if tcp:
        return None, tcp[0].replace("http://0.0.0.0:", "http://127.0.0.1:"), headers
    host = "127.0.0.1" if http.host in ("0.0.0.0", "", "::") else http.host  # noqa: S104
    host = f"[{host}]" if ":" in host else host
    return None, f"http://{host}:{http.port}", headers


def client_session(socket_path: str | None, **kwargs: Any) -> aiohttp.ClientSession:
    """An aiohttp session to the daemon, for what needs more than one answer
    (a WebSocket, a stream); imported here, by the commands that use it."""
    import aiohttp

    connector = aiohttp.UnixConnector(path=socket_path) if socket_path else None
    return aiohttp.ClientSession(connector=connector, **kwargs)


def token_from(args: argparse.Namespace) -> str | None:
    """``--token``, else ``$JARVISD_TOKEN``, else None (the Unix socket)."""
    return getattr(args, "token", None) or os.environ.get("JARVISD_TOKEN") or None


class Refused(Exception):
    """The daemon answered with an error status."""


START_HINT = "start it with `jarvisd run` (`make run` in a checkout, `systemctl start jarvisd` under systemd)"


class Unreachable(Exception):
    """No daemon answers where the configuration says it listens."""

    def __init__(self, where: str, exc: BaseException) -> None:
        reason = (
            type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        )
        super().__init__(f"no daemon answers on {where} ({reason}): {START_HINT}")


@contextlib.asynccontextmanager
async def reach(socket_path: str | None, base: str) -> AsyncIterator[None]:
    """Turn a failure to connect into Unreachable, naming where."""
    import aiohttp

    try:
        yield
    except aiohttp.ClientConnectorError as exc:
        raise Unreachable(socket_path or base, exc.os_error) from exc
    except (aiohttp.ServerDisconnectedError, ConnectionError, FileNotFoundError) as exc:
        raise Unreachable(socket_path or base, exc) from exc


def call_daemon(
    args: argparse.Namespace, method: str, path: str, body: Any = None, timeout: float = 15
) -> Any:
    """One call to the running daemon's API (its Unix socket as the local
    admin, or its TCP port with ``--token``); the answer's JSON, Refused, or
    Unreachable. Blocking: a command makes its calls one after another."""
    from jarvisd.cli_http import request

    socket_path, base, headers = daemon_endpoint(load(args), token_from(args))
    try:
        answer = request(
            socket_path, base, method, path, body=body, headers=headers, timeout=timeout
        )
    except (ConnectionError, FileNotFoundError) as exc:
        raise Unreachable(socket_path or base, exc) from exc
    try:
        doc = answer.json()
    except ValueError:
        doc = answer.body.decode(errors="replace")[:500]
    if answer.status >= 400:
        detail = doc.get("detail", doc.get("title")) if isinstance(doc, dict) else doc
        raise Refused(f"{answer.status}: {detail}")
    return doc


def run_call(name: str, work: Any) -> int:
    """Run ``work()`` (calls to the daemon; a coroutine function's is run on
    an event loop); exit 1 with the reason when the daemon refuses or cannot
    be reached."""
    import sys

    try:
        result = work()
        if hasattr(result, "__await__"):
            import asyncio

            result = asyncio.run(result)
        return int(result)
    except (Refused, Unreachable) as exc:
        print(f"jarvisd {name}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        aiohttp = sys.modules.get("aiohttp")  # loaded only by the commands that use it
        client_error = aiohttp is not None and isinstance(exc, aiohttp.ClientError)
        if not (client_error or isinstance(exc, OSError | TimeoutError)):
            raise
        print(
            f"jarvisd {name}: the daemon did not answer ({type(exc).__name__}: {exc})",
            file=sys.stderr,
        )
        return 1
