// y (M, N) = x (M, K) @ w (N, K)^T in float32 for a few rows M, as an XLA FFI handler on the
// CPU: each weight row is read once, contiguously, and its dot products with the M input
// rows accumulate in AVX-512 registers; the N outputs are split between the calling thread
// and one task on XLA's intra-op thread pool. K must be a multiple of 16, M at most 8.
// Built by benchmarks/handwritten_products.py (g++ -O3 -march=native).
#include <immintrin.h>

#include <atomic>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

template <int M>
static void Rows(const float* x, const float* w, float* y, int64_t k, int64_t n, int64_t n0,
                 int64_t n1) {
  for (int64_t j = n0; j < n1; j += 2) {  // two weight rows (outputs) at a time
    const bool pair = j + 1 < n1;
    const float* a = w + j * k;
    const float* b = pair ? a + k : a;
    __m512 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
      const __m512 wa = _mm512_loadu_ps(a + i), wb = _mm512_loadu_ps(b + i);
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * k + i);
        acc[m][0] = _mm512_fmadd_ps(xv, wa, acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(xv, wb, acc[m][1]);
      }
    }
    for (int m = 0; m < M; ++m) {
      y[m * n + j] = _mm512_reduce_add_ps(acc[m][0]);
      if (pair) y[m * n + j + 1] = _mm512_reduce_add_ps(acc[m][1]);
    }
  }
}

static void RowsOf(int64_t m, const float* x, const float* w, float* y, int64_t k, int64_t n,
                   int64_t n0, int64_t n1) {
  switch (m) {
    case 1: return Rows<1>(x, w, y, k, n, n0, n1);
    case 2: return Rows<2>(x, w, y, k, n, n0, n1);
    case 3: return Rows<3>(x, w, y, k, n, n0, n1);
    case 4: return Rows<4>(x, w, y, k, n, n0, n1);
    case 5: return Rows<5>(x, w, y, k, n, n0, n1);
    case 6: return Rows<6>(x, w, y, k, n, n0, n1);
    case 7: return Rows<7>(x, w, y, k, n, n0, n1);
    case 8: return Rows<8>(x, w, y, k, n, n0, n1);
  }
}

static ffi::Error RowsMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                 ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t n = w.dimensions()[0], k = w.dimensions()[1], m = x.element_count() / k;
  if (k % 16 || m < 1 || m > 8) {
    return ffi::Error::InvalidArgument("rows_matmul: K % 16 == 0 and 1 <= M <= 8 only");
  }
  const float *xp = x.typed_data(), *wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t half = n / 2 / 2 * 2;
  std::atomic<bool> done{false};
  pool.Schedule([&] {
    RowsOf(m, xp, wp, yp, k, n, half, n);
    done.store(true, std::memory_order_release);
  });
  RowsOf(m, xp, wp, yp, k, n, 0, half);
  while (!done.load(std::memory_order_acquire)) _mm_pause();
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(RowsMatmul, RowsMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
