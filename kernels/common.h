// oneDNN plumbing shared by the TfBf16Conv2D and TfBf16MatMul kernels.
//
// A kernel describes its primitive for one input shape as a PrimitivePlan (built through
// BuildWithFallback, cached per shape in a PlanCache) and runs it with ExecutePlan. The
// kernels only know their own geometry; everything about data types, the BF16 -> FP32
// fallback, fused epilogues, weight pre-packing and threads is here.

#ifndef TF_BF16_KERNELS_COMMON_H_
#define TF_BF16_KERNELS_COMMON_H_

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "op_specs.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/platform/errors.h"

namespace tf_bf16 {

using dnnl::memory;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

// One CPU engine for the process: engines are cheap to use but not to create, and every
// primitive and memory object of these kernels must live on the same one.
inline const dnnl::engine& CpuEngine() {
  static const dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

template <typename T>
memory::data_type DnnlType();
template <>
inline memory::data_type DnnlType<float>() {
  return memory::data_type::f32;
}
template <>
inline memory::data_type DnnlType<tensorflow::bfloat16>() {
  return memory::data_type::bf16;
}

// ---------------------------------------------------------------------------------------
// BF16 <-> FP32. Needed only by the fallback: where oneDNN has no BF16 primitive (CPUs
// without AVX-512), BF16 tensors are widened, the FP32 primitive runs, and the result is
// rounded back to BF16.

inline float Bf16BitsToFloat(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;  // BF16 is FP32's upper half
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

// Round to nearest, ties to even, like TensorFlow's Cast; NaN stays a (quiet) NaN instead of
// possibly rounding into infinity.
inline uint16_t FloatToBf16Bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  const uint32_t lsb = (bits >> 16) & 1u;
  return static_cast<uint16_t>((bits + 0x7fffu + lsb) >> 16);
}

// Below this many elements a parallel region costs more than the conversion itself.
constexpr int64_t kParallelConvertMin = 1 << 16;

inline void WidenBf16(const tensorflow::bfloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp parallel for schedule(static) if (n >= kParallelConvertMin)
  for (int64_t i = 0; i < n; ++i) dst[i] = Bf16BitsToFloat(bits[i]);
}

inline void NarrowToBf16(const float* src, tensorflow::bfloat16* dst, int64_t n) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
#pragma omp parallel for schedule(static) if (n >= kParallelConvertMin)
  for (int64_t i = 0; i < n; ++i) bits[i] = FloatToBf16Bits(src[i]);
}

// ---------------------------------------------------------------------------------------
// Primitive plans

// Everything needed to run one primitive for one input shape. Memory descriptors are in the
// compute type (FP32 when fp32_fallback, else T); `weights` is the layout the primitive
// wants, `weights_plain` the layout of the TensorFlow tensor. bias/residual are empty
// descriptors when the fusion has none.
struct PrimitivePlan {
  dnnl::primitive primitive;
  memory::desc src, weights_plain, weights, bias, residual, dst;
  bool fp32_fallback = false;
  size_t scratchpad_bytes = 0;
};

inline void AppendActivation(Activation activation, dnnl::post_ops* ops) {
  using dnnl::algorithm;
  switch (activation) {
    case Activation::kNone:
      return;
    case Activation::kRelu:
      return ops->append_eltwise(algorithm::eltwise_relu, 0.f, 0.f);
    case Activation::kRelu6:
      return ops->append_eltwise(algorithm::eltwise_clip, 0.f, 6.f);
    case Activation::kGeluErf:
      return ops->append_eltwise(algorithm::eltwise_gelu_erf, 0.f, 0.f);
    case Activation::kGeluTanh:
      return ops->append_eltwise(algorithm::eltwise_gelu_tanh, 0.f, 0.f);
    case Activation::kSigmoid:
      return ops->append_eltwise(algorithm::eltwise_logistic, 0.f, 0.f);
    case Activation::kSwish:  // x * sigmoid(alpha * x) with alpha 1
      return ops->append_eltwise(algorithm::eltwise_swish, 1.f, 0.f);
  }
}

// Index of the residual's binary post-op; Add always precedes the activation.
constexpr int kResidualPostOp = 0;

// Attributes for a fused epilogue. The residual is a binary-add post-op reading the Add
// input directly (a sum post-op would first need the residual copied into the output).
// The scratchpad is user-managed so that concurrent executions of one cached primitive
// never share a buffer.
inline dnnl::primitive_attr MakeAttr(const FusedOps& fused, const memory::desc& residual) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::post_ops ops;
  if (fused.add) ops.append_binary(dnnl::algorithm::binary_add, residual);
  AppendActivation(fused.activation, &ops);
  attr.set_post_ops(ops);
  return attr;
}

// Calls build(type) and, when T is BF16 and oneDNN has no BF16 implementation on this CPU
// (AVX2 machines), build(f32) instead, marking the plan for the widen/narrow fallback.
// Other oneDNN errors propagate.
template <typename Build>
PrimitivePlan BuildWithFallback(memory::data_type type, Build build) {
  if (type != memory::data_type::bf16) return build(type);
  try {
    return build(type);
  } catch (const dnnl::error& e) {
    if (e.status != dnnl_unimplemented) throw;
  }
  PrimitivePlan plan = build(memory::data_type::f32);
  plan.fp32_fallback = true;
  return plan;
}

// Plans of one op instance, keyed by input shapes. Bounded because a model with dynamic
// shapes (varying sequence length) would otherwise grow it forever; clearing everything
// when full is crude but only costs re-creating primitives, which oneDNN's own primitive
// cache makes cheap.
template <typename Plan = PrimitivePlan>
class PlanCache {
 public:
  template <typename Make>
  std::shared_ptr<const Plan> GetOrCreate(const std::vector<int64_t>& key, Make make) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = plans_.find(key);
    if (it != plans_.end()) return it->second;
    auto plan = std::make_shared<const Plan>(make());
    if (plans_.size() >= kMaxPlans) plans_.clear();
    plans_.emplace(key, plan);
    return plan;
  }

 private:
  static constexpr size_t kMaxPlans = 64;
  std::mutex mu_;
  std::map<std::vector<int64_t>, std::shared_ptr<const Plan>> plans_;
};

// A cheap identity check of a weights tensor: 64 words sampled across the buffer, mixed
// (FNV-1a). Not a checksum; it tells apart different weights of the same shape.
inline uint64_t SampleFingerprint(const Tensor& tensor) {
  const char* bytes = static_cast<const char*>(tensor.data());
  const size_t words = tensor.TotalBytes() / sizeof(uint32_t);
  uint64_t hash = 1469598103934665603ull ^ tensor.TotalBytes();
  constexpr size_t kSamples = 64;
  for (size_t i = 0; i < kSamples && words > 0; ++i) {
    uint32_t word;
    std::memcpy(&word, bytes + (i * words / kSamples) * sizeof(word), sizeof(word));
    hash = (hash ^ word) * 1099511628211ull;
  }
  return hash;
}

// Constant weights in the layout (and type) a primitive prefers, prepared once per op
// instance: the reorder, and for the fallback the BF16 -> FP32 widening, then cost nothing
// per call. Keyed by the wanted descriptor, which includes the weight shape.
//
// weights_constant promises one node always sees the same weights, which holds for a graph
// node fed by a Const. Eager mode breaks it: there one kernel instance serves every call with
// equal attributes. So an entry also records its source buffer and a sampled fingerprint,
// and other weights are packed again instead of silently reusing stale ones.
class WeightCache {
 public:
  dnnl::memory Get(const Tensor& weights, const memory::desc& plain, const memory::desc& wanted,
                   bool widen) {
    const uint64_t fingerprint = SampleFingerprint(weights);
    std::lock_guard<std::mutex> lock(mu_);
    Entry* slot = nullptr;
    for (Entry& entry : entries_) {
      if (entry.wanted == wanted) slot = &entry;
    }
    if (slot != nullptr && slot->source == weights.data() && slot->fingerprint == fingerprint) {
      return slot->packed;
    }
    if (slot == nullptr) {
      if (entries_.size() >= kMaxEntries) entries_.clear();
      entries_.push_back(Entry{wanted, nullptr, 0, dnnl::memory()});
      slot = &entries_.back();
    }
    slot->packed = Pack(weights, plain, wanted, widen);
    slot->source = weights.data();
    slot->fingerprint = fingerprint;
    return slot->packed;
  }

 private:
  struct Entry {
    memory::desc wanted;
    const void* source;
    uint64_t fingerprint;
    dnnl::memory packed;
  };

  static dnnl::memory Pack(const Tensor& weights, const memory::desc& plain,
                           const memory::desc& wanted, bool widen) {
    std::vector<float> widened;
    void* data = const_cast<void*>(weights.data());
    if (widen) {
      widened.resize(weights.NumElements());
      WidenBf16(weights.flat<tensorflow::bfloat16>().data(), widened.data(), widened.size());
      data = widened.data();
    }
    dnnl::memory source(plain, CpuEngine(), data);
    dnnl::memory packed(wanted, CpuEngine());  // owns its buffer, outlives the tensor
    dnnl::stream stream(CpuEngine());
    dnnl::reorder(source, packed).execute(stream, source, packed);
    stream.wait();
    return packed;
  }

  // Constant weights keep one shape; a few entries cover primitives preferring different
  // layouts for different input shapes.
  static constexpr size_t kMaxEntries = 8;
  std::mutex mu_;
  std::vector<Entry> entries_;
};

// ---------------------------------------------------------------------------------------
// Execution

// The TensorFlow tensors a fused primitive reads and writes (all of type T).
struct FusedOperands {
  const Tensor* src = nullptr;
  const Tensor* weights = nullptr;
  const Tensor* bias = nullptr;      // null without BiasAdd
  const Tensor* residual = nullptr;  // null without Add
  Tensor* dst = nullptr;
};

// A oneDNN memory over `tensor`'s buffer, or over an FP32 copy in `staging` when the plan
// runs in FP32 but the tensor is BF16.
inline absl::Status BindInput(OpKernelContext* ctx, const Tensor& tensor, const memory::desc& md,
                              bool widen, Tensor* staging, dnnl::memory* out) {
  if (!widen) {
    *out = dnnl::memory(md, CpuEngine(), const_cast<void*>(tensor.data()));
    return absl::OkStatus();
  }
  TF_RETURN_IF_ERROR(
      ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({tensor.NumElements()}), staging));
  WidenBf16(tensor.flat<tensorflow::bfloat16>().data(), staging->flat<float>().data(),
            tensor.NumElements());
  *out = dnnl::memory(md, CpuEngine(), staging->data());
  return absl::OkStatus();
}

// oneDNN (OpenMP runtime) uses as many threads as TensorFlow gives intra-op work. The
// setting is per calling thread in OpenMP, so it is applied before every execution.
inline void UseTensorFlowThreads(OpKernelContext* ctx) {
  const auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  if (workers != nullptr && workers->num_threads > 0) omp_set_num_threads(workers->num_threads);
}

using ExecArgs = std::unordered_map<int, dnnl::memory>;

// Temporaries of one execution (FP32 copies for the fallback, the scratchpad); they must
// live until the primitive has run.
struct ExecBuffers {
  Tensor src, weights, bias, residual, dst, scratchpad;
};

// Source, weights, bias and residual. With `weight_cache` (constant weights) the weights come
// pre-packed from the cache; without it they are read in place (widened per call in the
// fallback).
inline absl::Status BindInputs(OpKernelContext* ctx, const PrimitivePlan& plan,
                               const FusedOperands& io, WeightCache* weight_cache,
                               ExecBuffers* buffers, ExecArgs* args) {
  const bool widen = plan.fp32_fallback;
  TF_RETURN_IF_ERROR(
      BindInput(ctx, *io.src, plan.src, widen, &buffers->src, &(*args)[DNNL_ARG_SRC]));
  if (weight_cache != nullptr && (widen || plan.weights != plan.weights_plain)) {
    (*args)[DNNL_ARG_WEIGHTS] =
        weight_cache->Get(*io.weights, plan.weights_plain, plan.weights, widen);
  } else {
    TF_RETURN_IF_ERROR(BindInput(ctx, *io.weights, plan.weights, widen, &buffers->weights,
                                 &(*args)[DNNL_ARG_WEIGHTS]));
  }
  if (io.bias != nullptr) {
    TF_RETURN_IF_ERROR(
        BindInput(ctx, *io.bias, plan.bias, widen, &buffers->bias, &(*args)[DNNL_ARG_BIAS]));
  }
  if (io.residual != nullptr) {
    const int arg = DNNL_ARG_ATTR_MULTIPLE_POST_OP(kResidualPostOp) | DNNL_ARG_SRC_1;
    TF_RETURN_IF_ERROR(BindInput(ctx, *io.residual, plan.residual, widen, &buffers->residual,
                                 &(*args)[arg]));
  }
  return absl::OkStatus();
}

// The output, or its FP32 stand-in in the fallback (narrowed after the run).
inline absl::Status BindOutput(OpKernelContext* ctx, const PrimitivePlan& plan,
                               const FusedOperands& io, ExecBuffers* buffers, ExecArgs* args) {
  void* data = io.dst->data();
  if (plan.fp32_fallback) {
    TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT,
                                          TensorShape({io.dst->NumElements()}), &buffers->dst));
    data = buffers->dst.data();
  }
  (*args)[DNNL_ARG_DST] = dnnl::memory(plan.dst, CpuEngine(), data);
  return absl::OkStatus();
}

// The primitive's scratch space as a TensorFlow temporary (see MakeAttr).
inline absl::Status BindScratchpad(OpKernelContext* ctx, const PrimitivePlan& plan,
                                   ExecBuffers* buffers, ExecArgs* args) {
  if (plan.scratchpad_bytes == 0) return absl::OkStatus();
  const int64_t bytes = static_cast<int64_t>(plan.scratchpad_bytes);
  TF_RETURN_IF_ERROR(
      ctx->allocate_temp(tensorflow::DT_UINT8, TensorShape({bytes}), &buffers->scratchpad));
  const memory::desc md({bytes}, memory::data_type::u8, memory::format_tag::a);
  (*args)[DNNL_ARG_SCRATCHPAD] = dnnl::memory(md, CpuEngine(), buffers->scratchpad.data());
  return absl::OkStatus();
}

// Executes the primitive on bound `args`; in the fallback, rounds the FP32 result into the BF16
// output.
inline absl::Status RunPlan(const PrimitivePlan& plan, const FusedOperands& io, const ExecArgs& args,
                            ExecBuffers* buffers) {
  dnnl::stream stream(CpuEngine());
  plan.primitive.execute(stream, args);
  stream.wait();
  if (plan.fp32_fallback) {
    NarrowToBf16(buffers->dst.flat<float>().data(), io.dst->flat<tensorflow::bfloat16>().data(),
                 io.dst->NumElements());
  }
  return absl::OkStatus();
}

// Runs `plan` on `io` (see BindInputs for `weight_cache`).
inline absl::Status ExecutePlan(OpKernelContext* ctx, const PrimitivePlan& plan,
                                const FusedOperands& io, WeightCache* weight_cache) {
  UseTensorFlowThreads(ctx);
  ExecBuffers buffers;
  ExecArgs args;
  TF_RETURN_IF_ERROR(BindInputs(ctx, plan, io, weight_cache, &buffers, &args));
  TF_RETURN_IF_ERROR(BindOutput(ctx, plan, io, &buffers, &args));
  TF_RETURN_IF_ERROR(BindScratchpad(ctx, plan, &buffers, &args));

  return RunPlan(plan, io, args, &buffers);
}

// ---------------------------------------------------------------------------------------
// Kernel helpers

// Attributes every fused kernel reads: the epilogue and whether the weights are a Const.
inline absl::Status ReadFusionAttrs(tensorflow::OpKernelConstruction* c, const char* op,
                                    FusedOps* fused, bool* weights_constant) {
  std::vector<std::string> names;
  int num_args;
  TF_RETURN_IF_ERROR(c->GetAttr("fused_ops", &names));
  TF_RETURN_IF_ERROR(c->GetAttr("num_args", &num_args));
  TF_RETURN_IF_ERROR(c->GetAttr("weights_constant", weights_constant));
  return ParseFusedOps(op, names, num_args, fused);
}

// Checks the extra inputs against the output (bias: [channels]; residual: the output's
// shape) and points `io` at them.
inline absl::Status BindFusedArgs(OpKernelContext* ctx, const char* op, const FusedOps& fused,
                                  const TensorShape& output_shape, FusedOperands* io) {
  tensorflow::OpInputList args;
  TF_RETURN_IF_ERROR(ctx->input_list("args", &args));
  const int64_t channels = output_shape.dim_size(output_shape.dims() - 1);
  if (fused.bias) {
    const Tensor& bias = args[fused.BiasArg()];
    if (bias.dims() != 1 || bias.dim_size(0) != channels) {
      return OpError(op, "BiasAdd argument must have shape [", channels, "], got ",
                     bias.shape().DebugString());
    }
    io->bias = &bias;
  }
  if (fused.add) {
    const Tensor& residual = args[fused.ResidualArg()];
    if (residual.shape() != output_shape) {
      return OpError(op, "Add argument must have the output's shape ", output_shape.DebugString(),
                     ", got ", residual.shape().DebugString());
    }
    io->residual = &residual;
  }
  return absl::OkStatus();
}

inline std::vector<int64_t> ShapeKey(std::initializer_list<const TensorShape*> shapes) {
  std::vector<int64_t> key;
  for (const TensorShape* shape : shapes) {
    key.push_back(shape->dims());  // keeps [2,3]+[4] apart from [2]+[3,4]
    for (int64_t d : shape->dim_sizes()) key.push_back(d);
  }
  return key;
}

// Runs body(), turning oneDNN exceptions (which must not cross into TensorFlow) into an
// Internal error naming the op.
template <typename Body>
void RunGuarded(OpKernelContext* ctx, const char* op, Body body) {
  try {
    body();
  } catch (const dnnl::error& e) {
    ctx->SetStatus(absl::InternalError(
        absl::StrCat(op, ": oneDNN failed (status ", static_cast<int>(e.status), "): ", e.what())));
  }
}

}  // namespace tf_bf16

#endif  // TF_BF16_KERNELS_COMMON_H_
