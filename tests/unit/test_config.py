"""Settings: YAML, SIDECAR_* overrides, validation naming the field, secrets masked."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from conftest import PEPPER, ROOT, sidecar_env

from sidecar.runtime.config import ConfigError, Settings, load_settings

URL = "redis://127.0.0.1:6399/0"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    return path


def test_shipped_file_documents_every_setting_with_its_default():
    shipped = ROOT / "config" / "sidecar.yaml"
    assert load_settings(shipped, env={}) == Settings()
    documented = set(yaml.safe_load(shipped.read_text()))
    assert documented == {f.name for f in fields(Settings)}


def test_no_file_means_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # no ./config/sidecar.yaml here
    assert load_settings(env={}) == Settings()


def test_yaml_values(tmp_path):
    path = write(tmp_path, f"""
redis_url: {URL}
key_pepper: {PEPPER}
listen: "[::1]:9000"
workers: 3
trusted_proxies: [10.0.0.0/8, "fd00::/8"]
trusted_hops: 2
model_costs: {{gpt-5.5: 10}}
failure_mode: open
keepalive_timeout_s: 30
""")
    s = load_settings(path, env={})
    assert (s.redis_url, s.key_pepper, s.listen, s.workers) == (URL, PEPPER, "[::1]:9000", 3)
    assert s.trusted_proxies == ("10.0.0.0/8", "fd00::/8") and s.trusted_hops == 2
    assert [str(n) for n in s.trusted_networks()] == ["10.0.0.0/8", "fd00::/8"]
    assert s.model_costs == {"gpt-5.5": 10}
    assert (s.failure_mode, s.keepalive_timeout_s) == ("open", 30.0)


def test_environment_overrides_yaml(tmp_path):
    path = write(tmp_path, f"""
redis_url: {URL}
key_pepper: {PEPPER}
workers: 2
failure_mode: open
trusted_proxies: [10.0.0.0/8]
model_costs: {{a: 1}}
""")
    s = load_settings(path, env={
        "SIDECAR_WORKERS": "5", "SIDECAR_FAILURE_MODE": "closed",
        "SIDECAR_TRUSTED_PROXIES": "192.168.0.0/16, ::1", "SIDECAR_MODEL_COSTS": "b=2, c=3",
        "SIDECAR_KEY_PEPPER": "another-pepper-0123456789", "SIDECAR_LISTEN": "127.0.0.1:1"})
    assert s.workers == 5 and s.failure_mode == "closed"
    assert s.trusted_proxies == ("192.168.0.0/16", "::1")
    assert s.model_costs == {"b": 2, "c": 3}
    assert s.key_pepper == "another-pepper-0123456789" and s.listen == "127.0.0.1:1"
    assert s.redis_url == URL                      # not overridden: from the file


def test_empty_redis_url_in_env_means_embedded(tmp_path):
    path = write(tmp_path, f"redis_url: {URL}\nkey_pepper: {PEPPER}\n")
    s = load_settings(path, env={"SIDECAR_REDIS_URL": ""})
    assert s.redis_url is None and s.embedded_redis


def test_config_file_from_env_and_explicit_path_wins(tmp_path):
    env_file = tmp_path / "env.yaml"
    env_file.write_text("workers: 7\n")
    explicit = write(tmp_path, "workers: 9\n")
    assert load_settings(env={"SIDECAR_CONFIG": str(env_file)}).workers == 7
    assert load_settings(explicit, env={"SIDECAR_CONFIG": str(env_file)}).workers == 9


BAD_VALUES = [
    # (setting, value as the environment gives it)
    ("redis_url", "http://127.0.0.1:6379"),
    ("redis_url", "localhost:6379"),
    ("redis_timeout_ms", "0"),
    ("redis_timeout_ms", "60001"),
    ("redis_timeout_ms", "fast"),
    ("redis_pool_size", "0"),
    ("failure_mode", "maybe"),
    ("listen", "8080"),
    ("listen", "127.0.0.1:99999"),
    ("listen", "127.0.0.1:http"),
    ("admin_listen", "nowhere"),
    ("grpc_listen", "9090"),
    ("grpc_listen", "127.0.0.1:grpc"),
    ("workers", "0"),
    ("workers", "257"),
    ("workers", "two"),
    ("workers", "2.5"),
    ("keepalive_timeout_s", "0"),
    ("keepalive_timeout_s", "soon"),
    ("shutdown_timeout_s", "-1"),
    ("request_timeout_s", "0"),
    ("request_deadline_s", "0"),
    ("request_deadline_s", "nan"),
    ("request_deadline_s", "inf"),
    ("request_deadline_s", "later"),
    ("max_headers", "0"),
    ("max_headers", "10001"),
    ("max_header_bytes", "100"),
    ("max_header_bytes", "2000000"),
    ("max_connections", "-1"),
    ("max_connections", "many"),
    ("max_body_bytes", "-1"),
    ("max_body_bytes", "2000000"),
    ("key_pepper", "short"),
    ("trusted_proxies", "10.0.0.0/8,not-a-net"),
    ("trusted_proxies", "10.0.0.0/33"),
    ("trusted_hops", "0"),
    ("default_cost", "-1"),
    ("model_costs", "gpt-5.5=-1"),
    ("model_costs", "gpt-5.5"),
    ("model_costs", "gpt-5.5=ten"),
    ("reservation_ttl_s", "0"),
    ("reservation_ttl_s", "604801"),
    ("reservation_ttl_s", "an hour"),
    ("log_level", "verbose"),
    ("threshold_census_interval_s", "0.5"),
    ("threshold_census_interval_s", "86401"),
    ("threshold_census_interval_s", "nan"),
    ("threshold_census_interval_s", "hourly"),
]


@pytest.mark.parametrize("name,value", BAD_VALUES, ids=[f"{n}={v}" for n, v in BAD_VALUES])
def test_bad_env_value_names_the_field(name, value):
    env = {"SIDECAR_REDIS_URL": URL, "SIDECAR_KEY_PEPPER": PEPPER,
           "SIDECAR_" + name.upper(): value}
    with pytest.raises(ConfigError) as caught:
        load_settings(ROOT / "config" / "sidecar.yaml", env=env)
    assert str(caught.value).startswith(name)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("text,name", [
    ("workers: [1, 2]\n", "workers"),
    ("workers: 2.5\n", "workers"),
    ("workers: true\n", "workers"),
    ("trusted_proxies: 5\n", "trusted_proxies"),
    ("model_costs: [a, b]\n", "model_costs"),
    ("model_costs: {gpt-5.5: lots}\n", "model_costs"),
    ("redis_url: {host: x}\n", "redis_url"),
    ("failure_mode: 1\n", "failure_mode"),
    ("bench_endpoints: true\n", "bench_endpoints"),  # benchmarks/serve.py, not a setting
    ("redis_url: redis://127.0.0.1:6379/0\n", "key_pepper"),  # a pepper is then required
    ("no_such_setting: 1\n", "no_such_setting"),
    ("Workers: 2\n", "Workers"),
])
def test_bad_yaml_value_names_the_field(tmp_path, text, name):
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), env={})
    assert str(caught.value).startswith(name)


@pytest.mark.parametrize("text", ["- a\n- b\n", "workers: [1\n", "just text\n"])
def test_unreadable_file_names_the_file(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert str(path) in str(caught.value)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path / "absent.yaml", env={})
    assert "absent.yaml" in str(caught.value)


@pytest.mark.parametrize("url", [
    "redis://app:s3cret-pw@127.0.0.1:6379/0",
    "rediss://:s3cret-pw@redis.example:6380/0",
    "redis+sentinel://:s3cret-pw@10.0.0.1:26379,10.0.0.2:26379/mymaster",
    "redis+cluster://:s3cret-pw@10.0.0.1:7000",
])
def test_repr_masks_secrets(url):
    s = load_settings(ROOT / "config" / "sidecar.yaml",
                      env={"SIDECAR_REDIS_URL": url, "SIDECAR_KEY_PEPPER": PEPPER})
    for shown in (repr(s), str(s), f"{s}"):
        assert PEPPER not in shown and "s3cret-pw" not in shown
        assert "***" in shown
    assert s.redis_url == url and s.key_pepper == PEPPER   # masked only when shown


# -- `sidecar serve` refuses to start ----------------------------------------------------

@pytest.mark.parametrize("settings,args,name", [
    ({"workers": "0"}, [], "workers"),
    ({"listen": "no-port"}, [], "listen"),
    ({"redis_url": "http://127.0.0.1:1"}, [], "redis_url"),
    ({"key_pepper": "short"}, [], "key_pepper"),
    ({}, ["--config", "BAD"], "no_such_setting"),
])
def test_serve_with_bad_setting_exits_with_one_line(tmp_path, settings, args, name):
    bad = write(tmp_path, "no_such_setting: 1\n")
    env = sidecar_env("redis://127.0.0.1:1/0")
    env.update({"SIDECAR_" + k.upper(): v for k, v in settings.items()})
    args = [str(bad) if a == "BAD" else a for a in args]
    done = subprocess.run([sys.executable, "-m", "sidecar", "serve", *args], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=20)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"sidecar: error: {name}")


# -- the state folder: one place, whatever the current directory ---------------------------

def test_default_state_dir(tmp_path):
    from sidecar.runtime.config import default_state_dir
    home = {"HOME": "/home/ann"}
    assert default_state_dir(home, uid=1000) == Path("/home/ann/.local/state/llm-key-sidecar")
    assert default_state_dir(home, uid=0) == Path("/var/lib/llm-key-sidecar")
    xdg = {**home, "XDG_STATE_HOME": "/srv/state"}
    assert default_state_dir(xdg, uid=1000) == Path("/srv/state/llm-key-sidecar")
    assert default_state_dir(xdg, uid=0) == Path("/srv/state/llm-key-sidecar")
    relative = {**home, "XDG_STATE_HOME": "state"}   # ignored, as the XDG spec says
    assert default_state_dir(relative, uid=1000) == Path(
        "/home/ann/.local/state/llm-key-sidecar")


def test_state_dir_is_absolute_whatever_the_current_directory(tmp_path, monkeypatch):
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = write(conf_dir, "state_dir: data/sidecar\n")
    for cwd in (tmp_path, conf_dir, ROOT):
        monkeypatch.chdir(cwd)
        # from a file: next to the file; from the environment: from where it was set
        assert load_settings(path, env={}).state_dir == str(conf_dir / "data" / "sidecar")
        assert load_settings(path, env={"SIDECAR_STATE_DIR": "s"}).state_dir == str(cwd / "s")
        assert load_settings(env={}).state_dir is None      # None: default_state_dir()


def test_the_current_directory_is_never_searched_for_a_config(tmp_path, monkeypatch):
    (tmp_path / "config").mkdir()
    write(tmp_path / "config", "workers: 5\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings(env={}).workers == 1
