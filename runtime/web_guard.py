"""The demo's front door: an ASGI middleware in front of everything Gradio serves.

* Host: only the names the demo was started for are served (127.0.0.1, localhost, [::1], the
  bind address, names given with --allowed-hosts; with --listen any IP address too, which no DNS
  rebinding can fake). Any other `Host` gets 403 before any route runs: a web page whose name was
  rebound to 127.0.0.1 cannot use the demo.
* Origin: a request that carries an `Origin` whose host is not allowed (another web site, or
  "null") gets 403, so no foreign page can upload or call, and Gradio's CORS never echoes it.
* Body: at most `max_body` bytes per request (413), at most `max_files` files per multipart
  request (413), and a multipart body must say its length (411).

Every refusal is one line of text/plain. `install(check, body_check, **guard_kwargs)` returns a
FastAPI lifespan that puts the guard outermost once the app has built its middleware (before the
first request is served); `check` and `body_check` are its last checks (the demo's 404s for
unknown routes and handlers).
"""
import ipaddress
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
ANY_ADDRESS = ("0.0.0.0", "::", "")


def host_name(value):
    """'Example.COM:7860' -> 'example.com', '[::1]:80' -> '::1'; None for a malformed value."""
    value = (value or "").strip().lower()
    if value.startswith("["):
        end = value.find("]")
        name, rest = value[1:end], value[end + 1:]
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    elif value.count(":") > 1:                  # a bare IPv6 address (a setting, not a header)
        name = value
    else:
        name, _, port = value.partition(":")
        if port and not port.isdigit():
            return None
    name = name.rstrip(".")
    return name or None


def _is_ip(name):
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class WebGuard:
    """ASGI middleware: see the module docstring."""

    BODY_CHECK_MAX = 1_000_000

    def __init__(self, app, hosts=(), any_ip=False, max_body=None, max_files=None, check=None,
                 body_check=None, body_paths=()):
        """`check(scope)`, if given, runs last: (status, message) to refuse the request, or
        None (e.g. the demo's 404 for ids and API names the app does not know).
        `body_check(scope, body)` does the same with the body of a POST to one of `body_paths`
        (bodies up to BODY_CHECK_MAX bytes; the app then reads the same body)."""
        self.app, self.check = app, check
        self.body_check, self.body_paths = body_check, set(body_paths)
        self.hosts = {h for h in (host_name(x) for x in (*LOCAL_HOSTS, *hosts)) if h}
        self.any_ip = any_ip
        self.max_body, self.max_files = max_body, max_files

    def allowed(self, name):
        """A host name given as ".example.org" allows its subdomains too."""
        if name is None:
            return False
        return (name in self.hosts or (self.any_ip and _is_ip(name))
                or any(h.startswith(".") and name.endswith(h) for h in self.hosts))

    def refusal(self, headers):
        """(status, message) for a request to refuse before it reaches Gradio, or None."""
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.allowed(host_name(host)):
            return 403, (f"Host {host!r} is not served here: open the demo as http://127.0.0.1 "
                         "(or start it with --allowed-hosts NAME)")
        origin = headers.get(b"origin")
        if origin is not None:
            origin = origin.decode("latin-1")
            try:
                name = host_name(urlsplit(origin).netloc)
            except ValueError:
                name = None
            if not self.allowed(name):
                return 403, f"Cross-origin requests from {origin!r} are refused"
        length = headers.get(b"content-length")
        if self.max_body is not None and length is not None:
            if not length.isdigit():
                return 400, "Malformed Content-Length"
            if int(length) > self.max_body:
                return 413, (f"Request too large: {int(length)} bytes (at most {self.max_body} "
                             f"per request)")
        if length is None and _boundary(headers) is not None:
            return 411, "A multipart upload must send its Content-Length"
        return None

    def refusal_for(self, scope, headers):
        refused = self.refusal(headers)
        if refused is None and self.check is not None and scope["type"] == "http":
            refused = self.check(scope)
        return refused

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {}
        for key, value in scope.get("headers", ()):
            headers.setdefault(key.lower(), value)
        refused = self.refusal_for(scope, headers)
        if refused is not None:
            if scope["type"] == "websocket":       # closing before accept: HTTP 403
                return await send({"type": "websocket.close", "code": 1008})
            return await _respond(send, *refused)
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        if (self.body_check is not None and scope["method"] == "POST"
                and scope["path"] in self.body_paths):
            receive, refused = await self._read_body(scope, receive)
            if refused is not None:
                return await _respond(send, *refused)
        await self._bounded(scope, receive, send, headers)

    async def _read_body(self, scope, receive):
        """(a receive that gives the app the same body, body_check's refusal or None)."""
        messages, body, more = [], b"", True
        while more and len(body) <= self.BODY_CHECK_MAX:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
        refused = None if more else self.body_check(scope, body)

        async def replay():
            return messages.pop(0) if messages else await receive()
        return replay, refused

    async def _bounded(self, scope, receive, send, headers):
        """Pass the request on, counting its body; past a bound, the app sees the client leave
        and the client gets 413 instead of whatever the app would have answered."""
        boundary = _boundary(headers)
        counter = _FileCounter(boundary) if boundary and self.max_files is not None else None
        state = {"size": 0, "over": None, "started": False}

        async def bounded_receive():
            if state["over"] is not None:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                state["size"] += len(chunk)
                if self.max_body is not None and state["size"] > self.max_body:
                    state["over"] = (f"Request too large: over {self.max_body} bytes (at most "
                                     f"{self.max_body} per request)")
                elif counter is not None and counter.feed(chunk) > self.max_files:
                    state["over"] = (f"Too many files in one upload: at most {self.max_files} "
                                     f"per request")
                if state["over"] is not None:
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if state["over"] is not None and not state["started"]:
                return                  # the 413 below replaces the app's answer
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except Exception:
            if state["over"] is None:
                raise
        if state["over"] is not None and not state["started"]:
            await _respond(send, 413, state["over"])


def _boundary(headers):
    content_type = headers.get(b"content-type", b"").decode("latin-1")
    if not content_type.lower().startswith("multipart/"):
        return None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value:
            return value.strip('"').encode("latin-1")
    return b""


class _FileCounter:
    """Counts the parts of a streamed multipart body that are files (a filename= header)."""
    HEADERS_MAX = 16384

    def __init__(self, boundary):
        self.delimiter = b"\r\n--" + boundary
        self.buffer = b"\r\n"         # the body's first delimiter has no CRLF before it
        self.files = 0

    def feed(self, chunk):
        buffer = self.buffer + chunk
        while True:
            start = buffer.find(self.delimiter)
            if start < 0:
                buffer = buffer[-(len(self.delimiter) - 1):]
                break
            after = start + len(self.delimiter)
            if buffer[after:after + 2] == b"--":          # the closing delimiter
                buffer = buffer[after + 2:]
                continue
            end = buffer.find(b"\r\n\r\n", after)
            if end < 0:
                if len(buffer) - start <= self.HEADERS_MAX:
                    buffer = buffer[start:]          # the part's headers are not all here yet
                    break
                self.files += 1                      # headers this long: count it, move on
                buffer = buffer[after:]
                continue
            if b"filename" in buffer[start:end].lower():
                self.files += 1
            buffer = buffer[end:]
        self.buffer = buffer
        return self.files


async def _respond(send, status, message):
    body = (message + "\n").encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def install(check=None, body_check=None, **guard_kwargs):
    """A FastAPI lifespan (for gr.Blocks.launch(app_kwargs={"lifespan": ...})) that puts a
    WebGuard(**guard_kwargs) in front of the app's whole middleware stack, with `check(app,
    scope)` and `body_check(app, scope, body)` as its last checks. The lifespan runs once the
    stack is built and before the server accepts its first request."""
    @asynccontextmanager
    async def lifespan(app):
        if not isinstance(app.middleware_stack, WebGuard):
            app.middleware_stack = WebGuard(
                app.middleware_stack, check=None if check is None else (
                    lambda scope: check(app, scope)), body_check=None if body_check is None else (
                    lambda scope, body: body_check(app, scope, body)), **guard_kwargs)
        yield
    return lifespan
