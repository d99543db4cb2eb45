// The MoE experts of fp32 inference on many token-slots, in one op on AVX-512 FMA, which smoe.kernels.native builds
// into its library for the "amx" instruction set (Intel Xeons with AMX, where it was measured):
//
//   smoe_native::f32_moe(x (N, D), w1 (E, H, D), w2 (E, D, H), w3 (E, H, D), experts (N, K), weights (N, K))
//     -> (N, D) fp32: out[n] = sum_k weights[n, k] * w2[e] (silu(w1[e] x[n]) * (w3[e] x[n])), e = experts[n, k]
//   smoe_native::f32_moe_keep(the same) -> (out, a1 (N K, H), a3 (N K, H)): for training's forward, also the
//     pre-activations w1[e] x[n] and w3[e] x[n], one row per token-slot in the order of a stable sort of the slots by
//     expert (smoe.kernels.grouped.sort_by_expert's), which the backward takes
//   smoe_native::f32_segment_wgrad(a (S, M), b (S, N), counts (E,)) -> (E, M, N) fp32: a[rows].T @ b[rows] over each
//     expert's run of counts[e] rows (in order), zero for an empty expert: the backward's weight gradients
//     (smoe.kernels.grouped.segment_wgrad); N a multiple of 16
//
// The library's products of one expert's rows (128 of them at 512 tokens of 8 experts) run at about 3/4 of the rate of
// the dense-equivalent's 512-row ones: each call packs the 1536 x 512 weight for fewer rows. Here the tokens are the
// vector lanes and the weights are read in place, one element broadcast to 16 tokens per FMA, so no weight is copied:
//   1. an expert's tokens, in blocks of up to kBlockTokens, are gathered transposed: x^T (D x n), a token per lane;
//   2. up: kUpRows rows each of w1 and w3 against up to 64 tokens (24 accumulators), silu(a1) * a3 times the router
//      weight into h^T (H x n), the next rows fetched meanwhile (no hardware prefetcher follows 6 short rows);
//   3. down: kDownRows rows of w2 against h^T, 16 output columns at a time transposed and added into the
//      tokens' output rows (a chunk of kHidden hidden units at a time: partial sums add like the whole);
//   4. a block's last few tokens past a multiple of 16 (its tail) are rows instead of lanes of a vector padded with
//      zeros: after each panel, its weight rows (in L1) against the tail's rows of x or h, 16 products per FMA summed
//      across the lanes at the end (at 512 tokens of 8 experts, top-2, routed at random, the padding was 7% of the
//      lanes).
// The intra-op threads take shares of an expert's slots where it has many (kSplitMinSlots per thread), else split the
// up product by hidden rows and the down product by output columns: no two threads write the same place. The sums
// are fp32 throughout, in another order than the library's; a share ends on a multiple of 16 slots, so an expert's
// last few slots may be lanes on one thread count and rows (a block's tail) on another, their sums rounded apart.
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "moe_common.h"
#include "simd512.h"

#if !defined(__AVX512F__)
#error "f32_moe.cpp is built with the avx512 flags"
#endif

namespace {

using smoe_moe::Scratch;
constexpr int64_t kBlockTokens = 128;  // tokens per block: their x^T and a chunk's h^T stay in L2
constexpr int64_t kHidden = 1024;      // hidden units per chunk
constexpr int kUpRows = 3;             // rows of w1 and of w3 per up panel (at most 4: up_panel's tails)
constexpr int kUpVectors = 4;          // 16-token vectors per up panel: 64 tokens
constexpr int kDownRows = 8;           // rows of w2 per down panel (a 16-column group is two)
constexpr int kDownVectors = 4;        // 16-token vectors per down panel
// A block's last n % 16 tokens (its tail), up to kTailMax of them, are rows (dot products against the weight rows the
// lanes' panels leave in L1), not lanes of a vector of 16 padded with zeros, where the block has kTailMinLanes lanes
// besides; up to kTailMaxBeside1 where the last lane pass has one vector (held by its broadcasts, it takes a second
// one at little cost); an expert's remainder of up to kTailMerged past a whole block is that block's tail (no pass
// over the weights of its own). Rows cost more per token than full lanes: past these counts the padded vector took
// less time.
constexpr int64_t kTailMax = 7;
constexpr int64_t kTailMaxBeside1 = 4;
constexpr int64_t kTailMerged = 11;
constexpr int64_t kTailMinLanes = 64;
// on several threads, an expert with at least this many slots per thread is split by slots, not by hidden rows and
// output columns (2 threads of a Xeon with AMX, in-process A/B against two builds of the split by rows and columns,
// both orders of loading, 1024-4096 tokens: the medium preset's experts 0.94-1.02x the time, 1.01-1.02 only in the
// inference forward at 1024; the small preset's 0.87-0.98, the quickstart's 0.73-0.92; 64 per thread lost 1.02-1.04x
// for the medium preset's experts at 512 tokens, each thread reading every weight for 64 tokens)
constexpr int64_t kSplitMinSlots = 128;

// acc[i][j][v] = sum over k < K of w[i][j * ldw + k] * bT[k * ldb + 16 v ..] for NW weights' JB rows and V vectors of
// 16 tokens; the same rows of next[i] (if given) are fetched into L1 a line per 16 k, for the next panel
template <int NW, int JB, int V>
__attribute__((always_inline)) inline void panel(const float* const (&w)[NW], int64_t ldw, int64_t K, const float* bT,
                                                 int64_t ldb, __m512 (&acc)[NW][JB][V],
                                                 const float* const (&next)[NW]) {
    for (int i = 0; i < NW; i++)
        for (int j = 0; j < JB; j++)
            for (int v = 0; v < V; v++) acc[i][j][v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        if (next[0] != nullptr && (k & 15) == 0)
            for (int i = 0; i < NW; i++)
                for (int j = 0; j < JB; j++)
                    _mm_prefetch(reinterpret_cast<const char*>(next[i] + j * ldw + k), _MM_HINT_T0);
        __m512 b[V];
        for (int v = 0; v < V; v++) b[v] = _mm512_loadu_ps(bT + k * ldb + 16 * v);
#pragma GCC unroll 8
        for (int j = 0; j < JB; j++)
            for (int i = 0; i < NW; i++) {
                const __m512 a = _mm512_set1_ps(w[i][j * ldw + k]);
                for (int v = 0; v < V; v++) acc[i][j][v] = _mm512_fmadd_ps(a, b[v], acc[i][j][v]);
            }
    }
}

// acc[i * T + t] += w[i][k0 .. k1) * x[t][k0 .. k1) lane by lane, for R weight rows and tokens t0 .. t0 + TB (of T) as
// rows: the tail's tokens, each weight vector against TB of them. Not inlined: in one function with its caller's
// epilogue, gcc kept the accumulators on the stack and stored them on every iteration.
template <int R, int TB>
__attribute__((noinline)) void dots(const float* const* w, const float* const* x, int64_t t0, int64_t T, int64_t k0,
                                    int64_t k1, __m512* acc) {
    __m512 a[R][TB];
#pragma GCC unroll 8
    for (int i = 0; i < R; i++)
#pragma GCC unroll 4
        for (int t = 0; t < TB; t++) a[i][t] = acc[i * T + t0 + t];
    for (int64_t k = k0; k < k1; k += 16) {
        const __mmask16 m = k1 - k >= 16 ? __mmask16(0xffff) : smoe_simd512::lanes(k1 - k);
        __m512 xv[TB];
#pragma GCC unroll 4
        for (int t = 0; t < TB; t++) xv[t] = _mm512_maskz_loadu_ps(m, x[t0 + t] + k);
#pragma GCC unroll 8
        for (int i = 0; i < R; i++) {
            const __m512 wv = _mm512_maskz_loadu_ps(m, w[i] + k);
#pragma GCC unroll 4
            for (int t = 0; t < TB; t++) a[i][t] = _mm512_fmadd_ps(wv, xv[t], a[i][t]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; i++)
#pragma GCC unroll 4
        for (int t = 0; t < TB; t++) acc[i * T + t0 + t] = a[i][t];
}

// out[n] = the sum of v[n]'s 16 lanes, for n < count: 16 vectors at a time by a tree of shuffles and adds
// (30 shuffles and 15 adds for 16 sums)
void lane_sums(const __m512* v, int64_t count, float* out) {
    for (int64_t n0 = 0; n0 < count; n0 += 16) {
        __m512 s[16];
        for (int k = 0; k < 16; k++) {  // in transposed order: the tree's result lane 4 L + p sums input 4 p + L
            const int64_t n = n0 + 4 * (k & 3) + (k >> 2);
            s[k] = n < count ? v[n] : _mm512_setzero_ps();
        }
        for (int i = 0; i < 8; i++)  // s[i]: 128-bit lanes 0-1 partial sums of input 2i, 2-3 of input 2i + 1
            s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x44),
                                 _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xee));
        for (int j = 0; j < 4; j++)  // s[j]: 128-bit lane L the partial sums of input 4j + L
            s[j] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * j], s[2 * j + 1], 0x88),
                                 _mm512_shuffle_f32x4(s[2 * j], s[2 * j + 1], 0xdd));
        for (int j = 0; j < 2; j++)
            s[j] = _mm512_add_ps(_mm512_unpacklo_ps(s[2 * j], s[2 * j + 1]),
                                 _mm512_unpackhi_ps(s[2 * j], s[2 * j + 1]));
        const __m512 sums = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(s[0]), _mm512_castps_pd(s[1]))),
            _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(s[0]), _mm512_castps_pd(s[1]))));
        _mm512_mask_storeu_ps(out + n0, smoe_simd512::lanes(count - n0), sums);
    }
}

// out[i * T + t] = w[i] . x[t] over [0, K) for R weight rows and T <= kTailMerged token rows, the k's in blocks of kb
// (the rows' pieces of a block stay in L1 across the token groups)
template <int R, int TB>
void tail_dots(const float* const* w, const float* const* x, int64_t T, int64_t K, int64_t kb, float* out) {
    __m512 acc[R * kTailMerged];
    for (int64_t n = 0; n < R * T; n++) acc[n] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += kb) {
        const int64_t k1 = std::min(K, k0 + kb);
        int64_t t0 = 0;
        for (; t0 + TB <= T; t0 += TB) dots<R, TB>(w, x, t0, T, k0, k1, acc);
        switch (T - t0) {
            case 3: dots<R, std::min(TB, 3)>(w, x, t0, T, k0, k1, acc); break;
            case 2: dots<R, std::min(TB, 2)>(w, x, t0, T, k0, k1, acc); break;
            case 1: dots<R, 1>(w, x, t0, T, k0, k1, acc); break;
            default: break;
        }
    }
    lane_sums(acc, R * T, out);
}

// up for rows [j, j + JB) of this expert: h^T[j - h0 ..][t0 ..] = silu(w1 x) * (w3 x) * router weight; with keep, the
// pre-activations w1 x and w3 x also into a1T and a3T (laid out as h^T)
template <int JB, int V>
void up_panel(const float* w1, const float* w3, int64_t D, const float* xT, int64_t ldb, const float* rw, float* hT,
              float* a1T, float* a3T, const float* n1, const float* n3) {
    __m512 acc[2][JB][V];
    panel<2, JB, V>({w1, w3}, D, D, xT, ldb, acc, {n1, n3});
    for (int v = 0; v < V; v++) {
        const __m512 r = _mm512_loadu_ps(rw + 16 * v);
        for (int j = 0; j < JB; j++) {
            _mm512_storeu_ps(hT + j * ldb + 16 * v,
                             _mm512_mul_ps(smoe_simd512::swiglu16(acc[0][j][v], acc[1][j][v]), r));
            if (a1T != nullptr) {
                _mm512_storeu_ps(a1T + j * ldb + 16 * v, acc[0][j][v]);
                _mm512_storeu_ps(a3T + j * ldb + 16 * v, acc[1][j][v]);
            }
        }
    }
}

template <int JB>
void up_panel_v(int64_t vectors, const float* w1, const float* w3, int64_t D, const float* xT, int64_t ldb,
                const float* rw, float* hT, float* a1T, float* a3T, const float* n1, const float* n3) {
    switch (vectors) {
        case 1: return up_panel<JB, 1>(w1, w3, D, xT, ldb, rw, hT, a1T, a3T, n1, n3);
        case 2: return up_panel<JB, 2>(w1, w3, D, xT, ldb, rw, hT, a1T, a3T, n1, n3);
        case 3: return up_panel<JB, 3>(w1, w3, D, xT, ldb, rw, hT, a1T, a3T, n1, n3);
        default: return up_panel<JB, 4>(w1, w3, D, xT, ldb, rw, hT, a1T, a3T, n1, n3);
    }
}

// down for kDownRows rows of w2 (ldw apart, hc long) against h^T: y^T rows into y (ldb apart)
template <int V>
void down_panel(const float* w2, int64_t ldw, int64_t hc, const float* hT, int64_t ldb, float* y, const float* next) {
    __m512 acc[1][kDownRows][V];
    panel<1, kDownRows, V>({w2}, ldw, hc, hT, ldb, acc, {next});
    for (int j = 0; j < kDownRows; j++)
        for (int v = 0; v < V; v++) _mm512_storeu_ps(y + j * ldb + 16 * v, acc[0][j][v]);
}

void down_panel_v(int64_t vectors, const float* w2, int64_t ldw, int64_t hc, const float* hT, int64_t ldb, float* y,
                  const float* next) {
    switch (vectors) {
        case 1: return down_panel<1>(w2, ldw, hc, hT, ldb, y, next);
        case 2: return down_panel<2>(w2, ldw, hc, hT, ldb, y, next);
        case 3: return down_panel<3>(w2, ldw, hc, hT, ldb, y, next);
        default: return down_panel<4>(w2, ldw, hc, hT, ldb, y, next);
    }
}

// x^T (D x ldb) of the n tokens' rows, padding lanes up to ldb 0
void gather_transposed(const float* x, int64_t D, const int64_t* token, int64_t n, int64_t ldb, float* xT) {
    for (int64_t t = 0; t * 16 < ldb; t++) {
        const int64_t m = std::min<int64_t>(16, n - t * 16);
        for (int64_t c = 0; c < D; c += 16) {
            __m512 r[16];
            for (int64_t j = 0; j < 16; j++)
                r[j] = j < m ? _mm512_loadu_ps(x + token[t * 16 + j] * D + c) : _mm512_setzero_ps();
            smoe_simd512::transpose16(r);  // r[q]: element c + q of the 16 tokens
            for (int q = 0; q < 16; q++) _mm512_storeu_ps(xT + (c + q) * ldb + t * 16, r[q]);
        }
    }
}

// y^T (16 x ldb: output columns d0 .. d0 + 15 of the n tokens) added into their rows of out
void add_transposed(const float* y, int64_t ldb, int64_t n, const int64_t* token, float* out, int64_t D, int64_t d0) {
    for (int64_t t = 0; t * 16 < n; t++) {
        __m512 r[16];
        for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(y + i * ldb + t * 16);
        smoe_simd512::transpose16(r);  // r[j]: token 16 t + j's 16 outputs
        for (int64_t j = 0; j < 16 && t * 16 + j < n; j++) {
            float* o = out + token[t * 16 + j] * D + d0;
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), r[j]));
        }
    }
}

// One block of an expert's tokens (x^T and router weights rw, ldb lanes) and a chunk of its hidden units [h0, h0 + hc).
// The block's last r tokens (its tail) are rows instead: tokens tail[t] of x, router weights trw, h rows in th.
struct Block {
    const float *w1, *w2, *w3, *xT, *rw;
    float *hT, *a1T, *a3T;  // hc x ldb each; the pre-activations only where kept (else null)
    int64_t D, H, h0, hc, ldb;
    const float *x, *trw;
    const int64_t* tail;
    int64_t r;
    float *th, *ta1, *ta3;  // r x kHidden; the tail slots' rows of a1 and a3 (H wide) where kept
};

// up for the tail's tokens and hidden rows [j, j + JB): their h rows (and the kept pre-activations) directly
template <int JB>
void up_tail(const Block& b, int64_t j) {
    const float* w[2 * JB];
    for (int i = 0; i < JB; i++) {
        w[i] = b.w1 + (j + i) * b.D;
        w[JB + i] = b.w3 + (j + i) * b.D;
    }
    const float* x[kTailMerged];
    for (int64_t t = 0; t < b.r; t++) x[t] = b.x + b.tail[t] * b.D;
    float s[2 * JB * kTailMerged], h[JB * kTailMerged];  // s: w1's rows' sums, then w3's, each [i][t]
    tail_dots<2 * JB, 4>(w, x, b.r, b.D, b.D, s);
    const int64_t n = JB * b.r;
    for (int64_t c = 0; c < n; c += 16) {
        const __mmask16 m = smoe_simd512::lanes(n - c);
        _mm512_mask_storeu_ps(h + c, m, smoe_simd512::swiglu16(_mm512_maskz_loadu_ps(m, s + c),
                                                               _mm512_maskz_loadu_ps(m, s + n + c)));
    }
    for (int64_t t = 0; t < b.r; t++)
        for (int i = 0; i < JB; i++) {
            b.th[t * kHidden + j - b.h0 + i] = h[i * b.r + t] * b.trw[t];
            if (b.ta1 != nullptr) {
                b.ta1[t * b.H + j + i] = s[i * b.r + t];
                b.ta3[t * b.H + j + i] = s[n + i * b.r + t];
            }
        }
}

// down for the tail's tokens and output columns [d, d + kDownRows), added into their rows of out
void down_tail(const Block& b, int64_t d, float* out) {
    const float* w[kDownRows];
    for (int i = 0; i < kDownRows; i++) w[i] = b.w2 + (d + i) * b.H + b.h0;
    const float* h[kTailMerged];
    for (int64_t t = 0; t < b.r; t++) h[t] = b.th + t * kHidden;
    float s[kDownRows * kTailMerged];
    tail_dots<kDownRows, 3>(w, h, b.r, b.hc, 256, s);
    for (int64_t t = 0; t < b.r; t++)
        for (int i = 0; i < kDownRows; i++) out[b.tail[t] * b.D + d + i] += s[i * b.r + t];
}

// up: h^T rows of up panels p0 .. p1 (kUpRows hidden units each) of the block's chunk
void up_rows(const Block& b, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
        const int64_t j = b.h0 + p * kUpRows, rows = std::min<int64_t>(kUpRows, b.h0 + b.hc - j);
        const bool more = p + 1 < p1;
        for (int64_t t0 = 0; t0 < b.ldb; t0 += 16 * kUpVectors) {
            const int64_t vectors = std::min<int64_t>(kUpVectors, (b.ldb - t0) / 16);
            const float* n1 = more && t0 == 0 ? b.w1 + (j + kUpRows) * b.D : nullptr;
            const float* n3 = more && t0 == 0 ? b.w3 + (j + kUpRows) * b.D : nullptr;
            const float *a1 = b.w1 + j * b.D, *a3 = b.w3 + j * b.D, *x = b.xT + t0, *r = b.rw + t0;
            const int64_t at = (j - b.h0) * b.ldb + t0;
            float *h = b.hT + at, *k1 = b.a1T ? b.a1T + at : nullptr, *k3 = b.a3T ? b.a3T + at : nullptr;
            if (rows == kUpRows) up_panel_v<kUpRows>(vectors, a1, a3, b.D, x, b.ldb, r, h, k1, k3, n1, n3);
            else if (rows == 1) up_panel_v<1>(vectors, a1, a3, b.D, x, b.ldb, r, h, k1, k3, n1, n3);
            else if (rows == 2) up_panel_v<2>(vectors, a1, a3, b.D, x, b.ldb, r, h, k1, k3, n1, n3);
            else up_panel_v<3>(vectors, a1, a3, b.D, x, b.ldb, r, h, k1, k3, n1, n3);
        }
        if (b.r == 0) continue;
        if (rows == kUpRows) up_tail<kUpRows>(b, j);
        else if (rows == 1) up_tail<1>(b, j);
        else up_tail<2>(b, j);
    }
}

// down: output columns of 16-column groups g0 .. g1 of the block's chunk, added into the n tokens' rows of out
void down_columns(const Block& b, int64_t g0, int64_t g1, int64_t n, const int64_t* token, float* out) {
    Scratch<9, float> y(16 * kBlockTokens);
    for (int64_t g = g0; g < g1; g++) {
        for (int64_t r = 0; r < 16; r += kDownRows) {
            const int64_t d = g * 16 + r;
            const bool more = d + kDownRows < g1 * 16;
            for (int64_t t0 = 0; t0 < b.ldb; t0 += 16 * kDownVectors) {
                const int64_t vectors = std::min<int64_t>(kDownVectors, (b.ldb - t0) / 16);
                const float* next = more && t0 == 0 ? b.w2 + (d + kDownRows) * b.H + b.h0 : nullptr;
                down_panel_v(vectors, b.w2 + d * b.H + b.h0, b.H, b.hc, b.hT + t0, b.ldb, y.data + r * b.ldb + t0,
                             next);
            }
            if (b.r > 0) down_tail(b, d, out);
        }
        add_transposed(y.data, b.ldb, n, token, out, b.D, g * 16);
    }
}

// the kept pre-activations of hidden units [h0 + 16 g0, h0 + 16 g1) of the block's chunk, from h^T's layout into the
// n slots' rows of a1 and a3 (H wide), each row's 16 units one line, stored past the cache (the backward reads them
// much later)
void keep_rows(const Block& b, int64_t g0, int64_t g1, int64_t n, float* a1, float* a3) {
    for (int64_t g = g0; g < g1; g++) {
        const int64_t units = std::min<int64_t>(16, b.hc - g * 16);
        const bool whole = units == 16 && b.H % 16 == 0;  // every row's 16 units one aligned line
        for (int which = 0; which < 2; which++) {
            const float* src = (which == 0 ? b.a1T : b.a3T) + g * 16 * b.ldb;
            float* dst = (which == 0 ? a1 : a3) + b.h0 + g * 16;
            for (int64_t t = 0; t * 16 < n; t++) {
                __m512 r[16];
                for (int i = 0; i < 16; i++)
                    r[i] = i < units ? _mm512_loadu_ps(src + i * b.ldb + t * 16) : _mm512_setzero_ps();
                smoe_simd512::transpose16(r);  // r[q]: slot 16 t + q's 16 units
                for (int64_t q = 0; q < 16 && t * 16 + q < n; q++) {
                    float* row = dst + (t * 16 + q) * b.H;
                    if (whole) _mm512_stream_ps(row, r[q]);
                    else _mm512_mask_storeu_ps(row, smoe_simd512::lanes(units), r[q]);
                }
            }
        }
    }
    _mm_sfence();
}

// out, and where a1 and a3 are given (N K x H each), the pre-activations in sorted slot order
at::Tensor moe(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& w3,
               const at::Tensor& experts, const at::Tensor& weights, float* a1, float* a3) {
    smoe_moe::check_args("smoe_native::f32_moe", x, w1, w2, w3, experts, weights, at::kFloat);
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
    // expert ex's slots [lo, hi) in blocks, each through the up and down products on the intra-op threads (on the
    // calling thread alone where called in a parallel region)
    auto run = [&](int64_t ex, int64_t lo, int64_t hi) {
        Scratch<6, float> xT(D * kBlockTokens);
        Scratch<7, float> hT(std::min(H, kHidden) * kBlockTokens);
        Scratch<8, float> rw(kBlockTokens);
        Scratch<10, float> a1T(a1 != nullptr ? std::min(H, kHidden) * kBlockTokens : 0);
        Scratch<11, float> a3T(a1 != nullptr ? std::min(H, kHidden) * kBlockTokens : 0);
        Scratch<13, float> th(kTailMerged * kHidden);
        for (int64_t b0 = lo, all = 0; b0 < hi; b0 += all) {
            // the block's tokens: n lanes of x^T and h^T, and r rows (its tail)
            const int64_t left = hi - b0;
            all = left <= kBlockTokens + kTailMerged ? left : kBlockTokens;
            const int64_t whole = all - all % 16;
            const int64_t tail_max = all > kBlockTokens ? kTailMerged : whole % 64 == 16 ? kTailMaxBeside1 : kTailMax;
            const int64_t r = all % 16 <= tail_max && whole >= kTailMinLanes ? all % 16 : 0, n = all - r;
            const int64_t ldb = (n + 15) / 16 * 16;
            const int64_t* token = slots.token.data() + b0;
            gather_transposed(xp, D, token, n, ldb, xT.data);
            std::copy(slots.weight.data() + b0, slots.weight.data() + b0 + n, rw.data);
            std::fill(rw.data + n, rw.data + ldb, 0.f);
            for (int64_t h0 = 0; h0 < H; h0 += kHidden) {
                const Block b{w1c.const_data_ptr<float>() + ex * H * D, w2c.const_data_ptr<float>() + ex * D * H,
                              w3c.const_data_ptr<float>() + ex * H * D, xT.data, rw.data, hT.data,
                              a1 != nullptr ? a1T.data : nullptr, a1 != nullptr ? a3T.data : nullptr, D, H, h0,
                              std::min(kHidden, H - h0), ldb, xp, slots.weight.data() + b0 + n, token + n, r, th.data,
                              a1 != nullptr ? a1 + (b0 + n) * H : nullptr, a1 != nullptr ? a3 + (b0 + n) * H : nullptr};
                // the threads take whole panels and whole column groups (whole experts per thread, each summing into
                // its own output, took 0.99-1.06x the time on 2 threads)
                at::parallel_for(0, (b.hc + kUpRows - 1) / kUpRows, 8,
                                 [&](int64_t p0, int64_t p1) { up_rows(b, p0, p1); });
                if (a1 != nullptr)
                    at::parallel_for(0, (b.hc + 15) / 16, 4, [&](int64_t g0, int64_t g1) {
                        keep_rows(b, g0, g1, n, a1 + b0 * H, a3 + b0 * H);
                    });
                at::parallel_for(0, D / 16, 1, [&](int64_t g0, int64_t g1) { down_columns(b, g0, g1, n, token, o); });
            }
        }
    };
    for (int64_t ex = 0; ex < E; ex++) {
        // many slots: each thread takes its own share of them through both products, so that the x^T and h^T it reads
        // are the ones it wrote; shares end on whole vectors of 16 slots
        const int64_t lo = slots.start[ex], n = slots.start[ex + 1] - lo;
        if (!smoe_moe::split_slots(lo, n, kSplitMinSlots, 16, [&](int64_t s0, int64_t s1) { run(ex, s0, s1); }))
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

// The backward's weight gradients in fp32: per expert, out (M x N) = a^T b over its R rows. Experts of up to
// kGradMaxRows rows: a's rows transposed once into a^T (M x R, so a panel's broadcasts come from contiguous rows), then
// panels of kGradRows rows of out x 64 columns summed over the R rows in registers and stored once, past the cache (the
// library's product writes the gradient through the cache: 4x the dense-equivalent's bytes). Larger experts: the
// library's product.
constexpr int kGradRows = 6;
constexpr int64_t kGradMaxRows = 256;

template <int JB, int V>
void grad_panel(const float* aT, int64_t R, const float* b, int64_t N, float* out) {
    __m512 acc[JB][V];
    for (int j = 0; j < JB; j++)
        for (int v = 0; v < V; v++) acc[j][v] = _mm512_setzero_ps();
    for (int64_t r = 0; r < R; r++) {
        __m512 x[V];
        for (int v = 0; v < V; v++) x[v] = _mm512_loadu_ps(b + r * N + 16 * v);
        for (int j = 0; j < JB; j++) {
            const __m512 s = _mm512_set1_ps(aT[j * kGradMaxRows + r]);
            for (int v = 0; v < V; v++) acc[j][v] = _mm512_fmadd_ps(s, x[v], acc[j][v]);
        }
    }
    for (int j = 0; j < JB; j++)
        for (int v = 0; v < V; v++) _mm512_stream_ps(out + j * N + 16 * v, acc[j][v]);
}

template <int JB>
void grad_panel_v(int64_t vectors, const float* aT, int64_t R, const float* b, int64_t N, float* out) {
    switch (vectors) {
        case 1: return grad_panel<JB, 1>(aT, R, b, N, out);
        case 2: return grad_panel<JB, 2>(aT, R, b, N, out);
        case 3: return grad_panel<JB, 3>(aT, R, b, N, out);
        default: return grad_panel<JB, 4>(aT, R, b, N, out);
    }
}

// rows [m0, m1) of one expert's out = a^T b over its R rows (aT: a^T's rows m0.., kGradMaxRows apart); b's 64 columns
// stay in L1 across the panels of a^T (the other order, a^T's 6 rows across b's columns, measured alike)
void grad_rows(const float* aT, const float* b, int64_t N, int64_t R, float* out, int64_t m0, int64_t m1) {
    for (int64_t n0 = 0; n0 < N; n0 += 64)
        for (int64_t m = m0; m < m1; m += kGradRows) {
            const int64_t rows = std::min<int64_t>(kGradRows, m1 - m), vectors = std::min<int64_t>(4, (N - n0) / 16);
            const float* am = aT + (m - m0) * kGradMaxRows;
            float* o = out + m * N + n0;
            switch (rows) {
                case kGradRows: grad_panel_v<kGradRows>(vectors, am, R, b + n0, N, o); break;
                case 1: grad_panel_v<1>(vectors, am, R, b + n0, N, o); break;
                case 2: grad_panel_v<2>(vectors, am, R, b + n0, N, o); break;
                case 3: grad_panel_v<3>(vectors, am, R, b + n0, N, o); break;
                case 4: grad_panel_v<4>(vectors, am, R, b + n0, N, o); break;
                default: grad_panel_v<5>(vectors, am, R, b + n0, N, o); break;
            }
        }
    _mm_sfence();
}

// a's rows [lo, lo + R) (M wide), columns [m0, m1) (multiples of 16 apart from m1 = M), as aT rows kGradMaxRows apart
void transpose_rows(const float* a, int64_t M, int64_t R, int64_t m0, int64_t m1, float* aT) {
    for (int64_t r0 = 0; r0 < R; r0 += 16)
        for (int64_t c = m0; c < m1; c += 16) {
            const int64_t rows = std::min<int64_t>(16, R - r0), cols = std::min<int64_t>(16, m1 - c);
            __m512 v[16];
            for (int64_t i = 0; i < 16; i++)
                v[i] = i < rows ? _mm512_maskz_loadu_ps(smoe_simd512::lanes(cols), a + (r0 + i) * M + c)
                                : _mm512_setzero_ps();
            smoe_simd512::transpose16(v);  // v[q]: column c + q of the 16 rows
            for (int64_t q = 0; q < cols; q++) _mm512_storeu_ps(aT + (c - m0 + q) * kGradMaxRows + r0, v[q]);
        }
}

at::Tensor f32_segment_wgrad(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef counts) {
    smoe_moe::check_segment_args("smoe_native::f32_segment_wgrad", a, b, counts, at::kFloat);
    const int64_t M = a.size(1), N = b.size(1), E = int64_t(counts.size());
    TORCH_CHECK(N % 16 == 0, "smoe_native::f32_segment_wgrad: b's width must be a multiple of 16, got ", N);
    auto ac = a.contiguous(), bc = b.contiguous();
    auto out = at::empty({E, M, N}, ac.options());
    const float *ap = ac.const_data_ptr<float>(), *bp = bc.const_data_ptr<float>();
    float* op = out.mutable_data_ptr<float>();
    for (int64_t e = 0, lo = 0; e < E; lo += counts[e], e++) {
        const int64_t R = counts[e];
        if (R > kGradMaxRows) {
            auto oe = out[e];
            at::mm_out(oe, ac.narrow(0, lo, R).t(), bc.narrow(0, lo, R));
            continue;
        }
        // the threads take rows of out, 48 at a time (whole panels and whole 16-column blocks of a)
        at::parallel_for(0, (M + 47) / 48, 1, [&](int64_t p0, int64_t p1) {
            const int64_t m0 = p0 * 48, m1 = std::min(M, p1 * 48);
            if (R == 0) {
                std::fill(op + e * M * N + m0 * N, op + e * M * N + m1 * N, 0.f);
                return;
            }
            Scratch<12, float> aT((m1 - m0) * kGradMaxRows);
            transpose_rows(ap + lo * M, M, R, m0, m1, aT.data);
            grad_rows(aT.data, bp + lo * N, N, R, op + e * M * N, m0, m1);
        });
    }
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smoe_native, m) {
    m.def("f32_moe(Tensor x, Tensor w1, Tensor w2, Tensor w3, Tensor experts, Tensor weights) -> Tensor");
    m.def("f32_moe_keep(Tensor x, Tensor w1, Tensor w2, Tensor w3, Tensor experts, Tensor weights) -> "
          "(Tensor, Tensor, Tensor)");
    m.def("f32_segment_wgrad(Tensor a, Tensor b, int[] counts) -> Tensor");
}

TORCH_LIBRARY_IMPL(smoe_native, CPU, m) {
    m.impl("f32_moe", &f32_moe);
    m.impl("f32_moe_keep", &f32_moe_keep);
    m.impl("f32_segment_wgrad", &f32_segment_wgrad);
}
