"""deploy/k8s renders and validates (what `make deploy-check` runs), and the checker can fail."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tests.support.deploycheck import OVERLAYS, check, render_overlay
from tests.support.kustomize import KustomizeError, render, strategic_merge
from tests.support.kustomize import Obj as KObj


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay: str) -> None:
    objects = render_overlay(overlay)
    assert check(objects) == []
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap"} <= kinds
    assert "Secret" not in kinds


def test_prod_scales_workers_with_keda_and_dev_with_an_hpa() -> None:
    prod = {(o["kind"], o["metadata"]["name"]) for o in render_overlay("prod")}
    dev = {(o["kind"], o["metadata"]["name"]) for o in render_overlay("dev")}
    assert {
        ("ScaledObject", "botline-worker"),
        ("TriggerAuthentication", "botline-rabbitmq"),
    } <= prod
    assert ("HorizontalPodAutoscaler", "botline-worker") not in prod
    assert ("HorizontalPodAutoscaler", "botline-worker") in dev
    assert {("StatefulSet", "redis"), ("StatefulSet", "rabbitmq")} <= dev


def test_overlays_set_namespace_labels_images_and_patches() -> None:
    prod = render_overlay("prod")
    assert {o["metadata"]["namespace"] for o in prod} == {"botline"}
    worker = next(
        o for o in prod if o["kind"] == "Deployment" and "worker" in o["metadata"]["name"]
    )
    assert worker["spec"]["selector"]["matchLabels"]["app.kubernetes.io/part-of"] == "botline"
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/botline:0.1.0"
    env = [e["name"] for e in container["env"]]
    # The patch adds to the base's env, by name, without losing any.
    assert "BOTLINE_REDIS_URL" in env
    assert "BOTLINE_REDIS_SENTINELS" in env
    dev = render_overlay("dev")
    gateway = next(
        o for o in dev if o["kind"] == "Deployment" and "gateway" in o["metadata"]["name"]
    )
    assert gateway["spec"]["replicas"] == 1
    assert gateway["spec"]["template"]["spec"]["containers"][0]["image"] == "botline:dev"


def _worker(objects: list[KObj]) -> KObj:
    return next(
        o
        for o in objects
        if o["metadata"]["name"] == "botline-worker" and o["kind"] == "Deployment"
    )


def _broken(mutate: str) -> list[str]:
    objects = copy.deepcopy(render_overlay("prod"))
    worker = _worker(objects)
    pod = worker["spec"]["template"]["spec"]
    container = pod["containers"][0]
    scaled = next(o for o in objects if o["kind"] == "ScaledObject")
    if mutate == "unknown field":
        container["livenessProbe"]["httpGet"]["paht"] = "/livez"
    elif mutate == "wrong type":
        worker["spec"]["replicas"] = "two"
    elif mutate == "keda unknown field":
        scaled["spec"]["minReplicas"] = 1
    elif mutate == "keda missing trigger type":
        del scaled["spec"]["triggers"][0]["type"]
    elif mutate == "root":
        del container["securityContext"]["runAsNonRoot"]
        del pod["securityContext"]["runAsNonRoot"]
    elif mutate == "short grace":
        pod["terminationGracePeriodSeconds"] = 30
    elif mutate == "probe port":
        container["readinessProbe"]["httpGet"]["port"] = 9999
    elif mutate == "no limits":
        del container["resources"]["limits"]
    elif mutate == "secret":
        objects.append(
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {}}
        )
    return check(objects)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        ("unknown field", "'paht' was unexpected"),
        ("wrong type", "'two' is not of type 'integer'"),
        ("keda unknown field", "'minReplicas' was unexpected"),
        ("keda missing trigger type", "'type' is a required property"),
        ("root", "runAsNonRoot is not set"),
        ("short grace", "terminationGracePeriodSeconds must exceed"),
        ("probe port", "port 9999 is not declared"),
        ("no limits", "resources.limits needs cpu and memory"),
        ("secret", "a Secret in the manifests"),
    ],
)
def test_the_check_fails_on_a_broken_object(mutate: str, expected: str) -> None:
    problems = _broken(mutate)
    assert len(problems) == 1, problems
    assert expected in problems[0]


def test_strategic_merge_merges_named_lists_and_deletes_nulls() -> None:
    base = {"a": 1, "b": {"c": 2}, "env": [{"name": "X", "value": "1"}], "args": ["p"]}
    patch = {
        "a": None,
        "b": {"d": 3},
        "env": [{"name": "X", "value": "2"}, {"name": "Y"}],
        "args": ["q"],
    }
    assert strategic_merge(base, patch) == {
        "b": {"c": 2, "d": 3},
        "env": [{"name": "X", "value": "2"}, {"name": "Y"}],
        "args": ["q"],
    }


def test_the_renderer_refuses_what_it_does_not_support(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("configMapGenerator:\n  - name: x\n")
    with pytest.raises(KustomizeError, match="configMapGenerator"):
        render(tmp_path)
