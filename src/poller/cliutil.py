"""What the command line (:mod:`poller.cli`) and the commands it runs
(:mod:`poller.commands`) both need: settings from the parsed flags, the
device password, running a coroutine, printing JSON.

Its own module so that the import graph is one-way: ``cli`` imports
``commands``, and both import this.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Coroutine
from typing import Any

import orjson

from poller import config
from poller.config import Settings
from poller.errors import UsageError

PASSWORD_ENV = "POLLER_DEVICE_PASSWORD"


def settings_from(args: argparse.Namespace, env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    overrides: dict[str, str] = {}
    for text in getattr(args, "overrides", []) or []:
        key, value = config.parse_override(text)
        overrides[key] = value
    if hasattr(args, "state_dir"):
        overrides["state_dir"] = args.state_dir
    for flag, key in (("log_level", "log.level"), ("log_format", "log.format")):
        if hasattr(args, flag):
            overrides[key] = getattr(args, flag)
    path = getattr(args, "config", config.DEFAULT_CONFIG_PATH)
    return config.load(config_path=path, env=env, overrides=overrides)


def read_password(args: argparse.Namespace, *, confirm: bool) -> str:
    """The device password: --password-stdin, the environment, or a no-echo prompt."""
    if getattr(args, "password_stdin", False):
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    if not sys.stdin.isatty():
        raise UsageError(f"no password: pipe it with --password-stdin or set {PASSWORD_ENV} "
                         "(flags would show it in ps)")
    first = getpass.getpass("Device password or install code: ")
    if confirm and getpass.getpass("Again: ") != first:
        raise UsageError("the two passwords differ")
    return first


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    import uvloop

    return uvloop.run(coro)


def print_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
