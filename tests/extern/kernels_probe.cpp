// Compiled with KVHEADS_EXTERN_KERNELS, like a file of a project that compiles the kernels
// once (see include/kvheads/kernel_instances.hpp): it calls every entry point that runs a
// kernel, and check_no_kernels.cmake then requires that its object defines none of them.
// A compile-time-size Attention layer is included, of a common shape and of one that is
// not: neither may bring a kernel instantiation of its own into this file.
#include <cstdint>
#include <vector>

#include <kvheads/kvheads.hpp>

int kvheads_kernels_probe() {
  const kvheads::HeadLayout layout{8, 2, 128};
  std::vector<float> q(std::size_t(layout.q_width())), k(std::size_t(layout.kv_width())), v(k.size()), out(q.size());
  kvheads::attend(q.data(), k.data(), v.data(), out.data(), 1, 1, layout);

  kvheads::KvCache<float> cache(layout, 4);
  cache.append(k.data(), v.data(), 1);
  kvheads::attend(q.data(), 1, cache, out.data());
  kvheads::KvCache<kvheads::bf16> half(layout, 4);
  half.append(k.data(), v.data(), 1);
  kvheads::attend(q.data(), 1, half, out.data());
  kvheads::KvCache<std::int8_t> quarter(layout, 4);
  quarter.append(k.data(), v.data(), 1);
  std::vector<kvheads::AttendItem<std::int8_t>> batch{{q.data(), 1, &quarter, out.data()}};
  kvheads::attend(batch);

  kvheads::GQA<8, 2, 128> common(256);
  kvheads::GQA<6, 3, 72> uncommon(432);
  kvheads::KvCache<float> common_cache(common.layout(), 4), uncommon_cache(uncommon.layout(), 4);
  std::vector<float> x(256), y(256), x_odd(432), y_odd(432);
  common.forward(x.data(), 1, common_cache, y.data());
  uncommon.forward(x_odd.data(), 1, uncommon_cache, y_odd.data());
  return int(out[0] + y[0] + y_odd[0]);
}
