"""A small JSON-schema validator for the subset of keywords slidejob's schemas use.

jsonschema is not a dependency, and the model card needs only: ``type``
(one name or a list), ``properties``, ``required``, ``additionalProperties``
(bool or a schema), ``items``, ``minItems``, ``maxItems``, ``enum``,
``minimum``, ``maximum``, ``exclusiveMinimum``, ``pattern``, ``minLength``.
An unknown keyword in the schema is an error, so the schema cannot silently
ask for a check this validator does not make.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["schema_errors"]

_KNOWN = {
    "$schema", "$id", "title", "description", "type", "properties", "required", "additionalProperties",
    "items", "minItems", "maxItems", "enum", "minimum", "maximum", "exclusiveMinimum", "pattern", "minLength",
}


def _is_type(value: Any, name: str) -> bool:
    # bool is a subclass of int in Python but not a number in JSON.
    if name == "object":
        return isinstance(value, Mapping)
    if name == "array":
        return isinstance(value, list)
    if name == "string":
        return isinstance(value, str)
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "null":
        return value is None
    raise ValueError(f"schema uses unknown type {name!r}")


def schema_errors(value: Any, schema: Mapping[str, Any], where: str = "$") -> list[str]:
    """Every way ``value`` breaks ``schema``, as ``"$.path: message"`` lines (empty when valid).

    Examples
    --------
    >>> schema_errors({"a": 1}, {"type": "object", "required": ["a", "b"]})
    ["$: missing required key 'b'"]
    >>> schema_errors([1, "x"], {"type": "array", "items": {"type": "integer"}})
    ["$[1]: expected integer, found str 'x'"]
    """
    unknown = set(schema) - _KNOWN
    if unknown:
        raise ValueError(
            f"schema at {where} uses keywords this validator does not implement: {sorted(unknown)}"
        )
    errors: list[str] = []
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, name) for name in names):
            shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
            return [f"{where}: expected {' or '.join(names)}, found {type(value).__name__} {shown}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: expected one of {schema['enum']}, found {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: expected >= {schema['minimum']}, found {value}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: expected <= {schema['maximum']}, found {value}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{where}: expected > {schema['exclusiveMinimum']}, found {value}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: expected a string matching {schema['pattern']!r}, found {value!r}")
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{where}: expected at least {schema['minLength']} characters, found {value!r}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(f"{where}: expected at least {schema['minItems']} items, found {len(value)}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{where}: expected at most {schema['maxItems']} items, found {len(value)}")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += schema_errors(item, schema["items"], f"{where}[{i}]")
    if isinstance(value, Mapping):
        properties = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: missing required key {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], f"{where}.{key}")
            elif extra is False:
                errors.append(f"{where}: unexpected key {key!r} (allowed: {sorted(properties)})")
            elif isinstance(extra, Mapping):
                errors += schema_errors(item, extra, f"{where}.{key}")
    return errors
