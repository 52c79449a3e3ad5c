"""S3-compatible remotes (AWS S3, MinIO, Ceph, R2, ...) through boto3.

Credentials, region and endpoint come from the standard AWS environment and config
files; only an --endpoint-url may be kept in the repository's config, never a secret.
Refs move by conditional writes (If-None-Match: * to create, If-Match: <etag> to update).
"""

from __future__ import annotations

import io

from .backends import MAX_GET, RemoteBackend, RemoteError, _safe_key

MULTIPART_THRESHOLD = 64 << 20


class S3Remote(RemoteBackend):
    def __init__(self, url: str, endpoint_url: str | None = None, timeout: float = 10.0):
        import boto3
        from botocore.config import Config

        rest = url[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise RemoteError(f"{url}: no bucket name", hint="use s3://BUCKET[/PREFIX]")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint_url
        self.sent = 0
        self.received = 0
        cfg = Config(connect_timeout=timeout, read_timeout=3 * timeout, max_pool_connections=16,
                     retries={"max_attempts": 2, "mode": "standard"})
        self.s3 = boto3.client("s3", endpoint_url=endpoint_url, config=cfg)

    # -- errors ----------------------------------------------------------------------------
    def _call(self, fn, *args, **kw):
        from botocore import exceptions as bx

        where = self.endpoint or "S3"
        try:
            return fn(*args, **kw)
        except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                bx.ConnectionClosedError) as e:
            raise RemoteError(f"cannot reach {where}: {e}", hint="check --endpoint-url and the network") from e
        except bx.NoCredentialsError as e:
            raise RemoteError("no AWS credentials found",
                              hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile") from e
        except bx.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code == "NoSuchBucket":
                raise RemoteError(f"bucket {self.bucket!r} does not exist at {where}") from e
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                        "ExpiredToken", "403"):
                raise RemoteError(f"{where} rejected the credentials ({code})",
                                  hint="check the AWS credentials and the bucket's permissions") from e
            raise

    def _k(self, key: str) -> str:
        return self.prefix + _safe_key(key)

    # -- interface -------------------------------------------------------------------------
    def get(self, key):
        from botocore.exceptions import ClientError

        try:
            resp = self._call(self.s3.get_object, Bucket=self.bucket, Key=self._k(key))
            if resp.get("ContentLength", 0) > MAX_GET:
                raise RemoteError(f"remote object {key} is {resp['ContentLength']} bytes, "
                                  "more than any index or ref can be")
            data = resp["Body"].read(MAX_GET + 1)[:MAX_GET]
            self.received += len(data)
            return data
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise RemoteError(f"reading {key} failed: {e}") from e

    def get_range(self, key, start, length):
        if length == 0:
            return b""
        resp = self._call(self.s3.get_object, Bucket=self.bucket, Key=self._k(key),
                          Range=f"bytes={start}-{start + length - 1}")
        data = resp["Body"].read()
        if len(data) != length:
            raise RemoteError(f"remote object {key} is shorter than its index says")
        self.received += len(data)
        return data

    def put(self, key, data):
        if len(data) > MULTIPART_THRESHOLD:
            from boto3.s3.transfer import TransferConfig

            tc = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=16 << 20,
                                max_concurrency=4)
            self._call(self.s3.upload_fileobj, io.BytesIO(data), self.bucket, self._k(key), Config=tc)
        else:
            self._call(self.s3.put_object, Bucket=self.bucket, Key=self._k(key), Body=data)
        self.sent += len(data)

    def cas(self, key, expected, new):
        from botocore.exceptions import ClientError

        try:
            if expected is None:
                self._call(self.s3.put_object, Bucket=self.bucket, Key=self._k(key), Body=new, IfNoneMatch="*")
            else:
                cur = self._call(self.s3.get_object, Bucket=self.bucket, Key=self._k(key))
                if cur["Body"].read() != expected:
                    return False
                self._call(self.s3.put_object, Bucket=self.bucket, Key=self._k(key), Body=new,
                           IfMatch=cur["ETag"])
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict",
                                                            "NoSuchKey", "412", "409"):
                return False
            raise RemoteError(f"updating {key} failed: {e}") from e
        self.sent += len(new)
        return True

    def delete(self, key):
        self._call(self.s3.delete_object, Bucket=self.bucket, Key=self._k(key))

    def list(self, prefix):
        out = []
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        for page in self._call(lambda: list(pages)):
            for obj in page.get("Contents", []):
                out.append(obj["Key"][len(self.prefix):])
        return sorted(out)
