"""The payload converter of every transcend client and worker: pydantic JSON, with
one difference that matters to other systems starting workflows. A workflow input
(``api.WORKFLOW_INPUTS``) that does not validate raises the non-retryable
``ApplicationError`` of type ``InvalidInput`` naming each bad field. Temporal fails
the *workflow* on a failure error raised while decoding its input, before any of its
code runs, so nothing is registered or scheduled; a plain ``ValidationError`` would
fail only the workflow *task*, which Temporal retries forever.

Other payloads (activity results, signal and update arguments) keep pydantic's
``ValidationError``: a result this code cannot read is a deployment problem that a
fixed worker resolves by retrying, and a bad signal must not end a protection.
"""

from __future__ import annotations

from typing import Any, cast

from pydantic import BaseModel, ValidationError
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import PydanticJSONPlainPayloadConverter
from temporalio.converter import CompositePayloadConverter, DefaultPayloadConverter, JSONPlainPayloadConverter

from transcend.validation import invalid_input


class InputValidatingJSONConverter(PydanticJSONPlainPayloadConverter):
    def from_payload(self, payload: Payload, type_hint: type | None = None) -> Any:
        try:
            return super().from_payload(payload, type_hint)
        except ValidationError as e:
            if type_hint is not None and type_hint in _input_types():
                raise invalid_input(e, cast(type[BaseModel], type_hint)) from None
            raise


def _input_types() -> frozenset[type]:
    from transcend.api import WORKFLOW_INPUTS

    return frozenset(WORKFLOW_INPUTS.values())


class TranscendPayloadConverter(CompositePayloadConverter):
    """The default converters with JSON replaced by :class:`InputValidatingJSONConverter`."""

    def __init__(self) -> None:
        json_converter = InputValidatingJSONConverter()
        super().__init__(*(
            json_converter if isinstance(c, JSONPlainPayloadConverter) else c
            for c in DefaultPayloadConverter.default_encoding_payload_converters
        ))
