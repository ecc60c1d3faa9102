// KvCache<float>: the cache path equals the plain path, appends that do not fit leave the
// cache exactly as it was, and sizes/bytes/clear behave as documented.
#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

#include "test_support.hpp"

using kvheads::AttentionOptions;
using kvheads::HeadLayout;
using kvheads::KvCache;
using namespace kvheads_test;

TEST_CASE("attention over a cache equals attention over the same plain K/V", "[cache]") {
  for (const HeadLayout& layout : {HeadLayout{4, 4, 17}, HeadLayout{8, 2, 64}, HeadLayout{8, 1, 3}}) {
    const Problem p(layout, 17, 1000, 21);
    KvCache<float> cache(layout, 1200);
    // Append in uneven chunks to exercise offsets.
    int done = 0;
    for (int chunk : {1, 2, 17, 480, 500}) {
      cache.append(p.k.data() + std::ptrdiff_t(done) * layout.kv_width(), p.v.data() + std::ptrdiff_t(done) * layout.kv_width(), chunk);
      done += chunk;
    }
    REQUIRE(cache.size() == 1000);
    for (const AttentionOptions& options : option_sets()) {
      INFO(describe(layout, p.q_len, p.kv_len, options));
      std::vector<float> plain(p.out_size()), cached(p.out_size());
      kvheads::attend(p.q.data(), p.k.data(), p.v.data(), plain.data(), p.q_len, p.kv_len, layout, options);
      kvheads::attend(p.q.data(), p.q_len, cache, cached.data(), options);
      CHECK(relative_error(cached, plain) <= 1e-6);
      CHECK(relative_error(cached, p.reference(options)) <= tolerance);
    }
  }
}

TEST_CASE("a cache reports size, capacity and bytes, and clear() empties it", "[cache]") {
  const HeadLayout layout{8, 2, 64};
  KvCache<float> cache(layout, 100);
  CHECK(cache.size() == 0);
  CHECK(cache.capacity() == 100);
  CHECK(cache.bytes() == 2u * 2u * 100u * 64u * sizeof(float));
  CHECK(cache.bytes_per_token() == 2u * 2u * 64u * sizeof(float));
  CHECK(cache.layout() == layout);
  const std::vector<float> k = random_vector(10 * 128, 1), v = random_vector(10 * 128, 2);
  cache.append(k.data(), v.data(), 10);
  CHECK(cache.size() == 10);
  // Token 3 of KV head 1 sits at [head 1][token 3] in the head-major plane.
  CHECK(std::memcmp(cache.keys() + cache.head_stride() + 3 * cache.token_stride(), k.data() + (3 * 2 + 1) * 64,
                    64 * sizeof(float)) == 0);
  cache.clear();
  CHECK(cache.size() == 0);
  CHECK(cache.capacity() == 100);
  cache.append(k.data(), v.data(), 0);  // zero tokens: a no-op, null pointers allowed
  cache.append(nullptr, nullptr, 0);
  CHECK(cache.size() == 0);
}

TEST_CASE("cache planes are 64-byte aligned, also after growth and for every storage type", "[cache]") {
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 64 == 0; };
  const HeadLayout layout{8, 2, 80};
  kvheads::CacheOptions growable;
  growable.growable = true;
  KvCache<float> cache(layout, 3, growable);
  CHECK(aligned(cache.keys()));
  CHECK(aligned(cache.values()));
  const std::vector<float> k = random_vector(40 * 160, 3), v = random_vector(40 * 160, 4);
  cache.append(k.data(), v.data(), 40);  // grows past the first allocation
  CHECK(cache.capacity() >= 40);
  CHECK(aligned(cache.keys()));
  CHECK(aligned(cache.values()));
  const KvCache<float> copy = cache;
  CHECK(aligned(copy.keys()));
  CHECK(aligned(copy.values()));
  KvCache<kvheads::bf16> half(layout, 5);
  KvCache<std::int8_t> quarter(layout, 7);
  CHECK(aligned(half.keys()));
  CHECK(aligned(half.values()));
  CHECK(aligned(quarter.keys()));
  CHECK(aligned(quarter.values()));
}

namespace {
#if defined(__linux__) && defined(__x86_64__)
/// The VmFlags of the mapping holding p in /proc/self/smaps ("" when not found).
std::string vm_flags_of(const void* p) {
  std::ifstream smaps("/proc/self/smaps");
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  bool inside = false;
  for (std::string line; std::getline(smaps, line);) {
    std::uintptr_t start = 0, end = 0;
    char dash = 0;
    std::istringstream header(line);
    if (line.find(':') > line.find(' ') && header >> std::hex >> start >> dash >> end && dash == '-') {
      inside = start <= address && address < end;
    } else if (inside && line.rfind("VmFlags:", 0) == 0) {
      return line + " ";
    }
  }
  return "";
}
#endif
}  // namespace

TEST_CASE("cache planes of 2 MiB or more start on a huge-page boundary and are advised to use huge pages", "[cache]") {
  const auto huge_aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % (2u << 20) == 0; };
  const HeadLayout layout{8, 2, 128};
  // 2 KV heads x 2048 tokens x 128 floats = 2 MiB per plane.
  KvCache<float> cache(layout, 2048);
  CHECK(huge_aligned(cache.keys()));
  CHECK(huge_aligned(cache.values()));
  // A growable cache crosses the threshold as it grows, keeping its contents.
  kvheads::CacheOptions growable;
  growable.growable = true;
  KvCache<float> grown(layout, 16, growable);
  const int tokens = 3000;
  const std::vector<float> k = random_vector(std::size_t(tokens) * 256, 5), v = random_vector(std::size_t(tokens) * 256, 6);
  for (int first = 0; first < tokens; first += 100)
    grown.append(k.data() + std::size_t(first) * 256, v.data() + std::size_t(first) * 256, std::min(100, tokens - first));
  CHECK(huge_aligned(grown.keys()));
  CHECK(huge_aligned(grown.values()));
  for (int token = 0; token < tokens; token += 997)
    for (int head = 0; head < 2; ++head)
      CHECK(std::memcmp(grown.keys() + head * grown.head_stride() + token * grown.token_stride(),
                        k.data() + (std::size_t(token) * 2 + std::size_t(head)) * 128, 128 * sizeof(float)) == 0);
#if defined(__linux__) && defined(__x86_64__)
  // The advice shows as "hg" in the mapping's VmFlags, where the kernel has transparent
  // huge pages at all (whether it then uses them is its policy, not ours).
  if (std::ifstream("/sys/kernel/mm/transparent_hugepage/enabled")) {
    CHECK_THAT(vm_flags_of(cache.keys()), Catch::Matchers::Contains(" hg "));
    CHECK_THAT(vm_flags_of(grown.values()), Catch::Matchers::Contains(" hg "));
  }
#endif
}

TEST_CASE("an append that does not fit throws length_error and leaves the cache unchanged", "[cache][errors]") {
  const HeadLayout layout{4, 2, 8};
  KvCache<float> cache(layout, 5);
  const std::vector<float> k = random_vector(6 * 16, 1), v = random_vector(6 * 16, 2);
  cache.append(k.data(), v.data(), 3);
  const std::vector<float> keys_before(cache.keys(), cache.keys() + 2 * 5 * 8);
  const std::vector<float> values_before(cache.values(), cache.values() + 2 * 5 * 8);
  try {
    cache.append(k.data(), v.data(), 3);
    FAIL("append past capacity did not throw");
  } catch (const std::length_error& e) {
    const std::string message = e.what();
    CHECK(message.find("3 tokens") != std::string::npos);
    CHECK(message.find("5") != std::string::npos);
  }
  CHECK(cache.size() == 3);
  CHECK(std::equal(keys_before.begin(), keys_before.end(), cache.keys()));
  CHECK(std::equal(values_before.begin(), values_before.end(), cache.values()));
  CHECK_THROWS_AS(cache.append(nullptr, v.data(), 1), std::invalid_argument);
  CHECK_THROWS_AS(cache.append(k.data(), v.data(), -1), std::invalid_argument);
  CHECK(cache.size() == 3);
  cache.append(k.data(), v.data(), 2);  // exactly full is fine
  CHECK(cache.size() == 5);
}
