// The kernels of csrc/cuda/kernels_f16.cu, compiled for the emulator (see ck_emu.h).
#include "../cuda/kernels_f16.cu"
