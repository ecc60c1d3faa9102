// Concurrent callers: several std::threads calling attend() at once (plain memory, their own
// caches, one shared read-only cache, batches, whole layers), with options.threads 1 and 2 on
// the global pool, and on one shared user ThreadPool (AttentionOptions::pool). Every result
// must equal, bit for bit, the same call made alone. Run under ThreadSanitizer in CI
// (.ci/run) as well.
#include <catch2/catch.hpp>

#include <atomic>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

#include "test_support.hpp"

using kvheads::AttentionOptions;
using kvheads::HeadLayout;
using kvheads::KvCache;
using namespace kvheads_test;

namespace {

constexpr int kCallers = 4;
constexpr int kRounds = 6;

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

/// One caller's work: a problem (its shape differs per caller) and its options.
struct Work {
  Problem problem;
  AttentionOptions options;
};

std::vector<Work> make_work(int threads) {
  // Decode with a long context (key splits), GQA prefill, MQA, MHA: different shapes so
  // the callers' tasks and per-thread scratch sizes differ.
  const std::vector<std::tuple<HeadLayout, int, int>> shapes = {
      {{8, 1, 64}, 1, 3000}, {{8, 2, 16}, 33, 200}, {{4, 4, 80}, 5, 700}, {{12, 3, 7}, 2, 1500}};
  std::vector<Work> work;
  for (int c = 0; c < kCallers; ++c) {
    const auto& [layout, q_len, kv_len] = shapes[std::size_t(c) % shapes.size()];
    AttentionOptions options = option_sets()[std::size_t(c) % option_sets().size()];
    options.threads = threads;
    work.push_back({Problem(layout, q_len, kv_len, std::uint32_t(300 + c)), options});
  }
  return work;
}

/// Runs body(caller) on kCallers threads released together, joins them.
template <class Body>
void run_concurrently(Body body) {
  std::atomic<int> ready{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < kCallers; ++c)
    callers.emplace_back([&, c] {
      ready.fetch_add(1);
      while (ready.load() < kCallers) std::this_thread::yield();
      body(c);
    });
  for (std::thread& t : callers) t.join();
}

std::vector<float> plain_alone(const Work& w) {
  std::vector<float> out(w.problem.out_size());
  kvheads::attend(w.problem.q.data(), w.problem.k.data(), w.problem.v.data(), out.data(), w.problem.q_len,
                  w.problem.kv_len, w.problem.layout, w.options);
  return out;
}

}  // namespace

TEST_CASE("concurrent attend() calls on plain memory equal the same calls made alone", "[concurrency]") {
  for (int threads : {1, 2}) {
    const std::vector<Work> work = make_work(threads);
    std::vector<std::vector<float>> alone;
    for (const Work& w : work) alone.push_back(plain_alone(w));
    std::vector<int> mismatches(kCallers, 0);
    run_concurrently([&](int c) {
      const Work& w = work[std::size_t(c)];
      for (int round = 0; round < kRounds; ++round)
        if (!same_bits(plain_alone(w), alone[std::size_t(c)])) ++mismatches[std::size_t(c)];
    });
    for (int c = 0; c < kCallers; ++c) {
      INFO("caller " << c << " threads " << threads);
      CHECK(mismatches[std::size_t(c)] == 0);
      CHECK(relative_error(alone[std::size_t(c)], work[std::size_t(c)].problem.reference(work[std::size_t(c)].options)) <=
            tolerance);
    }
  }
}

TEST_CASE("concurrent callers each with their own cache decode like a caller alone", "[concurrency][cache]") {
  for (int threads : {1, 2}) {
    const std::vector<Work> work = make_work(threads);
    // Reference run: each caller's prefill + decode steps, made alone.
    auto session = [&](const Work& w) {
      const Problem& p = w.problem;
      const int prefill = p.kv_len - p.q_len;
      KvCache<float> cache(p.layout, p.kv_len);
      std::vector<float> outputs;
      cache.append(p.k.data(), p.v.data(), prefill);
      for (int t = 0; t < p.q_len; ++t) {  // one decode step per query
        cache.append(p.k.data() + std::ptrdiff_t(prefill + t) * p.layout.kv_width(),
                     p.v.data() + std::ptrdiff_t(prefill + t) * p.layout.kv_width(), 1);
        std::vector<float> out(std::size_t(p.layout.q_width()));
        kvheads::attend(p.q.data() + std::ptrdiff_t(t) * p.layout.q_width(), 1, cache, out.data(), w.options);
        outputs.insert(outputs.end(), out.begin(), out.end());
      }
      return outputs;
    };
    std::vector<std::vector<float>> alone;
    for (const Work& w : work) alone.push_back(session(w));
    std::vector<int> mismatches(kCallers, 0);
    run_concurrently([&](int c) {
      for (int round = 0; round < 2; ++round)
        if (!same_bits(session(work[std::size_t(c)]), alone[std::size_t(c)])) ++mismatches[std::size_t(c)];
    });
    for (int c = 0; c < kCallers; ++c) {
      INFO("caller " << c << " threads " << threads);
      CHECK(mismatches[std::size_t(c)] == 0);
    }
  }
}

TEST_CASE("concurrent readers of one shared cache get the result of a reader alone", "[concurrency][cache]") {
  const Problem p({8, 2, 64}, 4, 2500, 17);
  KvCache<float> cache(p.layout, p.kv_len);
  cache.append(p.k.data(), p.v.data(), p.kv_len);
  for (int threads : {1, 2}) {
    std::vector<AttentionOptions> options(kCallers);
    for (int c = 0; c < kCallers; ++c) {
      options[std::size_t(c)] = option_sets()[std::size_t(c) + 1];
      options[std::size_t(c)].threads = threads;
    }
    auto read = [&](int c, int q_len) {
      std::vector<float> out(std::size_t(q_len) * p.layout.q_width());
      kvheads::attend(p.q.data(), q_len, cache, out.data(), options[std::size_t(c)]);
      return out;
    };
    std::vector<std::vector<float>> alone;
    for (int c = 0; c < kCallers; ++c) alone.push_back(read(c, 1 + c % 4));
    std::vector<int> mismatches(kCallers, 0);
    run_concurrently([&](int c) {
      for (int round = 0; round < kRounds; ++round)
        if (!same_bits(read(c, 1 + c % 4), alone[std::size_t(c)])) ++mismatches[std::size_t(c)];
    });
    for (int c = 0; c < kCallers; ++c) {
      INFO("reader " << c << " threads " << threads);
      CHECK(mismatches[std::size_t(c)] == 0);
    }
  }
}

TEST_CASE("concurrent batched attend() calls equal the batch made alone", "[concurrency][batch]") {
  const HeadLayout layout{8, 2, 16};
  std::vector<Problem> problems;
  std::vector<KvCache<float>> caches;
  for (int s = 0; s < 3; ++s) {
    problems.emplace_back(layout, 1 + s, 100 + 900 * s, std::uint32_t(400 + s));
    caches.emplace_back(layout, problems.back().kv_len);
    caches.back().append(problems.back().k.data(), problems.back().v.data(), problems.back().kv_len);
  }
  auto batch = [&](int threads) {
    std::vector<std::vector<float>> outs;
    for (const Problem& p : problems) outs.emplace_back(p.out_size());
    std::vector<kvheads::AttendItem<float>> items;
    for (std::size_t s = 0; s < problems.size(); ++s)
      items.push_back({problems[s].q.data(), problems[s].q_len, &caches[s], outs[s].data(), nullptr});
    AttentionOptions options;
    options.causal = true;
    options.threads = threads;
    kvheads::attend(items, options);
    std::vector<float> all;
    for (const auto& o : outs) all.insert(all.end(), o.begin(), o.end());
    return all;
  };
  for (int threads : {1, 2}) {
    const std::vector<float> alone = batch(threads);
    std::vector<int> mismatches(kCallers, 0);
    run_concurrently([&](int c) {
      for (int round = 0; round < kRounds; ++round)
        if (!same_bits(batch(threads), alone)) ++mismatches[std::size_t(c)];
    });
    for (int c = 0; c < kCallers; ++c) CHECK(mismatches[std::size_t(c)] == 0);
  }
}

TEST_CASE("concurrent Attention layers on distinct caches equal a layer alone", "[concurrency][attention]") {
  const HeadLayout layout{8, 2, 16};
  const int d_model = 32, tokens = 9;
  kvheads::Attention<float> layer(d_model, layout);
  layer.wq() = kvheads::RowMatrix::Random(d_model, layout.q_width()) * 0.3f;
  layer.wk() = kvheads::RowMatrix::Random(d_model, layout.kv_width()) * 0.3f;
  layer.wv() = kvheads::RowMatrix::Random(d_model, layout.kv_width());
  layer.wo() = kvheads::RowMatrix::Random(layout.q_width(), d_model);
  const std::vector<float> x = random_vector(std::size_t(tokens) * d_model, 500);
  auto run = [&] {
    auto cache = layer.make_cache(tokens);
    std::vector<float> out(x.size());
    AttentionOptions options;
    options.causal = true;
    options.threads = 2;
    layer.forward(x.data(), tokens - 2, cache, out.data(), options);  // prefill
    layer.forward(x.data() + (tokens - 2) * d_model, 1, cache, out.data() + (tokens - 2) * d_model, options);
    layer.forward(x.data() + (tokens - 1) * d_model, 1, cache, out.data() + (tokens - 1) * d_model, options);
    return out;
  };
  const std::vector<float> alone = run();
  std::vector<int> mismatches(kCallers, 0);
  run_concurrently([&](int c) {
    for (int round = 0; round < kRounds; ++round)
      if (!same_bits(run(), alone)) ++mismatches[std::size_t(c)];
  });
  for (int c = 0; c < kCallers; ++c) CHECK(mismatches[std::size_t(c)] == 0);
}

TEST_CASE("a caller whose arguments are rejected does not disturb concurrent callers", "[concurrency][errors]") {
  const std::vector<Work> work = make_work(2);
  std::vector<std::vector<float>> alone;
  for (const Work& w : work) alone.push_back(plain_alone(w));
  std::vector<int> mismatches(kCallers, 0), errors(kCallers, 0);
  run_concurrently([&](int c) {
    const Work& w = work[std::size_t(c)];
    for (int round = 0; round < kRounds; ++round) {
      if ((c + round) % 2 == 0) {
        AttentionOptions bad = w.options;
        bad.window = -1;
        try {
          plain_alone({w.problem, bad});
        } catch (const std::invalid_argument&) {
          ++errors[std::size_t(c)];
        }
      }
      if (!same_bits(plain_alone(w), alone[std::size_t(c)])) ++mismatches[std::size_t(c)];
    }
  });
  for (int c = 0; c < kCallers; ++c) {
    CHECK(mismatches[std::size_t(c)] == 0);
    CHECK(errors[std::size_t(c)] == kRounds / 2);
  }
}

TEST_CASE("concurrent callers sharing one user ThreadPool equal a caller alone", "[concurrency][parallel]") {
  // Several threads pass the same pool in AttentionOptions::pool: its jobs are serialised,
  // and every caller still gets exactly its own result.
  kvheads::ThreadPool pool(2);
  std::vector<Work> work = make_work(2);
  for (Work& w : work) w.options.pool = &pool;
  // Plain-memory decode reads its KV heads in key chunks and a cache need not, so the two
  // may differ in the last bits: each kind of call is compared with itself alone.
  const auto cache_call = [](const Work& w) {
    const Problem& p = w.problem;
    KvCache<float> cache(p.layout, p.kv_len);
    cache.append(p.k.data(), p.v.data(), p.kv_len);
    std::vector<float> out(p.out_size());
    kvheads::attend(p.q.data(), p.q_len, cache, out.data(), w.options);
    return out;
  };
  std::vector<std::vector<float>> alone, cache_alone;
  for (const Work& w : work) alone.push_back(plain_alone(w));
  for (const Work& w : work) cache_alone.push_back(cache_call(w));
  for (std::size_t c = 0; c < work.size(); ++c) {
    const std::vector<float> expected = work[c].problem.reference(work[c].options);
    CHECK(relative_error(alone[c], expected) <= tolerance);
    CHECK(relative_error(cache_alone[c], expected) <= tolerance);
  }
  std::vector<int> mismatches(kCallers, 0);
  run_concurrently([&](int c) {
    for (int round = 0; round < kRounds; ++round) {
      if (!same_bits(plain_alone(work[std::size_t(c)]), alone[std::size_t(c)])) ++mismatches[std::size_t(c)];
      // Interleave cache calls on the same pool.
      if (!same_bits(cache_call(work[std::size_t(c)]), cache_alone[std::size_t(c)])) ++mismatches[std::size_t(c)];
    }
  });
  for (int c = 0; c < kCallers; ++c) CHECK(mismatches[std::size_t(c)] == 0);
}
