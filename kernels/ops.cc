// Op registrations and shape functions of TfBf16Conv2D and TfBf16MatMul.
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

absl::Status ReadFusedOps(InferenceContext* c, const char* op, FusedOps* fused) {
  std::vector<std::string> names;
  int num_args;
  TF_RETURN_IF_ERROR(c->GetAttr("fused_ops", &names));
  TF_RETURN_IF_ERROR(c->GetAttr("num_args", &num_args));
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

absl::Status Conv2DShape(InferenceContext* c) {
  FusedOps fused;
  ConvAttrs attrs;
  ShapeHandle input, filter;
  TF_RETURN_IF_ERROR(ReadFusedOps(c, kConvOpName, &fused));
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
  TF_RETURN_IF_ERROR(ApplyFusedArgs(c, kConvOpName, fused, channels, &output));
  c->set_output(0, output);
  return absl::OkStatus();
}

// Known dimensions of `shape` with kUnknown for the rest; shape must have a known rank.
std::vector<int64_t> DimValues(InferenceContext* c, ShapeHandle shape) {
  std::vector<int64_t> dims(c->Rank(shape));
  for (size_t i = 0; i < dims.size(); ++i) dims[i] = c->Value(c->Dim(shape, i));
  return dims;
}

absl::Status MatMulShape(InferenceContext* c) {
  FusedOps fused;
  bool transpose_a, transpose_b;
  TF_RETURN_IF_ERROR(ReadFusedOps(c, kMatMulOpName, &fused));
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
  TF_RETURN_IF_ERROR(ApplyFusedArgs(c, kMatMulOpName, fused, handles.back(), &output));
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
    .SetShapeFn(Conv2DShape)
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
    .SetShapeFn(MatMulShape)
    .Doc(R"doc(
MatMul with fused epilogue (oneDNN): rank 2, batched with equal batch dims, or a batched a
times a rank-2 b. fused_ops as for TfBf16Conv2D (bias is one value per column).
)doc");

}  // namespace tf_bf16
