"""The ``fastmae`` command. Each subcommand lives in its own module, imported only when used;
a module provides ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys

from fastmae.atomic_file import check_destination

# name -> (module, one-line help); "bench X" are the subcommands of "bench".
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("fastmae.train.pretrain", "pretrain an MAE (accepts the reference main_pretrain.py flags)"),
    "bench step": ("fastmae.bench.step", "training-step speed: fastmae vs the naive baseline vs reference-style"),
    "bench table2": ("fastmae.bench.table2", "the paper's Table 2 (encoder with/without mask tokens) on this device"),
    "bench data": ("fastmae.data.bench", "img/s of each available data loader"),
    "profile": ("fastmae.bench.profile", "FLOPs, time and memory per component, encoder versus decoder"),
    "kernels compile": ("fastmae.bench.kernel_resources",
                        "compile the Triton kernels for sm_90/sm_80 without a GPU: registers, spills, shared memory"),
    "visualize": ("fastmae.downstream.visualize", "reconstructions as PNG (masked / reconstruction / original)"),
    "linprobe": ("fastmae.downstream.linprobe", "linear probe of a pretrained encoder"),
    "finetune": ("fastmae.downstream.finetune", "fine-tune a pretrained encoder for classification"),
    "export": ("fastmae.downstream.export", "export to timm's ViT (the encoder) or HF transformers' ViTMAE (encoder and decoder)"),
}

GROUP_HELP = {
    "bench": "speed benchmarks: step (training step, fastmae vs baselines), table2 (the paper's Table 2), data (loaders)",
    "kernels": "the Triton kernels: compile (registers, spills and shared memory for sm_90/sm_80, no GPU needed)",
}

# Flags, in any command, that name where it writes: checked before the command does any work.
OUTPUT_FLAGS: dict[str, str] = {
    "output_dir": "folder", "out_dir": "folder", "log_dir": "folder", "json": "file", "plot": "file",
    "output": "either",  # visualize: a PNG; export: a file (timm) or a folder (hf)
}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, unless the help already speaks of its default, there is none
    to say (None), or the flag is a switch (whose default, True or False, would read as whether the
    switch is on: a --no_x switch's True default means x is on)."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser (its ``command_parsers``: every command's own parser) and {the command that runs: its module}."""
    parser = argparse.ArgumentParser(prog="fastmae", description="Fast Masked Autoencoder pretraining.")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    chosen: dict[str, str] = {}
    parsers: dict[str, argparse.ArgumentParser] = {}
    for name, (module, help_text) in COMMANDS.items():
        words = name.split()
        if len(words) == 1:
            sub = top.add_parser(words[0], help=help_text, description=help_text,
                                 formatter_class=DefaultsHelpFormatter)
            selected = argv[:1] == words
        else:
            if words[0] not in groups:
                group_parser = top.add_parser(words[0], help=GROUP_HELP[words[0]], description=GROUP_HELP[words[0]])
                groups[words[0]] = group_parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            sub = groups[words[0]].add_parser(words[1], help=help_text, description=help_text,
                                              formatter_class=DefaultsHelpFormatter)
            selected = argv[:2] == words
        sub.set_defaults(command_name=name)
        parsers[name] = sub
        if selected:  # import only the command that runs, so start-up stays quick
            importlib.import_module(module).add_arguments(sub)
            chosen[name] = module
    parser.command_parsers = parsers
    return parser, chosen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, chosen = build_parser(argv)
    # parse_args would report a subcommand's unknown flags with the top-level usage ("fastmae: error");
    # the subcommand's own usage says which flags that command does take
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.command_parsers[args.command_name].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        for flag, kind in OUTPUT_FLAGS.items():
            if getattr(args, flag, None):
                check_destination(f"--{flag}", getattr(args, flag), kind)
    except ValueError as err:
        print(f"fastmae {args.command_name}: error: {err}", file=sys.stderr)
        return 2
    module = importlib.import_module(chosen[args.command_name])
    try:
        return int(module.run(args) or 0)
    except OSError as err:  # a full disk, a quota, an unreadable file: the system's own words, not a traceback
        print(f"fastmae {args.command_name}: error: {err}", file=sys.stderr)
        return 1
