"""The cluster configs, read by the code that will read them on first use.

Launcher (aws.yaml, gcp.yaml): Ray 2.60's own launcher and autoscaler code from .venv: ``prepare_config`` /
``validate_config``, the provider's ``fillout_available_node_types_resources`` (the cloud SDKs are absent
offline: their modules are stubbed at import, the fill-out logic itself is Ray's), the resources a node's
raylet then advertises (``ResourceAndLabelSpec``) and the v1 autoscaler's ``ResourceDemandScheduler``.
KubeRay: the CRD schemas of KubeRay v1.5.1 (tests/data/kuberay, with Kubernetes' structural rules), Ray's
derivation of the autoscaler config from the custom resource, KubeRay behaviour ported from its Go code (cited
per helper), and Kubernetes NetworkPolicy ingress semantics. The dashboard is never opened to the network.
"""

import contextlib
import copy
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path
from unittest import mock

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.providers import _NODE_PROVIDERS
from ray.autoscaler._private.resource_demand_scheduler import ResourceDemandScheduler, get_bin_pack_residual
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.tags import NODE_KIND_HEAD, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE
from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRDS = Path(__file__).resolve().parent / "data" / "kuberay"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
KUBERAY = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]
IMAGE = "your-registry/qpruner:0.1.0"


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def _trial_bundles(job="llama2_7b_20pct.yaml"):
    """What one trial of the job asks Ray for: Tune's with_resources({"cpu", "gpu"}) (qpruner/search/run.py)
    turns into this placement group (ray/tune/execution/placement_groups.py resource_dict_to_pg_factory)."""
    search = yaml.safe_load((ROOT / "tune_jobs" / job).read_text())["search"]
    pgf = resource_dict_to_pg_factory({"cpu": search["cpus_per_trial"], "gpu": search["gpus_per_trial"]})
    return pgf.bundles, search["max_concurrent"]


# ---------------------------------------------------------------------------------------------- launcher

class _StubModule(types.ModuleType):
    """A cloud SDK module that is not installed: any name it is asked for is a placeholder class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (Exception,), {})
        setattr(self, name, value)
        return value


SDK_MODULES = ["boto3", "boto3.resources", "boto3.resources.base", "boto3.exceptions", "botocore", "botocore.client",
               "botocore.config", "botocore.exceptions", "googleapiclient", "googleapiclient.discovery",
               "googleapiclient.errors", "httplib2", "google_auth_httplib2"]


@contextlib.contextmanager
def _cloud_sdks():
    """Import Ray's AWS / GCP providers without boto3 / google-api-python-client (only their import-time names are
    stubbed; the providers' fill-out never calls them); afterwards drop the stubs and the provider modules that
    were imported against them."""
    before, stubbed = set(sys.modules), []
    for name in SDK_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _StubModule(name)
            stubbed.append(name)
            if name == "boto3":
                sys.modules[name].__version__ = "1.35.0"   # ray/autoscaler/_private/aws/config.py checks it
    try:
        yield
    finally:
        providers = ("ray.autoscaler._private.aws", "ray.autoscaler._private.gcp")
        for name in set(sys.modules) - before:
            if stubbed and (name in stubbed or name.startswith(providers)):
                del sys.modules[name]


# DescribeInstanceTypes, only the fields Ray's AWS fill-out reads (ray/autoscaler/_private/aws/node_provider.py,
# ray/_private/accelerators/nvidia_gpu.py get_ec2_instance_*): AWS's published g6e.2xlarge and g5.xlarge specs.
AWS_INSTANCE_TYPES = [
    {"InstanceType": "g6e.2xlarge", "VCpuInfo": {"DefaultVCpus": 8}, "MemoryInfo": {"SizeInMiB": 65536},
     "GpuInfo": {"Gpus": [{"Name": "L40S", "Manufacturer": "NVIDIA", "Count": 1}]}},
    {"InstanceType": "g5.xlarge", "VCpuInfo": {"DefaultVCpus": 4}, "MemoryInfo": {"SizeInMiB": 16384},
     "GpuInfo": {"Gpus": [{"Name": "A10G", "Manufacturer": "NVIDIA", "Count": 1}]}},
]


def _resolved(name, describe_instance_types=True):
    """The config as `ray up` holds it before it launches anything (ray/autoscaler/_private/commands.py
    _bootstrap_config): prepare_config, the provider's fillout_available_node_types_resources (whose exceptions
    `ray up` only warns about), validate_config. On AWS the fill-out reads DescribeInstanceTypes: answered from
    AWS_INSTANCE_TYPES, or failing (no permission, no network) with describe_instance_types=False."""
    config = prepare_config(_load(name))
    with _cloud_sdks():
        provider_cls = _NODE_PROVIDERS[config["provider"]["type"]](config["provider"])
        patch = contextlib.nullcontext()
        if config["provider"]["type"] == "aws":
            from ray.autoscaler._private.aws import node_provider as aws

            answer = AWS_INSTANCE_TYPES if describe_instance_types else PermissionError("ec2:DescribeInstanceTypes")
            patch = mock.patch.object(aws, "list_ec2_instances", side_effect=lambda *a: _answer(answer))
        with patch:
            try:
                config = provider_cls.fillout_available_node_types_resources(config)
            except Exception:  # noqa: BLE001 - as _bootstrap_config: a warning, and `ray up` goes on
                pass
    validate_config(config)
    return config


def _answer(answer):
    if isinstance(answer, Exception):
        raise answer
    return answer


def _raylet_resources(declared, is_head):
    """What a node's raylet advertises on a machine with one NVIDIA GPU: the launcher's updater passes the node
    type's resources as RAY_OVERRIDE_RESOURCES only when they are non-empty (ray/autoscaler/_private/updater.py),
    and `ray start` merges them over what it detects (ray/_private/resource_and_label_spec.py)."""
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager as Nvidia
    from ray._private.resource_and_label_spec import ResourceAndLabelSpec

    env = {"RAY_OVERRIDE_RESOURCES": json.dumps(declared)} if declared else {}
    with mock.patch.object(Nvidia, "get_current_node_num_accelerators", return_value=1), \
            mock.patch.object(Nvidia, "get_current_process_visible_accelerator_ids", return_value=None), \
            mock.patch.dict(os.environ, env):
        if not declared:
            os.environ.pop("RAY_OVERRIDE_RESOURCES", None)
        spec = ResourceAndLabelSpec().resolve(is_head=is_head)
    return {"CPU": spec.num_cpus, "GPU": spec.num_gpus}


def _plan(config, head_resources, demands):
    """What Ray's v1 autoscaler decides for `demands` on a cluster that holds only the idle head
    (ResourceDemandScheduler.get_nodes_to_launch): node types to launch, and the demands no node type can take."""
    node_types, head_type = config["available_node_types"], config["head_node_type"]

    class HeadOnly:
        def node_tags(self, node):
            return {TAG_RAY_NODE_KIND: NODE_KIND_HEAD, TAG_RAY_USER_NODE_TYPE: head_type}

        def internal_ip(self, node):
            return "10.0.0.1"

    scheduler = ResourceDemandScheduler(HeadOnly(), copy.deepcopy(node_types), config["max_workers"], head_type,
                                        config.get("upscaling_speed", 1.0))
    return scheduler.get_nodes_to_launch(
        nodes=["head"], launching_nodes={}, resource_demands=demands,
        unused_resources_by_ip={"10.0.0.1": dict(head_resources)}, pending_placement_groups=[],
        max_resources_by_ip={"10.0.0.1": dict(head_resources)}, ensure_min_cluster_size=[],
        node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_configs_validate(name):
    prepared = _resolved(name)
    workers = prepared["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 1          # scales from zero
    assert any("--dashboard-host=127.0.0.1" in c for c in prepared["head_start_ray_commands"])


@pytest.mark.parametrize("name", LAUNCHER)
def test_a_broken_launcher_config_is_rejected(name):
    config = _load(name)
    config["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(Exception):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", LAUNCHER)
def test_the_autoscaler_adds_gpu_workers_for_the_7b_jobs_trials(name):
    """gcp.yaml with `resources: {}` failed here: Ray's GCP provider fills in TPU resources only
    (ray/autoscaler/_private/gcp/node_provider.py fillout_available_node_types_resources), so no node type had a GPU
    and every {CPU: 4, GPU: 1} trial was infeasible. AWS's fill-out asks DescribeInstanceTypes; the declared
    resources must carry the search even where that call fails (`ray up` only warns)."""
    bundles, concurrent = _trial_bundles()
    for describe in (True, False):
        config = _resolved(name, describe_instance_types=describe)
        head = config["available_node_types"][config["head_node_type"]]
        head_raylet = _raylet_resources(head.get("resources"), is_head=True)
        to_launch, infeasible = _plan(config, head_raylet, bundles * concurrent)
        assert infeasible == [], f"{name}: no node type can run a trial {bundles[0]}"
        assert set(to_launch) == {"gpu_worker"} and to_launch["gpu_worker"] >= 1


@pytest.mark.parametrize("name", LAUNCHER)
def test_the_head_offers_its_gpu_to_no_trial(name):
    """The driver prunes on the head's GPU through torch.cuda, outside Ray's resources: a job submitted without
    entrypoint resources runs on the head with CUDA_VISIBLE_DEVICES left alone (ray/dashboard/modules/job/
    job_manager.py sets RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES for it). A trial there could take that memory.
    Old configs failed: GCP `resources: {}` passes no override and the raylet detects the GPU; AWS's fill-out fills
    in GPU: 1."""
    bundles, concurrent = _trial_bundles()
    config = _resolved(name)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 0                           # what the autoscaler plans with
    head_raylet = _raylet_resources(head["resources"], is_head=True)
    assert head_raylet["GPU"] == 0                                 # what the head's raylet advertises
    unplaced, _ = get_bin_pack_residual([head_raylet], bundles * concurrent)
    assert len(unplaced) == len(bundles) * concurrent              # no trial fits on the head
    assert "GPU: 1" in (CLUSTER / name).read_text()                # the comment says how to offer it


@pytest.mark.parametrize("name", LAUNCHER)
def test_every_node_runs_the_project_image_and_setup_installs_nothing(name):
    config = _resolved(name)
    docker = config["docker"]
    assert docker["image"] == IMAGE and docker["container_name"]
    assert "--gpus all" in docker["run_options"]
    commands = config["setup_commands"] + config["head_setup_commands"] + config["worker_setup_commands"]
    assert not any("pip install" in c for c in commands)
    assert not config["file_mounts"].get("~/qpruner")              # the code comes with the image / --working-dir
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-" in dockerfile
    run = [line for line in dockerfile.splitlines() if line.startswith("RUN pip install")]
    # the launcher's autoscaler runs in the head's container and imports the provider's SDK to add workers
    assert run and all(sdk in run[0] for sdk in ("boto3", "google-api-python-client", '"ray[default,tune]==2.60.0"'))


def test_aws_workers_get_an_instance_profile_for_the_bucket():
    worker = _resolved("aws.yaml")["available_node_types"]["gpu_worker"]["node_config"]
    profile = worker["IamInstanceProfile"]
    assert profile.get("Arn", "").startswith("arn:aws:iam::") or profile.get("Name")
    text = (CLUSTER / "aws.yaml").read_text()
    assert "s3:PutObject" in text and "s3:GetObject" in text and "iam:PassRole" in text


def test_gcp_workers_get_a_service_account_that_can_write_the_bucket_and_a_driver():
    config = _resolved("gcp.yaml")
    accounts = config["available_node_types"]["gpu_worker"]["node_config"]["serviceAccounts"]
    assert accounts[0]["email"].endswith(".iam.gserviceaccount.com")
    storage = {"https://www.googleapis.com/auth/devstorage.read_write",
               "https://www.googleapis.com/auth/devstorage.full_control",
               "https://www.googleapis.com/auth/cloud-platform"}
    assert storage & set(accounts[0]["scopes"])
    # Ray's GCP GPU example (python/ray/autoscaler/gcp/example-gpu-docker.yaml): the image installs the driver
    # at first boot when asked by metadata, and initialization_commands wait for nvidia-smi before Docker starts
    for node_type in config["available_node_types"].values():
        items = node_type["node_config"]["metadata"]["items"]
        assert {"key": "install-nvidia-driver", "value": "True"} in items
    assert any("nvidia-smi" in c and "until" in c for c in config["initialization_commands"])


def _ray_start_env(commands):
    """The environment of the `ray start` in `commands`: earlier `export K=V` and `K=V` prefixes on its line."""
    env = {}
    for command in commands:
        for part in re.split(r";|&&|\n", command):
            words = shlex.split(part)
            if words[:1] == ["export"]:
                env.update(w.split("=", 1) for w in words[1:] if "=" in w)
                continue
            prefix = {}
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                key, value = words.pop(0).split("=", 1)
                prefix[key] = value
            if words[:2] == ["ray", "start"]:
                return {**env, **prefix}
    raise AssertionError("no `ray start` in " + repr(commands))


TOKEN_CHECK = """
import json, sys
from ray._private.authentication.authentication_token_setup import (
    ensure_token_if_auth_enabled, maybe_enable_token_auth_if_token_available)
from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, get_authentication_mode
if sys.argv[1] == "head":
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)   # `ray start --head` only
ensure_token_if_auth_enabled(None, create_token_if_missing=False)      # both (ray/scripts/scripts.py start)
loader = AuthenticationTokenLoader.instance()
token = loader.get_raw_token(ignore_auth_mode=True) if loader.has_token(ignore_auth_mode=True) else None
print(json.dumps({"token_auth": get_authentication_mode() == AuthenticationMode.TOKEN, "token": token}))
"""


@pytest.mark.parametrize("name", LAUNCHER)
@pytest.mark.parametrize("role", ["head", "worker"])
def test_head_and_workers_start_with_the_laptops_token(name, role, tmp_path, monkeypatch):
    """Ray 2.60's `ray start --head` turns token auth on by itself only when RAY_AUTH_MODE is unset and a token
    file exists (ray/_private/authentication/authentication_token_setup.py
    maybe_enable_token_auth_if_token_available); a worker's `ray start` never does (ray/scripts/scripts.py), and
    with RAY_AUTH_MODE=token both need the token at start (ensure_token_if_auth_enabled). The launcher cannot carry
    a file made on the head to the workers, so the token is made on the laptop (`ray get-auth-token --generate`
    writes ~/.ray/auth_token) and file_mounts copies it (Ray's doc/source/ray-security/token-auth.md, "Ray clusters
    on remote virtual machines"). Here Ray's own start-up checks run in a fresh process with the start command's
    environment, in a node whose home holds exactly what file_mounts puts there. Old configs: no token, auth off."""
    config = _resolved(name)
    laptop = tmp_path / "laptop"
    monkeypatch.setenv("HOME", str(laptop))
    from ray._private.authentication.authentication_token_setup import _get_default_token_path
    generated = _get_default_token_path()                          # where `ray get-auth-token --generate` writes
    node_home = tmp_path / "node"                                  # the container's home ($HOME of `ray start`)
    for remote, local in config["file_mounts"].items():
        if Path(os.path.expanduser(local)) == generated and remote.startswith("~/"):
            (node_home / remote[2:]).parent.mkdir(parents=True, exist_ok=True)
            (node_home / remote[2:]).write_text("t0k3n-from-the-laptop")
    commands = config["head_start_ray_commands" if role == "head" else "worker_start_ray_commands"]
    start_env = _ray_start_env(commands)
    assert start_env.get("RAY_AUTH_MODE") == "token"
    env = {"PATH": os.environ["PATH"], "HOME": str(node_home), **start_env}
    out = subprocess.run([sys.executable, "-c", TOKEN_CHECK, role], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"token_auth": True, "token": "t0k3n-from-the-laptop"}


# ---------------------------------------------------------------------------------------------- KubeRay

def _cluster_spec(name):
    doc = _load(name)
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return doc, {"metadata": {**doc["metadata"], "namespace": "default"}, "spec": spec}


def _containers(spec):
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifests_validate_and_the_autoscaler_adds_workers_for_trials(name):
    """KubeRay's autoscaler derives its config from the RayCluster spec with Ray's own code; validate that, and
    plan the 7B job's trials with it: they go to the GPU worker group, none to the head (num-gpus: "0")."""
    doc, cr = _cluster_spec(name)
    config = _derive_autoscaling_config_from_ray_cr(cr)
    validate_config(config)
    gpu = config["available_node_types"]["gpu-workers"]
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] == 1
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    assert head.get("GPU", 0) == 0
    bundles, concurrent = _trial_bundles()
    to_launch, infeasible = _plan(config, head, bundles * concurrent)
    assert infeasible == [] and set(to_launch) == {"gpu-workers"}
    assert len(get_bin_pack_residual([head], bundles * concurrent)[0]) == len(bundles) * concurrent
    assert cr["spec"]["enableInTreeAutoscaling"] is True
    assert cr["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"       # no LoadBalancer / NodePort
    text = (CLUSTER / name).read_text()
    assert "kind: Ingress" not in text and "LoadBalancer" not in text
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].startswith("qpruner search tune_jobs/")
        assert "search.storage_path=" in doc["spec"]["entrypoint"]
        # no entrypoint resources: with them Ray may run the driver on any node that has them (a worker), not the head
        assert not doc["spec"].get("entrypointNumGpus") and not doc["spec"].get("entrypointResources")


def _structural(schema, root=True):
    """A CRD's openAPIV3Schema as JSON Schema under Kubernetes' structural rules: a field the schema does not
    list is an error (what `kubectl apply`'s strict field validation reports; the API server would otherwise
    drop it silently) unless x-kubernetes-preserve-unknown-fields; x-kubernetes-int-or-string takes an integer
    or a string; nullable admits null. CEL rules (x-kubernetes-validations) are not evaluated."""
    s = {k: v for k, v in schema.items() if k != "x-kubernetes-validations"}
    if "properties" in s:
        s["properties"] = {k: _structural(v, False) for k, v in s["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            s[key] = _structural(s[key], False)
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [_structural(v, False) for v in s[key]]
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    if s.get("type") == "object" and "additionalProperties" not in s \
            and not s.get("x-kubernetes-preserve-unknown-fields"):
        s["additionalProperties"] = False
    if root:
        s["properties"]["metadata"] = {"type": "object"}   # ObjectMeta: checked by the API server itself
    return s


_VALIDATORS = {}


def _crd_errors(doc):
    kind = doc["kind"]
    if kind not in _VALIDATORS:
        raw = (CRDS / f"ray.io_{kind.lower()}s.yaml").read_text()
        schema = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        _VALIDATORS[kind] = jsonschema.Draft7Validator(_structural(schema))
    return sorted("/".join(map(str, e.absolute_path)) + ": " + e.message for e in _VALIDATORS[kind].iter_errors(doc))


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifests_match_kuberay_1_5_1s_crd(name):
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert _crd_errors(doc) == []


def test_a_misspelled_or_wrong_field_is_rejected_by_the_crd_schema():
    doc = _load("kuberay-rayjob.yaml")
    for path, key, value, expected in [
        (["spec", "rayClusterSpec", "headGroupSpec"], "rayStartParam", {}, "rayStartParam"),   # misspelled
        (["spec", "submitterPodTemplate", "metadata"], "lables", {"a": "b"}, "lables"),          # misspelled
        (["spec", "rayClusterSpec", "authOptions"], "mode", "tokens", "tokens"),                 # not in the enum
        (["spec"], "ttlSecondsAfterFinished", "1h", "1h"),                                       # wrong type
    ]:
        broken = copy.deepcopy(doc)
        node = broken
        for step in path:
            node = node[step]
        node[key] = value
        errors = _crd_errors(broken)
        assert len(errors) == 1 and expected in errors[0], errors


def _version(text):
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def test_authoptions_needs_kuberay_1_5_1_and_ray_2_52_and_the_docs_say_so():
    """spec.authOptions first appears in KubeRay v1.5.1's CRDs (the vendored schema; v1.5.0's has none) and the
    operator refuses mode token below Ray 2.52.0 (ray-operator/controllers/ray/utils/validation.go)."""
    header = (CRDS / "ray.io_rayclusters.yaml").read_text().splitlines()[1]
    assert "tag v1.5.1" in header
    for name in KUBERAY:
        _, cr = _cluster_spec(name)
        assert cr["spec"]["authOptions"] == {"mode": "token"}
        assert _version(cr["spec"]["rayVersion"]) >= (2, 52, 0)
        assert "KubeRay >= 1.5.1" in (CLUSTER / name).read_text()
    readme = (CLUSTER / "README.md").read_text()
    stated = re.findall(r"KubeRay operator \(≥ ([\d.]*\d)|KubeRay ≥ ([\d.]*\d)", readme)
    assert stated and all(_version(a or b) == (1, 5, 1) for a, b in stated), stated


def _head_service_ports(spec):
    """The head Service's ports (KubeRay v1.5.1 ray-operator/controllers/ray/common/service.go getServicePorts):
    the head container's named ports, KubeRay's defaults only when it names none, metrics always."""
    container = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p.get("name") or f"{p['containerPort']}-port": p["containerPort"] for p in container.get("ports", [])}
    if not ports:
        ports = {"client": 10001, "gcs-server": 6379, "dashboard": 8265, "metrics": 8080, "serve": 8000}
    ports.setdefault("metrics", 8080)
    return ports


@pytest.mark.parametrize("name", KUBERAY)
def test_the_head_service_keeps_the_dashboard_and_gcs_ports(name):
    """Naming the metrics ports for Prometheus replaces KubeRay's default port list: the RayJob's dashboard URL
    is the Service port named "dashboard" (utils.FetchHeadServiceURL), and workers join the GCS on 6379."""
    _, cr = _cluster_spec(name)
    ports = _head_service_ports(cr["spec"])
    assert ports["dashboard"] == 8265 and 6379 in ports.values() and ports["metrics"] == 8080


@pytest.mark.parametrize("name", KUBERAY)
def test_hf_token_comes_from_an_optional_secret_and_the_hub_cache_sits_on_the_results_volume(name):
    _, cr = _cluster_spec(name)
    for container in _containers(cr["spec"]):
        env = {e["name"]: e for e in container.get("env", [])}
        ref = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["optional"] is True and ref["name"] and ref["key"]
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        assert any(env["HF_HOME"]["value"].startswith(m.rstrip("/") + "/") for m in mounts)
    assert "kubectl create secret generic hf-token" in (CLUSTER / "README.md").read_text()


# NetworkPolicy ingress, as Kubernetes evaluates it (networking.k8s.io/v1): a pod that a policy's podSelector
# selects accepts a connection only if some ingress rule admits both its source (any `from` peer) and its port.

def _selects(selector, labels):
    if set(selector) - {"matchLabels", "matchExpressions"}:
        raise ValueError(f"unknown label selector fields {selector}")
    if any(labels.get(k) != str(v) for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {"In": lambda: labels.get(key) in values,
              "NotIn": lambda: key not in labels or labels[key] not in values,
              "Exists": lambda: key in labels,
              "DoesNotExist": lambda: key not in labels}[op]()
        if not ok:
            return False
    return True


def _namespace_labels(name):
    return {"kubernetes.io/metadata.name": name}   # set on every namespace by Kubernetes (>= 1.22)


def _peer_admits(peer, source, policy_namespace):
    if set(peer) - {"podSelector", "namespaceSelector"}:
        raise ValueError(f"peer not modelled here: {peer}")
    if "namespaceSelector" in peer:
        in_namespace = _selects(peer["namespaceSelector"], _namespace_labels(source["namespace"]))
    else:
        in_namespace = source["namespace"] == policy_namespace   # a podSelector alone: the policy's namespace
    return in_namespace and ("podSelector" not in peer or _selects(peer["podSelector"], source["labels"]))


def _port_admits(rule_port, target, port, protocol):
    if set(rule_port) - {"protocol", "port", "endPort"}:
        raise ValueError(f"unknown port fields {rule_port}")
    if rule_port.get("protocol", "TCP") != protocol:
        return False
    if "port" not in rule_port:
        return True
    first = rule_port["port"]
    if isinstance(first, str):
        first = target["ports"].get(first, -1)   # a named port: the target container's port of that name
    return first <= port <= rule_port.get("endPort", first)


def _admits(policy, policy_namespace, source, target, port, protocol="TCP"):
    spec = policy["spec"]
    if set(spec) - {"podSelector", "policyTypes", "ingress", "egress"}:
        raise ValueError(f"unknown NetworkPolicy fields {spec}")
    if target["namespace"] != policy_namespace or not _selects(spec["podSelector"], target["labels"]):
        return True                                  # not isolated by this policy
    if "Ingress" not in spec.get("policyTypes", ["Ingress"]):
        return True
    for rule in spec.get("ingress") or []:
        if set(rule) - {"from", "ports"}:
            raise ValueError(f"unknown ingress rule fields {rule}")
        peers, ports = rule.get("from") or [], rule.get("ports") or []
        if (not peers or any(_peer_admits(p, source, policy_namespace) for p in peers)) and \
                (not ports or any(_port_admits(p, target, port, protocol) for p in ports)):
            return True
    return False


NAMESPACE = "ml"   # where the manifests and the policy are applied


def _ray_pod(spec, group, cluster_name):
    """A Ray pod as KubeRay makes it: the template's labels under KubeRay's own (v1.5.1 common/pod.go labelPod),
    and the Ray container's ports plus the metrics port KubeRay adds (DefaultMetricsPort 8080, name metrics)."""
    template = spec["headGroupSpec"]["template"] if group == "headgroup" else \
        next(g for g in spec["workerGroupSpecs"] if g["groupName"] == group)["template"]
    node_type = "head" if group == "headgroup" else "worker"
    labels = {"ray.io/is-ray-node": "yes", "ray.io/identifier": f"{cluster_name}-{node_type}",
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator",
              **template["metadata"].get("labels", {}),
              "ray.io/cluster": cluster_name, "ray.io/node-type": node_type, "ray.io/group": group}
    ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0].get("ports", []) if "name" in p}
    ports.setdefault("metrics", 8080)
    return {"namespace": NAMESPACE, "labels": labels, "ports": ports}


def _submitter_pod(rayjob, kuberay):
    """The RayJob's submitter pod (K8sJobMode, the default): the labels of spec.submitterPodTemplate, as given
    (KubeRay v1.5.1 common/job.go GetSubmitterTemplate; v1.5.1 to v1.6.2 add none), from v1.7.0 plus
    ray.io/originated-from-cr-name / -crd and app.kubernetes.io/created-by (rayjob_controller.go
    getSubmitterTemplate), and the labels Kubernetes' Job controller puts on every pod of the Job."""
    name = rayjob["metadata"]["name"]
    labels = dict((rayjob["spec"].get("submitterPodTemplate") or {}).get("metadata", {}).get("labels", {}))
    if kuberay >= (1, 7, 0):
        labels.update({"ray.io/originated-from-cr-name": name, "ray.io/originated-from-crd": "RayJob",
                       "app.kubernetes.io/created-by": "kuberay-operator"})
    uid = "5c1d0e6a-0000-4000-8000-000000000000"
    labels.update({"batch.kubernetes.io/job-name": name, "job-name": name,
                   "batch.kubernetes.io/controller-uid": uid, "controller-uid": uid})
    return {"namespace": NAMESPACE, "labels": labels, "ports": {}}


# KubeRay's Helm chart labels the operator pod (helm-chart/kuberay-operator/templates/deployment.yaml)
OPERATOR = {"namespace": "kuberay-system", "ports": {},
            "labels": {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator",
                       "app.kubernetes.io/component": "kuberay-operator"}}
# Prometheus as KubeRay's guide installs it (install/prometheus/install.sh: kube-prometheus-stack, release
# "prometheus", namespace prometheus-system); the prometheus-operator labels its pods so
# (pkg/prometheus/server/statefulset_test.go expectations).
PROMETHEUS_NAME = "prometheus-kube-prometheus-prometheus"
PROMETHEUS = {"namespace": "prometheus-system", "ports": {},
              "labels": {"app.kubernetes.io/name": "prometheus", "app.kubernetes.io/instance": PROMETHEUS_NAME,
                         "app.kubernetes.io/managed-by": "prometheus-operator", "prometheus": PROMETHEUS_NAME,
                         "operator.prometheus.io/name": PROMETHEUS_NAME, "operator.prometheus.io/shard": "0"}}
# Port names of KubeRay's PodMonitors (config/prometheus/podMonitor.yaml): the head's, the workers'.
POD_MONITOR_PORTS = {"headgroup": ["metrics", "as-metrics", "dash-metrics"], "gpu-workers": ["metrics"]}


@pytest.mark.parametrize("kuberay", [(1, 5, 1), (1, 7, 0)])
def test_network_policy_admits_the_rayjob_submitter_to_the_dashboard(kuberay):
    """Old policy and manifest: KubeRay's submitter pod carried no label the policy admits, so `ray job submit`
    never reached the dashboard and the RayJob never started its search."""
    policy = _load("kuberay-networkpolicy.yaml")
    rayjob = _load("kuberay-rayjob.yaml")
    spec = rayjob["spec"]["rayClusterSpec"]
    assert rayjob["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode"   # SidecarMode ignores the template
    head = _ray_pod(spec, "headgroup", "qpruner-llama2-7b-x7k2q")
    submitter = _submitter_pod(rayjob, kuberay)
    assert _admits(policy, NAMESPACE, submitter, head, 8265)
    assert not _admits(policy, NAMESPACE, submitter, head, 6379)
    template = rayjob["spec"]["submitterPodTemplate"]["spec"]
    assert template["restartPolicy"] == "Never" and template["containers"][0]["name"] == "ray-job-submitter"
    assert template["containers"][0]["image"] == spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


@pytest.mark.parametrize("name", KUBERAY)
def test_network_policy_admits_prometheus_on_the_metrics_ports_only(name):
    """Old policy: Prometheus was refused on 8080 / 44217 / 44227, so KubeRay's PodMonitors scraped nothing."""
    policy = _load("kuberay-networkpolicy.yaml")
    _, cr = _cluster_spec(name)
    for group, names in POD_MONITOR_PORTS.items():
        pod = _ray_pod(cr["spec"], group, "qpruner")
        for port_name in names:
            assert port_name in pod["ports"], f"{group} names no port {port_name} for KubeRay's PodMonitor"
            assert _admits(policy, NAMESPACE, PROMETHEUS, pod, pod["ports"][port_name]), (group, port_name)
    head = _ray_pod(cr["spec"], "headgroup", "qpruner")
    assert not _admits(policy, NAMESPACE, PROMETHEUS, head, 8265)
    assert not _admits(policy, NAMESPACE, {**PROMETHEUS, "namespace": "default"}, head, 8080)


def test_network_policy_admits_ray_pods_the_operator_and_labelled_clients_and_refuses_the_rest():
    policy = _load("kuberay-networkpolicy.yaml")
    _, cr = _cluster_spec("kuberay-raycluster.yaml")
    head = _ray_pod(cr["spec"], "headgroup", "qpruner")
    worker = _ray_pod(cr["spec"], "gpu-workers", "qpruner")
    client = {"namespace": NAMESPACE, "ports": {}, "labels": {"qpruner/client": "true"}}
    stranger = {"namespace": NAMESPACE, "ports": {}, "labels": {"app": "notebook"}}
    assert _admits(policy, NAMESPACE, worker, head, 6379) and _admits(policy, NAMESPACE, head, worker, 10002)
    assert _admits(policy, NAMESPACE, OPERATOR, head, 8265) and not _admits(policy, NAMESPACE, OPERATOR, head, 6379)
    assert _admits(policy, NAMESPACE, client, head, 8265) and not _admits(policy, NAMESPACE, client, head, 6379)
    assert not _admits(policy, NAMESPACE, {**client, "namespace": "other"}, head, 8265)
    for port in (8265, 6379, 8080, 10001):
        assert not _admits(policy, NAMESPACE, stranger, head, port)
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert all("ipBlock" not in p and (p.get("podSelector") or {}).get("matchLabels") for p in peers)  # no open peer


def test_network_policy_evaluator_follows_kubernetes_semantics():
    """The evaluator above, on the cases that differ between reading a policy and applying it."""
    target = {"namespace": "a", "labels": {"app": "x"}, "ports": {"web": 8265}}
    other_ns = {"namespace": "b", "labels": {"role": "c"}, "ports": {}}
    same_ns = {"namespace": "a", "labels": {"role": "c"}, "ports": {}}

    def policy(*rules, types=("Ingress",)):
        return {"spec": {"podSelector": {"matchLabels": {"app": "x"}}, "policyTypes": list(types),
                         "ingress": list(rules)}}
    assert not _admits(policy(), "a", same_ns, target, 80)                                  # no rule: deny all
    assert _admits(policy({}), "a", other_ns, target, 80)                                  # empty rule: allow all
    assert _admits(policy(types=("Egress",)), "a", same_ns, target, 80)                     # not ingress-isolated
    pod_only = {"from": [{"podSelector": {"matchLabels": {"role": "c"}}}]}
    assert _admits(policy(pod_only), "a", same_ns, target, 80)
    assert not _admits(policy(pod_only), "a", other_ns, target, 80)                         # podSelector: own ns
    both = {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "b"}},
                      "podSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["c"]}]}}]}
    assert _admits(policy(both), "a", other_ns, target, 80) and not _admits(policy(both), "a", same_ns, target, 80)
    named = {"ports": [{"port": "web"}]}
    assert _admits(policy(named), "a", same_ns, target, 8265) and not _admits(policy(named), "a", same_ns, target, 80)
    ranged = {"ports": [{"port": 8000, "endPort": 8300}]}
    assert _admits(policy(ranged), "a", same_ns, target, 8265)
    assert not _admits(policy(ranged), "a", same_ns, target, 8265, protocol="UDP")
    assert _admits(policy(), "a", same_ns, {**target, "labels": {"app": "y"}}, 80)         # not selected
    with pytest.raises(ValueError):
        _admits(policy({"form": []}), "a", same_ns, target, 80)                              # a misspelled rule


def test_grafana_configmap_embeds_the_packaged_dashboard_exactly():
    from qpruner.dashboards import GRAFANA

    sys.path.insert(0, str(CLUSTER))
    try:
        import grafana_configmap
    finally:
        sys.path.remove(str(CLUSTER))
    text = (CLUSTER / "kuberay-grafana-dashboard.yaml").read_text()
    doc = yaml.safe_load(text)
    assert doc["kind"] == "ConfigMap" and doc["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert doc["data"]["qpruner_grafana.json"] == GRAFANA.read_text(), \
        "cluster/kuberay-grafana-dashboard.yaml is stale: run python cluster/grafana_configmap.py"
    assert text == grafana_configmap.render(GRAFANA.read_text())


def test_dashboard_plots_quality_against_memory_and_the_normalised_hypervolume():
    from qpruner.dashboards import grafana

    panels = grafana()["panels"]
    xy = [p for p in panels if p["type"] == "xychart"]
    assert len(xy) == 1
    exprs = " ".join(t["expr"] for t in xy[0]["targets"])
    assert "ray_qpruner_trial_quality{" in exprs and "ray_qpruner_trial_weight_mb{" in exprs
    assert all("by (trial, plan)" in t["expr"] and t.get("instant") for t in xy[0]["targets"])
    series = xy[0]["options"]["series"][0]
    renamed = next(t for t in xy[0]["transformations"] if t["id"] == "organize")["options"]["renameByName"]
    assert {series["x"], series["y"]} <= set(renamed.values())
    hv = [p for p in panels if any("ray_qpruner_hypervolume_normalized{" in t["expr"] for t in p.get("targets", []))]
    assert len(hv) == 1 and hv[0]["fieldConfig"]["defaults"]["min"] == 0 and hv[0]["fieldConfig"]["defaults"]["max"] == 1
    assert len({p["id"] for p in panels}) == len(panels)


def test_readme_submit_examples_name_shared_storage():
    """Every `ray job submit` example in cluster/README.md gives search.storage_path (a multi-node search with a
    node-local one is refused)."""
    readme = (CLUSTER / "README.md").read_text().replace("\\\n", " ")
    submits = [line for line in readme.splitlines() if "ray job submit" in line and "qpruner search" in line]
    assert submits and all("search.storage_path=" in line for line in submits), submits
