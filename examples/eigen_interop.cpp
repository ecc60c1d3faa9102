// eigen_interop: kvheads on Eigen data, without copies. The kernels read row-major memory, so
// an Eigen matrix with RowMajor storage (kvheads::RowMatrix) or an Eigen::Map over a buffer
// you already own passes straight through: .data() for kvheads::attend, and Eigen::Ref (which
// binds to matrices, Maps and row blocks alike) for Attention::forward. Every result is
// checked against kvheads::reference_attend (double precision).
//
// Run: ./build/examples/eigen_interop [tokens=96] [q_heads=8] [kv_heads=2] [head_dim=64]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include <Eigen/Core>

#include <kvheads/kvheads.hpp>

namespace {

using kvheads::RowMatrix;  // Eigen::Matrix<float, Dynamic, Dynamic, RowMajor>
// Row-major matters: a row of Q is one token's [q_heads][head_dim], as the kernels expect.
// (A column-major Eigen::MatrixXf holds the transpose of that layout; pass it to forward()
// and Eigen::Ref makes a row-major temporary copy; pass its .data() to attend() and the
// result is wrong.)
static_assert(RowMatrix::IsRowMajor, "kvheads works on row-major matrices");

int failures = 0;

// Largest |a - b| relative to the largest |b|, printed with a verdict.
void check(const char* what, const Eigen::Ref<const RowMatrix>& a, const Eigen::Ref<const RowMatrix>& b) {
  const double error = double((a - b).cwiseAbs().maxCoeff()) / std::max(1e-30, double(b.cwiseAbs().maxCoeff()));
  const bool ok = error < 1e-4;
  failures += ok ? 0 : 1;
  std::printf("  %-58s max rel. error %.1e %s\n", what, error, ok ? "ok" : "MISMATCH");
}

void check_same(const char* what, const void* a, const void* b) {
  failures += a == b ? 0 : 1;
  std::printf("  %-58s %s\n", what, a == b ? "yes, same memory" : "NO: a copy was made");
}

// The reference over plain [tokens][heads][head_dim] memory: the oracle for every check.
RowMatrix reference(const RowMatrix& q, const RowMatrix& k, const RowMatrix& v, kvheads::HeadLayout layout,
                    const kvheads::AttentionOptions& options) {
  RowMatrix out(q.rows(), q.cols());
  kvheads::reference_attend(q.data(), k.data(), v.data(), out.data(), int(q.rows()), int(k.rows()), layout, options);
  return out;
}

int arg(int argc, char** argv, int index, int fallback) {
  if (argc <= index) return fallback;
  const int value = std::atoi(argv[index]);
  if (value <= 0) throw std::invalid_argument(std::string("argument ") + argv[index] + " must be a positive integer");
  return value;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const int tokens = arg(argc, argv, 1, 96);
    const kvheads::HeadLayout layout =
        kvheads::make_layout(arg(argc, argv, 2, 8), arg(argc, argv, 3, 2), arg(argc, argv, 4, 64));
    const int q_width = int(layout.q_width()), kv_width = int(layout.kv_width()), d_model = 256;
    kvheads::AttentionOptions options;
    options.causal = true;
    std::printf("%d tokens, %d query heads, %d KV heads, head_dim %d\n", tokens, layout.q_heads, layout.kv_heads,
                layout.head_dim);

    // 1. Eigen matrices: Q [tokens][q_heads*head_dim], K and V [tokens][kv_heads*head_dim].
    std::printf("1. attend() on RowMatrix storage\n");
    const RowMatrix q = RowMatrix::Random(tokens, q_width);
    const RowMatrix k = RowMatrix::Random(tokens, kv_width), v = RowMatrix::Random(tokens, kv_width);
    RowMatrix out(tokens, q_width);
    kvheads::attend(q.data(), k.data(), v.data(), out.data(), tokens, tokens, layout, options);
    check("causal attention, Q/K/V/out as RowMatrix", out, reference(q, k, v, layout, options));

    // 2. Eigen::Map over buffers you already own (another library's tensors, an mmap, ...):
    //    Eigen computes into them in place, attend() reads and writes them in place.
    std::printf("2. attend() on Eigen::Map over existing buffers\n");
    const RowMatrix x = RowMatrix::Random(tokens, d_model);
    const RowMatrix wq = RowMatrix::Random(d_model, q_width) / std::sqrt(float(d_model));
    const RowMatrix wk = RowMatrix::Random(d_model, kv_width) / std::sqrt(float(d_model));
    const RowMatrix wv = RowMatrix::Random(d_model, kv_width) / std::sqrt(float(d_model));
    const RowMatrix wo = RowMatrix::Random(q_width, d_model) / std::sqrt(float(q_width));
    std::vector<float> q_buffer(std::size_t(tokens) * std::size_t(q_width)), k_buffer(std::size_t(tokens) * kv_width),
        v_buffer(k_buffer.size()), out_buffer(q_buffer.size());
    Eigen::Map<RowMatrix> q_map(q_buffer.data(), tokens, q_width), k_map(k_buffer.data(), tokens, kv_width),
        v_map(v_buffer.data(), tokens, kv_width), out_map(out_buffer.data(), tokens, q_width);
    q_map.noalias() = x * wq;  // projections written straight into the buffers
    k_map.noalias() = x * wk;
    v_map.noalias() = x * wv;
    kvheads::attend(q_map.data(), k_map.data(), v_map.data(), out_map.data(), tokens, tokens, layout, options);
    const Eigen::Ref<const RowMatrix> q_ref = q_map;  // what Attention::forward would receive
    check_same("Eigen::Ref of q_map points into q_buffer?", q_ref.data(), q_buffer.data());
    const RowMatrix expected = reference(q_map, k_map, v_map, layout, options);
    check("causal attention over the mapped buffers", out_map, expected);

    // 3. A whole layer: Attention::forward takes Eigen::Ref, so a Map or a block of rows of a
    //    bigger row-major matrix binds without a copy. (The layer owns copies of its weights.)
    std::printf("3. Attention::forward on Maps and row blocks\n");
    kvheads::Attention<float> layer(layout, wq, wk, wv, wo);
    auto cache = layer.make_cache(tokens);
    const int prompt = tokens / 2;
    const Eigen::Ref<const RowMatrix> prompt_rows = x.topRows(prompt);
    check_same("x.topRows(prompt) as Eigen::Ref points into x?", prompt_rows.data(), x.data());
    const RowMatrix y_prompt = layer.forward(prompt_rows, cache, options);  // Eigen overload
    // The remaining tokens one at a time, through the pointer overload, into a Map.
    std::vector<float> y_buffer(std::size_t(tokens - prompt) * std::size_t(d_model));
    Eigen::Map<RowMatrix> y_rest(y_buffer.data(), tokens - prompt, d_model);
    for (int t = prompt; t < tokens; ++t) layer.forward(x.row(t).data(), 1, cache, y_rest.row(t - prompt).data(), options);
    // Expected: the same layer computed by hand, attention from the reference.
    const RowMatrix y_expected = expected * wo;
    check("prefill output (Eigen overload)", y_prompt, y_expected.topRows(prompt));
    check("decode outputs (pointer overload into a Map)", y_rest, y_expected.bottomRows(tokens - prompt));

    // 4. Decode against the cache: one query as an Eigen row vector.
    std::printf("4. attend() against the KvCache with Eigen vectors\n");
    const Eigen::RowVectorXf q_token = Eigen::RowVectorXf::Random(q_width);
    Eigen::RowVectorXf o_token(q_width);
    kvheads::attend(q_token.data(), 1, cache, o_token.data(), options);
    // The cache holds the layer's K/V of all tokens, i.e. k_map and v_map; the query sits at
    // the last position.
    RowMatrix o_expected(1, q_width);
    kvheads::reference_attend(q_token.data(), k_map.data(), v_map.data(), o_expected.data(), 1, tokens, layout, options);
    check("one query against every cached token", o_token, o_expected);

    std::printf("%s\n", failures == 0 ? "all checks passed" : "SOME CHECKS FAILED");
    return failures == 0 ? 0 : 1;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "eigen_interop: %s\nusage: eigen_interop [tokens] [q_heads] [kv_heads] [head_dim]\n",
                 error.what());
    return 1;
  }
}
