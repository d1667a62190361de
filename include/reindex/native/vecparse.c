/*
 * vecparse: parse a JSON array of numbers straight into float32, one pass, no allocation.
 *
 * Contract (what the Python side relies on):
 *   rx_parse_f32_array(s, size, start, end, out, cap) parses s[start..end] inclusive (s holds `size`
 *   bytes; the fast path reads ahead within them, never past), which must be exactly
 *   "[" number ("," number)* "]" or "[]" with JSON whitespace around the numbers, every number valid
 *   JSON (RFC 8259: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?). It returns the count of numbers
 *   (writing the first `cap` of them to out), or -1 when the text is anything else, or when a number
 *   is out of the range of a double (overflow or a subnormal result): the caller then takes its
 *   general path, so those cases behave exactly as without this library.
 *
 *   Each value written is (float)(the correctly rounded double of the number's text): the same as
 *   simdjson, orjson or Python's float() followed by a cast to float32. The fast path computes the
 *   double with at most a few roundings and keeps it only when no float32 rounding boundary lies
 *   within 16 double ulps of it, so the cast cannot differ; otherwise, and for numbers of more than 19
 *   significant digits, the number is parsed again with strtod (correctly rounded in glibc) in the
 *   C locale. Integers without fraction or exponent give +0.0 for "-0", as Python's int does.
 *
 * Build: python -m reindex.native (the Makefile does it). No Python API: loaded with ctypes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <locale.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

static const double P10[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                               1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* 10^-k rounded to the nearest double (not exact: used only where the result is checked, below) */
static const double N10[23] = {1e0,   1e-1,  1e-2,  1e-3,  1e-4,  1e-5,  1e-6,  1e-7,  1e-8,  1e-9,  1e-10, 1e-11,
                               1e-12, 1e-13, 1e-14, 1e-15, 1e-16, 1e-17, 1e-18, 1e-19, 1e-20, 1e-21, 1e-22};

static locale_t c_locale = (locale_t)0;

int rx_abi_version(void) { return 1; }

static inline int is_digit(char c) { return (unsigned char)(c - '0') < 10; }
static inline int is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static inline uint64_t load8(const char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v; /* little-endian (x86-64, aarch64) */
}

static inline int eight_digits(uint64_t v) {
    return !(((v + 0x4646464646464646ULL) | (v - 0x3030303030303030ULL)) & 0x8080808080808080ULL);
}

static inline uint32_t parse8(uint64_t v) {
    v -= 0x3030303030303030ULL;
    v = (v * 10) + (v >> 8);
    v = (((v & 0x000000FF000000FFULL) * 0x000F424000000064ULL) +
         (((v >> 16) & 0x000000FF000000FFULL) * 0x0000271000000001ULL)) >> 32;
    return (uint32_t)v;
}

/* The correctly rounded double of s[0..n) by strtod in the C locale; 0 on success, -1 on range error. */
static int slow_double(const char *s, size_t n, double *out) {
    char buf[128];
    char *endp;
    if (n >= sizeof buf || c_locale == (locale_t)0) return -1;
    memcpy(buf, s, n);
    buf[n] = 0;
    errno = 0;
    double d = strtod_l(buf, &endp, c_locale);
    if (endp != buf + n || errno == ERANGE || isinf(d)) return -1;
    if (d != 0.0 && fabs(d) < 2.2250738585072014e-308) return -1; /* subnormal: leave to the general path */
    *out = d;
    return 0;
}

/* Whether (float)d is surely the float32 of the correctly rounded double of the number d approximates
   (d within a few ulps of it, positive, in the normal float32 range): float32 keeps 24 of the 53
   significand bits and the cast rounds on the 29 dropped ones, the boundary between two floats being
   where they are 1 << 28; 16 ulps away from it the two casts cannot differ. */
static inline int f32_sure(double d) {
    uint64_t bits;
    memcpy(&bits, &d, 8);
    int64_t low = (int64_t)(bits & ((1ULL << 29) - 1)) - (1LL << 28);
    return d >= 1.1754943508222875e-38 && d < 3.4028234663852886e38 && (low > 16 || low < -16);
}

/* Parse one number at *pp (< end); 0 and *pp past it on success, -1 when invalid or out of range. */
static inline int parse_number(const char **pp, const char *end, float *out) {
    const char *p = *pp, *start = p;
    int neg = 0;
    if (*p == '-') {
        neg = 1;
        if (++p >= end) return -1;
    }
    if (!is_digit(*p)) return -1;
    uint64_t m = 0;
    int digits = 0; /* significant digits in m, leading zeros excluded */
    int e10 = 0, fractional = 0;
    if (*p == '0') {
        p++;
        if (p < end && is_digit(*p)) return -1; /* leading zero */
    } else {
        while (p < end && is_digit(*p)) {
            m = m * 10 + (uint64_t)(*p - '0');
            digits++;
            p++;
        }
    }
    if (p < end && *p == '.') {
        const char *f = ++p;
        fractional = 1;
        if (m == 0) { /* leading zeros of the fraction are not significant */
            while (p < end && *p == '0') p++;
        }
        const char *sig = p;
        while (p + 8 <= end && eight_digits(load8(p))) {
            m = m * 100000000ULL + parse8(load8(p));
            p += 8;
        }
        while (p < end && is_digit(*p)) {
            m = m * 10 + (uint64_t)(*p - '0');
            p++;
        }
        if (p == f) return -1; /* "1." */
        e10 = -(int)(p - f);
        if (m != 0 || sig != p) digits += (int)(p - sig);
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        int eneg = 0, ex = 0;
        fractional = 1;
        if (++p < end && (*p == '+' || *p == '-')) {
            eneg = *p == '-';
            p++;
        }
        if (p >= end || !is_digit(*p)) return -1;
        while (p < end && is_digit(*p)) {
            if (ex < 100000) ex = ex * 10 + (*p - '0');
            p++;
        }
        e10 += eneg ? -ex : ex;
    }
    *pp = p;
    if (m == 0 && digits <= 19) {
        *out = (neg && fractional) ? -0.0f : 0.0f;
        return 0;
    }
    double d;
    if (digits > 19) { /* m wrapped: exact parse */
        if (slow_double(start, (size_t)(p - start), &d)) return -1;
        *out = (float)d;
        return 0;
    }
    if (m <= (1ULL << 53) && e10 >= -22 && e10 <= 22) { /* exact operands, one rounding: correctly rounded */
        d = (double)m;
        d = e10 < 0 ? d / P10[-e10] : d * P10[e10];
        *out = (float)(neg ? -d : d);
        return 0;
    }
    if (e10 >= -44 && e10 <= 22) {
        /* (double)m and one or two multiplications by rounded powers: within 3 ulps of the true value */
        d = (double)m;
        if (e10 < -22)
            d = d * N10[22] * N10[-e10 - 22];
        else
            d = e10 < 0 ? d * N10[-e10] : d * P10[e10];
        if (f32_sure(d)) {
            *out = (float)(neg ? -d : d);
            return 0;
        }
    }
    if (slow_double(start, (size_t)(p - start), &d)) return -1;
    *out = (float)d;
    return 0;
}


static const uint64_t U10[20] = {1ULL, 10ULL, 100ULL, 1000ULL, 10000ULL, 100000ULL, 1000000ULL, 10000000ULL,
                                 100000000ULL, 1000000000ULL, 10000000000ULL, 100000000000ULL,
                                 1000000000000ULL, 10000000000000ULL, 100000000000000ULL,
                                 1000000000000000ULL, 10000000000000000ULL, 100000000000000000ULL,
                                 1000000000000000000ULL, 10000000000000000000ULL};

/* Index of the first byte of w (memory order) that is not an ASCII digit; 8 when all are. Bytes after
   the first non-digit may be misjudged (carries), never the ones before it. */
static inline int digit_run(uint64_t w) {
    uint64_t nd = ((w + 0x4646464646464646ULL) | (w - 0x3030303030303030ULL)) & 0x8080808080808080ULL;
    return nd ? __builtin_ctzll(nd) >> 3 : 8;
}

/* The value of the first k (0..8) digits of w, without branches. */
static inline uint64_t first_digits(uint64_t w, int k) {
    uint64_t top = k ? w << (64 - 8 * k) : 0;
    uint64_t pad = k < 8 ? 0x3030303030303030ULL >> (8 * k) : 0;
    return parse8(top | pad);
}

/* The digits of a fraction at f: their count (0 when there are none, 24 or more: not taken here), their
   value in *m (when at most 19 are significant) and a lower bound of their leading zeros in *lz. Reads
   the 24 bytes from f. */
static inline int frac_digits_swar(const char *f, uint64_t *m, int *lz) {
    uint64_t w0 = load8(f), w1 = load8(f + 8), w2 = load8(f + 16);
    int n0 = digit_run(w0), n1 = digit_run(w1), n2 = digit_run(w2);
    int k1 = n0 == 8 ? n1 : 0;
    int k2 = (n0 == 8 && n1 == 8) ? n2 : 0;
    uint64_t z = w0 ^ 0x3030303030303030ULL; /* zero bytes: '0' */
    *lz = z ? __builtin_ctzll(z) >> 3 : 8;
    uint64_t v = first_digits(w0, n0);
    v = v * U10[k1] + first_digits(w1, k1);
    *m = v * U10[k2] + first_digits(w2, k2);
    return n0 + k1 + k2;
}

#if defined(__x86_64__)
#define RX_SSE41 __attribute__((target("ssse3,sse4.1")))

/* pshufb masks moving the first n bytes to the end of 16, zeros before them */
static uint8_t SHUF[17][16];

static void init_shuf(void) {
    for (int n = 0; n <= 16; n++)
        for (int j = 0; j < 16; j++) SHUF[n][j] = j < 16 - n ? 0x80 : (uint8_t)(j - (16 - n));
}

/* frac_digits_swar with the first 16 bytes done in one SSE register (SSSE3 + SSE4.1). */
RX_SSE41 static inline int frac_digits_sse(const char *f, uint64_t *m, int *lz) {
    __m128i t = _mm_sub_epi8(_mm_loadu_si128((const __m128i *)f), _mm_set1_epi8('0'));
    __m128i nine = _mm_set1_epi8(9);
    unsigned digits = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_max_epu8(t, nine), nine));
    unsigned zeros = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(t, _mm_setzero_si128()));
    int n0 = __builtin_ctz(~digits | 0x10000u);
    *lz = __builtin_ctz(~zeros | 0x10000u);
    __m128i x = _mm_shuffle_epi8(t, _mm_loadu_si128((const __m128i *)SHUF[n0]));
    x = _mm_maddubs_epi16(x, _mm_setr_epi8(10, 1, 10, 1, 10, 1, 10, 1, 10, 1, 10, 1, 10, 1, 10, 1));
    x = _mm_madd_epi16(x, _mm_setr_epi16(100, 1, 100, 1, 100, 1, 100, 1));
    x = _mm_packus_epi32(x, x);
    x = _mm_madd_epi16(x, _mm_setr_epi16(10000, 1, 10000, 1, 10000, 1, 10000, 1));
    uint64_t v = (uint64_t)(uint32_t)_mm_cvtsi128_si32(x) * 100000000ULL + (uint32_t)_mm_extract_epi32(x, 1);
    uint64_t w2 = load8(f + 16);
    int k2 = n0 == 16 ? digit_run(w2) : 0;
    *m = v * U10[k2] + first_digits(w2, k2);
    return n0 + k2;
}
#endif

/* The common case, without data-dependent branches: -?D.DDDD… with fewer than 24 fraction digits and
   at most 19 significant ones, no exponent, and 26 readable bytes from the digit on. Returns 1 when it
   took the number (*out written, *pp past it), 0 to leave it to parse_number, -1 when out of range. */
#define DEFINE_PARSE_PLAIN(NAME, ATTR, FRAC)                                                          \
    ATTR static inline int NAME(const char **pp, const char *limit, float *out) {                      \
        const char *p = *pp;                                                                          \
        int neg = *p == '-';                                                                          \
        const char *q = p + neg;                                                                      \
        if (q + 26 > limit || !is_digit(q[0]) || q[1] != '.') return 0;                               \
        uint64_t i0 = (uint64_t)(q[0] - '0');                                                         \
        const char *f = q + 2;                                                                        \
        uint64_t m;                                                                                   \
        int lz;                                                                                       \
        int len = FRAC(f, &m, &lz);                                                                   \
        if (len == 0 || len >= 24) return 0;                                                          \
        char next = f[len];                                                                           \
        if (next == 'e' || next == 'E') return 0;                                                     \
        if (i0 ? len > 18 : len - lz > 19) return 0;                                                  \
        m += i0 * U10[len]; /* len <= 18 when i0 != 0 */                                              \
        *pp = f + len;                                                                                \
        return finish(p, f + len, neg, m, len, out);                                                  \
    }

/* m * 10^-len as float32, through the double checked against float32 rounding boundaries. */
static inline int finish(const char *p, const char *e, int neg, uint64_t m, int len, float *out) {
    if (m == 0) {
        *out = neg ? -0.0f : 0.0f;
        return 1;
    }
    double d = (double)m * N10[len <= 22 ? len : 22];
    if (len > 22) d *= N10[len - 22];
    if (f32_sure(d)) {
        *out = (float)(neg ? -d : d);
        return 1;
    }
    if (slow_double(p, (size_t)(e - p), &d)) return -1;
    *out = (float)d;
    return 1;
}

DEFINE_PARSE_PLAIN(parse_plain_swar, , frac_digits_swar)

/* The whole array: "[" ws number ws ("," ws number ws)* "]" or "[" ws "]". */
#define DEFINE_PARSE_ARRAY(NAME, ATTR, PLAIN)                                                         \
    ATTR static long NAME(const char *s, long size, long start, long end, float *out, long cap) {      \
        const char *p = s + start + 1, *stop = s + end, *limit = s + size;                            \
        long n = 0;                                                                                   \
        while (p < stop && is_ws(*p)) p++;                                                            \
        if (p == stop) return 0;                                                                      \
        for (;;) {                                                                                    \
            float v;                                                                                  \
            while (p < stop && is_ws(*p)) p++;                                                        \
            if (p >= stop) return -1;                                                                 \
            int taken = PLAIN(&p, limit, &v);                                                         \
            if (taken < 0 || (!taken && parse_number(&p, stop, &v))) return -1;                       \
            if (n < cap) out[n] = v;                                                                  \
            n++;                                                                                      \
            while (p < stop && is_ws(*p)) p++;                                                        \
            if (p == stop) return n; /* at the closing ']' */                                         \
            if (*p != ',') return -1;                                                                 \
            p++;                                                                                      \
        }                                                                                             \
    }

DEFINE_PARSE_ARRAY(parse_array_swar, , parse_plain_swar)
#if defined(__x86_64__)
DEFINE_PARSE_PLAIN(parse_plain_sse, RX_SSE41, frac_digits_sse)
DEFINE_PARSE_ARRAY(parse_array_sse, RX_SSE41, parse_plain_sse)
#endif

static int has_sse = 0, use_sse = 0;

/* Once, before any parse: the C locale for strtod, and the SSE path where the processor has it. */
int rx_init(void) {
    if (c_locale == (locale_t)0) c_locale = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
#if defined(__x86_64__)
    init_shuf();
    __builtin_cpu_init();
    has_sse = use_sse = __builtin_cpu_supports("ssse3") && __builtin_cpu_supports("sse4.1");
#endif
    return c_locale == (locale_t)0 ? -1 : 0;
}

/* Use the SSE path (when the processor has it) or the portable one; returns the path now in use. */
int rx_use_simd(int on) {
    use_sse = on && has_sse;
    return use_sse;
}

long rx_parse_f32_array(const char *s, long size, long start, long end, float *out, long cap) {
    if (start < 0 || end <= start || end >= size || s[start] != '[' || s[end] != ']') return -1;
#if defined(__x86_64__)
    if (use_sse) return parse_array_sse(s, size, start, end, out, cap);
#endif
    return parse_array_swar(s, size, start, end, out, cap);
}
