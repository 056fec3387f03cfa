// SHA-256 (FIPS 180-4), small and dependency-free, for the bundle's file hashes.
#pragma once
#include <cstdint>
#include <string>

namespace first_edge {

class Sha256 {
 public:
  Sha256();
  void update(const uint8_t* data, size_t n);
  std::string hex();  // finalizes
 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

// Hex digest of a file; returns false (and sets *err) if it cannot be read.
bool sha256_file(const std::string& path, std::string* hex, std::string* err);

}  // namespace first_edge
