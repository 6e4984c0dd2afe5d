"""What this CPU and this TensorFlow build can run in BF16, and whether converting is worth it.

Three questions, each answered from the machine's own sources rather than hard-coded tables:
which BF16 instructions the CPU has (``/proc/cpuinfo`` flags, or a named target CPU), which
ops TensorFlow has BF16 CPU kernels for (TensorFlow's kernel registry), and whether oneDNN is
on. ``check_bf16`` turns the answers into either a go-ahead (with warnings) or an
``UnsupportedHardwareError`` naming what is missing. Nothing here reads ``os.environ`` except
``resolve_capability`` when no ``env`` mapping is passed, and nothing calls ``sys.exit``.
TensorFlow is imported inside the functions that ask it, so the CPU tables (``TARGETS``) can
be imported, e.g. by the config, without loading TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import types
from typing import TYPE_CHECKING, Dict, FrozenSet, Iterable, List, Mapping, Optional, Tuple

from absl import logging

from tf_bf16.errors import ConfigError, UnsupportedHardwareError

if TYPE_CHECKING:
    from tensorflow.core.framework import kernel_def_pb2

# Kernel device types that serve a CPU node: TensorFlow falls back to DEVICE_DEFAULT
# registrations when no CPU kernel matches.
CPU_DEVICE_TYPES: FrozenSet[str] = frozenset({"CPU", "DEFAULT"})

# Ops whose BF16 CPU kernels a build must have for BF16 conversion to make sense at all.
CORE_BF16_OPS: Tuple[str, ...] = ("MatMul", "Conv2D")

# Values of FORCE_BF16 (case-insensitive) that mean "convert even without native BF16".
_TRUE_STRINGS = frozenset({"1", "true", "yes", "on"})
_FALSE_STRINGS = frozenset({"0", "false", "no", "off"})


# --------------------------------------------------------------------------------------
# CPU features
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CpuFeatures:
    """The CPU instruction-set extensions that matter for BF16/INT8 speed, plus its name."""

    avx512f: bool = False
    avx512_bf16: bool = False
    amx_bf16: bool = False
    amx_int8: bool = False
    avx512_vnni: bool = False
    avx_vnni: bool = False
    model_name: str = "unknown CPU"

    @property
    def bf16_native(self) -> bool:
        """True when the CPU executes BF16 dot products in hardware (AVX512-BF16 or AMX)."""
        return self.avx512_bf16 or self.amx_bf16

    @property
    def int8_dot_native(self) -> bool:
        """True when INT8 dot products accumulate in int32 directly (VNNI or AMX), without the
        saturating int16 pair sums AVX2's vpmaddubsw uses."""
        return self.avx512_vnni or self.avx_vnni or self.amx_int8

    @property
    def int8_weight_max(self) -> int:
        """The largest INT8 weight magnitude that is exact here: 127, or 63 without VNNI/AMX."""
        return 127 if self.int8_dot_native else 63

    @classmethod
    def from_flags(cls, flags: Iterable[str], model_name: str = "unknown CPU") -> "CpuFeatures":
        """Features from CPU flag names, tolerant of spelling (``avx512_bf16``, ``avx512bf16``, ``amx-bf16``)."""
        normalized = {_normalize_flag(f) for f in flags}
        values = {name: _normalize_flag(name) in normalized for name in _FEATURE_FLAGS}
        return cls(model_name=model_name or "unknown CPU", **values)


# The boolean fields of CpuFeatures; their names are the Linux /proc/cpuinfo flag names.
_FEATURE_FLAGS: Tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(CpuFeatures) if f.type in (bool, "bool"))


def _normalize_flag(flag: str) -> str:
    return flag.strip().lower().replace("_", "").replace("-", "")


def parse_cpuinfo(text: str) -> CpuFeatures:
    """Features from the text of ``/proc/cpuinfo`` (the first ``flags`` and ``model name`` lines)."""
    flags: Optional[List[str]] = None
    model = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "flags" and flags is None:
            flags = value.split()
        elif key == "model name" and not model:
            model = value.strip()
        if flags is not None and model:
            break
    return CpuFeatures.from_flags(flags or (), model)


def detect_cpu_features(cpuinfo_path: str = "/proc/cpuinfo") -> CpuFeatures:
    """Features of the CPU this process runs on.

    Reads ``cpuinfo_path`` (Linux). When it cannot be read (another OS, a sandbox), falls
    back to the optional ``py-cpuinfo`` package (which issues CPUID itself); without it,
    every feature is reported absent and a warning is logged, so BF16 is refused unless
    forced or a target CPU is named.
    """
    try:
        with open(cpuinfo_path, "r", encoding="utf-8", errors="replace") as f:
            return parse_cpuinfo(f.read())
    except OSError as exc:
        reason = f"{cpuinfo_path} is unreadable ({exc.strerror or exc})"
    try:
        import cpuinfo  # py-cpuinfo, optional
    except ImportError:
        logging.warning("%s and py-cpuinfo is not installed; assuming the CPU has no "
                        "avx512_bf16/amx_bf16 (pass a target or install py-cpuinfo)", reason)
        return CpuFeatures(model_name=platform.processor() or "unknown CPU")
    info = cpuinfo.get_cpu_info()
    return CpuFeatures.from_flags(info.get("flags", ()), info.get("brand_raw", "") or platform.processor())


# Named CPUs to convert for when the converting machine is not the deployment machine.
TARGETS: Mapping[str, CpuFeatures] = types.MappingProxyType({
    "spr": CpuFeatures(avx512f=True, avx512_bf16=True, amx_bf16=True, amx_int8=True,
                       avx512_vnni=True, model_name="Sapphire Rapids (target 'spr')"),
    "cpx": CpuFeatures(avx512f=True, avx512_bf16=True, avx512_vnni=True,
                       model_name="Cooper Lake (target 'cpx')"),
    "avx512_bf16": CpuFeatures(avx512f=True, avx512_bf16=True,
                               model_name="generic AVX512-BF16 CPU (target 'avx512_bf16')"),
})


def target_features(name: str) -> CpuFeatures:
    """The features of a named target CPU; ConfigError naming the allowed names otherwise."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in TARGETS:
        raise ConfigError(f"unknown target {name!r}; allowed values: {', '.join(sorted(TARGETS))}")
    return TARGETS[key]


# --------------------------------------------------------------------------------------
# TensorFlow kernels
# --------------------------------------------------------------------------------------

class KernelRegistry:
    """Which type attrs of an op a CPU kernel accepts as bfloat16, from TensorFlow's registry.

    A kernel counts when it is registered for device type CPU or DEFAULT with no label (a
    labelled kernel is picked only for nodes that ask for that label). An attr is BF16-capable
    when the OpDef allows bfloat16 for it (otherwise the node does not validate) and some such
    kernel either lists bfloat16 in its constraint on the attr or leaves the attr unconstrained.
    Answers are memoized per instance.
    """

    def __init__(self) -> None:
        self._kernels: Dict[str, Tuple[kernel_def_pb2.KernelDef, ...]] = {}
        self._bf16: Dict[str, FrozenSet[str]] = {}

    def cpu_kernels(self, op: str) -> Tuple[kernel_def_pb2.KernelDef, ...]:
        """The unlabelled CPU/DEFAULT KernelDefs registered for ``op`` (empty if unknown)."""
        if op not in self._kernels:
            from tensorflow.python.framework import kernels

            found = kernels.get_registered_kernels_for_op(op).kernel
            self._kernels[op] = tuple(
                k for k in found if k.device_type in CPU_DEVICE_TYPES and not k.label)
        return self._kernels[op]

    def has_cpu_kernel(self, op: str) -> bool:
        """True when TensorFlow can run ``op`` on the CPU at all (for some dtypes)."""
        return bool(self.cpu_kernels(op))

    def type_attrs(self, op: str) -> Dict[str, Optional[FrozenSet[int]]]:
        """The OpDef's type / list(type) attrs and their allowed dtypes (None = any dtype)."""
        from tensorflow.python.framework import op_def_registry

        op_def = op_def_registry.get(op)
        if op_def is None:
            return {}
        return {a.name: (frozenset(a.allowed_values.list.type) or None)
                for a in op_def.attr if a.type in ("type", "list(type)")}

    def float_attrs(self, op: str) -> FrozenSet[str]:
        """Type attrs that can hold float32, i.e. the attrs a converter could retype to BF16."""
        from tensorflow.core.framework import types_pb2

        return frozenset(name for name, allowed in self.type_attrs(op).items()
                         if allowed is None or types_pb2.DT_FLOAT in allowed)

    def bf16_attrs(self, op: str) -> FrozenSet[str]:
        """Type attrs of ``op`` that at least one CPU kernel (and the OpDef) accepts as bfloat16."""
        if op not in self._bf16:
            from tensorflow.core.framework import types_pb2

            bf16 = types_pb2.DT_BFLOAT16
            opdef_ok = {name for name, allowed in self.type_attrs(op).items() if allowed is None or bf16 in allowed}
            found = set()
            for kernel in self.cpu_kernels(op):
                constraints = _constraints(kernel)
                found.update(name for name in opdef_ok if name not in constraints or bf16 in constraints[name])
            self._bf16[op] = frozenset(found)
        return self._bf16[op]

    def supports(self, op: str, dtypes: Mapping[str, int]) -> bool:
        """True when one CPU kernel accepts every ``attr -> dtype`` in ``dtypes`` at once.

        Per-attr answers can overstate: BatchMatMulV3 takes bf16 on Ta, Tb and Tout, but not
        Ta=bf16 with Tb=float32. Attrs left out of ``dtypes`` are not checked.
        """
        attrs = self.type_attrs(op)
        for name, dtype in dtypes.items():
            if name not in attrs or (attrs[name] is not None and dtype not in attrs[name]):
                return False
        for kernel in self.cpu_kernels(op):
            constraints = _constraints(kernel)
            if all(name not in constraints or dtype in constraints[name]
                   for name, dtype in dtypes.items()):
                return True
        return False


def _constraints(kernel: kernel_def_pb2.KernelDef) -> Dict[str, FrozenSet[int]]:
    return {c.name: frozenset(c.allowed_values.list.type) for c in kernel.constraint}


# --------------------------------------------------------------------------------------
# Capability and the BF16 gate
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Capability:
    """Everything the BF16 gate decides on: the (target) CPU and this TensorFlow build."""

    cpu: CpuFeatures
    target_name: Optional[str]
    tf_version: str
    onednn_enabled: bool
    tf_bf16_kernels: bool = True

    @property
    def bf16_native(self) -> bool:
        """True when the CPU has avx512_bf16 or amx_bf16."""
        return self.cpu.bf16_native

    def missing(self) -> List[str]:
        """What is missing for fast BF16, one sentence each; empty when nothing is."""
        out = []
        if not self.bf16_native:
            what = f"target {self.target_name!r}" if self.target_name else "this CPU"
            out.append(f"{what} ({self.cpu.model_name}) has no avx512_bf16 or amx_bf16")
        if not self.tf_bf16_kernels:
            out.append(f"TensorFlow {self.tf_version} has no bfloat16 CPU kernel for "
                       f"{' / '.join(CORE_BF16_OPS)}")
        return out

    def advisories(self) -> List[str]:
        """Things that do not block BF16 but make it slower than it could be."""
        out = []
        if self.target_name is None and not self.onednn_enabled:
            out.append("oneDNN is disabled in this TensorFlow process (TF_ENABLE_ONEDNN_OPTS); "
                       "BF16 ops run on slower Eigen kernels unless it is enabled at inference time")
        if self.bf16_native and not self.cpu.amx_bf16:
            out.append(f"{self.cpu.model_name} has no AMX: BF16 speed-up comes from avx512_bf16 only")
        return out


def env_flag(env: Mapping[str, str], name: str) -> Optional[bool]:
    """A boolean environment variable: True/False when set to a recognised value, else None."""
    value = env.get(name)
    if value is None:
        return None
    value = value.strip().lower()
    if value in _TRUE_STRINGS:
        return True
    if value in _FALSE_STRINGS:
        return False
    return None


def force_requested(env: Mapping[str, str]) -> bool:
    """True when ``FORCE_BF16`` in ``env`` asks to convert without native BF16 (1/true/yes/on)."""
    return bool(env_flag(env, "FORCE_BF16"))


def onednn_enabled(env: Mapping[str, str]) -> bool:
    """Whether oneDNN kernels are on: ``TF_ENABLE_ONEDNN_OPTS`` in ``env`` when set, else TF's own answer.

    TensorFlow decides from that same variable at start-up (default: on for CPUs with
    AVX512/AMX), so with ``env=os.environ`` this agrees with the running process.
    """
    explicit = env_flag(env, "TF_ENABLE_ONEDNN_OPTS")
    if explicit is not None:
        return explicit
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return False
    return bool(_pywrap_util_port.IsMklEnabled())


def tf_version() -> str:
    """The version string of the installed TensorFlow."""
    from tensorflow.python.framework import versions
    return versions.__version__


def resolve_capability(target: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                       cpuinfo_path: str = "/proc/cpuinfo",
                       registry: Optional[KernelRegistry] = None) -> Capability:
    """The capability to convert for: a named ``target`` CPU, or this machine's CPU.

    ``env`` defaults to ``os.environ``; pass a dict to test. ``registry`` may be shared with
    the converter so kernel lookups are done once.
    """
    env = os.environ if env is None else env
    cpu = target_features(target) if target is not None else detect_cpu_features(cpuinfo_path)
    registry = registry if registry is not None else KernelRegistry()
    return Capability(
        cpu=cpu,
        target_name=target.strip().lower() if target is not None else None,
        tf_version=tf_version(),
        onednn_enabled=onednn_enabled(env),
        tf_bf16_kernels=all("T" in registry.bf16_attrs(op) for op in CORE_BF16_OPS),
    )


def check_bf16(capability: Capability, force: bool) -> List[str]:
    """Gate BF16 conversion: raise UnsupportedHardwareError naming what is missing unless ``force``.

    Returns the warnings to show the user (forced gaps and advisories); never exits.
    """
    missing = capability.missing()
    if missing and not force:
        hints = ["set FORCE_BF16=1 to convert anyway (inference will be slow)"]
        if not capability.bf16_native and capability.target_name is None:
            hints.append("pass target='spr' to convert for another CPU")
        raise UnsupportedHardwareError("; ".join(missing) + "; " + " or ".join(hints))
    forced = [f"{m}; converting anyway because FORCE_BF16 is set (inference will be slow)"
              for m in missing]
    return forced + capability.advisories()
