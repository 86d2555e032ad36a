import pytest

from jobs.cli import build_parser, main

COMMANDS = ["synth", "preprocess", "train", "evaluate", "infer", "retrain", "import", "demo"]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out
    assert "exit codes" in out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_explains_itself(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: microemo {cmd}")
    # a description beyond the usage line
    assert len(out.splitlines()) > 4


def test_no_command_prints_help_and_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage: microemo" in capsys.readouterr().out


@pytest.mark.parametrize("argv, reason", [
    (["evaluate", "--model", "run", "--features", "fs", "--out", "rep"], "model run: no such directory"),
    (["infer", "v.mp4", "--model", "run"], "model run: no such directory"),
    (["retrain", "--config", "r.yaml"], "r.yaml: cannot read config"),
])
def test_missing_inputs_are_one_line_exit_2_and_write_nothing(argv, reason, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr()
    assert err.err.strip().splitlines()[-1].startswith(f"microemo {argv[0]}: error:") and reason in err.err
    assert err.out == ""
    assert list(tmp_path.iterdir()) == []  # no output of any kind


def test_bad_config_override_is_one_line_exit_2(capsys, tmp_path):
    assert main(["synth", "--out", str(tmp_path / "c"), "widht=480"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key widht" in err[0]


def test_bad_value_is_exit_2(capsys, tmp_path):
    assert main(["synth", "--out", str(tmp_path / "c"), "--videos", "0"]) == 2
    assert "videos must be at least 1" in capsys.readouterr().err


def test_parser_is_built_once_per_call():
    # two builds must not share state (argparse defaults are per parser)
    assert build_parser() is not build_parser()


def test_train_refuses_to_mix_a_new_run_into_an_existing_one(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step4")
    assert main(["train", "--stage", "1", "--features", str(tmp_path / "fs"), "--out", str(run),
                 "--launcher", "local"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (checkpoints/step4)" in err and "--resume" in err
