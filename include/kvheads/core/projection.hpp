#pragma once
// Q/K/V/O projections: one GEMM each over user memory through Eigen::Map (no copies).
#include <cstddef>

#include <Eigen/Core>

namespace kvheads {

/// Row-major float matrix, the layout of every weight: Wq [d_model][q_heads*head_dim],
/// Wk, Wv [d_model][kv_heads*head_dim], Wo [q_heads*head_dim][d_model].
using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace detail {

/// out [n_tokens][weight.cols()] = x [n_tokens][weight.rows()] * weight.
template <class Weight>
void project(const float* x, std::ptrdiff_t n_tokens, const Weight& weight, float* out) {
  if (n_tokens == 0) return;
  const Eigen::Map<const RowMatrix> input(x, n_tokens, weight.rows());
  Eigen::Map<RowMatrix> output(out, n_tokens, weight.cols());
  output.noalias() = input * weight;
}

}  // namespace detail
}  // namespace kvheads
