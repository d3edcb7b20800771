"""benchmarks/profile_gpu.py's pure aggregation on synthetic kernel records, its CPU refusal and
its plumbing (a CPU smoke run); benchmarks/pipeline.py end to end in quick mode on CPU."""
import importlib.util
import json
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pg = _load("profile_gpu")

# Kernel names as torch 2.x / cuDNN 9 / Triton print them on an H100 (shortened templates).
NAMES = {
    "void cudnn::engines_precompiled::nhwcSliceCKernel<__nv_bfloat16, 4>(...)": "copy+slice",
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<"
    "at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}>>": "copy+slice",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>": "copy+slice",
    "Memcpy DtoD (Device -> Device)": "copy+slice",
    "void cudnn::engines_precompiled::nhwcAddPaddingKernel<__nv_bfloat16, ...>": "copy+slice",
    "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, ...>": "copy+slice",
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "conv",
    "sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "conv",
    "sm80_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "conv",
    "void cudnn::bn_fw_tr_1C11_kernel_NCHW<__nv_bfloat16, float, 512, true, 1>(...)": "batchnorm",
    "void at::native::batch_norm_collect_statistics_channels_last_kernel<...>": "batchnorm",
    "void at::native::batch_norm_backward_elemt_channels_last_kernel<...>": "batchnorm",
    "_bn_stats_partial_kernel": "batchnorm",
    "_bn_bwd_dx_kernel": "batchnorm",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64_warpgroupsize1x1x1": "gemm",
    "void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm_64x64_16x6_tn_align4>(...)": "gemm",
    "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::"
    "threshold_kernel_impl<c10::BFloat16>...": "elementwise",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, ...>": "elementwise",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>": "elementwise",
    "_pgd_step_kernel": "elementwise",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<...>>>": "reduction",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>": "reduction",
    "_gated_mix_fwd_kernel": "reduction",
    "void some_unknown_kernel<int>": "other",
}


@pytest.mark.parametrize("name,category", NAMES.items(), ids=[n[:48] for n in NAMES])
def test_categorize_real_kernel_names(name, category):
    assert pg.categorize(name) == category


def test_categorize_refuses_a_non_name():
    with pytest.raises(TypeError, match="expected a kernel name \\(str\\), got int"):
        pg.categorize(3)


def _records():
    # two iterations; start times make two kernels overlap by 5 us (another stream)
    return [
        ("sm90_xmma_fprop_implicit_gemm_bf16", 100.0, 0.0),
        ("_bn_apply_kernel", 40.0, 100.0),
        ("nhwcSliceCKernel", 30.0, 135.0),          # overlaps the BN kernel by 5 us
        ("vectorized_elementwise_kernel<CUDAFunctor_add>", 10.0, 300.0),
        ("sm90_xmma_fprop_implicit_gemm_bf16", 100.0, 1000.0),
        ("_bn_apply_kernel", 40.0, 1100.0),
        ("mystery", 20.0, 1200.0),
    ]


def test_summarize_per_iteration_figures():
    s = pg.summarize(_records(), wall_ms=0.5, iters=2)
    kernel_us = 100 + 40 + 30 + 10 + 100 + 40 + 20
    assert s["kernel_ms"] == pytest.approx(kernel_us / 2 / 1e3)
    assert s["busy_ms"] == pytest.approx((kernel_us - 5) / 2 / 1e3)       # the overlap counted once
    assert s["idle_fraction"] == pytest.approx(1 - (kernel_us - 5) / 2 / 1e3 / 0.5)
    assert s["launches"] == pytest.approx(3.5)
    assert s["categories"] == pytest.approx({"conv": 0.1, "batchnorm": 0.04, "elementwise": 0.005, "gemm": 0.0,
                                             "copy+slice": 0.015, "reduction": 0.0, "other": 0.01})
    assert set(s["categories"]) == set(pg.CATEGORIES)
    assert sum(s["categories"].values()) == pytest.approx(s["kernel_ms"])
    top = s["top"]
    assert [t["name"] for t in top] == ["sm90_xmma_fprop_implicit_gemm_bf16", "_bn_apply_kernel", "nhwcSliceCKernel",
                                        "mystery", "vectorized_elementwise_kernel<CUDAFunctor_add>"]
    assert top[0]["ms"] == pytest.approx(0.1) and top[0]["launches"] == 1 and top[0]["category"] == "conv"
    assert top[0]["share"] == pytest.approx(200 / kernel_us)


def test_summarize_without_starts_and_busy_over_wall():
    recs = [(name, dur) for name, dur, _ in _records()]
    s = pg.summarize(recs, wall_ms=0.1, iters=1, top=2)
    assert s["busy_ms"] == s["kernel_ms"] == pytest.approx(0.34)
    assert s["idle_fraction"] == 0.0            # more kernel time than wall: clipped, not negative
    assert len(s["top"]) == 2


def test_summarize_no_records():
    s = pg.summarize([], wall_ms=2.0, iters=3)
    assert s["kernel_ms"] == s["busy_ms"] == 0 and s["idle_fraction"] == 1.0 and s["top"] == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(records=[], wall_ms=1.0, iters=0), "iters expected a positive int, got 0"),
    (dict(records=[], wall_ms=0.0, iters=1), "wall_ms expected a number > 0, got 0.0"),
    (dict(records=[("k", -1.0)], wall_ms=1.0, iters=1), "expected \\(name, duration_us >= 0"),
    (dict(records=[("k",)], wall_ms=1.0, iters=1), "expected \\(name, duration_us >= 0"),
])
def test_summarize_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pg.summarize(**kwargs)


def test_kernel_records_from_a_chrome_trace():
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "_bn_apply_kernel", "ts": 10.5, "dur": 3.25},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 20, "dur": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::conv2d", "ts": 0, "dur": 50},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 1, "dur": 2},
        {"ph": "f", "cat": "kernel", "name": "flow", "ts": 1},
        {"ph": "M", "name": "process_name"},
    ]}
    assert pg.kernel_records(trace) == [("_bn_apply_kernel", 3.25, 10.5), ("Memcpy HtoD", 1.0, 20.0)]
    assert pg.kernel_records(trace, ("cpu_op",)) == [("aten::conv2d", 50.0, 0.0)]
    with pytest.raises(ValueError, match="expected a Chrome trace dict with a 'traceEvents' list"):
        pg.kernel_records({"events": []})


def _row(group, path, wall):
    return {"group": group, "path": path, **pg.summarize([(n, d, t) for n, d, t in _records()], wall, 2)}


def test_render_markdown_and_short_table():
    results = [_row("experts b512 fwd+bwd", "grouped", 0.5), _row("experts b512 fwd+bwd", "loop", 0.8),
               {"group": "pgd10 mixture b512 eval", "path": "grouped+fusedbn", "error": "RuntimeError: boom"}]
    meta = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.x", "triton": "3.x", "cuda": "12.x", "cudnn": 90000,
            "date": "today", "command": "python benchmarks/profile_gpu.py"}
    md = pg.render_markdown(results, meta)
    assert md.startswith("# Where the time goes on NVIDIA H100 80GB HBM3")
    assert "## experts b512 fwd+bwd" in md and "## pgd10 mixture b512 eval" in md
    assert "| grouped | 0.5 | 0.2 | 0.2 | 66% |" in md    # busy 0.1675 ms of 0.5: idle 66%
    assert "| grouped+fusedbn | failed: RuntimeError: boom |" in md
    assert md.count("### Top kernels") == 2
    table = pg.short_table(results)
    assert "experts b512 fwd+bwd | loop" in table and "failed: RuntimeError: boom" in table


def test_refuses_without_cuda(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal path does not apply")
    assert pg.main(["--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("skipped: needs CUDA")
    assert not any(tmp_path.iterdir())


def test_cpu_smoke_run_writes_both_reports(tmp_path):
    # the plumbing of the GPU run (models, steps, profiler, trace parsing, reports) on CPU
    only = "pgd2 mixture b4 eval | grouped$"   # the $ leaves out grouped+fusedbn (interpreted Triton: slow)
    assert pg.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--only", only]) == 0
    data = json.loads((tmp_path / "profile.json").read_text())
    (row,) = data["workloads"]
    assert "error" not in row, row
    assert row["path"] == "grouped" and row["wall_ms"] > 0 and row["launches"] > 0 and len(row["top"]) == 10
    assert data["meta"]["quick"] and "smoke run" in data["meta"]["note"]
    assert "pgd2 mixture b4 eval" in (tmp_path / "PROFILE.md").read_text()


# ============================================================================ benchmarks/pipeline.py
pl = _load("pipeline")


def test_expected_max_draw_by_enumeration():
    import itertools
    values = (10, 20, 30, 40, 50)
    for n in (1, 2, 4):
        brute = sum(max(c) for c in itertools.product(values, repeat=n)) / len(values) ** n
        assert pl.expected_max_draw(values, n) == pytest.approx(brute)
    assert pl.expected_max_draw(values, 1) == pytest.approx(30.0)
    with pytest.raises(ValueError, match="non-empty set and n >= 1"):
        pl.expected_max_draw([], 2)


def test_project_recovers_a_linear_cost():
    passes = [10, 50, 30, 1, 20]
    times = [0.05 + 0.02 * p for p in passes]
    r = pl.project(times, passes, expected_passes=42.0, steps_per_epoch=390)
    assert r["fit_a_s"] == pytest.approx(0.05) and r["fit_b_s"] == pytest.approx(0.02)
    assert r["step_s"] == pytest.approx(0.05 + 0.02 * 42)
    assert r["epoch_s"] == pytest.approx(390 * (0.05 + 0.02 * 42))
    assert r["mean_epoch_s"] == pytest.approx(390 * sum(times) / 5)
    same = pl.project([1.0, 3.0], [7, 7], expected_passes=20.0, steps_per_epoch=10)
    assert same["fit_b_s"] == 0.0 and same["step_s"] == 2.0 and same["epoch_s"] == 20.0
    with pytest.raises(ValueError, match="as many step times as pass counts"):
        pl.project([1.0], [1, 2], 1.0, 10)


def test_pipeline_quick_runs_end_to_end(tmp_path, capsys):
    assert pl.main(["--quick", "--out", str(tmp_path), "--executor", "grouped"]) == 0
    data = json.loads((tmp_path / "pipeline.json").read_text())
    p1, p2 = data["phases"]
    assert (p1["phase"], p2["phase"]) == (1, 2)
    for p in (p1, p2):
        assert p["steps_timed"] == 2 and p["steps_per_epoch"] == 16 // 2 and p["mean_step_s"] > 0
        assert p["pgd_steps_set"] == [1, 2, 3, 4, 5]   # steps_scale 0.1 of the paper's {10..50}
        assert 1 <= p["mean_passes"] <= 5
    assert p1["expected_passes"] == pytest.approx(3.0)  # one PGD expert of three: the mean draw
    assert p2["expected_passes"] == pytest.approx(0.5 * 1 + 0.5 * 3)
    out = capsys.readouterr().out
    assert "paper recipe (30+30 epochs" in out and "projected" in out
    assert "Training pipeline" in (tmp_path / "pipeline.md").read_text()


def test_pipeline_full_size_refuses_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert pl.main([]) == 0
    assert capsys.readouterr().out.startswith("skipped: needs CUDA")


def test_kernel_floor_quick_runs_end_to_end(tmp_path, capsys):
    kf = _load("kernel_floor")
    assert kf.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "kernel_floor.json").read_text())
    kernels = [r["kernel"] for r in data["rows"]]
    assert kernels[:2] == ["gated_mix forward", "gated_mix backward"] and len(kernels) == 5
    assert data["copy_gb_s"] > 0 and all(r["events_ms"] > 0 and r["floor_ms"] > 0 for r in data["rows"])
    # the floor is bytes over the measured bandwidth: 4 full tensors for a pgd_step
    step = data["rows"][2]
    assert step["bytes"] == 4 * 4 * 3 * 3 * 8 * 8 * 4
    assert abs(step["floor_ms"] - step["bytes"] / (data["copy_gb_s"] * 1e9) * 1e3) < 1e-9
    assert "smoke run" in capsys.readouterr().out
