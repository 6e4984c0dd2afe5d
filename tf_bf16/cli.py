"""The ``tf-bf16`` command line: ``tf-bf16 SUBCOMMAND --flag=value ...`` with absl flags.

Each subcommand is a ``Command`` (its flags plus a main function) in ``COMMANDS``; to add one
(``quantize``, ``bench``), write its ``define_flags`` and ``main`` and list it in
``_BUILTIN_COMMANDS``. ``inspect`` summarizes a model, ``convert`` runs the whole pipeline,
``transform`` runs any list of registered passes. Errors become one ``tf-bf16: error: ...`` line on stderr and exit
status 2 (usage) or 1 (anything else); ``--verbose`` adds the traceback and debug logging.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
import types
from typing import Callable, List, Mapping, Optional, Sequence

from absl import flags, logging

PROG = "tf-bf16"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
_VERBOSE_ARGS = frozenset({"--verbose", "--verbose=true", "--verbose=True", "--verbose=1"})
_HELP_ARGS = frozenset({"-h", "--help", "-help", "--helpshort", "--helpfull"})


class UsageError(Exception):
    """The command line itself is wrong (unknown command, missing flag, stray argument)."""


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: ``define_flags(fv)`` declares its flags, ``main(fv)`` runs it -> exit code."""

    name: str
    summary: str
    define_flags: Callable[[flags.FlagValues], None]
    main: Callable[[flags.FlagValues], int]


# --------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------

def define_model_flags(fv: flags.FlagValues) -> None:
    """The flags every model-reading subcommand shares (``tf_bf16.Model`` arguments)."""
    flags.DEFINE_string("input_model", None, "SavedModel dir, frozen .pb/.pbtxt or .keras/.h5 file.",
                        flag_values=fv)
    flags.DEFINE_list("inputs", None, "Input node names (default: from the signature or graph).",
                      flag_values=fv)
    flags.DEFINE_list("outputs", None, "Output tensor names (default: from the signature or graph).",
                      flag_values=fv)
    flags.DEFINE_string("signature", "serving_default", "SavedModel signature key to load.",
                        flag_values=fv)


def load_model_from_flags(fv: flags.FlagValues, conf=None):
    """A ``tf_bf16.Model`` from the shared model flags; ``--input_model`` is required.

    ``--inputs``/``--outputs`` beat the config's ``model.inputs``/``model.outputs`` (``conf``,
    a loaded ``tf_bf16.config.Config``), which beat detection from the model.
    """
    if not fv.input_model:
        raise UsageError("--input_model is required")
    from tf_bf16.model import Model

    inputs = fv.inputs or (conf.model.inputs if conf is not None else None) or None
    outputs = fv.outputs or (conf.model.outputs if conf is not None else None) or None
    return Model(fv.input_model, inputs=inputs, outputs=outputs, signature=fv.signature)


def _define_output_flags(fv: flags.FlagValues) -> None:
    """Flags of the subcommands that write a model: output path, config, report."""
    flags.DEFINE_string("output_model", None, "Output: a directory (SavedModel) or a .pb/.pbtxt file.",
                        flag_values=fv)
    flags.DEFINE_string("config", None, "YAML config in Neural Compressor's layout.", flag_values=fv)
    flags.DEFINE_string("report", None, "Write the conversion report as JSON to this path.", flag_values=fv)


def _save_and_report(fv: flags.FlagValues, optimized) -> None:
    """Save ``optimized`` to ``--output_model``, write ``--report``, print the report table."""
    from tf_bf16.model_io import write_text_atomically
    from tf_bf16.report import format_report

    optimized.save(fv.output_model)
    if fv.report:
        write_text_atomically(fv.report, json.dumps(optimized.report, indent=2, default=str))
    print(format_report(optimized.report))
    for warning in optimized.report.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {fv.output_model}")


def _define_inspect_flags(fv: flags.FlagValues) -> None:
    define_model_flags(fv)
    flags.DEFINE_bool("json", False, "Print the summary as JSON instead of text.", flag_values=fv)


def _inspect_main(fv: flags.FlagValues) -> int:
    """Print the op/dtype histogram, BF16 kernel coverage, inputs and outputs of a model."""
    model = load_model_from_flags(fv)
    from tf_bf16 import inventory

    summary = {"source": fv.input_model, **inventory.summarize(model)}
    print(json.dumps(summary, indent=2) if fv.json else inventory.format_summary(summary))
    return EXIT_OK


INSPECT = Command("inspect", "op/dtype histogram, inputs and outputs, what could run in BF16",
                  _define_inspect_flags, _inspect_main)

# --------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------

def _define_convert_flags(fv: flags.FlagValues) -> None:
    define_model_flags(fv)
    _define_output_flags(fv)
    flags.DEFINE_list("precisions", ["bf16"], "Allowed precisions: bf16 (with fp32 fallback) or fp32.",
                      flag_values=fv)
    flags.DEFINE_string("target", None, "Deployment CPU when it is not this one: spr, cpx or avx512_bf16.",
                        flag_values=fv)
    flags.DEFINE_bool("kernels", False, "Use tf_bf16's fused oneDNN kernel ops (the output then needs "
                      "'import tf_bf16.kernels' to run).", flag_values=fv)


def _convert_main(fv: flags.FlagValues) -> int:
    """Convert --input_model to BF16+FP32, save it, print the report table."""
    if not fv.output_model:
        raise UsageError("--output_model is required")
    from tf_bf16.mixed_precision import MixedPrecision

    converter = MixedPrecision(fv.config, target=fv.target, kernels=fv.kernels)
    converter.precisions = fv.precisions
    converter.model = load_model_from_flags(fv, converter.conf)
    _save_and_report(fv, converter())
    return EXIT_OK


CONVERT = Command("convert", "convert a model to mixed BF16/FP32 and save it", _define_convert_flags, _convert_main)

# --------------------------------------------------------------------------------------
# transform
# --------------------------------------------------------------------------------------

def _define_transform_flags(fv: flags.FlagValues) -> None:
    define_model_flags(fv)
    _define_output_flags(fv)
    flags.DEFINE_list("transforms", None, "Registered passes to run, in order (e.g. strip_unused,remove_identity,"
                      "bf16_convert,fold_casts); an unknown name lists the known ones.", flag_values=fv)


def _transform_main(fv: flags.FlagValues) -> int:
    """Run the named passes on --input_model (like graph_transforms' transform_graph) and save it."""
    if not fv.output_model:
        raise UsageError("--output_model is required")
    if not fv.transforms:
        raise UsageError("--transforms is required: a comma-separated list of pass names")
    from tf_bf16 import pipeline, report as report_lib
    from tf_bf16.mixed_precision import MixedPrecision
    from tf_bf16.transforms import driver

    driver.check_names(fv.transforms)
    converter = MixedPrecision(fv.config)
    model = load_model_from_flags(fv, converter.conf)
    context = pipeline.new_context(converter.plan_for(model))
    graph_def = pipeline.run(model.graph_def, context, tuple(fv.transforms))
    extra = {"transforms": list(fv.transforms), "consts_converted": context.consts_converted}
    if context.functions:
        extra["functions"] = {name: dataclasses.asdict(r) for name, r in context.functions.items()}
    report = report_lib.build_report(model.graph_def, graph_def, context.fp32_reasons(), extra)
    _save_and_report(fv, model.with_graph_def(graph_def, report))
    return EXIT_OK


TRANSFORM = Command("transform", "run a list of registered passes by name and save the result",
                    _define_transform_flags, _transform_main)

_BUILTIN_COMMANDS = (INSPECT, CONVERT, TRANSFORM)
COMMANDS: Mapping[str, Command] = types.MappingProxyType({c.name: c for c in _BUILTIN_COMMANDS})


# --------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------

def usage(commands: Mapping[str, Command] = COMMANDS) -> str:
    """The top-level help text: synopsis plus one line per subcommand."""
    width = max(len(name) for name in commands)
    lines = [f"usage: {PROG} COMMAND [--flag=value ...] [--verbose]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {cmd.summary}" for name, cmd in commands.items()]
    lines += ["", f"Run '{PROG} COMMAND --help' for the flags of one command."]
    return "\n".join(lines)


def _split_command(args: Sequence[str]) -> "tuple[Optional[str], List[str]]":
    """The first positional argument is the subcommand; everything else is its flags."""
    for i, arg in enumerate(args):
        if not arg.startswith("-"):
            return arg, list(args[:i]) + list(args[i + 1:])
    return None, list(args)


def _command_flags(command: Command) -> flags.FlagValues:
    """A fresh FlagValues for one run: the command's flags plus the shared ``--verbose``."""
    fv = flags.FlagValues()
    flags.DEFINE_bool("verbose", False, "Log at debug level and show tracebacks on errors.",
                      flag_values=fv)
    command.define_flags(fv)
    return fv


def _configure_logging(verbose: bool) -> None:
    """Quiet TensorFlow's C++ and Python logs unless ``--verbose`` (or the user set the level)."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.set_verbosity(logging.DEBUG if verbose else logging.WARNING)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _fail(message: str, verbose: bool, code: int) -> int:
    if verbose and sys.exc_info()[0] is not None:
        traceback.print_exc(file=sys.stderr)
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def dispatch(args: Sequence[str], commands: Mapping[str, Command] = COMMANDS) -> int:
    """Run one subcommand from ``args`` (argv without the program name); returns the exit code."""
    from tf_bf16.errors import TfBf16Error

    verbose = any(a in _VERBOSE_ARGS for a in args)
    name, rest = _split_command(args)
    if name is None:
        if any(a in _HELP_ARGS for a in rest):
            print(usage(commands))
            return EXIT_OK
        return _fail(f"no command given; choose one of: {', '.join(commands)}", verbose, EXIT_USAGE)
    if name not in commands:
        return _fail(f"unknown command {name!r}; choose one of: {', '.join(commands)}", verbose, EXIT_USAGE)
    command = commands[name]
    fv = _command_flags(command)
    if any(a in _HELP_ARGS for a in rest):
        print(f"usage: {PROG} {name} [--flag=value ...]\n\n{command.summary}\n\n{fv.get_help()}")
        return EXIT_OK
    _configure_logging(verbose)
    try:
        positional = fv([f"{PROG} {name}"] + rest)[1:]
        if positional:
            raise UsageError(f"unexpected argument(s) {' '.join(positional)}")
        return command.main(fv)
    except (flags.Error, UsageError) as exc:
        return _fail(f"{name}: {_one_line(exc)}", verbose, EXIT_USAGE)
    except TfBf16Error as exc:
        return _fail(_one_line(exc), verbose, EXIT_ERROR)
    except KeyboardInterrupt:
        return _fail("interrupted", verbose, 130)
    except Exception as exc:  # a bug or an unexpected TensorFlow error: still one line
        hint = "" if verbose else " (rerun with --verbose for the traceback)"
        return _fail(f"{type(exc).__name__}: {_one_line(exc)}{hint}", verbose, EXIT_ERROR)


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Console-script entry point (``tf-bf16``): dispatch ``sys.argv[1:]`` and return the exit code."""
    return dispatch(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(run())
