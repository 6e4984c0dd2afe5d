// TfBf16QuantizedMatMul kernel: INT8 product of an activation (rank >= 2, batch dims folded
// into rows) and a rank-2 s8 weight, with static scales and a fused epilogue; one oneDNN
// matmul primitive per input shape.

#include <vector>

#include "common.h"
#include "int8.h"
#include "matmul_geometry.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace tf_bf16 {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;

class QuantizedMatMulOp : public OpKernel {
 public:
  explicit QuantizedMatMulOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("transpose_a", &transpose_a_));
    OP_REQUIRES_OK(c, c->GetAttr("transpose_b", &transpose_b_));
    OP_REQUIRES_OK(c, ReadQuantizedAttrs(c, kQuantizedMatMulOpName, &spec_));
  }

  void Compute(OpKernelContext* ctx) override {
    RunGuarded(ctx, kQuantizedMatMulOpName, [&] { ComputeChecked(ctx); });
  }

 private:
  void ComputeChecked(OpKernelContext* ctx) {
    const Tensor& a = ctx->input(0);
    const Tensor& b = ctx->input(1);
    OP_REQUIRES(ctx, b.dims() == 2,
                OpError(kQuantizedMatMulOpName, "b (the weights) must be rank 2, got shape ",
                        b.shape().DebugString()));
    OP_REQUIRES(ctx, a.dims() == 2 || !transpose_a_,
                OpError(kQuantizedMatMulOpName, "transpose_a needs a rank-2 a"));
    MatMulGeometry g;
    OP_REQUIRES_OK(ctx, ComputeMatMulGeometry(a, b, transpose_a_, transpose_b_, &g));
    TensorShape output_shape;
    OP_REQUIRES_OK(ctx, TensorShape::BuildTensorShape(g.output_dims, &output_shape));
    ComputeQuantized(ctx, kQuantizedMatMulOpName, spec_, output_shape, g.n, g.k == 0, &plans_,
                     &weights_, [&](memory::data_type dst_type, const std::vector<float>& scales) {
                       return BuildPlan(g, dst_type, scales);
                     });
  }

  // [rows, k] x [k, n] over the TensorFlow buffers (a transpose attribute only swaps the
  // physical order), u8/s8 x s8, FP32 bias and residual, output in `dst_type`.
  QuantizedPlan BuildPlan(const MatMulGeometry& g, memory::data_type dst_type,
                          const std::vector<float>& scales) const {
    using tag = memory::format_tag;
    using dt = memory::data_type;
    QuantizedPlan qplan;
    qplan.weight_scales = scales;
    PrimitivePlan& plan = qplan.base;
    const int64_t rows = g.batch * g.m;
    plan.src = memory::desc({rows, g.k}, spec_.src_unsigned ? dt::u8 : dt::s8,
                            transpose_a_ ? tag::ba : tag::ab);
    plan.weights_plain = memory::desc({g.k, g.n}, dt::s8, transpose_b_ ? tag::ba : tag::ab);
    plan.dst = memory::desc({rows, g.n}, dst_type, tag::ab);
    if (spec_.fused.bias) plan.bias = memory::desc({1, g.n}, dt::f32, tag::ab);
    if (spec_.fused.add) plan.residual = memory::desc({rows, g.n}, dt::f32, tag::ab);
    const memory::desc weights_query({g.k, g.n}, dt::s8, tag::any);
    const dnnl::primitive_attr attr = MakeQuantizedAttr(spec_, /*per_channel_mask=*/2,
                                                        plan.residual);
    const auto pd = spec_.fused.bias
                        ? dnnl::matmul::primitive_desc(CpuEngine(), plan.src, weights_query,
                                                       plan.bias, plan.dst, attr)
                        : dnnl::matmul::primitive_desc(CpuEngine(), plan.src, weights_query,
                                                       plan.dst, attr);
    plan.weights = pd.weights_desc();
    plan.scratchpad_bytes = pd.scratchpad_desc().get_size();
    plan.primitive = dnnl::matmul(pd);
    qplan.implementation = pd.impl_info_str();
    return qplan;
  }

  bool transpose_a_ = false, transpose_b_ = false;
  QuantizedSpec spec_;
  PlanCache<QuantizedPlan> plans_;
  WeightCache weights_;
};

REGISTER_KERNEL_BUILDER(Name("TfBf16QuantizedMatMul").Device(tensorflow::DEVICE_CPU),
                        QuantizedMatMulOp);

}  // namespace
}  // namespace tf_bf16
