"""Runs cloud-init's EC2 datasource (Debian's cloud-init, unpacked by tests/run.sh) against the
IMDS at argv[1] and prints one JSON object with what it crawled.

This is the crawl every EC2 instance makes at boot: an IMDSv2 token, then every leaf listed
under meta-data/, then user-data and the dynamic documents. On AWS, cloud-init abandons the
whole crawl when any listed leaf fails.

Usage: python py_cloud_init_ec2.py http://127.0.0.1:PORT
"""

import json
import logging
import sys
import tempfile

records = []


class _Keep(logging.Handler):
    def emit(self, record):
        records.append("%s %s" % (record.levelname, record.getMessage()))


def _plain(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def main():
    logging.getLogger().addHandler(_Keep(level=logging.WARNING))
    from cloudinit import helpers
    from cloudinit.sources import DataSourceEc2

    url = sys.argv[1]
    config = {"datasource": {"Ec2": {"metadata_urls": [url], "max_wait": 10, "timeout": 5}}}
    with tempfile.TemporaryDirectory() as run_dir:
        source = DataSourceEc2.DataSourceEc2(config, None, helpers.Paths({"run_dir": run_dir}))
        source._cloud_name = DataSourceEc2.CloudNames.AWS    # the AWS code path, strictest
        crawled = source.crawl_metadata()
    print(json.dumps({"crawled": _plain(crawled), "warnings": records}))


if __name__ == "__main__":
    main()
