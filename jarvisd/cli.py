"""The ``jarvisd`` command line (DESIGN §9, §13).

Each command is a sync function around an async core, so tests can call the
cores directly; ``main`` returns the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from config import ConfigError, LoadedConfig, redacted, to_toml
from jarvisd import __version__
from jarvisd.cli_common import load, redis_url, with_database
from jarvisd.logs import configure

EXIT_CONFIG = 2


def _print_config_errors(err: ConfigError) -> None:
    print(f"jarvisd: invalid configuration ({len(err.issues)} problem(s)):", file=sys.stderr)
    for issue in err.issues:
        print(f"  {issue}", file=sys.stderr)


# -- run -------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    loaded = load(args)
    s = loaded.settings
    configure(s.daemon.log_level, s.daemon.log_format)
    from jarvisd.daemon import Daemon  # the daemon pulls in aiohttp; other commands need not
    from jarvisd.systemd import listen_fds

    async def main() -> int:
        activated = listen_fds()
        if activated:
            structlog.get_logger("jarvisd").bind(actor="daemon").info(
                "socket_activation", sockets=[f"{a.name}={a.description}" for a in activated]
            )
        daemon = Daemon(
            loaded,
            sockets=[a.sock for a in activated],
            config_arg=Path(args.config) if args.config else None,
        )
        return await daemon.run()

    return asyncio.run(main())


# -- check-config ----------------------------------------------------------------
def cmd_check_config(args: argparse.Namespace) -> int:
    loaded = load(args)
    source = loaded.path or "defaults and environment"
    print(f"# effective configuration from {source} (secrets redacted)")
    print(to_toml(redacted(loaded.settings)), end="")
    return 0


# -- migrate ---------------------------------------------------------------------
def cmd_migrate(args: argparse.Namespace) -> int:
    from actors import migrate as migrations

    loaded = load(args)
    configure("warning", "console" if sys.stderr.isatty() else "json", stream=sys.stderr)

    async def work(conn: Any) -> Any:
        if args.status:
            return await migrations.status(conn)
        return await migrations.migrate(conn)

    try:
        result = asyncio.run(with_database(loaded, work))
    except migrations.MigrationError as exc:
        print(f"jarvisd migrate: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"jarvisd migrate: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    if args.status:
        for name in result["applied"]:
            print(f"applied  {name}")
        for name in result["pending"]:
            print(f"pending  {name}")
    elif result:
        for name in result:
            print(f"applied {name}")
    else:
        print("up to date")
    return 0


# -- health ----------------------------------------------------------------------
async def probe_ready(loaded: LoadedConfig, timeout: float = 5.0) -> tuple[int, str]:
    """GET /health/ready on the Unix socket if configured and present, else TCP."""
    import aiohttp

    http = loaded.settings.http
    connector: aiohttp.BaseConnector | None = None
    if http.unix_socket and Path(http.unix_socket).exists():
        connector = aiohttp.UnixConnector(path=http.unix_socket)
        url = "http://localhost/health/ready?verbose"
    else:
        host = "127.0.0.1" if http.host in ("0.0.0.0", "") else http.host  # noqa: S104
        host = (
            "[::1]"
            if host == "::"
            else (f"[{host}]" if ":" in host and not host.startswith("[") else host)
        )
        url = f"http://{host}:{http.port}/health/ready?verbose"
    async with (
        aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as session,
        session.get(url) as resp,
    ):
        return resp.status, await resp.text()


def cmd_health(args: argparse.Namespace) -> int:
    import aiohttp

    loaded = load(args)
    try:
        status, text = asyncio.run(probe_ready(loaded, args.timeout))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        print(f"not ready: daemon unreachable ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    print(text, end="")
    return 0 if status == 200 else 1


def cmd_redis_cli(args: argparse.Namespace) -> int:  # noqa: RET503 - execv does not return
    """valkey-cli (or redis-cli) on the daemon's Redis: the embedded server's
    socket, or the configured URL."""
    import os
    from urllib.parse import unquote, urlsplit

    from actors.embedded.binaries import find_valkey_cli
    from actors.redis_link import cluster_seeds, is_cluster

    loaded = load(args)
    binary = find_valkey_cli()
    if binary is None:
        print("jarvisd redis-cli: no valkey-cli or redis-cli found", file=sys.stderr)
        return 1
    url = args.url or redis_url(loaded)
    if is_cluster(url, loaded.settings.redis):  # -c: follow the cluster's redirections
        where = ["-c", "-u", cluster_seeds(url)[0] if "+cluster" in url else url]
    elif url.startswith("unix://"):
        parts = urlsplit(url)
        where = ["-s", parts.path]
        if parts.username:
            # The password by the environment, never in the argument list (/proc).
            where += ["--user", unquote(parts.username)]
            os.environ["REDISCLI_AUTH"] = unquote(parts.password or "")
    else:
        where = ["-u", url]
    argv = [str(binary), *where, *args.args]
    os.execv(argv[0], argv)  # noqa: S606 - the CLI's own binary, an argument list


def cmd_redis_url(args: argparse.Namespace) -> int:
    """Where the daemon's Redis is (the embedded server's Unix socket, or
    redis.url), without the daemon's own credentials: agents get URLs of
    their own from ``jarvisd agent add``."""
    from actors.agents import without_credentials

    print(without_credentials(redis_url(load(args))))
    print(
        "agents: 'jarvisd agent add NAME' gives each agent a Redis URL with credentials of its own",
        file=sys.stderr,
    )
    return 0


def cmd_embedded_forget(args: argparse.Namespace) -> int:
    """Remove what embedded mode keeps for this instance outside its state
    directory (as root, from a folder the servers' account cannot enter);
    refused while the daemon runs."""
    from actors.embedded import forget
    from jarvisd.instance import InstanceLock, InstanceLocked

    loaded = load(args)
    state_dir = Path(loaded.settings.daemon.state_dir)
    lock = None
    if state_dir.is_dir():
        try:
            lock = InstanceLock.take(state_dir)
        except InstanceLocked as exc:
            print(f"jarvisd: {exc}", file=sys.stderr)
            return 1
    try:
        for path in forget(state_dir):
            print(f"removed {path}")
    finally:
        if lock is not None:
            lock.release()
    return 0


def cmd_version(_args: argparse.Namespace) -> int:
    print(f"jarvisd {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jarvisd", description="jarvisd: the Jarvis state daemon")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            "-c",
            metavar="PATH",
            help="config file (default: $JARVISD_CONFIG, ./jarvisd.toml, /etc/jarvisd/jarvisd.toml)",
        )
        return p

    with_config(sub.add_parser("run", help="run the daemon")).set_defaults(func=cmd_run)
    with_config(
        sub.add_parser("check-config", help="validate the config and print the effective one")
    ).set_defaults(func=cmd_check_config)
    m = with_config(sub.add_parser("migrate", help="apply pending database migrations"))
    m.add_argument(
        "--status", action="store_true", help="list applied and pending migrations, change nothing"
    )
    m.set_defaults(func=cmd_migrate)
    h = with_config(
        sub.add_parser("health", help="exit 0 when the running daemon is ready, 1 when not")
    )
    h.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)"
    )
    h.set_defaults(func=cmd_health)
    sub.add_parser("version", help="print the version").set_defaults(func=cmd_version)
    embedded = sub.add_parser(
        "embedded", help="embedded mode's files kept outside the state directory"
    ).add_subparsers(dest="embedded_command", required=True, metavar="ACTION")
    with_config(
        embedded.add_parser(
            "forget",
            help="remove what embedded mode keeps outside the state directory (stopped daemon)",
        )
    ).set_defaults(func=cmd_embedded_forget)
    rc = with_config(
        sub.add_parser(
            "redis-cli", help="valkey-cli/redis-cli on the daemon's Redis (embedded or configured)"
        )
    )
    rc.add_argument(
        "--url",
        help="connect with this URL instead of the daemon's own (e.g. an agent's, "
        "from jarvisd agent add, to act as that agent)",
    )
    rc.add_argument("args", nargs=argparse.REMAINDER, help="the command, e.g. XLEN jarvis:inbox")
    rc.set_defaults(func=cmd_redis_cli)
    with_config(
        sub.add_parser(
            "redis-url",
            help="print where the daemon's Redis is (no credentials; agents: jarvisd agent add)",
        )
    ).set_defaults(func=cmd_redis_url)
    from jarvisd import cli_agents, cli_approvals, cli_data, cli_pubsub

    cli_data.add_parsers(sub, with_config)
    cli_pubsub.add_parsers(sub, with_config)
    cli_approvals.add_parsers(sub, with_config)
    cli_agents.add_parsers(sub, with_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        _print_config_errors(err)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # pragma: no cover - only outside `run`, which owns SIGINT
        return 130


__all__ = ["build_parser", "main"]
