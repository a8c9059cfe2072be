#include "fp8moe/train/safetensors.h"

#include <cstring>

#include "fp8moe/core/error.h"
#include "fp8moe/core/file_io.h"
#include "fp8moe/core/json.h"

namespace fp8moe {

int64_t safetensors_dtype_size(const std::string& d) {
  if (d == "F64" || d == "I64" || d == "U64") return 8;
  if (d == "F32" || d == "I32" || d == "U32") return 4;
  if (d == "F16" || d == "BF16" || d == "I16" || d == "U16") return 2;
  if (d == "I8" || d == "U8" || d == "BOOL" || d == "F8_E4M3" || d == "F8_E5M2") return 1;
  return 0;
}

namespace {
int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}
}  // namespace

void SafetensorsWriter::add(const std::string& name, const std::string& dtype,
                            std::vector<int64_t> shape, std::string_view bytes) {
  FM_CHECK(safetensors_dtype_size(dtype) > 0, "unknown dtype ", dtype);
  FM_CHECK(static_cast<int64_t>(bytes.size()) == numel_of(shape) * safetensors_dtype_size(dtype),
           "tensor '", name, "': ", bytes.size(), " bytes do not match its shape");
  FM_CHECK(name != "__metadata__", "reserved tensor name");
  items_.push_back({name, dtype, std::move(shape), std::string(bytes)});
}

void SafetensorsWriter::add_f32(const std::string& name, std::vector<int64_t> shape,
                                const float* data) {
  const int64_t n = numel_of(shape);
  add(name, "F32", std::move(shape),
      std::string_view(reinterpret_cast<const char*>(data), static_cast<size_t>(n) * 4));
}

void SafetensorsWriter::add_u16(const std::string& name, const std::string& dtype,
                                std::vector<int64_t> shape, const uint16_t* data) {
  const int64_t n = numel_of(shape);
  add(name, dtype, std::move(shape),
      std::string_view(reinterpret_cast<const char*>(data), static_cast<size_t>(n) * 2));
}

std::string SafetensorsWriter::serialize() const {
  OrderedJson header = OrderedJson::object();
  if (!metadata_.empty()) {
    OrderedJson meta = OrderedJson::object();
    for (const auto& [k, v] : metadata_) meta[k] = v;
    header["__metadata__"] = meta;
  }
  uint64_t offset = 0;
  for (const auto& item : items_) {
    header[item.name] = {{"dtype", item.dtype},
                         {"shape", item.shape},
                         {"data_offsets", {offset, offset + item.bytes.size()}}};
    offset += item.bytes.size();
  }
  std::string text = header.dump();
  // NOTE: the data section starts 8-byte aligned, as other writers do.
  while ((text.size() + 8) % 8 != 0) text.push_back(' ');
  std::string out(8, '\0');
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  out += text;
  out.reserve(out.size() + offset);
  for (const auto& item : items_) out += item.bytes;
  return out;
}

void SafetensorsWriter::write(const std::string& path) const {
  write_file_atomic(path, serialize());
}

SafetensorsFile SafetensorsFile::read(const std::string& path) {
  return parse(read_file(path), "'" + path + "'");
}

SafetensorsFile SafetensorsFile::parse(std::string bytes, const std::string& what) {
  SafetensorsFile f;
  f.what_ = what;
  const uint64_t size = bytes.size();
  if (size < 8)
    FM_THROW(ErrorKind::kFormat, what, " is not a safetensors file: ", size,
             " bytes, shorter than the 8-byte header length");
  uint64_t hlen = 0;
  for (int i = 0; i < 8; ++i)
    hlen |= static_cast<uint64_t>(static_cast<uint8_t>(bytes[i])) << (8 * i);
  if (hlen > size - 8)
    FM_THROW(ErrorKind::kFormat, what, " is truncated or not a safetensors file: header length ",
             hlen, " exceeds the ", size - 8, " bytes after the length field");
  Json header;
  try {
    header = Json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<int64_t>(hlen));
  } catch (const nlohmann::json::exception&) {
    FM_THROW(ErrorKind::kFormat, what, " is not a safetensors file: its header is not JSON");
  }
  if (!header.is_object())
    FM_THROW(ErrorKind::kFormat, what,
             " is not a safetensors file: its header is not a JSON object");
  f.data_start_ = 8 + hlen;
  const uint64_t data_size = size - f.data_start_;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) FM_THROW(ErrorKind::kFormat, what, ": __metadata__ is not an object");
      for (const auto& [k, v] : value.items()) {
        if (!v.is_string())
          FM_THROW(ErrorKind::kFormat, what, ": metadata '", k, "' is not a string");
        f.metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    SafetensorsEntry e;
    try {
      e.dtype = value.at("dtype").get<std::string>();
      e.shape = value.at("shape").get<std::vector<int64_t>>();
      const auto off = value.at("data_offsets").get<std::vector<uint64_t>>();
      if (off.size() != 2) throw std::runtime_error("offsets");
      e.begin = off[0];
      e.end = off[1];
    } catch (const std::exception&) {
      FM_THROW(ErrorKind::kFormat, what, ": tensor '", name,
               "' lacks a valid dtype, shape or data_offsets");
    }
    const int64_t esize = safetensors_dtype_size(e.dtype);
    if (esize == 0)
      FM_THROW(ErrorKind::kFormat, what, ": tensor '", name, "' has unknown dtype ", e.dtype);
    for (int64_t d : e.shape)
      if (d < 0)
        FM_THROW(ErrorKind::kFormat, what, ": tensor '", name, "' has a negative dimension");
    if (e.begin > e.end || e.end > data_size)
      FM_THROW(ErrorKind::kFormat, what, " is truncated or corrupt: tensor '", name,
               "' has data_offsets [", e.begin, ", ", e.end, "] outside the ", data_size,
               " data bytes");
    if (static_cast<int64_t>(e.end - e.begin) != numel_of(e.shape) * esize)
      FM_THROW(ErrorKind::kFormat, what, ": tensor '", name, "' has ", e.end - e.begin,
               " bytes, but its dtype and shape need ", numel_of(e.shape) * esize);
    f.entries_[name] = e;
  }
  f.bytes_ = std::move(bytes);
  return f;
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name, const std::string& dtype,
                                               int64_t numel) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) FM_THROW(ErrorKind::kFormat, what_, ": tensor '", name, "' is missing");
  if (it->second.dtype != dtype)
    FM_THROW(ErrorKind::kFormat, what_, ": tensor '", name, "' is ", it->second.dtype,
             ", expected ", dtype);
  if (numel_of(it->second.shape) != numel)
    FM_THROW(ErrorKind::kFormat, what_, ": tensor '", name, "' has ", numel_of(it->second.shape),
             " elements, expected ", numel);
  return it->second;
}

std::vector<float> SafetensorsFile::f32(const std::string& name, int64_t numel) const {
  const auto& e = entry(name, "F32", numel);
  std::vector<float> out(static_cast<size_t>(numel));
  std::memcpy(out.data(), bytes_.data() + data_start_ + e.begin, static_cast<size_t>(numel) * 4);
  return out;
}

std::vector<uint16_t> SafetensorsFile::u16(const std::string& name, const std::string& dtype,
                                           int64_t numel) const {
  const auto& e = entry(name, dtype, numel);
  std::vector<uint16_t> out(static_cast<size_t>(numel));
  std::memcpy(out.data(), bytes_.data() + data_start_ + e.begin, static_cast<size_t>(numel) * 2);
  return out;
}

}  // namespace fp8moe
