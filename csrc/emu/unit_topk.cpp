// The CUDA glue of csrc/cuda/topk.cu, compiled for the emulator (see ck_emu.h).
#include "../cuda/topk.cu"
