// Mean-pooling of KV heads (GQA paper conversion), both weight layouts.
#include <cmath>
#include <random>
#include <stdexcept>
#include <vector>

#include <catch2/catch.hpp>

// Through the umbrella only: conversion is part of the public API it promises (and
// tests/headers checks convert.hpp on its own).
#include "kvheads/kvheads.hpp"

namespace {

using kvheads::RowMatrix;
using Catch::Matchers::Contains;

RowMatrix random_matrix(Eigen::Index rows, Eigen::Index cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  RowMatrix m(rows, cols);
  for (Eigen::Index i = 0; i < rows; ++i)
    for (Eigen::Index j = 0; j < cols; ++j) m(i, j) = dist(rng);
  return m;
}

// Independent reference for our layout: output column (j, c) is the mean, in double, of
// source columns (j*r + g, c) for g in [0, r).
Eigen::MatrixXd mean_of_column_blocks(const RowMatrix& w, int from, int to, int head_dim) {
  const int r = from / to;
  Eigen::MatrixXd out = Eigen::MatrixXd::Zero(w.rows(), to * head_dim);
  for (int j = 0; j < to; ++j)
    for (int g = 0; g < r; ++g)
      out.middleCols(j * head_dim, head_dim) += w.middleCols((j * r + g) * head_dim, head_dim).cast<double>();
  return out / r;
}

void require_close(const RowMatrix& got, const Eigen::MatrixXd& want, double rel = 1e-6) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  for (Eigen::Index i = 0; i < got.rows(); ++i)
    for (Eigen::Index j = 0; j < got.cols(); ++j) {
      INFO("element (" << i << ", " << j << ")");
      REQUIRE(double(got(i, j)) == Approx(want(i, j)).epsilon(rel).margin(1e-7));
    }
}

}  // namespace

TEST_CASE("pooling to the same number of KV heads is the identity", "[convert]") {
  const RowMatrix w = random_matrix(16, 8 * 4, 1);
  const RowMatrix cols = kvheads::pool_kv_columns(w, 8, 8, 4);
  const RowMatrix rows = kvheads::pool_kv_rows(RowMatrix(w.transpose()), 8, 8, 4);
  CHECK(cols == w);
  CHECK(rows == RowMatrix(w.transpose()));
}

TEST_CASE("pooling is the mean of the grouped head blocks", "[convert]") {
  struct Case {
    int d_model, from, to, head_dim;
  };
  for (const Case& c : {Case{16, 8, 2, 4}, Case{16, 8, 4, 4}, Case{5, 6, 3, 3}, Case{7, 12, 4, 1}, Case{3, 9, 3, 5},
                        Case{32, 32, 8, 16}}) {
    INFO("d_model " << c.d_model << ", " << c.from << " -> " << c.to << " KV heads, head_dim " << c.head_dim);
    const RowMatrix w = random_matrix(c.d_model, c.from * c.head_dim, unsigned(c.from * 100 + c.to));
    const Eigen::MatrixXd want = mean_of_column_blocks(w, c.from, c.to, c.head_dim);
    require_close(kvheads::pool_kv_columns(w, c.from, c.to, c.head_dim), want);
    // Hugging Face layout: the same weights transposed, pooled along rows.
    const RowMatrix hf = w.transpose();
    require_close(kvheads::pool_kv_rows(hf, c.from, c.to, c.head_dim), want.transpose());
  }
}

TEST_CASE("both layouts agree exactly (HF layout is the transpose of ours)", "[convert]") {
  const RowMatrix ours = random_matrix(24, 16 * 8, 7);
  const RowMatrix hf = ours.transpose();
  for (int to : {16, 8, 4, 2, 1}) {
    const RowMatrix a = kvheads::pool_kv_columns(ours, 16, to, 8);
    const RowMatrix b = kvheads::pool_kv_rows(hf, 16, to, 8);
    CHECK(RowMatrix(b.transpose()) == a);
  }
}

TEST_CASE("pooling twice 32 -> 8 -> 2 equals pooling once 32 -> 2", "[convert]") {
  const RowMatrix w = random_matrix(16, 32 * 4, 3);
  const RowMatrix twice = kvheads::pool_kv_columns(kvheads::pool_kv_columns(w, 32, 8, 4), 8, 2, 4);
  const RowMatrix once = kvheads::pool_kv_columns(w, 32, 2, 4);
  require_close(twice, once.cast<double>(), 1e-5);
  const RowMatrix hf = w.transpose();
  const RowMatrix hf_twice = kvheads::pool_kv_rows(kvheads::pool_kv_rows(hf, 32, 8, 4), 8, 2, 4);
  require_close(hf_twice, once.transpose().cast<double>(), 1e-5);
}

TEST_CASE("MQA: pooling to one KV head averages every head", "[convert]") {
  const int from = 8, head_dim = 4;
  const RowMatrix w = random_matrix(16, from * head_dim, 11);
  const RowMatrix mqa = kvheads::pool_kv_columns(w, from, 1, head_dim);
  REQUIRE(mqa.rows() == 16);
  REQUIRE(mqa.cols() == head_dim);
  for (Eigen::Index i = 0; i < w.rows(); ++i)
    for (int c = 0; c < head_dim; ++c) {
      double sum = 0;
      for (int h = 0; h < from; ++h) sum += w(i, h * head_dim + c);
      CHECK(double(mqa(i, c)) == Approx(sum / from).epsilon(1e-6).margin(1e-7));
    }
  // A weight whose heads are all equal pools to that head exactly.
  RowMatrix same(4, from * head_dim);
  for (int h = 0; h < from; ++h) same.middleCols(h * head_dim, head_dim) = w.topLeftCorner(4, head_dim);
  CHECK(kvheads::pool_kv_columns(same, from, 1, head_dim) == w.topLeftCorner(4, head_dim));
}

TEST_CASE("Eigen maps and strided blocks are accepted; raw pointers agree", "[convert]") {
  const int d_model = 6, from = 4, to = 2, head_dim = 3;
  const RowMatrix w = random_matrix(d_model, from * head_dim, 5);
  const RowMatrix want = kvheads::pool_kv_columns(w, from, to, head_dim);

  std::vector<float> storage(w.data(), w.data() + w.size());
  Eigen::Map<const RowMatrix> map(storage.data(), d_model, from * head_dim);
  CHECK(kvheads::pool_kv_columns(map, from, to, head_dim) == want);

  // A block of a wider matrix: row stride != cols, no copy needed for Ref.
  RowMatrix wide = RowMatrix::Zero(d_model + 2, from * head_dim + 5);
  wide.block(1, 2, d_model, from * head_dim) = w;
  const Eigen::Ref<const RowMatrix> ref = wide.block(1, 2, d_model, from * head_dim);
  CHECK(ref.data() == &wide(1, 2));
  CHECK(kvheads::pool_kv_columns(wide.block(1, 2, d_model, from * head_dim), from, to, head_dim) == want);

  std::vector<float> out(std::size_t(d_model) * to * head_dim, -1.f);
  kvheads::pool_kv_columns(storage.data(), d_model, from, to, head_dim, out.data());
  CHECK(Eigen::Map<RowMatrix>(out.data(), d_model, to * head_dim) == want);

  const RowMatrix hf = w.transpose();
  std::vector<float> out_rows(out.size(), -1.f);
  kvheads::pool_kv_rows(hf.data(), d_model, from, to, head_dim, out_rows.data());
  CHECK(Eigen::Map<RowMatrix>(out_rows.data(), to * head_dim, d_model) == RowMatrix(want.transpose()));
}

TEST_CASE("invalid pooling arguments throw with the value in the message", "[convert]") {
  const RowMatrix w = random_matrix(16, 8 * 4, 9);
  using kvheads::pool_kv_columns;
  using kvheads::pool_kv_rows;
  REQUIRE_THROWS_AS(pool_kv_columns(w, 8, 3, 4), std::invalid_argument);
  REQUIRE_THROWS_WITH(pool_kv_columns(w, 8, 3, 4), Contains("to_kv_heads (3) must divide from_kv_heads (8)"));
  REQUIRE_THROWS_WITH(pool_kv_columns(w, 8, 16, 4), Contains("to_kv_heads (16) must divide from_kv_heads (8)"));
  REQUIRE_THROWS_WITH(pool_kv_columns(w, 8, 0, 4), Contains("to_kv_heads (0) must be positive"));
  REQUIRE_THROWS_WITH(pool_kv_columns(w, -8, 2, 4), Contains("from_kv_heads (-8) must be positive"));
  REQUIRE_THROWS_WITH(pool_kv_columns(w, 8, 2, 0), Contains("head_dim (0) must be positive"));
  REQUIRE_THROWS_WITH(pool_kv_columns(w, 8, 2, 5),
                      Contains("weight has 32 columns but from_kv_heads (8) * head_dim (5) = 40"));
  REQUIRE_THROWS_WITH(pool_kv_rows(w, 8, 2, 4), Contains("weight has 16 rows but from_kv_heads (8) * head_dim (4) = 32"));
  REQUIRE_THROWS_WITH(pool_kv_columns(RowMatrix(0, 32), 8, 2, 4), Contains("weight has 0 rows"));

  std::vector<float> out(64);
  REQUIRE_THROWS_WITH(kvheads::pool_kv_columns(nullptr, 16, 8, 2, 4, out.data()), Contains("w is null"));
  REQUIRE_THROWS_WITH(kvheads::pool_kv_rows(w.data(), 16, 8, 2, 4, nullptr), Contains("out is null"));
  REQUIRE_THROWS_WITH(kvheads::pool_kv_rows(w.data(), 0, 8, 2, 4, out.data()), Contains("weight has 0 columns"));
}

TEST_CASE("to_kv_heads converts an Attention layer: Wq/Wo copied, Wk/Wv pooled", "[convert]") {
  const int d_model = 16, q_heads = 8, head_dim = 4;
  kvheads::MHA<8, 4> mha(d_model);
  mha.wq() = random_matrix(d_model, q_heads * head_dim, 21);
  mha.wk() = random_matrix(d_model, q_heads * head_dim, 22);
  mha.wv() = random_matrix(d_model, q_heads * head_dim, 23);
  mha.wo() = random_matrix(q_heads * head_dim, d_model, 24);

  SECTION("same number of KV heads is the identity") {
    const auto same = kvheads::to_kv_heads(mha, 8);
    CHECK(same.layout() == mha.layout());
    CHECK(same.wq() == mha.wq());
    CHECK(same.wk() == mha.wk());
    CHECK(same.wv() == mha.wv());
    CHECK(same.wo() == mha.wo());
  }
  SECTION("GQA and MQA") {
    for (int kv : {4, 2, 1}) {
      const kvheads::Attention<float> gqa = kvheads::to_kv_heads(mha, kv);
      CHECK(gqa.layout() == kvheads::HeadLayout{q_heads, kv, head_dim});
      CHECK(gqa.d_model() == d_model);
      CHECK(gqa.wq() == mha.wq());
      CHECK(gqa.wo() == mha.wo());
      require_close(gqa.wk(), mean_of_column_blocks(mha.wk(), q_heads, kv, head_dim));
      require_close(gqa.wv(), mean_of_column_blocks(mha.wv(), q_heads, kv, head_dim));
    }
  }
  SECTION("converting twice equals converting once") {
    const auto twice = kvheads::to_kv_heads(kvheads::to_kv_heads(mha, 4), 2);
    const auto once = kvheads::to_kv_heads(mha, 2);
    require_close(twice.wk(), once.wk().cast<double>(), 1e-5);
    require_close(twice.wv(), once.wv().cast<double>(), 1e-5);
  }
  SECTION("bad kv_heads throws with the value") {
    REQUIRE_THROWS_WITH(kvheads::to_kv_heads(mha, 3), Contains("kv_heads (3) must divide the source's kv_heads (8)"));
    REQUIRE_THROWS_WITH(kvheads::to_kv_heads(mha, 0), Contains("kv_heads (0) must be positive"));
    REQUIRE_THROWS_WITH(kvheads::to_kv_heads(mha, 16), Contains("kv_heads (16) must divide"));
  }
}

TEST_CASE("an MHA layer whose KV heads are equal within groups converts without changing its output",
          "[convert]") {
  // If the r heads of each group already share K and V weights, the mean is that weight and
  // the GQA layer computes exactly what the MHA layer did (up to fp rounding).
  const int d_model = 16, q_heads = 8, head_dim = 4, kv = 2, r = q_heads / kv;
  kvheads::MHA<8, 4> mha(d_model);
  mha.wq() = random_matrix(d_model, q_heads * head_dim, 31);
  mha.wo() = random_matrix(q_heads * head_dim, d_model, 32);
  const RowMatrix k_heads = random_matrix(d_model, kv * head_dim, 33);
  const RowMatrix v_heads = random_matrix(d_model, kv * head_dim, 34);
  for (int h = 0; h < q_heads; ++h) {
    mha.wk().middleCols(h * head_dim, head_dim) = k_heads.middleCols((h / r) * head_dim, head_dim);
    mha.wv().middleCols(h * head_dim, head_dim) = v_heads.middleCols((h / r) * head_dim, head_dim);
  }
  // With and without RoPE: the converted layer keeps the source's rotary setting.
  for (bool rope : {false, true}) {
    INFO((rope ? "RoPE (interleaved, rotary_dim 2, base 500)" : "no RoPE"));
    if (rope) {
      kvheads::RopeOptions setting;
      setting.enabled = true;
      setting.layout = kvheads::RopeLayout::interleaved;
      setting.base = 500.f;
      setting.rotary_dim = 2;
      mha.set_rope(setting);
    }
    const auto gqa = kvheads::to_kv_heads(mha, kv);
    CHECK(gqa.wk() == k_heads);
    CHECK(gqa.wv() == v_heads);
    CHECK(gqa.rope().enabled == mha.rope().enabled);
    CHECK(gqa.rope().layout == mha.rope().layout);
    CHECK(gqa.rope().base == mha.rope().base);
    CHECK(gqa.rope().rotary_dim == mha.rope().rotary_dim);

    const RowMatrix x = random_matrix(5, d_model, 35);
    auto mha_cache = mha.make_cache(8);
    auto gqa_cache = gqa.make_cache(8);
    kvheads::AttentionOptions options;
    options.causal = true;
    options.threads = 1;
    const RowMatrix want = mha.forward(x, mha_cache, options);
    const RowMatrix got = gqa.forward(x, gqa_cache, options);
    require_close(got, want.cast<double>(), 1e-4);
  }
}
