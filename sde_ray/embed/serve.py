"""`sde-ray serve RUN`: a Ray Serve deployment answering OpenAI-style `POST /v1/embeddings`.

Request (JSON): `{"input": ITEM | [ITEM, ...], "model": optional, "encoding_format": "float",
"input_type": "query" | "target", "instruction": "...", "normalize": false}` where an ITEM is a
string (text) or an object `{"text": "...", "image": IMAGE}`, and IMAGE is a data URL
(`data:image/png;base64,...`), a `file://` URL or a local path under `serve.image_root` (other
files and remote URLs are refused). `input_type` picks the model side (default `query`), and
`instruction` is applied as `sde-ray embed` applies `embed.instruction` (MMEB's prompt format).
Embeddings are the raw features, as `sde-ray embed` writes them (`normalize: true` returns them
L2-normalised).

Response: `{"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...]}],
"model": NAME, "usage": {"prompt_tokens": T, "total_tokens": T}}` (T: the items' non-padding tokens).

Every item is checked and decoded in the HTTP handler, before batching, so a bad item answers its
own request with a 4xx (`{"error": {"message", "type", "code"}}`) and never fails a batch it would
share with others: 400 for malformed JSON, empty input or text, undecodable images, a missing
file or a refused URL; 403 for a path outside `serve.image_root`; 413 for more than
`serve.max_items` items, an image over `serve.max_image_bytes` bytes or `serve.max_image_pixels`
pixels, or a text over `serve.max_text_chars` characters. The forward runs in `serve.batch` batches
of up to `serve.max_batch_size` items gathered across requests (`ModelEncoder.encode_arrays`, the
evaluator's encoder), on one GPU per replica when the cluster has GPUs.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (`request: Request`)
# as objects; as strings they would not resolve inside Serve's ingress class and become query fields.
import base64
import binascii
import dataclasses
import json
import os
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from sde_ray.config import Config, ServeConfig
from sde_ray.embed.items import Item, ItemError, encode_items, prepare_item

APP_NAME = "sde_ray_embeddings"
PREFIXES = {"query": "qry", "target": "pos"}


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.code = status, code


STATUS_OF_REASON = {"oversized_image": 413}


def read_image(value, limits: ServeConfig, where: str) -> bytes:
    """The encoded bytes an IMAGE names (data URL, file URL or local path); see the module docstring."""
    if not isinstance(value, str) or not value:
        raise RequestError(400, f"{where}: image must be a non-empty string (data URL, file URL or path)", "bad_image")
    if value.startswith("data:"):
        header, _, payload = value.partition(",")
        if ";base64" not in header:
            raise RequestError(400, f"{where}: only base64 data URLs are accepted", "bad_image")
        if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
            raise RequestError(413, f"{where}: image larger than {limits.max_image_bytes} bytes", "image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(400, f"{where}: invalid base64 in data URL ({exc})", "bad_image") from exc
    else:
        parsed = urlparse(value)
        if parsed.scheme not in ("", "file"):
            raise RequestError(400, f"{where}: {parsed.scheme}:// URLs are not fetched; send a data URL or a "
                                    "local path", "bad_image")
        if not limits.image_root:
            raise RequestError(403, f"{where}: local files are refused (serve.image_root is not set)", "forbidden_path")
        root = Path(limits.image_root).expanduser().resolve()
        path = Path(unquote(parsed.path) if parsed.scheme == "file" else value).expanduser()
        path = (root / path if not path.is_absolute() else path).resolve()
        if not path.is_relative_to(root):
            raise RequestError(403, f"{where}: {value} is outside serve.image_root", "forbidden_path")
        if not path.is_file():
            raise RequestError(400, f"{where}: no such file {value}", "bad_image")
        if path.stat().st_size > limits.max_image_bytes:
            raise RequestError(413, f"{where}: image larger than {limits.max_image_bytes} bytes", "image_too_large")
        data = path.read_bytes()
    if len(data) > limits.max_image_bytes:
        raise RequestError(413, f"{where}: image larger than {limits.max_image_bytes} bytes", "image_too_large")
    return data


def parse_request(body: bytes, limits: ServeConfig) -> tuple[list[Item], str, bool]:
    """(prepared items, side, normalize) of a request body; raises `RequestError` for bad input."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"request body is not JSON ({exc})", "bad_json") from exc
    if not isinstance(payload, dict) or "input" not in payload:
        raise RequestError(400, "request must be a JSON object with an 'input' field", "bad_request")
    fmt = payload.get("encoding_format", "float")
    if fmt != "float":
        raise RequestError(400, f"encoding_format {fmt!r} is not supported (only 'float')", "bad_request")
    side = payload.get("input_type", "query")
    if side not in PREFIXES:
        raise RequestError(400, f"input_type must be 'query' or 'target', got {side!r}", "bad_request")
    instruction = payload.get("instruction", "")
    if not isinstance(instruction, str):
        raise RequestError(400, "instruction must be a string", "bad_request")
    inputs = payload["input"]
    inputs = inputs if isinstance(inputs, list) else [inputs]
    if not inputs:
        raise RequestError(400, "input is empty", "empty_input")
    if len(inputs) > limits.max_items:
        raise RequestError(413, f"{len(inputs)} items in one request; at most {limits.max_items} (serve.max_items)",
                           "too_many_items")
    items = []
    for index, entry in enumerate(inputs):
        where = f"input[{index}]"
        if isinstance(entry, str):
            entry = {"text": entry}
        if not isinstance(entry, dict) or not set(entry) <= {"text", "image"}:
            raise RequestError(400, f"{where}: expected a string or an object with 'text' and/or 'image'", "bad_item")
        text = entry.get("text", "")
        if not isinstance(text, str):
            raise RequestError(400, f"{where}: text must be a string", "bad_item")
        if len(text) > limits.max_text_chars:
            raise RequestError(413, f"{where}: text of {len(text)} characters; at most {limits.max_text_chars}",
                               "text_too_long")
        if "image" not in entry and not text.strip():
            raise RequestError(400, f"{where}: empty text", "empty_text")
        image = read_image(entry["image"], limits, where) if "image" in entry else None
        try:
            items.append(prepare_item(text, image, instruction, where, max_image_pixels=limits.max_image_pixels))
        except ItemError as exc:
            raise RequestError(STATUS_OF_REASON.get(exc.reason, 400), str(exc), exc.reason) from exc
    return items, side, bool(payload.get("normalize", False))


app = FastAPI(title="sde_ray embeddings")


@serve.deployment
@serve.ingress(app)
class EmbeddingService:
    """One replica: the exported model and its processor; items batched across requests."""

    def __init__(self, model_dir: str, limits: dict, precision: str, use_gpu: bool):
        import torch

        from sde_ray.eval.encode import load_encoder

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.limits = ServeConfig(**limits)
        self.encoder = load_encoder(model_dir, self.limits.max_batch_size, "cuda" if use_gpu else "cpu", precision)
        self.model_name = Path(model_dir).name if Path(model_dir).name != "model" else Path(model_dir).parent.name
        self.encode.set_max_batch_size(self.limits.max_batch_size)
        self.encode.set_batch_wait_timeout_s(self.limits.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def encode(self, requests: list[tuple[str, Item]]) -> list[tuple[np.ndarray, int]]:
        """(embedding, token count) per item; items of both sides may share a batch (one forward each)."""
        self.batch_sizes.append(len(requests))
        out: list = [None] * len(requests)
        for side, prefix in PREFIXES.items():
            rows = [i for i, (s, _) in enumerate(requests) if s == side]
            if not rows:
                continue
            arrays = encode_items(self.encoder.processor, prefix, [requests[i][1] for i in rows])
            embeddings = self.encoder.encode_arrays(side, arrays)
            tokens = arrays[f"{prefix}_attention_mask"].sum(axis=1)
            for j, i in enumerate(rows):
                out[i] = (embeddings[j], int(tokens[j]))
        return out

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request):
        import asyncio

        try:
            items, side, normalize = parse_request(await request.body(), self.limits)
        except RequestError as exc:
            return JSONResponse({"error": {"message": str(exc), "type": "invalid_request_error", "code": exc.code}},
                                status_code=exc.status)
        results = await asyncio.gather(*(self.encode((side, item)) for item in items))
        data = []
        for index, (embedding, _) in enumerate(results):
            vector = embedding / max(float(np.linalg.norm(embedding)), 1e-12) if normalize else embedding
            data.append({"object": "embedding", "index": index, "embedding": vector.astype(np.float32).tolist()})
        tokens = sum(count for _, count in results)
        return {"object": "list", "data": data, "model": self.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                            "embed_dim": self.encoder.embed_dim}]}

    @app.get("/stats")
    async def stats(self):
        """The sizes of the batches this replica has encoded (what dynamic batching did)."""
        return {"batch_sizes": self.batch_sizes[-1000:]}


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def start_service(config: Config, checkpoint: str) -> str:
    """Deploys the service on the connected Ray cluster; returns its base URL."""
    import ray

    from sde_ray.eval.checkpoints import resolve_checkpoint

    from sde_ray.eval.runner import eval_precision

    s = config.serve
    model_dir = resolve_checkpoint(checkpoint, Path(checkpoint).expanduser().resolve().parent).model_dir
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    precision = eval_precision(config)
    if precision == "fp16" and not use_gpu:
        precision = "bf16"
    port = s.port or free_port(s.host)
    serve.start(http_options={"host": s.host, "port": port})
    deployment = EmbeddingService.options(
        num_replicas=s.num_replicas,
        max_ongoing_requests=max(s.max_batch_size * 2, 8),
        ray_actor_options={"num_gpus": 1 if use_gpu else 0, "num_cpus": 0 if use_gpu else 1},
    )
    serve.run(deployment.bind(str(model_dir), dataclasses.asdict(s), precision, use_gpu),
              name=APP_NAME, route_prefix="/")
    return f"http://{s.host}:{port}"


def run_serve(config: Config, checkpoint: str) -> None:
    """`sde-ray serve`: deploys and serves until interrupted (Ctrl-C), then shuts Serve down."""
    import ray

    from sde_ray.ray_cluster import connect

    started_ray = connect(config, local_cpus=os.cpu_count() or 1, log_to_driver=False)
    try:
        url = start_service(config, checkpoint)
        print(f"[sde_ray] serving {checkpoint} at {url}/v1/embeddings (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
