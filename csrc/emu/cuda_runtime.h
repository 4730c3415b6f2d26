// Emulator shim (see ck_emu.h): stands in for the CUDA runtime header in the CK_CUDA_EMU build.
#pragma once
#include "ck_emu.h"
