// TfBf16Conv2D kernel: NHWC convolution (grouped and depthwise too) with a fused epilogue,
// one oneDNN convolution_forward primitive per input shape.

#include "common.h"
#include "conv_geometry.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace tf_bf16 {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;

template <typename T>
class Conv2DOp : public OpKernel {
 public:
  explicit Conv2DOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, ReadConvAttrs(c, &attrs_));
    OP_REQUIRES_OK(c, ReadFusionAttrs(c, kConvOpName, &fused_, &weights_constant_));
  }

  void Compute(OpKernelContext* ctx) override {
    RunGuarded(ctx, kConvOpName, [&] { ComputeChecked(ctx); });
  }

 private:
  void ComputeChecked(OpKernelContext* ctx) {
    const Tensor& input = ctx->input(0);
    const Tensor& filter = ctx->input(1);
    ConvGeometry g;
    OP_REQUIRES_OK(ctx, ComputeConvGeometry(input, filter, attrs_, &g));
    const TensorShape output_shape({g.batch, g.h.out, g.w.out, g.out_c});

    FusedOperands io;
    io.src = &input;
    io.weights = &filter;
    OP_REQUIRES_OK(ctx, BindFusedArgs(ctx, kConvOpName, fused_, output_shape, &io));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, output_shape, &io.dst));
    if (output_shape.num_elements() == 0) return;
    OP_REQUIRES(ctx, g.in_c > 0,
                OpError(kConvOpName, "input with 0 channels is not supported"));

    auto plan = plans_.GetOrCreate(ShapeKey({&input.shape(), &filter.shape()}), [&] {
      return BuildWithFallback(DnnlType<T>(),
                               [&](memory::data_type type) { return BuildPlan(g, type); });
    });
    OP_REQUIRES_OK(ctx, ExecutePlan(ctx, *plan, io, weights_constant_ ? &weights_ : nullptr));
  }

  // Activations stay NHWC (no per-call reorders around the op). Constant weights let oneDNN
  // choose its layout (format any), packed once by the WeightCache; others are read as HWIO.
  PrimitivePlan BuildPlan(const ConvGeometry& g, memory::data_type type) const {
    using tag = memory::format_tag;
    PrimitivePlan plan;
    plan.src = memory::desc({g.batch, g.in_c, g.in_h, g.in_w}, type, tag::nhwc);
    plan.dst = memory::desc({g.batch, g.out_c, g.h.out, g.w.out}, type, tag::nhwc);
    plan.weights_plain = PlainFilterDesc(g, attrs_.groups, type);
    const memory::desc weights_query =
        weights_constant_ ? memory::desc(plan.weights_plain.get_dims(), type, tag::any)
                          : plan.weights_plain;
    if (fused_.bias) plan.bias = memory::desc({g.out_c}, type, tag::a);
    if (fused_.add) plan.residual = plan.dst;

    const dnnl::primitive_attr attr = MakeAttr(fused_, plan.residual);
    const auto pd = ConvPrimitiveDesc(g, attrs_, plan.src, weights_query, plan.bias, plan.dst, attr);
    plan.weights = pd.weights_desc();
    plan.scratchpad_bytes = pd.scratchpad_desc().get_size();
    plan.primitive = dnnl::convolution_forward(pd);
    return plan;
  }

  ConvAttrs attrs_;
  FusedOps fused_;
  bool weights_constant_ = false;
  PlanCache<> plans_;
  WeightCache weights_;
};

REGISTER_KERNEL_BUILDER(
    Name("TfBf16Conv2D").Device(tensorflow::DEVICE_CPU).TypeConstraint<float>("T"),
    Conv2DOp<float>);
REGISTER_KERNEL_BUILDER(
    Name("TfBf16Conv2D").Device(tensorflow::DEVICE_CPU).TypeConstraint<tensorflow::bfloat16>("T"),
    Conv2DOp<tensorflow::bfloat16>);

}  // namespace
}  // namespace tf_bf16
