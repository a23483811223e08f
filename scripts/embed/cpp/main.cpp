// Adapt an exported MAML adapter to one task and predict, from C++ with libtorch.
//
//   maml_adapter EXPORT_DIR TASK_FILE
//
// EXPORT_DIR is what `python -m export` wrote (this program uses its adapter.json and the
// TorchScript adapt and predict files it names);
// TASK_FILE holds the tensors support_x, support_y and query_x in the small binary format that
// `python -m serve.tensor_file` writes (see serve/tensor_file.py):
//
//   "MAMLTSR1"                            8 bytes
//   uint32 count                          number of tensors
//   count times:
//     uint32 name_length, name bytes      e.g. "support_x"
//     uint8  dtype                        1 = float32, 2 = int64
//     uint8  ndim, int64 shape[ndim]
//     data                                little-endian, C order
//
// Output on standard output: `shape Q D...`, one line of outputs per query (logits for a
// classifier, predicted values for regression), and for a classifier (int64 labels) a final
// line `classes c0 c1 ...` with each query's arg-max class.
//
// Before running anything it checks, like the Python runtime (serve/metadata.py,
// serve/validation.py): adapter.json's format, the sha256 of each file it loads, and the task's
// shapes, dtypes, labels and finiteness; each problem is one `error:` line and exit status 1.
//
// Batch norm uses the statistics of the batch it is given (the support set while adapting, the
// query set while predicting), so predictions depend on which queries are sent together.

#include <torch/script.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr char kMagic[8] = {'M', 'A', 'M', 'L', 'T', 'S', 'R', '1'};

template <typename T>
T read_value(std::ifstream& in, const std::string& what) {
  T value{};
  in.read(reinterpret_cast<char*>(&value), sizeof(T));
  if (!in) throw std::runtime_error("truncated task file while reading " + what);
  return value;  // the format is little-endian, like every machine libtorch runs on
}

std::map<std::string, torch::Tensor> read_tensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open task file " + path);
  char magic[8];
  in.read(magic, sizeof(magic));
  if (!in || std::memcmp(magic, kMagic, sizeof(magic)) != 0) {
    throw std::runtime_error(path + " is not a tensor file (write it with serve.tensor_file)");
  }
  std::map<std::string, torch::Tensor> tensors;
  const auto count = read_value<uint32_t>(in, "the tensor count");
  for (uint32_t t = 0; t < count; ++t) {
    const auto name_length = read_value<uint32_t>(in, "a name length");
    if (name_length > 256) throw std::runtime_error("tensor name too long in " + path);
    std::string name(name_length, '\0');
    in.read(name.data(), name_length);
    const auto dtype_code = read_value<uint8_t>(in, name + "'s dtype");
    const auto ndim = read_value<uint8_t>(in, name + "'s rank");
    std::vector<int64_t> shape(ndim);
    int64_t numel = 1;
    for (auto& d : shape) {
      d = read_value<int64_t>(in, name + "'s shape");
      if (d < 0) throw std::runtime_error("negative dimension in " + name);
      numel *= d;
    }
    torch::Dtype dtype;
    if (dtype_code == 1) {
      dtype = torch::kFloat32;
    } else if (dtype_code == 2) {
      dtype = torch::kInt64;
    } else {
      throw std::runtime_error("unknown dtype code " + std::to_string(dtype_code) + " for " + name);
    }
    auto tensor = torch::empty(shape, torch::TensorOptions().dtype(dtype));
    in.read(static_cast<char*>(tensor.data_ptr()),
            static_cast<std::streamsize>(numel * tensor.element_size()));
    if (!in) throw std::runtime_error("truncated data for tensor " + name);
    tensors[name] = tensor;
  }
  return tensors;
}

torch::Tensor take(std::map<std::string, torch::Tensor>& tensors, const std::string& name) {
  auto found = tensors.find(name);
  if (found == tensors.end()) throw std::runtime_error("the task file has no tensor " + name);
  return found->second;
}

void print_outputs(const torch::Tensor& outputs, bool classifier) {
  auto out = outputs.contiguous().to(torch::kFloat64);
  const int64_t rows = out.size(0);
  auto flat = out.reshape({rows, -1});
  std::printf("shape");
  for (auto d : outputs.sizes()) std::printf(" %lld", static_cast<long long>(d));
  std::printf("\n");
  auto values = flat.accessor<double, 2>();
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < flat.size(1); ++j) std::printf(j ? " %.9g" : "%.9g", values[i][j]);
    std::printf("\n");
  }
  if (classifier) {
    auto classes = outputs.argmax(-1);
    std::printf("classes");
    for (int64_t i = 0; i < rows; ++i) {
      std::printf(" %lld", static_cast<long long>(classes[i].item<int64_t>()));
    }
    std::printf("\n");
  }
}


// ---- sha256 (FIPS 180-4), to compare each file with the digest adapter.json records ----

std::string sha256_hex(const std::string& data) {
  static constexpr std::array<uint32_t, 64> k = {
      0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
      0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
      0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
      0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
      0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
      0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
      0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
      0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
      0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
      0xc67178f2};
  std::array<uint32_t, 8> h = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                               0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  auto rotr = [](uint32_t x, int n) { return (x >> n) | (x << (32 - n)); };
  // Padding: a 1 bit, zeros up to 56 mod 64 bytes, then the bit length, big-endian.
  std::string msg = data;
  const uint64_t bits = static_cast<uint64_t>(data.size()) * 8;
  msg.push_back(static_cast<char>(0x80));
  while (msg.size() % 64 != 56) msg.push_back('\0');
  for (int i = 7; i >= 0; --i) msg.push_back(static_cast<char>((bits >> (8 * i)) & 0xff));
  for (size_t block = 0; block < msg.size(); block += 64) {
    std::array<uint32_t, 64> w{};
    for (int i = 0; i < 16; ++i) {
      for (int b = 0; b < 4; ++b) {
        w[i] = (w[i] << 8) | static_cast<unsigned char>(msg[block + 4 * i + b]);
      }
    }
    for (int i = 16; i < 64; ++i) {
      const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    auto [a, b, c, d, e, f, g, hh] = h;
    for (int i = 0; i < 64; ++i) {
      const uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) +
                          k[i] + w[i];
      const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    const std::array<uint32_t, 8> add = {a, b, c, d, e, f, g, hh};
    for (int i = 0; i < 8; ++i) h[i] += add[i];
  }
  char hex[65];
  for (int i = 0; i < 8; ++i) std::snprintf(hex + 8 * i, 9, "%08x", h[i]);
  return std::string(hex, 64);
}

// ---- adapter.json: the few fields this program needs, read without a JSON library ----
//
// `member(object, key)` takes the text of one JSON object, `{...}`, and returns the text of the
// value of `key` among its own members (nested objects, arrays and strings are skipped whole).

std::string trim(const std::string& s) {
  const auto first = s.find_first_not_of(" \t\r\n");
  const auto last = s.find_last_not_of(" \t\r\n");
  return first == std::string::npos ? "" : s.substr(first, last - first + 1);
}

size_t skip_string(const std::string& s, size_t i) {  // i at the opening quote
  for (++i; i < s.size(); ++i) {
    if (s[i] == '\\') ++i;
    else if (s[i] == '"') return i + 1;
  }
  throw std::runtime_error("adapter.json has an unterminated string; re-export the adapter");
}

size_t skip_value(const std::string& s, size_t i) {
  while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  if (i < s.size() && s[i] == '"') return skip_string(s, i);
  if (i < s.size() && (s[i] == '{' || s[i] == '[')) {
    int depth = 0;
    for (; i < s.size(); ++i) {
      if (s[i] == '"') i = skip_string(s, i) - 1;
      else if (s[i] == '{' || s[i] == '[') ++depth;
      else if ((s[i] == '}' || s[i] == ']') && --depth == 0) return i + 1;
    }
    throw std::runtime_error("adapter.json is truncated; re-export the adapter");
  }
  while (i < s.size() && s[i] != ',' && s[i] != '}' && s[i] != ']') ++i;  // number or literal
  return i;
}

std::optional<std::string> member(const std::string& object, const std::string& key) {
  size_t i = object.find('{');
  if (i == std::string::npos) return std::nullopt;
  for (++i; i < object.size();) {
    while (i < object.size() && (std::isspace(static_cast<unsigned char>(object[i])) ||
                                 object[i] == ',')) ++i;
    if (i >= object.size() || object[i] != '"') return std::nullopt;  // '}' or malformed
    const size_t after_key = skip_string(object, i);
    const std::string name = object.substr(i + 1, after_key - i - 2);
    const size_t colon = object.find(':', after_key);
    if (colon == std::string::npos) return std::nullopt;
    const size_t stop = skip_value(object, colon + 1);
    if (name == key) return trim(object.substr(colon + 1, stop - colon - 1));
    i = stop;
  }
  return std::nullopt;
}

std::string required(const std::string& object, const std::string& key, const std::string& where) {
  auto value = member(object, key);
  if (!value) {
    throw std::runtime_error("adapter.json lacks " + where + key + "; re-export the adapter");
  }
  return *value;
}

std::string unquote(const std::string& value) {  // file names and hex digests have no escapes
  if (value.size() < 2 || value.front() != '"' || value.back() != '"') return value;
  return value.substr(1, value.size() - 2);
}

std::vector<int64_t> int_list(const std::string& value) {  // "[1, 28, 28]"
  std::vector<int64_t> out;
  std::stringstream items(value.substr(1, value.size() >= 2 ? value.size() - 2 : 0));
  for (std::string item; std::getline(items, item, ',');) {
    if (!trim(item).empty()) out.push_back(std::stoll(item));
  }
  return out;
}

struct Adapter {
  bool classifier = false;
  int64_t n_way = 0;                  // classifiers only
  std::vector<int64_t> input_shape;   // one example's input
  std::vector<int64_t> target_shape;  // one example's regression target
  std::string adapt_file, predict_file;
  std::map<std::string, std::string> sha256;  // file name -> hex digest
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::ostringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

Adapter read_adapter(const std::string& dir) {
  const std::string path = dir + "/adapter.json";
  std::ifstream probe(path);
  if (!probe) {
    throw std::runtime_error(dir + " has no adapter.json: it is not an export directory (write "
                             "one with `python -m export`)");
  }
  const std::string json = read_file(path);
  const auto format = member(json, "format");
  if (!format || unquote(*format) != "maml-toolkit/adapter-v1") {
    throw std::runtime_error(path + " has format " + (format ? *format : "none") +
                             "; this program reads \"maml-toolkit/adapter-v1\"");
  }
  Adapter adapter;
  const std::string task = unquote(required(json, "task", ""));
  if (task != "classification" && task != "regression") {
    throw std::runtime_error(path + ": unknown task " + task);
  }
  adapter.classifier = task == "classification";
  if (adapter.classifier) adapter.n_way = std::stoll(required(json, "n_way", ""));
  adapter.input_shape = int_list(required(required(json, "input", ""), "shape", "input."));
  adapter.target_shape = int_list(required(required(json, "target", ""), "shape", "target."));
  const auto torchscript = member(required(json, "files", ""), "torchscript");
  if (!torchscript) {
    throw std::runtime_error("this adapter was not exported for TorchScript, which this program "
                             "runs; re-export with --formats including torchscript");
  }
  adapter.adapt_file = unquote(required(*torchscript, "adapt", "files.torchscript."));
  adapter.predict_file = unquote(required(*torchscript, "predict", "files.torchscript."));
  const std::string digests = required(json, "sha256", "");
  for (const auto& name : {adapter.adapt_file, adapter.predict_file}) {
    adapter.sha256[name] = unquote(required(digests, name, "sha256."));
  }
  return adapter;
}

// The bytes of one of the adapter's files, refused unless they match adapter.json's sha256.
std::string verified_file(const std::string& dir, const Adapter& adapter, const std::string& name) {
  const std::string path = dir + "/" + name;
  std::ifstream probe(path);
  if (!probe) {
    throw std::runtime_error(path + " is missing from the export directory; copy the whole "
                             "directory, or re-export");
  }
  std::string bytes = read_file(path);
  const std::string& expected = adapter.sha256.at(name);
  const std::string actual = sha256_hex(bytes);
  if (actual != expected) {
    throw std::runtime_error(path + " does not match its sha256 in adapter.json (expected " +
                             expected.substr(0, 12) + "..., found " + actual.substr(0, 12) +
                             "...): the file was modified or truncated; copy it again or "
                             "re-export");
  }
  return bytes;
}

// ---- the task: the same checks, in the same words, as serve/validation.py ----

std::string shape_text(c10::IntArrayRef shape, bool per_example = false) {
  std::string out = per_example ? "(N" : "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += (i || per_example ? ", " : "") + std::to_string(shape[i]);
  }
  return out + (shape.size() == 1 && !per_example ? ",)" : ")");
}

void check_examples(const torch::Tensor& t, const std::string& name,
                    const std::vector<int64_t>& shape, const std::string& what) {
  if (t.scalar_type() != torch::kFloat32) {
    throw std::runtime_error(name + " must be float32 (dtype code 1)");
  }
  if (t.dim() != static_cast<int64_t>(shape.size()) + 1 ||
      !t.sizes().slice(1).equals(shape)) {
    throw std::runtime_error(name + " has shape " + shape_text(t.sizes()) + ", expected " +
                             shape_text(shape, true) + ": one " + what + " of shape " +
                             shape_text(shape) + " per example");
  }
  if (t.size(0) == 0) throw std::runtime_error(name + " is empty; send at least one example");
  const int64_t bad = t.numel() - torch::isfinite(t).sum().item<int64_t>();
  if (bad) {
    throw std::runtime_error(name + " has " + std::to_string(bad) + " non-finite value(s) (NaN "
                             "or infinity); send finite numbers");
  }
}

void check_task(const Adapter& adapter, const torch::Tensor& support_x,
                const torch::Tensor& support_y, const torch::Tensor& query_x) {
  check_examples(support_x, "support_x", adapter.input_shape, "input");
  check_examples(query_x, "query_x", adapter.input_shape, "input");
  if (adapter.classifier) {
    const std::string n = std::to_string(adapter.n_way);
    const std::string range = "0.." + std::to_string(adapter.n_way - 1);
    if (support_y.scalar_type() != torch::kInt64) {
      throw std::runtime_error("support_y must hold int64 class indices " + range +
                               " (dtype code 2)");
    }
    if (support_y.dim() != 1) {
      throw std::runtime_error("support_y has shape " + shape_text(support_y.sizes()) +
                               ", expected (N,): one class index per example");
    }
    auto outside = support_y.masked_select((support_y < 0) | (support_y >= adapter.n_way));
    if (outside.numel()) {
      throw std::runtime_error("support_y has label " +
                               std::to_string(outside[0].item<int64_t>()) + " outside [0, " + n +
                               "); this adapter is " + n + "-way, so labels are " + range);
    }
    auto counts = torch::bincount(support_y, {}, adapter.n_way);
    for (int64_t c = 0; c < adapter.n_way; ++c) {
      if (counts[c].item<int64_t>() == 0) {
        throw std::runtime_error("class " + std::to_string(c) + " has no support example; a " +
                                 n + "-way adapter needs at least one example of every class");
      }
    }
  } else {
    check_examples(support_y, "support_y", adapter.target_shape, "target");
  }
  if (support_x.size(0) != support_y.size(0)) {
    throw std::runtime_error("support_x has " + std::to_string(support_x.size(0)) +
                             " examples but support_y has " + std::to_string(support_y.size(0)) +
                             "; send one label per example");
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " EXPORT_DIR TASK_FILE\n";
    return 2;
  }
  const std::string dir = argv[1];
  try {
    const Adapter adapter = read_adapter(dir);
    auto tensors = read_tensors(argv[2]);
    auto support_x = take(tensors, "support_x");
    auto support_y = take(tensors, "support_y");
    auto query_x = take(tensors, "query_x");
    check_task(adapter, support_x, support_y, query_x);

    // Load the bytes whose sha256 was checked, not the file again.
    std::istringstream adapt_bytes(verified_file(dir, adapter, adapter.adapt_file));
    std::istringstream predict_bytes(verified_file(dir, adapter, adapter.predict_file));
    torch::jit::Module adapt = torch::jit::load(adapt_bytes);
    torch::jit::Module predict = torch::jit::load(predict_bytes);
    // No .eval(): the modules must keep the mode they were exported in, since batch norm
    // in eval mode would switch to running statistics, which MAML never uses.

    // adapt(support_x, support_y) -> (p0, ..., m0, ...): the task's adapted state, the fine-tuned
    // weights and, for an adapter in the support normalisation mode, the support set's batch-norm
    // moments (adapter.json, "norm"). It goes to predict as it is.
    auto adapted = adapt.forward({support_x, support_y});
    std::vector<torch::jit::IValue> inputs;
    if (adapted.isTuple()) {
      for (const auto& p : adapted.toTupleRef().elements()) inputs.push_back(p.toTensor().detach());
    } else if (adapted.isTensorList()) {
      for (const auto& p : adapted.toTensorVector()) inputs.push_back(p.detach());
    } else {
      throw std::runtime_error("adapt.ts did not return a tuple of tensors");
    }
    inputs.push_back(query_x);

    // predict(p0, ..., m0, ..., query_x) -> outputs
    torch::NoGradGuard no_grad;
    auto outputs = predict.forward(inputs).toTensor();
    if (!torch::isfinite(outputs).all().item<bool>()) {
      throw std::runtime_error("the adapted model produced non-finite outputs for these inputs "
                               "(are they far outside the training range?); send smaller values");
    }
    print_outputs(outputs, adapter.classifier);
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
