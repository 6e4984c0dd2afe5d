"""The ``tf-bf16`` command line: ``tf-bf16 SUBCOMMAND --flag=value ...`` with absl flags.

Each subcommand is a ``Command`` (its flags plus a main function) in ``COMMANDS``; to add one
(``bench``), write its ``define_flags`` and ``main`` and list it in
``_BUILTIN_COMMANDS``. ``inspect`` summarizes a model, ``convert`` runs the whole pipeline,
``quantize`` adds the INT8 stage (calibration data from the YAML config), ``transform`` runs any
list of registered passes. Errors become one ``tf-bf16: error: ...`` line on stderr and exit
status 2 (usage) or 1 (anything else); ``--verbose`` adds the traceback and debug logging.

``run`` (the ``tf-bf16`` script and ``python -m tf_bf16``) also keeps TensorFlow's start-up
quiet: unless ``--verbose``, it sets ``TF_CPP_MIN_LOG_LEVEL=3`` when the user has not set it,
and imports TensorFlow (and lets it probe its devices) with file descriptor 2 sent to a
temporary file, because the CUDA-stub, oneDNN and absl pre-init lines are written there by
C++ at import time whatever the log level. The captured text is replayed if that import
fails. It hides GPUs (``CUDA_VISIBLE_DEVICES=""`` when unset): tf_bf16 converts and
evaluates for CPUs. A command may name variables of its own (``Command.environment``), set the
same way: ``quantize`` sets ``TF_ENABLE_ONEDNN_OPTS=1`` when unset, since TensorFlow runs the
quantized ops only through oneDNN and reads that variable once, at start-up. Those variables are
set for the run only and removed again afterwards; ``dispatch`` and ``import tf_bf16`` never
touch the environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import tempfile
import traceback
import types
from typing import BinaryIO, Callable, ContextManager, Iterator, List, Mapping, Optional, Sequence

from absl import flags, logging

PROG = "tf-bf16"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
_VERBOSE_ARGS = frozenset({"--verbose", "--verbose=true", "--verbose=True", "--verbose=1"})
_HELP_ARGS = frozenset({"-h", "--help", "-help", "--helpshort", "--helpfull"})
# Set for a CLI run when the user has not set them (each silences something TensorFlow's
# start-up writes; see ``quiet_environment``).
_QUIET_ENV: Mapping[str, str] = types.MappingProxyType({
    # C++ logs after start-up: cpu_feature_guard's "optimized to use available CPU
    # instructions" (INFO) and cuda_platform's "failed call to cuInit" (ERROR) lines.
    "TF_CPP_MIN_LOG_LEVEL": "3",
})
_CPU_ONLY_ENV: Mapping[str, str] = types.MappingProxyType({
    # tf_bf16 converts and evaluates for CPUs: no GPU memory taken, no GPU start-up lines.
    "CUDA_VISIBLE_DEVICES": "",
})
_ONEDNN_ENV: Mapping[str, str] = types.MappingProxyType({
    # INT8 graphs: TensorFlow's quantized ops are placeholders its oneDNN layout pass replaces.
    "TF_ENABLE_ONEDNN_OPTS": "1",
})


class UsageError(Exception):
    """The command line itself is wrong (unknown command, missing flag, stray argument)."""


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: ``define_flags(fv)`` declares its flags, ``main(fv)`` runs it -> exit code.

    ``environment``: variables ``run`` sets for this command when the user has not, before
    TensorFlow is imported (``dispatch`` alone leaves the environment as it is).
    """

    name: str
    summary: str
    define_flags: Callable[[flags.FlagValues], None]
    main: Callable[[flags.FlagValues], int]
    environment: Mapping[str, str] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))


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
    _define_target_and_kernel_flags(fv, "Use tf_bf16's fused oneDNN kernel ops")


def _define_target_and_kernel_flags(fv: flags.FlagValues, kernels_help: str) -> None:
    """--target and --kernels, shared by convert and quantize."""
    flags.DEFINE_string("target", None, "Deployment CPU when it is not this one: spr, cpx or avx512_bf16.",
                        flag_values=fv)
    flags.DEFINE_bool("kernels", False, f"{kernels_help} (the output then needs 'import tf_bf16.kernels' to run).",
                      flag_values=fv)


def _convert_main(fv: flags.FlagValues) -> int:
    """Convert --input_model to BF16+FP32, save it, print the report table."""
    if not fv.output_model:
        raise UsageError("--output_model is required")
    from tf_bf16.mixed_precision import MixedPrecision

    converter = MixedPrecision(fv.config, target=fv.target, kernels=fv.kernels)
    converter.precisions = fv.precisions
    converter.model = load_model_from_flags(fv, converter.conf)
    converter.model.check_save_path(fv.output_model)   # e.g. a .pb of a model over 2 GiB: fail before converting
    _save_and_report(fv, converter())
    return EXIT_OK


CONVERT = Command("convert", "convert a model to mixed BF16/FP32 and save it", _define_convert_flags, _convert_main)

# --------------------------------------------------------------------------------------
# quantize
# --------------------------------------------------------------------------------------

def _define_quantize_flags(fv: flags.FlagValues) -> None:
    define_model_flags(fv)
    _define_output_flags(fv)
    flags.DEFINE_list("precisions", None, "Allowed precisions: int8 plus bf16 and/or fp32 (default: from the "
                      "config; fp32 is always the fallback).", flag_values=fv)
    _define_target_and_kernel_flags(fv, "Use tf_bf16's oneDNN kernel ops: INT8 ones for the quantized "
                                        "contractions, fused BF16 ones for the BF16 part")


def _quantize_main(fv: flags.FlagValues) -> int:
    """Quantize --input_model to INT8 + BF16/FP32 with the config's calibration data, save it, print the report."""
    if not fv.output_model:
        raise UsageError("--output_model is required")
    if not fv.config:
        raise UsageError("--config is required: a YAML config whose quantization.calibration.dataloader "
                         "gives the calibration data")
    from tf_bf16.quantization import Quantization

    converter = Quantization(fv.config, target=fv.target, kernels=fv.kernels)
    if fv.precisions:
        converter.precisions = fv.precisions
    converter.model = load_model_from_flags(fv, converter.conf)
    converter.model.check_save_path(fv.output_model)   # e.g. a .pb of a model over 2 GiB: fail before converting
    _save_and_report(fv, converter())
    return EXIT_OK


QUANTIZE = Command("quantize", "quantize a model to INT8 + BF16/FP32 (calibration data from --config) and save it",
                   _define_quantize_flags, _quantize_main, environment=_ONEDNN_ENV)

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
    model.check_save_path(fv.output_model)
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

_BUILTIN_COMMANDS = (INSPECT, CONVERT, QUANTIZE, TRANSFORM)
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
    """tf_bf16's own (absl) logging: debug with ``--verbose``, warnings and errors otherwise."""
    logging.set_verbosity(logging.DEBUG if verbose else logging.WARNING)


# --------------------------------------------------------------------------------------
# TensorFlow start-up (CLI process only)
# --------------------------------------------------------------------------------------

@contextlib.contextmanager
def environment_defaults(defaults: Mapping[str, str]) -> Iterator[None]:
    """Set the variables of ``defaults`` that are unset; remove those again on exit."""
    added = [name for name in defaults if name not in os.environ]
    for name in added:
        os.environ[name] = defaults[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def quiet_environment(verbose: bool) -> ContextManager[None]:
    """The environment of one CLI run: CPU only, and TensorFlow's C++ logs quiet unless verbose."""
    return environment_defaults(_CPU_ONLY_ENV if verbose else {**_QUIET_ENV, **_CPU_ONLY_ENV})


def _temporary_file() -> ContextManager[Optional[BinaryIO]]:
    """An anonymous temporary file, or a context of None when none can be made."""
    try:
        return tempfile.TemporaryFile()
    except OSError:
        return contextlib.nullcontext()


def _redirect_stderr_fd(sink: Optional[BinaryIO]) -> Optional[int]:
    """Point file descriptor 2 at ``sink``; returns the original (duplicated), or None if impossible."""
    if sink is None:
        return None
    try:
        saved = os.dup(2)
    except OSError:  # the process has no stderr
        return None
    sys.stderr.flush()
    os.dup2(sink.fileno(), 2)
    return saved


def _restore_stderr_fd(saved: int) -> None:
    """Point file descriptor 2 back at ``saved`` (from ``_redirect_stderr_fd``) and close that."""
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def _replay(sink: BinaryIO) -> None:
    """Write what was captured in the binary file ``sink`` to ``sys.stderr``."""
    sink.seek(0)
    sys.stderr.write(sink.read().decode("utf-8", errors="replace"))
    sys.stderr.flush()


@contextlib.contextmanager
def stderr_fd_captured() -> Iterator[None]:
    """Send file descriptor 2 (C++ and Python writes alike) to a temporary file for the block.

    The text is dropped when the block succeeds and written back to stderr when it raises.
    Without a temporary file or a descriptor 2 the block runs uncaptured.
    """
    with _temporary_file() as sink:
        saved = _redirect_stderr_fd(sink)
        if saved is None:
            yield
            return
        failed = True
        try:
            yield
            failed = False
        finally:
            _restore_stderr_fd(saved)
            if failed:
                _replay(sink)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and list its devices with fd 2 captured (no-op when already imported)."""
    if "tensorflow" in sys.modules:
        return
    with stderr_fd_captured():
        import tensorflow as tf

        # Device discovery (cuInit and friends) logs from C++ too; do it now, inside the capture.
        tf.config.list_physical_devices()


def _unchanged_process(verbose: bool) -> ContextManager[None]:
    """``dispatch``'s default wrapper: the caller's process, environment and stderr as they are."""
    return contextlib.nullcontext()


@contextlib.contextmanager
def cli_process(verbose: bool, environment: Mapping[str, str] = types.MappingProxyType({})) -> Iterator[None]:
    """What ``run`` wraps a command in: its environment (plus the command's own ``environment``
    defaults) and, unless verbose, a quiet TF start-up."""
    with quiet_environment(verbose), environment_defaults(environment):
        if not verbose:
            import_tensorflow_quietly()
        yield


def command_environment(args: Sequence[str], commands: Mapping[str, Command] = COMMANDS) -> Mapping[str, str]:
    """The ``environment`` of the command ``args`` name (empty for an unknown or missing one)."""
    name, _ = _split_command(args)
    command = commands.get(name) if name is not None else None
    return command.environment if command is not None else types.MappingProxyType({})


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _fail(message: str, verbose: bool, code: int) -> int:
    if verbose and sys.exc_info()[0] is not None:
        traceback.print_exc(file=sys.stderr)
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def dispatch(args: Sequence[str], commands: Mapping[str, Command] = COMMANDS,
             process: Optional[Callable[[bool], ContextManager[None]]] = None) -> int:
    """Run one subcommand from ``args`` (argv without the program name); returns the exit code.

    ``process(verbose)`` wraps the command once its flags parse (``run`` passes ``cli_process``);
    by default nothing is changed around it, so in-process callers keep their environment.
    """
    process = process or _unchanged_process
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
        with process(fv.verbose):
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
    """Console-script entry point (``tf-bf16``): dispatch ``sys.argv[1:]`` and return the exit code.

    The command runs inside ``cli_process``: TensorFlow's start-up is quiet unless ``--verbose``,
    and the command's own environment defaults are set before TensorFlow is imported.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    return dispatch(args, process=functools.partial(cli_process, environment=command_environment(args)))


if __name__ == "__main__":
    sys.exit(run())
