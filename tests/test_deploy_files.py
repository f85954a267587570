"""deploy/ stays coherent: YAML parses; probes, images and routing keys agree; nginx -t."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from rnnstream._cli import build_parser
from rnnstream._routing import SESSION_ID_METADATA_KEY
from rnnstream.server import Settings
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
GRPC_PORT = 50051
METRICS = {
    "rnnstream_frames_total": "counter",
    "rnnstream_frame_latency_seconds": "histogram",
    "rnnstream_ort_run_seconds": "histogram",
    "rnnstream_batch_size": "histogram",
    "rnnstream_queue_depth": "gauge",
    "rnnstream_active_sessions": "gauge",
    "rnnstream_sessions_opened_total": "counter",
    "rnnstream_sessions_ended_total": "counter",
    "rnnstream_bytes_received_total": "counter",
    "rnnstream_bytes_sent_total": "counter",
}
# What nginx calls the request header that carries the session id.
NGINX_SESSION_VAR = "$http_" + SESSION_ID_METADATA_KEY.replace("-", "_")


def _docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    kustomization = _docs(K8S / "kustomization.yaml")[0]
    for name in kustomization["resources"]:
        for doc in _docs(K8S / name):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


def _compose() -> dict[str, Any]:
    return _docs(COMPOSE / "docker-compose.yml")[0]


def _nginx_conf() -> str:
    return (COMPOSE / "nginx.conf").read_text()


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert match, f"not an nginx duration: {value}"
    return int(match[1]) * units[match[2] or "s"]


def _server_deployment() -> dict[str, Any]:
    return _k8s_objects()[("Deployment", "rnnstream")]


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 8
    for path in files:
        docs = _docs(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(doc, dict) for doc in docs), path


def test_kustomization_lists_every_manifest() -> None:
    kustomization = _docs(K8S / "kustomization.yaml")[0]
    listed = set(kustomization["resources"]) | {
        f for gen in kustomization["configMapGenerator"] for f in gen["files"]
    }
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_server_deployment_probes_resources_and_grace() -> None:
    deployment = _server_deployment()
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    pod = spec["template"]["spec"]
    # Room for the preStop pause plus the server's own drain after SIGTERM.
    (container,) = pod["containers"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + Settings().grace
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["grpc"] == {"port": GRPC_PORT}, probe
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": 9400}
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Labels the selector uses are on the pods.
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()


def test_server_env_comes_from_the_configmap() -> None:
    objects = _k8s_objects()
    (container,) = _server_deployment()["spec"]["template"]["spec"]["containers"]
    (source,) = container["envFrom"]
    config = objects[("ConfigMap", source["configMapRef"]["name"])]["data"]
    assert all(key.startswith("RNNSTREAM_") for key in config)
    redis = objects[("Service", "rnnstream-redis")]
    port = redis["spec"]["ports"][0]["port"]
    assert config["RNNSTREAM_STATE_STORE"] == f"redis://rnnstream-redis:{port}/0"


def test_services_select_the_server_pods() -> None:
    objects = _k8s_objects()
    pod_labels = _server_deployment()["spec"]["template"]["metadata"]["labels"]
    headless = objects[("Service", "rnnstream-headless")]["spec"]
    cluster_ip = objects[("Service", "rnnstream")]["spec"]
    assert headless["clusterIP"] == "None"
    assert cluster_ip.get("type", "ClusterIP") == "ClusterIP"
    for svc in (headless, cluster_ip):
        assert svc["selector"].items() <= pod_labels.items()
        assert {"name": "grpc", "port": GRPC_PORT}.items() <= svc["ports"][0].items()
    proxy = objects[("Service", "rnnstream-proxy")]["spec"]
    proxy_pods = objects[("Deployment", "rnnstream-proxy")]["spec"]["template"]["metadata"]
    assert proxy["selector"].items() <= proxy_pods["labels"].items()
    # The proxy's selector must not also match the servers (and the other way round).
    assert not proxy["selector"].items() <= pod_labels.items()


def test_envoy_hashes_on_the_client_session_header_over_the_headless_service() -> None:
    envoy = _docs(K8S / "envoy.yaml")[0]
    (cluster,) = envoy["static_resources"]["clusters"]
    assert cluster["lb_policy"] == "RING_HASH" and cluster["type"] == "STRICT_DNS"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {
        "address": "rnnstream-headless",
        "port_value": GRPC_PORT,
    }
    assert cluster["health_checks"][0]["grpc_health_check"] == {}
    (listener,) = envoy["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["cluster"] == cluster["name"]
    assert route["route"]["hash_policy"] == [{"header": {"header_name": SESSION_ID_METADATA_KEY}}]
    # The proxy mounts the ConfigMap that kustomize generates from this very file.
    kustomization = _docs(K8S / "kustomization.yaml")[0]
    (generator,) = kustomization["configMapGenerator"]
    proxy = _k8s_objects()[("Deployment", "rnnstream-proxy")]["spec"]["template"]["spec"]
    assert proxy["volumes"][0]["configMap"]["name"] == generator["name"]
    assert (
        listener["address"]["socket_address"]["port_value"]
        == (proxy["containers"][0]["ports"][0]["containerPort"])
    )


def test_image_names_agree() -> None:
    (container,) = _server_deployment()["spec"]["template"]["spec"]["containers"]
    compose = _compose()
    replicas = {name: svc for name, svc in compose["services"].items() if "rnnstream-" in name}
    images = {svc["image"] for svc in replicas.values()} | {container["image"]}
    assert images == {"rnnstream:cpu"}
    kustomization = _docs(K8S / "kustomization.yaml")[0]
    assert [i["name"] for i in kustomization["images"]] == ["rnnstream"]


def test_compose_replicas_share_redis_behind_the_proxy() -> None:
    services = _compose()["services"]
    replicas = sorted(name for name in services if re.fullmatch(r"rnnstream-\d+", name))
    assert replicas == ["rnnstream-1", "rnnstream-2", "rnnstream-3"]
    for name in replicas:
        env = services[name]["environment"]
        assert env["RNNSTREAM_STATE_STORE"] == "redis://redis:6379/0"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "redis" in services
    assert services["proxy"]["volumes"] == ["./nginx.conf:/etc/nginx/nginx.conf:ro"]
    assert any(port.endswith(":8080") for port in services["proxy"]["ports"])
    # nginx's upstream names exactly the replicas, on the gRPC port.
    upstream = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", _nginx_conf(), re.M)
    assert upstream == [(name, str(GRPC_PORT)) for name in replicas]


def test_nginx_routes_by_session_header_over_http2_with_long_timeouts() -> None:
    conf = _nginx_conf()
    assert re.search(rf"^\s*hash {re.escape(NGINX_SESSION_VAR)} consistent;", conf, re.M)
    assert re.search(r"^\s*listen 8080 http2;", conf, re.M)
    assert re.search(r"^\s*grpc_pass grpc://rnnstream;", conf, re.M)
    assert re.search(r"^\s*client_max_body_size 0;", conf, re.M)
    for directive in ("grpc_read_timeout", "grpc_send_timeout", "client_body_timeout"):
        match = re.search(rf"^\s*{directive} (\S+);", conf, re.M)
        assert match, directive
        assert _seconds(match[1]) >= 600, directive


def test_health_check_commands_parse_with_the_cli() -> None:
    # The Dockerfile and compose health checks run `rnnstream health ...`: they must stay valid.
    dockerfile = (REPO / "Dockerfile").read_text()
    match = re.search(r"^HEALTHCHECK .*?\bCMD (.+?)(?: \|\| exit 1)?$", dockerfile, re.M | re.S)
    assert match
    argv = shlex.split(match[1].replace("${RNNSTREAM_PORT}", str(GRPC_PORT)))
    compose_argv = _compose()["services"]["rnnstream-1"]["healthcheck"]["test"]
    assert compose_argv[0] == "CMD"
    for command in (argv, compose_argv[1:]):
        assert command[0] == "rnnstream"
        args = build_parser().parse_args(command[1:])
        assert args.command == "health" and args.target == f"127.0.0.1:{GRPC_PORT}"


def test_dockerfile_essentials() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^EXPOSE 50051 9400$", text, re.M)
    assert re.search(r"^VOLUME /models$", text, re.M)
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert "RNNSTREAM_HOST=0.0.0.0" in text
    # Exec form, so the server is PID 1 and receives SIGTERM itself.
    assert re.search(r'^ENTRYPOINT \["rnnstream-server"\]$', text, re.M)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["python:3.11-slim", "python:3.11-slim"]


def test_dashboard_queries_only_known_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "rnnstream-dashboard.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    seen: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = re.findall(r"\brnnstream_\w+", target["expr"])
            assert names, f"{panel['title']}: {target['expr']}"
            for name in names:
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                if base != name:
                    assert METRICS.get(base) == "histogram", name
                assert base in METRICS, f"{panel['title']}: unknown metric {name}"
                seen.add(base)
    assert seen == set(METRICS), f"no panel for {set(METRICS) - seen}"


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_accepts_the_compose_config(tmp_path: Path) -> None:
    # Compose service names do not resolve here: point the upstreams at 127.0.0.1.
    conf = re.sub(r"rnnstream-\d+:", "127.0.0.1:", _nginx_conf())
    (tmp_path / "nginx.conf").write_text(conf)
    result = subprocess.run(
        [
            "nginx",
            "-t",
            "-p",
            str(tmp_path),
            "-c",
            str(tmp_path / "nginx.conf"),
            "-e",
            "stderr",
            "-g",
            f"pid {tmp_path / 'nginx.pid'};",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
