// TfBf16QuantizedConv2D kernel: NHWC INT8 convolution (grouped and depthwise too) with static
// scales and a fused epilogue, one oneDNN convolution_forward primitive per input shape.

#include "common.h"
#include "conv_geometry.h"
#include "int8.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace tf_bf16 {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;

class QuantizedConv2DOp : public OpKernel {
 public:
  explicit QuantizedConv2DOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, ReadConvAttrs(c, &attrs_));
    OP_REQUIRES_OK(c, ReadQuantizedAttrs(c, kQuantizedConvOpName, &spec_));
  }

  void Compute(OpKernelContext* ctx) override {
    RunGuarded(ctx, kQuantizedConvOpName, [&] { ComputeChecked(ctx); });
  }

 private:
  void ComputeChecked(OpKernelContext* ctx) {
    const Tensor& input = ctx->input(0);
    const Tensor& filter = ctx->input(1);
    ConvGeometry g;
    OP_REQUIRES_OK(ctx, ComputeConvGeometry(input, filter, attrs_, &g));
    const TensorShape output_shape({g.batch, g.h.out, g.w.out, g.out_c});
    ComputeQuantized(ctx, kQuantizedConvOpName, spec_, output_shape, g.out_c, g.in_c == 0, &plans_,
                     &weights_, [&](memory::data_type dst_type, const std::vector<float>& scales) {
                       return BuildPlan(g, dst_type, scales);
                     });
  }

  // u8/s8 NHWC activations, s8 weights in the layout oneDNN prefers (packed once for a Const
  // filter), FP32 bias and residual, output in `dst_type`.
  QuantizedPlan BuildPlan(const ConvGeometry& g, memory::data_type dst_type,
                          const std::vector<float>& scales) const {
    using tag = memory::format_tag;
    using dt = memory::data_type;
    QuantizedPlan qplan;
    qplan.weight_scales = scales;
    PrimitivePlan& plan = qplan.base;
    plan.src = memory::desc({g.batch, g.in_c, g.in_h, g.in_w},
                            spec_.src_unsigned ? dt::u8 : dt::s8, tag::nhwc);
    plan.dst = memory::desc({g.batch, g.out_c, g.h.out, g.w.out}, dst_type, tag::nhwc);
    plan.weights_plain = PlainFilterDesc(g, attrs_.groups, dt::s8);
    const memory::desc weights_query(plan.weights_plain.get_dims(), dt::s8, tag::any);
    if (spec_.fused.bias) plan.bias = memory::desc({g.out_c}, dt::f32, tag::a);
    if (spec_.fused.add) {
      plan.residual = memory::desc({g.batch, g.out_c, g.h.out, g.w.out}, dt::f32, tag::nhwc);
    }
    // One scale per output channel: weight dim O, or G and O for grouped filters.
    const int per_channel_mask = attrs_.groups == 1 ? 1 : 3;
    const dnnl::primitive_attr attr = MakeQuantizedAttr(spec_, per_channel_mask, plan.residual);
    const auto pd = ConvPrimitiveDesc(g, attrs_, plan.src, weights_query, plan.bias, plan.dst, attr);
    plan.weights = pd.weights_desc();
    plan.scratchpad_bytes = pd.scratchpad_desc().get_size();
    plan.primitive = dnnl::convolution_forward(pd);
    qplan.implementation = pd.impl_info_str();
    return qplan;
  }

  ConvAttrs attrs_;
  QuantizedSpec spec_;
  PlanCache<QuantizedPlan> plans_;
  WeightCache weights_;
};

REGISTER_KERNEL_BUILDER(Name("TfBf16QuantizedConv2D").Device(tensorflow::DEVICE_CPU),
                        QuantizedConv2DOp);

}  // namespace
}  // namespace tf_bf16
