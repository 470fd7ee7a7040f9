"""S3 as credentials scoped to one prefix see it: a proxy in front of moto that refuses the rest.

It enforces what this IAM policy grants, and nothing more:

    s3:GetObject, s3:PutObject, s3:DeleteObject  on  arn:aws:s3:::<bucket>/<prefix>*
    s3:ListBucket on arn:aws:s3:::<bucket>  with  Condition StringLike s3:prefix "<prefix>*"

Every other request (HeadBucket, GetBucketLocation, CreateBucket, ListBuckets, a listing of the
bucket's root or of another prefix, a key outside the prefix) gets S3's 403 AccessDenied, and is
recorded in `refused`. moto's own IAM enforcement cannot stand in for it: moto evaluates a
policy's Action and Resource but skips conditions it does not implement (StringLike among them),
so a ListBucket scoped by `s3:prefix` would list the whole bucket there.
"""

from __future__ import annotations

import http.client
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# The query parameters of the calls the policy grants (the rest name other actions: ?acl,
# ?location, ?versioning, ...). botocore adds x-id to name the operation.
OBJECT_QUERY = {"x-id", "uploads", "uploadId", "partNumber"}  # Get/Put/DeleteObject, multipart
LIST_QUERY = {"x-id", "list-type", "prefix", "delimiter", "max-keys", "continuation-token",
              "start-after", "encoding-type", "fetch-owner", "marker"}
HOP = {"transfer-encoding", "connection", "content-length", "date", "server"}  # set anew here
DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
          b"<Message>Access Denied</Message></Error>")


@dataclass
class ScopedS3:
    """The proxy's `endpoint`, for the prefix `s3://<bucket>/<prefix>`."""

    endpoint: str
    bucket: str
    prefix: str
    refused: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix.rstrip('/')}"

    def inside(self, path: str) -> bool:
        """`bucket/key` (as in x-amz-copy-source, maybe with a leading /) is in the prefix."""
        bucket, _, key = unquote(path.split("?")[0]).lstrip("/").partition("/")
        return bucket == self.bucket and key.startswith(self.prefix)

    def allows(self, method: str, target: str, headers: dict[str, str], body: bytes) -> bool:
        url = urlsplit(target)
        query = parse_qs(url.query, keep_blank_values=True)
        bucket, _, key = unquote(url.path).lstrip("/").partition("/")
        if bucket != self.bucket:
            return False  # ListBuckets (GET /), or another bucket
        if key:
            source = headers.get("x-amz-copy-source")  # CopyObject also reads its source
            return (key.startswith(self.prefix) and set(query) <= OBJECT_QUERY
                    and (source is None or self.inside(source)))
        if method == "GET" and set(query) <= LIST_QUERY:  # ListObjects: only with the prefix
            return query.get("prefix", [""])[0].startswith(self.prefix)
        if method == "POST" and set(query) <= {"delete", "x-id"} and "delete" in query:
            keys = [e.text or "" for e in ET.fromstring(body).iter() if e.tag.endswith("Key")]
            return all(k.startswith(self.prefix) for k in keys)  # DeleteObjects: each key
        return False  # HeadBucket, GetBucketLocation, CreateBucket, ...


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients expect of S3
    scope: ScopedS3
    upstream: tuple[str, int]

    def _forward(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            raise NotImplementedError("chunked request bodies")  # not sent by s3fs for bytes
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        if not self.scope.allows(self.command, self.path, headers, body):
            self.scope.refused.append(f"{self.command} {self.path}")
            self._reply(403, {"Content-Type": "application/xml"}, DENIED)
            return
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            sent = {k: v for k, v in self.headers.items() if k.lower() != "expect"}  # answered
            conn.request(self.command, self.path, body, sent)
            resp = conn.getresponse()
            data = resp.read()
            kept = {k: v for k, v in resp.getheaders() if k.lower() not in HOP}
            if self.command == "HEAD":  # a HEAD's length is the object's: the client reads it
                kept["Content-Length"] = resp.getheader("Content-Length", "0")
            self._reply(resp.status, kept, data)
        finally:
            conn.close()

    def _reply(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, format: str, *args: object) -> None:
        pass  # refusals are in `refused`; the rest is noise


@contextmanager
def scoped_s3(upstream: str, bucket: str, prefix: str) -> Iterator[ScopedS3]:
    """A proxy on loopback in front of the S3 endpoint `upstream`, scoped to `bucket/prefix`."""
    if not prefix.endswith("/"):
        raise ValueError("prefix must end with /")  # "team-a*" would also grant "team-ab/"
    handler = type("Handler", (_Handler,), {"upstream": (urlsplit(upstream).hostname,
                                                         urlsplit(upstream).port)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    scope = handler.scope = ScopedS3(f"http://127.0.0.1:{server.server_address[1]}", bucket,
                                     prefix)
    thread = threading.Thread(target=server.serve_forever, name="scoped-s3", daemon=True)
    thread.start()
    try:
        yield scope
    finally:
        server.shutdown()
        server.server_close()
