"""An HTTP proxy in front of the GCS emulator that counts the requests it forwards, by kind.

Requests are counted where they arrive, on the wire, whoever sends them (this process's gcsfs, a
CLI subprocess, Ray workers), retries included. The emulator returns a whole listing in one
response; real GCS returns at most 1,000 objects a page, so the proxy pages listings as GCS does
(``maxResults``, ``pageToken``), and listing requests count as on GCS.

Kinds: ``list`` (objects.list pages), ``read`` (media downloads), ``info`` (object metadata),
``write`` (uploads), ``delete``, ``other``.
"""
from __future__ import annotations

import collections
import http.client
import http.server
import json
import threading
import urllib.parse

GCS_PAGE = 1000   # objects.list returns at most this many entries a page


def kind(method: str, path: str) -> str:
    url = urllib.parse.urlsplit(path)
    if method == "DELETE":
        return "delete"
    if method in ("POST", "PUT") and url.path.startswith("/upload/"):
        return "write"
    if method == "GET" and url.path.startswith("/download/"):
        return "read"
    if method == "GET" and url.path.endswith("/o"):
        return "list"
    if method == "GET" and "/o/" in url.path:
        return "info"
    return "other"


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 256    # not socketserver's 5: see ray_cluster.emulator_command


class CountingProxy:
    """Forwards http://127.0.0.1:<port> to ``upstream`` (an emulator's http://host:port)."""

    def __init__(self, upstream: str):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        # the emulator serves one request at a time: the proxy holds at most 2 connections to it
        # and queues the rest (clients still send concurrently)
        self._upstream_slots = threading.Semaphore(2)
        self._listings: dict = {}      # listing path -> its full response, while it is paged through
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True    # small headers then body: no 40 ms delayed-ACK stalls

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                k = kind(self.command, self.path)
                with proxy._lock:
                    proxy.counts[k] += 1
                status, headers, data = proxy._upstream(self.command, self.path, self.headers, body, k)
                self.send_response(status)
                for h, v in headers:
                    if h.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(h, v)
                self.send_header("Content-Length", str(len(data)))
                self._headers_buffer.append(b"\r\n")   # end_headers, sent together with the body
                self.wfile.write(b"".join(self._headers_buffer) + data)
                self._headers_buffer = []

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, address: None   # clients dropping kept-alive connections
        self.host = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _upstream(self, method, path, headers, body, k):
        url = urllib.parse.urlsplit(path)
        query = urllib.parse.parse_qs(url.query)
        page = None
        if k == "list":   # fetch the whole listing once (first page), hand out GCS-sized pages of it
            size = min(int(query.pop("maxResults", [GCS_PAGE])[0]), GCS_PAGE)
            start = int(query.pop("pageToken", ["0"])[0])
            page = (start, size)
            path = url.path + "?" + urllib.parse.urlencode(query, doseq=True)
            with self._lock:
                held = self._listings.get(path) if start else None
            if held is not None:
                return self._page(200, held[0], held[1], page)
        fwd = {h: v for h, v in headers.items() if h.lower() not in ("host", "connection", "content-length")}
        with self._upstream_slots:
            conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
            try:
                conn.request(method, path, body=body or None, headers=fwd)
                resp = conn.getresponse()
                status, hdrs, data = resp.status, resp.getheaders(), resp.read()
            except OSError as e:   # the emulator is down: as a load balancer would say
                return 503, [("Content-Type", "application/json")], json.dumps({"error": {"code": 503, "message": str(e)}}).encode()
            finally:
                conn.close()
        if page is not None and status == 200:
            doc = json.loads(data)
            entries = [("p", p) for p in sorted(doc.get("prefixes") or [])]
            entries += [("i", o) for o in sorted(doc.get("items") or [], key=lambda o: o["name"])]
            with self._lock:
                self._listings[path] = (hdrs, entries)
            return self._page(status, hdrs, entries, page)
        return status, hdrs, data

    def _page(self, status, hdrs, entries, page):
        """One GCS page of a listing's ``entries`` (sorted prefixes, then sorted objects)."""
        start, size = page
        chunk = entries[start:start + size]
        out = {"kind": "storage#objects", "items": [o for t, o in chunk if t == "i"],
               "prefixes": [p for t, p in chunk if t == "p"]}
        if start + size < len(entries):
            out["nextPageToken"] = str(start + size)
        return status, hdrs, json.dumps(out).encode()

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.counts)

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# The emulator rewrites its whole metadata file (every object's JSON, indented) after each upload,
# even in memory, so writing N objects costs O(N^2): 10,000 markers would take many minutes. In
# memory that file is never read again, so this emulator process skips it; uploads, listings and
# downloads are the emulator's own.
_FAST = "import gcp_storage_emulator.storage as s; s.Storage._write_config_to_file = lambda self: None; "


class FastEmulator:
    """``gcp-storage-emulator`` in memory on 127.0.0.1 with one bucket, without the per-upload
    metadata rewrite (see above), behind a :class:`CountingProxy` (``host`` is the proxy's)."""

    def __init__(self, bucket: str = "geomjobs-scale"):
        import subprocess

        from ray_cluster import emulator_command, free_port, wait_port

        self.bucket = bucket
        self.port = free_port()
        self.proc = subprocess.Popen(emulator_command("start", "--host=127.0.0.1", f"--port={self.port}", "--in-memory",
                                                      f"--default-bucket={bucket}", "--quiet", patch=_FAST),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port, 30)
        self.proxy = CountingProxy(f"http://127.0.0.1:{self.port}")
        self.host = self.proxy.host

    def stop(self) -> None:
        from ray_cluster import _kill_tree

        self.proxy.stop()
        if self.proc is not None:
            _kill_tree(self.proc)
            self.proc = None
