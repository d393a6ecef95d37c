"""C++ kernels for the CPU, called through XLA FFI and compiled from these sources at first use (build.py)."""
