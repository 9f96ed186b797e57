"""A small JSON-Schema subset, checked by hand: the same schemas the OpenAPI document
publishes are the ones requests are held to. Pure.

Supported: type (one or a list, "null" included), properties, required,
additionalProperties: false, minProperties, enum, minLength, maxLength, pattern,
minimum, maximum, items, maxItems, format: date-time. Errors name the field.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from ..control.errors import ControlError


class UnknownField(ControlError):
    status, code = 400, "unknown_field"


class MissingField(ControlError):
    status, code = 400, "missing_field"


class InvalidType(ControlError):
    status, code = 400, "invalid_type"


class InvalidValue(ControlError):
    status, code = 400, "invalid_value"


_PYTHON = {"string": str, "integer": int, "boolean": bool, "array": list, "object": dict,
           "null": type(None)}


def validate(schema: dict, value: Any, name: str = "body", *, strings: bool = False) -> Any:
    """The value if it fits the schema, else a ControlError naming the field.

    strings=True: values come from a query string; integers and booleans are parsed.
    """
    if strings and isinstance(value, str):
        value = _parse(schema, value, name)
    types = schema.get("type")
    if isinstance(value, float) and value.is_integer() and "integer" in (types or ()):
        value = int(value)      # JSON Schema: 1.0 is an integer
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is(value, t) for t in types):
            raise InvalidType(f"{name}: must be {' or '.join(types)}", name)
    if value is None:
        return None
    if "enum" in schema and value not in schema["enum"]:
        raise InvalidValue(f"{name}: one of {', '.join(map(str, schema['enum']))}", name)
    if isinstance(value, str):
        _check_string(schema, value, name)
    elif isinstance(value, int) and not isinstance(value, bool):
        _check_integer(schema, value, name)
    elif isinstance(value, list):
        if len(value) > schema.get("maxItems", 1000):
            raise InvalidValue(f"{name}: at most {schema.get('maxItems', 1000)} items", name)
        items = schema.get("items", {})
        return [validate(items, v, f"{name}[{i}]") for i, v in enumerate(value)]
    elif isinstance(value, dict):
        return _check_object(schema, value, name, strings)
    return value


def _check_object(schema: dict, value: dict, name: str, strings: bool) -> dict:
    props = schema.get("properties", {})
    prefix = "" if name in ("body", "query") else name + "."
    if schema.get("additionalProperties") is False:
        for key in value:
            if key not in props:
                raise UnknownField(f"{prefix}{key}: unknown field", prefix + key)
    for key in schema.get("required", ()):
        if key not in value:
            raise MissingField(f"{prefix}{key}: required", prefix + key)
    if len(value) < schema.get("minProperties", 0):
        raise MissingField(f"{name}: give at least one of {', '.join(props)}",
                           next(iter(props), None))
    return {k: validate(props.get(k, {}), v, prefix + k, strings=strings)
            for k, v in value.items()}


def _check_integer(schema: dict, value: int, name: str) -> None:
    if "minimum" in schema and value < schema["minimum"]:
        raise InvalidValue(f"{name}: must be at least {schema['minimum']}", name)
    if "maximum" in schema and value > schema["maximum"]:
        raise InvalidValue(f"{name}: must be at most {schema['maximum']}", name)


def _check_string(schema: dict, value: str, name: str) -> None:
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidValue(f"{name}: not valid Unicode text", name) from None
    if len(value) < schema.get("minLength", 0):
        raise InvalidValue(f"{name}: must not be empty" if schema["minLength"] == 1 else
                           f"{name}: at least {schema['minLength']} characters", name)
    if len(value) > schema.get("maxLength", 10_000):
        raise InvalidValue(f"{name}: at most {schema.get('maxLength', 10_000)} characters",
                           name)
    if "pattern" in schema and not re.search(schema["pattern"], value):
        raise InvalidValue(f"{name}: {value[:40]!r} does not match {schema['pattern']}", name)
    if schema.get("format") == "date-time":
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidValue(f"{name}: {value[:40]!r} is not an ISO-8601 date-time",
                               name) from None


def _is(value: Any, typ: str) -> bool:
    if typ == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if typ == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _PYTHON.get(typ, object))


def _parse(schema: dict, text: str, name: str) -> Any:
    types = schema.get("type")
    types = [types] if isinstance(types, str) else (types or [])
    if "integer" in types:
        if not re.fullmatch(r"-?[0-9]{1,19}", text):
            raise InvalidType(f"{name}: must be an integer", name)
        return int(text)
    if "boolean" in types:
        if text not in ("true", "false"):
            raise InvalidType(f"{name}: must be true or false", name)
        return text == "true"
    return text
