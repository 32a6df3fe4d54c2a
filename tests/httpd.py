"""A local HTTP server for download tests: serves bytes by path on 127.0.0.1, answers Range requests (206/416),
404s any other path (a dead mirror) and can drop a transfer part-way (a lost connection), logging every request."""
import http.server
import re
import socket
import threading
from typing import Dict, List, Optional, Tuple


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "Site"

    def log_message(self, *args):  # the request log below is what tests read; keep pytest's output clean
        pass

    def do_HEAD(self):
        self._respond(body=False)

    def do_GET(self):
        self._respond(body=True)

    def _respond(self, body: bool) -> None:
        site, rng = self.server, self.headers.get("Range")
        site.requests.append((self.command, self.path, rng))
        data = site.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, end, status = 0, len(data) - 1, 200
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            start, end, status = int(m[1]), int(m[2]) if m[2] else len(data) - 1, 206
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self.send_response(status)
        self.send_header("Content-Length", str(end + 1 - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if not body:
            return
        chunk = data[start : end + 1]
        cut = site.cut_after.pop(self.path, None)
        if cut is None:
            self.wfile.write(chunk)
            return
        # a dropped transfer: the headers promised len(chunk) bytes, the connection ends after `cut` of them
        self.wfile.write(chunk[:cut])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True


class Site(http.server.ThreadingHTTPServer):
    """files: path -> bytes; cut_after: path -> bytes sent before the first GET of that path is cut off."""

    daemon_threads = True

    def __init__(self, files: Dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), _Handler)  # port 0: a free port chosen by the OS
        self.files = dict(files)
        self.cut_after: Dict[str, int] = {}
        self.requests: List[Tuple[str, str, Optional[str]]] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def gets(self, path: str) -> List[Optional[str]]:
        """The Range header of each GET of path, in order (None: from byte 0)."""
        return [rng for method, p, rng in self.requests if method == "GET" and p == path]

    def handle_error(self, request, client_address):  # the cut connection raises in the handler: expected
        pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()
