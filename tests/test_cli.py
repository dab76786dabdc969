import json

from fxlrd.cli import main


def test_plan_command_prints_the_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert main(["plan", "--model", "resnet50", "--size", "64", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layer4.2.conv2" in out and "tucker2" in out and "model params" in out
    assert json.loads(path.read_text())["format"] == "fxlrd.plan/1"


def test_bad_ratio_is_one_clear_line(capsys):
    assert main(["plan", "--ratio", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxlrd: error: ratio must be a number > 1") and "Traceback" not in err


def test_non_positive_batch_is_rejected_by_the_parser(capsys):
    import pytest

    with pytest.raises(SystemExit) as info:
        main(["demo", "--batch", "0"])
    assert info.value.code == 2 and "must be an integer >= 1" in capsys.readouterr().err
