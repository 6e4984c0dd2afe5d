// INT8 plumbing shared by the TfBf16QuantizedConv2D and TfBf16QuantizedMatMul kernels.
//
// These ops run a oneDNN INT8 primitive (u8/s8 activations x s8 weights, s32 accumulation;
// AMX-INT8 / VNNI where the CPU has them) with static scales from the calibrated ranges in
// their attributes. A float or BF16 input is quantized inside the op, so a chain needs no
// QuantizeV2; the output is FP32, BF16 (the Dequantize folded in) or UINT8/INT8 for the next
// INT8 op; bias, residual add and activation are applied in FP32 before the output rounding.

#ifndef TF_BF16_KERNELS_INT8_H_
#define TF_BF16_KERNELS_INT8_H_

#include <cmath>
#include <string>
#include <vector>

#include "common.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/types.h"

namespace tf_bf16 {

using tensorflow::DataType;

inline bool IsQuantizedType(DataType type) {
  return type == tensorflow::DT_QUINT8 || type == tensorflow::DT_QINT8;
}

inline memory::data_type DnnlTypeOf(DataType type) {
  switch (type) {
    case tensorflow::DT_BFLOAT16:
      return memory::data_type::bf16;
    case tensorflow::DT_QUINT8:
      return memory::data_type::u8;
    case tensorflow::DT_QINT8:
      return memory::data_type::s8;
    default:
      return memory::data_type::f32;
  }
}

// Whether oneDNN multiplies u8 x s8 (and s8 x s8) in int32 here (VNNI, AMX). Without it an
// s8 source makes oneDNN halve the weights to keep int16 pair sums from overflowing.
inline bool CpuHasVnni() {
  using isa = dnnl::cpu_isa;
  switch (dnnl::get_effective_cpu_isa()) {
    case isa::isa_default:
    case isa::sse41:
    case isa::avx:
    case isa::avx2:
    case isa::avx512_core:
      return false;
    default:
      return true;
  }
}

// What the attributes of one quantized op say, checked once at construction.
struct QuantizedSpec {
  DataType input_type = tensorflow::DT_FLOAT;
  DataType output_type = tensorflow::DT_FLOAT;
  DataType residual_type = tensorflow::DT_INVALID;  // with an Add in fused_ops
  bool src_unsigned = false;    // the primitive reads u8 (else s8)
  float src_scale = 1.f;
  int32_t src_zero_point = 0;   // 128 for a signed source read as u8 (see below)
  std::vector<float> filter_scales;  // one, or one per output channel
  bool clip = false;            // float output clipped to output_range (what INT8 saturated at)
  float out_min = 0.f, out_max = 0.f;
  float dst_scale = 1.f;        // quantized output only
  float summand_scale = 1.f;    // quantized residual only
  FusedOps fused;
  bool weights_constant = false;

  bool quantized_output() const { return IsQuantizedType(output_type); }
};

inline absl::Status ReadQuantizedAttrs(tensorflow::OpKernelConstruction* c, const char* op,
                                       QuantizedSpec* out) {
  QuantizedSpec spec;
  std::vector<DataType> arg_types;
  std::vector<std::string> names;
  std::vector<float> input_range, output_range, summand_range;
  TF_RETURN_IF_ERROR(c->GetAttr("Tinput", &spec.input_type));
  TF_RETURN_IF_ERROR(c->GetAttr("Tout", &spec.output_type));
  TF_RETURN_IF_ERROR(c->GetAttr("Targs", &arg_types));
  TF_RETURN_IF_ERROR(c->GetAttr("fused_ops", &names));
  TF_RETURN_IF_ERROR(c->GetAttr("weights_constant", &spec.weights_constant));
  TF_RETURN_IF_ERROR(c->GetAttr("input_range", &input_range));
  TF_RETURN_IF_ERROR(c->GetAttr("filter_scales", &spec.filter_scales));
  TF_RETURN_IF_ERROR(c->GetAttr("output_range", &output_range));
  TF_RETURN_IF_ERROR(c->GetAttr("summand_range", &summand_range));
  TF_RETURN_IF_ERROR(ParseFusedOps(op, names, static_cast<int>(arg_types.size()), &spec.fused));

  // A float input with a non-negative range is quantized to UINT8. A signed one gets INT8's
  // 127 steps a side, stored as UINT8 with zero point 128: oneDNN then runs u8 x s8 as for
  // ReLU outputs, where an s8 source on CPUs without VNNI would halve the weights' precision
  // to avoid int16 overflow.
  const bool float_input = !IsQuantizedType(spec.input_type);
  const bool non_negative = input_range.size() == 2 && input_range[0] >= 0;
  TF_RETURN_IF_ERROR(RangeScale(op, "input_range", input_range,
                                spec.input_type == tensorflow::DT_QUINT8 ||
                                    (float_input && non_negative),
                                &spec.src_scale));
  // A qint8 input is shifted to u8 the same way on CPUs without VNNI.
  const bool shift_qint8 = spec.input_type == tensorflow::DT_QINT8 && !CpuHasVnni();
  spec.src_unsigned = spec.input_type == tensorflow::DT_QUINT8 || float_input || shift_qint8;
  if ((float_input && !non_negative) || shift_qint8) spec.src_zero_point = 128;
  if (spec.filter_scales.empty()) return OpError(op, "filter_scales must not be empty");
  for (float s : spec.filter_scales) {
    if (!(s > 0) || !std::isfinite(s)) {
      return OpError(op, "filter_scales must be positive and finite, got ", s);
    }
  }
  if (spec.fused.bias && arg_types[spec.fused.BiasArg()] != tensorflow::DT_FLOAT) {
    return OpError(op, "the BiasAdd argument must be float");
  }
  if (spec.fused.add) {
    spec.residual_type = arg_types[spec.fused.ResidualArg()];
    if (IsQuantizedType(spec.residual_type)) {
      TF_RETURN_IF_ERROR(RangeScale(op, "summand_range", summand_range,
                                    spec.residual_type == tensorflow::DT_QUINT8,
                                    &spec.summand_scale));
    }
  }
  if (spec.quantized_output()) {
    TF_RETURN_IF_ERROR(RangeScale(op, "output_range", output_range,
                                  spec.output_type == tensorflow::DT_QUINT8, &spec.dst_scale));
  } else if (!output_range.empty()) {
    float unused;
    TF_RETURN_IF_ERROR(RangeScale(op, "output_range", output_range, false, &unused));
    spec.clip = true;
    spec.out_min = output_range[0];
    spec.out_max = output_range[1];
  }
  *out = spec;
  return absl::OkStatus();
}

// Scales of the weights along `channels` output channels: the per-channel list as given, or
// one shared value (mask 0).
inline absl::Status WeightScales(const char* op, const QuantizedSpec& spec, int64_t channels,
                                 std::vector<float>* scales) {
  if (spec.filter_scales.size() != 1 &&
      static_cast<int64_t>(spec.filter_scales.size()) != channels) {
    return OpError(op, "filter_scales has ", spec.filter_scales.size(),
                   " values; it needs 1 or one per output channel (", channels, ")");
  }
  *scales = spec.filter_scales;
  return absl::OkStatus();
}

// Scales, bias rounding and the epilogue of an INT8 primitive: dst = post_ops(src_scale *
// weight_scale * acc + bias) / dst_scale. `per_channel_mask` is the weights' mask for one
// scale per output channel (conv: O, or G and O; matmul: N).
inline dnnl::primitive_attr MakeQuantizedAttr(const QuantizedSpec& spec, int per_channel_mask,
                                              const memory::desc& residual) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  attr.set_scales_mask(DNNL_ARG_SRC, 0);
  if (spec.src_zero_point != 0) attr.set_zero_points_mask(DNNL_ARG_SRC, 0);
  attr.set_scales_mask(DNNL_ARG_WEIGHTS, spec.filter_scales.size() == 1 ? 0 : per_channel_mask);
  if (spec.quantized_output()) attr.set_scales_mask(DNNL_ARG_DST, 0);
  dnnl::post_ops ops;
  if (spec.fused.add) ops.append_binary(dnnl::algorithm::binary_add, residual);
  AppendActivation(spec.fused.activation, &ops);
  if (spec.clip) ops.append_eltwise(dnnl::algorithm::eltwise_clip, spec.out_min, spec.out_max);
  attr.set_post_ops(ops);
  return attr;
}

// An INT8 plan: the primitive with its descriptors (src in u8/s8, residual in FP32; dst in
// FP32 with fp32_fallback when oneDNN has no BF16 output here) and the weight scales.
struct QuantizedPlan {
  PrimitivePlan base;
  std::vector<float> weight_scales;
  std::string implementation;  // oneDNN's name for the chosen implementation
};

inline bool IsReference(const QuantizedPlan& plan) {
  return plan.implementation.rfind("ref", 0) == 0;
}

// build(output type) and, for a BF16 output oneDNN cannot write fast on this CPU (no
// implementation, or only its slow reference one: AVX2 machines), build(f32) marked for
// rounding to BF16 afterwards.
template <typename Build>
QuantizedPlan BuildQuantizedWithFallback(const QuantizedSpec& spec, Build build) {
  const memory::data_type type = DnnlTypeOf(spec.output_type);
  if (type != memory::data_type::bf16) return build(type);
  QuantizedPlan native;
  bool have_native = false;
  try {
    native = build(type);
    have_native = true;
    if (!IsReference(native)) return native;
  } catch (const dnnl::error& e) {
    if (e.status != dnnl_unimplemented) throw;
  }
  QuantizedPlan plan = build(memory::data_type::f32);
  if (have_native && IsReference(plan)) return native;
  plan.base.fp32_fallback = true;
  return plan;
}

// ---------------------------------------------------------------------------------------
// Quantizing inside the op

inline float ToFloat(float x) { return x; }
inline float ToFloat(tensorflow::bfloat16 x) {
  uint16_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return Bf16BitsToFloat(bits);
}

// dst = saturate(round_half_even(src / scale)). Clamping first keeps |v| <= 255, where adding
// and subtracting 1.5 * 2^23 rounds to the nearest integer (ties to even) in FP32 and, unlike
// nearbyint, vectorizes (valid without -ffast-math, which would fold it away).
// `offset` is the zero point added after rounding.
template <typename In, typename Out>
void QuantizeValues(const In* src, Out* dst, int64_t n, float scale, float lo, float hi,
                    int offset) {
  const float inverse = 1.f / scale;
  constexpr float kRound = 12582912.f;
#pragma omp parallel for simd schedule(static) if (n >= kParallelConvertMin)
  for (int64_t i = 0; i < n; ++i) {
    float v = ToFloat(src[i]) * inverse;
    v = v < lo ? lo : (v > hi ? hi : v);
    dst[i] = static_cast<Out>(static_cast<int>((v + kRound) - kRound) + offset);
  }
}

template <typename In>
void DequantizeValues(const In* src, float* dst, int64_t n, float scale) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelConvertMin)
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]) * scale;
}

// A oneDNN memory over `input` in the primitive's u8/s8: the tensor itself when already
// quantized, else a quantized copy in `staging` (a qint8 tensor read as u8 is shifted by 128,
// which flips its top bit).
inline absl::Status BindQuantizedSource(OpKernelContext* ctx, const QuantizedSpec& spec,
                                        const Tensor& input, const memory::desc& md,
                                        Tensor* staging, dnnl::memory* out) {
  const int64_t n = input.NumElements();
  const bool shifted = spec.input_type == tensorflow::DT_QINT8 && spec.src_zero_point != 0;
  if (IsQuantizedType(spec.input_type) && !shifted) {
    *out = dnnl::memory(md, CpuEngine(), const_cast<void*>(input.data()));
    return absl::OkStatus();
  }
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_UINT8, TensorShape({n}), staging));
  if (shifted) {
    const uint8_t* src = static_cast<const uint8_t*>(input.data());
    uint8_t* dst = staging->flat<uint8_t>().data();
#pragma omp parallel for simd schedule(static) if (n >= kParallelConvertMin)
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i] ^ 0x80u;
    *out = dnnl::memory(md, CpuEngine(), staging->data());
    return absl::OkStatus();
  }
  // A float input is always quantized to u8 (see ReadQuantizedAttrs).
  const bool zero_point = spec.src_zero_point != 0;
  const float lo = zero_point ? -127.f : 0.f, hi = zero_point ? 127.f : 255.f;
  uint8_t* dst = staging->flat<uint8_t>().data();
  if (spec.input_type == tensorflow::DT_BFLOAT16) {
    QuantizeValues(input.flat<tensorflow::bfloat16>().data(), dst, n, spec.src_scale, lo, hi,
                   spec.src_zero_point);
  } else {
    QuantizeValues(input.flat<float>().data(), dst, n, spec.src_scale, lo, hi,
                   spec.src_zero_point);
  }
  *out = dnnl::memory(md, CpuEngine(), staging->data());
  return absl::OkStatus();
}

// The residual as the FP32 tensor the binary post-op reads: itself, or a widened /
// dequantized copy in `staging`.
inline absl::Status BindResidual(OpKernelContext* ctx, const QuantizedSpec& spec,
                                 const Tensor& residual, const memory::desc& md, Tensor* staging,
                                 dnnl::memory* out) {
  if (spec.residual_type == tensorflow::DT_FLOAT) {
    *out = dnnl::memory(md, CpuEngine(), const_cast<void*>(residual.data()));
    return absl::OkStatus();
  }
  const int64_t n = residual.NumElements();
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({n}), staging));
  float* dst = staging->flat<float>().data();
  switch (spec.residual_type) {
    case tensorflow::DT_BFLOAT16:
      WidenBf16(residual.flat<tensorflow::bfloat16>().data(), dst, n);
      break;
    case tensorflow::DT_QUINT8:
      DequantizeValues(static_cast<const uint8_t*>(residual.data()), dst, n, spec.summand_scale);
      break;
    default:  // DT_QINT8
      DequantizeValues(static_cast<const int8_t*>(residual.data()), dst, n, spec.summand_scale);
      break;
  }
  *out = dnnl::memory(md, CpuEngine(), staging->data());
  return absl::OkStatus();
}

inline dnnl::memory ScalesMemory(const float* values, int64_t count) {
  const memory::desc md({count}, memory::data_type::f32, memory::format_tag::a);
  return dnnl::memory(md, CpuEngine(), const_cast<float*>(values));
}

// Runs an INT8 plan on `io` (src/residual of the op's input types, dst of its output type).
inline absl::Status ExecuteQuantizedPlan(OpKernelContext* ctx, const QuantizedSpec& spec,
                                         const QuantizedPlan& qplan, const FusedOperands& io,
                                         WeightCache* weight_cache) {
  const PrimitivePlan& plan = qplan.base;
  UseTensorFlowThreads(ctx);
  ExecBuffers buffers;
  ExecArgs args;
  TF_RETURN_IF_ERROR(
      BindQuantizedSource(ctx, spec, *io.src, plan.src, &buffers.src, &args[DNNL_ARG_SRC]));
  if (weight_cache != nullptr && plan.weights != plan.weights_plain) {
    args[DNNL_ARG_WEIGHTS] = weight_cache->Get(*io.weights, plan.weights_plain, plan.weights,
                                               /*widen=*/false);
  } else if (plan.weights != plan.weights_plain) {
    // Non-constant weights in the primitive's preferred layout: reordered per call.
    dnnl::memory plain(plan.weights_plain, CpuEngine(), const_cast<void*>(io.weights->data()));
    dnnl::memory packed(plan.weights, CpuEngine());
    dnnl::stream stream(CpuEngine());
    dnnl::reorder(plain, packed).execute(stream, plain, packed);
    stream.wait();
    args[DNNL_ARG_WEIGHTS] = packed;
  } else {
    args[DNNL_ARG_WEIGHTS] =
        dnnl::memory(plan.weights, CpuEngine(), const_cast<void*>(io.weights->data()));
  }
  if (io.bias != nullptr) {
    args[DNNL_ARG_BIAS] = dnnl::memory(plan.bias, CpuEngine(), const_cast<void*>(io.bias->data()));
  }
  if (io.residual != nullptr) {
    const int arg = DNNL_ARG_ATTR_MULTIPLE_POST_OP(kResidualPostOp) | DNNL_ARG_SRC_1;
    TF_RETURN_IF_ERROR(
        BindResidual(ctx, spec, *io.residual, plan.residual, &buffers.residual, &args[arg]));
  }
  TF_RETURN_IF_ERROR(BindOutput(ctx, plan, io, &buffers, &args));
  TF_RETURN_IF_ERROR(BindScratchpad(ctx, plan, &buffers, &args));
  args[DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC] = ScalesMemory(&spec.src_scale, 1);
  if (spec.src_zero_point != 0) {
    const memory::desc zp_md({1}, memory::data_type::s32, memory::format_tag::a);
    args[DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_SRC] =
        dnnl::memory(zp_md, CpuEngine(), const_cast<int32_t*>(&spec.src_zero_point));
  }
  args[DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS] =
      ScalesMemory(qplan.weight_scales.data(), qplan.weight_scales.size());
  if (spec.quantized_output()) {
    args[DNNL_ARG_ATTR_SCALES | DNNL_ARG_DST] = ScalesMemory(&spec.dst_scale, 1);
  }

  return RunPlan(plan, io, args, &buffers);
}

// The part of Compute both INT8 kernels share, after their geometry is known: check the
// weight scales against `channels`, bind the extra inputs, allocate the output, build (once per
// input shapes) and run the plan. `build(dst_type, scales)` returns the kernel's QuantizedPlan.
template <typename Build>
void ComputeQuantized(OpKernelContext* ctx, const char* op, const QuantizedSpec& spec,
                      const TensorShape& output_shape, int64_t channels, bool empty_input,
                      PlanCache<QuantizedPlan>* plans, WeightCache* weights, Build build) {
  std::vector<float> scales;
  OP_REQUIRES_OK(ctx, WeightScales(op, spec, channels, &scales));
  FusedOperands io;
  io.src = &ctx->input(0);
  io.weights = &ctx->input(1);
  OP_REQUIRES_OK(ctx, BindFusedArgs(ctx, op, spec.fused, output_shape, &io));
  OP_REQUIRES_OK(ctx, ctx->allocate_output(0, output_shape, &io.dst));
  if (output_shape.num_elements() == 0) return;
  OP_REQUIRES(ctx, !empty_input, OpError(op, "an empty inner dimension (input channels) is not supported"));
  auto plan = plans->GetOrCreate(ShapeKey({&io.src->shape(), &io.weights->shape()}), [&] {
    return BuildQuantizedWithFallback(
        spec, [&](memory::data_type dst_type) { return build(dst_type, scales); });
  });
  OP_REQUIRES_OK(ctx, ExecuteQuantizedPlan(ctx, spec, *plan, io,
                                           spec.weights_constant ? weights : nullptr));
}

}  // namespace tf_bf16

#endif  // TF_BF16_KERNELS_INT8_H_
