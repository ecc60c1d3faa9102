#pragma once
// Kernel-level entry points (no projections): attention over plain memory and over a
// KvCache. Arguments are checked here, at the public boundary; the kernels carry no checks.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvheads/core/check.hpp"
#include "kvheads/core/fused_kernel.hpp"
#include "kvheads/core/logits.hpp"
#include "kvheads/core/parallel.hpp"
#include "kvheads/head_layout.hpp"
#include "kvheads/kernel_instances.hpp"
#include "kvheads/kv_cache.hpp"
#include "kvheads/options.hpp"
#include "kvheads/simd/simd.hpp"

namespace kvheads {

namespace detail {

/// Enables the overloads that take an ISA tag only for real tags, so attend<float>(...)
/// names the storage type of the stable overloads, never an ISA.
template <class Isa, class = void>
struct is_isa : std::false_type {};
template <class Isa>
struct is_isa<Isa, std::void_t<decltype(Isa::width), decltype(Isa::name)>> : std::true_type {};
template <class Isa>
using IsaTag = std::enable_if_t<is_isa<Isa>::value>;

/// ALiBi slopes of a layout as floats, computed once per q_heads and thread.
inline const float* alibi_slopes_for(int q_heads) {
  thread_local int cached_heads = 0;
  thread_local std::vector<float> cached;
  if (cached_heads != q_heads) {
    // Grown only, filled in place: alternating layouts allocate nothing after warm-up.
    if (cached.size() < std::size_t(q_heads)) cached.resize(std::size_t(q_heads));
    for (int h = 0; h < q_heads; ++h) cached[std::size_t(h)] = float(alibi_slope(h, q_heads));
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
  args.sinks = options.sinks;
  args.pool = options.pool;
}

inline void check_lengths(int q_len, int kv_len) {
  if (q_len < 0) throw_invalid("q_len (", q_len, ") must be >= 0");
  if (kv_len < 0) throw_invalid("kv_len (", kv_len, ") must be >= 0");
}

/// Queries and outputs as the entry points take them: dense [q_len][q_heads][head_dim].
template <class T>
void set_dense_queries(AttendArgs<T>& args, const HeadLayout& layout, const float* q, float* out) {
  args.layout = layout;
  args.q = q;
  args.q_token_stride = layout.q_width();
  args.q_head_stride = layout.head_dim;
  args.out = out;
  args.out_token_stride = layout.q_width();
  args.out_head_stride = layout.head_dim;
}

/// What a call writes must not overlap what it reads: threads write outputs while others
/// still read inputs. `out` may be `q` itself (in place: every output row is written after
/// the last read of its own query row) but no other part of q and nothing else; `lse` may
/// overlap nothing. `kv`: the call's K and V when they are the caller's memory.
inline void require_outputs_disjoint(const float* q, const float* out, const float* lse, int q_len,
                                     const HeadLayout& layout, const AttentionOptions& options,
                                     std::initializer_list<FloatSpan> kv) {
  const FloatSpan q_span{q, std::ptrdiff_t(q_len) * layout.q_width(), "q"};
  const FloatSpan out_span{out, q_span.floats, "out"};
  const FloatSpan sinks_span{options.sinks, layout.q_heads, "options.sinks"};
  require_disjoint(out_span, q_span, /*may_be_identical=*/true);
  require_disjoint(out_span, sinks_span);
  for (const FloatSpan& input : kv) require_disjoint(out_span, input);
  if (lse == nullptr) return;
  const FloatSpan lse_span{lse, std::ptrdiff_t(q_len) * layout.q_heads, "lse"};
  for (const FloatSpan& other : {q_span, out_span, sinks_span}) require_disjoint(lse_span, other);
  for (const FloatSpan& input : kv) require_disjoint(lse_span, input);
}

inline AttendArgs<float> plain_args(const float* q, const float* k, const float* v, float* out, int q_len, int kv_len,
                                    HeadLayout layout, const AttentionOptions& options, float* lse) {
  layout.validate();
  check_lengths(q_len, kv_len);
  require_pointer(q, q_len, "q");
  require_pointer(out, q_len, "out");
  require_pointer(k, kv_len, "k");
  require_pointer(v, kv_len, "v");
  const FloatSpan k_span{k, std::ptrdiff_t(kv_len) * layout.kv_width(), "k"};
  require_outputs_disjoint(q, out, lse, q_len, layout, options, {k_span, FloatSpan{v, k_span.floats, "v"}});
  AttendArgs<float> args;
  set_dense_queries(args, layout, q, out);
  args.k = k;
  args.v = v;
  args.kv_token_stride = layout.kv_width();
  args.kv_head_stride = layout.head_dim;
  args.q_len = q_len;
  args.kv_len = kv_len;
  args.first_query_pos = std::ptrdiff_t(kv_len) - q_len;
  args.first_key_position = 0;
  args.segments[0] = KeySegment{0, kv_len, 0};
  args.segment_count = 1;
  args.lse = lse;
  resolve_options(args, options);
  return args;
}

/// The window a ring attends with: its own (options.window 0), or a narrower one the
/// caller asks for. A wider one would need keys the ring has already overwritten, so it
/// is an error rather than a silently narrower window.
template <class T>
int ring_window(const KvCache<T>& cache, const AttentionOptions& options) {
  if (options.window > cache.window())
    throw_invalid("window (", options.window, ") must not exceed the ring cache's window (", cache.window(),
                  "): the ring keeps only the keys of that window (0 attends with the ring's own)");
  return options.window > 0 ? options.window : cache.window();
}

/// Throws unless a ring whose oldest kept key is at first_key_position still holds every
/// key that q_len queries from first_query_pos on may see through `window`.
/// `name`: what the caller calls the query count.
template <class T>
void require_ring_keeps_window(const KvCache<T>& cache, const char* name, int q_len, std::ptrdiff_t first_query_pos,
                               std::ptrdiff_t first_key_position, int window) {
  const std::ptrdiff_t oldest_needed = std::max<std::ptrdiff_t>(0, first_query_pos - window + 1);
  if (q_len == 0 || oldest_needed >= first_key_position) return;
  const std::ptrdiff_t max_queries = std::ptrdiff_t(cache.capacity()) - window + 1;
  if (q_len > max_queries)
    throw_invalid(name, " (", q_len, ") is too many queries for a ring cache of capacity ", cache.capacity(),
                  " and window ", window, ": at most ", max_queries, " (make the ring with more max_queries)");
  // Few enough queries, yet the ring lacks keys: drop_last() removed newer tokens after
  // older ones had been overwritten; appends refill the window.
  throw_invalid("the ring cache no longer holds key position ", oldest_needed, " that ", name, " (", q_len,
                ") queries need through window ", window, ": its oldest key is position ", first_key_position,
                " (tokens dropped with drop_last() leave a gap until appends refill the window)");
}

/// For calls that append n_tokens to a ring and then attend with them as the queries
/// (Attention::forward): throws, before anything is appended, when that attend would.
template <class T>
void require_ring_can_attend_new(const KvCache<T>& cache, int n_tokens, const AttentionOptions& options) {
  if (!cache.is_ring() || n_tokens == 0) return;
  if (n_tokens > cache.capacity())
    throw_invalid("n_tokens (", n_tokens, ") must not exceed the ring cache's capacity (", cache.capacity(),
                  "): the queries sit at the last n_tokens cached positions");
  // The append keeps the newest `capacity` tokens: positions from
  // max(first_position, position + n_tokens - capacity) on.
  const std::ptrdiff_t position = std::ptrdiff_t(cache.position());
  const std::ptrdiff_t first_after =
      std::max<std::ptrdiff_t>(std::ptrdiff_t(cache.first_position()), position + n_tokens - cache.capacity());
  require_ring_keeps_window(cache, "n_tokens", n_tokens, position, first_after, ring_window(cache, options));
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
  // A cache's planes are its own allocation, so only the caller's arrays can overlap.
  require_outputs_disjoint(q, out, lse, q_len, layout, options, {});
  AttendArgs<T> args;
  set_dense_queries(args, layout, q, out);
  args.k = cache.keys();
  args.v = cache.values();
  args.kv_token_stride = cache.token_stride();
  args.kv_head_stride = cache.head_stride();
  args.k_scales = cache.key_scales();
  args.v_scales = cache.value_scales();
  args.scale_head_stride = cache.capacity();
  args.q_len = q_len;
  args.kv_len = cache.size();
  args.first_key_position = std::ptrdiff_t(cache.first_position());
  args.first_query_pos = std::ptrdiff_t(cache.position()) - q_len;
  args.lse = lse;
  resolve_options(args, options);
  if (!cache.is_ring()) {
    args.segments[0] = KeySegment{args.first_key_position, args.kv_len, args.first_key_position};
    args.segment_count = 1;
    return args;
  }
  // A ring attends with its window (or a narrower one the caller asks for), and every
  // key a query may see must still be in the ring.
  args.window = ring_window(cache, options);
  require_ring_keeps_window(cache, "q_len", q_len, args.first_query_pos, args.first_key_position, args.window);
  const std::ptrdiff_t capacity = cache.capacity();
  const std::ptrdiff_t first_slot = args.first_key_position % capacity;
  const std::ptrdiff_t before_wrap = std::min(args.kv_len, capacity - first_slot);
  args.segments[0] = KeySegment{args.first_key_position, before_wrap, first_slot};
  args.segments[1] = KeySegment{args.first_key_position + before_wrap, args.kv_len - before_wrap, 0};
  args.segment_count = before_wrap < args.kv_len ? 2 : 1;
  return args;
}

}  // namespace detail

/// Attention over plain memory with a named ISA (simd::scalar, simd::avx2, ...):
/// q [q_len][q_heads][head_dim]; k, v [kv_len][kv_heads][head_dim]; out like q;
/// lse (optional) [q_len][q_heads] receives each row's log-sum-exp.
template <class Isa, class = detail::IsaTag<Isa>>
void attend(const float* q, const float* k, const float* v, float* out, int q_len, int kv_len, HeadLayout layout,
            const AttentionOptions& options = {}, float* lse = nullptr) {
  detail::dispatch_fused<Isa>(detail::plain_args(q, k, v, out, q_len, kv_len, layout, options, lse));
}

/// Attention over plain memory that also returns each query row's log-sum-exp,
/// lse [q_len][q_heads] (-inf for a row that sees no key; includes sinks when given),
/// so partial results over disjoint keys can be combined with merge().
inline void attend(const float* q, const float* k, const float* v, float* out, int q_len, int kv_len,
                   HeadLayout layout, const AttentionOptions& options, float* lse) {
  attend<simd::default_isa>(q, k, v, out, q_len, kv_len, layout, options, lse);
}

/// Attention over plain memory (stable entry point):
/// q [q_len][q_heads][head_dim]; k, v [kv_len][kv_heads][head_dim]; out like q.
/// Query row i sits at position kv_len - q_len + i (bottom-right alignment).
/// out may be q itself (attention in place); out overlapping k, v, options.sinks or part
/// of q throws std::invalid_argument, as does an lse overlapping any other array.
inline void attend(const float* q, const float* k, const float* v, float* out, int q_len, int kv_len,
                   HeadLayout layout, const AttentionOptions& options = {}) {
  attend<simd::default_isa>(q, k, v, out, q_len, kv_len, layout, options);
}

/// Attention of q_len queries against a cache with a named ISA. The queries sit at the
/// last q_len cached positions. q, out: [q_len][q_heads][head_dim]; lse optional [q_len][q_heads].
template <class Isa, class T, class = detail::IsaTag<Isa>>
void attend(const float* q, int q_len, const KvCache<T>& cache, float* out, const AttentionOptions& options = {},
            float* lse = nullptr) {
  detail::dispatch_fused<Isa>(detail::cache_args(q, q_len, cache, out, options, lse));
}

/// Attention of q_len queries against a cache (stable entry point). The queries sit at
/// the last q_len cached positions. q, out: [q_len][q_heads][head_dim]; out may be q
/// itself, but not overlap part of it (std::invalid_argument).
template <class T>
void attend(const float* q, int q_len, const KvCache<T>& cache, float* out, const AttentionOptions& options = {}) {
  attend<simd::default_isa, T>(q, q_len, cache, out, options);
}

/// Cache attention that also returns lse [q_len][q_heads] (see the plain overload).
template <class T>
void attend(const float* q, int q_len, const KvCache<T>& cache, float* out, const AttentionOptions& options,
            float* lse) {
  attend<simd::default_isa, T>(q, q_len, cache, out, options, lse);
}

/// One sequence of a batched attend(): its queries, its cache, its output.
template <class T>
struct AttendItem {
  const float* q = nullptr;  // [q_len][q_heads][head_dim], at the cache's last q_len positions
  int q_len = 0;
  const KvCache<T>* cache = nullptr;
  float* out = nullptr;  // like q
  float* lse = nullptr;  // optional [q_len][q_heads]
};

namespace detail {

// Throws when one item's out or lse shares memory with another item's q, out or lse (each
// item's own arrays are checked by cache_args). One sweep over the arrays sorted by
// address, O(n log n) even when every item shares one q.
template <class T>
void require_items_disjoint(const AttendItem<T>* items, std::size_t count) {
  struct Entry {
    std::uintptr_t begin, end;
    std::size_t item;
    const char* name;
    bool written;
  };
  // Of the arrays swept so far, the one reaching furthest and the furthest-reaching one of
  // any other item: whatever item an array belongs to, one of the two is the furthest
  // reaching array of another item, the only one it needs to be compared with.
  struct Furthest {
    const Entry* best = nullptr;
    const Entry* other_item = nullptr;
    const Entry* from_other_than(std::size_t item) const { return best && best->item != item ? best : other_item; }
    void add(const Entry& e) {
      if (best == nullptr || e.end > best->end) {
        if (best != nullptr && best->item != e.item) other_item = best;
        best = &e;
      } else if (e.item != best->item && (other_item == nullptr || e.end > other_item->end)) {
        other_item = &e;
      }
    }
  };
  thread_local std::vector<Entry> entries;  // reused: no allocation per call
  entries.clear();
  const auto add = [](std::size_t item, const float* data, std::ptrdiff_t floats, const char* name, bool written) {
    if (data == nullptr || floats <= 0) return;
    const auto begin = reinterpret_cast<std::uintptr_t>(data);
    entries.push_back({begin, begin + std::uintptr_t(floats) * sizeof(float), item, name, written});
  };
  for (std::size_t i = 0; i < count; ++i) {
    const HeadLayout& layout = items[i].cache->layout();
    const std::ptrdiff_t rows = std::max(items[i].q_len, 0);
    add(i, items[i].q, rows * layout.q_width(), "q", false);
    add(i, items[i].out, rows * layout.q_width(), "out", true);
    add(i, items[i].lse, rows * layout.q_heads, "lse", true);
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.begin < b.begin; });
  Furthest any_array, written_array;
  for (const Entry& e : entries) {
    // A written array may meet no other item's array; a read-only one no other item's written one.
    const Entry* earlier = (e.written ? any_array : written_array).from_other_than(e.item);
    if (earlier != nullptr && earlier->end > e.begin) {
      const Entry& written = e.written ? e : *earlier;
      const Entry& other = e.written ? *earlier : e;
      throw_invalid("items[", written.item, "].", written.name, " overlaps items[", other.item, "].", other.name,
                    ": an item's out and lse must not share memory with another item's q, out or lse");
    }
    any_array.add(e);
    if (e.written) written_array.add(e);
  }
}

}  // namespace detail

/// Attends a batch of sequences, each against its own cache of its own length (ragged),
/// in one pass over the thread pool: work is split across the whole batch, so short
/// sequences do not leave cores idle. Every cache must share one layout.
template <class Isa, class T, class = detail::IsaTag<Isa>>
void attend(const AttendItem<T>* items, std::size_t count, const AttentionOptions& options = {}) {
  if (count > 0) detail::require_pointer(items, (long long)count, "items");
  thread_local std::vector<detail::AttendArgs<T>> batch;  // reused: no allocation per call
  batch.clear();
  for (std::size_t i = 0; i < count; ++i) {
    if (items[i].cache == nullptr) detail::throw_invalid("items[", i, "].cache is null (expected a cache)");
    if (i > 0 && items[i].cache->layout() != items[0].cache->layout())
      detail::throw_invalid("items[", i, "].cache has layout (", items[i].cache->layout().q_heads, ", ",
                            items[i].cache->layout().kv_heads, ", ", items[i].cache->layout().head_dim,
                            ") but items[0] has (", items[0].cache->layout().q_heads, ", ",
                            items[0].cache->layout().kv_heads, ", ", items[0].cache->layout().head_dim,
                            "): a batch shares one layout");
    batch.push_back(detail::cache_args(items[i].q, items[i].q_len, *items[i].cache, items[i].out, options, items[i].lse));
  }
  detail::require_items_disjoint(items, count);
  detail::dispatch_fused<Isa>(batch.data(), std::ptrdiff_t(batch.size()));
}

template <class T>
void attend(const AttendItem<T>* items, std::size_t count, const AttentionOptions& options = {}) {
  attend<simd::default_isa, T>(items, count, options);
}

template <class T>
void attend(const std::vector<AttendItem<T>>& items, const AttentionOptions& options = {}) {
  attend<simd::default_isa, T>(items.data(), items.size(), options);
}

/// Combines two partial attentions of the same q_len queries over disjoint key sets
/// (e.g. the two halves of a context, or shards on two machines), exactly:
/// out = (e^lse_a out_a + e^lse_b out_b) / (e^lse_a + e^lse_b) per row. out/lse may alias
/// the a or b arrays. out_*: [q_len][q_heads][head_dim]; lse_*: [q_len][q_heads].
/// Precision: an fp32 lse carries about 7 digits, so once |lse| nears 1e7 the parts'
/// relative weights e^(lse_a - lse_b) lose accuracy (at 1e8 the ulp is 8). attend()'s own
/// key splits do not go through fp32 lse and keep full accuracy there.
inline void merge(const float* out_a, const float* lse_a, const float* out_b, const float* lse_b, float* out,
                  float* lse, int q_len, HeadLayout layout) {
  layout.validate();
  if (q_len < 0) detail::throw_invalid("q_len (", q_len, ") must be >= 0");
  for (const auto& [pointer, name] : {std::pair<const void*, const char*>{out_a, "out_a"}, {lse_a, "lse_a"},
                                      {out_b, "out_b"}, {lse_b, "lse_b"}, {out, "out"}, {lse, "lse"}})
    detail::require_pointer(pointer, q_len, name);
  const std::ptrdiff_t rows = std::ptrdiff_t(q_len) * layout.q_heads;
  for (std::ptrdiff_t row = 0; row < rows; ++row) {
    const std::ptrdiff_t offset = row * layout.head_dim;
    lse[row] = detail::merge_partial(out_a + offset, lse_a[row], out_b + offset, lse_b[row], out + offset,
                                     layout.head_dim);
  }
}

}  // namespace kvheads
