// Every public entry point rejects bad arguments with std::invalid_argument (or
// std::length_error for a full cache) whose message names the bad value.
#include <catch2/catch.hpp>

#include <functional>

#include "test_support.hpp"

using kvheads::AttentionOptions;
using kvheads::HeadLayout;
using kvheads::KvCache;

namespace {

template <class Exception>
void expect_error(const std::function<void()>& call, const std::string& must_contain) {
  INFO("expected message containing: " << must_contain);
  try {
    call();
    FAIL("no exception");
  } catch (const Exception& e) {
    const std::string message = e.what();
    INFO("message: " << message);
    CHECK(message.rfind("kvheads: ", 0) == 0);
    CHECK(message.find(must_contain) != std::string::npos);
  }
}

AttentionOptions with(std::function<void(AttentionOptions&)> edit) {
  AttentionOptions options;
  edit(options);
  return options;
}

}  // namespace

TEST_CASE("bad layouts are rejected with the value and the expectation", "[errors]") {
  const std::vector<std::pair<HeadLayout, std::string>> cases = {
      {{12, 5, 64}, "q_heads (12) must be a multiple of kv_heads (5)"},
      {{0, 1, 64}, "q_heads (0) must be positive"},
      {{-4, 1, 64}, "q_heads (-4) must be positive"},
      {{4, 0, 64}, "kv_heads (0) must be positive"},
      {{4, 4, 0}, "head_dim (0) must be positive"},
      {{4, 4, -1}, "head_dim (-1) must be positive"},
      {{4, 4, kvheads::kMaxHeadDim + 1}, "head_dim (513) must be at most 512"},
  };
  float buffer[4] = {};
  // Not a structured binding: C++17 lambdas cannot capture those (clang rejects it).
  for (const auto& bad_case : cases) {
    const HeadLayout& layout = bad_case.first;
    const std::string& message = bad_case.second;
    expect_error<std::invalid_argument>([&] { layout.validate(); }, message);
    expect_error<std::invalid_argument>([&] { kvheads::attend(buffer, buffer, buffer, buffer, 1, 1, layout); }, message);
    expect_error<std::invalid_argument>([&] { KvCache<float>(layout, 8); }, message);
    expect_error<std::invalid_argument>([&] { kvheads::Attention<float>(16, layout); }, message);
  }
}

TEST_CASE("bad lengths, pointers and options are rejected by attend()", "[errors]") {
  const HeadLayout layout{4, 2, 8};
  std::vector<float> q(64), kv(64), out(64);
  auto call = [&](const float* q_ptr, const float* k_ptr, const float* v_ptr, float* out_ptr, int q_len, int kv_len,
                  AttentionOptions options = {}) {
    return [=] { kvheads::attend(q_ptr, k_ptr, v_ptr, out_ptr, q_len, kv_len, layout, options); };
  };
  expect_error<std::invalid_argument>(call(q.data(), kv.data(), kv.data(), out.data(), -1, 2), "q_len (-1) must be >= 0");
  expect_error<std::invalid_argument>(call(q.data(), kv.data(), kv.data(), out.data(), 1, -3), "kv_len (-3) must be >= 0");
  expect_error<std::invalid_argument>(call(nullptr, kv.data(), kv.data(), out.data(), 1, 2), "q is null");
  expect_error<std::invalid_argument>(call(q.data(), nullptr, kv.data(), out.data(), 1, 2), "k is null");
  expect_error<std::invalid_argument>(call(q.data(), kv.data(), nullptr, out.data(), 1, 2), "v is null");
  expect_error<std::invalid_argument>(call(q.data(), kv.data(), kv.data(), nullptr, 1, 2), "out is null");
  expect_error<std::invalid_argument>(
      call(q.data(), kv.data(), kv.data(), out.data(), 1, 2, with([](auto& o) { o.window = -1; })), "window (-1)");
  expect_error<std::invalid_argument>(
      call(q.data(), kv.data(), kv.data(), out.data(), 1, 2, with([](auto& o) { o.softcap = -2.f; })), "softcap (-2)");
  expect_error<std::invalid_argument>(
      call(q.data(), kv.data(), kv.data(), out.data(), 1, 2, with([](auto& o) { o.softcap = INFINITY; })),
      "softcap (inf)");
  expect_error<std::invalid_argument>(
      call(q.data(), kv.data(), kv.data(), out.data(), 1, 2, with([](auto& o) { o.softcap = NAN; })), "softcap (nan)");
  expect_error<std::invalid_argument>(
      call(q.data(), kv.data(), kv.data(), out.data(), 1, 2, with([](auto& o) { o.scale = NAN; })), "scale (nan)");
  expect_error<std::invalid_argument>(
      call(q.data(), kv.data(), kv.data(), out.data(), 1, 2, with([](auto& o) { o.scale = -1.f; })), "scale (-1)");
  expect_error<std::invalid_argument>(
      call(q.data(), kv.data(), kv.data(), out.data(), 1, 2, with([](auto& o) { o.threads = -2; })), "threads (-2)");
  // Zero lengths with null pointers are fine.
  kvheads::attend(nullptr, nullptr, nullptr, nullptr, 0, 0, layout);
  CHECK_NOTHROW(kvheads::attend(q.data(), nullptr, nullptr, out.data(), 1, 0, layout));
}

TEST_CASE("bad cache arguments are rejected, and the cache is unchanged", "[errors][cache]") {
  const HeadLayout layout{4, 2, 8};
  expect_error<std::invalid_argument>([&] { KvCache<float>(layout, 0); }, "cache capacity (0) must be positive");
  expect_error<std::invalid_argument>([&] { KvCache<float>(layout, -5); }, "cache capacity (-5) must be positive");
  KvCache<float> cache(layout, 4);
  std::vector<float> kv(4 * 16, 1.f), q(64), out(64);
  cache.append(kv.data(), kv.data(), 2);
  expect_error<std::invalid_argument>([&] { cache.append(kv.data(), nullptr, 1); }, "v is null");
  expect_error<std::invalid_argument>([&] { cache.append(kv.data(), kv.data(), -1); }, "n_tokens (-1)");
  expect_error<std::length_error>([&] { cache.append(kv.data(), kv.data(), 3); }, "capacity exceeded");
  CHECK(cache.size() == 2);
  expect_error<std::invalid_argument>([&] { kvheads::attend(q.data(), 3, cache, out.data()); },
                                      "q_len (3) must not exceed the cache's size (2)");
  expect_error<std::invalid_argument>([&] { kvheads::attend(q.data(), -1, cache, out.data()); }, "q_len (-1)");
  expect_error<std::invalid_argument>([&] { kvheads::attend(nullptr, 1, cache, out.data()); }, "q is null");
  expect_error<std::invalid_argument>([&] { kvheads::attend(q.data(), 1, cache, nullptr); }, "out is null");
  AttentionOptions bad;
  bad.window = -3;
  expect_error<std::invalid_argument>([&] { kvheads::attend(q.data(), 1, cache, out.data(), bad); }, "window (-3)");
}

TEST_CASE("Attention rejects mismatched layouts, shapes and full caches without touching the cache", "[errors][attention]") {
  const HeadLayout layout{4, 2, 8};
  kvheads::Attention<float> layer(16, layout);
  expect_error<std::invalid_argument>([&] { kvheads::Attention<float>(0, layout); }, "d_model (0) must be positive");
  expect_error<std::invalid_argument>([&] { kvheads::GQA<4, 2, 8>(16, HeadLayout{4, 1, 8}); },
                                      "does not match the compile-time sizes");
  std::vector<float> x(16 * 4, 0.5f), out(16 * 4);
  KvCache<float> other(HeadLayout{4, 1, 8}, 8);
  expect_error<std::invalid_argument>([&] { layer.forward(x.data(), 1, other, out.data()); },
                                      "cache layout (q_heads 4, kv_heads 1, head_dim 8) does not match");
  CHECK(other.size() == 0);
  auto cache = layer.make_cache(3);
  layer.forward(x.data(), 2, cache, out.data());
  expect_error<std::length_error>([&] { layer.forward(x.data(), 2, cache, out.data()); }, "capacity exceeded");
  CHECK(cache.size() == 2);
  AttentionOptions bad;
  bad.softcap = -1.f;
  expect_error<std::invalid_argument>([&] { layer.forward(x.data(), 1, cache, out.data(), bad); }, "softcap (-1)");
  CHECK(cache.size() == 2);  // options are checked before the append
  expect_error<std::invalid_argument>([&] { layer.forward(nullptr, 1, cache, out.data()); }, "x is null");
  expect_error<std::invalid_argument>([&] { layer.forward(x.data(), -1, cache, out.data()); }, "n_tokens (-1)");
  kvheads::RowMatrix wrong(3, 3);
  expect_error<std::invalid_argument>([&] { layer.set_weights(wrong, layer.wk(), layer.wv(), layer.wo()); },
                                      "wq is 3x3 (expected 16x32)");
  expect_error<std::invalid_argument>([&] { layer.forward(kvheads::RowMatrix::Zero(2, 5), cache); }, "x has 5 columns");
}
