// libFuzzer target for the safetensors reader: arbitrary bytes must either parse or throw
// std::invalid_argument, never crash, read out of bounds or trip a sanitizer. A file that
// parses has every tensor read, must survive serialize -> parse unchanged, and is fed to
// the checkpoint converter.
//
//   clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude -I/usr/include/eigen3 \
//     tests/fuzz/fuzz_safetensors.cpp -o build-conv/fuzz_st
//   build-conv/fuzz_st -max_total_time=60 -max_len=4096 <scratch-corpus-dir> tests/fuzz/corpus/safetensors
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "kvheads/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  kvheads::Safetensors file;
  try {
    file = kvheads::Safetensors::parse(data, size);
  } catch (const std::invalid_argument&) {
    return 0;  // rejected by validation: fine
  }

  // Touch every tensor's data (F32/F16/BF16 convert to fp32; other dtypes must refuse).
  volatile float sink = 0.f;
  for (const std::string& name : file.names()) {
    const kvheads::SafetensorsTensor& t = file.tensor(name);
    const bool converts = t.dtype == "F32" || t.dtype == "F16" || t.dtype == "BF16";
    std::vector<float> values;
    try {
      values = file.read_f32(name);
    } catch (const std::invalid_argument&) {
      if (converts) __builtin_trap();
      continue;
    }
    if (!converts || std::int64_t(values.size()) != t.numel()) __builtin_trap();
    for (float v : values) sink = sink + v;
  }

  // Writing what was read and reading it back gives the same tensors, and writing is stable.
  const std::vector<unsigned char> image = file.serialize();
  const kvheads::Safetensors again = kvheads::Safetensors::parse(image);
  if (again.names() != file.names() || again.metadata() != file.metadata()) __builtin_trap();
  for (const std::string& name : file.names()) {
    const kvheads::SafetensorsTensor &a = file.tensor(name), &b = again.tensor(name);
    if (a.dtype != b.dtype || a.shape != b.shape || a.bytes != b.bytes) __builtin_trap();
  }
  if (again.serialize() != image) __builtin_trap();

  // The converter must reject or convert, whatever the shapes, for a few head counts.
  for (int q_heads : {1, 2, 4})
    for (int to_kv_heads : {1, 2}) {
      kvheads::CheckpointConversion how;
      how.q_heads = q_heads;
      how.to_kv_heads = to_kv_heads;
      try {
        const kvheads::Safetensors converted = kvheads::convert_checkpoint(file, how);
        if (converted.names() != file.names()) __builtin_trap();
      } catch (const std::invalid_argument&) {
      }
    }
  return 0;
}
