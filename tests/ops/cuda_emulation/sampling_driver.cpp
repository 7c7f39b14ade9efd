// Runs fastlm::sampling::sample_kernel<float> (csrc/sampling_kernels.cuh) on the CPU emulation.
// argv: input file, output file. Input (native endianness): int64 batch, int64 vocab, then
// logits float32[batch*vocab], uniform float64[batch], temperature float32[batch],
// top_k int64[batch], top_p float32[batch], min_p float32[batch]. Output: tokens int64[batch],
// logprobs float32[batch], status int32[batch].
#include <cstdio>
#include <vector>

#include "sampling_kernels.cuh"

template <typename T>
static void read(std::FILE* f, std::vector<T>& v, size_t n) {
  v.resize(n);
  if (std::fread(v.data(), sizeof(T), n, f) != n) {
    std::fprintf(stderr, "short read\n");
    std::exit(2);
  }
}

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  std::FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 2;
  std::vector<int64_t> shape;
  read(in, shape, 2);
  const int64_t batch = shape[0], vocab = shape[1];
  std::vector<float> logits, temperature, top_p, min_p;
  std::vector<double> uniform;
  std::vector<int64_t> top_k;
  read(in, logits, batch * vocab);
  read(in, uniform, batch);
  read(in, temperature, batch);
  read(in, top_k, batch);
  read(in, top_p, batch);
  read(in, min_p, batch);
  std::fclose(in);
  std::vector<int64_t> tokens(batch);
  std::vector<float> logprobs(batch);
  std::vector<int32_t> status(batch);
  for (int64_t row = 0; row < batch; ++row) {
    cuda_emulation::run_block(static_cast<unsigned>(row), fastlm::sampling::kThreads, [&] {
      fastlm::sampling::sample_kernel<float>(logits.data(), vocab, static_cast<int>(vocab), uniform.data(),
                                             temperature.data(), top_k.data(), top_p.data(), min_p.data(),
                                             tokens.data(), logprobs.data(), status.data());
    });
  }
  std::FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 2;
  std::fwrite(tokens.data(), sizeof(int64_t), batch, out);
  std::fwrite(logprobs.data(), sizeof(float), batch, out);
  std::fwrite(status.data(), sizeof(int32_t), batch, out);
  std::fclose(out);
  return 0;
}
