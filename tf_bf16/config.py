"""The tf_bf16 config: Intel Neural Compressor 1.x YAML layout, validated into frozen dataclasses.

``load_config`` takes a YAML path (read with ``tf.io.gfile``), a mapping, a ``Config`` or
None (all defaults) and returns a ``Config`` tree with every default filled in. Unknown keys
and bad values raise ``ConfigError`` naming the full dotted key (``tuning.exit_policy.timeout``)
and what is allowed, so a typo never silently falls back to a default.

Conventions: a YAML ``null`` means "not given" (the default applies) except where null is
itself a documented value (``mixed_precision.target``, ``tuning.workspace.resume``,
``npz.labels``); YAML booleans are never accepted as numbers; string choices are matched
case-insensitively and stored lower-case (metric names keep their canonical spelling).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
from typing import (Any, Callable, ClassVar, Dict, FrozenSet, Iterable, Iterator, List, Mapping,
                    Optional, Sequence, Set, Tuple, Union)

import yaml

from tf_bf16.errors import ConfigError

FP32 = "fp32"
BF16 = "bf16"

PRECISIONS: Tuple[str, ...] = (BF16, FP32)  # canonical order of normalised precision tuples
FRAMEWORKS: Tuple[str, ...] = ("tensorflow", "tensorflow_itex", "keras")
DEVICES: Tuple[str, ...] = ("cpu",)
TARGETS: Tuple[str, ...] = ("spr", "cpx", "avx512_bf16")
STRATEGIES: Tuple[str, ...] = ("sensitivity", "basic")  # "basic" is INC's name for the same tuner
_STRATEGY_ALIASES: Mapping[str, str] = types.MappingProxyType({"basic": "sensitivity"})
OBJECTIVES: Tuple[str, ...] = ("performance",)
APPROACHES: Tuple[str, ...] = ("post_training_static_quant",)
LAST_BATCH: Tuple[str, ...] = ("rollover", "discard")
DUMMY_DTYPES: Tuple[str, ...] = ("float32", "float64", "float16", "bfloat16", "int8", "uint8",
                                 "int16", "int32", "int64", "bool")
TFRECORD_DTYPES: Tuple[str, ...] = ("float32", "int64", "string")
QUANT_TENSOR_CHOICES: Mapping[str, Tuple[str, ...]] = types.MappingProxyType({
    "dtype": ("int8", "uint8", "bf16", "fp32"),
    "scheme": ("sym", "asym"),
    "granularity": ("per_channel", "per_tensor"),
    "algorithm": ("minmax", "kl"),
})
# Metric name -> its default higher_is_better; keys are the canonical (INC) spellings.
METRICS: Mapping[str, bool] = types.MappingProxyType({"topk": True, "Accuracy": True, "F1": True,
                                                     "MSE": False, "RMSE": False, "MAE": False})

DEFAULT_WORKSPACE = "./tf_bf16_workspace"
DEFAULT_RANDOM_SEED = 1978

Path = Tuple[str, ...]


# --------------------------------------------------------------------------------------
# A read-only mapping
# --------------------------------------------------------------------------------------

class FrozenDict(Mapping[str, Any]):
    """A read-only, hashable dict, so Config values stay immutable yet pickle and deepcopy."""

    __slots__ = ("_data",)

    def __init__(self, data: Union[Mapping[str, Any], Iterable[Tuple[str, Any]]] = ()):
        self._data: Dict[str, Any] = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and self._data == dict(other.items())

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"

    def __reduce__(self) -> Tuple[Any, ...]:
        return (FrozenDict, (self._data,))


# --------------------------------------------------------------------------------------
# The Config tree
# --------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """``value`` as plain YAML-able data (dicts, lists, scalars), the inverse of parsing."""
    if isinstance(value, _Section):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class _Section:
    """Mixin for config dataclasses: ``to_dict`` emits the YAML layout the section was read from."""

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dicts/lists that ``load_config`` turns back into an equal object."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    """``model:`` graph identity; empty inputs/outputs mean "detect from the model"."""

    name: Optional[str] = None
    framework: str = "tensorflow"
    inputs: Tuple[str, ...] = ()
    outputs: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DtypeOverride(_Section):
    """One ``op_wise``/``op_type_wise`` entry: the dtypes its activation and weight may take."""

    activation: Optional[Tuple[str, ...]] = None
    weight: Optional[Tuple[str, ...]] = None

    def to_dict(self) -> Dict[str, Any]:
        return {part: {"dtype": list(dtypes)} for part, dtypes in
                (("activation", self.activation), ("weight", self.weight)) if dtypes is not None}

    def forced_precision(self) -> Optional[str]:
        """The one precision a given dtype list allows ("fp32" or "bf16"); None when both are allowed."""
        only = _sole_dtypes((self.activation, self.weight))
        return only.pop() if len(only) == 1 else None


@dataclasses.dataclass(frozen=True)
class MixedPrecisionConfig(_Section):
    """``mixed_precision:`` allowed precisions (always incl. fp32 fallback), target CPU, overrides."""

    precisions: Tuple[str, ...] = (BF16, FP32)
    target: Optional[str] = None
    op_wise: Mapping[str, DtypeOverride] = dataclasses.field(default_factory=FrozenDict)
    op_type_wise: Mapping[str, DtypeOverride] = dataclasses.field(default_factory=FrozenDict)

    def node_precisions(self) -> Dict[str, str]:
        """Node name -> forced "fp32"/"bf16" from ``op_wise``; entries allowing both are omitted."""
        return _forced(self.op_wise)

    def op_type_precisions(self) -> Dict[str, str]:
        """Op type -> forced "fp32"/"bf16" from ``op_type_wise``; entries allowing both are omitted."""
        return _forced(self.op_type_wise)


# The error for an op-wise entry whose activation and weight each allow one, different, precision.
_DTYPE_CONFLICT = ("activation and weight dtypes conflict (one allows only fp32, the other only bf16); "
                   "a node runs in one precision")


def _sole_dtypes(dtype_lists: Iterable[Optional[Sequence[str]]]) -> Set[str]:
    """The dtypes that are the only entry of their list: what an override forces."""
    return {dtypes[0] for dtypes in dtype_lists if dtypes is not None and len(dtypes) == 1}


def _forced(overrides: Mapping[str, DtypeOverride]) -> Dict[str, str]:
    forced = {name: o.forced_precision() for name, o in overrides.items()}
    return {name: p for name, p in forced.items() if p is not None}


@dataclasses.dataclass(frozen=True)
class TensorQuantConfig(_Section):
    """INT8 options for activations or weights (each a tuple of allowed values; None = any)."""

    dtype: Optional[Tuple[str, ...]] = None
    scheme: Optional[Tuple[str, ...]] = None
    granularity: Optional[Tuple[str, ...]] = None
    algorithm: Optional[Tuple[str, ...]] = None

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if v is not None}


@dataclasses.dataclass(frozen=True)
class QuantOverride(_Section):
    """``quantization.model_wise`` or one ``quantization.op_wise`` entry."""

    activation: Optional[TensorQuantConfig] = None
    weight: Optional[TensorQuantConfig] = None

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if v is not None}


@dataclasses.dataclass(frozen=True)
class DummyDatasetConfig(_Section):
    """Random data; per input: shape (first dim = number of samples, as in INC), range, dtype."""

    kind: ClassVar[str] = "dummy"
    shape: Tuple[Tuple[int, ...], ...]
    low: Tuple[float, ...]
    high: Tuple[float, ...]
    dtype: Tuple[str, ...]
    label: bool = False
    label_shape: Tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class NpzDatasetConfig(_Section):
    """Arrays from a ``.npz`` file: ``inputs`` keys feed the model, ``labels`` key (None = no labels)."""

    kind: ClassVar[str] = "npz"
    path: str
    inputs: Tuple[str, ...] = ("x",)
    labels: Optional[str] = "y"


@dataclasses.dataclass(frozen=True)
class TFRecordFeature(_Section):
    """One fixed-length tf.train.Example feature."""

    shape: Tuple[int, ...] = ()
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class TFRecordDatasetConfig(_Section):
    """tf.train.Example records: files (paths or globs), feature specs, model inputs and label."""

    kind: ClassVar[str] = "tfrecord"
    path: Tuple[str, ...]
    features: Mapping[str, TFRecordFeature]
    inputs: Tuple[str, ...]
    label: Optional[str] = None


DatasetConfig = Union[DummyDatasetConfig, NpzDatasetConfig, TFRecordDatasetConfig]


@dataclasses.dataclass(frozen=True)
class DataLoaderConfig(_Section):
    """A dataloader-spec; ``dataset`` None means the dataset is supplied in code."""

    batch_size: int = 1
    last_batch: str = "rollover"
    shuffle: bool = False
    dataset: Optional[DatasetConfig] = None

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        out["dataset"] = None if self.dataset is None else {self.dataset.kind: self.dataset.to_dict()}
        return out


@dataclasses.dataclass(frozen=True)
class MetricConfig(_Section):
    """One metric: canonical ``name`` (see METRICS), ``k`` for topk, resolved ``higher_is_better``."""

    name: str
    k: Optional[int] = None
    higher_is_better: bool = True

    def to_dict(self) -> Dict[str, Any]:
        return {self.name: self.k if self.name == "topk" else {}, "higher_is_better": self.higher_is_better}


@dataclasses.dataclass(frozen=True)
class AccuracyConfig(_Section):
    """``evaluation.accuracy``; metric/dataloader None means they are supplied in code."""

    metric: Optional[MetricConfig] = None
    dataloader: Optional[DataLoaderConfig] = None
    postprocess: Optional[Mapping[str, Any]] = None


@dataclasses.dataclass(frozen=True)
class PerformanceRunConfig(_Section):
    """``evaluation.performance.configs``: how benchmark instances are laid out on cores."""

    cores_per_instance: Optional[int] = None
    num_of_instance: int = 1
    inter_num_of_threads: Optional[int] = None
    intra_num_of_threads: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class PerformanceConfig(_Section):
    """``evaluation.performance``; ``iteration`` -1 means the whole dataloader."""

    iteration: int = -1
    warmup: int = 5
    configs: PerformanceRunConfig = dataclasses.field(default_factory=PerformanceRunConfig)
    dataloader: Optional[DataLoaderConfig] = None


@dataclasses.dataclass(frozen=True)
class EvaluationConfig(_Section):
    """``evaluation:``; a section left out is None."""

    accuracy: Optional[AccuracyConfig] = None
    performance: Optional[PerformanceConfig] = None


@dataclasses.dataclass(frozen=True)
class CalibrationConfig(_Section):
    """``quantization.calibration``: candidate sample counts and the calibration data."""

    sampling_size: Tuple[int, ...] = (100,)
    dataloader: Optional[DataLoaderConfig] = None


@dataclasses.dataclass(frozen=True)
class QuantizationConfig(_Section):
    """``quantization:``. Its ``fp32``/``bf16`` dtype overrides act on MixedPrecision now (as in
    Neural Compressor); INT8 dtypes, approach and calibration are for the INT8 stage."""

    approach: str = "post_training_static_quant"
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    model_wise: QuantOverride = dataclasses.field(default_factory=QuantOverride)
    op_wise: Mapping[str, QuantOverride] = dataclasses.field(default_factory=FrozenDict)

    def node_precisions(self) -> Dict[str, str]:
        """Node name -> forced "fp32"/"bf16" from ``op_wise``; refuses INT8 dtypes (no INT8 stage yet)."""
        forced = {}
        for name, override in self.op_wise.items():
            precision = _forced_without_int8(override, ("quantization", "op_wise", name))
            if precision is not None:
                forced[name] = precision
        return forced

    def model_precision(self) -> Optional[str]:
        """The one precision ``model_wise`` allows every node ("fp32" or "bf16"), or None."""
        return _forced_without_int8(self.model_wise, ("quantization", "model_wise"))


def _forced_without_int8(override: QuantOverride, path: Path) -> Optional[str]:
    """The single float precision an override's dtype lists allow; ConfigError for INT8 dtypes."""
    lists = {part: getattr(override, part).dtype for part in ("activation", "weight")
             if getattr(override, part) is not None}
    for part, dtypes in lists.items():
        int8 = [d for d in dtypes or () if d not in PRECISIONS]
        if int8:
            raise _fail(path + (part, "dtype"), f"{', '.join(int8)} needs tf_bf16's INT8 stage, which this version "
                                                f"does not have yet; allowed here: {', '.join(PRECISIONS)}")
    only = _sole_dtypes(lists.values())
    if len(only) > 1:
        raise _fail(path, _DTYPE_CONFLICT)
    return only.pop() if only else None


@dataclasses.dataclass(frozen=True)
class StrategyConfig(_Section):
    """``tuning.strategy``; "basic" (INC's name) is stored as "sensitivity", the one tuner."""

    name: str = "sensitivity"


@dataclasses.dataclass(frozen=True)
class AccuracyCriterion(_Section):
    """``tuning.accuracy_criterion``: ``criterion`` is "relative" or "absolute", with its loss."""

    criterion: str = "relative"
    tolerable_loss: float = 0.01
    higher_is_better: bool = True

    def to_dict(self) -> Dict[str, Any]:
        return {self.criterion: self.tolerable_loss, "higher_is_better": self.higher_is_better}


@dataclasses.dataclass(frozen=True)
class ExitPolicy(_Section):
    """``tuning.exit_policy``: seconds for the whole search (0 = no limit: it ends when no node can go back), trial cap."""

    timeout: float = 0.0
    max_trials: int = 100
    performance_only: bool = False


@dataclasses.dataclass(frozen=True)
class WorkspaceConfig(_Section):
    """``tuning.workspace``: where tuning history goes and which history to resume from."""

    path: str = DEFAULT_WORKSPACE
    resume: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class TuningConfig(_Section):
    """``tuning:`` accuracy-aware fallback settings."""

    strategy: StrategyConfig = dataclasses.field(default_factory=StrategyConfig)
    accuracy_criterion: AccuracyCriterion = dataclasses.field(default_factory=AccuracyCriterion)
    objective: str = "performance"
    exit_policy: ExitPolicy = dataclasses.field(default_factory=ExitPolicy)
    random_seed: int = DEFAULT_RANDOM_SEED
    workspace: WorkspaceConfig = dataclasses.field(default_factory=WorkspaceConfig)


@dataclasses.dataclass(frozen=True)
class Config(_Section):
    """A validated config with defaults filled in; ``quantization`` None means no INT8 stage."""

    version: Optional[float] = None
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    device: str = "cpu"
    mixed_precision: MixedPrecisionConfig = dataclasses.field(default_factory=MixedPrecisionConfig)
    quantization: Optional[QuantizationConfig] = None
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    tuning: TuningConfig = dataclasses.field(default_factory=TuningConfig)

    def node_precisions(self) -> Dict[str, str]:
        """Node name -> forced "fp32"/"bf16" from ``mixed_precision.op_wise`` and ``quantization.op_wise``.

        Raises ConfigError when the two sections force one node to different precisions, or
        when ``quantization`` asks for INT8.
        """
        forced = self.mixed_precision.node_precisions()
        if self.quantization is not None:
            for name, precision in self.quantization.node_precisions().items():
                if forced.get(name, precision) != precision:
                    raise ConfigError(f"config keys 'mixed_precision.op_wise.{name}' ({forced[name]}) and "
                                      f"'quantization.op_wise.{name}' ({precision}) disagree; give one of them")
                forced[name] = precision
        return forced

    def effective_precisions(self) -> Tuple[str, ...]:
        """``mixed_precision.precisions``, narrowed to fp32 when ``quantization.model_wise`` allows only fp32."""
        model = self.quantization.model_precision() if self.quantization is not None else None
        if model == FP32:
            return (FP32,)
        if model == BF16 and BF16 not in self.mixed_precision.precisions:
            raise ConfigError("config key 'quantization.model_wise' allows only bf16, but "
                              "'mixed_precision.precisions' excludes bf16; make them agree")
        return self.mixed_precision.precisions

    def op_type_precisions(self) -> Dict[str, str]:
        """Op type -> forced "fp32"/"bf16" (``mixed_precision.op_type_wise``)."""
        return self.mixed_precision.op_type_precisions()

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        if self.version is None:
            del out["version"]
        return out

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Config":
        """A new validated Config with ``overrides`` (dotted keys or nested mappings) merged in.

        Setting one key of an exactly-one-of group (``relative``/``absolute``, a dataset kind,
        a metric name) drops its siblings, so e.g. ``{"tuning.accuracy_criterion.absolute": 0.1}``
        replaces the relative criterion instead of conflicting with it.
        """
        merged = self.to_dict()
        for key, value in overrides.items():
            parts = str(key).split(".")
            node = merged
            for part in parts[:-1]:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = node[part] = {}
                node = child
            _merge_into(node, parts[-1], value)
        return load_config(merged)


# Keys of which a mapping holds exactly one; setting one by override removes the others.
_EXCLUSIVE_GROUPS: Tuple[FrozenSet[str], ...] = (
    frozenset({"relative", "absolute"}),
    frozenset({"dummy", "npz", "tfrecord"}),
    frozenset(name.lower() for name in METRICS),
)


def _merge_into(node: Dict[str, Any], key: str, value: Any) -> None:
    """Set ``node[key] = value``, merging mappings deeply and honouring exclusive groups."""
    for group in _EXCLUSIVE_GROUPS:
        if key.lower() in group:
            for other in [k for k in node if isinstance(k, str) and k.lower() in group and k != key]:
                del node[other]
    current = node.get(key)
    if isinstance(value, Mapping) and isinstance(current, dict):
        for sub_key, sub_value in value.items():
            _merge_into(current, sub_key, sub_value)
    else:
        node[key] = _plain(value)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

ConfigSource = Union[None, str, "os.PathLike[str]", Mapping[str, Any], Config]


def load_config(source: ConfigSource = None) -> Config:
    """A validated ``Config`` from a YAML path, a mapping, a Config (returned as is) or None (defaults)."""
    if isinstance(source, Config):
        return source
    if source is None:
        return _parse_config({})
    if isinstance(source, Mapping):
        return _parse_config(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        raw = read_yaml(path)
        try:
            return _parse_config(raw)
        except ConfigError as e:
            raise ConfigError(f"{e} (in config file '{path}')") from e
    raise ConfigError(f"config source must be a YAML file path, a mapping, a Config or None, "
                      f"got {type(source).__name__}")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: let SafeLoader report it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str) -> Dict[str, Any]:
    """The top-level mapping of a YAML file read via ``tf.io.gfile`` (local, gs://, hdfs://...)."""
    import tensorflow as tf  # lazy: keeps ``import tf_bf16.config`` cheap

    if not tf.io.gfile.exists(path):
        raise ConfigError(f"config file '{path}' does not exist")
    if tf.io.gfile.isdir(path):
        raise ConfigError(f"config file '{path}' is a directory, not a YAML file")
    try:
        with tf.io.gfile.GFile(path, "r") as f:
            text = f.read()
    except (tf.errors.OpError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e}") from e
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = "; ".join(p for p in (e.context, e.problem) if p)
        raise ConfigError(f"config file '{path}'{where}: invalid YAML: {problem}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}': invalid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file '{path}': the top level must be a mapping of config keys, "
                          f"got {type(data).__name__}")
    return dict(data)


# --------------------------------------------------------------------------------------
# Value checks (each takes the value and its dotted key path)
# --------------------------------------------------------------------------------------

def _dotted(path: Path) -> str:
    out = ""
    for part in path:
        out += part if part.startswith("[") or not out else "." + part
    return out


def _fail(path: Path, message: str) -> ConfigError:
    return ConfigError(f"config key '{_dotted(path)}': {message}")


def _got(value: Any) -> str:
    """``value`` for an error message: repr plus its type, and a hint for YAML's 1e-2 gotcha."""
    text = f"got {value!r} ({type(value).__name__})"
    if isinstance(value, str):
        try:
            float(value)
            text += "; a quoted number, or YAML 1.1 exponent syntax like 1e-2 (write 1.0e-2), is a string"
        except ValueError:
            pass
    return text


def _section(value: Any, path: Path, allowed: Iterable[str]) -> Mapping[str, Any]:
    """``value`` as a mapping whose keys are all in ``allowed`` (null means empty)."""
    allowed = sorted(allowed)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(path, f"expected a mapping with keys {', '.join(allowed)}; {_got(value)}")
    for key in value:
        if not isinstance(key, str) or key not in allowed:
            raise ConfigError(f"unknown config key '{_dotted(path + (str(key),))}'; "
                              f"allowed keys: {', '.join(allowed)}")
    return value


def _named_entries(value: Any, path: Path, what: str) -> Mapping[str, Any]:
    """A mapping keyed by user-chosen names (node names, op types, features)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(path, f"expected a mapping of {what} to settings; {_got(value)}")
    for key in value:
        if not isinstance(key, str) or not key.strip():
            raise _fail(path, f"expected {what} (non-empty strings) as keys, got key {key!r}")
    return value


def _bool(value: Any, path: Path) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, f"expected true or false; {_got(value)}")
    return value


def _int(value: Any, path: Path, minimum: Optional[int] = None, also: Sequence[int] = (),
         maximum: Optional[int] = None) -> int:
    if (not isinstance(value, int) or isinstance(value, bool)
            or not ((minimum is None or value >= minimum) and (maximum is None or value <= maximum)
                    or value in also)):
        bounds = [f">= {minimum}"] if minimum is not None else []
        bounds += [f"<= {maximum}"] if maximum is not None else []
        expected = "an integer" + (" " + " and ".join(bounds) if bounds else "")
        expected += "".join(f" or {a}" for a in also)
        raise _fail(path, f"expected {expected}; {_got(value)}")
    return value


def _number(value: Any, path: Path, minimum: Optional[float] = None,
            below: Optional[float] = None) -> float:
    """A finite int/float in [minimum, below)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (below is None or value < below)
    if not ok:
        bounds = [f">= {minimum}"] if minimum is not None else []
        bounds += [f"< {below}"] if below is not None else []
        expected = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        raise _fail(path, f"expected {expected}; {_got(value)}")
    return float(value)


def _str(value: Any, path: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, f"expected a non-empty string; {_got(value)}")
    return value.strip()


def _choice(value: Any, path: Path, choices: Sequence[str]) -> str:
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    shown = repr(value) if isinstance(value, str) else _got(value)
    raise _fail(path, f"{shown} is not allowed; allowed values: {', '.join(choices)}")


def _list(value: Any, path: Path) -> List[Any]:
    """A scalar becomes a one-item list; a list must be non-empty."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise _fail(path, "expected at least one value, got an empty list")
    return items


def _choices(value: Any, path: Path, choices: Sequence[str]) -> Tuple[str, ...]:
    """A string or list of strings from ``choices``, deduplicated, in the order given."""
    if isinstance(value, (list, tuple)):
        items = [_choice(v, path + (f"[{i}]",), choices) for i, v in enumerate(_list(value, path))]
    else:
        items = [_choice(value, path, choices)]
    return tuple(dict.fromkeys(items))


def _names(value: Any, path: Path, split_commas: bool = False) -> Tuple[str, ...]:
    """Names from a string ("a, b" split when ``split_commas``) or a list of non-empty strings."""
    if isinstance(value, str):
        parts = value.split(",") if split_commas else [value]
        names = [p.strip() for p in parts if p.strip()]
        if not names and not split_commas:
            raise _fail(path, f"expected a non-empty string; {_got(value)}")
        return tuple(names)
    if isinstance(value, (list, tuple)):
        return tuple(_str(v, path + (f"[{i}]",)) for i, v in enumerate(value))
    raise _fail(path, f"expected a string or a list of strings; {_got(value)}")


def _get(raw: Mapping[str, Any], key: str, path: Path, check: Callable[[Any, Path], Any],
         default: Any = None) -> Any:
    """``check(raw[key])``, or ``default`` when the key is absent or null."""
    value = raw.get(key)
    return default if value is None else check(value, path + (key,))


def _freeze(value: Any) -> Any:
    """Deep read-only copy of free-form YAML data (lists -> tuples, dicts -> FrozenDict)."""
    if isinstance(value, Mapping):
        return FrozenDict((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


# --------------------------------------------------------------------------------------
# Section parsers
# --------------------------------------------------------------------------------------

_TOP_KEYS = ("version", "model", "device", "use_bf16", "mixed_precision", "graph_optimization",
             "quantization", "evaluation", "tuning")


def _parse_config(raw: Any) -> Config:
    path: Path = ()
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"config must be a mapping of config keys, {_got(raw)}")
    raw = _section(raw, path, _TOP_KEYS)
    quantization = raw.get("quantization")
    return Config(
        version=_get(raw, "version", path, lambda v, p: _number(v, p, minimum=0)),
        model=_parse_model(raw.get("model"), ("model",)),
        device=_get(raw, "device", path, lambda v, p: _choice(v, p, DEVICES), "cpu"),
        mixed_precision=_parse_mixed_precision(raw),
        quantization=None if quantization is None else _parse_quantization(quantization, ("quantization",)),
        evaluation=_parse_evaluation(raw.get("evaluation"), ("evaluation",)),
        tuning=_parse_tuning(raw.get("tuning"), ("tuning",)),
    )


def _parse_model(raw: Any, path: Path) -> ModelConfig:
    raw = _section(raw, path, ("name", "framework", "inputs", "outputs"))
    io_names = lambda v, p: _names(v, p, split_commas=True)  # noqa: E731
    return ModelConfig(
        name=_get(raw, "name", path, _str),
        framework=_get(raw, "framework", path, lambda v, p: _choice(v, p, FRAMEWORKS), "tensorflow"),
        inputs=_get(raw, "inputs", path, io_names, ()),
        outputs=_get(raw, "outputs", path, io_names, ()),
    )


def _precisions(value: Any, path: Path) -> Tuple[str, ...]:
    """Allowed precisions in canonical order; fp32 is always added (it is the fallback)."""
    given = set(_choices(value, path, PRECISIONS)) | {FP32}
    return tuple(p for p in PRECISIONS if p in given)


def _parse_mixed_precision(top: Mapping[str, Any]) -> MixedPrecisionConfig:
    path: Path = ("mixed_precision",)
    raw = _section(top.get("mixed_precision"), path, ("precisions", "target", "op_wise", "op_type_wise"))
    alias_path: Path = ("graph_optimization",)
    alias = _section(top.get("graph_optimization"), alias_path, ("precisions",))

    precisions = _get(raw, "precisions", path, _precisions)
    alias_precisions = _get(alias, "precisions", alias_path, _precisions)
    if precisions is not None and alias_precisions is not None and precisions != alias_precisions:
        raise ConfigError(f"config keys 'mixed_precision.precisions' ({', '.join(precisions)}) and "
                          f"'graph_optimization.precisions' ({', '.join(alias_precisions)}) disagree; "
                          f"give one of them (graph_optimization is the INC 1.x alias)")
    precisions = precisions or alias_precisions
    use_bf16 = _get(top, "use_bf16", (), _bool)
    if use_bf16 is not None and precisions is not None and (BF16 in precisions) != use_bf16:
        raise ConfigError(f"config key 'use_bf16' ({str(use_bf16).lower()}) contradicts the precisions "
                          f"given ({', '.join(precisions)}); drop use_bf16 or make them agree")
    if precisions is None:
        precisions = (FP32,) if use_bf16 is False else (BF16, FP32)

    op_wise = _parse_dtype_overrides(raw.get("op_wise"), path + ("op_wise",), "node names", precisions)
    op_type_wise = _parse_dtype_overrides(raw.get("op_type_wise"), path + ("op_type_wise",), "op types",
                                          precisions)
    return MixedPrecisionConfig(
        precisions=precisions,
        target=_get(raw, "target", path, lambda v, p: _choice(v, p, TARGETS)),
        op_wise=op_wise,
        op_type_wise=op_type_wise,
    )


def _parse_dtype_overrides(raw: Any, path: Path, what: str,
                           precisions: Tuple[str, ...]) -> Mapping[str, DtypeOverride]:
    entries = {}
    for name, entry in _named_entries(raw, path, what).items():
        entry_path = path + (name,)
        entry = _section(entry, entry_path, ("activation", "weight"))
        parts: Dict[str, Optional[Tuple[str, ...]]] = {}
        for part in ("activation", "weight"):
            part_path = entry_path + (part,)
            spec = _section(entry.get(part), part_path, ("dtype",))
            parts[part] = _get(spec, "dtype", part_path, lambda v, p: _choices(v, p, PRECISIONS))
            for dtype in parts[part] or ():
                if dtype not in precisions:
                    raise _fail(part_path + ("dtype",), f"{dtype!r} is not among mixed_precision.precisions "
                                                        f"({', '.join(precisions)})")
        override = DtypeOverride(**parts)
        if len(_sole_dtypes(parts.values())) > 1:
            raise _fail(entry_path, _DTYPE_CONFLICT)
        entries[name] = override
    return FrozenDict(entries)


def _parse_quantization(raw: Any, path: Path) -> QuantizationConfig:
    raw = _section(raw, path, ("approach", "calibration", "model_wise", "op_wise"))
    cal_path = path + ("calibration",)
    cal = _section(raw.get("calibration"), cal_path, ("sampling_size", "dataloader"))
    sizes = _get(cal, "sampling_size", cal_path, _positive_ints, (100,))
    op_wise = {name: _parse_quant_override(entry, path + ("op_wise", name))
               for name, entry in _named_entries(raw.get("op_wise"), path + ("op_wise",), "node names").items()}
    return QuantizationConfig(
        approach=_get(raw, "approach", path, lambda v, p: _choice(v, p, APPROACHES), APPROACHES[0]),
        calibration=CalibrationConfig(
            sampling_size=sizes,
            dataloader=_get(cal, "dataloader", cal_path, _parse_dataloader)),
        model_wise=_parse_quant_override(raw.get("model_wise"), path + ("model_wise",)),
        op_wise=FrozenDict(op_wise),
    )


def _positive_ints(value: Any, path: Path) -> Tuple[int, ...]:
    """An int >= 1 or a non-empty list of them."""
    if isinstance(value, (list, tuple)):
        return tuple(_int(v, path + (f"[{i}]",), minimum=1) for i, v in enumerate(_list(value, path)))
    return (_int(value, path, minimum=1),)


def _parse_quant_override(raw: Any, path: Path) -> QuantOverride:
    raw = _section(raw, path, ("activation", "weight"))
    parts = {}
    for part in ("activation", "weight"):
        if raw.get(part) is None:
            continue
        part_path = path + (part,)
        spec = _section(raw[part], part_path, QUANT_TENSOR_CHOICES)
        parts[part] = TensorQuantConfig(**{
            key: _get(spec, key, part_path, lambda v, p, c=choices: _choices(v, p, c))
            for key, choices in QUANT_TENSOR_CHOICES.items()})
    return QuantOverride(**parts)


def _parse_dataloader(raw: Any, path: Path) -> DataLoaderConfig:
    raw = _section(raw, path, ("batch_size", "last_batch", "shuffle", "dataset"))
    return DataLoaderConfig(
        batch_size=_get(raw, "batch_size", path, lambda v, p: _int(v, p, minimum=1), 1),
        last_batch=_get(raw, "last_batch", path, lambda v, p: _choice(v, p, LAST_BATCH), "rollover"),
        shuffle=_get(raw, "shuffle", path, _bool, False),
        dataset=_get(raw, "dataset", path, _parse_dataset),
    )


def _parse_dataset(raw: Any, path: Path) -> DatasetConfig:
    raw = _section(raw, path, _DATASET_KINDS)
    given = [k for k in _DATASET_KINDS if k in raw]
    if len(given) != 1:
        raise _fail(path, f"give exactly one dataset kind of {', '.join(_DATASET_KINDS)}, "
                          f"got {', '.join(given) if given else 'none'}")
    kind = given[0]
    return _DATASET_PARSERS[kind](raw[kind], path + (kind,))


def _shapes(value: Any, path: Path) -> Tuple[Tuple[int, ...], ...]:
    """A list of ints (one input) or a list of lists of ints (one per input)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(path, f"expected a list of positive ints or a list of such lists; {_got(value)}")
    if all(isinstance(v, (list, tuple)) for v in value):
        return tuple(_dims(v, path + (f"[{i}]",), minimum=1, allow_empty=False) for i, v in enumerate(value))
    return (_dims(value, path, minimum=1, allow_empty=False),)


def _dims(value: Any, path: Path, minimum: int, allow_empty: bool = True) -> Tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or (not value and not allow_empty):
        raise _fail(path, f"expected a {'' if allow_empty else 'non-empty '}list of integers >= {minimum}; "
                          f"{_got(value)}")
    return tuple(_int(d, path + (f"[{i}]",), minimum=minimum) for i, d in enumerate(value))


def _per_input(value: Any, path: Path, count: int, check: Callable[[Any, Path], Any]) -> Tuple[Any, ...]:
    """One value per input: a scalar is repeated, a list must have ``count`` items."""
    if not isinstance(value, (list, tuple)):
        return (check(value, path),) * count
    if len(value) != count:
        raise _fail(path, f"expected one value or a list of {count} (one per shape), got {len(value)} values")
    return tuple(check(v, path + (f"[{i}]",)) for i, v in enumerate(value))


def _parse_dummy(raw: Any, path: Path) -> DummyDatasetConfig:
    raw = _section(raw, path, ("shape", "low", "high", "dtype", "label", "label_shape"))
    if raw.get("shape") is None:
        raise _fail(path + ("shape",), "is required: a list of ints, or a list of such lists (one per input)")
    shape = _shapes(raw["shape"], path + ("shape",))
    n = len(shape)
    low = _get(raw, "low", path, lambda v, p: _per_input(v, p, n, _number), (0.0,) * n)
    high = _get(raw, "high", path, lambda v, p: _per_input(v, p, n, _number), (1.0,) * n)
    for i, (lo, hi) in enumerate(zip(low, high)):
        if lo > hi:
            raise _fail(path + ("low",), f"low ({lo}) exceeds high ({hi}) for input {i}")
    return DummyDatasetConfig(
        shape=shape, low=low, high=high,
        dtype=_get(raw, "dtype", path, lambda v, p: _per_input(v, p, n, lambda x, q: _choice(x, q, DUMMY_DTYPES)),
                   ("float32",) * n),
        label=_get(raw, "label", path, _bool, False),
        label_shape=_get(raw, "label_shape", path, lambda v, p: _dims(v, p, minimum=1), ()),
    )


def _parse_npz(raw: Any, path: Path) -> NpzDatasetConfig:
    raw = _section(raw, path, ("path", "inputs", "labels"))
    if raw.get("path") is None:
        raise _fail(path + ("path",), "is required: the .npz file to read")
    return NpzDatasetConfig(
        path=_str(raw["path"], path + ("path",)),
        inputs=_get(raw, "inputs", path, _names, ("x",)),
        labels=_str(raw["labels"], path + ("labels",)) if raw.get("labels") is not None
        else (None if "labels" in raw else "y"),
    )


def _parse_tfrecord(raw: Any, path: Path) -> TFRecordDatasetConfig:
    raw = _section(raw, path, ("path", "features", "inputs", "label"))
    for key in ("path", "features"):
        if raw.get(key) is None:
            raise _fail(path + (key,), "is required")
    files = _names(raw["path"], path + ("path",))
    if not files:
        raise _fail(path + ("path",), "expected at least one file path or glob, got an empty list")
    feat_path = path + ("features",)
    features = {}
    for name, spec in _named_entries(raw["features"], feat_path, "feature names").items():
        spec_path = feat_path + (name,)
        spec = _section(spec, spec_path, ("shape", "dtype"))
        if spec.get("dtype") is None:
            raise _fail(spec_path + ("dtype",), f"is required; allowed values: {', '.join(TFRECORD_DTYPES)}")
        features[name] = TFRecordFeature(
            shape=_get(spec, "shape", spec_path, lambda v, p: _dims(v, p, minimum=1), ()),
            dtype=_choice(spec["dtype"], spec_path + ("dtype",), TFRECORD_DTYPES))
    if not features:
        raise _fail(feat_path, "expected at least one feature")

    def feature_name(value: Any, p: Path) -> str:
        return _choice_exact(_str(value, p), p, tuple(features))

    label = _get(raw, "label", path, feature_name)
    inputs = _get(raw, "inputs", path,
                  lambda v, p: tuple(feature_name(n, p + (f"[{i}]",) if isinstance(v, list) else p)
                                     for i, n in enumerate(_list(v, p))),
                  tuple(n for n in features if n != label))
    if not inputs:
        raise _fail(path + ("inputs",), "no feature is left to feed the model (all features are the label)")
    return TFRecordDatasetConfig(path=files, features=FrozenDict(features), inputs=inputs, label=label)


def _choice_exact(value: str, path: Path, choices: Sequence[str]) -> str:
    """Case-sensitive membership (for user-defined names such as feature names)."""
    if value not in choices:
        raise _fail(path, f"{value!r} is not allowed; allowed values: {', '.join(choices)}")
    return value


_DATASET_PARSERS: Mapping[str, Callable[[Any, Path], DatasetConfig]] = types.MappingProxyType({
    "dummy": _parse_dummy, "npz": _parse_npz, "tfrecord": _parse_tfrecord})
_DATASET_KINDS: Tuple[str, ...] = tuple(_DATASET_PARSERS)


def _parse_metric(raw: Any, path: Path) -> MetricConfig:
    """One metric: a name string, or ``{Name: params}`` plus optional ``higher_is_better``."""
    by_lower = {name.lower(): name for name in METRICS}
    allowed = ", ".join(sorted(METRICS, key=str.lower))
    if isinstance(raw, str):
        raw = {raw: None}
    if not isinstance(raw, Mapping):
        raise _fail(path, f"expected a metric such as {{topk: 1}} or {{MSE: {{}}}}; {_got(raw)}; "
                          f"allowed metrics: {allowed}")
    names = []
    for key in raw:
        if key == "higher_is_better":
            continue
        if not isinstance(key, str) or key.lower() not in by_lower:
            raise _fail(path, f"unknown metric {key!r}; allowed metrics: {allowed} "
                              f"(plus the key higher_is_better)")
        names.append(key)
    if len(names) != 1:
        raise _fail(path, f"give exactly one metric of {allowed}, got {', '.join(names) if names else 'none'}")
    key = names[0]
    name = by_lower[key.lower()]
    value = raw[key]
    k = None
    if name == "topk":
        if isinstance(value, Mapping):
            value = _section(value, path + (key,), ("k",)).get("k")
            k = _int(value, path + (key, "k"), minimum=1)
        else:
            k = _int(value, path + (key,), minimum=1)
    elif value is not None and value != {}:
        raise _fail(path + (key,), f"metric {name} takes no parameters: give {{}} or null; {_got(value)}")
    return MetricConfig(name=name, k=k,
                        higher_is_better=_get(raw, "higher_is_better", path, _bool, METRICS[name]))


def _parse_evaluation(raw: Any, path: Path) -> EvaluationConfig:
    raw = _section(raw, path, ("accuracy", "performance"))
    accuracy = None
    if raw.get("accuracy") is not None:
        acc_path = path + ("accuracy",)
        acc = _section(raw["accuracy"], acc_path, ("metric", "dataloader", "postprocess"))
        accuracy = AccuracyConfig(
            metric=_get(acc, "metric", acc_path, _parse_metric),
            dataloader=_get(acc, "dataloader", acc_path, _parse_dataloader),
            postprocess=_get(acc, "postprocess", acc_path,
                             lambda v, p: _freeze(_named_entries(v, p, "postprocess steps"))),
        )
    performance = None
    if raw.get("performance") is not None:
        perf_path = path + ("performance",)
        perf = _section(raw["performance"], perf_path, ("iteration", "warmup", "configs", "dataloader"))
        cfg_path = perf_path + ("configs",)
        cfg = _section(perf.get("configs"), cfg_path, [f.name for f in dataclasses.fields(PerformanceRunConfig)])
        positive = lambda v, p: _int(v, p, minimum=1)  # noqa: E731
        performance = PerformanceConfig(
            iteration=_get(perf, "iteration", perf_path, lambda v, p: _int(v, p, minimum=1, also=(-1,)), -1),
            warmup=_get(perf, "warmup", perf_path, lambda v, p: _int(v, p, minimum=0), 5),
            configs=PerformanceRunConfig(
                cores_per_instance=_get(cfg, "cores_per_instance", cfg_path, positive),
                num_of_instance=_get(cfg, "num_of_instance", cfg_path, positive, 1),
                inter_num_of_threads=_get(cfg, "inter_num_of_threads", cfg_path, positive),
                intra_num_of_threads=_get(cfg, "intra_num_of_threads", cfg_path, positive),
            ),
            dataloader=_get(perf, "dataloader", perf_path, _parse_dataloader),
        )
    return EvaluationConfig(accuracy=accuracy, performance=performance)


def _parse_tuning(raw: Any, path: Path) -> TuningConfig:
    raw = _section(raw, path, ("strategy", "accuracy_criterion", "objective", "exit_policy",
                               "random_seed", "workspace"))
    strat_path = path + ("strategy",)
    strategy = _section(raw.get("strategy"), strat_path, ("name",))
    exit_path = path + ("exit_policy",)
    exit_policy = _section(raw.get("exit_policy"), exit_path, ("timeout", "max_trials", "performance_only"))
    ws_path = path + ("workspace",)
    workspace = _section(raw.get("workspace"), ws_path, ("path", "resume"))
    name = _get(strategy, "name", strat_path, lambda v, p: _choice(v, p, STRATEGIES), "sensitivity")
    return TuningConfig(
        strategy=StrategyConfig(name=_STRATEGY_ALIASES.get(name, name)),
        accuracy_criterion=_parse_accuracy_criterion(raw.get("accuracy_criterion"), path + ("accuracy_criterion",)),
        objective=_get(raw, "objective", path, lambda v, p: _choice(v, p, OBJECTIVES), "performance"),
        exit_policy=ExitPolicy(
            timeout=_get(exit_policy, "timeout", exit_path, lambda v, p: _number(v, p, minimum=0), 0.0),
            max_trials=_get(exit_policy, "max_trials", exit_path, lambda v, p: _int(v, p, minimum=1), 100),
            performance_only=_get(exit_policy, "performance_only", exit_path, _bool, False),
        ),
        random_seed=_get(raw, "random_seed", path, lambda v, p: _int(v, p, minimum=0, maximum=2**32 - 1),
                         DEFAULT_RANDOM_SEED),
        workspace=WorkspaceConfig(path=_get(workspace, "path", ws_path, _str, DEFAULT_WORKSPACE),
                                  resume=_get(workspace, "resume", ws_path, _str)),
    )


def _parse_accuracy_criterion(raw: Any, path: Path) -> AccuracyCriterion:
    raw = _section(raw, path, ("relative", "absolute", "higher_is_better"))
    higher_is_better = _get(raw, "higher_is_better", path, _bool, True)
    relative = _get(raw, "relative", path, lambda v, p: _number(v, p, minimum=0, below=1))
    absolute = _get(raw, "absolute", path, lambda v, p: _number(v, p, minimum=0))
    if relative is not None and absolute is not None:
        raise _fail(path, "give exactly one of 'relative' or 'absolute', not both")
    if absolute is not None:
        return AccuracyCriterion("absolute", absolute, higher_is_better)
    return AccuracyCriterion("relative", 0.01 if relative is None else relative, higher_is_better)
