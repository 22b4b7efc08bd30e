"""deploy/ checked statically: the three validators (hadolint, the Compose specification,
kubernetes-validate with vendored schemas for the custom resources), and what schemas
cannot say: grace periods against the send deadline, the queue KEDA watches, a non-root
image, environment names that are real settings, metric names that the code exports.

No container engine or cluster runs here; the image runs `postroom`, the same command the
end-to-end tests start (tests/stack.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from postroom.api.app import create_app
from postroom.cli import build_parser
from postroom.shared import keys
from postroom.shared.queue_metrics import queue_key
from postroom.shared.settings import Settings
from postroom.worker import metrics as worker_metrics
from postroom.worker.metrics import HeartbeatCollector, WorkerMetrics
from tests.helpers import auth, create_solution, make_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SCHEMAS = K8S / "schemas"
#: custom resources and the vendored schema each is checked against
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobject_v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh_triggerauthentication_v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitor_v1.json",
}
#: seconds a worker needs beyond the longest send to hand its batch back and exit
SHUTDOWN_MARGIN_S = 30


def tool(name: str) -> str:
    """A validator installed with the test extras: missing is a skip on a laptop and a
    failure in CI."""
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            raise AssertionError(f"{name} is not installed (pip install -e '.[test]')")
        pytest.skip(f"{name} is not installed")
    return path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                          cwd=ROOT)


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def by_kind(kind: str, name: str) -> dict[str, Any]:
    for path in manifests():
        for doc in documents(path):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} in deploy/k8s")


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def base(metric: str) -> str:
    """A sample's metric name without the suffix its type adds."""
    return re.sub(r"_(bucket|count|sum|total|created)$", "", metric)


def seconds(duration: str) -> float:
    """A Compose duration such as ``180s``, ``2m30s``."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


# -- the validators -------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    """hadolint finds nothing in deploy/Dockerfile (the two rules ignored are justified
    beside them)."""
    proc = run(tool("hadolint"), "--format", "json", "deploy/Dockerfile")
    assert (0, []) == (proc.returncode, json.loads(proc.stdout or "[]")), proc.stderr


def test_compose_file_follows_the_compose_specification() -> None:
    """deploy/compose.yaml validates against the Compose specification's schema."""
    proc = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
               "deploy/compose.yaml")
    assert 0 == proc.returncode, proc.stdout + proc.stderr


def test_kubernetes_manifests_validate_strictly() -> None:
    """Every manifest of deploy/k8s validates with ``kubernetes-validate --strict``; the
    only kinds it has no schema for are the custom resources checked below and the
    kustomization."""
    paths = [str(p.relative_to(ROOT)) for p in sorted(K8S.glob("*.yaml"))]
    proc = run(tool("kubernetes-validate"), "--strict", "--quiet", *paths)
    assert 0 == proc.returncode, proc.stdout + proc.stderr
    unchecked = set(re.findall(r"Couldn't find schema for kind (\w+)", proc.stdout + proc.stderr))
    assert {kind for _, kind in CUSTOM_KINDS} | {"Kustomization"} == unchecked


def test_custom_resources_validate_against_the_vendored_schemas() -> None:
    """KEDA's and the Prometheus Operator's resources validate against their CRDs'
    schemas (deploy/k8s/schemas), which refuse unknown fields."""
    checked = set()
    for path in manifests():
        for doc in documents(path):
            schema = CUSTOM_KINDS.get((doc["apiVersion"], doc["kind"]))
            if schema is None:
                continue
            proc = run(tool("check-jsonschema"), "--schemafile", str(SCHEMAS / schema),
                       str(path))
            assert 0 == proc.returncode, proc.stdout + proc.stderr
            checked.add(doc["kind"])
    assert {kind for _, kind in CUSTOM_KINDS} == checked


def test_kustomization_lists_every_manifest() -> None:
    """``kubectl apply -k deploy/k8s`` applies every manifest but the Secret example."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = sorted(kustomization["resources"])
    expected = sorted(p.name for p in manifests() if p.name != "secret.example.yaml")
    assert expected == listed


# -- what the schemas cannot check ---------------------------------------------------


def test_worker_grace_periods_outlast_the_send_deadline() -> None:
    """A stopped worker finishes its sends: the pod's grace period, the Compose stop grace
    period and systemd's stop timeout each exceed the send deadline plus a margin."""
    config = by_kind("ConfigMap", "postroom")["data"]
    deadline = float(config["POSTROOM_SEND_DEADLINE_S"])
    assert Settings().send_deadline_s == deadline
    pod = by_kind("Deployment", "postroom-worker")["spec"]["template"]["spec"]
    unit = (DEPLOY / "postroom-worker@.service").read_text()
    [stop_timeout] = re.findall(r"^TimeoutStopSec=(\d+)$", unit, re.M)
    worker = compose()["services"]["worker"]
    assert deadline == float(worker["environment"]["POSTROOM_SEND_DEADLINE_S"])
    for grace in (pod["terminationGracePeriodSeconds"],
                  seconds(worker["stop_grace_period"]), int(stop_timeout)):
        assert grace >= deadline + SHUTDOWN_MARGIN_S


def test_keda_watches_the_list_the_api_enqueues_to(
    redis_url: str, real_redis: redis.Redis
) -> None:
    """The KEDA trigger's listName is the Redis key of the Celery queue the ConfigMap
    names: a message the API accepts is in that very list."""
    scaled = by_kind("ScaledObject", "postroom-worker")
    [trigger] = [t for t in scaled["spec"]["triggers"] if t["type"] == "redis"]
    queue = by_kind("ConfigMap", "postroom")["data"]["POSTROOM_QUEUE"]
    settings = make_settings(redis_url, queue=queue)
    assert queue_key(settings) == trigger["metadata"]["listName"]
    assert "postroom-worker" == scaled["spec"]["scaleTargetRef"]["name"]
    client = create_app(settings).test_client()
    token = create_solution(client)
    r = client.post("/api/v1/solutions/acme/email", json={"to": ["a@example.com"]},
                    headers=auth(token))
    assert 202 == r.status_code
    assert 1 == real_redis.llen(trigger["metadata"]["listName"])


def test_the_image_runs_as_a_fixed_non_root_user() -> None:
    """The image's last USER is a fixed, non-zero UID, the one the pods require, with a
    read-only root filesystem and no privilege escalation; Compose runs it read-only."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    final_stage = dockerfile.rsplit("\nFROM ", 1)[1]
    [user] = re.findall(r"^USER (\S+)$", final_stage, re.M)
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid == uid
    assert re.search(r'^ENTRYPOINT \["tini", "--", "postroom"\]$', final_stage, re.M)
    assert re.search(r"^HEALTHCHECK .*/api/v1/solution/health", final_stage, re.M | re.S)
    for name in ("postroom-api", "postroom-worker"):
        pod = by_kind("Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert int(uid) == pod["securityContext"]["runAsUser"]
        [container] = pod["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert {"requests", "limits"} <= set(container["resources"])
    for service in ("api", "worker"):
        assert compose()["services"][service]["read_only"] is True


def test_every_setting_named_in_deploy_is_real() -> None:
    """Every ``POSTROOM_*`` name in deploy/ is a setting (an unknown one would stop the
    service at start-up)."""
    known = {f"POSTROOM_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    named: dict[str, set[str]] = {}
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix != ".json":
            for name in re.findall(r"POSTROOM_[A-Z0-9_]*[A-Z0-9]", path.read_text()):
                named.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert {} == {name: files for name, files in named.items() if name not in known}
    assert {"POSTROOM_WORKER_METRICS_PORT", "POSTROOM_SEND_DEADLINE_S"} <= set(named)


def test_compose_and_k8s_run_commands_that_exist() -> None:
    """The commands the containers run are ``postroom`` subcommands with known options."""
    argvs = [compose()["services"][s]["command"] for s in ("api", "worker")]
    for name in ("postroom-api", "postroom-worker"):
        [container] = by_kind("Deployment", name)["spec"]["template"]["spec"]["containers"]
        argvs.append(container["args"])
    for argv in argvs:
        args, extra = build_parser().parse_known_args(argv)
        assert ([], argv[0]) == (extra, args.command)


def test_dashboard_and_alerts_use_metrics_the_code_exports(
    redis_url: str, real_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every postroom metric the Grafana dashboard and the alert rules query is one that
    the API's or a worker's /metrics serves."""
    client = create_app(make_settings(redis_url)).test_client()
    client.get("/api/v1/solution/health")
    real_redis.hset(keys.stats(), "sent", 1)
    names = re.compile(r"^(?:# TYPE )?(postroom_\w+)", re.M)
    exported = set(names.findall(client.get("/metrics").get_data(as_text=True)))
    registry = CollectorRegistry()
    worker = WorkerMetrics.build(per_solution=False)
    for field in dataclasses.fields(WorkerMetrics):
        metric = getattr(worker, field.name)
        if isinstance(metric, MetricWrapperBase):
            registry.register(metric)
    beat = HeartbeatCollector()
    monkeypatch.setattr(worker_metrics, "_last_beat", 1.0)
    registry.register(beat)
    exported |= set(names.findall(generate_latest(registry).decode()))

    dashboard = json.loads((DEPLOY / "grafana" / "postroom.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert all({"alert", "expr", "for", "labels", "annotations"} <= set(r) for r in alerts)
    queries += [r["expr"] for r in alerts]
    used = {name for q in queries for name in re.findall(r"\b(postroom_\w+)", q)}
    assert set() == {base(n) for n in used} - {base(n) for n in exported}
    for wanted in ("postroom_queue_depth", "postroom_worker_sends_in_flight",
                   "postroom_worker_relay_connections", "postroom_worker_delivery_seconds_bucket",
                   "postroom_http_request_seconds_bucket"):
        assert wanted in used
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_compose_secrets_are_made_once_and_read_by_every_process(tmp_path: Path) -> None:
    """The Compose ``secrets`` service's script (run here by /bin/sh, with the volume as a
    directory) writes a valid admin token and secret key once, keeps them on the next
    start, and the services' entry point exports them before running ``postroom``."""
    services = compose()["services"]
    volume = tmp_path / "run-postroom"
    volume.mkdir()

    def script(text: str) -> str:
        return text.replace("$$", "$").replace("/run/postroom", str(volume))

    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "POSTROOM_ADMIN_TOKEN": "",
           "POSTROOM_SECRET_KEY": ""}
    make = script(services["secrets"]["entrypoint"][2])
    subprocess.run(["/bin/sh", "-c", make], env=env, check=True, timeout=60)
    first = (volume / "secrets.env").read_text()
    subprocess.run(["/bin/sh", "-c", make], env=env, check=True, timeout=60)
    assert first == (volume / "secrets.env").read_text()
    entry = services["api"]["entrypoint"]
    assert ["tini", "--", "/bin/sh", "-c"] == entry[:4]
    shown = subprocess.run(
        ["/bin/sh", "-c", script(entry[4]).replace("exec postroom", "exec env"), *entry[5:]],
        env=env, check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    exported = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    settings = Settings.from_env({k: v for k, v in exported.items()
                                  if k.startswith("POSTROOM_")})
    assert len(settings.admin_token) >= 32
