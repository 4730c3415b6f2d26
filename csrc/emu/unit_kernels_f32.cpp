// The kernels of csrc/cuda/kernels_f32.cu, compiled for the emulator (see ck_emu.h).
#include "../cuda/kernels_f32.cu"
