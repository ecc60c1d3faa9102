// kvheads-convert: turns a Llama-style safetensors checkpoint (MHA or GQA) into one with fewer
// KV heads by mean-pooling the k_proj/v_proj weights of every layer, the conversion of the GQA
// paper (Ainslie et al. 2023). Every other tensor is copied unchanged, in its own dtype.
//
//   kvheads-convert in.safetensors out.safetensors --kv-heads N [--heads H] [--config config.json]
//
// The number of attention heads comes from --heads or from a Hugging Face config.json
// (num_attention_heads, num_key_value_heads, hidden_size), by default the one next to the
// input. When a config was found, a copy with num_key_value_heads = N is written as
// config.json next to the output, so keep the output in its own directory. Example:
//
//   mkdir -p llama-gqa4
//   kvheads-convert llama/model.safetensors llama-gqa4/model.safetensors --kv-heads 4
//
// The whole conversion is kvheads::convert_checkpoint_file() in kvheads/safetensors.hpp; this
// file only parses the command line. The pooled model usually needs some uptraining (the paper
// uses ~5% of the original pre-training) to recover its quality.
#include <cstdio>
#include <exception>
#include <string>

#include "kvheads/safetensors.hpp"

namespace {

const char* const kUsage =
    "usage: kvheads-convert in.safetensors out.safetensors --kv-heads N [--heads H] [--config config.json]\n"
    "  --kv-heads N     KV heads of the result; must divide the checkpoint's KV heads\n"
    "  --heads H        attention (query) heads; default: num_attention_heads from the config\n"
    "  --config PATH    Hugging Face config.json; default: config.json next to the input, if any\n";

// A whole positive int, or -1.
int parse_positive(const std::string& text) {
  if (text.empty() || text.size() > 9) return -1;
  int value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return -1;
    value = value * 10 + (c - '0');
  }
  return value > 0 ? value : -1;
}

int usage_error(const std::string& message) {
  std::fprintf(stderr, "kvheads-convert: %s\n%s", message.c_str(), kUsage);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string in, out;
  kvheads::ConvertFileOptions options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (arg == "--kv-heads" || arg == "--heads" || arg == "--config") {
      if (i + 1 >= argc) return usage_error(arg + " needs a value");
      const std::string value = argv[++i];
      if (arg == "--config") {
        options.config_path = value;
        continue;
      }
      const int n = parse_positive(value);
      if (n < 0) return usage_error(arg + " must be a positive integer, got '" + value + "'");
      (arg == "--kv-heads" ? options.to_kv_heads : options.q_heads) = n;
    } else if (!arg.empty() && arg[0] == '-') {
      return usage_error("unknown option '" + arg + "'");
    } else if (in.empty()) {
      in = arg;
    } else if (out.empty()) {
      out = arg;
    } else {
      return usage_error("unexpected argument '" + arg + "'");
    }
  }
  if (in.empty() || out.empty()) return usage_error("need an input and an output file");
  if (options.to_kv_heads == 0) return usage_error("--kv-heads is required");

  try {
    const kvheads::ConvertFileResult result = kvheads::convert_checkpoint_file(in, out, options);
    const kvheads::ConversionSummary& s = result.summary;
    std::printf("%s -> %s: %d layers, head_dim %d, %d -> %d KV heads; pooled %zu tensors, copied %zu\n", in.c_str(),
                out.c_str(), s.layers, s.head_dim, s.from_kv_heads, s.to_kv_heads, s.pooled.size(), s.copied);
    if (!result.config_out.empty())
      std::printf("config: %s -> %s (num_key_value_heads = %d)\n", result.config_in.c_str(),
                  result.config_out.c_str(), s.to_kv_heads);
    else
      std::printf("config: none found next to the input; no config.json written\n");
    return 0;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "kvheads-convert: error: %s\n", error.what());
    return 1;
  }
}
