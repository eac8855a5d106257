"""A local OpenAI-compatible Batch API (``/v1/files``, ``/v1/batches``) over the replay teacher: the tests' and the
demo's (``make demo ARGS=--teacher-batch``) batch provider. The same app also answers ``/v1/chat/completions``.

A batch goes ``validating`` -> ``in_progress`` -> ``finalizing`` -> ``completed``, answering its requests one by
one (``seconds_per_request`` each) with the replay teacher's text, in the Batch API's output format. For tests:

- ``hold=True`` keeps batches ``in_progress`` until :meth:`BatchTeacher.release`;
- ``fail_first=N``: the first N requests fail (alternately an ``error`` object and a 500 ``response``, both in
  the error file, as providers write them);
- ``expire_after=[s, ...]``: the i-th batch expires after that many seconds (what it answered is in the output
  file, the rest in the error file with code ``batch_expired``);
- ``max_requests`` / ``max_bytes``: over them a batch fails validation, as at a provider;
- ``POST /v1/batches/{id}/cancel``: ``cancelling`` -> ``cancelled``, the unanswered requests in the error file.

``submitted`` counts how often each ``custom_id`` was put in a batch, ``completed`` how often one was answered,
``looks`` how often each batch was asked about.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time

from aiohttp import web

from distilled_plugins.devtools.teacher_server import ReplayTeacher


class BatchTeacher:
    def __init__(
        self,
        teacher: ReplayTeacher,
        *,
        seconds_per_request: float = 0.0,
        hold: bool = False,
        fail_first: int = 0,
        expire_after: list[float] | tuple[float, ...] = (),
        max_requests: int = 50_000,
        max_bytes: int = 200_000_000,
        api_key: str | None = None,
    ):
        self.teacher = teacher
        self.seconds_per_request, self.held = seconds_per_request, hold
        self.fail_first, self.failed = fail_first, 0
        self.expire_after = collections.deque(expire_after)
        self.max_requests, self.max_bytes, self.api_key = max_requests, max_bytes, api_key
        self.files: dict[str, dict] = {}  # id -> {"bytes", "purpose", "content"}
        self.batches: dict[str, dict] = {}  # id -> batch object (as GET returns it)
        self.inputs: dict[str, list[str]] = {}  # batch id -> its custom ids
        self.submitted: collections.Counter = collections.Counter()
        self.completed: collections.Counter = collections.Counter()
        self.looks: collections.Counter = collections.Counter()  # GET /v1/batches/{id} per batch id
        self._cancel: set[str] = set()
        self._tasks: set[asyncio.Task] = set()

    # ---- control from a test -----------------------------------------------------------------------------------

    def release(self) -> None:
        """Let held batches run."""
        self.held = False

    def statuses(self) -> list[str]:
        return [b["status"] for b in self.batches.values()]

    # ---- HTTP --------------------------------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        return not self.api_key or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        return web.json_response({"error": {"message": message, "code": status}}, status=status)

    async def upload(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided")
        form = await request.post()
        upload = form.get("file")
        if form.get("purpose") != "batch" or upload is None:
            return self._error(400, "expected purpose=batch and a file")
        content = upload.file.read()
        file_id = f"file-{len(self.files) + 1}"
        self.files[file_id] = {"bytes": len(content), "purpose": "batch", "content": content}
        return web.json_response(self._file(file_id))

    def _file(self, file_id: str) -> dict:
        f = self.files[file_id]
        return {"id": file_id, "object": "file", "bytes": f["bytes"], "purpose": f["purpose"]}

    async def file_content(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided")
        file_id = request.match_info["file_id"]
        if file_id not in self.files:
            return self._error(404, f"no file {file_id}")
        return web.Response(body=self.files[file_id]["content"], content_type="application/jsonl")

    async def create(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided")
        body = await request.json()
        file_id = body.get("input_file_id")
        if file_id not in self.files or body.get("endpoint") != "/v1/chat/completions":
            return self._error(400, "unknown input_file_id or endpoint")
        batch_id = f"batch_{len(self.batches) + 1}"
        batch = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body["endpoint"],
            "input_file_id": file_id,
            "completion_window": body.get("completion_window"),
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "errors": None,
            "created_at": int(time.time()),
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        self.batches[batch_id] = batch
        task = asyncio.get_running_loop().create_task(self._process(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return web.json_response(batch)

    async def retrieve(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided")
        batch = self.batches.get(request.match_info["batch_id"])
        self.looks[request.match_info["batch_id"]] += 1
        return web.json_response(batch) if batch else self._error(404, "no such batch")

    async def cancel(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided")
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return self._error(404, "no such batch")
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return self._error(409, f"cannot cancel a batch with status {batch['status']}")
        self._cancel.add(batch["id"])
        batch["status"] = "cancelling"
        return web.json_response(batch)

    async def list_batches(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided")
        newest_first = list(reversed(self.batches.values()))
        after = request.query.get("after")
        if after:
            ids = [b["id"] for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
        limit = int(request.query.get("limit", 20))
        return web.json_response(
            {"object": "list", "data": newest_first[:limit], "has_more": len(newest_first) > limit}
        )

    # ---- the batch's life --------------------------------------------------------------------------------------

    async def _process(self, batch: dict) -> None:
        content = self.files[batch["input_file_id"]]["content"]
        lines = [json.loads(line) for line in content.splitlines() if line.strip()]
        self.inputs[batch["id"]] = [line["custom_id"] for line in lines]
        expire_after = self.expire_after.popleft() if self.expire_after else None
        started = time.monotonic()
        await asyncio.sleep(0.05)
        if len(lines) > self.max_requests or len(content) > self.max_bytes:
            batch["status"] = "failed"
            batch["errors"] = {
                "data": [{"code": "too_many_requests", "message": f"over {self.max_requests} requests or bytes"}]
            }
            return
        for line in lines:
            self.submitted[line["custom_id"]] += 1
        batch["request_counts"]["total"] = len(lines)
        if batch["status"] == "validating":
            batch["status"] = "in_progress"
        output, errors = [], []
        for line in lines:
            while self.held and batch["id"] not in self._cancel:
                await asyncio.sleep(0.02)
            if self.seconds_per_request:
                await asyncio.sleep(self.seconds_per_request)
            if batch["id"] in self._cancel:
                break
            if expire_after is not None and time.monotonic() - started > expire_after:
                batch["status"] = "expiring"
                break
            self._answer(line, output, errors)
            batch["request_counts"]["completed"] = len(output)
            batch["request_counts"]["failed"] = len(errors)
        answered = {r["custom_id"] for r in output + errors}
        ended = "cancelled" if batch["id"] in self._cancel else "expired" if batch["status"] == "expiring" else None
        for line in lines:
            if ended and line["custom_id"] not in answered:
                code = f"batch_{ended}"
                errors.append({"custom_id": line["custom_id"], "response": None, "error": {"code": code}})
        if not ended:
            batch["status"] = "finalizing"
            await asyncio.sleep(0.05)
        batch["output_file_id"] = self._store(output)
        batch["error_file_id"] = self._store(errors)
        batch["request_counts"]["failed"] = len(errors)
        batch["status"] = ended or "completed"

    def _store(self, records: list[dict]) -> str | None:
        if not records:
            return None
        content = b"".join(json.dumps(r).encode() + b"\n" for r in records)
        file_id = f"file-{len(self.files) + 1}"
        self.files[file_id] = {"bytes": len(content), "purpose": "batch_output", "content": content}
        return file_id

    def _answer(self, line: dict, output: list, errors: list) -> None:
        cid, body = line["custom_id"], line["body"]
        if self.failed < self.fail_first:
            self.failed += 1
            if self.failed % 2:
                errors.append({"custom_id": cid, "response": None, "error": {"code": "server_error"}})
            else:
                reply = {"status_code": 500, "body": {"error": {"message": "internal error"}}}
                errors.append({"custom_id": cid, "response": reply, "error": None})
            return
        problem = self.teacher.problem_of(body["messages"][-1]["content"])
        text = self.teacher.answer(problem)
        usage = {"prompt_tokens": len(problem) // 4, "completion_tokens": len(text) // 4}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        reply = {
            "id": f"chatcmpl-{cid}",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
        }
        self.completed[cid] += 1
        output.append({"id": f"req-{cid}", "custom_id": cid, "response": {"status_code": 200, "body": reply}})

    async def _stop(self, app: web.Application) -> None:
        """The server stops: end the batches still running (a test's held ones) quietly."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def app(self) -> web.Application:
        app = self.teacher.app()
        app.on_cleanup.append(self._stop)
        app.router.add_post("/v1/files", self.upload)
        app.router.add_get("/v1/files/{file_id}/content", self.file_content)
        app.router.add_post("/v1/batches", self.create)
        app.router.add_get("/v1/batches", self.list_batches)
        app.router.add_get("/v1/batches/{batch_id}", self.retrieve)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self.cancel)
        return app
