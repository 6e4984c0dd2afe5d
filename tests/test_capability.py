"""Tests for tf_bf16/capability.py: CPU flag parsing, targets, the BF16 gate and the kernel registry."""

import dataclasses
import logging
import sys
import types

import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2

from tf_bf16 import capability as cap
from tf_bf16.errors import ConfigError, UnsupportedHardwareError

BF16 = types_pb2.DT_BFLOAT16
FLOAT = types_pb2.DT_FLOAT

SPR_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""

AVX2_CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7763 64-Core Processor
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi2 vaes vpclmulqdq
"""

CPX_CPUINFO = """\
model name\t: Intel(R) Xeon(R) Platinum 8380H CPU @ 2.90GHz
flags\t\t: fpu sse avx avx2 avx512f avx512vl avx512_vnni avx512_bf16
"""


def _write(tmp_path, text):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return str(path)


def _capability(cpu, target=None, kernels=True, onednn=True):
    return cap.Capability(cpu=cpu, target_name=target, tf_version="2.21.0",
                          onednn_enabled=onednn, tf_bf16_kernels=kernels)


@pytest.fixture(scope="module")
def registry():
    return cap.KernelRegistry()


# ---------------------------------------------------------------- cpuinfo parsing

def test_spr_cpuinfo(tmp_path):
    cpu = cap.detect_cpu_features(_write(tmp_path, SPR_CPUINFO))
    assert cpu == cap.CpuFeatures(avx512f=True, avx512_bf16=True, amx_bf16=True, amx_int8=True,
                                  avx512_vnni=True, model_name="Intel(R) Xeon(R) Platinum 8480+")
    assert cpu.bf16_native


def test_avx2_cpuinfo(tmp_path):
    cpu = cap.detect_cpu_features(_write(tmp_path, AVX2_CPUINFO))
    assert not any((cpu.avx512f, cpu.avx512_bf16, cpu.amx_bf16, cpu.amx_int8, cpu.avx512_vnni))
    assert cpu.model_name == "AMD EPYC 7763 64-Core Processor"
    assert not cpu.bf16_native


def test_avx2_cpu_is_refused_unless_forced(tmp_path):
    capability = cap.resolve_capability(cpuinfo_path=_write(tmp_path, AVX2_CPUINFO), env={})
    assert capability.target_name is None and not capability.bf16_native
    with pytest.raises(UnsupportedHardwareError) as info:
        cap.check_bf16(capability, force=False)
    message = str(info.value)
    assert "avx512_bf16" in message and "AMD EPYC 7763" in message
    assert "FORCE_BF16=1" in message and "target='spr'" in message
    warnings = cap.check_bf16(capability, force=True)
    assert any("avx512_bf16" in w and "FORCE_BF16" in w for w in warnings)


def test_cooper_lake_passes_with_no_amx_advisory(tmp_path):
    capability = cap.resolve_capability(cpuinfo_path=_write(tmp_path, CPX_CPUINFO),
                                        env={"TF_ENABLE_ONEDNN_OPTS": "1"})
    assert capability.cpu.avx512_bf16 and not capability.cpu.amx_bf16
    assert capability.missing() == []
    warnings = cap.check_bf16(capability, force=False)
    assert len(warnings) == 1 and "AMX" in warnings[0]


def test_flag_spelling_variants():
    cpu = cap.CpuFeatures.from_flags(["AVX512F", "avx512bf16", "amx-bf16", "avx512vnni"], "x")
    assert cpu.avx512f and cpu.avx512_bf16 and cpu.amx_bf16 and cpu.avx512_vnni and not cpu.amx_int8


def test_unreadable_cpuinfo_without_py_cpuinfo_is_all_false(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "cpuinfo", None)  # import cpuinfo -> ImportError
    with caplog.at_level(logging.WARNING, logger=cap.__name__):
        cpu = cap.detect_cpu_features(str(tmp_path / "missing"))
    assert not cpu.bf16_native and not cpu.avx512f
    assert "py-cpuinfo" in caplog.text


def test_unreadable_cpuinfo_uses_py_cpuinfo(tmp_path, monkeypatch):
    fake = types.SimpleNamespace(get_cpu_info=lambda: {
        "flags": ["avx512f", "avx512_bf16", "amx_bf16", "amx_int8"], "brand_raw": "Fake Xeon"})
    monkeypatch.setitem(sys.modules, "cpuinfo", fake)
    cpu = cap.detect_cpu_features(str(tmp_path / "missing"))
    assert cpu.amx_bf16 and cpu.avx512_bf16 and cpu.amx_int8 and not cpu.avx512_vnni
    assert cpu.model_name == "Fake Xeon"


def test_real_machine_gate_matches_its_flags():
    """On this machine (AVX2 dev box: refused; an AMX box: allowed) the gate follows /proc/cpuinfo."""
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    capability = cap.resolve_capability()
    assert capability.bf16_native == native
    if native:
        cap.check_bf16(capability, force=False)
    else:
        with pytest.raises(UnsupportedHardwareError, match="avx512_bf16"):
            cap.check_bf16(capability, force=False)
        assert cap.check_bf16(capability, force=True)


# ---------------------------------------------------------------- targets and env

def test_target_spr_passes_on_any_machine(tmp_path):
    capability = cap.resolve_capability("spr", env={}, cpuinfo_path=_write(tmp_path, AVX2_CPUINFO))
    assert capability.target_name == "spr" and capability.cpu.amx_bf16
    assert capability.cpu == cap.TARGETS["spr"]
    assert cap.check_bf16(capability, force=False) == []


def test_targets():
    assert cap.target_features("CPX") == cap.TARGETS["cpx"]
    cpx = cap.TARGETS["cpx"]
    assert cpx.avx512_bf16 and cpx.avx512_vnni and not cpx.amx_bf16 and not cpx.amx_int8
    generic = cap.TARGETS["avx512_bf16"]
    assert generic.avx512_bf16 and not generic.amx_bf16
    with pytest.raises(TypeError):
        cap.TARGETS["icx"] = cap.CpuFeatures()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cpx.amx_bf16 = True


def test_unknown_target_names_allowed_values():
    with pytest.raises(ConfigError) as info:
        cap.resolve_capability("skylake", env={})
    message = str(info.value)
    assert "skylake" in message
    for name in ("spr", "cpx", "avx512_bf16"):
        assert name in message


def test_missing_tf_kernels_blocks_even_a_bf16_cpu():
    capability = _capability(cap.TARGETS["spr"], target="spr", kernels=False)
    with pytest.raises(UnsupportedHardwareError) as info:
        cap.check_bf16(capability, force=False)
    assert "TensorFlow 2.21.0" in str(info.value) and "MatMul" in str(info.value)
    assert "target=" not in str(info.value)  # another target would not help
    assert len(cap.check_bf16(capability, force=True)) == 1


def test_onednn_advisory_only_for_this_machine():
    spr = cap.TARGETS["spr"]
    assert any("oneDNN" in w for w in cap.check_bf16(_capability(spr, onednn=False), False))
    assert cap.check_bf16(_capability(spr, target="spr", onednn=False), False) == []


def test_env_mappings():
    assert cap.force_requested({"FORCE_BF16": "1"}) and cap.force_requested({"FORCE_BF16": "True"})
    assert not cap.force_requested({}) and not cap.force_requested({"FORCE_BF16": "0"})
    assert cap.resolve_capability("spr", env={"TF_ENABLE_ONEDNN_OPTS": "0"}).onednn_enabled is False
    assert cap.resolve_capability("spr", env={"TF_ENABLE_ONEDNN_OPTS": "1"}).onednn_enabled is True
    assert cap.resolve_capability("spr", env={}).tf_version == tf.__version__


# ---------------------------------------------------------------- kernel registry

def test_conv2d_and_matmul_take_bf16(registry):
    assert "T" in registry.bf16_attrs("Conv2D")
    assert "T" in registry.bf16_attrs("MatMul")
    assert registry.has_cpu_kernel("Conv2D")


def test_fused_batch_norm_bf16_on_t_not_u(registry):
    assert registry.bf16_attrs("FusedBatchNormV3") == frozenset({"T"})
    assert registry.float_attrs("FusedBatchNormV3") == frozenset({"T", "U"})
    assert registry.supports("FusedBatchNormV3", {"T": BF16, "U": FLOAT})
    assert not registry.supports("FusedBatchNormV3", {"T": BF16, "U": BF16})


def test_cast_and_index_attrs(registry):
    assert registry.bf16_attrs("Cast") == frozenset({"SrcT", "DstT"})
    assert registry.bf16_attrs("Mean") == frozenset({"T"})           # Tidx is int-only
    assert registry.bf16_attrs("Tile") == frozenset({"T"})           # CPU kernel constrains only Tmultiples
    assert registry.bf16_attrs("Reshape") == frozenset({"T"})
    assert registry.float_attrs("ConcatV2") == frozenset({"T"})


def test_unknown_op_is_empty(registry):
    assert registry.bf16_attrs("NoSuchOpAtAll") == frozenset()
    assert registry.float_attrs("NoSuchOpAtAll") == frozenset()
    assert not registry.has_cpu_kernel("NoSuchOpAtAll")
    assert not registry.supports("NoSuchOpAtAll", {"T": BF16})


def test_opdef_and_combination_limits(registry):
    # _FusedConv2D has a bf16 CPU kernel registered, but its OpDef rejects T=bfloat16.
    assert registry.has_cpu_kernel("_FusedConv2D") and "T" not in registry.bf16_attrs("_FusedConv2D")
    assert registry.bf16_attrs("Lgamma") == frozenset()
    assert registry.supports("BatchMatMulV3", {"Ta": BF16, "Tb": BF16, "Tout": BF16})
    assert not registry.supports("BatchMatMulV3", {"Ta": BF16, "Tb": FLOAT, "Tout": BF16})


def _onednn_runs_bf16_here() -> bool:
    """Whether this process's oneDNN rewrites BF16 nodes to its own kernels on this CPU.

    oneDNN is on (TF_ENABLE_ONEDNN_OPTS, or TensorFlow's default for the CPU) and the CPU has
    AVX-512; on AVX2 TensorFlow logs that oneDNN supports BF16 only with AVX-512 and keeps
    its Eigen kernels.
    """
    import os

    return cap.onednn_enabled(os.environ) and cap.detect_cpu_features().avx512f


def test_registry_answers_match_execution(registry):
    """What the registry claims is what TensorFlow's CPU executor actually does, on this CPU."""
    x = tf.ones([1, 4, 4, 2], tf.bfloat16)
    assert "T" in registry.bf16_attrs("Tile") and registry.bf16_attrs("FusedBatchNormV3") == frozenset({"T"})
    assert registry.bf16_attrs("Lgamma") == frozenset()
    with tf.device("/CPU:0"):
        assert tf.raw_ops.Tile(input=x, multiples=[1, 2, 1, 1]).dtype == tf.bfloat16
        scale = tf.ones([2], tf.float32)
        out = tf.raw_ops.FusedBatchNormV3(x=x, scale=scale, offset=scale, mean=scale,
                                          variance=scale, is_training=False)
        assert out[0].dtype == tf.bfloat16
        b = tf.ones([2], tf.bfloat16)
        # U=bfloat16 has no kernel. Where oneDNN runs BF16 (AVX-512 CPUs) the node is first
        # rewritten to _MklNativeFusedBatchNormV3, which refuses it as an invalid argument;
        # elsewhere the stock kernel lookup finds nothing.
        refused = tf.errors.InvalidArgumentError if _onednn_runs_bf16_here() else tf.errors.NotFoundError
        with pytest.raises(refused):
            tf.raw_ops.FusedBatchNormV3(x=x, scale=b, offset=b, mean=b, variance=b, is_training=False)
        with pytest.raises(tf.errors.NotFoundError):
            tf.raw_ops.Lgamma(x=b)


def test_registry_memoizes_per_instance(registry):
    first = registry.bf16_attrs("AddV2")
    assert registry.bf16_attrs("AddV2") is first
    assert cap.KernelRegistry().bf16_attrs("AddV2") == first


@pytest.mark.parametrize("flags, levels", [
    ((), 63), (("avx2", "fma"), 63), (("avx512_vnni",), 127), (("avx_vnni",), 127), (("amx_int8",), 127),
])
def test_int8_weight_levels_follow_the_dot_product_instructions(flags, levels):
    features = cap.CpuFeatures.from_flags(flags)
    assert features.int8_weight_max == levels
    assert features.int8_dot_native == (levels == 127)
    assert cap.target_features("spr").int8_weight_max == 127
