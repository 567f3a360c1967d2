"""Objects that list their properties are closed for constrained decoding (xgrammar's strict reading)."""

from __future__ import annotations

from tokenmill.json_schema import closed_objects


def test_listed_properties_close_an_object_at_every_depth():
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "stops": {"type": "array", "items": {"type": "object", "properties": {"at": {"type": "string"}}}},
            "home": {"$ref": "#/$defs/Place"},
            "either": {"anyOf": [{"type": "object", "properties": {"a": {}}}, {"type": "null"}]},
        },
        "$defs": {"Place": {"type": "object", "properties": {"name": {"type": "string"}}}},
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["stops"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["Place"]["additionalProperties"] is False
    assert closed["properties"]["either"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the request's own schema is left as it was


def test_what_a_schema_says_of_other_properties_stands():
    assert closed_objects({"type": "object"}) == {"type": "object"}  # any object: json_object mode
    open_ = {"type": "object", "properties": {"a": {}}, "additionalProperties": True}
    assert closed_objects(open_) == open_
    typed = {"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "integer"}}
    assert closed_objects(typed) == typed
    patterned = {"type": "object", "properties": {"a": {}}, "patternProperties": {"^x-": {}}}
    assert closed_objects(patterned) == patterned
