"""Delta configurations: one dataclass per method, holding only the method's arguments."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from opendelta.errors import DeltaConfigError

C = TypeVar("C", bound="DeltaConfig")


@dataclass
class DeltaConfig:
    """Arguments every delta method takes; a method's config subclasses it and adds its own."""

    delta_type: ClassVar[str] = ""

    modified_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    unfrozen_modules: list[str] | None = None
    common_structure: bool | None = None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """Build the config; a key the method does not take is an error naming the close ones."""
        values = dict(values)
        given_type = values.pop("delta_type", cls.delta_type)
        if cls.delta_type and given_type != cls.delta_type:
            raise DeltaConfigError(f"{cls.__name__} is for delta_type {cls.delta_type!r}, got {given_type!r}")
        names = cls.field_names()
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=3)
                hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
                raise DeltaConfigError(
                    f"{cls.delta_type or cls.__name__} takes no argument {key!r}.{hint} It takes: {', '.join(names)}."
                )
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise DeltaConfigError(f"invalid {cls.delta_type or cls.__name__} configuration: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return {"delta_type": self.delta_type, **dataclasses.asdict(self)}

    def __post_init__(self) -> None:
        for name in ("modified_modules", "exclude_modules", "unfrozen_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise DeltaConfigError(f"{name} must be a list of names, got the string {value!r}; write [{value!r}].")
            if value is not None:
                setattr(self, name, list(value))
        self.validate()

    def validate(self) -> None:
        """Check the method's own arguments; raise DeltaConfigError naming the bad one."""
