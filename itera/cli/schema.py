from __future__ import annotations

import json


def schema() -> None:
    """Print the JSON Schema that every itera record follows (protocol version 1).

    Examples:

      itera schema > record.schema.json
    """
    from itera.record import schema as record_schema

    print(json.dumps(record_schema(), indent=2))
