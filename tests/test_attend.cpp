// attend() on plain memory against the double-precision reference: MHA, GQA and MQA,
// head_dim and lengths that hit every tail, every option alone and combined, every ISA
// the machine runs, 1 and 2 threads.
#include <catch2/catch.hpp>

#include <initializer_list>
#include <vector>

#include "cpu_isas.hpp"
#include "test_support.hpp"

using kvheads::AttentionOptions;
using kvheads::HeadLayout;
using namespace kvheads_test;

namespace {

const std::vector<HeadLayout> layouts_for(int head_dim) {
  return {
      {4, 4, head_dim},   // MHA
      {8, 4, head_dim},   // GQA, group 2
      {8, 2, head_dim},   // GQA, group 4
      {16, 2, head_dim},  // GQA, group 8
      {12, 4, head_dim},  // GQA, group 3 (run-time group size)
      {32, 2, head_dim},  // GQA, group 16
      {8, 1, head_dim},   // MQA, group 8
      {5, 1, head_dim},   // MQA, group 5 (run-time group size)
  };
}

/// attend<Isa> against the reference, on each of thread_counts (options.threads alone
/// when empty). The reference, most of these tests' run time, is computed once.
template <class Isa>
void check_against_reference(const Problem& p, AttentionOptions options, std::initializer_list<int> thread_counts = {}) {
  std::vector<float> expected_lse;
  const std::vector<float> expected = p.reference(options, &expected_lse);
  const std::vector<int> threads_list =
      thread_counts.size() > 0 ? std::vector<int>(thread_counts) : std::vector<int>{options.threads};
  for (int threads : threads_list) {
    options.threads = threads;
    INFO(describe(p.layout, p.q_len, p.kv_len, options) << " isa " << Isa::name);
    std::vector<float> out(p.out_size(), -123.f), lse(expected_lse.size(), -123.f);
    kvheads::attend<Isa>(p.q.data(), p.k.data(), p.v.data(), out.data(), p.q_len, p.kv_len, p.layout, options,
                         lse.data());
    CHECK(relative_error(out, expected) <= tolerance);
    CHECK(relative_error(lse, expected_lse, 1.0) <= tolerance);
  }
}

}  // namespace

TEST_CASE("attend matches the reference for MHA, GQA and MQA over head_dim and lengths", "[attend]") {
  const std::vector<std::pair<int, int>> lengths = {{1, 1},  {1, 2},    {2, 2},     {1, 17},   {2, 17},
                                                    {17, 17}, {17, 1000}, {1, 4097}, {2, 4097}};
  AttentionOptions combined = option_sets().back();
  for (int head_dim : {1, 3, 64, 80, 96, 128, 256})
    for (const HeadLayout& layout : layouts_for(head_dim))
      for (auto [q_len, kv_len] : lengths) {
        if (head_dim >= 128 && kv_len > 1000 && layout.q_heads > 8) continue;  // keep the reference affordable
        const Problem p(layout, q_len, kv_len, std::uint32_t(head_dim * 131 + q_len * 7 + kv_len));
        check_against_reference<kvheads::simd::default_isa>(p, AttentionOptions{});
        check_against_reference<kvheads::simd::default_isa>(p, combined);
      }
}

TEST_CASE("attend matches the reference for every option alone and combined", "[attend][options]") {
  const std::vector<std::pair<int, int>> lengths = {{1, 1}, {1, 17}, {17, 17}, {17, 1000}, {2, 4097}};
  for (int head_dim : {3, 64})
    for (const HeadLayout& layout : {HeadLayout{4, 4, head_dim}, HeadLayout{8, 2, head_dim}, HeadLayout{8, 1, head_dim}})
      for (auto [q_len, kv_len] : lengths)
        for (const AttentionOptions& options : option_sets()) {
          const Problem p(layout, q_len, kv_len, std::uint32_t(q_len * 31 + kv_len));
          check_against_reference<kvheads::simd::default_isa>(p, options);
        }
}

TEST_CASE("the stable attend() signature gives the reference's result", "[attend]") {
  const Problem p({8, 2, 64}, 5, 300);
  AttentionOptions options;
  options.causal = true;
  std::vector<float> out(p.out_size());
  kvheads::attend(p.q.data(), p.k.data(), p.v.data(), out.data(), p.q_len, p.kv_len, p.layout, options);
  CHECK(relative_error(out, p.reference(options)) <= tolerance);
}

TEMPLATE_LIST_TEST_CASE("every ISA runs every head_dim x group size instantiation the dispatch selects",
                        "[attend][isa]", kvheads::simd::enabled_isas) {
  using Isa = TestType;
  if (!cpu_runs<Isa>()) return;
  // dispatch_fused picks a kernel compiled for head_dim 64/80/96/128/256 (else the
  // run-time size) and, within it, for group size 1/2/4/8/16 (else the run-time group):
  // every pair, on every ISA, against the reference. Short lengths keep it cheap; decode
  // (one and two queries) and a causal prefill reach both row layouts of each kernel.
  const std::vector<std::pair<int, int>> lengths = {{1, 67}, {2, 67}, {9, 67}};
  for (int head_dim : {64, 80, 96, 128, 256, 40})
    for (int group : {1, 2, 4, 8, 16, 3})
      for (auto [q_len, kv_len] : lengths) {
        const HeadLayout layout{2 * group, 2, head_dim};
        const Problem p(layout, q_len, kv_len, std::uint32_t(head_dim * 17 + group * 5 + q_len));
        AttentionOptions causal;
        causal.causal = true;
        causal.threads = 1;
        check_against_reference<Isa>(p, causal);
      }
}

TEMPLATE_LIST_TEST_CASE("every ISA's decode matches the reference at head_dims that leave every P.V tile tail",
                        "[attend][isa]", kvheads::simd::enabled_isas) {
  using Isa = TestType;
  if (!cpu_runs<Isa>()) return;
  // Tile shapes no other test reached (found by instrumenting the kernel): on AVX2 the
  // few-row P.V tiles of one row over 4, 6 or 7 chunks and of three rows over 3 chunks
  // (masked: the combined options' window), reached by head_dims 25-32, 49-56, 81-88 and
  // 113-120, and pv_by_rows' 10-wide tile of 5-8 rows (head_dim = 10 mod 12). The other
  // ISAs run the same shapes as further tails.
  for (int head_dim : {25, 28, 32, 46, 52, 56, 58, 84, 88, 116, 120})
    for (const HeadLayout& layout : {HeadLayout{2, 2, head_dim}, HeadLayout{4, 2, head_dim}, HeadLayout{6, 2, head_dim},
                                     HeadLayout{10, 2, head_dim}, HeadLayout{7, 1, head_dim}, HeadLayout{16, 2, head_dim}})
      for (int q_len : {1, 2}) {
        const Problem p(layout, q_len, 301, std::uint32_t(head_dim * 3 + layout.q_heads + q_len));
        for (AttentionOptions options : {AttentionOptions{}, option_sets().back()}) {
          options.threads = 1;
          check_against_reference<Isa>(p, options);
        }
      }
}

TEMPLATE_LIST_TEST_CASE("every ISA matches the reference on tails of every tile and vector width",
                        "[attend][isa]", kvheads::simd::enabled_isas) {
  using Isa = TestType;
  if (!cpu_runs<Isa>()) return;
  // head_dim below, at and above the vector widths (1, 4, 8, 16); query rows
  // (group_size x q_len) below, at and above the row tiles; key counts around the 64-key
  // (staged) and many-row blocks (120 keys with 16 registers, 128 with 32; Q.K tiles of 6
  // or 8 keys, tails of 4 and 1) and the few-row (decode) block: 256 keys, 1024 with
  // 16-float vectors. With 16 registers, the many-row P.V of an even number of row vectors
  // (16 and 32 rows here on AVX2, every even row count on the scalar ISA) reads whole V
  // rows in tiles of 6 keys (pv_by_keys): in 120-key blocks, 17, 63, 65, 129 and 1000
  // keys leave tiles of 5, 3, 5, 3 and 4, and 1, 2 and 121 keys of 1 and 2; staged head_dims
  // (64-key blocks) leave 4 keys after each full block.
  const std::vector<std::pair<int, int>> lengths = {{1, 1},    {1, 2},    {2, 17},   {5, 63},    {17, 64},
                                                    {1, 65},   {65, 129}, {9, 121},  {1, 256},  {2, 257},   {3, 1000},
                                                    {1, 1024}, {2, 1025}};
  for (int head_dim : {1, 3, 4, 7, 8, 9, 15, 16, 17, 33, 64, 80})
    for (const HeadLayout& layout : {HeadLayout{3, 3, head_dim}, HeadLayout{8, 4, head_dim}, HeadLayout{12, 4, head_dim},
                                     HeadLayout{16, 2, head_dim}, HeadLayout{32, 2, head_dim}, HeadLayout{16, 1, head_dim},
                                     HeadLayout{6, 1, head_dim}})
      for (auto [q_len, kv_len] : lengths) {
        if (head_dim > 17 && head_dim != 64 && kv_len > 200) continue;
        const Problem p(layout, q_len, kv_len, std::uint32_t(head_dim + q_len * 13 + kv_len * 3 + layout.q_heads));
        check_against_reference<Isa>(p, AttentionOptions{}, {1, 2});
        check_against_reference<Isa>(p, option_sets().back(), {1, 2});
      }
}

TEMPLATE_LIST_TEST_CASE("every ISA's decode tiles match the reference with rows longer than the register tile",
                        "[attend][isa]", kvheads::simd::enabled_isas) {
  using Isa = TestType;
  if (!cpu_runs<Isa>()) return;
  // Few-row (decode) tasks whose head_dim rows exceed the P.V register tile (on 16-register
  // ISAs one row's pass accumulates the rest of its row in L1; two to four rows take one
  // pass with every row's sums in L1, two keys per step and an odd block's last key alone;
  // in the blocks with masked keys of the combined options' window, the first row's pass
  // and register tiles of 1, 2 or 3 rows for the others, in 32-key tiles), over several
  // key blocks with the next block requested ahead, and tails of both: 2601 keys = 2 x 1024 + 17 x 32 + 9
  // (16-float vectors) or 10 x 256 + 32 + 9; the odd last block leaves two-key Q.K passes
  // (Tiling::dims_key_pairs) one key to do alone. One row (MHA), two, three and four rows
  // (GQA), five and seven (groups 5 and 7: one Q.K tile of one accumulator chain per row
  // with 16-float vectors, keys two at a time, many-row tiles below them), and q_len 2 for
  // rows of two positions (up to eight rows in one few-row tile). With 16-float vectors,
  // head_dim 112 and 128 (7 and 8 vectors) take the one-pass P.V of 4-row tiles whose
  // last 1-2 vectors per row accumulate in L1 (Tiling::pv_memory_chunks_wide); with q_len
  // 2 its second tile's pass walks the keys backwards.
  for (int head_dim : {72, 112, 128, 131})
    for (const HeadLayout& layout : {HeadLayout{2, 2, head_dim}, HeadLayout{4, 2, head_dim}, HeadLayout{6, 2, head_dim},
                                     HeadLayout{8, 2, head_dim}, HeadLayout{10, 2, head_dim}, HeadLayout{7, 1, head_dim}})
      for (int q_len : {1, 2}) {
        const Problem p(layout, q_len, 2601, std::uint32_t(head_dim * 7 + layout.q_heads + q_len));
        for (const AttentionOptions& options : {AttentionOptions{}, option_sets().back()})
          check_against_reference<Isa>(p, options, {1, 2});
      }
}

TEMPLATE_LIST_TEST_CASE("every ISA splits long decode over threads and merges exactly", "[attend][isa][threads]",
                        kvheads::simd::enabled_isas) {
  using Isa = TestType;
  if (!cpu_runs<Isa>()) return;
  // One KV head and one query: only key splits can use a second thread.
  for (const HeadLayout& layout : {HeadLayout{8, 1, 64}, HeadLayout{4, 4, 17}, HeadLayout{32, 1, 128}}) {
    const Problem p(layout, 1, 5000, 99);
    for (const AttentionOptions& options : option_sets()) check_against_reference<Isa>(p, options, {1, 2, 3, 8});
  }
}

TEMPLATE_LIST_TEST_CASE("every ISA's plain-memory decode, read in key chunks head by head, matches the reference",
                        "[attend][isa][threads]", kvheads::simd::enabled_isas) {
  using Isa = TestType;
  if (!cpu_runs<Isa>()) return;
  // Plain-memory decode with several KV heads splits the keys into 256-key chunks, runs
  // every head of a chunk in turn and merges the chunks. Lengths below, at and around two
  // chunks, a tail, many chunks; a window that leaves most chunks without a visible key;
  // sinks, which join after the merge; q_len 4 (16 rows of GQA-4 per task).
  std::vector<float> sinks(32);
  for (std::size_t h = 0; h < sinks.size(); ++h) sinks[h] = 0.25f * float(h % 5) - 0.5f;
  std::vector<AttentionOptions> options_list = {AttentionOptions{}, option_sets()[2], option_sets().back()};
  options_list.push_back(AttentionOptions{});
  options_list.back().sinks = sinks.data();
  options_list.back().causal = true;
  for (const HeadLayout& layout : {HeadLayout{4, 4, 64}, HeadLayout{32, 8, 128}, HeadLayout{8, 2, 33}})
    for (auto [q_len, kv_len] : std::vector<std::pair<int, int>>{{1, 511}, {1, 512}, {1, 513}, {2, 1000}, {4, 1000}, {1, 4097}}) {
      const Problem p(layout, q_len, kv_len, std::uint32_t(kv_len * 3 + layout.kv_heads + q_len));
      for (const AttentionOptions& options : options_list) check_against_reference<Isa>(p, options, {1, 2});
    }
}

TEST_CASE("plain-memory decode requests exactly the rows the task two heads on reads, and only rows that exist",
          "[attend]") {
  // Tasks run chunk by chunk, every head of a chunk in turn; while one reads its rows it
  // requests those of the task two places later in that order (none past the last task).
  struct Rows {
    int head;
    std::ptrdiff_t first_token, tokens;
    bool operator==(const Rows& o) const { return head == o.head && first_token == o.first_token && tokens == o.tokens; }
  };
  for (int kv_heads : {2, 3, 4, 8, 32})
    for (std::ptrdiff_t kv_len : {512, 513, 1000, 4097, 16384}) {
      const std::ptrdiff_t chunks = kv_len / kvheads::detail::heads_chunk_keys;
      const std::ptrdiff_t chunk_keys = (kv_len + chunks - 1) / chunks;
      std::vector<Rows> order;
      for (std::ptrdiff_t first = 0; first < kv_len; first += chunk_keys)
        for (int head = 0; head < kv_heads; ++head) order.push_back({head, first, std::min(chunk_keys, kv_len - first)});
      for (std::size_t i = 0; i < order.size(); ++i) {
        const Rows& task = order[i];
        const auto ahead = kvheads::detail::rows_ahead(task.head, kv_heads, int(task.tokens),
                                                       kv_len - (task.first_token + task.tokens));
        INFO("kv_heads " << kv_heads << ", kv_len " << kv_len << ", task " << i << " (head " << task.head
                         << ", tokens " << task.first_token << "+" << task.tokens << ")");
        if (i + 2 < order.size()) {
          REQUIRE(ahead.tokens > 0);
          CHECK(Rows{ahead.head, task.first_token + ahead.first_token, ahead.tokens} == order[i + 2]);
        } else {
          CHECK(ahead.tokens == 0);
        }
        if (ahead.tokens > 0) {
          CHECK(ahead.head >= 0);
          CHECK(ahead.head < kv_heads);
          CHECK(task.first_token + ahead.first_token + ahead.tokens <= kv_len);
        }
      }
    }
}

TEST_CASE("plain-memory prefill (K/V copied head-major) equals the cache path bit for bit", "[attend]") {
  // Plain K/V interleave the KV heads; a prefill copies each head's keys into contiguous
  // scratch first. A KvCache is head-major already, so the two paths must agree exactly,
  // and both must match the reference. Query tiles: 1, 2 and many per head; the keys are
  // copied once more than 16 tiles read them (MHA with 1100 queries, groups of 4 with 300).
  for (const HeadLayout& layout : {HeadLayout{4, 4, 64}, HeadLayout{8, 2, 33}, HeadLayout{32, 8, 128}, HeadLayout{8, 1, 16},
                                   HeadLayout{2, 2, 8}})
    for (int q_len : {5, 70, 300, 1100})
      for (int threads : {1, 2}) {
        if (q_len > 300 && layout.q_heads * layout.head_dim > 16) continue;  // keep the reference affordable
        INFO(describe(layout, q_len, q_len, AttentionOptions{}) << " threads " << threads);
        const Problem p(layout, q_len, q_len, std::uint32_t(q_len + layout.kv_heads));
        kvheads::KvCache<float> cache(layout, q_len);
        cache.append(p.k.data(), p.v.data(), q_len);
        AttentionOptions options;
        options.causal = true;
        options.threads = threads;
        std::vector<float> plain(p.out_size()), cached(p.out_size());
        kvheads::attend(p.q.data(), p.k.data(), p.v.data(), plain.data(), q_len, q_len, layout, options);
        kvheads::attend(p.q.data(), q_len, cache, cached.data(), options);
        CHECK(plain == cached);
        CHECK(relative_error(plain, p.reference(options)) <= tolerance);
      }
}

namespace {

/// Sets the size above which a prefill's queries and outputs are staged head-major, for
/// one scope (0: every prefill whose query tiles span more tokens than heads).
struct StagingThreshold {
  std::size_t saved = kvheads::detail::staged_queries_min_bytes;
  explicit StagingThreshold(std::size_t bytes) { kvheads::detail::staged_queries_min_bytes = bytes; }
  ~StagingThreshold() { kvheads::detail::staged_queries_min_bytes = saved; }
  StagingThreshold(const StagingThreshold&) = delete;
  StagingThreshold& operator=(const StagingThreshold&) = delete;
};

struct PrefillResult {
  std::vector<float> out, lse;
  bool operator==(const PrefillResult& other) const { return out == other.out && lse == other.lse; }
};

}  // namespace

TEMPLATE_LIST_TEST_CASE("every ISA's prefill with queries and outputs staged head-major equals the unstaged call bit for bit",
                        "[attend][isa]", kvheads::simd::enabled_isas) {
  using Isa = TestType;
  if (!cpu_runs<Isa>()) return;
  // Prefills with many queries copy them head-major and write their outputs there first
  // (HeadMajorStaging); here the threshold is lowered so small shapes take that path. A
  // row's arithmetic does not depend on where its query came from, so plain memory and
  // cache, one call and a batch, must give the unstaged results exactly, lse included.
  // Layouts whose query tiles span more tokens than heads on every ISA (MHA, groups 2
  // and 3) and on wide ISAs only (MQA with group 6); lengths past one tile, with a partial
  // last tile, and past 1000 (small MHA only, to keep the reference affordable).
  const std::vector<float> sinks = random_vector(16, 99);
  for (const HeadLayout& layout : {HeadLayout{4, 4, 33}, HeadLayout{8, 4, 16}, HeadLayout{12, 4, 64}, HeadLayout{6, 1, 3},
                                   HeadLayout{2, 2, 5}})
    for (const auto& lengths : std::vector<std::pair<int, int>>{{70, 70}, {100, 131}, {1100, 1117}})
      for (int threads : {1, 2}) {
        const int q_len = lengths.first, kv_len = lengths.second;  // lambdas below capture them
        if (q_len > 1000 && layout.q_heads * layout.head_dim > 16) continue;
        AttentionOptions causal;
        causal.causal = true;
        AttentionOptions combined = option_sets().back();
        combined.sinks = sinks.data();
        for (AttentionOptions options : {causal, combined}) {
          options.threads = threads;
          INFO(describe(layout, q_len, kv_len, options) << " isa " << Isa::name << " threads " << threads);
          const Problem p(layout, q_len, kv_len, std::uint32_t(q_len * 5 + layout.q_heads));
          kvheads::KvCache<float> cache(layout, kv_len);
          cache.append(p.k.data(), p.v.data(), kv_len);
          const std::size_t lse_size = std::size_t(q_len) * std::size_t(layout.q_heads);
          const auto plain = [&] {
            PrefillResult r{std::vector<float>(p.out_size(), -1.f), std::vector<float>(lse_size, -1.f)};
            kvheads::attend<Isa>(p.q.data(), p.k.data(), p.v.data(), r.out.data(), q_len, kv_len, layout, options,
                                 r.lse.data());
            return r;
          };
          const auto cached = [&] {
            PrefillResult r{std::vector<float>(p.out_size(), -1.f), std::vector<float>(lse_size, -1.f)};
            kvheads::attend<Isa>(p.q.data(), q_len, cache, r.out.data(), options, r.lse.data());
            return r;
          };
          // A batch of two sequences of different lengths on one cache: per-item strides.
          const int short_len = q_len / 2 + 1;
          const auto batch = [&] {
            PrefillResult r{std::vector<float>(p.out_size() * 2, -1.f), std::vector<float>(lse_size * 2, -1.f)};
            const kvheads::AttendItem<float> items[2] = {
                {p.q.data(), q_len, &cache, r.out.data(), r.lse.data()},
                {p.q.data(), short_len, &cache, r.out.data() + p.out_size(), r.lse.data() + lse_size}};
            kvheads::attend<Isa>(items, 2, options);
            return r;
          };
          PrefillResult plain_staged, cached_staged, batch_staged;
          {
            const StagingThreshold every_prefill(0);
            plain_staged = plain();
            cached_staged = cached();
            batch_staged = batch();
          }
          {
            const StagingThreshold no_prefill(std::size_t(-1));
            CHECK(plain_staged == plain());
            CHECK(cached_staged == cached());
            CHECK(batch_staged == batch());
          }
          if (threads == 1) {
            std::vector<float> expected_lse;
            const std::vector<float> expected = p.reference(options, &expected_lse);
            CHECK(relative_error(plain_staged.out, expected) <= tolerance);
            CHECK(relative_error(plain_staged.lse, expected_lse, 1.0) <= tolerance);
            CHECK(relative_error(cached_staged.out, expected) <= tolerance);
          }
        }
      }
}

TEST_CASE("attend runs on a pool the caller passes in", "[attend][threads]") {
  kvheads::ThreadPool pool(3);
  for (const HeadLayout& layout : {HeadLayout{8, 2, 64}, HeadLayout{8, 1, 16}}) {
    const Problem p(layout, 2, 3000, 5);
    AttentionOptions options;
    options.pool = &pool;
    options.causal = true;
    std::vector<float> out(p.out_size());
    kvheads::attend(p.q.data(), p.k.data(), p.v.data(), out.data(), p.q_len, p.kv_len, layout, options);
    CHECK(relative_error(out, p.reference(options)) <= tolerance);
  }
}

TEMPLATE_LIST_TEST_CASE("every ISA attends in place (out == q) exactly as into separate memory", "[attend][isa][alias]",
                        kvheads::simd::enabled_isas) {
  using Isa = TestType;
  if (!cpu_runs<Isa>()) return;
  // The entry points document out == q as allowed: every output row is written after the
  // last read of its own query row, on every path. Decode split over threads (merged
  // after all tasks), prefill with and without head-major staging, plain memory and cache.
  for (const HeadLayout& layout : {HeadLayout{4, 4, 33}, HeadLayout{8, 2, 64}, HeadLayout{8, 1, 16}})
    for (const auto& lengths : std::vector<std::pair<int, int>>{{1, 2000}, {2, 17}, {130, 130}, {70, 1001}})
      for (int threads : {1, 2})
        for (std::size_t staging : {std::size_t(0), std::size_t(-1)}) {
          const int q_len = lengths.first, kv_len = lengths.second;
          AttentionOptions options;
          options.causal = true;
          options.threads = threads;
          INFO(describe(layout, q_len, kv_len, options) << " isa " << Isa::name << " staging " << (staging == 0));
          const StagingThreshold threshold(staging);
          const Problem p(layout, q_len, kv_len, std::uint32_t(q_len * 7 + layout.kv_heads));
          std::vector<float> separate(p.out_size(), -1.f);
          kvheads::attend<Isa>(p.q.data(), p.k.data(), p.v.data(), separate.data(), q_len, kv_len, layout, options);
          std::vector<float> in_place = p.q;
          kvheads::attend<Isa>(in_place.data(), p.k.data(), p.v.data(), in_place.data(), q_len, kv_len, layout, options);
          CHECK(in_place == separate);

          kvheads::KvCache<float> cache(layout, kv_len);
          cache.append(p.k.data(), p.v.data(), kv_len);
          std::vector<float> cached_separate(p.out_size(), -1.f);
          kvheads::attend<Isa>(p.q.data(), q_len, cache, cached_separate.data(), options);
          std::vector<float> cached_in_place = p.q;
          kvheads::attend<Isa>(cached_in_place.data(), q_len, cache, cached_in_place.data(), options);
          CHECK(cached_in_place == cached_separate);
          if (threads == 1 && staging == 0)
            CHECK(relative_error(separate, p.reference(options)) <= tolerance);
        }
}
