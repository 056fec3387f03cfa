// SHA-256 (FIPS 180-4), small and dependency-free, for the bundle's file hashes; HMAC-SHA256 (RFC 2104) on it
// for the bundle's signature (manifest.sig).
#pragma once
#include <cstdint>
#include <string>

namespace first_edge {

class Sha256 {
 public:
  Sha256();
  void update(const uint8_t* data, size_t n);
  std::string hex();  // finalizes
  void digest(uint8_t out[32]);  // finalizes: the raw 32-byte digest
 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

// HMAC-SHA256 (RFC 2104) of `message` under `key` (both raw bytes; a key longer than 64 bytes is hashed
// first), as 64 lower-case hex digits.
std::string hmac_sha256(const std::string& key, const std::string& message);

// Hex digest of a file; returns false (and sets *err) if it cannot be read.
bool sha256_file(const std::string& path, std::string* hex, std::string* err);

}  // namespace first_edge
