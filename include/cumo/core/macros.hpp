#pragma once
// Host/device annotation: one spelling for code that nvcc compiles for both sides and g++ sees as plain C++.
#if defined(__CUDACC__)
#define CUMO_HD __host__ __device__
#define CUMO_DEVICE __device__
#else
#define CUMO_HD
#define CUMO_DEVICE
#endif

#if defined(_MSC_VER)
#define CUMO_INLINE __forceinline
#else
#define CUMO_INLINE inline __attribute__((always_inline))
#endif
