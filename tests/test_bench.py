"""`vrmoe bench`: the rows it prints, its measuring helpers, its errors. No timing assertions:
performance targets live in the benchmark's output, not in tests."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vrmoe.bench import (TINY, Row, gpu_rows, interleaved_times, median_interval, parts_ratios, peak_memory_mb,
                         ratio_fields, render_markdown, round_ratios)
from vrmoe.bench import main as bench_main
from vrmoe.config import ConfigError

from conftest import run_cli

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_tiny_bench_prints_every_row_as_markdown(tmp_path):
    out = run_cli("bench", "--tiny", "--format", "markdown", cwd=tmp_path).stdout
    assert out.startswith("**vrmoe bench on CPU ")
    assert "| measurement | ms | ratio | 95% interval | target | met | peak MB | note |" in out
    for row in ["| dense SwiGLU floor |", "| vrmoe MoE layer |", "| HF Mixtral sparse block |",
                "| train step: topk |", "| train step: variational diag / topk |",
                "| train step: variational full / topk |", "| train step: variational diag, shared hidden / topk |",
                "| train step: vtsr / topk |", "| train step: temperature / topk |",
                "| train step: mc_dropout / topk |", "| eval: variational diag S=4 / S=1 |",
                "| eval: variational full S=4 / S=1 |", "| eval: mc_dropout S=4 / S=1 |",
                "| eval: vtsr S=4 / S=1 |", "| floor: variational diag S=1 + drawing S=4 normals / S=1 |",
                "| peak memory: eval variational diag S=4 / S=1 |", "| peak memory: eval mc_dropout S=4 / S=1 |",
                "| train step throughput (topk) |", "| floor: topk + the variational diag heads' fwd+bwd / topk |"]:
        assert row in out, row
    assert out.count("| train step: variational full / topk |") == 2  # the layer and the whole model
    assert "*MoE layer fwd+bwd: T=256 D=32 F=64 E=4 K=2, fp32*" in out
    assert "*Router overhead, MoE layer: T=256 D=32 F=64 E=8 K=2*" in out  # the scaling with E
    assert "*Router overhead, whole model: model=tiny" in out
    assert "by width" not in out  # the width section runs only when asked for
    dense_row = next(line for line in out.splitlines() if line.startswith("| dense SwiGLU floor |"))
    assert "| 1.000x |" in dense_row  # the floor is the unit of the layer ratios

    def cells(name: str, section: str = "") -> list[list[str]]:
        lines, current = [], ""
        for line in out.splitlines():
            current = line if line.startswith("*") else current
            if line.startswith(f"| {name} |") and section in current:
                lines.append([c.strip() for c in line.strip("|").split("|")])
        return lines

    # The targets, each printed with its verdict; the other rows are for information. The MoE
    # layer's is the bench's; a router's are its own (Router.bench_targets).
    assert all(c[4] == "<= 1.05" and c[5] in ("yes", "NO", "~yes", "~NO") for c in cells("vrmoe MoE layer"))
    assert [c[4] for c in cells("train step: vtsr / topk")] == ["", "<= 1.03"]
    assert [c[4] for c in cells("eval: mc_dropout S=4 / S=1")] == ["<= 1.40", "<= 1.40"]
    assert [c[4] for c in cells("eval: vtsr S=4 / S=1")] == ["", ""]
    assert [c[4] for c in cells("peak memory: eval mc_dropout S=4 / S=1")] == ["<= 1.10", "<= 1.10"]

    def floor_target(row: str, floor: str, section: str) -> None:
        """The row's target is the median of its floor's row in the same section (E <= 16)."""
        (floor_cells,) = cells(floor, section)
        for target_cells in cells(row, section):
            # The target prints to 2 decimals, the floor's ratio to 3: equal up to their rounding.
            assert abs(float(target_cells[4].removeprefix("<= ")) - float(floor_cells[2].rstrip("x"))) <= 0.0051
            assert "floor (median)" in target_cells[7] and target_cells[5] in ("yes", "NO", "~yes", "~NO")

    # The variational router is held to its floors: training at its heads' (each variant its own),
    # evaluation at drawing the normals.
    for label in ("variational diag", "variational full", "variational diag, shared hidden"):
        for section in ("T=256 D=32 F=64 E=4", "whole model"):
            floor_target(f"train step: {label} / topk", f"floor: topk + the {label} heads' fwd+bwd / topk", section)
            floor_target(f"train step by parts: {label} / topk", f"floor: topk + the {label} heads' fwd+bwd / topk",
                         section)
            floor_target(f"eval: {label} S=4 / S=1", f"floor: {label} S=1 + drawing S=4 normals / S=1", section)
    floor_target("train step: variational diag / topk", "floor: topk + the variational diag heads' fwd+bwd / topk",
                 "E=8 K=2")
    # Timed ratios come with an interval of the median; the memory ratio is one measurement.
    low, high = map(float, cells("eval: mc_dropout S=4 / S=1")[0][3].split("-"))
    assert low <= float(cells("eval: mc_dropout S=4 / S=1")[0][2].rstrip("x")) <= high
    assert cells("peak memory: eval mc_dropout S=4 / S=1")[0][3] == ""
    # The training floor: Top-K's step plus the heads alone, at the layer and over the model, for
    # each variant with heads; the routers without heads have none.
    assert len(cells("floor: topk + the variational diag heads' fwd+bwd / topk")) == 3
    assert len(cells("floor: topk + the variational full heads' fwd+bwd / topk")) == 2
    assert len(cells("floor: topk + the vtsr heads' fwd+bwd / topk")) == 2
    assert "mc_dropout heads" not in out and "temperature heads" not in out
    # Every router's step by parts, at the layer and over the model, under the whole step's target.
    for label in ("mc_dropout", "temperature", "variational diag", "variational full", "vtsr"):
        assert [c[4] for c in cells(f"train step by parts: {label} / topk")] == \
            [c[4] for c in cells(f"train step: {label} / topk")]
    assert [c[4] for c in cells("train step by parts: mc_dropout / topk")] == ["", "<= 1.03"]


RECORD_NAME = r"(?P<date>\d{4}-\d{2}-\d{2})_(?P<device>[a-z0-9-]+)_(?P<commit>[0-9a-f]{7}|no-commit)(?:_(?P<label>[a-z0-9-]+))?\.md"
RECORD_KEYS = ["date", "commit", "device", "python", "torch", "vrmoe", "transformers", "command"]


def record_fields(text: str) -> dict[str, str]:
    """A record's header: its leading ``- key: value`` lines."""
    header = text.split("\n\n", 1)[0]
    return dict(line[2:].split(": ", 1) for line in header.splitlines())


def test_record_keeps_the_markdown_output_named_by_date_device_and_commit(tmp_path):
    from vrmoe.tracking import software_versions

    proc = run_cli("bench", "--tiny", "--only", "layer", "--format", "markdown", "--record", "records",
                   "--label", "smoke-1", cwd=tmp_path)
    (path,) = (tmp_path / "records").iterdir()
    match = re.fullmatch(RECORD_NAME, path.name)
    assert match and match["device"].startswith("cpu") and match["label"] == "smoke-1"
    versions = software_versions()
    text = path.read_text()
    fields = record_fields(text)
    assert list(fields) == RECORD_KEYS
    # The commit is that of the vrmoe the command imported: a checkout's, or none for an installed wheel
    # (CI installs one, while this process may import the checkout), so the name and header must agree.
    if match["commit"] == "no-commit":
        assert fields["commit"] == "not recorded (not a git checkout)"
    else:
        assert fields["commit"].startswith(match["commit"])
    assert fields["date"].startswith(match["date"]) and fields["date"].endswith(" UTC")
    assert fields["commit"].endswith(("(clean tree)", "(with uncommitted changes)", "(not a git checkout)"))
    assert fields["device"].startswith("CPU ") and fields["torch"] == versions["torch"]
    assert fields["python"] == versions["python"] and fields["vrmoe"] == versions["vrmoe"]
    assert fields["command"] == ("`OMP_NUM_THREADS=1 vrmoe bench --tiny --only layer --format markdown --record records "
                                 "--label smoke-1`")
    body = text.split("\n\n", 1)[1]
    assert body.startswith("**vrmoe bench on CPU ") and body.rstrip() in proc.stdout  # the output as printed
    # The same run again is refused before it measures anything; a label names it apart.
    again = run_cli("bench", "--tiny", "--only", "layer", "--record", "records", "--label", "smoke-1", cwd=tmp_path,
                    check=False)
    assert again.returncode == 2 and f"{path.relative_to(tmp_path)} exists; add --label" in again.stderr


def test_record_name_and_header_from_their_parts():
    from datetime import date, datetime, timezone

    from vrmoe.bench import record_header, record_path

    assert record_path(Path("r"), date(2026, 12, 3), "cpu-amd-epyc", "6d6096eff29b+dirty", "run1") == \
        Path("r/2026-12-03_cpu-amd-epyc_6d6096e_run1.md")
    assert record_path(Path("r"), date(2026, 12, 3), "nvidia-h100", None).name == "2026-12-03_nvidia-h100_no-commit.md"
    header = record_header(datetime(2026, 12, 3, 7, 5, tzinfo=timezone.utc),
                           {"vrmoe": "0.1.0", "python": "3.11.2", "torch": "2.13.0", "transformers": None,
                            "git_commit": "abc123+dirty"}, "CPU X", "vrmoe bench")
    assert record_fields(header) == {"date": "2026-12-03 07:05 UTC", "commit": "abc123 (with uncommitted changes)",
                                     "device": "CPU X", "python": "3.11.2", "torch": "2.13.0", "vrmoe": "0.1.0",
                                     "transformers": "not installed", "command": "`vrmoe bench`"}


def test_the_kept_records_are_named_and_headed_alike():
    records = sorted((Path(__file__).resolve().parents[1] / "experiments" / "results" / "bench").glob("*.md"))
    assert records
    for path in records:
        assert re.fullmatch(RECORD_NAME, path.name), path.name
        fields = record_fields(path.read_text())
        assert list(fields) == RECORD_KEYS, path.name
        assert fields["date"].startswith(path.name[:10]), path.name


@pytest.mark.parametrize("args, message", [
    (["--label", "run1"], "--label names a record's file: add --record DIR"),
    (["--record", "r", "--label", "Run 1"], "--label 'Run 1': lower-case letters, digits and single hyphens"),
])
def test_bad_record_options_name_the_option(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        bench_main(["--tiny", "--only", "layer", *[str(tmp_path / a) if a == "r" else a for a in args]])


def test_width_section_runs_only_when_asked_at_the_widths_given(tmp_path):
    out = run_cli("bench", "--tiny", "--only", "width", "--widths", "8", "16", "--format", "markdown",
                  cwd=tmp_path).stdout
    assert ("*variational diag against topk by width, MoE layer: E=4 F=2D K=2 S=4, T x D^2 = 65,536 (the same "
            "FLOPs per step at every width)*") in out
    assert "Router overhead" not in out and "MoE layer fwd+bwd" not in out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| D=")]
    # T x D^2 = 256 x 16^2 at every width: 1024 tokens at D = 8, 256 at D = 16.
    assert [r[0] for r in rows] == [f"D={d} T={t}: {name}" for d, t in ((8, 1024), (16, 256)) for name in (
        "train step: topk", "train step: variational diag / topk",
        "floor: topk + the variational diag heads' fwd+bwd / topk", "eval: topk",
        "eval: variational diag S=4 / topk", "floor: topk eval + drawing S=4 normals / topk")]
    for r in rows:
        if r[0].endswith(": topk"):
            assert r[2] == "1.000x" and r[3] == ""  # the baselines
        else:  # a ratio with its interval (one round: the ratio itself), no target
            assert r[3] == f"{float(r[2].rstrip('x')):.3f}-{float(r[2].rstrip('x')):.3f}" and r[4] == ""


def test_every_router_target_is_a_ratio_or_a_floor_the_bench_measures(monkeypatch):
    from vrmoe.bench import check_router_targets
    from vrmoe.model.routers import ROUTERS

    check_router_targets()
    assert ROUTERS["variational"].bench_targets == {"model train": "heads", "layer train": "heads",
                                                    "eval": "normals", "memory": 1.10}
    assert ROUTERS["mc_dropout"].bench_targets == {"model train": 1.03, "eval": 1.40, "memory": 1.10}
    assert ROUTERS["vtsr"].bench_targets == {"model train": 1.03, "memory": 1.10}
    monkeypatch.setattr(ROUTERS["vtsr"], "bench_targets", {"eval": "heads"})
    with pytest.raises(TypeError, match=r"VTSRRouter.bench_targets\['eval'\] = 'heads': a ratio or 'normals'"):
        check_router_targets()


def test_bench_prints_a_rich_table_for_one_section(tmp_path):
    proc = run_cli("bench", "--tiny", "--only", "layer", cwd=tmp_path)
    assert "vrmoe bench on CPU" in proc.stdout and "dense SwiGLU floor" in proc.stdout
    assert "Router overhead" not in proc.stdout and "by width" not in proc.stdout
    assert "need CUDA; skipped here" not in proc.stderr  # the GPU section was not asked for


def test_bad_argument_is_one_line_and_exit_code_2(tmp_path):
    proc = run_cli("bench", "--repeats", "0", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "--repeats 0: must be at least 1" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("script, args, message", [
    ("bench.py", ["--repeats", "0"], "--repeats 0: must be at least 1"),
    ("bench.py", ["--threads", "2", "-1"], "--threads -1: must be at least 1"),
    ("ddp_scaling.py", ["--steps", "0"], "--steps 0: must be at least 1"),
    ("paper_table.py", ["--bogus"], "unrecognized arguments: --bogus"),
    ("paper_table.py", ["--jobs", "0"], "--jobs 0: must be at least 1"),
    ("paper_table.py", ["--seeds", "0", "0"], "--seeds 0 0: a seed is repeated; each seed is one run"),
    ("paper_table.py", ["--skip", "letter_topk"], "--skip letter_topk: other runs start from it; name routers' runs, "
                                                  "e.g. --skip letter_mc_dropout letter_swag"),
    ("paper_table.py", ["--skip", "bogus"], "--skip bogus: no such method; name routers' runs, e.g. --skip "
                                            "letter_mc_dropout letter_swag"),
])
def test_experiment_scripts_report_bad_arguments_in_one_line(tmp_path, script, args, message):
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / script), *args], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: experiments/{script}: {message} "
                                                f"(see experiments/{script} --help)"]


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "--threads 0: must be at least 1"),
    (["--only", "width", "--widths", "256", "2"], "--widths 2: must be at least 4"),
    (["--widths", "256"], "--widths sets the width section's widths, which runs only when asked for"),
    pytest.param(["--device", "cuda"], "--device cuda: no CUDA device is available here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
])
def test_bad_arguments_name_the_option(args, message):
    with pytest.raises(ConfigError, match=message):
        bench_main(args)


def test_contenders_run_in_rotating_turns():
    calls: list[str] = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved_times(contenders, repeats=3, warmup=1, device=torch.device("cpu"))
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")


def test_a_step_by_parts_swaps_the_routers_time():
    # Top-K's step took 10 (its routers 1 of it); another router alone took 1.5: 10.5 / 10.
    times = {"step": [10.0, 20.0, 10.0], "topk routers": [1.0, 2.0, 1.0], "other routers": [1.5, 3.0, 1.2]}
    assert parts_ratios(times, "step", "other routers", "topk routers") == pytest.approx([1.05, 1.05, 1.02])


@pytest.mark.parametrize("name", ["topk", "temperature", "mc_dropout", "vtsr", "variational"])
def test_router_step_trains_the_router_alone(name):
    """The by-parts contender runs the router in training mode and back-propagates into every one
    of its parameters and into its input, as the layer's step does."""
    from vrmoe.bench import router_config, router_step
    from vrmoe.model.routers import build_router

    router = build_router(16, 4, router_config([f"router={name}"], 2))
    router.eval()
    u_TD = torch.randn(32, 16, requires_grad=True)
    router_step([router], [u_TD], torch.device("cpu"))()
    assert router.training
    assert u_TD.grad is not None and u_TD.grad.abs().sum() > 0
    assert all(p.grad is not None for p in router.parameters())


def test_ratio_is_the_median_of_same_round_ratios():
    # Round 2 ran under heavy load for both: the pairing cancels it.
    times = {"base": [1.0, 10.0, 1.0], "other": [1.1, 11.0, 1.2]}
    assert ratio_fields(round_ratios(times, "other", "base"))["ratio"] == pytest.approx(1.1)


@pytest.mark.parametrize("n, ranks", [(5, (1, 5)), (8, (1, 8)), (9, (2, 8)), (11, (2, 10)), (15, (4, 12)),
                                      (21, (6, 16))])
def test_median_interval_takes_the_binomial_order_statistics(n, ranks):
    # The j-th smallest and largest of n, j the largest with P(Binomial(n, 1/2) < j) <= 2.5%.
    assert median_interval([float(v) for v in range(n, 0, -1)]) == tuple(map(float, ranks))


def test_median_interval_covers_the_median_as_often_as_it_says():
    generator = torch.Generator().manual_seed(0)
    draws = torch.randn(4000, 11, generator=generator).exp()  # log-normal rounds: median 1
    covered = sum(low <= 1.0 <= high for low, high in map(median_interval, draws.tolist()))
    assert covered / 4000 >= 0.975  # n = 11: the 2nd and 10th values cover 98.8% of the time


@pytest.mark.parametrize("load, policy, says", [(0.1, "PASSIVE", "OMP_WAIT_POLICY=PASSIVE on an idle CPU"),
                                                (0.1, None, None), (9.0, None, "the CPU is shared"),
                                                (9.0, "PASSIVE", None)])
def test_the_wait_policy_that_misleads_is_named(monkeypatch, load, policy, says):
    from vrmoe.bench import shared_cpu_warning

    monkeypatch.setattr("os.getloadavg", lambda: (load, load, load))
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("torch.get_num_threads", lambda: 2)
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    warning = shared_cpu_warning(torch.device("cpu"))
    assert (warning is None) if says is None else (says in warning)


def test_peak_memory_sees_a_transient_allocation():
    def allocate_then_free():
        torch.ones(4 * 2**20)  # 16 MiB, freed at once

    peak = peak_memory_mb(allocate_then_free, torch.device("cpu"))
    assert peak is None or peak >= 16  # None where the profiler's memory timeline is unavailable


def test_markdown_marks_targets_met_and_missed():
    rows = [Row("s", "fast", 1.0, 1.04, 1.05, interval=(1.03, 1.045)), Row("s", "slow", 2.0, 1.2, 1.05),
            Row("s", "noisy", 1.0, 1.04, 1.05, interval=(1.0, 1.1)),
            Row("s", "noisy slow", 1.0, 1.07, 1.05, interval=(1.0, 1.1)), Row("s", "info", note="n")]
    lines = render_markdown(rows, "t").splitlines()
    assert lines[:2] == ["**t**", ""] and lines[4] == "*s*"
    assert lines[-5:] == ["| fast | 1.0 | 1.040x | 1.030-1.045 | <= 1.05 | yes |  |  |",
                            "| slow | 2.0 | 1.200x |  | <= 1.05 | NO |  |  |",
                            "| noisy | 1.0 | 1.040x | 1.000-1.100 | <= 1.05 | ~yes |  |  |",
                            "| noisy slow | 1.0 | 1.070x | 1.000-1.100 | <= 1.05 | ~NO |  |  |",
                            "| info |  |  |  |  |  |  | n |"]


@pytest.mark.slow
def test_gpu_section_runs_on_cpu_at_tiny_size():
    """The CUDA-only section's code (layer shapes, compiled MFU step, graph breaks), exercised on CPU."""
    rows = gpu_rows(TINY, torch.device("cpu"))
    names = [r.name for r in rows]
    assert names.count("vrmoe MoE layer") == 1 and "train step" in names
    mfu = next(r for r in rows if r.name == "train step")
    assert "tokens/s" in mfu.note and "MFU" in mfu.note and mfu.time_ms > 0
    breaks = next(r for r in rows if r.name.startswith("graph breaks"))
    assert breaks.note.split(":")[0].isdigit()


@pytest.mark.parametrize("args", [["--only", "nosuch"], ["--format", "xml"]])
def test_bad_bench_arguments_are_one_line(tmp_path, args):
    proc = run_cli("bench", *args, cwd=tmp_path, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: vrmoe bench:"), proc.stderr
