// The kernels of csrc/cuda/kernels_bf16.cu, compiled for the emulator (see ck_emu.h).
#include "../cuda/kernels_bf16.cu"
