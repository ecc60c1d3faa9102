#pragma once
// Reading and writing the safetensors format, and converting a whole Llama-style checkpoint
// to fewer KV heads (mean-pooling, see convert.hpp).
//
// File layout: 8-byte little-endian u64 header length N, N bytes of JSON
//   {"name": {"dtype": "F32"|"BF16"|"I64"|..., "shape": [...], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"key": "value", ...}}            (metadata optional)
// then the data buffer; offsets are relative to its start. Tensors must tile the buffer
// exactly (no overlaps, no holes), as the format specification requires. Every dtype of
// the format is read, copied and written; F32, F16 and BF16 also convert to and from fp32.
//
// Reading validates everything before touching the data, and every malformed input is a
// std::invalid_argument naming the tensor or the field; I/O failures are std::runtime_error.
// This header needs nlohmann/json (https://github.com/nlohmann/json) in addition to Eigen.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "kvheads/convert.hpp"
#include "kvheads/core/check.hpp"
#include "kvheads/storage_types.hpp"

namespace kvheads {

/// One tensor of a safetensors file, owning its raw little-endian bytes.
struct SafetensorsTensor {
  std::string name;
  std::string dtype;                 // "F32", "F16", "BF16", or any other dtype of the format (copied only)
  std::vector<std::int64_t> shape;   // empty = scalar
  std::vector<unsigned char> bytes;  // numel() * element size bytes

  /// Number of elements: the product of shape (1 for a scalar).
  std::int64_t numel() const;
  /// The values as fp32 (F16/BF16 widened exactly); [numel()].
  std::vector<float> to_f32() const;
  /// A tensor of the given dtype holding data [numel(shape)] rounded to nearest even.
  static SafetensorsTensor from_f32(std::string name, std::vector<std::int64_t> shape, const float* data,
                                    const std::string& dtype = "F32");
};

/// The largest header a reader accepts (the reference implementation's limit too).
inline constexpr std::uint64_t kSafetensorsMaxHeader = 100'000'000;
/// The most dimensions a tensor's shape may have (PyTorch's limit is lower still).
inline constexpr std::size_t kSafetensorsMaxRank = 64;

/// An in-memory safetensors file: tensors by name plus string metadata. Used both to read
/// (parse/load) and to write (add/serialize/save); tensors are kept and written in name order,
/// so equal contents give byte-identical files.
class Safetensors {
 public:
  /// Parses a whole file image [size] bytes. Throws std::invalid_argument on malformed input.
  static Safetensors parse(const void* data, std::size_t size);
  static Safetensors parse(const std::vector<unsigned char>& file) { return parse(file.data(), file.size()); }
  /// Reads and parses a file. Throws std::runtime_error if it cannot be read.
  static Safetensors load(const std::string& path);

  /// Tensor names, sorted.
  std::vector<std::string> names() const;
  std::size_t size() const { return tensors_.size(); }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  /// The tensor called `name`; throws std::invalid_argument naming it if absent.
  const SafetensorsTensor& tensor(const std::string& name) const;
  /// The tensor's values converted to fp32.
  std::vector<float> read_f32(const std::string& name) const { return tensor(name).to_f32(); }

  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  std::map<std::string, std::string>& metadata() { return metadata_; }

  /// Adds a tensor after checking its name, dtype, shape and byte count; throws on a duplicate.
  void add(SafetensorsTensor tensor);
  /// Adds data [numel(shape)] stored as dtype (F32, F16 or BF16; rounded to nearest even).
  void add_f32(const std::string& name, std::vector<std::int64_t> shape, const float* data,
               const std::string& dtype = "F32") {
    add(SafetensorsTensor::from_f32(name, std::move(shape), data, dtype));
  }

  /// The file image: sorted header keys, data in name order, header padded with spaces so the
  /// data buffer starts 8-byte aligned.
  std::vector<unsigned char> serialize() const;
  /// Writes serialize() to path. Throws std::runtime_error if it cannot be written.
  void save(const std::string& path) const;

 private:
  std::map<std::string, SafetensorsTensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

namespace detail {

// Bytes per element of a dtype of the format, 0 for an unknown one. Every dtype is read,
// written and copied (a checkpoint may hold integer buffers such as position ids next to
// its weights); F32, F16 and BF16 also convert to and from fp32.
inline std::size_t safetensors_dtype_size(const std::string& dtype) {
  if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
  if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
  if (dtype == "BOOL" || dtype == "U8" || dtype == "I8" || dtype == "F8_E4M3" || dtype == "F8_E5M2") return 1;
  return 0;
}
inline constexpr const char* kSafetensorsDtypes =
    "F64, F32, F16, BF16, F8_E5M2, F8_E4M3, I64, I32, I16, I8, U64, U32, U16, U8 or BOOL";

// The dtypes whose values convert to and from fp32.
inline bool safetensors_float_dtype(const std::string& dtype) {
  return dtype == "F32" || dtype == "F16" || dtype == "BF16";
}

// A name or JSON fragment for an error message: quoted and cut short, so a hostile file
// cannot make messages huge.
inline std::string quote_text(const std::string& text, std::size_t limit = 120) {
  if (text.size() <= limit) return "'" + text + "'";
  return "'" + text.substr(0, limit) + "...'";
}
template <class Json>
std::string json_excerpt(const Json& value) {
  std::string text = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (text.size() > 60) text = text.substr(0, 60) + "...";
  return text;
}

// Whether text is well-formed UTF-8 (no overlong forms, surrogates or code points past
// U+10FFFF): JSON text must be, and nlohmann::json refuses to write anything else.
inline bool valid_utf8(const std::string& text) {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  const auto* end = p + text.size();
  while (p < end) {
    const unsigned char lead = *p++;
    if (lead < 0x80) continue;
    int more;
    std::uint32_t code;
    if (lead >= 0xC2 && lead <= 0xDF) more = 1, code = lead & 0x1Fu;
    else if (lead >= 0xE0 && lead <= 0xEF) more = 2, code = lead & 0x0Fu;
    else if (lead >= 0xF0 && lead <= 0xF4) more = 3, code = lead & 0x07u;
    else return false;
    if (end - p < more) return false;
    for (int i = 0; i < more; ++i, ++p) {
      if ((*p & 0xC0u) != 0x80u) return false;
      code = (code << 6) | (*p & 0x3Fu);
    }
    const std::uint32_t smallest = more == 1 ? 0x80u : more == 2 ? 0x800u : 0x10000u;
    if (code < smallest || code > 0x10FFFFu || (code >= 0xD800u && code <= 0xDFFFu)) return false;
  }
  return true;
}

// Element count of a shape; false on a negative dimension or overflow past int64 (a zero
// dimension makes the count 0 whatever the others are).
inline bool checked_numel(const std::vector<std::int64_t>& shape, std::int64_t& count) {
  count = 1;
  for (std::int64_t d : shape)
    if (d < 0) return false;
  for (std::int64_t d : shape)
    if (d == 0) {
      count = 0;
      return true;
    }
  for (std::int64_t d : shape) {
    if (d < 0 || count > std::numeric_limits<std::int64_t>::max() / d) return false;
    count *= d;
  }
  return true;
}

// A shape for an error message, cut short after 16 dimensions like quote_text.
inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  constexpr std::size_t kShown = 16;
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size() && i < kShown; ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  if (shape.size() > kShown) out += ", ... (" + std::to_string(shape.size()) + " dimensions)";
  return out + "]";
}

// Checks a tensor's dtype and shape and returns its byte size (context names it in errors).
inline std::size_t checked_tensor_bytes(const std::string& context, const std::string& dtype,
                                        const std::vector<std::int64_t>& shape) {
  const std::size_t element = safetensors_dtype_size(dtype);
  if (element == 0) throw_invalid(context, ": unknown dtype ", quote_text(dtype), " (expected ", kSafetensorsDtypes, ")");
  for (std::size_t i = 0; i < shape.size(); ++i)
    if (shape[i] < 0) throw_invalid(context, ": shape[", i, "] (", shape[i], ") must be >= 0");
  std::int64_t count = 0;
  if (!checked_numel(shape, count) || count > std::numeric_limits<std::int64_t>::max() / std::int64_t(element) ||
      std::uint64_t(count) * element > std::numeric_limits<std::size_t>::max())
    throw_invalid(context, ": shape ", shape_string(shape), " has too many elements (element count overflows)");
  return std::size_t(count) * element;
}

inline std::uint64_t read_u64_le(const unsigned char* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// An unsigned integer field that fits in int64; context names it in the error.
inline std::int64_t json_size(const nlohmann::json& value, const std::string& context) {
  if (value.is_number_unsigned()) {
    const auto v = value.get<std::uint64_t>();
    if (v <= std::uint64_t(std::numeric_limits<std::int64_t>::max())) return std::int64_t(v);
    throw_invalid(context, " (", v, ") is too large");
  }
  if (value.is_number_integer()) {
    if (value.get<std::int64_t>() == 0) return 0;  // "-0": JSON's integer zero with a sign
    throw_invalid(context, " (", value.get<std::int64_t>(), ") must be >= 0");
  }
  throw_invalid(context, " (", json_excerpt(value), ") must be a non-negative integer");
}

// What the header says of one tensor; its name is the key it is filed under.
struct HeaderTensor {
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;
};

static_assert(kSafetensorsMaxHeader <= std::numeric_limits<std::uint32_t>::max(),
              "HeaderReader indexes the header's text with 32 bits");

// Reads the header's JSON straight into names, dtypes, shapes, offsets and metadata, with
// no DOM: valid JSON that is junk (say an unknown field holding millions of empty objects)
// grew some 30 times in nlohmann's DOM, so a 100 MB header took 3.2 GB. The schema is
// enforced as the parser walks it, and a container the schema has no place for is refused
// the moment it opens, so memory stays proportional to what is kept and nesting is at most
// three levels deep. Each event costs work proportional to the text it carries, plus a
// std::map lookup for a tensor name or metadata key (logarithmic, as is the sort that finds
// a duplicate among unknown fields): close to linear in the header's length, with no
// quadratic case. Duplicate keys are errors at every level: a reader keeping the first or
// the last one would see a different file than another reader.
class HeaderReader final : public nlohmann::json_sax<nlohmann::json> {
 public:
  using Json = nlohmann::json;
  std::map<std::string, HeaderTensor> tensors;
  std::map<std::string, std::string> metadata;

  bool null() override { return scalar(Json(nullptr)); }
  bool boolean(bool value) override { return scalar(Json(value)); }
  bool number_integer(Json::number_integer_t value) override { return scalar(Json(value)); }
  bool number_unsigned(Json::number_unsigned_t value) override { return scalar(Json(value)); }
  bool number_float(Json::number_float_t value, const Json::string_t&) override { return scalar(Json(value)); }
  bool string(Json::string_t& value) override { return scalar(Json(std::move(value))); }
  bool binary(Json::binary_t&) override {  // only binary formats (CBOR, ...) produce these
    throw_invalid("safetensors header is not valid JSON: it holds a binary value");
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& error) override {
    throw_invalid("safetensors header is not valid JSON: ", error.what());
  }

  bool start_object(std::size_t) override {
    if (skips_container()) return true;
    if (level_ == Level::kBeforeRoot) {
      level_ = Level::kRoot;
    } else if (level_ == Level::kRoot && root_value_is_metadata_) {
      level_ = Level::kMetadata;
    } else if (level_ == Level::kRoot) {
      level_ = Level::kEntry;
      has_dtype_ = has_shape_ = has_offsets_ = false;
      unknown_names_.clear();
      unknown_name_ends_.clear();
    } else {
      refuse_container("object");
    }
    return true;
  }
  bool start_array(std::size_t) override {
    if (skips_container()) return true;
    if (level_ == Level::kEntry && field_ == Field::kShape) {
      level_ = Level::kShape;
    } else if (level_ == Level::kEntry && field_ == Field::kOffsets) {
      level_ = Level::kOffsets;
    } else {
      refuse_container("array");
    }
    array_length_ = 0;
    return true;
  }
  bool end_object() override {
    if (level_ == Level::kSkip) return close_skipped();
    if (level_ == Level::kEntry) {
      refuse_duplicate_unknown_field();
      if (!has_dtype_) throw_invalid(entry_context(), ": missing \"dtype\"");
      if (!has_shape_) throw_invalid(entry_context(), ": missing \"shape\"");
      if (!has_offsets_) throw_invalid(entry_context(), ": missing \"data_offsets\"");
    }
    level_ = level_ == Level::kRoot ? Level::kAfterRoot : Level::kRoot;
    return true;
  }
  bool end_array() override {
    if (level_ == Level::kSkip) return close_skipped();
    if (level_ == Level::kShape && array_length_ > kSafetensorsMaxRank)
      throw_invalid(entry_context(), ": shape has ", array_length_, " dimensions (at most ", kSafetensorsMaxRank,
                    " are supported)");
    if (level_ == Level::kOffsets && array_length_ != 2)
      throw_invalid(entry_context(), ": data_offsets must be [begin, end], got ", array_length_,
                    array_length_ == 1 ? " value" : " values");
    level_ = Level::kEntry;
    return true;
  }

  bool key(Json::string_t& key) override {
    if (level_ == Level::kSkip) return true;
    if (level_ == Level::kRoot) {
      root_value_is_metadata_ = key == "__metadata__";
      if (root_value_is_metadata_) {
        if (metadata_seen_) throw_invalid("safetensors header: duplicate tensor name ", quote_text(key));
        metadata_seen_ = true;
        return true;
      }
      const auto added = tensors.try_emplace(std::move(key));
      if (!added.second) throw_invalid("safetensors header: duplicate tensor name ", quote_text(added.first->first));
      entry_name_ = &added.first->first;
      entry_ = &added.first->second;
    } else if (level_ == Level::kMetadata) {
      if (metadata.count(key) != 0) duplicate_key(key);
      key_ = std::move(key);
    } else {  // a tensor entry's field: the only other place a key can stand
      bool* seen = nullptr;
      if (key == "dtype") field_ = Field::kDtype, seen = &has_dtype_;
      else if (key == "shape") field_ = Field::kShape, seen = &has_shape_;
      else if (key == "data_offsets") field_ = Field::kOffsets, seen = &has_offsets_;
      else field_ = Field::kUnknown;
      if (seen != nullptr && std::exchange(*seen, true)) duplicate_key(key);
      if (seen == nullptr) {
        unknown_names_ += key;
        unknown_name_ends_.push_back(std::uint32_t(unknown_names_.size()));
      }
      key_ = std::move(key);
    }
    return true;
  }

 private:
  // Where the next value goes: which container is innermost, and in a tensor entry, which field.
  enum class Level { kBeforeRoot, kRoot, kMetadata, kEntry, kShape, kOffsets, kSkip, kAfterRoot };
  // serde_json's default recursion limit: the reference reader refuses deeper nesting too.
  static constexpr std::size_t kMaxSkippedDepth = 128;

  // An unknown field of a tensor entry may hold anything, as in the reference reader: its
  // containers are walked, keeping only their depth, and dropped.
  bool skips_container() {
    if (level_ == Level::kSkip) {
      if (++skipped_depth_ > kMaxSkippedDepth)
        throw_invalid(entry_context(), ": unknown field ", quote_text(key_), " nests deeper than ", kMaxSkippedDepth,
                      " levels");
      return true;
    }
    if (level_ != Level::kEntry || field_ != Field::kUnknown) return false;
    level_ = Level::kSkip;
    skipped_depth_ = 1;
    return true;
  }
  bool close_skipped() {
    if (--skipped_depth_ == 0) level_ = Level::kEntry;
    return true;
  }
  enum class Field { kDtype, kShape, kOffsets, kUnknown };

  std::string entry_context() const { return "safetensors tensor " + quote_text(*entry_name_); }
  std::string element_context() const {
    if (level_ == Level::kShape) return entry_context() + ": shape[" + std::to_string(array_length_) + "]";
    return entry_context() + (array_length_ == 0 ? ": data_offsets begin" : ": data_offsets end");
  }
  // A shape dimension or offset; the message, with its context, is built only for a bad one.
  std::int64_t element_size(const Json& value) const {
    constexpr auto kLargest = std::uint64_t(std::numeric_limits<std::int64_t>::max());
    if (value.is_number_unsigned() && value.get<std::uint64_t>() <= kLargest)
      return std::int64_t(value.get<std::uint64_t>());
    return json_size(value, element_context());
  }
  [[noreturn]] static void duplicate_key(const std::string& key) {
    throw_invalid("safetensors header: duplicate key ", quote_text(key), " in an object");
  }

  // The unknown fields' names are kept end to end and compared once the entry ends: a
  // std::set of them took some 70 bytes a name, against 7 bytes of header for "k1":0,.
  void refuse_duplicate_unknown_field() const {
    const std::size_t count = unknown_name_ends_.size();
    if (count < 2) return;
    const auto name = [this](std::uint32_t i) {
      const std::uint32_t begin = i == 0 ? 0 : unknown_name_ends_[i - 1];
      return std::string_view(unknown_names_).substr(begin, unknown_name_ends_[i] - begin);
    };
    std::vector<std::uint32_t> order(count);
    for (std::size_t i = 0; i < count; ++i) order[i] = std::uint32_t(i);
    std::sort(order.begin(), order.end(), [&](std::uint32_t a, std::uint32_t b) { return name(a) < name(b); });
    for (std::size_t i = 1; i < count; ++i)
      if (name(order[i - 1]) == name(order[i])) duplicate_key(std::string(name(order[i])));
  }

  bool scalar(Json value) {
    switch (level_) {
      case Level::kBeforeRoot:
        throw_invalid("safetensors header must be a JSON object, got ", value.type_name(), " ", json_excerpt(value));
      case Level::kRoot:
        if (root_value_is_metadata_)
          throw_invalid("safetensors __metadata__ must be an object of strings, got ", value.type_name());
        throw_invalid(entry_context(), ": entry must be an object, got ", value.type_name());
      case Level::kMetadata:
        if (!value.is_string())
          throw_invalid("safetensors __metadata__ value of ", quote_text(key_), " must be a string, got ",
                        value.type_name());
        metadata.emplace(std::move(key_), std::move(value.get_ref<std::string&>()));
        return true;
      case Level::kEntry:
        return entry_field(std::move(value));
      case Level::kShape:
        // Past the limit the dimensions are only counted, for the message at the array's end.
        if (array_length_ < kSafetensorsMaxRank) entry_->shape.push_back(element_size(value));
        ++array_length_;
        return true;
      case Level::kOffsets:
        if (array_length_ == 2)
          throw_invalid(entry_context(), ": data_offsets must be [begin, end], got more than 2 values");
        (array_length_ == 0 ? entry_->begin : entry_->end) = std::uint64_t(element_size(value));
        ++array_length_;
        return true;
      case Level::kSkip:
        return true;
      case Level::kAfterRoot:
        break;
    }
    throw_invalid("safetensors header is not valid JSON: a value after the object's end");  // the parser stops first
  }

  bool entry_field(Json value) {
    switch (field_) {
      case Field::kDtype:
        if (!value.is_string()) throw_invalid(entry_context(), ": dtype must be a string, got ", json_excerpt(value));
        entry_->dtype = std::move(value.get_ref<std::string&>());
        if (safetensors_dtype_size(entry_->dtype) == 0)
          throw_invalid(entry_context(), ": unknown dtype ", quote_text(entry_->dtype), " (expected ",
                        kSafetensorsDtypes, ")");
        return true;
      case Field::kShape:
        throw_invalid(entry_context(), ": shape must be an array, got ", json_excerpt(value));
      case Field::kOffsets:
        throw_invalid(entry_context(), ": data_offsets must be [begin, end], got ", json_excerpt(value));
      case Field::kUnknown:
        break;
    }
    return true;  // the reference reader ignores fields it does not know; so do we
  }

  // A container where the schema has none: refused as it opens, before any of it is read.
  [[noreturn]] void refuse_container(const char* type) const {
    switch (level_) {
      case Level::kBeforeRoot:
        throw_invalid("safetensors header must be a JSON object, got ", type);
      case Level::kRoot:
        if (root_value_is_metadata_)
          throw_invalid("safetensors __metadata__ must be an object of strings, got ", type);
        throw_invalid(entry_context(), ": entry must be an object, got ", type);
      case Level::kMetadata:
        throw_invalid("safetensors __metadata__ value of ", quote_text(key_), " must be a string, got ", type);
      case Level::kEntry:
        if (field_ == Field::kDtype) throw_invalid(entry_context(), ": dtype must be a string, got ", type);
        if (field_ == Field::kShape) throw_invalid(entry_context(), ": shape must be an array, got ", type);
        // data_offsets holding an object (an unknown field's containers are skipped).
        throw_invalid(entry_context(), ": data_offsets must be [begin, end], got ", type);
      case Level::kShape:
      case Level::kOffsets:
        throw_invalid(element_context(), " must be a non-negative integer, got ", type);
      case Level::kSkip:
      case Level::kAfterRoot:
        break;
    }
    throw_invalid("safetensors header is not valid JSON: a value after the object's end");
  }

  Level level_ = Level::kBeforeRoot;
  Field field_ = Field::kUnknown;
  bool root_value_is_metadata_ = false;
  bool metadata_seen_ = false;
  const std::string* entry_name_ = nullptr;  // the tensor entry being read, filed in tensors
  HeaderTensor* entry_ = nullptr;
  bool has_dtype_ = false, has_shape_ = false, has_offsets_ = false;
  // The names of the entry's unknown fields end to end, and where each ends (a header's
  // length fits 32 bits: kSafetensorsMaxHeader).
  std::string unknown_names_;
  std::vector<std::uint32_t> unknown_name_ends_;
  std::string key_;               // the metadata key or entry field whose value comes next
  std::size_t array_length_ = 0;  // values so far in the shape or data_offsets being read
  std::size_t skipped_depth_ = 0;  // open containers of the unknown field being skipped
};

inline void write_u64_le(std::uint64_t v, unsigned char* p) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}

}  // namespace detail

inline std::int64_t SafetensorsTensor::numel() const {
  for (std::size_t i = 0; i < shape.size(); ++i)
    if (shape[i] < 0)
      detail::throw_invalid("tensor ", detail::quote_text(name), ": shape[", i, "] (", shape[i], ") must be >= 0");
  std::int64_t count = 0;
  if (!detail::checked_numel(shape, count))
    detail::throw_invalid("tensor ", detail::quote_text(name), ": shape ", detail::shape_string(shape),
                          " has too many elements");
  return count;
}

inline std::vector<float> SafetensorsTensor::to_f32() const {
  const std::size_t need = detail::checked_tensor_bytes("tensor " + detail::quote_text(name), dtype, shape);
  if (!detail::safetensors_float_dtype(dtype))
    detail::throw_invalid("tensor ", detail::quote_text(name), " has dtype ", dtype,
                          ", which does not convert to fp32 (expected F32, F16 or BF16)");
  if (bytes.size() != need)
    detail::throw_invalid("tensor ", detail::quote_text(name), " holds ", bytes.size(), " bytes but shape ",
                          detail::shape_string(shape), " of ", dtype, " needs ", need);
  const std::size_t element = detail::safetensors_dtype_size(dtype);
  const std::size_t n = need / element;
  std::vector<float> out(n);
  const unsigned char* p = bytes.data();
  // Assembled byte by byte: the file is little-endian whatever the host is.
  if (dtype == "F32") {
    for (std::size_t i = 0; i < n; ++i, p += 4)
      out[i] = detail::bits_float(std::uint32_t(p[0]) | std::uint32_t(p[1]) << 8 | std::uint32_t(p[2]) << 16 |
                                  std::uint32_t(p[3]) << 24);
  } else if (dtype == "F16") {
    for (std::size_t i = 0; i < n; ++i, p += 2) out[i] = fp16{std::uint16_t(p[0] | p[1] << 8)}.to_float();
  } else {
    for (std::size_t i = 0; i < n; ++i, p += 2) out[i] = bf16{std::uint16_t(p[0] | p[1] << 8)}.to_float();
  }
  return out;
}

inline SafetensorsTensor SafetensorsTensor::from_f32(std::string name, std::vector<std::int64_t> shape,
                                                     const float* data, const std::string& dtype) {
  const std::size_t need = detail::checked_tensor_bytes("tensor " + detail::quote_text(name), dtype, shape);
  if (!detail::safetensors_float_dtype(dtype))
    detail::throw_invalid("tensor ", detail::quote_text(name), ": dtype ", dtype,
                          " cannot hold values converted from fp32 (expected F32, F16 or BF16)");
  const std::size_t element = detail::safetensors_dtype_size(dtype);
  const std::size_t n = need / element;
  detail::require_pointer(data, static_cast<long long>(n), "data");
  SafetensorsTensor t{std::move(name), dtype, std::move(shape), std::vector<unsigned char>(need)};
  unsigned char* p = t.bytes.data();
  for (std::size_t i = 0; i < n; ++i) {
    if (dtype == "F32") {
      const std::uint32_t bits = detail::float_bits(data[i]);
      for (int b = 0; b < 4; ++b) *p++ = static_cast<unsigned char>(bits >> (8 * b));
    } else {
      const std::uint16_t bits = dtype == "F16" ? fp16::from_float(data[i]).bits : bf16::from_float(data[i]).bits;
      *p++ = static_cast<unsigned char>(bits & 0xFF);
      *p++ = static_cast<unsigned char>(bits >> 8);
    }
  }
  return t;
}

inline Safetensors Safetensors::parse(const void* data, std::size_t size) {
  using detail::quote_text;
  using detail::throw_invalid;
  if (data == nullptr && size != 0) throw_invalid("safetensors: data is null but its size is ", size);
  if (size < 8) throw_invalid("safetensors file is ", size, " bytes, shorter than the 8-byte header length");
  const auto* bytes = static_cast<const unsigned char*>(data);
  const std::uint64_t header_length = detail::read_u64_le(bytes);
  if (header_length > kSafetensorsMaxHeader)
    throw_invalid("safetensors header length (", header_length, ") exceeds the limit of ", kSafetensorsMaxHeader,
                  " bytes");
  if (header_length > size - 8)
    throw_invalid("safetensors header length (", header_length, ") exceeds the ", size - 8,
                  " bytes that follow it in the file");
  const char* header = reinterpret_cast<const char*>(bytes + 8);
  // The format's header must begin with '{'. nlohmann::json skips a leading UTF-8 byte order
  // mark and whitespace; the reference reader (serde_json) refuses the mark, and a writer
  // pads with spaces only after the object, so neither belongs before it.
  if (header_length >= 3 && bytes[8] == 0xEF && bytes[9] == 0xBB && bytes[10] == 0xBF)
    throw_invalid("safetensors header starts with a UTF-8 byte order mark (expected the JSON object's '{')");
  if (header_length >= 1 && (header[0] == ' ' || header[0] == '\t' || header[0] == '\n' || header[0] == '\r'))
    throw_invalid("safetensors header starts with whitespace (byte ", int(bytes[8]),
                  "; expected the JSON object's '{' first, padding only after it)");
  // nlohmann::json stops at a NUL as at the end of a C string, so "{}\0<anything>" would
  // parse; a NUL can only stand escaped in JSON text, never raw.
  if (const void* nul = std::memchr(header, 0, std::size_t(header_length)))
    throw_invalid("safetensors header has a NUL byte at offset ",
                  static_cast<const char*>(nul) - header, " (expected JSON text padded with spaces)");
  detail::HeaderReader reader;
  nlohmann::json::sax_parse(header, header + header_length, &reader);

  const unsigned char* buffer = bytes + 8 + header_length;
  const std::uint64_t buffer_size = size - 8 - header_length;

  struct Span {
    std::uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Span> spans;
  spans.reserve(reader.tensors.size());
  for (const auto& item : reader.tensors) {
    const std::string& name = item.first;
    const detail::HeaderTensor& entry = item.second;
    const std::string context = "safetensors tensor " + quote_text(name);
    const std::size_t need = detail::checked_tensor_bytes(context, entry.dtype, entry.shape);
    if (entry.begin > entry.end)
      throw_invalid(context, ": data_offsets begin (", entry.begin, ") must not exceed end (", entry.end, ")");
    if (entry.end > buffer_size)
      throw_invalid(context, ": data_offsets end (", entry.end, ") is beyond the ", buffer_size, "-byte data buffer");
    if (entry.end - entry.begin != need)
      throw_invalid(context, ": data_offsets [", entry.begin, ", ", entry.end, "] hold ", entry.end - entry.begin,
                    " bytes but shape ", detail::shape_string(entry.shape), " of ", entry.dtype, " needs ", need);
    spans.push_back(Span{entry.begin, entry.end, &name});
  }

  // The tensors must tile the buffer: sorted by offsets, each starts where the previous ended.
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t covered = 0;
  const std::string* previous = nullptr;
  for (const Span& s : spans) {
    if (s.begin < covered)
      throw_invalid("safetensors tensors ", quote_text(*previous), " and ", quote_text(*s.name), " overlap (the second starts at",
                    " byte ", s.begin, ", before the first ends at ", covered, ")");
    if (s.begin > covered)
      throw_invalid("safetensors data buffer bytes [", covered, ", ", s.begin, ") belong to no tensor (before ",
                    quote_text(*s.name), ")");
    covered = s.end;
    previous = s.name;
  }
  if (covered != buffer_size)
    throw_invalid("safetensors data buffer bytes [", covered, ", ", buffer_size, ") belong to no tensor",
                  " (trailing data)");

  // Only now, with the whole file checked, are the data copied.
  Safetensors file;
  file.metadata_ = std::move(reader.metadata);
  for (auto& item : reader.tensors) {
    detail::HeaderTensor& entry = item.second;
    SafetensorsTensor tensor{item.first, std::move(entry.dtype), std::move(entry.shape),
                             std::vector<unsigned char>(buffer + entry.begin, buffer + entry.end)};
    file.tensors_.emplace_hint(file.tensors_.end(), item.first, std::move(tensor));
  }
  return file;
}

inline Safetensors Safetensors::load(const std::string& path) {
  std::error_code error;
  if (std::filesystem::exists(path, error) && !std::filesystem::is_regular_file(path, error))
    throw std::runtime_error(detail::concat("cannot read ", detail::quote_text(path, 1000), ": not a regular file"));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(detail::concat("cannot open ", detail::quote_text(path, 1000), " for reading"));
  std::vector<unsigned char> file;
  in.seekg(0, std::ios::end);
  const std::streamoff length = in.tellg();
  in.seekg(0, std::ios::beg);
  if (length < 0 || !in) throw std::runtime_error(detail::concat("cannot read ", detail::quote_text(path, 1000)));
  file.resize(std::size_t(length));
  if (length > 0) in.read(reinterpret_cast<char*>(file.data()), length);
  if (!in) throw std::runtime_error(detail::concat("cannot read ", detail::quote_text(path, 1000)));
  try {
    return parse(file);
  } catch (const std::invalid_argument& error) {
    // Say which file was malformed.
    throw std::invalid_argument(std::string(error.what()) + " (in " + detail::quote_text(path, 1000) + ")");
  }
}

inline std::vector<std::string> Safetensors::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const auto& item : tensors_) out.push_back(item.first);
  return out;
}

inline const SafetensorsTensor& Safetensors::tensor(const std::string& name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) detail::throw_invalid("safetensors: no tensor named ", detail::quote_text(name));
  return it->second;
}

inline void Safetensors::add(SafetensorsTensor tensor) {
  const std::string context = "tensor " + detail::quote_text(tensor.name);
  if (tensor.name == "__metadata__") detail::throw_invalid("tensor name '__metadata__' is reserved for metadata");
  if (!detail::valid_utf8(tensor.name)) detail::throw_invalid(context, ": a tensor name must be valid UTF-8");
  const std::size_t need = detail::checked_tensor_bytes(context, tensor.dtype, tensor.shape);
  if (tensor.bytes.size() != need)
    detail::throw_invalid(context, " holds ", tensor.bytes.size(), " bytes but shape ",
                          detail::shape_string(tensor.shape), " of ", tensor.dtype, " needs ", need);
  if (contains(tensor.name)) detail::throw_invalid(context, " already exists");
  std::string key = tensor.name;
  tensors_.emplace(std::move(key), std::move(tensor));
}

inline std::vector<unsigned char> Safetensors::serialize() const {
  // Names were checked by add(); metadata() is the caller's map, checked here.
  for (const auto& entry : metadata_) {
    if (!detail::valid_utf8(entry.first))
      detail::throw_invalid("metadata key ", detail::quote_text(entry.first), " is not valid UTF-8");
    if (!detail::valid_utf8(entry.second))
      detail::throw_invalid("metadata value of key ", detail::quote_text(entry.first), " is not valid UTF-8");
  }
  nlohmann::json header = nlohmann::json::object();
  std::uint64_t offset = 0;
  for (const auto& item : tensors_) {
    const SafetensorsTensor& t = item.second;
    const std::uint64_t end = offset + t.bytes.size();
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, end}}};
    offset = end;
  }
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // data buffer starts 8-byte aligned

  std::vector<unsigned char> out(8 + text.size() + offset);
  detail::write_u64_le(text.size(), out.data());
  std::memcpy(out.data() + 8, text.data(), text.size());
  unsigned char* p = out.data() + 8 + text.size();
  for (const auto& item : tensors_) {
    const std::vector<unsigned char>& b = item.second.bytes;
    if (!b.empty()) std::memcpy(p, b.data(), b.size());
    p += b.size();
  }
  return out;
}

inline void Safetensors::save(const std::string& path) const {
  const std::vector<unsigned char> image = serialize();
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error(detail::concat("cannot open ", detail::quote_text(path, 1000), " for writing"));
  out.write(reinterpret_cast<const char*>(image.data()), std::streamsize(image.size()));
  out.close();
  if (!out) throw std::runtime_error(detail::concat("cannot write ", detail::quote_text(path, 1000)));
}

// ---------------------------------------------------------------------------------------
// Whole-checkpoint conversion (Llama-style names, Hugging Face [out_features][in_features]).

/// Head counts of a Llama-style model as given by its Hugging Face config.json.
struct LlamaConfig {
  int num_attention_heads = 0;  // 0 = not given
  int num_key_value_heads = 0;  // defaults to num_attention_heads
  int hidden_size = 0;          // 0 = not given
  int head_dim = 0;             // 0 = not given (then q_proj rows / num_attention_heads)
};

namespace detail {

inline int config_int(const nlohmann::ordered_json& config, const char* key) {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) return 0;
  if (!it->is_number_integer() || it->get<std::int64_t>() <= 0 ||
      it->get<std::int64_t>() > std::numeric_limits<int>::max())
    throw_invalid("config ", key, " (", json_excerpt(*it),
                  ") must be a positive integer");
  return int(it->get<std::int64_t>());
}

}  // namespace detail

/// Reads the fields of LlamaConfig from a parsed config.json; missing fields read as 0
/// (num_key_value_heads as num_attention_heads). Throws std::invalid_argument on a field that is
/// present but not a positive integer.
inline LlamaConfig read_llama_config(const nlohmann::ordered_json& config) {
  if (!config.is_object()) detail::throw_invalid("config must be a JSON object, got ", config.type_name());
  LlamaConfig out;
  out.num_attention_heads = detail::config_int(config, "num_attention_heads");
  out.num_key_value_heads = detail::config_int(config, "num_key_value_heads");
  if (out.num_key_value_heads == 0) out.num_key_value_heads = out.num_attention_heads;
  out.hidden_size = detail::config_int(config, "hidden_size");
  out.head_dim = detail::config_int(config, "head_dim");
  return out;
}

/// The config with num_key_value_heads = kv_heads; every other key and the key order are kept.
inline nlohmann::ordered_json with_kv_heads(nlohmann::ordered_json config, int kv_heads) {
  if (!config.is_object()) detail::throw_invalid("config must be a JSON object, got ", config.type_name());
  if (kv_heads <= 0) detail::throw_invalid("kv_heads (", kv_heads, ") must be positive");
  config["num_key_value_heads"] = kv_heads;
  return config;
}

/// What convert_checkpoint does. Zero means "derive from the tensor shapes" / "don't check".
struct CheckpointConversion {
  int q_heads = 0;        // attention (query) heads; required
  int to_kv_heads = 0;    // KV heads of the result; required, must divide the source's
  int from_kv_heads = 0;  // source KV heads; 0 = k_proj rows / head_dim
  int head_dim = 0;       // 0 = q_proj rows / q_heads
  int hidden_size = 0;    // 0 = not checked; else q/k/v_proj must have this many columns
};

/// What convert_checkpoint did.
struct ConversionSummary {
  int layers = 0;
  int head_dim = 0;
  int from_kv_heads = 0;
  int to_kv_heads = 0;
  std::vector<std::string> pooled;  // tensors rewritten (k/v_proj weights and biases)
  std::size_t copied = 0;           // tensors copied unchanged
};

namespace detail {

inline bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

inline const SafetensorsTensor& required_tensor(const Safetensors& file, const std::string& name,
                                                const std::string& because) {
  if (!file.contains(name)) throw_invalid("checkpoint has no tensor ", quote_text(name), " (", because, ")");
  return file.tensor(name);
}

// Pools a Hugging Face k/v_proj weight [from*head_dim][cols] or bias [from*head_dim] along
// its first dimension and stores it in the tensor's own dtype.
inline SafetensorsTensor pool_hf_tensor(const SafetensorsTensor& t, int from, int to, int head_dim) {
  const std::int64_t cols = t.shape.size() == 2 ? t.shape[1] : 1;
  if (cols <= 0 || cols > std::numeric_limits<int>::max())
    throw_invalid("tensor ", quote_text(t.name), " has ", cols, " columns (expected 1 .. ",
                  std::numeric_limits<int>::max(), ")");
  const std::vector<float> src = t.to_f32();
  std::vector<float> dst(std::size_t(to) * std::size_t(head_dim) * std::size_t(cols));
  check_pooling(std::int64_t(from) * head_dim, "rows", cols, "columns", from, to, head_dim);
  if (src.size() != std::size_t(from) * std::size_t(head_dim) * std::size_t(cols))
    throw_invalid("tensor ", quote_text(t.name), " holds ", src.size(), " values (expected ",
                  std::int64_t(from) * head_dim * cols, ")");
  pool_rows(src.data(), cols, cols, from, to, head_dim, dst.data(), cols, t.dtype != "F32");
  std::vector<std::int64_t> shape = t.shape;
  shape[0] = std::int64_t(to) * head_dim;
  return SafetensorsTensor::from_f32(t.name, std::move(shape), dst.data(), t.dtype);
}

}  // namespace detail

/// Converts a Llama-style checkpoint to how.to_kv_heads KV heads in memory: for every
/// "<prefix>self_attn.k_proj.weight" (with its q_proj and v_proj) the k_proj and v_proj weights
/// [kv_heads*head_dim][hidden] and biases [kv_heads*head_dim], if any, are mean-pooled over
/// contiguous groups of KV heads (stored in their own dtype, rounded to nearest even); every
/// other tensor and the metadata are copied unchanged. A pooled value is the correctly rounded
/// mean of its group whenever the exponents of the group's nonzero values differ by at most
/// 29 - ceil(log2 r) for F32, 45 - ceil(log2 r) for BF16 (r = source / result KV heads), and
/// always for F16 (r <= 8192); beyond that it may be one ulp off (see detail::pool_rows). Throws std::invalid_argument naming the
/// tensor on any shape that does not fit.
inline Safetensors convert_checkpoint(const Safetensors& in, const CheckpointConversion& how,
                                      ConversionSummary* summary = nullptr) {
  using detail::quote_text;
  using detail::throw_invalid;
  if (how.q_heads <= 0) throw_invalid("q_heads (", how.q_heads, ") must be positive");
  if (how.to_kv_heads <= 0) throw_invalid("to_kv_heads (", how.to_kv_heads, ") must be positive");
  if (how.from_kv_heads < 0) throw_invalid("from_kv_heads (", how.from_kv_heads, ") must be >= 0 (0 = derive)");
  if (how.head_dim < 0) throw_invalid("head_dim (", how.head_dim, ") must be >= 0 (0 = derive)");
  if (how.hidden_size < 0) throw_invalid("hidden_size (", how.hidden_size, ") must be >= 0 (0 = don't check)");

  const std::string k_suffix = "self_attn.k_proj.weight";
  ConversionSummary done;
  done.to_kv_heads = how.to_kv_heads;
  std::map<std::string, SafetensorsTensor> pooled;
  for (const std::string& name : in.names()) {
    if (!detail::ends_with(name, k_suffix)) continue;
    const std::string prefix = name.substr(0, name.size() - std::string("k_proj.weight").size());
    const SafetensorsTensor& q = detail::required_tensor(in, prefix + "q_proj.weight", "it pairs with " + quote_text(name));
    const SafetensorsTensor& k = in.tensor(name);
    const SafetensorsTensor& v = detail::required_tensor(in, prefix + "v_proj.weight", "it pairs with " + quote_text(name));
    for (const SafetensorsTensor* t : {&q, &k, &v}) {
      if (t->shape.size() != 2 || t->shape[0] <= 0 || t->shape[1] <= 0)
        throw_invalid("tensor ", quote_text(t->name), " has shape ", detail::shape_string(t->shape),
                      " (expected 2-D [out_features][in_features], both positive)");
      if (how.hidden_size != 0 && t->shape[1] != how.hidden_size)
        throw_invalid("tensor ", quote_text(t->name), " has ", t->shape[1], " columns but hidden_size is ",
                      how.hidden_size);
      if (t->shape[0] > std::numeric_limits<int>::max())
        throw_invalid("tensor ", quote_text(t->name), " has too many rows (", t->shape[0], ")");
    }
    if (k.shape[1] != q.shape[1])
      throw_invalid("tensor ", quote_text(k.name), " has ", k.shape[1], " columns but ", quote_text(q.name), " has ",
                    q.shape[1]);
    if (v.shape != k.shape)
      throw_invalid("tensor ", quote_text(v.name), " has shape ", detail::shape_string(v.shape), " but ", quote_text(k.name),
                    " has ", detail::shape_string(k.shape));
    if (q.shape[0] % how.q_heads != 0)
      throw_invalid("tensor ", quote_text(q.name), " has ", q.shape[0], " rows, not a multiple of q_heads (", how.q_heads,
                    ")");
    const int head_dim = int(q.shape[0] / how.q_heads);
    if (how.head_dim != 0 && how.head_dim != head_dim)
      throw_invalid("tensor ", quote_text(q.name), " has ", q.shape[0], " rows = q_heads (", how.q_heads, ") * ", head_dim,
                    " but head_dim is ", how.head_dim);
    if (k.shape[0] % head_dim != 0)
      throw_invalid("tensor ", quote_text(k.name), " has ", k.shape[0], " rows, not a multiple of head_dim (", head_dim,
                    ")");
    const int from = int(k.shape[0] / head_dim);
    if (how.from_kv_heads != 0 && how.from_kv_heads != from)
      throw_invalid("tensor ", quote_text(k.name), " holds ", from, " KV heads (", k.shape[0], " rows / head_dim ",
                    head_dim, ") but from_kv_heads is ", how.from_kv_heads);
    if (how.q_heads % from != 0)
      throw_invalid("q_heads (", how.q_heads, ") must be a multiple of the KV heads (", from, ") of ", quote_text(k.name));
    if (from % how.to_kv_heads != 0)
      throw_invalid("to_kv_heads (", how.to_kv_heads, ") must divide the KV heads (", from, ") of ", quote_text(k.name));
    if (done.layers > 0 && (head_dim != done.head_dim || from != done.from_kv_heads))
      throw_invalid("tensor ", quote_text(k.name), " has head_dim ", head_dim, " and ", from,
                    " KV heads, unlike the layers before it (head_dim ", done.head_dim, ", ", done.from_kv_heads,
                    " KV heads)");
    done.head_dim = head_dim;
    done.from_kv_heads = from;
    ++done.layers;

    for (const SafetensorsTensor* t : {&k, &v})
      pooled.emplace(t->name, detail::pool_hf_tensor(*t, from, how.to_kv_heads, head_dim));
    for (const char* bias : {"k_proj.bias", "v_proj.bias"}) {
      if (!in.contains(prefix + bias)) continue;
      const SafetensorsTensor& b = in.tensor(prefix + bias);
      if (b.shape.size() != 1 || b.shape[0] != k.shape[0])
        throw_invalid("tensor ", quote_text(b.name), " has shape ", detail::shape_string(b.shape), " (expected [",
                      k.shape[0], "])");
      pooled.emplace(b.name, detail::pool_hf_tensor(b, from, how.to_kv_heads, head_dim));
    }
  }
  if (done.layers == 0)
    throw_invalid("checkpoint has no tensor named '*", k_suffix, "' (expected a Llama-style checkpoint)");

  Safetensors out;
  out.metadata() = in.metadata();
  for (const std::string& name : in.names()) {
    const auto it = pooled.find(name);
    if (it != pooled.end()) {
      done.pooled.push_back(name);
      out.add(std::move(it->second));
    } else {
      ++done.copied;
      out.add(in.tensor(name));
    }
  }
  if (summary != nullptr) *summary = std::move(done);
  return out;
}

/// Options of convert_checkpoint_file.
struct ConvertFileOptions {
  int to_kv_heads = 0;      // required
  int q_heads = 0;          // 0 = num_attention_heads from the config
  std::string config_path;  // empty = "config.json" next to the input, if it exists
};

/// What convert_checkpoint_file did.
struct ConvertFileResult {
  ConversionSummary summary;
  std::string config_in;   // the config read ("" = none found)
  std::string config_out;  // the config written next to the output ("" = none)
};

namespace detail {

inline nlohmann::ordered_json load_json(const std::filesystem::path& path) {
  const std::string shown = quote_text(path.string(), 1000);
  // A directory opens as a stream on Linux and fails only when read, as for Safetensors::load.
  std::error_code error;
  if (std::filesystem::exists(path, error) && !std::filesystem::is_regular_file(path, error))
    throw std::runtime_error(concat("cannot read ", shown, ": not a regular file"));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(concat("cannot open ", shown, " for reading"));
  // Read before parsing: libstdc++'s filebuf throws std::ios_base::failure on a read error,
  // which from inside nlohmann's parser would reach the caller naming no file.
  std::string text;
  try {
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  } catch (const std::exception& failure) {
    throw std::runtime_error(concat("cannot read ", shown, ": ", failure.what()));
  }
  if (in.bad()) throw std::runtime_error(concat("cannot read ", shown));
  try {
    return nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::json::exception& failure) {
    throw_invalid(shown, " is not valid JSON: ", failure.what());
  }
}

// The sibling a file is written to before it is renamed over its destination, so a failure
// never leaves half a file.
inline std::filesystem::path temporary_sibling(const std::filesystem::path& path) {
  std::filesystem::path temp = path;
  temp += ".kvheads-tmp";
  return temp;
}

inline void write_temporary_sibling(const std::filesystem::path& path, const void* data, std::size_t size) {
  const std::filesystem::path temp = temporary_sibling(path);
  std::ofstream out(temp, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error(concat("cannot open ", quote_text(temp.string(), 1000), " for writing"));
  out.write(static_cast<const char*>(data), std::streamsize(size));
  out.close();
  if (!out) {
    std::error_code ignored;
    std::filesystem::remove(temp, ignored);
    throw std::runtime_error(concat("cannot write ", quote_text(temp.string(), 1000)));
  }
}

// Renames the temporary sibling over path; on failure removes the sibling and returns why.
inline std::string move_temporary_sibling(const std::filesystem::path& path) {
  const std::filesystem::path temp = temporary_sibling(path);
  std::error_code error;
  std::filesystem::rename(temp, path, error);
  if (!error) return {};
  std::error_code ignored;
  std::filesystem::remove(temp, ignored);
  return concat("cannot rename ", quote_text(temp.string(), 1000), " to ", quote_text(path.string(), 1000), ": ",
                error.message());
}

inline bool same_file(const std::filesystem::path& a, const std::filesystem::path& b) {
  std::error_code error;
  if (std::filesystem::exists(a, error) && std::filesystem::exists(b, error))
    return std::filesystem::equivalent(a, b, error);
  return std::filesystem::weakly_canonical(a, error) == std::filesystem::weakly_canonical(b, error);
}

}  // namespace detail

/// Converts the checkpoint file in_path into out_path with options.to_kv_heads KV heads (see
/// convert_checkpoint). Head counts come from options.q_heads and/or a Hugging Face config.json
/// (options.config_path, else next to the input); when a config was found, a copy with
/// num_key_value_heads updated is written as config.json next to the output. Refuses to
/// overwrite the input file or the input config, or to write where a directory stands. Throws
/// std::invalid_argument on bad input and std::runtime_error on I/O failure; nothing is written
/// unless the conversion succeeds. Both files are written in full before either is renamed into
/// place, and a model already at out_path is moved aside until both are: should renaming the
/// config then fail, the original model is put back (or the new one removed), and the message
/// says what was left.
inline ConvertFileResult convert_checkpoint_file(const std::string& in_path, const std::string& out_path,
                                                 const ConvertFileOptions& options) {
  namespace fs = std::filesystem;
  using detail::quote_text;
  using detail::throw_invalid;
  if (options.to_kv_heads <= 0) throw_invalid("to_kv_heads (", options.to_kv_heads, ") must be positive");
  if (options.q_heads < 0) throw_invalid("q_heads (", options.q_heads, ") must be >= 0 (0 = from the config)");
  const fs::path in_file(in_path), out_file(out_path);
  if (detail::same_file(in_file, out_file))
    throw_invalid("output ", quote_text(out_path, 1000), " is the input file; write the result to a new file");

  ConvertFileResult result;
  fs::path config_in;
  if (!options.config_path.empty()) {
    config_in = options.config_path;
    if (!fs::exists(config_in)) throw std::runtime_error(detail::concat("config ", quote_text(config_in.string(), 1000),
                                                                        " does not exist"));
  } else {
    const fs::path candidate = in_file.parent_path() / "config.json";
    std::error_code error;
    if (fs::is_regular_file(candidate, error)) config_in = candidate;
  }

  CheckpointConversion how;
  how.to_kv_heads = options.to_kv_heads;
  how.q_heads = options.q_heads;
  nlohmann::ordered_json config;
  fs::path config_out;
  if (!config_in.empty()) {
    config = detail::load_json(config_in);
    LlamaConfig heads;
    try {
      heads = read_llama_config(config);
    } catch (const std::invalid_argument& error) {
      throw std::invalid_argument(std::string(error.what()) + " (in " + quote_text(config_in.string(), 1000) + ")");
    }
    if (how.q_heads != 0 && heads.num_attention_heads != 0 && how.q_heads != heads.num_attention_heads)
      throw_invalid("q_heads (", how.q_heads, ") disagrees with num_attention_heads (", heads.num_attention_heads,
                    ") in ", quote_text(config_in.string(), 1000));
    if (how.q_heads == 0) how.q_heads = heads.num_attention_heads;
    how.from_kv_heads = heads.num_key_value_heads;
    how.hidden_size = heads.hidden_size;
    how.head_dim = heads.head_dim;
    config_out = out_file.parent_path() / "config.json";
    if (detail::same_file(config_in, config_out))
      throw_invalid("the output config ", quote_text(config_out.string(), 1000),
                    " would overwrite the input config; write the output into another directory");
    if (detail::same_file(out_file, config_in))
      throw_invalid("output ", quote_text(out_path, 1000), " is the input config; write the result to a new file");
    if (detail::same_file(out_file, config_out))
      throw_invalid("output ", quote_text(out_path, 1000), " is where the updated config.json goes; name it ",
                    "otherwise (e.g. model.safetensors)");
  }
  if (how.q_heads == 0)
    throw_invalid("the number of attention heads is unknown: give q_heads or a config.json with num_attention_heads");
  // A config without num_attention_heads but with q_heads given: its KV heads default to q_heads.
  if (how.from_kv_heads == 0 && !config_in.empty() && !config.contains("num_key_value_heads"))
    how.from_kv_heads = how.q_heads;

  // An existing directory where an output goes would make its rename fail only after the
  // conversion, perhaps after the other output was already in place.
  for (const fs::path& target : {out_file, config_out}) {
    std::error_code error;
    if (!target.empty() && fs::is_directory(target, error))
      throw std::runtime_error(detail::concat("cannot write ", quote_text(target.string(), 1000),
                                              ": it is an existing directory"));
  }

  const Safetensors in = Safetensors::load(in_path);
  const Safetensors out = convert_checkpoint(in, how, &result.summary);
  const std::vector<unsigned char> image = out.serialize();
  const std::string config_text = config_in.empty() ? std::string()
                                                    : with_kv_heads(config, options.to_kv_heads).dump(2) + "\n";
  // Both outputs are written in full before either is renamed into place, so only a failing
  // rename can leave one without the other.
  detail::write_temporary_sibling(out_file, image.data(), image.size());
  if (!config_in.empty()) {
    try {
      detail::write_temporary_sibling(config_out, config_text.data(), config_text.size());
    } catch (...) {
      std::error_code ignored;
      fs::remove(detail::temporary_sibling(out_file), ignored);
      throw;
    }
  }
  std::error_code error;
  const bool model_existed = fs::exists(fs::symlink_status(out_file, error));
  const auto drop_temporaries = [&] {
    std::error_code ignored;
    fs::remove(detail::temporary_sibling(out_file), ignored);
    if (!config_in.empty()) fs::remove(detail::temporary_sibling(config_out), ignored);
  };
  // A model already at out_path is moved aside first, so that a config rename that still
  // fails can put it back: the call then leaves every file as it found it.
  fs::path old_model = out_file;
  old_model += ".kvheads-old";
  const bool set_aside = model_existed && !config_in.empty();
  if (set_aside) {
    fs::rename(out_file, old_model, error);
    if (error) {
      drop_temporaries();
      throw std::runtime_error(detail::concat("cannot move ", quote_text(out_file.string(), 1000), " aside to ",
                                              quote_text(old_model.string(), 1000), ": ", error.message(),
                                              " (nothing was written)"));
    }
  }
  const auto restore = [&]() -> std::string {  // what the failed call leaves behind
    std::error_code failed;
    if (set_aside) {
      fs::rename(old_model, out_file, failed);
      if (failed)
        return " (the original model is kept as " + quote_text(old_model.string(), 1000) + ": " + failed.message() +
               ")";
    } else if (fs::exists(fs::symlink_status(out_file, failed))) {
      fs::remove(out_file, failed);
      if (failed) return " (" + quote_text(out_file.string(), 1000) + " could not be removed again)";
    }
    return " (nothing was written)";
  };
  const std::string model_failure = detail::move_temporary_sibling(out_file);
  if (!model_failure.empty()) {
    drop_temporaries();
    throw std::runtime_error(model_failure + (set_aside ? restore() : std::string(" (nothing was written)")));
  }
  if (!config_in.empty()) {
    const std::string config_failure = detail::move_temporary_sibling(config_out);
    if (!config_failure.empty()) throw std::runtime_error(config_failure + restore());
    if (set_aside) fs::remove(old_model, error);  // a leftover copy is harmless; the call succeeded
    result.config_in = config_in.string();
    result.config_out = config_out.string();
  }
  return result;
}

}  // namespace kvheads
