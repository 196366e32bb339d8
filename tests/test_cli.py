"""The `vrmoe` command's error paths: every mistake is one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from vrmoe import cli
from vrmoe.compose import check_overrides, split_hydra_args
from vrmoe.jobs import interrupted_message
from vrmoe.config import ConfigError

from vrmoe.knobs import duplicate_jobs, ignored_knobs

from conftest import TINY, make_config, run_cli


def assert_one_line_error(proc, *words: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("args, words", [
    (["train", "-m", "router=topk,variational", "--cfg", "hydra"], ["-m/--multirun and --cfg", "cannot be combined"]),
    (["train", "K=1", "--info", "--cfg", "job"], ["--cfg and --info"]),
    (["train", "model=tiny", "foo"], ["'foo'", "key=value"]),
    (["train", "K=[1"], ["'K=[1'", "key=value"]),
    (["train", "router.sigma_intt=0.2"], ["router.sigma_intt", "not a config key", "router.sigma_init"]),
    (["train", "--no-such-flag"], ["vrmoe train", "--no-such-flag"]),
    (["compare", "/nonexistent/runs"], ["/nonexistent/runs", "no such directory"]),
    (["dashboard"], ["vrmoe dashboard", "dirs"]),
])
def test_command_line_mistakes_are_one_line(tmp_path, args, words):
    proc = run_cli(*args, cwd=tmp_path, check=False)
    assert_one_line_error(proc, *words)
    assert not (tmp_path / "outputs").exists()  # refused before Hydra made a run dir


def test_init_from_a_dir_without_a_checkpoint_is_one_line(tmp_path):
    proc = run_cli("train", *TINY, "train.max_steps=1", f"train.init_from={tmp_path}", cwd=tmp_path, check=False)
    assert_one_line_error(proc, "train.init_from", "checkpoint.pt")


def test_valid_overrides_pass_the_early_checks(tmp_path):
    overrides = split_hydra_args(["-m", "router=topk,variational", "+router.sigma_init=0.2", "~logger",
                                  "eval.gammas=[0.01]", "hydra.run.dir=x", "hydra/launcher=joblib", "K=1,2"])
    assert overrides[0] == "router=topk,variational"
    check_overrides(overrides)


def test_interrupt_before_the_first_checkpoint_offers_no_resume(tmp_path):
    cfg = OmegaConf.create({"train": {"resume": None}})
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    assert "nothing to resume" in interrupted_message(run_dir, cfg)
    assert not run_dir.exists()  # the empty run dir is not left behind
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"")
    assert interrupted_message(run_dir, cfg) == f"interrupted; resume with: vrmoe train train.resume={run_dir}"
    assert run_dir.exists()


def test_a_subcommand_that_cannot_be_imported_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "ghost", ("vrmoe.no_such_module:main", "help"))
    with pytest.raises(SystemExit) as info:
        cli.main(["ghost"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "vrmoe ghost is unavailable" in err and len(err.splitlines()) == 1


def test_ctrl_c_in_a_subcommand_is_exit_130_without_a_traceback(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr("vrmoe.report.compare.main", interrupted)
    with pytest.raises(SystemExit) as info:
        cli.main(["compare", "x"])
    assert info.value.code == 130 and "interrupted" in capsys.readouterr().err


def test_refused_unknown_key_names_the_closest_one():
    with pytest.raises(ConfigError, match="did you mean train.max_steps"):
        check_overrides(["train.max_step=3"])


@pytest.mark.parametrize("where", ["file", "proc"])
def test_an_unwritable_run_dir_is_one_line(tmp_path, where):
    (tmp_path / "notes.txt").write_text("x")
    run_dir = {"file": tmp_path / "notes.txt" / "run", "proc": "/proc/vrmoe_run"}[where]
    proc = run_cli("train", *TINY, "train.max_steps=2", f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False)
    assert_one_line_error(proc, "hydra.run.dir", "cannot be written")


def test_dashboard_to_an_existing_directory_is_one_line(tmp_path):
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "summary.json").write_text('{"status": "completed"}')
    proc = run_cli("dashboard", str(tmp_path / "runs"), "-o", str(tmp_path), cwd=tmp_path, check=False)
    assert_one_line_error(proc, "is a directory")


@pytest.mark.parametrize("name", ["summary.json", "checkpoint.pt", "report"])
def test_dashboard_never_writes_over_a_file_that_is_not_html(tmp_path, name):
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "summary.json").write_text('{"status": "completed"}')
    (run / "checkpoint.pt").write_bytes(b"weights")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    proc = run_cli("dashboard", str(tmp_path / "runs"), "-o", str(run / name), cwd=tmp_path, check=False)
    assert_one_line_error(proc, "ending in .html")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_non_ascii_value_gets_the_quoting_hint(tmp_path):
    proc = run_cli("train", *TINY, "hydra.run.dir=runs/çà", cwd=tmp_path, check=False)
    assert_one_line_error(proc, "must be quoted", "hydra.run.dir='runs/çà'")


def test_router_layers_beyond_the_moe_layers_is_one_line(tmp_path):
    proc = run_cli("train", *TINY, "router=variational", "router.layers=5", "train.max_steps=2", cwd=tmp_path, check=False)
    assert_one_line_error(proc, "router.layers=5", "2 MoE layer")


def test_eval_of_a_text_file_says_it_is_not_a_run_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    proc = run_cli("eval", f"run={tmp_path / 'notes.txt'}", cwd=tmp_path, check=False)
    assert_one_line_error(proc, "is a file, not a run dir")


@pytest.mark.parametrize("error", [RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                                "1600000000000 bytes.\nmore detail"), MemoryError()])
def test_running_out_of_memory_is_one_line(error, capsys):
    from vrmoe.console import run_command

    def command():
        raise error

    with pytest.raises(SystemExit) as info:
        run_command("vrmoe eval", command)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 1 and len(err.splitlines()) == 1 and "ran out of memory" in err and "lower S" in err


def test_other_runtime_errors_are_not_taken_for_memory():
    from vrmoe.console import run_command

    def command():
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_command("vrmoe eval", command)


def test_routers_help_is_usage_not_an_error(tmp_path):
    proc = run_cli("routers", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: vrmoe routers") and "--markdown" in proc.stdout
    assert_one_line_error(run_cli("routers", "--tsv", cwd=tmp_path, check=False), "vrmoe routers", "--tsv")


def test_version_and_a_bare_command(tmp_path):
    from importlib.metadata import version

    proc = run_cli("--version", cwd=tmp_path)
    assert proc.stdout.strip() == f"vrmoe {version('vrmoe')}"
    bare = run_cli(cwd=tmp_path, check=False)
    assert bare.returncode == 2 and bare.stderr.startswith("usage: vrmoe <command>") and not bare.stdout


def test_a_preset_in_the_working_directorys_conf_runs(tmp_path, corpus_cache):
    preset = tmp_path / "conf" / "experiment" / "my_study.yaml"
    preset.parent.mkdir(parents=True)
    preset.write_text("# @package _global_\ndefaults:\n  - override /model: tiny\n  - override /logger: none\n"
                      "train:\n  max_steps: 2\n  batch_size: 4\n  eval_every: 2\n  eval_batches: 1\n")
    run_cli("train", "experiment=my_study", cwd=tmp_path)
    summary = json.loads(next((tmp_path / "outputs").rglob("summary.json")).read_text())
    assert summary["status"] == "completed" and summary["config"]["model"]["name"] == "tiny"
    assert summary["step"] == 2
    # What made the run is on record.
    assert set(summary["versions"]) == {"vrmoe", "python", "torch", "transformers", "git_commit"}
    from importlib.metadata import version

    assert summary["versions"]["vrmoe"] == version("vrmoe") and summary["versions"]["torch"] == version("torch")


def test_train_help_is_a_reference_of_the_chosen_configuration(tmp_path):
    out = run_cli("train", "router=variational", "--help", cwd=tmp_path).stdout
    assert out.startswith("usage: vrmoe train")
    # Every key with its value and what it sets, the chosen router's own keys included.
    assert "  router.covariance = diag\n      diag (mean-field, log-sigma head)" in out
    assert "  T = 1.0\n      Routing temperature" in out and "  S = 8\n" in out
    assert "router_schema" not in out and "router=<name> --help" in out
    examples = [line.split()[2:] for line in out.splitlines() if line.startswith("  vrmoe train ")]
    assert len(examples) == 3
    for args in examples:  # every knob an example sets is read by its router; no sweep runs a job twice
        overrides = [a for a in args if a != "-m"]
        assert duplicate_jobs(overrides) == []
        if "-m" not in args:
            assert ignored_knobs(make_config(*overrides).router, overrides) == []


def test_hydras_own_modes_work_without_a_traceback(tmp_path):
    completion = run_cli("train", "-sc", "install=bash", cwd=tmp_path)
    assert "hydra_bash_completion" in completion.stdout
    hydra_cfg = run_cli("train", "--cfg", "hydra", "--resolve", cwd=tmp_path)
    assert "Traceback" not in hydra_cfg.stderr and "dir: outputs/" in hydra_cfg.stdout
