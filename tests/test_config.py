"""Configuration: precedence, and every way a value is refused."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from poller import config
from poller.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "poller.toml"
    path.write_text(text)
    return path


def test_defaults_without_file(tmp_path: Path) -> None:
    s = config.load(config_path=None, env={})
    assert s.polling.interval_s == 6.0
    assert s.polling.timeout_s == 4.0
    assert s.api.host == "127.0.0.1"
    assert s.state_dir == Path("var")
    assert s.instance_id  # filled from the host name


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "[polling]\ninterval_s = 10\ntimeout_s = 2\n"
                 "[ingest]\nbatch_rows = 100\n[log]\nlevel = 'debug'\n")
    env = {"POLLER_POLLING_INTERVAL_S": "20", "POLLER_INGEST_BATCH_ROWS": "200"}
    s = config.load(config_path=path, env=env, overrides={"polling.interval_s": "30"})
    assert s.polling.interval_s == 30.0  # flag beats env beats file
    assert s.ingest.batch_rows == 200  # env beats file
    assert s.polling.timeout_s == 2.0  # file beats default
    assert s.log.level == "debug"
    assert s.ingest.flush_interval_s == 1.0  # default


def test_settings_are_frozen() -> None:
    s = config.load(config_path=None, env={})
    with pytest.raises(AttributeError):
        s.polling.interval_s = 1.0  # type: ignore[misc]


def test_default_path_is_optional_but_explicit_path_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        config.load(config_path=tmp_path / "missing.toml", env={})


def test_env_names_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, "instance_id = 'from-env-file'\n")
    s = config.load(env={"POLLER_CONFIG": str(path)})
    assert s.instance_id == "from-env-file"


@pytest.mark.parametrize(
    ("toml", "key", "expected"),
    [
        ("[polling]\nintervl_s = 3\n", "polling.intervl_s", "unknown key"),
        ("[pollng]\ninterval_s = 3\n", "pollng", "unknown section"),
        ("bogus = 1\n", "bogus", "unknown key"),
        ("[polling]\ninterval_s = 'six'\n", "polling.interval_s", "expected a number of seconds"),
        ("[polling]\ninterval_s = -1\n", "polling.interval_s", "between"),
        ("[polling]\nmax_in_flight = 1.5\n", "polling.max_in_flight", "whole number"),
        ("[polling]\nmax_in_flight = true\n", "polling.max_in_flight", "expected a number"),
        ("[api]\nenabled = 'yes'\n", "api.enabled", "true or false"),
        ("[api]\nport = 70000\n", "api.port", "between"),
        ("[log]\nlevel = 'loud'\n", "log.level", "one of debug, info"),
        ("[s3]\nbucket = 'Not_A_Bucket'\n", "s3.bucket", "bucket name"),
        ("[database]\nurl = 'not a url'\n", "database.url", "expected a URL"),
        ("[polling]\ntimeout_s = 6\n", "polling.timeout_s", "must be below polling.interval_s"),
        ("[api]\nhost = '0.0.0.0'\n", "api.host", "loopback"),
        ("[api]\nadmin_token = 'short'\n", "api.admin_token", "at least 16"),
        ("instance_id = 'a b'\n", "instance_id", "expected 1-63"),
        ("[polling]\ninterval_s = nan\n", "polling.interval_s", "finite"),
    ],
)
def test_file_rejections_name_key_and_form(tmp_path: Path, toml: str, key: str,
                                           expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(config_path=write(tmp_path, toml), env={})
    assert info.value.key == key
    assert expected in str(info.value)


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(config_path=write(tmp_path, "[polling\n"), env={})


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"POLLER_POLLING_INTERVAL": "6"}, "POLLER_POLLING_INTERVAL"),
        ({"POLLER_POLLING_INTERVAL_S": "fast"}, "polling.interval_s"),
        ({"POLLER_API_ENABLED": "maybe"}, "api.enabled"),
        ({"POLLER_API_PORT": "80.5"}, "api.port"),
    ],
)
def test_env_rejections(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(config_path=None, env=env)
    assert info.value.key == key


def test_non_config_env_is_ignored() -> None:
    s = config.load(config_path=None, env={"POLLER_SECRET_KEY": "x",
                                           "POLLER_DEVICE_PASSWORD": "y"})
    assert s.polling.interval_s == 6.0


def test_env_booleans() -> None:
    assert config.load(config_path=None, env={"POLLER_API_ENABLED": "off"}).api.enabled is False


def test_tokens_allow_binding_beyond_loopback() -> None:
    s = config.load(config_path=None, env={"POLLER_API_HOST": "0.0.0.0",
                                           "POLLER_API_READ_TOKEN": "r" * 20})
    assert s.api.host == "0.0.0.0"


def test_override_parsing() -> None:
    assert config.parse_override("polling.interval_s=10") == ("polling.interval_s", "10")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        config.parse_override("polling.interval_s")
    with pytest.raises(ConfigError, match="unknown key"):
        config.parse_override("polling.nope=1")


def test_redaction_and_toml_round_trip(tmp_path: Path) -> None:
    s = config.load(config_path=None, env={"POLLER_API_ADMIN_TOKEN": "a" * 32,
                                           "POLLER_S3_SECRET_ACCESS_KEY": "topsecret"})
    doc = config.as_dict(s)
    assert doc["api"]["admin_token"] == config.REDACTED
    assert doc["s3"]["secret_access_key"] == config.REDACTED
    assert doc["api"]["read_token"] == ""  # empty stays visibly empty
    text = config.to_toml(config.as_dict(s, redact=False))
    again = config.load(config_path=write(tmp_path, text), env={})
    assert again == s


def _poller(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "poller", *args], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", **(env or {})}, timeout=60)


def test_cli_config_show_redacts_and_flags_win(tmp_path: Path) -> None:
    path = write(tmp_path,
                 "[api]\nadmin_token = 'supersecrettoken123'\n[polling]\ninterval_s = 8\n")
    out = _poller("--config", str(path), "config", "show", "--set", "polling.interval_s=9",
                  env={"POLLER_POLLING_INTERVAL_S": "7"})
    assert out.returncode == 0, out.stderr
    assert "interval_s = 9.0" in out.stdout
    assert "supersecrettoken123" not in out.stdout + out.stderr
    assert 'admin_token = "***"' in out.stdout


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    out = _poller("config", "show", env={"POLLER_POLLING_TIMEOUT_S": "9"})
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "polling.timeout_s" in out.stderr


def test_cli_every_command_has_help() -> None:
    commands = ("serve", "migrate", "stack", "config", "add-user", "update-user",
                "remove-user", "list-users", "secret-key")
    # A process each, all at once: half a second of interpreter start-up apiece.
    with ThreadPoolExecutor(len(commands)) as starts:
        outs = list(starts.map(lambda command: _poller(command, "--help"), commands))
    for command, out in zip(commands, outs, strict=True):
        assert out.returncode == 0, (command, out.stderr)
        assert "usage: poller" in out.stdout


def test_only_the_bench_loads_the_bench() -> None:
    # Its flags import the whole bench (S3, the simulator...): two thirds of
    # every command's start-up when they were always built.
    probe = ("import sys; from poller import cli; cli.build_parser({argv!r}); "
             "print(','.join(sorted(m for m in sys.modules if m.startswith("
             "('poller.bench', 'aiobotocore')))))")
    for argv, loaded in ((["config", "show"], False), (["bench", "--help"], True)):
        out = subprocess.run([sys.executable, "-c", probe.format(argv=argv)],
                             capture_output=True, text=True, timeout=60, check=True)
        assert ("poller.bench.run" in out.stdout) is loaded, (argv, out.stdout)
        assert ("aiobotocore" in out.stdout) is loaded, (argv, out.stdout)
    bench = _poller("bench", "--help")
    assert bench.returncode == 0 and "--devices" in bench.stdout and "--sweep" in bench.stdout


def test_cli_unknown_command_exits_2() -> None:
    out = _poller("frobnicate")
    assert out.returncode == 2
    assert "invalid choice" in out.stderr
