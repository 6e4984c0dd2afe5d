// TfBf16Conv2D kernel: NHWC convolution (grouped and depthwise too) with a fused epilogue,
// one oneDNN convolution_forward primitive per input shape.

#include "common.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace tf_bf16 {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;

// Sizes of one convolution call, derived from the tensors and attributes.
struct ConvGeometry {
  int64_t batch, in_h, in_w, in_c;
  int64_t k_h, k_w, out_c;
  Window h, w;
};

absl::Status ComputeGeometry(const Tensor& input, const Tensor& filter, const ConvAttrs& attrs,
                             ConvGeometry* g) {
  if (input.dims() != 4) {
    return OpError(kConvOpName, "input must be rank 4 (NHWC), got shape ",
                   input.shape().DebugString());
  }
  if (filter.dims() != 4) {
    return OpError(kConvOpName, "filter must be rank 4 (HWIO), got shape ",
                   filter.shape().DebugString());
  }
  g->batch = input.dim_size(0);
  g->in_h = input.dim_size(1);
  g->in_w = input.dim_size(2);
  g->in_c = input.dim_size(3);
  g->k_h = filter.dim_size(0);
  g->k_w = filter.dim_size(1);
  g->out_c = filter.dim_size(3);
  TF_RETURN_IF_ERROR(CheckConvChannels(g->in_c, filter.dim_size(2), g->out_c, attrs.groups));
  TF_RETURN_IF_ERROR(ComputeWindow("height", g->in_h, g->k_h, attrs.stride_h, attrs.dilation_h,
                                   attrs.padding, attrs.pad_top, attrs.pad_bottom, &g->h));
  return ComputeWindow("width", g->in_w, g->k_w, attrs.stride_w, attrs.dilation_w,
                       attrs.padding, attrs.pad_left, attrs.pad_right, &g->w);
}

// Filter descriptor over TensorFlow's HWIO buffer. oneDNN orders weight dims (G,) O, I, H, W;
// the tags hwio / hwigo name the physical order, which for the grouped case is H, W, I, G, O
// because TF numbers output channel g * (O / G) + o.
memory::desc PlainFilterDesc(const ConvGeometry& g, int64_t groups, memory::data_type type) {
  const int64_t in_per_group = g.in_c / groups;
  if (groups == 1) {
    return memory::desc({g.out_c, g.in_c, g.k_h, g.k_w}, type, memory::format_tag::hwio);
  }
  return memory::desc({groups, g.out_c / groups, in_per_group, g.k_h, g.k_w}, type,
                      memory::format_tag::hwigo);
}

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
    OP_REQUIRES_OK(ctx, ComputeGeometry(input, filter, attrs_, &g));
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

    const memory::dims strides = {attrs_.stride_h, attrs_.stride_w};
    // oneDNN counts dilation as the gap between taps; TensorFlow as the tap spacing.
    const memory::dims dilates = {attrs_.dilation_h - 1, attrs_.dilation_w - 1};
    const memory::dims pad_l = {g.h.pad_before, g.w.pad_before};
    const memory::dims pad_r = {g.h.pad_after, g.w.pad_after};
    const dnnl::primitive_attr attr = MakeAttr(fused_, plan.residual);
    const auto kind = dnnl::prop_kind::forward_inference;
    const auto algo = dnnl::algorithm::convolution_direct;
    const auto pd =
        fused_.bias ? dnnl::convolution_forward::primitive_desc(
                          CpuEngine(), kind, algo, plan.src, weights_query, plan.bias, plan.dst,
                          strides, dilates, pad_l, pad_r, attr)
                    : dnnl::convolution_forward::primitive_desc(
                          CpuEngine(), kind, algo, plan.src, weights_query, plan.dst, strides,
                          dilates, pad_l, pad_r, attr);
    plan.weights = pd.weights_desc();
    plan.scratchpad_bytes = pd.scratchpad_desc().get_size();
    plan.primitive = dnnl::convolution_forward(pd);
    return plan;
  }

  ConvAttrs attrs_;
  FusedOps fused_;
  bool weights_constant_ = false;
  PlanCache plans_;
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
