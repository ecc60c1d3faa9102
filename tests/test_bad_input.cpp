// Bad input, table-driven: one table lists every public entry point with every invalid
// argument it can get. Each row must throw exactly the listed exception type
// (std::invalid_argument, or std::length_error for a full cache) whose message starts with
// "kvheads: " and names the offending value; rows on a cache or a layer also check that it
// is unchanged afterwards (size, position, every K/V element; every weight, the RoPE setting).
#include <catch2/catch.hpp>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <kvheads/convert.hpp>
#include <kvheads/core/parallel.hpp>

#include "test_support.hpp"

#if __has_include(<nlohmann/json.hpp>)
#include <kvheads/safetensors.hpp>
#define KVHEADS_BAD_INPUT_HAVE_JSON 1
#endif

using kvheads::AttentionOptions;
using kvheads::CacheOptions;
using kvheads::HeadLayout;
using kvheads::KvCache;
using kvheads::RowMatrix;

namespace {

enum class Throws { invalid_argument, length_error };

struct Row {
  std::string entry;     // the public entry point
  std::string argument;  // what is wrong with the call
  Throws kind;
  std::string message;   // must appear in what(): names the bad value
  std::function<void()> call;
};

/// Everything observable about a float cache: its counters and both whole planes.
struct CacheState {
  int size = 0, capacity = 0;
  std::int64_t position = 0;
  std::vector<float> keys, values;
  explicit CacheState(const KvCache<float>& c)
      : size(c.size()),
        capacity(c.capacity()),
        position(c.position()),
        keys(c.keys(), c.keys() + std::size_t(c.capacity()) * c.layout().kv_width()),
        values(c.values(), c.values() + std::size_t(c.capacity()) * c.layout().kv_width()) {}
  bool operator==(const CacheState& o) const {
    return size == o.size && capacity == o.capacity && position == o.position &&
           std::memcmp(keys.data(), o.keys.data(), keys.size() * sizeof(float)) == 0 && keys.size() == o.keys.size() &&
           std::memcmp(values.data(), o.values.data(), values.size() * sizeof(float)) == 0;
  }
};

AttentionOptions with(const std::function<void(AttentionOptions&)>& edit) {
  AttentionOptions o;
  edit(o);
  return o;
}

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

/// Options that are each invalid in exactly one field, with the message naming it.
std::vector<std::pair<AttentionOptions, std::string>> bad_options() {
  return {
      {with([](auto& o) { o.window = -1; }), "window (-1) must be >= 0"},
      {with([](auto& o) { o.window = INT_MIN; }), "window (-2147483648)"},
      {with([](auto& o) { o.softcap = -1.f; }), "softcap (-1) must be finite and >= 0"},
      {with([](auto& o) { o.softcap = kInf; }), "softcap (inf)"},
      {with([](auto& o) { o.softcap = -kInf; }), "softcap (-inf)"},
      {with([](auto& o) { o.softcap = kNaN; }), "softcap (nan)"},
      {with([](auto& o) { o.scale = -0.5f; }), "scale (-0.5) must be finite and >= 0"},
      {with([](auto& o) { o.scale = kInf; }), "scale (inf)"},
      {with([](auto& o) { o.scale = kNaN; }), "scale (nan)"},
      {with([](auto& o) { o.threads = -1; }), "threads (-1) must be >= 0"},
  };
}

/// Layouts that are each invalid in exactly one way.
std::vector<std::pair<HeadLayout, std::string>> bad_layouts() {
  return {
      {{0, 1, 8}, "q_heads (0) must be positive"},
      {{-4, 1, 8}, "q_heads (-4) must be positive"},
      {{4, 0, 8}, "kv_heads (0) must be positive"},
      {{4, -2, 8}, "kv_heads (-2) must be positive"},
      {{4, 4, 0}, "head_dim (0) must be positive"},
      {{4, 4, -1}, "head_dim (-1) must be positive"},
      {{4, 4, kvheads::kMaxHeadDim + 1}, "head_dim (513) must be at most 512"},
      {{4, 4, INT_MAX}, "head_dim (2147483647) must be at most 512"},
      {{12, 5, 8}, "q_heads (12) must be a multiple of kv_heads (5)"},
      {{2, 4, 8}, "q_heads (2) must be a multiple of kv_heads (4)"},
      // Past kMaxHeads: sizes derived from the layout (a group's rows x head_dim, the ALiBi
      // slopes, a cache's rows) would no longer fit an int.
      {{kvheads::kMaxHeads + 1, 1, 8}, "q_heads (65537) must be at most 65536"},
      {{1 << 22, 1, 512}, "q_heads (4194304) must be at most 65536"},
      {{1 << 27, 1 << 27, 512}, "q_heads (134217728) must be at most 65536"},
  };
}

/// Runs one row: the exact exception type, the prefix and the named value.
void check_row(const Row& row) {
  INFO("entry point: " << row.entry << "\nbad argument: " << row.argument << "\nexpected message containing: "
                       << row.message);
  std::string message;
  bool right_type = false;
  try {
    row.call();
    FAIL_CHECK("no exception thrown");
    return;
  } catch (const std::invalid_argument& e) {
    message = e.what();
    right_type = row.kind == Throws::invalid_argument;
  } catch (const std::length_error& e) {
    message = e.what();
    right_type = row.kind == Throws::length_error;
  } catch (const std::exception& e) {
    message = e.what();
  }
  INFO("message: " << message);
  CHECK(right_type);
  CHECK(message.rfind("kvheads: ", 0) == 0);
  CHECK(message.find(row.message) != std::string::npos);
}

}  // namespace

TEST_CASE("every public entry point rejects every invalid argument and names it", "[errors]") {
  const HeadLayout layout{4, 2, 8};  // q_width 32, kv_width 16
  std::vector<float> q(64 * 32, 0.5f), k(64 * 16, 0.25f), v(64 * 16, -0.5f), out(64 * 32), lse(64 * 4);
  std::vector<float> joint_kv(128, 0.25f);  // k of 2 tokens at 0, v at 96
  std::vector<Row> rows;
  auto add = [&](std::string entry, std::string argument, std::string message, std::function<void()> call,
                 Throws kind = Throws::invalid_argument) {
    rows.push_back({std::move(entry), std::move(argument), kind, std::move(message), std::move(call)});
  };

  // --- layouts, through every entry point that takes one ------------------------------
  for (const auto& [bad, message] : bad_layouts()) {
    const std::string what = "layout {" + std::to_string(bad.q_heads) + ", " + std::to_string(bad.kv_heads) + ", " +
                             std::to_string(bad.head_dim) + "}";
    add("HeadLayout::validate", what, message, [bad = bad] { bad.validate(); });
    add("HeadLayout::kv_head_of", what, message, [bad = bad] { (void)bad.kv_head_of(1); });
    add("make_layout", what, message, [bad = bad] { kvheads::make_layout(bad.q_heads, bad.kv_heads, bad.head_dim); });
    add("attend (plain)", what, message,
        [&, bad = bad] { kvheads::attend(q.data(), k.data(), v.data(), out.data(), 1, 1, bad); });
    add("attend<scalar> (plain, lse)", what, message, [&, bad = bad] {
      kvheads::attend<kvheads::simd::scalar>(q.data(), k.data(), v.data(), out.data(), 1, 1, bad, {}, lse.data());
    });
    add("KvCache(layout, capacity)", what, message, [bad = bad] { KvCache<float>(bad, 8); });
    add("KvCache<bf16>(layout, capacity)", what, message, [bad = bad] { KvCache<kvheads::bf16>(bad, 8); });
    add("KvCache<int8_t>(layout, capacity, options)", what, message,
        [bad = bad] { KvCache<std::int8_t>(bad, 8, CacheOptions{}); });
    add("KvCache::ring", what, message, [bad = bad] { KvCache<float>::ring(bad, 4, 1); });
    add("Attention(d_model, layout)", what, message, [bad = bad] { kvheads::Attention<float>(16, bad); });
    add("Attention(layout, wq, wk, wv, wo)", what, message, [bad = bad] {
      const RowMatrix w = RowMatrix::Zero(16, 32);
      kvheads::Attention<float>(bad, w, w, w, w);
    });
    add("merge", what, message, [&, bad = bad] {
      kvheads::merge(out.data(), lse.data(), out.data(), lse.data(), out.data(), lse.data(), 1, bad);
    });
  }

  add("HeadLayout::kv_head_of", "q_head 4 of 4", "q_head (4) must be in [0, 4)", [&] { (void)layout.kv_head_of(4); });
  add("HeadLayout::kv_head_of", "q_head -1", "q_head (-1) must be in [0, 4)", [&] { (void)layout.kv_head_of(-1); });
  // ALiBi's slopes are computed per q_heads before any query is looked at.
  add("attend (plain, ALiBi)", "layout {2^30, 1, 1}", "q_heads (1073741824) must be at most 65536", [] {
    AttentionOptions o;
    o.alibi = true;
    kvheads::attend(nullptr, nullptr, nullptr, nullptr, 0, 0, HeadLayout{1 << 30, 1, 1}, o);
  });

  // --- attend on plain memory ------------------------------------------------------------
  const std::vector<std::string> plain_entries = {"attend (plain)", "attend<default_isa> (plain, lse)"};
  auto plain = [&](int which, const float* q_ptr, const float* k_ptr, const float* v_ptr, float* out_ptr, int q_len,
                   int kv_len, AttentionOptions options = {}) {
    return [=, &lse] {
      if (which == 0)
        kvheads::attend(q_ptr, k_ptr, v_ptr, out_ptr, q_len, kv_len, layout, options);
      else
        kvheads::attend<kvheads::simd::default_isa>(q_ptr, k_ptr, v_ptr, out_ptr, q_len, kv_len, layout, options,
                                                    lse.data());
    };
  };
  for (int which : {0, 1}) {
    const std::string& e = plain_entries[std::size_t(which)];
    add(e, "q_len -1", "q_len (-1) must be >= 0", plain(which, q.data(), k.data(), v.data(), out.data(), -1, 2));
    add(e, "q_len INT_MIN", "q_len (-2147483648)", plain(which, q.data(), k.data(), v.data(), out.data(), INT_MIN, 2));
    add(e, "kv_len -2", "kv_len (-2) must be >= 0", plain(which, q.data(), k.data(), v.data(), out.data(), 1, -2));
    add(e, "q null, q_len 1", "q is null but its length is 1",
        plain(which, nullptr, k.data(), v.data(), out.data(), 1, 2));
    add(e, "k null, kv_len 2", "k is null but its length is 2",
        plain(which, q.data(), nullptr, v.data(), out.data(), 1, 2));
    add(e, "v null, kv_len 2", "v is null but its length is 2",
        plain(which, q.data(), k.data(), nullptr, out.data(), 1, 2));
    add(e, "out null, q_len 3", "out is null but its length is 3",
        plain(which, q.data(), k.data(), v.data(), nullptr, 3, 2));
    for (const auto& [options, message] : bad_options())
      add(e, "options: " + message, message, plain(which, q.data(), k.data(), v.data(), out.data(), 1, 2, options));
    // An output sharing memory with an input would race with the reads (a wrong answer).
    // out == q is allowed (in place); out inside k or v, or over part of q, is not.
    add(e, "out == k", "out (", plain(which, q.data(), k.data(), v.data(), k.data(), 1, 2));
    add(e, "out inside k", "overlaps k (", plain(which, q.data(), k.data(), v.data(), k.data() + 20, 1, 2));
    // k and v carved out of one buffer with a gap, so that out can end inside v without
    // touching k (or pointing outside any array).
    add(e, "out ending inside v", "out must not share memory with v",
        plain(which, q.data(), joint_kv.data(), joint_kv.data() + 96, joint_kv.data() + 65, 1, 2));
    add(e, "out over part of q", "overlaps q (", plain(which, q.data(), k.data(), v.data(), q.data() + 8, 2, 2));
    add(e, "q over part of out", "unless it is exactly the same array",
        plain(which, out.data() + 32, k.data(), v.data(), out.data(), 2, 2));
    AttentionOptions sinks_in_out;
    sinks_in_out.sinks = out.data() + 3;
    add(e, "options.sinks inside out", "overlaps options.sinks",
        plain(which, q.data(), k.data(), v.data(), out.data(), 1, 2, sinks_in_out));
  }
  add("attend<default_isa> (plain, lse)", "lse inside out", "lse (", [&] {
    kvheads::attend<kvheads::simd::default_isa>(q.data(), k.data(), v.data(), out.data(), 2, 2, layout, {},
                                                out.data() + 60);
  });
  add("attend<default_isa> (plain, lse)", "lse inside k", "lse must not share memory with k", [&] {
    kvheads::attend<kvheads::simd::default_isa>(q.data(), k.data(), v.data(), out.data(), 1, 2, layout, {}, k.data());
  });

  // --- attend on a cache --------------------------------------------------------------------
  KvCache<float> cache(layout, 4);
  cache.append(k.data(), v.data(), 3);
  const CacheState cache_before(cache);
  KvCache<float> growable(layout, 4, CacheOptions{0, true});
  growable.append(k.data(), v.data(), 3);
  const CacheState growable_before(growable);
  const std::vector<float> big_kv(65536, 0.5f);
  KvCache<float> big_heads(HeadLayout{65536, 65536, 1}, 2, CacheOptions{0, true});  // 2^49 bytes at INT_MAX
  big_heads.append(big_kv.data(), big_kv.data(), 1);
  const CacheState big_heads_before(big_heads);
  const std::vector<std::string> cache_entries = {"attend (cache)", "attend<default_isa> (cache, lse)"};
  auto cached = [&](int which, const float* q_ptr, int q_len, float* out_ptr, AttentionOptions options = {}) {
    return [=, &cache, &lse] {
      if (which == 0)
        kvheads::attend(q_ptr, q_len, cache, out_ptr, options);
      else
        kvheads::attend<kvheads::simd::default_isa>(q_ptr, q_len, cache, out_ptr, options, lse.data());
    };
  };
  for (int which : {0, 1}) {
    const std::string& e = cache_entries[std::size_t(which)];
    add(e, "q_len -1", "q_len (-1) must be >= 0", cached(which, q.data(), -1, out.data()));
    add(e, "q_len above the cache's size", "q_len (4) must not exceed the cache's size (3)",
        cached(which, q.data(), 4, out.data()));
    add(e, "q_len INT_MAX", "q_len (2147483647) must not exceed", cached(which, q.data(), INT_MAX, out.data()));
    add(e, "q null", "q is null but its length is 2", cached(which, nullptr, 2, out.data()));
    add(e, "out null", "out is null but its length is 2", cached(which, q.data(), 2, nullptr));
    add(e, "out over part of q", "out must not share memory with q unless it is exactly the same array",
        cached(which, q.data(), 2, q.data() + 1));
    AttentionOptions sinks_in_out;
    sinks_in_out.sinks = out.data() + 40;
    add(e, "options.sinks inside out", "out must not share memory with options.sinks",
        cached(which, q.data(), 2, out.data(), sinks_in_out));
    for (const auto& [options, message] : bad_options())
      add(e, "options: " + message, message, cached(which, q.data(), 1, out.data(), options));
  }
  auto ring = KvCache<float>::ring(layout, 4, 1);  // capacity 4
  for (int t = 0; t < 10; ++t) ring.append(k.data(), v.data(), 1);
  add("attend (ring cache)", "more queries than the ring keeps keys for",
      "q_len (2) is too many queries for a ring cache of capacity 4 and window 4",
      [&] { kvheads::attend(q.data(), 2, ring, out.data()); });
  // A full ring that drops its newest token no longer holds the oldest key of its window
  // (overwritten by that token): the error says so rather than blaming the query count.
  auto dropped_ring = KvCache<float>::ring(layout, 4, 1);
  for (int t = 0; t < 10; ++t) dropped_ring.append(k.data(), v.data(), 1);
  dropped_ring.drop_last(1);
  add("attend (ring cache)", "a window with a key lost to drop_last",
      "the ring cache no longer holds key position 5 that q_len (1) queries need through window 4: its oldest key "
      "is position 6",
      [&] { kvheads::attend(q.data(), 1, dropped_ring, out.data()); });

  // --- batched attend -----------------------------------------------------------------------
  KvCache<float> other_layout(HeadLayout{4, 1, 8}, 4);
  other_layout.append(k.data(), v.data(), 2);
  add("attend (batch)", "items null, count 2", "items is null but its length is 2",
      [] { kvheads::attend(static_cast<const kvheads::AttendItem<float>*>(nullptr), std::size_t(2)); });
  add("attend (batch)", "an item without a cache", "items[1].cache is null", [&] {
    std::vector<kvheads::AttendItem<float>> items = {{q.data(), 1, &cache, out.data(), nullptr},
                                                     {q.data(), 1, nullptr, out.data(), nullptr}};
    kvheads::attend(items);
  });
  add("attend (batch)", "caches of different layouts",
      "items[1].cache has layout (4, 1, 8) but items[0] has (4, 2, 8)", [&] {
        std::vector<kvheads::AttendItem<float>> items = {{q.data(), 1, &cache, out.data(), nullptr},
                                                         {q.data(), 1, &other_layout, out.data(), nullptr}};
        kvheads::attend(items);
      });
  // Items may share a q (read only); one item's out or lse may not touch another's arrays.
  add("attend (batch)", "two items writing one out", "].out overlaps items[", [&] {
    std::vector<kvheads::AttendItem<float>> items = {{q.data(), 1, &cache, out.data(), nullptr},
                                                     {q.data(), 1, &cache, out.data(), nullptr}};
    kvheads::attend(items);
  });
  add("attend (batch)", "an out inside another item's q", "items[1].out overlaps items[0].q", [&] {
    std::vector<kvheads::AttendItem<float>> items = {{q.data(), 2, &cache, out.data(), nullptr},
                                                     {q.data() + 256, 1, &cache, q.data() + 40, nullptr}};
    kvheads::attend(items);
  });
  add("attend (batch)", "an lse inside another item's out", "items[1].lse overlaps items[0].out", [&] {
    std::vector<kvheads::AttendItem<float>> items = {{q.data(), 1, &cache, out.data(), nullptr},
                                                     {q.data(), 1, &cache, out.data() + 64, out.data() + 10}};
    kvheads::attend(items);
  });
  add("attend (batch)", "an item's q_len above its cache's size", "q_len (5) must not exceed the cache's size (3)", [&] {
    std::vector<kvheads::AttendItem<float>> items = {{q.data(), 5, &cache, out.data(), nullptr}};
    kvheads::attend(items);
  });

  // --- KvCache construction and operations ------------------------------------------------------
  add("KvCache(layout, capacity)", "capacity 0", "cache capacity (0) must be positive", [&] { KvCache<float>(layout, 0); });
  add("KvCache(layout, capacity)", "capacity -5", "cache capacity (-5) must be positive",
      [&] { KvCache<float>(layout, -5); });
  add("KvCache<fp16>(layout, capacity)", "capacity INT_MIN", "cache capacity (-2147483648)",
      [&] { KvCache<kvheads::fp16>(layout, INT_MIN); });
  add("KvCache(layout, capacity, options)", "window -1", "cache window (-1) must be >= 0",
      [&] { KvCache<float>(layout, 8, CacheOptions{-1, false}); });
  add("KvCache(layout, capacity, options)", "window above capacity", "cache window (9) must not exceed its capacity (8)",
      [&] { KvCache<float>(layout, 8, CacheOptions{9, false}); });
  add("KvCache(layout, capacity, options)", "a growable ring", "a ring cache (window 4) cannot be growable",
      [&] { KvCache<float>(layout, 8, CacheOptions{4, true}); });
  add("KvCache::ring", "window 0", "ring window (0) must be positive", [&] { KvCache<float>::ring(layout, 0, 1); });
  add("KvCache::ring", "window -3", "ring window (-3) must be positive", [&] { KvCache<float>::ring(layout, -3, 1); });
  add("KvCache::ring", "max_queries 0", "max_queries (0) must be positive", [&] { KvCache<float>::ring(layout, 4, 0); });
  // 2^16 x 2^31 x 2^9 floats per plane: 2^58 bytes, past the 2^48 a plane may hold.
  add("KvCache(layout, capacity)", "planes past 256 TiB", "cache capacity (2147483647) is too large",
      [] { KvCache<float>(HeadLayout{65536, 65536, 512}, INT_MAX); });
  add("KvCache<int8_t>(layout, capacity)", "planes past 256 TiB", "cache capacity (2147483647) is too large",
      [] { KvCache<std::int8_t>(HeadLayout{65536, 65536, 512}, INT_MAX); });
  add("KvCache::ring", "planes past 256 TiB", "cache capacity (1073741824) is too large",
      [] { KvCache<kvheads::bf16>::ring(HeadLayout{65536, 65536, 512}, 1 << 30, 1); });
  add("KvCache::ring", "window + max_queries - 1 above INT_MAX",
      "ring window (2147483647) + max_queries (2) - 1 must be at most 2147483647",
      [&] { KvCache<float>::ring(layout, INT_MAX, 2); });
  add("KvCache::ring", "max_queries INT_MAX with window 2", "ring window (2) + max_queries (2147483647) - 1",
      [&] { KvCache<float>::ring(layout, 2, INT_MAX); });
  add("Attention::make_cache", "capacity 0", "cache capacity (0) must be positive",
      [&] { kvheads::Attention<float>(16, layout).make_cache(0); });

  add("KvCache::append", "n_tokens -1", "n_tokens (-1) must be >= 0", [&] { cache.append(k.data(), v.data(), -1); });
  add("KvCache::append", "k null", "k is null but its length is 1", [&] { cache.append(nullptr, v.data(), 1); });
  add("KvCache::append", "v null", "v is null but its length is 1", [&] { cache.append(k.data(), nullptr, 1); });
  add("KvCache::append", "more tokens than fit", "cannot append 2 tokens to a cache holding 3 of 4",
      [&] { cache.append(k.data(), v.data(), 2); }, Throws::length_error);
  add("KvCache::append", "INT_MAX tokens", "cannot append 2147483647 tokens",
      [&] { cache.append(k.data(), v.data(), INT_MAX); }, Throws::length_error);
  add("KvCache::drop_last", "n_tokens -1", "cannot drop -1 tokens from a cache holding 3", [&] { cache.drop_last(-1); });
  add("KvCache::drop_last", "more than cached", "cannot drop 4 tokens from a cache holding 3",
      [&] { cache.drop_last(4); });
  add("KvCache::truncate", "new_size -1", "cannot truncate a cache holding 3 tokens to -1", [&] { cache.truncate(-1); });
  add("KvCache::truncate", "above the size", "cannot truncate a cache holding 3 tokens to 4", [&] { cache.truncate(4); });
  add("KvCache::reserve", "above INT_MAX", "cache capacity (2147483648) must be at most 2147483647",
      [&] { cache.reserve(std::int64_t(INT_MAX) + 1); });
  add("KvCache::read_token", "position not cached", "position (3) is not cached", [&] {
    float kk[8], vv[8];
    cache.read_token(3, 0, kk, vv);
  });
  add("KvCache::read_token", "position -1", "position (-1) is not cached", [&] {
    float kk[8], vv[8];
    cache.read_token(-1, 0, kk, vv);
  });
  add("KvCache::read_token", "kv_head 2 of 2", "kv_head (2) must be in [0, 2)", [&] {
    float kk[8], vv[8];
    cache.read_token(0, 2, kk, vv);
  });
  add("KvCache::read_token", "kv_head -1", "kv_head (-1) must be in [0, 2)", [&] {
    float kk[8], vv[8];
    cache.read_token(0, -1, kk, vv);
  });
  add("KvCache::reserve", "a ring", "a ring cache (window 4) cannot be resized", [&] { ring.reserve(100); });
  add("KvCache::reserve", "capacity -5", "cache capacity (-5) must be >= 0", [&] { cache.reserve(-5); });
  add("KvCache::read_token", "k null", "k is null but its length is 1", [&] {
    float vv[8];
    cache.read_token(0, 0, nullptr, vv);
  });
  add("KvCache::read_token", "v null", "v is null but its length is 1", [&] {
    float kk[8];
    cache.read_token(0, 0, kk, nullptr);
  });
  // The growable cache below (capacity 4, 3 tokens) shares the table's after-check.
  add("KvCache::append (growable)", "past INT_MAX tokens",
      "cannot append 2147483647 tokens to a cache holding 3 of 2147483647 (a cache holds at most INT_MAX tokens)",
      [&] { growable.append(k.data(), v.data(), INT_MAX); }, Throws::length_error);
  add("KvCache::reserve (growable)", "planes past 256 TiB", "cache capacity (2147483647) is too large",
      [&] { big_heads.reserve(INT_MAX); });

  // --- Attention ------------------------------------------------------------------------------
  kvheads::Attention<float> layer(16, layout);
  layer.wq() = RowMatrix::Constant(16, 32, 0.1f);
  layer.wk() = RowMatrix::Constant(16, 16, 0.2f);
  layer.wv() = RowMatrix::Constant(16, 16, 0.3f);
  layer.wo() = RowMatrix::Constant(32, 16, 0.4f);
  const RowMatrix wq = layer.wq(), wk = layer.wk(), wv = layer.wv(), wo = layer.wo();
  add("Attention(d_model, layout)", "d_model 0", "d_model (0) must be positive",
      [&] { kvheads::Attention<float>(0, layout); });
  add("Attention(d_model, layout)", "d_model -1", "d_model (-1) must be positive",
      [&] { kvheads::Attention<float>(-1, layout); });
  add("GQA<4, 2, 8>(d_model, layout)", "layout not the compile-time sizes",
      "layout (q_heads 4, kv_heads 1, head_dim 8) does not match the compile-time sizes (4, 2, 8",
      [] { kvheads::GQA<4, 2, 8>(16, HeadLayout{4, 1, 8}); });
  add("Attention(layout, wq, wk, wv, wo)", "wk of the wrong shape", "wk is 16x32 (expected 16x16)",
      [&] { kvheads::Attention<float>(layout, wq, wq, wv, wo); });
  add("Attention::set_weights", "wq 3x3", "wq is 3x3 (expected 16x32)",
      [&] { layer.set_weights(RowMatrix(3, 3), wk, wv, wo); });
  add("Attention::set_weights", "wk 16x17", "wk is 16x17 (expected 16x16)",
      [&] { layer.set_weights(wq, RowMatrix(16, 17), wv, wo); });
  add("Attention::set_weights", "wv 15x16", "wv is 15x16 (expected 16x16)",
      [&] { layer.set_weights(wq, wk, RowMatrix(15, 16), wo); });
  add("Attention::set_weights", "wo transposed", "wo is 16x32 (expected 32x16)",
      [&] { layer.set_weights(wq, wk, wv, RowMatrix(16, 32)); });

  auto rope = [](float base, int rotary_dim, bool enabled = true) {
    kvheads::RopeOptions r;
    r.enabled = enabled;
    r.base = base;
    r.rotary_dim = rotary_dim;
    return r;
  };
  add("Attention::set_rope", "base 0", "rope base (0) must be finite and > 0", [&] { layer.set_rope(rope(0.f, 0)); });
  add("Attention::set_rope", "base -1", "rope base (-1)", [&] { layer.set_rope(rope(-1.f, 0)); });
  add("Attention::set_rope", "base inf", "rope base (inf)", [&] { layer.set_rope(rope(kInf, 0)); });
  add("Attention::set_rope", "base nan", "rope base (nan)", [&] { layer.set_rope(rope(kNaN, 0)); });
  add("Attention::set_rope", "rotary_dim -2", "rope rotary_dim (-2) must be >= 0", [&] { layer.set_rope(rope(1e4f, -2)); });
  add("Attention::set_rope", "rotary_dim above head_dim", "rope rotary_dim (10) must be at most head_dim (8)",
      [&] { layer.set_rope(rope(1e4f, 10)); });
  add("Attention::set_rope", "layout 7", "rope layout (7) must be RopeLayout::half_split (0) or", [&] {
    kvheads::RopeOptions r = rope(1e4f, 0);
    r.layout = static_cast<kvheads::RopeLayout>(7);
    layer.set_rope(r);
  });
  add("Attention::set_rope", "odd rotary_dim", "rope rotary_dim (3) must be even", [&] { layer.set_rope(rope(1e4f, 3)); });
  add("Attention::set_rope", "odd head_dim with rotary_dim 0", "head_dim = 7", [] {
    kvheads::Attention<float>(16, HeadLayout{2, 1, 7}).set_rope([] {
      kvheads::RopeOptions r;
      r.enabled = true;
      return r;
    }());
  });

  KvCache<float> layer_cache = layer.make_cache(4);
  std::vector<float> x(8 * 16, 0.5f), y(8 * 16);
  layer.forward(x.data(), 3, layer_cache, y.data());
  const CacheState layer_cache_before(layer_cache);
  KvCache<float> mismatched(HeadLayout{4, 1, 8}, 4);
  // A ring of window 4 for one query per call, full and wrapped (positions 2..5): forward
  // must refuse before appending, not after (an append overwrites the oldest keys).
  auto layer_ring = KvCache<float>::ring(layout, 4, 1);
  for (int t = 0; t < 6; ++t) layer.forward(x.data() + t * 16, 1, layer_ring, y.data());
  const CacheState layer_ring_before(layer_ring);
  add("Attention::forward (pointer)", "more tokens than the ring serves as queries",
      "n_tokens (2) is too many queries for a ring cache of capacity 4 and window 4",
      [&] { layer.forward(x.data(), 2, layer_ring, y.data()); });
  add("Attention::forward (pointer)", "more tokens than the ring holds",
      "n_tokens (5) must not exceed the ring cache's capacity (4)",
      [&] { layer.forward(x.data(), 5, layer_ring, y.data()); });
  add("Attention::forward (Eigen)", "more tokens than the ring serves as queries", "n_tokens (3) is too many queries",
      [&] { layer.forward(RowMatrix::Zero(3, 16), layer_ring); });
  add("Attention::forward (pointer)", "n_tokens -1", "n_tokens (-1) must be >= 0",
      [&] { layer.forward(x.data(), -1, layer_cache, y.data()); });
  add("Attention::forward (pointer)", "x null", "x is null but its length is 1",
      [&] { layer.forward(nullptr, 1, layer_cache, y.data()); });
  add("Attention::forward (pointer)", "out null", "out is null but its length is 1",
      [&] { layer.forward(x.data(), 1, layer_cache, nullptr); });
  add("Attention::forward (pointer)", "a full cache", "cannot append 2 tokens to a cache holding 3 of 4",
      [&] { layer.forward(x.data(), 2, layer_cache, y.data()); }, Throws::length_error);
  for (const auto& [options, message] : bad_options())
    add("Attention::forward (pointer)", "options: " + message, message,
        [&, options = options] { layer.forward(x.data(), 1, layer_cache, y.data(), options); });
  add("Attention::forward (Eigen)", "x with 5 columns", "x has 5 columns (expected d_model = 16)",
      [&] { layer.forward(RowMatrix::Zero(2, 5), layer_cache); });
  add("Attention::forward (Eigen)", "a full cache", "cannot append 2 tokens to a cache holding 3 of 4",
      [&] { layer.forward(RowMatrix::Zero(2, 16), layer_cache); }, Throws::length_error);
  add("Attention::forward (Eigen)", "bad options", "scale (-1)",
      [&] { layer.forward(RowMatrix::Zero(1, 16), layer_cache, with([](auto& o) { o.scale = -1.f; })); });
  // A weight given another shape through its accessor (on a copy of the layer, so the
  // table's check of the layer's weights still holds): forward throws before any work.
  const auto reshaped = [&](RowMatrix& (*weight)(kvheads::Attention<float>&), Eigen::Index rows, Eigen::Index cols,
                            bool eigen) {
    kvheads::Attention<float> copy = layer;
    weight(copy) = RowMatrix::Zero(rows, cols);
    if (eigen)
      copy.forward(RowMatrix::Zero(1, 16), layer_cache);
    else
      copy.forward(x.data(), 1, layer_cache, y.data());
  };
  add("Attention::forward (pointer)", "wq resized through wq()", "wq is 16x31 (expected 16x32)", [&] {
    reshaped([](kvheads::Attention<float>& l) -> RowMatrix& { return l.wq(); }, 16, 31, false);
  });
  add("Attention::forward (pointer)", "wk resized through wk()", "wk is 17x16 (expected 16x16)", [&] {
    reshaped([](kvheads::Attention<float>& l) -> RowMatrix& { return l.wk(); }, 17, 16, false);
  });
  add("Attention::forward (pointer)", "wv emptied through wv()", "wv is 0x0 (expected 16x16)", [&] {
    reshaped([](kvheads::Attention<float>& l) -> RowMatrix& { return l.wv(); }, 0, 0, false);
  });
  add("Attention::forward (Eigen)", "wo resized through wo()", "wo is 32x64 (expected 32x16)", [&] {
    reshaped([](kvheads::Attention<float>& l) -> RowMatrix& { return l.wo(); }, 32, 64, true);
  });
  add("Attention(layout, wq, wk, wv, wo)", "wq with no rows", "wq has 0 rows (expected d_model, in [1, ",
      [&] { kvheads::Attention<float>(layout, RowMatrix(0, 32), wk, wv, wo); });
  add("Attention::forward (pointer)", "a cache of another layout",
      "cache layout (q_heads 4, kv_heads 1, head_dim 8) does not match the attention layout (q_heads 4, kv_heads 2, "
      "head_dim 8)",
      [&] { layer.forward(x.data(), 1, mismatched, y.data()); });

  // --- ThreadPool -------------------------------------------------------------------------------
  add("ThreadPool(threads)", "threads -1", "ThreadPool threads (-1) must be >= 0", [] { kvheads::ThreadPool pool(-1); });

  // --- merge --------------------------------------------------------------------------------------
  add("merge", "q_len -1", "q_len (-1) must be >= 0", [&] {
    kvheads::merge(out.data(), lse.data(), out.data(), lse.data(), out.data(), lse.data(), -1, layout);
  });
  add("merge", "lse_b null", "lse_b is null but its length is 2", [&] {
    kvheads::merge(out.data(), lse.data(), out.data(), nullptr, out.data(), lse.data(), 2, layout);
  });
  add("merge", "out null", "out is null but its length is 2", [&] {
    kvheads::merge(out.data(), lse.data(), out.data(), lse.data(), nullptr, lse.data(), 2, layout);
  });

  // --- convert.hpp --------------------------------------------------------------------------------
  const RowMatrix w = RowMatrix::Constant(16, 32, 1.f);  // [d_model 16][8 heads * 4]
  std::vector<float> pooled(16 * 32);
  add("pool_kv_columns (pointer)", "from_kv_heads 0", "from_kv_heads (0) must be positive",
      [&] { kvheads::pool_kv_columns(w.data(), 16, 0, 2, 4, pooled.data()); });
  add("pool_kv_columns (pointer)", "to_kv_heads 0", "to_kv_heads (0) must be positive",
      [&] { kvheads::pool_kv_columns(w.data(), 16, 8, 0, 4, pooled.data()); });
  add("pool_kv_columns (pointer)", "to_kv_heads 3 of 8", "to_kv_heads (3) must divide from_kv_heads (8)",
      [&] { kvheads::pool_kv_columns(w.data(), 16, 8, 3, 4, pooled.data()); });
  add("pool_kv_columns (pointer)", "head_dim -4", "head_dim (-4) must be positive",
      [&] { kvheads::pool_kv_columns(w.data(), 16, 8, 2, -4, pooled.data()); });
  add("pool_kv_columns (pointer)", "rows 0", "weight has 0 rows",
      [&] { kvheads::pool_kv_columns(w.data(), 0, 8, 2, 4, pooled.data()); });
  // Sizes whose element count overflows: refused before any index is formed. (Read through
  // volatile: with the constants in view g++ analyses the loops behind the check and warns
  // that they would overflow.)
  static volatile int int_max = INT_MAX, two_to_22 = 1 << 22, two_to_30 = 1 << 30;
  add("pool_kv_columns (pointer)", "2^60 columns x INT_MAX rows", "has more elements than memory can address",
      [&] { kvheads::pool_kv_columns(w.data(), int_max, two_to_30, 1, two_to_30, pooled.data()); });
  add("pool_kv_rows (pointer)", "2^52 rows x INT_MAX columns", "has more elements than memory can address",
      [&] { kvheads::pool_kv_rows(w.data(), int_max, two_to_22, 2, two_to_30, pooled.data()); });
  add("pool_kv_columns (pointer)", "w null", "w is null but its length is 512",
      [&] { kvheads::pool_kv_columns(nullptr, 16, 8, 2, 4, pooled.data()); });
  add("pool_kv_columns (pointer)", "out null", "out is null but its length is 128",
      [&] { kvheads::pool_kv_columns(w.data(), 16, 8, 2, 4, nullptr); });
  add("pool_kv_rows (pointer)", "cols -2", "weight has -2 columns",
      [&] { kvheads::pool_kv_rows(w.data(), -2, 8, 2, 4, pooled.data()); });
  add("pool_kv_rows (pointer)", "to_kv_heads above from_kv_heads", "to_kv_heads (16) must divide from_kv_heads (8)",
      [&] { kvheads::pool_kv_rows(w.data(), 16, 8, 16, 4, pooled.data()); });
  add("pool_kv_rows (pointer)", "w null", "w is null", [&] { kvheads::pool_kv_rows(nullptr, 16, 8, 2, 4, pooled.data()); });
  add("pool_kv_columns (Eigen)", "head_dim not matching the columns",
      "weight has 32 columns but from_kv_heads (8) * head_dim (5) = 40",
      [&] { kvheads::pool_kv_columns(w, 8, 2, 5); });
  add("pool_kv_rows (Eigen)", "rows not matching", "weight has 16 rows but from_kv_heads (8) * head_dim (4) = 32",
      [&] { kvheads::pool_kv_rows(w, 8, 2, 4); });
  add("to_kv_heads", "kv_heads 0", "kv_heads (0) must be positive", [&] { kvheads::to_kv_heads(layer, 0); });
  add("to_kv_heads", "kv_heads not dividing the source's", "kv_heads (4) must divide the source's kv_heads (2)",
      [&] { kvheads::to_kv_heads(layer, 4); });

#ifdef KVHEADS_BAD_INPUT_HAVE_JSON
  // --- safetensors.hpp -------------------------------------------------------------------------------
  auto file = [](std::uint64_t header_length, const std::string& header, std::size_t data_bytes) {
    // Sized once and filled in place: GCC 12's -Warray-bounds misreads insert() here.
    std::vector<unsigned char> bytes(8 + header.size() + data_bytes, 0);
    for (int i = 0; i < 8; ++i) bytes[std::size_t(i)] = static_cast<unsigned char>(header_length >> (8 * i));
    for (std::size_t i = 0; i < header.size(); ++i) bytes[8 + i] = static_cast<unsigned char>(header[i]);
    return bytes;
  };
  auto parse = [](std::vector<unsigned char> bytes) { return [bytes] { kvheads::Safetensors::parse(bytes); }; };
  auto entry = [](const std::string& body) { return "{\"t\": {" + body + "}}"; };
  const std::string f32x2 = R"("dtype": "F32", "shape": [2], "data_offsets": [0, 8])";
  add("Safetensors::parse", "7 bytes", "safetensors file is 7 bytes", parse(std::vector<unsigned char>(7)));
  add("Safetensors::parse", "header length beyond the file", "header length (100) exceeds the 2 bytes",
      parse(file(100, "{}", 0)));
  add("Safetensors::parse", "absurd header length", "header length (18446744073709551615)",
      parse(file(~std::uint64_t(0), "{}", 0)));
  add("Safetensors::parse", "not JSON", "not valid JSON", parse(file(6, "{\"t\": ", 0)));
  add("Safetensors::parse", "JSON array", "must be a JSON object, got array", parse(file(6, "[1, 2]", 0)));
  add("Safetensors::parse", "unknown dtype", "unknown dtype 'F128'",
      parse(file(entry(R"("dtype": "F128", "shape": [1], "data_offsets": [0, 16])").size(),
                 entry(R"("dtype": "F128", "shape": [1], "data_offsets": [0, 16])"), 16)));
  add("Safetensors::parse", "negative shape", "shape[0] (-3) must be >= 0",
      parse(file(entry(R"("dtype": "F32", "shape": [-3], "data_offsets": [0, 8])").size(),
                 entry(R"("dtype": "F32", "shape": [-3], "data_offsets": [0, 8])"), 8)));
  add("Safetensors::parse", "offsets beyond the data", "data_offsets end (16) is beyond the 8-byte data buffer",
      parse(file(entry(R"("dtype": "F32", "shape": [2], "data_offsets": [0, 16])").size(),
                 entry(R"("dtype": "F32", "shape": [2], "data_offsets": [0, 16])"), 8)));
  add("Safetensors::parse", "shape not matching the bytes", "hold 8 bytes but shape [2, 3] of BF16 needs 12",
      parse(file(entry(R"("dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 8])").size(),
                 entry(R"("dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 8])"), 8)));
  add("Safetensors::parse", "trailing bytes", "bytes [8, 12) belong to no tensor",
      parse(file(entry(f32x2).size(), entry(f32x2), 12)));
  add("Safetensors::parse", "null data with a size", "data is null but its size is 16",
      [] { kvheads::Safetensors::parse(nullptr, 16); });
  add("Safetensors::tensor", "a missing name", "'missing'", [] { kvheads::Safetensors().tensor("missing"); });
#endif

  // --- run the table: after every row, the cache, the layer's cache and its weights are
  // exactly as they were (rows that touch none of them check that nothing leaked either).
  for (std::size_t i = 0; i < rows.size(); ++i) {
    check_row(rows[i]);
    INFO("after entry point: " << rows[i].entry << " / " << rows[i].argument);
    CHECK(CacheState(cache) == cache_before);  // every row, not only the cache rows
    CHECK(CacheState(growable) == growable_before);
    CHECK(CacheState(big_heads) == big_heads_before);
    CHECK(CacheState(layer_cache) == layer_cache_before);
    CHECK(CacheState(layer_ring) == layer_ring_before);
    CHECK((layer.wq() == wq && layer.wk() == wk && layer.wv() == wv && layer.wo() == wo));
    CHECK(!layer.rope().enabled);
  }
  INFO(rows.size() << " rows");
  CHECK(rows.size() > 200);
}

TEST_CASE("bf16 and fp16 caches refuse a finite value that would round to inf, and stay unchanged", "[errors][cache]") {
  // Stored as inf, such a key makes 0 * inf = NaN in every query that sees the token; a
  // float cache holds it and gives a finite answer. Non-finite inputs are stored as given.
  const HeadLayout layout{4, 2, 8};
  const auto check = [&](auto storage, float limit, const char* message) {
    using T = decltype(storage);
    KvCache<T> cache(layout, 8);
    std::vector<float> k(3 * 16, 0.5f), v(3 * 16, -0.25f);
    cache.append(k.data(), v.data(), 2);
    const auto read = [&] {
      std::vector<float> all;
      for (long long p = 0; p < cache.position(); ++p)
        for (int h = 0; h < layout.kv_heads; ++h) {
          float kk[8], vv[8];
          cache.read_token(p, h, kk, vv);
          all.insert(all.end(), kk, kk + 8);
          all.insert(all.end(), vv, vv + 8);
        }
      return all;
    };
    const std::vector<float> before = read();
    for (float bad : {limit, -limit, std::numeric_limits<float>::max()}) {
      std::vector<float> bad_v = v;
      bad_v[2 * 16 + 8 + 5] = bad;  // token 2, kv head 1, dim 5
      INFO(bad);
      REQUIRE_THROWS_AS(cache.append(k.data(), bad_v.data(), 3), std::invalid_argument);
      REQUIRE_THROWS_WITH(cache.append(k.data(), bad_v.data(), 3),
                          Catch::Matchers::Contains("v[token 2][kv head 1][dim 5]") &&
                              Catch::Matchers::Contains(message));
      CHECK(cache.size() == 2);
      CHECK(cache.position() == 2);
      CHECK(read() == before);
    }
    // Just below the limit rounds to the largest finite value; inf and NaN pass as given.
    std::vector<float> edge_k = k;
    edge_k[0] = std::nextafter(limit, 0.f);
    edge_k[1] = std::numeric_limits<float>::infinity();
    edge_k[2] = std::numeric_limits<float>::quiet_NaN();
    cache.append(edge_k.data(), v.data(), 1);
    float kk[8], vv[8];
    cache.read_token(2, 0, kk, vv);
    CHECK(std::isfinite(kk[0]));
    CHECK(kk[0] > 0.99f * limit);
    CHECK(std::isinf(kk[1]));
    CHECK(std::isnan(kk[2]));
    // A ring stores only the newest `capacity` tokens of an append: the others are not checked.
    auto ring = KvCache<T>::ring(layout, 2, 1);
    std::vector<float> long_k(4 * 16, 0.5f);
    long_k[0] = limit;  // token 0 of 4: overwritten within the same append
    ring.append(long_k.data(), long_k.data(), 4);
    CHECK(ring.size() == 2);
  };
  check(kvheads::fp16{}, 65520.f, "beyond fp16's largest finite value (65504): it would be stored as inf (use a "
                                  "float or bf16 cache");
  check(kvheads::bf16{}, kvheads::detail::bits_float(0x7F7F8000u),
        "beyond bf16's largest finite value (3.3895314e+38): it would be stored as inf (use a float cache,");
  // The limits are where the conversions start giving inf.
  CHECK(std::isinf(kvheads::fp16::from_float(65520.f).to_float()));
  CHECK(std::isfinite(kvheads::fp16::from_float(std::nextafter(65520.f, 0.f)).to_float()));
  const float bf16_limit = kvheads::detail::bits_float(0x7F7F8000u);
  CHECK(std::isinf(kvheads::bf16::from_float(bf16_limit).to_float()));
  CHECK(std::isfinite(kvheads::bf16::from_float(std::nextafter(bf16_limit, 0.f)).to_float()));
  // A float cache keeps any float.
  KvCache<float> plain(layout, 2);
  std::vector<float> big(16, std::numeric_limits<float>::max());
  plain.append(big.data(), big.data(), 1);
  CHECK(plain.size() == 1);
}

TEST_CASE("a batch is refused exactly when a pairwise check finds a written array overlapping another", "[errors]") {
  // The batch check sweeps the arrays sorted by address (no pairwise comparisons); here
  // random batches over one buffer, where items often share or straddle each other's
  // arrays, are checked against every pair, the item's own rules included.
  const HeadLayout layout{4, 2, 8};  // q_width 32, 4 heads
  std::vector<float> kv(3 * 16, 0.5f);
  KvCache<float> cache(layout, 4);
  cache.append(kv.data(), kv.data(), 3);
  std::vector<float> buffer(900, 0.25f);
  std::mt19937 rng(7);
  struct Span {
    std::ptrdiff_t begin, end;
  };
  const auto overlap = [](Span a, Span b) { return a.begin < b.end && b.begin < a.end; };
  int refused = 0, run = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    const int count = 2 + int(rng() % 4);
    std::vector<kvheads::AttendItem<float>> items(static_cast<std::size_t>(count));
    std::vector<Span> q(items.size()), out(items.size()), lse(items.size());
    std::vector<bool> has_lse(items.size());
    for (std::size_t i = 0; i < items.size(); ++i) {
      const int q_len = 1 + int(rng() % 2);
      const auto place = [&](std::ptrdiff_t floats) {
        const std::ptrdiff_t at = std::ptrdiff_t(rng() % std::uint32_t(buffer.size() - std::size_t(floats) + 1));
        return Span{at, at + floats};
      };
      q[i] = place(32 * q_len);
      out[i] = rng() % 4 == 0 ? q[i] : place(32 * q_len);  // sometimes in place
      has_lse[i] = rng() % 2 == 0;
      lse[i] = has_lse[i] ? place(4 * q_len) : Span{0, 0};
      items[i] = {buffer.data() + q[i].begin, q_len, &cache, buffer.data() + out[i].begin,
                  has_lse[i] ? buffer.data() + lse[i].begin : nullptr};
    }
    bool expected = false;
    for (std::size_t i = 0; i < items.size(); ++i) {
      // The item's own rules: out is q or apart from it; lse apart from both.
      const bool same = q[i].begin == out[i].begin;
      expected |= !same && overlap(out[i], q[i]);
      expected |= has_lse[i] && (overlap(lse[i], q[i]) || overlap(lse[i], out[i]));
      for (std::size_t j = 0; j < items.size(); ++j) {
        if (j == i) continue;
        // What item i writes against everything of item j.
        for (Span other : {q[j], out[j]}) expected |= overlap(out[i], other);
        if (has_lse[j]) expected |= overlap(out[i], lse[j]);
        if (has_lse[i]) {
          for (Span other : {q[j], out[j]}) expected |= overlap(lse[i], other);
          if (has_lse[j]) expected |= overlap(lse[i], lse[j]);
        }
      }
    }
    bool threw = false;
    try {
      kvheads::AttentionOptions options;
      options.threads = 1;
      kvheads::attend(items, options);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    INFO("trial " << trial << ", " << count << " items");
    REQUIRE(threw == expected);
    (threw ? refused : run) += 1;
  }
  INFO(refused << " refused, " << run << " run");
  CHECK(refused > 300);  // both outcomes are common
  CHECK(run > 300);
}
