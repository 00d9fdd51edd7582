// y (M, N) = x (M, K) @ w (K, N) in float32 on an x86-64 CPU with AVX-512, w pre-packed as
// (N / 64, K, 64): tile t holds columns 64t..64t+63, row after row, so each tile is one
// contiguous stream of K x 256 bytes. Each tile's 64 columns are accumulated for up to six
// rows of x at a time in 24 registers, x broadcast one value at a time, the stream prefetched
// 16 KB ahead; a tile is computed for every chunk of six rows while it sits in L2, so the
// weights are read from memory once for any M. Each output sums its K products in order 0..K-1
// whatever M and the threads: a row's result does not depend on the rows beside it. The tiles
// are shared out between the calling thread and XLA's intra-op pool (`Work`). Built and loaded by
// mtp/model/packed_products.py (g++ -O3 -march=native).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

constexpr int64_t kTile = 64;      // columns per tile: 4 AVX-512 registers
constexpr int64_t kChunk = 6;      // rows at a time: 6 x 4 accumulators of 32 registers
constexpr int64_t kAhead = 4096;   // floats prefetched ahead of the one being read (16 KB)

template <int M>
static void Tile(const float* x, int64_t k, const float* wt, float* y, int64_t n) {
  __m512 acc[M][4];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < 4; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    const float* wi = wt + i * kTile;
    __m512 wv[4];
    for (int c = 0; c < 4; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(wi + kAhead + 16 * c), _MM_HINT_T0);
      wv[c] = _mm512_loadu_ps(wi + 16 * c);
    }
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_set1_ps(x[m * k + i]);
      for (int c = 0; c < 4; ++c) acc[m][c] = _mm512_fmadd_ps(xv, wv[c], acc[m][c]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(y + m * n + 16 * c, acc[m][c]);
}

static void Tiles(const float* x, int64_t m, int64_t k, const float* w, float* y, int64_t n,
                  int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* wt = w + t * k * kTile;
    for (int64_t r = 0; r < m; r += kChunk) {
      const float* xr = x + r * k;
      float* yr = y + r * n + t * kTile;
      switch (std::min(kChunk, m - r)) {
        case 1: Tile<1>(xr, k, wt, yr, n); break;
        case 2: Tile<2>(xr, k, wt, yr, n); break;
        case 3: Tile<3>(xr, k, wt, yr, n); break;
        case 4: Tile<4>(xr, k, wt, yr, n); break;
        case 5: Tile<5>(xr, k, wt, yr, n); break;
        default: Tile<6>(xr, k, wt, yr, n); break;
      }
    }
  }
}

// One product's tiles in parts that the calling thread and pool tasks claim in turn. The caller
// claims parts too and waits only for parts being computed, so a product never waits for a
// pool thread to come free; a task that starts late finds nothing to claim (it holds `Work`
// by a shared pointer, so it may outlive the call).
struct Work {
  const float *x, *w;
  float* y;
  int64_t m, k, n, tiles, parts;
  std::atomic<int64_t> next{0}, finished{0};

  void Run() {
    for (int64_t j; (j = next.fetch_add(1, std::memory_order_relaxed)) < parts;) {
      Tiles(x, m, k, w, y, n, tiles * j / parts, tiles * (j + 1) / parts);
      finished.fetch_add(1, std::memory_order_release);
    }
  }
};

static ffi::Error PackedProductImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                    ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto wd = w.dimensions();
  if (wd.size() != 3 || wd[2] != kTile) {
    return ffi::Error::InvalidArgument("packed product: w must be packed (T, K, 64)");
  }
  auto work = std::make_shared<Work>();
  const int64_t tiles = wd[0], k = wd[1];
  const int64_t tasks = std::clamp<int64_t>(pool.num_threads(), 1, tiles);
  work->x = x.typed_data();
  work->w = w.typed_data();
  work->y = y->typed_data();
  work->m = x.element_count() / k;
  work->k = k;
  work->n = tiles * kTile;
  work->tiles = tiles;
  work->parts = std::min<int64_t>(tiles, 4 * tasks);
  for (int64_t j = 1; j < tasks; ++j) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->finished.load(std::memory_order_acquire) < work->parts) _mm_pause();
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtpPackedProduct, PackedProductImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
