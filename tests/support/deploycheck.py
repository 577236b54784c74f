"""``make deploy-check``: render deploy/k8s's overlays and validate every object offline.

- Kubernetes kinds: against the Kubernetes JSON schemas that the
  ``kubernetes-validate`` package bundles, in strict mode (unknown fields fail);
- KEDA's ScaledObject and TriggerAuthentication: against KEDA's CRD schemas
  vendored in deploy/k8s/crds/, unknown fields failing too (as the API
  server's strict field validation would);
- then what no schema says but a cluster would trip on: selectors that
  select nothing, scale targets and ConfigMaps that are not there, probes on
  undeclared ports, and the pod hardening the issue asks for.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from tests.support.kustomize import Obj, render

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
# The oldest Kubernetes we support: preStop `sleep` actions are on by default from 1.30.
KUBERNETES_VERSION = "1.30"
CRDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): K8S / "crds" / "keda.sh_scaledobjects.yaml",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): K8S
    / "crds"
    / "keda.sh_triggerauthentications.yaml",
}
# Worker drain and gateway shutdown defaults (BOTLINE_DRAIN_TIMEOUT_S, BOTLINE_SHUTDOWN_TIMEOUT_S).
GRACE_FLOOR_S = 30


def _strict(schema: Any) -> Any:
    """An OpenAPI v3 CRD schema as JSON Schema that also refuses unknown fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    """The strict JSON schema of a vendored CRD's version."""
    crd = yaml.safe_load(CRDS[(api_version, kind)].read_text().split("\n---\n", 1)[1])
    version = api_version.split("/")[1]
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema: dict[str, Any] = _strict(entry["schema"]["openAPIV3Schema"])
            return schema
    raise KeyError(api_version)


def schema_errors(obj: Obj) -> list[str]:
    """Schema violations of one object (empty when valid)."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key in CRDS:
        validator = jsonschema.Draft7Validator(crd_schema(*key))
        found = [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(obj)
        ]
        if not obj.get("metadata", {}).get("name"):
            found.append("metadata.name: missing")
        return found
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.absolute_path))}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


def _pod_owners(objects: list[Obj]) -> list[Obj]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _containers(owner: Obj) -> list[Obj]:
    pod = owner["spec"]["template"]["spec"]
    containers: list[Obj] = pod.get("containers", []) + pod.get("initContainers", [])
    return containers


def policy_errors(objects: list[Obj]) -> Iterable[tuple[Obj, str]]:
    """What the schemas cannot see: dangling references and missing hardening."""
    owners = _pod_owners(objects)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    template_labels = [o["spec"]["template"]["metadata"].get("labels", {}) for o in owners]
    for obj in objects:
        kind, spec = obj["kind"], obj.get("spec", {})
        if kind == "Secret":
            yield obj, "a Secret in the manifests: create it with kubectl (deploy/README.md)"
        if kind in ("Service", "PodDisruptionBudget"):
            selector = spec.get("selector", {})
            selector = selector.get("matchLabels", selector) if kind != "Service" else selector
            if not any(_selects(selector, labels) for labels in template_labels):
                yield obj, "its selector selects no pod template"
        if kind in ("HorizontalPodAutoscaler", "ScaledObject"):
            target = spec["scaleTargetRef"]
            if (target.get("kind", "Deployment"), target["name"]) not in names:
                yield obj, f"scale target {target['name']!r} is not in the manifests"
        if kind == "ScaledObject":
            for trigger in spec["triggers"]:
                auth = trigger.get("authenticationRef")
                if auth and ("TriggerAuthentication", auth["name"]) not in names:
                    yield obj, f"TriggerAuthentication {auth['name']!r} is not in the manifests"
    for owner in owners:
        yield from _pod_errors(owner, names)


def _pod_errors(owner: Obj, names: set[tuple[str, str]]) -> Iterable[tuple[Obj, str]]:
    spec = owner["spec"]
    pod = spec["template"]["spec"]
    if not _selects(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"]):
        yield owner, "selector does not match its pod template's labels"
    if owner["kind"] == "Deployment" and pod.get("terminationGracePeriodSeconds", 30) <= (
        GRACE_FLOOR_S
    ):
        yield owner, f"terminationGracePeriodSeconds must exceed {GRACE_FLOOR_S} s (drain time)"
    pod_security = pod.get("securityContext", {})
    for volume in pod.get("volumes", []):
        config_map = volume.get("configMap")
        if config_map and ("ConfigMap", config_map["name"]) not in names:
            yield owner, f"volume {volume['name']!r}: ConfigMap {config_map['name']!r} is missing"
    for container in _containers(owner):
        where = f"container {container['name']!r}"
        security = container.get("securityContext", {})
        if not (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
            yield owner, f"{where}: runAsNonRoot is not set"
        if security.get("readOnlyRootFilesystem") is not True:
            yield owner, f"{where}: readOnlyRootFilesystem is not true"
        if security.get("allowPrivilegeEscalation") is not False:
            yield owner, f"{where}: allowPrivilegeEscalation is not false"
        if "ALL" not in security.get("capabilities", {}).get("drop", []):
            yield owner, f"{where}: capabilities do not drop ALL"
        resources = container.get("resources", {})
        for part in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(resources.get(part, {})):
                yield owner, f"{where}: resources.{part} needs cpu and memory"
        ports = {p.get("name") for p in container.get("ports", [])} | {
            p["containerPort"] for p in container.get("ports", [])
        }
        for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
            http = container.get(probe_name, {}).get("httpGet")
            if http and http["port"] not in ports:
                yield owner, f"{where}: {probe_name} port {http['port']!r} is not declared"
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("configMapKeyRef")
            if ref and ("ConfigMap", ref["name"]) not in names:
                yield owner, f"{where}: env {env['name']}: ConfigMap {ref['name']!r} is missing"


def check(objects: list[Obj]) -> list[str]:
    """Every problem found in a set of rendered objects, one line each."""
    problems = []
    for obj in objects:
        for error in schema_errors(obj):
            problems.append(f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}: {error}")
    for obj, error in policy_errors(objects):
        problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {error}")
    return problems


def render_overlay(name: str) -> list[Obj]:
    """The objects of one overlay."""
    return render(K8S / "overlays" / name)


def main() -> int:
    """Render and check every overlay; print the problems; exit 1 if any."""
    failed = False
    for overlay in OVERLAYS:
        objects = render_overlay(overlay)
        problems = check(objects)
        kinds = sorted({o["kind"] for o in objects})
        status = "ok" if not problems else f"{len(problems)} problem(s)"
        print(
            f"deploy/k8s/overlays/{overlay}: {len(objects)} objects ({', '.join(kinds)}): {status}"
        )
        for problem in problems:
            print(f"  {problem}")
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
