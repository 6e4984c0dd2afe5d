// TfBf16MatMul kernel: (batched) matrix product with a fused epilogue, one oneDNN matmul
// primitive per input shape.

#include <vector>

#include "common.h"
#include "matmul_geometry.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace tf_bf16 {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;

template <typename T>
class MatMulOp : public OpKernel {
 public:
  explicit MatMulOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("transpose_a", &transpose_a_));
    OP_REQUIRES_OK(c, c->GetAttr("transpose_b", &transpose_b_));
    OP_REQUIRES_OK(c, ReadFusionAttrs(c, kMatMulOpName, &fused_, &weights_constant_));
  }

  void Compute(OpKernelContext* ctx) override {
    RunGuarded(ctx, kMatMulOpName, [&] { ComputeChecked(ctx); });
  }

 private:
  void ComputeChecked(OpKernelContext* ctx) {
    const Tensor& a = ctx->input(0);
    const Tensor& b = ctx->input(1);
    MatMulGeometry g;
    OP_REQUIRES_OK(ctx, ComputeMatMulGeometry(a, b, transpose_a_, transpose_b_, &g));
    TensorShape output_shape;
    OP_REQUIRES_OK(ctx, TensorShape::BuildTensorShape(g.output_dims, &output_shape));

    FusedOperands io;
    io.src = &a;
    io.weights = &b;
    OP_REQUIRES_OK(ctx, BindFusedArgs(ctx, kMatMulOpName, fused_, output_shape, &io));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, output_shape, &io.dst));
    if (output_shape.num_elements() == 0) return;
    OP_REQUIRES(ctx, g.k > 0, OpError(kMatMulOpName, "an empty inner dimension is not supported"));

    auto plan = plans_.GetOrCreate(ShapeKey({&a.shape(), &b.shape()}), [&] {
      return BuildWithFallback(DnnlType<T>(),
                               [&](memory::data_type type) { return BuildPlan(g, type); });
    });
    OP_REQUIRES_OK(ctx, ExecutePlan(ctx, *plan, io, weights_constant_ ? &weights_ : nullptr));
  }

  // Row-major descriptors over the TensorFlow buffers; a transpose attribute only swaps the
  // physical order of the last two dims (tag ba / acb), so nothing is copied. Constant
  // weights let oneDNN choose its layout (format any), packed once by the WeightCache.
  PrimitivePlan BuildPlan(const MatMulGeometry& g, memory::data_type type) const {
    using tag = memory::format_tag;
    const bool two_d = !g.batched || g.fold_batch;
    const tag plain = two_d ? tag::ab : tag::abc;
    const tag swapped = two_d ? tag::ba : tag::acb;
    const int64_t b_batch = g.shared_b ? 1 : g.batch;  // 1 = broadcast over a's batch

    PrimitivePlan plan;
    if (two_d) {
      plan.src = memory::desc({g.batch * g.m, g.k}, type, transpose_a_ ? swapped : plain);
      plan.weights_plain = memory::desc({g.k, g.n}, type, transpose_b_ ? swapped : plain);
      plan.dst = memory::desc({g.batch * g.m, g.n}, type, plain);
      if (fused_.bias) plan.bias = memory::desc({1, g.n}, type, plain);
    } else {
      plan.src = memory::desc({g.batch, g.m, g.k}, type, transpose_a_ ? swapped : plain);
      plan.weights_plain =
          memory::desc({b_batch, g.k, g.n}, type, transpose_b_ ? swapped : plain);
      plan.dst = memory::desc({g.batch, g.m, g.n}, type, plain);
      if (fused_.bias) plan.bias = memory::desc({1, 1, g.n}, type, plain);
    }
    if (fused_.add) plan.residual = plan.dst;
    const memory::desc weights_query =
        weights_constant_ ? memory::desc(plan.weights_plain.get_dims(), type, tag::any)
                          : plan.weights_plain;

    const dnnl::primitive_attr attr = MakeAttr(fused_, plan.residual);
    const auto pd = fused_.bias ? dnnl::matmul::primitive_desc(CpuEngine(), plan.src,
                                                               weights_query, plan.bias,
                                                               plan.dst, attr)
                                : dnnl::matmul::primitive_desc(CpuEngine(), plan.src,
                                                               weights_query, plan.dst, attr);
    plan.weights = pd.weights_desc();
    plan.scratchpad_bytes = pd.scratchpad_desc().get_size();
    plan.primitive = dnnl::matmul(pd);
    return plan;
  }

  bool transpose_a_ = false, transpose_b_ = false;
  FusedOps fused_;
  bool weights_constant_ = false;
  PlanCache<> plans_;
  WeightCache weights_;
};

REGISTER_KERNEL_BUILDER(
    Name("TfBf16MatMul").Device(tensorflow::DEVICE_CPU).TypeConstraint<float>("T"),
    MatMulOp<float>);
REGISTER_KERNEL_BUILDER(
    Name("TfBf16MatMul").Device(tensorflow::DEVICE_CPU).TypeConstraint<tensorflow::bfloat16>("T"),
    MatMulOp<tensorflow::bfloat16>);

}  // namespace
}  // namespace tf_bf16
