"""A stub LLM API for the compose stack and the tests.

It answers in the OpenAI shape (and the Anthropic one on /v1/messages) with made-up text
and token counts, and then does what a real upstream behind the sidecar should do:
report the call's usage to the sidecar (POST /settle), naming the key by the x-key-id
and the call's reservation by the x-reservation-id the proxy set from the sidecar's
answer. A report that fails for a transient reason (5xx, no answer) is retried as it
is: the sidecar settles a reservation once, however many times it is reported.

Environment:
  STUB_LISTEN                host:port to listen on (default 0.0.0.0:9000)
  SIDECAR_SETTLE_URL         e.g. http://sidecar:8080/settle; unset: no reports
  SIDECAR_SETTLEMENT_TOKEN   the sidecar's settlement_token
Needs only aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from aiohttp import ClientError, ClientSession, ClientTimeout, web

REPORT_TRIES = 3
REPORT_TIMEOUT = ClientTimeout(total=2)


def usage_of(body: dict, raw: bytes) -> tuple[int, int]:
    """(prompt, completion) tokens: about 4 bytes a token in, up to 16 tokens out."""
    prompt = max(1, len(raw) // 4)
    wanted = body.get("max_tokens") or body.get("max_completion_tokens") or 16
    completion = min(int(wanted), 16) if isinstance(wanted, int) else 16
    return prompt, completion


def answer(path: str, model: str, prompt: int, completion: int) -> dict:
    if path.startswith("/v1/messages"):
        return {"id": "msg_stub", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "stub reply"}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": prompt, "output_tokens": completion}}
    return {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "stub reply"}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}}


class Stub:
    def __init__(self, settle_url: str | None, token: str | None):
        self.settle_url = settle_url
        self.token = token
        self.session: ClientSession | None = None
        self.reports: set[asyncio.Task] = set()

    async def start(self, _app: web.Application) -> None:
        self.session = ClientSession(timeout=REPORT_TIMEOUT)

    async def stop(self, _app: web.Application) -> None:
        if self.reports:  # let reports in flight finish (each is bounded)
            await asyncio.wait(self.reports, timeout=REPORT_TRIES * 3)
        if self.session:
            await self.session.close()

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "gpt-stub", "object": "model", "owned_by": "stub"}]})

    async def call(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return web.json_response({"error": {"message": "body is not JSON",
                                                "type": "invalid_request_error"}}, status=400)
        body = body if isinstance(body, dict) else {}
        model = body.get("model") if isinstance(body.get("model"), str) else "gpt-stub"
        prompt, completion = usage_of(body, raw)
        key_id = request.headers.get("x-key-id")
        reservation_id = request.headers.get("x-reservation-id")
        if self.settle_url and key_id and reservation_id:
            report = {"reservation_id": reservation_id, "key_id": key_id, "model": model,
                      "prompt_tokens": prompt, "completion_tokens": completion}
            task = asyncio.get_running_loop().create_task(self.report(report))
            self.reports.add(task)
            task.add_done_callback(self.reports.discard)
        return web.json_response(answer(request.path, model, prompt, completion))

    async def report(self, report: dict) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        for attempt in range(REPORT_TRIES):
            try:
                async with self.session.post(self.settle_url, json=report,
                                             headers=headers) as resp:
                    if resp.status < 500:
                        return  # settled, already settled (409), or refused for good
            except (TimeoutError, ClientError):
                pass
            await asyncio.sleep(0.2 * 2 ** attempt)


def make_app() -> web.Application:
    stub = Stub(os.environ.get("SIDECAR_SETTLE_URL") or None,
                os.environ.get("SIDECAR_SETTLEMENT_TOKEN") or None)
    app = web.Application(client_max_size=32 << 20)
    app.on_startup.append(stub.start)
    app.on_cleanup.append(stub.stop)
    app.router.add_get("/healthz", lambda _: web.Response(text="ok"))
    app.router.add_get("/v1/models", stub.models)
    app.router.add_route("*", "/{tail:.*}", stub.call)
    return app


if __name__ == "__main__":
    host, _, port = os.environ.get("STUB_LISTEN", "0.0.0.0:9000").rpartition(":")
    web.run_app(make_app(), host=host, port=int(port), access_log=None)
