// The safetensors format, written and read by us: an 8-byte little-endian header length, a JSON
// header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
// then the raw little-endian data (offsets relative to its start). Reading validates
// everything: a truncated file, a header length beyond the file, offsets out of range or not
// matching dtype x shape, or a file that is not safetensors at all is a kFormat error naming the
// file and the problem.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace fp8moe {

struct SafetensorsEntry {
  std::string dtype;  // "F32", "BF16", "F64", "I64", "I32", "U16", "U8", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // within the data section
};

int64_t safetensors_dtype_size(const std::string& dtype);  // 0 when unknown

class SafetensorsWriter {
 public:
  void add(const std::string& name, const std::string& dtype, std::vector<int64_t> shape,
           std::string_view bytes);
  void add_f32(const std::string& name, std::vector<int64_t> shape, const float* data);
  void add_u16(const std::string& name, const std::string& dtype, std::vector<int64_t> shape,
               const uint16_t* data);
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  std::string serialize() const;
  // Written atomically (temporary file, fsync, rename).
  void write(const std::string& path) const;

 private:
  struct Item {
    std::string name, dtype;
    std::vector<int64_t> shape;
    std::string bytes;
  };
  std::vector<Item> items_;
  std::map<std::string, std::string> metadata_;
};

class SafetensorsFile {
 public:
  static SafetensorsFile parse(std::string bytes, const std::string& what);
  static SafetensorsFile read(const std::string& path);

  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::map<std::string, SafetensorsEntry>& entries() const { return entries_; }
  bool has(const std::string& name) const { return entries_.count(name) != 0; }
  // The entry, checked for dtype and element count; errors name the file and tensor.
  const SafetensorsEntry& entry(const std::string& name, const std::string& dtype,
                                int64_t numel) const;
  std::vector<float> f32(const std::string& name, int64_t numel) const;
  std::vector<uint16_t> u16(const std::string& name, const std::string& dtype, int64_t numel) const;
  const std::string& what() const { return what_; }

 private:
  std::string what_;
  std::string bytes_;
  uint64_t data_start_ = 0;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, SafetensorsEntry> entries_;
};

}  // namespace fp8moe
