"""The base of every request model: strict shapes, fields accepted and ignored, and lenient mode.

Three kinds of field, as vLLM and llama.cpp's server treat OpenAI's shapes:
- fields tokenmill acts on;
- fields of OpenAI's own request and response shapes that change nothing here (`store`, a message's
  `refusal` sent back by an SDK's `model_dump()`): declared with their types, accepted, ignored, and
  reported by `ignored_fields()` so the server can count them;
- anything else: refused by name (`Unrecognized request argument supplied`), unless the server runs
  with `--lenient-fields`, which drops such fields (reported too) instead.

Lenient mode is a property of the server, not of the request, but pydantic's validation sees only the
data: the HTTP layer turns it on per request with `lenient_fields()`, a context variable, which is
the one way a setting reaches FastAPI's body validation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ModelWrapValidatorHandler, PrivateAttr, model_validator

_LENIENT: ContextVar[bool] = ContextVar("tokenmill_lenient_fields", default=False)


@contextmanager
def lenient_fields(enabled: bool) -> Iterator[None]:
    """While inside, request models drop unknown fields instead of refusing them."""
    token = _LENIENT.set(enabled)
    try:
        yield
    finally:
        _LENIENT.reset(token)


@dataclass(frozen=True, slots=True)
class IgnoredField:
    """A field given that changes nothing: `path` as in `messages[].refusal`; `documented` when it is
    one of OpenAI's that tokenmill declares, False for a name it does not know (lenient mode, or an
    extra key on a text part)."""

    path: str
    documented: bool


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    # Fields declared only so that clients may send them: accepted, ignored, counted when not null.
    IGNORED: ClassVar[frozenset[str]] = frozenset()
    _dropped: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _drop_unknown_when_lenient(cls, data: Any, handler: ModelWrapValidatorHandler[StrictModel]) -> StrictModel:
        dropped: tuple[str, ...] = ()
        if _LENIENT.get() and isinstance(data, dict) and cls.model_config.get("extra") == "forbid":
            known = set(cls.model_fields) | {field.alias for field in cls.model_fields.values() if field.alias}
            dropped = tuple(key for key in data if key not in known)
            data = {key: value for key, value in data.items() if key in known}
        model = handler(data)
        if dropped:
            model._dropped = dropped
        return model

    def ignored_fields(self, prefix: str = "") -> list[IgnoredField]:
        """The fields given that change nothing here, nested ones included, each once."""
        found = [IgnoredField(prefix + name, True) for name in sorted(self.IGNORED) if getattr(self, name) is not None]
        found += [IgnoredField(prefix + name, False) for name in (*self._dropped, *sorted(self.model_extra or {}))]
        for name, value in self:
            items = value if isinstance(value, list) else [value]
            nested = f"{prefix}{name}[]." if isinstance(value, list) else f"{prefix}{name}."
            for item in items:
                if isinstance(item, StrictModel):
                    found += item.ignored_fields(nested)
        return list(dict.fromkeys(found))
