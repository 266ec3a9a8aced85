"""One worker's whole run: sources opened, the loop run, everything closed after.

The command line's ``run`` only parses options and prints what this returns, so
that a run can be started the same way from a test or from other Python code,
and so that the clean-up order (control channel, process, sink connections)
lives in one place whatever ends the run.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import redis

from .. import defaults, sinks
from ..ops.flush import FlushSubscription
from ..routing.routes import Router
from ..sources import open_sources
from .loop import Runner, RunOptions, RunStats
from .metrics import added_up, dump, worker_families
from .workers import Report, watch_parent

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from ..config import Config
    from ..core.process import Process

log = logging.getLogger(__name__)


class Job:
    """A worker ready to run: its sources are open and its routes' classes known.

    Raises (from the constructor):
        SourceError: a ``--source`` that cannot be opened; ``process`` is stopped.
    """

    def __init__(
        self,
        process: Process,
        config: Config,
        sources: Sequence[str],
        options: RunOptions,
        *,
        group: str = "phonon",
        follow: bool = False,
        start_from: str = "committed",
        max_line_bytes: int | None = None,
        progress: Callable[[str], None] | None = None,
        report: Report | None = None,
        report_metrics: bool = False,
    ) -> None:
        """``report_metrics``: send this worker's metrics with each report (the parent
        of ``--workers`` serves ``--metrics``)."""
        self.process = process
        try:
            opened = open_sources(
                sources,
                process,
                group=group,
                follow=follow,
                start_from=start_from,
                max_line_bytes=max_line_bytes,
            )
        except BaseException:
            process.stop()
            raise
        for route in config.routes:
            process.register(route.update)
            process.register_database(route.database)
        self.report = report
        self.report_metrics = report_metrics
        self.runner = Runner(
            process,
            Router(config.routes),
            opened,
            options,
            progress=progress,
            control=FlushSubscription(process),
            report=self._report if report else None,
        )

    def metrics(self) -> list[Metric]:
        """This worker's metrics (for ``--metrics``; read from another thread), through
        the same sum as a ``--workers`` parent's, so that both show the same series."""
        return added_up([dump(worker_families(self.runner))])

    def _report(self, figures: dict[str, int], final: bool = False) -> None:
        assert self.report is not None
        metrics = dump(worker_families(self.runner)) if self.report_metrics else None
        self.report.write(figures, final, metrics)

    def run(self) -> RunStats:
        """Run to the end of input or a signal; always leave the store and close sinks.

        Raises:
            PhononError: the run could not go on (a sink, a source, the store's state).
            redis.RedisError: the store was lost past what the loop retries.
        """
        runner = self.runner
        runner.install_signal_handlers()
        if self.report is not None:
            watch_parent(runner.request_stop)
        gc_threshold = gc.get_threshold()
        gc.set_threshold(defaults.GC_GEN0_THRESHOLD, *gc_threshold[1:])
        try:
            stats = runner.run()
        finally:
            gc.set_threshold(*gc_threshold)
            if runner.control is not None:
                runner.control.close()
            try:
                self.process.stop()
            except redis.RedisError as e:
                log.warning("could not unregister from the store: %s", e)
            sinks.close_all()
        if self.report is not None:  # the parent prints one summary for every worker
            self._report(stats.figures(self.runner.cache.size()), final=True)
            self.report.close()
        return stats
