// The CUDA glue of csrc/cuda/mixing.cu, compiled for the emulator (see ck_emu.h).
#include "../cuda/mixing.cu"
