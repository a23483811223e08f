// Adapt an exported MAML adapter to one task and predict, from C++ with libtorch.
//
//   maml_adapter EXPORT_DIR TASK_FILE
//
// EXPORT_DIR is what `python -m export` wrote (this program uses its adapt.ts and predict.ts);
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
// Batch norm uses the statistics of the batch it is given (the support set while adapting, the
// query set while predicting), so predictions depend on which queries are sent together.

#include <torch/script.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
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

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " EXPORT_DIR TASK_FILE\n";
    return 2;
  }
  const std::string dir = argv[1];
  try {
    auto tensors = read_tensors(argv[2]);
    auto support_x = take(tensors, "support_x");
    auto support_y = take(tensors, "support_y");
    auto query_x = take(tensors, "query_x");

    torch::jit::Module adapt = torch::jit::load(dir + "/adapt.ts");
    torch::jit::Module predict = torch::jit::load(dir + "/predict.ts");
    // No .eval(): the modules must keep the mode they were exported in, since batch norm
    // in eval mode would switch to running statistics, which MAML never uses.

    // adapt(support_x, support_y) -> (p0, ..., p{n-1}): fine-tuned weights (needs autograd).
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

    // predict(p0, ..., p{n-1}, query_x) -> outputs
    torch::NoGradGuard no_grad;
    auto outputs = predict.forward(inputs).toTensor();
    print_outputs(outputs, support_y.scalar_type() == torch::kInt64);
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
