"""deploy/docker-compose.yml, the Dockerfiles and deploy/k8s/: no Docker engine or cluster
runs here, so these are checked for what would break at `docker compose up` or
`kubectl apply -k`: files parse, every mounted or copied file exists, names, ports and
paths agree across the files, and the sidecar settings they set pass the sidecar's own
validation.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import yaml
from conftest import ROOT

from sidecar.runtime.config import load_settings, parse_hostport

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def services() -> dict:
    return compose()["services"]


def env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (DEPLOY / "env.example").read_text().splitlines()
             if line and not line.startswith("#")]
    return {k: v for k, v in pairs}


def interpolate(value: str) -> str:
    """Compose's ${VAR:?msg} / ${VAR:-default} with deploy/env.example's values."""
    values = env_example()

    def one(match: re.Match) -> str:
        name, op, rest = match.group(1), match.group(2) or "", match.group(3) or ""
        if name in values:
            return values[name]
        assert op == ":-", f"${{{name}}} is required but not in env.example"
        return rest
    return re.sub(r"\$\{(\w+)(?:(:\?|:-)([^}]*))?\}", one, value)


def mounts(service: dict) -> list[tuple[Path, str]]:
    """(host path, container path) of the service's bind mounts."""
    out = []
    for item in service.get("volumes", []):
        source, target = item.split(":")[:2]
        if source.startswith("."):
            out.append(((DEPLOY / source).resolve(), target))
    return out


def target_of(service: str, source: str) -> str:
    for host, target in mounts(services()[service]):
        if host == (DEPLOY / source).resolve():
            return target
    raise AssertionError(f"{service} does not mount {source}")


# -- docker compose -----------------------------------------------------------------------

def test_compose_has_the_whole_stack():
    assert {"redis", "sidecar", "nginx", "envoy", "llm-upstream", "prometheus",
            "grafana"} <= set(services())
    for name, service in services().items():
        for needed in service.get("depends_on", []):
            assert needed in services(), f"{name} depends on unknown {needed}"


def test_redis_keeps_an_append_only_file_on_a_volume():
    redis = services()["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") and v.split(":")[0] in compose()["volumes"]
               for v in redis["volumes"])


def test_images_build_from_files_that_exist():
    for name, service in services().items():
        build = service.get("build")
        if not build:
            assert "image" in service, name
            continue
        context = (DEPLOY / build["context"]).resolve()
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile}"
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (context / source).exists(), f"{name}: COPY {source}"


def test_every_bind_mount_exists():
    found = 0
    for name, service in services().items():
        for host, _ in mounts(service):
            assert host.exists(), f"{name} mounts missing {host}"
            found += 1
    assert found >= 7


def test_proxies_reach_services_by_their_compose_names():
    names = set(services())
    envoy = (DEPLOY / "envoy" / "envoy.yaml").read_text()
    for host in re.findall(r"address: (\S+), port_value: \d+", envoy):
        assert host in ("0.0.0.0", "127.0.0.1") or host in names, host
    nginx = (DEPLOY / "nginx" / "nginx.conf").read_text()
    upstreams = re.findall(r"^\s*server ([\w.-]+):(\d+);", nginx, re.M)
    assert {h for h, _ in upstreams} <= names and len(upstreams) == 2
    # The sidecar's data port is the one both proxies call.
    data_port = parse_hostport(dockerfile_env("SIDECAR_LISTEN"), "listen")[1]
    assert ("sidecar", str(data_port)) in upstreams
    assert f"socket_address: {{address: sidecar, port_value: {data_port}}}" in envoy
    stub = services()["llm-upstream"]["environment"]["SIDECAR_SETTLE_URL"]
    assert stub == f"http://sidecar:{data_port}/settle"


def test_proxy_files_are_mounted_where_the_configs_look():
    assert target_of("nginx", "nginx/nginx.conf") == "/etc/nginx/nginx.conf"
    js_path = re.search(r"js_path (\S+);", (DEPLOY / "nginx" / "nginx.conf").read_text())[1]
    for js in ("sidecar.js", "usage.js"):
        assert target_of("nginx", f"nginx/{js}") == js_path.rstrip("/") + "/" + js
    assert target_of("envoy", "envoy/envoy.yaml") == "/etc/envoy/envoy.yaml"


def test_prometheus_and_grafana_wiring():
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config_dir = Path(target_of("prometheus", "prometheus/prometheus.yml")).parent
    for rules in prom["rule_files"]:
        assert target_of("prometheus", f"prometheus/{rules}") == str(config_dir / rules)
    admin_port = parse_hostport(dockerfile_env("SIDECAR_ADMIN_LISTEN"), "admin_listen")[1]
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"sidecar:{admin_port}"]
    assert target_of("grafana", "grafana/provisioning") == "/etc/grafana/provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" /
                               "sidecar.yml").read_text())["providers"][0]
    assert target_of("grafana", "grafana/dashboards") == provider["options"]["path"]
    source = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" /
                             "prometheus.yml").read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090"
    assert "9090:9090" in services()["prometheus"]["ports"]


def test_only_the_two_proxies_are_trusted_and_their_addresses_are_fixed():
    env = services()["sidecar"]["environment"]
    trusted = {ipaddress.ip_network(n) for n in env["SIDECAR_TRUSTED_PROXIES"].split(",")}
    subnet = ipaddress.ip_network(
        compose()["networks"]["edge"]["ipam"]["config"][0]["subnet"])
    fixed = {ipaddress.ip_network(services()[p]["networks"]["edge"]["ipv4_address"])
             for p in ("nginx", "envoy")}
    assert trusted == fixed and all(n.subnet_of(subnet) for n in fixed)


def dockerfile_env(name: str) -> str:
    text = (DEPLOY / "Dockerfile").read_text()
    return re.search(rf"{name}=(\S+)", text)[1]


def test_compose_sidecar_settings_are_valid():
    env = {k: interpolate(str(v)) for k, v in services()["sidecar"]["environment"].items()}
    env.update(SIDECAR_LISTEN=dockerfile_env("SIDECAR_LISTEN"),
               SIDECAR_ADMIN_LISTEN=dockerfile_env("SIDECAR_ADMIN_LISTEN"))
    settings = load_settings(ROOT / dockerfile_env("SIDECAR_CONFIG").replace("/app/", ""),
                             env=env)
    assert settings.redis_url == "redis://redis:6379/0" and settings.settlement_token
    grace = services()["sidecar"]["stop_grace_period"]
    assert int(grace.rstrip("s")) > settings.shutdown_timeout_s


def test_dockerignore_keeps_what_the_image_copies():
    allowed = [line[1:] for line in (DEPLOY / "Dockerfile.dockerignore").read_text()
               .splitlines() if line.startswith("!")]
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert any(a == source or a.startswith(source + "/") for a in allowed), source


# -- kubernetes ---------------------------------------------------------------------------

def k8s_docs() -> dict[str, dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ConfigMap", "Secret", "Namespace"} == set(k8s_docs())


def container() -> dict:
    return k8s_docs()["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def configmap_settings(tmp: Path):
    """The settings a pod starts with: the ConfigMap's file, the Secret's environment."""
    docs = k8s_docs()
    data = docs["ConfigMap"]["data"]
    assert set(data) == {"sidecar.yaml"}
    path = tmp / "sidecar.yaml"
    path.write_text(data["sidecar.yaml"])
    return load_settings(path, env=dict(docs["Secret"]["stringData"]))


def test_configmap_and_secret_make_valid_settings(tmp_path):
    settings = configmap_settings(tmp_path)
    assert settings.redis_url and settings.key_pepper and settings.settlement_token
    refs = [r["secretRef"]["name"] for r in container()["envFrom"]]
    assert refs == [k8s_docs()["Secret"]["metadata"]["name"]]


def test_probes_and_ports_match_the_sidecar(tmp_path):
    settings = configmap_settings(tmp_path)
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports["data"] == parse_hostport(settings.listen, "listen")[1]
    assert ports["admin"] == parse_hostport(settings.admin_listen, "admin_listen")[1]
    c = container()
    assert (c["livenessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["port"]) \
        == ("/healthz", "admin")
    assert (c["readinessProbe"]["httpGet"]["path"],
            c["readinessProbe"]["httpGet"]["port"]) == ("/readyz", "admin")
    pod = k8s_docs()["Deployment"]["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["admin"])
    service_ports = {p["targetPort"] for p in k8s_docs()["Service"]["spec"]["ports"]}
    assert service_ports <= set(ports)


def test_config_volume_and_args_agree():
    c = container()
    pod = k8s_docs()["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    config = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert volumes["config"]["configMap"]["name"] == k8s_docs()["ConfigMap"]["metadata"][
        "name"]
    assert c["args"][c["args"].index("--config") + 1] == config["mountPath"] + "/sidecar.yaml"
    assert all(m["name"] in volumes for m in c["volumeMounts"])
    assert c["image"] == services()["sidecar"]["image"]


def test_selectors_and_targets_agree():
    docs = k8s_docs()
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() \
        <= labels.items()
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment",
                                                docs["Deployment"]["metadata"]["name"])
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["minReplicas"] > docs["PodDisruptionBudget"]["spec"]["minAvailable"]


def test_pods_drain_before_they_are_killed(tmp_path):
    settings = configmap_settings(tmp_path)
    pod = k8s_docs()["Deployment"]["spec"]["template"]["spec"]
    pause = int(container()["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_timeout_s + pause


# -- the repository stands alone ---------------------------------------------------------

SKIP_DIRS = {".git", ".venv", "__pycache__", ".hypothesis", ".pytest_cache", "results"}
TEXT = {".md", ".py", ".lua", ".yaml", ".yml", ".conf", ".js", ".sh", ".toml", ".json", ""}


def repository_text_files():
    for path in sorted(ROOT.rglob("*")):
        parts = set(path.relative_to(ROOT).parts)
        if parts & SKIP_DIRS or any(p.endswith(".egg-info") for p in parts):
            continue
        if path.is_file() and path.suffix in TEXT and path.stat().st_size < 2_000_000:
            yield path


def test_nothing_cites_a_document_outside_the_repository():
    # The inputs this project was written from live outside it (a sibling folder of
    # reference pages and a contract): their names are put together from parts here, so
    # that this guard itself is no citation of them.
    shared, reference = "shared", "reference"
    outside = (f"{shared}/{reference}", f"/work/{shared}", "CONTRACT" + ".md",
               f"{reference}/proxies.md", f"{reference}/api-keys.md")
    cited = [(str(p.relative_to(ROOT)), word) for p in repository_text_files()
             for word in outside if word in p.read_text(errors="replace")
             and p != Path(__file__)]
    assert cited == []


def test_every_relative_link_in_the_docs_resolves():
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                ROOT / "deploy" / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append((doc.name, target))
    assert broken == []
