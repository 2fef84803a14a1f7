"""The demo's front door (runtime/web_guard.py, installed by gradio_canny2image.launch), with raw
HTTP against the demo launched in-process on 127.0.0.1 (tiny model, CPU): DNS rebinding (foreign
Host), cross-origin uploads and calls, bounds per request, and 404s instead of 500s for unknown API
names, event ids and session ids.
"""
import io
import json
import os
import socket
import sys
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gradio_canny2image as app  # noqa: E402
from runtime import web_guard  # noqa: E402
from runtime.sample import sample_image  # noqa: E402
from test_gradio_app import DEFAULTS, FAST, ORDER, launch_tiny  # noqa: E402

EVIL = "evil.example"


@pytest.fixture(scope="module")
def url():
    demo, url = launch_tiny()
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def png():
    buffer = io.BytesIO()
    Image.fromarray(sample_image(128, 96)).save(buffer, format="PNG")
    return buffer.getvalue()


def _port(url):
    return urlsplit(url).port


def _one_line_refusal(response, status):
    assert response.status_code == status, (response.status_code, response.text)
    assert response.text.count("\n") == 1 and "Traceback" not in response.text
    assert "access-control-allow-origin" not in response.headers


def _call_body(uploaded):
    values = {**DEFAULTS, **FAST}
    return {"data": [{"path": uploaded, "meta": {"_type": "gradio.FileData"}}]
            + [values[k] for k in ORDER]}


def test_local_names_are_served(url):
    port = _port(url)
    for host in ("127.0.0.1", "localhost", "[::1]", "LOCALHOST", "localhost."):
        r = httpx.get(url + "config", headers={"Host": f"{host}:{port}"})
        assert r.status_code == 200, (host, r.text)


@pytest.mark.parametrize("host", [f"{EVIL}:7861", EVIL, "127.0.0.1.evil.example", "",
                                  "localhost:notaport", "0.0.0.0", "10.0.0.1"])
def test_rebinding_host_is_refused_before_any_route(url, png, host):
    """The issue's attack: Host and Origin of the rebound name; upload, call and the page."""
    headers = {"Host": host, "Origin": f"http://{host}"}
    _one_line_refusal(httpx.get(url, headers=headers), 403)
    _one_line_refusal(httpx.post(url + "gradio_api/upload", files={"files": ("a.png", png)},
                                 headers=headers), 403)
    _one_line_refusal(httpx.post(url + "gradio_api/call/process", headers=headers,
                                 json=_call_body("/tmp/x.png")), 403)
    # a CORS preflight is answered by the guard too, and echoes nothing
    _one_line_refusal(httpx.options(url + "gradio_api/upload", headers={
        **headers, "Access-Control-Request-Method": "POST"}), 403)


@pytest.mark.parametrize("origin", [f"http://{EVIL}", f"http://{EVIL}:7861", "null",
                                    "http://127.0.0.1.evil.example"])
def test_cross_origin_upload_and_call_are_refused(url, png, origin):
    _one_line_refusal(httpx.post(url + "gradio_api/upload", files={"files": ("a.png", png)},
                                 headers={"Origin": origin}), 403)
    _one_line_refusal(httpx.post(url + "gradio_api/call/process", json=_call_body("/tmp/x.png"),
                                 headers={"Origin": origin}), 403)


def test_same_origin_upload_and_call_work(url, png):
    origin = url.rstrip("/")
    r = httpx.post(url + "gradio_api/upload", files={"files": ("a.png", png)},
                   headers={"Origin": origin})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    from conftest import gradio_result
    call = httpx.post(url + "gradio_api/call/process", json=_call_body(r.json()[0]),
                      headers={"Origin": origin})
    assert call.status_code == 200
    event, data = gradio_result(url, call.json()["event_id"], timeout=120)
    assert event == "complete" and len(data[0]) == 2


def test_more_files_than_allowed_in_one_upload_is_413(url, png):
    ok = httpx.post(url + "gradio_api/upload",
                    files=[("files", (f"{i}.png", png)) for i in range(app.MAX_REQUEST_FILES)])
    assert ok.status_code == 200 and len(ok.json()) == app.MAX_REQUEST_FILES
    r = httpx.post(url + "gradio_api/upload",
                   files=[("files", (f"{i}.png", b"x")) for i in range(1000)])
    _one_line_refusal(r, 413)
    assert f"at most {app.MAX_REQUEST_FILES}" in r.text


def _raw(url, head, body=b""):
    """Send a raw HTTP/1.1 request head (and body); the status line and body of the answer."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(head.encode() + b"\r\n\r\n" + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status, _, rest = answer.partition(b"\r\n")
    return status.decode(), rest.partition(b"\r\n\r\n")[2].decode()


def test_declared_oversized_body_is_413_before_it_is_read(url):
    status, text = _raw(url, "POST /gradio_api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        "Content-Type: multipart/form-data; boundary=b\r\n"
                        f"Content-Length: {app.MAX_REQUEST_BYTES + 1}", b"--b\r\n")
    assert " 413 " in status and f"at most {app.MAX_REQUEST_BYTES}" in text


def test_chunked_multipart_without_length_is_411(url):
    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\nx'
        yield b"\r\n--b--\r\n"
    r = httpx.post(url + "gradio_api/upload", content=body(),
                   headers={"content-type": "multipart/form-data; boundary=b"})
    _one_line_refusal(r, 411)


def test_body_over_the_bound_while_streaming_is_413():
    """The counting path (a body longer than declared cannot reach it through HTTP/1.1, so the
    middleware is driven directly): past max_body the app sees the client leave, the client 413."""
    import asyncio

    seen = []

    async def inner(scope, receive, send):
        while (message := await receive())["type"] == "http.request":
            seen.append(len(message["body"]))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"stored"})

    guard = web_guard.WebGuard(inner, max_body=10, max_files=1)
    chunks = [{"type": "http.request", "body": b"x" * 6, "more_body": True}] * 3
    sent = []

    async def receive():
        return chunks.pop(0)

    async def send(message):
        sent.append(message)
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"host", b"localhost")]}
    asyncio.run(guard(scope, receive, send))
    assert seen == [6] and sent[0]["status"] == 413 and b"at most 10" in sent[1]["body"]


def test_file_counter_finds_parts_split_across_chunks():
    body = b"".join(b'--xyz\r\nContent-Disposition: form-data; name="f"; filename="%d"\r\n\r\n'
                    b"data--xyz\r\n" % i for i in range(5))
    body += b'--xyz\r\nContent-Disposition: form-data; name="field"\r\n\r\nv\r\n--xyz--\r\n'
    for size in (1, 3, 7, len(body)):
        counter = web_guard._FileCounter(b"xyz")
        for i in range(0, len(body), size):
            files = counter.feed(body[i:i + size])
        assert files == 5, size


@pytest.mark.parametrize("path", ["gradio_api/call/process/0123456789abcdef",
                                  "gradio_api/queue/data?session_hash=nosuchsession",
                                  "gradio_api/call/nosuchapi/0123456789abcdef"])
def test_unknown_ids_are_404_not_a_broken_stream(url, path, capfd):
    r = httpx.get(url + path)
    _one_line_refusal(r, 404)
    assert "Traceback" not in capfd.readouterr().err


def test_unknown_api_name_is_404(url, capfd):
    for route in ("call", "call/v2", "run", "api"):
        r = httpx.post(url + f"gradio_api/{route}/nosuchapi", json={"data": []})
        _one_line_refusal(r, 404)
        assert "/nosuchapi" in r.text
    assert "Traceback" not in capfd.readouterr().err


def test_wrong_number_of_values_is_one_line(url, png, capfd):
    from conftest import gradio_result
    uploaded = httpx.post(url + "gradio_api/upload", files={"files": ("a.png", png)}).json()[0]
    for data in ([None, "a"], _call_body(uploaded)["data"][:3], _call_body(uploaded)["data"] + [1]):
        call = httpx.post(url + "gradio_api/call/process", content=json.dumps({"data": data}),
                          headers={"content-type": "application/json"})
        event, result = gradio_result(url, call.json()["event_id"], timeout=60)
        assert event == "error"
        message = result["error"]
        assert message.startswith("This API takes 14 values (Image, Prompt,")
        assert message.endswith(f"got {len(data)}.") and "\n" not in message
        assert "object at 0x" not in message and uploaded not in message
    assert "Traceback" not in capfd.readouterr().err


def test_host_names():
    assert web_guard.host_name("Example.COM:7860") == "example.com"
    assert web_guard.host_name("[::1]:80") == "::1"
    assert web_guard.host_name("[::1]x") is None and web_guard.host_name("a:b") is None
    guard = web_guard.WebGuard(None, hosts=["my.lan", ".gradio.live"], any_ip=True)
    assert all(guard.allowed(h) for h in ("my.lan", "x.gradio.live", "10.1.2.3", "::1"))
    assert not any(guard.allowed(h) for h in ("gradio.live.evil", "evil.example", None))
    assert not web_guard.WebGuard(None).allowed("10.1.2.3")


def test_allowed_hosts_flag():
    assert app.parse_args(["--allowed-hosts", "a.lan, b.lan"]).allowed_hosts == "a.lan, b.lan"


def test_unknown_event_handler_and_component_numbers_are_404(url, capfd):
    body = {"data": [], "fn_index": 99, "session_hash": "abc", "event_data": None,
            "trigger_id": None}
    r = httpx.post(url + "gradio_api/queue/join", json=body)
    _one_line_refusal(r, 404)
    assert "event handler number 99" in r.text
    r = httpx.post(url + "gradio_api/component_server", json={
        "data": 1, "component_id": 999, "session_hash": "abc", "fn_name": "x"})
    _one_line_refusal(r, 404)
    assert "component number 999" in r.text
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("listen", [False, True])
def test_allowed_hosts_and_listen_end_to_end(listen):
    """launch(allowed_hosts=...) serves those names too; bound to all addresses, any IP address
    (which no DNS rebinding can fake) but still no other name."""
    from conftest import free_port

    class Stub:
        def process(self, input_image, *args, **kwargs):
            return [input_image]

    demo = app.create_demo(Stub())
    _, url, _ = app.launch(demo, server_name="0.0.0.0" if listen else "127.0.0.1",
                           server_port=free_port(), allowed_hosts=["demo.lan"],
                           prevent_thread_lock=True, quiet=True)
    port = _port(url)
    local = f"http://127.0.0.1:{port}/config"
    try:
        assert httpx.get(local, headers={"Host": f"demo.lan:{port}"}).status_code == 200
        assert httpx.get(local, headers={"Host": f"other.lan:{port}"}).status_code == 403
        ip = httpx.get(local, headers={"Host": f"192.168.1.20:{port}"}).status_code
        assert ip == (200 if listen else 403)
    finally:
        demo.close()
