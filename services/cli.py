"""The ``botline`` command: run the services, manage bots and keys.

    botline gateway [--processes N] | worker [--processes N] | demo
    botline bots create|list|show|delete
    botline keys create|list|disable|enable|revoke
    botline export [--output FILE] | import FILE

Connections and the namespace come from the environment (``BOTLINE_*``),
like the services' own settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from pydantic import ValidationError
from redis.exceptions import RedisError

from services.processes import child_ids, supervise, tag_logs
from shared.amqp import TopologyMismatch
from shared.clock import now_ms
from shared.logging import configure_logging, freeze_logging
from shared.loop import new_event_loop
from shared.priority import PRIORITIES
from shared.records import Bot, KeyRecord, Limits
from shared.redis_client import redis_client
from shared.registry import Registry
from shared.settings import CommonSettings
from shared.settings_errors import settings_error

DEMO_BOT = "demo"
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class CliError(Exception):
    """A user mistake: printed without a traceback, exit status 1."""


def _expiry(value: str | None) -> int | None:
    """``30d``, ``12h``, ``15m``, ``60s`` from now, or an ISO date-time."""
    if value is None:
        return None
    match = _DURATION.match(value)
    if match:
        return now_ms() + int(match[1]) * _UNIT_S[match[2]] * 1000
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise CliError(
            f"--expires: use 30d, 12h, 15m, 60s or an ISO date-time, not {value!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def _key_row(record: KeyRecord, now: int) -> str:
    status = "disabled" if record.disabled else "expired" if record.expired(now) else "active"
    return (
        f"{record.key_id}  {record.prefix}…  {status:8}  created {_when(record.created_at)}"
        f"  expires {_when(record.expires_at)}  last used {_when(record.last_used_at)}"
        f"  {record.name}"
    )


async def _with_registry(fn: Callable[[Registry], Awaitable[int]]) -> int:
    settings = CommonSettings()
    redis = redis_client(settings, timeout_s=5, max_connections=16)
    try:
        return await fn(Registry(redis, settings.names))
    except RedisError as exc:
        raise CliError(f"cannot reach Redis: {type(exc).__name__}") from exc
    finally:
        await redis.aclose()


async def _bot_or_fail(registry: Registry, bot_id: str) -> Bot:
    bot = await registry.get_bot(bot_id)
    if bot is None:
        raise CliError(f"no bot {bot_id!r}")
    return bot


def _endpoint_ref(spec: str) -> dict[str, Any]:
    """``NAME[:WEIGHT[:TIER]]`` as an entry of a bot's endpoints."""
    name, *rest = spec.split(":")
    if not name or len(rest) > 2 or not all(part.isdigit() for part in rest):
        raise CliError(f"--endpoint {spec!r}: expected NAME[:WEIGHT[:TIER]]")
    ref: dict[str, Any] = {"name": name}
    if rest:
        ref["weight"] = int(rest[0])
    if len(rest) > 1:
        ref["tier"] = int(rest[1])
    return ref


def bots_command(args: argparse.Namespace) -> int:
    """botline bots ..."""

    async def go(registry: Registry) -> int:
        if args.action == "create":
            fields = {
                k: v
                for k, v in vars(args).items()
                if k in Bot.model_fields
                and k not in ("id", "created_at", "endpoint")
                and v is not None
            }
            fields["endpoints"] = [_endpoint_ref(e) for e in args.endpoint or ["echo"]]
            bot = await registry.create_bot(**fields)
            _print_json(bot.model_dump())
        elif args.action == "list":
            for bot in await registry.list_bots():
                names = ",".join(ref.name for ref in bot.endpoints)
                print(f"{bot.id}  {bot.name}  endpoint={names}  model={bot.model}")
        elif args.action == "show":
            _print_json((await _bot_or_fail(registry, args.bot_id)).model_dump())
        elif args.action == "delete":
            if not await registry.delete_bot(args.bot_id):
                raise CliError(f"no bot {args.bot_id!r}")
            print(f"deleted {args.bot_id}")
        return 0

    return asyncio.run(_with_registry(go))


def keys_command(args: argparse.Namespace) -> int:
    """botline keys ..."""

    async def go(registry: Registry) -> int:
        if args.action == "create":
            await _bot_or_fail(registry, args.bot)
            limits = Limits(rpm=args.rpm, tpm=args.tpm, concurrency=args.concurrency)
            key, record = await registry.create_key(
                args.bot, args.name, _expiry(args.expires), limits, args.priority
            )
            print(key)
            print(
                f"# {record.key_id} for {record.bot_id}: shown once, store it now", file=sys.stderr
            )
        elif args.action == "list":
            now = now_ms()
            for record in await registry.list_keys(args.bot):
                print(_key_row(record, now))
        elif args.action in ("disable", "enable"):
            if await registry.set_disabled(args.key_id, args.action == "disable") is None:
                raise CliError(f"no key {args.key_id!r}")
            print(f"{args.action}d {args.key_id}")
        elif args.action == "revoke":
            if not await registry.revoke(args.key_id):
                raise CliError(f"no key {args.key_id!r}")
            print(f"revoked {args.key_id}")
        return 0

    return asyncio.run(_with_registry(go))


EXPORT_FORMAT = "botline-export"
EXPORT_VERSION = 1


def export_command(args: argparse.Namespace) -> int:
    """botline export: bots and key records as JSON lines (no key, no secret)."""

    found: list[dict[str, Any]] = []

    async def go(registry: Registry) -> int:
        header = {
            "type": "header",
            "format": EXPORT_FORMAT,
            "v": EXPORT_VERSION,
            "namespace": registry.names.namespace,
            "exported_at": now_ms(),
        }
        found.extend([header, *await registry.export_records()])
        return 0

    asyncio.run(_with_registry(go))
    lines = b"".join(orjson.dumps(r) + b"\n" for r in found)
    if args.output in (None, "-"):
        sys.stdout.buffer.write(lines)
        sys.stdout.flush()
    else:
        with open(args.output, "wb") as out:
            out.write(lines)
    bots = sum(r["type"] == "bot" for r in found)
    print(f"exported {bots} bots, {len(found) - 1 - bots} keys", file=sys.stderr)
    return 0


def _read_export(path: str) -> list[dict[str, Any]]:
    """The records of an export file ("-": standard input), its header checked."""
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            with open(path, "rb") as source:
                data = source.read()
        except OSError as exc:
            raise CliError(f"cannot read {path}: {exc.strerror}") from None
    try:
        records = [orjson.loads(line) for line in data.splitlines() if line.strip()]
    except orjson.JSONDecodeError:
        raise CliError(f"{path} is not a botline export (JSON lines)") from None
    header = records[0] if records else {}
    if header.get("format") != EXPORT_FORMAT or header.get("v") != EXPORT_VERSION:
        raise CliError(f"{path} is not a botline export (format {EXPORT_FORMAT} v{EXPORT_VERSION})")
    return records[1:]


def import_command(args: argparse.Namespace) -> int:
    """botline import: store an export's bots and key records; safe to repeat."""
    records = _read_export(args.file)

    async def go(registry: Registry) -> int:
        bots, keys = await registry.import_records(records)
        print(f"imported {bots} bots, {keys} keys into {registry.names.namespace}")
        return 0

    return asyncio.run(_with_registry(go))


def _child_argv(command: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "services.cli", command, "--child", *extra]


def gateway_command(args: argparse.Namespace) -> int:
    """botline gateway"""
    from services.gateway.app import run
    from services.gateway.settings import GatewaySettings

    try:
        settings = GatewaySettings()
    except ValidationError as exc:
        raise settings_error(exc) from None
    update: dict[str, Any] = {}
    if args.port is not None:
        update["port"] = args.port
    if args.processes is not None:
        update["processes"] = args.processes
    settings = settings.model_copy(update=update)
    if settings.processes > 1 and not args.child:
        if settings.port == 0:
            raise CliError("--processes: give a port (0 would be a different one per process)")
        ids = child_ids(settings.gateway_id, settings.processes)
        common = {**os.environ, "BOTLINE_PROCESSES": str(settings.processes)}
        port = ["--port", str(settings.port)]
        return supervise(
            [_child_argv("gateway", port) for _ in ids],
            [{**common, "BOTLINE_GATEWAY_ID": gid} for gid in ids],
        )
    configure_logging(settings.log_level, settings.log_format)
    if args.child:
        tag_logs(gateway_id=settings.gateway_id, pid=os.getpid())
    freeze_logging()
    run(settings)
    return 0


def worker_command(args: argparse.Namespace) -> int:
    """botline worker"""
    from services.worker.settings import WorkerSettings
    from services.worker.worker import serve

    try:
        # Given before validation: the automatic prefetch divides memory between processes.
        overrides = {"processes": args.processes} if args.processes is not None else {}
        settings = WorkerSettings(**overrides)
    except ValidationError as exc:
        raise settings_error(exc) from None
    if settings.processes > 1 and not args.child:
        ids = child_ids(settings.worker_id, settings.processes)
        # Resolved once here, so that every child takes the same share.
        common = {
            **os.environ,
            "BOTLINE_PROCESSES": str(settings.processes),
            "BOTLINE_CONCURRENCY": str(settings.concurrency),
        }
        # Each child serves its own probes and /metrics: port + N (0 stays "any free port").
        port = settings.worker_http_port
        return supervise(
            [_child_argv("worker", []) for _ in ids],
            [
                {
                    **common,
                    "BOTLINE_WORKER_ID": wid,
                    "BOTLINE_WORKER_HTTP_PORT": str(port + n if port else 0),
                }
                for n, wid in enumerate(ids)
            ],
        )
    configure_logging(settings.log_level, settings.log_format)
    if args.child:
        tag_logs(worker_id=settings.worker_id, pid=os.getpid())
    freeze_logging()
    structlog.get_logger("botline.worker").info(
        "worker.prefetch", concurrency=settings.concurrency, processes=settings.processes
    )
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(settings))
    return 0


async def _demo_key(registry: Registry) -> tuple[Bot, str]:
    """The demo bot (made once) and a fresh demo key (earlier demo keys revoked)."""
    bot = next((b for b in await registry.list_bots() if b.name == DEMO_BOT), None)
    if bot is None:
        bot = await registry.create_bot(
            name=DEMO_BOT,
            endpoint="echo",
            model="echo",
            system_prompt="You are botline's demo bot.",
        )
    for record in await registry.list_keys(bot.id):
        if record.name == DEMO_BOT:
            await registry.revoke(record.key_id)
    key, _ = await registry.create_key(bot.id, DEMO_BOT)
    return bot, key


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def demo_command(args: argparse.Namespace) -> int:
    """botline demo: a demo bot and key, then a gateway and a worker until Ctrl-C."""
    holder: dict[str, Any] = {}

    async def go(registry: Registry) -> int:
        holder["bot"], holder["key"] = await _demo_key(registry)
        return 0

    asyncio.run(_with_registry(go))
    if args.no_serve:
        print(holder["key"])
        return 0
    port = os.environ.get("BOTLINE_PORT", "8080")
    key = holder["key"]
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    # The admin page needs a token: a fresh one per demo run unless one is set.
    admin_token = env.get("BOTLINE_ADMIN_TOKENS") or secrets.token_urlsafe(24)
    env["BOTLINE_ADMIN_TOKENS"] = admin_token
    print(
        f"""
botline demo: bot {holder["bot"].id} on the built-in echo model.

  API key (shown once):  {key}

  curl -s {base}/v1/chat/completions -H 'Authorization: Bearer {key}' \\
       -H 'Content-Type: application/json' \\
       -d '{{"messages":[{{"role":"user","content":"Hello, how are you?"}}]}}'

  add "stream":true for a stream; OpenAI clients use base_url {base}/openai/v1

  Admin page:  {base}/admin/   (admin token: {admin_token})

  Ctrl-C stops the gateway and the worker.
""",
        flush=True,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    procs = [
        subprocess.Popen([sys.executable, "-m", "services.cli", "worker"], env=env),
        subprocess.Popen([sys.executable, "-m", "services.cli", "gateway"], env=env),
    ]
    interrupted = False
    try:
        while all(p.poll() is None for p in procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                procs[0].wait(timeout=0.5)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=60)
    if not interrupted:
        print("botline demo: a process exited; stopping", file=sys.stderr)
        return 1
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError("between 1 and 256")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="botline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gw = sub.add_parser("gateway", help="run the HTTP gateway")
    gw.add_argument("--port", type=int, help="overrides BOTLINE_PORT")
    wk = sub.add_parser("worker", help="run a model worker")
    for service, name in ((gw, "gateway"), (wk, "worker")):
        service.add_argument(
            "--processes",
            type=_positive,
            metavar="N",
            help=f"{name} processes to run (overrides BOTLINE_PROCESSES, default 1): a parent "
            "starts them, forwards SIGTERM and SIGINT, and restarts none",
        )
        # Set by the parent of --processes N on its children.
        service.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    gw.set_defaults(func=gateway_command)
    wk.set_defaults(func=worker_command)
    demo = sub.add_parser("demo", help="create a demo bot and key, run a gateway and a worker")
    demo.add_argument(
        "--no-serve", action="store_true", help="only create the bot and key, print the key"
    )
    demo.set_defaults(func=demo_command)

    bots = sub.add_parser("bots", help="manage bots").add_subparsers(dest="action", required=True)
    create = bots.add_parser("create", help="create a bot")
    create.add_argument("--name", required=True)
    create.add_argument(
        "--endpoint",
        action="append",
        metavar="NAME[:WEIGHT[:TIER]]",
        help="a model endpoint the workers know (default echo); repeat for ordered fallbacks,"
        " WEIGHT splits traffic within a TIER (default: the position)",
    )
    create.add_argument("--model", default="echo")
    create.add_argument("--system-prompt", dest="system_prompt")
    create.add_argument("--temperature", type=float)
    create.add_argument("--top-p", dest="top_p", type=float)
    create.add_argument("--max-reply-tokens", dest="max_reply_tokens", type=int)
    create.add_argument("--max-history-messages", dest="max_history_messages", type=int)
    create.add_argument(
        "--allow-content",
        dest="allowed_content",
        action="append",
        choices=["image", "audio", "file"],
        help="non-text content parts callers may send (repeat for several)",
    )
    create.add_argument(
        "--priority", choices=PRIORITIES, help="its keys' jobs under a backlog (default normal)"
    )
    bots.add_parser("list", help="list bots")
    for action in ("show", "delete"):
        bots.add_parser(action, help=f"{action} a bot").add_argument("bot_id")
    sub.choices["bots"].set_defaults(func=bots_command)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True
    )
    kc = keys.add_parser("create", help="create a key; it is printed once")
    kc.add_argument("--bot", required=True, help="the bot id")
    kc.add_argument("--name", default="")
    kc.add_argument("--expires", help="30d, 12h, 15m, 60s or an ISO date-time")
    kc.add_argument("--rpm", type=int, help="requests per minute (default: the bot's)")
    kc.add_argument("--tpm", type=int, help="tokens per minute (default: the bot's)")
    kc.add_argument("--concurrency", type=int, help="requests in flight (default: the bot's)")
    kc.add_argument("--priority", choices=PRIORITIES, help="its jobs' class (default: the bot's)")
    keys.add_parser("list", help="list a bot's keys").add_argument("--bot", required=True)
    for action in ("disable", "enable", "revoke"):
        keys.add_parser(action, help=f"{action} a key").add_argument("key_id")
    sub.choices["keys"].set_defaults(func=keys_command)

    export = sub.add_parser(
        "export", help="write bots and key records (never keys or secrets) as JSON lines"
    )
    export.add_argument("--output", "-o", help="a file (default: standard output)")
    export.set_defaults(func=export_command)
    imp = sub.add_parser("import", help="store the bots and key records of an export")
    imp.add_argument("file", help="an export file, or - for standard input")
    imp.set_defaults(func=import_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``botline`` command."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (CliError, TopologyMismatch) as exc:
        print(f"botline: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # pydantic's ValidationError is one
        print(f"botline: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
