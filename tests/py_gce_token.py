"""Refreshes google-auth's compute_engine.Credentials against the metadata server named by
GCE_METADATA_HOST / GCE_METADATA_IP and prints {"token": ...} or {"error": ...} as JSON.

Run in a child process (tests/clients.run_python): google-auth reads its environment variables
at import and first use.
"""

import json


def main():
    import google.auth.transport.requests
    from google.auth import compute_engine

    credentials = compute_engine.Credentials()
    try:
        credentials.refresh(google.auth.transport.requests.Request())
        report = {"token": credentials.token}
    except Exception as exc:  # the test decides what a failure must say
        report = {"error": "%s: %s" % (type(exc).__name__, exc)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
