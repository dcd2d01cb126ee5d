// CPU kernels of token selection: TokenButler's group-mean score, the top-k and the residency update (one
// call per producer each), and the fetch of a layer's selected K and V (one call per layer).
//
// Built at first use by offload_engine/native/__init__.py (g++ -O3 -march=native, cached by source,
// compiler and CPU), called through ctypes with raw pointers. Given threads > 1 (the wrappers pass
// $TBRUN_NATIVE_THREADS, default 1), the scores and the top-k split rows among them; a producer's one-call
// selection, the decode attention, the residency update and the gather do where the work is large enough to
// pay for them. The threads are kept between calls (Workers).
//
// tbrun_group_scores: for each row r (a (layer, KV head) pair), g query heads of d' dims against
// the row's compact keys stored dimension-major (key dim j of token t at keys[r * row_stride + j * dim_stride + t]):
//   logits[h, t] = q[r, h, :] . k[r, :, t]
//   out[r, t]    = mean_h softmax_t(logits[h, :])[t]      (reduce 0, the mean rule)
//   out[r, t]    = max_h logits[h, t]                     (reduce 1, the max rule; with g = 1 the logits,
//                                                          which rank as the softmax does: no exponentials)
// The keys are streamed once, a tile of tokens at a time: each key vector feeds every head's accumulators in
// registers (each head's tile maximum is taken there too, as the logits are stored: a separate pass over them
// was 10% of a producer's selection at 32k), and the tile's logits are exponentiated against each head's
// running maximum while still in L1 (an online softmax); a second pass over the [g, m] buffer (in L2 up to
// about 16k tokens, beyond in L3) rescales each tile to the final maximum and averages the heads. The same
// result as torch.softmax(q @ k, -1).mean(-2) up to float rounding (tests/test_native.py). bfloat16 keys: half
// the bytes, multiplied in pairs by AVX512-BF16's vdpbf16ps against the query rounded to bfloat16 where the
// CPU has it, else widened to float32 as they are read. int8 keys (tbrun_*_int8): codes with one float16 scale
// per token, 18 bytes a token and head at d' = 16 against bfloat16's 32; where the CPU has AVX512-VNNI they
// are multiplied four at a time by vpdpbusd, in integers, against the query quantised to int8 per head (one
// instruction where widening took two and a float multiply took one per code), and each token's dot products
// times its scale and the head's; without VNNI, widened as they are read against the float32 query (then no
// faster than bfloat16 keys: the widening costs what the bytes save).
//
// tbrun_residency_update: ResidencyMap.update (selection/residency.py) row by row, the same slots and
// plan as its numpy form (tests/test_native.py), without ~40 array operations per producer; which slots
// stay is read from a byte map of the selection, not from random reads of the position -> slot table.
//
// tbrun_gather_pairs: a layer's K and V fetch plan in one call. Large plans are bound by memory latency
// (random 256-byte rows of the host store, as fast as index_select + index_copy_ with or without
// prefetching ahead); small ones, the real predictor's few new tokens a step, save the ~15 torch
// operations a layer's row numbers and copies took.
//
// tbrun_topk_rows: the top-k of each row (ranking.topk_unsorted's CPU float32 path), the cut found by
// counting rather than partitioning: ranking.py's sampled threshold, a compaction of the entries at or
// above it, then the k-th largest by bisection on its bits, each step one vectorised count over the entries
// that share the bits found so far (narrowed every 8 bits).
//
// tbrun_linear: a model's linear layer for one token (a matrix-vector product), what a decode step
// spends most of its time on outside attention on the CPU; its weights in float32 or, for a model read from a
// GGUF file, in the file's own q4_1 / q8_0 blocks (the same sums from a sixth or a quarter of the bytes).
//
// tbrun_project_token: a decode token's key through each KV head's compact projection, written into the
// compact cache in one call per layer: float32, bfloat16, or int8 with each head's key quantised as
// quantize_keys does (codes and a float16 scale).
//
// tbrun_decode_attention: one decode token's attention over gathered keys and values, every KV head's keys
// and values read once for its group of query heads (softmax in float32, by exp_in_place). PyTorch's two
// grouped matmuls pack the keys before multiplying (one more pass over them): the kernel takes 0.5-0.8x
// their time at 2k-32k tokens with the KV coming from memory (bench/reports/decode_attention_cpu.md).
//
// tbrun_select_rows: a producer's selection in one call, row by row: the scores, the top-k of the
// candidates while the row is in L2, the residency update. In the engine on the CPU the three calls and
// the Python between them cost about as much again as the kernels (profiled at 7.5k and 32k).

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <emmintrin.h>  // _mm_pause, for the workers' spin
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <pthread.h>
#include <system_error>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

// exp(x) for x <= 0 (Cephes' single-precision polynomial, ~1 ulp; 0 below -87, where torch still gives
// denormals down to about -104: only the order of that far tail differs); written so that the compiler
// vectorises the loop that calls it (no libm call, no branch). NaN gives NaN with no undefined conversion.
inline float exp_nonpositive(float x) {
    const float clamped = std::max(x, -87.0f);
    float fx = std::floor(clamped * 1.44269504088896341f + 0.5f);
    // a NaN becomes -126, a defined exponent (x keeps the NaN); std::max/min, not fmaxf/fminf, which
    // the compiler does not vectorise here (the loop ran 3x slower)
    fx = std::min(0.0f, std::max(-126.0f, fx));
    float r = clamped - fx * 0.693359375f;
    r = r + fx * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(fx) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return x < -87.0f ? 0.0f : y * scale;
}

constexpr int64_t LANES = 16;  // floats per vector; also independent partial sums

#if defined(__AVX512F__)
// exp_nonpositive on 16 floats, the power of two applied by vscalefps: no integer conversion, no clamp
// of the exponent, and the tail below -87 falls to denormals and 0 as in torch. A NaN stays a NaN
// (max returns its second operand when one is NaN).
inline __m512 exp16_nonpositive(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);  // exp(-104) is 0 in float32
    const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                           _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, fx);
}
#endif

// row[t] = exp(row[t] - top) in place; returns their sum
float exp_in_place(float* row, int64_t n, float top) {
    float lanes[LANES] = {};
    int64_t t = 0;
#if defined(__AVX512F__)
    __m512 sums = _mm512_setzero_ps();
    const __m512 shift = _mm512_set1_ps(top);
    for (; t + 16 <= n; t += 16) {
        const __m512 e = exp16_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + t), shift));
        _mm512_storeu_ps(row + t, e);
        sums = _mm512_add_ps(sums, e);
    }
    _mm512_storeu_ps(lanes, sums);
#endif
    for (; t + LANES <= n; t += LANES)
        for (int64_t i = 0; i < LANES; ++i) {
            const float e = exp_nonpositive(row[t + i] - top);
            row[t + i] = e;
            lanes[i] += e;
        }
    float total = 0.0f;
    for (; t < n; ++t) {
        const float e = exp_nonpositive(row[t] - top);
        row[t] = e;
        total += e;
    }
    for (int64_t i = 0; i < LANES; ++i) total += lanes[i];
    return total;
}

// GCC/Clang vector extension: 16 floats, lowered to whatever the CPU has (one AVX-512 register, two AVX2 ones)
typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));

inline vfloat load(const float* p) {
    vfloat v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

// the sum of a vector's lanes
inline float lane_sum(vfloat a) {
#if defined(__AVX512F__)
    __m512 wide;
    std::memcpy(&wide, &a, sizeof(wide));
    return _mm512_reduce_add_ps(wide);
#else
    float sum = 0.0f;
    for (int i = 0; i < LANES; ++i) sum += a[i];
    return sum;
#endif
}

// bfloat16 keys (the top half of a float32's bits): widened exactly, by a shift, as they are loaded
typedef uint16_t vbf16 __attribute__((vector_size(LANES * sizeof(uint16_t))));
typedef uint32_t vbits __attribute__((vector_size(LANES * sizeof(uint32_t))));

inline vfloat load(const uint16_t* p) {
    vbf16 half;
    std::memcpy(&half, p, sizeof(half));
    const vbits bits = __builtin_convertvector(half, vbits) << 16;
    vfloat v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
}

// int8 keys (codes; each token's float16 scale multiplies its logits, see logits_span)
// (GCC 12 scalarises __builtin_convertvector from 16 int8s, one cvtsi2ss a lane: 5x the time of the
// bfloat16 path; hence the intrinsics where the CPU has them)
inline vfloat load(const int8_t* p) {
    vfloat v;
#if defined(__AVX512F__)
    const __m512 wide = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    std::memcpy(&v, &wide, sizeof(v));
#elif defined(__AVX2__)
    const __m256 low = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    const __m256 high = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
    std::memcpy(&v, &low, sizeof(low));
    std::memcpy(reinterpret_cast<char*>(&v) + sizeof(low), &high, sizeof(high));
#else
    for (int i = 0; i < LANES; ++i) v[i] = static_cast<float>(p[i]);
#endif
    return v;
}

// float16 bits -> float32, exactly for every finite number (normal, subnormal, zero, either sign): by the
// CPU's conversion where it has one (F16C: infinities and NaNs kept too), else from the exponent and
// mantissa in integer arithmetic (no float32 denormal is formed, so a CPU flushing denormals still gets
// the subnormal scales right). The scales are finite.
inline float half_scalar(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
    const float magnitude = exponent == 0 ? static_cast<float>(mantissa) * 0x1p-24f  // subnormal or zero
                                          : [&] {
                                                const uint32_t bits = ((exponent + 112u) << 23) | (mantissa << 13);
                                                float v;
                                                std::memcpy(&v, &bits, sizeof(v));
                                                return v;
                                            }();
    return (h & 0x8000u) ? -magnitude : magnitude;
#endif
}

inline vfloat load_half(const uint16_t* p) {
    vfloat v;
#if defined(__AVX512F__)
    const __m512 wide = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    std::memcpy(&v, &wide, sizeof(v));
#elif defined(__F16C__)
    const __m256 low = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256 high = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
    std::memcpy(&v, &low, sizeof(low));
    std::memcpy(reinterpret_cast<char*>(&v) + sizeof(low), &high, sizeof(high));
#else
    for (int i = 0; i < LANES; ++i) v[i] = half_scalar(p[i]);
#endif
    return v;
}

inline float scalar(int8_t x) { return static_cast<float>(x); }

inline float scalar(float x) { return x; }

inline float scalar(uint16_t x) {
    const uint32_t bits = static_cast<uint32_t>(x) << 16;
    float v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
}

// Tokens read ahead by software prefetch in each of a span's dim rows (and int8 keys' scales), at every
// step of the logits loops: a tile's exponentials and a row's top-k and update are arithmetic with no load
// in flight, and the hardware's stream prefetchers start each of the d + 1 streams again after them. With
// it, group scores of SmolLM2's producers over cold int8 keys took 0.5x as long at 128k tokens and 0.7x at
// 32k (alternating runs of bench/selection_speed.py before and after, on an AMD EPYC: bench/README.md, "Where
// selection stands on a CPU"; 256 to 2048 tokens ahead alike).
constexpr int64_t PREFETCH_TOKENS = 512;

// Prefetch of token `at` + PREFETCH_TOKENS in each of the d dim rows (and scales, where given), only within
// the m tokens scored.
template <typename Key>
inline void prefetch_ahead(const Key* keys, int64_t d, int64_t dim_stride, int64_t at, int64_t m,
                           const uint16_t* scales = nullptr) {
    const int64_t ahead = at + PREFETCH_TOKENS;
    if (ahead + 64 > m) return;
    for (int64_t j = 0; j < d; ++j) __builtin_prefetch(keys + j * dim_stride + ahead);
    if (scales != nullptr) {
        __builtin_prefetch(scales + ahead);
        __builtin_prefetch(scales + ahead + 32);
    }
}

// logits of G heads for tokens [start, start + n) into buffer [G, m]: per LANES tokens, each key vector
// is loaded once and feeds all G heads' accumulators, which stay in registers. (Two vectors of tokens
// per iteration were faster hot but slower with the keys cold; a prefetch of a whole tile ahead was slower
// cold too, where prefetch_ahead's one line per row and step is not.)
// int8 keys: scales [m] (float16 bits) hold each token's factor, applied to its dot products (the codes
// times the scale are the key: q . (s c) = s (q . c)); null for float32 and bfloat16 keys. maxima [G]:
// each head's maximum so far, raised to the largest of the span's logits (NaN logits passed over).
template <int G, typename Key>
void logits_span(const float* q, int64_t d, const Key* keys, int64_t dim_stride, int64_t start, int64_t n,
                 float* buffer, int64_t m, const uint16_t* scales, float* maxima) {
    vfloat top[G];
    for (int h = 0; h < G; ++h) top[h] = vfloat{} - std::numeric_limits<float>::infinity();
    int64_t t = 0;
    for (; t + LANES <= n; t += LANES) {
        vfloat acc[G];
        for (int h = 0; h < G; ++h) acc[h] = vfloat{};
        prefetch_ahead(keys, d, dim_stride, start + t, m, scales);  // (scales: null but for int8 keys)
        for (int64_t j = 0; j < d; ++j) {
            const vfloat kj = load(keys + j * dim_stride + start + t);
            for (int h = 0; h < G; ++h) acc[h] += q[h * d + j] * kj;
        }
        if constexpr (std::is_same_v<Key, int8_t>) {
            const vfloat factor = load_half(scales + start + t);
            for (int h = 0; h < G; ++h) acc[h] *= factor;
        }
        for (int h = 0; h < G; ++h) {
            store(buffer + h * m + start + t, acc[h]);
            top[h] = top[h] < acc[h] ? acc[h] : top[h];  // a NaN logit is passed over (std::max's rule)
        }
    }
    for (int h = 0; h < G; ++h)
        for (int i = 0; i < LANES; ++i) maxima[h] = std::max(maxima[h], top[h][i]);
    for (; t < n; ++t)
        for (int h = 0; h < G; ++h) {
            float sum = 0.0f;
            for (int64_t j = 0; j < d; ++j) sum += q[h * d + j] * scalar(keys[j * dim_stride + start + t]);
            if constexpr (std::is_same_v<Key, int8_t>) sum *= half_scalar(scales[start + t]);
            buffer[h * m + start + t] = sum;
            maxima[h] = std::max(maxima[h], sum);
        }
}

#if defined(__AVX512BF16__)
// bfloat16 keys on a CPU with AVX512-BF16: vdpbf16ps multiplies pairs of bfloat16 numbers exactly and
// adds them in float32, 32 products an instruction, with no widening of the keys (half the instructions
// of the float32 form). The query must then be in bfloat16 too: qpairs [G, d / 2] holds dims (j, j + 1)
// of each head rounded to bfloat16, dim j in the low half. Dims j and j + 1 of 32 tokens are interleaved
// into pairs by unpacklo/unpackhi, which order tokens within 128-bit lanes; two permutes put them back.
// Returns how many tokens (a multiple of 32) it wrote.
constexpr bool BF16_PAIRS = true;

template <int G>
int64_t logits_span_pairs(const uint32_t* qpairs, int64_t d, const uint16_t* keys, int64_t dim_stride,
                          int64_t start, int64_t n, float* buffer, int64_t m, float* maxima) {
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    const int64_t pairs = d / 2;
    __m512 top[G];
    for (int h = 0; h < G; ++h) top[h] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t t = 0;
    for (; t + 32 <= n; t += 32) {
        __m512 low[G], high[G];  // tokens {0-3, 8-11, 16-19, 24-27} and {4-7, 12-15, 20-23, 28-31}
        for (int h = 0; h < G; ++h) low[h] = high[h] = _mm512_setzero_ps();
        prefetch_ahead(keys, d, dim_stride, start + t, m);
        for (int64_t j = 0; j < pairs; ++j) {
            const __m512i a = _mm512_loadu_si512(keys + 2 * j * dim_stride + start + t);
            const __m512i b = _mm512_loadu_si512(keys + (2 * j + 1) * dim_stride + start + t);
            const __m512bh pair_low = (__m512bh)_mm512_unpacklo_epi16(a, b);
            const __m512bh pair_high = (__m512bh)_mm512_unpackhi_epi16(a, b);
            for (int h = 0; h < G; ++h) {
                const __m512bh qv = (__m512bh)_mm512_set1_epi32(static_cast<int>(qpairs[h * pairs + j]));
                low[h] = _mm512_dpbf16_ps(low[h], pair_low, qv);
                high[h] = _mm512_dpbf16_ps(high[h], pair_high, qv);
            }
        }
        for (int h = 0; h < G; ++h) {
            _mm512_storeu_ps(buffer + h * m + start + t, _mm512_permutex2var_ps(low[h], first, high[h]));
            _mm512_storeu_ps(buffer + h * m + start + t + 16, _mm512_permutex2var_ps(low[h], second, high[h]));
            // max_ps returns its second operand where either is NaN: a NaN logit is passed over
            top[h] = _mm512_max_ps(low[h], _mm512_max_ps(high[h], top[h]));
        }
    }
    for (int h = 0; h < G; ++h) maxima[h] = std::max(maxima[h], _mm512_reduce_max_ps(top[h]));
    return t;
}
#else
constexpr bool BF16_PAIRS = false;
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// int8 keys on a CPU with AVX512-VNNI: vpdpbusd multiplies 4 unsigned bytes by 4 signed ones and adds the
// 4 products to a 32-bit lane, 64 products an instruction, exactly, in integers: no widening of the codes
// (two instructions per 16 codes otherwise) and no float multiply per dimension. The query must then be
// int8 too: qcodes [G, d] holds each head's query quantised to int8 (one float scale per head, qscale
// [G]; prepare_query), qsum [G] the sum of each head's codes. The keys' codes are made unsigned by
// flipping their top bit (code + 128), which adds 128 * qsum to every dot product, taken off after.
// Dims (j .. j + 3) of 64 tokens are interleaved into quads by unpacklo/hi of bytes then of words, which
// order tokens within 128-bit lanes; shuffles of lanes put them back. Logit = dot * qscale * token scale.
// The tokens after the last 64 take the same integer dot product in scalar code, so that a token's logit is
// the same number whichever call (a span from 0, or from a max-rule range's lo) scores it. Writes all n.
constexpr bool INT8_QUADS = true;

template <int G>
int64_t logits_span_quads(const int8_t* qcodes, const float* qscale, const int32_t* qsum, int64_t d,
                          const int8_t* keys, int64_t dim_stride, int64_t start, int64_t n, float* buffer, int64_t m,
                          const uint16_t* scales, float* maxima) {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    const int64_t quads = d / 4;
    __m512 top[G];
    for (int h = 0; h < G; ++h) top[h] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t t = 0;
    for (; t + 64 <= n; t += 64) {
        __m512i acc[G][4];  // acc[h][k], lane L: tokens 16 L + 4 k .. 16 L + 4 k + 3
        for (int h = 0; h < G; ++h)
            for (int k = 0; k < 4; ++k) acc[h][k] = _mm512_setzero_si512();
        prefetch_ahead(keys, d, dim_stride, start + t, m, scales);
        for (int64_t j = 0; j < quads; ++j) {
            const int8_t* row = keys + 4 * j * dim_stride + start + t;
            const __m512i a = _mm512_xor_si512(_mm512_loadu_si512(row), flip);
            const __m512i b = _mm512_xor_si512(_mm512_loadu_si512(row + dim_stride), flip);
            const __m512i c = _mm512_xor_si512(_mm512_loadu_si512(row + 2 * dim_stride), flip);
            const __m512i e = _mm512_xor_si512(_mm512_loadu_si512(row + 3 * dim_stride), flip);
            const __m512i ab_low = _mm512_unpacklo_epi8(a, b), ab_high = _mm512_unpackhi_epi8(a, b);
            const __m512i ce_low = _mm512_unpacklo_epi8(c, e), ce_high = _mm512_unpackhi_epi8(c, e);
            const __m512i quad[4] = {_mm512_unpacklo_epi16(ab_low, ce_low), _mm512_unpackhi_epi16(ab_low, ce_low),
                                     _mm512_unpacklo_epi16(ab_high, ce_high), _mm512_unpackhi_epi16(ab_high, ce_high)};
            for (int h = 0; h < G; ++h) {
                int32_t word;
                std::memcpy(&word, qcodes + h * d + 4 * j, sizeof(word));
                const __m512i qv = _mm512_set1_epi32(word);
                for (int k = 0; k < 4; ++k) acc[h][k] = _mm512_dpbusd_epi32(acc[h][k], quad[k], qv);
            }
        }
        for (int h = 0; h < G; ++h) {
            // lanes back in token order: out i (tokens 16 i .. 16 i + 15) = lane i of acc[h][0..3]
            const __m512i t0 = _mm512_shuffle_i32x4(acc[h][0], acc[h][1], 0x44);
            const __m512i t1 = _mm512_shuffle_i32x4(acc[h][2], acc[h][3], 0x44);
            const __m512i t2 = _mm512_shuffle_i32x4(acc[h][0], acc[h][1], 0xEE);
            const __m512i t3 = _mm512_shuffle_i32x4(acc[h][2], acc[h][3], 0xEE);
            const __m512i ordered[4] = {_mm512_shuffle_i32x4(t0, t1, 0x88), _mm512_shuffle_i32x4(t0, t1, 0xDD),
                                        _mm512_shuffle_i32x4(t2, t3, 0x88), _mm512_shuffle_i32x4(t2, t3, 0xDD)};
            const __m512i offset = _mm512_set1_epi32(128 * qsum[h]);
            const __m512 factor = _mm512_set1_ps(qscale[h]);
            for (int i = 0; i < 4; ++i) {
                const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(ordered[i], offset));
                const __m512 token_scale = _mm512_cvtph_ps(
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + start + t + 16 * i)));
                const __m512 logit = _mm512_mul_ps(_mm512_mul_ps(dot, factor), token_scale);
                _mm512_storeu_ps(buffer + h * m + start + t + 16 * i, logit);
                top[h] = _mm512_max_ps(logit, top[h]);  // a NaN logit (a NaN scale) is passed over
            }
        }
    }
    for (int h = 0; h < G; ++h) maxima[h] = std::max(maxima[h], _mm512_reduce_max_ps(top[h]));
    for (; t < n; ++t) {
        const float token_scale = half_scalar(scales[start + t]);
        for (int h = 0; h < G; ++h) {
            int32_t dot = 0;
            for (int64_t j = 0; j < d; ++j) dot += qcodes[h * d + j] * keys[j * dim_stride + start + t];
            const float logit = static_cast<float>(dot) * qscale[h] * token_scale;
            buffer[h * m + start + t] = logit;
            maxima[h] = std::max(maxima[h], logit);
        }
    }
    return n;
}
#else
constexpr bool INT8_QUADS = false;
#endif

// float32 -> bfloat16 bits, rounded to nearest even (finite inputs; a NaN stays a NaN)
inline uint16_t to_bf16(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    if (x != x) return static_cast<uint16_t>((bits >> 16) | 0x40);
    return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// The query in the forms the integer and pair kernels take, where they run (prepare_query), else nulls:
// pairs [g, d / 2] (bfloat16 keys, AVX512-BF16, d even), or codes [g, d] with scales [g] and sums [g]
// (int8 keys, AVX512-VNNI, d a multiple of 4)
struct QueryForm {
    const uint32_t* pairs = nullptr;
    const int8_t* codes = nullptr;
    const float* scales = nullptr;
    const int32_t* sums = nullptr;
};

// any number of heads, in blocks of at most 4 (their accumulators fit in registers); form: the query for
// the pair or quad kernel where one runs; maxima [g] as for logits_span
template <typename Key>
void logits_all(const float* q, const QueryForm& form, int64_t g, int64_t d, const Key* keys,
                int64_t dim_stride, int64_t start, int64_t n, float* buffer, int64_t m, const uint16_t* scales,
                float* maxima) {
    for (int64_t h = 0; h < g;) {
        const int64_t block = std::min<int64_t>(4, g - h);
        const float* qh = q + h * d;
        float* out = buffer + h * m;
        float* top = maxima + h;
        int64_t done = 0;
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<Key, uint16_t>) {
            if (form.pairs != nullptr) {
                const uint32_t* ph = form.pairs + h * (d / 2);
                switch (block) {
                    case 4: done = logits_span_pairs<4>(ph, d, keys, dim_stride, start, n, out, m, top); break;
                    case 3: done = logits_span_pairs<3>(ph, d, keys, dim_stride, start, n, out, m, top); break;
                    case 2: done = logits_span_pairs<2>(ph, d, keys, dim_stride, start, n, out, m, top); break;
                    default: done = logits_span_pairs<1>(ph, d, keys, dim_stride, start, n, out, m, top); break;
                }
            }
        }
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
        if constexpr (std::is_same_v<Key, int8_t>) {
            if (form.codes != nullptr) {
                const int8_t* ch = form.codes + h * d;
                const float* sh = form.scales + h;
                const int32_t* uh = form.sums + h;
                switch (block) {
                    case 4: done = logits_span_quads<4>(ch, sh, uh, d, keys, dim_stride, start, n, out, m, scales, top); break;
                    case 3: done = logits_span_quads<3>(ch, sh, uh, d, keys, dim_stride, start, n, out, m, scales, top); break;
                    case 2: done = logits_span_quads<2>(ch, sh, uh, d, keys, dim_stride, start, n, out, m, scales, top); break;
                    default: done = logits_span_quads<1>(ch, sh, uh, d, keys, dim_stride, start, n, out, m, scales, top); break;
                }
            }
        }
#endif
        switch (block) {  // the rest (all of it without the pair or quad kernel), from the same (rounded) query
            case 4: logits_span<4>(qh, d, keys, dim_stride, start + done, n - done, out, m, scales, top); break;
            case 3: logits_span<3>(qh, d, keys, dim_stride, start + done, n - done, out, m, scales, top); break;
            case 2: logits_span<2>(qh, d, keys, dim_stride, start + done, n - done, out, m, scales, top); break;
            default: logits_span<1>(qh, d, keys, dim_stride, start + done, n - done, out, m, scales, top); break;
        }
        h += block;
    }
}

constexpr int64_t TILE = 512;  // tokens per tile: its g rows of logits stay in L1 between the passes

// small per-row state of score_row, kept by each worker across its rows (no allocation per row)
struct RowWork {
    std::vector<float> shift, top, total, rounded, tile_tops, code_scales;
    std::vector<uint32_t> pairs;
    std::vector<int8_t> codes;
    std::vector<int32_t> code_sums;
};

// A head's query quantised to int8 as the quad kernel takes it, the rule of quantize_keys
// (predictor/network.py) in float32: scale = max(max |q|, 1e-8) / 127, code = q / scale rounded to nearest
// even. Returns the scale; codes [d] written, and the sum of the codes in *sum.
inline float quantise_head(const float* q, int64_t d, int8_t* codes, int32_t* sum) {
    float largest = 0.0f;
    for (int64_t j = 0; j < d; ++j) largest = std::max(largest, std::fabs(q[j]));
    const float scale = std::max(largest, 1e-8f) / 127.0f;
    int32_t total = 0;
    for (int64_t j = 0; j < d; ++j) {
        const float code = std::nearbyint(q[j] / scale);
        codes[j] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, code)));
        total += codes[j];
    }
    *sum = total;
    return scale;
}

inline bool all_finite(const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        if (!(std::fabs(x[i]) <= std::numeric_limits<float>::max())) return false;
    return true;
}

// The query as the logits kernels read it: for bfloat16 keys where the pair kernel runs, q is replaced by
// its bfloat16 rounding and the pairs are given; for int8 keys where the quad kernel runs (which scores every
// token of a span, its tail too), its int8 codes, scales and sums are given (not for a query with a NaN or an
// infinity, which the float path carries into the scores as before); else q stays and the form is empty.
template <typename Key>
QueryForm prepare_query(const float*& q, int64_t g, int64_t d, RowWork& work) {
    QueryForm form;
    if (std::is_same_v<Key, uint16_t> && BF16_PAIRS && d % 2 == 0) {
        work.rounded.resize(static_cast<size_t>(g * d));
        work.pairs.resize(static_cast<size_t>(g * d / 2));
        for (int64_t i = 0; i < g * d; ++i) work.rounded[static_cast<size_t>(i)] = scalar(to_bf16(q[i]));
        for (int64_t i = 0; i < g * d / 2; ++i)
            work.pairs[static_cast<size_t>(i)] = static_cast<uint32_t>(to_bf16(q[2 * i])) |
                                                 static_cast<uint32_t>(to_bf16(q[2 * i + 1])) << 16;
        q = work.rounded.data();
        form.pairs = work.pairs.data();
    } else if (std::is_same_v<Key, int8_t> && INT8_QUADS && d % 4 == 0 && all_finite(q, g * d)) {
        work.codes.resize(static_cast<size_t>(g * d));
        work.code_scales.resize(static_cast<size_t>(g));
        work.code_sums.resize(static_cast<size_t>(g));
        for (int64_t h = 0; h < g; ++h)
            work.code_scales[static_cast<size_t>(h)] =
                quantise_head(q + h * d, d, work.codes.data() + h * d, work.code_sums.data() + h);
        form.codes = work.codes.data();
        form.scales = work.code_scales.data();
        form.sums = work.code_sums.data();
    }
    return form;
}

// One row: logits, softmax per head and the mean over heads, the keys streamed once. Per tile the logits
// are exponentiated against the head's running maximum while they are in L1 (an online softmax); pass 2
// rescales each tile's exponentials to the final maximum and sums the heads, over the [g, m] buffer.
template <typename Key>
void score_row(const float* q, int64_t g, int64_t d, const Key* keys, int64_t dim_stride, int64_t m,
               float* out, float* buffer, RowWork& work, const uint16_t* scales) {
    const int64_t tiles = (m + TILE - 1) / TILE;
    const QueryForm form = prepare_query<Key>(q, g, d, work);
    std::vector<float>& shift = work.shift;
    shift.assign(static_cast<size_t>(g * tiles), 0.0f);
    std::vector<float>& top = work.top;
    std::vector<float>& total = work.total;
    top.assign(static_cast<size_t>(g), -std::numeric_limits<float>::infinity());
    total.assign(static_cast<size_t>(g), 0.0f);
    std::vector<float>& tile_tops = work.tile_tops;
    tile_tops.resize(static_cast<size_t>(g));
    for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t start = tile * TILE, n = std::min(TILE, m - start);
        std::fill(tile_tops.begin(), tile_tops.end(), -std::numeric_limits<float>::infinity());
        logits_all(q, form, g, d, keys, dim_stride, start, n, buffer, m, scales, tile_tops.data());
        for (int64_t h = 0; h < g; ++h) {
            float* row = buffer + h * m + start;
            const float tile_top = tile_tops[static_cast<size_t>(h)];
            float& head_top = top[static_cast<size_t>(h)];
            float& head_total = total[static_cast<size_t>(h)];
            if (tile_top > head_top) {
                if (head_total > 0.0f) head_total *= std::exp(head_top - tile_top);
                head_top = tile_top;
            }
            shift[static_cast<size_t>(h * tiles + tile)] = head_top;
            head_total += exp_in_place(row, n, head_top);
        }
    }
    // pass 2: out = sum_h exp(logit - top_h) / (g * total_h), each tile's exponentials rescaled once
    for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t start = tile * TILE, n = std::min(TILE, m - start);
        for (int64_t h = 0; h < g; ++h) {
            const float head_top = top[static_cast<size_t>(h)];
            const float tile_shift = shift[static_cast<size_t>(h * tiles + tile)];
            const float factor = (tile_shift == head_top ? 1.0f : std::exp(tile_shift - head_top)) /
                                 (total[static_cast<size_t>(h)] * static_cast<float>(g));
            const float* row = buffer + h * m + start;
            float* dst = out + start;
            if (h == 0)
                for (int64_t t = 0; t < n; ++t) dst[t] = row[t] * factor;
            else
                for (int64_t t = 0; t < n; ++t) dst[t] += row[t] * factor;
        }
    }
}

// One row under the max rule, tokens [lo, hi) of out: the largest of the g heads' logits (with g = 1 the
// logits themselves, written straight to out: one pass over the keys, no exponentials).
template <typename Key>
void max_row(const float* q, int64_t g, int64_t d, const Key* keys, int64_t dim_stride, int64_t lo, int64_t hi,
             int64_t m, float* out, float* buffer, RowWork& work, const uint16_t* scales) {
    const QueryForm form = prepare_query<Key>(q, g, d, work);
    work.tile_tops.assign(static_cast<size_t>(g), -std::numeric_limits<float>::infinity());  // not needed here
    if (g == 1) {
        logits_all(q, form, 1, d, keys, dim_stride, lo, hi - lo, out, m, scales, work.tile_tops.data());
        return;
    }
    for (int64_t start = lo; start < hi; start += TILE) {
        const int64_t n = std::min(TILE, hi - start);
        logits_all(q, form, g, d, keys, dim_stride, start, n, buffer, m, scales, work.tile_tops.data());
        for (int64_t t = start; t < start + n; ++t) {
            float best = buffer[t];
            for (int64_t h = 1; h < g; ++h) best = std::max(best, buffer[h * m + t]);
            out[t] = best;
        }
    }
}

constexpr int64_t REDUCE_MEAN = 0, REDUCE_MAX = 1;

// A row's scores under either rule: score_row over [0, m) (the softmax runs over every cached token), or
// max_row over the candidates [lo, hi) only (out's other entries are left as they were).
template <typename Key>
void reduce_row(int64_t reduce, const float* q, int64_t g, int64_t d, const Key* keys, int64_t dim_stride,
                int64_t lo, int64_t hi, int64_t m, float* out, float* buffer, RowWork& work, const uint16_t* scales) {
    if (reduce == REDUCE_MAX)
        max_row(q, g, d, keys, dim_stride, lo, hi, m, out, buffer, work, scales);
    else
        score_row(q, g, d, keys, dim_stride, m, out, buffer, work, scales);
}

// row r's scales (int8 keys), or null
inline const uint16_t* row_scales(const uint16_t* scales, int64_t scale_stride, int64_t r) {
    return scales == nullptr ? nullptr : scales + r * scale_stride;
}

// One row of ResidencyMap.update (see residency.py for the rules): the missing positions go to the free
// slots, empty ones first, then stale ones (held, no longer selected), each lowest first.
// Which slots stay and which positions are missing come from a byte map of the selected positions
// (of_length >= capacity + 1 bytes, one per position and a last one that padding and empty slots write to:
// in L1 or L2), not from slot_of: its row is capacity entries that the rest of a decode step evicts from the caches,
// and k random reads of it cost more than the whole update. slot_of is only written, for the positions
// placed and the ones they evict. The map is all zeros on entry and on return. Bytes rather than bits: a
// bit is set or cleared by a read-modify-write of its word, and the next position's bit, often in the same
// word, waited for it (a bitmap made the update a sixth of a producer's selection at 32k); a byte is
// stored alone, and each loop below stores unconditionally (0 or 1) and counts by the test's 0 or 1, so
// nothing branches on the data (which slots stay is a coin toss to a branch predictor).
struct UpdateWork {
    std::vector<int64_t> missing, empty, stale;  // the positions to fetch; empty slots; stale ones
};

// update_row's map, one byte per position of a slot_of row of of_length entries (>= capacity + 1)
void grow_map(std::vector<uint8_t>& wanted, int64_t of_length) {
    if (wanted.size() < static_cast<size_t>(of_length)) wanted.resize(static_cast<size_t>(of_length), 0);
}

int64_t update_row(const int64_t* selected, int64_t k, int64_t* slot_pos, int32_t* slot_of, uint8_t* active,
                   int64_t n, int64_t* positions, int64_t* slots, UpdateWork& work, uint8_t* wanted,
                   int64_t spare) {
    // spare: the map's last byte (of_length - 1), past every position; -1 (padding, an empty slot) goes there
    for (int64_t i = 0; i < k; ++i) {
        const int64_t p = selected[i];
        wanted[p >= 0 ? p : spare] = 1;
    }
    // a held position still selected stays, and is not missing; the others are free: empty slots, then
    // stale ones (held, not kept), each list lowest first
    work.empty.resize(static_cast<size_t>(n));
    work.stale.resize(static_cast<size_t>(n));
    int64_t empty = 0, stale = 0;
    for (int64_t s = 0; s < n; ++s) {
        const int64_t p = slot_pos[s], at = p >= 0 ? p : spare;
        const int64_t held = p >= 0, keep = held & wanted[at];
        active[s] = static_cast<uint8_t>(keep);
        wanted[at] = 0;  // held: not missing (it was 0 already if not selected)
        work.empty[static_cast<size_t>(empty)] = s;
        work.stale[static_cast<size_t>(stale)] = s;
        empty += 1 - held;
        stale += held - keep;
    }
    work.missing.resize(static_cast<size_t>(k));
    int64_t count = 0;
    for (int64_t i = 0; i < k; ++i) {  // in the order selected, as the numpy form; clears the map
        const int64_t p = selected[i], at = p >= 0 ? p : spare;
        const int64_t take = (p >= 0) & wanted[at];
        work.missing[static_cast<size_t>(count)] = p;
        wanted[at] = 0;
        count += take;
    }
    wanted[spare] = 0;
    const int64_t placed = std::min(count, empty + stale);
    for (int64_t i = 0; i < placed; ++i) {
        const int64_t s = i < empty ? work.empty[static_cast<size_t>(i)] : work.stale[static_cast<size_t>(i - empty)];
        const int64_t p = work.missing[static_cast<size_t>(i)];
        const int64_t evicted = slot_pos[s];
        if (evicted >= 0) slot_of[evicted] = -1;  // the stale token it overwrites
        slot_of[p] = static_cast<int32_t>(s);
        slot_pos[s] = p;
        active[s] = 1;
        positions[i] = p;
        slots[i] = s;
    }
    active[n] = 0;
    return placed < count ? -1 : placed;
}

// Rows [0, r) of a plan whose row i holds counts[i] copies at positions + i * k: each padded to the largest
// count (position 0, slot n), the width the wrappers return, and moved to positions + i * width, so that the
// plan is [r, width] contiguous (a gather takes a layer's rows as they are, no copy); the entries past it are
// left unwritten (a plan at interval 1 moves a tenth of the budget: padding every row to k wrote ten times
// the plan). Returns the width.
int64_t pad_rows(int64_t r, int64_t k, int64_t n, int64_t* positions, int64_t* slots, const int64_t* counts) {
    int64_t width = 0;
    for (int64_t i = 0; i < r; ++i) width = std::max(width, counts[i]);
    for (int64_t i = 0; i < r; ++i) {
        for (int64_t j = counts[i]; j < width; ++j) {
            positions[i * k + j] = 0;
            slots[i * k + j] = n;
        }
        if (i > 0 && width > 0 && width < k) {  // row i's new place ends at (i + 1) width <= i k + width: rows
            // moved in order never overwrite one not yet moved
            std::memmove(positions + i * width, positions + i * k, static_cast<size_t>(width) * sizeof(int64_t));
            std::memmove(slots + i * width, slots + i * k, static_cast<size_t>(width) * sizeof(int64_t));
        }
    }
    return width;
}

// ---- top-k: the keep largest entries of a row, exactly, in no order ----
// Floats are compared as order-preserving unsigned keys (NaN largest, as numpy ranks it); the keep-th
// largest key is found by setting its bits from the top, each bit one vectorised count over the keys that
// share the bits above it (kth_largest).
// Long rows with a small keep first keep only the entries at or above a threshold that a strided sample
// puts safely below the cut (ranking.py's rule), so the counts run over a few thousand keys.

inline uint32_t order_key(float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u;
    return v != v ? 0xFFFFFFFFu : bits ^ flip;
}

int64_t count_at_least(const uint32_t* keys, int64_t n, uint32_t bound) {
    uint32_t lanes[LANES] = {};
    int64_t t = 0;
    for (; t + LANES <= n; t += LANES)
        for (int64_t i = 0; i < LANES; ++i) lanes[i] += keys[t + i] >= bound;
    int64_t count = 0;
    for (; t < n; ++t) count += keys[t] >= bound;
    for (int64_t i = 0; i < LANES; ++i) count += lanes[i];
    return count;
}

// keys[t] of keys[0, n) with lo <= keys[t] <= hi, packed into out (n + LANES entries; out may be keys);
// returns how many, and adds to *above those past hi
int64_t keep_between(const uint32_t* keys, int64_t n, uint32_t lo, uint32_t hi, uint32_t* out, int64_t* above) {
    int64_t count = 0, over = 0, t = 0;
#if defined(__AVX512F__)
    const __m512i low = _mm512_set1_epi32(static_cast<int>(lo)), high = _mm512_set1_epi32(static_cast<int>(hi));
    for (; t + 16 <= n; t += 16) {
        const __m512i key = _mm512_loadu_si512(keys + t);
        const __mmask16 past = _mm512_cmpgt_epu32_mask(key, high);
        const __mmask16 in = _mm512_mask_cmpge_epu32_mask(static_cast<__mmask16>(~past), key, low);
        _mm512_storeu_si512(out + count, _mm512_maskz_compress_epi32(in, key));
        count += __builtin_popcount(static_cast<unsigned>(in));
        over += __builtin_popcount(static_cast<unsigned>(past));
    }
#endif
    for (; t < n; ++t) {
        const uint32_t key = keys[t];
        out[count] = key;
        count += (key >= lo) & (key <= hi);
        over += key > hi;
    }
    *above += over;
    return count;
}

// Keys of more than NARROW_MIN entries are narrowed every NARROW_BITS bits: once those bits of the answer
// are known, only the keys that share them can decide the rest (those above are counted out of the rank)
constexpr int64_t NARROW_MIN = 256;
constexpr int NARROW_BITS = 8;

// the rank-th largest of keys[0, n) (1 <= rank <= n): the largest bound that rank keys reach, its bits
// set from the top, each one vectorised count; every NARROW_BITS bits the keys still in question are
// copied to scratch (n + LANES entries), so most of the 32 counts run over a small part of them
uint32_t kth_largest(const uint32_t* keys, int64_t n, int64_t rank, uint32_t* scratch) {
    uint32_t bound = 0;
    for (int bit = 31; bit >= 0; --bit) {
        const uint32_t trial = bound | (1u << bit);
        if (count_at_least(keys, n, trial) >= rank) bound = trial;
        if (bit > 0 && bit % NARROW_BITS == 0 && n > NARROW_MIN) {
            int64_t above = 0;  // the answer is in [bound, bound + 2^bit - 1]; keys past that are above it
            n = keep_between(keys, n, bound, bound | ((1u << bit) - 1u), scratch, &above);
            rank -= above;
            keys = scratch;
        }
    }
    return bound;
}

// keys and positions of row[t] with order_key >= bound; both buffers need n + LANES entries
int64_t keep_at_least(const float* row, int64_t n, uint32_t bound, uint32_t* keys, int32_t* where) {
    int64_t count = 0, t = 0;
#if defined(__AVX512F__)
    // compress in registers, then a plain store (a compressing store to memory is slow on some CPUs)
    const __m512i step = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u)), all = _mm512_set1_epi32(-1);
    const __m512i threshold = _mm512_set1_epi32(static_cast<int>(bound));
    for (; t + 16 <= n; t += 16) {
        const __m512 v = _mm512_loadu_ps(row + t);
        const __m512i bits = _mm512_castps_si512(v);
        __m512i key = _mm512_xor_si512(bits, _mm512_or_si512(_mm512_srai_epi32(bits, 31), sign));
        key = _mm512_mask_mov_epi32(key, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), all);
        const __mmask16 pass = _mm512_cmpge_epu32_mask(key, threshold);
        _mm512_storeu_si512(keys + count, _mm512_maskz_compress_epi32(pass, key));
        _mm512_storeu_si512(where + count, _mm512_maskz_compress_epi32(
                                               pass, _mm512_add_epi32(step, _mm512_set1_epi32(static_cast<int>(t)))));
        count += __builtin_popcount(static_cast<unsigned>(pass));
    }
#endif
    for (; t < n; ++t) {  // branch-free: write always, advance when kept
        const uint32_t key = order_key(row[t]);
        keys[count] = key;
        where[count] = static_cast<int32_t>(t);
        count += key >= bound;
    }
    return count;
}

struct TopkWork {
    std::vector<uint32_t> keys, sample, scratch;
    std::vector<int32_t> where;
};

constexpr int64_t SAMPLE_MIN = 4096, SAMPLE_STRIDE = 8;  // ranking.py's PREFILTER_MIN_CANDIDATES, _STRIDE

// The top keep of row[0, n) up to the cut: work.keys and work.where hold the entries at or above a bound
// (all of the row, or those a sample puts safely above the cut), *count of them; returns the cut, the
// keep-th largest key. Everything above the cut is kept, then ties at it in row order until keep.
uint32_t topk_cut(const float* row, int64_t n, int64_t keep, TopkWork& work, int64_t* count_out) {
    work.keys.resize(static_cast<size_t>(n + LANES));
    work.where.resize(static_cast<size_t>(n + LANES));
    uint32_t* keys = work.keys.data();
    int32_t* where = work.where.data();
    int64_t count = -1;
    if (n >= SAMPLE_MIN && 4 * keep <= n) {
        const int64_t size = (n + SAMPLE_STRIDE - 1) / SAMPLE_STRIDE;
        work.sample.resize(static_cast<size_t>(size + LANES));
        work.scratch.resize(static_cast<size_t>(size + LANES));
        for (int64_t i = 0; i < size; ++i) work.sample[static_cast<size_t>(i)] = order_key(row[i * SAMPLE_STRIDE]);
        const double expected = static_cast<double>(keep) / SAMPLE_STRIDE;
        const int64_t rank = std::min<int64_t>(size, static_cast<int64_t>(std::ceil(expected + 4.0 * std::sqrt(expected))) + 8);
        count = keep_at_least(row, n, kth_largest(work.sample.data(), size, rank, work.scratch.data()), keys, where);
    }
    if (count < keep) count = keep_at_least(row, n, 0, keys, where);  // no sample, or it misjudged the row
    work.scratch.resize(std::max(work.scratch.size(), static_cast<size_t>(count + LANES)));
    *count_out = count;
    return kth_largest(keys, count, keep, work.scratch.data());
}

constexpr uint32_t NEG_INF_KEY = 0x007FFFFFu;  // order_key(-inf): only -inf has it, and nothing is below it

// The top keep of row[0, n) as positions: entry j is position lo + j; with minus_inf_none a -inf score is
// none (-1, never selected; only where the cut itself is -inf). Everything above the cut in row order, packed
// 16 at a time, then ties at it in row order until keep.
void topk_positions(const float* row, int64_t n, int64_t keep, int64_t lo, bool minus_inf_none, int64_t* out,
                    TopkWork& work) {
    int64_t count = 0;
    const uint32_t cut = topk_cut(row, n, keep, work, &count);
    const uint32_t* keys = work.keys.data();
    const int32_t* where = work.where.data();
    int64_t j = 0, i = 0;
#if defined(__AVX512F__)
    const __m512i bound = _mm512_set1_epi32(static_cast<int>(cut));
    const __m512i first = _mm512_set1_epi64(lo);
    for (; i + 16 <= count; i += 16) {  // keep - j >= the entries above the cut still to come: no overrun
        const __mmask16 above = _mm512_cmpgt_epu32_mask(_mm512_loadu_si512(keys + i), bound);
        const __m512i packed = _mm512_maskz_compress_epi32(above, _mm512_loadu_si512(where + i));
        const int taken = __builtin_popcount(static_cast<unsigned>(above));
        int64_t lanes[16];
        _mm512_storeu_si512(lanes, _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(packed)), first));
        _mm512_storeu_si512(lanes + 8, _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(packed, 1)), first));
        std::memcpy(out + j, lanes, static_cast<size_t>(taken) * sizeof(int64_t));
        j += taken;
    }
#endif
    for (; i < count; ++i)
        if (keys[i] > cut) out[j++] = where[i] + lo;
    const bool none = minus_inf_none && cut == NEG_INF_KEY;
    for (i = 0; i < count && j < keep; ++i)
        if (keys[i] == cut) out[j++] = none ? -1 : where[i] + lo;
}

// tbrun_topk_rows' row: the indices of topk_positions (every one, -inf too) and their values
void topk_row(const float* row, int64_t n, int64_t keep, int64_t* index, float* values, TopkWork& work) {
    topk_positions(row, n, keep, 0, false, index, work);
    for (int64_t j = 0; j < keep; ++j) values[j] = row[index[j]];
}

// How long a worker (or a caller waiting for its workers) spins before it sleeps: longer than the gaps
// between a decode step's calls, short enough that a process between steps leaves the core at once.
constexpr int64_t SPIN_MICROSECONDS = 200;

// Worker threads kept between calls: split_rows hands each call's blocks to them. Starting threads at
// every call cost more than it saved below ~1 ms of work (a start, a join and each new thread's first touch
// of its thread_local buffers: a producer's selection at 32k took 0.48 ms on 2 threads against 0.64 on one;
// with the kept workers ~0.40). A call's blocks are claimed one at a time, by the caller too, so a worker that
// comes late (asleep, or its core taken by another process) costs no more than the caller running every block
// itself. Between calls a worker spins for up to SPIN_MICROSECONDS, then sleeps on a condition variable; the
// caller likewise waits for the workers' last blocks. A decode step makes its calls
// tens of microseconds apart (every projection of every layer, split when a decode runs its kernels on the
// cores torch had: decode_threads in native/__init__.py), so a spinning worker takes each at once, where
// waking a sleeping one took about as long as the work (a layer's projections: 10-40 µs). Workers keep their
// thread_local buffers (a selecting worker's scores and logits: (g + 1) * 4 bytes per cached token) for the
// process's life. One call at a time uses them: a call made while another holds them (two Python threads in
// the kernels at once; the GIL is released), a split inside a block, or one whose workers cannot be started
// runs its rows on its own thread, which gives the same result. A child made by fork() has none of its
// parent's threads: it starts with no workers and makes its own (pthread_atfork).
class Workers {
  public:
    // run(i) for each i in [0, count) once, the blocks claimed one at a time by the caller and the workers
    // that come; returns when all are done (rethrowing the first block's exception), or false at once where
    // the workers cannot take the call. The caller claims blocks too, so a worker that is late (asleep, or
    // its core taken by another process) costs no more than running every block on the caller's thread.
    template <typename Run>
    static bool run(int64_t count, Run& run_block) {
        if (inside) return false;  // a block's own split: its thread is one of the workers, or holds them
        Workers& self = instance();
        std::unique_lock<std::mutex> turn(self.in_use, std::try_to_lock);
        if (!turn.owns_lock() || !self.grow(count - 1)) return false;
        {
            std::lock_guard<std::mutex> lock(self.state);
            self.block = [&run_block](int64_t i) { run_block(i); };
            self.count = count;
            self.next.store(0);
            self.failure = nullptr;
            self.generation.fetch_add(1);  // what a spinning worker watches (the writes above are seen first)
        }
        self.wake.notify_all();  // the workers asleep
        inside = true;
        std::exception_ptr failure = claim_blocks(self.next, count, run_block);
        inside = false;
        // the workers that took part have claimed their last block: wait for them to finish it. One that comes
        // later finds the call ended (no block) and waits for the next.
        spin_while([&self] { return self.active.load(std::memory_order_acquire) != 0; });
        std::unique_lock<std::mutex> lock(self.state);
        self.finished.wait(lock, [&self] { return self.active.load() == 0; });
        self.block = nullptr;
        if (!failure) failure = self.failure;
        if (failure) std::rethrow_exception(failure);
        return true;
    }

  private:
    // run the blocks claimed from `next` until none is left; the first exception, if any
    template <typename Run>
    static std::exception_ptr claim_blocks(std::atomic<int64_t>& next, int64_t count, Run& run_block) {
        std::exception_ptr failure;
        for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) {
            try {
                run_block(i);
            } catch (...) {
                if (!failure) failure = std::current_exception();
            }
        }
        return failure;
    }

    // up to SPIN_MICROSECONDS while busy() holds (the clock read every 64 pauses)
    template <typename Busy>
    static void spin_while(Busy busy) {
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(SPIN_MICROSECONDS);
        for (int64_t round = 1; busy(); ++round) {
#if defined(__x86_64__) || defined(__i386__)
            _mm_pause();
#elif defined(__aarch64__)
            __asm__ __volatile__("yield");
#endif
            if (round % 64 == 0 && std::chrono::steady_clock::now() >= until) return;
        }
    }

    static Workers& instance() {
        static std::once_flag registered;  // a child made by fork() has none of its parent's threads
        std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, [] { current.store(nullptr); }); });
        Workers* workers = current.load();
        if (workers == nullptr) {  // never deleted: detached workers wait on it at exit
            Workers* made = new Workers();
            if (current.compare_exchange_strong(workers, made))
                workers = made;
            else
                delete made;  // another thread made one first (workers now holds it)
        }
        return *workers;
    }

    bool grow(int64_t wanted) {  // under in_use; false where a thread cannot be started
        try {
            while (started < wanted) {
                std::thread(&Workers::serve, this, generation.load()).detach();  // calls from the next on
                ++started;
            }
        } catch (const std::system_error&) {
            return false;
        }
        return true;
    }

    void serve(uint64_t seen) {
        inside = true;
        for (;;) {
            std::function<void(int64_t)> run_block;
            int64_t blocks;
            spin_while([&] { return generation.load(std::memory_order_acquire) == seen; });
            {
                std::unique_lock<std::mutex> lock(state);
                wake.wait(lock, [&] { return generation.load() != seen; });
                seen = generation.load();
                if (!block) continue;  // that call has ended: its caller ran what was left
                run_block = block;
                blocks = count;
                active.fetch_add(1);  // the caller now waits for this worker before it returns
            }
            std::exception_ptr failed = claim_blocks(next, blocks, run_block);
            std::lock_guard<std::mutex> lock(state);
            if (failed && !failure) failure = failed;
            if (active.fetch_sub(1) == 1) finished.notify_one();
        }
    }

    static inline std::atomic<Workers*> current{nullptr};
    static inline thread_local bool inside = false;  // this thread is running a block
    std::mutex in_use, state;
    std::condition_variable wake, finished;
    std::function<void(int64_t)> block;  // the call's blocks, null between calls
    std::exception_ptr failure;
    int64_t started = 0, count = 0;
    std::atomic<int64_t> next{0};  // the call's next unclaimed block
    std::atomic<int64_t> active{0};  // workers taking part in the call
    std::atomic<uint64_t> generation{0};  // calls so far
};

// rows split into contiguous blocks, one per thread (claimed by the caller and the kept workers, Workers::run);
// each row alike, so the result does not depend on the count, nor on which thread ran a block
template <typename Work>
void split_rows(int64_t rows, int64_t threads, Work work) {
    threads = std::max<int64_t>(1, std::min(threads, rows));
    const int64_t per = (rows + threads - 1) / threads;
    const int64_t blocks = (rows + per - 1) / std::max<int64_t>(per, 1);
    if (blocks <= 1) {
        work(0, 0, rows);
        return;
    }
    auto run_block = [&](int64_t i) { work(i, i * per, std::min(rows, (i + 1) * per)); };
    if (!Workers::run(blocks, run_block))
        for (int64_t i = 0; i < blocks; ++i) run_block(i);  // the workers are busy with another call
}

template <typename Key>
void group_scores(int64_t reduce, const float* q, int64_t rows, int64_t g, int64_t d, const Key* keys,
                  int64_t row_stride, int64_t dim_stride, int64_t m, float* out, float* buffer, int64_t threads,
                  const uint16_t* scales = nullptr, int64_t scale_stride = 0) {
    split_rows(rows, threads, [=](int64_t worker, int64_t first, int64_t last) {
        thread_local RowWork work;  // grown once per thread, not allocated per call
        float* scratch = buffer + worker * g * m;
        for (int64_t r = first; r < last; ++r)
            reduce_row(reduce, q + r * g * d, g, d, keys + r * row_stride, dim_stride, 0, m, m, out + r * m, scratch,
                       work, row_scales(scales, scale_stride, r));
    });
}

// Weight bytes read ahead by software prefetch in matvec and matvec_blocks: at each row, the lines of the
// matrix WEIGHT_PREFETCH_BYTES further on (the rows being multiplied only). A decode step finds every weight
// out of the caches. On an Intel Xeon (2 cores under KVM, 12 GB/s of streaming reads) the hardware prefetchers
// did not keep ahead of q4_1 rows, whose widening takes ~7 cycles a 20-byte block: with this, a product over
// cold q4_1 weights took 0.4x the time (2.6 -> 6.6 GB/s, near its time on weights in L2) and over float32 ones
// 0.87x (a stand-alone micro-benchmark, bench/README.md "stop 57"); on the AMD EPYC of earlier stops
// prefetching ahead was measured no faster, and no slower, for float32.
constexpr int64_t WEIGHT_PREFETCH_BYTES = 2048;

// prefetch the `bytes` of a row WEIGHT_PREFETCH_BYTES on from `row`, short of `end`
inline void prefetch_weights_ahead(const void* row, int64_t bytes, const void* end) {
    const char* from = static_cast<const char*>(row) + WEIGHT_PREFETCH_BYTES;
    const char* to = std::min(from + bytes, static_cast<const char*>(end));
    for (const char* p = from; p < to; p += 64) __builtin_prefetch(p);
}

// y[r] = w[r, :] . x for r < rows (w row-major, rows cols apart): the rows streamed in order, two
// accumulators per row, so a cold weight matrix is read at the memory's pace (torch's matrix-vector
// product took 5-8x as long with the weights out of the caches, as a decode step leaves them)
void matvec(const float* w, int64_t rows, int64_t cols, const float* x, float* y) {
    const float* end = w + rows * cols;
    for (int64_t r = 0; r < rows; ++r) {
        const float* row = w + r * cols;
        prefetch_weights_ahead(row, cols * static_cast<int64_t>(sizeof(float)), end);
        vfloat a0{}, a1{};
        int64_t j = 0;
        for (; j + 2 * LANES <= cols; j += 2 * LANES) {
            a0 += load(row + j) * load(x + j);
            a1 += load(row + j + LANES) * load(x + j + LANES);
        }
        for (; j + LANES <= cols; j += LANES) a0 += load(row + j) * load(x + j);
        float sum = lane_sum(a0 + a1);
        for (; j < cols; ++j) sum += row[j] * x[j];
        y[r] = sum;
    }
}

// ---- a linear layer's weights as a GGUF file stores them ----
// Blocks of 32 weights along a row, in ggml's layouts: q4_1 (20 bytes: float16 d, float16 m, then 16 bytes whose
// byte i holds weight i's 4-bit code q in its low nibble and weight 16 + i's in its high one; weight = d q + m) and
// q8_0 (34 bytes: float16 d, 32 int8 codes; weight = d q). Each block is widened to the float32 weights the file's
// dequantisation gives (d q is exact in float32: an 11-bit significand times a 4- or 8-bit code; + m rounds once, as
// numpy's d * q + m does) right before its products, which are summed in matvec's order (a0 takes a block's first
// 16, a1 its last 16): the same sums, bit for bit, as matvec over the dequantised matrix, from 20 or 34 bytes a
// block instead of 128. Rows must be whole blocks (cols a multiple of 32, as GGUF stores them).
constexpr int64_t WEIGHTS_FLOAT32 = 0, WEIGHTS_Q4_1 = 1, WEIGHTS_Q8_0 = 2;
constexpr int64_t WEIGHT_BLOCK = 32;

inline int64_t row_bytes(int64_t format, int64_t cols) {
    if (format == WEIGHTS_Q4_1) return cols / WEIGHT_BLOCK * 20;
    if (format == WEIGHTS_Q8_0) return cols / WEIGHT_BLOCK * 34;
    return cols * static_cast<int64_t>(sizeof(float));
}

inline uint16_t half_bits(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, sizeof(h));
    return h;
}

// 16 unsigned 4-bit codes from 16 bytes: their low nibbles (low) and high nibbles (high), as floats (where the
// CPU has AVX-512 and F16C, widen_block looks the values up instead)
inline void nibbles(const uint8_t* p, vfloat& low, vfloat& high) {
#if defined(__AVX2__)
    for (int half = 0; half < 2; ++half) {
        const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * half)));
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(codes, _mm256_set1_epi32(0xF)));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(codes, 4));
        std::memcpy(reinterpret_cast<char*>(&low) + half * sizeof(lo), &lo, sizeof(lo));
        std::memcpy(reinterpret_cast<char*>(&high) + half * sizeof(hi), &hi, sizeof(hi));
    }
#else
    for (int i = 0; i < LANES; ++i) {
        low[i] = static_cast<float>(p[i] & 0xF);
        high[i] = static_cast<float>(p[i] >> 4);
    }
#endif
}

// a block's 32 weights as float32: the first 16 in low, the last 16 in high
template <int64_t Format>
inline void widen_block(const uint8_t* block, vfloat& low, vfloat& high) {
#if defined(__AVX512F__) && defined(__F16C__)
    if constexpr (Format == WEIGHTS_Q4_1) {  // the block's 16 values d q + m in a register, looked up by code
        int32_t dm_bits;  // d and m, both widened by one conversion
        std::memcpy(&dm_bits, block, sizeof(dm_bits));
        const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(dm_bits));
        const __m512 table = _mm512_fmadd_ps(_mm512_broadcastss_ps(dm),
                                             _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_broadcastss_ps(_mm_movehdup_ps(dm)));
        const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 4)));
        const __m512 lo = _mm512_permutexvar_ps(codes, table);  // (only an index's low 4 bits count)
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table);
        std::memcpy(&low, &lo, sizeof(low));
        std::memcpy(&high, &hi, sizeof(high));
        return;
    }
#endif
    const vfloat d = vfloat{} + half_scalar(half_bits(block));
    if constexpr (Format == WEIGHTS_Q4_1) {
        const vfloat m = vfloat{} + half_scalar(half_bits(block + 2));
        nibbles(block + 4, low, high);
        low = d * low + m;
        high = d * high + m;
    } else {
        low = d * load(reinterpret_cast<const int8_t*>(block + 2));
        high = d * load(reinterpret_cast<const int8_t*>(block + 2 + LANES));
    }
}

// matvec over a matrix of blocks (Format q4_1 or q8_0; w row-major, row_bytes(Format, cols) bytes a row)
template <int64_t Format>
void matvec_blocks(const uint8_t* w, int64_t rows, int64_t cols, const float* x, float* y) {
    const int64_t blocks = cols / WEIGHT_BLOCK, stride = row_bytes(Format, cols), size = stride / blocks;
    const uint8_t* end = w + rows * stride;
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* row = w + r * stride;
        prefetch_weights_ahead(row, stride, end);
        vfloat a0{}, a1{};
        for (int64_t b = 0; b < blocks; ++b) {
            vfloat low, high;
            widen_block<Format>(row + b * size, low, high);
            a0 += low * load(x + b * WEIGHT_BLOCK);
            a1 += high * load(x + b * WEIGHT_BLOCK + LANES);
        }
        y[r] = lane_sum(a0 + a1);
    }
}

// rows [first, first + rows) of a matrix in any format (w: its first row)
void matvec_any(int64_t format, const void* w, int64_t first, int64_t rows, int64_t cols, const float* x, float* y) {
    const uint8_t* start = static_cast<const uint8_t*>(w) + first * row_bytes(format, cols);
    if (format == WEIGHTS_Q4_1)
        matvec_blocks<WEIGHTS_Q4_1>(start, rows, cols, x, y + first);
    else if (format == WEIGHTS_Q8_0)
        matvec_blocks<WEIGHTS_Q8_0>(start, rows, cols, x, y + first);
    else
        matvec(reinterpret_cast<const float*>(start), rows, cols, x, y + first);
}

// ---- the page prefilter: Quest's page bound over the compact keys, then tokens of the best pages only ----
// Each row's complete pages of `page` tokens have per-dimension maxima and minima of their keys (as scored:
// int8 codes times their scales), stored dimension-major like the keys: bounds [2d, page capacity], the d
// maxima rows then the d minima rows (selection/pages.py keeps them). No token of page p has a logit above
// q+ . max_p + q- . min_p (q+, q- the query's positive and negative parts): the logits of a query [q+, q-]
// of 2d dims against the bounds as if each page were one token of 2d dims, by the same kernels as tokens.
// Pages rank under the row's rule (the mean over heads of each head's softmax over every complete page, or
// the largest head's bound); the top `kept` of the pages that hold candidates are gathered with the tokens
// that are always attended (sinks [0, lo) and window [hi, m), whose logits the mean rule's softmax counts)
// and the candidates of incomplete pages into a scratch row, which is scored as a row of its own (the same
// logits as in place, bfloat16 pairs and int8 quads included: a token's logit is the same whichever span
// scores it), and the top keep of its candidates are the selection. tests/test_page_prefilter.py: the
// torch form (selection/pages.py) selects the same.
// A chosen page's keys are read from its block, a copy of the page's keys in one place (blocks [pages, d,
// page], int8 codes quad-interleaved [pages, d / 4, page, 4] with their scales [pages, page]), kept with the
// bounds: in the cache's own layout a
// page of 16 tokens is 16 bytes in each of d rows of int8 codes, a cache line of each, and gathering a
// quarter of the pages from there read most of the row's lines in scattered order (slower than scoring
// every token, measured at 32k); a block is a few lines in a row.
struct PageArgs {
    const float* bounds;  // row r's at bounds + r * row_stride; dim j of page p at j * dim_stride + p
    int64_t row_stride, dim_stride, page, kept;  // kept: pages of candidates scored (0: no prefilter)
    const void* blocks;  // row r's page p at blocks + (r * block_row_stride + p * d * page) elements of Key
    int64_t block_row_stride;
    const uint16_t* block_scales;  // int8 keys: row r's page p at block_scales + r * block_scale_stride + p * page
    int64_t block_scale_stride;
    // int8 keys: the bounds again as int8 codes, 16 pages a block quad-interleaved as int8 keys' pages are (row
    // r's pages 16 b .. 16 b + 15 at bound_blocks + r * bound_block_stride + b * 32 d, their scales [16] at
    // bound_scales + r * bound_scale_stride + 16 b), scored by the same quad products; null: the float bounds
    const int8_t* bound_blocks;
    int64_t bound_block_stride;
    const uint16_t* bound_scales;
    int64_t bound_scale_stride;
};

// The predictor's query network on one token: out = W2 silu(W1 layer_norm(x)), float32 throughout.
// x [e]; norm_weight, norm_bias [e] (bias may be null); w1 [inner, e], w2 [out_size, inner] row-major;
// work [e + inner] scratch; out [out_size]. The layer norm as torch's: biased variance, eps inside the root.
void query_network(const float* x, int64_t e, const float* norm_weight, const float* norm_bias, float eps,
                   const float* w1, int64_t inner, const float* w2, int64_t out_size, float* work, float* out) {
    double sum = 0.0, squares = 0.0;
    for (int64_t i = 0; i < e; ++i) sum += x[i];
    const double mean = sum / static_cast<double>(e);
    for (int64_t i = 0; i < e; ++i) squares += (x[i] - mean) * (x[i] - mean);
    const float inverse = static_cast<float>(1.0 / std::sqrt(squares / static_cast<double>(e) + eps));
    float* normed = work;
    float* hidden = work + e;
    for (int64_t i = 0; i < e; ++i)
        normed[i] = static_cast<float>(x[i] - mean) * inverse * norm_weight[i] + (norm_bias ? norm_bias[i] : 0.0f);
    matvec(w1, inner, e, normed, hidden);
    for (int64_t i = 0; i < inner; ++i) hidden[i] = hidden[i] / (1.0f + std::exp(-hidden[i]));
    matvec(w2, out_size, inner, hidden, out);
}

// A producer's query network run by its selection call (select_rows with a network): from the producer's input
// x, the raw queries into raw [out_size] (the policy's latest queries) and raw x scale into queries [out_size],
// which the selection then reads as its q [rows, g, d] (out_size = rows g d). One call a producer step where
// the query network's and the selection's were two, with Python between them.
struct QueryNetwork {
    const float* norm_weight;
    const float* norm_bias;  // or null
    const float* w1;
    const float* w2;
    float* work;  // [e + inner]
    float* raw;
    float* queries;
    int64_t e, inner, out_size;
    float eps, scale;
};

const float* run_network(const QueryNetwork& net, const float* x) {
    query_network(x, net.e, net.norm_weight, net.norm_bias, net.eps, net.w1, net.inner, net.w2, net.out_size, net.work,
                  net.raw);
    for (int64_t i = 0; i < net.out_size; ++i) net.queries[i] = net.raw[i] * net.scale;
    return net.queries;
}

// A producer's fetch made by its selection call (select_rows with copies): each row's placed positions copied
// from the host store into their slots as soon as the row is placed, while its plan is in the caches, instead
// of a gather per layer afterwards (on the CPU, one call and no per-layer work in Python). Row r's keys come
// from sources[2 r], its values from sources[2 r + 1] (token rows src_row bytes apart, src_rows of them), into
// targets[2 r] and targets[2 r + 1] (slots dst_row bytes apart, dst_rows of them), row_bytes each.
// nanoseconds (or null): the time spent copying is added there, so that a profile can count it as copying.
struct RowCopies {
    const uint8_t* const* sources;
    uint8_t* const* targets;
    int64_t src_row, dst_row, row_bytes, src_rows, dst_rows;
    int64_t* nanoseconds;
};

// Host-store rows read ahead by software prefetch as a row's copies (or a layer's gather) are made: the rows are
// scattered, so each copy waits on memory unless its source was asked for earlier. On the Intel Xeon of stop 57, 0.88x the time
// for 90 rows of 290 scattered 256-byte rows from 32k (a stand-alone micro-benchmark; 4 to 32 ahead alike).
constexpr int64_t COPY_PREFETCH_ROWS = 8;

// rows positions[j] of `from` (src_row bytes apart) to rows slots[j] of `to` (dst_row bytes apart), row_bytes
// each, j < count, each source row asked for COPY_PREFETCH_ROWS copies before it is copied
inline void copy_scattered_rows(uint8_t* to, const uint8_t* from, const int64_t* positions, const int64_t* slots,
                                int64_t count, int64_t src_row, int64_t dst_row, int64_t row_bytes) {
    for (int64_t j = 0; j < count; ++j) {
        if (j + COPY_PREFETCH_ROWS < count) {
            const uint8_t* ahead = from + positions[j + COPY_PREFETCH_ROWS] * src_row;
            for (int64_t line = 0; line < row_bytes; line += 64) __builtin_prefetch(ahead + line);
        }
        std::memcpy(to + slots[j] * dst_row, from + positions[j] * src_row, static_cast<size_t>(row_bytes));
    }
}

// Row r's `count` copies (positions and slots as update_row wrote them); false (nothing copied) if an entry is
// outside its table. Returns the nanoseconds spent when timed.
inline bool copy_row(const RowCopies& copies, int64_t r, const int64_t* positions, const int64_t* slots,
                     int64_t count, int64_t& nanoseconds) {
    for (int64_t j = 0; j < count; ++j)
        if (positions[j] < 0 || positions[j] >= copies.src_rows || slots[j] < 0 || slots[j] >= copies.dst_rows)
            return false;
    const auto start = copies.nanoseconds != nullptr ? std::chrono::steady_clock::now()
                                                     : std::chrono::steady_clock::time_point{};
    for (int64_t half = 0; half < 2; ++half)
        copy_scattered_rows(copies.targets[2 * r + half], copies.sources[2 * r + half], positions, slots, count,
                            copies.src_row, copies.dst_row, copies.row_bytes);
    if (copies.nanoseconds != nullptr)
        nanoseconds += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
                           .count();
    return true;
}

struct PageWork {
    std::vector<float> query, page_scores, page_logits;
    std::vector<int64_t> pages, where, run_start, run_length;
    std::vector<uint8_t> keys;  // the scratch row's keys (float32 or bfloat16), dim j at j * stride
};

// bytes [src, src + n) to dst, in fixed-size pieces the compiler inlines as vector moves (a page's run of one
// dim is 16-64 bytes: a libc call each cost more than the copy)
inline void copy_run(void* to, const void* from, size_t n) {
    auto* dst = static_cast<uint8_t*>(to);
    const auto* src = static_cast<const uint8_t*>(from);
    for (; n >= 64; n -= 64, dst += 64, src += 64) std::memcpy(dst, src, 64);
    for (; n >= 16; n -= 16, dst += 16, src += 16) std::memcpy(dst, src, 16);
    for (; n > 0; --n) *dst++ = *src++;
}

// a scratch row's dim stride in elements: its rows a cache line past a multiple of 4 KiB apart, as the
// compact cache pads its own (rows 4 KiB apart share a cache set)
inline int64_t scratch_stride(int64_t n, int64_t size) {
    int64_t bytes = (n * size + 63) / 64 * 64;
    if (bytes % 4096 == 0) bytes += 64;
    return bytes / size;
}

// The tokens a row scores under the prefilter, in scratch order: first the candidates of the chosen pages
// (ascending; pages, their blocks' candidates [start, start + length) in run_start/run_length up to the
// pages' count), then runs of the cache's own keys: the candidates of incomplete pages and (mean rule) the
// sinks and the window. Returns the candidates' count.
inline int64_t prefilter_runs(bool mean, int64_t m, int64_t lo, int64_t hi, int64_t page, int64_t complete,
                              std::vector<int64_t>& pages, std::vector<int64_t>& start, std::vector<int64_t>& length) {
    start.clear();
    length.clear();
    std::sort(pages.begin(), pages.end());
    int64_t candidates = 0;
    for (const int64_t p : pages) {
        const int64_t a = std::max(p * page, lo), b = std::min(p * page + page, hi);
        start.push_back(a), length.push_back(std::max<int64_t>(b - a, 0));
        candidates += std::max<int64_t>(b - a, 0);
    }
    const int64_t tail = std::max(lo, complete * page);  // candidates of incomplete pages: no bound, always in
    start.push_back(tail), length.push_back(std::max<int64_t>(hi - tail, 0));
    candidates += std::max<int64_t>(hi - tail, 0);
    if (mean) {
        start.push_back(0), length.push_back(lo);
        start.push_back(hi), length.push_back(m - hi);
    }
    return candidates;
}

// blocks a gather prefetches ahead of the one it copies (each a few lines; one ahead left most copies waiting
// for memory)
constexpr size_t BLOCKS_AHEAD = 4;

// The scratch row of float32 or bfloat16 keys (int8 codes are scored in place, quad_page_scores): the chosen
// pages' candidates from their blocks, then the other runs from the cache's keys; positions into where, keys
// into scratch [d, stride].
template <typename Key>
void gather_scratch(int64_t d, int64_t page, const Key* keys, int64_t dim_stride, const Key* blocks,
                    const PageWork& pw, size_t paged, int64_t* where, Key* scratch, int64_t stride) {
    int64_t at = 0;
    for (size_t i = 0; i < paged; ++i) {
        const int64_t p = pw.pages[i], start = pw.run_start[i], n = pw.run_length[i], offset = start - p * page;
        const Key* block = blocks + p * d * page + offset;
        if (i + BLOCKS_AHEAD < paged) {  // a later block's lines, while this one is copied
            const char* next = reinterpret_cast<const char*>(blocks + pw.pages[i + BLOCKS_AHEAD] * d * page);
            for (size_t line = 0; line < static_cast<size_t>(d * page) * sizeof(Key); line += 64)
                __builtin_prefetch(next + line);
        }
        for (int64_t j = 0; j < d; ++j)
            copy_run(scratch + j * stride + at, block + j * page, static_cast<size_t>(n) * sizeof(Key));
        for (int64_t t = 0; t < n; ++t) where[at + t] = start + t;
        at += n;
    }
    for (size_t i = paged; i < pw.run_start.size(); ++i) {
        const int64_t start = pw.run_start[i], n = pw.run_length[i];
        for (int64_t j = 0; j < d; ++j)
            copy_run(scratch + j * stride + at, keys + j * dim_stride + start, static_cast<size_t>(n) * sizeof(Key));
        for (int64_t t = 0; t < n; ++t) where[at + t] = start + t;
        at += n;
    }
}

// int8 pages: a block holds its page's codes quad-interleaved, [d / 4][page][4] (dims 4c .. 4c + 3 of each
// token together), so that with pages of 16 each group of four dims is one 64-byte line that vpdpbusd takes as
// it is: no shuffle, no gather. The logits are those logits_span_quads gives the same tokens (the same integer
// dot products, then times the query's scale and the token's, in that order).
constexpr int64_t QUAD_PAGE = 16;
constexpr int64_t QUAD_PAGE_HEADS = 16;  // query heads per KV head the page kernel takes (PagePrefilter.QUAD_HEADS)

#if defined(__AVX512VNNI__)
// logits [g, 16] of one page's tokens from its block (codes [d / 4][16][4], scales [16] float16 bits); each
// head's top [g] raised to its page's largest logit (where the page's first `from` tokens are not candidates,
// over the others only: the candidates' row, whose softmax this maximum starts)
inline void page_logits_quads(const QueryForm& form, int64_t g, int64_t d, const int8_t* block,
                              const uint16_t* scales, float* out, __m512* top, __mmask16 counted) {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    __m512i acc[QUAD_PAGE_HEADS];
    for (int64_t h = 0; h < g; ++h) acc[h] = _mm512_setzero_si512();
    for (int64_t c = 0; c < d / 4; ++c) {
        const __m512i quad = _mm512_xor_si512(_mm512_loadu_si512(block + 64 * c), flip);
        for (int64_t h = 0; h < g; ++h) {
            int32_t word;
            std::memcpy(&word, form.codes + h * d + 4 * c, sizeof(word));
            acc[h] = _mm512_dpbusd_epi32(acc[h], quad, _mm512_set1_epi32(word));
        }
    }
    const __m512 token_scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales)));
    for (int64_t h = 0; h < g; ++h) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[h], _mm512_set1_epi32(128 * form.sums[h])));
        const __m512 logit = _mm512_mul_ps(_mm512_mul_ps(dot, _mm512_set1_ps(form.scales[h])), token_scale);
        _mm512_storeu_ps(out + 16 * h, logit);
        top[h] = _mm512_mask_max_ps(top[h], counted, logit, top[h]);  // a NaN logit is passed over
    }
}
#endif

// A row's scores from its heads' logits [g, n] (rows n apart): the largest head's logit over [lo, hi) (the max
// rule), or over all n the mean over heads of each head's softmax with maximum tops[h] (the mean rule; the
// logits are exponentiated in place)
void reduce_heads(int64_t reduce, int64_t g, float* logits, int64_t n, int64_t lo, int64_t hi, const float* tops,
                  float* scores) {
    if (reduce == REDUCE_MAX) {
        for (int64_t t = lo; t < hi; ++t) {
            float best = logits[t];
            for (int64_t h = 1; h < g; ++h) best = std::max(best, logits[h * n + t]);
            scores[t] = best;
        }
        return;
    }
    for (int64_t h = 0; h < g; ++h) {
        float* row = logits + h * n;
        const float factor = 1.0f / (exp_in_place(row, n, tops[h]) * static_cast<float>(g));
        if (h == 0)
            for (int64_t t = 0; t < n; ++t) scores[t] = row[t] * factor;
        else
            for (int64_t t = 0; t < n; ++t) scores[t] += row[t] * factor;
    }
}

// The scores of the scratch row's entries (the runs of prefilter_runs, `total` of them, the first `candidates`
// the candidates) of int8 keys with their quad blocks, with no gather: the chosen pages' logits from their
// blocks, the other runs' from the cache's keys, into logits [g, total]; then the row's rule over them into
// scores. Positions into where. False (nothing written) where the quad products do not run.
bool quad_page_scores(int64_t reduce, const float* q, int64_t g, int64_t d, const int8_t* keys, int64_t dim_stride,
                      const uint16_t* scales, const int8_t* blocks, const uint16_t* block_scales, int64_t page,
                      const PageWork& pw, size_t paged, int64_t total, int64_t candidates, int64_t* where,
                      float* scores, float* logits, RowWork& work) {
#if defined(__AVX512VNNI__)
    if (page != QUAD_PAGE || g > QUAD_PAGE_HEADS || d % 4 != 0) return false;
    const QueryForm form = prepare_query<int8_t>(q, g, d, work);
    if (form.codes == nullptr) return false;
    float page_out[QUAD_PAGE_HEADS * QUAD_PAGE];
    __m512 top[QUAD_PAGE_HEADS];
    for (int64_t h = 0; h < g; ++h) top[h] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t at = 0;
    for (size_t i = 0; i < paged; ++i) {
        const int64_t p = pw.pages[i], start = pw.run_start[i], n = pw.run_length[i], offset = start - p * page;
        const __mmask16 counted = static_cast<__mmask16>(((1u << n) - 1u) << offset);  // the page's candidates
        if (i + BLOCKS_AHEAD < paged) {
            const int64_t ahead = pw.pages[i + BLOCKS_AHEAD];
            for (int64_t line = 0; line < d * page; line += 64) __builtin_prefetch(blocks + ahead * d * page + line);
            __builtin_prefetch(block_scales + ahead * page);
        }
        page_logits_quads(form, g, d, blocks + p * d * page, block_scales + p * page, page_out, top, counted);
        if (n == QUAD_PAGE) {
            for (int64_t h = 0; h < g; ++h) std::memcpy(logits + h * total + at, page_out + h * page, sizeof(float) * 16);
        } else {
            for (int64_t h = 0; h < g; ++h)
                for (int64_t t = 0; t < n; ++t) logits[h * total + at + t] = page_out[h * page + offset + t];
        }
        for (int64_t t = 0; t < n; ++t) where[at + t] = start + t;
        at += n;
    }
    work.tile_tops.resize(static_cast<size_t>(g));
    for (int64_t h = 0; h < g; ++h) work.tile_tops[static_cast<size_t>(h)] = _mm512_reduce_max_ps(top[h]);
    for (size_t i = paged; i < pw.run_start.size(); ++i) {  // the same logits as a span of the row gives them
        const int64_t start = pw.run_start[i], n = pw.run_length[i];
        if (n > 0)
            logits_all(q, form, g, d, keys + start, dim_stride, 0, n, logits + at, total, scales + start,
                       work.tile_tops.data());
        for (int64_t t = 0; t < n; ++t) where[at + t] = start + t;
        at += n;
    }
    reduce_heads(reduce, g, logits, total, 0, candidates, work.tile_tops.data(), scores);
    return true;
#else
    (void)reduce, (void)q, (void)g, (void)d, (void)keys, (void)dim_stride, (void)scales, (void)blocks;
    (void)block_scales, (void)page, (void)pw, (void)paged, (void)total, (void)candidates, (void)where;
    (void)scores, (void)logits, (void)work;
    return false;
#endif
}

// prefiltered_row's scores of float32 and bfloat16 keys: the scratch row gathered from the blocks and the
// cache's keys, scored as any row (the softmax over all of it: candidates, sinks and window)
template <typename Key>
void gather_and_score(int64_t reduce, const float* q, int64_t g, int64_t d, const Key* keys, int64_t dim_stride,
                      const Key* blocks, int64_t page, PageWork& pw, int64_t total, int64_t candidates, float* scores,
                      float* logits, RowWork& work) {
    const int64_t stride = scratch_stride(total, sizeof(Key));
    pw.keys.resize(static_cast<size_t>(d * stride) * sizeof(Key));
    Key* scratch = reinterpret_cast<Key*>(pw.keys.data());
    gather_scratch(d, page, keys, dim_stride, blocks, pw, pw.pages.size(), pw.where.data(), scratch, stride);
    reduce_row(reduce, q, g, d, scratch, stride, 0, candidates, total, scores, logits, work, nullptr);
}

// The pages' scores from int8 bound blocks (bounds of 16 pages a block, as quad_page_scores reads keys):
// logits [g, complete] of the query [q+, q-] (q2 [g, 2d]) against each complete page's bound, then the row's
// rule into page_scores (the mean over heads of each head's softmax over the complete pages, or the largest
// head's logit over [first, last)). False (nothing written) where the quad products do not run.
bool quad_bound_scores(int64_t reduce, const float* q2, int64_t g, int64_t d2, const int8_t* blocks,
                       const uint16_t* scales, int64_t complete, int64_t first, int64_t last, float* page_scores,
                       float* page_logits, RowWork& work) {
#if defined(__AVX512VNNI__)
    if (g > QUAD_PAGE_HEADS || d2 % 4 != 0) return false;
    const QueryForm form = prepare_query<int8_t>(q2, g, d2, work);
    if (form.codes == nullptr) return false;
    float out[QUAD_PAGE_HEADS * QUAD_PAGE];
    __m512 top[QUAD_PAGE_HEADS];
    for (int64_t h = 0; h < g; ++h) top[h] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t b = 0; b * QUAD_PAGE < complete; ++b) {
        const int64_t n = std::min(QUAD_PAGE, complete - b * QUAD_PAGE);
        page_logits_quads(form, g, d2, blocks + b * d2 * QUAD_PAGE, scales + b * QUAD_PAGE, out, top,
                          static_cast<__mmask16>((1u << n) - 1u));
        for (int64_t h = 0; h < g; ++h)
            std::memcpy(page_logits + h * complete + b * QUAD_PAGE, out + h * QUAD_PAGE,
                        static_cast<size_t>(n) * sizeof(float));
    }
    float tops[QUAD_PAGE_HEADS];
    for (int64_t h = 0; h < g; ++h) tops[h] = _mm512_reduce_max_ps(top[h]);
    reduce_heads(reduce, g, page_logits, complete, first, last, tops, page_scores);
    return true;
#else
    (void)reduce, (void)q2, (void)g, (void)d2, (void)blocks, (void)scales, (void)complete, (void)first, (void)last;
    (void)page_scores, (void)page_logits, (void)work;
    return false;
#endif
}

// The top keep of a row's candidates under the prefilter, as positions into chosen (-1: none); false where
// it does not apply to the row (kept pages not fewer than the candidates' pages, or fewer candidates than
// keep), and then nothing is written. bounds, blocks and block_scales: the row's.
template <typename Key>
bool prefiltered_row(int64_t reduce, const float* q, int64_t g, int64_t d, const Key* keys, int64_t dim_stride,
                     int64_t m, int64_t lo, int64_t hi, int64_t keep, const uint16_t* scales, const float* bounds,
                     const Key* blocks, const uint16_t* block_scales, const int8_t* bound_blocks,
                     const uint16_t* bound_scales, const PageArgs& args, int64_t* chosen, float* scores,
                     float* logits, RowWork& work, TopkWork& topk, PageWork& pw) {
    const int64_t page = args.page, complete = m / page;
    const int64_t first = lo / page, last = std::min((hi + page - 1) / page, complete);  // pages holding candidates
    if (args.kept <= 0 || last - first <= args.kept) return false;
    const bool mean = reduce == REDUCE_MEAN;
    // the pages' bound logits: the query [q+, q-] of 2d dims per head
    pw.query.resize(static_cast<size_t>(g * 2 * d));
    for (int64_t h = 0; h < g; ++h)
        for (int64_t j = 0; j < d; ++j) {
            const float v = q[h * d + j];
            pw.query[static_cast<size_t>(h * 2 * d + j)] = v > 0.0f ? v : 0.0f;
            pw.query[static_cast<size_t>(h * 2 * d + d + j)] = v < 0.0f ? v : 0.0f;
        }
    pw.page_scores.resize(static_cast<size_t>(complete));
    pw.page_logits.resize(static_cast<size_t>(g * complete));
    if (bound_blocks != nullptr) {  // int8 bounds (int8 keys): by quad products, else no prefilter
        if (!quad_bound_scores(reduce, pw.query.data(), g, 2 * d, bound_blocks, bound_scales, complete, first, last,
                               pw.page_scores.data(), pw.page_logits.data(), work))
            return false;
    } else if (mean) {
        score_row<float>(pw.query.data(), g, 2 * d, bounds, args.dim_stride, complete, pw.page_scores.data(),
                         pw.page_logits.data(), work, nullptr);
    } else {
        max_row<float>(pw.query.data(), g, 2 * d, bounds, args.dim_stride, first, last, complete,
                       pw.page_scores.data(), pw.page_logits.data(), work, nullptr);
    }
    pw.pages.resize(static_cast<size_t>(args.kept));
    topk_positions(pw.page_scores.data() + first, last - first, args.kept, first, false, pw.pages.data(), topk);
    const int64_t candidates = prefilter_runs(mean, m, lo, hi, page, complete, pw.pages, pw.run_start, pw.run_length);
    if (candidates < keep) return false;
    int64_t total = 0;
    for (const int64_t n : pw.run_length) total += n;
    pw.where.resize(static_cast<size_t>(total));
    if constexpr (std::is_same_v<Key, int8_t>) {
        // int8 blocks are quad-interleaved and scored where they lie; without the quad products, no prefilter
        if (!quad_page_scores(reduce, q, g, d, keys, dim_stride, scales, blocks, block_scales, page, pw,
                              pw.pages.size(), total, candidates, pw.where.data(), scores, logits, work))
            return false;
    } else {
        gather_and_score(reduce, q, g, d, keys, dim_stride, blocks, page, pw, total, candidates, scores, logits, work);
    }
    topk_positions(scores, candidates, keep, 0, true, chosen, topk);
    for (int64_t i = 0; i < keep; ++i)
        if (chosen[i] >= 0) chosen[i] = pw.where[static_cast<size_t>(chosen[i])];
    return true;
}


// The top-k's hysteresis (SelectionConfig.keep_bonus; selection/ranking.py HeldTerms): the score of a
// position held in a slot becomes score * mul + add (one of them the identity), the same float32 operations
// as favour_held's in torch, so that both select alike.
struct HeldTerms {
    float mul, add;
    bool on() const { return mul != 1.0f || add != 0.0f; }
};

// scores (indexed by position) of the positions in [lo, hi) that slot_pos [n] holds, raised by held
inline void favour_held(float* scores, const int64_t* slot_pos, int64_t n, int64_t lo, int64_t hi,
                        const HeldTerms& held) {
    if (!held.on()) return;
    for (int64_t j = 0; j < n; ++j) {
        const int64_t p = slot_pos[j];
        if (p < lo || p >= hi) continue;
        float s = scores[p];
        if (held.mul != 1.0f) s = s * held.mul;
        if (held.add != 0.0f) s = s + held.add;
        scores[p] = s;
    }
}

// critical(...) (policies/critical.py, CriticalPolicy.reweight) over a base's scores, row by row: A, the base's
// scores over the candidates as a distribution (masses divided by their sum; logits by a softmax), each
// candidate's value-aware score (A + eps) * norm (its value norm ||v W_O||_1), and the selection of the two
// stages: the base's top floor(alpha * keep), then the top of the value-aware scores of the others. The keep
// bonus per stage: the base's held scores * first_mul + first_add, the value-aware ones * second_mul (1, 0, 1:
// none). The torch form's operations in float32, except that A's sum runs in lanes and a softmax's exponentials
// are exp_in_place's polynomial (ulp-level differences, which change a selection only at a near-tie at a cut;
// tests/test_native.py compares the two selections); a NaN score is passed over (torch's would spread).
struct Reweight {
    const void* norms;     // row r's value norms at norms + r * norm_stride (indexed by position), float32 or
    int64_t norm_stride;   // bfloat16 (norms_bf16)
    int64_t norms_bf16;
    int64_t logit_kind;    // the base's scores are logits (softmax), else masses
    double alpha;
    float eps, first_mul, first_add, second_mul;
};

// positions [taken], at most two ascending runs (topk_positions' positions above its cut, then those at it),
// merged into out [taken]
inline void merge_runs(const int64_t* runs, int64_t taken, int64_t* out) {
    int64_t split = 1;
    while (split < taken && runs[split] > runs[split - 1]) ++split;
    split = std::min(split, taken);
    std::merge(runs, runs + split, runs + split, runs + taken, out);
}

// chosen [keep] in the order topk_positions gives the combined scores of the torch form (first-stage tokens above
// every second-stage one): every position above the second stage's cut (value cut) in position order, then the
// rest as they came (the second stage's at its cut; positions into [lo, hi), -1: none). topk_positions gives
// each stage as positions above its cut in order, then those at its cut in order: the first stage (above every
// second-stage value) is at most two ascending runs, the second stage's part above its cut one; merged, not
// sorted. merged, rest: scratch lists.
void combined_order(int64_t* chosen, int64_t first, int64_t keep, const float* second, float cut,
                    std::vector<int64_t>& merged, std::vector<int64_t>& rest) {
    merged.resize(static_cast<size_t>(2 * keep));
    rest.resize(static_cast<size_t>(keep));
    int64_t* runs = merged.data();  // the first stage's positions, then (from keep on) the merged result
    int64_t taken = 0, left = 0;
    for (int64_t i = 0; i < first; ++i) {
        if (chosen[i] >= 0) runs[taken++] = chosen[i];
        else rest[static_cast<size_t>(left++)] = chosen[i];
    }
    int64_t above = first;  // the second stage's positions above its cut: a prefix of its part
    while (above < keep && chosen[above] >= 0 && second[chosen[above]] > cut) ++above;
    for (int64_t i = above; i < keep; ++i) rest[static_cast<size_t>(left++)] = chosen[i];
    int64_t* staged = runs + keep;
    merge_runs(runs, taken, staged);
    int64_t* out = std::merge(staged, staged + taken, chosen + first, chosen + above, runs);
    const int64_t count = out - runs;
    std::memcpy(chosen, runs, static_cast<size_t>(count) * sizeof(int64_t));
    std::memcpy(chosen + count, rest.data(), static_cast<size_t>(left) * sizeof(int64_t));
}

// reweighted_row where the first stage is the whole selection (alpha * keep >= keep): the base's top keep (held
// scores raised), in the order topk_positions gives the torch form's combined scores (top + 1) + A, which float32
// rounding may tie where the base's scores do not: positions above the least of them in order, then those at it
// in order, then none (-1). second holds A's numerators over [lo, hi); total their sum.
void first_stage_only(const Reweight& rw, int64_t r, float* scores, float* second, float total,
                      const int64_t* slot_pos, int64_t n, int64_t lo, int64_t hi, int64_t keep, int64_t* chosen,
                      TopkWork& topk, std::vector<int64_t>& merged, std::vector<int64_t>& rest) {
    const float minus_inf = -std::numeric_limits<float>::infinity();
    const auto norm = [&](int64_t t) {
        return rw.norms_bf16 ? scalar(static_cast<const uint16_t*>(rw.norms)[r * rw.norm_stride + t])
                             : static_cast<const float*>(rw.norms)[r * rw.norm_stride + t];
    };
    float top = minus_inf;  // the largest value-aware score, held ones raised (every candidate's: torch's amax)
    for (int64_t t = lo; t < hi; ++t) {
        second[t] = second[t] / total;  // A
        top = std::max(top, (second[t] + rw.eps) * norm(t));
    }
    favour_held(scores, slot_pos, n, lo, hi, HeldTerms{rw.first_mul, rw.first_add});
    for (int64_t j = 0; j < n && rw.second_mul != 1.0f; ++j) {
        const int64_t p = slot_pos[j];
        if (p >= lo && p < hi) top = std::max(top, ((second[p] + rw.eps) * norm(p)) * rw.second_mul);
    }
    topk_positions(scores + lo, hi - lo, keep, lo, true, chosen, topk);
    merged.resize(static_cast<size_t>(2 * keep));
    rest.resize(static_cast<size_t>(keep));
    int64_t* runs = merged.data();
    int64_t taken = 0, none = 0;
    for (int64_t i = 0; i < keep; ++i) {
        if (chosen[i] >= 0) runs[taken++] = chosen[i];
        else ++none;
    }
    int64_t* sorted = runs + keep;
    merge_runs(runs, taken, sorted);
    const float raised = top + 1.0f;
    float cut = minus_inf;  // the least combined score taken (none taken: the cut is -inf, every position above)
    if (none == 0) {
        cut = std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < taken; ++i) cut = std::min(cut, raised + second[sorted[i]]);
    }
    int64_t j = 0, at_cut = 0;
    for (int64_t i = 0; i < taken; ++i) {
        const int64_t p = sorted[i];
        if (raised + second[p] > cut) chosen[j++] = p;
        else rest[static_cast<size_t>(at_cut++)] = p;
    }
    for (int64_t i = 0; i < at_cut; ++i) chosen[j++] = rest[static_cast<size_t>(i)];
    while (j < keep) chosen[j++] = -1;
}

// Row r's critical selection of keep positions into chosen from the base's scores (indexed by position, over
// [lo, hi); raised in place where held), second a scratch row of m floats
void reweighted_row(const Reweight& rw, int64_t r, float* scores, float* second, const int64_t* slot_pos, int64_t n,
                    int64_t lo, int64_t hi, int64_t keep, int64_t* chosen, TopkWork& topk, std::vector<int64_t>& merged,
                    std::vector<int64_t>& rest) {
    const float minus_inf = -std::numeric_limits<float>::infinity();
    float total = 0.0f;
    if (rw.logit_kind) {  // A = softmax: exp(s - the largest finite s), -inf -> 0 (exp_in_place's polynomial)
        float peak = minus_inf;
        for (int64_t t = lo; t < hi; ++t)
            if (scores[t] != minus_inf) peak = std::max(peak, scores[t]);
        if (peak == minus_inf) peak = 0.0f;
        std::memcpy(second + lo, scores + lo, static_cast<size_t>(hi - lo) * sizeof(float));
        total = exp_in_place(second + lo, hi - lo, peak);
    } else {  // A = the non-negative part over its sum (-inf -> 0), summed in lanes
        vfloat lanes{};
        int64_t t = lo;
        for (; t + LANES <= hi; t += LANES) {
            vfloat mass;
            for (int64_t i = 0; i < LANES; ++i) mass[i] = std::max(scores[t + i], 0.0f);
            store(second + t, mass);
            lanes += mass;
        }
        for (; t < hi; ++t) {
            second[t] = std::max(scores[t], 0.0f);
            total += second[t];
        }
        total += lane_sum(lanes);
    }
    total = std::max(total, std::numeric_limits<float>::min());
    const int64_t first = std::min(static_cast<int64_t>(rw.alpha * static_cast<double>(keep)), keep);
    if (first == keep) {
        first_stage_only(rw, r, scores, second, total, slot_pos, n, lo, hi, keep, chosen, topk, merged, rest);
        return;
    }
    const float eps = rw.eps;
    if (rw.norms_bf16) {
        const uint16_t* norms = static_cast<const uint16_t*>(rw.norms) + r * rw.norm_stride;
        for (int64_t t = lo; t < hi; ++t) second[t] = (second[t] / total + eps) * scalar(norms[t]);
    } else {
        const float* norms = static_cast<const float*>(rw.norms) + r * rw.norm_stride;
        for (int64_t t = lo; t < hi; ++t) second[t] = (second[t] / total + eps) * norms[t];
    }
    for (int64_t t = lo; t < hi; ++t) second[t] = scores[t] == minus_inf ? minus_inf : second[t];
    favour_held(scores, slot_pos, n, lo, hi, HeldTerms{rw.first_mul, rw.first_add});
    favour_held(second, slot_pos, n, lo, hi, HeldTerms{rw.second_mul, 0.0f});
    if (first > 0) {
        topk_positions(scores + lo, hi - lo, first, lo, true, chosen, topk);
        for (int64_t i = 0; i < first; ++i)
            if (chosen[i] >= 0) second[chosen[i]] = minus_inf;
    }
    topk_positions(second + lo, hi - lo, keep - first, lo, true, chosen + first, topk);
    float cut = std::numeric_limits<float>::infinity();  // the second stage's cut: its least value taken
    for (int64_t i = first; i < keep; ++i) cut = chosen[i] >= 0 ? std::min(cut, second[chosen[i]]) : minus_inf;
    if (first > 0 || cut == minus_inf) combined_order(chosen, first, keep, second, cut, merged, rest);
}

// A producer's whole selection, row by row (a row: one (layer, KV head)): its scores (reduce_row: the mean
// rule over the m cached tokens, the max rule over the candidates), the top keep of the candidates [lo, hi)
// (topk_positions, on the row while it is in L2), and the residency update with them (update_row). What
// group_scores, topk_rows and residency_update do in three calls, with no [rows, m] scores written out
// and read back. With pages.kept > 0 and bounds given, a row whose candidates span more than that many
// pages scores the tokens of its best pages only (prefiltered_row).
// Threads for a producer of SELECT_THREADED_ENTRIES candidates in all or more (6 rows of 32k tokens: 0.64 ->
// ~0.4 ms a call on 2 threads). With workers that slept between calls a producer at 7.5k (45k candidates)
// gained nothing and the threshold was 65,536; with them spinning (Workers) tokenbutler's step at 7.5k on
// 2 kernel threads went from 0.83x to 0.72x of its one-thread time at 16,384 (the embedded model, an AMD
// EPYC, torch on one thread, 6 alternating rounds of a scratch script; the default's effect:
// bench/reports/decode_threads.md).
constexpr int64_t SELECT_THREADED_ENTRIES = 16384;

template <typename Key>
int select_rows(int64_t reduce, const float* q, int64_t rows, int64_t g, int64_t d, const Key* keys, int64_t row_stride,
                int64_t dim_stride, int64_t m, int64_t lo, int64_t hi, int64_t keep, int64_t* slot_pos,
                int64_t pos_stride, int32_t* slot_of, int64_t of_stride, int64_t of_length, uint8_t* active,
                int64_t active_stride, int64_t n, int64_t* positions, int64_t* slots, int64_t* counts, int64_t threads,
                const uint16_t* scales, int64_t scale_stride, PageArgs pages, const RowCopies* copies,
                const QueryNetwork* network, const float* x, HeldTerms held, const Reweight* reweight) {
    if (reduce != REDUCE_MEAN && reduce != REDUCE_MAX) return -2;
    if (held.on() && pages.bounds != nullptr) return -2;  // the prefilter ranks pages before any bonus (refused)
    if (reweight != nullptr && (pages.bounds != nullptr || held.on())) return -2;  // the reweight holds its own
    if (network != nullptr) q = run_network(*network, x);  // once, before the rows split among threads
    if (rows * (hi - lo) < SELECT_THREADED_ENTRIES) threads = 1;
    std::atomic<int> status{0};
    std::atomic<int64_t> copying{0};  // the longest any thread copied: the threads copy side by side
    static std::atomic<int64_t> calls{0};
    const int64_t call = calls.fetch_add(1) + 1;  // tells a thread's blocks of this call from earlier calls'
    split_rows(rows, threads, [=, &status, &copying](int64_t, int64_t first, int64_t last) {
        // per thread (grown once on each; the kept workers keep theirs between calls): the
        // row's scores, score_row's [g, m] logits, the selected positions
        thread_local RowWork work;
        thread_local TopkWork topk;
        thread_local std::vector<float> scores, logits, second;  // second: the value-aware scores (reweight)
        thread_local std::vector<int64_t> merged, rest;  // the reweight's order (combined_order)
        thread_local std::vector<int64_t> chosen;
        thread_local UpdateWork update;
        thread_local PageWork paged;
        thread_local std::vector<uint8_t> wanted;  // zeros between calls (update_row)
        scores.resize(static_cast<size_t>(m));
        if (reweight != nullptr) second.resize(static_cast<size_t>(m));
        logits.resize(static_cast<size_t>(g * m));
        chosen.resize(static_cast<size_t>(keep));
        grow_map(wanted, of_length);
        int64_t spent = 0;  // nanoseconds this block copied
        for (int64_t r = first; r < last; ++r) {
            const float* qr = q + r * g * d;
            const uint16_t* sr = row_scales(scales, scale_stride, r);
            const bool paged_row = pages.bounds != nullptr &&
                prefiltered_row(reduce, qr, g, d, keys + r * row_stride, dim_stride, m, lo, hi, keep, sr,
                                pages.bounds + r * pages.row_stride,
                                static_cast<const Key*>(pages.blocks) + r * pages.block_row_stride,
                                pages.block_scales == nullptr ? nullptr
                                                              : pages.block_scales + r * pages.block_scale_stride,
                                pages.bound_blocks == nullptr ? nullptr
                                                              : pages.bound_blocks + r * pages.bound_block_stride,
                                pages.bound_scales == nullptr ? nullptr
                                                              : pages.bound_scales + r * pages.bound_scale_stride,
                                pages, chosen.data(), scores.data(), logits.data(), work, topk, paged);
            if (!paged_row) {
                reduce_row(reduce, qr, g, d, keys + r * row_stride, dim_stride, lo, hi, m, scores.data(),
                           logits.data(), work, sr);
                if (reweight != nullptr) {
                    reweighted_row(*reweight, r, scores.data(), second.data(), slot_pos + r * pos_stride, n, lo, hi,
                                   keep, chosen.data(), topk, merged, rest);
                } else {
                    if (held.on()) favour_held(scores.data(), slot_pos + r * pos_stride, n, lo, hi, held);
                    topk_positions(scores.data() + lo, hi - lo, keep, lo, true, chosen.data(), topk);
                }
            }
            const int64_t placed = update_row(chosen.data(), keep, slot_pos + r * pos_stride, slot_of + r * of_stride,
                                              active + r * active_stride, n, positions + r * keep, slots + r * keep,
                                              update, wanted.data(), of_length - 1);
            counts[r] = std::max<int64_t>(placed, 0);
            if (placed < 0) status = -1;
            if (copies != nullptr && placed > 0 &&
                !copy_row(*copies, r, positions + r * keep, slots + r * keep, placed, spent))
                status = -3;
        }
        // a thread may run several blocks of a call (Workers: claimed one at a time): its own sum counts
        thread_local int64_t counted_call = 0, thread_spent = 0;
        if (counted_call != call) counted_call = call, thread_spent = 0;
        thread_spent += spent;
        for (int64_t seen = copying.load(); thread_spent > seen && !copying.compare_exchange_weak(seen, thread_spent);) {
        }
    });
    if (copies != nullptr && copies->nanoseconds != nullptr) *copies->nanoseconds += copying.load();
    pad_rows(rows, keep, n, positions, slots, counts);
    return status.load();
}

// acc[j] = sum_i key[i] * weights[i * dp + j]: the weight rows in order, each scaled by one entry of the key
inline void project_head(const float* key, int64_t d, const float* weights, int64_t dp, float* acc) {
    for (int64_t j = 0; j < dp; ++j) acc[j] = 0.0f;
    for (int64_t i = 0; i < d; ++i) {
        const float ki = key[i];
        const float* row = weights + i * dp;
        for (int64_t j = 0; j < dp; ++j) acc[j] += ki * row[j];
    }
}

// float32 -> float16 bits, rounded to nearest even as torch's conversion (overflow to infinity, subnormals
// kept): by the CPU's conversion where it has one (F16C), else in integer arithmetic
inline uint16_t to_half(float x) {
#if defined(__F16C__)
    return static_cast<uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    const uint32_t sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7FFFFFFFu;
    if (magnitude >= 0x7F800000u) return static_cast<uint16_t>(sign | 0x7C00u | (magnitude > 0x7F800000u ? 0x200u : 0u));
    if (magnitude >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // 65520 and above round to infinity
    if (magnitude < 0x38800000u) {  // below 2^-14: a subnormal (or zero) in units of 2^-24, scaled exactly
        float value;
        std::memcpy(&value, &magnitude, sizeof(value));
        return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(value * 0x1p24f)));
    }
    const uint32_t rounded = magnitude + 0xFFFu + ((magnitude >> 13) & 1u);  // 13 bits dropped, ties to even
    return static_cast<uint16_t>(sign | ((rounded - (112u << 23)) >> 13));      // exponent bias 127 -> 15
#endif
}

// Limits of tbrun_decode_attention: query heads per KV head, and head dimension (a multiple of LANES).
constexpr int64_t ATTENTION_MAX_GROUP = 16, ATTENTION_MAX_DIM = 256;
// Rows read ahead by software prefetch: without it the logits' pass over one stream of 256-byte key rows
// took 1.3x as long (2.6 against 2.0 ms for SmolLM2's three KV heads at 32k tokens, on the Xeon these
// reports ran on; a plain read of the same keys took 1.6-1.7 ms).
constexpr int64_t ATTENTION_PREFETCH_ROWS = 16;

#if defined(__AVX512F__)
// The lane sums of 16 vectors, in their order, as one vector: a tree of 15 additions over shuffled halves
// (a token's dot product then costs 2 shuffles, not the 4 of a reduction of its own)
inline __m512 lane_sums16(const __m512* x) {
    __m512 pairs[8], quads[4], octets[2];
    for (int i = 0; i < 8; ++i)  // 128-bit lanes: x[2i]'s 0+2, 1+3, then x[2i+1]'s
        pairs[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x44),
                                 _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)  // 128-bit lane m: four partial sums of vector 4i + m
        quads[i] = _mm512_add_ps(_mm512_shuffle_f32x4(pairs[2 * i], pairs[2 * i + 1], 0x88),
                                 _mm512_shuffle_f32x4(pairs[2 * i], pairs[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; ++i)  // lane m: two partial sums each of vectors 8i + m and 8i + 4 + m
        octets[i] = _mm512_add_ps(_mm512_shuffle_ps(quads[2 * i], quads[2 * i + 1], 0x44),
                                  _mm512_shuffle_ps(quads[2 * i], quads[2 * i + 1], 0xEE));
    const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(octets[0], octets[1], 0x88),
                                      _mm512_shuffle_ps(octets[0], octets[1], 0xDD));  // entry 4m + r: vector 4r + m
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), sums);
}
#endif

// Logits of G query heads qv [G][CHUNKS] (vectors of the head dimension) for tokens [0, n) of one KV head's
// keys (rows k_stride floats apart) into scores [G, n], scaled; a token with valid[t] == 0 gets -inf. top[j]:
// head j's largest logit (NaN passed over here, kept in the row). Full blocks of LANES tokens read every key
// and mask after; the tail reads only valid keys.
template <int G, int CHUNKS>
void attention_logits(const vfloat (&qv)[G][CHUNKS], const float* k, int64_t k_stride, int64_t n,
                      const uint8_t* valid, float scaling, float* scores, float* top) {
    const float negative_infinity = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < G; ++j) top[j] = negative_infinity;
    int64_t t = 0;
#if defined(__AVX512F__)
    for (; t + LANES <= n; t += LANES) {
        __m512 products[G][LANES];
        for (int i = 0; i < LANES; ++i) {
            const float* row = k + (t + i) * k_stride;
            for (int c = 0; c < CHUNKS; ++c) __builtin_prefetch(row + ATTENTION_PREFETCH_ROWS * k_stride + c * LANES);
            vfloat key[CHUNKS];
            for (int c = 0; c < CHUNKS; ++c) key[c] = load(row + c * LANES);
            for (int j = 0; j < G; ++j) {
                vfloat sum = qv[j][0] * key[0];
                for (int c = 1; c < CHUNKS; ++c) sum += qv[j][c] * key[c];
                std::memcpy(&products[j][i], &sum, sizeof(sum));
            }
        }
        const __mmask16 keep = valid == nullptr ? __mmask16(0xFFFF)
            : _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(valid + t)), _mm_set1_epi8(-1));
        for (int j = 0; j < G; ++j) {
            const __m512 logits = _mm512_mask_blend_ps(keep, _mm512_set1_ps(negative_infinity),
                                                       _mm512_mul_ps(lane_sums16(products[j]), _mm512_set1_ps(scaling)));
            _mm512_storeu_ps(scores + j * n + t, logits);
            top[j] = std::max(top[j], _mm512_reduce_max_ps(logits));
        }
    }
#endif
    for (; t < n; ++t) {
        const bool skip = valid != nullptr && !valid[t];
        const float* row = k + t * k_stride;
        for (int j = 0; j < G; ++j) {
            float logit = negative_infinity;
            if (!skip) {
                vfloat sum = qv[j][0] * load(row);
                for (int c = 1; c < CHUNKS; ++c) sum += qv[j][c] * load(row + c * LANES);
                logit = lane_sum(sum) * scaling;
            }
            scores[j * n + t] = logit;
            top[j] = std::max(top[j], logit);
        }
    }
}

// out [G, CHUNKS * LANES] = weights [G, n] times the values of tokens [0, n) (rows v_stride floats apart),
// each row scaled by inverse[j]; the accumulators stay in registers; a token with valid[t] == 0 is not read.
template <int G, int CHUNKS>
void attention_values(const float* weights, int64_t n, const float* v, int64_t v_stride, const uint8_t* valid,
                      const float* inverse, float* out) {
    vfloat acc[G][CHUNKS];
    for (int j = 0; j < G; ++j)
        for (int c = 0; c < CHUNKS; ++c) acc[j][c] = vfloat{};
    for (int64_t t = 0; t < n; ++t) {
        if (valid != nullptr && !valid[t]) continue;
        const float* row = v + t * v_stride;
        for (int c = 0; c < CHUNKS; ++c) __builtin_prefetch(row + ATTENTION_PREFETCH_ROWS * v_stride + c * LANES);
        for (int c = 0; c < CHUNKS; ++c) {
            const vfloat value = load(row + c * LANES);
            for (int j = 0; j < G; ++j) acc[j][c] += weights[j * n + t] * value;
        }
    }
    for (int j = 0; j < G; ++j)
        for (int c = 0; c < CHUNKS; ++c) store(out + (j * CHUNKS + c) * LANES, acc[j][c] * inverse[j]);
}

// One KV head's share of a decode step's attention, for G query heads and head dimension CHUNKS * LANES:
// q [G, d] (contiguous), keys and values rows k_stride / v_stride floats apart, scores [G, n] scratch,
// out [G, d] = softmax(q k^T * scaling) v. Softmax as torch's: a NaN logit makes its head's output NaN,
// and so does a head with no valid token.
template <int G, int CHUNKS>
void attend_kv_head(const float* q, const float* k, int64_t k_stride, const float* v, int64_t v_stride, int64_t n,
                    const uint8_t* valid, float scaling, float* scores, float* out) {
    vfloat qv[G][CHUNKS];
    for (int j = 0; j < G; ++j)
        for (int c = 0; c < CHUNKS; ++c) qv[j][c] = load(q + (j * CHUNKS + c) * LANES);
    float top[G], inverse[G];
    attention_logits<G, CHUNKS>(qv, k, k_stride, n, valid, scaling, scores, top);
    for (int j = 0; j < G; ++j) inverse[j] = 1.0f / exp_in_place(scores + j * n, n, top[j]);
    attention_values<G, CHUNKS>(scores, n, v, v_stride, valid, inverse, out);
}

using AttendKVHead = void (*)(const float*, const float*, int64_t, const float*, int64_t, int64_t, const uint8_t*,
                              float, float*, float*);

template <int CHUNKS>
AttendKVHead attend_kv_head_for_group(int64_t g) {
    switch (g) {
        case 1: return attend_kv_head<1, CHUNKS>;
        case 2: return attend_kv_head<2, CHUNKS>;
        case 3: return attend_kv_head<3, CHUNKS>;
        case 4: return attend_kv_head<4, CHUNKS>;
        case 5: return attend_kv_head<5, CHUNKS>;
        case 6: return attend_kv_head<6, CHUNKS>;
        case 7: return attend_kv_head<7, CHUNKS>;
        case 8: return attend_kv_head<8, CHUNKS>;
        default: return nullptr;
    }
}

// attend_kv_head for g query heads per KV head and head dimension d; null where it is not compiled for
// them (the generic decode_kv_head runs).
AttendKVHead attend_kv_head_for(int64_t g, int64_t d) {
    switch (d) {
        case 4 * LANES: return attend_kv_head_for_group<4>(g);
        case 8 * LANES: return attend_kv_head_for_group<8>(g);
        default: return nullptr;
    }
}

// attend_kv_head for any g <= ATTENTION_MAX_GROUP and d (a multiple of LANES, <= ATTENTION_MAX_DIM), with
// the accumulators in memory: the shapes attend_kv_head_for has no instance for.
void decode_kv_head(const float* q, int64_t g, int64_t d, const float* k, int64_t k_stride, const float* v,
                    int64_t v_stride, int64_t n, const uint8_t* valid, float scaling, float* scores, float* out) {
    const float negative_infinity = -std::numeric_limits<float>::infinity();
    const int64_t chunks = d / LANES;
    float top[ATTENTION_MAX_GROUP];
    for (int64_t j = 0; j < g; ++j) top[j] = negative_infinity;
    for (int64_t t = 0; t < n; ++t) {
        const bool skip = valid != nullptr && !valid[t];
        const float* row = k + t * k_stride;
        for (int64_t j = 0; j < g; ++j) {
            float logit = negative_infinity;
            if (!skip) {
                const float* query = q + j * d;
                vfloat acc = load(query) * load(row);
                for (int64_t c = 1; c < chunks; ++c) acc += load(query + c * LANES) * load(row + c * LANES);
                logit = lane_sum(acc) * scaling;
            }
            scores[j * n + t] = logit;
            top[j] = std::max(top[j], logit);
        }
    }
    float inverse[ATTENTION_MAX_GROUP];
    for (int64_t j = 0; j < g; ++j) inverse[j] = 1.0f / exp_in_place(scores + j * n, n, top[j]);
    vfloat acc[ATTENTION_MAX_GROUP][ATTENTION_MAX_DIM / LANES];
    for (int64_t j = 0; j < g; ++j)
        for (int64_t c = 0; c < chunks; ++c) acc[j][c] = vfloat{};
    for (int64_t t = 0; t < n; ++t) {
        if (valid != nullptr && !valid[t]) continue;
        const float* row = v + t * v_stride;
        for (int64_t c = 0; c < chunks; ++c) {
            const vfloat value = load(row + c * LANES);
            for (int64_t j = 0; j < g; ++j) acc[j][c] += scores[j * n + t] * value;
        }
    }
    for (int64_t j = 0; j < g; ++j)
        for (int64_t c = 0; c < chunks; ++c) store(out + j * d + c * LANES, acc[j][c] * inverse[j]);
}


// ---- the rest of a decode step on one token: RMS norms, RoPE, the gated MLP ----

// x * (1 / sqrt(mean(x^2) + eps)), each product rounded, then times (offset + w[i]): the Llama family's
// RMSNorm (offset 0: weight * normalised) and Gemma 3's (offset 1: normalised * (1 + weight)) in
// float32, in their order of operations; the mean of squares summed in double (torch's float32 sum
// differs from it by float rounding only).
void rms_norm_row(const float* x, int64_t n, const float* w, float offset, float eps, float* out) {
    double squares = 0.0;
    for (int64_t i = 0; i < n; ++i) squares += static_cast<double>(x[i]) * x[i];
    const float variance = static_cast<float>(squares / static_cast<double>(n));
    const float inverse = 1.0f / std::sqrt(variance + eps);
    for (int64_t i = 0; i < n; ++i) {
        const float normalised = x[i] * inverse;
        out[i] = normalised * (offset + w[i]);
    }
}

// transformers' apply_rotary_pos_emb on one token's heads: x * cos + rotate_half(x) * sin, where
// rotate_half(x) = [-x[d/2:], x[:d/2]] (the compiler may fuse a product into the sum: float rounding only).
void rope_row(const float* x, int64_t d, const float* cos, const float* sin, float* out) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    for (int64_t i = half; i < d; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

// the MLP's activations: 0 SiLU (x / (1 + exp(-x))), 1 GELU's tanh form (Gemma's gelu_pytorch_tanh)
inline float activation(int64_t kind, float x) {
    if (kind == 0) return x / (1.0f + std::exp(-x));
    const float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + std::tanh(inner));
}

}  // namespace

extern "C" {

// The version of the signatures below; offload_engine/native/__init__.py refuses a library of another.
int tbrun_kernels_abi() { return 30; }

// 1 where bfloat16 keys are scored with the query rounded to bfloat16 (AVX512-BF16 pair products), else 0
int tbrun_bf16_pair_products() { return BF16_PAIRS ? 1 : 0; }

// 1 where int8 keys are scored against the query quantised to int8 (AVX512-VNNI quad products), else 0
int tbrun_int8_quad_products() { return INT8_QUADS ? 1 : 0; }

// reduce 0 (mean of the heads' softmaxes) or 1 (max of their logits); q [rows, g, d] contiguous; keys row r
// at keys + r * row_stride, dims dim_stride apart, tokens contiguous; out [rows, m] contiguous; buffer
// [g * m] scratch. Returns 0, or -1 for an unknown reduce.
// threads > 1: the rows are split among that many threads (each with its own g * m of buffer, which
// must then hold threads * g * m floats); every row is computed alike, so the result does not depend on it.
int tbrun_group_scores(int64_t reduce, const float* q, int64_t rows, int64_t g, int64_t d, const float* keys,
                       int64_t row_stride, int64_t dim_stride, int64_t m, float* out, float* buffer, int64_t threads) {
    if (reduce != REDUCE_MEAN && reduce != REDUCE_MAX) return -1;
    group_scores(reduce, q, rows, g, d, keys, row_stride, dim_stride, m, out, buffer, threads);
    return 0;
}

// The same with bfloat16 keys (raw 16-bit words; strides in elements). Where the CPU has AVX512-BF16
// (tbrun_bf16_pair_products) the query is rounded to bfloat16 and pairs of products are taken by
// vdpbf16ps, exact products summed in float32; elsewhere the keys are widened to float32 as they are read.
int tbrun_group_scores_bf16(int64_t reduce, const float* q, int64_t rows, int64_t g, int64_t d, const uint16_t* keys,
                            int64_t row_stride, int64_t dim_stride, int64_t m, float* out, float* buffer,
                            int64_t threads) {
    if (reduce != REDUCE_MEAN && reduce != REDUCE_MAX) return -1;
    group_scores(reduce, q, rows, g, d, keys, row_stride, dim_stride, m, out, buffer, threads);
    return 0;
}

// The same with int8 keys (codes) and each token's float16 scale (raw 16-bit words): row r's scales at
// scales + r * scale_stride, one per token, contiguous; logits are the codes' dot products times the scale.
int tbrun_group_scores_int8(int64_t reduce, const float* q, int64_t rows, int64_t g, int64_t d, const int8_t* keys,
                            int64_t row_stride, int64_t dim_stride, int64_t m, const uint16_t* scales,
                            int64_t scale_stride, float* out, float* buffer, int64_t threads) {
    if (reduce != REDUCE_MEAN && reduce != REDUCE_MAX) return -1;
    group_scores(reduce, q, rows, g, d, keys, row_stride, dim_stride, m, out, buffer, threads, scales, scale_stride);
    return 0;
}

// The keep largest entries of each of r rows (row i at scores + i * row_stride, n floats, contiguous) in
// no order: index and values [r, keep]. Ties at the cut: the first in the row. 1 <= keep <= n < 2^31.
// Rows split among threads as above. Returns 0.
int tbrun_topk_rows(const float* scores, int64_t r, int64_t n, int64_t row_stride, int64_t keep, int64_t* index,
                    float* values, int64_t threads) {
    split_rows(r, threads, [=](int64_t, int64_t first, int64_t last) {
        thread_local TopkWork work;  // grown once per thread, not allocated per call
        for (int64_t i = first; i < last; ++i)
            topk_row(scores + i * row_stride, n, keep, index + i * keep, values + i * keep, work);
    });
    return 0;
}


// The predictor's query network on one token (query_network): out [out_size], work [e + inner] scratch.
int tbrun_query_mlp(const float* x, int64_t e, const float* norm_weight, const float* norm_bias, float eps,
                    const float* w1, int64_t inner, const float* w2, int64_t out_size, float* work, float* out) {
    query_network(x, e, norm_weight, norm_bias, eps, w1, inner, w2, out_size, work, out);
    return 0;
}

// A model's linear layer at a decode step (one token): out = w x (+ bias), x [cols], w [rows, cols]
// row-major in `format` (WEIGHTS_FLOAT32, or a GGUF file's q4_1 / q8_0 blocks: matvec_blocks, cols a
// multiple of 32), bias [rows] or null, out [rows]. matvec streams the weights in order, which reads them at
// about twice the rate torch's one-row matrix product reaches on one core (the weights are out of the
// caches at every step: a step reads all of them once). threads > 1: the rows are split among them where
// the matrix has LINEAR_THREADED_ENTRIES entries or more: every projection of the embedded SmolLM2's layers
// (its smallest, k and v, 576 x 192) and its output head; with spinning workers (Workers) a split of a
// 10-40 µs product pays (a step of the embedded model with the kernels on 2 cores: 0.71-0.79x of one kernel
// thread beside torch's two, bench/reports/decode_threads.md). Returns 0; -1 (nothing done) for an unknown
// format or a block format over rows that are not whole blocks.
constexpr int64_t LINEAR_THREADED_ENTRIES = int64_t{1} << 16;

inline bool linear_format_fits(int64_t format, int64_t cols) {
    return format == WEIGHTS_FLOAT32 || ((format == WEIGHTS_Q4_1 || format == WEIGHTS_Q8_0) && cols % WEIGHT_BLOCK == 0);
}

int tbrun_linear(const float* x, int64_t cols, const void* w, int64_t format, int64_t rows, const float* bias,
                 float* out, int64_t threads) {
    if (!linear_format_fits(format, cols)) return -1;
    split_rows(rows, rows * cols >= LINEAR_THREADED_ENTRIES ? threads : 1, [=](int64_t, int64_t first, int64_t last) {
        matvec_any(format, w, first, last - first, cols, x, out);
        if (bias != nullptr)
            for (int64_t r = first; r < last; ++r) out[r] += bias[r];
    });
    return 0;
}

// RMS norms of `rows` rows of n values (rms_norm_row: weight w [n], offset 0 or 1, eps): out [rows, n]. With
// `add` (a row of n values, or rows of them), the residual sum x + add is written to `sum` first and is what
// is normalised: a decoder layer's "hidden = hidden + attention; norm(hidden)" in one call. Returns 0.
int tbrun_rms_norm(const float* x, const float* add, float* sum, int64_t rows, int64_t n, const float* w,
                   float offset, float eps, float* out) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* row = x + r * n;
        if (add != nullptr) {
            float* total = sum + r * n;
            for (int64_t i = 0; i < n; ++i) total[i] = row[i] + add[r * n + i];
            row = total;
        }
        rms_norm_row(row, n, w, offset, eps, out + r * n);
    }
    return 0;
}

// RoPE of one token's query and key heads (rope_row): q [heads, d], k [kv_heads, d] contiguous, cos and sin
// [d] (the position's row of the tables) -> q_out, k_out of the same shapes. Returns 0; -1 for an odd d.
int tbrun_rope(const float* q, int64_t heads, const float* k, int64_t kv_heads, int64_t d, const float* cos,
               const float* sin, float* q_out, float* k_out) {
    if (d % 2 != 0) return -1;
    for (int64_t h = 0; h < heads; ++h) rope_row(q + h * d, d, cos, sin, q_out + h * d);
    for (int64_t h = 0; h < kv_heads; ++h) rope_row(k + h * d, d, cos, sin, k_out + h * d);
    return 0;
}

// A gated MLP for one token: out = down(act(gate x) * up x) (+ residual), x [e], gate and up [inner, e], down
// [e_out, inner] row-major (each in its format, as tbrun_linear takes it), residual [e_out] or null, work
// [2 * inner] floats; act 0 SiLU, 1 GELU (tanh). The product act(g) * u is rounded as torch rounds it
// (activation first). Returns 0; -1 (nothing done) for another act or a format tbrun_linear refuses.
int tbrun_gated_mlp(const float* x, int64_t e, const void* gate, int64_t gate_format, const void* up,
                    int64_t up_format, int64_t inner, const void* down, int64_t down_format, int64_t e_out, int64_t act,
                    const float* residual, float* work, float* out, int64_t threads) {
    if ((act != 0 && act != 1) || !linear_format_fits(gate_format, e) || !linear_format_fits(up_format, e)
        || !linear_format_fits(down_format, inner))
        return -1;
    float* g = work;
    float* u = work + inner;
    tbrun_linear(x, e, gate, gate_format, inner, nullptr, g, threads);
    tbrun_linear(x, e, up, up_format, inner, nullptr, u, threads);
    for (int64_t i = 0; i < inner; ++i) {
        const float activated = activation(act, g[i]);
        g[i] = activated * u[i];
    }
    tbrun_linear(g, inner, down, down_format, e_out, nullptr, out, threads);
    if (residual != nullptr)
        for (int64_t i = 0; i < e_out; ++i) out[i] = residual[i] + out[i];
    return 0;
}

// A decoder layer of the Llama family's form for one decode token, in two calls around its attention (the
// adapter binds one per layer: native.DecodeLayer): its fixed tensors and sizes, field for field with the
// wrappers' _DecodeLayerArgs. Biases and the per-head q/k norms may be null; act as tbrun_gated_mlp's; each
// projection's weights in their format (tbrun_linear's), which the wrapper checked fits.
struct DecodeLayer {
    int64_t e, heads, kv_heads, d, inner, act, threads;
    int64_t wq_format, wk_format, wv_format, wo_format, gate_format, up_format, down_format;
    const float* input_norm;
    const void* wq;
    const float* bq;
    const void* wk;
    const float* bk;
    const void* wv;
    const float* bv;
    const float* q_norm;
    const float* k_norm;
    const void* wo;
    const float* bo;
    const float* post_norm;
    const void* gate;
    const void* up;
    const void* down;
    float input_offset, input_eps, qk_offset, qk_eps, post_offset, post_eps;
};

// The attention's inputs: x = input_norm(hidden) [e]; q [heads, d], k and v [kv_heads, d] = x's projections
// (+ biases), q and k through their per-head norms where the layer has them, then RoPE (cos, sin [d]; null:
// not turned). Returns 0.
int tbrun_decode_layer_input(const DecodeLayer* layer, const float* hidden, const float* cos, const float* sin,
                             float* x, float* q, float* k, float* v) {
    const DecodeLayer& L = *layer;
    rms_norm_row(hidden, L.e, L.input_norm, L.input_offset, L.input_eps, x);
    tbrun_linear(x, L.e, L.wq, L.wq_format, L.heads * L.d, L.bq, q, L.threads);
    tbrun_linear(x, L.e, L.wk, L.wk_format, L.kv_heads * L.d, L.bk, k, L.threads);
    tbrun_linear(x, L.e, L.wv, L.wv_format, L.kv_heads * L.d, L.bv, v, L.threads);
    if (L.q_norm != nullptr) {
        tbrun_rms_norm(q, nullptr, nullptr, L.heads, L.d, L.q_norm, L.qk_offset, L.qk_eps, q);
        tbrun_rms_norm(k, nullptr, nullptr, L.kv_heads, L.d, L.k_norm, L.qk_offset, L.qk_eps, k);
    }
    if (cos == nullptr) return 0;
    thread_local std::vector<float> turned;  // q then k turned (rope_row reads a head while writing its copy)
    turned.resize(static_cast<size_t>((L.heads + L.kv_heads) * L.d));
    float* turned_k = turned.data() + L.heads * L.d;
    tbrun_rope(q, L.heads, k, L.kv_heads, L.d, cos, sin, turned.data(), turned_k);
    std::memcpy(q, turned.data(), sizeof(float) * L.heads * L.d);
    std::memcpy(k, turned_k, sizeof(float) * L.kv_heads * L.d);
    return 0;
}

// The layer's output: hidden + o(attention) = h, then out = h + mlp(post_norm(h)) [e]; attention [heads * d];
// work [2 * e + 2 * inner] floats. Returns 0.
int tbrun_decode_layer_output(const DecodeLayer* layer, const float* hidden, const float* attention, float* work,
                              float* out) {
    const DecodeLayer& L = *layer;
    float* total = work;
    float* x = work + L.e;
    float* mlp_work = work + 2 * L.e;
    tbrun_linear(attention, L.heads * L.d, L.wo, L.wo_format, L.e, L.bo, total, L.threads);
    tbrun_rms_norm(hidden, total, total, 1, L.e, L.post_norm, L.post_offset, L.post_eps, x);
    return tbrun_gated_mlp(x, L.e, L.gate, L.gate_format, L.up, L.up_format, L.inner, L.down, L.down_format, L.e, L.act,
                           total, mlp_work, out, L.threads);
}

// A decode token's K and V rows into the places a backend keeps them, in one call: k and v [heads, row_bytes]
// (rows source_stride bytes apart) copied to slot_k / slot_v (rows slot_stride apart: a working set's slot or a
// dense cache's position) and, where host_k is not null, to host_k / host_v (rows host_stride apart: the host
// store's token-major row). What two indexed assignments, a transpose and two copies took a layer. Returns 0.
int tbrun_write_token(const uint8_t* k, const uint8_t* v, int64_t heads, int64_t row_bytes, int64_t source_stride,
                      uint8_t* slot_k, uint8_t* slot_v, int64_t slot_stride, uint8_t* host_k, uint8_t* host_v,
                      int64_t host_stride) {
    for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(slot_k + h * slot_stride, k + h * source_stride, row_bytes);
        std::memcpy(slot_v + h * slot_stride, v + h * source_stride, row_bytes);
        if (host_k != nullptr) {
            std::memcpy(host_k + h * host_stride, k + h * source_stride, row_bytes);
            std::memcpy(host_v + h * host_stride, v + h * source_stride, row_bytes);
        }
    }
    return 0;
}

// critical(...)'s value norm of one decode token (policies/critical.py value_norms): for each query head h,
// ||v_(h / g) W_O^h||_1 over the hidden width, then the mean over each KV group of g = heads / kv_heads heads.
// v [kv_heads, d] float32 (rows v_stride apart, d contiguous); W_O^h's entry (j, e) at w[h * h_stride + j + e *
// e_stride] (the output projection's weight [E, heads * d] as [heads, d, E]: d contiguous), read once in its
// rows' order (each row of the weight feeds every head's dot product); KV head k's norm at out[k * out_stride]
// (the policy's norms of a layer, [kv_heads, capacity], at the token's position). What the torch form's
// ~8 operations a layer, a strided matrix product among them, took 0.3 ms for at 135M parameters. Returns 0;
// -1 (nothing written) where heads is not a multiple of kv_heads.
int tbrun_value_norms(const float* v, int64_t kv_heads, int64_t v_stride, int64_t heads, int64_t d,
                      int64_t width, const float* w, int64_t h_stride, int64_t e_stride, float* out,
                      int64_t out_stride) {
    if (kv_heads <= 0 || heads % kv_heads != 0) return -1;
    const int64_t g = heads / kv_heads;
    thread_local std::vector<float> sums;
    sums.assign(static_cast<size_t>(heads), 0.0f);
    for (int64_t e = 0; e < width; ++e) {
        const float* row = w + e * e_stride;
        for (int64_t h = 0; h < heads; ++h) {
            const float* wh = row + h * h_stride;
            const float* vh = v + (h / g) * v_stride;
            vfloat acc{};
            int64_t j = 0;
            for (; j + LANES <= d; j += LANES) acc += load(wh + j) * load(vh + j);
            float dot = lane_sum(acc);
            for (; j < d; ++j) dot += wh[j] * vh[j];
            sums[static_cast<size_t>(h)] += std::fabs(dot);
        }
    }
    for (int64_t k = 0; k < kv_heads; ++k) {
        float total = 0.0f;
        for (int64_t i = 0; i < g; ++i) total += sums[static_cast<size_t>(k * g + i)];
        out[k * out_stride] = total / static_cast<float>(g);
    }
    return 0;
}

// One decode token's attention: q [heads, d] float32 (contiguous; query head i belongs to KV head i / g,
// g = heads / kv_heads), keys and values of KV head h at k + h * k_head_stride + t * k_token_stride (and v
// likewise; d contiguous) for tokens t < n, valid [kv_heads, n] bytes (rows valid_head_stride apart, tokens
// contiguous) or null, scratch of threads * g * n floats; out [heads, d]. The KV heads are split among
// threads. Returns 0; -1 (nothing written) where heads is not a multiple of kv_heads, g exceeds
// ATTENTION_MAX_GROUP, or d exceeds ATTENTION_MAX_DIM or is not a multiple of LANES.
// Threads for KV heads of ATTENTION_THREADED_KEYS keys each or more (a dense layer at 7.5k tokens: 14.0 ->
// 11.4 ms a step on the embedded model, 2 threads). With workers that slept between calls a sparse layer's
// ~1-2k keys a head were slower threaded (2.9 -> 3.8 ms a step) and the threshold was 4,096; with them
// spinning, at 32k (2,048 keys a head) the attention phase went from 6.2 to 5.3 ms a step for tokenbutler and
// from 4.4 to 3.5 for streaming (two single runs of the paired 32k command on 2 threads, an AMD EPYC, whose
// other phases differed by up to 10%: bench/README.md, stop 59). 768 keys a head (7.5k at 10%) stay unsplit.
constexpr int64_t ATTENTION_THREADED_KEYS = 1024;

int tbrun_decode_attention(const float* q, int64_t heads, int64_t kv_heads, int64_t d, const float* k,
                           int64_t k_head_stride, int64_t k_token_stride, const float* v, int64_t v_head_stride,
                           int64_t v_token_stride, int64_t n, const uint8_t* valid, int64_t valid_head_stride,
                           float scaling, float* out, float* scratch, int64_t threads) {
    if (kv_heads <= 0 || heads % kv_heads != 0) return -1;
    const int64_t g = heads / kv_heads;
    if (g > ATTENTION_MAX_GROUP || d > ATTENTION_MAX_DIM || d % LANES != 0 || d == 0) return -1;
    const AttendKVHead attend = attend_kv_head_for(g, d);
    split_rows(kv_heads, n >= ATTENTION_THREADED_KEYS ? threads : 1, [=](int64_t worker, int64_t first, int64_t last) {
        for (int64_t h = first; h < last; ++h) {
            const uint8_t* mask = valid != nullptr ? valid + h * valid_head_stride : nullptr;
            float* scores = scratch + worker * g * n;
            if (attend != nullptr)
                attend(q + h * g * d, k + h * k_head_stride, k_token_stride, v + h * v_head_stride, v_token_stride, n,
                       mask, scaling, scores, out + h * g * d);
            else
                decode_kv_head(q + h * g * d, g, d, k + h * k_head_stride, k_token_stride, v + h * v_head_stride,
                               v_token_stride, n, mask, scaling, scores, out + h * g * d);
        }
    });
    return 0;
}

// A decode token's key through each KV head's compact projection, written into the compact cache's column of
// its position (TokenButlerPolicy.observe_decode at every layer, where a matrix product, a view and a strided
// copy took ~70 us of Python and torch calls a layer): key[h, j] = sum_i k[h * k_stride + i] * proj[(h * d + i) *
// dp + j], k [heads, d] (rows k_stride apart), proj [heads, d, dp] contiguous, float32, written at
// out[h * out_head_stride + j * out_dim_stride] as the cache stores it (out_code):
//   PROJECT_FLOAT32:  as computed;
//   PROJECT_BFLOAT16: rounded to nearest even, as torch's float32 -> bfloat16 conversion;
//   PROJECT_INT8:     quantised as quantize_keys does (predictor/network.py: one scale per head and token,
//                     max |key| / 127, stored as float16 at scales[h * scale_stride]; scales unused otherwise).
// Returns 0; -1 where dp exceeds PROJECT_MAX_DIMS, out_code is unknown or an int8 cache has no scales (nothing
// written); -2 for an int8 cache where a projected key holds a NaN or an infinity (a broken model; heads before
// it may be written), which the caller leaves to torch's quantisation, so that prefill and decode keys are
// stored alike.
constexpr int64_t PROJECT_MAX_DIMS = 256;
constexpr int64_t PROJECT_FLOAT32 = 0, PROJECT_BFLOAT16 = 1, PROJECT_INT8 = 2;

int tbrun_project_token(const float* k, int64_t heads, int64_t d, int64_t k_stride, const float* proj, int64_t dp,
                        void* out, int64_t out_code, int64_t out_head_stride, int64_t out_dim_stride, uint16_t* scales,
                        int64_t scale_stride) {
    if (dp > PROJECT_MAX_DIMS || out_code < PROJECT_FLOAT32 || out_code > PROJECT_INT8 ||
        (out_code == PROJECT_INT8 && scales == nullptr))
        return -1;
    float acc[PROJECT_MAX_DIMS];
    int8_t quantised[PROJECT_MAX_DIMS];
    for (int64_t h = 0; h < heads; ++h) {
        project_head(k + h * k_stride, d, proj + h * d * dp, dp, acc);
        if (out_code == PROJECT_INT8) {
            if (!all_finite(acc, dp)) return -2;
            int32_t unused;
            const float scale = quantise_head(acc, dp, quantised, &unused);
            int8_t* column = static_cast<int8_t*>(out) + h * out_head_stride;
            for (int64_t j = 0; j < dp; ++j) column[j * out_dim_stride] = quantised[j];
            scales[h * scale_stride] = to_half(scale);
        } else if (out_code == PROJECT_BFLOAT16) {
            uint16_t* column = static_cast<uint16_t*>(out) + h * out_head_stride;
            for (int64_t j = 0; j < dp; ++j) column[j * out_dim_stride] = to_bf16(acc[j]);
        } else {
            float* column = static_cast<float*>(out) + h * out_head_stride;
            for (int64_t j = 0; j < dp; ++j) column[j * out_dim_stride] = acc[j];
        }
    }
    return 0;
}

constexpr int64_t THREADED_UPDATE_ENTRIES = 8192;

// ResidencyMap.update on r rows: selected [r, k] (distinct positions, -1 padding); slot_pos [*, n + 1]
// int64, slot_of [*, of_length] int32 (of_length >= capacity + 1) and active [*, n + 1] bool, rows at the given
// strides (elements; a stride below a row's length only for one row);
// positions and slots [r, k] receive each row's copies first, every row padded to the largest count (position
// 0, slot n; the columns past it are left as they were), counts [r]. Returns 0, or -1 if a row has more missing positions than free slots (the caller checks k <= n).
// threads > 1: the rows are split among them where r * max(k, n) >= THREADED_UPDATE_ENTRIES.
int tbrun_residency_update(const int64_t* selected, int64_t r, int64_t k, int64_t* slot_pos, int64_t pos_stride,
                           int32_t* slot_of, int64_t of_stride, int64_t of_length, uint8_t* active,
                           int64_t active_stride, int64_t n, int64_t* positions, int64_t* slots, int64_t* counts,
                           int64_t threads) {
    std::atomic<int> status{0};
    auto update_rows = [=, &status](int64_t, int64_t first, int64_t last) {
        thread_local UpdateWork work;  // update_row's lists, grown once per thread
        thread_local std::vector<uint8_t> wanted;  // update_row's map: zeros between calls
        grow_map(wanted, of_length);
        for (int64_t row = first; row < last; ++row) {
            const int64_t placed = update_row(selected + row * k, k, slot_pos + row * pos_stride,
                                              slot_of + row * of_stride, active + row * active_stride, n,
                                              positions + row * k, slots + row * k, work, wanted.data(), of_length - 1);
            counts[row] = std::max<int64_t>(placed, 0);
            if (placed < 0) status = -1;
        }
    };
    // rows are independent (each its own slice of every table): split among threads where there is enough
    // work to pay for starting them
    split_rows(r, r * std::max(k, n) >= THREADED_UPDATE_ENTRIES ? threads : 1, update_rows);
    pad_rows(r, k, n, positions, slots, counts);
    return status.load();
}

// A layer's fetch plan on the CPU: for every pair (a layer's keys, its values) and head h, row
// positions[h, j] of the pair's source to row slots[h, j] of its destination, j < counts[h]. Sources
// and destinations are [H, rows, row_bytes] at byte strides (head, row) shared by all pairs; rows are
// contiguous. Every entry is checked against src_rows / dst_rows before any byte moves. Returns 0,
// or -1 (nothing copied) if an entry is out of range. threads > 1: plans of GATHER_THREADED_ROWS rows
// or more split their (pair, head) copies among that many threads (a random gather waits on memory:
// two cores keep twice the misses in flight); smaller ones are not worth starting a thread for.
constexpr int64_t GATHER_THREADED_ROWS = 4096;

int tbrun_gather_pairs(int64_t pairs, const uint8_t* const* sources, uint8_t* const* targets, int64_t heads,
                       int64_t m, const int64_t* positions, const int64_t* slots, const int64_t* counts,
                       int64_t src_head, int64_t src_row, int64_t src_rows, int64_t dst_head, int64_t dst_row,
                       int64_t dst_rows, int64_t row_bytes, int64_t threads) {
    int64_t total = 0;
    for (int64_t h = 0; h < heads; ++h) {
        const int64_t n = counts[h];
        if (n < 0 || n > m) return -1;
        for (int64_t j = 0; j < n; ++j) {
            const int64_t p = positions[h * m + j], s = slots[h * m + j];
            if (p < 0 || p >= src_rows || s < 0 || s >= dst_rows) return -1;
        }
        total += n * pairs;
    }
    split_rows(pairs * heads, total >= GATHER_THREADED_ROWS ? threads : 1, [=](int64_t, int64_t first, int64_t last) {
        for (int64_t item = first; item < last; ++item) {  // item: pair * heads + h
            const int64_t pair = item / heads, h = item % heads;
            copy_scattered_rows(targets[pair] + h * dst_head, sources[pair] + h * src_head, positions + h * m,
                                slots + h * m, counts[h], src_row, dst_row, row_bytes);
        }
    });
    return 0;
}

// A producer's selection in one call (select_rows): for each of the rows, the scores of tbrun_group_scores
// under rule reduce (q [rows, g, d]; keys as there), the top keep of candidates [lo, hi) (0 <= lo,
// keep <= hi - lo, hi <= m), and tbrun_residency_update with those positions (tables and outputs as there,
// k = keep; keep <= n). bounds (or null): the rows' page bounds [rows, 2d, pages] float32 at those strides,
// of pages of `page` tokens, and the prefilter's `kept` pages (0: none; see prefiltered_row); blocks: the
// rows' pages' keys [rows, pages, d, page] (row stride given; int8 keys' block_scales [rows, pages, page]);
// bound_blocks (int8 keys, or null): the bounds as int8 codes (see PageArgs). copies (or null): each row's
// placed positions copied from the host store into their slots in the same call (RowCopies). network (or null):
// q is not read; the producer's query network runs on x first and the selection reads its queries
// (QueryNetwork). held_mul, held_add: the score of each candidate a row's slots hold becomes score * held_mul +
// held_add before the top-k (HeldTerms; 1 and 0: none; not with a prefilter: -2). reweight (or null): the
// selection is critical(...)'s two stages over the scores (Reweight; its own keep bonus; not with a prefilter or
// held terms: -2). Returns 0, -1 if
// a row had more missing positions than free slots, -2 for an unknown reduce, -3 if a copy was outside its
// tables (that row's copies not made, its residency already updated: the caller must not go on with these
// rows). threads > 1: rows split among them, as the scores are; the copies' time is the longest any thread
// spent copying (they copy side by side), so that it stays within the call's wall time.
int tbrun_select_rows(int64_t reduce, const float* q, int64_t rows, int64_t g, int64_t d, const float* keys,
                      int64_t row_stride,
                      int64_t dim_stride, int64_t m, int64_t lo, int64_t hi, int64_t keep, int64_t* slot_pos,
                      int64_t pos_stride, int32_t* slot_of, int64_t of_stride, int64_t of_length, uint8_t* active,
                      int64_t active_stride, int64_t n, int64_t* positions, int64_t* slots, int64_t* counts,
                      int64_t threads, const float* bounds, int64_t bound_row_stride,
                      int64_t bound_dim_stride, int64_t page, int64_t kept, const void* blocks,
                      int64_t block_row_stride, const uint16_t* block_scales, int64_t block_scale_stride,
                      const int8_t* bound_blocks, int64_t bound_block_stride, const uint16_t* bound_scales,
                      int64_t bound_scale_stride, const RowCopies* copies,
                      const QueryNetwork* network, const float* x, float held_mul, float held_add,
                      const Reweight* reweight) {
    return select_rows(reduce, q, rows, g, d, keys, row_stride, dim_stride, m, lo, hi, keep, slot_pos, pos_stride,
                       slot_of, of_stride, of_length, active, active_stride, n, positions, slots, counts, threads, nullptr, 0,
                       PageArgs{bounds, bound_row_stride, bound_dim_stride, page, kept, blocks, block_row_stride,
                                block_scales, block_scale_stride, bound_blocks, bound_block_stride, bound_scales,
                                bound_scale_stride}, copies, network, x, HeldTerms{held_mul, held_add}, reweight);
}

// The same with bfloat16 keys (as tbrun_group_scores_bf16)
int tbrun_select_rows_bf16(int64_t reduce, const float* q, int64_t rows, int64_t g, int64_t d, const uint16_t* keys,
                           int64_t row_stride, int64_t dim_stride, int64_t m, int64_t lo, int64_t hi, int64_t keep,
                           int64_t* slot_pos, int64_t pos_stride, int32_t* slot_of, int64_t of_stride,
                           int64_t of_length, uint8_t* active, int64_t active_stride, int64_t n, int64_t* positions,
                           int64_t* slots, int64_t* counts, int64_t threads, const float* bounds, int64_t bound_row_stride,
                      int64_t bound_dim_stride, int64_t page, int64_t kept, const void* blocks,
                      int64_t block_row_stride, const uint16_t* block_scales, int64_t block_scale_stride,
                      const int8_t* bound_blocks, int64_t bound_block_stride, const uint16_t* bound_scales,
                      int64_t bound_scale_stride, const RowCopies* copies,
                      const QueryNetwork* network, const float* x, float held_mul, float held_add,
                      const Reweight* reweight) {
    return select_rows(reduce, q, rows, g, d, keys, row_stride, dim_stride, m, lo, hi, keep, slot_pos, pos_stride,
                       slot_of, of_stride, of_length, active, active_stride, n, positions, slots, counts, threads, nullptr, 0,
                       PageArgs{bounds, bound_row_stride, bound_dim_stride, page, kept, blocks, block_row_stride,
                                block_scales, block_scale_stride, bound_blocks, bound_block_stride, bound_scales,
                                bound_scale_stride}, copies, network, x, HeldTerms{held_mul, held_add}, reweight);
}

// The same with int8 keys and their scales (as tbrun_group_scores_int8)
int tbrun_select_rows_int8(int64_t reduce, const float* q, int64_t rows, int64_t g, int64_t d, const int8_t* keys,
                           int64_t row_stride, int64_t dim_stride, int64_t m, const uint16_t* scales,
                           int64_t scale_stride, int64_t lo, int64_t hi, int64_t keep, int64_t* slot_pos,
                           int64_t pos_stride, int32_t* slot_of, int64_t of_stride, int64_t of_length,
                           uint8_t* active, int64_t active_stride, int64_t n, int64_t* positions, int64_t* slots,
                           int64_t* counts, int64_t threads, const float* bounds, int64_t bound_row_stride,
                      int64_t bound_dim_stride, int64_t page, int64_t kept, const void* blocks,
                      int64_t block_row_stride, const uint16_t* block_scales, int64_t block_scale_stride,
                      const int8_t* bound_blocks, int64_t bound_block_stride, const uint16_t* bound_scales,
                      int64_t bound_scale_stride, const RowCopies* copies,
                      const QueryNetwork* network, const float* x, float held_mul, float held_add,
                      const Reweight* reweight) {
    return select_rows(reduce, q, rows, g, d, keys, row_stride, dim_stride, m, lo, hi, keep, slot_pos, pos_stride,
                       slot_of, of_stride, of_length, active, active_stride, n, positions, slots, counts, threads,
                       scales,
                       scale_stride,
                       PageArgs{bounds, bound_row_stride, bound_dim_stride, page, kept, blocks, block_row_stride,
                                block_scales, block_scale_stride, bound_blocks, bound_block_stride, bound_scales,
                                bound_scale_stride}, copies, network, x, HeldTerms{held_mul, held_add}, reweight);
}

}  // extern "C"
