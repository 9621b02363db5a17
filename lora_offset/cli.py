"""`lora-offset <command>`: one subcommand per module; each module owns its arguments.

A command module defines `add_arguments(parser)` and `run(args) -> int`. Modules are imported
only when their command runs, so `lora-offset inspect` does not pay for importing diffusers. A module
with `PARSES_OWN_ARGUMENTS = True` (`kohya`, which takes another program's command line) gets the
words after its name untouched, as `args.arguments`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lora_offset.training.train", "train a LoRA from a TOML config"),
    "kohya": ("lora_offset.tools.kohya", "train a LoRA from kohya sd-scripts' train_network.py arguments"),
    "inspect": ("lora_offset.tools.inspect", "show a LoRA file's metadata, modules, rank/alpha and loader compatibility"),
    "merge": ("lora_offset.tools.merge", "merge LoRAs into an SD 1.x checkpoint, or into one LoRA"),
    "convert": ("lora_offset.tools.convert", "convert a diffusers/PEFT SD 1.x LoRA to kohya format"),
    "extract": ("lora_offset.tools.extract", "extract a LoRA from the difference of two SD 1.x checkpoints"),
    "resize": ("lora_offset.tools.resize", "shrink a LoRA's rank by SVD (fixed, or per module as kohya's resize_lora.py)"),
    "eval": ("lora_offset.experiments.evaluate", "generate images and write a brightness report"),
    "make-dataset": ("lora_offset.experiments.make_dataset", "write a synthetic dataset (solid colours, ...)"),
    "demo": ("lora_offset.experiments.demo", "reproduce the solid-black experiment offline on CPU"),
}
# Commands that load models through transformers / diffusers: their libraries' own progress bars are
# turned off (lora_offset/quiet.py). The others never import those libraries, which takes seconds.
LOADS_MODELS = {"train", "kohya", "merge", "extract", "eval", "demo"}


def build_parser(commands: dict[str, tuple[str, str]] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-offset", description="LoRA trainer for Stable Diffusion 1.x with offset noise")
    from lora_offset import __version__

    parser.add_argument("--version", action="version", version=f"lora-offset {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.own_commands = set()
    for name, (module_name, help_text) in commands.items():
        # A command whose module is not present in this build is simply not offered.
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
        if getattr(module, "PARSES_OWN_ARGUMENTS", False):
            parser.own_commands.add(name)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lora_offset.errors import UserError

    argv = sys.argv[1:] if argv is None else argv
    # Only build the parser of the command asked for: imports stay light for everything else.
    commands = COMMANDS
    if argv and argv[0] in COMMANDS:
        commands = {argv[0]: COMMANDS[argv[0]]}
    parser = build_parser(commands)
    own = bool(argv) and argv[0] in parser.own_commands
    try:
        args = parser.parse_args(argv[:1] if own else argv)
    except SystemExit as e:  # argparse printed the usage and its one `error:` line (or --help, --version)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    if own:
        args.arguments = argv[1:]
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    if args.command in LOADS_MODELS:
        from lora_offset.quiet import disable_library_progress_bars

        disable_library_progress_bars()
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be written, an unreadable file, ...: one line, not a traceback
        from lora_offset.fileio import describe_os_error

        _close_progress_bars()
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted", file=sys.stderr)
        return 130


def _close_progress_bars() -> None:
    """An error raised mid-run would otherwise start on the progress bar's line: finish the bars first."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
