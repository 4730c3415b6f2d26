// Run-time choice of the kernel table (see isa.h). Compiled for the baseline ISA.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "isa.h"

namespace ck {
namespace cpu {
namespace {

bool has_avx2() {
#if defined(CK_X86_DISPATCH)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

bool has_avx512() {
#if defined(CK_X86_DISPATCH)
  __builtin_cpu_init();
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

const KernelTable* table_named(const std::string& name) {
#if defined(CK_X86_DISPATCH)
  if (name == "avx512") return has_avx512() ? avx512::kernel_table() : nullptr;
  if (name == "avx2") return has_avx2() ? avx2::kernel_table() : nullptr;
#endif
  if (name == "generic") return generic::kernel_table();
  return nullptr;
}

const KernelTable* best() {
#if defined(CK_X86_DISPATCH)
  if (has_avx512()) return avx512::kernel_table();
  if (has_avx2()) return avx2::kernel_table();
#endif
  return generic::kernel_table();
}

const KernelTable* initial() {
  const char* env = std::getenv("CK_CPU_ISA");
  if (env != nullptr && *env != '\0' && std::strcmp(env, "auto") != 0) {
    const KernelTable* t = table_named(env);
    if (t != nullptr) return t;
  }
  return best();
}

std::atomic<const KernelTable*>& current() {
  static std::atomic<const KernelTable*> table{initial()};
  return table;
}

}  // namespace

const KernelTable* kernel_table() { return current().load(std::memory_order_relaxed); }

bool set_isa(const char* name) {
  const KernelTable* t = std::strcmp(name, "auto") == 0 ? best() : table_named(name);
  if (t == nullptr) return false;
  current().store(t, std::memory_order_relaxed);
  return true;
}

const char* supported_isas() {
  if (has_avx512()) return "avx512,avx2,generic";
  if (has_avx2()) return "avx2,generic";
  return "generic";
}

}  // namespace cpu
}  // namespace ck
