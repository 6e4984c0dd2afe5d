// MatMul geometry shared by the float (TfBf16MatMul) and INT8 (TfBf16QuantizedMatMul) kernels.

#ifndef TF_BF16_KERNELS_MATMUL_GEOMETRY_H_
#define TF_BF16_KERNELS_MATMUL_GEOMETRY_H_

#include <vector>

#include "common.h"

namespace tf_bf16 {

// Sizes of one call. All batch dims of a collapse into `batch`: oneDNN needs one batch dim
// and TensorFlow buffers are dense, so this is just a view.
struct MatMulGeometry {
  std::vector<int64_t> output_dims;
  int64_t batch = 1, m = 0, k = 0, n = 0;
  bool batched = false;   // a has rank >= 3
  bool shared_b = false;  // batched a times a rank-2 b
  // A shared b with an untransposed a is one 2-D product over batch * m rows, which oneDNN
  // runs better than a batch of small ones (Keras Dense on 3-D inputs, BERT).
  bool fold_batch = false;
};

inline std::vector<int64_t> Dims(const TensorShape& shape) {
  std::vector<int64_t> dims(shape.dims());
  for (int i = 0; i < shape.dims(); ++i) dims[i] = shape.dim_size(i);
  return dims;
}

inline absl::Status ComputeMatMulGeometry(const Tensor& a, const Tensor& b, bool transpose_a,
                             bool transpose_b, MatMulGeometry* g) {
  const std::vector<int64_t> a_dims = Dims(a.shape());
  const std::vector<int64_t> b_dims = Dims(b.shape());
  TF_RETURN_IF_ERROR(MatMulOutputShape(a_dims, b_dims, transpose_a, transpose_b, &g->output_dims));
  const size_t rank = a_dims.size();
  g->batched = rank > 2;
  for (size_t i = 0; i + 2 < rank; ++i) g->batch *= a_dims[i];
  g->m = g->output_dims[rank - 2];
  g->n = g->output_dims[rank - 1];
  g->k = transpose_a ? a_dims[rank - 2] : a_dims[rank - 1];
  g->shared_b = g->batched && b_dims.size() == 2;
  g->fold_batch = g->shared_b && !transpose_a;
  return absl::OkStatus();
}

}  // namespace tf_bf16

#endif  // TF_BF16_KERNELS_MATMUL_GEOMETRY_H_
