"""stream.settings: one parser for every variable, clear errors, absolute paths, Kafka security,
the printout and the README table."""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
from pathlib import Path

import faust
import pytest

from stream.settings import KafkaSecurity, Settings, SettingsError, load_settings, markdown_table, variables

REPO = Path(__file__).resolve().parents[1]
SASL_SSL = {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "trail", "KAFKA_SASL_PASSWORD": "hunter2-secret"}


def test_defaults_need_no_environment(tmp_path):
    s = load_settings({}, cwd=tmp_path)
    assert isinstance(s, Settings) and s.serving is None
    assert s.worker.kafka == KafkaSecurity() and s.worker.kafka.client_kwargs() == {}
    assert s.worker.kafka.faust_credentials() is None
    assert s.store.embedded and s.cache_dir == Path("~/.cache/trail").expanduser()
    with pytest.raises(AttributeError):
        s.worker = None  # frozen


@pytest.mark.parametrize("env, message", [
    ({"TRAIL_BUCKET_S": "0"}, "TRAIL_BUCKET_S='0': must be a whole number of seconds > 0"),
    ({"TRAIL_BUCKET_S": "1h"}, "TRAIL_BUCKET_S='1h': must be a whole number of seconds > 0"),
    ({"TRAIL_LATENESS_S": "-5"}, "TRAIL_LATENESS_S='-5': must be a whole number of seconds >= 0"),
    ({"TRAIL_WINDOWS": "1d"}, "TRAIL_WINDOWS='1d': bad window '1d': expected name:seconds"),
    ({"TRAIL_WINDOWS": "7d:604800,1d:86400"}, "TRAIL_WINDOWS='7d:604800,1d:86400': windows must be sorted"),
    ({"TRAIL_BUCKET_S": "7"}, r"TRAIL_WINDOWS \(default 1d:86400,.*\): window 1d .* TRAIL_BUCKET_S=7"),
    ({"TRAIL_PARTITIONS": "0"}, "TRAIL_PARTITIONS='0': must be a whole number >= 1"),
    ({"TRAIL_EMA_HALFLIFE_S": "2.5"}, "TRAIL_EMA_HALFLIFE_S='2.5'"),
    ({"TRAIL_RANK_GRACE_S": "inf"}, "TRAIL_RANK_GRACE_S='inf': must be seconds >= 0"),
])
def test_bad_values_name_the_variable_and_what_it_accepts(env, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(env)
    assert issubclass(SettingsError, ValueError)


def test_every_bad_variable_is_reported_at_once():
    with pytest.raises(SettingsError) as info:
        load_settings({"TRAIL_BUCKET_S": "1h", "TRAIL_PARTITIONS": "0", "TRAIL_TICK_S": "soon"})
    assert all(name in str(info.value) for name in ("TRAIL_BUCKET_S", "TRAIL_PARTITIONS", "TRAIL_TICK_S"))


def test_blank_values_count_as_unset():
    assert load_settings({"TRAIL_BUCKET_S": "  ", "TRAIL_STATE_DIR": ""}) == load_settings({})


def test_relative_paths_become_absolute_under_cwd_once(tmp_path, monkeypatch):
    (tmp_path / "ca.pem").write_text("not checked here")
    env = {"TRAIL_STATE_DIR": "var/s", "TRAIL_CLICKHOUSE_PATH": "var/ch", "TRAIL_SINK_SPILL_DIR": "spill",
           "TRAIL_MODEL_DIR": "models/m", "TRAIL_CACHE": "cache", "TRAIL_DDL_DIR": "ddl",
           "TRAIL_TANSU_BIN": "bin/tansu", "KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "ca.pem"}
    monkeypatch.chdir(tmp_path)
    s = load_settings(env)
    paths = [s.worker.state_dir, s.store.path, s.sink.spill_dir, s.serving.model_dir, s.cache_dir,
             s.store.ddl_dir, s.tansu_bin, s.worker.kafka.ssl_cafile]
    assert paths == [tmp_path / p for p in ("var/s", "var/ch", "spill", "models/m", "cache", "ddl", "bin/tansu",
                                            "ca.pem")]
    monkeypatch.chdir("/")
    assert s.worker.state_dir == tmp_path / "var/s" and s.store.path == tmp_path / "var/ch"
    assert load_settings(env, cwd=tmp_path) == s  # an explicit cwd, whatever the process's is now


def test_defaulted_paths_are_absolute_too(tmp_path):
    s = load_settings({}, cwd=tmp_path)
    assert s.worker.state_dir == tmp_path / "var/state" and s.store.path == tmp_path / "var/clickhouse"
    assert s.sink.spill_dir == tmp_path / "var/spill"  # beside the embedded store
    server = load_settings({"CLICKHOUSE_URL": "http://ch:8123", "TRAIL_CLICKHOUSE_PATH": "/data/ch"}, cwd=tmp_path)
    assert server.sink.spill_dir == tmp_path / "var/spill"
    assert load_settings({"TRAIL_CLICKHOUSE_PATH": "/data/ch"}).sink.spill_dir == Path("/data/spill")


def test_sasl_ssl_client_kwargs_and_faust_credentials(tmp_path):
    sec = load_settings(SASL_SSL).worker.kafka
    kwargs = sec.client_kwargs()
    assert set(kwargs) == {"security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password",
                           "ssl_context"}
    assert (kwargs["security_protocol"], kwargs["sasl_mechanism"], kwargs["sasl_plain_username"],
            kwargs["sasl_plain_password"]) == ("SASL_SSL", "SCRAM-SHA-512", "trail", "hunter2-secret")
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    creds = sec.faust_credentials()
    assert isinstance(creds, faust.SASLCredentials) and creds.ssl_context is not None
    assert creds.mechanism.value == "SCRAM-SHA-512" and creds.protocol.value == "SASL_SSL"

    plain = load_settings({**SASL_SSL, "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}).worker.kafka
    assert "ssl_context" not in plain.client_kwargs() and plain.faust_credentials().protocol.value == "SASL_PLAINTEXT"
    tls = load_settings({"KAFKA_SECURITY_PROTOCOL": "SSL"}).worker.kafka
    assert set(tls.client_kwargs()) == {"security_protocol", "ssl_context"}
    assert isinstance(tls.faust_credentials(), faust.SSLCredentials)


def test_secrets_are_masked_everywhere():
    env = {**SASL_SSL, "CLICKHOUSE_PASSWORD": "ch-secret-pw"}
    s = load_settings(env)
    assert s.store.password == "ch-secret-pw" and s.worker.kafka.sasl_password == "hunter2-secret"
    for text in (repr(s), str(s), repr(s.worker), repr(s.worker.kafka), repr(s.store),
                 repr(s.worker.kafka.faust_credentials())):
        assert "hunter2" not in text and "ch-secret" not in text
    shown = {x.name: x for x in s.effective}
    assert shown["KAFKA_SASL_PASSWORD"].value == "***" and shown["CLICKHOUSE_PASSWORD"].value == "***"


@pytest.mark.parametrize("env, message", [
    ({"KAFKA_SECURITY_PROTOCOL": "TLS"},
     "KAFKA_SECURITY_PROTOCOL='TLS': must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "GSSAPI"}, "KAFKA_SASL_MECHANISM='GSSAPI'"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD are required"),
    ({"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"}, "KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"},
     "KAFKA_SSL_CAFILE='/nonexistent/ca.pem': no such file"),
    ({"KAFKA_SSL_CAFILE": "/etc/hosts"}, "KAFKA_SSL_CAFILE is set but KAFKA_SECURITY_PROTOCOL=PLAINTEXT"),
])
def test_bad_kafka_security_is_a_clear_error(env, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(env)


def test_python_m_stream_settings_prints_every_variable_masked(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAIL_", "KAFKA_", "CLICKHOUSE_"))}
    env.update(SASL_SSL, TRAIL_BUCKET_S="60", TRAIL_STATE_DIR="rel/state")
    out = subprocess.run([sys.executable, "-m", "stream.settings"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True).stdout
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert list(lines) == list(variables())
    assert lines["TRAIL_BUCKET_S"].split()[1:] == ["60", "[env]"]
    assert lines["TRAIL_PARTITIONS"].split()[1:] == ["4", "[default]"]
    assert lines["TRAIL_STATE_DIR"].split()[1] == str(tmp_path / "rel/state")
    assert lines["KAFKA_SASL_PASSWORD"].split()[1] == "***" and "hunter2" not in out

    bad = subprocess.run([sys.executable, "-m", "stream.settings"], cwd=tmp_path, capture_output=True, text=True,
                         env={**env, "TRAIL_BUCKET_S": "0"})
    assert bad.returncode == 2 and "TRAIL_BUCKET_S='0'" in bad.stderr


def test_readme_configuration_table_is_the_generated_one():
    readme = (REPO / "README.md").read_text()
    table = markdown_table()
    assert table in readme, "README.md's Configuration table is stale: paste `python -m stream.settings --markdown`"
    listed = re.findall(r"^\| `([A-Z_]+)` \|", readme, flags=re.M)
    assert sorted(listed) == sorted(variables())
