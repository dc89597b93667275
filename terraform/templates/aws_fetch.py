#!/usr/bin/python3
"""beach-road boot helper (installed by the user data as /usr/local/sbin/beach-road-aws-fetch).

Reads a Secrets Manager secret or an S3 object with the instance role, using the Python standard
library only: the instance needs neither the AWS CLI nor a Debian mirror, so it needs no internet
egress. Every request goes to a regional AWS endpoint (reached through the VPC endpoints), signed
with Signature Version 4 and the role's temporary credentials from IMDSv2. Secret values are
written straight into root-only files (0600), never to stdout, argv or the environment.

  beach-road-aws-fetch secret    REGION DNS_SUFFIX SECRET_ID FILE [MIN_BYTES]
  beach-road-aws-fetch redis-env REGION DNS_SUFFIX SECRET_ID HOST PORT FILE
  beach-road-aws-fetch s3        REGION DNS_SUFFIX BUCKET KEY FILE

redis-env writes `REDIS_URL=rediss://:<token, percent-encoded>@HOST:PORT` (systemd EnvironmentFile
syntax); HOST given as `rediss+cluster://HOST` (a Redis Cluster's configuration endpoint) makes it
`REDIS_URL=rediss+cluster://:<token>@HOST:PORT`. No other scheme: TLS either way.
terraform/tests/check_aws_fetch.py checks the signatures against botocore's.
"""
import datetime
import hashlib
import hmac
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

IMDS = "http://169.254.169.254"
ATTEMPTS = 10  # the role's credentials and the endpoints' DNS may take a moment after boot
DELAY = 3


def _open(req, timeout=10):
    return urllib.request.urlopen(req, timeout=timeout)


def imds_credentials():
    """(access key, secret key, session token) of the instance role, through IMDSv2."""
    req = urllib.request.Request(
        IMDS + "/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"},
    )
    with _open(req, 2) as r:
        token = r.read().decode()
    hdr = {"X-aws-ec2-metadata-token": token}
    base = IMDS + "/latest/meta-data/iam/security-credentials/"
    with _open(urllib.request.Request(base, headers=hdr), 2) as r:
        role = r.read().decode().split()[0]
    with _open(urllib.request.Request(base + role, headers=hdr), 2) as r:
        c = json.loads(r.read())
    return c["AccessKeyId"], c["SecretAccessKey"], c.get("Token")


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _hmac(key, msg):
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sign(method, url, region, service, creds, body=b"", headers=None, now=None):
    """The headers to send: `headers`, host, x-amz-date, the session token, for S3
    x-amz-content-sha256, and the SigV4 Authorization header over all of them. `url` must be
    already percent-encoded and carry no query string."""
    akid, secret, token = creds
    parts = urllib.parse.urlsplit(url)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    payload_hash = _sha256(body)
    hdrs = {k.lower(): " ".join(str(v).split()) for k, v in (headers or {}).items()}
    hdrs["host"] = parts.netloc
    hdrs["x-amz-date"] = amz_date
    if service == "s3":
        hdrs["x-amz-content-sha256"] = payload_hash
    if token:
        hdrs["x-amz-security-token"] = token
    names = sorted(hdrs)
    signed = ";".join(names)
    canonical = "\n".join(
        [
            method,
            parts.path or "/",
            "",
            "".join(f"{n}:{hdrs[n]}\n" for n in names),
            signed,
            payload_hash,
        ]
    )
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, _sha256(canonical.encode())])
    key = ("AWS4" + secret).encode()
    for part in (amz_date[:8], region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    hdrs["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={akid}/{scope}, SignedHeaders={signed}, "
        f"Signature={signature}"
    )
    return hdrs


def _retrying(what, fn):
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return fn()
        except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
            # The message names the request, never a secret value. 403 is retried too: the
            # credentials of a role just attached may be refused for a few seconds.
            reason = getattr(e, "code", None) or type(e).__name__
            print(f"{what}: attempt {attempt}/{ATTEMPTS} failed: {reason}", file=sys.stderr)
            if attempt < ATTEMPTS:
                time.sleep(DELAY)
    raise SystemExit(f"{what}: giving up")


def secret_string(region, suffix, secret_id):
    url = f"https://secretsmanager.{region}.{suffix}/"
    body = json.dumps({"SecretId": secret_id}).encode()

    def fetch():
        hdrs = sign("POST", url, region, "secretsmanager", imds_credentials(), body, {
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": "secretsmanager.GetSecretValue",
        })
        req = urllib.request.Request(url, data=body, method="POST", headers=hdrs)
        with _open(req) as r:
            return json.loads(r.read())["SecretString"]

    return _retrying(f"GetSecretValue {secret_id}", fetch)


def write_private(path, data):
    """Writes `data` to `path`, mode 0600 from the start (no moment where others may read)."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


REDIS_SCHEMES = ("rediss", "rediss+cluster")


def redis_url(token, host, port):
    """`host` is an endpoint, or `rediss+cluster://` and an endpoint (a Redis Cluster)."""
    scheme, sep, bare = host.partition("://")
    if not sep:
        scheme, bare = "rediss", host
    if scheme not in REDIS_SCHEMES or not bare:
        raise SystemExit(f"redis-env: HOST must be HOST or rediss+cluster://HOST, not {host!r}")
    return f"{scheme}://:{urllib.parse.quote(token, safe='')}@{bare}:{port}"


def s3_object(region, suffix, bucket, key, path):
    url = f"https://{bucket}.s3.{region}.{suffix}/{urllib.parse.quote(key, safe='/~')}"

    def fetch():
        hdrs = sign("GET", url, region, "s3", imds_credentials())
        with _open(urllib.request.Request(url, headers=hdrs), 60) as r, open(path, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)

    _retrying(f"s3 GetObject s3://{bucket}/{key}", fetch)


def main(argv):
    cmd, args = (argv[1], argv[2:]) if len(argv) > 1 else ("", [])
    if cmd == "secret" and len(args) in (4, 5):
        region, suffix, secret_id, path = args[:4]
        value = secret_string(region, suffix, secret_id).encode()
        if len(args) == 5 and len(value) < int(args[4]):
            raise SystemExit(f"{secret_id}: shorter than {args[4]} bytes")
        write_private(path, value)
    elif cmd == "redis-env" and len(args) == 6:
        region, suffix, secret_id, host, port, path = args
        token = secret_string(region, suffix, secret_id)
        write_private(path, f"REDIS_URL={redis_url(token, host, port)}\n".encode())
    elif cmd == "s3" and len(args) == 5:
        s3_object(*args)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
