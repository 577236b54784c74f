"""A small kustomize renderer: the subset deploy/k8s uses, nothing more.

There is no kubectl or kustomize binary here (and none on PyPI for this
Python), so ``make deploy-check`` renders the overlays with this. It knows:

- ``resources``: YAML files (several documents each) and directories holding
  a ``kustomization.yaml``;
- ``components`` (``kind: Component``): their resources and patches applied
  to the including kustomization's objects;
- ``namespace``: set on every object;
- ``commonLabels``: added to every object's labels and to the selectors and
  pod template labels of Deployments, StatefulSets, Services and PDBs;
- ``images``: ``name`` -> ``newName``/``newTag`` in pod containers;
- ``patches`` with a ``path`` to strategic-merge patches (several documents
  each), each patching the object of the same kind and name. Maps merge;
  lists of maps that all have a ``name`` merge by name; other lists are
  replaced; a ``null`` deletes a key.

Anything else in a kustomization (JSON 6902 patches, generators,
replacements, ``$patch`` directives...) is refused, not ignored, so the
manifests cannot drift beyond what this renders faithfully.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

_KNOWN = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "namespace",
    "commonLabels",
    "images",
    "patches",
}
_POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


class KustomizeError(Exception):
    """A kustomization this renderer cannot render faithfully."""


def load_documents(path: Path) -> list[Obj]:
    """The non-empty YAML documents of a file."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc:
            raise KustomizeError(f"{path}: every document must be an object with a kind")
    return docs


def _kustomization(directory: Path) -> Obj:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - _KNOWN
    if unknown:
        raise KustomizeError(f"{path}: fields this renderer does not support: {sorted(unknown)}")
    return dict(data)


def strategic_merge(base: Any, patch: Any) -> Any:
    """``patch`` merged into ``base`` (the subset described in the module docstring)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if "$patch" in patch:
            raise KustomizeError("$patch directives are not supported")
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        merged_list = [copy.deepcopy(item) for item in base]
        index = {item["name"]: i for i, item in enumerate(merged_list)}
        for item in patch:
            if item["name"] in index:
                i = index[item["name"]]
                merged_list[i] = strategic_merge(merged_list[i], item)
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(patch)


def _named(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


def _identity(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj.get("metadata", {}).get("name", "")


def _apply_patches(objects: list[Obj], directory: Path, patches: list[Obj]) -> list[Obj]:
    for entry in patches:
        if set(entry) != {"path"}:
            raise KustomizeError(f"{directory}: only `patches: - path: FILE` is supported")
        for patch in load_documents(directory / entry["path"]):
            matches = [i for i, obj in enumerate(objects) if _identity(obj) == _identity(patch)]
            if len(matches) != 1:
                raise KustomizeError(
                    f"{directory / entry['path']}: patch for {_identity(patch)} matches "
                    f"{len(matches)} objects"
                )
            objects[matches[0]] = strategic_merge(objects[matches[0]], patch)
    return objects


def _set_labels(obj: Obj, labels: dict[str, str]) -> None:
    obj.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
    spec = obj.get("spec", {})
    kind = obj["kind"]
    if kind in _POD_OWNERS:
        spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(labels)
        template = spec.setdefault("template", {})
        template.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
    elif kind == "Service":
        spec.setdefault("selector", {}).update(labels)
    elif kind == "PodDisruptionBudget":
        spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(labels)


def _set_images(obj: Obj, images: list[Obj]) -> None:
    if obj["kind"] not in _POD_OWNERS:
        return
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        image: str = container.get("image", "")
        name = image.split("@")[0].rsplit(":", 1)[0] if ":" in image.split("/")[-1] else image
        for rule in images:
            if rule["name"] == name:
                tag = rule.get("newTag") or (image[len(name) + 1 :] if image != name else "")
                new = rule.get("newName", name)
                container["image"] = f"{new}:{tag}" if tag else new


def render(directory: Path) -> list[Obj]:
    """The objects a kustomization directory renders to."""
    data = _kustomization(directory)
    if data.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{directory}: a Component is only rendered through `components`")
    objects: list[Obj] = []
    for entry in data.get("resources", []):
        target = (directory / entry).resolve()
        objects += render(target) if target.is_dir() else load_documents(target)
    for entry in data.get("components", []):
        component_dir = (directory / entry).resolve()
        component = _kustomization(component_dir)
        if component.get("kind") != "Component":
            raise KustomizeError(f"{component_dir}: not a Component")
        for resource in component.get("resources", []):
            objects += load_documents(component_dir / resource)
        objects = _apply_patches(objects, component_dir, component.get("patches", []))
    objects = _apply_patches(objects, directory, data.get("patches", []))
    for obj in objects:
        if "commonLabels" in data:
            _set_labels(obj, data["commonLabels"])
        if "images" in data:
            _set_images(obj, data["images"])
        if "namespace" in data:
            obj.setdefault("metadata", {})["namespace"] = data["namespace"]
    return objects
