"""Start-up under any launcher: read the settings, set up logging, load agent modules, or refuse to start."""

from __future__ import annotations

import logging.config
import os
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

from service import settings, tracing
from service.backends import check_settings
from service.http.single_process import refusal_exit_status
from service.logs import log, logging_config, write_hot_lines
from service.process_memory import return_large_blocks
from service.settings import ConfigError, Settings, load_agent_modules


def configure(env: Mapping[str, str] = os.environ, version: str = "") -> None:
    """Read settings, set up logging and tracing, load agent modules; on a bad value log it and exit 2."""
    logging.config.dictConfig(logging_config("info"))
    return_large_blocks(env)
    try:
        settings.current = Settings.from_env(env)
        check_settings(settings.current)
        logging.config.dictConfig(process_logging_config())
        tracing.configure(env, version)
        load_agent_modules(settings.current.agent_modules)
    except ConfigError as exc:
        refuse_to_start(exc.variable, exc.detail)


def refuse_to_start(variable: str, detail: str) -> NoReturn:
    """Log ``invalid_configuration`` and exit 2 (3 in a worker of uvicorn or gunicorn: they stop on it)."""
    log.error("invalid_configuration", extra={"variable": variable, "detail": detail})
    write_hot_lines()
    sys.stdout.flush()
    os._exit(refusal_exit_status())  # from the lifespan too, where uvicorn would take SystemExit for exit 3


def process_logging_config() -> dict[str, Any]:
    config = settings.current
    return logging_config(config.log_level, config.log_format, colour=not config.no_color)
