// Convolution geometry shared by the float (TfBf16Conv2D) and INT8 (TfBf16QuantizedConv2D)
// kernels: sizes of one call, TensorFlow's filter layout as a oneDNN descriptor, and the
// convolution primitive descriptor over NHWC activations.

#ifndef TF_BF16_KERNELS_CONV_GEOMETRY_H_
#define TF_BF16_KERNELS_CONV_GEOMETRY_H_

#include "common.h"

namespace tf_bf16 {

// Sizes of one convolution call, derived from the tensors and attributes.
struct ConvGeometry {
  int64_t batch, in_h, in_w, in_c;
  int64_t k_h, k_w, out_c;
  Window h, w;
};

inline absl::Status ComputeConvGeometry(const Tensor& input, const Tensor& filter, const ConvAttrs& attrs,
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
inline memory::desc PlainFilterDesc(const ConvGeometry& g, int64_t groups, memory::data_type type) {
  const int64_t in_per_group = g.in_c / groups;
  if (groups == 1) {
    return memory::desc({g.out_c, g.in_c, g.k_h, g.k_w}, type, memory::format_tag::hwio);
  }
  return memory::desc({groups, g.out_c / groups, in_per_group, g.k_h, g.k_w}, type,
                      memory::format_tag::hwigo);
}

// The forward-inference convolution over NHWC src/dst; `bias` may be an empty descriptor.
inline dnnl::convolution_forward::primitive_desc ConvPrimitiveDesc(
    const ConvGeometry& g, const ConvAttrs& attrs, const memory::desc& src,
    const memory::desc& weights, const memory::desc& bias, const memory::desc& dst,
    const dnnl::primitive_attr& attr) {
  const memory::dims strides = {attrs.stride_h, attrs.stride_w};
  // oneDNN counts dilation as the gap between taps; TensorFlow as the tap spacing.
  const memory::dims dilates = {attrs.dilation_h - 1, attrs.dilation_w - 1};
  const memory::dims pad_l = {g.h.pad_before, g.w.pad_before};
  const memory::dims pad_r = {g.h.pad_after, g.w.pad_after};
  const auto kind = dnnl::prop_kind::forward_inference;
  const auto algo = dnnl::algorithm::convolution_direct;
  if (bias.is_zero()) {
    return dnnl::convolution_forward::primitive_desc(CpuEngine(), kind, algo, src, weights, dst,
                                                     strides, dilates, pad_l, pad_r, attr);
  }
  return dnnl::convolution_forward::primitive_desc(CpuEngine(), kind, algo, src, weights, bias,
                                                   dst, strides, dilates, pad_l, pad_r, attr);
}

}  // namespace tf_bf16

#endif  // TF_BF16_KERNELS_CONV_GEOMETRY_H_
