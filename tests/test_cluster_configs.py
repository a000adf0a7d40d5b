"""Every cluster config passes Ray's own validation; the dashboard is never opened to the network."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
LAUNCHER = ["aws.yaml", "gcp.yaml"]


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_configs_validate(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does first: merge the provider defaults
    validate_config(prepared)
    workers = prepared["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 1          # scales from zero
    assert any("--dashboard-host=127.0.0.1" in c for c in prepared["head_start_ray_commands"])
    assert any("pip install" in c and "qpruner" in c for c in prepared["setup_commands"])


@pytest.mark.parametrize("name", LAUNCHER)
def test_a_broken_launcher_config_is_rejected(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    config["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(Exception):
        validate_config(prepare_config(config))


def _cluster_spec(name):
    doc = yaml.safe_load((CLUSTER / name).read_text())
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return doc, {"metadata": {**doc["metadata"], "namespace": "default"}, "spec": spec}


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_manifests_validate(name):
    """KubeRay's autoscaler derives its config from the RayCluster spec with Ray's own code; validate that."""
    doc, cr = _cluster_spec(name)
    config = _derive_autoscaling_config_from_ray_cr(cr)
    validate_config(config)
    gpu = config["available_node_types"]["gpu-workers"]
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] == 1
    assert cr["spec"]["enableInTreeAutoscaling"] is True
    assert cr["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"       # no LoadBalancer / NodePort
    text = (CLUSTER / name).read_text()
    assert "kind: Ingress" not in text and "LoadBalancer" not in text
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].startswith("qpruner search tune_jobs/")


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_manifests_turn_token_auth_on_and_label_pods_for_the_network_policy(name):
    _, cr = _cluster_spec(name)
    assert cr["spec"]["authOptions"] == {"mode": "token"}
    groups = [cr["spec"]["headGroupSpec"], *cr["spec"]["workerGroupSpecs"]]
    policy = yaml.safe_load((CLUSTER / "kuberay-networkpolicy.yaml").read_text())
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert all(g["template"]["metadata"]["labels"].items() >= selected.items() for g in groups)


def test_network_policy_admits_only_ray_pods_the_operator_and_labelled_clients():
    policy = yaml.safe_load((CLUSTER / "kuberay-networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    peers = [peer for rule in rules for peer in rule["from"]]
    assert all("ipBlock" not in p and (p.get("podSelector") or {}).get("matchLabels") for p in peers)  # no open peer
    outside = [r for r in rules if r["from"][0]["podSelector"]["matchLabels"] != policy["spec"]["podSelector"]["matchLabels"]]
    assert all([p["port"] for p in r["ports"]] == [8265] for r in outside)  # clients: dashboard / job API only
