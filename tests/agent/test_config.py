"""The agent's YAML configuration: defaults, validation errors that name key and line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from agent import config
from tests.helpers import OUTRIDER, clean_env


def test_documented_default_is_the_default() -> None:
    """`outrider config --default` parses to exactly the built-in defaults, all sinks on."""
    parsed = config.parse(config.DEFAULT_YAML, "default")
    assert list(parsed.enabled_sinks()) == ["tensorboard", "prometheus", "wandb"]
    assert parsed.drain_timeout == config.AgentConfig().drain_timeout
    assert parsed.sink_close_timeout == config.AgentConfig().sink_close_timeout
    assert parsed.histogram_bins == config.AgentConfig().histogram_bins
    assert parsed.nice == config.AgentConfig().nice
    assert parsed.stats == config.AgentConfig().stats
    assert parsed.system == config.AgentConfig().system
    assert parsed.alerts == config.AgentConfig().alerts
    assert yaml.safe_load(config.DEFAULT_YAML)["sinks"]["prometheus"]["port"] == 9400


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("drain_timeout: 5\nbogus: 1\n", "f.yaml:2: bogus: Extra inputs are not permitted"),
        ("drain_timeout: soon\n", "f.yaml:1: drain_timeout: Input should be a valid number"),
        (
            "histogram_bins: 4096\n",
            "f.yaml:1: histogram_bins: Input should be less than or equal to 512",
        ),
        ("sinks:\n  prometheus:\n    port: http\n", "f.yaml:3: sinks.prometheus.port:"),
        (
            "sinks:\n  tensorboard:\n    flush_sec: 2\n",
            "f.yaml:3: sinks.tensorboard.flush_sec: Extra inputs",
        ),
        ("sinks:\n  influx: {}\n", "f.yaml:2: sinks.influx: unknown sink"),
        ("sinks:\n  mine: {class: 'nowhere.module:Sink'}\n", "f.yaml:2: sinks.mine: cannot load"),
        ("sinks: [\n", "f.yaml:2: not valid YAML"),
        ("- a\n- b\n", "f.yaml:1: the config must be a mapping"),
    ],
)
def test_errors_name_the_key_and_line(text: str, expected: str) -> None:
    """Each kind of mistake is reported as file:line: key: problem."""
    with pytest.raises(config.ConfigError) as caught:
        config.parse(text, "f.yaml")
    assert expected in str(caught.value)


def test_every_problem_is_reported_at_once() -> None:
    """Two bad keys give two lines, so a user fixes the file in one go."""
    text = "sinks:\n  prometheus:\n    port: -x\n    colour: red\n"
    with pytest.raises(config.ConfigError) as caught:
        config.parse(text, "f.yaml")
    assert str(caught.value).count("\n") == 1
    assert "f.yaml:3: sinks.prometheus.port" in str(caught.value)
    assert "f.yaml:4: sinks.prometheus.colour" in str(caught.value)


def test_switching_sinks_off_and_only_sinks() -> None:
    """`enabled: false` removes a default sink; --sinks picks exactly the named ones."""
    parsed = config.parse("sinks:\n  wandb: {enabled: false}\n  prometheus: {port: 9500}\n")
    assert list(parsed.enabled_sinks()) == ["tensorboard", "prometheus"]
    only = parsed.only_sinks(["prometheus"])
    assert list(only.enabled_sinks()) == ["prometheus"]
    assert only.enabled_sinks()["prometheus"].options() == {"port": 9500}
    assert list(parsed.only_sinks([]).enabled_sinks()) == []
    with pytest.raises(config.ConfigError, match="unknown sink nope"):
        parsed.only_sinks(["nope"])


def test_sinks_chosen_with_only_their_options_checked() -> None:
    """With --sinks, only the named sinks' options are checked (the others are not run or
    imported); a named sink the file switched off is checked too; unknown names are left to
    only_sinks."""
    text = "sinks:\n  tensorboard:\n    flush_sec: 2\n  prometheus: {enabled: false, port: x}\n"
    with pytest.raises(config.ConfigError, match=r"f\.yaml:3: sinks\.tensorboard\.flush_sec"):
        config.parse(text, "f.yaml")
    assert list(config.parse(text, "f.yaml", sinks=[]).only_sinks([]).enabled_sinks()) == []
    assert config.parse(text, "f.yaml", sinks=["wandb", "nope"]).sinks["tensorboard"]
    with pytest.raises(config.ConfigError, match=r"f\.yaml:4: sinks\.prometheus\.port"):
        config.parse(text, "f.yaml", sinks=["prometheus"])


def test_config_check_command(tmp_path: Path) -> None:
    """`outrider config --check` exits 0 on a good file and 1 with the line on a bad one."""
    good = tmp_path / "good.yaml"
    good.write_text("sinks:\n  wandb: {enabled: false}\n")
    result = subprocess.run(
        [OUTRIDER, "config", "--check", str(good)], capture_output=True, text=True, env=clean_env()
    )
    assert result.returncode == 0, result.stderr
    assert "ok (sinks: tensorboard, prometheus)" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("sinks:\n  wandb:\n    mode: sometimes\n")
    result = subprocess.run(
        [OUTRIDER, "config", "--check", str(bad)], capture_output=True, text=True, env=clean_env()
    )
    assert result.returncode == 1
    assert f"{bad}:3: sinks.wandb.mode" in result.stderr


def test_bad_config_stops_the_agent_and_the_launcher_before_anything_runs(tmp_path: Path) -> None:
    """A broken config is refused up front by `outrider agent` and by `outrider run`."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("drain_timeout: -1\n")
    marker = tmp_path / "ran"
    for command in (
        [OUTRIDER, "agent", "--config", str(bad), "--endpoint", f"ipc://{tmp_path}/a.sock"],
        [OUTRIDER, "run", "--config", str(bad), "--", "touch", str(marker)],
    ):
        result = subprocess.run(
            command, capture_output=True, text=True, env=clean_env(), timeout=30
        )
        assert result.returncode != 0
        assert "bad.yaml:1: drain_timeout" in result.stderr
    assert not marker.exists()


def test_a_bare_off_switches_feature_maps_off() -> None:
    """`feature_map: off` (which YAML reads as false) means no maps, not a type error."""
    assert config.parse("stats: {feature_map: off}\n").stats.feature_map == "off"
