// The kernels of csrc/cuda/kernels_f64.cu, compiled for the emulator (see ck_emu.h).
#include "../cuda/kernels_f64.cu"
