// kvheads_oom_tests: allocation failures injected into Attention::forward and attend().
// A separate Catch2 binary, since it replaces the global operator new: each armed thread
// fails its N-th allocation with std::bad_alloc, for N = 0, 1, ... until the call makes
// fewer allocations than that.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>
#include <vector>

#include <kvheads/kvheads.hpp>

namespace {
thread_local long allocations_left = -1;  // >= 0: armed; this many succeed, then one fails
thread_local bool failed_one = false;

void maybe_fail() {
  if (allocations_left < 0) return;
  if (allocations_left-- == 0) {
    allocations_left = -1;
    failed_one = true;
    throw std::bad_alloc();
  }
}

// Out of line, so that g++ does not pair an inlined free() with operator new
// (-Wmismatched-new-delete).
[[gnu::noinline]] void release(void* p) noexcept { std::free(p); }
}  // namespace

void* operator new(std::size_t n) {
  maybe_fail();
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return ::operator new(n); }
thread_local std::size_t largest_aligned_bytes = 0;  // the per-thread scratch is allocated aligned

void* operator new(std::size_t n, std::align_val_t a) {
  maybe_fail();
  largest_aligned_bytes = std::max(largest_aligned_bytes, n);
  void* p = nullptr;
  if (posix_memalign(&p, std::max<std::size_t>(std::size_t(a), sizeof(void*)), n ? n : 1) == 0) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n, std::align_val_t a) { return ::operator new(n, a); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return ::operator new(n);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return ::operator new(n);
  } catch (...) {
    return nullptr;
  }
}
void operator delete(void* p) noexcept { release(p); }
void operator delete[](void* p) noexcept { release(p); }
void operator delete(void* p, std::size_t) noexcept { release(p); }
void operator delete[](void* p, std::size_t) noexcept { release(p); }
void operator delete(void* p, std::align_val_t) noexcept { release(p); }
void operator delete[](void* p, std::align_val_t) noexcept { release(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { release(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { release(p); }

namespace {

using kvheads::HeadLayout;
using kvheads::KvCache;

struct CacheState {
  int size;
  long long position;
  std::vector<float> tokens;  // every cached token's K and V, dequantised
};

template <class T>
CacheState state_of(const KvCache<T>& cache) {
  CacheState s{cache.size(), (long long)cache.position(), {}};
  const int dim = cache.layout().head_dim;
  std::vector<float> k(static_cast<std::size_t>(dim)), v(static_cast<std::size_t>(dim));
  for (long long p = cache.first_position(); p < cache.position(); ++p)
    for (int h = 0; h < cache.layout().kv_heads; ++h) {
      cache.read_token(p, h, k.data(), v.data());
      s.tokens.insert(s.tokens.end(), k.begin(), k.end());
      s.tokens.insert(s.tokens.end(), v.begin(), v.end());
    }
  return s;
}

bool same(const CacheState& a, const CacheState& b) {
  return a.size == b.size && a.position == b.position && a.tokens.size() == b.tokens.size() &&
         std::memcmp(a.tokens.data(), b.tokens.data(), a.tokens.size() * sizeof(float)) == 0;
}

/// Fails the n-th allocation of body() on a fresh thread (empty per-thread scratch).
/// Returns whether an allocation failed; `threw` whether body() let std::bad_alloc out.
template <class Body>
bool fail_nth_allocation(long n, Body body, bool& threw) {
  bool failed = false;
  threw = false;
  std::thread([&] {
    allocations_left = n;
    try {
      body();
    } catch (const std::bad_alloc&) {
      threw = true;
    }
    allocations_left = -1;
    failed = failed_one;
  }).join();
  return failed;
}

template <class T>
void check_forward_leaves_cache_on_bad_alloc(bool ring, int tokens) {
  const HeadLayout layout{4, 2, 16};
  const int d_model = 24;
  kvheads::Attention<T> layer(d_model, layout);
  layer.wq() = kvheads::RowMatrix::Random(d_model, layout.q_width());
  layer.wk() = kvheads::RowMatrix::Random(d_model, layout.kv_width());
  layer.wv() = kvheads::RowMatrix::Random(d_model, layout.kv_width());
  layer.wo() = kvheads::RowMatrix::Random(layout.q_width(), d_model);
  std::vector<float> x(std::size_t(tokens + 3) * d_model), out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(int(i % 19) - 9) * 0.1f;
  kvheads::AttentionOptions options;
  options.threads = 1;  // every allocation on the armed thread
  int failures = 0;
  for (long n = 0;; ++n) {
    KvCache<T> cache = ring ? KvCache<T>::ring(layout, 3, 3) : layer.make_cache(tokens + 8);
    // A full ring (5 slots), so the next append overwrites its oldest tokens.
    std::vector<float> kv(std::size_t(5) * layout.kv_width());
    for (std::size_t i = 0; i < kv.size(); ++i) kv[i] = float(i % 11) - 5.f;
    cache.append(kv.data(), kv.data(), ring ? 5 : 3);
    const CacheState before = state_of(cache);
    bool threw = false;
    if (!fail_nth_allocation(n, [&] { layer.forward(x.data() + 3 * d_model, tokens, cache, out.data(), options); },
                             threw))
      break;
    INFO((ring ? "ring" : "linear") << " cache, " << tokens << " tokens, allocation " << n << " fails");
    CHECK(threw);
    CHECK(same(state_of(cache), before));
    ++failures;
  }
  CHECK(failures > 3);  // the injection reached past the append
}

}  // namespace

TEST_CASE("Attention::forward that runs out of memory leaves the cache as it was", "[oom][attention]") {
  for (int tokens : {1, 3}) {
    check_forward_leaves_cache_on_bad_alloc<float>(false, tokens);
    check_forward_leaves_cache_on_bad_alloc<float>(true, tokens);
    check_forward_leaves_cache_on_bad_alloc<std::int8_t>(true, tokens);
  }
}

TEST_CASE("attend() that runs out of memory throws std::bad_alloc and the next call succeeds", "[oom]") {
  const HeadLayout layout{8, 1, 32};
  const int kv_len = 2048;
  std::vector<float> q(std::size_t(layout.q_width()), 0.1f), k(std::size_t(kv_len) * layout.kv_width()),
      v(k.size()), out(q.size()), expected(q.size());
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = float(i % 7) * 0.2f;
    v[i] = float(i % 5);
  }
  KvCache<float> cache(layout, kv_len);
  cache.append(k.data(), v.data(), kv_len);
  kvheads::AttentionOptions options;
  options.threads = 1;
  kvheads::attend(q.data(), 1, cache, expected.data(), options);
  for (long n = 0;; ++n) {
    bool threw = false;
    if (!fail_nth_allocation(n, [&] { kvheads::attend(q.data(), 1, cache, out.data(), options); }, threw)) break;
    CHECK(threw);
    kvheads::attend(q.data(), 1, cache, out.data(), options);
    CHECK(std::memcmp(out.data(), expected.data(), out.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("a KvCache copy assignment that runs out of memory leaves the target as it was", "[oom][cache]") {
  // The target is small and holds tokens; the source is larger (and a ring, so its window
  // differs too). A member-wise copy that failed on the planes left the target claiming
  // the source's capacity over its own smaller planes, and the next append wrote past them.
  const HeadLayout layout{4, 2, 8};
  KvCache<float> source = KvCache<float>::ring(layout, 64, 2);
  std::vector<float> kv(std::size_t(70) * layout.kv_width());
  for (std::size_t i = 0; i < kv.size(); ++i) kv[i] = float(i % 13) - 6.f;
  source.append(kv.data(), kv.data(), 70);
  int failures = 0;
  for (long n = 0;; ++n) {
    KvCache<float> target(layout, 4);
    target.append(kv.data(), kv.data(), 2);
    const CacheState before = state_of(target);
    bool threw = false;
    if (!fail_nth_allocation(n, [&] { target = source; }, threw)) {
      CHECK(same(state_of(target), state_of(source)));
      break;
    }
    INFO("allocation " << n << " fails");
    CHECK(threw);
    CHECK(same(state_of(target), before));
    CHECK(target.capacity() == 4);
    CHECK(target.window() == 0);
    target.append(kv.data(), kv.data(), 2);  // in bounds: ASan would catch a write past the planes
    CHECK(target.size() == 4);
    ++failures;
  }
  CHECK(failures >= 2);  // both planes' allocations were made to fail
}

TEST_CASE("per-thread scratch grows to the size asked for, not twice the old one", "[oom][memory]") {
  // README "Memory": a plain-memory prefill keeps 2 x kv_len x kv_heads x head_dim floats of
  // staging; growing that from 4000 to 5000 keys must not allocate (and keep) 8000 keys' worth.
  std::thread([] {
    for (int slot = 0; slot < 3; ++slot) {
      kvheads::detail::thread_scratch(4000, slot);
      largest_aligned_bytes = 0;
      kvheads::detail::thread_scratch(5000, slot);
      CHECK(largest_aligned_bytes == 5000 * sizeof(float));
      largest_aligned_bytes = 0;
      kvheads::detail::thread_scratch(4500, slot);  // smaller: reused
      CHECK(largest_aligned_bytes == 0);
    }
  }).join();
}
