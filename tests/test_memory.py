"""Peak memory: the chunked backend's extra memory for forward+backward at the QK shape
(B=256, K=2^20, D=128, fp32 on CPU) is at most 5% of eager PyTorch's. Each is measured in its own
process (VmHWM after the step minus VmRSS before it, the peak mark reset once the inputs exist)."""

from contrastive_kernels.bench.cases import case
from contrastive_kernels.bench.measure import measure_isolated

QK = case("info_nce_bank", B=256, K=2**20, D=128, label="qk")


def test_chunked_extra_memory_is_under_5_percent_of_eager():
    eager = measure_isolated(QK, "reference", "cpu", repeats=0, timeout=600)
    fused = measure_isolated(QK, "chunked", "cpu", repeats=0, timeout=600)
    assert "error" not in eager and "error" not in fused, (eager, fused)
    assert eager["memory_exact"] and fused["memory_exact"]
    # eager holds the 256 x 2^20 fp32 logits (1 GiB) several times over
    assert eager["peak_extra_bytes"] > 2**30
    ratio = fused["peak_extra_bytes"] / eager["peak_extra_bytes"]
    print(f"extra peak memory: eager {eager['peak_extra_bytes'] / 2**20:.0f} MiB, "
          f"chunked {fused['peak_extra_bytes'] / 2**20:.0f} MiB ({100 * ratio:.1f}%)")
    assert ratio <= 0.05
