"""The Grafana dashboard for QPruner's Ray metrics (``qpruner_grafana.json``): search progress, the front and
its hypervolume over time, and per-trial quality against memory, for any job / submission id.

Import it in Grafana (Dashboards -> New -> Import -> upload ``qpruner dashboard --out qpruner.json``), or let
Ray provision it: a search copies it into the Ray session's ``metrics/grafana/dashboards/`` on the node
running the driver (the head, for submitted jobs), next to Ray's own dashboards.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)
GRAFANA = Path(__file__).with_name("qpruner_grafana.json")


def grafana() -> dict:
    """QPruner's Grafana dashboard (the JSON shipped with the package)."""
    return json.loads(GRAFANA.read_text())


def expressions(dashboard: dict | None = None) -> list[str]:
    """Every PromQL expression of the dashboard's panels, with its variables filled in as match-all."""
    dashboard = dashboard or grafana()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return [e.replace("$job", ".*").replace("$submission", ".*") for e in exprs]


def provision(session_dir: str | Path | None) -> Path | None:
    """Copy the dashboard next to Ray's own (best effort: where Ray's Grafana provisioning looks)."""
    if not session_dir:
        return None
    target = Path(session_dir) / "metrics" / "grafana" / "dashboards"
    if not target.is_dir():
        return None
    try:
        shutil.copyfile(GRAFANA, target / "qpruner_grafana_dashboard.json")
        return target / "qpruner_grafana_dashboard.json"
    except OSError as exc:
        logger.debug("could not provision the Grafana dashboard in %s: %s", target, exc)
        return None
