#pragma once
// Kernel-level entry points (no projections): attention over plain memory and over a
// KvCache. Arguments are checked here, at the public boundary; the kernels carry no checks.
#include <cstddef>
#include <vector>

#include "kvheads/core/check.hpp"
#include "kvheads/core/fused_kernel.hpp"
#include "kvheads/core/logits.hpp"
#include "kvheads/core/parallel.hpp"
#include "kvheads/head_layout.hpp"
#include "kvheads/kv_cache.hpp"
#include "kvheads/options.hpp"
#include "kvheads/simd/simd.hpp"

namespace kvheads {

namespace detail {

/// ALiBi slopes of a layout as floats, computed once per q_heads and thread.
inline const float* alibi_slopes_for(int q_heads) {
  thread_local int cached_heads = 0;
  thread_local std::vector<float> cached;
  if (cached_heads != q_heads) {
    const std::vector<double> slopes = alibi_slopes(q_heads);
    cached.assign(slopes.begin(), slopes.end());
    cached_heads = q_heads;
  }
  return cached.data();
}

template <class KvT>
void resolve_options(AttendArgs<KvT>& args, const AttentionOptions& options) {
  options.validate();
  args.scale = options.effective_scale(args.layout.head_dim);
  args.softcap = options.softcap;
  args.causal = options.causal;
  args.window = options.window;
  args.alibi_slopes = options.alibi ? alibi_slopes_for(args.layout.q_heads) : nullptr;
  args.threads = options.threads;
}

inline void check_lengths(int q_len, int kv_len) {
  if (q_len < 0) throw_invalid("q_len (", q_len, ") must be >= 0");
  if (kv_len < 0) throw_invalid("kv_len (", kv_len, ") must be >= 0");
}

inline AttendArgs<float> plain_args(const float* q, const float* k, const float* v, float* out, int q_len, int kv_len,
                                    HeadLayout layout, const AttentionOptions& options, float* lse) {
  layout.validate();
  check_lengths(q_len, kv_len);
  require_pointer(q, q_len, "q");
  require_pointer(out, q_len, "out");
  require_pointer(k, kv_len, "k");
  require_pointer(v, kv_len, "v");
  AttendArgs<float> args;
  args.layout = layout;
  args.q = q;
  args.q_token_stride = layout.q_width();
  args.q_head_stride = layout.head_dim;
  args.out = out;
  args.out_token_stride = layout.q_width();
  args.out_head_stride = layout.head_dim;
  args.k = k;
  args.v = v;
  args.kv_token_stride = layout.kv_width();
  args.kv_head_stride = layout.head_dim;
  args.q_len = q_len;
  args.kv_len = kv_len;
  args.first_query_pos = std::ptrdiff_t(kv_len) - q_len;
  args.lse = lse;
  resolve_options(args, options);
  return args;
}

template <class T>
AttendArgs<T> cache_args(const float* q, int q_len, const KvCache<T>& cache, float* out,
                         const AttentionOptions& options, float* lse) {
  if (q_len < 0) throw_invalid("q_len (", q_len, ") must be >= 0");
  if (q_len > cache.size())
    throw_invalid("q_len (", q_len, ") must not exceed the cache's size (", cache.size(),
                  "): the queries sit at the last q_len cached positions");
  require_pointer(q, q_len, "q");
  require_pointer(out, q_len, "out");
  const HeadLayout& layout = cache.layout();
  AttendArgs<T> args;
  args.layout = layout;
  args.q = q;
  args.q_token_stride = layout.q_width();
  args.q_head_stride = layout.head_dim;
  args.out = out;
  args.out_token_stride = layout.q_width();
  args.out_head_stride = layout.head_dim;
  args.k = cache.keys();
  args.v = cache.values();
  args.kv_token_stride = cache.token_stride();
  args.kv_head_stride = cache.head_stride();
  args.q_len = q_len;
  args.kv_len = cache.size();
  args.first_query_pos = std::ptrdiff_t(cache.size()) - q_len;
  args.lse = lse;
  resolve_options(args, options);
  return args;
}

}  // namespace detail

/// Attention over plain memory with a named ISA (simd::scalar, simd::avx2, ...):
/// q [q_len][q_heads][head_dim]; k, v [kv_len][kv_heads][head_dim]; out like q;
/// lse (optional) [q_len][q_heads] receives each row's log-sum-exp.
template <class Isa>
void attend(const float* q, const float* k, const float* v, float* out, int q_len, int kv_len, HeadLayout layout,
            const AttentionOptions& options = {}, float* lse = nullptr) {
  detail::dispatch_fused<Isa>(detail::plain_args(q, k, v, out, q_len, kv_len, layout, options, lse));
}

/// Attention over plain memory (stable entry point):
/// q [q_len][q_heads][head_dim]; k, v [kv_len][kv_heads][head_dim]; out like q.
/// Query row i sits at position kv_len - q_len + i (bottom-right alignment).
inline void attend(const float* q, const float* k, const float* v, float* out, int q_len, int kv_len,
                   HeadLayout layout, const AttentionOptions& options = {}) {
  attend<simd::default_isa>(q, k, v, out, q_len, kv_len, layout, options);
}

/// Attention of q_len queries against a cache with a named ISA. The queries sit at the
/// last q_len cached positions. q, out: [q_len][q_heads][head_dim]; lse optional [q_len][q_heads].
template <class Isa, class T>
void attend(const float* q, int q_len, const KvCache<T>& cache, float* out, const AttentionOptions& options = {},
            float* lse = nullptr) {
  detail::dispatch_fused<Isa>(detail::cache_args(q, q_len, cache, out, options, lse));
}

/// Attention of q_len queries against a cache (stable entry point). The queries sit at
/// the last q_len cached positions. q, out: [q_len][q_heads][head_dim].
template <class T>
void attend(const float* q, int q_len, const KvCache<T>& cache, float* out, const AttentionOptions& options = {}) {
  attend<simd::default_isa, T>(q, q_len, cache, out, options);
}

}  // namespace kvheads
