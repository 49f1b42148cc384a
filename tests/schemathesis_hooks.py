"""schemathesis hooks for the contract test (tests/tests/e2e/schemathesis.rs).

Some values are valid only as the API issued them, or only together with others, which
no schema can say. In the parts of a request that schemathesis generated as valid, such a
value is replaced by one the API accepts; the parts it generated as invalid are left
alone, so that requests meant to be refused still are:

- An Idempotency-Key names one request: sent again with another request it is refused
  with 422, as the IETF Idempotency-Key draft asks. Generated keys come from a small
  space ("0", "a", ...) and so repeat across requests: each is made unique.
- A cursor is opaque, and valid only as a `next_cursor` of the same list: it becomes a
  real cursor of that list.
- A consistency token is opaque, and names positions in the log: it becomes one the
  test got from a command (KEEL_TEST_CONSISTENCY_TOKEN).
- A state is asked for as of a version or as of a time, not both: when both are given,
  the time is dropped.
"""

import base64
import json
import os
import uuid

import schemathesis
from schemathesis.core.parameters import ParameterLocation


# A key of each list's sort order, as its cursor holds it.
CURSOR_KEYS = {
    "/v1/orders": ["0"],
    "/v1/products": ["0"],
    "/v1/reports/flagged-payments": ["0", "0"],
    "/v1/audit/streams/{type}/{id}": ["1"],
    "/v1/audit/events": ["2000-01-01T00:00:00.000000Z", "00000000-0000-0000-0000-000000000000"],
}


def cursor(key):
    text = json.dumps(key, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(text).decode().rstrip("=")


def generated_valid(case, location):
    meta = getattr(case, "meta", None)
    return meta is None or not meta.is_negative_at(location)


@schemathesis.hook
def before_call(context, case, **kwargs):
    headers = case.headers if case.headers is not None else {}
    if generated_valid(case, ParameterLocation.HEADER):
        for name in list(headers):
            lower = name.lower()
            if lower == "idempotency-key":
                headers[name] = f"{str(headers[name])[:200]}.{uuid.uuid4().hex}"
            elif lower == "keel-consistency-token":
                headers[name] = os.environ["KEEL_TEST_CONSISTENCY_TOKEN"]
    query = case.query if case.query is not None else {}
    if generated_valid(case, ParameterLocation.QUERY):
        key = CURSOR_KEYS.get(case.operation.path)
        if key is not None and "cursor" in query:
            query["cursor"] = cursor(key)
        if "version" in query and "at" in query:
            del query["at"]
