"""Role parameters templated from verified identity values, e.g. a certificate's CN.

A value reaching a template must look like one DNS label-ish word: no ``/``, no ``..``,
no whitespace or control characters, nothing that could reach another Vault path or
widen a grant. A value that does not fit refuses the request; it is never cleaned up.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from broker.errors import NotPermitted
from broker.identity.model import Identity
from broker.settings import template_fields

SAFE_VALUE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\Z")


def render_params(templates: Mapping[str, str], identity: Identity) -> dict[str, str]:
    out = {}
    for param, template in templates.items():
        values = {}
        for name in template_fields(template):
            value = getattr(identity, name)
            if not SAFE_VALUE.match(value):
                raise NotPermitted(
                    f"the identity's {name} cannot be used in parameter {param!r}: "
                    "it must be letters, digits, '-' or '_' (at most 63)",
                    code="template_value_refused",
                )
            values[name] = value
        out[param] = template.format(**values)
    return out
