#pragma once
// MHA -> GQA/MQA checkpoint conversion by mean-pooling KV heads, the method of the GQA
// paper (Ainslie et al. 2023): KV head j of the result is the mean of source KV heads
// j*r .. j*r+r-1 with r = from_kv_heads / to_kv_heads (contiguous grouping, so query head
// h keeps reading the pool of the heads it used to read).
//
// Two weight layouts:
//   ours          Wk, Wv: [d_model][kv_heads*head_dim]   -> pool column blocks (pool_kv_columns)
//   Hugging Face  k_proj.weight: [kv_heads*head_dim][d_model] -> pool row blocks (pool_kv_rows)
#include <cstddef>
#include <limits>

#include <Eigen/Core>

#include "kvheads/attention.hpp"
#include "kvheads/core/check.hpp"
#include "kvheads/head_layout.hpp"
#include "kvheads/storage_types.hpp"

namespace kvheads {

/// Row-major dynamic float matrix: the weight type of the typed API.
using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace detail {

// Validates the pooling sizes; `extent` is the weight's KV-head dimension (columns for our
// layout, rows for Hugging Face's) and `other` the remaining dimension.
inline void check_pooling(long long extent, const char* extent_name, long long other, const char* other_name,
                          int from_kv_heads, int to_kv_heads, int head_dim) {
  if (from_kv_heads <= 0) throw_invalid("from_kv_heads (", from_kv_heads, ") must be positive");
  if (to_kv_heads <= 0) throw_invalid("to_kv_heads (", to_kv_heads, ") must be positive");
  if (head_dim <= 0) throw_invalid("head_dim (", head_dim, ") must be positive");
  if (from_kv_heads % to_kv_heads != 0)
    throw_invalid("to_kv_heads (", to_kv_heads, ") must divide from_kv_heads (", from_kv_heads, ")");
  if (other <= 0) throw_invalid("weight has ", other, " ", other_name, " (expected a positive number)");
  const long long expected = static_cast<long long>(from_kv_heads) * head_dim;
  if (extent != expected)
    throw_invalid("weight has ", extent, " ", extent_name, " but from_kv_heads (", from_kv_heads, ") * head_dim (",
                  head_dim, ") = ", expected);
  // Element counts and indices below are ptrdiff_t products: a weight must be addressable.
  if (extent > std::numeric_limits<std::ptrdiff_t>::max() / other)
    throw_invalid("weight of ", extent, " ", extent_name, " x ", other, " ", other_name,
                  " has more elements than memory can address");
}

// w: [rows][from*head_dim] with row stride w_stride -> out: [rows][to*head_dim] with out_stride.
inline void pool_columns(const float* w, std::ptrdiff_t w_stride, std::ptrdiff_t rows, int from_kv_heads,
                         int to_kv_heads, int head_dim, float* out, std::ptrdiff_t out_stride) {
  const int r = from_kv_heads / to_kv_heads;
  // Sum in double, divide in double, round once to float. The result is the correctly
  // rounded mean whenever the exponents of a group's nonzero values differ by at most
  // 29 - ceil(log2 r) (26 for r = 8): every partial sum then fits double's 53 bits, and
  // the exact quotient is either a float midpoint or farther than half a double ulp from
  // every one, so rounding it to double cannot land on one and rounding that to float goes
  // the way the exact mean would. Real weights sit well inside that; beyond it a small
  // value can be lost (1e30 + 1 - 1e30) or the quotient can land on a midpoint, and the
  // mean may be one float ulp off.
  for (std::ptrdiff_t row = 0; row < rows; ++row) {
    const float* src = w + row * w_stride;
    float* dst = out + row * out_stride;
    for (int j = 0; j < to_kv_heads; ++j) {
      for (int c = 0; c < head_dim; ++c) {
        double sum = 0.0;
        for (int g = 0; g < r; ++g) sum += double(src[(std::ptrdiff_t(j) * r + g) * head_dim + c]);
        dst[std::ptrdiff_t(j) * head_dim + c] = float(sum / r);
      }
    }
  }
}

// w: [from*head_dim][cols] with row stride w_stride -> out: [to*head_dim][cols] with out_stride.
// narrower_result: the means will be rounded again to bf16 or fp16, so they are rounded to
// float to odd here (see float_round_to_odd), which keeps a rounding of a rounding from
// ever deciding a tie the wrong way. Whether the result is the correctly rounded mean then
// depends, as in pool_columns, on the double sum being exact and the double quotient not
// landing on a midpoint of the final dtype: guaranteed when the exponents of a group's
// nonzero values differ by at most 29 - ceil(log2 r) for fp32 values, 45 - ceil(log2 r)
// for bf16 values (8-bit significands leave double more room), and always for fp16 values
// while r <= 8192 (every fp16 value is a multiple of 2^-24 below 2^16). Beyond that the
// mean may be one ulp off: bf16 values 1, 2^-8, 2^-70 and 0 pooled into one head sum to
// 1 + 2^-8 in double, a bf16 tie once divided by 4, without the 2^-70 that put the exact
// mean above it, so 0.25 comes out instead of 0.25 + 2^-9.
inline void pool_rows(const float* w, std::ptrdiff_t w_stride, std::ptrdiff_t cols, int from_kv_heads, int to_kv_heads,
                      int head_dim, float* out, std::ptrdiff_t out_stride, bool narrower_result = false) {
  const int r = from_kv_heads / to_kv_heads;
  for (int j = 0; j < to_kv_heads; ++j) {
    for (int c = 0; c < head_dim; ++c) {
      float* dst = out + (std::ptrdiff_t(j) * head_dim + c) * out_stride;
      for (std::ptrdiff_t col = 0; col < cols; ++col) {
        double sum = 0.0;
        for (int g = 0; g < r; ++g) sum += double(w[((std::ptrdiff_t(j) * r + g) * head_dim + c) * w_stride + col]);
        dst[col] = narrower_result ? float_round_to_odd(sum / r) : float(sum / r);
      }
    }
  }
}

}  // namespace detail

/// Our layout. w: [rows][from_kv_heads*head_dim] row-major, contiguous ->
/// out: [rows][to_kv_heads*head_dim] (caller memory, must not overlap w).
/// Throws std::invalid_argument on bad sizes or a null pointer.
inline void pool_kv_columns(const float* w, int rows, int from_kv_heads, int to_kv_heads, int head_dim, float* out) {
  detail::check_pooling(static_cast<long long>(from_kv_heads) * head_dim, "columns", rows, "rows", from_kv_heads,
                        to_kv_heads, head_dim);
  detail::require_pointer(w, static_cast<long long>(rows) * from_kv_heads * head_dim, "w");
  detail::require_pointer(out, static_cast<long long>(rows) * to_kv_heads * head_dim, "out");
  detail::pool_columns(w, std::ptrdiff_t(from_kv_heads) * head_dim, rows, from_kv_heads, to_kv_heads, head_dim, out,
                       std::ptrdiff_t(to_kv_heads) * head_dim);
}

/// Hugging Face layout. w: [from_kv_heads*head_dim][cols] row-major, contiguous ->
/// out: [to_kv_heads*head_dim][cols] (caller memory, must not overlap w).
/// cols = d_model for k_proj/v_proj weights, 1 for their biases.
inline void pool_kv_rows(const float* w, int cols, int from_kv_heads, int to_kv_heads, int head_dim, float* out) {
  detail::check_pooling(static_cast<long long>(from_kv_heads) * head_dim, "rows", cols, "columns", from_kv_heads,
                        to_kv_heads, head_dim);
  detail::require_pointer(w, static_cast<long long>(cols) * from_kv_heads * head_dim, "w");
  detail::require_pointer(out, static_cast<long long>(cols) * to_kv_heads * head_dim, "out");
  detail::pool_rows(w, cols, cols, from_kv_heads, to_kv_heads, head_dim, out, cols);
}

/// Our layout. w: [d_model][from_kv_heads*head_dim] -> [d_model][to_kv_heads*head_dim];
/// column block j of the result is the mean of source column blocks j*r .. j*r+r-1.
inline RowMatrix pool_kv_columns(const Eigen::Ref<const RowMatrix>& w, int from_kv_heads, int to_kv_heads,
                                 int head_dim) {
  detail::check_pooling(w.cols(), "columns", w.rows(), "rows", from_kv_heads, to_kv_heads, head_dim);
  RowMatrix out(w.rows(), Eigen::Index(to_kv_heads) * head_dim);
  detail::pool_columns(w.data(), w.outerStride(), w.rows(), from_kv_heads, to_kv_heads, head_dim, out.data(),
                       out.outerStride());
  return out;
}

/// Hugging Face layout. w: [from_kv_heads*head_dim][d_model] -> [to_kv_heads*head_dim][d_model];
/// row block j of the result is the mean of source row blocks j*r .. j*r+r-1.
inline RowMatrix pool_kv_rows(const Eigen::Ref<const RowMatrix>& w, int from_kv_heads, int to_kv_heads,
                              int head_dim) {
  detail::check_pooling(w.rows(), "rows", w.cols(), "columns", from_kv_heads, to_kv_heads, head_dim);
  RowMatrix out(Eigen::Index(to_kv_heads) * head_dim, w.cols());
  detail::pool_rows(w.data(), w.outerStride(), w.cols(), from_kv_heads, to_kv_heads, head_dim, out.data(),
                    out.outerStride());
  return out;
}

/// The same layer with `kv_heads` KV heads: Wq and Wo are copied, Wk and Wv are mean-pooled
/// over contiguous groups of the source's KV heads (MHA -> GQA/MQA, or GQA -> fewer heads).
/// The result has run-time sizes and the source's KV cache storage type T.
/// Throws std::invalid_argument unless kv_heads divides source.layout().kv_heads.
template <class T, int QHeads, int KvHeads, int HeadDim>
Attention<T, Dynamic, Dynamic, Dynamic> to_kv_heads(const Attention<T, QHeads, KvHeads, HeadDim>& source,
                                                    int kv_heads) {
  const HeadLayout from = source.layout();
  if (kv_heads <= 0) detail::throw_invalid("kv_heads (", kv_heads, ") must be positive");
  if (from.kv_heads % kv_heads != 0)
    detail::throw_invalid("kv_heads (", kv_heads, ") must divide the source's kv_heads (", from.kv_heads, ")");
  const HeadLayout layout = make_layout(from.q_heads, kv_heads, from.head_dim);
  Attention<T, Dynamic, Dynamic, Dynamic> result(source.d_model(), layout);
  result.set_weights(source.wq(), pool_kv_columns(source.wk(), from.kv_heads, kv_heads, from.head_dim),
                     pool_kv_columns(source.wv(), from.kv_heads, kv_heads, from.head_dim), source.wo());
  result.set_rope(source.rope());  // the same layer, fewer KV heads: positions rotate as before
  return result;
}

}  // namespace kvheads
