"""End-to-end tests of the relay through the official Python clients.

Drives `openai` and `ollama` (the real SDKs, unpatched) through relayd and
agentd to the stand-in Ollama, and checks what each client shows for every
error a web client can meet, plus the success paths for contrast.

Processes (started once for the module, killed at the end, also on failure):
  stand-in-ollama   the local model server of alice
  relayd            users alice, bob (both with client tokens) and carol (public)
                    (agent token only, public = true)
  agentd (alice)    upstream = the stand-in
  agentd (bob)      upstream = a port that is bound but never listens, so
                    every connection to it is refused
  carol has no agent running.
  erin              public, with two devices (credentials issued with
                    `relayd token issue --device`): gpu-box, whose stand-in has
                    llama3.3:70b, and laptop, whose stand-in has qwen2.5:7b

Binaries come from $TUNNEL_BIN_DIR, default ${CARGO_TARGET_DIR:-target}/release
relative to the repository root. Set CLIENT_TESTS_KEEP=1 to keep the temp dir
with the configs and the processes' logs.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request
from pathlib import Path

import httpx  # the ollama client's HTTP library
import httpx2  # the openai client's HTTP library (openai >= 3 imports httpx2)
import ollama
import openai

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 20.0
CLIENT_TIMEOUT_S = 20.0

ALICE_AGENT = "agent-token-alice-0123456789"
ALICE_CLIENT = "client-token-alice-0123456789"
BOB_AGENT = "agent-token-bob-0123456789"
BOB_CLIENT = "client-token-bob-0123456789"
CAROL_AGENT = "agent-token-carol-0123456789"
WRONG_TOKEN = "wrong-token-0123456789abcdef"
# erin's devices and the one model each has.
ERIN_DEVICES = {"gpu-box": "llama3.3:70b", "laptop": "qwen2.5:7b"}

MID_RESPONSE = "the local service failed mid-response"
# What the stand-in streams, token by token (tests/src/ollama.rs WORDS).
FIRST_TOKENS = ["The", " tunnel", " streams"]


def bin_dir() -> Path:
    d = os.environ.get("TUNNEL_BIN_DIR")
    if not d:
        d = os.path.join(os.environ.get("CARGO_TARGET_DIR") or "target", "release")
    p = Path(d)
    return p if p.is_absolute() else REPO / p


def free_port() -> int:
    """A port the OS picked; closed again, for a child to bind (racy, accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(case: str, text: str) -> None:
    """One line per case, so a CI log lists what each client showed."""
    sys.stderr.write(f"\n    CASE {case}: {text}\n")
    sys.stderr.flush()


class Fixture:
    """The processes and addresses shared by every test."""

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="relay-clients-"))
        self.procs = []  # (name, Popen, log path)
        self.closed_sock = None
        self.relay = None  # "http://127.0.0.1:PORT"

    # -- processes -------------------------------------------------------

    def start(self, name, args):
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            p = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
                start_new_session=True,
            )
        self.procs.append((name, p, log))
        return p

    def log_tail(self, name, lines=25):
        for n, _, log in self.procs:
            if n == name:
                try:
                    text = log.read_text(errors="replace").splitlines()
                except OSError:
                    return ""
                return "\n".join(text[-lines:])
        return ""

    def all_logs(self):
        return "\n".join(
            f"--- {n} (exit {p.poll()}) ---\n{self.log_tail(n)}" for n, p, _ in self.procs
        )

    def check_alive(self):
        dead = [(n, p.poll()) for n, p, _ in self.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"processes exited early: {dead}\n{self.all_logs()}")

    def stop(self):
        for _, p, _ in reversed(self.procs):
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5.0
        for _, p, _ in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5.0)
        if self.closed_sock is not None:
            self.closed_sock.close()
        if os.environ.get("CLIENT_TESTS_KEEP"):
            sys.stderr.write(f"\nkept configs and logs in {self.tmp}\n")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- readiness -------------------------------------------------------

    def poll_until(self, what, probe):
        """Calls probe() until it returns true, at most READY_TIMEOUT_S."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if probe():
                    return
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = e
            time.sleep(0.05)  # poll interval, not a readiness wait
        raise RuntimeError(
            f"{what} not ready after {READY_TIMEOUT_S}s (last error: {last!r})\n{self.all_logs()}"
        )

    @staticmethod
    def get(url, token=None):
        req = urllib.request.Request(url)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=2.0) as r:
            return r.status, r.read()

    def erin_reported(self):
        status, body = self.get(f"{self.relay}/api/tunnel/erin/health")
        devices = json.loads(body).get("devices", []) if status == 200 else []
        return len(devices) == 2 and all((d.get("service") or {}).get("models_available") for d in devices)

    def connected(self, user, token):
        status, body = self.get(f"{self.relay}/api/tunnel/{user}/health", token)
        return status == 200 and json.loads(body).get("connected") is True

    # -- setup -------------------------------------------------------------

    def setup(self):
        bins = bin_dir()
        exe = {n: bins / n for n in ("relayd", "agentd", "stand-in-ollama")}
        missing = [str(p) for p in exe.values() if not os.access(p, os.X_OK)]
        if missing:
            raise RuntimeError(f"missing binaries {missing}; build first: cargo build --release --bins")

        standin_port = free_port()
        relay_port = free_port()
        # Bound but never listening: connections to it are refused for as long
        # as the socket stays open, so no other process can take the port.
        self.closed_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.closed_sock.bind(("127.0.0.1", 0))
        closed_port = self.closed_sock.getsockname()[1]
        self.closed_port = closed_port
        self.relay = f"http://127.0.0.1:{relay_port}"

        (self.tmp / "relayd.toml").write_text(
            f'listen = "127.0.0.1:{relay_port}"\n'
            f'state_dir = "{self.tmp / "relay-state"}"\n'
            "\n[[users]]\n"
            'id = "alice"\n'
            f'agent_token = "{ALICE_AGENT}"\n'
            f'client_token = "{ALICE_CLIENT}"\n'
            "\n[[users]]\n"
            'id = "bob"\n'
            f'agent_token = "{BOB_AGENT}"\n'
            f'client_token = "{BOB_CLIENT}"\n'
            "\n[[users]]\n"
            'id = "carol"\n'
            f'agent_token = "{CAROL_AGENT}"\n'
            "public = true\n"
            "\n[identity]\n"
            'public_users = ["erin"]\n'
            "\n[control]\n"
            'socket = "off"\n'
        )
        for user, token, upstream in (
            ("alice", ALICE_AGENT, standin_port),
            ("bob", BOB_AGENT, closed_port),
        ):
            (self.tmp / f"agentd-{user}.toml").write_text(
                f'relay = "ws://127.0.0.1:{relay_port}"\n'
                f'token = "{token}"\n'
                f'upstream = "http://127.0.0.1:{upstream}"\n'
                "\n[control]\n"
                'socket = "off"\n'
            )

        # erin's two devices: a credential each, issued before relayd
        # holds the store, and a stand-in each with its own model.
        for device, model in ERIN_DEVICES.items():
            issued = subprocess.run(
                [exe["relayd"], "--config", self.tmp / "relayd.toml", "token", "issue",
                 "--user", "erin", "--role", "agent", "--device", device],
                capture_output=True, text=True, timeout=30, check=True,
            )
            port = free_port()
            (self.tmp / f"agentd-erin-{device}.toml").write_text(
                f'relay = "ws://127.0.0.1:{relay_port}"\n'
                f'token = "{issued.stdout.strip()}"\n'
                f'upstream = "http://127.0.0.1:{port}"\n'
                f'state_dir = "{self.tmp / ("agentd-state-" + device)}"\n'
                "\n[control]\n"
                'socket = "off"\n'
            )
            self.start(
                f"stand-in-{device}",
                [exe["stand-in-ollama"], "--listen", f"127.0.0.1:{port}", "--token-delay-ms", "5",
                 "--model", model, "--only-its-model"],
            )
        self.start(
            "stand-in-ollama",
            [exe["stand-in-ollama"], "--listen", f"127.0.0.1:{standin_port}", "--token-delay-ms", "5"],
        )
        self.start("relayd", [exe["relayd"], "--config", self.tmp / "relayd.toml"])
        self.poll_until(
            "stand-in-ollama",
            lambda: self.get(f"http://127.0.0.1:{standin_port}/api/version")[0] == 200,
        )
        self.poll_until("relayd", lambda: self.get(f"{self.relay}/healthz")[0] == 200)
        self.start("agentd-alice", [exe["agentd"], "--config", self.tmp / "agentd-alice.toml"])
        self.start("agentd-bob", [exe["agentd"], "--config", self.tmp / "agentd-bob.toml"])
        self.poll_until("alice's agent", lambda: self.connected("alice", ALICE_CLIENT))
        self.poll_until("bob's agent", lambda: self.connected("bob", BOB_CLIENT))
        for device in ERIN_DEVICES:
            self.start(f"agentd-erin-{device}", [exe["agentd"], "--config", self.tmp / f"agentd-erin-{device}.toml"])
        self.poll_until("erin's two devices, with their models reported", self.erin_reported)
        # Precondition of the 503 case: carol really has no agent.
        status, body = self.get(f"{self.relay}/api/tunnel/carol/health")
        if status != 200 or json.loads(body).get("connected") is not False:
            raise RuntimeError(f"carol's health: {status} {body!r}")


FX = None


def setUpModule():
    global FX
    for var in ("OLLAMA_API_KEY", "OLLAMA_HOST", "OPENAI_API_KEY", "OPENAI_ADMIN_KEY", "OPENAI_BASE_URL"):
        os.environ.pop(var, None)
    FX = Fixture()
    # Registered before anything starts: module cleanups run even when
    # setUpModule fails (tearDownModule would not).
    unittest.addModuleCleanup(FX.stop)
    started = time.monotonic()
    FX.setup()
    sys.stderr.write(
        f"\nrelay {FX.relay} ready in {time.monotonic() - started:.2f}s; "
        f"openai {openai.__version__} (httpx2 {httpx2.__version__}), "
        f"ollama {ollama_version()} (httpx {httpx.__version__}); binaries {bin_dir()}\n"
    )


def ollama_version():
    try:
        from importlib.metadata import version

        return version("ollama")
    except Exception:  # pragma: no cover
        return "?"


class Exchanges:
    """Requests and responses an HTTP client made, seen by its event hooks."""

    def __init__(self):
        self.requests = []
        self.responses = []

    def on_request(self, request):
        self.requests.append(request)

    def on_response(self, response):
        self.responses.append(response)

    def hooks(self):
        return {"request": [self.on_request], "response": [self.on_response]}

    def statuses(self):
        return [r.status_code for r in self.responses]


class ClientTests(unittest.TestCase):
    maxDiff = None

    def setUp(self):
        FX.check_alive()
        self.seen = Exchanges()

    # -- clients -----------------------------------------------------------

    def openai_client(self, user, token):
        """The openai SDK as an app would build it: default retries, bearer
        api_key; the http_client only adds the event hooks that count."""
        http_client = openai.DefaultHttpxClient(event_hooks=self.seen.hooks(), trust_env=False)
        self.addCleanup(http_client.close)
        return openai.OpenAI(
            base_url=f"{FX.relay}/api/tunnel/{user}/v1",
            api_key=token,
            http_client=http_client,
            timeout=CLIENT_TIMEOUT_S,
        )

    def ollama_client(self, user, token):
        headers = {"Authorization": f"Bearer {token}"} if token else None
        client = ollama.Client(
            host=f"{FX.relay}/api/tunnel/{user}",
            headers=headers,
            timeout=CLIENT_TIMEOUT_S,
            event_hooks=self.seen.hooks(),
            trust_env=False,
        )
        self.addCleanup(client._client.close)
        return client

    # -- assertions ----------------------------------------------------------

    def assert_openai_error(self, e, cls, status, code, etype, *, contains=(), excludes=()):
        """Class, status and the OpenAI error object {"message","type","code"}."""
        self.assertIs(type(e), cls, f"{type(e).__name__}: {e}")
        self.assertEqual(e.status_code, status)
        self.assertIsInstance(e.body, dict, e.body)
        self.assertEqual(set(e.body), {"message", "type", "code"}, e.body)
        self.assertEqual(e.body["code"], code)
        self.assertEqual(e.body["type"], etype)
        self.assertEqual(e.code, code)
        self.assertEqual(e.type, etype)
        msg = e.body["message"]
        self.assertEqual(e.message, f"Error code: {status} - {msg}")
        for s in contains:
            self.assertIn(s, msg)
        for s in excludes:
            self.assertNotIn(s, msg)
        return msg

    def assert_ollama_error(self, e, status, *, contains=(), excludes=()):
        """Status and Ollama's {"error": "..."}: a JSON object with a string
        error (an OpenAI-shaped body would leave a dict in e.error)."""
        self.assertIs(type(e), ollama.ResponseError)
        self.assertEqual(e.status_code, status)
        self.assertIsInstance(e.error, str, e.error)
        for s in contains:
            self.assertIn(s, e.error)
        for s in excludes:
            self.assertNotIn(s, e.error)
        self.assertEqual(self.seen.statuses(), [status])
        self.assertEqual(
            self.seen.responses[0].headers.get("content-type"), "application/json"
        )

    def openai_chat(self, client, **kw):
        return client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8, **kw
        )

    def ollama_chat(self, client, **kw):
        return client.chat(model="m", messages=[{"role": "user", "content": "hi"}], **kw)

    # -- 2. agent not connected ----------------------------------------------

    def test_agent_not_connected_openai_503_without_retry(self):
        client = self.openai_client("carol", "any-bearer-for-an-open-tunnel")
        with self.assertRaises(openai.InternalServerError) as cm:
            self.openai_chat(client)
        e = cm.exception
        msg = self.assert_openai_error(
            e, openai.InternalServerError, 503, "agent_not_connected", "server_error",
            contains=("is not connected", '"carol"'),
        )
        self.assertEqual(len(self.seen.requests), 1, "the SDK must not retry")
        self.assertEqual(self.seen.statuses(), [503])
        self.assertEqual(e.response.headers.get("retry-after"), "5")
        self.assertEqual(e.response.headers.get("x-should-retry"), "false")
        report(
            "agent not connected / openai",
            f"{type(e).__name__} status={e.status_code} code={e.code} message={e.message!r} "
            f"requests={len(self.seen.requests)} retry-after={e.response.headers['retry-after']} "
            f"x-should-retry={e.response.headers['x-should-retry']}",
        )
        self.assertIn("is not connected", msg)

    def test_agent_not_connected_ollama_503(self):
        client = self.ollama_client("carol", None)
        with self.assertRaises(ollama.ResponseError) as cm:
            self.ollama_chat(client, stream=True).__next__()
        e = cm.exception
        self.assert_ollama_error(e, 503, contains=("is not connected", '"carol"'))
        self.assertEqual(self.seen.responses[0].headers.get("retry-after"), "5")
        report("agent not connected / ollama", f"ResponseError status={e.status_code} error={e.error!r}")

    # -- 3. missing / wrong client token ---------------------------------------

    def test_missing_token_openai_401(self):
        # The SDK refuses to build a request without credentials; an app that
        # sends none omits the header explicitly (the api_key is then unused).
        client = self.openai_client("alice", "unused-api-key")
        with self.assertRaises(openai.AuthenticationError) as cm:
            self.openai_chat(client, extra_headers={"Authorization": openai.Omit()})
        e = cm.exception
        self.assertNotIn("authorization", self.seen.requests[0].headers)
        self.assert_openai_error(
            e, openai.AuthenticationError, 401, "missing_token", "authentication_error",
            contains=("Authorization: Bearer",), excludes=("not valid",),
        )
        self.assertEqual(self.seen.statuses(), [401])
        self.assertEqual(e.response.headers.get("www-authenticate"), 'Bearer realm="relayd"')
        report("missing token / openai", f"{type(e).__name__} status={e.status_code} code={e.code} message={e.message!r}")

    def test_invalid_token_openai_401(self):
        client = self.openai_client("alice", WRONG_TOKEN)
        with self.assertRaises(openai.AuthenticationError) as cm:
            self.openai_chat(client)
        e = cm.exception
        self.assertEqual(self.seen.requests[0].headers.get("authorization"), f"Bearer {WRONG_TOKEN}")
        self.assert_openai_error(
            e, openai.AuthenticationError, 401, "invalid_token", "authentication_error",
            contains=("not valid",), excludes=("Authorization: Bearer",),
        )
        self.assertEqual(self.seen.statuses(), [401])
        self.assertEqual(
            e.response.headers.get("www-authenticate"), 'Bearer realm="relayd", error="invalid_token"'
        )
        report("invalid token / openai", f"{type(e).__name__} status={e.status_code} code={e.code} message={e.message!r}")

    def test_missing_token_ollama_401(self):
        client = self.ollama_client("alice", None)
        with self.assertRaises(ollama.ResponseError) as cm:
            self.ollama_chat(client, stream=False)
        e = cm.exception
        self.assertNotIn("authorization", self.seen.requests[0].headers)
        self.assert_ollama_error(e, 401, contains=("Authorization: Bearer",), excludes=("not valid",))
        report("missing token / ollama", f"ResponseError status={e.status_code} error={e.error!r}")

    def test_invalid_token_ollama_401(self):
        client = self.ollama_client("alice", WRONG_TOKEN)
        with self.assertRaises(ollama.ResponseError) as cm:
            self.ollama_chat(client, stream=False)
        e = cm.exception
        self.assert_ollama_error(e, 401, contains=("not valid",), excludes=("Authorization: Bearer",))
        report("invalid token / ollama", f"ResponseError status={e.status_code} error={e.error!r}")

    # -- 4. local service down -------------------------------------------------

    def leaks(self):
        return ("127.0.0.1", str(FX.closed_port), "tcp connect error", "Connection refused")

    def test_local_service_down_openai_502(self):
        client = self.openai_client("bob", BOB_CLIENT)
        with self.assertRaises(openai.InternalServerError) as cm:
            self.openai_chat(client)
        e = cm.exception
        self.assert_openai_error(
            e, openai.InternalServerError, 502, "upstream_failed", "server_error",
            contains=("unreachable",), excludes=self.leaks(),
        )
        # 502 carries no x-should-retry, so the SDK retries it (max_retries=2).
        self.assertTrue(self.seen.statuses() and set(self.seen.statuses()) == {502}, self.seen.statuses())
        report(
            "local service down / openai",
            f"{type(e).__name__} status={e.status_code} code={e.code} message={e.message!r} "
            f"requests={len(self.seen.requests)} x-should-retry={e.response.headers.get('x-should-retry')}",
        )

    def test_local_service_down_ollama_502(self):
        client = self.ollama_client("bob", BOB_CLIENT)
        with self.assertRaises(ollama.ResponseError) as cm:
            self.ollama_chat(client, stream=True).__next__()
        e = cm.exception
        self.assert_ollama_error(e, 502, contains=("unreachable",), excludes=self.leaks())
        report("local service down / ollama", f"ResponseError status={e.status_code} error={e.error!r}")

    # -- 5. another user's tunnel ---------------------------------------------------

    def test_another_users_tunnel_openai_403(self):
        client = self.openai_client("dave", ALICE_CLIENT)
        with self.assertRaises(openai.PermissionDeniedError) as cm:
            self.openai_chat(client)
        e = cm.exception
        self.assert_openai_error(
            e, openai.PermissionDeniedError, 403, "wrong_user", "permission_error",
            contains=("another user's tunnel",),
        )
        self.assertEqual(self.seen.statuses(), [403])
        report("another user's tunnel / openai", f"{type(e).__name__} status={e.status_code} code={e.code} message={e.message!r}")

    def test_another_users_tunnel_ollama_403(self):
        client = self.ollama_client("dave", ALICE_CLIENT)
        with self.assertRaises(ollama.ResponseError) as cm:
            self.ollama_chat(client, stream=False)
        e = cm.exception
        self.assert_ollama_error(e, 403, contains=("another user's tunnel",))
        report("another user's tunnel / ollama", f"ResponseError status={e.status_code} error={e.error!r}")

    # -- 6. mid-stream failure -----------------------------------------------------

    def test_mid_stream_failure_openai(self):
        client = self.openai_client("alice", ALICE_CLIENT)
        stream = self.openai_chat(client, stream=True, extra_body={"fail_after": 3})
        got = []
        with self.assertRaises(openai.APIError) as cm:
            for chunk in stream:
                got.append(chunk.choices[0].delta.content)
        e = cm.exception
        self.assertIs(type(e), openai.APIError, f"{type(e).__name__}: {e}")
        self.assertEqual(got, FIRST_TOKENS)
        self.assertEqual(e.message, MID_RESPONSE)
        self.assertEqual(e.body, {"message": MID_RESPONSE, "type": "server_error", "code": "upstream_failed"})
        self.assertEqual(self.seen.statuses(), [200])
        self.assertEqual(len(self.seen.requests), 1)
        report(
            "mid-stream failure / openai",
            f"{len(got)} chunks {got!r}, then {type(e).__name__} message={e.message!r} code={e.code}",
        )

    def test_mid_stream_failure_ollama(self):
        client = self.ollama_client("alice", ALICE_CLIENT)
        got = []
        with self.assertRaises(ollama.ResponseError) as cm:
            for part in self.ollama_chat(
                client, stream=True, options={"num_predict": 8, "fail_after": 3}
            ):
                got.append(part)
        e = cm.exception
        self.assertEqual([p.message.content for p in got], FIRST_TOKENS)
        self.assertFalse(any(p.done for p in got))
        self.assertEqual(e.error, MID_RESPONSE)
        self.assertEqual(e.status_code, -1)  # raised from the stream, after a 200 head
        self.assertEqual(self.seen.statuses(), [200])
        report(
            "mid-stream failure / ollama",
            f"{len(got)} chunks {[p.message.content for p in got]!r}, then ResponseError error={e.error!r}",
        )

    # -- 7. success paths --------------------------------------------------------

    def test_success_stream_openai(self):
        client = self.openai_client("alice", ALICE_CLIENT)
        chunks = list(self.openai_chat(client, stream=True))
        text = [c.choices[0].delta.content for c in chunks]
        # 8 tokens, then the chunk that carries the finish reason.
        self.assertEqual(len(chunks), 9)
        self.assertEqual(text[:3], FIRST_TOKENS)
        self.assertTrue(all(text[:-1]), text)
        self.assertEqual([c.choices[0].finish_reason for c in chunks[-2:]], [None, "stop"])
        self.assertEqual(self.seen.statuses(), [200])
        report("stream success / openai", f"{len(chunks)} chunks, finish_reason=stop: {''.join(text)!r}")

    def test_success_nonstream_openai(self):
        client = self.openai_client("alice", ALICE_CLIENT)
        r = self.openai_chat(client)
        self.assertEqual(r.choices[0].finish_reason, "stop")
        self.assertTrue(r.choices[0].message.content.startswith("".join(FIRST_TOKENS)))
        self.assertEqual(self.seen.statuses(), [200])
        report("non-stream success / openai", f"finish_reason={r.choices[0].finish_reason} content={r.choices[0].message.content!r}")

    def test_success_stream_ollama(self):
        client = self.ollama_client("alice", ALICE_CLIENT)
        parts = list(self.ollama_chat(client, stream=True, options={"num_predict": 8}))
        self.assertEqual(len(parts), 9)
        self.assertFalse(any(p.done for p in parts[:-1]))
        self.assertEqual([p.message.content for p in parts[:3]], FIRST_TOKENS)
        self.assertTrue(all(p.message.content for p in parts[:-1]))
        last = parts[-1]
        self.assertTrue(last.done)
        self.assertEqual(last.done_reason, "stop")
        self.assertEqual(last.eval_count, 8)
        self.assertEqual(self.seen.statuses(), [200])
        text = "".join(p.message.content for p in parts)
        report("stream success / ollama", f"{len(parts) - 1} tokens + done=True done_reason={last.done_reason}: {text!r}")

    def test_success_nonstream_ollama(self):
        client = self.ollama_client("alice", ALICE_CLIENT)
        r = self.ollama_chat(client, stream=False, options={"num_predict": 8})
        self.assertTrue(r.done)
        self.assertEqual(r.eval_count, 8)
        self.assertTrue(r.message.content.startswith("".join(FIRST_TOKENS)))
        self.assertEqual(self.seen.statuses(), [200])
        report("non-stream success / ollama", f"done={r.done} content={r.message.content!r}")

    # -- several devices: one address, the union of their models ------------

    def test_two_devices_ollama_lists_the_union_and_chats_with_each(self):
        client = self.ollama_client("erin", None)
        names = sorted(m.model for m in client.list().models)
        self.assertEqual(names, sorted(ERIN_DEVICES.values()))
        for model in ERIN_DEVICES.values():
            r = client.chat(model=model, messages=[{"role": "user", "content": "hi"}], stream=False, options={"num_predict": 4})
            self.assertTrue(r.done)
            self.assertEqual(r.model, model)
        with self.assertRaises(ollama.ResponseError) as e:
            client.chat(model="mistral", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(e.exception.status_code, 404)
        self.assertIn('"mistral"', e.exception.error)
        report("two devices / ollama", f"list={names}; chat with each answered; mistral -> 404 {e.exception.error!r}")

    def test_two_devices_openai_lists_the_union_and_chats_with_each(self):
        client = self.openai_client("erin", "unused")
        ids = sorted(m.id for m in client.models.list())
        self.assertEqual(ids, sorted(ERIN_DEVICES.values()))
        for model in ERIN_DEVICES.values():
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            self.assertEqual(r.model, model)
            self.assertEqual(r.choices[0].finish_reason, "stop")
        with self.assertRaises(openai.NotFoundError) as e:
            client.chat.completions.create(model="mistral", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(e.exception.status_code, 404)
        self.assertEqual(e.exception.code, "model_not_found")
        report("two devices / openai", f"models={ids}; chat with each answered; mistral -> 404 {e.exception.code}")

    def test_two_devices_javascript_clients(self):
        """The ollama and openai JavaScript clients (tests/clients/js, installed
        by run.sh) list erin's union and chat with each device's model."""
        js = REPO / "tests" / "clients" / "js"
        env = dict(os.environ, RELAY=FX.relay, TUNNEL_USER="erin", MODELS=",".join(ERIN_DEVICES.values()))
        for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
            env.pop(proxy, None)
        run = subprocess.run(
            ["node", "two_devices.mjs"], cwd=js, env=env, capture_output=True, text=True, timeout=120
        )
        self.assertEqual(run.returncode, 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}")
        lines = run.stdout.strip().splitlines()
        self.assertEqual(len(lines), 2, run.stdout)
        report("two devices / ollama and openai JavaScript", "; ".join(lines))

    # 8. CONNECT and TRACE cannot be sent by these clients: not tested here
    # (tests/tests/edge.rs covers them with raw HTTP).


def main() -> int:
    """`python -m tests.clients.test_clients`: the unittest run, then one
    plain closing line `clients: N passed, N failed` that any CI reads."""
    prog = unittest.main(module=__name__, verbosity=2, exit=False)
    r = prog.result
    failed = len(r.failures) + len(r.errors) + len(r.unexpectedSuccesses)
    # A failed setUpModule counts in errors but not in testsRun.
    passed = max(0, r.testsRun - failed - len(r.skipped))
    if r.testsRun == 0:
        failed = max(failed, 1)  # nothing ran: not a pass
    sys.stdout.flush()
    sys.stderr.flush()
    print(f"clients: {passed} passed, {failed} failed" + (f", {len(r.skipped)} skipped" if r.skipped else ""))
    return 0 if failed == 0 and r.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
