"""The JSON Schema and the configuration reference, both generated from the models.

    python -m proxy.settings.reference --write   # rewrites config/gateway.schema.json and docs/configuration.md
    python -m proxy.settings.reference --check   # exits 1 when either is stale (what CI's test does)

Both files are committed so that editors and readers have them without running anything; a test
regenerates them and fails when a model changed without them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from .environment import variables
from .models import GatewayConfig

COMMAND = "python -m proxy.settings.reference --write"
ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = Path("config/gateway.schema.json")
REFERENCE_PATH = Path("docs/configuration.md")
SCHEMA_ID = "https://github.com/arp-standard/arp-run-gateway/blob/main/config/gateway.schema.json"


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a configuration file."""
    generated = TypeAdapter(GatewayConfig).json_schema(mode="validation")
    _drop_titles(generated)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "title": "ARP Run Gateway configuration", **generated}


def _drop_titles(node: Any) -> None:
    """pydantic titles every property with its name re-cased ("Keepalive Timeout S"): noise in an editor."""
    if isinstance(node, dict):
        for value in node.get("properties", {}).values():
            if isinstance(value, dict):
                value.pop("title", None)
        for value in node.values():
            _drop_titles(value)
    elif isinstance(node, list):
        for value in node:
            _drop_titles(value)


def schema_text() -> str:
    return json.dumps(schema(), indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- the reference


_HEADER = f"""\
# Configuration reference

<!-- Generated from proxy/settings/models.py by `{COMMAND}`. Do not edit: a test fails when this
file and the models differ. -->

Every key of the gateway's YAML configuration, with its type, default, environment variable and
meaning. `arp-gateway check-config PATH` validates a file and prints it resolved;
[config/gateway.example.yaml](../config/gateway.example.yaml) sets every key to its default, and
[config/gateway.schema.json](../config/gateway.schema.json) is the JSON Schema editors complete
and check it with (the example names it in its `yaml-language-server` line).

The order of precedence is: command-line flag (`--host`, `--port`) > environment > YAML > default.
A key set to `null` takes its default. An unknown key, a wrong type or a bad value stops the
start-up with exit code 2 and one `key.path: problem` line each.

The environment variables are the ones the ARP security profiles and the JARVIS Run Gateway define.
`ARP_AUTH_PROFILE` presets `auth.mode` (`dev-insecure`: `disabled`; `dev-secure-keycloak`, with the
issuer `http://localhost:8080/realms/arp-dev` unless `ARP_AUTH_ISSUER` is set, and `enterprise`:
`required`); `ARP_AUTH_MODE` wins over it. The `ARP_AUTH_*` issuer variables override the first
entry of `auth.issuers` (creating it). A secret from the environment replaces the file's, in either
form. With `ARP_AUTH_CLIENT_ID` and `ARP_AUTH_ISSUER` but no `ARP_AUTH_TOKEN_ENDPOINT`, the token
endpoint is the issuer's Keycloak one (`{{issuer}}/protocol/openid-connect/token`). Lists from the
environment are comma-separated.
"""


def reference() -> str:
    """docs/configuration.md: one table per section, in the models' order."""
    root = schema()
    defs = root["$defs"]
    env = variables()
    out = [_HEADER]
    pending: list[tuple[str, dict[str, Any]]] = [("", root)]
    while pending:
        prefix, model = pending.pop(0)
        rows: list[str] = []
        nested: list[tuple[str, dict[str, Any]]] = []
        required = set(model.get("required", ()))
        for name, prop in model["properties"].items():
            path = f"{prefix}.{name}" if prefix else name
            target, many = _model_ref(prop, defs)
            if target is not None and not many and "anyOf" not in prop and not prefix:
                nested.append((path, target))       # a top-level section: its own table
                continue
            if target is not None:
                nested.append((path + ("[]" if many else ""), target))
            rows.append(_row(path, prop, defs, env, name in required, target is not None))
        title = f"`{prefix}`" if prefix else "Top level"
        about = model.get("description", "") if prefix else ""
        out.append(f"\n## {title}\n")
        if about:
            out.append(f"\n{_one_line(about)}\n")
        if rows:
            out.append("\n| key | type | default | environment | meaning |\n|---|---|---|---|---|\n")
            out.extend(rows)
        pending[:0] = nested
    return "".join(out)


def _model_ref(prop: dict[str, Any], defs: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
    """The section model a property holds, and whether it holds a list of them."""
    options = prop.get("anyOf", [prop])
    for option in options:
        many = option.get("type") == "array"
        ref = (option.get("items") or {}).get("$ref") if many else option.get("$ref")
        if ref:
            target = defs[ref.rsplit("/", 1)[1]]
            if target.get("type") == "object":
                return target, many
    return None, False


def _row(path: str, prop: dict[str, Any], defs: dict[str, Any], env: dict[str, list[str]],
         required: bool, section: bool) -> str:
    kind = _type(prop, defs) + (" (below)" if section else "")
    if required:
        default = "required"
    elif "default" not in prop:
        default = "see below"
    elif prop["default"] is None:
        default = "unset"
    elif isinstance(prop["default"], str):
        default = f"`{prop['default']}`"
    else:
        default = f"`{json.dumps(prop['default'], ensure_ascii=False)}`"
    names = env.get(path.replace("[0]", "[]"), [])
    variables_ = ", ".join(f"`{n}`" for n in names)
    return f"| `{path}` | {kind} | {default} | {variables_} | {_one_line(prop.get('description', ''))} |\n"


def _type(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    if "anyOf" in prop:
        kinds = [_type(o, defs) for o in prop["anyOf"] if o.get("type") != "null"]
        return " or ".join(kinds)
    if "$ref" in prop:
        target = defs[prop["$ref"].rsplit("/", 1)[1]]
        if "enum" in target:
            return "one of " + ", ".join(f"`{v}`" for v in target["enum"])
        return "mapping"
    if "enum" in prop:
        return "one of " + ", ".join(f"`{v}`" for v in prop["enum"])
    kind = prop.get("type", "any")
    if kind == "array":
        return f"list of {_type(prop.get('items', {}), defs)}"
    if kind == "object":
        return "mapping"
    bounds = []
    for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")):
        if key in prop:
            bounds.append(f"{sign} {prop[key]}")
    return kind + (f" {', '.join(bounds)}" if bounds else "")


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


# --------------------------------------------------------------------------- command line


def generated() -> dict[Path, str]:
    return {SCHEMA_PATH: schema_text(), REFERENCE_PATH: reference()}


def stale(root: Path = ROOT) -> list[Path]:
    """The generated files under `root` that differ from what the models generate now."""
    found = []
    for path, text in generated().items():
        target = root / path
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            found.append(path)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.settings.reference",
                                     description="Generate config/gateway.schema.json and docs/configuration.md.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="rewrite both files")
    action.add_argument("--check", action="store_true", help="exit 1 when either is stale")
    parser.add_argument("--root", type=Path, default=ROOT, help="the source checkout (default: %(default)s)")
    args = parser.parse_args(argv)
    if not (args.root / "pyproject.toml").is_file():
        print(f"{args.root} is not a source checkout (no pyproject.toml); pass --root", file=sys.stderr)
        return 2
    if args.check:
        old = stale(args.root)
        for path in old:
            print(f"{path} is stale: run {COMMAND}", file=sys.stderr)
        return 1 if old else 0
    for path, text in generated().items():
        (args.root / path).write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
