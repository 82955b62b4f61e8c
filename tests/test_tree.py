"""The configuration document becomes the served tree: key spelling (camelCase in the file,
dash-case in URLs, user keys verbatim), unknown keys, lists as indexed directories, live reload
of the config file (mtime polling, SIGHUP / request_reload), failed reloads that keep the last
good tree, and runtime update/delete waking change-waiters.  Written from the core issue and
spec/gce.md, checked on the wire with http.client.
"""

import copy
import http.client
import json
import logging
import os
import signal
import threading
import time

import pytest

import mds
from clients import MdsCli

V1 = "/computeMetadata/v1/"
EMAIL = "runner@tree-proj.iam.gserviceaccount.com"
RELOAD_DEADLINE_SECONDS = 2.0     # the issue: an edited config is served within 2 seconds

DOCUMENT = {"computeMetadata": {"v1": {
    "instance": {
        "attributes": {"camelCaseKey": "a", "dash-key": "b", "UPPER_snake": "c",
                       "enable-oslogin": "TRUE"},
        "guestAttributes": {"myNamespace": {"someKey": "guest-value"}},
        "disks": [{"deviceName": "boot", "index": 0, "type": "PERSISTENT"},
                  {"deviceName": "scratch", "index": 1, "type": "LOCAL"}],
        "id": 1234567890123456789,
        "licenses": [{"id": "42"}],
        "machineType": "projects/1/machineTypes/n2-standard-2",
        "name": "tree-vm",
        "networkInterfaces": [{"accessConfigs": [{"externalIp": "203.0.113.7",
                                                  "type": "ONE_TO_ONE_NAT"}],
                               "dnsServers": ["169.254.169.254"], "ip": "10.1.0.5"},
                              {"accessConfigs": [], "ip": "10.2.0.5"}],
        "serviceAccounts": {"default": {"aliases": ["default"], "email": EMAIL,
                                        "scopes": ["https://www.googleapis.com/auth/cloud-platform"]},
                            EMAIL: {"aliases": ["default"], "email": EMAIL,
                                    "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}},
        "virtualClock": {"driftToken": "0"},
        "zone": "projects/1/zones/asia-east1-a",
        # Not a key Google defines: served anyway, at any depth.
        "customSection": {"deeperLevel": {"leafValue": "deep", "plain": "p"}, "flat": "f"},
    },
    "project": {"attributes": {"sshKeys": "x"}, "numericProjectId": 1, "projectId": "tree-proj"},
    "extra": {"anything": {"goes": "here"}},
}}}


class Reply:
    """Status, headers and body as they came off the wire."""

    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "Reply(%d, %r)" % (self.status, self.body[:200])


def fetch(server, path, timeout=10):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Metadata-Flavor": "Google"})
        response = connection.getresponse()
        return Reply(response.status, response.msg, response.read())
    finally:
        connection.close()


def text(server, path):
    reply = fetch(server, V1 + path)
    assert reply.status == 200, (path, reply)
    return reply.body.decode("utf-8")


def status(server, path):
    return fetch(server, V1 + path).status


def wait_for_body(server, path, expected, deadline_seconds):
    """Poll until `path` serves `expected`; returns the seconds it took, or None."""
    started = time.monotonic()
    while time.monotonic() - started < deadline_seconds:
        reply = fetch(server, V1 + path)
        if reply.status == 200 and reply.body == expected:
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def write_document(path, document):
    path.write_text(json.dumps(document), encoding="utf-8")


def document_with_attribute(value):
    document = copy.deepcopy(DOCUMENT)
    document["computeMetadata"]["v1"]["instance"]["attributes"]["dash-key"] = value
    return document


@pytest.fixture
def server(mds_server_factory):
    return mds_server_factory(config=copy.deepcopy(DOCUMENT))


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.json"
    write_document(path, DOCUMENT)
    return path


@pytest.fixture
def file_server(mds_server_factory, config_file):
    return mds_server_factory(config=str(config_file))


# ---- key spelling ---------------------------------------------------------------------------


@pytest.mark.parametrize("path,value", [
    ("instance/machine-type", "projects/1/machineTypes/n2-standard-2"),
    ("instance/virtual-clock/drift-token", "0"),
    ("project/numeric-project-id", "1"),
    ("project/project-id", "tree-proj"),
    ("instance/network-interfaces/0/access-configs/0/external-ip", "203.0.113.7"),
    ("instance/disks/1/device-name", "scratch"),
])
def test_google_keys_are_dash_case_in_urls(server, path, value):
    assert text(server, path) == value


def test_google_keys_are_camel_case_in_recursive_json(server):
    instance = fetch(server, V1 + "instance/?recursive=true").json()
    assert instance["machineType"] == "projects/1/machineTypes/n2-standard-2"
    assert instance["virtualClock"] == {"driftToken": "0"}
    assert instance["networkInterfaces"][0]["accessConfigs"][0]["externalIp"] == "203.0.113.7"
    project = fetch(server, V1 + "project/?recursive=true").json()
    assert project["numericProjectId"] == 1 and project["projectId"] == "tree-proj"


def test_listings_never_show_camel_case_google_keys(server):
    assert "machine-type\n" in text(server, "instance/")
    assert "virtual-clock/\n" in text(server, "instance/")
    assert text(server, "project/") == "attributes/\nnumeric-project-id\nproject-id\n"


@pytest.mark.parametrize("key,value", [("camelCaseKey", "a"), ("dash-key", "b"),
                                       ("UPPER_snake", "c"), ("enable-oslogin", "TRUE")])
def test_attribute_keys_keep_their_spelling_in_urls(server, key, value):
    assert text(server, "instance/attributes/" + key) == value


def test_attribute_keys_are_not_respelled(server):
    assert status(server, "instance/attributes/camel-case-key") == 404
    assert status(server, "instance/attributes/dashKey") == 404
    assert status(server, "project/attributes/ssh-keys") == 404
    assert text(server, "project/attributes/sshKeys") == "x"


def test_user_keys_are_verbatim_in_listings_and_json(server):
    assert text(server, "instance/attributes/") == \
        "UPPER_snake\ncamelCaseKey\ndash-key\nenable-oslogin\n"
    attributes = fetch(server, V1 + "instance/attributes/?recursive=true").json()
    assert attributes == DOCUMENT["computeMetadata"]["v1"]["instance"]["attributes"]
    project = fetch(server, V1 + "project/?recursive=true").json()
    assert project["attributes"] == {"sshKeys": "x"}


def test_guest_attribute_keys_keep_their_spelling(server):
    assert text(server, "instance/guest-attributes/myNamespace/someKey") == "guest-value"
    assert text(server, "instance/guest-attributes/") == "myNamespace/\n"
    instance = fetch(server, V1 + "instance/?recursive=true").json()
    assert instance["guestAttributes"] == {"myNamespace": {"someKey": "guest-value"}}


def test_service_account_email_keys_keep_their_spelling(server):
    assert text(server, "instance/service-accounts/%s/email" % EMAIL) == EMAIL
    accounts = fetch(server, V1 + "instance/service-accounts/?recursive=true").json()
    assert EMAIL in accounts and "default" in accounts


def test_unknown_keys_are_served_at_any_depth(server):
    assert text(server, "instance/custom-section/deeper-level/leaf-value") == "deep"
    assert text(server, "instance/custom-section/flat") == "f"
    assert text(server, "instance/custom-section/") == "deeper-level/\nflat\n"
    assert text(server, "extra/anything/goes") == "here"
    assert "extra/\n" in text(server, "")


def test_unknown_keys_round_trip_through_recursive_json(server):
    everything = fetch(server, V1 + "?recursive=true").json()
    assert everything["instance"]["customSection"] == \
        DOCUMENT["computeMetadata"]["v1"]["instance"]["customSection"]
    assert everything["extra"] == {"anything": {"goes": "here"}}


def test_unknown_keys_under_known_sections_of_the_project(mds_server_factory):
    document = copy.deepcopy(DOCUMENT)
    document["computeMetadata"]["v1"]["project"]["customFlag"] = {"enabled": "yes"}
    started = mds_server_factory(config=document)
    assert text(started, "project/custom-flag/enabled") == "yes"
    assert fetch(started, V1 + "project/?recursive=true").json()["customFlag"] == \
        {"enabled": "yes"}


# ---- lists ----------------------------------------------------------------------------------


def test_lists_of_objects_are_indexed_directories(server):
    assert text(server, "instance/disks/") == "0/\n1/\n"
    assert text(server, "instance/disks/0/") == "device-name\nindex\ntype\n"
    assert text(server, "instance/disks/0/index") == "0"
    assert text(server, "instance/licenses/") == "0/\n"
    assert text(server, "instance/licenses/0/id") == "42"
    assert text(server, "instance/network-interfaces/") == "0/\n1/\n"
    assert text(server, "instance/network-interfaces/1/ip") == "10.2.0.5"
    assert text(server, "instance/network-interfaces/0/access-configs/") == "0/\n"


def test_empty_indexed_list_is_an_empty_directory(server):
    assert text(server, "instance/network-interfaces/1/access-configs/") == ""
    interfaces = fetch(server, V1 + "instance/network-interfaces/?recursive=true").json()
    assert interfaces[1]["accessConfigs"] == []


def test_indexed_directories_redirect_without_slash(server):
    assert status(server, "instance/disks") == 301
    assert status(server, "instance/disks/0") == 301


@pytest.mark.parametrize("path", ["instance/disks/2/", "instance/disks/-1/", "instance/disks/a/",
                                  "instance/licenses/1/id",
                                  "instance/network-interfaces/0/dns-servers/0"])
def test_out_of_range_or_bad_indexes_are_404(server, path):
    assert status(server, path) == 404


def test_lists_of_objects_are_arrays_in_recursive_json(server):
    instance = fetch(server, V1 + "instance/?recursive=true").json()
    assert instance["disks"] == DOCUMENT["computeMetadata"]["v1"]["instance"]["disks"]
    assert instance["licenses"] == [{"id": "42"}]


def test_lists_of_scalars_are_list_leaves(server):
    assert text(server, "instance/network-interfaces/0/dns-servers") == "169.254.169.254\n"


def test_empty_lists_are_empty_directories(mds_server_factory):
    document = copy.deepcopy(DOCUMENT)
    document["computeMetadata"]["v1"]["instance"]["disks"] = []
    document["computeMetadata"]["v1"]["instance"]["licenses"] = []
    started = mds_server_factory(config=document)
    assert text(started, "instance/disks/") == ""
    assert text(started, "instance/licenses/") == ""
    assert "disks/\n" in text(started, "instance/")
    instance = fetch(started, V1 + "instance/?recursive=true").json()
    assert instance["disks"] == [] and instance["licenses"] == []


def test_primary_account_keyed_only_by_email_is_also_default(mds_server_factory):
    # A config may list the attached account under its e-mail alone, marked by its alias.
    document = copy.deepcopy(DOCUMENT)
    document["computeMetadata"]["v1"]["instance"]["serviceAccounts"] = {
        EMAIL: {"aliases": ["default"], "email": EMAIL,
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}}
    started = mds_server_factory(config=document)
    assert text(started, "instance/service-accounts/") == "default/\n%s/\n" % EMAIL
    assert text(started, "instance/service-accounts/default/email") == EMAIL
    assert text(started, "instance/service-accounts/default/aliases") == "default\n"
    assert json.loads(text(started, "instance/service-accounts/default/token"))["access_token"]


def test_default_serves_the_custom_fields_of_a_primary_keyed_by_email(mds_server_factory):
    document = copy.deepcopy(DOCUMENT)
    document["computeMetadata"]["v1"]["instance"]["serviceAccounts"] = {
        EMAIL: {"email": EMAIL, "scopes": ["s"], "team": "infra",
                "labels": {"costCenter": {"id": 7}, "tier": "gold"}}}
    started = mds_server_factory(config=document)
    for name in ("default", EMAIL):
        base = "instance/service-accounts/%s/" % name
        assert text(started, base) == \
            "aliases\nemail\nidentity\nlabels/\nscopes\nteam\ntoken\n"
        assert text(started, base + "team") == "infra"
        # An object a user adds is a directory, as anywhere else in the tree; below it the
        # keys keep their spelling.
        assert text(started, base + "labels/") == "costCenter/\ntier\n"
        assert text(started, base + "labels/costCenter/id") == "7"
        assert fetch(started, V1 + base + "?recursive=true").json()["labels"] == \
            {"costCenter": {"id": 7}, "tier": "gold"}
    assert status(started, "instance/service-accounts/default/labels") == 301


@pytest.mark.parametrize("key", ["default", "primary"])
def test_default_and_the_email_serve_the_same_fields_whatever_the_entry_is_keyed(
        mds_server_factory, key):
    document = copy.deepcopy(DOCUMENT)
    document["computeMetadata"]["v1"]["instance"]["serviceAccounts"] = {
        key: {"email": EMAIL, "aliases": ["default"], "scopes": ["s"], "myField": "1"}}
    started = mds_server_factory(config=document)
    for name in ("default", EMAIL):
        assert text(started, "instance/service-accounts/%s/my-field" % name) == "1"
    started.update("instance/service-accounts/default/other", "2")
    for name in ("default", EMAIL):
        assert text(started, "instance/service-accounts/%s/other" % name) == "2"


# ---- config file reload ---------------------------------------------------------------------


def test_editing_the_config_file_is_served_within_two_seconds(file_server, config_file):
    assert text(file_server, "instance/attributes/dash-key") == "b"
    write_document(config_file, document_with_attribute("edited in place"))
    took = wait_for_body(file_server, "instance/attributes/dash-key", b"edited in place",
                         RELOAD_DEADLINE_SECONDS)
    assert took is not None, "the edit was not served within %ss" % RELOAD_DEADLINE_SECONDS


def test_replacing_the_config_file_by_rename_is_noticed(file_server, config_file, tmp_path):
    # Editors that save atomically write a new file and rename it over the old one.
    replacement = tmp_path / "config.json.tmp"
    write_document(replacement, document_with_attribute("renamed over"))
    os.replace(str(replacement), str(config_file))
    assert wait_for_body(file_server, "instance/attributes/dash-key", b"renamed over",
                         RELOAD_DEADLINE_SECONDS) is not None


def test_new_keys_and_removed_keys_follow_the_file(file_server, config_file):
    document = copy.deepcopy(DOCUMENT)
    attributes = document["computeMetadata"]["v1"]["instance"]["attributes"]
    del attributes["camelCaseKey"]
    attributes["brand-new"] = "fresh"
    write_document(config_file, document)
    assert wait_for_body(file_server, "instance/attributes/brand-new", b"fresh",
                         RELOAD_DEADLINE_SECONDS) is not None
    assert status(file_server, "instance/attributes/camelCaseKey") == 404


def rewrite_keeping_stamp(path, document):
    """Change the file's content while keeping its size, inode and mtime.

    A poller that watches the mtime cannot see such an edit, so serving it proves the reload
    was triggered on request (SIGHUP) and not by the poll.
    """
    before = os.stat(str(path))
    data = json.dumps(document).encode("utf-8")
    assert len(data) == before.st_size, "test document must keep the file size"
    with open(str(path), "r+b") as handle:
        handle.write(data)
    os.utime(str(path), ns=(before.st_atime_ns, before.st_mtime_ns))


def test_request_reload_rereads_the_file_at_once(file_server, config_file):
    # Same length as the original "b", so size and mtime stay as they were.
    rewrite_keeping_stamp(config_file, document_with_attribute("Z"))
    time.sleep(1.5)   # several poll periods: a stamp-based poller must not have noticed
    file_server.request_reload()
    assert wait_for_body(file_server, "instance/attributes/dash-key", b"Z", 1.0) is not None


def test_reload_method_rereads_the_file(file_server, config_file):
    rewrite_keeping_stamp(config_file, document_with_attribute("Y"))
    file_server.reload()
    assert text(file_server, "instance/attributes/dash-key") == "Y"


def assert_reload_failure_logged(caplog, *words):
    failures = [r for r in caplog.records
                if r.levelno >= logging.WARNING and r.name.startswith("mds")]
    assert failures, "no warning/error was logged for the failed reload"
    message = " ".join(r.getMessage() for r in failures)
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("content,reason_words", [
    ('{"computeMetadata": {"v1": {"instance": ', ["JSON"]),
    ("not json at all", ["JSON"]),
    ("[1, 2, 3]", []),
    ('{"computeMetadata": {"v1": {"instance": "a string"}}}', ["instance"]),
    ('{"computeMetadata": []}', ["computeMetadata"]),
    ('{"computeMetadata": {"v1": {"instance": {"serviceAccounts": ["x"]}}}}',
     ["serviceAccounts"]),
    # A misspelled top-level key would otherwise serve the built-in VM without a word.
    ('{"computemetadata": {"v1": {}}}', ["computeMetadata", "computemetadata"]),
    # Compiling recurses; before Python 3.11 a deep enough document crashed the watcher's
    # thread (and the process) instead of failing.
    ('{"computeMetadata": {"v1": {"instance": {"attributes": {"deep": %s"x"%s}}}}}'
     % ('{"k": ' * 120, "}" * 120), ["deeper than 100 levels"]),
    # Deeper than the JSON parser itself goes: its RecursionError, not a traceback.
    ("[" * 100000, ["JSON", "recursion"]),
])
def test_a_bad_reload_keeps_the_last_good_tree_and_logs_why(file_server, config_file, caplog,
                                                            content, reason_words):
    caplog.set_level(logging.INFO, logger="mds")
    etag = fetch(file_server, V1 + "?recursive=true").headers.get("ETag")
    config_file.write_text(content, encoding="utf-8")
    file_server.request_reload()
    deadline = time.monotonic() + RELOAD_DEADLINE_SECONDS + 1
    while time.monotonic() < deadline and not [
            r for r in caplog.records if r.levelno >= logging.WARNING]:
        time.sleep(0.05)
    assert_reload_failure_logged(caplog, *reason_words)
    assert text(file_server, "instance/attributes/dash-key") == "b"
    assert text(file_server, "instance/name") == "tree-vm"
    assert fetch(file_server, V1 + "?recursive=true").headers.get("ETag") == etag
    # The document runtime updates edit is the good one too, not the refused text.
    file_server.update("instance/attributes/after-refusal", "kept")
    assert text(file_server, "instance/attributes/after-refusal") == "kept"
    assert text(file_server, "instance/name") == "tree-vm"
    # The server is still alive to the next good edit.
    write_document(config_file, document_with_attribute("recovered"))
    file_server.request_reload()
    assert wait_for_body(file_server, "instance/attributes/dash-key", b"recovered",
                         RELOAD_DEADLINE_SECONDS) is not None


def test_a_document_at_the_depth_limit_is_served_and_one_deeper_is_refused(server):
    deep = "x"
    for _ in range(mds.MAX_DOCUMENT_DEPTH - 5):          # the value sits 5 levels down
        deep = {"k": deep}
    server.update("instance/attributes/deep", deep)
    assert fetch(server, V1 + "instance/attributes/deep/?recursive=true").json() == deep
    with pytest.raises(mds.ConfigError, match="deeper than 100 levels"):
        server.update("instance/attributes/deep", {"k": deep})
    assert fetch(server, V1 + "instance/attributes/deep/?recursive=true").json() == deep


def test_serving_leaves_the_processs_thread_stack_size_alone(mds_server_factory):
    # Handler threads start with a small stack; other threads of a program that embeds mds
    # keep the default, which deep recursion before Python 3.11 needs.
    import threading

    assert threading.stack_size() == 0
    server = mds_server_factory()
    assert text(server, "project/project-id")
    assert threading.stack_size() == 0
    threading.stack_size(1024 * 1024)                 # a size the program chose is kept
    try:
        assert text(server, "project/project-id")
        assert threading.stack_size() == 1024 * 1024
    finally:
        threading.stack_size(0)


def test_a_bad_reload_with_command_line_overrides_keeps_the_watcher(tmp_path, caplog):
    # The project given on the command line is applied to every reloaded document; one of
    # the wrong shape must fail that reload only.
    config = tmp_path / "config.json"
    write_document(config, document_with_attribute("before"))
    server = mds.MetadataServer(config=str(config), port=0, poll_interval=0.05,
                                identity={"project_id": "flag-project"})
    server.start()
    try:
        config.write_text('{"computeMetadata": {"v1": {"instance": "oops"}}}')
        assert not server.reload()
        write_document(config, document_with_attribute("after"))
        assert wait_for_body(server, "instance/attributes/dash-key", b"after",
                             RELOAD_DEADLINE_SECONDS) is not None
        assert text(server, "project/project-id") == "flag-project"
    finally:
        server.stop()


def test_sighup_reloads_a_running_cli_server(tmp_path, config_file):
    if not hasattr(signal, "SIGHUP"):
        pytest.skip("no SIGHUP on this platform")
    cli = MdsCli(tmp_path, "--config", config_file)
    try:
        class Endpoint:
            port = cli.port

        assert text(Endpoint, "instance/attributes/dash-key") == "b"
        rewrite_keeping_stamp(config_file, document_with_attribute("H"))
        time.sleep(1.5)
        # The poller must not have seen the edit, or this test could not tell a SIGHUP
        # reload from a poll.
        assert text(Endpoint, "instance/attributes/dash-key") == "b"
        cli.process.send_signal(signal.SIGHUP)
        assert wait_for_body(Endpoint, "instance/attributes/dash-key", b"H", 1.0) is not None
    finally:
        cli.stop()


# ---- runtime update / delete ----------------------------------------------------------------


def test_an_update_on_a_settings_only_config_adds_to_the_built_in_vm(mds_server_factory):
    server = mds_server_factory(config={"mds": {"instanceCreationTimestamp": 1767225600}})
    project = text(server, "project/project-id")
    email = text(server, "instance/service-accounts/default/email")
    server.update("instance/attributes/added", "yes")
    assert text(server, "instance/attributes/added") == "yes"
    assert text(server, "project/project-id") == project
    assert text(server, "instance/service-accounts/default/email") == email


def test_an_update_of_the_primary_account_is_served_under_both_names(server):
    new_scopes = ["https://www.googleapis.com/auth/devstorage.read_only"]
    server.update("instance/service-accounts/%s/scopes" % EMAIL, new_scopes)
    assert text(server, "instance/service-accounts/default/scopes") == new_scopes[0] + "\n"
    server.update("instance/service-accounts/default/scopes", ["https://x.example/s"])
    assert text(server, "instance/service-accounts/%s/scopes" % EMAIL) == \
        "https://x.example/s\n"


def test_keys_below_an_attribute_object_keep_their_spelling_in_updates(mds_server_factory):
    document = copy.deepcopy(DOCUMENT)
    document["computeMetadata"]["v1"]["instance"]["attributes"]["cfg"] = {"fooBar": 1}
    server = mds_server_factory(config=document)
    server.update("instance/attributes/cfg/new-key", "v")
    assert text(server, "instance/attributes/cfg/new-key") == "v"
    server.update("instance/attributes/cfg/foo-bar", 2)
    assert text(server, "instance/attributes/cfg/fooBar") == "1"
    assert text(server, "instance/attributes/cfg/foo-bar") == "2"


@pytest.mark.parametrize("path", ["instance/disks/-1/device-name", "instance/disks/x/type",
                                  "instance/disks/5/device-name"])
def test_list_elements_are_addressed_by_their_index_or_the_next_one(server, path):
    before = fetch(server, V1 + "instance/?recursive=true").body
    with pytest.raises(mds.ConfigError) as caught:
        server.update(path, "nope")
    assert "no list element" in str(caught.value)
    assert fetch(server, V1 + "instance/?recursive=true").body == before
    server.update("instance/disks/2", {"deviceName": "third", "index": 2})
    assert text(server, "instance/disks/2/device-name") == "third"


@pytest.mark.parametrize("scopes, served", [
    ("https://a.example/s1, https://a.example/s2", "https://a.example/s1\nhttps://a.example/s2\n"),
    ([], ""),
])
def test_odd_scope_shapes_are_served_as_what_they_mean(mds_server_factory, scopes, served):
    document = copy.deepcopy(DOCUMENT)
    for entry in document["computeMetadata"]["v1"]["instance"]["serviceAccounts"].values():
        entry["scopes"] = scopes
    server = mds_server_factory(config=document)
    assert text(server, "instance/service-accounts/default/scopes") == served


def test_a_dash_case_service_accounts_key_is_read(mds_server_factory):
    document = copy.deepcopy(DOCUMENT)
    instance = document["computeMetadata"]["v1"]["instance"]
    instance["service-accounts"] = instance.pop("serviceAccounts")
    server = mds_server_factory(config=document)
    assert text(server, "instance/service-accounts/default/email") == EMAIL


def test_keys_served_under_one_name_are_refused(mds_server_factory):
    document = copy.deepcopy(DOCUMENT)
    document["computeMetadata"]["v1"]["instance"]["fooBar"] = "camel"
    document["computeMetadata"]["v1"]["instance"]["foo-bar"] = "dash"
    with pytest.raises(mds.ConfigError) as caught:
        mds.MetadataServer(config=document)
    assert "fooBar" in str(caught.value) and "foo-bar" in str(caught.value)


def test_directory_etags_follow_what_the_recursive_json_shows(mds_server_factory):
    etags = set()
    for extra in ({"FooBar": {"x": "1"}}, {"fooBar": {"x": "1"}}):
        document = copy.deepcopy(DOCUMENT)
        document["computeMetadata"]["v1"]["instance"]["customSection"] = extra
        server = mds_server_factory(config=document)
        etags.add(fetch(server, V1 + "instance/custom-section/?recursive=true")
                  .headers.get("ETag"))
    assert len(etags) == 2


def test_indexed_directories_list_in_numeric_order(mds_server_factory):
    document = copy.deepcopy(DOCUMENT)
    document["computeMetadata"]["v1"]["instance"]["disks"] = [
        {"deviceName": "d%d" % n, "index": n} for n in range(12)]
    server = mds_server_factory(config=document)
    assert text(server, "instance/disks/") == "".join("%d/\n" % n for n in range(12))
    lines = fetch(server, V1 + "instance/disks/?recursive=true&alt=text").body.decode()
    assert [line.split("/")[0] for line in lines.splitlines() if "device-name" in line] == \
        [str(n) for n in range(12)]


@pytest.mark.parametrize("content", ['{"computeMetadata": {"v1": {"project": {"r": NaN}}}}',
                                     '{"computeMetadata": {"v1": {"project": {"r": 1e400}}}}'])
def test_numbers_json_cannot_carry_are_refused(tmp_path, content):
    config = tmp_path / "config.json"
    config.write_text(content)
    with pytest.raises(mds.ConfigError) as caught:
        mds.MetadataServer(config=str(config))
    assert "JSON" in str(caught.value)



def test_update_changes_what_is_served(server):
    server.update("instance/attributes/dash-key", "updated")
    assert text(server, "instance/attributes/dash-key") == "updated"
    server.update("instance/attributes/added-at-runtime", "new")
    assert "added-at-runtime\n" in text(server, "instance/attributes/")
    server.update("instance/custom-section/deeper-level/leaf-value", "changed-deep")
    assert text(server, "instance/custom-section/deeper-level/leaf-value") == "changed-deep"
    assert fetch(server, V1 + "instance/?recursive=true").json()["customSection"][
        "deeperLevel"]["leafValue"] == "changed-deep"


def test_update_of_a_google_key_keeps_its_json_spelling(server):
    server.update("instance/machine-type", "projects/1/machineTypes/e2-micro")
    assert text(server, "instance/machine-type") == "projects/1/machineTypes/e2-micro"
    instance = fetch(server, V1 + "instance/?recursive=true").json()
    assert instance["machineType"] == "projects/1/machineTypes/e2-micro"
    assert "machine-type" not in instance


def test_delete_removes_the_key(server):
    server.delete("instance/attributes/camelCaseKey")
    assert status(server, "instance/attributes/camelCaseKey") == 404
    assert "camelCaseKey" not in text(server, "instance/attributes/")
    with pytest.raises(KeyError, match="nothing to delete at instance/attributes/camelCaseKey"):
        server.delete("instance/attributes/camelCaseKey")


class Waiter(threading.Thread):
    """A wait_for_change request hanging in the background."""

    def __init__(self, server, path):
        super().__init__(daemon=True)
        self.server, self.path, self.reply, self.error = server, path, None, None

    def run(self):
        try:
            self.reply = fetch(self.server, self.path, timeout=30)
        except Exception as exc:   # reported through .error
            self.error = exc


def start_waiter(server, path):
    etag = fetch(server, V1 + path).headers.get("ETag")
    separator = "&" if "?" in path else "?"
    waiter = Waiter(server, V1 + path + separator + "wait_for_change=true&last_etag=" + etag)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive(), "answered with nothing changed: %r" % waiter.reply
    return waiter


def finished(waiter):
    waiter.join(20)
    assert not waiter.is_alive(), "the change did not wake the waiter"
    assert waiter.error is None, waiter.error
    return waiter.reply


def test_update_wakes_leaf_and_directory_waiters(server):
    leaf = start_waiter(server, "instance/attributes/dash-key")
    directory = start_waiter(server, "instance/attributes/?recursive=true")
    root = start_waiter(server, "?recursive=true")
    server.update("instance/attributes/dash-key", "wake")
    assert finished(leaf).body == b"wake"
    assert finished(directory).json()["dash-key"] == "wake"
    assert finished(root).json()["instance"]["attributes"]["dash-key"] == "wake"


def test_delete_wakes_waiters_with_404(server):
    leaf = start_waiter(server, "instance/attributes/UPPER_snake")
    directory = start_waiter(server, "instance/attributes/?recursive=true")
    server.delete("instance/attributes/UPPER_snake")
    assert finished(leaf).status == 404
    assert "UPPER_snake" not in finished(directory).json()


def test_reload_wakes_waiters(file_server, config_file):
    waiter = start_waiter(file_server, "instance/attributes/dash-key")
    write_document(config_file, document_with_attribute("from file"))
    file_server.request_reload()
    assert finished(waiter).body == b"from file"
