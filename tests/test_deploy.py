"""The Kubernetes chart (deploy/chart): rendered offline with Helm's own engine (helm-python-sdk, Helm 4's Go
SDK; no cluster, no helm binary), every manifest validated against the Kubernetes schemas of the oldest
and newest supported versions (kubernetes-validate, strict: unknown fields fail), the custom resources
checked structurally, and what the issue asks of them checked by reading them: one GPU per replica, deep
health probes, non-root, the queue-time rule exactly as Triton's chart, every number from values.yaml.
The container scripts run here with stand-in commands, and the arguments the chart gives
kandinsky-serve and kandinsky-gateway are parsed by their own parsers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk renders the chart (requirements/cpu.txt)")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "chart"
NAMESPACE = "kandinsky"
RELEASE = "k22"
KUBERNETES_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
# Resources whose schemas Kubernetes does not ship (CRDs): checked structurally below.
CUSTOM = {("monitoring.coreos.com/v1", "ServiceMonitor")}
TRITON_QUEUE_RULE = (
    "avg(delta(nv_inference_queue_duration_us[30s]) / (1 + delta(nv_inference_request_success[30s])))"
)

VARIANTS = {
    "defaults": {},
    "fixed replicas, LoadBalancer with a token, no operator": {
        "autoscaling": {"enabled": False},
        "triton": {"replicas": 3, "extraArgs": ["--log-verbose", "1"]},
        "gateway": {"service": {"type": "LoadBalancer"}, "tokenSecret": "gateway-token"},
        "metrics": {"serviceMonitor": {"enabled": False}, "podAnnotations": False},
        "networkPolicy": {"enabled": False},
        "podDisruptionBudget": {"enabled": False},
    },
    "pinned revisions, one GPU model, existing volume and secrets": {
        "checkpoint": {
            "priorRevision": "0123456789abcdef0123456789abcdef01234567",
            "decoderRevision": "89abcdef0123456789abcdef0123456789abcdef",
            "decoderInpaint": "",
            "hfTokenSecret": "hf",
        },
        "build": {"staticSize": "768x768"},
        "gpu": {"product": "NVIDIA-H100-80GB-HBM3"},
        "storage": {"existingClaim": "shared-models"},
        "adminKey": {"existingSecret": "triton-admin"},
        "prepare": {"ttlSecondsAfterFinished": 86400},
        "metrics": {
            "prometheusAdapter": {"namespace": "monitoring"},
            "serviceMonitor": {"labels": {"a": "b"}},
        },
    },
    "tiny preset smoke test": {"checkpoint": {"preset": "tiny"}, "build": {"flavour": "onnxruntime"}},
}


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses duplicate keys (the API server's decoder does too)."""


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicates}", node.start_mark)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def render(values: dict | None = None) -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    documents = []
    for path, text in sorted(files.items()):
        if path.endswith(".yaml"):
            documents += [d for d in yaml.load_all(text, Loader=_StrictLoader) if d]
    return documents


def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def find(documents: list[dict], kind: str, suffix: str = "") -> dict:
    matches = [d for d in documents if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(matches) == 1, f"{kind} *{suffix}: {[d['metadata']['name'] for d in matches]}"
    return matches[0]


def container(document: dict) -> dict:
    return document["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture(scope="module")
def default() -> list[dict]:
    return render()


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_manifest_validates_against_the_kubernetes_schemas(variant):
    documents = render(VARIANTS[variant])
    kinds = {d["kind"] for d in documents}
    assert {"Job", "Deployment", "Service", "ConfigMap"} <= kinds
    for document in documents:
        if (document["apiVersion"], document["kind"]) in CUSTOM:
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(document, version, strict=True)
        names = [document["metadata"]["name"]]
        if document["kind"] in ("Deployment", "Job"):
            names += [c["name"] for c in document["spec"]["template"]["spec"]["containers"]]
        assert all(len(n) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", n) for n in names), names


def test_the_service_monitor_is_well_formed_and_selects_the_replicas(default):
    monitor = find(default, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "namespaceSelector", "endpoints"}
    headless = find(default, "Service", "-triton")
    labels = headless["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert (
        endpoint["port"] in {p["name"] for p in headless["spec"]["ports"]} and endpoint["path"] == "/metrics"
    )
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    # and the replicas carry the scrape annotations too
    annotations = find(default, "Deployment", "-triton")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(values()["ports"]["metrics"])


def test_the_autoscaler_scales_on_tritons_queue_time_per_request(default):
    config = yaml.safe_load(find(default, "ConfigMap", "-prometheus-adapter")["data"]["config.yaml"])
    [rule] = config["rules"]
    assert rule["name"] == {"matches": "nv_inference_queue_duration_us", "as": "avg_time_queue_us"}
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    assert f'namespace="{NAMESPACE}"' in rule["seriesQuery"]
    query = rule["metricsQuery"].replace("{<<.LabelMatchers>>}", "").replace(" by (<<.GroupBy>>)", "")
    assert query.replace(" ", "") == TRITON_QUEUE_RULE.replace(" ", "")
    hpa = find(default, "HorizontalPodAutoscaler")
    wanted = values()["autoscaling"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
        wanted["minReplicas"],
        wanted["maxReplicas"],
    )
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert metric["pods"]["target"] == {
        "type": "AverageValue",
        "averageValue": str(wanted["targetAverageValue"]),
    }
    assert hpa["spec"]["scaleTargetRef"]["name"] == find(default, "Deployment", "-triton")["metadata"]["name"]
    # the HPA owns the replica count: the Deployment does not set one (a helm upgrade would reset it)
    assert "replicas" not in find(default, "Deployment", "-triton")["spec"]
    fixed = render({"autoscaling": {"enabled": False}, "triton": {"replicas": 3}})
    assert find(fixed, "Deployment", "-triton")["spec"]["replicas"] == 3
    assert not [d for d in fixed if d["kind"] == "HorizontalPodAutoscaler"]


def test_replicas_have_one_gpu_shared_memory_and_deep_health_probes(default):
    deployment = find(default, "Deployment", "-triton")
    pod = deployment["spec"]["template"]["spec"]
    triton = container(deployment)
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": values()["triton"]["shmSize"]}
    assert {"name": "shm", "mountPath": "/dev/shm"} in triton["volumeMounts"]
    health_port = values()["ports"]["health"]
    assert {"name": "health", "containerPort": health_port, "protocol": "TCP"} in triton["ports"]
    for probe, path in (
        ("startupProbe", "/health/ready"),
        ("readinessProbe", "/health/ready"),
        ("livenessProbe", "/health/live"),
    ):
        assert triton[probe]["httpGet"] == {"path": path, "port": "health"}, probe
    assert "/v2/health" not in json.dumps(deployment)
    # the data volume is read-only for replicas; the Job writes it
    assert next(v for v in pod["volumes"] if v["name"] == "data")["persistentVolumeClaim"]["readOnly"] is True
    job = find(default, "Job")
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert not any(m.get("readOnly") for m in container(job)["volumeMounts"] if m["name"] == "data")


def test_nothing_runs_as_root_or_privileged():
    for documents in (render(v) for v in VARIANTS.values()):
        for document in documents:
            if document["kind"] not in ("Deployment", "Job"):
                continue
            pod = document["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
            assert pod["automountServiceAccountToken"] is False
            for item in pod["containers"] + pod.get("initContainers", []):
                context = item["securityContext"]
                assert context["privileged"] is False and context["allowPrivilegeEscalation"] is False
                assert context["readOnlyRootFilesystem"] is True and context["capabilities"] == {
                    "drop": ["ALL"]
                }


def test_the_gateway_is_the_entry_point_and_balances_over_the_headless_service(default):
    headless = find(default, "Service", "-triton")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is False
    entry = find(default, "Service", RELEASE + "-kandinsky22")
    gateway = find(default, "Deployment", "-gateway")
    assert entry["spec"]["selector"] == gateway["spec"]["selector"]["matchLabels"]
    assert {p["name"] for p in entry["spec"]["ports"]} == {"http", "grpc"}
    host = f"{headless['metadata']['name']}.{NAMESPACE}.svc"
    args = container(gateway)["args"]
    ports = values()["ports"]
    for flag, port in (
        ("--triton-http", "http"),
        ("--triton-grpc", "grpc"),
        ("--health-url", "health"),
        ("--openai-url", "openai"),
    ):
        assert f"{flag}={host}:{ports[port]}" in args
    policy = find(default, "NetworkPolicy")
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == entry["spec"]["selector"]


def test_the_chart_arguments_are_accepted_by_kandinsky_serve_and_kandinsky_gateway(
    default, tiny_repository, tmp_path, nginx_with_njs
):
    from kandinsky_repository.gateway.nginx import find_nginx
    from kandinsky_repository.gateway.nginx import main as gateway_main
    from kandinsky_repository.serving.server import _parser as serve_parser

    triton_args = container(find(default, "Deployment", "-triton"))["args"]
    parsed = serve_parser().parse_args(["--repository", "r", *triton_args])
    assert (parsed.http_port, parsed.grpc_port, parsed.health_port, parsed.openai_port) == tuple(
        values()["ports"][p] for p in ("http", "grpc", "health", "openai")
    )
    assert parsed.host == parsed.health_host == parsed.openai_host == "0.0.0.0"
    # The gateway's, with the headless name replaced by one that resolves here, written as files only.
    host = f"{find(default, 'Service', '-triton')['metadata']['name']}.{NAMESPACE}.svc"
    gateway_args = [
        a.replace(host, "localhost") for a in container(find(default, "Deployment", "-gateway"))["args"]
    ]
    gateway_args = [a for a in gateway_args if not a.startswith("--gateway-runtime-dir")]
    out = tmp_path / "gateway"
    assert (
        gateway_main([*gateway_args, "--repository", str(tiny_repository), "--write-config", str(out)]) == 0
    )
    conf = (out / "nginx.conf").read_text()
    assert re.search(
        r"upstream triton_grpc \{\s+server localhost:" + str(values()["ports"]["grpc"]) + ";",
        conf,
    )
    assert "grpc_next_upstream error timeout non_idempotent;" in conf
    assert re.search(
        r"upstream kandinsky_openai \{\s+server localhost:" + str(values()["ports"]["openai"]) + ";", conf
    )
    nginx = find_nginx()
    checked = subprocess.run(
        [
            str(nginx),
            "-t",
            "-q",
            "-p",
            f"{out}/",
            "-c",
            str(out / "nginx.conf"),
            "-e",
            str(out / "error.log"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


def test_every_number_comes_from_values_yaml():
    from kandinsky_repository.settings import DEFAULTS

    ports = values()["ports"]
    assert ports == {
        "http": DEFAULTS.http_port,
        "grpc": DEFAULTS.grpc_port,
        "metrics": DEFAULTS.metrics_port,
        "health": DEFAULTS.health_port,
        "openai": DEFAULTS.openai_port,
    }
    for template in (CHART / "templates").iterdir():
        text = re.sub(
            r"\{\{.*?\}\}", "", template.read_text(), flags=re.S
        )  # template expressions may hold numbers
        text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())  # and comments
        text = text.replace("apiVersion: v1", "").replace("autoscaling/v2", "").replace("/v1", "")
        text = text.replace("(1+delta(", "")  # the constant of Triton's formula, not a setting
        numbers = re.findall(r"(?<![\w.-])\d+(?![\w.])", text)
        assert not numbers, f"{template.name} spells numbers {numbers}: put them in values.yaml"


def test_a_new_checkpoint_revision_is_a_new_key_job_and_rolling_update(default):
    pinned = render({"checkpoint": {"priorRevision": "0123456789abcdef0123456789abcdef01234567"}})
    old, new = (find(d, "Deployment", "-triton")["spec"]["template"] for d in (default, pinned))
    old_key, new_key = (t["metadata"]["annotations"]["kandinsky22/key"] for t in (old, new))
    assert old_key != new_key and re.fullmatch(r"[0-9a-f]{16}", new_key)
    assert find(default, "Job")["metadata"]["name"] != find(pinned, "Job")["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in container(find(pinned, "Job"))["env"]}
    assert env["KANDINSKY_PRIOR_REVISION"] == "0123456789abcdef0123456789abcdef01234567"
    assert env["KANDINSKY_KEY"] == new_key
    assert (
        json.loads(env["KANDINSKY_KEY_SOURCE"])["checkpoint"]["priorRevision"]
        == env["KANDINSKY_PRIOR_REVISION"]
    )
    # The ControlNet part is opt-in, reaches the prepare Job like the other parts, and changes the key
    depth = "kandinsky-community/kandinsky-2-2-controlnet-depth"
    with_controlnet = render({"checkpoint": {"controlnet": depth, "controlnetRevision": "4" * 40}})
    controlnet_env = {e["name"]: e.get("value") for e in container(find(with_controlnet, "Job"))["env"]}
    assert (controlnet_env["KANDINSKY_CONTROLNET"], controlnet_env["KANDINSKY_CONTROLNET_REVISION"]) == (
        depth,
        "4" * 40,
    )
    assert {e["name"]: e.get("value") for e in container(find(default, "Job"))["env"]}[
        "KANDINSKY_CONTROLNET"
    ] == ""
    assert controlnet_env["KANDINSKY_KEY"] != old_key
    # Settings that do not change what is built keep the key (no rebuild)
    assert (
        find(render({"triton": {"replicas": 5}, "gateway": {"replicas": 4}}), "Deployment", "-triton")[
            "spec"
        ]["template"]["metadata"]["annotations"]["kandinsky22/key"]
        == old_key
    )


# -- the container scripts, with stand-in commands ---------------------------------------------------


def _stand_ins(folder: Path) -> Path:
    """kandinsky-entrypoint (writes a repository), kandinsky-serve/-gateway (print their arguments),
    kandinsky-export (without --prior-revision: an image older than the revision flags)."""
    folder.mkdir()
    scripts = {
        "kandinsky-entrypoint": 'mkdir -p "$KANDINSKY_DATA/model_repository/unet"; '
        'touch "$KANDINSKY_DATA/model_repository/unet/config.pbtxt"; echo built >> "$KANDINSKY_DATA/../builds"',
        "kandinsky-serve": 'echo "serve $*"',
        "kandinsky-gateway": 'echo "gateway $*"',
        "kandinsky-export": 'echo "usage: kandinsky-export onnx [--checkpoint C] --output O"',
    }
    for name, body in scripts.items():
        path = folder / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return folder


def test_the_scripts_prepare_once_and_serve_the_folder_of_the_key_and_gpu(default, tmp_path):
    configmap = find(default, "ConfigMap", "-scripts")["data"]
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name, text in configmap.items():
        (scripts / name).write_text(text)
    assert set(configmap) == {"common.sh", "prepare.sh", "serve.sh", "gateway.sh"}
    bin_dir = _stand_ins(tmp_path / "bin")
    volume = tmp_path / "volume"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "KANDINSKY_VOLUME": str(volume),
        "KANDINSKY_KEY": "0123456789abcdef",
        "KANDINSKY_GPU_KEY": "NVIDIA H100 80GB HBM3",
        "KANDINSKY_KEY_SOURCE": '{"checkpoint": {}}',
        "KANDINSKY_PRIOR_REVISION": "abc",
    }

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(scripts / script), *args], env=env, capture_output=True, text=True, timeout=60
        )

    first = run("prepare.sh")
    assert first.returncode == 0, first.stderr
    folder = volume / "0123456789abcdef" / "NVIDIA-H100-80GB-HBM3"
    assert (folder / "READY").is_file() and (folder / "model_repository" / "unet" / "config.pbtxt").is_file()
    assert "has no --prior-revision" in first.stderr  # an old image ignores pinned revisions, and says so
    assert json.loads((volume / "0123456789abcdef" / "source.json").read_text()) == {"checkpoint": {}}
    second = run("prepare.sh")
    assert second.returncode == 0 and "already prepared" in second.stderr
    assert (volume / "0123456789abcdef" / "builds").read_text() == "built\n"  # built once

    served = run("serve.sh", "--host=0.0.0.0")
    assert served.returncode == 0, served.stderr
    assert shlex.split(served.stdout) == [
        "serve",
        "--repository",
        str(folder / "model_repository"),
        "--host=0.0.0.0",
    ]
    gateway = run("gateway.sh", "--host=0.0.0.0")
    assert shlex.split(gateway.stdout) == [
        "gateway",
        "--repository",
        str(folder / "model_repository"),
        "--host=0.0.0.0",
    ]

    # A replica on another GPU model waits (here: until the test's timeout) instead of serving the wrong
    # engines, and says why.
    env["KANDINSKY_GPU_KEY"] = "NVIDIA A10G"
    with pytest.raises(subprocess.TimeoutExpired) as waited:
        subprocess.run(
            ["bash", str(scripts / "serve.sh")], env=env, capture_output=True, text=True, timeout=2
        )
    assert b"NVIDIA-A10G/READY" in (waited.value.stderr or b"")
