"""Writes cluster/kuberay-grafana-dashboard.yaml: QPruner's Grafana dashboard (qpruner/dashboards/qpruner_grafana.json,
byte for byte) in a ConfigMap for Grafana's dashboard sidecar. Run it after changing the dashboard:

    python cluster/grafana_configmap.py

tests/test_cluster_configs.py fails while the ConfigMap and the package's JSON differ.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "qpruner" / "dashboards" / "qpruner_grafana.json"
CONFIGMAP = ROOT / "cluster" / "kuberay-grafana-dashboard.yaml"

HEADER = """\
# QPruner's Grafana dashboard as a ConfigMap for Grafana's dashboard sidecar, which loads ConfigMaps labelled
# grafana_dashboard: "1" (the label and value that KubeRay's install/prometheus/overrides.yaml sets for
# kube-prometheus-stack's Grafana; there it searches every namespace, elsewhere often Grafana's own only).
#   kubectl apply -n prometheus-system -f cluster/kuberay-grafana-dashboard.yaml
# Generated from qpruner/dashboards/qpruner_grafana.json by cluster/grafana_configmap.py: edit that, then rerun it.
"""


def render(text: str) -> str:
    """The ConfigMap whose data holds ``text`` exactly (a YAML literal block keeps one final newline)."""
    if text[:1].isspace() or not text.endswith("\n") or text.endswith("\n\n") or "\t" in text or "\r" in text:
        raise ValueError("the dashboard JSON must start unindented, end with one newline, hold no tabs or CRs")
    body = "".join(f"    {line}\n" if line else "\n" for line in text[:-1].split("\n"))
    return (HEADER + "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: qpruner-grafana-dashboard\n"
            "  labels: {grafana_dashboard: \"1\"}\ndata:\n  qpruner_grafana.json: |\n" + body)


if __name__ == "__main__":
    CONFIGMAP.write_text(render(DASHBOARD.read_text()))
    print(f"wrote {CONFIGMAP.relative_to(ROOT)}")
