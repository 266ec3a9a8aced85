"""The ``phonon`` command: parses options, calls the library, picks exit codes."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import redis

from . import defaults, logs
from .config import Config, load_config, parse_duration
from .exceptions import ConfigError, PhononError, StoreUnavailable

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from .core.process import Process
    from .run.loop import RunStats
    from .run.metrics import MetricsServer
    from .store.connection import StoreSettings

log = logging.getLogger(__name__)

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

EXIT_FAILURE, EXIT_USAGE, EXIT_STORE = 1, 2, 3


class Failure(click.ClickException):
    """A message and an exit code, printed without a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it per instance


def reader_gone() -> None:
    """stdout's reader went away (``phonon status --json | head``): it has what it
    wanted, so stop quietly. Point stdout at /dev/null first, or the interpreter's
    own flush at exit would complain on stderr about the broken pipe."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def fail(error: PhononError) -> NoReturn:
    if isinstance(error, ConfigError):
        raise Failure(str(error), EXIT_USAGE) from None
    if isinstance(error, StoreUnavailable):
        raise Failure(str(error), EXIT_STORE) from None
    raise Failure(str(error), EXIT_FAILURE) from None


@dataclass
class Context:
    redis_url: str | None
    namespace: str | None
    heartbeat_interval_s: float
    verbose: int
    quiet: bool
    cluster: bool = False
    """--redis-cluster (or PHONON_REDIS_CLUSTER) was given: it wins over the config."""
    log_format: str = "text"
    store_timeout_s: float = defaults.STORE_TIMEOUT_S
    """How long a worker retries a store it lost (--store-timeout)."""

    def is_cluster(self, config: Config | None = None) -> bool:
        if self.cluster:
            return True
        return bool(config and config.store.cluster)

    def settings(self, config: Config | None = None) -> StoreSettings:
        """The store the options (then the config, then the environment) name."""
        from .store.connection import StoreSettings

        return StoreSettings.from_env(
            self.redis_url or (config.store.url if config else None),
            self.namespace or (config.store.namespace if config else None),
            cluster=self.is_cluster(config),
        )

    def progress(self, stats_interval_s: float | None) -> Callable[[str], None] | None:
        """How a run shows progress: a line redrawn in place on a terminal, else
        (or with ``--stats-interval``) a log line every interval; nothing when quiet."""
        if self.quiet:
            return None
        if self.redraws(stats_interval_s):
            from .run.loop import progress_printer

            return progress_printer()
        return logs.progress_logger(stats_interval_s or defaults.STATS_INTERVAL_S)

    def redraws(self, stats_interval_s: float | None) -> bool:
        """Whether progress is a line redrawn in place (then the summary starts below it)."""
        return (
            not self.quiet
            and stats_interval_s is None
            and sys.stderr.isatty()
            and self.log_format == "text"
        )

    def process(self, config: Config | None = None, **kwargs: Any) -> Process:
        """A ``Process`` on the store the options (then the config, then the default) name."""
        from .core.process import Process

        url = self.redis_url or (config.store.url if config else None)
        namespace = self.namespace or (config.store.namespace if config else None)
        try:
            process = Process(
                url,
                namespace=namespace,
                heartbeat_interval=self.heartbeat_interval_s,
                cluster=self.is_cluster(config),
                **kwargs,
            )
        except PhononError as e:
            fail(e)
        process.store_timeout_s = self.store_timeout_s
        return process


pass_context = click.make_pass_decorator(Context)


def duration(_ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param=param) from None


def workers_count(_ctx: click.Context, param: click.Parameter, value: str) -> int:
    from .run.workers import count_workers

    try:
        return count_workers(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a positive number of workers nor 'auto'", param=param
        ) from None


def load(config_path: str) -> Config:
    """Load a config; modules next to it, or in the working directory, are importable."""
    for folder in (os.getcwd(), str(Path(config_path).resolve().parent)):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        return load_config(config_path)
    except ConfigError as e:
        fail(e)


@click.group(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--redis-url",
    envvar="PHONON_REDIS_URL",
    show_envvar=True,
    metavar="URL",
    help="Redis to coordinate through (default: an embedded server under PHONON_HOME).",
)
@click.option(
    "--redis-cluster",
    "redis_cluster",
    is_flag=True,
    envvar="PHONON_REDIS_CLUSTER",
    help="--redis-url names a node of a Redis Cluster (also [store] cluster = true).",
)
@click.option(
    "--namespace",
    envvar="PHONON_NAMESPACE",
    show_envvar=True,
    metavar="NS",
    help=f"Prefix of every Redis key (default: {defaults.NAMESPACE}).",
)
@click.option(
    "--heartbeat-interval",
    envvar="PHONON_HEARTBEAT_INTERVAL",
    show_envvar=True,
    type=float,
    default=defaults.HEARTBEAT_INTERVAL_S,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between heartbeats; silent for three, a worker counts as dead.",
)
@click.option(
    "--store-timeout",
    envvar="PHONON_STORE_TIMEOUT",
    show_envvar=True,
    callback=duration,
    default=f"{defaults.STORE_TIMEOUT_S:g}",
    show_default=True,
    metavar="DUR",
    help="How long a worker keeps retrying a store it lost before it gives up (exit 1).",
)
@click.option("-v", "--verbose", count=True, help="More logging (repeat for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="PHONON_LOG_FORMAT",
    show_envvar=True,
    help="Log lines on stderr: for people, or one JSON object a line.",
)
@click.version_option(package_name="phonon-cli")
@click.pass_context
def main(
    ctx: click.Context,
    redis_url: str | None,
    redis_cluster: bool,
    namespace: str | None,
    heartbeat_interval: float,
    store_timeout: float,
    verbose: int,
    quiet: bool,
    log_format: str,
) -> None:
    """Aggregate JSON event streams across many workers: one database write per key per session."""
    logs.setup(verbose, quiet, log_format)
    ctx.obj = Context(
        redis_url,
        namespace,
        heartbeat_interval,
        verbose,
        quiet,
        redis_cluster,
        log_format,
        store_timeout_s=store_timeout,
    )


@main.command(short_help="Validate a config and import its classes, offline.")
@click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    metavar="FILE",
    help="TOML or YAML config: store, cache and routes.",
)
@click.option(
    "--connect",
    is_flag=True,
    help="Also reach the store and every route's database, creating nothing.",
)
@pass_context
def check(ctx: Context, config_path: str, connect: bool) -> None:
    """Validate a config and import its classes, without running.

    With --connect, also reach the store and open each route's database (exit 3
    if the store cannot be reached, 1 if a database cannot).
    """
    config = load(config_path)
    click.echo(f"{config_path}: ok, {len(config.routes)} route(s)")
    if not connect:
        return
    settings = ctx.settings(config)
    if settings.url is None and not settings.embedded_running():
        click.echo(f"store: {settings.describe()}: not started yet ('phonon run' starts it)")
    else:
        _, client = _connect(ctx, config)
        try:
            client.ping()
        except redis.RedisError as e:
            _lost(settings, e)
        click.echo(f"store: {settings.describe()}: reached")
    failed = 0
    for i, route in enumerate(config.routes):
        try:
            found = route.update.check_connect(route)
        except PhononError as e:
            click.echo(f"routes[{i}]: {e}", err=True)
            failed += 1
            continue
        click.echo(f"routes[{i}]: {found or 'nothing to open (' + route.update_path + ')'}")
    if failed:
        raise Failure(f"{failed} route(s) cannot reach their database")


@main.command(short_help="Aggregate events; write each key once per session.")
@click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    metavar="FILE",
    help="TOML or YAML config: store, cache and routes.",
)
@click.option(
    "--source",
    "sources",
    multiple=True,
    default=["-"],
    show_default=True,
    metavar="SRC",
    help="'-' (stdin), file:PATH, redis-pubsub:CHANNEL or redis-stream:KEY (repeatable).",
)
@click.option(
    "--group", default="phonon", show_default=True, help="Consumer group for sources with offsets."
)
@click.option("--follow", is_flag=True, help="Keep reading sources that grow.")
@click.option(
    "--from",
    "start_from",
    type=click.Choice(["earliest", "committed"]),
    default="committed",
    show_default=True,
    help="Where sources with offsets start.",
)
@click.option(
    "--max-entries",
    type=click.IntRange(min=1),
    metavar="N",
    help="Keys in the local cache (default: the config's, else 10000).",
)
@click.option(
    "--soft-session",
    callback=duration,
    metavar="DUR",
    help="Idle time after which a key's session ends (90, 90s, 15m, 1h).",
)
@click.option(
    "--hard-session",
    callback=duration,
    metavar="DUR",
    help="Age after which a key's session ends regardless.",
)
@click.option(
    "--dead-letter",
    metavar="FILE",
    help="Where malformed events go, with the reason "
    "(default: dead-letter.jsonl under PHONON_HOME).",
)
@click.option(
    "--max-line-bytes",
    type=click.IntRange(min=1),
    default=defaults.MAX_LINE_BYTES,
    show_default=True,
    envvar="PHONON_MAX_LINE_BYTES",
    show_envvar=True,
    metavar="N",
    help="A longer line is dead-lettered (whole, to be replayed once fixed).",
)
@click.option(
    "--stats-interval",
    callback=duration,
    metavar="DUR",
    envvar="PHONON_STATS_INTERVAL",
    show_envvar=True,
    help="Log a progress line every DUR (default: 10s when stderr is not a terminal; "
    "on a terminal the line is redrawn in place).",
)
@click.option(
    "--summary-json",
    metavar="FILE|-",
    help="Also write the end-of-run summary as one JSON object to FILE ('-': stderr).",
)
@click.option(
    "--metrics",
    "metrics_addr",
    metavar="ADDR",
    envvar="PHONON_METRICS",
    show_envvar=True,
    help="Serve Prometheus metrics on http://ADDR/metrics and a health check on "
    "/healthz (e.g. 127.0.0.1:9464; with --workers, one endpoint for all).",
)
@click.option(
    "--workers",
    default="1",
    show_default=True,
    callback=workers_count,
    metavar="N|auto",
    help="Worker processes on this machine, each a full member (auto: one per core).",
)
@click.option("--worker-report-fd", type=int, hidden=True)
@pass_context
def run(
    ctx: Context,
    config_path: str,
    sources: tuple[str, ...],
    group: str,
    follow: bool,
    start_from: str,
    max_entries: int | None,
    soft_session: float | None,
    hard_session: float | None,
    dead_letter: str | None,
    max_line_bytes: int,
    stats_interval: float | None,
    summary_json: str | None,
    metrics_addr: str | None,
    workers: int,
    worker_report_fd: int | None,
) -> None:
    """Consume events, aggregate them, and execute each key once per session.

    At end of input, or on SIGINT/SIGTERM, every session ends (executed, or
    cached in Redis for the workers that still hold the key) and the exit
    code is 0. A second signal caches every partial in Redis and exits at once.
    With --workers N, N processes do this together (stdin handed out between
    them); the exit code is 1 if one of them was killed.
    """
    from .run.job import Job
    from .run.loop import RunOptions
    from .run.workers import Report

    config = load(config_path)
    home = os.environ.get("PHONON_HOME") or defaults.HOME
    dead_letter = dead_letter or str(Path(home) / "dead-letter.jsonl")
    end = RunEnd(ctx, config, dead_letter, summary_json)
    metered = Metered(metrics_addr, [(group, s) for s in sources if s != "-"])
    if workers > 1 and worker_report_fd is None:
        worker_report_fd = run_workers(
            ctx, config, workers, "-" in sources, end, stats_interval, metered
        )
        if worker_report_fd is None:  # the parent, its workers done
            return
    options = RunOptions(
        max_entries=max_entries or config.cache.max_entries,
        soft_session_s=soft_session if soft_session is not None else config.cache.soft_session_s,
        hard_session_s=hard_session if hard_session is not None else config.cache.hard_session_s,
        dead_letter=dead_letter,
    )
    report = Report(worker_report_fd) if worker_report_fd is not None else None
    show = None if report else ctx.progress(stats_interval)
    process = ctx.process(config)
    try:
        job = Job(
            process,
            config,
            sources,
            options,
            group=group,
            follow=follow,
            start_from=start_from,
            max_line_bytes=max_line_bytes,
            progress=show,
            report=report,
            report_metrics=metrics_addr is not None,
        )
    except PhononError as e:
        raise Failure(str(e), EXIT_USAGE) from None  # one line: the message names the source
    metrics = None
    if metrics_addr and report is None:  # a --workers child: the parent serves them all
        metrics = serve_metrics(
            ctx,
            config,
            metered,
            job.metrics,
            process.healthy,
            lambda: process.stats.get("keys_quarantined", 0),
        )
    try:
        stats = job.run()
    except PhononError as e:
        fail(e)
    except redis.RedisError as e:
        # Sessions in memory are lost with the store; sources with offsets replay
        # them (nothing was committed past them), stdin cannot.
        raise Failure(f"lost the store at {process.settings.describe()}: {e}") from None
    finally:
        if metrics is not None:
            metrics.close()
    if report is None:  # a worker of --workers: its parent reports for every worker
        end.report(stats, redrawn=ctx.redraws(stats_interval), output_closed=process.output_closed)


class RunEnd:
    """The end of ``phonon run``: the summary (text, log record or JSON), and the exit
    code, which counts what is still waiting in Redis rather than every write that
    failed on the way (a database locked for a while fails writes that a later
    session or another worker then makes)."""

    def __init__(self, ctx: Context, config: Config, dead_letter: str, summary_json: str | None):
        self.ctx, self.config = ctx, config
        self.dead_letter, self.summary_json = dead_letter, summary_json

    def report(
        self,
        stats: RunStats,
        workers: int = 1,
        problems: Sequence[str] = (),
        exit_code: int = 0,
        redrawn: bool = False,
        output_closed: bool = False,
    ) -> None:
        waiting = self._waiting() if stats.execute_failures or output_closed else 0
        code = exit_code or (EXIT_FAILURE if waiting else 0)
        summary = stats.summary() + (f"; {workers} workers" if workers > 1 else "")
        if redrawn:
            sys.stderr.write("\n")  # past the progress line
        self._say(summary, fields={"summary": True, **stats.figures(), "exit_code": code})
        if stats.dead_lettered:
            self._say(f"dead letters in {self.dead_letter}")
        if self.summary_json:
            self._write_json(stats, workers, code, waiting)
        for problem in problems:
            self._say(problem, error=True)
        if output_closed:
            raise Failure(
                f"stdout's reader went away; {waiting} aggregate(s) not written are kept in "
                "redis ('phonon flush -c CONFIG' writes them)"
            )
        if waiting:
            raise Failure(
                f"{waiting} aggregate(s) could not be written and wait in redis "
                "(see 'phonon status'; 'phonon flush -c CONFIG' writes them)"
            )
        if stats.execute_failures:
            self._say(
                f"{stats.execute_failures} write(s) failed on the way and were kept in redis; "
                "none is left waiting"
            )
        if code:
            click.get_current_context().exit(code)

    def _say(self, message: str, error: bool = False, fields: dict[str, Any] | None = None) -> None:
        """A line on stderr: text, or with --log-format json a log record with ``fields``."""
        if self.ctx.quiet and not error:
            return
        if self.ctx.log_format == "json":
            level = logging.ERROR if error else logging.INFO
            logging.getLogger(logs.PROGRESS).log(level, "%s", message, extra=fields or {})
        else:
            click.echo(f"phonon: {'error: ' if error else ''}{message}", err=True)

    def _waiting(self) -> int:
        """Partials that no live worker holds: what nobody will write unless told."""
        from .ops.status import Status

        settings, client = _connect(self.ctx, self.config)
        try:
            return Status(client, settings.namespace, "").snapshot(0).totals.orphaned
        except redis.RedisError:
            return 0
        finally:
            client.close()

    def _write_json(self, stats: RunStats, workers: int, code: int, waiting: int) -> None:
        import orjson

        from .run.loop import NULLS

        elapsed = stats.elapsed_s
        record: dict[str, Any] = {
            **stats.figures(),
            "workers": workers,
            "elapsed_s": round(elapsed, 3),
            "events_per_s": round(stats.events_read / elapsed, 1) if elapsed > 0 else 0.0,
            "waiting_in_redis": waiting,
            "dead_letter": self.dead_letter if stats.dead_lettered else None,
            "exit_code": code,
        }
        record.pop("entries", None)
        nulls = [k for k in record if k.startswith(NULLS)]  # per fields route: one object
        if nulls:
            record["nulls_skipped"] = {k[len(NULLS) :]: record.pop(k) for k in nulls}
        data = orjson.dumps(record) + b"\n"
        if self.summary_json == "-":
            sys.stderr.buffer.write(data)
            sys.stderr.flush()
        else:
            Path(self.summary_json).write_bytes(data)  # type: ignore[arg-type]


@dataclass
class Metered:
    """``--metrics``: where to serve, and the ``(group, source)`` whose lag to show."""

    addr: str | None
    sources: list[tuple[str, str]]


def serve_metrics(
    ctx: Context,
    config: Config,
    metered: Metered,
    families: Callable[[], Iterable[Metric]],
    healthy: Callable[[], bool],
    quarantined_here: Callable[[], int],
) -> MetricsServer:
    from .ops.status import Status
    from .run.metrics import MetricsServer, StoreFigures
    from .store.connection import clone

    assert metered.addr is not None
    settings, client = _connect(ctx, config)
    # Its own connections, which give up at once: a scrape while the store is away
    # answers with the run's counters rather than wait on it (or on the run loop's
    # retries), leaving out the figures only the store has.
    store_client = clone(client, timeout_s=defaults.METRICS_STORE_TIMEOUT_S)
    click.get_current_context().call_on_close(store_client.close)
    status = Status(store_client, settings.namespace, "")
    store = StoreFigures(status, metered.sources, quarantined_here)
    try:
        return MetricsServer(metered.addr, families, healthy, store)
    except ConfigError as e:
        raise Failure(str(e), EXIT_USAGE) from None


def run_workers(
    ctx: Context,
    config: Config,
    workers: int,
    feed_stdin: bool,
    end: RunEnd,
    stats_interval: float | None,
    metered: Metered,
) -> int | None:
    """``run --workers N``: start N workers, print their summary.

    Returns None in this parent; in a worker (forked from it, ``Supervisor.start``)
    the descriptor of its report pipe, for ``run`` to go on as that worker.
    """
    import time

    from .run.loop import RunStats
    from .run.workers import Supervisor

    settings = ctx.settings(config)
    try:  # once here, so that N workers do not each report the store missing (or start it)
        settings.connect().close()
    except PhononError as e:
        fail(e)
    started = time.monotonic()
    show = ctx.progress(stats_interval)

    def progress(figures: dict[str, int]) -> None:
        assert show is not None
        show(RunStats.added_up(figures, started).progress(figures["entries"]))

    supervisor = Supervisor(workers, feed_stdin, progress=progress if show else None)
    supervisor.install_signal_handlers()
    report_fd = supervisor.start()
    if report_fd is not None:
        return report_fd
    metrics = None
    if metered.addr:
        from .run.metrics import added_up

        metrics = serve_metrics(
            ctx,
            config,
            metered,
            lambda: added_up(supervisor.reported_metrics()),
            supervisor.all_alive,
            lambda: supervisor.figures()["keys_quarantined"],
        )
    try:
        outcome = supervisor.run()
    finally:
        if metrics is not None:
            metrics.close()
    stats = RunStats.added_up(outcome.figures, started)
    end.report(stats, workers, outcome.problems, outcome.exit_code, ctx.redraws(stats_interval))
    return None


# -- status and flush ---------------------------------------------------------------------


def _connect(ctx: Context, config: Config | None = None) -> tuple[Any, Any]:
    """Settings and a client for the store the options (then the config) name; no Process,
    so that reading or publishing never registers this command as a worker."""
    settings = ctx.settings(config)
    try:
        client = settings.connect(create=False)
    except PhononError as e:
        fail(e)
    # Closed with the command (for a command run in-process, e.g. by a test, its
    # sockets would otherwise live until garbage collection).
    click.get_current_context().call_on_close(client.close)
    return settings, client


def _config_process(ctx: Context, config: Config) -> Process:
    """A process that may execute partials of the config's classes into its databases."""
    process: Process = ctx.process(config, recover_failed_processes=False)
    for route in config.routes:
        process.register(route.update)
        process.register_database(route.database)
    return process


def _lost(settings: Any, error: Exception) -> NoReturn:
    fail(StoreUnavailable(f"lost the store ({settings.describe()}): {error}"))


@main.command(short_help="Show workers, keys held, orphaned partials, source offsets.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object (streamed; every reference unless --limit).",
)
@click.option(
    "--watch",
    type=click.FloatRange(min=0.1),
    metavar="SECONDS",
    help="Redraw every SECONDS until interrupted.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    metavar="N",
    help="Rows per table section (default 20); with --json, the N oldest references.",
)
@pass_context
def status(ctx: Context, as_json: bool, watch: float | None, limit: int | None) -> None:
    """Show processes, references, orphaned partials and source offsets, read from Redis.

    Works while workers run, after they die, and with none. Exit code 0 (status is
    informational, even with dead processes or orphaned partials); 3 if the store
    cannot be reached. Columns: see docs/status.md.
    """
    import time

    import redis

    from .ops.status import Status, render

    settings, client = _connect(ctx)
    reader = Status(client, settings.namespace, settings.describe())
    code = 0
    try:
        while True:
            if as_json:
                code = reader.write_json(sys.stdout, limit)
            else:
                snap = reader.snapshot(20 if limit is None else limit)
                if watch and sys.stdout.isatty():
                    click.echo("\x1b[H\x1b[2J", nl=False)
                click.echo(render(snap), nl=False)
            sys.stdout.flush()  # here, so a reader gone away is noticed here
            if not watch:
                break
            time.sleep(watch)
            if not as_json and not sys.stdout.isatty():
                click.echo()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        reader_gone()
    except redis.RedisError as e:
        _lost(settings, e)
    click.get_current_context().exit(code)


@main.command(short_help="Expire keys in running workers now; execute or list orphans.")
@click.argument("resources", nargs=-1, metavar="[RESOURCE_OR_GLOB]...")
@click.option("--all", "all_", is_flag=True, help="Every resource.")
@click.option(
    "--wait",
    is_flag=True,
    help="Return once every running worker has expired its matching entries.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long --wait waits, and -c waits for sets other workers are writing "
    "(a worker killed with kill -9 holds its sets until it counts as dead); then exit 1 "
    "naming them.",
)
@click.option(
    "-c",
    "--config",
    "config_path",
    metavar="FILE",
    help="Execute orphaned partials (no live holder) whose classes this config names.",
)
@pass_context
def flush(
    ctx: Context,
    resources: tuple[str, ...],
    all_: bool,
    wait: bool,
    timeout: float,
    config_path: str | None,
) -> None:
    """Force expiry now of the resources named (fnmatch globs, e.g. 'widgets:*') or --all.

    Running workers expire their matching cache entries (executing as last holder,
    else caching the partial in Redis for the others). Partials no live worker
    holds are executed here with -c CONFIG, and listed on stdout without it; -c also
    waits (up to --timeout) for sets a worker took out to write: written by it, or,
    once it counts as dead (killed), recovered and written here.
    Exit 1 if a worker did not answer --wait in time or stopped answering (killed, or
    paused past its TTL), or an execute failed.
    """
    from .ops.flush import flush as flush_now
    from .store.keys import Keys

    if not resources and not all_:
        raise click.UsageError("name resources or globs to flush, or use --all")
    config = load(config_path) if config_path else None
    settings, client = _connect(ctx, config)

    def executor() -> Process:
        assert config is not None
        return _config_process(ctx, config)

    def say(message: str) -> None:
        if not ctx.quiet:
            click.echo(f"phonon: {message}", err=True)

    try:
        problems = flush_now(
            client,
            Keys(settings.namespace),
            resources,
            all_,
            wait_s=timeout if wait else None,
            executor=executor if config is not None else None,
            held_timeout_s=timeout,
            config_name=str(config_path),
            say=say,
            show=click.echo,
        )
    except PhononError as e:
        fail(e)
    except redis.RedisError as e:
        _lost(settings, e)
    if problems:
        raise Failure("; ".join(problems))


# -- quarantine ----------------------------------------------------------------------------


@main.group(short_help="Aggregates whose write failed for good: list, retry, drop them.")
def quarantine() -> None:
    """Aggregates set aside because their write can never succeed as they are (a column
    the database refuses, a sum past int64, a null key): nothing else waits on them.
    See docs/status.md (Quarantine)."""


def _say(ctx: Context, message: str) -> None:
    if not ctx.quiet:
        click.echo(f"phonon: {message}", err=True)


@quarantine.command("list", short_help="Quarantined resources, with their last error.")
@click.argument("globs", nargs=-1, metavar="[GLOB]...")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_context
def quarantine_list(ctx: Context, globs: tuple[str, ...], as_json: bool) -> None:
    """List quarantined resources (all, or those matching GLOBs): records, age, last error."""
    import orjson

    from .clock import now_ms
    from .ops.flush import matcher
    from .ops.quarantine import scan
    from .store.keys import Keys

    settings, client = _connect(ctx)
    now, n = now_ms(), 0
    try:
        for q in scan(client, Keys(settings.namespace), matcher(globs, not globs)):
            s, n = q.summary(now), n + 1
            if as_json:
                click.echo(orjson.dumps(s).decode())
            else:
                age = "-" if s["age_s"] is None else f"{s['age_s']:.0f}s"
                click.echo(f"{s['resource']}\t{s['records']}\t{age}\t{s['error']}")
    except redis.RedisError as e:
        _lost(settings, e)
    _say(ctx, f"{n:,} quarantined resource(s)")


@quarantine.command("show", short_help="Every record of one quarantined resource.")
@click.argument("resource")
@pass_context
def quarantine_show(ctx: Context, resource: str) -> None:
    """Print every quarantined record of RESOURCE as JSON (exit 1 if it has none)."""
    import orjson

    from .ops.quarantine import show
    from .store.keys import Keys

    settings, client = _connect(ctx)
    try:
        q = show(client, Keys(settings.namespace), resource)
    except redis.RedisError as e:
        _lost(settings, e)
    if q is None:
        raise Failure(f"{resource}: nothing quarantined")
    for record in q.records:
        click.echo(orjson.dumps(record.to_json(), option=orjson.OPT_INDENT_2).decode())


@quarantine.command("export", short_help="Write every record as JSON lines.")
@click.argument("file", type=click.File("w"))
@click.argument("globs", nargs=-1, metavar="[GLOB]...")
@pass_context
def quarantine_export(ctx: Context, file: Any, globs: tuple[str, ...]) -> None:
    """Write the quarantined records (all, or those matching GLOBs) to FILE ('-': stdout),
    one JSON object per line: resource, kind, recipe, payload, error, at_ms. Removes nothing."""
    from .ops.flush import matcher
    from .ops.quarantine import export
    from .store.keys import Keys

    settings, client = _connect(ctx)
    try:
        n = export(client, Keys(settings.namespace), file, matcher(globs, not globs))
    except redis.RedisError as e:
        _lost(settings, e)
    _say(ctx, f"exported {n:,} record(s)")


@quarantine.command("retry", short_help="Put them back as cached partials (-c: write now).")
@click.argument("globs", nargs=-1, metavar="[GLOB]...")
@click.option(
    "-c",
    "--config",
    "config_path",
    metavar="FILE",
    help="Also execute them now, with the classes and databases this config names.",
)
@pass_context
def quarantine_retry(ctx: Context, globs: tuple[str, ...], config_path: str | None) -> None:
    """Put quarantined aggregates (all, or those matching GLOBs) back as their resources'
    cached partials: the next holder, a survivor or 'phonon flush -c' executes them, or
    this command with -c. Exit 1 if any could not go back, or failed again."""
    from .ops.flush import claim_matching, matcher
    from .ops.quarantine import retry
    from .store.keys import Keys

    config = load(config_path) if config_path else None
    settings, client = _connect(ctx, config)
    keys = Keys(settings.namespace)
    problems = []
    try:
        result = retry(client, keys, matcher(globs, not globs))
        _say(ctx, f"{result.moved:,} record(s) of {len(result.resources):,} resource(s) put back")
        for resource, reason in result.kept.items():
            problems.append(f"{resource} stays quarantined: {reason}")
        if config is not None and result.resources:
            process = _config_process(ctx, config)
            try:
                claimed = claim_matching(process, set(result.resources).__contains__)
            finally:
                process.stop()
            failed = sorted(q.resource for q in _scan(client, keys, result.resources))
            _say(ctx, f"executed {claimed.executed:,}; {len(failed):,} quarantined again")
            problems += [f"{r} failed again (phonon quarantine show {r})" for r in failed]
            problems += [f"{r} not executed (not in {config_path})" for r in claimed.left]
    except PhononError as e:
        fail(e)
    except redis.RedisError as e:
        _lost(settings, e)
    if problems:
        raise Failure("; ".join(problems))


def _scan(client: Any, keys: Any, resources: list[str]) -> Any:
    from .ops.quarantine import scan

    return scan(client, keys, set(resources).__contains__)


@quarantine.command("drop", short_help="Delete them for good (needs a GLOB and --yes).")
@click.argument("globs", nargs=-1, required=True, metavar="GLOB...")
@click.option("--yes", is_flag=True, help="Really delete: the aggregates are lost.")
@pass_context
def quarantine_drop(ctx: Context, globs: tuple[str, ...], yes: bool) -> None:
    """Delete the quarantined aggregates matching GLOBs ('*' for all): their data is lost.
    Without --yes, only lists what would go and exits 2."""
    from .ops.flush import matcher
    from .ops.quarantine import drop, scan
    from .store.keys import Keys

    settings, client = _connect(ctx)
    keys, match = Keys(settings.namespace), matcher(globs)
    try:
        if not yes:
            found = [q.resource for q in scan(client, keys, match)]
            for resource in found:
                click.echo(resource)
            raise Failure(
                f"{len(found):,} quarantined resource(s) match; add --yes to drop them for good",
                EXIT_USAGE,
            )
        resources, records = drop(client, keys, match)
    except redis.RedisError as e:
        _lost(settings, e)
    _say(ctx, f"dropped {records:,} record(s) of {resources:,} resource(s)")
