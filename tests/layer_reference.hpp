#pragma once
// A whole Attention layer computed the slow way, for tests of Attention<...>: random
// weights, double-precision projections and the reference kernel.
#include <cmath>
#include <cstdint>
#include <vector>

#include <Eigen/Core>

#include "test_support.hpp"

namespace kvheads_test {

template <class Layer>
void randomise(Layer& layer, std::uint32_t seed) {
  const float scale = 1.f / std::sqrt(float(layer.d_model()));
  for (kvheads::RowMatrix* w : {&layer.wq(), &layer.wk(), &layer.wv(), &layer.wo()}) {
    const std::vector<float> values = random_vector(std::size_t(w->size()), seed++, scale);
    *w = Eigen::Map<const kvheads::RowMatrix>(values.data(), w->rows(), w->cols());
  }
}

// The layer computed the slow way: double-precision projections and the reference kernel.
template <class Layer>
std::vector<float> reference_layer(const Layer& layer, const std::vector<float>& x, int tokens,
                                   const kvheads::AttentionOptions& options) {
  const kvheads::HeadLayout& l = layer.layout();
  const Eigen::MatrixXd input =
      Eigen::Map<const kvheads::RowMatrix>(x.data(), tokens, layer.d_model()).template cast<double>();
  auto project = [&](const kvheads::RowMatrix& w) {
    const Eigen::MatrixXd product = input * w.cast<double>();
    kvheads::RowMatrix result = product.cast<float>();
    return std::vector<float>(result.data(), result.data() + result.size());
  };
  const std::vector<float> q = project(layer.wq()), k = project(layer.wk()), v = project(layer.wv());
  std::vector<float> attended(q.size());
  kvheads::reference_attend(q.data(), k.data(), v.data(), attended.data(), tokens, tokens, l, options);
  const Eigen::MatrixXd out =
      Eigen::Map<const kvheads::RowMatrix>(attended.data(), tokens, l.q_width()).cast<double>() *
      layer.wo().template cast<double>();
  kvheads::RowMatrix result = out.cast<float>();
  return std::vector<float>(result.data(), result.data() + result.size());
}

}  // namespace kvheads_test
