"""Logging set-up for the command line (the library only ever calls getLogger)."""

from __future__ import annotations

import logging.config


def setup(verbose: int = 0, quiet: bool = False) -> None:
    level = "ERROR" if quiet else {0: "WARNING", 1: "INFO"}.get(verbose, "DEBUG")
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"plain": {"format": "phonon: %(levelname)s: %(message)s"}},
            "handlers": {
                "stderr": {
                    "class": "logging.StreamHandler",
                    "formatter": "plain",
                    "stream": "ext://sys.stderr",
                }
            },
            "loggers": {"phonon_cli": {"level": level, "handlers": ["stderr"], "propagate": False}},
        }
    )
