"""CPU kernels written in C++ and called through XLA FFI, built from source at first use."""
