"""The Kubernetes manifests are valid against the Kubernetes schema and agree with tokenmill."""

from __future__ import annotations

from pathlib import Path

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

from tests.conftest import asgi_client, sim_settings
from tokenmill.cli import build_parser, settings_from_args

MANIFESTS = sorted((Path(__file__).resolve().parents[2] / "deploy" / "k8s").glob("*.yaml"))


def resources() -> dict[str, dict]:
    return {doc["kind"]: doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path):
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_shutdown_and_probes_agree_with_the_server_flags():
    deployment = resources()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    settings = settings_from_args(build_parser().parse_args(container["args"]))  # the args really parse
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings.drain_timeout
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["ports"][0]["containerPort"] == settings.port


async def test_the_autoscaler_metric_is_one_tokenmill_exports():
    metric = resources()["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    async with asgi_client(sim_settings()) as client:
        assert f"\n{metric} " in (await client.get("/metrics")).text
