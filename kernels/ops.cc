// Op registrations and shape functions of TfBf16Conv2D and TfBf16MatMul and their INT8
// variants TfBf16QuantizedConv2D and TfBf16QuantizedMatMul.
//
// The interface is fixed: tf_bf16's graph rewrite emits these ops with exactly these inputs
// and attributes. The attribute and shape rules live in op_specs.h, shared with the kernels.

#include <string>
#include <vector>

#include "op_specs.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tf_bf16 {
namespace {

using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

// The fused_ops of a float op (its extra inputs counted by num_args) or of an INT8 op (typed
// one by one in Targs).
absl::Status ReadFusedOps(InferenceContext* c, const char* op, bool quantized, FusedOps* fused) {
  std::vector<std::string> names;
  int num_args;
  TF_RETURN_IF_ERROR(c->GetAttr("fused_ops", &names));
  if (quantized) {
    std::vector<tensorflow::DataType> types;
    TF_RETURN_IF_ERROR(c->GetAttr("Targs", &types));
    num_args = static_cast<int>(types.size());
  } else {
    TF_RETURN_IF_ERROR(c->GetAttr("num_args", &num_args));
  }
  return ParseFusedOps(op, names, num_args, fused);
}

// Checks the bias (1-D, one value per output channel) and merges the residual's shape into
// the output, so an Add input can refine dimensions the op alone leaves unknown. The extra
// inputs start at input 2.
absl::Status ApplyFusedArgs(InferenceContext* c, const char* op, const FusedOps& fused,
                            DimensionHandle channels, ShapeHandle* output) {
  constexpr int kFirstArg = 2;
  if (fused.bias) {
    ShapeHandle bias;
    DimensionHandle unused;
    absl::Status s = c->WithRank(c->input(kFirstArg + fused.BiasArg()), 1, &bias);
    if (s.ok()) s = c->Merge(c->Dim(bias, 0), channels, &unused);
    if (!s.ok()) return OpError(op, "BiasAdd argument: ", s.message());
  }
  if (fused.add) {
    absl::Status s = c->Merge(*output, c->input(kFirstArg + fused.ResidualArg()), output);
    if (!s.ok()) return OpError(op, "Add argument does not match the output: ", s.message());
  }
  return absl::OkStatus();
}

absl::Status Conv2DShape(InferenceContext* c, const char* op, bool quantized) {
  FusedOps fused;
  ConvAttrs attrs;
  ShapeHandle input, filter;
  TF_RETURN_IF_ERROR(ReadFusedOps(c, op, quantized, &fused));
  TF_RETURN_IF_ERROR(ReadConvAttrs(c, &attrs));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &input));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &filter));
  // Unknown sizes are kUnknown (-1) here, which the shared rules skip or propagate.
  auto size = [c](ShapeHandle shape, int dim) { return c->Value(c->Dim(shape, dim)); };
  TF_RETURN_IF_ERROR(
      CheckConvChannels(size(input, 3), size(filter, 2), size(filter, 3), attrs.groups));
  Window h, w;
  TF_RETURN_IF_ERROR(ComputeWindow("height", size(input, 1), size(filter, 0), attrs.stride_h,
                                   attrs.dilation_h, attrs.padding, attrs.pad_top,
                                   attrs.pad_bottom, &h));
  TF_RETURN_IF_ERROR(ComputeWindow("width", size(input, 2), size(filter, 1), attrs.stride_w,
                                   attrs.dilation_w, attrs.padding, attrs.pad_left,
                                   attrs.pad_right, &w));

  DimensionHandle channels = c->Dim(filter, 3);
  ShapeHandle output = c->MakeShape({c->Dim(input, 0), c->MakeDim(h.out), c->MakeDim(w.out),
                                     channels});
  TF_RETURN_IF_ERROR(ApplyFusedArgs(c, op, fused, channels, &output));
  c->set_output(0, output);
  return absl::OkStatus();
}

// Known dimensions of `shape` with kUnknown for the rest; shape must have a known rank.
std::vector<int64_t> DimValues(InferenceContext* c, ShapeHandle shape) {
  std::vector<int64_t> dims(c->Rank(shape));
  for (size_t i = 0; i < dims.size(); ++i) dims[i] = c->Value(c->Dim(shape, i));
  return dims;
}

absl::Status MatMulShape(InferenceContext* c, const char* op, bool quantized) {
  FusedOps fused;
  bool transpose_a, transpose_b;
  TF_RETURN_IF_ERROR(ReadFusedOps(c, op, quantized, &fused));
  TF_RETURN_IF_ERROR(c->GetAttr("transpose_a", &transpose_a));
  TF_RETURN_IF_ERROR(c->GetAttr("transpose_b", &transpose_b));

  ShapeHandle a = c->input(0), b = c->input(1);
  if (!c->RankKnown(a) || !c->RankKnown(b)) {
    c->set_output(0, c->UnknownShape());
    return absl::OkStatus();
  }
  std::vector<int64_t> dims;
  TF_RETURN_IF_ERROR(
      MatMulOutputShape(DimValues(c, a), DimValues(c, b), transpose_a, transpose_b, &dims));

  std::vector<DimensionHandle> handles;
  for (int64_t d : dims) handles.push_back(c->MakeDim(d));
  ShapeHandle output = c->MakeShape(handles);
  TF_RETURN_IF_ERROR(ApplyFusedArgs(c, op, fused, handles.back(), &output));
  c->set_output(0, output);
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("TfBf16Conv2D")
    .Input("input: T")
    .Input("filter: T")
    .Input("args: num_args * T")
    .Output("output: T")
    .Attr("T: {float, bfloat16}")
    .Attr("num_args: int >= 0")
    .Attr("strides: list(int)")
    .Attr("padding: {'SAME', 'VALID', 'EXPLICIT'}")
    .Attr("explicit_paddings: list(int) = []")
    .Attr("dilations: list(int) = [1, 1, 1, 1]")
    .Attr("groups: int = 1")
    .Attr("fused_ops: list(string) = []")
    .Attr("weights_constant: bool = false")
    .SetShapeFn([](InferenceContext* c) { return Conv2DShape(c, kConvOpName, false); })
    .Doc(R"doc(
NHWC Conv2D with fused epilogue (oneDNN). filter is HWIO [kh, kw, in_channels / groups,
out_channels]; depthwise is groups == in_channels. fused_ops is [BiasAdd]? [Add]?
[Relu|Relu6|GeluErf|GeluTanh|Sigmoid|Swish]?, consuming a 1-D bias and a residual of the
output's shape from args, in that order. Accumulates in FP32.
)doc");

REGISTER_OP("TfBf16MatMul")
    .Input("a: T")
    .Input("b: T")
    .Input("args: num_args * T")
    .Output("product: T")
    .Attr("T: {float, bfloat16}")
    .Attr("num_args: int >= 0")
    .Attr("transpose_a: bool = false")
    .Attr("transpose_b: bool = false")
    .Attr("fused_ops: list(string) = []")
    .Attr("weights_constant: bool = false")
    .SetShapeFn([](InferenceContext* c) { return MatMulShape(c, kMatMulOpName, false); })
    .Doc(R"doc(
MatMul with fused epilogue (oneDNN): rank 2, batched with equal batch dims, or a batched a
times a rank-2 b. fused_ops as for TfBf16Conv2D (bias is one value per column).
)doc");

// The INT8 variants. Ranges follow TensorFlow's SCALED mode (see RangeScale in op_specs.h);
// weights are symmetric INT8 with one scale per output channel or one for all.
REGISTER_OP("TfBf16QuantizedConv2D")
    .Input("input: Tinput")
    .Input("filter: qint8")
    .Input("args: Targs")
    .Output("output: Tout")
    .Attr("Tinput: {float, bfloat16, quint8, qint8}")
    .Attr("Targs: list({float, bfloat16, quint8, qint8}) >= 0")
    .Attr("Tout: {float, bfloat16, quint8, qint8}")
    .Attr("input_range: list(float)")
    .Attr("filter_scales: list(float)")
    .Attr("output_range: list(float) = []")
    .Attr("summand_range: list(float) = []")
    .Attr("strides: list(int)")
    .Attr("padding: {'SAME', 'VALID', 'EXPLICIT'}")
    .Attr("explicit_paddings: list(int) = []")
    .Attr("dilations: list(int) = [1, 1, 1, 1]")
    .Attr("groups: int = 1")
    .Attr("fused_ops: list(string) = []")
    .Attr("weights_constant: bool = false")
    .SetShapeFn([](InferenceContext* c) { return Conv2DShape(c, kQuantizedConvOpName, true); })
    .Doc(R"doc(
INT8 NHWC Conv2D with fused epilogue (oneDNN, static scales). input is float/bfloat16
(quantized here: UINT8 when input_range is non-negative, else INT8) or already quint8/qint8
with float range input_range. filter is qint8 HWIO whose value times filter_scales[channel]
(or the one scale) is the real weight. fused_ops as for TfBf16Conv2D: a float bias, then a
residual (float, bfloat16, or quint8/qint8 with summand_range), then an activation, all in
FP32. A quint8/qint8 output is requantized to output_range; a float/bfloat16 output is
clipped to output_range when one is given (what the INT8 op it replaces saturated at).
)doc");

REGISTER_OP("TfBf16QuantizedMatMul")
    .Input("a: Tinput")
    .Input("b: qint8")
    .Input("args: Targs")
    .Output("product: Tout")
    .Attr("Tinput: {float, bfloat16, quint8, qint8}")
    .Attr("Targs: list({float, bfloat16, quint8, qint8}) >= 0")
    .Attr("Tout: {float, bfloat16, quint8, qint8}")
    .Attr("input_range: list(float)")
    .Attr("filter_scales: list(float)")
    .Attr("output_range: list(float) = []")
    .Attr("summand_range: list(float) = []")
    .Attr("transpose_a: bool = false")
    .Attr("transpose_b: bool = false")
    .Attr("fused_ops: list(string) = []")
    .Attr("weights_constant: bool = false")
    .SetShapeFn([](InferenceContext* c) { return MatMulShape(c, kQuantizedMatMulOpName, true); })
    .Doc(R"doc(
INT8 MatMul with fused epilogue (oneDNN, static scales): a of rank >= 2 times a rank-2
qint8 b with one scale per column (filter_scales) or one for all. Types, ranges and
fused_ops as for TfBf16QuantizedConv2D.
)doc");

}  // namespace tf_bf16
