// Register tiles of the AVX-512 attention kernels (see attention_avx512.cc for
// the register arithmetic). tests/test_attention.py::test_avx512_unit_under_simde
// runs the unit that uses them on machines without AVX-512.
#pragma once

constexpr int kSKR = 6;
constexpr int kSNV = 4;
constexpr int kDotRows = 4;
constexpr int kDotKB[kDotRows + 1] = {1, 8, 8, 4, 4};
constexpr int kPvMR = 6;
constexpr int kPvDC[kPvMR + 1] = {8, 8, 8, 6, 5, 4, 4};
