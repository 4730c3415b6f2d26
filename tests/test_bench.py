"""The benchmark CLI: its outputs (table, CSV, JSON, plots) and its argument errors."""
import csv
import json
import os

import pytest

from contrastive_kernels.bench.__main__ import main, parse_args
from contrastive_kernels.bench.cases import PRESETS, build_step, case


def test_bench_cli_writes_every_output(tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["--preset", "cpu-quick", "--backends", "reference,chunked", "--repeats", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| case | shape |" in printed and "torch" in printed
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * len(PRESETS["cpu-quick"])
    for row in rows:
        assert row["note"] == "", row
        assert float(row["median_ms"]) > 0 and float(row["eff_tflops"]) > 0
        assert float(row["peak_extra_mib"]) >= 0
        assert float(row["speedup_vs_eager"]) > 0
    data = json.load(open(out / "results.json"))
    assert data["environment"]["torch"] and len(data["rows"]) == len(rows)
    assert (out / "results.md").read_text().startswith("Measured on")
    assert not (out / "results.partial.json").exists()  # replaced by the final files
    from contrastive_kernels import _ext

    if _ext.load() is not None:  # a CPU table names the arithmetic peak it can be read against
        assert data["environment"]["fp32 FMA peak"].endswith(" GFLOP/s")
        assert float(data["environment"]["fp32 FMA peak"].split()[0]) > 0


def test_environment_names_the_cpu_generation(tmp_path, monkeypatch):
    """family/model tell CPUs of one marketing name apart (their figures can differ 2x)."""
    from contrastive_kernels.bench import report

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC 9B45\n\n"
                    "processor\t: 1\ncpu family\t: 25\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k))
    assert report._cpu_model() == "AMD EPYC 9B45 (family 26 model 2)"
    assert report.environment("cpu")["device"].startswith("AMD EPYC 9B45 (family 26 model 2), ")
    assert "fp32 FMA peak" not in report.environment("cpu")


def test_bench_keeps_the_rows_of_a_run_cut_short(tmp_path, monkeypatch):
    """Rows are saved as they are measured: a run that dies after its first measurement leaves
    that row in results.partial.json."""
    from contrastive_kernels.bench import __main__ as cli

    calls = []

    def measure_then_die(c, backend, device, repeats):
        if calls:
            raise KeyboardInterrupt  # the time limit, in the middle of the second measurement
        calls.append(backend)
        return {"median_ms": 1.0, "min_ms": 1.0, "max_ms": 1.0, "peak_extra_bytes": 0, "memory_exact": True}

    monkeypatch.setattr(cli, "measure_in_process", measure_then_die)
    out = tmp_path / "res"
    with pytest.raises(KeyboardInterrupt):
        main(["--preset", "cpu-quick", "--backends", "chunked,reference", "--no-isolate", "--out", str(out)])
    rows = json.load(open(out / "results.partial.json"))["rows"]
    assert [r["backend"] for r in rows] == ["chunked"] and rows[0]["median_ms"] == 1.0
    assert not (out / "results.csv").exists()


def test_bench_sweep_plot(tmp_path):
    from contrastive_kernels.bench import cases

    cases.PRESETS["tiny-sweep"] = [case("info_nce_bank", B=16, K=k, D=8, label="s") for k in (64, 256)]
    try:
        main(["--preset", "tiny-sweep", "--backends", "reference,chunked", "--repeats", "1",
              "--no-isolate", "--out", str(tmp_path)])
    finally:
        del cases.PRESETS["tiny-sweep"]
    pngs = [p for p in os.listdir(tmp_path) if p.endswith(".png")]
    assert pngs and os.path.getsize(tmp_path / pngs[0]) > 1000


@pytest.mark.parametrize("argv,message", [
    (["--preset", "nope"], "unknown preset"),
    (["--dtype", "fp8"], "unknown dtype"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_bench_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_failing_backend_is_reported_not_fatal(tmp_path):
    rows_ok = main(["--preset", "cpu-quick", "--backends", "cuda", "--repeats", "1",
                    "--out", str(tmp_path)])
    assert rows_ok == 0
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert all("not available" in r["note"] or "exit" in r["note"] for r in rows)


def test_every_preset_case_builds():
    """Each preset case can build its step (at a tiny size, so this stays fast)."""
    for name, cases_ in PRESETS.items():
        for c in cases_:
            tiny = type(c)(c.op, tuple((k, min(v, 4 if k == "k" else 16)) for k, v in c.shape), "fp32", c.label)
            step, inputs = build_step(tiny, "chunked", "cpu")
            step()


def test_gpu_session_script_uses_existing_presets_and_candidates():
    """scripts/gpu_session.sh runs only on a lent GPU machine: keep its bench calls in step with
    the CLI here (every preset and candidate it names exists), and the script valid bash."""
    import re
    import subprocess

    from contrastive_kernels import functional
    from contrastive_kernels.bench import cases

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "gpu_session.sh")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    text = open(path).read()
    cases._load_baselines()
    known = set(functional.BACKEND_MODULES) | set(cases.BASELINES) | {"reference", "compile"}
    presets = re.findall(r"--preset (\S+)", text)
    backends = re.findall(r"--backends (\S+)", text)
    assert presets and backends
    for p in presets:
        assert set(p.split(",")) <= set(PRESETS), p
    for b in backends:
        assert set(b.split(",")) <= known, b
    for stage in ("setup", "test", "bench-loss", "bench-mixing", "bench-backends", "cuda-kernels", "profile", "topk"):
        assert f"    {stage})" in text, stage


def test_cuda_topk_simulation_ends_with_the_exact_top_k():
    """scripts/simulate_cuda_topk.py (the survivor and merge counts of the CUDA top-k cost model):
    its simulated queues are each row's exact top-k, and its counts are consistent."""
    import importlib.util

    import torch

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "simulate_cuda_topk.py")
    spec = importlib.util.spec_from_file_location("simulate_cuda_topk", path)
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)
    stats, queues, scores = sim.simulate(k=100, n=5000, d=32)
    want = scores.topk(100, dim=1).values
    for r, qv in enumerate(queues):
        assert torch.equal(qv, want[r]), r
    assert stats["tiles"] == 79 and 0 < stats["slow_tiles"] <= 79
    assert 100 <= stats["survivors_per_row"] <= 5000
    assert stats["merges_per_row"] >= stats["survivors_per_row"] / sim.CAP


def _fake_measure(calls=None):
    def measure(c, backend, device, repeats):
        if calls is not None:
            calls.append((c.op, c.shape, c.dtype, backend))
        return {"median_ms": 1.0, "min_ms": 1.0, "max_ms": 1.0, "peak_extra_bytes": 0, "memory_exact": True}
    return measure


@pytest.mark.parametrize("argv,message", [
    (["--backends", "refrence"], "unknown backend 'refrence'"),   # a typo: not a row per case
    (["--backends", ","], "--backends names no backend"),
    (["--device", "gpu"], "--device must be cpu or cuda"),
    (["--device", "meta"], "--device must be cpu or cuda"),
    (["--timeout", "0"], "--timeout must be > 0"),
    (["--preset", "cpu", "--backends", "faiss_cpu"], "nothing to measure"),
    (["--preset", "cpu,moco", "--device", "cpu"], "--preset moco is sized for a GPU"),
])
def test_bench_more_usage_errors(argv, message, capsys):
    """Arguments that used to run every case (a process pair each on the CPU) into an error row,
    or time every measurement out at once, are one usage error up front."""
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err


def test_faiss_missing_is_said_in_the_row(monkeypatch):
    """Without faiss the FAISS row said "faiss_cpu does not support topk"."""
    import sys

    from contrastive_kernels.bench.cases import build_step, case

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(RuntimeError, match="faiss is not installed.*pip install faiss-cpu"):
        build_step(case("topk", M=4, N=64, D=8, k=2), "faiss_cpu", "cpu")


def test_bench_backend_list_tolerates_spaces_and_repeats(tmp_path, monkeypatch):
    from contrastive_kernels.bench import __main__ as cli

    assert parse_args(["--backends", "reference, chunked,,reference"]).backends == "reference,chunked"
    monkeypatch.setattr(cli, "measure_in_process", _fake_measure())
    main(["--preset", "cpu-quick", "--backends", "reference, chunked", "--no-isolate", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["backend"] for r in rows] == ["reference", "chunked"] * 3 and all(not r["note"] for r in rows)


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_bench_out_that_cannot_be_a_folder_is_a_usage_error(tmp_path, monkeypatch, capsys, kind):
    """--out naming a file (or a path below one) failed with a traceback after the first
    measurement (minutes into a CPU run); now before any."""
    from contrastive_kernels.bench import __main__ as cli

    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if kind == "file" else tmp_path / "f" / "sub"
    calls = []
    monkeypatch.setattr(cli, "measure_in_process", _fake_measure(calls))
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "cpu-quick", "--backends", "reference", "--no-isolate", "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--out" in err and "Traceback" not in err
    assert calls == [] and (tmp_path / "f").read_text() == "x"


def test_bench_partial_of_an_earlier_run_is_not_left_as_this_runs(tmp_path, monkeypatch):
    """A run cut short before its first row used to leave the partial rows of an earlier run with
    another configuration in results.partial.json, as if they were its own."""
    from contrastive_kernels.bench import __main__ as cli

    out = tmp_path / "res"
    (out).mkdir()
    (out / "results.partial.json").write_text(json.dumps({"rows": [{"label": "quick", "backend": "chunked"}]}))

    def die(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "measure_in_process", die)
    with pytest.raises(KeyboardInterrupt):
        main(["--preset", "cpu", "--backends", "reference", "--no-isolate", "--out", str(out)])
    partial = json.load(open(out / "results.partial.json"))
    assert partial["rows"] == []
    assert partial["config"]["preset"] == "cpu" and partial["config"]["backends"] == "reference"


def test_bench_case_shared_by_two_presets_is_measured_once(tmp_path, monkeypatch):
    """--preset gpu holds B=256 K=65536 D=128 bf16 (moco, mochi) and B=1024 K=2^20 D=128 bf16
    (qk, sweep) twice: each was measured twice per backend and drawn twice in the sweep plot."""
    from contrastive_kernels.bench import __main__ as cli
    from contrastive_kernels.bench import cases

    dups = lambda name: [(c.op, c.shape, c.dtype) for c in PRESETS[name]]  # noqa: E731
    assert len(set(dups("gpu"))) < len(dups("gpu"))  # the situation this guards against
    monkeypatch.setitem(cases.PRESETS, "tiny-a", [case("info_nce_bank", B=8, K=64, D=8, label="a")])
    monkeypatch.setitem(cases.PRESETS, "tiny-b", [case("info_nce_bank", B=8, K=k, D=8, label="b")
                                                  for k in (64, 256)])
    calls = []
    monkeypatch.setattr(cli, "measure_in_process", _fake_measure(calls))
    main(["--preset", "tiny-a,tiny-b", "--backends", "reference,chunked", "--no-isolate", "--out", str(tmp_path)])
    assert len(calls) == len(set(calls)) == 4
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(r["label"], r["shape"], r["backend"]) for r in rows] == [
        ("a+b", "B=8 K=64 D=8", "reference"), ("a+b", "B=8 K=64 D=8", "chunked"),
        ("b", "B=8 K=256 D=8", "reference"), ("b", "B=8 K=256 D=8", "chunked")]


def test_write_csv_replaces_the_old_file_atomically(tmp_path, monkeypatch):
    """A write that fails half-way (Ctrl-C, a full disk) keeps the previous results.csv whole."""
    from contrastive_kernels.bench import report

    path = tmp_path / "results.csv"
    path.write_text("old results\n")

    def fail(self, row):
        raise KeyboardInterrupt

    monkeypatch.setattr(csv.DictWriter, "writerow", fail)
    with pytest.raises(KeyboardInterrupt):
        report.write_csv([{"label": "x"}], str(path))
    assert path.read_text() == "old results\n" and os.listdir(tmp_path) == ["results.csv"]


def test_bench_help_names_every_candidate(capsys, monkeypatch):
    """--help listed only the library's backends; README.md's outside candidates (infcl,
    torch-topk, gemm-only, faiss_cpu, faiss-gpu, eager-mochi) are accepted too."""
    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside hyphenated names
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("reference", "compile", "chunked", "triton", "cpu", "cuda", "infcl", "torch-topk",
                 "gemm-only", "faiss_cpu", "faiss-gpu", "eager-mochi"):
        assert name in text, name


def test_list_into_a_closed_pipe_says_nothing(tmp_path):
    """`python -m contrastive_kernels.bench --list | head -1`: the reader leaves early; no
    BrokenPipeError traceback."""
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run([sys.executable, "-m", "contrastive_kernels.bench", "--list"],
                          stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(write_end)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_a_new_run_replaces_the_plots_of_an_earlier_one(tmp_path, monkeypatch):
    """Plots of cases the new run did not measure go; a PNG of the user's own stays."""
    from contrastive_kernels.bench import __main__ as cli
    from contrastive_kernels.bench import cases

    monkeypatch.setattr(cli, "measure_in_process", lambda c, backend, device, repeats: {
        "median_ms": 1.0, "min_ms": 1.0, "max_ms": 1.0, "peak_extra_bytes": 0, "memory_exact": True})
    (tmp_path / "mine.png").write_bytes(b"not ours")
    monkeypatch.setitem(cases.PRESETS, "sweep-a", [case("info_nce_bank", B=16, K=k, D=8, label="a") for k in (64, 256)])
    monkeypatch.setitem(cases.PRESETS, "sweep-b", [case("info_nce_bank", B=32, K=k, D=8, label="b") for k in (64, 256)])
    argv = ["--backends", "reference", "--no-isolate", "--out", str(tmp_path)]
    main(["--preset", "sweep-a", *argv])
    first = {p for p in os.listdir(tmp_path) if p.endswith(".png")} - {"mine.png"}
    main(["--preset", "sweep-b", *argv])
    second = {p for p in os.listdir(tmp_path) if p.endswith(".png")} - {"mine.png"}
    assert len(first) == len(second) == 1 and first != second
    assert (tmp_path / "mine.png").read_bytes() == b"not ours"
    for foreign in ("5", "null", '{"a": 1}', "not json"):  # a plots.json we did not write: ignored
        (tmp_path / "plots.json").write_text(foreign)
        assert main(["--preset", "sweep-a", *argv]) == 0
    assert (tmp_path / "mine.png").exists()


def test_a_peak_that_could_not_be_reset_is_shown_as_a_bound():
    from contrastive_kernels.bench.report import markdown

    row = dict(label="x", op="info_nce_bank", shape="B=1", dtype="fp32", backend="chunked", note="",
               median_ms=1.0, min_ms=1.0, max_ms=1.0, eff_tflops=1.0, peak_extra_mib=12.0)
    exact = markdown([dict(row, memory_exact=True)], {"torch": "x"}, cpu=True)
    bound = markdown([dict(row, memory_exact=False)], {"torch": "x"}, cpu=True)
    assert "| 12 |" in exact and "upper bound" not in exact
    assert "| <= 12 |" in bound and "upper bound" in bound


def test_tables_mark_memory_bounds():
    """Where the peak RSS cannot be reset the figure is an upper bound: both tables say so, per
    figure, and a ratio to eager with a bound on either side is marked as an estimate."""
    import argparse

    from contrastive_kernels.bench import distributed, report

    env = {"date": "d", "torch": "t", "python": "p", "device": "cpu"}
    args = argparse.Namespace(threads=1, chunk_mb=8, backend="chunked", local_batch=None, repeats=3)
    row = dict(loss="info_nce", strategy="gather", world=2, global_batch=64, local_batch=32, D=16,
               dtype="fp32", median_ms_max_rank=3.0, peak_extra_mib_max_rank=1.5,
               sent_mib_per_rank=0.1, formula_mib_per_rank=0.1)
    exact = distributed.markdown([dict(row, memory_exact=True)], env, args)
    bound = distributed.markdown([dict(row, memory_exact=False)], env, args)
    assert "| 1.5 |" in exact and "upper bound" not in exact
    assert "| <= 1.5 |" in bound and "upper bound" in bound

    base = dict(label="moco", op="info_nce", shape="B=2", dtype="fp32", backend="chunked", median_ms=2.0,
                min_ms=1.0, max_ms=3.0, eff_tflops=1e-3, peak_extra_mib=4.0, speedup_vs_eager=2.0,
                memory_vs_eager=0.5)
    exact = report.markdown([dict(base, memory_exact=True, memory_vs_eager_mark="")], env, cpu=True)
    bound = report.markdown([dict(base, memory_exact=False, memory_vs_eager_mark="<= ")], env, cpu=True)
    estimate = report.markdown([dict(base, memory_exact=False, memory_vs_eager_mark="~ ")], env, cpu=True)
    assert "| 4 | 2 | 0.5 |" in exact and "upper bound" not in exact
    assert "| <= 4 | 2 | <= 0.5 |" in bound and "upper bound" in bound
    assert "| <= 4 | 2 | ~ 0.5 |" in estimate


def test_memory_ratio_marks(monkeypatch):
    """Which ratio to eager is a bound: the backend's bound over eager's exact figure is one; over
    eager's bound only an estimate; eager's ratio to itself is exactly 1."""
    from contrastive_kernels.bench.__main__ import ratios_to_eager

    def row(backend, exact, shape="B=2"):
        return dict(op="info_nce", shape=shape, dtype="fp32", backend=backend, median_ms=2.0,
                    peak_extra_mib=4.0 if backend == "reference" else 1.0, memory_exact=exact)

    rows = [row("reference", True), row("chunked", False), row("cpu", True),
            row("reference", False, "B=4"), row("chunked", False, "B=4"), row("cpu", True, "B=4")]
    ratios_to_eager(rows)
    assert [r["memory_vs_eager_mark"] for r in rows] == ["", "<= ", "", "", "~ ", "~ "]
    assert [r["memory_vs_eager"] for r in rows] == [1.0, 0.25, 0.25] * 2
