"""Watches a metadata value the way an application watching for preemption or maintenance does
with google-auth: one `_metadata.get`, then `wait_for_change` requests until the value is
<stop>. Prints {"values": [...]} (every value seen, in order) or {"error": ...} as JSON.

Run in a child process (tests/clients.run_python): google-auth reads GCE_METADATA_HOST at
first use.

Usage: python py_gce_wait.py <path> <stop>
"""

import json
import sys


def main():
    import google.auth.transport.requests
    from google.auth.compute_engine import _metadata

    path, stop = sys.argv[1], sys.argv[2]
    request = google.auth.transport.requests.Request()
    values = []
    try:
        values.append(_metadata.get(request, path))
        while values[-1] != stop and len(values) < 10:
            values.append(_metadata.get(request, path, timeout=30, params={
                "wait_for_change": "true", "timeout_sec": "25"}))
        report = {"values": values}
    except Exception as exc:  # the test decides what a failure must say
        report = {"error": "%s: %s" % (type(exc).__name__, exc), "values": values}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
