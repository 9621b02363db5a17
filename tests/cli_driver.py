"""Run several `lora-offset` command lines in one process; print each one's exit code and stderr as JSON.

    python -m tests.cli_driver < request.json

request.json: {"probe": FOLDER or null, "parse_only": bool, "cases": [[arg, ...], ...]}. With
"parse_only", a command that gets past its parser fails at once (stop_commands) instead of running.
With a probe folder, the driver
first tries to create a file in it and reports what happened ("writable", or the error), so that a
test can prove the folder is really unwritable to this process (a test run as root needs the
process to be started without CAP_DAC_OVERRIDE for that). A command line that raises, i.e. a
traceback a user would see, is reported with rc null and the traceback as its stderr. One process
for many command lines: the imports are paid once.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import traceback


def probe(folder: str) -> str:
    path = os.path.join(folder, "probe-by-cli-driver")
    try:
        with open(path, "w"):
            pass
    except OSError as e:
        return e.strerror or type(e).__name__
    os.unlink(path)
    return "writable"


def stop_commands(setattr=setattr) -> None:
    """Make every command's run() fail: for tests of values that its parser must refuse, so that a value
    let through fails in a moment rather than running the command (the demo would run for minutes)."""
    import importlib

    from lora_offset.cli import COMMANDS

    def ran(args):
        raise AssertionError(f"{args._command}: the command ran; its parser let the value through")

    for name, (module_name, _) in COMMANDS.items():
        module = importlib.import_module(module_name)
        setattr(module, "run", lambda args, name=name: ran(argparse.Namespace(_command=name)))


def main() -> None:
    request = json.load(sys.stdin)
    from lora_offset.cli import main as cli

    if request.get("parse_only"):
        stop_commands()

    report = {"probe": probe(request["probe"]) if request.get("probe") else None, "results": []}
    for argv in request["cases"]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = cli(argv)
            except BaseException:  # noqa: BLE001 - what a user would see as a traceback
                rc = None
                err.write(traceback.format_exc())
        report["results"].append({"argv": argv, "rc": rc, "err": err.getvalue()})
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
