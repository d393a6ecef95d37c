// Shared by the CPU FFI kernels: how the calling thread waits for the work its pool helpers took.
#pragma once

#include <immintrin.h>

#include <thread>

namespace aphrodite_cpu {

// Spin briefly, then yield: on a loaded machine the thread we wait for may need this core.
template <typename Pred>
inline void wait_until(Pred done) {
  for (int spins = 0; !done(); ++spins) {
    if (spins < 2000) _mm_pause();
    else std::this_thread::yield();
  }
}

}  // namespace aphrodite_cpu
