"""Drives the real Python GCE clients (google-auth, google-cloud-storage)
against the metadata server named by GCE_METADATA_HOST / GCE_METADATA_IP and
prints one JSON object with what they saw.

Run in a child process (tests/clients.run_python): google-auth reads its
environment variables at import and first use.

Every outbound connection or name lookup that is not loopback is refused and
recorded under "blocked": newer google-auth releases may start a background
regional-access-boundary lookup to iamcredentials.googleapis.com, and a
client that escapes the emulator must show up as a test failure, not as a
network timeout.

Usage: python py_gce_client.py <id-token-audience> [--retarget-audience AUDIENCE]
           [--scopes SCOPE,...] [--with-scopes SCOPE,...] [--account EMAIL]
           [--authorized-get URL]

Without options it reports the calls every VM supports; each option adds the calls that
need its value (a second id-token audience, scopes to ask for, a non-default account).
"""

import argparse
import calendar
import json
import socket
import sys
import threading

_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "ip6-localhost"}
_blocked = []
_blocked_lock = threading.Lock()


def _is_loopback(host):
    if host is None:
        return True
    host = host.decode() if isinstance(host, bytes) else str(host)
    return host in _LOOPBACK_NAMES or host.startswith("127.")


def _refuse(what):
    with _blocked_lock:
        _blocked.append(what)
    raise OSError("connection outside loopback refused by the test harness: %s" % what)


def _install_loopback_guard():
    """Refuse (and record) any name lookup or connection that leaves loopback."""
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            _refuse("getaddrinfo %s" % host)
        return real_getaddrinfo(host, *args, **kwargs)

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            _refuse("connect %s" % (address[0],))
        return real_connect(sock, address)

    def guarded_connect_ex(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            _refuse("connect %s" % (address[0],))
        return real_connect_ex(sock, address)

    socket.getaddrinfo = guarded_getaddrinfo
    socket.socket.connect = guarded_connect
    socket.socket.connect_ex = guarded_connect_ex


def _capture(call):
    try:
        return {"value": call()}
    except Exception as exc:  # report every failure; the test decides
        return {"error": "%s: %s" % (type(exc).__name__, exc)}


def _epoch(naive_utc):
    return calendar.timegm(naive_utc.utctimetuple()) if naive_utc else None


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="py_gce_client.py")
    parser.add_argument("audience", help="audience of the id tokens asked for")
    parser.add_argument("--retarget-audience",
                        help="IDTokenCredentials.with_target_audience to this audience")
    parser.add_argument("--scopes", help="comma-separated: Credentials(scopes=[...])")
    parser.add_argument("--with-scopes", help="comma-separated: Credentials().with_scopes")
    parser.add_argument("--account", help="Credentials(service_account_email=...)")
    parser.add_argument("--authorized-get",
                        help="GET this (loopback) URL through an AuthorizedSession on ADC")
    return parser.parse_args(argv)


def _refreshed(credentials, request):
    """What refreshed compute_engine.Credentials hold, for the report."""
    credentials.refresh(request)
    return {"token": credentials.token,
            "expiry": _epoch(credentials.expiry),
            "service_account_email": credentials.service_account_email,
            "scopes": list(credentials.scopes or [])}


def _refreshed_id_token(credentials, request):
    credentials.refresh(request)
    return {"token": credentials.token,
            "expiry": _epoch(credentials.expiry),
            "service_account_email": credentials.service_account_email}


def _authorized_get(url):
    """One request as an application makes it, then a wait for the background threads it
    started (google-auth's regional-access-boundary lookup runs in one)."""
    import google.auth
    import google.auth.transport.requests
    credentials, _ = google.auth.default()
    session = google.auth.transport.requests.AuthorizedSession(credentials)
    before = set(threading.enumerate())
    status = session.get(url, headers={"Metadata-Flavor": "Google"}).status_code
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=20)
    return status


def main():
    args = _parse_args(sys.argv[1:])
    audience = args.audience
    _install_loopback_guard()

    import google.auth
    import google.auth.transport.requests
    from google.auth import compute_engine
    from google.auth.compute_engine import _metadata
    from google.oauth2 import id_token

    request = google.auth.transport.requests.Request()
    out = {"google_auth_version": google.auth.__version__}

    out["ping"] = _capture(lambda: _metadata.ping(request))

    def adc():
        credentials, project = google.auth.default()
        return {"credentials_class": "%s.%s" % (type(credentials).__module__,
                                                type(credentials).__name__),
                "project_id": project}
    out["adc"] = _capture(adc)

    out["metadata_project_id"] = _capture(lambda: _metadata.get(request, "project/project-id"))

    out["compute_token"] = _capture(lambda: _refreshed(compute_engine.Credentials(), request))

    out["id_token"] = _capture(lambda: id_token.fetch_id_token(request, audience))

    # The metadata identity endpoint through the credentials class (format=full).
    def id_token_credentials():
        return compute_engine.IDTokenCredentials(request, audience,
                                                 use_metadata_identity_endpoint=True)
    out["id_token_credentials"] = _capture(
        lambda: _refreshed_id_token(id_token_credentials(), request))
    if args.retarget_audience:
        out["id_token_credentials_retargeted"] = _capture(lambda: _refreshed_id_token(
            id_token_credentials().with_target_audience(args.retarget_audience), request))
    # IDTokenCredentials has no licenses option; ask the way an application has to.
    out["id_token_with_licenses"] = _capture(lambda: _metadata.get(
        request, "instance/service-accounts/default/identity",
        params={"audience": audience, "format": "full", "licenses": "TRUE"}))

    out["metadata_instance_recursive"] = _capture(
        lambda: _metadata.get(request, "instance/", recursive=True))
    out["metadata_get_project_id"] = _capture(lambda: _metadata.get_project_id(request))
    out["metadata_service_account_info"] = _capture(
        lambda: _metadata.get_service_account_info(request))
    out["universe_domain"] = _capture(lambda: compute_engine.Credentials().universe_domain)

    if args.scopes:
        out["scoped_token"] = _capture(lambda: _refreshed(
            compute_engine.Credentials(scopes=args.scopes.split(",")), request))
    if args.with_scopes:
        out["with_scopes_token"] = _capture(lambda: _refreshed(
            compute_engine.Credentials().with_scopes(args.with_scopes.split(",")), request))
    if args.account:
        # gcloud's credentials for a VM account that is not the default one.
        out["account_token"] = _capture(lambda: _refreshed(
            compute_engine.Credentials(service_account_email=args.account), request))
        out["account_info"] = _capture(
            lambda: _metadata.get_service_account_info(request, args.account))
        out["account_direct_token"] = _capture(lambda: _metadata.get_service_account_token(
            request, service_account=args.account)[0])

    def storage_client():
        from google.cloud import storage
        client = storage.Client()
        credentials = client._credentials
        return {"project": client.project,
                "credentials_class": "%s.%s" % (type(credentials).__module__,
                                                type(credentials).__name__)}
    out["storage_client"] = _capture(storage_client)

    if args.authorized_get:
        out["authorized_get"] = _capture(lambda: _authorized_get(args.authorized_get))

    with _blocked_lock:
        out["blocked"] = list(_blocked)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
