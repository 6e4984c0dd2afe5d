"""The tf_bf16 config: Intel Neural Compressor 1.x YAML layout, validated by pydantic into frozen dataclasses.

``load_config`` takes a YAML path (read with ``tf.io.gfile``), a mapping, a ``Config`` or
None (all defaults) and returns a ``Config`` tree with every default filled in. Unknown keys
and bad values raise ``ConfigError`` naming the full dotted key (``tuning.exit_policy.timeout``),
the value and what is allowed, so a typo never silently falls back to a default.

Each section is a frozen pydantic dataclass whose fields carry the types and the defaults
(written once, on the field). A mapping is read in the YAML layout (a section's
``_from_yaml`` reshapes it where that layout differs from the fields); constructor arguments
are the fields themselves. Conventions: a YAML ``null`` means "not given" (the default
applies) except where null is itself a documented value (``mixed_precision.target``,
``tuning.workspace.resume``, ``npz.labels``); YAML booleans are never accepted as numbers;
string choices are matched case-insensitively and stored lower-case (metric names keep their
canonical spelling); a single value may stand for a one-item list.

A config is a few kB, so reading one is bounded (``ConfigError`` past a limit, before the work
that would blow up): a file holds at most ``MAX_CONFIG_BYTES`` (1 MiB), checked before it is
read; a config (YAML file or mapping) holds at most ``MAX_CONFIG_VALUES`` (100,000) scalars,
lists and mappings, counting a YAML alias or a shared Python object once per use, so an alias
bomb is refused before it is expanded; values nest at most ``MAX_CONFIG_DEPTH`` (32) levels; a
name or path is at most ``MAX_NAME_CHARS`` (4096) characters.
Error messages show user values through ``preview``, cut to a short line however big the value.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import types
from typing import (Annotated, Any, Callable, ClassVar, Dict, FrozenSet, Iterable, Iterator, List, Literal,
                    Mapping, Optional, Sequence, Set, Tuple, Union)

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner
from pydantic import (AfterValidator, BeforeValidator, ConfigDict, Field, Strict, StringConstraints, TypeAdapter,
                      ValidationError, WrapValidator, model_validator)
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs, PydanticCustomError

from tf_bf16.capability import TARGETS
from tf_bf16.common import LAST_BATCH
from tf_bf16.errors import ConfigError
from tf_bf16.metrics import METRICS
from tf_bf16.transforms.plan import ALL_PRECISIONS, BF16, FP32, INT8, PRECISIONS

DEVICES: Tuple[str, ...] = ("cpu",)
STRATEGIES: Tuple[str, ...] = ("sensitivity", "basic")  # "basic" is INC's name for the same tuner
_STRATEGY_ALIASES: Mapping[str, str] = types.MappingProxyType({"basic": "sensitivity"})
APPROACHES: Tuple[str, ...] = ("post_training_static_quant",)
DUMMY_DTYPES: Tuple[str, ...] = ("float32", "float64", "float16", "bfloat16", "int8", "uint8",
                                 "int16", "int32", "int64", "bool")
TFRECORD_DTYPES: Tuple[str, ...] = ("float32", "int64", "string")
INT8_DTYPES: Tuple[str, ...] = ("int8", "uint8")  # both mean "INT8": the INT8 stage picks the signedness per tensor
ACTIVATION_ALGORITHMS: Tuple[str, ...] = ("minmax", "kl", "percentile")  # tf_bf16.calibration.ALGORITHMS
WEIGHT_ALGORITHMS: Tuple[str, ...] = ("minmax",)  # weights are quantized from their exact range
QUANT_TENSOR_CHOICES: Mapping[str, Tuple[str, ...]] = types.MappingProxyType({
    "dtype": ("int8", "uint8", "bf16", "fp32"),
    "scheme": ("sym", "asym"),
    "granularity": ("per_channel", "per_tensor"),
    "algorithm": ACTIVATION_ALGORITHMS,
})
DEFAULT_RANDOM_SEED = 1978

# Limits on what a config may hold (see the module docstring); real configs are far below them.
MAX_CONFIG_BYTES = 1 << 20      # a YAML file's size: 1 MiB (configs are a few kB; libyaml reads 1 MiB in < 1 s)
MAX_CONFIG_VALUES = 100_000     # scalars, lists and mappings, each alias or shared object counted per use
MAX_CONFIG_DEPTH = 32           # nesting of lists and mappings below the top level (INC configs use ~8)
MAX_NAME_CHARS = 4096           # a name or path given as a string value (PATH_MAX on Linux)
PREVIEW_CHARS = 80              # a user value shown in an error message is cut to this many characters

Path = Tuple[Union[str, int], ...]


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
# Errors: raised inside validation as PydanticCustomError, turned into one ConfigError
# --------------------------------------------------------------------------------------

def _error(message: str, *path: Union[str, int]) -> PydanticCustomError:
    """A bad value at ``path`` below the section being validated."""
    return PydanticCustomError("config_value", "{message}", {"message": message, "path": path})


def _relocate(exc: ValidationError, prefix: Path = (), drop: int = 0) -> PydanticCustomError:
    """The first error of ``exc`` as one of ours, at ``prefix`` + its location (less ``drop`` leading parts)."""
    err = exc.errors()[0]
    ctx = err.get("ctx") or {}
    path = tuple(prefix) + tuple(err["loc"])[drop:] + tuple(ctx.get("path", ()))
    if err["type"] in ("config_value", "config_key"):
        return PydanticCustomError(err["type"], "{message}", {**ctx, "path": path})
    message = "is required" if err["type"] == "missing" else f"{_cut(err['msg'], 200)}; {_got(err['input'])}"
    return _error(message, *path)


def _config_error(exc: ValidationError) -> ConfigError:
    """The ConfigError for the first error of a failed validation."""
    error = _relocate(exc)
    ctx = error.context or {}
    if error.type == "config_key":
        return ConfigError(f"unknown config key '{_dotted(ctx['path'])}'; {ctx['message']}")
    return _fail(ctx["path"], ctx["message"])


def _dotted(path: Path) -> str:
    """``path`` as ``a.b[0].c``; user-chosen keys (node names...) are cut to a preview's length."""
    out = ""
    for part in path:
        name = _cut(str(part), PREVIEW_CHARS)
        out += f"[{name}]" if isinstance(part, int) else (f".{name}" if out else name)
    return out


def _fail(path: Path, message: str) -> ConfigError:
    return ConfigError(f"config key '{_dotted(path)}': {message}")


def _cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in "..." when cut, so a message stays one short line."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _listing(names: Iterable[str], limit: int = 100) -> str:
    """``names`` joined by commas and cut to ``limit`` characters: user-chosen names may be many and long."""
    return _cut(", ".join(_cut(str(n), PREVIEW_CHARS) for n in itertools.islice(names, limit // 2)), limit)


def _leaf_repr(value: Any, limit: int) -> str:
    """``repr`` of a non-container; a long string is cut first, a failing repr (10**5000) is described."""
    if isinstance(value, (str, bytes)):
        return repr(value[:limit + 1])
    try:
        return repr(value)
    except Exception:  # noqa: BLE001 - e.g. ValueError for ints past sys.get_int_max_str_digits()
        return f"<{type(value).__name__} that has no short repr>"


def _repr_parts(value: Any, limit: int) -> Iterator[str]:
    """The pieces of ``repr(value)`` in order, made lazily so a huge or self-containing value is never walked."""
    if isinstance(value, Mapping):
        yield "{"
        for i, (key, item) in enumerate(value.items()):
            yield ", " if i else ""
            yield from _repr_parts(key, limit)
            yield ": "
            yield from _repr_parts(item, limit)
        yield "}"
    elif isinstance(value, (list, tuple)):
        yield "[" if isinstance(value, list) else "("
        for i, item in enumerate(value):
            yield ", " if i else ""
            yield from _repr_parts(item, limit)
        yield "]" if isinstance(value, list) else ",)" if len(value) == 1 else ")"
    else:
        yield _leaf_repr(value, limit)


def preview(value: Any, limit: int = PREVIEW_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages; costs about ``limit``, not ``len(value)``."""
    parts, size = [], 0
    for part in _repr_parts(value, limit):
        parts.append(part)
        size += len(part)
        if size > limit:
            break
    return _cut("".join(parts), limit)


def _got(value: Any) -> str:
    """``value`` for an error message: a short repr plus its type, and a hint for YAML's 1e-2 gotcha."""
    text = f"got {preview(value)} ({type(value).__name__})"
    if isinstance(value, str) and len(value) <= PREVIEW_CHARS:  # a number is short; never parse a huge string
        try:
            float(value)
            text += "; a quoted number, or YAML 1.1 exponent syntax like 1e-2 (write 1.0e-2), is a string"
        except ValueError:
            pass
    return text


# --------------------------------------------------------------------------------------
# Value types: pydantic types whose errors say what is expected
# --------------------------------------------------------------------------------------

def _expect(what: str) -> WrapValidator:
    """Replace pydantic's error for a scalar with "expected <what>; got <value> (<type>)"."""
    def check(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise _error(f"expected {what}; {_got(value)}") from None
    return WrapValidator(check)


def _integer(ge: int, le: Optional[int] = None, or_: Optional[int] = None) -> Any:
    """A strict int in [ge, le], or the single extra value ``or_``."""
    what = f"an integer >= {ge}" + (f" and <= {le}" if le is not None else "") + \
        (f" or {or_}" if or_ is not None else "")
    base = Annotated[int, Strict(), Field(ge=ge, le=le)]
    return Annotated[base if or_ is None else Union[Literal[or_], base], _expect(what)]


def _number(ge: Optional[float] = None, lt: Optional[float] = None) -> Any:
    """A finite int or float in [ge, lt), stored as float."""
    bounds = [f">= {ge}"] if ge is not None else []
    bounds += [f"< {lt}"] if lt is not None else []
    what = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
    return Annotated[float, Strict(), Field(ge=ge, lt=lt, allow_inf_nan=False), _expect(what)]


def _choice(choices: Sequence[str]) -> Any:
    """One of ``choices``, matched case-insensitively and stored lower-case."""
    def check(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value.strip().lower() if isinstance(value, str) else value)
        except ValidationError:
            shown = preview(value) if isinstance(value, str) else _got(value)
            raise _error(f"{shown} is not allowed; allowed values: {', '.join(choices)}") from None
    return Annotated[Literal[tuple(choices)], WrapValidator(check)]


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _one_or_many(item: Any, many: Callable[[Any], bool] = _is_list, what: Optional[str] = None) -> Any:
    """A tuple of ``item``s from a non-empty list, or from one value (errors then name the key, not ``[0]``).

    ``what`` describes both forms, for a single value that is wrong as a whole.
    """
    def check(value: Any, handler: Callable[[Any], Any]) -> Any:
        if many(value):
            if not value:
                raise _error("expected at least one value, got an empty list")
            return handler(value)
        try:
            return handler([value])
        except ValidationError as e:
            error = _relocate(e, drop=1)
            if what is not None and not (error.context or {})["path"]:
                raise _error(f"expected {what}; {_got(value)}") from None
            raise error from None
    return Annotated[Tuple[item, ...], WrapValidator(check)]


def _list_of(item: Any, what: str, min_length: int = 0) -> Any:
    """A tuple of ``item``s given as a YAML list of at least ``min_length``."""
    def check(value: Any, handler: Callable[[Any], Any]) -> Any:
        if not _is_list(value) or len(value) < min_length:
            raise _error(f"expected {what}; {_got(value)}")
        return handler(value)
    return Annotated[Tuple[item, ...], WrapValidator(check)]


def _choices(choices: Sequence[str]) -> Any:
    """One or more of ``choices``, deduplicated, in the order given."""
    return Annotated[_one_or_many(_choice(choices)), AfterValidator(lambda t: tuple(dict.fromkeys(t)))]


def _named(value: Any, what: str, freeze: Callable[[Any], Any] = FrozenDict) -> Any:
    """A read-only mapping keyed by user-chosen names (node names, op types, features); null is empty."""
    def check(raw: Any) -> Any:
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            raise _error(f"expected a mapping of {what} to settings; {_got(raw)}")
        for key in raw:
            if not isinstance(key, str) or not key.strip():
                raise _error(f"expected {what} (non-empty strings) as keys, got key {preview(key)}")
        return raw
    return Annotated[Mapping[str, value], BeforeValidator(check), AfterValidator(freeze)]


def _split_names(value: Any) -> Any:
    """"a, b" -> ["a", "b"]; lists pass through for item checks."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if not _is_list(value):
        raise _error(f"expected a string or a list of strings; {_got(value)}")
    return value


def _canonical_precisions(given: Tuple[str, ...]) -> Tuple[str, ...]:
    """Precisions in PRECISIONS order; fp32 is always added (it is the fallback)."""
    return tuple(p for p in PRECISIONS if p in set(given) | {FP32})


def _freeze(value: Any) -> Any:
    """Deep read-only copy of free-form YAML data (lists -> tuples, dicts -> FrozenDict)."""
    if isinstance(value, Mapping):
        return FrozenDict((k, _freeze(v)) for k, v in value.items())
    if _is_list(value):
        return tuple(_freeze(v) for v in value)
    return value


def _short_name(text: str) -> str:
    """``text`` when it is at most MAX_NAME_CHARS long: a name or path, never a megabyte of data."""
    if len(text) > MAX_NAME_CHARS:
        raise _error(f"expected at most {MAX_NAME_CHARS:,} characters (a name or path); got a string of "
                     f"{len(text):,}: {preview(text)}")
    return text


Bool = Annotated[bool, Strict(), _expect("true or false")]
Name = Annotated[str, Strict(), StringConstraints(strip_whitespace=True, min_length=1), _expect("a non-empty string"),
                 AfterValidator(_short_name)]
Names = _one_or_many(Name, what="a non-empty string or a list of such strings")
IoNames = Annotated[Tuple[Name, ...], BeforeValidator(_split_names)]
PositiveInt = _integer(1)
NonNegativeNumber = _number(ge=0)
Precisions = Annotated[_choices(PRECISIONS), AfterValidator(_canonical_precisions)]
DtypeList = _choices(PRECISIONS)
Dims = _list_of(PositiveInt, "a list of integers >= 1")


def _many_shapes(value: Any) -> bool:
    """A list of shapes (one per input) rather than one shape."""
    return _is_list(value) and all(_is_list(d) for d in value)


Shapes = _one_or_many(_list_of(PositiveInt, "a non-empty list of integers >= 1", min_length=1), many=_many_shapes,
                      what="a list of positive ints or a list of such lists (one per input)")

_BOOL = TypeAdapter(Bool)
_POSITIVE_INT = TypeAdapter(PositiveInt)
_PRECISIONS = TypeAdapter(Precisions)
_DTYPE_LIST = TypeAdapter(DtypeList)
_SHAPES = TypeAdapter(Shapes)
_LOSSES: Mapping[str, TypeAdapter] = types.MappingProxyType({
    "relative": TypeAdapter(_number(ge=0, lt=1)), "absolute": TypeAdapter(NonNegativeNumber)})


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------

_section = dataclass(frozen=True, config=ConfigDict(extra="forbid"))


def _field_names(cls: type) -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _mapping(value: Any, allowed: Iterable[str], *path: Union[str, int]) -> Dict[str, Any]:
    """``value`` as a dict whose keys are all in ``allowed`` (null means empty)."""
    allowed = sorted(allowed)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _error(f"expected a mapping with keys {', '.join(allowed)}; {_got(value)}", *path)
    for key in value:
        if not isinstance(key, str) or key not in allowed:
            raise PydanticCustomError("config_key", "{message}",
                                      {"message": f"allowed keys: {', '.join(allowed)}",
                                       "path": path + (key if isinstance(key, str) else preview(key),)})
    return dict(value)


def _at(adapter: TypeAdapter, value: Any, *path: Union[str, int]) -> Any:
    """``value`` validated by ``adapter``, its errors reported at ``path`` (a YAML key that is not a field)."""
    try:
        return adapter.validate_python(value)
    except ValidationError as e:
        raise _relocate(e, path) from None


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
    """Base of config sections: reads a YAML mapping into fields, ``to_dict`` writes it back."""

    _NULLABLE: ClassVar[Tuple[str, ...]] = ()  # keys whose null is a value rather than "use the default"

    @model_validator(mode="before")
    @classmethod
    def _read(cls, data: Any) -> Any:
        if isinstance(data, (ArgsKwargs, _Section)):  # constructor arguments or an instance: fields already
            return data
        return cls._from_yaml(data)

    @classmethod
    def _from_yaml(cls, data: Any) -> Dict[str, Any]:
        """The field values of YAML ``data``; sections whose YAML layout differs from their fields override this."""
        return cls._fields(_mapping(data, _field_names(cls)))

    @classmethod
    def _fields(cls, raw: Dict[str, Any]) -> Dict[str, Any]:
        """``raw`` less the nulls that mean "default"; ConfigError for a missing required key."""
        out = {k: v for k, v in raw.items() if v is not None or k in cls._NULLABLE}
        for name, info in cls.__pydantic_fields__.items():  # type: ignore[attr-defined]
            if info.is_required() and out.get(name) is None:
                raise _error("is required" + (f": {info.description}" if info.description else ""), name)
        return out

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dicts/lists that ``load_config`` turns back into an equal object."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


_PER_INPUT: Tuple[str, ...] = ("low", "high", "dtype")


def _per_input_error(key: str, count: int, given: int) -> PydanticCustomError:
    return _error(f"expected one value or a list of {count} (one per shape), got {given} values", key)


@_section
class DummyDatasetConfig(_Section):
    """Random data; per input: shape (first dim = number of samples, as in INC), range, dtype.

    ``low``, ``high`` and ``dtype`` take one value for every input or a list of one per shape.
    """

    kind: ClassVar[str] = "dummy"
    shape: Shapes = Field(description="a list of ints, or a list of such lists (one per input)")
    low: _one_or_many(_number()) = (0.0,)
    high: _one_or_many(_number()) = (1.0,)
    dtype: _one_or_many(_choice(DUMMY_DTYPES)) = ("float32",)
    label: Bool = False
    label_shape: Dims = ()

    @classmethod
    def _from_yaml(cls, data: Any) -> Dict[str, Any]:
        raw = _mapping(data, _field_names(cls))
        if raw.get("shape") is not None:
            count = len(_at(_SHAPES, raw["shape"], "shape"))
            for key in _PER_INPUT:
                if _is_list(raw.get(key)) and len(raw[key]) != count:  # a YAML list has one value per shape
                    raise _per_input_error(key, count, len(raw[key]))
        return cls._fields(raw)

    @model_validator(mode="after")
    def _per_input(self) -> "DummyDatasetConfig":
        count = len(self.shape)
        for key in _PER_INPUT:
            values = getattr(self, key)
            if len(values) == 1:
                object.__setattr__(self, key, values * count)
            elif len(values) != count:
                raise _per_input_error(key, count, len(values))
        for i, (lo, hi) in enumerate(zip(self.low, self.high)):
            if lo > hi:
                raise _error(f"low ({lo}) exceeds high ({hi}) for input {i}", "low")
        return self


@_section
class NpzDatasetConfig(_Section):
    """Arrays from a ``.npz`` file: ``inputs`` keys feed the model, ``labels`` key (None = no labels)."""

    kind: ClassVar[str] = "npz"
    _NULLABLE: ClassVar[Tuple[str, ...]] = ("labels",)
    path: Name = Field(description="the .npz file to read")
    inputs: Names = ("x",)
    labels: Optional[Name] = "y"


@_section
class TFRecordFeature(_Section):
    """One fixed-length tf.train.Example feature; YAML must name its dtype."""

    shape: Dims = ()
    dtype: _choice(TFRECORD_DTYPES) = "float32"

    @classmethod
    def _from_yaml(cls, data: Any) -> Dict[str, Any]:
        raw = _mapping(data, _field_names(cls))
        if raw.get("dtype") is None:
            raise _error(f"is required; allowed values: {', '.join(TFRECORD_DTYPES)}", "dtype")
        return cls._fields(raw)


@_section
class TFRecordDatasetConfig(_Section):
    """tf.train.Example records: files (paths or globs), feature specs, model inputs and label.

    ``inputs`` left empty means every feature but the label.
    """

    kind: ClassVar[str] = "tfrecord"
    path: Names = Field(description="file paths or globs of TFRecord files")
    features: _named(TFRecordFeature, "feature names") = Field(description="feature name -> {shape, dtype}")
    inputs: Names = ()
    label: Optional[Name] = None

    @model_validator(mode="after")
    def _names_are_features(self) -> "TFRecordDatasetConfig":
        names = tuple(self.features)
        if not names:
            raise _error("expected at least one feature", "features")
        checks = [(("label",), self.label)] if self.label is not None else []
        for path, name in checks + [(("inputs", i), n) for i, n in enumerate(self.inputs)]:
            if name not in names:
                raise _error(f"{preview(name)} is not allowed; allowed values: {_listing(names)}", *path)
        if not self.inputs:
            inputs = tuple(n for n in names if n != self.label)
            if not inputs:
                raise _error("no feature is left to feed the model (all features are the label)", "inputs")
            object.__setattr__(self, "inputs", inputs)
        return self


DatasetConfig = Union[DummyDatasetConfig, NpzDatasetConfig, TFRecordDatasetConfig]
_DATASETS: Mapping[str, TypeAdapter] = types.MappingProxyType({
    cls.kind: TypeAdapter(cls) for cls in (DummyDatasetConfig, NpzDatasetConfig, TFRecordDatasetConfig)})


@_section
class DataLoaderConfig(_Section):
    """A dataloader-spec; ``dataset`` None means the dataset is supplied in code (YAML: ``{dummy: {...}}``)."""

    batch_size: PositiveInt = 1
    last_batch: _choice(LAST_BATCH) = "rollover"
    shuffle: Bool = False
    dataset: Optional[DatasetConfig] = None

    @classmethod
    def _from_yaml(cls, data: Any) -> Dict[str, Any]:
        raw = _mapping(data, _field_names(cls))
        if raw.get("dataset") is not None:
            spec = _mapping(raw["dataset"], _DATASETS, "dataset")
            given = [k for k in _DATASETS if k in spec]
            if len(given) != 1:
                raise _error(f"give exactly one dataset kind of {', '.join(_DATASETS)}, "
                             f"got {', '.join(given) if given else 'none'}", "dataset")
            kind = given[0]
            raw["dataset"] = _at(_DATASETS[kind], {} if spec[kind] is None else spec[kind], "dataset", kind)
        return cls._fields(raw)

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        out["dataset"] = None if self.dataset is None else {self.dataset.kind: self.dataset.to_dict()}
        return out


@_section
class MetricConfig(_Section):
    """One metric: canonical ``name`` (see metrics.METRICS), ``k`` for topk, ``higher_is_better``.

    YAML: ``{topk: 1}``, ``{topk: {k: 1}}``, ``{MSE: {}}`` or a bare name, plus an optional
    ``higher_is_better`` (default: the metric's own direction).
    """

    name: Literal[tuple(METRICS)]
    k: Optional[PositiveInt] = None
    higher_is_better: Optional[Bool] = None

    @classmethod
    def _from_yaml(cls, data: Any) -> Dict[str, Any]:
        allowed = ", ".join(sorted(METRICS, key=str.lower))
        by_lower = {name.lower(): name for name in METRICS}
        raw = {data: None} if isinstance(data, str) else data
        if not isinstance(raw, Mapping):
            raise _error(f"expected a metric such as {{topk: 1}} or {{MSE: {{}}}}; {_got(data)}; "
                         f"allowed metrics: {allowed}")
        keys = [key for key in raw if key != "higher_is_better"]
        for key in keys:
            if not isinstance(key, str) or key.lower() not in by_lower:
                raise _error(f"unknown metric {preview(key)}; allowed metrics: {allowed} "
                             f"(plus the key higher_is_better)")
        if len(keys) != 1:
            raise _error(f"give exactly one metric of {allowed}, got {', '.join(keys) if keys else 'none'}")
        key = keys[0]
        name, params, k = by_lower[key.lower()], raw[key], None
        if name == "topk":
            if isinstance(params, Mapping):
                k = _at(_POSITIVE_INT, _mapping(params, ("k",), key).get("k"), key, "k")
            else:
                k = _at(_POSITIVE_INT, params, key)
        elif params is not None and params != {}:
            raise _error(f"metric {name} takes no parameters: give {{}} or null; {_got(params)}", key)
        return cls._fields({"name": name, "k": k, "higher_is_better": raw.get("higher_is_better")})

    @model_validator(mode="after")
    def _default_direction(self) -> "MetricConfig":
        if self.higher_is_better is None:
            object.__setattr__(self, "higher_is_better", METRICS[self.name].higher_is_better)
        return self

    def to_dict(self) -> Dict[str, Any]:
        return {self.name: self.k if self.name == "topk" else {}, "higher_is_better": self.higher_is_better}


# --------------------------------------------------------------------------------------
# Accepted for Neural Compressor compatibility, not read by tf_bf16
# --------------------------------------------------------------------------------------
# INC YAMLs carry these keys (model.framework, tuning.objective, tuning.workspace,
# evaluation.performance, evaluation.accuracy.postprocess). They are validated, so a typo
# still fails, and kept on the Config for round trips, but nothing in tf_bf16 acts on them.

FRAMEWORKS: Tuple[str, ...] = ("tensorflow", "tensorflow_itex", "keras")
OBJECTIVES: Tuple[str, ...] = ("performance",)
DEFAULT_WORKSPACE = "./tf_bf16_workspace"

Framework = _choice(FRAMEWORKS)
Objective = _choice(OBJECTIVES)
Postprocess = _named(Any, "postprocess steps", freeze=_freeze)


@_section
class PerformanceRunConfig(_Section):
    """``evaluation.performance.configs`` (INC compatibility, not read): benchmark instances on cores."""

    cores_per_instance: Optional[PositiveInt] = None
    num_of_instance: PositiveInt = 1
    inter_num_of_threads: Optional[PositiveInt] = None
    intra_num_of_threads: Optional[PositiveInt] = None


@_section
class PerformanceConfig(_Section):
    """``evaluation.performance`` (INC compatibility, not read); ``iteration`` -1 means the whole dataloader."""

    iteration: _integer(1, or_=-1) = -1
    warmup: _integer(0) = 5
    configs: PerformanceRunConfig = dataclasses.field(default_factory=PerformanceRunConfig)
    dataloader: Optional[DataLoaderConfig] = None


@_section
class WorkspaceConfig(_Section):
    """``tuning.workspace`` (INC compatibility, not read): tuning history path and history to resume from."""

    path: Name = DEFAULT_WORKSPACE
    resume: Optional[Name] = None


# --------------------------------------------------------------------------------------
# The Config tree
# --------------------------------------------------------------------------------------

@_section
class ModelConfig(_Section):
    """``model:`` graph identity; empty inputs/outputs mean "detect from the model"."""

    name: Optional[Name] = None
    framework: Framework = "tensorflow"
    inputs: IoNames = ()
    outputs: IoNames = ()


# The error for an op-wise entry whose activation and weight each allow one, different, precision.
_DTYPE_CONFLICT = ("activation and weight dtypes conflict (one allows only fp32, the other only bf16); "
                   "a node runs in one precision")


def _sole_dtypes(dtype_lists: Iterable[Optional[Sequence[str]]]) -> Set[str]:
    """The dtypes that are the only entry of their list: what an override forces."""
    return {dtypes[0] for dtypes in dtype_lists if dtypes is not None and len(dtypes) == 1}


@_section
class DtypeOverride(_Section):
    """One ``op_wise``/``op_type_wise`` entry: the dtypes its activation and weight may take.

    YAML: ``{activation: {dtype: [bf16, fp32]}, weight: {dtype: fp32}}``.
    """

    activation: Optional[DtypeList] = None
    weight: Optional[DtypeList] = None

    @classmethod
    def _from_yaml(cls, data: Any) -> Dict[str, Any]:
        raw = _mapping(data, _field_names(cls))
        dtypes = {part: _mapping(raw.get(part), ("dtype",), part).get("dtype") for part in _field_names(cls)}
        return cls._fields({part: None if value is None else _at(_DTYPE_LIST, value, part, "dtype")
                            for part, value in dtypes.items()})

    @model_validator(mode="after")
    def _one_precision(self) -> "DtypeOverride":
        if len(_sole_dtypes((self.activation, self.weight))) > 1:
            raise _error(_DTYPE_CONFLICT)
        return self

    def to_dict(self) -> Dict[str, Any]:
        return {part: {"dtype": list(dtypes)} for part, dtypes in
                (("activation", self.activation), ("weight", self.weight)) if dtypes is not None}

    def forced_precision(self) -> Optional[str]:
        """The one precision a given dtype list allows ("fp32" or "bf16"); None when both are allowed."""
        only = _sole_dtypes((self.activation, self.weight))
        return only.pop() if len(only) == 1 else None


def _forced(overrides: Mapping[str, DtypeOverride]) -> Dict[str, str]:
    forced = {name: o.forced_precision() for name, o in overrides.items()}
    return {name: p for name, p in forced.items() if p is not None}


@_section
class MixedPrecisionConfig(_Section):
    """``mixed_precision:`` allowed precisions (always incl. fp32 fallback), target CPU, overrides."""

    precisions: Precisions = (BF16, FP32)
    target: Optional[_choice(tuple(TARGETS))] = None
    op_wise: _named(DtypeOverride, "node names") = dataclasses.field(default_factory=FrozenDict)
    op_type_wise: _named(DtypeOverride, "op types") = dataclasses.field(default_factory=FrozenDict)

    @model_validator(mode="after")
    def _overrides_within_precisions(self) -> "MixedPrecisionConfig":
        for section in ("op_wise", "op_type_wise"):
            for name, override in getattr(self, section).items():
                for part in ("activation", "weight"):
                    for dtype in getattr(override, part) or ():
                        if dtype not in self.precisions:
                            raise _error(f"{dtype!r} is not among mixed_precision.precisions "
                                         f"({', '.join(self.precisions)})", section, name, part, "dtype")
        return self

    def node_precisions(self) -> Dict[str, str]:
        """Node name -> forced "fp32"/"bf16" from ``op_wise``; entries allowing both are omitted."""
        return _forced(self.op_wise)

    def op_type_precisions(self) -> Dict[str, str]:
        """Op type -> forced "fp32"/"bf16" from ``op_type_wise``; entries allowing both are omitted."""
        return _forced(self.op_type_wise)

    def allowed_precisions(self, section: str) -> Dict[str, FrozenSet[str]]:
        """Name -> {the forced precision} for ``section`` ("op_wise"/"op_type_wise"): a list allowing both
        floats says nothing here, not even "no INT8" (INT8 is the ``quantization`` section's to limit)."""
        return {name: frozenset({p}) for name, p in _forced(getattr(self, section)).items()}


@_section
class TensorQuantConfig(_Section):
    """INT8 options for activations or weights (each a tuple of allowed values; None = any)."""

    dtype: Optional[_choices(QUANT_TENSOR_CHOICES["dtype"])] = None
    scheme: Optional[_choices(QUANT_TENSOR_CHOICES["scheme"])] = None
    granularity: Optional[_choices(QUANT_TENSOR_CHOICES["granularity"])] = None
    algorithm: Optional[_choices(QUANT_TENSOR_CHOICES["algorithm"])] = None

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if v is not None}


@_section
class QuantOverride(_Section):
    """``quantization.model_wise`` or one ``quantization.op_wise``/``op_type_wise`` entry.

    Its dtype lists say which precisions a node may take: ``int8`` and ``uint8`` both mean INT8,
    and an entry giving both lists allows what the two have in common.
    """

    activation: Optional[TensorQuantConfig] = None
    weight: Optional[TensorQuantConfig] = None

    @model_validator(mode="after")
    def _consistent(self) -> "QuantOverride":
        algorithms = self.weight.algorithm if self.weight is not None else None
        bad = [a for a in algorithms or () if a not in WEIGHT_ALGORITHMS]
        if bad:
            raise _error(f"{bad[0]!r} is not allowed for weights; allowed values: {', '.join(WEIGHT_ALGORITHMS)} "
                         f"(weights are quantized from their exact range)", "weight", "algorithm")
        lists = self._dtype_lists()
        if lists and not frozenset.intersection(*(_as_precisions(d) for d in lists.values())):
            shown = "; ".join(f"{part}: {', '.join(dtypes)}" for part, dtypes in lists.items())
            raise _error(f"activation and weight dtypes conflict ({shown}): they allow no common precision, "
                         f"and a node runs in one precision")
        return self

    def _dtype_lists(self) -> Dict[str, Tuple[str, ...]]:
        """The dtype lists given, by part ("activation", "weight")."""
        parts = {part: getattr(self, part) for part in ("activation", "weight")}
        return {part: tensor.dtype for part, tensor in parts.items() if tensor is not None and tensor.dtype is not None}

    def allowed(self, path: Path, int8: bool) -> Optional[FrozenSet[str]]:
        """The precisions (int8, bf16, fp32) this entry allows a node; None when it gives no dtype list.

        ``int8`` says whether the caller has an INT8 stage (``Quantization``); without one
        (``MixedPrecision``) an int8/uint8 dtype is a ConfigError naming the key under ``path``.
        """
        lists = self._dtype_lists()
        if not int8:
            for part, dtypes in lists.items():
                found = [d for d in dtypes if d in INT8_DTYPES]
                if found:
                    raise _fail(path + (part, "dtype"),
                                f"{', '.join(found)} is for INT8 quantization (tf_bf16.Quantization, 'tf-bf16 "
                                f"quantize'); MixedPrecision converts to bf16/fp32 only; allowed here: "
                                f"{', '.join(PRECISIONS)}")
        if not lists:
            return None
        return frozenset.intersection(*(_as_precisions(d) for d in lists.values()))

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if v is not None}


def _as_precisions(dtypes: Iterable[str]) -> FrozenSet[str]:
    """A quantization dtype list as precisions: int8 and uint8 are both "int8"."""
    return frozenset(INT8 if d in INT8_DTYPES else d for d in dtypes)


def _limit(allowed: Optional[FrozenSet[str]], int8: bool) -> Optional[FrozenSet[str]]:
    """What an entry's allowed precisions leave a node; None when it leaves every precision the converter has.

    One precision forces it. Several mean "one of these, FP32 as the last resort" (fp32 is added:
    a node no stage can take runs FP32 anyway), so with the INT8 stage [bf16, fp32] keeps a node out
    of INT8, [int8, fp32] out of BF16, and [int8, bf16] limits nothing.
    """
    if allowed is None:
        return None
    if len(allowed) > 1:
        allowed = allowed | {FP32}
    return None if allowed >= frozenset(ALL_PRECISIONS if int8 else PRECISIONS) else allowed


def _allowed_by_name(overrides: Mapping[str, QuantOverride], path: Path, int8: bool) -> Dict[str, FrozenSet[str]]:
    """Name (node or op type) -> allowed precisions, for the entries of ``overrides`` that limit them."""
    limits = {name: _limit(o.allowed(path + (name,), int8), int8) for name, o in overrides.items()}
    return {name: limit for name, limit in limits.items() if limit is not None}


@_section
class CalibrationConfig(_Section):
    """``quantization.calibration``: candidate sample counts (the first is used) and the calibration data."""

    sampling_size: _one_or_many(PositiveInt) = (100,)
    dataloader: Optional[DataLoaderConfig] = None


_OP_OVERRIDES = _named(QuantOverride, "op types")
_OP_OVERRIDES_ADAPTER = TypeAdapter(_OP_OVERRIDES)


@_section
class QuantizationConfig(_Section):
    """``quantization:``, read by ``tf_bf16.Quantization`` (INT8 + BF16 + FP32).

    ``MixedPrecision`` reads only its fp32/bf16 dtype overrides (as Neural Compressor does) and
    refuses int8/uint8 dtypes; ``Quantization`` reads int8 too (``int8=True`` below).
    ``op_type_wise`` is also accepted as ``optype_wise``, Neural Compressor's spelling.
    """

    approach: _choice(APPROACHES) = "post_training_static_quant"
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    model_wise: QuantOverride = dataclasses.field(default_factory=QuantOverride)
    op_wise: _named(QuantOverride, "node names") = dataclasses.field(default_factory=FrozenDict)
    op_type_wise: _OP_OVERRIDES = dataclasses.field(default_factory=FrozenDict)

    @classmethod
    def _from_yaml(cls, data: Any) -> Dict[str, Any]:
        raw = _mapping(data, _field_names(cls) + ("optype_wise",))
        alias = raw.pop("optype_wise", None)
        if alias is not None:
            if raw.get("op_type_wise") is not None:
                raise _error("give one of 'optype_wise' (Neural Compressor's spelling) and 'op_type_wise'",
                             "optype_wise")
            raw["op_type_wise"] = _at(_OP_OVERRIDES_ADAPTER, alias, "optype_wise")
        return cls._fields(raw)

    def allowed_precisions(self, section: str, int8: bool = False) -> Dict[str, FrozenSet[str]]:
        """Name -> allowed precisions from ``section`` ("op_wise"/"op_type_wise"), entries that limit nothing
        left out (``_limit``); int8 dtypes are refused unless ``int8`` (the converter has an INT8 stage)."""
        return _allowed_by_name(getattr(self, section), ("quantization", section), int8)

    def model_precision(self) -> Optional[str]:
        """The one float precision ``model_wise`` allows every node ("fp32" or "bf16"), or None (MixedPrecision)."""
        allowed = self.model_wise.allowed(("quantization", "model_wise"), int8=False)
        return next(iter(allowed)) if allowed is not None and len(allowed) == 1 else None

    def model_dtypes(self) -> FrozenSet[str]:
        """The precisions ``model_wise`` allows every node with the INT8 stage on (all when it lists none)."""
        allowed = self.model_wise.allowed(("quantization", "model_wise"), int8=True)
        return frozenset(ALL_PRECISIONS) if allowed is None else allowed

    def sampling_size(self) -> int:
        """How many samples calibration reads: the first ``calibration.sampling_size``."""
        return self.calibration.sampling_size[0]

    def activation_algorithm(self) -> str:
        """The calibration algorithm: the first ``model_wise.activation.algorithm`` (default minmax)."""
        activation = self.model_wise.activation
        return activation.algorithm[0] if activation is not None and activation.algorithm else "minmax"

    def weight_granularity(self) -> str:
        """per_channel or per_tensor: the first ``model_wise.weight.granularity`` (default per_channel)."""
        weight = self.model_wise.weight
        return weight.granularity[0] if weight is not None and weight.granularity else "per_channel"

    def unapplied_keys(self) -> List[str]:
        """Dotted keys given here that tf_bf16's INT8 stage does not apply (it chooses them itself)."""
        out = []
        weight, activation = self.model_wise.weight, self.model_wise.activation
        if weight is not None and weight.scheme is not None and "sym" not in weight.scheme:
            out.append("quantization.model_wise.weight.scheme")    # weights are symmetric INT8
        if activation is not None and activation.granularity is not None and "per_tensor" not in activation.granularity:
            out.append("quantization.model_wise.activation.granularity")   # one range per activation tensor
        for section in ("op_wise", "op_type_wise"):
            for name, override in getattr(self, section).items():
                for part in ("activation", "weight"):
                    tensor = getattr(override, part)
                    out += [_dotted(("quantization", section, name, part, key)) for key in
                            ("scheme", "granularity", "algorithm") if tensor is not None and getattr(tensor, key)]
        return out


@_section
class AccuracyConfig(_Section):
    """``evaluation.accuracy``; metric/dataloader None means they are supplied in code."""

    metric: Optional[MetricConfig] = None
    dataloader: Optional[DataLoaderConfig] = None
    postprocess: Optional[Postprocess] = None


@_section
class EvaluationConfig(_Section):
    """``evaluation:``; a section left out is None."""

    accuracy: Optional[AccuracyConfig] = None
    performance: Optional[PerformanceConfig] = None


@_section
class StrategyConfig(_Section):
    """``tuning.strategy``; "basic" (INC's name) is stored as "sensitivity", the one tuner."""

    name: Annotated[_choice(STRATEGIES), AfterValidator(lambda n: _STRATEGY_ALIASES.get(n, n))] = "sensitivity"


@_section
class AccuracyCriterion(_Section):
    """``tuning.accuracy_criterion``: ``criterion`` is "relative" or "absolute", with its loss.

    YAML: ``{relative: 0.01}`` or ``{absolute: 0.5}`` (one of them), plus ``higher_is_better``.
    """

    criterion: Literal["relative", "absolute"] = "relative"
    tolerable_loss: NonNegativeNumber = 0.01
    higher_is_better: Bool = True

    @classmethod
    def _from_yaml(cls, data: Any) -> Dict[str, Any]:
        raw = _mapping(data, tuple(_LOSSES) + ("higher_is_better",))
        given = [key for key in _LOSSES if raw.get(key) is not None]
        if len(given) > 1:
            raise _error("give exactly one of 'relative' or 'absolute', not both")
        out = {"higher_is_better": raw.get("higher_is_better")}
        if given:
            out.update(criterion=given[0], tolerable_loss=_at(_LOSSES[given[0]], raw[given[0]], given[0]))
        return cls._fields(out)

    def to_dict(self) -> Dict[str, Any]:
        return {self.criterion: self.tolerable_loss, "higher_is_better": self.higher_is_better}


@_section
class ExitPolicy(_Section):
    """``tuning.exit_policy``: seconds for the whole search (0 = no limit: it ends when no node can go
    back), trial cap."""

    timeout: NonNegativeNumber = 0.0
    max_trials: PositiveInt = 100
    performance_only: Bool = False


@_section
class TuningConfig(_Section):
    """``tuning:`` accuracy-aware fallback settings."""

    strategy: StrategyConfig = dataclasses.field(default_factory=StrategyConfig)
    accuracy_criterion: AccuracyCriterion = dataclasses.field(default_factory=AccuracyCriterion)
    objective: Objective = "performance"
    exit_policy: ExitPolicy = dataclasses.field(default_factory=ExitPolicy)
    random_seed: _integer(0, 2**32 - 1) = DEFAULT_RANDOM_SEED
    workspace: WorkspaceConfig = dataclasses.field(default_factory=WorkspaceConfig)


# Top-level INC 1.x keys that are not sections of their own: both set mixed_precision.precisions.
_PRECISION_ALIASES: Tuple[str, ...] = ("use_bf16", "graph_optimization")


def _top_level_precisions(raw: Mapping[str, Any], mixed: Mapping[str, Any]) -> Optional[Tuple[str, ...]]:
    """The precisions ``mixed_precision``, ``graph_optimization`` and ``use_bf16`` agree on (None: default)."""
    alias = _mapping(raw.get("graph_optimization"), ("precisions",), "graph_optimization").get("precisions")
    given = {key: _at(_PRECISIONS, value, key, "precisions")
             for key, value in (("mixed_precision", mixed.get("precisions")), ("graph_optimization", alias))
             if value is not None}
    if len(set(given.values())) > 1:
        raise _error(f"{', '.join(given['graph_optimization'])} disagrees with 'mixed_precision.precisions' "
                     f"({', '.join(given['mixed_precision'])}); give one of them (graph_optimization is the INC "
                     f"1.x alias)", "graph_optimization", "precisions")
    precisions = next(iter(given.values()), None)
    if raw.get("use_bf16") is None:
        return precisions
    use_bf16 = _at(_BOOL, raw["use_bf16"], "use_bf16")
    if precisions is not None and (BF16 in precisions) != use_bf16:
        raise _error(f"{str(use_bf16).lower()} contradicts the precisions given ({', '.join(precisions)}); "
                     f"drop use_bf16 or make them agree", "use_bf16")
    return precisions if use_bf16 else (FP32,)


def _merge_allowed(mixed: Mapping[str, FrozenSet[str]], section: str,
                   quant: Mapping[str, FrozenSet[str]]) -> Dict[str, FrozenSet[str]]:
    """The precisions both ``mixed`` (``mixed_precision.<section>``) and ``quant`` (``quantization.<section>``)
    allow each name; ConfigError when they allow one name no common precision."""
    merged = dict(mixed)
    for name, allowed in quant.items():
        both = merged.get(name, allowed) & allowed
        if not both:
            raise ConfigError(f"config keys '{_dotted(('mixed_precision', section, name))}' ({_shown(merged[name])}) "
                              f"and '{_dotted(('quantization', section, name))}' ({_shown(allowed)}) disagree: "
                              f"they allow no common precision; give one of them")
        merged[name] = both
    return merged


def _shown(precisions: FrozenSet[str]) -> str:
    """Precisions in ALL_PRECISIONS order, for a message."""
    return ", ".join(p for p in ALL_PRECISIONS if p in precisions)


def _forced_only(allowed: Mapping[str, FrozenSet[str]]) -> Dict[str, str]:
    """The names ``allowed`` limits to one precision, with it."""
    return {name: next(iter(s)) for name, s in allowed.items() if len(s) == 1}


def _sets_only(allowed: Mapping[str, FrozenSet[str]]) -> Dict[str, FrozenSet[str]]:
    """The names ``allowed`` limits to a set of several precisions."""
    return {name: s for name, s in allowed.items() if len(s) > 1}


@_section
class Config(_Section):
    """A validated config with defaults filled in; ``quantization`` None means no INT8 stage."""

    version: Optional[_number(ge=0)] = None
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    device: _choice(DEVICES) = "cpu"
    mixed_precision: MixedPrecisionConfig = dataclasses.field(default_factory=MixedPrecisionConfig)
    quantization: Optional[QuantizationConfig] = None
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    tuning: TuningConfig = dataclasses.field(default_factory=TuningConfig)

    @classmethod
    def _from_yaml(cls, data: Any) -> Dict[str, Any]:
        raw = _mapping(data, _field_names(cls) + _PRECISION_ALIASES)
        mixed = raw.get("mixed_precision")
        if mixed is None or isinstance(mixed, Mapping):
            raw["mixed_precision"] = dict(mixed or {}, precisions=_top_level_precisions(raw, mixed or {}))
        return cls._fields({k: v for k, v in raw.items() if k not in _PRECISION_ALIASES})

    def node_precisions(self, int8: bool = False) -> Dict[str, str]:
        """Node name -> forced precision from ``mixed_precision.op_wise`` and ``quantization.op_wise``.

        ``int8`` False (MixedPrecision): "fp32"/"bf16", and an int8 dtype in ``quantization`` is a
        ConfigError. True (Quantization): "int8" too. ConfigError when the two sections allow one
        node no common precision. Entries that allow several precisions are in ``node_allowed``.
        """
        return _forced_only(self._allowed("op_wise", int8))

    def node_allowed(self, int8: bool = False) -> Dict[str, FrozenSet[str]]:
        """Node name -> the set of precisions the op_wise entries limit it to, when more than one
        ({bf16, fp32} or {int8, fp32}; only with ``int8``, since without INT8 such a set limits nothing)."""
        return _sets_only(self._allowed("op_wise", int8))

    def op_type_precisions(self, int8: bool = False) -> Dict[str, str]:
        """Op type -> forced precision (``mixed_precision.op_type_wise``, ``quantization.op_type_wise``), as
        ``node_precisions``."""
        return _forced_only(self._allowed("op_type_wise", int8))

    def op_type_allowed(self, int8: bool = False) -> Dict[str, FrozenSet[str]]:
        """Op type -> the set of precisions the op_type_wise entries limit it to, as ``node_allowed``."""
        return _sets_only(self._allowed("op_type_wise", int8))

    def _allowed(self, section: str, int8: bool) -> Dict[str, FrozenSet[str]]:
        """Name -> the precisions ``mixed_precision.<section>`` and ``quantization.<section>`` both allow."""
        quant = self.quantization.allowed_precisions(section, int8) if self.quantization is not None else {}
        return _merge_allowed(self.mixed_precision.allowed_precisions(section), section, quant)

    def effective_precisions(self) -> Tuple[str, ...]:
        """``mixed_precision.precisions``, narrowed to fp32 when ``quantization.model_wise`` allows only fp32."""
        model = self.quantization.model_precision() if self.quantization is not None else None
        if model == FP32:
            return (FP32,)
        if model == BF16 and BF16 not in self.mixed_precision.precisions:
            raise ConfigError("config key 'quantization.model_wise' allows only bf16, but "
                              "'mixed_precision.precisions' excludes bf16; make them agree")
        return self.mixed_precision.precisions

    def quantization_precisions(self) -> Tuple[str, ...]:
        """What Quantization may use: "int8", plus the floats both ``mixed_precision.precisions`` and
        ``quantization.model_wise`` allow (fp32 always: the fallback). A model_wise dtype list naming
        only int8/uint8 leaves the floats alone; one allowing no int8 is a ConfigError.
        """
        allowed = (self.quantization or QuantizationConfig()).model_dtypes()
        if INT8 not in allowed:
            raise ConfigError(f"config key 'quantization.model_wise': its dtypes allow only "
                              f"{', '.join(sorted(allowed))}, so Quantization would quantize nothing; allow int8 "
                              f"(or uint8), or convert with MixedPrecision ('tf-bf16 convert')")
        floats = (allowed & set(PRECISIONS)) or set(PRECISIONS)
        return (INT8,) + tuple(p for p in self.mixed_precision.precisions if p in floats | {FP32})

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        if self.version is None:
            del out["version"]
        return out


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

ConfigSource = Union[None, str, "os.PathLike[str]", Mapping[str, Any], Config]
_CONFIG = TypeAdapter(Config)
_METRIC = TypeAdapter(MetricConfig)


def _validate(raw: Mapping[str, Any]) -> Config:
    try:
        return _CONFIG.validate_python(raw)
    except ValidationError as e:
        raise _config_error(e) from None


def _overflow(root: Any, children: Callable[[Any], Sequence[Any]]) -> Optional[str]:
    """Which limit ``root`` passes: "values" (MAX_CONFIG_VALUES), "depth" (MAX_CONFIG_DEPTH) or None.

    Shared parts (YAML aliases, a list used twice) count once per use, as validation will walk
    them; the walk stops at the limit, so a bomb or a cycle costs at most MAX_CONFIG_VALUES steps.
    """
    count, stack = 1, [(root, 0)]
    while stack:
        node, depth = stack.pop()
        kids = children(node)
        if not kids:
            continue
        if depth >= MAX_CONFIG_DEPTH:
            return "depth"
        count += len(kids)
        if count > MAX_CONFIG_VALUES:
            return "values"
        stack.extend((kid, depth + 1) for kid in kids)
    return None


def _data_children(value: Any) -> Sequence[Any]:
    """The keys and values of a mapping, the items of a list or tuple; nothing for a scalar."""
    if isinstance(value, Mapping):
        return [*value.keys(), *value.values()]
    return value if _is_list(value) else ()


def _check_data(data: Any, what: str) -> None:
    """ConfigError when ``data`` given in code holds more values, or nests deeper, than a config may."""
    problem = _overflow(data, _data_children)
    if problem == "values":
        raise ConfigError(f"{what} holds more than {MAX_CONFIG_VALUES:,} values (each use of a shared list or "
                          f"mapping counts); a config holds a few hundred")
    if problem == "depth":
        raise ConfigError(f"{what} nests lists and mappings more than {MAX_CONFIG_DEPTH} levels deep "
                          f"(or contains itself)")


def parse_metric(value: Any, key: Path = ("evaluation", "accuracy", "metric")) -> "MetricConfig":
    """A ``MetricConfig`` from a metric in YAML form (``"topk"``, ``{topk: 1}``, ``{MSE: {}}``), as
    given in code; a bad one is a ConfigError naming ``key``."""
    _check_data(value, f"config key '{_dotted(key)}'")
    try:
        return _METRIC.validate_python(value)
    except ValidationError as e:
        error = _relocate(e, key)
        raise _fail(error.context["path"], error.context["message"]) from None


def load_config(source: ConfigSource = None) -> Config:
    """A validated ``Config`` from a YAML path, a mapping, a Config (returned as is) or None (defaults)."""
    if isinstance(source, Config):
        return source
    if source is None or isinstance(source, Mapping):
        _check_data(source or {}, "the config mapping")
        return _validate(source or {})
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        raw = read_yaml(path)
        try:
            return _validate(raw)
        except ConfigError as e:
            raise ConfigError(f"{e} (in config file '{path}')") from e
    raise ConfigError(f"config source must be a YAML file path, a mapping, a Config or None, "
                      f"got {type(source).__name__}")


# --------------------------------------------------------------------------------------
# YAML files
# --------------------------------------------------------------------------------------

class _LimitError(yaml.MarkedYAMLError):
    """A YAML document past MAX_CONFIG_VALUES or MAX_CONFIG_DEPTH: valid YAML, too big to read safely."""


class _PythonParser(Reader, Scanner, Parser):
    """PyYAML's pure-Python event parser, for a PyYAML built without libyaml."""

    def __init__(self, stream: str):
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)


# libyaml's event parser (about 8x faster than Python's) when PyYAML has it; the composer is Python's either way.
_EventParser: type = yaml.cyaml.CParser if getattr(yaml, "__with_libyaml__", False) else _PythonParser


def _node_children(node: yaml.Node) -> Sequence[yaml.Node]:
    """The key and value nodes of a YAML mapping node, the items of a sequence node; nothing for a scalar."""
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else ()


class _StrictLoader(Composer, _EventParser, SafeConstructor, Resolver):
    """A safe loader (SafeLoader's tags) that refuses duplicate keys, which PyYAML silently overwrites,
    and documents past the limits: counted while composing, and with aliases expanded (an alias bomb)
    before anything is constructed."""

    def __init__(self, stream: str):
        _EventParser.__init__(self, stream)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._composed = 0  # nodes composed so far, an alias counting once
        self._depth = 0     # nesting of the node being composed (the document's root is 0)

    def compose_node(self, parent: Optional[yaml.Node], index: Any) -> yaml.Node:
        mark = self.peek_event().start_mark
        self._composed += 1
        if self._composed > MAX_CONFIG_VALUES:
            raise _LimitError(None, None, f"more than {MAX_CONFIG_VALUES:,} values; a config holds a few hundred",
                              mark)
        if self._depth > MAX_CONFIG_DEPTH:
            raise _LimitError(None, None, f"lists and mappings nest more than {MAX_CONFIG_DEPTH} levels deep", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: yaml.Node) -> Any:
        problem = _overflow(node, _node_children)
        if problem == "values":
            raise _LimitError(None, None, f"YAML aliases expand to more than {MAX_CONFIG_VALUES:,} values "
                                          f"(an alias bomb?)")
        if problem == "depth":
            raise _LimitError(None, None, f"YAML aliases nest lists and mappings more than {MAX_CONFIG_DEPTH} "
                                          f"levels deep (an alias inside its own anchor?)")
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: let SafeConstructor report it
                continue
            if duplicate:
                raise ConstructorError("while constructing a mapping", node.start_mark,
                                       f"found duplicate key {preview(key)}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _where(mark: Any) -> str:
    """", line L, column C" of a YAML error mark; empty without one."""
    return f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _read_text(path: str) -> str:
    """The text of config file ``path``; its size is checked first and at most MAX_CONFIG_BYTES + 1 bytes are read."""
    import tensorflow as tf  # lazy: keeps ``import tf_bf16.config`` cheap

    if not tf.io.gfile.exists(path):
        raise ConfigError(f"config file '{path}' does not exist")
    if tf.io.gfile.isdir(path):
        raise ConfigError(f"config file '{path}' is a directory, not a YAML file")
    try:
        size = tf.io.gfile.stat(path).length
        data = b""
        if size <= MAX_CONFIG_BYTES:
            with tf.io.gfile.GFile(path, "rb") as f:
                data = f.read(MAX_CONFIG_BYTES + 1)  # also stops a file that grew, or that reports no size
    except tf.errors.OpError as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e}") from e
    if size > MAX_CONFIG_BYTES or len(data) > MAX_CONFIG_BYTES:
        shown = f"{size:,}" if size > MAX_CONFIG_BYTES else f"more than {MAX_CONFIG_BYTES:,}"
        raise ConfigError(f"config file '{path}' is {shown} bytes; the limit is {MAX_CONFIG_BYTES:,} bytes "
                          f"(a config is a few kB)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e}") from e


def _parse_yaml(text: str, path: str) -> Any:
    """The YAML document in ``text``; ConfigError naming ``path`` (and the line) when it is bad or too big."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeConstructor: plain data only
    except _LimitError as e:
        raise ConfigError(f"config file '{path}'{_where(e.problem_mark)}: {e.problem}") from e
    except yaml.MarkedYAMLError as e:
        problem = "; ".join(p for p in (e.context, e.problem) if p)
        raise ConfigError(f"config file '{path}'{_where(e.problem_mark or e.context_mark)}: invalid YAML: "
                          f"{_cut(problem, 200)}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}': invalid YAML: {_cut(str(e), 200)}") from e
    except ValueError as e:  # valid YAML that Python cannot build: an int of 5,000 digits, 2001-13-45
        raise ConfigError(f"config file '{path}': a value cannot be read: {_cut(str(e), 200)}") from e


def read_yaml(path: str) -> Dict[str, Any]:
    """The top-level mapping of a YAML file read via ``tf.io.gfile`` (local, gs://, hdfs://...), within the limits."""
    data = _parse_yaml(_read_text(path), path)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file '{path}': the top level must be a mapping of config keys, "
                          f"got {type(data).__name__}")
    return dict(data)
