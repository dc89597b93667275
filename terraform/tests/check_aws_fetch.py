"""Offline check of templates/aws_fetch.py (the instances' boot helper), run by
scripts/check-terraform with the Python of checkov's virtualenv, which has botocore.

- Its SigV4 signatures equal botocore's for the two requests the instances make (Secrets Manager
  GetSecretValue, S3 GetObject), with a session token, at a fixed time.
- redis-env percent-encodes the AUTH token, so any token ElastiCache accepts makes a valid URL,
  keeps a rediss+cluster:// scheme given with the host (cluster mode) and refuses any other.
- Secret files are created 0600.
No network: nothing is sent.
"""
import datetime
import importlib.util
import os
import stat
import sys
import tempfile
import urllib.parse

from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "aws_fetch", os.path.join(HERE, "..", "templates", "aws_fetch.py")
)
aws_fetch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(aws_fetch)

CREDS = ("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "FwoGZXIvYXdzEXAMPLE//token==")
NOW = datetime.datetime(2026, 5, 1, 12, 34, 56, tzinfo=datetime.timezone.utc)


def botocore_authorization(auth_cls, method, url, region, service, body, headers):
    req = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    signer = auth_cls(Credentials(*CREDS), service, region)
    orig = datetime.datetime

    class Fixed(orig):
        @classmethod
        def utcnow(cls):
            return NOW.replace(tzinfo=None)

        @classmethod
        def now(cls, tz=None):
            return NOW if tz else NOW.replace(tzinfo=None)

    import botocore.auth

    botocore.auth.datetime.datetime = Fixed
    try:
        signer.add_auth(req)
    finally:
        botocore.auth.datetime.datetime = orig
    return req.headers["Authorization"]


def check(name, ours, theirs):
    if ours != theirs:
        print(f"FAIL {name}\n  ours:     {ours}\n  botocore: {theirs}")
        return 1
    print(f"ok   {name}")
    return 0


def main():
    failures = 0

    url = "https://secretsmanager.us-east-1.amazonaws.com/"
    body = b'{"SecretId": "arn:aws:secretsmanager:us-east-1:123456789012:secret:x-AbCdEf"}'
    extra = {
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Target": "secretsmanager.GetSecretValue",
    }
    ours = aws_fetch.sign("POST", url, "us-east-1", "secretsmanager", CREDS, body, extra, NOW)
    theirs = botocore_authorization(SigV4Auth, "POST", url, "us-east-1", "secretsmanager",
                                    body, extra)
    failures += check("SigV4 Secrets Manager GetSecretValue", ours["authorization"], theirs)

    key = "beach-road/v1.2/beach road+x~y"
    url = f"https://my-artifacts.s3.eu-west-1.amazonaws.com/{urllib.parse.quote(key, safe='/~')}"
    ours = aws_fetch.sign("GET", url, "eu-west-1", "s3", CREDS, now=NOW)
    theirs = botocore_authorization(S3SigV4Auth, "GET", url, "eu-west-1", "s3", b"",
                                    {"X-Amz-Content-SHA256": ours["x-amz-content-sha256"]})
    failures += check("SigV4 S3 GetObject (key with spaces, +, ~)", ours["authorization"], theirs)

    # Every printable ASCII character but / " @ and space (ElastiCache also refuses %, which
    # is kept here to show that it would be encoded too).
    token = "".join(chr(c) for c in range(33, 127) if chr(c) not in '/"@')

    def round_trips(host_arg, scheme, host):
        url = aws_fetch.redis_url(token, host_arg, 6379)
        parsed = urllib.parse.urlsplit(url)
        return (parsed.scheme == scheme and parsed.hostname == host and parsed.port == 6379
                and urllib.parse.unquote(parsed.password) == token
                and parsed.username == "" and "#" not in url)

    failures += check("redis-env URL round-trips every allowed token character",
                      round_trips("master.x.cache.amazonaws.com", "rediss",
                                  "master.x.cache.amazonaws.com"), True)
    # Cluster mode: the scheme comes with the configuration endpoint; the token is handled alike.
    failures += check("redis-env cluster URL (rediss+cluster://) round-trips the token",
                      round_trips("rediss+cluster://clustercfg.x.cache.amazonaws.com",
                                  "rediss+cluster", "clustercfg.x.cache.amazonaws.com"), True)

    refused = []
    for host in ("redis://master.x.cache.amazonaws.com", "redis+cluster://clustercfg.x",
                 "rediss+cluster://"):
        try:
            aws_fetch.redis_url(token, host, 6379)
        except SystemExit as e:
            refused.append(token not in str(e))
    failures += check("redis-env refuses schemes without TLS (and no token in the message)",
                      refused, [True, True, True])

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "secret")
        aws_fetch.write_private(path, b"x" * 64)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        failures += check("secret file mode 0600", oct(mode), oct(0o600))

    print(f"{6 - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
