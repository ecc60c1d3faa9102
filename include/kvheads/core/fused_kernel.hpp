#pragma once
// The fused attention kernel, written once over the simd/ vector interface.
//
// Work is cut into tasks of (KV head, query tile, key split). A task owns "rows": the
// group_size query heads that share its KV head, times the queries of its tile. Keys are
// visited in blocks; for each block the kernel computes the rows' logits, applies the
// logit transforms and masks, updates an online softmax per row and accumulates P.V.
// Every K and V element of a block is therefore read once per group, not once per query
// head, and no q_len x kv_len matrix ever exists: a block's logits live in a
// [key_block][rows] scratch that stays in L1.
//
// With many rows (prefill, large groups) logits are stored key-major ([key][row]) so the
// softmax, masks and ALiBi are vertical vector operations over rows. With fewer rows than
// half a vector (decode with small groups) that would waste most lanes, so logits are
// stored row-major ([row][key]) and the same steps run along the keys instead. P.V
// follows the same split: with many rows it broadcasts one V element per (key, dim) into
// row vectors of probabilities (accumulators transposed, [dim][row]); with few rows one
// probability per (key, row) into vectors of V.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvheads/core/aligned_allocator.hpp"
#include "kvheads/core/logits.hpp"
#include "kvheads/core/parallel.hpp"
#include "kvheads/core/softmax.hpp"
#include "kvheads/head_layout.hpp"
#include "kvheads/kv_cache.hpp"
#include "kvheads/simd/register_hint.hpp"
#include "kvheads/simd/simd.hpp"
#include "kvheads/simd/widen.hpp"

namespace kvheads::detail {

/// Keys at absolute positions [first_position, first_position + count) stored in memory
/// slots [first_slot, first_slot + count). A plain buffer or a linear cache is one segment;
/// a ring cache that has wrapped is two.
struct KeySegment {
  std::ptrdiff_t first_position = 0;
  std::ptrdiff_t count = 0;
  std::ptrdiff_t first_slot = 0;
};

/// One attend() call with its options resolved. K/V element (kv_head h, slot s, i) lives at
/// k[s * kv_token_stride + h * kv_head_stride + i]. Keys occupy positions
/// [first_key_position, first_key_position + kv_len), laid out by `segments`.
template <class KvT>
struct AttendArgs {
  const float* q = nullptr;
  std::ptrdiff_t q_token_stride = 0, q_head_stride = 0;
  const KvT* k = nullptr;
  const KvT* v = nullptr;
  std::ptrdiff_t kv_token_stride = 0, kv_head_stride = 0;
  float* out = nullptr;
  std::ptrdiff_t out_token_stride = 0, out_head_stride = 0;
  float* lse = nullptr;  // optional [q_len][q_heads]
  std::ptrdiff_t q_len = 0, kv_len = 0;
  std::ptrdiff_t first_query_pos = 0;     // absolute position of query row 0
  std::ptrdiff_t first_key_position = 0;  // absolute position of the oldest key
  KeySegment segments[2] = {};
  int segment_count = 0;
  HeadLayout layout{};
  float scale = 1.f;
  float softcap = 0.f;
  bool causal = false;
  std::ptrdiff_t window = 0;
  const float* alibi_slopes = nullptr;  // [q_heads], or null when ALiBi is off
  const float* sinks = nullptr;         // [q_heads] sink logits, or null
  const float* k_scales = nullptr;      // int8 storage: [kv_heads][scale_head_stride] per-slot scales
  const float* v_scales = nullptr;
  std::ptrdiff_t scale_head_stride = 0;
  int threads = 0;
  ThreadPool* pool = nullptr;  // null: the global pool

  /// One past the newest key's position.
  std::ptrdiff_t key_end() const { return first_key_position + kv_len; }

  /// Whether query row `query` sees at least one key under the masks.
  bool sees_a_key(std::ptrdiff_t query) const {
    const KeyRange range = visible_keys(first_query_pos + query, key_end(), causal, window);
    return std::max(range.first, first_key_position) <= range.last;
  }
};

/// Adds a sink logit to a normalised row: the sink joins the softmax denominator
/// without a value, i.e. it is a partial result with max `sink`, sum 1 and output 0.
/// Returns the row's mass with the sink in.
/// `row` holds 0 * (its accumulators) when its keys had no weight (sum 0), so a visible
/// key of logit -inf with an inf or NaN value makes it NaN next to a finite sink, as in
/// the reference; a row with no weight anywhere (sink -inf too) is zeros, and so is a row
/// that sees no key (`sees_a_key` false) whatever the sink, even +inf, whose own weight
/// exp(inf - inf) is NaN: with no value to weigh, the contract's output is zeros.
inline SoftmaxMass add_sink(float* row, SoftmaxMass mass, float sink, int head_dim, bool sees_a_key) {
  const bool saw_keys = mass.sum != 0.f;
  const float max = saw_keys ? std::fmax(mass.max, sink) : sink;
  const float row_weight = saw_keys ? mass.sum * std::exp(mass.max - max) : 0.f;
  const float sink_weight = std::exp(sink - max);
  const float keep = row_weight / (row_weight + sink_weight);
  // A row whose weight underflowed next to the sink still multiplies, so a NaN in it
  // stays (as in the reference). Max -inf with a NaN sum is a NaN logit (the vector max
  // drops NaN), not a row without weight: it stays NaN too.
  const bool no_weight =
      !sees_a_key || (max == -std::numeric_limits<float>::infinity() && !std::isnan(mass.sum));
  for (int d = 0; d < head_dim; ++d) row[d] = no_weight ? 0.f : row[d] * keep;
  return {max, row_weight + sink_weight};
}

/// One request per 4 KiB page for a pass that reads rows in order from memory: the first
/// row on a new page requests the line `pages` pages further on. The hardware stream
/// prefetchers stop at each 4 KiB page edge and need a few misses on the next page to
/// start again; a line requested ahead starts them before the pass gets there. This is
/// one request per 8 rows of 128 floats; requesting every row ahead, or whole rows, cost
/// more in memory requests than it gained (see run_layout). Requests past the end of
/// the rows are harmless (a prefetch never faults), so the address is plain arithmetic.
/// Few-row decode of 16384 keys out of cache, Zen 5, scratch driver, alternating builds,
/// medians of 4-6 pairs: GQA-8 0.86x time on 1 thread (0.99x in a noisier series), 0.93x
/// on 2; MHA 0.82x / 0.79x; eight-row GQA 0.96x. In cache (1024 keys) 1.02x / 0.95x.
/// Widening reduced-precision rows (bench_cache_storage, 4 alternating runs, 16384
/// keys, 1 / 2 threads): bf16 MHA 0.92x / 0.90x, GQA-8 0.93x / 0.96x; int8 0.96-1.02x;
/// MQA 0.99-1.00x.
struct PageAhead {
  static constexpr std::uintptr_t page = 4096;
  std::uintptr_t stride = 0;  // bytes from row to row; 0: no requests
  std::uintptr_t distance = 0;

  /// Requests for rows `stride_bytes` apart, or none when each row is on its own page.
  static PageAhead rows(std::ptrdiff_t stride_bytes, int pages) {
    if (stride_bytes <= 0 || std::uintptr_t(stride_bytes) >= page) return {};
    return {std::uintptr_t(stride_bytes), std::uintptr_t(pages) * page};
  }
  void row(const void* row) const {
    if (stride == 0) return;
    // A row starting within `stride` bytes of its page's start is the page's first.
    const auto address = reinterpret_cast<std::uintptr_t>(row);
    if ((address & (page - 1)) < stride) simd::prefetch(reinterpret_cast<const void*>(address + distance));
  }
};

/// Widens `rows` stored rows of head_dim elements (times a per-row scale for int8) into
/// fp32 rows of dim_padded floats, zero-padded. Whole vectors convert in registers
/// through simd::widen; the tail goes element by element.
template <class Isa, class KvT, class HeadDim>
inline void widen_rows(const KvT* src, std::ptrdiff_t src_stride, int rows, HeadDim head_dim, const float* scales,
                       float* dst, int dim_padded, PageAhead pages = {}) {
  const int full = head_dim.get() / Isa::width * Isa::width;
  for (int r = 0; r < rows; ++r) {
    const KvT* in = src + r * src_stride;
    pages.row(in);
    float* out = dst + std::ptrdiff_t(r) * dim_padded;
    const float scale = scales ? scales[r] : 1.f;
    const typename Isa::vec scale_vec = Isa::broadcast(scale);
    for (int d = 0; d < full; d += Isa::width) {
      typename Isa::vec x = simd::widen<Isa>(in + d);
      if (scales) x = Isa::mul(x, scale_vec);
      Isa::store(out + d, x);
    }
    for (int d = full; d < dim_padded; ++d)
      out[d] = d < head_dim.get() ? KvStorage<KvT>::load(in[d], scales ? scale : 1.f) : 0.f;
  }
}

/// 0, 1, ..., N-1 as floats: the key offsets within a block, loaded as a vector.
template <int N>
struct KeyOffsets {
  float values[N];
  constexpr KeyOffsets() : values() {
    for (int i = 0; i < N; ++i) values[i] = float(i);
  }
};
template <int N>
inline constexpr KeyOffsets<N> key_offsets{};

/// A compile-time size, or a run-time one when the template argument is Dynamic.
template <int Static>
struct Size {
  constexpr explicit Size(int) {}
  static constexpr int get() { return Static; }
};
template <>
struct Size<Dynamic> {
  int value;
  constexpr explicit Size(int v) : value(v) {}
  constexpr int get() const { return value; }
};

/// Growable per-thread scratch: allocated on first use and reused by every later call on
/// that thread (the pool's workers are persistent), so the hot path allocates nothing.
/// Slots: 0 a task's working set, 1 key-split partial results, 2 head-major K/V copies.
/// A slot grows to exactly the size asked for, its old block freed first: its contents
/// are dead between calls, so neither copying them nor vector's doubling growth (which
/// kept up to twice the staging size and, while growing, old and new blocks at once) buys
/// anything.
inline float* thread_scratch(std::size_t floats, int slot) {
  thread_local std::vector<float, AlignedAllocator<float>> buffers[3];
  std::vector<float, AlignedAllocator<float>>& buffer = buffers[slot];
  if (buffer.size() < floats) {
    std::vector<float, AlignedAllocator<float>>().swap(buffer);
    buffer.resize(floats);
  }
  return buffer.data();
}

/// Register tiles of the micro-kernels. Each tile keeps its accumulators, one operand
/// vector set and a broadcast in registers; the shapes also keep the loads (operand
/// vectors + broadcasts) at or below about half the FMAs, since the load ports, not the
/// FMA units, limit these loops once operands are reloaded (measured on AVX-512: Q.K at
/// 2 row vectors x 4 keys reaches 30% of FMA peak, at 2 x 8 keys 90%).
template <class Isa>
struct Tiling {
  static constexpr int width = Isa::width;
  static constexpr bool many_registers = Isa::registers >= 32;
  /// Rows per task: four vectors' worth keeps the Q.K micro-kernel FMA-bound.
  static constexpr int target_rows = 4 * width < 16 ? 16 : 4 * width;
  /// Keys per block. Rows widened or padded into scratch (key_block, 64) stay in L1.
  /// fp32 rows read straight from memory take longer blocks: many-row tasks 128, whose
  /// by-rows micro-kernels touch only a few rows' lines at a time (against 64: MQA
  /// decode of 16384 keys -7% median, causal GQA-8 prefill of 2048 -4%, alternating
  /// runs); few-row (decode) tasks longer still: each phase of a block reads one K or V
  /// stream, and the longer that run, the less the switch between the two costs. 256
  /// keys against 64 took MHA decode at 16384 keys 27.3 -> 22.8 ms (side by side). With
  /// 16-float vectors, 1024 (512 KiB of K and of V per block at head_dim 128, within a
  /// 1 MiB L2 for the later P.V passes): on Zen 5, scratch driver pinned to one core,
  /// alternating builds, GQA-8 decode of 16384 keys 0.87-0.93x time against 256 (Q.K
  /// 34-38 -> 30-32 and P.V 34-37 -> 31-33 TSC cycles per key and KV head), MHA
  /// 0.83-0.92x, GQA-16 0.92-0.94x, 4096 keys 0.88-0.93x, in cache 0.95x; GQA-8 at
  /// head_dim 64 (32768 keys) 0.78-0.81x and at 256 (8192 keys, 1 MiB of V per block)
  /// 0.88-1.00x; 512 keys gained half as much and 2048 no more. The AVX2 build on the
  /// same core was 3-24% slower with 1024 (its passes request the next block ahead, so a
  /// block's rows take twice the L2), so narrower vectors keep 256; NEON is unmeasured
  /// and keeps it too.
  /// Many-row blocks hold whole Q.K tiles: 128 keys with 8-key tiles, 120 with 6-key ones.
  static constexpr int key_block = 64;
  static constexpr int key_block_many = many_registers ? 128 : 120;
  static constexpr int key_block_few = width >= 16 ? 1024 : 256;
  /// Q.K by rows: up to qk_row_vecs row vectors x qk_keys keys (2 x 8: 16 accumulators).
  /// With 16 registers, 2 x 6: 12 accumulators, the two query vectors and the broadcast
  /// key fill 15. Two FMA pipes of 5 cycles' latency (Zen 2) need 10 independent chains
  /// to stay busy, so the 8 of a 2 x 4 tile left a fifth of the peak unused. Zen 2, one
  /// core, 32 rows x 120 keys x head_dim 128 in L1, medians of 9 alternating rounds
  /// (scratch driver): 2 x 4 68.1, 2 x 6 83.9, 2 x 5 82.2, 3 x 4 (+ 1 x 4) 65.2 GFLOP/s,
  /// against an FMA peak of 87-92. Tails of a block take qk_keys_tail keys, then one.
  static constexpr int qk_row_vecs = 2;
  static constexpr int qk_keys = many_registers ? 8 : 6;
  static constexpr int qk_keys_tail = 4;
  /// Q.K by dims (few rows): up to dims_rows rows, one key at a time. The tile then reads
  /// each K row whole and in order, which the hardware prefetchers follow best. Keys read
  /// side by side (every line of each row in turn, 512 bytes apart) streamed K from DRAM
  /// at 7.6 GB/s against 11.4-11.9 on Zen 3 (AVX2, one core, where a plain sum reads
  /// 12-13; scratch probe, medians of 5), and on Zen 5 (AVX-512) four keys side by side
  /// took decode of 16384 keys 7-13% longer than one (scratch driver, alternating builds,
  /// medians of 8: GQA-8 7.70 / 3.74 ms against 7.16 / 3.26 on 1 / 2 threads, MHA 25.0 /
  /// 13.45 against 23.25 / 12.05).
  /// Every few-row task (at most half a vector of rows) is one tile, so one pass reads
  /// each K row once. With 16-float vectors that is up to 8 rows (group sizes 5-8, or
  /// group 4 with two queries): two 4-row tiles taking turns over 32-key tiles in L1 left
  /// the DRAM stream idle during the second tile's turn. Zen 5, scratch driver, decode
  /// from a KvCache, 4 KV heads, head_dim 128, 32768 keys, 1 thread, medians of 3
  /// alternating rounds, with dims_one_chain and dims_reduce_each below: group 8 6.20 ->
  /// 5.33 ms (0.86x; 2 threads 0.88x), group 7 0.84x, 6 0.78x, 5 0.81x; in cache (2048
  /// keys) 0.95-0.99x.
  static constexpr int dims_rows = width >= 8 ? width / 2 : 4;
  static_assert(2 * dims_rows >= width, "a few-row task is one Q.K tile");
  /// One accumulator chain per row from 5 rows on, not two: five or more rows' chains
  /// already hide the FMA latency, and the registers freed hold query vectors instead
  /// (8 rows at head_dim 128 on AVX-512: 2 per row, not 1). Group 8 decode from DRAM
  /// 5.26-5.37 against 5.28-5.45 ms with two chains, in cache 232-234 against 241-243 us;
  /// group 6 4.30-4.37 against 4.65-4.77 ms.
  static constexpr bool dims_one_chain(int rows) { return rows >= 5; }
  /// Reduce a key's row sums with one reduce_sum_each (padded to a vector of inputs)
  /// rather than one reduce_sum per row from 5 rows on: 7 rows, from DRAM 5.22-5.25
  /// against 5.99-6.05 ms, in cache 240-244 against 254-255 us.
  static constexpr bool dims_reduce_each(int rows) { return width > 1 && (2 * rows >= width || rows >= 5); }
  /// From 5 rows on, when two keys' rows fit one vector of sums (5-8 rows with 16-float
  /// vectors), Q.K takes two adjacent keys at a time: each query vector loaded feeds both
  /// keys (36 loads per key instead of 56 at 8 rows and head_dim 128) and one
  /// reduce_sum_each takes both keys' sums. Reading two K rows side by side slows the DRAM
  /// stream on Zen 5 (as for four rows, see dims_rows above), so the pass also requests
  /// its own rows dims_pair_ahead keys ahead, in order, which keeps the stream whole.
  /// Group 8 decode (4 KV heads, head_dim 128, 32768 keys), scratch driver, one pinned
  /// core, six alternating pairs: 5.33-5.67 -> 4.66-4.89 ms (0.87-0.90x); 2 threads
  /// 0.82-0.90x; without the requests 6.75-6.85 ms, with them 8 keys ahead 5.3-6.1.
  /// Groups of 4 (GQA-8) gained nothing from pairs in cache, so they keep one key at a time.
  /// Tried again on Zen 5 with the own-row requests (bench_attend built both ways, run in
  /// turn, medians of 4 rounds): 0.98x / 0.97x the time at 16384 keys on 1 / 2 threads,
  /// 0.94x / 0.94x at 4096, in cache 1.00x / 0.93x, with ranges that overlap the current
  /// build's (16384 keys, 1 thread: 4.07-4.31 against 4.07-4.88 ms): not kept.
  static constexpr bool dims_key_pairs(int rows) { return dims_one_chain(rows) && 2 * rows <= width; }
  static constexpr int dims_pair_ahead = 16;
  /// Tasks of exactly 4 rows on AVX-512 (GQA groups of 4, the one-key loop) also
  /// request their own K rows ahead, dims_own_ahead_bytes of rows (16 keys at head_dim
  /// 128): on their own the hardware prefetchers ran the stream well below a plain sum's
  /// speed while the arithmetic ran. GQA-8 decode (8 KV heads, head_dim 128) from DRAM,
  /// Zen 4, both builds in one process taking turns, medians of 11-15 rounds: 16384 keys
  /// 0.84-0.90x time on 1 thread, 0.85x on 2; 4096 keys 0.95x / 0.91x; head_dim 64 and 256
  /// (the same 8 KiB ahead) 0.99-1.00x. Fixed 16 keys at head_dim 64 was 1.18x; 8 keys 1.00x
  /// and 32 keys 0.98x at 128. Fewer rows lost: 3 rows 1.09x, 2 rows 1.15-1.19x, 1 row (MHA)
  /// 1.15x; so did V rows requested 16-64 keys ahead in P.V (1.00-1.07x on 1 thread). On
  /// Zen 5 16 KiB ahead lost to 8 (bench_attend built both ways, run in turn, medians of
  /// 4 rounds: 1.12x / 1.05x the time on 1 / 2 threads, in cache 1.00x / 0.96x).
  /// Only 16-float vectors (AVX-512), where it was measured: NEON (32 registers of 4
  /// floats) is unmeasured and keeps the hardware prefetchers alone.
  static constexpr bool dims_own_ahead(int rows) { return many_registers && width >= 16 && rows == 4; }
  static constexpr int dims_own_ahead_bytes = 8192;
  /// Query vectors per row the Q.K-by-dims kernel holds in registers for a whole pass over
  /// the keys (0 when head_dim is only known at run time), leaving registers for the two
  /// accumulator chains per row, the K vector and spares. Each query vector held is one
  /// load fewer per key and row; the loads, not the FMAs, bound this kernel, and on Zen 5
  /// they also slow the K stream from DRAM: GQA-8 decode of 16384 keys, 1 thread, scratch
  /// driver with per-phase counters, alternating builds: Q.K 20 -> 16 TSC cycles per key
  /// and KV head in cache, 39-41 -> 35-36 with the K/V from DRAM; the whole call 0.96-0.98x
  /// on 1 thread and 0.94x on 2 (medians of 5-8 pairs), 0.87-0.91x in cache; the AVX2
  /// build on the same core Q.K 40 -> 28 cycles, GQA-8 0.90x / 0.92x; MHA within noise.
  /// Five vectors per row (one fewer spare) was no faster in cache and slower from DRAM.
  static constexpr int dims_held_vecs(int rows, int dim_padded) {
    if (dim_padded == Dynamic) return 0;
    const int chains = dims_key_pairs(rows) ? 2 : dims_one_chain(rows) ? 1 : 2;  // per row
    const int spare = Isa::registers - chains * rows - 8;
    return std::max(0, std::min(dim_padded / width, spare / rows));
  }
  /// P.V by rows (many rows): the Q.K tile's shape, up to pv_row_vecs row vectors x
  /// pv_dims dimensions (2 x 8: 16 accumulators). Measured on AVX-512 with 32 rows and
  /// 64 keys in L1: 207 GFLOP/s against 202 for 4 rows x 4 vectors of head_dim, and with
  /// 128 keys (V past L1) 212 against 155.
  /// With 16 registers 2 x 6, for the reason given at qk_keys: Zen 2, 32 rows x 120 keys
  /// x head_dim 128 in L1, medians of 9 alternating rounds: 2 x 4 66.5, 2 x 6 81.5 (the
  /// last 2 dimensions in a 2 x 2 tile), 2 x 5 78.4, 3 x 4 + 1 x 8 77.1 GFLOP/s.
  static constexpr int pv_row_vecs = 2;
  static constexpr int pv_dims = many_registers ? 8 : 6;
  /// Tasks of one row vector (9-16 rows with 16-float vectors: GQA groups 9-16 in decode)
  /// take as many dimensions as that tile has accumulators: each V element broadcast
  /// then feeds one FMA, and 16 chains hide the FMA latency where 8 were just enough.
  /// Zen 5, scratch driver, group 16 (2 KV heads, head_dim 128), 1 thread, medians of 3
  /// alternating rounds: 65536 keys 7.31-7.50 -> 6.74-6.81 ms, in cache (4096 keys)
  /// 438 -> 419 us. 16 keys per Q.K tile on the same rows was slower (7.69 ms).
  /// With 16 registers, 12 (14 registers in all): Zen 2, 8 rows x 120 keys x head_dim 128
  /// in L1, medians of 9 rounds: 1 x 4 35.8, 1 x 8 60.7, 1 x 12 70.5 GFLOP/s.
  static constexpr int pv_dims_one_vec = many_registers ? 16 : 12;
  /// With 16 registers, blocks without masked keys whose rows pad to an even number of
  /// vectors (MQA and GQA groups of 16 or 32 in decode, prefill tiles of 32 rows; with the
  /// scalar ISA's one-float vectors, every even row count) take P.V over whole V rows instead
  /// (pv_by_keys): pv_keys_many keys x 2 row vectors of weights in registers (12
  /// accumulators' worth, as qk_keys) and the sums through L1, one load and store per
  /// row vector and dimension. The tiles above read a few dimensions of each of the
  /// block's V rows per pass, so V streamed from DRAM as many short runs the prefetchers
  /// follow badly, and the next-line requests that helped cost 25-38 cycles per key in
  /// cache. In decode the whole of a block's V is then requested during Q.K (see
  /// v_whole_during_qk) and the next block's K during P.V. Zen 2, AVX2, MQA decode from a
  /// KvCache (q_heads 32, head_dim 128), 1 thread, scratch copy with per-phase counters,
  /// TSC cycles per key: one block in L2, P.V 244-247 -> 217-218; 16384 keys from DRAM,
  /// Q.K 191 -> 215 and P.V 269-275 -> 230-231, the call 505-510 -> 490-492. Requests for
  /// V during P.V instead (the next tile's rows, or two tiles ahead) took P.V to 317-323.
  /// With 32 registers the tiles above stay: on the Intel Xeon (family 6 model 207,
  /// AVX-512), pv_by_keys with 8 keys x 2 row vectors took MQA decode (bench_attend, both
  /// builds run in turn, 3 rounds) 0.99-1.00x the time at 16384 keys on 1 thread,
  /// 1.00-1.03x on 2, 0.99-1.00x in cache: no gain for a second path. NEON is unmeasured.
  static constexpr bool pv_whole_rows_many = !many_registers;
  static constexpr int pv_keys_many = 6;
  /// P.V for few rows (decode): pv_rows_few rows x whole V rows of up to pv_chunks_few
  /// vectors, so each pass streams V sequentially, which the hardware prefetcher follows
  /// better than every other half row. pv_whole_rows_few: a row longer than the register
  /// tile is still read whole in one pass, the chunks past the tile accumulating in L1
  /// (load, fma, store). With 16 registers a 128-float row needs that: four passes of a
  /// quarter row each read V from DRAM at 7.1-7.4 GB/s, one pass with half the row in
  /// registers at 10.3-11.6 (Zen 3, AVX2, one core, plain sum 12-13; scratch probe).
  static constexpr int pv_rows_few = many_registers ? 2 : 1;
  static constexpr int pv_chunks_few = 8;
  static constexpr bool pv_whole_rows_few = !many_registers;
  /// P.V for four rows or more at a time (GQA decode, group size 4, 8 or 16), with 32
  /// registers: pv_rows_wide rows x pv_chunks_wide vectors (24 accumulators), each key's
  /// weights broadcast once and its V vectors loaded one at a time, then the rest of
  /// the row. That loads each V vector once per four rows instead of once per two
  /// (16 loads per key and four rows at head_dim 128, against 20), and leaves a second
  /// pass of a quarter row instead of a whole one. GQA-8 decode on Zen 5, bench_attend
  /// built both ways, alternating runs, medians of 4-6 pairs: in cache (1024 keys)
  /// 0.91-0.95x time on 1 thread and 0.91-0.96x on 2; 16384 keys out of cache 1.01-1.08x,
  /// within the runs' noise (unchanged MHA and MQA moved 0.95-1.02x). A scratch copy with
  /// per-phase counters: P.V 19 -> 15 TSC cycles per key and KV head in cache, 35 -> 33
  /// from DRAM. Two passes of 4 rows x half a row were slower from DRAM (see bench/PERFORMANCE_LOG.md).
  static constexpr int pv_rows_wide = 4;
  static constexpr int pv_chunks_wide = 6;
  /// Rows up to pv_chunks_wide + pv_memory_chunks_wide vectors long (head_dim 128 on
  /// AVX-512: 6 + 2) take one pass per tile of rows, not two: the last chunks of each row
  /// accumulate in L1 (load, fma, store per key and row; four rows' independent chains,
  /// hidden behind the 24 register FMAs of a key). The first tile's pass then does all of
  /// its rows' FMAs while V streams from DRAM, where the second pass of a quarter row
  /// read V from L2 with DRAM idle. GQA-8 decode (q_heads 32, head_dim 128, 16384 keys x
  /// 2 layers, KvCache), Zen 4, both builds in one process taking turns, 15 rounds, run
  /// in both slot orders to cancel the harness's slot bias (1.05-1.07 between identical
  /// builds): 0.94x time on 1 thread and 0.94x on 2; groups of 8 (two passes instead of
  /// four) and in cache (2048 keys) 0.96-0.97x by one order. On Zen 5, bench_attend built
  /// with 0 (two passes) and with 2, run in turn, medians of 4 rounds: two passes took
  /// 1.24x / 1.23x the time on 1 / 2 threads (1.09x / 1.17x with the K/V of two layers),
  /// in cache 0.99x.
  static constexpr int pv_memory_chunks_wide = 2;
  /// Keys per tile when several rows share those whole-row passes, now only in blocks with
  /// masked keys (see pv_rows_in_l1_max). GQA-8 decode of 16384 keys on Zen 3, 1 thread,
  /// scratch driver, six alternating pairs: 1-12% faster than one pass per row over the
  /// whole block, 12.2-15.7 against 12.8-17.9 ms.
  static constexpr int pv_key_tile_few = 32;
  /// When several rows share a key tile, only the first reads it in a whole-row pass (from
  /// memory, in order). The others read it from L1 in register tiles of up to
  /// pv_rows_rest rows x pv_chunks_rest(rows) vectors (16 registers at most), so none of
  /// their accumulators goes through L1 once per key: a chunk accumulated in L1 is a
  /// store-to-load-to-FMA chain per key, which bounds such a pass by its latency, not its
  /// FMAs. AVX2 build on Zen 5, GQA-8 decode (4 rows), 1 thread, scratch driver with
  /// per-phase counters, medians of 5-7 alternating rounds in three sessions: P.V 51-57 ->
  /// 35-39 TSC cycles per key and KV head in cache (the call 0.81-0.82x), 63-78 -> 50-65
  /// from DRAM (0.84-0.91x); GQA-16 (2 rows) 0.92x in cache, 0.99x from DRAM. Register
  /// tiles for every row, the first included, were faster in cache (0.78x) but 1.30x from
  /// DRAM: the first pass then reads a few lines of each row, not whole rows.
  /// Three rows take 4 vectors: 12 accumulators, as the many-row tiles (see qk_keys), where
  /// 3 x 3 left 9 chains and a 3 x 1 tile for the sixteenth vector at head_dim 128. Zen 2,
  /// 4 rows x 256 keys x head_dim 128 in L2, scratch driver, medians of 9 rounds: the
  /// block's P.V 54.5 -> 48.2-49.1 TSC cycles per key.
  static constexpr int pv_rows_rest = 3;
  static constexpr int pv_chunks_rest(int rows) { return rows >= 2 ? 4 : pv_chunks_few; }
  /// Unless the block has masked keys, 2 to pv_rows_in_l1_max rows take one pass over the
  /// block instead (pv_rows_in_l1): two keys per step, every row's sums in L1. The key
  /// tiles above read V from memory only during the first row's pass, and the hardware
  /// prefetchers, which run ahead of demand misses, left DRAM idle while the other rows
  /// worked from L1; software requests for the next tile during those passes were slower
  /// still (each holds a miss buffer the loads need). One pass keeps the stream running
  /// through the whole P.V, and its stores (one per row, vector and two keys) cost no more
  /// than the FMAs. Zen 2, AVX2, GQA-8 decode from a KvCache (q_heads 32, head_dim 128),
  /// 1 thread, scratch copy with per-phase counters, TSC cycles per key and KV head,
  /// alternating builds: 16384 keys P.V 110-137 -> 99-121, the call 0.85-1.03x (median of
  /// 12 pairs 0.94x); 1024 keys P.V 53-62 -> 48-49, call 0.84-0.94x; group 2 (16 KV heads)
  /// 0.88-1.08x from DRAM (noise), 0.89-0.98x in cache. bench_attend, alternating builds,
  /// 3 pairs: GQA-8 decode 0.95x / 0.94x time on 1 / 2 threads. One key per step (V rows
  /// strictly in order) read DRAM a little faster (P.V 89-102) but took 79 in cache,
  /// store-bound at twice the stores.
  static constexpr int pv_rows_in_l1_max = 4;
  /// Pages ahead of a few-row pass that PageAhead requests (see there).
  static constexpr int pages_ahead_few = 4;
  static_assert(key_block_many % qk_keys == 0, "whole tiles per full many-row block");
  static_assert(qk_keys_tail < qk_keys, "a tail tile is smaller than a whole one");
  static_assert(!pv_whole_rows_many || key_block_many % pv_keys_many == 0,
                "whole pv_by_keys tiles per full many-row block");
  static_assert(key_block % width == 0 && key_block_many % width == 0 && key_block_few % width == 0,
                "whole vectors of logits per block");
};

// ---------------------------------------------------------------------------------------
// Micro-kernels. Each computes a register tile; the driver walks tiles. K and V rows
// always hold whole vectors here (a head_dim that is not a multiple of the width is
// staged into zero-padded rows first), so no load in these loops is partial.

/// Rows to prefetch while a micro-kernel walks its keys: for key j < keys, the row at
/// first + j * stride (bytes), `lines` cache lines of it.
struct PrefetchRows {
  const char* first = nullptr;
  std::ptrdiff_t stride = 0;
  int keys = 0, lines = 0;

  void key(int j) const {
    if (j >= keys) return;
    for (int line = 0; line < lines; ++line) simd::prefetch(first + j * stride + line * 64);
  }
  /// The same requests for a pass starting at key first_key (none when it is past them).
  PrefetchRows from_key(int first_key) const {
    if (keys <= first_key) return {};
    return {first + first_key * stride, stride, keys - first_key, lines};
  }
  /// The i-th cache line of the rows, counted key-major.
  void line(int i) const {
    const int j = i / lines;
    if (j < keys) simd::prefetch(first + j * stride + (i - j * lines) * 64);
  }
};

/// Lines [first, first + count) of `rows` (counted as PrefetchRows::line counts them),
/// requested one at a time and evenly over a pass of `steps` steps rather than all at once
/// before it: a burst of requests fills the core's miss buffers and stalls the loads the
/// pass itself waits for.
class SpreadRequests {
 public:
  SpreadRequests(const PrefetchRows& rows, int first, int count, int steps)
      : rows_(rows), next_line_(first), end_line_(first + count), every_(count > 0 ? std::max(1, steps / count) : 0) {
    // More lines than steps (a short pass): the excess goes out at once, so none is left
    // out. (A loop in step() instead made MQA decode 7-8% slower: its micro-kernels call it.)
    while (end_line_ - next_line_ > steps) rows_.line(next_line_++);
  }
  /// Step `index` of the pass (0, 1, ... in turn).
  void step(int index) {
    if (index != next_step_ || next_line_ >= end_line_) return;
    rows_.line(next_line_++);
    next_step_ += every_;
  }

 private:
  PrefetchRows rows_;
  int next_line_, end_line_, every_, next_step_ = 0;
};

/// Q.K for many rows: logits[j][rows] += sum_d qt[d][rows] * k_j[d], vectorised over rows.
/// `qt` is the scaled queries transposed ([head_dim][rows_padded]); each K element is
/// broadcast once and feeds RowVecs x Keys FMAs.
/// spread: lines [spread_first, spread_first + spread_count) of other rows, requested
/// evenly over the pass (see SpreadRequests).
template <class Isa, int RowVecs, int Keys>
KVHEADS_NOINLINE void qk_by_rows(const float* qt, int rows_padded, const float* k, std::ptrdiff_t k_stride, int head_dim,
                                 float* logits, PrefetchRows spread = {}, int spread_first = 0, int spread_count = 0) {
  using V = typename Isa::vec;
  V acc[RowVecs][Keys];
  KVHEADS_UNROLL for (int r = 0; r < RowVecs; ++r)
    KVHEADS_UNROLL for (int j = 0; j < Keys; ++j) acc[r][j] = Isa::zero();
  SpreadRequests requests(spread, spread_first, spread_count, head_dim);
  for (int d = 0; d < head_dim; ++d) {
    requests.step(d);
    V q[RowVecs];
    KVHEADS_UNROLL for (int r = 0; r < RowVecs; ++r) {
      q[r] = Isa::load(qt + std::ptrdiff_t(d) * rows_padded + r * Isa::width);
      Isa::hold(q[r]);
    }
    KVHEADS_UNROLL for (int j = 0; j < Keys; ++j) {
      const V key = Isa::broadcast(k[j * k_stride + d]);
      KVHEADS_UNROLL for (int r = 0; r < RowVecs; ++r) acc[r][j] = Isa::fma(q[r], key, acc[r][j]);
    }
  }
  KVHEADS_UNROLL for (int j = 0; j < Keys; ++j)
    KVHEADS_UNROLL for (int r = 0; r < RowVecs; ++r) Isa::store(logits + j * rows_padded + r * Isa::width, acc[r][j]);
}

/// Q.K for few rows (fewer than half a vector): dot products vectorised over head_dim,
/// one key after another over `keys` keys. `q_rows` are scaled queries padded with zeros
/// to whole vectors ([rows][dim_padded]); logit (key j, row r) goes to
/// logits[r * row_stride + j]. The first Held vectors of each row's query stay in
/// registers for the whole pass (see Tiling::dims_held_vecs), the rest are loaded per key.
/// A key's Rows horizontal sums are done width at a time by reduce_sum_each when there
/// are enough of them (a fraction of reduce_sum's cost each, see
/// Tiling::dims_reduce_each), else one by one.
/// Keys go two at a time where Tiling::dims_key_pairs says so (the last one of an odd
/// count alone).
/// `ahead`: rows to request while the pass walks its keys (one key's rows per key);
/// `pages`: requests ahead of the K rows themselves; `own_rows`: the K rows themselves,
/// when read from memory, including rows past the pass's keys up to the segment's end
/// (requested dims_pair_ahead keys ahead by the two-key loop, and dims_own_ahead_bytes
/// ahead by the one-key loop where Tiling::dims_own_ahead says so).
template <class Isa, int Rows, int Held, class DimPadded>
KVHEADS_NOINLINE void qk_by_dims(const float* q_rows, DimPadded dim_padded, const float* k, std::ptrdiff_t k_stride,
                                 int keys, int row_stride, float* logits, PrefetchRows ahead, PageAhead pages,
                                 PrefetchRows own_rows) {
  using V = typename Isa::vec;
  constexpr int width = Isa::width;
  constexpr bool one_chain = Tiling<Isa>::dims_one_chain(Rows);
  const int dim_vecs = dim_padded.get() / width;
  V held[Rows][Held > 0 ? Held : 1];
  KVHEADS_UNROLL for (int r = 0; r < Rows; ++r)
    KVHEADS_UNROLL for (int c = 0; c < Held; ++c) {
      held[r][c] = Isa::load(q_rows + std::ptrdiff_t(r) * dim_padded.get() + c * width);
      Isa::hold(held[r][c]);
    }
  int j = 0;
  if constexpr (Tiling<Isa>::dims_key_pairs(Rows)) {
    constexpr int ahead_keys = Tiling<Isa>::dims_pair_ahead;
    const auto query_vec = [&](int r, int c) {
      // Not a run-time test alone: with Held 0, g++ -O1/-O2 warns that `held` may be read
      // uninitialised on a path it cannot rule out.
      if constexpr (Held > 0)
        if (c < Held) return held[r][c];
      V q = Isa::load(q_rows + std::ptrdiff_t(r) * dim_padded.get() + c * width);
      Isa::hold(q);
      return q;
    };
    for (; j + 2 <= keys; j += 2) {
      ahead.key(j);
      ahead.key(j + 1);
      own_rows.key(j + ahead_keys);
      own_rows.key(j + ahead_keys + 1);
      const float* first = k + j * k_stride;
      const float* second = first + k_stride;
      pages.row(first);
      pages.row(second);
      V first_sums[Rows], second_sums[Rows];
      KVHEADS_UNROLL for (int r = 0; r < Rows; ++r) first_sums[r] = second_sums[r] = Isa::zero();
      for (int c = 0; c < dim_vecs; ++c) {
        V first_vec = Isa::load(first + c * width), second_vec = Isa::load(second + c * width);
        Isa::hold(first_vec);
        Isa::hold(second_vec);
        KVHEADS_UNROLL for (int r = 0; r < Rows; ++r) {
          const V q = query_vec(r, c);
          first_sums[r] = Isa::fma(q, first_vec, first_sums[r]);
          second_sums[r] = Isa::fma(q, second_vec, second_sums[r]);
        }
      }
      // Both keys' sums in one reduction: the first key's in lanes [0, Rows), the second's
      // from half a vector on.
      constexpr int half = width / 2;
      V inputs[width];
      KVHEADS_UNROLL for (int i = 0; i < width; ++i)
        inputs[i] = i < Rows ? first_sums[i] : i >= half && i < half + Rows ? second_sums[i - half] : Isa::zero();
      float sums[width];
      Isa::store(sums, Isa::reduce_sum_each(inputs));
      KVHEADS_UNROLL for (int r = 0; r < Rows; ++r) {
        logits[std::ptrdiff_t(r) * row_stride + j] = sums[r];
        logits[std::ptrdiff_t(r) * row_stride + j + 1] = sums[half + r];
      }
    }
  }
  const int own_ahead = std::max(1, Tiling<Isa>::dims_own_ahead_bytes / int(dim_vecs * width * sizeof(float)));
  for (; j < keys; ++j) {
    ahead.key(j);
    if constexpr (Tiling<Isa>::dims_own_ahead(Rows)) own_rows.key(j + own_ahead);
    const float* key = k + j * k_stride;
    pages.row(key);
    // Two accumulator chains per row (even and odd vectors of head_dim), so a key's dot
    // products are not one FMA latency per vector long; one (`even`) when enough rows
    // hide that latency (see Tiling::dims_one_chain).
    V even[Rows], odd[Rows];
    KVHEADS_UNROLL for (int r = 0; r < Rows; ++r) even[r] = odd[r] = Isa::zero();
    KVHEADS_UNROLL for (int c = 0; c < Held; ++c) {
      V key_vec = Isa::load(key + c * width);
      Isa::hold(key_vec);  // one load per K vector, not one folded into each row's FMA
      KVHEADS_UNROLL for (int r = 0; r < Rows; ++r) {
        V& sum = c % 2 && !one_chain ? odd[r] : even[r];
        sum = Isa::fma(held[r][c], key_vec, sum);
      }
    }
    const auto step = [&](int c, V* sums) {
      V key_vec = Isa::load(key + c * width);
      Isa::hold(key_vec);
      KVHEADS_UNROLL for (int r = 0; r < Rows; ++r) {
        V q = Isa::load(q_rows + std::ptrdiff_t(r) * dim_padded.get() + c * width);
        Isa::hold(q);
        sums[r] = Isa::fma(q, key_vec, sums[r]);
      }
    };
    // Explicit pairs: a chain chosen by a run-time parity would keep the sums in memory.
    int c = Held;
    if constexpr (one_chain) {
      for (; c < dim_vecs; ++c) step(c, even);
    } else {
      for (; c + 2 <= dim_vecs; c += 2) {
        step(c, Held % 2 ? odd : even);
        step(c + 1, Held % 2 ? even : odd);
      }
      if (c < dim_vecs) step(c, Held % 2 ? odd : even);
      KVHEADS_UNROLL for (int r = 0; r < Rows; ++r) even[r] = Isa::add(even[r], odd[r]);
    }
    if constexpr (Tiling<Isa>::dims_reduce_each(Rows)) {
      static_assert(Rows <= width, "one reduce_sum_each per key");
      V padded[width];
      KVHEADS_UNROLL for (int i = 0; i < width; ++i) padded[i] = i < Rows ? even[i] : Isa::zero();
      float sum[width];
      Isa::store(sum, Isa::reduce_sum_each(padded));
      KVHEADS_UNROLL for (int r = 0; r < Rows; ++r) logits[std::ptrdiff_t(r) * row_stride + j] = sum[r];
    } else {
      KVHEADS_UNROLL for (int r = 0; r < Rows; ++r) logits[std::ptrdiff_t(r) * row_stride + j] = Isa::reduce_sum(even[r]);
    }
  }
}

/// The strides of the block's logits, p(j, r) = p[j * key + r * row].
struct LogitStrides {
  int key, row;
};

/// Keys [first, end) of a block.
struct KeySpan {
  int first, end;
};

/// P.V for many rows, vectorised over rows like qk_by_rows:
/// acc_t[d][rows_padded] += sum_j p[j][rows] * v_j[d] for RowVecs row vectors and Dims
/// dimensions. `p` is the block's probabilities, key-major ([key][rows_padded]), and
/// the accumulators are transposed ([dim_padded][rows_padded]); each V element is
/// broadcast once and feeds RowVecs FMAs, as each K element does in Q.K.
/// SkipMasked (blocks with masked keys): a masked key's weight is marked negative (see
/// mark_masked_keys); such lanes keep their accumulator, so a NaN or inf in a value a row
/// cannot see stays out of that row (0 * inf is NaN). A visible key's weight, even one
/// that underflowed to 0, is added like any other, as in the reference.
/// prefetch_rows: when given, the pass also prefetches prefetch_rows + j * v_stride for
/// every key j it walks (the next cache line of each V row, see the caller).
/// spread: lines [spread_first, spread_first + spread_count) of other rows (the next
/// block's K), requested evenly over the keys (see SpreadRequests).
template <class Isa, int RowVecs, int Dims, bool SkipMasked>
KVHEADS_NOINLINE void pv_by_rows(const float* p, int rows_padded, const float* v, std::ptrdiff_t v_stride, int keys,
                       float* acc_t, const float* prefetch_rows = nullptr, PrefetchRows spread = {}, int spread_first = 0,
                       int spread_count = 0) {
  using V = typename Isa::vec;
  V acc[Dims][RowVecs];
  KVHEADS_UNROLL for (int d = 0; d < Dims; ++d)
    KVHEADS_UNROLL for (int r = 0; r < RowVecs; ++r) acc[d][r] = Isa::load(acc_t + std::ptrdiff_t(d) * rows_padded + r * Isa::width);
  SpreadRequests requests(spread, spread_first, spread_count, keys);
  for (int j = 0; j < keys; ++j) {
    if (prefetch_rows) simd::prefetch(prefetch_rows + j * v_stride);
    requests.step(j);
    V weight[RowVecs];
    KVHEADS_UNROLL for (int r = 0; r < RowVecs; ++r) {
      weight[r] = Isa::load(p + std::ptrdiff_t(j) * rows_padded + r * Isa::width);
      Isa::hold(weight[r]);
    }
    KVHEADS_UNROLL for (int d = 0; d < Dims; ++d) {
      const V value = Isa::broadcast(v[j * v_stride + d]);
      KVHEADS_UNROLL for (int r = 0; r < RowVecs; ++r) {
        const V sum = Isa::fma(weight[r], value, acc[d][r]);
        acc[d][r] = SkipMasked ? Isa::select_less(weight[r], Isa::zero(), acc[d][r], sum) : sum;
      }
    }
  }
  KVHEADS_UNROLL for (int d = 0; d < Dims; ++d)
    KVHEADS_UNROLL for (int r = 0; r < RowVecs; ++r) Isa::store(acc_t + std::ptrdiff_t(d) * rows_padded + r * Isa::width, acc[d][r]);
}

/// P.V for many rows over whole V rows: acc_t[d][rows] += sum_j p[j][rows] * v_j[d] for
/// Keys keys and RowVecs row vectors, every d of head_dim. The Keys x RowVecs weights stay
/// in registers and the sums go through `acc_t` (L1) once per d: per d, RowVecs loads and
/// stores, Keys broadcasts of V and Keys x RowVecs FMAs, the mirror image of qk_by_rows.
/// So the pass reads its Keys V rows side by side, each whole and in order (as qk_by_rows
/// reads K), where pv_by_rows reads a few dimensions of every key of the block (see
/// Tiling::pv_keys_many). No masked keys (the caller takes pv_by_rows for those). Each sum
/// adds its keys in order, as pv_by_rows does, so the results are the same bits.
/// spread: lines [spread_first, spread_first + spread_count) of other rows, requested
/// evenly over the pass (see SpreadRequests).
template <class Isa, int RowVecs, int Keys>
KVHEADS_NOINLINE void pv_by_keys(const float* p, int rows_padded, const float* v, std::ptrdiff_t v_stride, int head_dim,
                                 float* acc_t, PrefetchRows spread = {}, int spread_first = 0, int spread_count = 0) {
  using V = typename Isa::vec;
  V weight[Keys][RowVecs];
  KVHEADS_UNROLL for (int j = 0; j < Keys; ++j)
    KVHEADS_UNROLL for (int r = 0; r < RowVecs; ++r) {
      weight[j][r] = Isa::load(p + std::ptrdiff_t(j) * rows_padded + r * Isa::width);
      Isa::hold(weight[j][r]);
    }
  SpreadRequests requests(spread, spread_first, spread_count, head_dim);
  for (int d = 0; d < head_dim; ++d) {
    requests.step(d);
    float* const out = acc_t + std::ptrdiff_t(d) * rows_padded;
    V sum[RowVecs];
    KVHEADS_UNROLL for (int r = 0; r < RowVecs; ++r) sum[r] = Isa::load(out + r * Isa::width);
    KVHEADS_UNROLL for (int j = 0; j < Keys; ++j) {
      const V value = Isa::broadcast(v[j * v_stride + d]);
      KVHEADS_UNROLL for (int r = 0; r < RowVecs; ++r) sum[r] = Isa::fma(weight[j][r], value, sum[r]);
    }
    KVHEADS_UNROLL for (int r = 0; r < RowVecs; ++r) Isa::store(out + r * Isa::width, sum[r]);
  }
}

/// The V rows of keys j and j + 1 for a two-key step, after issuing the step's requests
/// (`ahead` for both keys, `pages` for both rows).
struct KeyPairRows {
  const float* first;
  const float* second;
};
inline KeyPairRows key_pair_rows(const float* v, std::ptrdiff_t v_stride, int j, const PrefetchRows& ahead,
                                 const PageAhead& pages) {
  ahead.key(j);
  ahead.key(j + 1);
  const float* const first = v + j * v_stride;
  const float* const second = first + v_stride;
  pages.row(first);
  pages.row(second);
  return {first, second};
}

/// P.V: out[r][chunk c0..c0+Chunks) += sum_j p(j, r) * v_j[...], for Rows rows.
/// SkipMasked (blocks with masked keys): a masked key's weight is marked negative (see
/// mark_masked_keys); skipping it keeps a NaN or inf in a value the row cannot see out of
/// that row (0 * NaN is NaN), while a visible key whose weight underflowed to 0 still
/// counts (its 0 * NaN is NaN, as in the reference).
/// memory_chunks: chunks after those, accumulated straight in `out` within the same pass,
/// so the pass reads each V row whole (see Tiling::pv_whole_rows_few and
/// pv_memory_chunks_wide); Rows must be 1, or above 2 without SkipMasked.
/// Strides may be negative: a pass may walk the keys backwards (see pv_block).
template <class Isa, int Rows, int Chunks, bool SkipMasked>
inline void pv_tile(const float* p, LogitStrides strides, const float* v, std::ptrdiff_t v_stride, int keys,
                    int first_chunk, float* out, int dim_padded, PrefetchRows ahead, PageAhead pages = {},
                    int memory_chunks = 0) {
  using V = typename Isa::vec;
  V acc[Rows][Chunks];
  float* const out_first = out + first_chunk * Isa::width;
  const float* const v_first = v + first_chunk * Isa::width;
  KVHEADS_UNROLL for (int r = 0; r < Rows; ++r)
    KVHEADS_UNROLL for (int c = 0; c < Chunks; ++c) acc[r][c] = Isa::load(out_first + std::ptrdiff_t(r) * dim_padded + c * Isa::width);
  int j = 0;
  if constexpr (Rows == 1 && !SkipMasked) {
    // One row reading whole V rows with chunks accumulated in L1: two keys per step, so
    // each such chunk is one load, two FMAs and one store per two keys. One key per step
    // made each chunk a store-to-load-to-FMA chain per key, which bounded the pass by
    // its latency. Zen 2, AVX2, head_dim 128 (8 chunks in registers, 8 in L1), 256 keys
    // in L2, scratch driver, medians of 9 rounds, TSC cycles per key: one row 28.3 ->
    // 16.7, the P.V of 4 rows (this pass, then the others' register tiles) 48.8 -> 38.1.
    // The sums keep their order (key j, then j + 1), so results are bit-identical.
    for (; memory_chunks > 0 && j + 2 <= keys; j += 2) {
      const auto [first, second] = key_pair_rows(v_first, v_stride, j, ahead, pages);
      const V first_weight = Isa::broadcast(p[std::ptrdiff_t(j) * strides.key]);
      const V second_weight = Isa::broadcast(p[std::ptrdiff_t(j + 1) * strides.key]);
      KVHEADS_UNROLL for (int c = 0; c < Chunks; ++c) acc[0][c] = Isa::fma(first_weight, Isa::load(first + c * Isa::width), acc[0][c]);
      KVHEADS_UNROLL for (int c = 0; c < Chunks; ++c) acc[0][c] = Isa::fma(second_weight, Isa::load(second + c * Isa::width), acc[0][c]);
      for (int c = Chunks; c < Chunks + memory_chunks; ++c) {
        float* const o = out_first + c * Isa::width;
        const V sum = Isa::fma(first_weight, Isa::load(first + c * Isa::width), Isa::load(o));
        Isa::store(o, Isa::fma(second_weight, Isa::load(second + c * Isa::width), sum));
      }
    }
  }
  for (; j < keys; ++j) {
    ahead.key(j);
    pages.row(v_first + j * v_stride);
    if constexpr (Rows > 2 && !SkipMasked) {
      // Weights held, V one vector at a time: Rows x Chunks accumulators plus Rows + 1.
      V weight[Rows];
      KVHEADS_UNROLL for (int r = 0; r < Rows; ++r)
        weight[r] = Isa::broadcast(p[std::ptrdiff_t(j) * strides.key + std::ptrdiff_t(r) * strides.row]);
      KVHEADS_UNROLL for (int c = 0; c < Chunks; ++c) {
        V value = Isa::load(v_first + j * v_stride + c * Isa::width);
        Isa::hold(value);
        KVHEADS_UNROLL for (int r = 0; r < Rows; ++r) acc[r][c] = Isa::fma(weight[r], value, acc[r][c]);
      }
      for (int c = Chunks; c < Chunks + memory_chunks; ++c) {
        V value = Isa::load(v_first + j * v_stride + c * Isa::width);
        Isa::hold(value);
        KVHEADS_UNROLL for (int r = 0; r < Rows; ++r) {
          float* const o = out_first + std::ptrdiff_t(r) * dim_padded + c * Isa::width;
          Isa::store(o, Isa::fma(weight[r], value, Isa::load(o)));
        }
      }
      continue;
    }
    V value[Chunks];
    KVHEADS_UNROLL for (int c = 0; c < Chunks; ++c) {
      value[c] = Isa::load(v_first + j * v_stride + c * Isa::width);
      if constexpr (Rows > 1) Isa::hold(value[c]);  // one row: each load feeds one FMA, fold it in
    }
    KVHEADS_UNROLL for (int r = 0; r < Rows; ++r) {
      const float w = p[std::ptrdiff_t(j) * strides.key + std::ptrdiff_t(r) * strides.row];
      if (SkipMasked && w < 0.f) continue;
      const V weight = Isa::broadcast(w);
      KVHEADS_UNROLL for (int c = 0; c < Chunks; ++c) acc[r][c] = Isa::fma(weight, value[c], acc[r][c]);
      for (int c = Chunks; c < Chunks + memory_chunks; ++c) {
        float* const o = out_first + c * Isa::width;
        Isa::store(o, Isa::fma(weight, Isa::load(v_first + j * v_stride + c * Isa::width), Isa::load(o)));
      }
    }
  }
  KVHEADS_UNROLL for (int r = 0; r < Rows; ++r)
    KVHEADS_UNROLL for (int c = 0; c < Chunks; ++c) Isa::store(out_first + std::ptrdiff_t(r) * dim_padded + c * Isa::width, acc[r][c]);
}

/// P.V of Rows rows in one pass over the keys, reading each V row whole and in order, two
/// keys per step, with every row's sums in `out` (L1) rather than registers: per vector
/// of a row, one load, two FMAs and one store per two keys (see Tiling::pv_rows_in_l1_max).
/// No masked keys (the caller takes another path for those). Each sum adds its keys in
/// order, as the register tiles do, so the results are the same bits.
template <class Isa, int Rows>
inline void pv_rows_in_l1(const float* p, LogitStrides strides, const float* v, std::ptrdiff_t v_stride, int keys,
                          float* out, int dim_padded, PrefetchRows ahead, PageAhead pages) {
  using V = typename Isa::vec;
  const int chunks = dim_padded / Isa::width;
  const auto weight = [&](int key, int r) {
    return Isa::broadcast(p[std::ptrdiff_t(key) * strides.key + std::ptrdiff_t(r) * strides.row]);
  };
  int j = 0;
  for (; j + 2 <= keys; j += 2) {
    const auto [first, second] = key_pair_rows(v, v_stride, j, ahead, pages);
    V first_weight[Rows], second_weight[Rows];
    KVHEADS_UNROLL for (int r = 0; r < Rows; ++r) {
      first_weight[r] = weight(j, r);
      second_weight[r] = weight(j + 1, r);
    }
    for (int c = 0; c < chunks; ++c) {
      V first_value = Isa::load(first + c * Isa::width), second_value = Isa::load(second + c * Isa::width);
      Isa::hold(first_value);
      Isa::hold(second_value);
      KVHEADS_UNROLL for (int r = 0; r < Rows; ++r) {
        float* const o = out + std::ptrdiff_t(r) * dim_padded + c * Isa::width;
        Isa::store(o, Isa::fma(second_weight[r], second_value, Isa::fma(first_weight[r], first_value, Isa::load(o))));
      }
    }
  }
  if (j < keys) {  // an odd count's last key
    ahead.key(j);
    const float* const row = v + j * v_stride;
    pages.row(row);
    V row_weight[Rows];
    KVHEADS_UNROLL for (int r = 0; r < Rows; ++r) row_weight[r] = weight(j, r);
    for (int c = 0; c < chunks; ++c) {
      V value = Isa::load(row + c * Isa::width);
      Isa::hold(value);
      KVHEADS_UNROLL for (int r = 0; r < Rows; ++r) {
        float* const o = out + std::ptrdiff_t(r) * dim_padded + c * Isa::width;
        Isa::store(o, Isa::fma(row_weight[r], value, Isa::load(o)));
      }
    }
  }
}

// Run-time tile remainders to the compile-time micro-kernels: a tile's size N is
// dispatched as Max, Max - 1, ..., 1 (an out-of-range N never occurs: callers pass
// min(Max, remaining)).
template <int Max, class F>
inline void with_tile_size(int n, F&& f) {
  if constexpr (Max <= 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    if (n >= Max) return f(std::integral_constant<int, Max>{});
    with_tile_size<Max - 1>(n, std::forward<F>(f));
  }
}

/// One pass of a Rows x Chunks tile over the keys, backwards when `backwards` (see
/// pv_block); only a forward pass issues the `ahead` and `pages` requests.
template <class Isa, int Rows, int Chunks, bool SkipMasked>
inline void pv_pass(bool backwards, const float* p, LogitStrides strides, const float* v, std::ptrdiff_t v_stride,
                    int keys, int first_chunk, float* acc, int dim_padded, PrefetchRows ahead, PageAhead pages) {
  if (backwards && keys > 1) {
    const std::ptrdiff_t last = keys - 1;
    pv_tile<Isa, Rows, Chunks, SkipMasked>(p + last * strides.key, LogitStrides{-strides.key, strides.row},
                                           v + last * v_stride, -v_stride, keys, first_chunk, acc, dim_padded,
                                           PrefetchRows{});
  } else {
    pv_tile<Isa, Rows, Chunks, SkipMasked>(p, strides, v, v_stride, keys, first_chunk, acc, dim_padded, ahead, pages);
  }
}

/// P.V of rows [0, rows), a multiple of Tiling::pv_rows_wide, in wide tiles (see there);
/// passes alternate directions as in pv_block.
template <class Isa, bool SkipMasked>
inline void pv_block_wide(int rows, const float* p, LogitStrides strides, const float* v, std::ptrdiff_t v_stride,
                          int keys, float* acc, int dim_padded, PrefetchRows ahead, PageAhead pages) {
  constexpr int tile_rows = Tiling<Isa>::pv_rows_wide, max_chunks = Tiling<Isa>::pv_chunks_wide;
  const int chunks = dim_padded / Isa::width;
  int pass = 0;
  if (!SkipMasked && chunks > max_chunks && chunks <= max_chunks + Tiling<Isa>::pv_memory_chunks_wide) {
    // One pass per tile of rows over whole V rows, the chunks past the registers in L1.
    for (int r = 0; r < rows; r += tile_rows, ++pass) {
      const float* const tile_p = p + std::ptrdiff_t(r) * strides.row;
      float* const tile_acc = acc + std::ptrdiff_t(r) * dim_padded;
      if (pass % 2 == 1 && keys > 1) {
        const std::ptrdiff_t last = keys - 1;
        pv_tile<Isa, tile_rows, max_chunks, SkipMasked>(tile_p + last * strides.key, LogitStrides{-strides.key, strides.row},
                                                        v + last * v_stride, -v_stride, keys, 0, tile_acc, dim_padded,
                                                        PrefetchRows{}, PageAhead{}, chunks - max_chunks);
      } else {
        pv_tile<Isa, tile_rows, max_chunks, SkipMasked>(tile_p, strides, v, v_stride, keys, 0, tile_acc, dim_padded,
                                                        pass == 0 ? ahead : PrefetchRows{}, pass == 0 ? pages : PageAhead{},
                                                        chunks - max_chunks);
      }
    }
    return;
  }
  for (int r = 0; r < rows; r += tile_rows)
    for (int c = 0; c < chunks; c += max_chunks, ++pass)
      with_tile_size<max_chunks>(chunks - c, [&](auto tile_chunks) {
        pv_pass<Isa, tile_rows, tile_chunks.value, SkipMasked>(
            pass % 2 == 1, p + std::ptrdiff_t(r) * strides.row, strides, v, v_stride, keys, c,
            acc + std::ptrdiff_t(r) * dim_padded, dim_padded, pass == 0 ? ahead : PrefetchRows{},
            pass == 0 ? pages : PageAhead{});
      });
}

/// P.V of rows [0, rows) over all chunks of head_dim, in register tiles of up to
/// MaxRows x MaxChunks; the first tile's pass over the keys issues the `ahead` and
/// `pages` requests.
template <class Isa, int MaxRows, int MaxChunks, bool SkipMasked>
inline void pv_block(int rows, const float* p, LogitStrides strides, const float* v, std::ptrdiff_t v_stride, int keys,
                     float* acc, int dim_padded, PrefetchRows ahead = {}, PageAhead pages = {}) {
  constexpr int max_rows = MaxRows, max_chunks = MaxChunks;
  const int chunks = dim_padded / Isa::width;
  if constexpr (Tiling<Isa>::pv_whole_rows_few && max_rows == 1) {
    if (chunks > max_chunks && !SkipMasked && rows >= 2 && rows <= Tiling<Isa>::pv_rows_in_l1_max) {
      return with_tile_size<Tiling<Isa>::pv_rows_in_l1_max>(rows, [&](auto rows_now) {
        pv_rows_in_l1<Isa, rows_now.value>(p, strides, v, v_stride, keys, acc, dim_padded, ahead, pages);
      });
    }
    if (chunks > max_chunks) {
      // Several rows of a block with masked keys (see Tiling::pv_rows_in_l1_max for the
      // others) walk it in tiles of pv_key_tile_few keys, so the first row
      // reads a tile from memory and the others from L1 (in register tiles, see
      // Tiling::pv_rows_rest), and the DRAM stream runs through the whole P.V rather than
      // during one row's pass of four.
      const int key_tile = rows > 1 ? Tiling<Isa>::pv_key_tile_few : keys;
      constexpr int rest_rows = Tiling<Isa>::pv_rows_rest;
      for (int first_key = 0; first_key < keys; first_key += key_tile) {
        const int tile_keys = std::min(key_tile, keys - first_key);
        const float* const tile_p = p + std::ptrdiff_t(first_key) * strides.key;
        const float* const tile_v = v + first_key * v_stride;
        pv_tile<Isa, 1, max_chunks, SkipMasked>(tile_p, strides, tile_v, v_stride, tile_keys, 0, acc, dim_padded,
                                                ahead.from_key(first_key), pages, chunks - max_chunks);
        for (int r = 1; r < rows; r += rest_rows)
          with_tile_size<rest_rows>(rows - r, [&](auto tile_rows) {
            constexpr int tile_chunks = Tiling<Isa>::pv_chunks_rest(tile_rows.value);
            for (int c = 0; c < chunks; c += tile_chunks)
              with_tile_size<tile_chunks>(chunks - c, [&](auto chunks_now) {
                pv_tile<Isa, tile_rows.value, chunks_now.value, SkipMasked>(
                    tile_p + std::ptrdiff_t(r) * strides.row, strides, tile_v, v_stride, tile_keys, c,
                    acc + std::ptrdiff_t(r) * dim_padded, dim_padded, PrefetchRows{});
              });
          });
      }
      return;
    }
  }
  if constexpr (Tiling<Isa>::many_registers) {
    if (rows % Tiling<Isa>::pv_rows_wide == 0)
      return pv_block_wide<Isa, SkipMasked>(rows, p, strides, v, v_stride, keys, acc, dim_padded, ahead, pages);
  }
  // Row tiles take turns walking the keys forwards and backwards, so each pass starts on
  // the V rows the previous one just left in L1 (a block of them is past L1). GQA-8 decode
  // of 16384 keys on Zen 5, 1 thread, scratch driver: the P.V phase took 32.4 TSC cycles
  // per key and KV head against 36.5 forwards only (medians of 6 alternating runs, lower
  // in all 6; the Q.K phase 34.5 both), the whole call 4.52 against 4.76 ms (medians of 8);
  // in bench_attend, alternating builds, medians of 4: with the K/V out of cache
  // (/layers:2) 6.41 -> 5.91 ms on 1 thread and 3.06 -> 2.89 on 2, warm within noise.
  // The two directions are separate calls so each keeps its key stride a compile-time
  // constant (one call with a run-time stride gained nothing).
  for (int r = 0; r < rows; r += max_rows)
    for (int c = 0; c < chunks; c += max_chunks)
      with_tile_size<max_rows>(rows - r, [&](auto tile_rows) {
        with_tile_size<max_chunks>(chunks - c, [&](auto tile_chunks) {
          const bool first = r == 0 && c == 0;
          pv_pass<Isa, tile_rows.value, tile_chunks.value, SkipMasked>(
              (r / max_rows) % 2 == 1, p + std::ptrdiff_t(r) * strides.row, strides, v, v_stride, keys, c,
              acc + std::ptrdiff_t(r) * dim_padded, dim_padded, first ? ahead : PrefetchRows{},
              first ? pages : PageAhead{});
        });
      });
}

/// Keys per split when a plain-memory decode reads its KV heads chunk by chunk (see
/// reads_heads_in_chunks): one few-row key block. GQA-8 decode of 16384 keys on Zen 5, 1
/// thread: 7.2-7.6 ms, as with 512 (7.2-7.3) and 1024 keys (7.4); 64 and 128 keys were
/// slower (8.6-9.2, 7.6-8.5 ms): more partial rows to write and merge.
inline constexpr std::ptrdiff_t heads_chunk_keys = 256;

/// The rows a few-row pass over plain-memory K/V requests while it reads `keys` token rows
/// of `kv_head` (see FusedTask): those that the task heads_ahead heads on reads, which on
/// each worker is the next task but one when the tasks go chunk by chunk, every head of a
/// chunk in turn. Past the last heads that is a first head over the next chunk, which
/// starts `keys` tokens on and has at most `keys_after` tokens left to read.
struct RowsAhead {
  int head = 0;
  std::ptrdiff_t first_token = 0;  // relative to the pass's first token
  int tokens = 0;                  // 0: nothing to request
};
inline RowsAhead rows_ahead(int kv_head, int kv_heads, int keys, std::ptrdiff_t keys_after) {
  constexpr int heads_ahead = 2;
  const int target = kv_head + heads_ahead;
  if (target < kv_heads) return {target, 0, keys};
  return {target % kv_heads, keys, int(std::clamp<std::ptrdiff_t>(keys_after, 0, keys))};
}

/// K/V in plain memory that interleaves several heads per token row, and enough keys to
/// read them chunk by chunk (see reads_heads_in_chunks).
template <class KvT>
bool token_rows_in_chunks(const AttendArgs<KvT>& item) {
  return item.layout.kv_heads > 1 && item.kv_token_stride != item.layout.head_dim &&
         item.kv_len >= 2 * heads_chunk_keys;
}

// ---------------------------------------------------------------------------------------
// One task: a KV head, a tile of queries, and a contiguous range of keys.

template <class Isa, int HeadDimStatic, int GroupStatic, class KvT>
class FusedTask {
  using V = typename Isa::vec;
  static constexpr int width = Isa::width;
  static constexpr int max_key_block =
      std::max({Tiling<Isa>::key_block, Tiling<Isa>::key_block_many, Tiling<Isa>::key_block_few});
  static constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  static constexpr bool few_rows_possible = 2 * (GroupStatic == Dynamic ? 1 : GroupStatic) <= width;
  static constexpr int dim_padded_static =
      HeadDimStatic == Dynamic ? Dynamic : (HeadDimStatic + width - 1) / width * width;

 public:
  FusedTask(const AttendArgs<KvT>& args, int query_tile)
      : args_(args),
        head_dim_(args.layout.head_dim),
        group_(args.layout.group_size()),
        query_tile_(query_tile),
        dim_padded_(round_up(args.layout.head_dim, width)) {}

  /// Logits of one block: [rows_padded][key_block] of the many-row or staged layouts, or
  /// few-row ones (at most half a vector of rows) a key_block_few row each.
  static std::size_t logit_floats(int rows_padded) {
    const int key_block_rows = std::max(Tiling<Isa>::key_block, Tiling<Isa>::key_block_many);
    return std::max(std::size_t(key_block_rows) * std::size_t(rows_padded),
                    std::size_t(Tiling<Isa>::key_block_few) * width);
  }

  /// Scratch floats one task needs (for the largest tile).
  std::size_t scratch_floats() const {
    const int rows_padded = round_up(group_.get() * query_tile_, width);
    const std::size_t queries = std::size_t(std::max(head_dim_.get() * rows_padded, group_.get() * query_tile_ * dim_padded_));
    return queries + logit_floats(rows_padded) + std::size_t(rows_padded) * dim_padded_ +
           std::size_t(rows_padded) * 8 + 2 * std::size_t(Tiling<Isa>::key_block) * dim_padded_;  // staging
  }

  /// Attends queries [first_query, first_query + queries) of kv_head to keys
  /// [key_begin, key_end). Writes normalised rows and their softmax masses to
  /// out_rows/mass_rows ([rows][head_dim] and [rows][2], row = query * group + g) when given,
  /// else straight into args.out / args.lse.
  void run(int kv_head, std::ptrdiff_t first_query, int queries, std::ptrdiff_t key_begin, std::ptrdiff_t key_end,
           float* scratch, float* out_rows, float* mass_rows) const {
    // The two layouts compile as separate functions: as one, g++ gave up inlining into
    // the few-row loops once the many-row path grew (GQA-8 decode of 16384 keys, 1
    // thread: 6.9 against 7.6 ms, medians of 9 alternating runs; equal in cache).
    // The few-row layout is not even compiled where no call can take it (a compile-time
    // group of more than half a vector, or any group on one-lane scalar). That cut the
    // compile time of the fp32 kernels of scalar from 90 to 72 s, of AVX2 from 133 to 116.
    if constexpr (few_rows_possible) {
      if (2 * group_.get() * queries <= width)  // too few rows to fill a vector
        return run_layout<true>(kv_head, first_query, queries, key_begin, key_end, scratch, out_rows, mass_rows);
    }
    run_layout<false>(kv_head, first_query, queries, key_begin, key_end, scratch, out_rows, mass_rows);
  }

 private:
  template <bool ByDims>
  void run_layout(int kv_head, std::ptrdiff_t first_query, int queries, std::ptrdiff_t key_begin,
                  std::ptrdiff_t key_end, float* scratch, float* out_rows, float* mass_rows) const {
    const int group = group_.get();
    const int head_dim = head_dim_.get();
    const int rows = group * queries;
    const int rows_padded = round_up(rows, width);
    constexpr bool by_dims = ByDims;
    const int key_block = needs_staging() ? Tiling<Isa>::key_block
                          : by_dims         ? Tiling<Isa>::key_block_few
                                            : Tiling<Isa>::key_block_many;

    // Scratch layout.
    float* queries_buf = scratch;
    float* logits = queries_buf + std::max(head_dim * rows_padded, rows * dim_padded_);
    float* acc = logits + logit_floats(rows_padded);
    float* row_max = acc + std::ptrdiff_t(rows_padded) * dim_padded_;
    float* row_sum = row_max + rows_padded;
    float* row_scale = row_sum + rows_padded;
    float* row_first = row_scale + rows_padded;   // first visible key, relative to the block
    float* row_last = row_first + rows_padded;    // last visible key, relative to the block
    float* row_slope = row_last + rows_padded;
    float* row_bias = row_slope + rows_padded;    // (block start - query position)
    float* k_stage = row_bias + rows_padded;       // widened K/V rows of a block (non-float storage)
    float* v_stage = k_stage + std::ptrdiff_t(Tiling<Isa>::key_block) * dim_padded_;

    // A query's rows are one short run in a token row of the user's memory (MHA: 512
    // bytes of 16 KiB at head_dim 128); a tile's runs sit a token row apart, each on its
    // own page, where the hardware prefetchers do not follow. Request all their lines
    // before the copy below waits on them, and the output rows before they are written.
    // Causal prefill of 512 tokens, bench_attend built before and after, alternating runs,
    // medians of 4 pairs, 1 / 2 threads: MHA 0.96x / 0.94x time, GQA-8 0.91x / 0.89x (MHA
    // at 1024 tokens 0.89x on 1 thread, scratch driver); see bench/PERFORMANCE_LOG.md.
    const bool scattered_q = scattered_rows(args_.q_token_stride, args_.q_head_stride, queries);
    const bool scattered_out = !out_rows && scattered_rows(args_.out_token_stride, args_.out_head_stride, queries);
    if (scattered_q)
      for_each_line(args_.q, args_.q_token_stride, args_.q_head_stride, kv_head, first_query, rows,
                    [](const float* line) { simd::prefetch(line); });
    // Stage the scaled queries: transposed for the by-rows kernel, padded rows otherwise.
    // (The scale is read once: the stores below are floats and could alias args_.scale.)
    const float staged_scale = query_scale();
    for (int r = 0; r < rows_padded; ++r) {
      const bool real = r < rows;
      const int query = real ? r / group : 0;
      const int q_head = kv_head * group + (real ? r % group : 0);
      const float* q = args_.q + (first_query + query) * args_.q_token_stride + q_head * args_.q_head_stride;
      if (by_dims) {
        if (!real) continue;
        float* dst = queries_buf + std::ptrdiff_t(r) * dim_padded_;
        for (int d = 0; d < dim_padded_; ++d) dst[d] = d < head_dim ? q[d] * staged_scale : 0.f;
      } else {
        for (int d = 0; d < head_dim; ++d)
          queries_buf[std::ptrdiff_t(d) * rows_padded + r] = real ? q[d] * staged_scale : 0.f;
      }
    }
    for (int r = 0; r < rows_padded; ++r) {
      row_max[r] = neg_inf;
      row_sum[r] = 0.f;
      row_slope[r] = (args_.alibi_slopes && r < rows) ? args_.alibi_slopes[kv_head * group + r % group] : 0.f;
    }
    // Accumulators: [rows][dim_padded] for few rows, transposed ([dim_padded][rows_padded])
    // for the by-rows P.V.
    for (std::ptrdiff_t i = 0; i < std::ptrdiff_t(rows_padded) * dim_padded_; ++i) acc[i] = 0.f;

    // Keys any row of the tile can see; blocks outside are skipped entirely.
    const std::ptrdiff_t first_pos = args_.first_query_pos + first_query;
    const std::ptrdiff_t last_pos = first_pos + queries - 1;
    const KeyRange first_row = visible_keys(first_pos, args_.key_end(), args_.causal, args_.window);
    const KeyRange last_row = visible_keys(last_pos, args_.key_end(), args_.causal, args_.window);
    const std::ptrdiff_t begin = std::max(key_begin, first_row.first);
    const std::ptrdiff_t end = std::min(key_end, last_row.last + 1);
    const bool masked = args_.causal || args_.window > 0;

    // k and v may be null when there are no keys: never offset a null pointer.
    const KvT* k_head = args_.k ? args_.k + kv_head * args_.kv_head_stride : nullptr;
    const KvT* v_head = args_.v ? args_.v + kv_head * args_.kv_head_stride : nullptr;
    // Requests a few pages ahead of passes that read K/V rows from memory (see PageAhead).
    const PageAhead stored_pages =
        PageAhead::rows(args_.kv_token_stride * std::ptrdiff_t(sizeof(KvT)), Tiling<Isa>::pages_ahead_few);
    for (int segment = 0; segment < args_.segment_count; ++segment) {
     const KeySegment& stored = args_.segments[segment];
     const std::ptrdiff_t stored_end = std::min(end, stored.first_position + stored.count);
     for (std::ptrdiff_t block = std::max(begin, stored.first_position); block < stored_end; block += key_block) {
      // `block` is a key position; its slot in memory comes from the segment.
      const int keys = int(std::min<std::ptrdiff_t>(key_block, stored_end - block));
      const std::ptrdiff_t slot = stored.first_slot + (block - stored.first_position);
      const KvT* k = k_head + slot * args_.kv_token_stride;
      const KvT* v = v_head + slot * args_.kv_token_stride;
      // Reduced-precision storage is widened once per block into L1 scratch, so the
      // micro-kernels stay fp32 and memory traffic stays at the storage's size; fp32 rows
      // whose head_dim is not a multiple of the width are copied into zero-padded rows
      // the same way, so the micro-kernels never load a partial vector.
      const float* k_rows = k_stage;
      const float* v_rows = v_stage;
      std::ptrdiff_t row_stride = dim_padded_;
      if constexpr (std::is_same_v<KvT, float>) {
        if (!needs_staging()) {
          k_rows = k;
          v_rows = v;
          row_stride = args_.kv_token_stride;
        }
      }
      if (k_rows == k_stage) {
        const std::ptrdiff_t scale_row = kv_head * args_.scale_head_stride + slot;
        widen_rows<Isa>(k, args_.kv_token_stride, keys, head_dim_,
                        args_.k_scales ? args_.k_scales + scale_row : nullptr, k_stage, dim_padded_, stored_pages);
        widen_rows<Isa>(v, args_.kv_token_stride, keys, head_dim_,
                        args_.v_scales ? args_.v_scales + scale_row : nullptr, v_stage, dim_padded_, stored_pages);
      }

      // Only blocks crossing a row's causal edge or window start need masking.
      const bool crosses_causal_edge = block + keys - 1 > first_pos;
      const bool crosses_window_start = args_.window > 0 && block <= last_pos - args_.window;
      const bool block_needs_mask = masked && (crosses_causal_edge || crosses_window_start);
      // Many-row P.V over whole V rows (see Tiling::pv_keys_many).
      const bool pv_whole_rows = Tiling<Isa>::pv_whole_rows_many && !by_dims && !block_needs_mask &&
                                 (rows_padded / width) % 2 == 0;
      // Of this block's V, a decode whose P.V reads whole rows requests every line during
      // Q.K, spread over its tiles, so P.V finds V in L2 and the next block's K, which it
      // requests in turn, has the DRAM to itself (see Tiling::pv_keys_many).
      const bool v_whole_during_qk = pv_whole_rows && queries == 1;

      // The hardware prefetcher does not keep up with these strided row walks: tasks
      // request the next block's rows themselves, a key's rows per key processed, so
      // requests spread over the whole block. Few-row tasks that still request (see
      // request_ahead below) fetch K during Q.K and V during P.V (when Q.K still read keys
      // side by side, GQA-8 decode of 16384 keys, 1 thread: -9% time, MHA -4 to -6%, medians
      // of 7-9 alternating runs; prefetching a whole block at once gained nothing). Many-row
      // tasks fetch the next block's K during P.V (fetching the next block's K and V
      // during Q.K evicted the block in use from L1: per-key cycles of MQA decode at 16384
      // keys, best of 7 alternating runs, Q.K 85 against 105, 102 without prefetching;
      // whole call 1.50 ms against 1.56, 1.58 without), one line every other key of each
      // P.V pass rather than a pass's share of rows all at its start (MQA decode of 16384
      // keys, 1 thread, medians of 9-11 alternating pinned runs, three sessions: 1.492 ->
      // 1.440, 1.420 -> 1.392, 1.512 -> 1.475 ms; with the K/V evicted from L3 between
      // calls, as when a model attends layer after layer, 1.652 -> 1.547, 1.585 -> 1.552,
      // 1.670 -> 1.624; 2 threads 0.752 -> 0.741; causal GQA-8 prefill of 2048 200.8 ->
      // 199.6). Whole rows stay: only their first lines took 1.91 against 1.70 ms with the
      // K/V evicted. Of this block's V they fetch only the first line of each row during
      // Q.K (but see v_whole_during_qk above): P.V's passes over the keys go through V
      // one cache line (two or four dim tiles) at a time, and the first pass over each
      // line fetches the next one, just ahead of use, instead of the whole block arriving
      // at once during Q.K (MQA decode of 16384 keys, medians of 9-15 alternating runs
      // pinned to one core: 1.458 -> 1.418 ms on 1 thread, 0.757 -> 0.737 on 2, and
      // 1.855 -> 1.715 at a busier moment; causal prefill unchanged).
      // Few-row (decode) tasks, which now read each K and V row whole and in order (see
      // Tiling::dims_rows), request nothing ahead, but for several-row tasks on 16-register
      // ISAs: those whole-row passes are what the hardware prefetchers follow best, and
      // each software request holds one of the core's few L1 miss buffers while it waits
      // on DRAM. On Zen 5 (AVX-512), scratch driver, alternating builds, medians of 5-8:
      // decode of 16384 keys GQA-8 6.96 -> 5.28 ms on 1 thread, 3.30 -> 3.16 on 2, MHA
      // 22.9 -> 20.1 and 11.5 -> 10.3; with the K/V out of cache (/layers) GQA-8 7.77 ->
      // 5.41, MHA at 4096 keys 6.10 -> 3.45. On Zen 3 (AVX2) one-row tasks gained the same
      // way (MHA 16384, 1 thread: 47-59 ms with the requests, 38-48 without; a block
      // ahead is 128 KiB per plane, four of which fill its 512 KiB L2), but two-row tasks
      // (GQA-16) were 8-16% slower without them, so those keep them there. Requests of a
      // line 16 or 64 keys ahead, one per key, to start the stream on the next page early,
      // were slower too on Zen 5 (whole call 5.6-6.1 -> 6.1-7.2 ms), and so were whole rows
      // 8-32 keys ahead (GQA-8 4.9-5.4 -> 6.0-6.4 ms); one line per page (PageAhead) gains.
      // K and V read side by side (P.V of the previous block in 32-key tiles between Q.K
      // tiles of this one) took GQA-8 decode from 5.0 to 8.0 ms: one stream at a time.
      const bool request_ahead = !by_dims || (!Tiling<Isa>::many_registers && rows > 1);
      PrefetchRows during_qk, during_pv;
      if (k_rows != k_stage && request_ahead) {
        const int next_keys = int(std::clamp<std::ptrdiff_t>(stored_end - (block + key_block), 0, key_block));
        const std::ptrdiff_t stride = args_.kv_token_stride * std::ptrdiff_t(sizeof(KvT));
        const int lines = (head_dim * int(sizeof(KvT)) + 63) / 64;
        // None past the segment's last block (whose next rows would lie past the arrays).
        const PrefetchRows next_k = next_keys > 0 ? PrefetchRows{reinterpret_cast<const char*>(k) + key_block * stride,
                                                                 stride, next_keys, lines}
                                                  : PrefetchRows{};
        const PrefetchRows next_v = next_keys > 0 ? PrefetchRows{reinterpret_cast<const char*>(v) + key_block * stride,
                                                                 stride, next_keys, lines}
                                                  : PrefetchRows{};
        const PrefetchRows this_v{reinterpret_cast<const char*>(v), stride, keys,
                                  by_dims || v_whole_during_qk ? lines : 1};
        during_qk = by_dims ? next_k : this_v;
        during_pv = by_dims ? next_v : next_k;
      }
      // Plain-memory K/V interleave the KV heads ([tokens][kv_heads][head_dim]), so this
      // head's rows sit a token row apart, each on its own page, where the hardware
      // prefetchers do not follow. A decode long enough to read them chunk by chunk (see
      // reads_heads_in_chunks) runs a chunk's heads one after another on each worker, so
      // its few-row passes request the slices of the same token rows that the task two
      // heads on will read (see rows_ahead). Zen 4, both builds in one process taking
      // turns, medians of 15-21 rounds of the time ratio, q_heads 32, head_dim 128, 16384
      // keys, 1 / 2 threads: GQA-8 0.61x / 0.64x time, MHA 0.60x / 0.72x, groups of 8
      // 0.68x, of 16 0.98x; 4096 keys GQA-8 0.56x, MHA 0.59x; head_dim 64 0.44x; 400 keys
      // (not read in chunks) 1.00x. One head ahead gained less (GQA-8 0.81x), three or four
      // were slower than two (1.13x, 1.27x), and no requests past the chunk's last heads
      // 1.10-1.16x. Rows staged into scratch (head_dim 72) gain as much: GQA-8 0.60x /
      // 0.63x, MHA 0.66x. The AVX2 build on the same core (whose several-row tasks request
      // their next block, of which a chunk has none): GQA-8 0.67x / 0.76x, head_dim 72 0.55x.
      if (by_dims && during_qk.keys == 0 && token_rows_in_chunks(args_)) {
        const RowsAhead target =
            rows_ahead(kv_head, args_.layout.kv_heads, keys, stored.first_position + stored.count - (block + keys));
        if (target.tokens > 0) {
          const std::ptrdiff_t offset =
              (target.head - kv_head) * args_.kv_head_stride + target.first_token * args_.kv_token_stride;
          const std::ptrdiff_t stride = args_.kv_token_stride * std::ptrdiff_t(sizeof(KvT));
          const int lines = (head_dim * int(sizeof(KvT)) + 63) / 64;
          during_qk = PrefetchRows{reinterpret_cast<const char*>(k + offset), stride, target.tokens, lines};
          during_pv = PrefetchRows{reinterpret_cast<const char*>(v + offset), stride, target.tokens, lines};
        }
      }
      // Few-row passes that request nothing ahead request a line a few pages ahead instead
      // (see PageAhead).
      const PageAhead pages = by_dims && k_rows != k_stage && !request_ahead ? stored_pages : PageAhead{};
      // The block's own K rows and those after it to the segment's end, for the few-row
      // passes that request them ahead themselves (Tiling::dims_key_pairs and
      // dims_own_ahead); none when they were staged into scratch.
      const int own_keys = int(std::min<std::ptrdiff_t>(stored.first_position + stored.count - block, std::numeric_limits<int>::max()));
      const PrefetchRows own_k_rows =
          k_rows != k_stage ? PrefetchRows{reinterpret_cast<const char*>(k_rows), row_stride * std::ptrdiff_t(sizeof(float)),
                                           own_keys, (dim_padded_ * int(sizeof(float)) + 63) / 64}
                            : PrefetchRows{};

      // Per-row mask bounds and ALiBi offsets relative to this block, as small exact floats.
      if (block_needs_mask || args_.alibi_slopes) {
        for (int r = 0; r < rows_padded; ++r) {
          const std::ptrdiff_t position = first_pos + (r < rows ? r / group : 0);
          const KeyRange range = visible_keys(position, args_.key_end(), args_.causal, args_.window);
          row_first[r] = float(std::clamp<std::ptrdiff_t>(range.first - block, 0, key_block));
          row_last[r] = float(std::clamp<std::ptrdiff_t>(range.last - block, -1, key_block));
          row_bias[r] = float(block - position);
        }
      }
      // Many-row tiles: the keys [first, end) of the block that some row of the row vectors
      // [rv, rv + vecs) sees. In a block on the causal edge (or the window's start) the
      // later (earlier) keys are masked for every row of an early (late) tile, so its Q.K
      // and P.V skip them instead of computing what the mask then discards; the logits
      // left stale there are masked to -inf like any other. Zen 4, both builds in one
      // process taking turns, medians of 5-11 rounds, q_heads 32, head_dim 128: causal MHA
      // prefill of 512 tokens 0.94x / 0.97x time on 1 / 2 threads, of 2048 0.97x, with a
      // window of 300 0.95x; GQA-8 (16 positions per task, so few whole tiles masked)
      // 0.99-1.01x. Results are bit-identical.
      // Row r holds position first_pos + r / group (padding rows: first_pos), and a row's
      // visible keys move forward with its position, so a tile's first row sees its
      // earliest key and its last row that is not padding its latest.
      const auto keys_for_tile = [&](int rv, int vecs) {
        if (!block_needs_mask) return KeySpan{0, keys};
        const int first_row = rv * width, last_row = std::min(rows, (rv + vecs) * width) - 1;
        const int end = std::min(keys, int(row_last[last_row]) + 1);
        return KeySpan{std::min(int(row_first[first_row]), end), end};
      };
      // Within those, the keys every row of the tile sees: its last row's first key to its
      // first row's last. P.V takes them without the per-lane mask test (SkipMasked), which
      // on AVX2 costs a compare and a blend per FMA: Zen 2, 32 rows x 120 keys in L1, 30
      // GFLOP/s against 82 without. In a causal block that test is left for the few keys
      // past the tile's first position. Results are bit-identical: no lane the mask skips
      // lies in that span.
      const auto keys_every_row_sees = [&](int rv, int vecs, KeySpan seen) {
        const int first_row = rv * width, last_row = std::min(rows, (rv + vecs) * width) - 1;
        const int first = std::clamp(int(row_first[last_row]), seen.first, seen.end);
        return KeySpan{first, std::clamp(int(row_last[first_row]) + 1, first, seen.end)};
      };

      // Logits of the block.
      if (by_dims) {  // row-major logits: row r at logits + r * key_block
        // One tile of all the rows walks the whole block (see Tiling::dims_rows).
        with_tile_size<Tiling<Isa>::dims_rows>(rows, [&](auto rows_now) {
          constexpr int held = Tiling<Isa>::dims_held_vecs(rows_now.value, dim_padded_static);
          qk_by_dims<Isa, rows_now.value, held>(queries_buf, Size<dim_padded_static>(dim_padded_), k_rows,
                                                row_stride, keys, key_block, logits, during_qk, pages, own_k_rows);
        });
      } else {
        constexpr int tile_keys = Tiling<Isa>::qk_keys, tile_row_vecs = Tiling<Isa>::qk_row_vecs;
        const int row_vecs = rows_padded / width;
        for (int j = 0; j < keys; j += tile_keys) {
          const int keys_now = std::min(tile_keys, keys - j);
          // Whole V rows go out spread over a whole tile's passes (see SpreadRequests);
          // first lines, or a tail's, at once.
          const bool spread = v_whole_during_qk && keys_now == tile_keys;
          const int tile_lines = spread ? std::clamp(during_qk.keys - j, 0, keys_now) * during_qk.lines : 0;
          const int row_tiles = (row_vecs + tile_row_vecs - 1) / tile_row_vecs;
          const int share = (tile_lines + row_tiles - 1) / row_tiles;
          if (!spread)
            for (int key = j; key < j + tile_keys; ++key) during_qk.key(key);
          for (int rv = 0; rv < row_vecs; rv += tile_row_vecs)
            with_tile_size<tile_row_vecs>(row_vecs - rv, [&](auto vecs_now) {
              const KeySpan seen = keys_for_tile(rv, vecs_now.value);
              if (j >= seen.end || j + keys_now <= seen.first) return;
              const float* qt = queries_buf + rv * width;
              float* out = logits + std::ptrdiff_t(j) * rows_padded + rv * width;
              if (keys_now == tile_keys) {
                const int first_line = rv / tile_row_vecs * share;
                qk_by_rows<Isa, vecs_now.value, tile_keys>(qt, rows_padded, k_rows + j * row_stride, row_stride,
                                                           head_dim, out, during_qk, j * during_qk.lines + first_line,
                                                           std::clamp(tile_lines - first_line, 0, share));
              } else {  // a block's tail: tiles of qk_keys_tail keys, then key by key
                constexpr int tail_keys = Tiling<Isa>::qk_keys_tail;
                int key = 0;
                for (; key + tail_keys <= keys_now; key += tail_keys)
                  qk_by_rows<Isa, vecs_now.value, tail_keys>(qt, rows_padded, k_rows + (j + key) * row_stride,
                                                             row_stride, head_dim, out + std::ptrdiff_t(key) * rows_padded);
                for (; key < keys_now; ++key)
                  qk_by_rows<Isa, vecs_now.value, 1>(qt, rows_padded, k_rows + (j + key) * row_stride, row_stride,
                                                     head_dim, out + std::ptrdiff_t(key) * rows_padded);
              }
            });
        }
      }

      if (by_dims) {
        const int keys_padded = round_up(keys, width);
        transform_logits_by_row(logits, key_block, keys_padded, rows, block_needs_mask, row_first, row_last, row_slope,
                                row_bias);
        // Lanes past the block's last key take part in whole-vector steps: make them
        // -inf, i.e. probability 0 (after the transforms, which would map -inf to finite).
        for (int r = 0; r < rows; ++r)
          for (int j = keys; j < keys_padded; ++j) logits[std::ptrdiff_t(r) * key_block + j] = neg_inf;
        update_softmax_by_row(logits, key_block, keys_padded, rows, row_max, row_sum, row_scale);
      } else {
        transform_logits(logits, keys, rows_padded, block_needs_mask, row_first, row_last, row_slope, row_bias);
        update_softmax(logits, keys, rows_padded, row_max, row_sum, row_scale);
      }
      if (block_needs_mask)
        mark_masked_keys(logits, by_dims ? LogitStrides{1, key_block} : LogitStrides{rows_padded, 1}, keys, rows,
                         row_first, row_last);

      // Rescale what earlier blocks accumulated, then add this block's P.V.
      if (by_dims) {
        for (int r = 0; r < rows; ++r) {
          if (row_scale[r] == 1.f) continue;
          const V factor = Isa::broadcast(row_scale[r]);
          float* row = acc + std::ptrdiff_t(r) * dim_padded_;
          for (int d = 0; d < dim_padded_; d += width) Isa::store(row + d, Isa::mul(factor, Isa::load(row + d)));
        }
      } else if (std::any_of(row_scale, row_scale + rows, [](float factor) { return factor != 1.f; })) {
        for (int rv = 0; rv < rows_padded; rv += width) {
          const V factor = Isa::load(row_scale + rv);
          for (int d = 0; d < head_dim; ++d) {
            float* p = acc + std::ptrdiff_t(d) * rows_padded + rv;
            Isa::store(p, Isa::mul(factor, Isa::load(p)));
          }
        }
      }
      if (by_dims) {
        const LogitStrides strides{1, key_block};
        constexpr int tile_rows = Tiling<Isa>::pv_rows_few, tile_chunks = Tiling<Isa>::pv_chunks_few;
        if (block_needs_mask)
          pv_block<Isa, tile_rows, tile_chunks, true>(rows, logits, strides, v_rows, row_stride, keys, acc, dim_padded_,
                                                      during_pv, pages);
        else
          pv_block<Isa, tile_rows, tile_chunks, false>(rows, logits, strides, v_rows, row_stride, keys, acc, dim_padded_,
                                                       during_pv, pages);
      } else {
        const int row_vecs = rows_padded / width;
        // Passes of register tiles of up to tile_row_vecs row vectors x tile_dims dimensions.
        const auto passes = [&](auto tile_row_vecs_max, auto tile_dims_max) {
          constexpr int tile_row_vecs = decltype(tile_row_vecs_max)::value, tile_dims = decltype(tile_dims_max)::value;
          const int dim_tiles = (head_dim + tile_dims - 1) / tile_dims;
          const int keys_per_tile = (key_block + dim_tiles - 1) / dim_tiles;  // prefetches spread over the tiles
          for (int d = 0; d < head_dim; d += tile_dims) {
            const int first_key = d / tile_dims * keys_per_tile;
            // The next block's K, spread over this pass's keys (the first row tile's pass).
            const int spread_count = keys_per_tile * during_pv.lines;
            const int spread_first = first_key * during_pv.lines;
            for (int rv = 0; rv < row_vecs; rv += tile_row_vecs)
              with_tile_size<tile_row_vecs>(row_vecs - rv, [&](auto vecs_now) {
                with_tile_size<tile_dims>(head_dim - d, [&](auto dims_now) {
                  const float* p = logits + rv * width;
                  float* out = acc + std::ptrdiff_t(d) * rows_padded + rv * width;
                  // The first pass over each cache line of the V rows fetches the next line.
                  // In decode (one query position), whose V rows come from DRAM, that is
                  // the first pass to start in the line: tiles of 6 dimensions start
                  // mid-line, and fetching only at multiples of 16 left lines 2, 3, 5 and
                  // 6 of 8 to demand misses. Zen 2, MQA decode of 16384 keys, scratch
                  // driver, 3 alternating rounds: P.V 294-339 -> 267-279 TSC cycles per
                  // key. bench_attend, alternating builds, 3 pairs, medians: MQA decode
                  // out of cache 0.91-0.95x time on 1 and 2 threads, in cache 1.00x.
                  // Prefill (V in cache) keeps the old rule: the extra requests there
                  // cost 4% (MQA, 512 tokens), and 0.99-1.01x with this gate.
                  constexpr int line_floats = int(cache_line / sizeof(float));
                  const int next_line = (d / line_floats + 1) * line_floats;
                  const bool first_in_line =
                      d % line_floats == 0 || (queries == 1 && d / line_floats != (d - tile_dims) / line_floats);
                  const bool fetch = rv == 0 && first_in_line && next_line < head_dim && v_rows != v_stage;
                  const float* prefetch_rows = fetch ? v_rows + next_line : nullptr;
                  const int spread_now = rv == 0 ? spread_count : 0;
                  if (block_needs_mask) {
                    const KeySpan seen = keys_for_tile(rv, vecs_now.value);
                    const KeySpan every = keys_every_row_sees(rv, vecs_now.value, seen);
                    // The longest part issues the pass's requests.
                    const bool requests_in_every = every.end - every.first > 0;
                    const auto part = [&](auto skip_masked, KeySpan span, bool requests) {
                      if (span.end <= span.first) return;
                      pv_by_rows<Isa, vecs_now.value, dims_now.value, decltype(skip_masked)::value>(
                          p + std::ptrdiff_t(span.first) * rows_padded, rows_padded,
                          v_rows + d + std::ptrdiff_t(span.first) * row_stride, row_stride, span.end - span.first, out,
                          requests && prefetch_rows ? prefetch_rows + std::ptrdiff_t(span.first) * row_stride : nullptr,
                          during_pv, spread_first, requests ? spread_now : 0);
                    };
                    part(std::true_type{}, KeySpan{seen.first, every.first}, !requests_in_every);
                    part(std::false_type{}, every, requests_in_every);
                    part(std::true_type{}, KeySpan{every.end, seen.end}, false);
                  } else {
                    pv_by_rows<Isa, vecs_now.value, dims_now.value, false>(p, rows_padded, v_rows + d, row_stride, keys,
                                                                           out, prefetch_rows, during_pv, spread_first,
                                                                           spread_now);
                  }
                });
              });
          }
        };
        using One = std::integral_constant<int, 1>;
        using OneVecDims = std::integral_constant<int, Tiling<Isa>::pv_dims_one_vec>;
        using RowVecs = std::integral_constant<int, Tiling<Isa>::pv_row_vecs>;
        using Dims = std::integral_constant<int, Tiling<Isa>::pv_dims>;
        if (pv_whole_rows) {
          if constexpr (Tiling<Isa>::pv_whole_rows_many) {  // no instances for other ISAs
            // Tiles of pv_keys_many keys x two row vectors; each tile's pairs of row vectors
            // take turns over its V rows, the later ones from L1. The next block's K goes
            // out spread evenly over all of the block's passes.
            constexpr int tile_keys = Tiling<Isa>::pv_keys_many;
            const int key_tiles = (keys + tile_keys - 1) / tile_keys, row_pairs = row_vecs / 2;
            const int lines = during_pv.keys * during_pv.lines;
            const int share = (lines + key_tiles * row_pairs - 1) / (key_tiles * row_pairs);
            int pass = 0;
            for (int j = 0; j < keys; j += tile_keys)
              with_tile_size<tile_keys>(keys - j, [&](auto keys_now) {
                for (int rv = 0; rv < row_vecs; rv += 2, ++pass) {
                  const int first_line = pass * share;
                  pv_by_keys<Isa, 2, keys_now.value>(logits + std::ptrdiff_t(j) * rows_padded + rv * width, rows_padded,
                                                     v_rows + j * row_stride, row_stride, head_dim, acc + rv * width,
                                                     during_pv, first_line, std::clamp(lines - first_line, 0, share));
                }
              });
          }
        } else if (row_vecs == 1) {  // see Tiling::pv_dims_one_vec
          passes(One{}, OneVecDims{});
        } else {
          passes(RowVecs{}, Dims{});
        }
      }
     }
    }

    if (scattered_out)
      for_each_line(args_.out, args_.out_token_stride, args_.out_head_stride, kv_head, first_query, rows,
                    [](const float* line) { simd::prefetch_for_write(line); });
    // Normalise. A row that saw no key has sum 0 and outputs zeros, never NaN.
    for (int r = 0; r < rows; ++r) {
      const int query = r / group;
      const int q_head = kv_head * group + r % group;
      float* dst = out_rows ? out_rows + std::ptrdiff_t(r) * head_dim
                            : args_.out + (first_query + query) * args_.out_token_stride + q_head * args_.out_head_stride;
      const float sum = row_sum[r];
      const float inverse = sum > 0.f ? 1.f / sum : (sum == 0.f ? 0.f : sum);  // NaN stays NaN
      // Row r of the accumulators: contiguous for few rows, a column of the transposed ones.
      const float* row = by_dims ? acc + std::ptrdiff_t(r) * dim_padded_ : acc + r;
      const std::ptrdiff_t step = by_dims ? 1 : rows_padded;
      // Sum 0: no key had weight (none visible, or every visible logit -inf). Alone and
      // without a sink that is zeros, as in the reference; a key split, or a row a sink
      // joins, keeps 0 * accumulator, whose NaN (a weight-0 key's inf or NaN value)
      // counts once another part or the sink has weight (merge_partial, add_sink).
      const bool keep_nan = out_rows || args_.sinks;
      for (int d = 0; d < head_dim; ++d)
        dst[d] = sum == 0.f ? (keep_nan ? 0.f * row[d * step] : 0.f) : row[d * step] * inverse;
      SoftmaxMass mass{row_max[r], sum};
      if (mass_rows) {  // a key split: the sink joins after the merge
        mass.store(mass_rows + 2 * r);
        continue;
      }
      if (args_.sinks)
        mass = add_sink(dst, mass, args_.sinks[q_head], head_dim, args_.sees_a_key(first_query + query));
      if (args_.lse) args_.lse[(first_query + query) * args_.layout.q_heads + q_head] = mass.log_sum_exp();
    }
  }

  static int round_up(int x, int multiple) { return (x + multiple - 1) / multiple * multiple; }

  /// Whether a tile of `queries` queries reads (or writes) its rows as short runs, one per
  /// query and under a page each, with gaps between them (see run_layout).
  bool scattered_rows(std::ptrdiff_t token_stride, std::ptrdiff_t head_stride, int queries) const {
    const std::ptrdiff_t run = std::ptrdiff_t(group_.get()) * head_dim_.get();
    return queries > 1 && head_stride == head_dim_.get() && token_stride > run &&
           run * std::ptrdiff_t(sizeof(float)) < std::ptrdiff_t(PageAhead::page);
  }

  /// Calls f with an address in every 64 bytes of the tile's rows (row r: query r / group,
  /// query head kv_head * group + r % group) in a [tokens][heads][head_dim] tensor: one
  /// per cache line when the rows start on a line, as the tensors of a model's layers do.
  template <class F>
  void for_each_line(const float* tensor, std::ptrdiff_t token_stride, std::ptrdiff_t head_stride, int kv_head,
                     std::ptrdiff_t first_query, int rows, F&& f) const {
    const int group = group_.get();
    constexpr int line_floats = int(cache_line / sizeof(float));
    for (int r = 0; r < rows; ++r) {
      const float* row = tensor + (first_query + r / group) * token_stride + (kv_head * group + r % group) * head_stride;
      for (int d = 0; d < head_dim_.get(); d += line_floats) f(row + d);
    }
  }

  /// Marks the probabilities of keys a row cannot see -1, after the softmax has summed
  /// them as 0, so P.V can leave out exactly those (SkipMasked) and still add visible keys
  /// whose probability underflowed to 0: a NaN in such a key's value makes the row NaN, as
  /// in the reference, where the weight is tiny but not 0.
  static void mark_masked_keys(float* p, LogitStrides strides, int keys, int rows, const float* row_first,
                               const float* row_last) {
    for (int r = 0; r < rows; ++r) {
      float* row = p + std::ptrdiff_t(r) * strides.row;
      const int first = std::min(keys, int(row_first[r]));
      const int after_last = std::max(first, int(row_last[r]) + 1);
      for (int j = 0; j < first; ++j) row[std::ptrdiff_t(j) * strides.key] = -1.f;
      for (int j = after_last; j < keys; ++j) row[std::ptrdiff_t(j) * strides.key] = -1.f;
    }
  }

  /// K/V rows go through the widening stage unless they are fp32 in whole vectors.
  bool needs_staging() const {
    if constexpr (!std::is_same_v<KvT, float>) return true;
    if constexpr (HeadDimStatic != Dynamic) return HeadDimStatic % width != 0;
    return head_dim_.get() % width != 0;
  }

  /// The queries are staged times the scale when it is at most 1 (1/sqrt(head_dim) and
  /// every usual scale: no pass over the logits), else times 1 and the logits scaled
  /// after Q.K, since scale * q may overflow fp32 where scale * (q.k) does not.
  static bool scales_logits(const AttendArgs<KvT>& args) { return args.scale > 1.f; }
  float query_scale() const { return scales_logits(args_) ? 1.f : args_.scale; }

  /// Scale (when scales_logits), softcap, ALiBi and masks of one vector of logits, in the
  /// order of the contract; the two logit layouts below differ only in which lanes a
  /// vector holds.
  struct LogitTransform {
    bool scale, softcap, alibi, mask;
    V scale_by, cap, inverse_cap, minus_inf;

    LogitTransform(const AttendArgs<KvT>& args, bool masked)
        : scale(scales_logits(args)),
          softcap(args.softcap > 0.f),
          alibi(args.alibi_slopes != nullptr),
          mask(masked),
          scale_by(Isa::broadcast(args.scale)),
          cap(Isa::broadcast(args.softcap)),
          // Clamped: below 1 / FLT_MAX the reciprocal would be infinite, and a zero logit
          // times it NaN; every other logit saturates tanh either way.
          inverse_cap(Isa::broadcast(args.softcap > 0.f ? float(std::min(1.0 / double(args.softcap),
                                                                          double(std::numeric_limits<float>::max())))
                                                        : 0.f)),
          minus_inf(Isa::broadcast(neg_inf)) {}

    bool any() const { return scale || softcap || alibi || mask; }

    /// key: each lane's key offset in the block; first/last: the visible key offsets of
    /// each lane's row; slope, bias: its ALiBi slope and (block start - query position).
    V apply(V s, V key, V first, V last, V slope, V bias) const {
      if (scale) s = Isa::mul(s, scale_by);
      if (softcap) s = Isa::mul(cap, simd::tanh<Isa>(Isa::mul(s, inverse_cap)));
      if (alibi) s = Isa::fma(slope, Isa::add(bias, key), s);
      if (mask) {
        s = Isa::select_less(key, first, minus_inf, s);
        s = Isa::select_less(last, key, minus_inf, s);
      }
      return s;
    }
  };

  /// The transforms over key-major logits ([key][rows_padded]), vertically over rows.
  void transform_logits(float* logits, int keys, int rows_padded, bool mask, const float* row_first,
                        const float* row_last, const float* row_slope, const float* row_bias) const {
    const LogitTransform transform(args_, mask);
    if (!transform.any()) return;
    for (int rv = 0; rv < rows_padded; rv += width) {
      const V first = Isa::load(row_first + rv), last = Isa::load(row_last + rv);
      const V slope = Isa::load(row_slope + rv), bias = Isa::load(row_bias + rv);
      for (int j = 0; j < keys; ++j) {
        float* p = logits + std::ptrdiff_t(j) * rows_padded + rv;
        Isa::store(p, transform.apply(Isa::load(p), Isa::broadcast(float(j)), first, last, slope, bias));
      }
    }
  }

  /// The transforms over row-major logits ([row][key_block]), vectorised along the keys.
  void transform_logits_by_row(float* logits, int key_block, int keys_padded, int rows, bool mask, const float* row_first,
                               const float* row_last, const float* row_slope, const float* row_bias) const {
    const LogitTransform transform(args_, mask);
    if (!transform.any()) return;
    for (int r = 0; r < rows; ++r) {
      const V first = Isa::broadcast(row_first[r]), last = Isa::broadcast(row_last[r]);
      const V slope = Isa::broadcast(row_slope[r]), bias = Isa::broadcast(row_bias[r]);
      float* row = logits + std::ptrdiff_t(r) * key_block;
      for (int j = 0; j < keys_padded; j += width) {
        const V key = Isa::load(key_offsets<max_key_block>.values + j);
        Isa::store(row + j, transform.apply(Isa::load(row + j), key, first, last, slope, bias));
      }
    }
  }

  /// Replaces `count` vectors of logits, `stride` floats apart from `first` on, by
  /// exp(logit - shift), and returns their sum (added in order). Four vectors at a time:
  /// one exponential's steps form a chain too long for the out-of-order window to
  /// overlap many of them (Zen 2, AVX2, 120 keys x 32 rows in L1: 35.0 -> 28.8 TSC
  /// cycles per key). The same bits either way.
  static V exp_shifted_sum(float* first, std::ptrdiff_t stride, int count, V shift) {
    constexpr int at_once = 4;
    V sum = Isa::zero();
    int i = 0;
    for (; i + at_once <= count; i += at_once) {
      V weight[at_once];
      KVHEADS_UNROLL for (int k = 0; k < at_once; ++k) weight[k] = Isa::sub(Isa::load(first + (i + k) * stride), shift);
      simd::exp_nonpositive_each<Isa, at_once>(weight);
      KVHEADS_UNROLL for (int k = 0; k < at_once; ++k) {
        Isa::store(first + (i + k) * stride, weight[k]);
        sum = Isa::add(sum, weight[k]);
      }
    }
    for (; i < count; ++i) {
      const V weight = simd::exp_nonpositive<Isa>(Isa::sub(Isa::load(first + i * stride), shift));
      Isa::store(first + i * stride, weight);
      sum = Isa::add(sum, weight);
    }
    return sum;
  }

  /// update_softmax for row-major logits: one row at a time, vectorised along the keys,
  /// so a decode row costs keys / width exponentials rather than keys.
  static void update_softmax_by_row(float* logits, int key_block, int keys_padded, int rows, float* row_max,
                                    float* row_sum, float* row_scale) {
    for (int r = 0; r < rows; ++r) {
      float* row = logits + std::ptrdiff_t(r) * key_block;
      V block_max = Isa::broadcast(neg_inf);
      for (int j = 0; j < keys_padded; j += width) block_max = Isa::max(block_max, Isa::load(row + j));
      const float old_max = row_max[r];
      const float new_max = std::fmax(old_max, Isa::reduce_max(block_max));
      // As in update_softmax: a row that has seen only masked keys subtracts 0, not -inf.
      const float shift = new_max < -std::numeric_limits<float>::max() ? 0.f : new_max;
      const V sum = exp_shifted_sum(row, width, keys_padded / width, Isa::broadcast(shift));
      const float factor = std::exp(old_max - shift);
      row_sum[r] = row_sum[r] * factor + Isa::reduce_sum(sum);
      row_max[r] = new_max;
      row_scale[r] = factor;
    }
  }

  /// Online softmax over the block: new running max, rescale factor for old sums and
  /// accumulators (row_scale), and probabilities written over the logits.
  static void update_softmax(float* logits, int keys, int rows_padded, float* row_max, float* row_sum,
                             float* row_scale) {
    const V lowest = Isa::broadcast(-std::numeric_limits<float>::max());
    for (int rv = 0; rv < rows_padded; rv += width) {
      const V old_max = Isa::load(row_max + rv);
      // Four running maxima: one chain of `keys` dependent max instructions waits on
      // their latency, not on the loads (MQA decode of 16384 keys, 1 thread, medians of
      // 11 alternating pinned runs: 1.407 -> 1.391 ms; 2 threads 0.732 -> 0.724).
      constexpr int chains = 4;
      V block_max[chains];
      KVHEADS_UNROLL for (V& m : block_max) m = Isa::broadcast(neg_inf);
      int key = 0;
      for (; key + chains <= keys; key += chains)
        KVHEADS_UNROLL for (int c = 0; c < chains; ++c)
          block_max[c] = Isa::max(block_max[c], Isa::load(logits + std::ptrdiff_t(key + c) * rows_padded + rv));
      for (; key < keys; ++key)
        block_max[0] = Isa::max(block_max[0], Isa::load(logits + std::ptrdiff_t(key) * rows_padded + rv));
      V new_max = old_max;
      KVHEADS_UNROLL for (const V& m : block_max) new_max = Isa::max(new_max, m);
      // While a row has seen only masked keys its max is -inf; subtract 0 instead so
      // exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN.
      const V shift = Isa::select_less(new_max, lowest, Isa::zero(), new_max);
      const V factor = simd::exp_nonpositive<Isa>(Isa::sub(old_max, shift));
      const V sum = exp_shifted_sum(logits + rv, rows_padded, keys, shift);
      Isa::store(row_sum + rv, Isa::fma(Isa::load(row_sum + rv), factor, sum));
      Isa::store(row_max + rv, new_max);
      Isa::store(row_scale + rv, factor);
    }
  }

  const AttendArgs<KvT>& args_;
  Size<HeadDimStatic> head_dim_;
  Size<GroupStatic> group_;
  int query_tile_;
  int dim_padded_;
};

/// Plain-memory K/V interleave the KV heads ([tokens][kv_heads][head_dim]), so one head's
/// keys sit a token row apart, each on its own page. A decode that walked head after head
/// would read a 512-byte slice of every token row per pass, which the prefetchers follow
/// badly, and copying the keys head-major (as prefill does) would triple the traffic of a
/// call that reads each key once. Instead the keys are split into chunks of
/// heads_chunk_keys and the tasks run chunk by chunk, every head of a chunk in turn (and
/// both threads on the same chunk), so the slices of each token row are read close
/// together; the key-split merge then combines the chunks. Zen 5, 16384 keys, 1 thread,
/// scratch driver, medians of 40: GQA-8 8.1-8.4 -> 7.2-7.5 ms, MHA 38.4 -> 22.3 ms; 2
/// threads GQA-8 4.6 -> 3.7 ms. Only for few rows per task, whose partial results
/// (rows x head_dim per chunk) stay small next to the chunk's K/V.
template <class KvT>
bool reads_heads_in_chunks(const AttendArgs<KvT>& item, std::ptrdiff_t rows_per_task, std::ptrdiff_t query_tiles) {
  constexpr std::ptrdiff_t max_rows = 16;
  return token_rows_in_chunks(item) && query_tiles == 1 && rows_per_task <= max_rows;
}

// ---------------------------------------------------------------------------------------
// The driver: cut one call, or a batch of calls sharing a layout, into tasks, run them all
// in one parallel_for, then merge key splits.

/// A copy of `tokens` token rows of `heads` rows of head_dim floats each, between two
/// strided layouts (token-major user memory and head-major scratch, either way round).
/// Tokens are the outer loop, so the token-major side is walked in address order: each of
/// its pages is touched once per copy, not once per head.
struct HeadRowsCopy {
  const float* from;
  float* to;
  std::ptrdiff_t from_token_stride, from_head_stride, to_token_stride, to_head_stride;
  std::ptrdiff_t first_token, tokens;
  int heads;

  void run(int head_dim) const {
    for (std::ptrdiff_t t = first_token; t < first_token + tokens; ++t)
      for (int h = 0; h < heads; ++h)
        std::copy_n(from + t * from_token_stride + h * from_head_stride, head_dim,
                    to + t * to_token_stride + h * to_head_stride);
  }
};

/// Queries (and as many outputs) above this size are staged head-major; below it the
/// tasks' own reads and writes, a token row apart, cost no more than the copies (MHA
/// causal prefill on Zen 5, 32 heads of 128: 8 MiB of queries 1.02x time on 1 thread and
/// 1.05x on 2 when staged, 16 MiB 0.99x, 32 MiB 0.88x and 0.94x). A variable, not a
/// constant, so the tests can run the staged path on small shapes (set it only while no
/// attend() call runs).
inline std::size_t staged_queries_min_bytes = std::size_t(16) << 20;

/// Head-major staging of a call's operands for prefill. The tasks read each head's rows
/// of many consecutive tokens: its keys (each query tile reads them; copied when enough
/// tiles do) and, when a tile spans more tokens than heads (MHA, small groups), its
/// queries and output rows.
/// In the token-major user layouts ([tokens][heads][head_dim]) such rows sit a whole
/// token row apart, each on its own page, which the TLB and the hardware prefetchers
/// follow badly; so they are copied head-major into scratch (slot 2, kept for later
/// calls) once per call and in parallel, and the outputs copied back at the end. The
/// copies are O(tokens) next to O(q_len x kv_len) work, and walk the user's memory in
/// address order (HeadRowsCopy). Results are unchanged, bit for bit.
/// Keys: GQA-8 causal prefill of 2048 tokens, 1 thread: 108-113 -> 135-156 GFLOP/s in two
/// side-by-side runs. Queries and outputs, and the copies walked token by token instead
/// of head by head: see bench/PERFORMANCE_LOG.md (2026-12-02, prefill staging).
template <class KvT>
class HeadMajorStaging {
 public:
  /// Keys are copied when more than this many query tiles read them. Fewer tiles read
  /// strided keys faster than the copy, whose cost on this host also swings from call to
  /// call (MHA causal prefill on Zen 5, mean call without the copy against with it: 512
  /// tokens, 8 tiles per head, 0.85x on 1 thread and 0.93x on 2; 768, 12 tiles, 0.87x;
  /// 1024, 16 tiles, 0.92x; 2048, 32 tiles, 1.09x; GQA-8 at 2048, 128 tiles, 1.12x).
  static constexpr std::ptrdiff_t kv_copy_min_tiles = 16;

  /// The items to run: the originals, or copies pointing at head-major operands.
  const AttendArgs<KvT>* prepare(const AttendArgs<KvT>* items, std::ptrdiff_t item_count, int query_tile,
                                 ThreadPool& pool, int threads) {
    const HeadLayout& layout = items[0].layout;
    const int head_dim = layout.head_dim;
    const std::ptrdiff_t q_plane = std::ptrdiff_t(layout.q_heads) * head_dim;
    const auto slots = [](const AttendArgs<KvT>& item) {
      std::ptrdiff_t end = 0;
      for (int s = 0; s < item.segment_count; ++s)
        end = std::max(end, item.segments[s].first_slot + item.segments[s].count);
      return end;
    };
    const auto copies_kv = [&](const AttendArgs<KvT>& item) {
      if constexpr (!std::is_same_v<KvT, float>) {
        return false;  // reduced-precision K/V only come from caches, which are head-major
      } else {
        return layout.kv_heads > 1 && item.kv_token_stride != head_dim && item.kv_len > 0 &&
               item.q_len > kv_copy_min_tiles * std::ptrdiff_t(query_tile);
      }
    };
    // A tile's rows are `query_tile` runs of `group` rows token-major, or `group` runs of
    // `query_tile` rows head-major: stage when that gives fewer, longer runs, and the
    // queries are too many for the tasks' scattered reads to stay cheap (see
    // staged_queries_min_bytes).
    const bool tiles_span_tokens = query_tile > layout.group_size();
    const auto many_queries = [&](const AttendArgs<KvT>& item) {
      const std::size_t bytes = std::size_t(item.q_len) * std::size_t(q_plane) * sizeof(float);
      return item.q_len > query_tile && bytes > staged_queries_min_bytes;
    };
    const auto copies_q = [&](const AttendArgs<KvT>& item) {
      return tiles_span_tokens && many_queries(item) && item.q_token_stride != head_dim;
    };
    const auto copies_out = [&](const AttendArgs<KvT>& item) {
      return tiles_span_tokens && many_queries(item) && item.out_token_stride != head_dim;
    };
    std::size_t floats = 0;
    for (std::ptrdiff_t i = 0; i < item_count; ++i) {
      if (copies_kv(items[i])) floats += 2 * std::size_t(slots(items[i])) * std::size_t(layout.kv_width());
      if (copies_q(items[i])) floats += std::size_t(items[i].q_len) * std::size_t(q_plane);
      if (copies_out(items[i])) floats += std::size_t(items[i].q_len) * std::size_t(q_plane);
    }
    write_back_.clear();
    if (floats == 0) return items;

    copies_.assign(items, items + item_count);
    float* next = thread_scratch(floats, 2);
    std::vector<HeadRowsCopy>& work = work_;
    work.clear();
    // Jobs of token_chunk tokens: enough of them for every worker, each long enough to
    // stream.
    constexpr std::ptrdiff_t token_chunk = 64;
    const auto add_jobs = [&](std::vector<HeadRowsCopy>& list, HeadRowsCopy job, std::ptrdiff_t tokens) {
      for (std::ptrdiff_t first = 0; first < tokens; first += token_chunk) {
        job.first_token = first;
        job.tokens = std::min(token_chunk, tokens - first);
        list.push_back(job);
      }
    };
    for (AttendArgs<KvT>& item : copies_) {
      if (copies_kv(item)) {
        if constexpr (std::is_same_v<KvT, float>) {
          const std::ptrdiff_t item_slots = slots(item);
          const std::ptrdiff_t plane = item_slots * layout.kv_width();
          const std::ptrdiff_t head_stride = item_slots * head_dim;
          add_jobs(work, {item.k, next, item.kv_token_stride, item.kv_head_stride, head_dim, head_stride, 0, 0,
                          layout.kv_heads}, item_slots);
          add_jobs(work, {item.v, next + plane, item.kv_token_stride, item.kv_head_stride, head_dim, head_stride, 0, 0,
                          layout.kv_heads}, item_slots);
          item.k = next;
          item.v = next + plane;
          item.kv_token_stride = head_dim;
          item.kv_head_stride = head_stride;
          next += 2 * plane;
        }
      }
      const std::ptrdiff_t q_head_stride = item.q_len * head_dim;  // head-major [q_heads][q_len][head_dim]
      if (copies_q(item)) {
        add_jobs(work, {item.q, next, item.q_token_stride, item.q_head_stride, head_dim, q_head_stride, 0, 0,
                        layout.q_heads}, item.q_len);
        item.q = next;
        item.q_token_stride = head_dim;
        item.q_head_stride = q_head_stride;
        next += item.q_len * q_plane;
      }
      if (copies_out(item)) {
        add_jobs(write_back_, {next, item.out, head_dim, q_head_stride, item.out_token_stride, item.out_head_stride, 0,
                               0, layout.q_heads}, item.q_len);
        item.out = next;
        item.out_token_stride = head_dim;
        item.out_head_stride = q_head_stride;
        next += item.q_len * q_plane;
      }
    }
    run(work, head_dim, pool, threads);
    return copies_.data();
  }

  /// Copies staged outputs to the callers' memory (after every task and merge).
  void write_back(int head_dim, ThreadPool& pool, int threads) const { run(write_back_, head_dim, pool, threads); }

 private:
  static void run(const std::vector<HeadRowsCopy>& list, int head_dim, ThreadPool& pool, int threads) {
    const HeadRowsCopy* const jobs = list.data();  // workers must see the caller's list
    parallel_for(pool, std::ptrdiff_t(list.size()), threads,
                 [&](std::ptrdiff_t index, int) { jobs[index].run(head_dim); });
  }

  std::vector<AttendArgs<KvT>> copies_;
  std::vector<HeadRowsCopy> work_, write_back_;
};

template <class Isa, int HeadDimStatic, int GroupStatic, class KvT>
void run_fused_batch(const AttendArgs<KvT>* items, std::ptrdiff_t item_count) {
  if (item_count == 0) return;
  const HeadLayout& layout = items[0].layout;
  const int group = layout.group_size();
  const int head_dim = layout.head_dim;
  std::ptrdiff_t longest_queries = 1;
  for (std::ptrdiff_t i = 0; i < item_count; ++i) longest_queries = std::max(longest_queries, items[i].q_len);
  const int query_tile = int(std::clamp<std::ptrdiff_t>(Tiling<Isa>::target_rows / group, 1, longest_queries));
  const std::ptrdiff_t rows_per_tile = std::ptrdiff_t(group) * query_tile;
  ThreadPool& pool = items[0].pool ? *items[0].pool : ThreadPool::global();
  const int threads = items[0].threads;
  thread_local HeadMajorStaging<KvT> staging;  // reused: no allocation per call after the first
  items = staging.prepare(items, item_count, query_tile, pool, threads);

  // Plan: per item, its (kv head, query tile) tasks and how many key splits each gets.
  struct Plan {
    std::ptrdiff_t query_tiles, base_tasks, keys_per_split, first_task, first_partial;
    int splits;
    bool chunk_major;  // tasks ordered split by split (all heads of a key chunk in turn)
  };
  thread_local std::vector<Plan> plan_storage;  // reused: no allocation per call
  plan_storage.assign(std::size_t(item_count), Plan{});
  Plan* const plans = plan_storage.data();  // workers must see the caller's plans, not their own
  std::ptrdiff_t all_base_tasks = 0;
  for (std::ptrdiff_t i = 0; i < item_count; ++i) {
    plans[i].query_tiles = (items[i].q_len + query_tile - 1) / query_tile;
    plans[i].base_tasks = std::ptrdiff_t(layout.kv_heads) * plans[i].query_tiles;
    all_base_tasks += plans[i].base_tasks;
  }
  const int workers = workers_for(pool, std::ptrdiff_t(1) << 30, threads);
  // Too few (head, tile) tasks to fill every worker (decode, MQA): split the keys too,
  // each split at least min_split_keys long so the merge stays cheap.
  constexpr std::ptrdiff_t min_split_keys = 512;
  std::ptrdiff_t tasks = 0, partial_rows = 0;
  for (std::ptrdiff_t i = 0; i < item_count; ++i) {
    Plan& plan = plans[i];
    plan.splits = 1;
    if (all_base_tasks > 0 && all_base_tasks < 2 * workers) {
      const std::ptrdiff_t wanted = (2 * workers + all_base_tasks - 1) / all_base_tasks;
      plan.splits = int(std::max<std::ptrdiff_t>(1, std::min(wanted, items[i].kv_len / min_split_keys)));
    }
    plan.chunk_major = false;
    if (reads_heads_in_chunks(items[i], rows_per_tile, plan.query_tiles)) {
      plan.splits = int(std::max<std::ptrdiff_t>(plan.splits, items[i].kv_len / heads_chunk_keys));
      plan.chunk_major = true;
    }
    plan.keys_per_split = (items[i].kv_len + plan.splits - 1) / plan.splits;
    plan.first_task = tasks;
    tasks += plan.base_tasks * plan.splits;
    plan.first_partial = partial_rows;
    if (plan.splits > 1) partial_rows += plan.base_tasks * plan.splits * rows_per_tile;
  }
  if (tasks == 0) return;  // no queries: nothing was staged either

  const FusedTask<Isa, HeadDimStatic, GroupStatic, KvT> sizing(items[0], query_tile);
  const std::size_t scratch_floats = sizing.scratch_floats();
  // Split results: every split row's head_dim outputs, then every split row's SoftmaxMass
  // as two floats.
  float* partial_out =
      partial_rows > 0 ? thread_scratch(std::size_t(partial_rows) * (std::size_t(head_dim) + 2), 1) : nullptr;
  float* partial_mass = partial_out ? partial_out + partial_rows * head_dim : nullptr;

  auto item_of = [&](std::ptrdiff_t task) {  // plans are in task order
    std::ptrdiff_t lo = 0, hi = item_count - 1;
    while (lo < hi) {
      const std::ptrdiff_t mid = (lo + hi + 1) / 2;
      if (plans[mid].first_task <= task) lo = mid; else hi = mid - 1;
    }
    return lo;
  };
  struct Tile {
    int kv_head, queries;
    std::ptrdiff_t first_query;
  };
  auto tile_of = [&](const Plan& plan, const AttendArgs<KvT>& item, std::ptrdiff_t base_task) {
    Tile tile;
    tile.kv_head = int(base_task / plan.query_tiles);
    tile.first_query = (base_task % plan.query_tiles) * query_tile;
    tile.queries = int(std::min<std::ptrdiff_t>(query_tile, item.q_len - tile.first_query));
    return tile;
  };

  parallel_for(pool, tasks, threads, [&](std::ptrdiff_t task_index, int) {
    const std::ptrdiff_t item_index = item_of(task_index);
    const Plan& plan = plans[item_index];
    const AttendArgs<KvT>& item = items[item_index];
    const std::ptrdiff_t local = task_index - plan.first_task;
    const std::ptrdiff_t base_task = plan.chunk_major ? local % plan.base_tasks : local / plan.splits;
    const int split = int(plan.chunk_major ? local / plan.base_tasks : local % plan.splits);
    const Tile tile = tile_of(plan, item, base_task);
    const FusedTask<Isa, HeadDimStatic, GroupStatic, KvT> task(item, query_tile);
    float* scratch = thread_scratch(scratch_floats, 0);
    const std::ptrdiff_t key_begin = item.first_key_position + split * plan.keys_per_split;
    const std::ptrdiff_t key_end = std::min(item.key_end(), key_begin + plan.keys_per_split);
    if (plan.splits == 1) {
      task.run(tile.kv_head, tile.first_query, tile.queries, key_begin, key_end, scratch, nullptr, nullptr);
    } else {
      const std::ptrdiff_t slot = plan.first_partial + (base_task * plan.splits + split) * rows_per_tile;
      task.run(tile.kv_head, tile.first_query, tile.queries, key_begin, key_end, scratch,
               partial_out + slot * head_dim, partial_mass + 2 * slot);
    }
  });
  // Log-sum-exp merge of the key splits, row by row, into the output (staged or not).
  if (partial_rows > 0) {
    for (std::ptrdiff_t item_index = 0; item_index < item_count; ++item_index) {
      const Plan& plan = plans[item_index];
      const AttendArgs<KvT>& item = items[item_index];
      if (plan.splits == 1) continue;
      parallel_for(pool, plan.base_tasks, threads, [&](std::ptrdiff_t base_task, int) {
        const Tile tile = tile_of(plan, item, base_task);
        for (int r = 0; r < group * tile.queries; ++r) {
          const std::ptrdiff_t query = tile.first_query + r / group;
          const int q_head = tile.kv_head * group + r % group;
          float* dst = item.out + query * item.out_token_stride + q_head * item.out_head_stride;
          const std::ptrdiff_t first_slot = plan.first_partial + base_task * plan.splits * rows_per_tile + r;
          SoftmaxMass mass = SoftmaxMass::load(partial_mass + 2 * first_slot);
          std::copy_n(partial_out + first_slot * head_dim, head_dim, dst);
          for (int split = 1; split < plan.splits; ++split) {
            const std::ptrdiff_t slot = first_slot + std::ptrdiff_t(split) * rows_per_tile;
            mass = merge_partial(dst, mass, partial_out + slot * head_dim, SoftmaxMass::load(partial_mass + 2 * slot), dst,
                                 head_dim, /*empty_parts_add=*/true);
          }
          if (item.sinks)
            mass = add_sink(dst, mass, item.sinks[q_head], head_dim, item.sees_a_key(query));
          else if (mass.sum == 0.f)  // no key had weight in any split: zeros, as in the reference
            std::fill_n(dst, head_dim, 0.f);
          if (item.lse) item.lse[query * layout.q_heads + q_head] = mass.log_sum_exp();
        }
      });
    }
  }
  staging.write_back(head_dim, pool, threads);
}

/// Run-time head_dim and group size to the compile-time instantiations of the common
/// shapes; anything else runs the same kernel with run-time sizes. All items share a layout.
/// Building with KVHEADS_SHAPE_SPECIALIZATIONS=0 keeps only the run-time-size kernel:
/// the same code and results up to fp32 rounding, slower, but about 30 times less to
/// compile per ISA (our sanitizer builds use it; see .ci/run).
#ifndef KVHEADS_SHAPE_SPECIALIZATIONS
#define KVHEADS_SHAPE_SPECIALIZATIONS 1
#endif
template <class Isa, int HeadDimStatic, class KvT>
void dispatch_group(const AttendArgs<KvT>* items, std::ptrdiff_t count) {
  // Reduced-precision caches are read through the widening stage and are memory-bound;
  // a compile-time group size buys them nothing but compile time, so they run the
  // run-time-group instantiation.
  if constexpr (!std::is_same_v<KvT, float> || !KVHEADS_SHAPE_SPECIALIZATIONS) {
    run_fused_batch<Isa, HeadDimStatic, Dynamic>(items, count);
  } else {
    switch (items[0].layout.group_size()) {
      case 1: return run_fused_batch<Isa, HeadDimStatic, 1>(items, count);
      case 2: return run_fused_batch<Isa, HeadDimStatic, 2>(items, count);
      case 4: return run_fused_batch<Isa, HeadDimStatic, 4>(items, count);
      case 8: return run_fused_batch<Isa, HeadDimStatic, 8>(items, count);
      case 16: return run_fused_batch<Isa, HeadDimStatic, 16>(items, count);
      default: return run_fused_batch<Isa, HeadDimStatic, Dynamic>(items, count);
    }
  }
}

template <class Isa, class KvT>
void dispatch_fused(const AttendArgs<KvT>* items, std::ptrdiff_t count) {
  if (count == 0) return;
  if constexpr (!KVHEADS_SHAPE_SPECIALIZATIONS) {
    dispatch_group<Isa, Dynamic>(items, count);
  } else if constexpr (!std::is_same_v<KvT, float>) {
    // Reduced-precision storage is widened to fp32 in L1 scratch first, and decode over it
    // is memory-bound: only the most common head_dim gets its own instantiation, which
    // keeps the compile time of the three storage types below that of fp32 alone.
    if (items[0].layout.head_dim == 128) return dispatch_group<Isa, 128>(items, count);
    dispatch_group<Isa, Dynamic>(items, count);
  } else {
    switch (items[0].layout.head_dim) {
      case 64: return dispatch_group<Isa, 64>(items, count);
      case 80: return dispatch_group<Isa, 80>(items, count);
      case 96: return dispatch_group<Isa, 96>(items, count);
      case 128: return dispatch_group<Isa, 128>(items, count);
      case 256: return dispatch_group<Isa, 256>(items, count);
      default: return dispatch_group<Isa, Dynamic>(items, count);
    }
  }
}

template <class Isa, class KvT>
void dispatch_fused(const AttendArgs<KvT>& args) {
  dispatch_fused<Isa>(&args, 1);
}

/// Static sizes skip the run-time switch (Attention<T, QHeads, KvHeads, HeadDim>), except
/// where the project compiles the kernels once (KVHEADS_EXTERN_KERNELS) or keeps only the
/// run-time-size kernel (KVHEADS_SHAPE_SPECIALIZATIONS=0): an instantiation of its own
/// shape would be compiled again in every file that runs the layer. The switch reaches the
/// same instantiation for the common shapes, and the run-time-size kernel for the others.
template <class Isa, int HeadDimStatic, int GroupStatic, class KvT>
void dispatch_fused_static(const AttendArgs<KvT>& args) {
#if defined(KVHEADS_EXTERN_KERNELS) || !KVHEADS_SHAPE_SPECIALIZATIONS
  dispatch_fused<Isa>(&args, 1);
#else
  if constexpr (HeadDimStatic == Dynamic)
    dispatch_fused<Isa>(&args, 1);
  else if constexpr (GroupStatic == Dynamic)
    dispatch_group<Isa, HeadDimStatic>(&args, 1);
  else
    run_fused_batch<Isa, HeadDimStatic, GroupStatic>(&args, 1);
#endif
}

}  // namespace kvheads::detail
