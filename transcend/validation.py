"""Validation errors for people and for other systems: each problem as
``field: what is wrong, what is allowed`` (pydantic's own text carries a
documentation URL and an "Input should be" wording that names neither the field
nor the value), and the non-retryable ``InvalidInput`` failure a workflow ends
with when its input does not validate."""

from __future__ import annotations

import re
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

INVALID_INPUT = "InvalidInput"

# "Input should be greater than 0" -> "must be greater than 0"; the subject pydantic
# puts first ("Input", "String", "List", ...) is the field, which is named already.
_SHOULD = re.compile(r"^(?:Input|String|List|Value|Dictionary|Tuple|Set|Number|Decimal|Date|"
                     r"Datetime|Time|Timedelta|Object|URL|Data|Frozenset) should ")
_REPLACE = {
    "missing": "is required",
    "extra_forbidden": "is not a known field",
}


def _field(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(input)"


def _unwrap(annotation: Any) -> list[Any]:
    """The model classes an annotation can hold (``X | None``, ``list[X]``, ``dict[str, X]``)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, tuple, set, frozenset, dict):
        args = typing.get_args(annotation)
        if origin is dict:
            args = args[1:]
        return [m for a in args for m in _unwrap(a)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _model_at(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model that holds the field at ``loc`` (to list its known fields)."""
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue  # a list index: the element type was taken with its field
        field = model.model_fields.get(part)
        if field is None:
            return None  # a dict key: the value type was taken with its field
        found = _unwrap(field.annotation)
        model = found[0] if len(found) == 1 else None
    return model


def describe_error(err: ErrorDetails, model: type[BaseModel] | None = None) -> str:
    """One problem as ``field: what is wrong, what is allowed``."""
    loc = tuple(err["loc"])
    kind = err["type"]
    msg = _REPLACE.get(kind) or err["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        # A model validator's message names its field already ("workloads: ...").
        return f"{_field(loc)}: {msg}" if loc else msg
    if kind == "extra_forbidden":
        holder = _model_at(model, loc[:-1])
        if holder is not None:
            msg += "; known fields: " + ", ".join(holder.model_fields)
        return f"{_field(loc)}: {msg}"
    msg = _SHOULD.sub("must ", msg)
    if kind == "string_pattern_mismatch":
        msg = msg.replace("must match pattern", "must match")
        holder = _model_at(model, loc[:-1]) if loc else None
        field = holder.model_fields.get(str(loc[-1])) if holder is not None else None
        if field is not None and field.description:
            msg += f" ({field.description})"
    value = err.get("input")
    if kind != "missing" and (value is None or isinstance(value, str | int | float | bool)):
        msg += f", got {value!r}"
    return f"{_field(loc)}: {msg}"


def describe(e: ValidationError, model: type[BaseModel] | None = None) -> str:
    """Every problem of a validation error, ``; ``-separated, without documentation URLs."""
    return "; ".join(describe_error(err, model) for err in e.errors(include_url=False))


def invalid_input(e: ValidationError, model: type[BaseModel]) -> Exception:
    """The non-retryable failure of a workflow whose input does not validate."""
    from temporalio.exceptions import ApplicationError

    return ApplicationError(f"invalid {model.__name__}: {describe(e, model)}",
                            type=INVALID_INPUT, non_retryable=True)
