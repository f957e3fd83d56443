"""Who made a result: the machine, the command and the date, recorded in every results JSON."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys


def machine_description() -> str:
    """Host, cores, jax version and devices (imports jax: call it after any jax.distributed set-up)."""
    import jax

    dev = jax.devices()[0]
    return (f"{platform.node()} {platform.machine()} {os.cpu_count()} cores; jax {jax.__version__} "
            f"{dev.platform} x{jax.device_count()} ({dev.device_kind}), {jax.process_count()} process(es)")


def command_line(prog: str, argv=None) -> str:
    """The command as one shell-quoted line: ``prog`` and the arguments (default: this process's)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join([prog] + [shlex.quote(a) for a in args])


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def provenance(prog: str, argv=None) -> dict:
    """{"command", "machine", "date"} for a results file."""
    return {"command": command_line(prog, argv), "machine": machine_description(), "date": utc_now()}
