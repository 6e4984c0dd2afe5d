// Semantics of the TfBf16Conv2D / TfBf16MatMul attributes and shapes, independent of oneDNN.
//
// The shape functions (ops.cc) and the kernels (conv2d.cc, matmul.cc) both call these
// helpers, so a graph that passes shape inference is checked by the very same rules at run
// time. Sizes use -1 for "unknown" (InferenceContext::kUnknownDim): shape inference passes
// partially known shapes, the kernels always pass known ones.

#ifndef TF_BF16_KERNELS_OP_SPECS_H_
#define TF_BF16_KERNELS_OP_SPECS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "tensorflow/core/platform/errors.h"  // TF_RETURN_IF_ERROR

namespace tf_bf16 {

constexpr char kConvOpName[] = "TfBf16Conv2D";
constexpr char kMatMulOpName[] = "TfBf16MatMul";
constexpr char kQuantizedConvOpName[] = "TfBf16QuantizedConv2D";
constexpr char kQuantizedMatMulOpName[] = "TfBf16QuantizedMatMul";
constexpr int64_t kUnknown = -1;

template <typename... Args>
absl::Status OpError(const char* op, const Args&... args) {
  return absl::InvalidArgumentError(absl::StrCat(op, ": ", args...));
}

// ---------------------------------------------------------------------------------------
// fused_ops

enum class Activation { kNone, kRelu, kRelu6, kGeluErf, kGeluTanh, kSigmoid, kSwish };

// What the fused_ops list asks for. The epilogue order is fixed: bias, residual add,
// activation; that is the order oneDNN applies bias and post-ops, so no reordering is needed.
struct FusedOps {
  bool bias = false;
  bool add = false;
  Activation activation = Activation::kNone;

  int NumArgs() const { return static_cast<int>(bias) + static_cast<int>(add); }
  // Positions of the consumed inputs within `args`.
  int BiasArg() const { return 0; }
  int ResidualArg() const { return bias ? 1 : 0; }
};

inline bool ParseActivation(const std::string& name, Activation* out) {
  static const struct {
    const char* name;
    Activation activation;
  } kActivations[] = {{"Relu", Activation::kRelu},       {"Relu6", Activation::kRelu6},
                      {"GeluErf", Activation::kGeluErf}, {"GeluTanh", Activation::kGeluTanh},
                      {"Sigmoid", Activation::kSigmoid}, {"Swish", Activation::kSwish}};
  for (const auto& entry : kActivations) {
    if (name == entry.name) {
      *out = entry.activation;
      return true;
    }
  }
  return false;
}

// Accepts exactly [BiasAdd]? [Add]? [activation]? and checks that num_args matches.
inline absl::Status ParseFusedOps(const char* op, const std::vector<std::string>& names,
                                  int num_args, FusedOps* out) {
  FusedOps fused;
  // Stage of the last accepted entry: 0 nothing, 1 BiasAdd, 2 Add, 3 activation. Each entry
  // must move to a strictly later stage, which rejects repeats and wrong orders alike.
  int stage = 0;
  for (const std::string& name : names) {
    int next;
    if (name == "BiasAdd") {
      next = 1;
      fused.bias = true;
    } else if (name == "Add") {
      next = 2;
      fused.add = true;
    } else if (ParseActivation(name, &fused.activation)) {
      next = 3;
    } else {
      return OpError(op, "unknown entry '", name, "' in fused_ops [",
                     absl::StrJoin(names, ", "),
                     "]; allowed: BiasAdd, Add, Relu, Relu6, GeluErf, GeluTanh, Sigmoid, Swish");
    }
    if (next <= stage) {
      return OpError(op, "fused_ops [", absl::StrJoin(names, ", "),
                     "] is not in the order [BiasAdd]? [Add]? [activation]? "
                     "(at most one of each)");
    }
    stage = next;
  }
  if (num_args != fused.NumArgs()) {
    return OpError(op, "num_args is ", num_args, " but fused_ops [", absl::StrJoin(names, ", "),
                   "] consumes ", fused.NumArgs(), " extra input(s)");
  }
  *out = fused;
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------
// INT8 ranges

// The step of a quantized tensor with float range [min, max], as TensorFlow's SCALED mode
// reads it: UINT8 covers [0, max] in 255 steps, INT8 covers [-m, m] (m = max(|min|, |max|))
// in 127 steps a side. Checks that the range is two finite values, non-negative for UINT8,
// and not all zero.
inline absl::Status RangeScale(const char* op, const char* attr, const std::vector<float>& range,
                               bool is_unsigned, float* scale) {
  if (range.size() != 2 || !std::isfinite(range[0]) || !std::isfinite(range[1]) ||
      range[0] > range[1]) {
    return OpError(op, attr, " must be [min, max] with finite min <= max, got [",
                   absl::StrJoin(range, ", "), "]");
  }
  if (is_unsigned && range[0] < 0) {
    return OpError(op, attr, " [", absl::StrJoin(range, ", "),
                   "] is negative but the tensor is unsigned (UINT8 covers [0, max])");
  }
  const float top = std::max(std::fabs(range[0]), std::fabs(range[1]));
  if (!(top > 0)) return OpError(op, attr, " must not be [0, 0]");
  *scale = top / (is_unsigned ? 255.f : 127.f);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------
// Conv2D geometry

enum class Padding { kSame, kValid, kExplicit };

struct ConvAttrs {
  int64_t stride_h = 1, stride_w = 1;
  int64_t dilation_h = 1, dilation_w = 1;  // TF convention: 1 = dense
  Padding padding = Padding::kValid;
  int64_t pad_top = 0, pad_bottom = 0, pad_left = 0, pad_right = 0;  // EXPLICIT only
  int64_t groups = 1;
};

// Checks a 4-entry NHWC list (strides or dilations): positive, 1 for batch and channel.
inline absl::Status CheckNhwcList(const char* attr, const std::vector<int32_t>& values) {
  if (values.size() != 4) {
    return OpError(kConvOpName, attr, " must have 4 entries (NHWC), got ", values.size());
  }
  if (values[0] != 1 || values[3] != 1) {
    return OpError(kConvOpName, attr, " must be 1 in the batch and channel dimensions, got [",
                   absl::StrJoin(values, ", "), "]");
  }
  if (values[1] < 1 || values[2] < 1) {
    return OpError(kConvOpName, attr, " must be positive, got [", absl::StrJoin(values, ", "),
                   "]");
  }
  return absl::OkStatus();
}

inline absl::Status CheckExplicitPaddings(Padding padding, const std::vector<int32_t>& pads) {
  if (padding != Padding::kExplicit) {
    if (!pads.empty()) {
      return OpError(kConvOpName, "explicit_paddings must be empty unless padding is EXPLICIT");
    }
    return absl::OkStatus();
  }
  if (pads.size() != 8) {
    return OpError(kConvOpName, "explicit_paddings must have 8 entries (NHWC) for EXPLICIT ",
                   "padding, got ", pads.size());
  }
  for (int32_t p : pads) {
    if (p < 0) {
      return OpError(kConvOpName, "explicit_paddings must be non-negative, got [",
                     absl::StrJoin(pads, ", "), "]");
    }
  }
  if (pads[0] != 0 || pads[1] != 0 || pads[6] != 0 || pads[7] != 0) {
    return OpError(kConvOpName, "explicit_paddings must be 0 in the batch and channel ",
                   "dimensions, got [", absl::StrJoin(pads, ", "), "]");
  }
  return absl::OkStatus();
}

// Reads and validates the convolution attributes. `Context` is OpKernelConstruction or
// shape_inference::InferenceContext: both offer GetAttr(name, T*) -> Status.
template <typename Context>
absl::Status ReadConvAttrs(Context* c, ConvAttrs* out) {
  std::vector<int32_t> strides, dilations, pads;
  std::string padding;
  int64_t groups;
  TF_RETURN_IF_ERROR(c->GetAttr("strides", &strides));
  TF_RETURN_IF_ERROR(c->GetAttr("dilations", &dilations));
  TF_RETURN_IF_ERROR(c->GetAttr("padding", &padding));
  TF_RETURN_IF_ERROR(c->GetAttr("explicit_paddings", &pads));
  TF_RETURN_IF_ERROR(c->GetAttr("groups", &groups));
  TF_RETURN_IF_ERROR(CheckNhwcList("strides", strides));
  TF_RETURN_IF_ERROR(CheckNhwcList("dilations", dilations));

  ConvAttrs attrs;
  // The op definition restricts the string to these three values.
  attrs.padding = padding == "SAME"    ? Padding::kSame
                  : padding == "VALID" ? Padding::kValid
                                       : Padding::kExplicit;
  TF_RETURN_IF_ERROR(CheckExplicitPaddings(attrs.padding, pads));
  if (groups < 1) return OpError(kConvOpName, "groups must be >= 1, got ", groups);

  attrs.stride_h = strides[1];
  attrs.stride_w = strides[2];
  attrs.dilation_h = dilations[1];
  attrs.dilation_w = dilations[2];
  if (attrs.padding == Padding::kExplicit) {
    attrs.pad_top = pads[2];
    attrs.pad_bottom = pads[3];
    attrs.pad_left = pads[4];
    attrs.pad_right = pads[5];
  }
  attrs.groups = groups;
  *out = attrs;
  return absl::OkStatus();
}

// Output size and padding of one spatial dimension.
struct Window {
  int64_t out = kUnknown;
  int64_t pad_before = 0;
  int64_t pad_after = 0;  // trailing input rows no window reaches are simply not padded
};

inline absl::Status ComputeWindow(const char* dim_name, int64_t in, int64_t kernel,
                                  int64_t stride, int64_t dilation, Padding padding,
                                  int64_t explicit_before, int64_t explicit_after, Window* out) {
  Window w;
  if (in == kUnknown || kernel == kUnknown) {
    *out = w;
    return absl::OkStatus();
  }
  if (kernel < 1) return OpError(kConvOpName, "the filter ", dim_name, " must be at least 1");
  const int64_t span = (kernel - 1) * dilation + 1;  // kernel extent with dilation holes
  switch (padding) {
    case Padding::kSame: {
      w.out = (in + stride - 1) / stride;
      const int64_t total = std::max<int64_t>((w.out - 1) * stride + span - in, 0);
      w.pad_before = total / 2;
      w.pad_after = total - w.pad_before;
      break;
    }
    case Padding::kValid:
    case Padding::kExplicit: {
      w.pad_before = explicit_before;
      w.pad_after = explicit_after;
      const int64_t padded = in + explicit_before + explicit_after;
      if (padded < span) {
        return OpError(kConvOpName, "the ", dim_name, " of the padded input (", padded,
                       ") is smaller than the dilated filter (", span, ")");
      }
      w.out = (padded - span) / stride + 1;
      break;
    }
  }
  *out = w;
  return absl::OkStatus();
}

// Channel rules: input channels = filter input channels * groups, and groups divides the
// output channels. Unknown sizes are skipped.
inline absl::Status CheckConvChannels(int64_t in_channels, int64_t filter_in_channels,
                                      int64_t out_channels, int64_t groups) {
  if (in_channels != kUnknown && filter_in_channels != kUnknown &&
      in_channels != filter_in_channels * groups) {
    return OpError(kConvOpName, "input has ", in_channels, " channels but the filter expects ",
                   filter_in_channels, " per group x ", groups, " group(s) = ",
                   filter_in_channels * groups);
  }
  if (out_channels != kUnknown && out_channels % groups != 0) {
    return OpError(kConvOpName, "filter output channels (", out_channels,
                   ") are not divisible by groups (", groups, ")");
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------
// MatMul shapes

// Output shape of a (batched) matmul. Rules: both rank 2; or rank(a) >= 3 with b of the same
// rank and the same batch dims; or rank(a) >= 3 with a rank-2 b shared across the batch.
inline absl::Status MatMulOutputShape(const std::vector<int64_t>& a, const std::vector<int64_t>& b,
                                      bool transpose_a, bool transpose_b,
                                      std::vector<int64_t>* out) {
  const size_t ra = a.size(), rb = b.size();
  if (ra < 2 || rb < 2) {
    return OpError(kMatMulOpName, "a and b must have rank >= 2, got ranks ", ra, " and ", rb);
  }
  if (rb != 2 && rb != ra) {
    return OpError(kMatMulOpName, "b must have rank 2 or the rank of a (", ra, "), got rank ",
                   rb);
  }
  if (rb == ra) {
    for (size_t i = 0; i + 2 < ra; ++i) {
      if (a[i] != kUnknown && b[i] != kUnknown && a[i] != b[i]) {
        return OpError(kMatMulOpName, "batch dimension ", i, " differs: a has ", a[i],
                       ", b has ", b[i]);
      }
    }
  }
  const int64_t m = transpose_a ? a[ra - 1] : a[ra - 2];
  const int64_t ka = transpose_a ? a[ra - 2] : a[ra - 1];
  const int64_t kb = transpose_b ? b[rb - 1] : b[rb - 2];
  const int64_t n = transpose_b ? b[rb - 2] : b[rb - 1];
  if (ka != kUnknown && kb != kUnknown && ka != kb) {
    return OpError(kMatMulOpName, "inner dimensions differ: a gives ", ka, ", b gives ", kb,
                   " (transpose_a=", transpose_a, ", transpose_b=", transpose_b, ")");
  }
  std::vector<int64_t> shape;
  for (size_t i = 0; i + 2 < ra; ++i) {
    shape.push_back(a[i] != kUnknown || rb != ra ? a[i] : b[i]);
  }
  shape.push_back(m);
  shape.push_back(n);
  *out = shape;
  return absl::OkStatus();
}

}  // namespace tf_bf16

#endif  // TF_BF16_KERNELS_OP_SPECS_H_
