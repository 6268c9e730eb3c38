#!/usr/bin/env python3
"""Checks Kubernetes objects without a cluster, for leader/tests/deploy.rs.

Every object in the files given (YAML or JSON, several documents each) is
checked against the Kubernetes OpenAPI schemas of one release
(kubernetes-validate, strict: unknown fields are errors), or, if a
CustomResourceDefinition among the inputs defines its kind, against that
CRD's openAPIV3Schema (jsonschema), with fields the schema does not declare
reported as the API server's strict field validation would. Each CRD's
schema must also be structural, as the API server requires.

Prints one JSON report on standard output: a list of
{"file", "kind", "name", "errors": [...]} for every object, in order.
Exits 0 when it could check everything (errors or not), 2 when it could
not run.
"""

import argparse
import json
import sys

try:
    import jsonschema
    import kubernetes_validate
    import yaml
except ImportError as error:  # pragma: no cover - the message is the point
    print(
        f"validate.py needs kubernetes-validate (pip install kubernetes-validate): {error}",
        file=sys.stderr,
    )
    sys.exit(2)


def documents(path):
    with open(path, encoding="utf-8") as handle:
        for document in yaml.safe_load_all(handle):
            if document is None:
                continue
            if document.get("kind", "").endswith("List") and "items" in document:
                yield from document["items"]
            else:
                yield document


def group_version(api_version):
    group, _, version = api_version.rpartition("/")
    return group, version


def structural_problems(schema, where):
    """The API server's structural-schema rules that matter here: every
    node has a type (unless it preserves unknown fields or is int-or-string),
    and properties and additionalProperties do not mix."""
    problems = []
    if not isinstance(schema, dict):
        return [f"{where}: not a schema"]
    exempt = schema.get("x-kubernetes-int-or-string") or schema.get(
        "x-kubernetes-preserve-unknown-fields"
    )
    if not schema.get("type") and not exempt:
        problems.append(f"{where}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{where}: both properties and additionalProperties")
    for name, child in schema.get("properties", {}).items():
        problems += structural_problems(child, f"{where}.{name}")
    if isinstance(schema.get("items"), dict):
        problems += structural_problems(schema["items"], f"{where}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        problems += structural_problems(schema["additionalProperties"], f"{where}{{}}")
    return problems


def unknown_fields(value, schema, where):
    """Fields the schema does not declare (the API server prunes them, or
    refuses them under strict field validation)."""
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        for key, child in value.items():
            if key in properties:
                found += unknown_fields(child, properties[key], f"{where}.{key}")
            elif isinstance(additional, dict):
                found += unknown_fields(child, additional, f"{where}.{key}")
            elif additional is not True:
                found.append(f"{where}.{key}: unknown field")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{where}[{index}]")
    return found


def check_custom(obj, schema):
    errors = []
    validator = jsonschema.Draft7Validator(schema)
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    for error in sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path)):
        path = "".join(
            f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path
        )
        errors.append(f"{path or '.'}: {error.message}")
    for key in body:
        if key not in schema.get("properties", {}) and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            errors.append(f".{key}: unknown field")
    for key, value in body.items():
        if key in schema.get("properties", {}):
            errors += unknown_fields(value, schema["properties"][key], f".{key}")
    if not obj.get("metadata", {}).get("name"):
        errors.append(".metadata.name: required")
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", default="1.33.0")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()

    objects = [(path, obj) for path in args.files for obj in documents(path)]
    schemas = {}
    crd_problems = {}
    for path, obj in objects:
        if obj.get("kind") != "CustomResourceDefinition":
            continue
        spec = obj.get("spec", {})
        kind = spec.get("names", {}).get("kind")
        problems = []
        for version in spec.get("versions", []):
            schema = version.get("schema", {}).get("openAPIV3Schema")
            if schema is None:
                problems.append(f"version {version.get('name')}: no openAPIV3Schema")
                continue
            if schema.get("type") != "object":
                problems.append(f"version {version.get('name')}: the root is not an object")
            problems += structural_problems(schema, f"version {version.get('name')}")
            schemas[(spec.get("group"), version.get("name"), kind)] = schema
        crd_problems[id(obj)] = problems

    report = []
    for path, obj in objects:
        kind = obj.get("kind", "")
        metadata = obj.get("metadata") or {}
        name = "/".join(p for p in (metadata.get("namespace"), metadata.get("name")) if p)
        group, version = group_version(obj.get("apiVersion", ""))
        schema = schemas.get((group, version, kind))
        if schema is not None:
            errors = check_custom(obj, schema)
            checked = "crd"
        else:
            checked = "kubernetes"
            errors = []
            try:
                kubernetes_validate.validate(obj, args.kubernetes_version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path_text = "".join(
                    f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.path
                )
                errors.append(f"{path_text or '.'}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError as error:
                errors.append(f"no schema for {obj.get('apiVersion')} {kind}: {error}")
            errors += crd_problems.get(id(obj), [])
        report.append(
            {"file": path, "kind": kind, "name": name, "checked": checked, "errors": errors}
        )
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
