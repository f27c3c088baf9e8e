"""deploy/ validated offline (there is no Docker engine here): the compose file against the
compose-spec JSON schema and for what TRAIL needs of it, the Dockerfiles instruction by
instruction, topic settings against the code's defaults, Grafana provisioning.
The DDL runs on the embedded engine in tests/test_store.py, the dashboards in test_store_dashboards.py."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
                           "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
DAY_MS = 86_400_000


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def topics_yaml() -> dict:
    return yaml.safe_load((DEPLOY / "topics.yaml").read_text())


def compose_schema() -> dict:
    spec = importlib.util.find_spec("check_jsonschema")  # located, not imported: only its data file is used
    if spec is None:
        pytest.skip("the compose-spec schema comes with check-jsonschema (the dev extra)")
    path = Path(spec.submodule_search_locations[0]) / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text())


def test_compose_file_is_valid_against_the_compose_spec(compose):
    validator = jsonschema.Draft7Validator(compose_schema())
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]
    broken = json.loads(json.dumps(compose))
    broken["services"]["kafka"]["restart_policy"] = "always"  # not a compose key: the schema must say so
    assert list(validator.iter_errors(broken))


def test_compose_runs_the_whole_system(compose):
    services = compose["services"]
    assert {"kafka", "kafka-init", "clickhouse", "grafana", "trail-worker", "trail-worker-gpu"} <= services.keys()
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller" and "zookeeper" not in json.dumps(kafka).lower()
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    for name in ("kafka", "clickhouse"):
        assert services[name]["healthcheck"]["test"], name
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
        if "build" in svc:
            assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()


def test_workers_point_at_the_compose_services(compose):
    services = compose["services"]
    for name in ("trail-worker", "trail-worker-gpu"):
        svc = services[name]
        assert svc["command"][:4] == ["faust", "-A", "stream.app", "worker"], name
        env = svc["environment"]
        assert env["KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert env["CLICKHOUSE_URL"] == "http://clickhouse:8123"
        assert env["CLICKHOUSE_PASSWORD"] == services["clickhouse"]["environment"]["CLICKHOUSE_PASSWORD"]
        assert env["CLICKHOUSE_DATABASE"] == services["clickhouse"]["environment"]["CLICKHOUSE_DB"]
        for var in ("TRAIL_SINK_SPILL_DIR", "TRAIL_STATE_DIR"):  # on the service's own volume
            assert env[var].startswith("/var/lib/trail/"), (name, var)
    spill_volumes = [services[n]["volumes"][0].split(":")[0] for n in ("trail-worker", "trail-worker-gpu")]
    assert len(set(spill_volumes)) == 2, "each sink needs its own spill directory"
    # every worker serves the model (stream.app builds scorer, ranker, explainer and the sink when
    # TRAIL_MODEL_DIR is set); TRAIL_TICK_HOOKS names only extension hooks, none of the built-in ones
    for name in ("trail-worker", "trail-worker-gpu"):
        env = services[name]["environment"]
        assert env["TRAIL_MODEL_DIR"].startswith("/app/models/")
        hooks = [h.strip() for h in env.get("TRAIL_TICK_HOOKS", "").split(",") if h.strip()]
        assert not {"stream.serving.service:on_tick", "stream.store.hooks:store_snapshots"} & set(hooks), hooks
        assert services[name]["stop_grace_period"] == "60s"  # the ordered shutdown needs more than Docker's 10 s
    gpu = services["trail-worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["dockerfile"] == "deploy/Dockerfile.gpu"
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_grafana_is_provisioned_with_clickhouse_and_the_dashboard(compose):
    grafana = compose["services"]["grafana"]
    assert "grafana-clickhouse-datasource" in grafana["environment"]["GF_PLUGINS_PREINSTALL"]
    mounts = dict(v.rsplit(":", 1)[0].split(":") for v in grafana["volumes"] if v.startswith("."))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/trail.yaml").read_text())["providers"][0]
    assert provider["options"]["path"] == mounts["./grafana/dashboards"]
    assert (DEPLOY / "grafana/dashboards/trail.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{mounts['./grafana/dashboards']}/trail.json"
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/clickhouse.yaml").read_text())["datasources"][0]
    assert ds["type"] == "grafana-clickhouse-datasource" and ds["jsonData"]["protocol"] == "http"
    # the ${...} placeholders are filled from Grafana's own environment
    for placeholder in re.findall(r"\$\{(\w+)\}", (DEPLOY / "grafana/provisioning/datasources/clickhouse.yaml").read_text()):
        assert placeholder in grafana["environment"], placeholder


def test_topic_settings_match_the_code_and_the_compose_init(compose, topics_yaml):
    from stream.settings import WorkerConfig
    from stream.topics import Topics
    from stream.core.trends import TrendConfig

    declared = {name: (t["partitions"], {k: str(v) for k, v in t["config"].items()})
                for name, t in topics_yaml["topics"].items()}
    in_code = {s.name: (s.partitions, dict(s.config)) for s in [*Topics().specs(), WorkerConfig().snapshot_spec()]}
    assert declared == in_code

    script = compose["services"]["kafka-init"]["command"][0]
    created = {}
    for line in script.splitlines():
        words = shlex.split(line)
        if words[:1] == ["topic"]:
            configs = dict(w.split("=", 1) for w in words[3:] if w != "--config")
            created[words[1]] = (int(words[2]), configs)
    assert created == declared

    events = topics_yaml["topics"]["trail.events"]["config"]
    longest_window_ms = max(n for _, n in TrendConfig().windows) * TrendConfig().bucket_ms
    assert int(events["retention.ms"]) >= longest_window_ms >= 28 * DAY_MS
    assert topics_yaml["topics"]["trail.items"]["config"]["cleanup.policy"] == "compact"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by Docker
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, args = full.partition(" ")
        out.append((word.upper(), args.strip()))
    assert not pending, f"{path.name}: a continued line never ends"
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_parse(name):
    path = DEPLOY / name
    instructions = dockerfile_instructions(path)
    unknown = [w for w, _ in instructions if w not in DOCKERFILE_INSTRUCTIONS]
    assert not unknown, unknown
    assert [w for w, _ in instructions if w != "ARG"][0] == "FROM"
    cmd = [a for w, a in instructions if w == "CMD"][-1]
    assert json.loads(cmd)[:4] == ["faust", "-A", "stream.app", "worker"]
    for word, args in instructions:
        if word == "COPY":
            for src in shlex.split(args)[:-1]:
                if not src.startswith("--"):
                    assert (ROOT / src).exists() or src in ("README.md", "models"), f"{name}: COPY {src} missing"
        if word == "USER":
            assert args not in ("root", "0")
    text = " ".join(a for _, a in instructions)
    assert "download.pytorch.org/whl/cpu" in text  # torch without CUDA wheels in both images
    if name == "Dockerfile.gpu":
        assert instructions[0][1].startswith("nvidia/cuda:") and "cudnn" in instructions[0][1]
        assert "pip uninstall -y onnxruntime onnxruntime-gpu" in text and "onnxruntime-gpu==" in text
    else:
        assert "onnxruntime-gpu" not in text
