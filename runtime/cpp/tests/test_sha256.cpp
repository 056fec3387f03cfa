// ctest: the vendored SHA-256 (src/third_party/sha256.cpp) against known digests (Python's hashlib), at the
// padding edges of the 64-byte block: the length field fits after the 0x80 byte up to 55 bytes (one block),
// not from 56 (an extra block); the same again one block later (119, 120). Also fed in pieces (the update
// buffering) and through sha256_file (a file larger than its 1 MiB read buffer, an empty file, a missing one).
// HMAC-SHA256 (the bundle signature, manifest.sig) against the RFC 4231 test vectors (keys shorter and longer
// than the 64-byte block) and keys of exactly 64 and 65 bytes (Python's hmac).
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "sha256.h"

using namespace first_edge;

static int failures = 0, checks = 0;

static void expect_eq(const std::string& got, const std::string& want, const std::string& what) {
  checks++;
  if (got != want) {
    failures++;
    std::fprintf(stderr, "FAILED %s:\n  got  %s\n  want %s\n", what.c_str(), got.c_str(), want.c_str());
  } else {
    std::printf("ok   %s\n", what.c_str());
  }
}

static std::string digest(const std::vector<uint8_t>& data, size_t piece) {
  Sha256 h;
  if (piece == 0) {
    h.update(data.data(), data.size());
  } else {
    for (size_t i = 0; i < data.size(); i += piece) h.update(data.data() + i, std::min(piece, data.size() - i));
  }
  return h.hex();
}

struct Case {
  size_t n;  // the byte 'a' repeated n times
  const char* hex;
};

// python -c "import hashlib; print(hashlib.sha256(b'a' * n).hexdigest())"
static const Case kRepeatedA[] = {
    {0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
    {55, "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318"},
    {56, "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a"},
    {63, "7d3e74a05d7db15bce4ad9ec0658ea98e3f06eeecf16b4c6fff2da457ddc2f34"},
    {64, "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb"},
    {65, "635361c48bb9eab14198e76ea8ab7f1a41685d6ad62aa9146d301d4f17eb0ae0"},
    {119, "31eba51c313a5c08226adf18d4a359cfdfd8d2e816b13f4af952f7ea6584dcfb"},
    {120, "2f3d335432c70b580af0e8e1b3674a7c020d683aa5f73aaaedfdc55af904c21c"},
    {1000, "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"},
};
// 'a' * (1 MiB + 1): one byte past sha256_file's read buffer
static const char* kMiBPlus1 = "4a3f0c0c213adea174f9a3d4c13177315b588bdb2e9c1012d3d0bf0453ca0f6a";

static std::vector<uint8_t> bytes(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }

static bool write_file(const std::string& path, const std::vector<uint8_t>& data) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return false;
  bool ok = std::fwrite(data.data(), 1, data.size(), f) == data.size();
  return std::fclose(f) == 0 && ok;
}

static void file_tests(const std::string& tmp) {
  const std::string path = tmp + "/first_edge_sha256_test_" + std::to_string(getpid()) + ".bin";
  std::string hex, err;
  const std::vector<uint8_t> big((1u << 20) + 1, 'a');
  checks++;
  if (!write_file(path, big)) {
    failures++;
    std::fprintf(stderr, "FAILED cannot write %s\n", path.c_str());
    return;
  }
  checks++;
  if (!sha256_file(path, &hex, &err)) {
    failures++;
    std::fprintf(stderr, "FAILED sha256_file(%s): %s\n", path.c_str(), err.c_str());
  }
  expect_eq(hex, kMiBPlus1, "sha256_file of 1 MiB + 1 bytes");
  write_file(path, {});
  hex.clear();
  checks++;
  if (!sha256_file(path, &hex, &err)) failures++;
  expect_eq(hex, kRepeatedA[0].hex, "sha256_file of an empty file");
  std::remove(path.c_str());
  err.clear();
  checks++;
  if (sha256_file(path, &hex, &err) || err.find("cannot open") == std::string::npos) {
    failures++;
    std::fprintf(stderr, "FAILED sha256_file of a missing file: expected false and 'cannot open', got '%s'\n",
                 err.c_str());
  } else {
    std::printf("ok   sha256_file of a missing file -> %s\n", err.c_str());
  }
}

int main() {
  for (const Case& c : kRepeatedA) {
    const std::vector<uint8_t> data(c.n, 'a');
    const std::string n = std::to_string(c.n);
    expect_eq(digest(data, 0), c.hex, "'a' x " + n);
    expect_eq(digest(data, 1), c.hex, "'a' x " + n + ", one byte per update");
    expect_eq(digest(data, 7), c.hex, "'a' x " + n + ", 7 bytes per update");
  }
  // FIPS 180-4 examples (one block; 56 bytes: two blocks) and every byte value, five times
  expect_eq(digest(bytes("abc"), 0), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "abc");
  expect_eq(digest(bytes("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"), 0),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1", "FIPS 180-4 two-block message");
  std::vector<uint8_t> all;
  for (int r = 0; r < 5; r++)
    for (int b = 0; b < 256; b++) all.push_back((uint8_t)b);
  expect_eq(digest(all, 0), "d414b085826eb06778483ba35564dc849e643359f69ed9747878ba6e54985bed", "bytes 0..255 x 5");

  // RFC 4231 section 4: test cases 1-4, 6, 7; case 5's output is truncated to 128 bits there
  struct HmacCase {
    std::string key, data;
    const char* hex;
    const char* what;
  };
  std::string k4;
  for (int b = 1; b <= 25; b++) k4.push_back((char)b);
  const HmacCase hmacs[] = {
      {std::string(20, '\x0b'), "Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
       "RFC 4231 case 1"},
      {"Jefe", "what do ya want for nothing?", "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
       "RFC 4231 case 2"},
      {std::string(20, '\xaa'), std::string(50, '\xdd'),
       "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe", "RFC 4231 case 3"},
      {k4, std::string(50, '\xcd'), "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
       "RFC 4231 case 4"},
      {std::string(131, '\xaa'), "Test Using Larger Than Block-Size Key - Hash Key First",
       "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54", "RFC 4231 case 6 (131-byte key)"},
      {std::string(131, '\xaa'),
       "This is a test using a larger than block-size key and a larger than block-size data. The key needs to be "
       "hashed before being used by the HMAC algorithm.",
       "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2", "RFC 4231 case 7 (131-byte key)"},
      {std::string(64, 'k'), "manifest", "3bfa7db354eb773e0ca12fe1ff0a102e09516a9b97e0ae0e349e485dd6a636a7", "HMAC with a 64-byte key"},
      {std::string(65, 'k'), "manifest", "6214ee000b9a03908fc057a255d31d2740f2f936b481ee85169491c53ea037ba", "HMAC with a 65-byte key (hashed first)"},
  };
  for (const HmacCase& c : hmacs) {
    expect_eq(hmac_sha256(c.key, c.data), c.hex, c.what);
  }
  expect_eq(hmac_sha256(std::string(20, '\x0c'), "Test With Truncation").substr(0, 32),
            "a3b6167473100ee06e0c796c2955552b", "RFC 4231 case 5 (first 128 bits)");

  const char* tmp = std::getenv("FIRST_EDGE_TEST_TMP");
  file_tests(tmp && *tmp ? tmp : "/tmp");
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
