// The CUDA glue of csrc/cuda/infonce.cu, compiled for the emulator (see ck_emu.h).
#include "../cuda/infonce.cu"
