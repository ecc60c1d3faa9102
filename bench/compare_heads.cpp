// compare_heads: what choosing kv_heads costs and buys, for one model shape. For every
// kv_heads that divides the source layer's KV heads (MHA -> GQA -> MQA) and every context
// length it reports, as Google Benchmark rows and counters:
//
//   decode/kv:K/ctx:C   the time of one decode step of the whole layer: Attention::forward of
//                       1 token against a cache already holding C tokens. That is the Q/K/V
//                       projections (Eigen GEMV, one thread), the append of the new token's K/V,
//                       the attention over the C+1 cached tokens (options.threads) and the
//                       output projection. attn_ms is the attention alone on the same cache.
//   prefill/kv:K/len:N  a causal prefill of an N-token prompt through Attention::forward into an
//                       empty cache (tok_s = N / time).
//
// and on every row: kvB_tok (cache.bytes_per_token()), kv_MiB (the cache bytes of the row's
// C or N tokens), rel_err = |y_K - y_src| / |y_src| and cosine(y_K, y_src): the drift of the
// layer mean-pooled to K KV heads (kvheads::to_kv_heads) against the source layer, both run
// causally on the same random inputs. A summary table of the same figures, with speed-ups
// over the source layout, follows the benchmark table.
//
// The source layer is synthetic unless a checkpoint is given: an MHA layer whose KV heads are
// correlated, Wk_h = sqrt(s) * shared + sqrt(1 - s) * own_h (same for Wv) with
// s = --kv_similarity, so any two heads' weights have correlation s. Real heads are pooled
// with --checkpoint model.safetensors (or model.safetensors.index.json) --layer N, which reads
// model.layers.N.self_attn.{q,k,v,o}_proj.weight; head counts from --q_heads or config.json.
// No rotary embedding, bias or norm is applied, and the inputs are random in both cases.
//
// Run (defaults: Llama-2-7B's attention shape, about a minute on 2 cores):
//   ./build/bench/compare_heads
//   ./build/bench/compare_heads --d_model=2048 --q_heads=16 --head_dim=128 --contexts=1024,8192
//   ./build/bench/compare_heads --benchmark_out=heads.json --benchmark_out_format=json
//   python3 bench/plot_heads.py heads.json out/
// Flags: --d_model --q_heads --head_dim --contexts=a,b,.. --kv_heads=a,b,.. (default: all
// divisors) --prefill=512 --quality_tokens=256 --kv_similarity=0.8 --threads=0 --seed=1
// --checkpoint=PATH --layer=N --config=PATH; also Google Benchmark's own flags
// (--benchmark_min_time defaults to 0.2 here).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include <kvheads/convert.hpp>
#include <kvheads/kvheads.hpp>

// Reading real checkpoints needs nlohmann/json (header-only); without it the benchmark still
// builds and runs on the synthetic layer.
#if __has_include(<nlohmann/json.hpp>)
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include <kvheads/safetensors.hpp>
#define KVHEADS_COMPARE_HEADS_CHECKPOINTS 1
#else
#define KVHEADS_COMPARE_HEADS_CHECKPOINTS 0
#endif

namespace {

using Clock = std::chrono::steady_clock;
using Layer = kvheads::Attention<float>;  // every size chosen at run time
using Cache = Layer::Cache;
using kvheads::RowMatrix;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// ---------------------------------------------------------------------------------------
// Settings

struct Settings {
  int d_model = 4096;
  int q_heads = 32;
  int head_dim = 128;
  bool q_heads_given = false;
  std::vector<int> contexts{1024, 4096, 16384};
  std::vector<int> kv_heads;  // empty: every divisor of the source's KV heads
  int prefill = 512;
  int quality_tokens = 256;
  double kv_similarity = 0.8;
  int threads = 0;
  std::uint64_t seed = 1;
  std::string checkpoint;
  int layer = 0;
  std::string config;
  // Decode steps a cache takes before it is refilled (untimed) to `context` tokens, so a
  // step always attends over context+1 .. context+kDecodeSlack tokens.
  static constexpr int kDecodeSlack = 32;
};

Settings g_settings;

[[noreturn]] void usage_error(const std::string& message) { throw std::invalid_argument("compare_heads: " + message); }

int parse_int(const std::string& flag, const std::string& text, int min) {
  std::size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || value < min || value > 1'000'000'000)
    usage_error("--" + flag + " (" + text + ") must be an integer >= " + std::to_string(min));
  return int(value);
}

std::vector<int> parse_list(const std::string& flag, const std::string& text) {
  std::vector<int> values;
  std::size_t begin = 0;
  while (begin <= text.size()) {
    const std::size_t comma = std::min(text.find(',', begin), text.size());
    values.push_back(parse_int(flag, text.substr(begin, comma - begin), 1));
    begin = comma + 1;
  }
  return values;
}

double parse_fraction(const std::string& flag, const std::string& text) {
  std::size_t used = 0;
  double value = -1;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || !(value >= 0.0 && value <= 1.0))
    usage_error("--" + flag + " (" + text + ") must be a number in [0, 1]");
  return value;
}

// Takes our flags out of argv (as --name=value or --name value) and leaves the rest for
// Google Benchmark, adding our defaults for its flags the user did not give.
std::vector<char*> parse_flags(int argc, char** argv, Settings& s) {
  static const char* const kOurs[] = {"d_model", "q_heads",       "head_dim", "contexts", "kv_heads",
                                      "prefill", "quality_tokens", "kv_similarity", "threads",  "seed",
                                      "checkpoint", "layer",        "config"};
  std::vector<char*> rest{argv[0]};
  bool min_time = false, tabular = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h")  // Google Benchmark then prints its own flags
      std::printf("compare_heads flags: --d_model=4096 --q_heads=32 --head_dim=128 --contexts=1024,4096,16384\n"
                  "  --kv_heads=a,b,.. (default: every divisor) --prefill=512 --quality_tokens=256\n"
                  "  --kv_similarity=0.8 --threads=0 --seed=1 --checkpoint=PATH --layer=N --config=PATH\n\n");
    if (arg.rfind("--benchmark_min_time", 0) == 0) min_time = true;
    if (arg.rfind("--benchmark_counters_tabular", 0) == 0) tabular = true;
    if (arg.rfind("--", 0) != 0 || arg.rfind("--benchmark_", 0) == 0) {
      rest.push_back(argv[i]);
      continue;
    }
    std::string name = arg.substr(2), value;
    const std::size_t eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (std::find(std::begin(kOurs), std::end(kOurs), name) == std::end(kOurs)) {
      rest.push_back(argv[i]);  // Google Benchmark reports it as unrecognized
      continue;
    }
    if (eq == std::string::npos) {
      if (i + 1 >= argc) usage_error("--" + name + " needs a value");
      value = argv[++i];
    }
    if (name == "d_model") s.d_model = parse_int(name, value, 1);
    if (name == "q_heads") s.q_heads = parse_int(name, value, 1), s.q_heads_given = true;
    if (name == "head_dim") s.head_dim = parse_int(name, value, 1);
    if (name == "contexts") s.contexts = parse_list(name, value);
    if (name == "kv_heads") s.kv_heads = parse_list(name, value);
    if (name == "prefill") s.prefill = parse_int(name, value, 0);
    if (name == "quality_tokens") s.quality_tokens = parse_int(name, value, 1);
    if (name == "kv_similarity") s.kv_similarity = parse_fraction(name, value);
    if (name == "threads") s.threads = parse_int(name, value, 0);
    if (name == "seed") s.seed = std::uint64_t(parse_int(name, value, 0));
    if (name == "checkpoint") s.checkpoint = value;
    if (name == "layer") s.layer = parse_int(name, value, 0);
    if (name == "config") s.config = value;
  }
  static char default_min_time[] = "--benchmark_min_time=0.2";
  static char default_tabular[] = "--benchmark_counters_tabular=true";
  if (!min_time) rest.push_back(default_min_time);
  if (!tabular) rest.push_back(default_tabular);
  return rest;
}

// ---------------------------------------------------------------------------------------
// Random data: splitmix64, uniform with a chosen standard deviation (fast enough for the
// hundreds of MB a 16k-token MHA cache needs; the values only need to be ordinary).

class Random {
 public:
  explicit Random(std::uint64_t seed) : state_(seed * 0x9e3779b97f4a7c15ull + 0x2545f4914f6cdd1dull) {}
  /// Uniform in [-sqrt(3), sqrt(3)): mean 0, variance 1.
  float unit() {
    state_ += 0x9e3779b97f4a7c15ull;
    std::uint64_t z = state_;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (float(z >> 40) * (2.0f / 16777216.0f) - 1.0f) * 1.7320508f;
  }
  void fill(float* p, std::size_t n, float stddev = 1.f) {
    for (std::size_t i = 0; i < n; ++i) p[i] = stddev * unit();
  }

 private:
  std::uint64_t state_;
};

// ---------------------------------------------------------------------------------------
// The source layer

struct Source {
  std::unique_ptr<Layer> layer;
  std::string description;
};

Source make_synthetic(const Settings& s) {
  const kvheads::HeadLayout layout = kvheads::make_layout(s.q_heads, s.q_heads, s.head_dim);
  Source source;
  source.layer = std::make_unique<Layer>(s.d_model, layout);
  Layer& layer = *source.layer;
  Random rng(s.seed);
  // Weights with variance 1/fan_in, so projections of unit-variance inputs have unit variance.
  rng.fill(layer.wq().data(), std::size_t(layer.wq().size()), 1.f / std::sqrt(float(s.d_model)));
  rng.fill(layer.wo().data(), std::size_t(layer.wo().size()), 1.f / std::sqrt(float(layout.q_width())));
  // Correlated KV heads: each head = sqrt(s) * shared + sqrt(1 - s) * its own, per weight.
  const float shared_weight = float(std::sqrt(s.kv_similarity)), own_weight = float(std::sqrt(1.0 - s.kv_similarity));
  RowMatrix shared(s.d_model, s.head_dim);
  for (RowMatrix* w : {&layer.wk(), &layer.wv()}) {
    rng.fill(shared.data(), std::size_t(shared.size()));
    rng.fill(w->data(), std::size_t(w->size()));
    const float stddev = 1.f / std::sqrt(float(s.d_model));
    for (int h = 0; h < layout.kv_heads; ++h)
      w->middleCols(Eigen::Index(h) * s.head_dim, s.head_dim) =
          stddev * (shared_weight * shared + own_weight * w->middleCols(Eigen::Index(h) * s.head_dim, s.head_dim));
  }
  char text[200];
  std::snprintf(text, sizeof text,
                "synthetic MHA layer (random weights; KV heads correlated with kv_similarity=%.2f: "
                "W_h = sqrt(s)*shared + sqrt(1-s)*own_h)",
                s.kv_similarity);
  source.description = text;
  return source;
}

#if KVHEADS_COMPARE_HEADS_CHECKPOINTS

nlohmann::json read_json_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path.string());
  return nlohmann::json::parse(in);
}

// Reads the named tensors of a safetensors file, and only those: a checkpoint may be many
// GB, of which one layer's attention is a few hundred MB.
std::map<std::string, kvheads::SafetensorsTensor> read_tensors(const std::filesystem::path& path,
                                                               const std::vector<std::string>& names) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path.string());
  unsigned char size_bytes[8] = {};
  in.read(reinterpret_cast<char*>(size_bytes), 8);
  std::uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | size_bytes[i];
  if (!in || header_size > kvheads::kSafetensorsMaxHeader)
    throw std::runtime_error(path.string() + " is not a safetensors file (bad header size)");
  std::string header(std::size_t(header_size), '\0');
  in.read(header.data(), std::streamsize(header_size));
  if (!in) throw std::runtime_error(path.string() + ": truncated header");
  const nlohmann::json index = nlohmann::json::parse(header);
  std::map<std::string, kvheads::SafetensorsTensor> out;
  for (const std::string& name : names) {
    if (!index.contains(name)) throw std::runtime_error(path.string() + " has no tensor '" + name + "'");
    const nlohmann::json& entry = index.at(name);
    kvheads::SafetensorsTensor t;
    t.name = name;
    t.dtype = entry.at("dtype").get<std::string>();
    t.shape = entry.at("shape").get<std::vector<std::int64_t>>();
    const auto offsets = entry.at("data_offsets").get<std::vector<std::uint64_t>>();
    const std::size_t element = t.dtype == "F32" ? 4 : (t.dtype == "F16" || t.dtype == "BF16") ? 2 : 0;
    if (element == 0) throw std::runtime_error("tensor '" + name + "' has dtype " + t.dtype + " (expected F32, F16, BF16)");
    if (offsets.size() != 2 || offsets[1] < offsets[0] || offsets[1] - offsets[0] != std::uint64_t(t.numel()) * element)
      throw std::runtime_error("tensor '" + name + "': data_offsets do not match its shape and dtype");
    t.bytes.resize(std::size_t(offsets[1] - offsets[0]));
    in.seekg(std::streamoff(8 + header_size + offsets[0]));
    in.read(reinterpret_cast<char*>(t.bytes.data()), std::streamsize(t.bytes.size()));
    if (!in) throw std::runtime_error(path.string() + ": truncated data of tensor '" + name + "'");
    out.emplace(name, std::move(t));
  }
  return out;
}

// A Hugging Face [out][in] weight as our [in][out] matrix.
RowMatrix transposed(const kvheads::SafetensorsTensor& t) {
  if (t.shape.size() != 2) throw std::runtime_error("tensor '" + t.name + "' is not 2-D");
  const std::vector<float> values = t.to_f32();
  return Eigen::Map<const RowMatrix>(values.data(), Eigen::Index(t.shape[0]), Eigen::Index(t.shape[1])).transpose();
}

Source load_checkpoint(Settings& s) {
  namespace fs = std::filesystem;
  const fs::path path(s.checkpoint);
  const std::string prefix = "model.layers." + std::to_string(s.layer) + ".self_attn.";
  const std::vector<std::string> names{prefix + "q_proj.weight", prefix + "k_proj.weight", prefix + "v_proj.weight",
                                       prefix + "o_proj.weight"};
  // Sharded checkpoints: model.safetensors.index.json maps each tensor to its file.
  std::map<std::string, kvheads::SafetensorsTensor> tensors;
  const std::string file = path.filename().string();
  if (file.size() > 11 && file.compare(file.size() - 11, 11, ".index.json") == 0) {
    const nlohmann::json map = read_json_file(path).at("weight_map");
    for (const std::string& name : names) {
      if (!map.contains(name)) throw std::runtime_error(path.string() + " does not list '" + name + "'");
      auto one = read_tensors(path.parent_path() / map.at(name).get<std::string>(), {name});
      tensors.emplace(name, std::move(one.at(name)));
    }
  } else {
    tensors = read_tensors(path, names);
  }
  // Head counts: --q_heads, else config.json (given, or beside the checkpoint).
  const fs::path config_path = s.config.empty() ? path.parent_path() / "config.json" : fs::path(s.config);
  int config_heads = 0;
  if (fs::exists(config_path)) {
    const nlohmann::ordered_json config = nlohmann::ordered_json::parse(std::ifstream(config_path));
    config_heads = kvheads::read_llama_config(config).num_attention_heads;
  } else if (!s.config.empty()) {
    throw std::runtime_error("config " + s.config + " does not exist");
  }
  if (!s.q_heads_given && config_heads == 0)
    throw std::runtime_error("the number of query heads is unknown: pass --q_heads or put config.json beside " +
                             s.checkpoint);
  if (!s.q_heads_given) s.q_heads = config_heads;

  RowMatrix wq = transposed(tensors.at(names[0])), wk = transposed(tensors.at(names[1])),
            wv = transposed(tensors.at(names[2])), wo = transposed(tensors.at(names[3]));
  if (wq.cols() % s.q_heads != 0)
    throw std::runtime_error(names[0] + " has " + std::to_string(wq.cols()) + " rows, not a multiple of q_heads (" +
                             std::to_string(s.q_heads) + ")");
  s.d_model = int(wq.rows());
  s.head_dim = int(wq.cols() / s.q_heads);
  if (wk.cols() % s.head_dim != 0)
    throw std::runtime_error(names[1] + " has " + std::to_string(wk.cols()) + " rows, not a multiple of head_dim (" +
                             std::to_string(s.head_dim) + ")");
  const kvheads::HeadLayout layout = kvheads::make_layout(s.q_heads, int(wk.cols() / s.head_dim), s.head_dim);
  Source source;
  source.layer = std::make_unique<Layer>(layout, wq, wk, wv, wo);
  source.description = "layer " + std::to_string(s.layer) + " of " + s.checkpoint + " (" +
                       std::to_string(layout.kv_heads) + " KV heads; no RoPE/bias/norm, random inputs)";
  return source;
}

#else

Source load_checkpoint(Settings&) {
  throw std::runtime_error("this build has no nlohmann/json, so --checkpoint is unavailable "
                           "(apt-get install nlohmann-json3-dev and rebuild)");
}

#endif

// ---------------------------------------------------------------------------------------
// Shared state: the benchmark functions run several times each (Google Benchmark grows the
// iteration count), so layers, caches and drift figures are built once and reused.

std::unique_ptr<Layer> g_source;
std::string g_source_description;

int g_converted_kv = 0;
std::unique_ptr<Layer> g_converted;

const Layer& layer_for(int kv_heads) {
  if (kv_heads == g_source->layout().kv_heads) return *g_source;
  if (g_converted_kv != kv_heads) {
    g_converted.reset();  // free the previous one first: a 4096-wide layer is ~0.2 GB
    g_converted = std::make_unique<Layer>(kvheads::to_kv_heads(*g_source, kv_heads));
    g_converted_kv = kv_heads;
  }
  return *g_converted;
}

kvheads::AttentionOptions options() {
  kvheads::AttentionOptions o;
  o.causal = true;
  o.threads = g_settings.threads;
  return o;
}

struct Drift {
  double rel_err = 0;
  double cosine = 1;
};

// The source layer's output on the quality inputs, computed once.
const std::vector<float>& quality_inputs() {
  static const std::vector<float> x = [] {
    std::vector<float> values(std::size_t(g_settings.quality_tokens) * std::size_t(g_settings.d_model));
    Random(g_settings.seed + 101).fill(values.data(), values.size());
    return values;
  }();
  return x;
}

std::vector<float> run_layer(const Layer& layer, const std::vector<float>& x) {
  const int n = g_settings.quality_tokens;
  Cache cache = layer.make_cache(n);
  std::vector<float> y(x.size());
  layer.forward(x.data(), n, cache, y.data(), options());
  return y;
}

Drift drift_for(int kv_heads) {
  static std::map<int, Drift> cache;
  const auto found = cache.find(kv_heads);
  if (found != cache.end()) return found->second;
  Drift drift;
  if (kv_heads != g_source->layout().kv_heads) {
    static const std::vector<float> reference = run_layer(*g_source, quality_inputs());
    const std::vector<float> y = run_layer(layer_for(kv_heads), quality_inputs());
    double diff = 0, dot = 0, norm_ref = 0, norm_y = 0;
    for (std::size_t i = 0; i < y.size(); ++i) {
      const double a = reference[i], b = y[i];
      diff += (b - a) * (b - a);
      dot += a * b;
      norm_ref += a * a;
      norm_y += b * b;
    }
    drift.rel_err = std::sqrt(diff / norm_ref);
    drift.cosine = dot / std::sqrt(norm_ref * norm_y);
  }
  cache.emplace(kv_heads, drift);
  return drift;
}

// Random K/V appended straight into a cache (a full prefill of 16k tokens would take far
// longer than the decode step it sets up). A pool of tokens is appended again and again.
void fill_cache(Cache& cache, int tokens) {
  const kvheads::HeadLayout& layout = cache.layout();
  const int pool_tokens = std::max(1, std::min(tokens, 256));
  static std::vector<float> k, v;
  const std::size_t pool_size = std::size_t(pool_tokens) * std::size_t(layout.kv_width());
  if (k.size() != pool_size) {
    k.resize(pool_size);
    v.resize(pool_size);
    Random rng(g_settings.seed + 7);
    rng.fill(k.data(), k.size());
    rng.fill(v.data(), v.size());
  }
  cache.clear();
  while (cache.size() < tokens) {
    const int n = std::min(pool_tokens, tokens - cache.size());
    cache.append(k.data(), v.data(), n);
  }
}

// The decode cache of the row being measured: created and filled once per row.
Cache& decode_cache(const Layer& layer, int context) {
  static std::unique_ptr<Cache> cache;
  static std::pair<int, int> key{0, 0};
  const std::pair<int, int> wanted{layer.layout().kv_heads, context};
  if (!cache || key != wanted) {
    cache.reset();
    cache = std::make_unique<Cache>(layer.make_cache(context + Settings::kDecodeSlack));
    fill_cache(*cache, context);
    key = wanted;
  }
  return *cache;
}

// What the summary table shows, filled by the benchmark runs (the last run of a row wins).
struct RowResult {
  double decode_ms = 0;
  double attn_ms = 0;
};
std::map<std::pair<int, int>, RowResult> g_decode;  // (kv_heads, context)
std::map<int, double> g_prefill_tok_s;              // kv_heads

std::string label_of(const kvheads::HeadLayout& layout, int source_kv) {
  if (layout.kv_heads == layout.q_heads) return "MHA";
  if (layout.kv_heads == 1) return "MQA";
  std::string label = "GQA-" + std::to_string(layout.kv_heads);
  if (layout.kv_heads == source_kv) label += " (source)";
  return label;
}

std::map<int, std::size_t> g_bytes_per_token;       // kv_heads

void set_common_counters(benchmark::State& state, const Layer& layer, const Cache& cache, int tokens, double tok_s,
                         double attn_ms) {
  const kvheads::HeadLayout& layout = layer.layout();
  const Drift drift = drift_for(layout.kv_heads);
  g_bytes_per_token[layout.kv_heads] = cache.bytes_per_token();
  const double bytes_per_token = double(cache.bytes_per_token());
  state.counters["kv_heads"] = layout.kv_heads;
  state.counters["tok_s"] = tok_s;
  state.counters["attn_ms"] = attn_ms;
  state.counters["kvB_tok"] = bytes_per_token;
  state.counters["kv_MiB"] = bytes_per_token * tokens / double(1 << 20);
  state.counters["rel_err"] = drift.rel_err;
  state.counters["cosine"] = drift.cosine;
  state.SetLabel(label_of(layout, g_source->layout().kv_heads));
}

// ---------------------------------------------------------------------------------------
// The benchmarks

void bm_decode(benchmark::State& state, int kv_heads, int context) {
  const Layer& layer = layer_for(kv_heads);
  Cache& cache = decode_cache(layer, context);
  const kvheads::AttentionOptions opts = options();
  Random rng(g_settings.seed + 3);
  std::vector<float> x(std::size_t(layer.d_model())), out(x.size());
  std::vector<float> q(std::size_t(layer.layout().q_width())), attended(q.size());
  rng.fill(x.data(), x.size());
  rng.fill(q.data(), q.size());
  double forward_s = 0, attn_s = 0;
  for (auto _ : state) {
    const Clock::time_point start = Clock::now();
    layer.forward(x.data(), 1, cache, out.data(), opts);
    const double dt = seconds_since(start);
    state.SetIterationTime(dt);
    forward_s += dt;
    benchmark::DoNotOptimize(out.data());
    state.PauseTiming();
    // The attention alone, on the same cache, for the attn_ms counter.
    const Clock::time_point attn_start = Clock::now();
    kvheads::attend(q.data(), 1, cache, attended.data(), opts);
    attn_s += seconds_since(attn_start);
    benchmark::DoNotOptimize(attended.data());
    if (cache.size() == cache.capacity()) fill_cache(cache, context);
    state.ResumeTiming();
  }
  const double iterations = double(state.iterations());
  const double decode_ms = 1e3 * forward_s / iterations, attn_ms = 1e3 * attn_s / iterations;
  g_decode[{kv_heads, context}] = RowResult{decode_ms, attn_ms};
  set_common_counters(state, layer, cache, context, 1e3 / decode_ms, attn_ms);
}

void bm_prefill(benchmark::State& state, int kv_heads, int tokens) {
  const Layer& layer = layer_for(kv_heads);
  Cache cache = layer.make_cache(tokens);
  const kvheads::AttentionOptions opts = options();
  Random rng(g_settings.seed + 5);
  std::vector<float> x(std::size_t(tokens) * std::size_t(layer.d_model())), out(x.size());
  std::vector<float> q(std::size_t(tokens) * std::size_t(layer.layout().q_width())), attended(q.size());
  rng.fill(x.data(), x.size());
  rng.fill(q.data(), q.size());
  double forward_s = 0, attn_s = 0;
  for (auto _ : state) {
    state.PauseTiming();
    cache.clear();
    state.ResumeTiming();
    const Clock::time_point start = Clock::now();
    layer.forward(x.data(), tokens, cache, out.data(), opts);
    const double dt = seconds_since(start);
    state.SetIterationTime(dt);
    forward_s += dt;
    benchmark::DoNotOptimize(out.data());
    state.PauseTiming();
    const Clock::time_point attn_start = Clock::now();
    kvheads::attend(q.data(), tokens, cache, attended.data(), opts);  // causal, the attention alone
    attn_s += seconds_since(attn_start);
    benchmark::DoNotOptimize(attended.data());
    state.ResumeTiming();
  }
  const double iterations = double(state.iterations());
  const double tok_s = tokens * iterations / forward_s;
  g_prefill_tok_s[kv_heads] = tok_s;
  set_common_counters(state, layer, cache, tokens, tok_s, 1e3 * attn_s / iterations);
}

// ---------------------------------------------------------------------------------------
// Registration from one table, and the summary

struct Case {
  enum Kind { kDecode, kPrefill } kind;
  int kv_heads;
  int tokens;  // context (decode) or prompt length (prefill)
};

std::vector<Case> case_table(const std::vector<int>& kv_list) {
  std::vector<Case> table;
  for (int kv : kv_list) {  // kv outer: one layer conversion per kv_heads
    for (int context : g_settings.contexts) table.push_back({Case::kDecode, kv, context});
    if (g_settings.prefill > 0) table.push_back({Case::kPrefill, kv, g_settings.prefill});
  }
  return table;
}

std::vector<int> kv_sweep(int source_kv) {
  std::vector<int> list;
  if (g_settings.kv_heads.empty()) {
    for (int kv = source_kv; kv >= 1; --kv)
      if (source_kv % kv == 0) list.push_back(kv);
    return list;
  }
  for (int kv : g_settings.kv_heads) {
    if (source_kv % kv != 0)
      usage_error("--kv_heads: " + std::to_string(kv) + " does not divide the source layer's KV heads (" +
                  std::to_string(source_kv) + ")");
    list.push_back(kv);
  }
  return list;
}

void print_summary(std::FILE* out, const std::vector<int>& kv_list) {
  const int source_kv = g_source->layout().kv_heads;
  std::fprintf(out, "\nSummary (%s; d_model %d, q_heads %d, head_dim %d; decode = one whole-layer step)\n",
               g_source_description.c_str(), g_settings.d_model, g_source->layout().q_heads,
               g_source->layout().head_dim);
  std::fprintf(out, "%-14s %8s %9s %9s %9s", "layout", "kv_heads", "KV B/tok", "rel_err", "cosine");
  for (int context : g_settings.contexts) std::fprintf(out, " %11s %7s", ("ms@" + std::to_string(context)).c_str(), "speedup");
  if (g_settings.prefill > 0) std::fprintf(out, " %12s", ("prefill" + std::to_string(g_settings.prefill) + " tok/s").c_str());
  std::fprintf(out, "\n");
  for (int kv : kv_list) {
    if (g_bytes_per_token.count(kv) == 0) continue;  // filtered out: not run
    const kvheads::HeadLayout layout{g_source->layout().q_heads, kv, g_source->layout().head_dim};
    const Drift drift = drift_for(kv);
    std::fprintf(out, "%-14s %8d %9zu %9.4f %9.5f", label_of(layout, source_kv).c_str(), kv,
                 g_bytes_per_token[kv], drift.rel_err, drift.cosine);
    for (int context : g_settings.contexts) {
      const auto row = g_decode.find({kv, context});
      const auto base = g_decode.find({source_kv, context});
      if (row == g_decode.end()) {
        std::fprintf(out, " %11s %7s", "-", "-");
        continue;
      }
      std::fprintf(out, " %11.3f", row->second.decode_ms);
      if (base != g_decode.end())
        std::fprintf(out, " %6.2fx", base->second.decode_ms / row->second.decode_ms);
      else
        std::fprintf(out, " %7s", "-");
    }
    const auto prefill = g_prefill_tok_s.find(kv);
    if (g_settings.prefill > 0) {
      if (prefill != g_prefill_tok_s.end())
        std::fprintf(out, " %20.0f", prefill->second);
      else
        std::fprintf(out, " %20s", "-");
    }
    std::fprintf(out, "\n");
  }
  std::fprintf(out, "speedup = decode time of the source layout (kv_heads %d) / this one, same context.\n", source_kv);
}

}  // namespace

int main(int argc, char** argv) {
  const Clock::time_point start = Clock::now();
  std::vector<char*> args;
  std::vector<int> kv_list;
  try {
    args = parse_flags(argc, argv, g_settings);
    Source source = g_settings.checkpoint.empty() ? make_synthetic(g_settings) : load_checkpoint(g_settings);
    g_source = std::move(source.layer);
    g_source_description = std::move(source.description);
    kv_list = kv_sweep(g_source->layout().kv_heads);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s\n", error.what());
    return 2;
  }
  int benchmark_argc = int(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&benchmark_argc, args.data());
  if (benchmark::ReportUnrecognizedArguments(benchmark_argc, args.data())) return 2;

  // JSON or CSV on stdout must stay parseable: our notes and summary then go to stderr.
  bool console = true;
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], "--benchmark_format=", 19) == 0 && std::strcmp(argv[i] + 19, "console") != 0)
      console = false;
  std::FILE* notes = console ? stdout : stderr;

  const kvheads::HeadLayout& source = g_source->layout();
  const bool synthetic = g_settings.checkpoint.empty();
  std::fprintf(notes, "compare_heads: %s\n", g_source_description.c_str());
  std::fprintf(notes, "  %s\n", synthetic ? "NOTE: quality drift is measured on a SYNTHETIC layer, not a trained model"
                                          : "quality drift measured on the checkpoint's weights");
  std::fprintf(notes,
               "  decode = Attention::forward of 1 token (Q/K/V projections, cache append, attention over the\n"
               "  cached context, output projection); attn_ms = the attention alone; drift over %d causal tokens\n",
               g_settings.quality_tokens);
  std::fflush(notes);
  benchmark::AddCustomContext("kvheads_source", g_source_description);
  benchmark::AddCustomContext("kvheads_weights", synthetic ? "synthetic" : "checkpoint");
  char similarity[32];
  std::snprintf(similarity, sizeof similarity, "%.2f", g_settings.kv_similarity);
  benchmark::AddCustomContext("kvheads_kv_similarity", synthetic ? similarity : "n/a");
  benchmark::AddCustomContext("kvheads_shape", "d_model=" + std::to_string(g_settings.d_model) +
                                                   " q_heads=" + std::to_string(source.q_heads) +
                                                   " head_dim=" + std::to_string(source.head_dim) +
                                                   " source_kv_heads=" + std::to_string(source.kv_heads));
  benchmark::AddCustomContext("kvheads_decode", "one Attention::forward of 1 token: QKV projections + append + "
                                                "attention over context+1..context+" +
                                                    std::to_string(Settings::kDecodeSlack) + " tokens + output projection");
  benchmark::AddCustomContext("kvheads_quality_tokens", std::to_string(g_settings.quality_tokens));
  benchmark::AddCustomContext("kvheads_threads", std::to_string(g_settings.threads));

  for (const Case& c : case_table(kv_list)) {
    std::string name;
    benchmark::internal::Benchmark* b = nullptr;
    if (c.kind == Case::kDecode) {
      name = "decode/kv:" + std::to_string(c.kv_heads) + "/ctx:" + std::to_string(c.tokens);
      b = benchmark::RegisterBenchmark(name.c_str(), bm_decode, c.kv_heads, c.tokens);
    } else {
      name = "prefill/kv:" + std::to_string(c.kv_heads) + "/len:" + std::to_string(c.tokens);
      b = benchmark::RegisterBenchmark(name.c_str(), bm_prefill, c.kv_heads, c.tokens);
    }
    b->UseManualTime()->Unit(benchmark::kMillisecond);
  }

  try {
    benchmark::RunSpecifiedBenchmarks();
  } catch (const std::exception& error) {
    std::fprintf(stderr, "compare_heads: %s\n", error.what());
    return 1;
  }
  benchmark::Shutdown();
  print_summary(notes, kv_list);
  std::fprintf(notes, "total wall time: %.1f s\n", seconds_since(start));
  return 0;
}
