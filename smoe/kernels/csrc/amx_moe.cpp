// The MoE experts of bf16 inference on CPUs with AMX (Sapphire Rapids and later), in one op that
// smoe.kernels.native builds into its library for the "amx" instruction set:
//
//   smoe_native::amx_moe(x (N, D), w1 (E, H, D), w2 (E, D, H), w3 (E, H, D), experts (N, K), weights (N, K) fp32)
//     -> (N, D) bf16: out[n] = sum_k weights[n, k] * w2[e] (silu(w1[e] x[n]) * (w3[e] x[n])), e = experts[n, k]
//   smoe_native::amx_moe_keep(the same) -> (out, a1 (N K, H), a3 (N K, H)): for training's forward, also the
//     pre-activations w1[e] x[n] and w3[e] x[n] rounded to bf16, one row per token-slot in the order of a stable
//     sort of the slots by expert (smoe.kernels.grouped.sort_by_expert's), which the backward takes
//   smoe_native::amx_segment_wgrad(a (S, M), b (S, N), counts (E,)) -> (E, M, N) bf16: a[rows].T @ b[rows] over each
//     expert's run of counts[e] rows (in order), zero for an empty expert: the backward's weight gradients
//     (smoe.kernels.grouped.segment_wgrad); M and N multiples of 32
//   smoe_native::amx_probe(products) -> float: nanoseconds per tile product, timed over that many from L1 (for
//     benchmarks: on a VM the tile unit may be shared with a neighbour, and then runs 3-4x slower)
//
// An AMX tile multiply C (16 x 16 fp32) += A (16 x 32 bf16) B (32 x 16 bf16, stored as 16 rows of 16 pairs)
// takes A's rows as they lie in memory. So the weights are the A side, read in place (16 weight rows of 32
// elements per tile), and the tokens the B side: no weight is ever copied or repacked (oneDNN repacks every
// weight per call, which at 128 rows per expert costs 1.6x the product), and C holds (w x)^T.
// Per expert, its token-slots in blocks of up to block_tokens, and the hidden dimension in chunks of kHidden:
//   1. the block's rows of x are gathered straight into B tiles (each pair of a row's elements one column);
//   2. up: tiles of w1 and w3 against the tokens; silu(a1) * a3 in fp32, rounded once to bf16, is written
//      straight into the B tiles of the down product (nothing S x H leaves the cache);
//   3. down: tiles of w2 against that chunk of h; each token's column, times its router weight, is added into
//      an fp32 accumulator row of its token (a chunk's partial sums add like the whole).
// The intra-op threads take shares of an expert's slots where it has many (kSplitMinSlots per thread), else split
// the up product by hidden rows and the down product by output columns, so no two threads write the same place. The
// sums are fp32 throughout; the output is rounded once.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

#include "moe_common.h"
#include "simd512.h"
#include "spread.h"

#if !defined(__AMX_BF16__) || !defined(__AVX512BF16__)
#error "amx_moe.cpp is built with -mamx-tile -mamx-bf16 and the avx512 flags"
#endif

namespace {

using bf16 = at::BFloat16;
using smoe_moe::Scratch;
using smoe_simd512::swiglu16;
using smoe_simd512::transpose16;
constexpr int64_t kHidden = 1024;  // hidden units per chunk: its h tiles (block_tokens x 1024 bf16) stay in L2
constexpr int64_t kTileBytes = 1024;  // 16 rows of 64 bytes
constexpr int64_t kTileElems = kTileBytes / 2;
constexpr int64_t kL2Bytes = int64_t(2) << 20;  // per core on the Xeon with AMX these choices were measured on
constexpr int64_t kPassChunks = 8;  // 32-element chunks of the reduced dimension per pass over the token tiles
// on several threads, an expert with at least this many slots per thread is split by slots, not by hidden rows and
// output columns (the medium preset's experts on 2 threads of a Xeon with AMX, in-process A/B against the split by rows
// and columns: 0.88-0.92x the time at 4096 tokens, 0.85-0.91x at 2048, 0.97x at 1024; 64 per thread lost, 1.05x at 512)
constexpr int64_t kSplitMinSlots = 96;

struct TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// tiles 0-3: C (fp32 sums); 4, 5: A (weight rows); 6, 7: B (tokens). Tile state is per thread.
void configure_tiles() {
    TileConfig c;
    for (int i = 0; i < 8; i++) {
        c.colsb[i] = 64;
        c.rows[i] = 16;
    }
    _tile_loadconfig(&c);
}

// Linux hands out the AMX tile registers only on request, once per process
bool amx_permitted() {
    static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return ok;
}

// rows x[token[s]] for s < n as B tiles, token tile mt and 32-element chunk c at dst + (mt * C + c) * 512:
// row q of a tile holds, for each of its 16 tokens, elements 2q and 2q + 1 of the chunk; padding tokens are 0.
// Each 16 x 16 block of 32-bit pairs is transposed in registers and stored as whole lines (element by element it
// was 256 scattered 4-byte stores per row: the medium preset's experts, 1 thread of a Xeon with AMX, 2-3x the time)
void gather_b_tiles(const bf16* x, int64_t D, const int64_t* token, int64_t n, int64_t tiles, bf16* dst) {
    const int64_t C = D / 32;
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t m = std::min<int64_t>(16, n - t * 16);
        const float* rows[16] = {};  // the tokens' rows, their pairs as 32-bit lanes
        for (int64_t j = 0; j < m; j++) rows[j] = reinterpret_cast<const float*>(x + token[t * 16 + j] * D);
        for (int64_t c = 0; c < C; c++) {
            __m512 r[16];
            for (int64_t j = 0; j < 16; j++) r[j] = j < m ? _mm512_loadu_ps(rows[j] + c * 16) : _mm512_setzero_ps();
            transpose16(r);  // r[q]: pair q of the 16 tokens
            float* tile = reinterpret_cast<float*>(dst + (t * C + c) * kTileElems);
            for (int q = 0; q < 16; q++) _mm512_storeu_ps(tile + q * 16, r[q]);
        }
    }
}

// The next A block's lines (two sets of 16 rows, `bytes` of each, lda bytes apart) fetched into L2 a few at a time
// over the current block's tile products: AMX tile loads stall on memory, and rows this short (a 1 KB row of a
// 512-wide weight) never wake the hardware prefetcher up
struct NextRows {
    const char* a0 = nullptr;
    const char* a1 = nullptr;
    int64_t lda = 0, bytes = 0, per_step = 0, line = 0;

    NextRows() = default;
    NextRows(const bf16* n0, const bf16* n1, int64_t lda_bytes, int64_t row_bytes, int64_t steps)
        : a0(reinterpret_cast<const char*>(n0)), a1(reinterpret_cast<const char*>(n1)), lda(lda_bytes),
          bytes(row_bytes), per_step((16 * row_bytes / 64 + steps - 1) / std::max<int64_t>(steps, 1)) {}

    inline void step() {
        for (int64_t i = 0; i < per_step && a0 != nullptr; i++, line++) {
            const int64_t row = line / (bytes / 64), at = row * lda + line % (bytes / 64) * 64;
            if (row >= 16) {
                a0 = nullptr;
                break;
            }
            _mm_prefetch(a0 + at, _MM_HINT_T1);
            _mm_prefetch(a1 + at, _MM_HINT_T1);
        }
    }
};

// C tiles 0-3 (kept at c as [A0 B0, A0 B1, A1 B0, A1 B1], 256 fp32 each; zeroed if first) += A0, A1 (16 rows each at
// a0, a1, lda bytes apart) times B tiles b0, b1 over `chunks` 32-element chunks; without kTwo there is no B1
template <bool kTwo>
inline void tile_block(const bf16* a0, const bf16* a1, int64_t lda, const bf16* b0, const bf16* b1, int64_t chunks,
                       float* c, bool first, NextRows& next) {
    if (first) {
        _tile_zero(0);
        _tile_zero(2);
        if (kTwo) {
            _tile_zero(1);
            _tile_zero(3);
        }
    } else {
        _tile_loadd(0, c, 64);
        _tile_loadd(2, c + 512, 64);
        if (kTwo) {
            _tile_loadd(1, c + 256, 64);
            _tile_loadd(3, c + 768, 64);
        }
    }
    for (int64_t k = 0; k < chunks; k++) {
        next.step();
        _tile_loadd(4, a0 + k * 32, lda);
        _tile_loadd(5, a1 + k * 32, lda);
        _tile_loadd(6, b0 + k * kTileElems, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (kTwo) {
            _tile_loadd(7, b1 + k * kTileElems, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, c, 64);
    _tile_stored(2, c + 512, 64);
    if (kTwo) {
        _tile_stored(1, c + 256, 64);
        _tile_stored(3, c + 768, 64);
    }
}

// A (rows at a0 and a1, lda elements apart, `chunks` chunks long) times the B tiles of `tiles` token tiles (b: token
// tile t's chunk k at b + (t * bchunks + k) * 512) into c (1024 fp32 per pair of token tiles), the reduced dimension
// in passes of kPassChunks: one pass's A (32 rows x 512 bytes) stays in L1 across the token tiles. The next A
// (rows at n0 and n1, or none) is fetched meanwhile.
void tile_rows(const bf16* a0, const bf16* a1, int64_t lda, int64_t chunks, const bf16* b, int64_t bchunks,
               int64_t tiles, float* c, const bf16* n0, const bf16* n1) {
    NextRows next;
    if (n0 != nullptr) next = NextRows(n0, n1, lda * 2, chunks * 64, (tiles + 1) / 2 * chunks);
    for (int64_t k0 = 0; k0 < chunks; k0 += kPassChunks) {
        const int64_t kn = std::min(kPassChunks, chunks - k0);
        for (int64_t t = 0; t < tiles; t += 2) {
            const bf16* b0 = b + (t * bchunks + k0) * kTileElems;
            if (t + 1 < tiles)
                tile_block<true>(a0 + k0 * 32, a1 + k0 * 32, lda * 2, b0, b0 + bchunks * kTileElems, kn,
                                 c + t / 2 * 1024, k0 == 0, next);
            else
                tile_block<false>(a0 + k0 * 32, a1 + k0 * 32, lda * 2, b0, nullptr, kn, c + t / 2 * 1024, k0 == 0,
                                  next);
        }
    }
}

// silu(a1) * a3 of hidden tile hr (of this chunk) for `tiles` token tiles, from c as tile_rows left it (A0 = w1,
// A1 = w3), into the B tiles of the down product: rows 2q and 2q + 1 of h^T interleaved token by token make row
// 8 (hr % 2) + q of chunk hr / 2's tile
void swiglu_to_b_tiles(const float* c, int64_t tiles, bf16* hb, int64_t hchunks, int64_t hr) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t t = 0; t < tiles; t++) {
        const float* a1 = c + t / 2 * 1024 + (t % 2) * 256;
        const float* a3 = a1 + 512;
        bf16* tile = hb + (t * hchunks + hr / 2) * kTileElems + (hr % 2) * 8 * 32;
        for (int q = 0; q < 8; q++) {
            const __m512 even = swiglu16(_mm512_loadu_ps(a1 + 32 * q), _mm512_loadu_ps(a3 + 32 * q));
            const __m512 odd = swiglu16(_mm512_loadu_ps(a1 + 32 * q + 16), _mm512_loadu_ps(a3 + 32 * q + 16));
            const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(odd, even);  // [even 0..15, odd 0..15]
            _mm512_storeu_si512(tile + q * 32, _mm512_permutexvar_epi16(interleave, packed));
        }
    }
}

// The pre-activations of hidden tile ht (rows 16 ht..) for `n` slots, from c as tile_rows left it (A0 = w1, A1 =
// w3), rounded to bf16 into rows of a1 and a3 (H wide; row j is the block's slot j). With c_next (tile ht + 1's, ht
// even) each slot's 32 units are one whole 64-byte line, stored past the cache: no read for ownership of the fresh
// a1 and a3 and no half lines (the medium preset's experts, 512 tokens, 1 thread of a Xeon with AMX: amx_moe_keep
// 1.17-1.21x faster in in-process A/B, either order; its cost over amx_moe 2.8 -> 0.8 ms)
void keep_pre_activations(const float* c, const float* c_next, int64_t n, bf16* a1, bf16* a3, int64_t H, int64_t ht) {
    for (int64_t t = 0; t * 16 < n; t++)
        for (int v = 0; v < 2; v++) {
            const int64_t at = t / 2 * 1024 + v * 512 + (t % 2) * 256;
            __m512 r[16], q[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(c + at + 16 * i);
            transpose16(r);  // r[j]: slot 16 t + j's 16 hidden units
            if (c_next != nullptr) {
                for (int i = 0; i < 16; i++) q[i] = _mm512_loadu_ps(c_next + at + 16 * i);
                transpose16(q);
            }
            bf16* out = (v == 0 ? a1 : a3) + t * 16 * H + ht * 16;
            for (int j = 0; j < 16 && t * 16 + j < n; j++) {
                if (c_next != nullptr)
                    _mm512_stream_si512(reinterpret_cast<__m512i*>(out + j * H),
                                        (__m512i)_mm512_cvtne2ps_pbh(q[j], r[j]));
                else
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j * H), (__m256i)_mm512_cvtneps_pbh(r[j]));
            }
        }
}

// y^T tiles of output columns d0.. (A0) and d0 + 16.. (A1) for `n` slots, from c as tile_rows left it: each
// slot's 16-column pieces times its router weight added into acc[token] (D columns). With `prefetch` (acc past half
// of L2) the next token tile's two lines of acc are fetched first: rows of scattered tokens, which no hardware
// prefetcher follows (the medium preset's experts at 4096 tokens, 1 thread of a Xeon with AMX: 10.0-10.8 ms -> 5.6-6.4)
void add_to_rows(const float* c, int64_t n, const int64_t* token, const float* weight, float* acc, int64_t D,
                 int64_t d0, bool prefetch) {
    for (int64_t t = 0; t * 16 < n; t++) {
        for (int64_t s = (t + 1) * 16; prefetch && s < std::min(n, (t + 2) * 16); s++) {
            const char* line = reinterpret_cast<const char*>(acc + token[s] * D + d0);
            _mm_prefetch(line, _MM_HINT_T0);
            _mm_prefetch(line + 64, _MM_HINT_T0);
        }
        for (int v = 0; v < 2; v++) {
            const float* tile = c + t / 2 * 1024 + v * 512 + (t % 2) * 256;
            __m512 r[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(tile + 16 * i);
            transpose16(r);  // r[j]: slot 16 t + j's 16 outputs
            for (int j = 0; j < 16 && t * 16 + j < n; j++) {
                const int64_t slot = t * 16 + j;
                float* out = acc + token[slot] * D + d0 + v * 16;
                _mm512_storeu_ps(out, _mm512_fmadd_ps(r[j], _mm512_set1_ps(weight[slot]), _mm512_loadu_ps(out)));
            }
        }
    }
}

// out, and where a1 and a3 are given (N K x H each), the pre-activations in sorted slot order
at::Tensor moe(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& w3,
               const at::Tensor& experts, const at::Tensor& weights, bf16* a1, bf16* a3) {
    smoe_moe::check_args("smoe_native::amx_moe", x, w1, w2, w3, experts, weights, at::kBFloat16);
    const int64_t N = x.size(0), D = x.size(1), E = w1.size(0), H = w1.size(1), K = experts.size(1);
    TORCH_CHECK(D % 32 == 0 && H % 32 == 0, "smoe_native::amx_moe: dim and hidden dim must be multiples of 32, got ",
                D, " and ", H);
    TORCH_CHECK(amx_permitted(), "smoe_native::amx_moe: the kernel refused the AMX tile registers");
    auto xc = x.contiguous();
    auto w1c = w1.contiguous(), w2c = w2.contiguous(), w3c = w3.contiguous();
    auto ec = experts.to(at::kLong).contiguous();
    auto wc = weights.to(at::kFloat).contiguous();
    const int64_t* e = ec.const_data_ptr<int64_t>();
    const float* wt = wc.const_data_ptr<float>();

    const smoe_moe::Slots slots("smoe_native::amx_moe", e, wt, N, K, E);
    const std::vector<int64_t>& start = slots.start;

    // token blocks whose gathered rows take at most 512 KB, 32-256 tokens; up to 512 where an expert's three
    // weights pass 2 MB (beyond L2, they are read again for every block: the medium preset's experts, dim 512, at
    // 4096 tokens on 1 thread of a Xeon with AMX took 49-57 ms against 58-61; the small preset's, in L2, alike)
    const bool weights_beyond_l2 = 3 * H * D * int64_t(sizeof(bf16)) > kL2Bytes;
    const int64_t block_tokens =
        std::clamp<int64_t>((512 * 1024 / (2 * D)) / 32 * 32, 32, weights_beyond_l2 ? 512 : 256);
    const int64_t max_hidden = std::min(H, kHidden), tiles_max = block_tokens / 16;
    // a block's rows of x and its h as B tiles, and each thread's fp32 C tiles: scratch, not zero-filled vectors (which
    // cost 1.5 MB of zeroing and, with glibc's defaults, mmap's page faults per call: 512 tokens of the medium
    // preset's experts on 1 thread of a Xeon with AMX 1.05-1.11x faster, 16-64 tokens 1.15-1.20x)
    Scratch<1, bf16> xb(block_tokens / 16 * (D / 32) * kTileElems);
    Scratch<2, bf16> hb(block_tokens / 16 * (max_hidden / 32) * kTileElems);
    Scratch<0, float> acc(N * D);  // the fp32 output sums
    float* accp = acc.data;
    // the sums share L2 with the x and h tiles and the streamed weights: past half of it their rows are prefetched
    const bool acc_past_half_l2 = N * D * int64_t(sizeof(float)) > kL2Bytes / 2;
    at::parallel_for(0, N * D, 1 << 18,
                     [&](int64_t i0, int64_t i1) { std::memset(accp + i0, 0, (i1 - i0) * sizeof(float)); });
    const bf16* xp = xc.const_data_ptr<bf16>();

    const int64_t* token = slots.token.data();
    const float* weight = slots.weight.data();
    // up product of one block (slots b0.. b0 + n, their rows of x as B tiles at xt): hidden tiles [t0, t1) of the chunk
    // at h0 (hchunks 32-unit chunks), silu(a1) * a3 into the down product's B tiles at ht, the pre-activations kept
    auto up = [&](const bf16* w1e, const bf16* w3e, int64_t h0, int64_t hchunks, int64_t b0, int64_t n,
                  const bf16* xt, bf16* ht, int64_t t0, int64_t t1) {
        const int64_t tiles = (n + 15) / 16;
        // two C buffers: kept pre-activations of an even hidden tile wait for the odd one's
        const int64_t cn = tiles_max / 2 * 1024 + 1024;
        Scratch<3, float> c(2 * cn);
        configure_tiles();
        for (int64_t t = t0; t < t1; t++) {
            const bool more = t + 1 < t1, odd_of_pair = a1 != nullptr && t % 2 == 1 && t > t0;
            float* cc = c.data + (odd_of_pair ? cn : 0);
            tile_rows(w1e + t * 16 * D, w3e + t * 16 * D, D, D / 32, xt, D / 32, tiles, cc,
                      more ? w1e + (t + 1) * 16 * D : nullptr, w3e + (t + 1) * 16 * D);
            if (odd_of_pair)
                keep_pre_activations(c.data, cc, n, a1 + b0 * H, a3 + b0 * H, H, t - 1);
            else if (a1 != nullptr && (t % 2 == 1 || !more))  // a tile without its pair
                keep_pre_activations(cc, nullptr, n, a1 + b0 * H, a3 + b0 * H, H, t);
            swiglu_to_b_tiles(cc, tiles, ht, hchunks, t - h0 / 16);
        }
        _mm_sfence();
        _tile_release();
    };
    // down product of the same block over that chunk: output column pairs of tiles [p0, p1), added into the sums
    auto down = [&](const bf16* w2e, int64_t h0, int64_t hchunks, int64_t b0, int64_t n, const bf16* ht, int64_t p0,
                    int64_t p1) {
        Scratch<3, float> c(tiles_max / 2 * 1024 + 1024);
        configure_tiles();
        for (int64_t dp = p0; dp < p1; dp++) {
            const bf16* a0 = w2e + dp * 32 * H + h0;
            tile_rows(a0, a0 + 16 * H, H, hchunks, ht, hchunks, (n + 15) / 16, c.data,
                      dp + 1 < p1 ? a0 + 32 * H : nullptr, a0 + 48 * H);
            add_to_rows(c.data, n, token + b0, weight + b0, accp, D, dp * 32, acc_past_half_l2);
        }
        _tile_release();
    };
    for (int64_t ex = 0; ex < E; ex++) {
        const bf16* w1e = w1c.const_data_ptr<bf16>() + ex * H * D;
        const bf16* w3e = w3c.const_data_ptr<bf16>() + ex * H * D;
        const bf16* w2e = w2c.const_data_ptr<bf16>() + ex * D * H;
        // many slots: each thread takes its own share of the expert's slots through both products, so the x and h
        // tiles it reads are the ones it wrote (split by hidden rows and output columns, each thread read the other's
        // half of h from the other core's cache, and the x tiles that one thread gathered); each slot's sums are the
        // same on any number of threads
        const bool split = smoe_moe::split_slots(start[ex], start[ex + 1] - start[ex], kSplitMinSlots, 1,
                                                 [&](int64_t lo, int64_t hi) {
            Scratch<6, bf16> xt(block_tokens / 16 * (D / 32) * kTileElems);
            Scratch<7, bf16> ht(block_tokens / 16 * (max_hidden / 32) * kTileElems);
            for (int64_t b0 = lo; b0 < hi; b0 += block_tokens) {
                const int64_t n = std::min(block_tokens, hi - b0);
                gather_b_tiles(xp, D, token + b0, n, (n + 15) / 16, xt.data);
                for (int64_t h0 = 0; h0 < H; h0 += kHidden) {
                    const int64_t hchunks = std::min(kHidden, H - h0) / 32;
                    up(w1e, w3e, h0, hchunks, b0, n, xt.data, ht.data, h0 / 16, h0 / 16 + hchunks * 2);
                    down(w2e, h0, hchunks, b0, n, ht.data, 0, D / 32);
                }
            }
        });
        if (split) continue;
        for (int64_t b0 = start[ex]; b0 < start[ex + 1]; b0 += block_tokens) {
            const int64_t n = std::min(block_tokens, start[ex + 1] - b0);
            gather_b_tiles(xp, D, token + b0, n, (n + 15) / 16, xb.data);
            for (int64_t h0 = 0; h0 < H; h0 += kHidden) {
                const int64_t hchunks = std::min(kHidden, H - h0) / 32;
                at::parallel_for(h0 / 16, h0 / 16 + hchunks * 2, 4, [&](int64_t t0, int64_t t1) {
                    up(w1e, w3e, h0, hchunks, b0, n, xb.data, hb.data, t0, t1);
                });
                at::parallel_for(0, D / 32, 2, [&](int64_t p0, int64_t p1) {
                    down(w2e, h0, hchunks, b0, n, hb.data, p0, p1);
                });
            }
        }
    }
    auto out = at::empty({N, D}, xc.options());
    bf16* o = out.mutable_data_ptr<bf16>();
    at::parallel_for(0, N * D / 16, 4096, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; i++)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * i),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(accp + 16 * i)));
    });
    return out;
}

// The weight gradients: per expert, out (M x N) = a^T b over its R rows, the reduced dimension being the rows (tokens)
// of both. Rows 2p and 2p + 1 interleaved element by element are VNNI pairs: 16 pairs x 16 columns of b are a B tile as
// they stand, and the same of a, transposed as 32-bit elements, an A tile (16 columns of a, 32 rows long each). Both
// are packed once per expert (oneDNN repacks its own way on each of the three products and reads a transposed left
// side slowly), then each 32 x 32 block of out sums its ceil(R / 32) chunks in four C tiles and is rounded once.

// rows r0.. r0 + 31 of x (ld elements apart; those at r1 or past it as 0), columns c0.. c0 + 15, as 16 rows of pairs
inline void pairs16(const bf16* x, int64_t ld, int64_t r0, int64_t r1, int64_t c0, __m512i out[16]) {
    for (int q = 0; q < 16; q++) {
        const int64_t r = r0 + 2 * q;
        const __m256i even = r < r1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * ld + c0))
                                    : _mm256_setzero_si256();
        const __m256i odd = r + 1 < r1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + (r + 1) * ld + c0))
                                       : _mm256_setzero_si256();
        out[q] = _mm512_or_si512(_mm512_cvtepu16_epi32(even), _mm512_slli_epi32(_mm512_cvtepu16_epi32(odd), 16));
    }
}

// x's rows r0.. r1 - 1 (cols columns) as tiles of `chunks` 32-row chunks: column tile t, chunk c at dst + (t chunks + c)
// 512; transposed: A tiles, else B tiles. Chunk by chunk, so that each line of x is read once
void pack_pairs(const bf16* x, int64_t ld, int64_t r0, int64_t r1, int64_t cols, int64_t chunks, bool transposed,
                bf16* dst) {
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; c++)
            for (int64_t t = 0; t < cols / 16; t++) {
                __m512i r[16];
                pairs16(x, ld, r0 + 32 * c, r1, 16 * t, r);
                if (transposed) transpose16(reinterpret_cast<__m512*>(r));
                for (int q = 0; q < 16; q++) _mm512_storeu_si512(dst + (t * chunks + c) * kTileElems + 32 * q, r[q]);
            }
    });
}

// One expert's a[lo.. lo + rows].T @ b[lo.. lo + rows] into out (M x N): both sides packed once, then each 32 x 32 block
// of out sums its ceil(rows / 32) chunks in four C tiles and is rounded once (the threads split the blocks' rows; run
// on one thread where called inside a parallel region)
void wgrad_expert(const bf16* ap, const bf16* bp, int64_t M, int64_t N, int64_t lo, int64_t rows, bf16* oe) {
    const int64_t chunks = (rows + 31) / 32;
    if (chunks == 0) {
        std::memset(static_cast<void*>(oe), 0, M * N * sizeof(bf16));
        return;
    }
    Scratch<4, bf16> at_(M * chunks * 32);
    Scratch<5, bf16> bt(N * chunks * 32);
    pack_pairs(ap, M, lo, lo + rows, M, chunks, true, at_.data);
    pack_pairs(bp, N, lo, lo + rows, N, chunks, false, bt.data);
    at::parallel_for(0, M / 32, 1, [&](int64_t i0, int64_t i1) {
        Scratch<3, float> c(1024);
        configure_tiles();
        for (int64_t i = i0; i < i1; i++)
            for (int64_t j = 0; j < N / 32; j++) {
                const bf16* a0 = at_.data + 2 * i * chunks * kTileElems;
                const bf16* b0 = bt.data + 2 * j * chunks * kTileElems;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int64_t k = 0; k < chunks; k++) {
                    _tile_loadd(4, a0 + k * kTileElems, 64);
                    _tile_loadd(5, a0 + (chunks + k) * kTileElems, 64);
                    _tile_loadd(6, b0 + k * kTileElems, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_loadd(7, b0 + (chunks + k) * kTileElems, 64);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(3, 5, 7);
                }
                _tile_stored(0, c.data, 64);
                _tile_stored(1, c.data + 256, 64);
                _tile_stored(2, c.data + 512, 64);
                _tile_stored(3, c.data + 768, 64);
                // C tile 2 u + v holds out rows 32 i + 16 u.., columns 32 j + 16 v..: whole 64-byte lines, stored
                // past the cache (an M x N gradient is read back by the optimizer, not here; 1.1-1.4x faster)
                for (int u = 0; u < 2; u++)
                    for (int q = 0; q < 16; q++) {
                        const float* row = c.data + 512 * u + 16 * q;
                        bf16* dst = oe + (32 * i + 16 * u + q) * N + 32 * j;
                        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst),
                                            (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 256),
                                                                         _mm512_loadu_ps(row)));
                    }
            }
        _mm_sfence();
        _tile_release();
    });
}

at::Tensor amx_segment_wgrad(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef counts) {
    smoe_moe::check_segment_args("smoe_native::amx_segment_wgrad", a, b, counts, at::kBFloat16);
    const int64_t M = a.size(1), N = b.size(1), E = int64_t(counts.size());
    TORCH_CHECK(M % 32 == 0 && N % 32 == 0, "smoe_native::amx_segment_wgrad: a's and b's widths must be multiples of 32, "
                "got ", M, " and ", N);
    TORCH_CHECK(amx_permitted(), "smoe_native::amx_segment_wgrad: the kernel refused the AMX tile registers");
    auto ac = a.contiguous(), bc = b.contiguous();
    const bf16* ap = ac.const_data_ptr<bf16>();
    const bf16* bp = bc.const_data_ptr<bf16>();
    auto out = at::empty({E, M, N}, ac.options());
    bf16* op = out.mutable_data_ptr<bf16>();
    std::vector<int64_t> lo(E + 1, 0);
    for (int64_t e = 0; e < E; e++) lo[e + 1] = lo[e] + counts[e];
    // the experts spread over the threads, each packed and multiplied on one thread, where that shares the work out
    // evenly enough (each expert's cost: its rows, and its output's stores as 32 more): each thread then packs only its
    // own experts (the medium preset's experts on 2 threads of a Xeon with AMX: 1.15-1.23x faster at 512 tokens,
    // 1.00-1.05x at 4096); else (one expert with most rows) the threads split each expert's blocks
    std::vector<int64_t> cost(E);
    for (int64_t e = 0; e < E; e++) cost[e] = counts[e] + 32;
    const auto plan = smoe_spread::spread(cost, at::get_num_threads());
    if (plan.items.size() > 1 && plan.even_within(5, 4)) {
        at::parallel_for(0, int64_t(plan.items.size()), 1, [&](int64_t t0, int64_t t1) {
            for (int64_t t = t0; t < t1; t++)
                for (const int64_t e : plan.items[t]) wgrad_expert(ap, bp, M, N, lo[e], counts[e], op + e * M * N);
        });
    } else {
        for (int64_t e = 0; e < E; e++) wgrad_expert(ap, bp, M, N, lo[e], counts[e], op + e * M * N);
    }
    return out;
}

// The rate of this core's tile unit now: `products` tile products (16 x 16 x 32, bf16 -> fp32) on tiles in L1,
// eight per four tile loads as in the kernels' inner loops, in nanoseconds each
double amx_probe(int64_t products) {
    TORCH_CHECK_VALUE(products >= 8, "smoe_native::amx_probe: at least 8 products, got ", products);
    TORCH_CHECK(amx_permitted(), "smoe_native::amx_probe: the kernel refused the AMX tile registers");
    alignas(64) static thread_local bf16 tiles[4 * kTileElems];  // zeros
    configure_tiles();
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const int64_t rounds = products / 8;
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < rounds; i++) {
        _tile_loadd(4, tiles, 64);
        _tile_loadd(5, tiles + kTileElems, 64);
        _tile_loadd(6, tiles + 2 * kTileElems, 64);
        _tile_loadd(7, tiles + 3 * kTileElems, 64);
        for (int r = 0; r < 2; r++) {
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    const auto t1 = std::chrono::steady_clock::now();
    _tile_release();
    return std::chrono::duration<double, std::nano>(t1 - t0).count() / double(rounds * 8);
}

at::Tensor amx_moe(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& w3,
                   const at::Tensor& experts, const at::Tensor& weights) {
    return moe(x, w1, w2, w3, experts, weights, nullptr, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> amx_moe_keep(const at::Tensor& x, const at::Tensor& w1,
                                                             const at::Tensor& w2, const at::Tensor& w3,
                                                             const at::Tensor& experts, const at::Tensor& weights) {
    return smoe_moe::keeping<bf16>("smoe_native::amx_moe_keep", moe, x, w1, w2, w3, experts, weights);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smoe_native, m) {
    m.def("amx_moe(Tensor x, Tensor w1, Tensor w2, Tensor w3, Tensor experts, Tensor weights) -> Tensor");
    m.def("amx_moe_keep(Tensor x, Tensor w1, Tensor w2, Tensor w3, Tensor experts, Tensor weights) -> "
          "(Tensor, Tensor, Tensor)");
    m.def("amx_segment_wgrad(Tensor a, Tensor b, int[] counts) -> Tensor");
    m.def("amx_probe(int products) -> float", &amx_probe);  // no tensor to dispatch on: one kernel for all
}

TORCH_LIBRARY_IMPL(smoe_native, CPU, m) {
    m.impl("amx_moe", &amx_moe);
    m.impl("amx_moe_keep", &amx_moe_keep);
    m.impl("amx_segment_wgrad", &amx_segment_wgrad);
}
