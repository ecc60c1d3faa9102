#pragma once
// KvCache<T>: one cache type for every head configuration. Keys and values live in
// separate planes laid out [kv_heads][capacity][head_dim], so one KV head's keys are
// contiguous and decode streams them front to back.
//
// T is the storage type: float, bf16, fp16 (round-to-nearest-even on store) or
// std::int8_t (symmetric, one scale per token and KV head). Accumulation is always fp32.
// A cache is either linear (tokens fill slots 0..capacity-1, optionally growing) or a
// sliding-window ring (slot = position % capacity; old tokens are overwritten).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvheads/core/aligned_allocator.hpp"
#include "kvheads/core/check.hpp"
#include "kvheads/head_layout.hpp"
#include "kvheads/simd/simd.hpp"
#include "kvheads/storage_types.hpp"

namespace kvheads {

/// How a cache keeps its tokens (all off: a fixed-capacity linear cache).
struct CacheOptions {
  /// > 0: a ring that keeps only the newest tokens for sliding-window attention over
  /// `window` tokens; its capacity (>= window) also bounds how many queries one call may
  /// attend with (capacity - window + 1). Appends never fail for being full.
  int window = 0;
  /// Linear caches only: append past capacity grows the storage instead of throwing.
  bool growable = false;
};

namespace detail {

/// How one storage type stores a row of head_dim floats and reads it back.
template <class T>
struct KvStorage;

template <>
struct KvStorage<float> {
  static constexpr bool scaled = false;
  static void store(const float* src, float* dst, float*, int n) { std::copy_n(src, n, dst); }
  static float load(float x, float) { return x; }
};

template <>
struct KvStorage<bf16> {
  static constexpr bool scaled = false;
  // Finite magnitudes from here on round to inf (halfway past the largest bf16).
  static float overflow_from() { return bits_float(0x7F7F8000u); }
  static constexpr const char* largest_finite = "bf16's largest finite value (3.3895314e+38)";
  static constexpr const char* wider = "a float cache";
  static void store(const float* src, bf16* dst, float*, int n) {
    for (int i = 0; i < n; ++i) dst[i] = bf16::from_float(src[i]);
  }
  static float load(bf16 x, float) { return x.to_float(); }
};

template <>
struct KvStorage<fp16> {
  static constexpr bool scaled = false;
  // Finite magnitudes from here on round to inf (halfway past 65504).
  static float overflow_from() { return 65520.f; }
  static constexpr const char* largest_finite = "fp16's largest finite value (65504)";
  static constexpr const char* wider = "a float or bf16 cache";
  static void store(const float* src, fp16* dst, float*, int n) { simd::narrow<simd::default_isa>(src, dst, n); }
  static float load(fp16 x, float) { return x.to_float(); }
};

/// Symmetric int8: x ~ q * scale with scale = max|x| / 127 for the row (one token of one
/// KV head), q = round-to-nearest-even(x / scale) in [-127, 127]. int8 cannot hold a
/// non-finite value: a row holding one (NaN or +-inf) stores scale NaN and reads back as
/// all NaN, so a query that sees it gets NaN (a float cache keeps +-inf, which can give a
/// finite or infinite result instead).
template <>
struct KvStorage<std::int8_t> {
  static constexpr bool scaled = true;
  // Both loops are written so that the compiler vectorises them (g++ -O3 did neither
  // with std::isfinite, std::fmax and std::clamp: 2.7 ns per value, now 0.45; scratch
  // driver, rows of 128, results identical).
  static void store(const float* src, std::int8_t* dst, float* scale, int n) {
    // The largest |x| as bits: for non-negative floats the bits order as the values do,
    // and inf and NaN order above every finite value.
    std::uint32_t largest_bits = 0;
    for (int i = 0; i < n; ++i) largest_bits = std::max(largest_bits, float_bits(src[i]) & 0x7FFFFFFFu);
    if (largest_bits >= 0x7F800000u) {  // inf or NaN
      std::fill_n(dst, n, std::int8_t{0});
      *scale = std::numeric_limits<float>::quiet_NaN();
      return;
    }
    const float max = bits_float(largest_bits);
    *scale = max / 127.f;
    // In double: 127 / max overflows fp32 for a row below ~3.7e-37 (zeros would become
    // 0 * inf = NaN, and every other value would clamp to +-127).
    const double inverse = max > 0.f ? 127.0 / double(max) : 0.0;
    for (int i = 0; i < n; ++i) {
      double q = std::nearbyint(double(src[i]) * inverse);
      q = q < -127.0 ? -127.0 : q;
      q = q > 127.0 ? 127.0 : q;
      dst[i] = std::int8_t(int(q));
    }
  }
  static float load(std::int8_t x, float scale) { return float(x) * scale; }
};

}  // namespace detail

template <class T, int QHeads, int KvHeads, int HeadDim>
class Attention;  // attention.hpp: forward() undoes its append when a later step throws

/// Cache of the keys and values of the tokens seen so far, for one attention layer.
template <class T>
class KvCache {
 public:
  using Storage = T;

  /// A linear cache with room for `capacity` tokens of `layout.kv_heads` heads (throws
  /// std::invalid_argument on an invalid layout or capacity <= 0).
  KvCache(HeadLayout layout, int capacity) : KvCache(layout, capacity, CacheOptions{}) {}

  /// A cache with options: options.window > 0 makes a sliding-window ring of `capacity`
  /// slots (capacity >= window), options.growable a linear cache that grows on append.
  KvCache(HeadLayout layout, int capacity, CacheOptions options)
      : layout_(checked(layout, capacity, options)), options_(options) {
    // Asserted here rather than on the class so that overload resolution may name
    // KvCache<Other> without a hard error.
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, fp16> ||
                      std::is_same_v<T, std::int8_t>,
                  "KvCache stores float, bf16, fp16 or std::int8_t");
    allocate(capacity);
  }

  KvCache(const KvCache&) = default;
  /// Strong guarantee: if copying throws (std::bad_alloc), this cache is left as it was.
  KvCache& operator=(const KvCache& other) {
    // Copy, then swap in by the noexcept move: a member-wise copy would set capacity_ before
    // copying the planes, and a bad_alloc then would leave a capacity the planes do not have.
    if (this != &other) *this = KvCache(other);
    return *this;
  }
  /// A moved-from cache is left empty, linear and of capacity 0 (same layout): append
  /// throws std::length_error, attend sees no keys, reserve() or assigning makes it usable.
  KvCache(KvCache&& other) noexcept
      : layout_(other.layout_),
        options_(other.options_),
        capacity_(other.capacity_),
        size_(other.size_),
        position_(other.position_),
        keys_(std::move(other.keys_)),
        values_(std::move(other.values_)),
        key_scales_(std::move(other.key_scales_)),
        value_scales_(std::move(other.value_scales_)) {
    other.reset_to_empty();
  }
  KvCache& operator=(KvCache&& other) noexcept {
    if (this != &other) {
      layout_ = other.layout_;
      options_ = other.options_;
      capacity_ = other.capacity_;
      size_ = other.size_;
      position_ = other.position_;
      keys_ = std::move(other.keys_);
      values_ = std::move(other.values_);
      key_scales_ = std::move(other.key_scales_);
      value_scales_ = std::move(other.value_scales_);
      other.reset_to_empty();
    }
    return *this;
  }

  /// A ring for sliding-window attention over `window` tokens that can serve up to
  /// `max_queries` queries per call (capacity = window + max_queries - 1). attend() on it
  /// uses that window when options.window is 0, a narrower options.window as given, and
  /// throws std::invalid_argument for a wider one.
  static KvCache ring(HeadLayout layout, int window, int max_queries = 1) {
    if (max_queries <= 0) detail::throw_invalid("max_queries (", max_queries, ") must be positive");
    if (window <= 0) detail::throw_invalid("ring window (", window, ") must be positive");
    if (std::int64_t(window) + max_queries - 1 > std::numeric_limits<int>::max())
      detail::throw_invalid("ring window (", window, ") + max_queries (", max_queries, ") - 1 must be at most ",
                            std::numeric_limits<int>::max(), " tokens");
    CacheOptions options;
    options.window = window;
    return KvCache(layout, window + max_queries - 1, options);
  }

  /// Appends n_tokens tokens; k, v: [n_tokens][kv_heads][head_dim]. A linear cache that is
  /// not growable throws std::length_error when they do not fit, leaving the cache exactly
  /// as it was; a ring overwrites its oldest tokens. A bf16 or fp16 cache throws
  /// std::invalid_argument, cache unchanged, for a finite value that would round to inf
  /// (|x| >= 65520 in fp16); non-finite values are stored as they are, as in a float cache.
  void append(const float* k, const float* v, int n_tokens) {
    if (n_tokens < 0) detail::throw_invalid("n_tokens (", n_tokens, ") must be >= 0");
    detail::require_pointer(k, n_tokens, "k");
    detail::require_pointer(v, n_tokens, "v");
    // A ring only needs the newest `capacity` of the appended tokens.
    const int skip = is_ring() ? std::max(0, n_tokens - capacity_) : 0;
    require_storable(k, "k", skip, n_tokens);
    require_storable(v, "v", skip, n_tokens);
    // k and v may point into this cache's own planes (re-appending cached tokens): when
    // the cache grows, the old planes stay alive here until the new tokens are stored.
    std::optional<KvCache> old_planes;
    if (!is_ring() && n_tokens > capacity_ - size_) {
      constexpr std::int64_t max_tokens = std::numeric_limits<int>::max();
      const std::int64_t needed = std::int64_t(size_) + n_tokens;
      if (!options_.growable || needed > max_tokens)
        detail::throw_length("cannot append ", n_tokens, " tokens to a cache holding ", size_, " of ",
                             options_.growable ? max_tokens : std::int64_t(capacity_),
                             options_.growable ? " (a cache holds at most INT_MAX tokens)" : " (capacity exceeded)");
      old_planes.emplace(grown_copy(std::min(max_tokens, std::max(needed, 2 * std::int64_t(capacity_)))));
      std::swap(*this, *old_planes);
    }
    for (int t = skip; t < n_tokens; ++t) {
      const std::int64_t position = position_ + t;
      const int slot = is_ring() ? int(position % capacity_) : int(position);
      for (int h = 0; h < layout_.kv_heads; ++h) {
        const std::ptrdiff_t src = (std::ptrdiff_t(t) * layout_.kv_heads + h) * layout_.head_dim;
        const std::ptrdiff_t row = std::ptrdiff_t(h) * capacity_ + slot;
        detail::KvStorage<T>::store(k + src, keys_.data() + row * layout_.head_dim, scale_at(key_scales_, row),
                                    layout_.head_dim);
        detail::KvStorage<T>::store(v + src, values_.data() + row * layout_.head_dim, scale_at(value_scales_, row),
                                    layout_.head_dim);
      }
    }
    position_ += n_tokens;
    size_ = int(std::min<std::int64_t>(capacity_, std::int64_t(size_) + n_tokens));
  }

  /// Drops the newest `n_tokens` tokens (e.g. rejected speculative tokens); throws
  /// std::invalid_argument, cache unchanged, unless 0 <= n_tokens <= size().
  void drop_last(int n_tokens) {
    if (n_tokens < 0 || n_tokens > size_)
      detail::throw_invalid("cannot drop ", n_tokens, " tokens from a cache holding ", size_,
                            " (expected 0 <= n_tokens <= size)");
    size_ -= n_tokens;
    position_ -= n_tokens;
  }

  /// Keeps the oldest `new_size` of the cached tokens (drop_last(size() - new_size)).
  void truncate(int new_size) {
    if (new_size < 0 || new_size > size_)
      detail::throw_invalid("cannot truncate a cache holding ", size_, " tokens to ", new_size,
                            " (expected 0 <= new_size <= size)");
    drop_last(size_ - new_size);
  }

  /// Linear caches: makes room for at least `capacity` tokens, keeping every cached token
  /// (std::invalid_argument for a ring or a capacity below 0 or above INT_MAX).
  void reserve(std::int64_t capacity) {
    if (is_ring()) detail::throw_invalid("a ring cache (window ", options_.window, ") cannot be resized");
    if (capacity < 0) detail::throw_invalid("cache capacity (", capacity, ") must be >= 0");
    if (capacity > std::int64_t(std::numeric_limits<int>::max()))
      detail::throw_invalid("cache capacity (", capacity, ") must be at most ", std::numeric_limits<int>::max());
    if (capacity <= capacity_) return;
    *this = grown_copy(capacity);
  }

  /// Tokens currently cached.
  int size() const { return size_; }
  /// Tokens the cache can hold.
  int capacity() const { return capacity_; }
  /// Absolute position the next appended token gets (tokens appended since the last
  /// clear(), less those dropped); rotary embeddings and ALiBi use it.
  std::int64_t position() const { return position_; }
  /// Absolute position of the oldest cached token.
  std::int64_t first_position() const { return position_ - size_; }
  /// Bytes of K and V storage held (both planes and their scales, the whole capacity).
  std::size_t bytes() const {
    return (keys_.size() + values_.size()) * sizeof(T) + (key_scales_.size() + value_scales_.size()) * sizeof(float);
  }
  /// Bytes one cached token occupies: 2 * kv_heads * (head_dim * sizeof(T) + scale).
  std::size_t bytes_per_token() const {
    return 2 * std::size_t(layout_.kv_heads) *
           (std::size_t(layout_.head_dim) * sizeof(T) + (detail::KvStorage<T>::scaled ? sizeof(float) : 0));
  }
  /// Forgets every token (capacity and storage stay; positions restart at 0).
  void clear() {
    size_ = 0;
    position_ = 0;
  }
  const HeadLayout& layout() const { return layout_; }
  const CacheOptions& options() const { return options_; }
  bool is_ring() const { return options_.window > 0; }
  /// The ring's attention window (0 for a linear cache).
  int window() const { return options_.window; }

  /// Key plane [kv_heads][capacity][head_dim], 64-byte aligned (as is the value plane).
  const T* keys() const { return keys_.data(); }
  /// Value plane [kv_heads][capacity][head_dim].
  const T* values() const { return values_.data(); }
  /// int8 storage: per-row scales [kv_heads][capacity] (null for other types).
  const float* key_scales() const { return key_scales_.empty() ? nullptr : key_scales_.data(); }
  const float* value_scales() const { return value_scales_.empty() ? nullptr : value_scales_.data(); }
  /// Elements between consecutive slots of one head, and between heads.
  std::ptrdiff_t token_stride() const { return layout_.head_dim; }
  std::ptrdiff_t head_stride() const { return std::ptrdiff_t(capacity_) * layout_.head_dim; }
  /// Memory slot of the token at absolute `position` (which must be cached).
  int slot_of(std::int64_t position) const { return is_ring() ? int(position % capacity_) : int(position); }

  /// The cached token at `position` of `kv_head`, read back as floats (dequantised).
  void read_token(std::int64_t position, int kv_head, float* k, float* v) const {
    detail::require_pointer(k, 1, "k");
    detail::require_pointer(v, 1, "v");
    if (position < first_position() || position >= position_)
      detail::throw_invalid("position (", position, ") is not cached (cached: ", first_position(), " to ",
                            position_ - 1, ")");
    if (kv_head < 0 || kv_head >= layout_.kv_heads)
      detail::throw_invalid("kv_head (", kv_head, ") must be in [0, ", layout_.kv_heads, ")");
    const std::ptrdiff_t row = std::ptrdiff_t(kv_head) * capacity_ + slot_of(position);
    const float key_scale = key_scales_.empty() ? 1.f : key_scales_[std::size_t(row)];
    const float value_scale = value_scales_.empty() ? 1.f : value_scales_[std::size_t(row)];
    for (int d = 0; d < layout_.head_dim; ++d) {
      k[d] = detail::KvStorage<T>::load(keys_[std::size_t(row * layout_.head_dim + d)], key_scale);
      v[d] = detail::KvStorage<T>::load(values_[std::size_t(row * layout_.head_dim + d)], value_scale);
    }
  }

 private:
  template <class, int, int, int>
  friend class Attention;

  /// Throws when a finite value of tokens [first_token, n_tokens) of `data` would round to
  /// inf in T: stored, an inf key makes 0 * inf = NaN, so every query that sees the token
  /// would silently get NaN where a float cache gives a finite answer.
  void require_storable(const float* data, const char* name, int first_token, int n_tokens) const {
    if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, fp16>) {
      const std::ptrdiff_t width = layout_.kv_width();
      const std::ptrdiff_t begin = std::ptrdiff_t(first_token) * width, end = std::ptrdiff_t(n_tokens) * width;
      const float limit = detail::KvStorage<T>::overflow_from();
      // One vector pass; the offender is looked for only when there is one.
      if (simd::max_finite_magnitude<simd::default_isa>(data + begin, end - begin) < limit) return;
      constexpr float largest_float = std::numeric_limits<float>::max();
      const auto overflows = [&](float x) { return std::fabs(x) >= limit && std::fabs(x) <= largest_float; };
      std::ptrdiff_t i = begin;
      while (!overflows(data[i])) ++i;
      detail::throw_invalid(name, "[token ", i / width, "][kv head ", (i % width) / layout_.head_dim, "][dim ",
                            i % layout_.head_dim, "] (", data[i], ") is beyond ", detail::KvStorage<T>::largest_finite,
                            ": it would be stored as inf (use ", detail::KvStorage<T>::wider, ", or smaller values)");
    } else {
      (void)data, (void)name, (void)first_token, (void)n_tokens;
    }
  }

  /// What an append of n_tokens changes, saved beforehand so that undo_append() can put it
  /// back: size and position, and for a ring the rows its append overwrites (a linear cache
  /// writes only slots past its size, which hold no cached token).
  struct AppendUndo {
    int size = 0;
    std::int64_t position = 0;
    std::vector<std::ptrdiff_t> rows;  // [slots][kv_heads] row indices, as append() computes them
    std::vector<T> keys, values;       // [rows][head_dim]
    std::vector<float> key_scales, value_scales;
  };

  /// Saves what append(k, v, n_tokens) would change. Allocates; changes nothing.
  AppendUndo save_for_append(int n_tokens) const {
    AppendUndo undo;
    undo.size = size_;
    undo.position = position_;
    if (!is_ring() || n_tokens <= 0) return undo;
    const int skip = std::max(0, n_tokens - capacity_);
    const std::size_t row_count = std::size_t(n_tokens - skip) * std::size_t(layout_.kv_heads);
    const std::size_t dim = std::size_t(layout_.head_dim);
    undo.rows.reserve(row_count);
    undo.keys.resize(row_count * dim);
    undo.values.resize(row_count * dim);
    if (detail::KvStorage<T>::scaled) {
      undo.key_scales.resize(row_count);
      undo.value_scales.resize(row_count);
    }
    for (int t = skip; t < n_tokens; ++t) {
      const int slot = int((position_ + t) % capacity_);
      for (int h = 0; h < layout_.kv_heads; ++h) {
        const std::ptrdiff_t row = std::ptrdiff_t(h) * capacity_ + slot;
        const std::size_t i = undo.rows.size();
        undo.rows.push_back(row);
        std::copy_n(keys_.data() + row * layout_.head_dim, dim, undo.keys.data() + i * dim);
        std::copy_n(values_.data() + row * layout_.head_dim, dim, undo.values.data() + i * dim);
        if (detail::KvStorage<T>::scaled) {
          undo.key_scales[i] = key_scales_[std::size_t(row)];
          undo.value_scales[i] = value_scales_[std::size_t(row)];
        }
      }
    }
    return undo;
  }

  /// Puts back what save_for_append() saved, after that append. A growable cache that grew
  /// keeps its new capacity (with the same tokens).
  void undo_append(const AppendUndo& undo) noexcept {
    const std::size_t dim = std::size_t(layout_.head_dim);
    for (std::size_t i = 0; i < undo.rows.size(); ++i) {
      const std::ptrdiff_t row = undo.rows[i];
      std::copy_n(undo.keys.data() + i * dim, dim, keys_.data() + row * layout_.head_dim);
      std::copy_n(undo.values.data() + i * dim, dim, values_.data() + row * layout_.head_dim);
      if (detail::KvStorage<T>::scaled) {
        key_scales_[std::size_t(row)] = undo.key_scales[i];
        value_scales_[std::size_t(row)] = undo.value_scales[i];
      }
    }
    size_ = undo.size;
    position_ = undo.position;
  }

  static HeadLayout checked(HeadLayout layout, int capacity, const CacheOptions& options) {
    layout.validate();
    if (capacity <= 0) detail::throw_invalid("cache capacity (", capacity, ") must be positive");
    if (options.window < 0) detail::throw_invalid("cache window (", options.window, ") must be >= 0 (0 = linear)");
    if (options.window > capacity)
      detail::throw_invalid("cache window (", options.window, ") must not exceed its capacity (", capacity, ")");
    if (options.window > 0 && options.growable)
      detail::throw_invalid("a ring cache (window ", options.window, ") cannot be growable");
    // kv_heads * capacity * head_dim elements of T per plane: refused past 256 TiB, more
    // than any machine holds and far inside what size_t and ptrdiff_t address (also on
    // 32-bit targets), so no size below can wrap.
    constexpr std::uint64_t max_plane_bytes = std::min<std::uint64_t>(
        std::uint64_t(1) << 48, std::uint64_t(std::numeric_limits<std::ptrdiff_t>::max()) / 2);
    const std::uint64_t rows = std::uint64_t(layout.kv_heads) * std::uint64_t(capacity);
    if (rows > max_plane_bytes / (std::uint64_t(layout.head_dim) * sizeof(T)))
      detail::throw_invalid("cache capacity (", capacity, ") is too large: kv_heads (", layout.kv_heads,
                            ") x capacity x head_dim (", layout.head_dim, ") elements of ", sizeof(T),
                            " bytes exceed the ", max_plane_bytes, " bytes a plane may hold");
    return layout;
  }
  void allocate(int capacity) {
    capacity_ = capacity;
    const std::size_t rows = std::size_t(layout_.kv_heads) * std::size_t(capacity);
    keys_.assign(rows * std::size_t(layout_.head_dim), T{});
    values_.assign(rows * std::size_t(layout_.head_dim), T{});
    if (detail::KvStorage<T>::scaled) {
      key_scales_.assign(rows, 0.f);
      value_scales_.assign(rows, 0.f);
    }
  }
  void reset_to_empty() {
    options_ = CacheOptions{};
    capacity_ = 0;
    size_ = 0;
    position_ = 0;
    keys_.clear();
    values_.clear();
    key_scales_.clear();
    value_scales_.clear();
  }
  /// This cache's tokens in a new linear cache of `capacity` (> capacity_, <= INT_MAX).
  KvCache grown_copy(std::int64_t capacity) const {
    KvCache grown(layout_, int(capacity), options_);
    for (int h = 0; h < layout_.kv_heads; ++h) {
      const std::ptrdiff_t from = std::ptrdiff_t(h) * capacity_, to = std::ptrdiff_t(h) * grown.capacity_;
      std::copy_n(keys_.data() + from * layout_.head_dim, std::ptrdiff_t(size_) * layout_.head_dim,
                  grown.keys_.data() + to * layout_.head_dim);
      std::copy_n(values_.data() + from * layout_.head_dim, std::ptrdiff_t(size_) * layout_.head_dim,
                  grown.values_.data() + to * layout_.head_dim);
      if (detail::KvStorage<T>::scaled) {
        std::copy_n(key_scales_.data() + from, size_, grown.key_scales_.data() + to);
        std::copy_n(value_scales_.data() + from, size_, grown.value_scales_.data() + to);
      }
    }
    grown.size_ = size_;
    grown.position_ = position_;
    return grown;
  }
  static float* scale_at(std::vector<float>& scales, std::ptrdiff_t row) {
    return scales.empty() ? nullptr : scales.data() + row;
  }

  HeadLayout layout_;
  CacheOptions options_;
  int capacity_ = 0;
  int size_ = 0;
  std::int64_t position_ = 0;
  // Cache-line aligned: a row whose size is a multiple of 64 bytes spans whole lines.
  std::vector<T, detail::AlignedAllocator<T>> keys_;
  std::vector<T, detail::AlignedAllocator<T>> values_;
  std::vector<float> key_scales_;
  std::vector<float> value_scales_;
};

}  // namespace kvheads
