"""JSON schemas as constrained decoding reads them: objects that list their properties are closed.

JSON Schema's default lets an object carry any property it does not list. Generated schemas
(pydantic's, the openai SDK's for a non-strict tool) seldom say `additionalProperties`, and under
that default a grammar lets a small model invent keys: measured with the default model, 5 of 40
answers to a pydantic schema ran to max_tokens adding `"description": {...}` objects or a key
that never closed. vLLM's default backend (xgrammar) reads such schemas strictly; so does
tokenmill: an object that lists `properties` and says nothing of others takes no others. A schema
that wants them says `additionalProperties: true` (or gives `patternProperties`), and a bare
`{"type": "object"}` stays any object.
"""

from __future__ import annotations

from typing import Any

_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "not", "additionalProperties", "contains", "if", "then", "else")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas")


def closed_objects(schema: Any) -> Any:
    """A copy of `schema` where every object that lists `properties`, and says nothing of others,
    is `additionalProperties: false`."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(value) for name, value in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(value) for value in out[key]]
    for key in _SCHEMA_VALUES:
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key])
    if isinstance(out.get("properties"), dict) and not any(key in out for key in _OPEN_KEYS):
        out["additionalProperties"] = False
    return out
