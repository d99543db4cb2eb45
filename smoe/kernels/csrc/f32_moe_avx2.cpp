// The fp32 MoE experts of many token-slots on AVX2 FMA, which smoe.kernels.native builds into its library for the "avx2"
// instruction set (x86-64 CPUs without AVX-512; measured on a Zen 3): two of f32_moe.cpp's ops (the "amx" build's, for
// 16-lane AVX-512), with the same arguments and results:
//
//   smoe_native::f32_moe(x (N, D), w1 (E, H, D), w2 (E, D, H), w3 (E, H, D), experts (N, K), weights (N, K)) -> (N, D)
//   smoe_native::f32_moe_keep(the same) -> (out, a1 (N K, H), a3 (N K, H)), the slots sorted stably by expert
//
// (f32_segment_wgrad's panels at 8 lanes took 1.2-1.3x the library's time on 1 thread of a Zen 3: not built here.)
//
// The design of f32_moe.cpp at 8 lanes and 16 vector registers: an expert's tokens are the vector lanes, in blocks of
// up to kBlockTokens gathered transposed (x^T, D rows), and each weight element, read in place, is broadcast to 8
// tokens per FMA, so no weight is copied or packed (the library packs each expert's weights for its ~128 rows):
//   up: kUpRows rows each of w1 and w3 against 16 tokens (12 accumulators), silu(a1) * a3 times the router weight
//       into h^T (a chunk of kHidden hidden units at a time), the next panel's rows fetched into L1 meanwhile;
//   down: kDownRows rows of w2 against 24 tokens (12 accumulators) into y^T (D x the block's tokens), summed over the
//       chunks, then transposed and added into the tokens' rows once per block.
// x^T and h^T are stored token panel by token panel (the panel's rows one contiguous stretch), and the down runs in
// passes (kDownDepth hidden units, kDownBlockRows rows of w2) that keep a panel's stretch of h^T in L1 and the pass's
// rows of w2 in L2. With both as rows of all the block's tokens (512 bytes apart at 128 tokens, so a panel's rows
// fell in 8 of L1's 64 sets) every panel streamed its operand from L2, and the down ran at 62-66 GFLOP/s against
// the library's 83 (the medium preset's experts, 128 tokens each, 1 thread of a Zen 3 whose FMAs peak at 101); now 82.
// A block's lanes past its last token are zeros (at most 7 of them). The threads take whole panels and row groups, eight
// at a time as each comes free (dynamic_for: where the two vCPUs ran at different speeds, the halves of a static split
// took 1.03-1.08x the time), or an expert's slots in shares where it has kSplitMinSlots per thread
// (smoe_moe::split_slots).
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "moe_common.h"
#include "simd256.h"

#if !defined(__AVX2__) || !defined(__FMA__) || defined(__AVX512F__)
#error "f32_moe_avx2.cpp is built with the avx2 flags"
#endif

namespace {

using smoe_moe::Scratch;
using namespace smoe_simd256;
// measured on a Zen 3 (the medium preset's experts, in-process against these values): hidden chunks of 256 or 1024
// 0.96-1.07x the time, blocks of up to 256 tokens 0.99-1.13x, up panels of 2 rows x 24 tokens 1.00-1.06x
constexpr int64_t kBlockTokens = 160;  // an expert's slots go in equal blocks of at most this many
constexpr int64_t kHidden = 512;       // hidden units per chunk
constexpr int kUpRows = 3;             // rows of w1 and of w3 per up panel
constexpr int kUpVectors = 2;          // 8-token vectors per up panel
constexpr int kDownRows = 4;           // rows of w2 per down panel
constexpr int kDownVectors = 3;        // 8-token vectors per down panel
constexpr int64_t kSplitMinSlots = 128;  // f32_moe.cpp's, not tuned here
// measured likewise: passes of 128 or 512 hidden units, or of 64, 256 or 512 rows, 0.99-1.03x the time
constexpr int64_t kDownDepth = 256;      // hidden units per pass of the down (a token panel's stretch: 24 KB)
constexpr int64_t kDownBlockRows = 128;  // rows of w2 per pass (128 KB of them)

// A block's 8-token vectors in the down's token panels: kDownVectors each, the last four as two of two where one would
// be left (a panel of one vector has 4 accumulators, too few to hide the FMA latency). h^T is stored panel by panel,
// each hc rows of its 8 w lanes (w the panel's vectors)
struct Panels {
    int64_t vectors, threes;
    explicit Panels(int64_t v)
        : vectors(v), threes(v % kDownVectors == 1 && v > kDownVectors ? v / kDownVectors - 1 : v / kDownVectors) {}
    int64_t count() const { return threes + (vectors - threes * kDownVectors + 1) / 2; }
    int64_t start(int64_t p) const { return p <= threes ? p * kDownVectors : threes * kDownVectors + (p - threes) * 2; }
    int64_t width(int64_t p) const { return p < threes ? kDownVectors : std::min<int64_t>(2, vectors - start(p)); }
    int64_t of(int64_t u) const {
        return u < threes * kDownVectors ? u / kDownVectors : threes + (u - threes * kDownVectors) / 2;
    }
    // vector u's lanes in row 0 of h^T (hc rows), and its panel's row stride
    int64_t at(int64_t u, int64_t hc) const { return start(of(u)) * 8 * hc + (u - start(of(u))) * 8; }
    int64_t stride(int64_t u) const { return 8 * width(of(u)); }
};

// rows [0, rows) of w (ld apart), cols long, as fp32 rows of buf (cols apart)
inline void to_fp32(const uint16_t* w, int64_t ld, int64_t rows, int64_t cols, float* buf) {
    for (int64_t i = 0; i < rows; i++)
        for (int64_t c = 0; c < cols; c += 8) store8(buf + i * cols + c, load8(w + i * ld + c, cols - c), cols - c);
}

// r[i][j] -> r[j][i] for an 8 x 8 fp32 block held in 8 vectors
inline void transpose8(__m256 r[8]) {
    __m256 t[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    __m256 s[8];
    for (int i = 0; i < 8; i += 4) {
        s[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
        s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    // s[i] (i < 4): column i of rows 0-3 in its low half and column i + 4 in its high half; s[i + 4]: rows 4-7
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
    }
}

// rows that a panel fetches into L1 as it goes, for what comes after it: JB rows from each of NW starts (none where the
// first is null), ld bytes apart, elem bytes per k
template <int NW>
struct Ahead {
    const void* p[NW];
    int64_t ld, elem;
};

// sums[i][j][v] = sum over k < K of w[i][j * ldw + k] * bT[k * ldb + 8 v ..] for NW weights' JB rows and V vectors of
// 8 tokens, the rows of next fetched meanwhile (16 k of each at a time). The sums are stored once, for the caller's
// epilogue
template <int NW, int JB, int V>
__attribute__((noinline)) void panel(const float* const (&w)[NW], int64_t ldw, int64_t K, const float* bT, int64_t ldb,
                                     __m256 (&sums)[NW][JB][V], const Ahead<NW>& next) {
    // accumulators of a plain vector type (not __m256, which may alias anything) and every loop over them unrolled by
    // pragma: otherwise gcc 12 kept them in a stack array and stored each one after every FMA (dead stores, but 12 per
    // 12 FMAs at one 32-byte store a cycle: 1.8x the library's time)
    using Sums = float __attribute__((vector_size(32)));
    Sums acc[NW][JB][V];
    #pragma GCC unroll 16
    for (int i = 0; i < NW; i++)
        #pragma GCC unroll 16
        for (int j = 0; j < JB; j++)
            #pragma GCC unroll 16
            for (int v = 0; v < V; v++) acc[i][j][v] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
        if (next.p[0] != nullptr)
            #pragma GCC unroll 16
            for (int i = 0; i < NW; i++)
                #pragma GCC unroll 16
                for (int j = 0; j < JB; j++)
                    _mm_prefetch(static_cast<const char*>(next.p[i]) + j * next.ld + k0 * next.elem, _MM_HINT_T0);
        const int64_t k1 = std::min(K, k0 + 16);
        for (int64_t k = k0; k < k1; k++) {
            __m256 b[V];
            #pragma GCC unroll 16
            for (int v = 0; v < V; v++) b[v] = _mm256_load_ps(bT + k * ldb + 8 * v);
            #pragma GCC unroll 16
            for (int j = 0; j < JB; j++)
                #pragma GCC unroll 16
                for (int i = 0; i < NW; i++) {
                    const __m256 a = _mm256_broadcast_ss(w[i] + j * ldw + k);
                    #pragma GCC unroll 16
                    for (int v = 0; v < V; v++) acc[i][j][v] = _mm256_fmadd_ps(a, b[v], acc[i][j][v]);
                }
        }
    }
    #pragma GCC unroll 16
    for (int i = 0; i < NW; i++)
        #pragma GCC unroll 16
        for (int j = 0; j < JB; j++)
            #pragma GCC unroll 16
            for (int v = 0; v < V; v++) sums[i][j][v] = acc[i][j][v];
}

// up for rows [j, j + JB) of this expert against V vectors of tokens: h^T rows = silu(w1 x) * (w3 x) * router weight;
// with keep, the pre-activations w1 x and w3 x also into a1T and a3T (laid out as h^T)
template <int JB, int V>
void up_panel(const float* w1, const float* w3, int64_t D, const float* xT, int64_t ldx, const float* rw,
              float* const* hv, const int64_t* ldh, float* a1T, float* a3T, int64_t lda, const Ahead<2>& next) {
    __m256 acc[2][JB][V];
    panel<2, JB, V>({w1, w3}, D, D, xT, ldx, acc, next);
    for (int v = 0; v < V; v++) {
        const __m256 r = _mm256_load_ps(rw + 8 * v);
        for (int j = 0; j < JB; j++) {
            _mm256_store_ps(hv[v] + j * ldh[v], _mm256_mul_ps(swiglu8(acc[0][j][v], acc[1][j][v]), r));
            if (a1T != nullptr) {
                _mm256_store_ps(a1T + j * lda + 8 * v, acc[0][j][v]);
                _mm256_store_ps(a3T + j * lda + 8 * v, acc[1][j][v]);
            }
        }
    }
}

template <int JB>
void up_panel_v(int64_t vectors, const float* w1, const float* w3, int64_t D, const float* xT, int64_t ldx,
                const float* rw, float* const* hv, const int64_t* ldh, float* a1T, float* a3T, int64_t lda,
                const Ahead<2>& next) {
    static_assert(kUpVectors == 2);
    if (vectors == 1) return up_panel<JB, 1>(w1, w3, D, xT, ldx, rw, hv, ldh, a1T, a3T, lda, next);
    return up_panel<JB, 2>(w1, w3, D, xT, ldx, rw, hv, ldh, a1T, a3T, lda, next);
}

// down for kDownRows rows of w2 (ldw apart, K long) against a token panel of V vectors (its rows ldh apart): y^T rows
// stored (first) or added into y (ldy apart)
template <int V>
void down_panel(const float* w2, int64_t ldw, int64_t K, const float* hT, int64_t ldh, bool first, float* y,
                int64_t ldy, const Ahead<1>& next) {
    __m256 acc[1][kDownRows][V];
    panel<1, kDownRows, V>({w2}, ldw, K, hT, ldh, acc, next);
    for (int j = 0; j < kDownRows; j++)
        for (int v = 0; v < V; v++) {
            float* o = y + j * ldy + 8 * v;
            _mm256_store_ps(o, first ? acc[0][j][v] : _mm256_add_ps(_mm256_load_ps(o), acc[0][j][v]));
        }
}

void down_panel_v(int64_t vectors, const float* w2, int64_t ldw, int64_t K, const float* hT, int64_t ldh, bool first,
                  float* y, int64_t ldy, const Ahead<1>& next) {
    static_assert(kDownVectors == 3);
    switch (vectors) {
        case 1: return down_panel<1>(w2, ldw, K, hT, ldh, first, y, ldy, next);
        case 2: return down_panel<2>(w2, ldw, K, hT, ldh, first, y, ldy, next);
        default: return down_panel<3>(w2, ldw, K, hT, ldh, first, y, ldy, next);
    }
}

// x^T of the n tokens' rows (ldb lanes, the lanes past n 0), in panels of kUpVectors vectors: each D rows of its lanes
void gather_transposed(const float* x, int64_t D, const int64_t* token, int64_t n, int64_t ldb, float* xT) {
    for (int64_t t = 0; t * 8 < ldb; t++) {
        for (int64_t c = 0; c < D; c += 8) {
            __m256 r[8];
            for (int64_t j = 0; j < 8; j++)
                r[j] = t * 8 + j < n ? _mm256_loadu_ps(x + token[t * 8 + j] * D + c) : _mm256_setzero_ps();
            transpose8(r);  // r[q]: element c + q of the 8 tokens
            const int64_t u0 = t / kUpVectors * kUpVectors, stride = 8 * std::min<int64_t>(kUpVectors, ldb / 8 - u0);
            float* at = xT + u0 * 8 * D + (t - u0) * 8;
            for (int q = 0; q < 8; q++) _mm256_store_ps(at + (c + q) * stride, r[q]);
        }
    }
}

// y^T (D x ldb) of the tokens of 8-token vectors t0 .. t1 added into their rows of out, a row at a time
void add_transposed(const float* yT, int64_t ldb, int64_t n, int64_t t0, int64_t t1, const int64_t* token, float* out,
                    int64_t D) {
    for (int64_t t = t0; t < t1; t++) {
        for (int64_t d0 = 0; d0 < D; d0 += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_load_ps(yT + (d0 + i) * ldb + t * 8);
            transpose8(r);  // r[j]: token 8 t + j's 8 outputs
            for (int64_t j = 0; j < 8 && t * 8 + j < n; j++) {
                float* o = out + token[t * 8 + j] * D + d0;
                _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), r[j]));
            }
        }
    }
}

// One block of an expert's n tokens (x^T and router weights rw, ldb lanes) and a chunk of its hidden units [h0, h0 + hc)
template <typename W>
struct Block {
    const W *w1, *w2, *w3;  // the expert's, float or bf16 (stored as uint16_t)
    const float *xT, *rw;
    float *hT, *a1T, *a3T;  // h^T in Panels' layout; the pre-activations (hc x ldb each) only where kept (else null)
    int64_t D, H, h0, hc, ldb;
};

// up: h^T rows of up panels p0 .. p1 (kUpRows hidden units each) of the block's chunk
// bf16 weights: each panel's rows converted first into fp32 rows of this thread's (in L1)
template <typename W>
void up_rows(const Block<W>& b, int64_t p0, int64_t p1) {
    constexpr bool bf16 = std::is_same_v<W, uint16_t>;
    Scratch<13, float> conv(bf16 ? 2 * kUpRows * b.D : 0);
    const Panels panels(b.ldb / 8);
    for (int64_t p = p0; p < p1; p++) {
        const int64_t j = b.h0 + p * kUpRows, rows = std::min<int64_t>(kUpRows, b.h0 + b.hc - j);
        const bool more = p + 1 < p1;
        const float *w1, *w3;
        if constexpr (bf16) {
            to_fp32(b.w1 + j * b.D, b.D, rows, b.D, conv.data);
            to_fp32(b.w3 + j * b.D, b.D, rows, b.D, conv.data + kUpRows * b.D);
            w1 = conv.data, w3 = conv.data + kUpRows * b.D;
        } else {
            w1 = b.w1 + j * b.D, w3 = b.w3 + j * b.D;
        }
        for (int64_t t0 = 0; t0 < b.ldb; t0 += 8 * kUpVectors) {
            const int64_t vectors = std::min<int64_t>(kUpVectors, (b.ldb - t0) / 8);
            // the next panel's rows into L1 meanwhile (bf16: for its conversion)
            Ahead<2> next{{nullptr, nullptr}, int64_t(b.D * sizeof(W)), int64_t(sizeof(W))};
            if (more && t0 == 0) next.p[0] = b.w1 + (j + kUpRows) * b.D, next.p[1] = b.w3 + (j + kUpRows) * b.D;
            const float *x = b.xT + t0 * b.D, *r = b.rw + t0;
            const int64_t at = (j - b.h0) * b.ldb + t0;
            float *k1 = b.a1T ? b.a1T + at : nullptr, *k3 = b.a3T ? b.a3T + at : nullptr;
            float* h[kUpVectors];
            int64_t ldh[kUpVectors];
            for (int64_t v = 0; v < vectors; v++) {
                const int64_t u = t0 / 8 + v, stride = panels.stride(u);
                h[v] = b.hT + panels.at(u, b.hc) + (j - b.h0) * stride;
                ldh[v] = stride;
            }
            const int64_t ldx = 8 * vectors;  // x^T's panel of these vectors, D rows
            if (rows == kUpRows) up_panel_v<kUpRows>(vectors, w1, w3, b.D, x, ldx, r, h, ldh, k1, k3, b.ldb, next);
            else if (rows == 1) up_panel_v<1>(vectors, w1, w3, b.D, x, ldx, r, h, ldh, k1, k3, b.ldb, next);
            else up_panel_v<2>(vectors, w1, w3, b.D, x, ldx, r, h, ldh, k1, k3, b.ldb, next);
        }
    }
}

// down: rows [d0, d1) of the block's y^T (D x ldb) from the chunk's h^T, stored (first) or added. In passes of
// kDownDepth hidden units and kDownBlockRows rows of w2 (those rows' stretch in L2): each token panel's stretch of h^T
// (in L1) against the pass's rows of w2, kDownRows at a time; bf16 weights: the pass's rows converted first into fp32
// rows of this thread's (in L2)
template <typename W>
void down_rows(const Block<W>& b, int64_t d0, int64_t d1, bool first, float* yT) {
    constexpr bool bf16 = std::is_same_v<W, uint16_t>;
    Scratch<14, float> conv(bf16 ? kDownBlockRows * kDownDepth : 0);
    const Panels panels(b.ldb / 8);
    for (int64_t k0 = 0; k0 < b.hc; k0 += kDownDepth) {
        const int64_t K = std::min(kDownDepth, b.hc - k0);
        for (int64_t m0 = d0; m0 < d1; m0 += kDownBlockRows) {
            const int64_t m1 = std::min(d1, m0 + kDownBlockRows);
            const float* w;  // row m0 of the pass's rows, ldw apart
            int64_t ldw;
            if constexpr (bf16) {
                to_fp32(b.w2 + m0 * b.H + b.h0 + k0, b.H, m1 - m0, K, conv.data);
                w = conv.data, ldw = K;
            } else {
                w = b.w2 + m0 * b.H + b.h0 + k0, ldw = b.H;
            }
            // the first token panel fetches the rows that come next: fp32, the pass's next rows; bf16, the next
            // pass's, for its conversion
            int64_t nk0 = k0, nm0 = m1;
            if (nm0 >= d1) nk0 += kDownDepth, nm0 = d0;
            const int64_t nm1 = std::min(d1, nm0 + kDownBlockRows);
            for (int64_t p = 0; p < panels.count(); p++) {
                const int64_t u = panels.start(p), ldh = 8 * panels.width(p);
                const float* h = b.hT + u * 8 * b.hc + k0 * ldh;
                for (int64_t d = m0; d < m1; d += kDownRows) {
                    Ahead<1> next{{nullptr}, int64_t(b.H * sizeof(W)), int64_t(sizeof(W))};  // rows of w2 itself
                    if constexpr (bf16) {
                        if (p == 0 && nk0 < b.hc && nm0 + d - m0 + kDownRows <= nm1)
                            next.p[0] = b.w2 + (nm0 + d - m0) * b.H + b.h0 + nk0;
                    } else if (p == 0 && d + kDownRows < m1) {
                        next.p[0] = w + (d + kDownRows - m0) * ldw;
                    }
                    down_panel_v(panels.width(p), w + (d - m0) * ldw, ldw, K, h, ldh, first && k0 == 0,
                                 yT + d * b.ldb + u * 8, b.ldb, next);
                }
            }
        }
    }
}

// the kept pre-activations of hidden units [h0 + 16 g0, h0 + 16 g1) of the block's chunk, from h^T's layout into the n
// slots' rows of a1 and a3 (H wide), each row's 16 units one 64-byte line stored past the cache where H allows (the
// backward reads them much later; 32-byte pieces streamed alone cost more than the products)
template <typename W>
void keep_rows(const Block<W>& b, int64_t g0, int64_t g1, int64_t n, float* a1, float* a3) {
    for (int64_t g = g0; g < g1; g++) {
        const int64_t units = std::min<int64_t>(16, b.hc - g * 16);
        const bool whole = units == 16 && b.H % 16 == 0;  // every row's 16 units one aligned line
        for (int which = 0; which < 2; which++) {
            const float* src = (which == 0 ? b.a1T : b.a3T) + g * 16 * b.ldb;
            float* dst = (which == 0 ? a1 : a3) + b.h0 + g * 16;
            for (int64_t t = 0; t * 8 < n; t++) {
                __m256 r[2][8];  // r[half][q]: slot 8 t + q's units 8 half ..
                for (int half = 0; half < 2; half++) {
                    for (int i = 0; i < 8; i++)
                        r[half][i] = 8 * half + i < units ? _mm256_load_ps(src + (8 * half + i) * b.ldb + t * 8)
                                                          : _mm256_setzero_ps();
                    transpose8(r[half]);
                }
                for (int64_t q = 0; q < 8 && t * 8 + q < n; q++) {
                    float* row = dst + (t * 8 + q) * b.H;
                    if (whole) {
                        _mm256_stream_ps(row, r[0][q]);
                        _mm256_stream_ps(row + 8, r[1][q]);
                    } else {
                        _mm256_maskstore_ps(row, lanes(units), r[0][q]);
                        if (units > 8) _mm256_maskstore_ps(row + 8, lanes(units - 8), r[1][q]);
                    }
                }
            }
        }
    }
    _mm_sfence();
}

// f(i0, i1) over [0, n) in pieces of chunk taken by the intra-op threads as each comes free (all on the calling thread
// inside a parallel region)
template <typename F>
void dynamic_for(int64_t n, int64_t chunk, const F& f) {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
        for (int64_t i; (i = next.fetch_add(chunk)) < n;) f(i, std::min(n, i + chunk));
    });
}

// a bf16 tensor's elements as their bits
inline const uint16_t* bits(const at::Tensor& t) {
    return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>());
}

// out, and where a1 and a3 are given (N K x H each), the pre-activations in sorted slot order
at::Tensor moe(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& w3,
               const at::Tensor& experts, const at::Tensor& weights, float* a1, float* a3) {
    const bool bf16 = w1.scalar_type() == at::kBFloat16;  // bf16 weights: fp32 products of them, converted in L1/L2
    smoe_moe::check_args("smoe_native::f32_moe", x, w1, w2, w3, experts, weights, at::kFloat,
                         bf16 ? at::kBFloat16 : at::kFloat);
    const int64_t N = x.size(0), D = x.size(1), E = w1.size(0), H = w1.size(1), K = experts.size(1);
    TORCH_CHECK(D % 16 == 0, "smoe_native::f32_moe: dim must be a multiple of 16, got ", D);
    auto xc = x.contiguous();
    auto w1c = w1.contiguous(), w2c = w2.contiguous(), w3c = w3.contiguous();
    auto ec = experts.to(at::kLong).contiguous();
    auto wc = weights.to(at::kFloat).contiguous();
    const smoe_moe::Slots slots("smoe_native::f32_moe", ec.const_data_ptr<int64_t>(), wc.const_data_ptr<float>(), N, K,
                                E);
    auto out = at::zeros({N, D}, xc.options());
    float* o = out.mutable_data_ptr<float>();
    const float* xp = xc.const_data_ptr<float>();
    // expert ex's slots [lo, hi) in equal blocks, each through the up and down products on the intra-op threads (on
    // the calling thread alone where called in a parallel region)
    auto run = [&](int64_t ex, int64_t lo, int64_t hi) {
        Scratch<6, float> xT(D * kBlockTokens);
        Scratch<7, float> hT(std::min(H, kHidden) * kBlockTokens);
        Scratch<12, float> yT(D * kBlockTokens);
        Scratch<8, float> rw(kBlockTokens);
        Scratch<10, float> a1T(a1 != nullptr ? std::min(H, kHidden) * kBlockTokens : 0);
        Scratch<11, float> a3T(a1 != nullptr ? std::min(H, kHidden) * kBlockTokens : 0);
        const int64_t blocks = (hi - lo + kBlockTokens - 1) / kBlockTokens;
        for (int64_t q = 0; q < blocks; q++) {
            const int64_t b0 = lo + (hi - lo) * q / blocks, n = lo + (hi - lo) * (q + 1) / blocks - b0;
            const int64_t ldb = (n + 7) / 8 * 8;
            const int64_t* token = slots.token.data() + b0;
            gather_transposed(xp, D, token, n, ldb, xT.data);
            std::copy(slots.weight.data() + b0, slots.weight.data() + b0 + n, rw.data);
            std::fill(rw.data + n, rw.data + ldb, 0.f);
            for (int64_t h0 = 0; h0 < H; h0 += kHidden) {
                const auto chunk = [&](const auto* w1p, const auto* w2p, const auto* w3p) {
                    using W = std::remove_cv_t<std::remove_pointer_t<decltype(w1p)>>;
                    const Block<W> b{w1p + ex * H * D, w2p + ex * D * H, w3p + ex * H * D, xT.data, rw.data, hT.data,
                                     a1 != nullptr ? a1T.data : nullptr, a1 != nullptr ? a3T.data : nullptr, D, H, h0,
                                     std::min(kHidden, H - h0), ldb};
                    dynamic_for((b.hc + kUpRows - 1) / kUpRows, 8, [&](int64_t p0, int64_t p1) { up_rows(b, p0, p1); });
                    if (a1 != nullptr)
                        at::parallel_for(0, (b.hc + 15) / 16, 4, [&](int64_t g0, int64_t g1) {
                            keep_rows(b, g0, g1, n, a1 + b0 * H, a3 + b0 * H);
                        });
                    dynamic_for(D / kDownRows, 8, [&](int64_t g0, int64_t g1) {
                        down_rows(b, g0 * kDownRows, g1 * kDownRows, h0 == 0, yT.data);
                    });
                };
                if (bf16)
                    chunk(bits(w1c), bits(w2c), bits(w3c));
                else
                    chunk(w1c.const_data_ptr<float>(), w2c.const_data_ptr<float>(), w3c.const_data_ptr<float>());
            }
            at::parallel_for(0, ldb / 8, 1,
                             [&](int64_t t0, int64_t t1) { add_transposed(yT.data, ldb, n, t0, t1, token, o, D); });
        }
    };
    for (int64_t ex = 0; ex < E; ex++) {
        const int64_t lo = slots.start[ex], n = slots.start[ex + 1] - lo;
        if (!smoe_moe::split_slots(lo, n, kSplitMinSlots, 8, [&](int64_t s0, int64_t s1) { run(ex, s0, s1); }))
            run(ex, lo, lo + n);
    }
    return out;
}

at::Tensor f32_moe(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& w3,
                   const at::Tensor& experts, const at::Tensor& weights) {
    return moe(x, w1, w2, w3, experts, weights, nullptr, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> f32_moe_keep(const at::Tensor& x, const at::Tensor& w1,
                                                             const at::Tensor& w2, const at::Tensor& w3,
                                                             const at::Tensor& experts, const at::Tensor& weights) {
    return smoe_moe::keeping<float>("smoe_native::f32_moe_keep", moe, x, w1, w2, w3, experts, weights);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smoe_native, m) {
    m.def("f32_moe(Tensor x, Tensor w1, Tensor w2, Tensor w3, Tensor experts, Tensor weights) -> Tensor");
    m.def("f32_moe_keep(Tensor x, Tensor w1, Tensor w2, Tensor w3, Tensor experts, Tensor weights) -> "
          "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(smoe_native, CPU, m) {
    m.impl("f32_moe", &f32_moe);
    m.impl("f32_moe_keep", &f32_moe_keep);
}
