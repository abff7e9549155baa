"""`sde-ray serve` over real HTTP on loopback: answers equal `sde-ray embed`'s for the same items,
bad input gets a 4xx and the service keeps answering, and concurrent requests share batches."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sde_ray.config import Config, with_values
from sde_ray.embed.batch import EmbedActor, prepare_piece
from sde_ray.embed.corpus import Columns, plan_files
from sde_ray.models import export_config


def png(colour: str, size: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "PNG")
    return buffer.getvalue()


def post(url: str, payload) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def embed_reference(tmp_path, folder, texts, images, instruction):
    """`sde-ray embed`'s two stages, in this process, on the same items as a parquet corpus."""
    pq.write_table(pa.table({"text": texts, "image": images}), tmp_path / "items.parquet")
    _, files = plan_files(tmp_path / "items.parquet", 100, 100)
    batch = prepare_piece({"piece": [asdict(files[0].pieces[0])], "file": [0]}, columns=Columns(),
                          model_config=export_config(folder), instruction=instruction, prefix="pos")
    return EmbedActor(str(folder), 8, False, "fp32", "target")(batch)["embedding"]


@pytest.mark.ray
@pytest.mark.slow  # ~40 s: Serve's controller, proxy and one replica start on the local cluster
def test_serve_answers_equal_embed_and_rejects_bad_input(tmp_path, tiny_export, ray_cluster):
    from ray import serve

    from sde_ray.embed.serve import start_service

    folder, _, _ = tiny_export
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "green.png").write_bytes(png("green"))
    config = with_values(Config(), {"serve.port": 0, "serve.max_items": 6, "serve.max_image_pixels": 64 * 64,
                                    "serve.image_root": str(tmp_path / "images"), "serve.max_batch_size": 8,
                                    "serve.batch_wait_timeout_s": 0.2})
    url = start_service(config, str(folder)) + "/v1/embeddings"
    try:
        instruction = "Represent the given image"
        texts = ["a red circle", "", "", "a blue square on white"]
        images = [None, png("red"), png("green"), png("blue")]
        data_url = "data:image/png;base64," + base64.b64encode(png("red")).decode()
        inputs = ["a red circle", {"image": data_url}, {"image": "green.png"},
                  {"text": "a blue square on white", "image": "data:image/png;base64," + base64.b64encode(png("blue")).decode()}]
        status, answer = post(url, {"input": inputs, "input_type": "target", "instruction": instruction})
        assert status == 200, answer
        served = np.array([d["embedding"] for d in answer["data"]], dtype=np.float32)
        reference = embed_reference(tmp_path, folder, texts, images, instruction)
        np.testing.assert_allclose(served, reference, rtol=1e-5, atol=1e-5)
        assert [d["index"] for d in answer["data"]] == [0, 1, 2, 3] and answer["usage"]["total_tokens"] > 0

        big = io.BytesIO()
        Image.new("RGB", (200, 200), "red").save(big, "PNG")
        bad = {
            "undecodable": ({"input": [{"image": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}]}, 400),
            "empty text": ({"input": ["  "]}, 400),
            "empty input": ({"input": []}, 400),
            "too many items": ({"input": ["a"] * 7}, 413),
            "oversized image": ({"input": [{"image": "data:image/png;base64," + base64.b64encode(big.getvalue()).decode()}]}, 413),
            "outside image_root": ({"input": [{"image": str(tmp_path / "items.parquet")}]}, 403),
            "remote url": ({"input": [{"image": "http://example.com/a.png"}]}, 400),
            "malformed json": (b"{not json", 400),
        }
        for name, (payload, expected) in bad.items():
            status, answer = post(url, payload)
            assert status == expected, (name, answer)
            assert answer["error"]["message"], name

        # Still serving; concurrent one-item requests are batched together and answer as alone.
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda t: post(url, {"input": t, "input_type": "target"}), texts[:1] * 8))
        assert all(status == 200 for status, _ in answers)
        alone = embed_reference(tmp_path, folder, texts[:1], [None], "")
        for _, answer in answers:
            np.testing.assert_allclose(answer["data"][0]["embedding"], alone[0], rtol=1e-5, atol=1e-5)
        with urllib.request.urlopen(url.replace("/v1/embeddings", "/stats"), timeout=30) as response:
            assert max(json.loads(response.read())["batch_sizes"]) > 1
    finally:
        serve.shutdown()


def test_request_parsing_refuses_bad_input_with_its_status(tmp_path):
    """The handler's checks in this process (no Ray): each bad request maps to its 4xx status."""
    from sde_ray.config import ServeConfig
    from sde_ray.embed.serve import RequestError, parse_request

    (tmp_path / "ok.png").write_bytes(png("red"))
    limits = ServeConfig(max_items=3, max_image_bytes=4096, max_image_pixels=32 * 32, max_text_chars=20,
                         image_root=str(tmp_path))
    items, side, normalize = parse_request(json.dumps({"input": ["hi", {"image": "ok.png"},
                                                                 {"image": f"file://{tmp_path}/ok.png", "text": "x"}],
                                                       "input_type": "target", "normalize": True}).encode(), limits)
    assert [i.modality for i in items] == ["text", "image", "image+text"] and side == "target" and normalize
    big = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(big, "PNG")
    cases = {
        b"[1, 2": 400,
        json.dumps({"inputs": ["x"]}).encode(): 400,
        json.dumps({"input": ["x"], "encoding_format": "base64"}).encode(): 400,
        json.dumps({"input": ["x"], "input_type": "document"}).encode(): 400,
        json.dumps({"input": ["x"] * 4}).encode(): 413,
        json.dumps({"input": ["x" * 21]}).encode(): 413,
        json.dumps({"input": [{"image": "missing.png"}]}).encode(): 400,
        json.dumps({"input": [{"image": "../outside.png"}]}).encode(): 403,
        json.dumps({"input": [{"image": "data:image/png;base64,@@@"}]}).encode(): 400,
        json.dumps({"input": [{"image": "data:image/png;base64," + base64.b64encode(big.getvalue()).decode()}]}).encode(): 413,
        json.dumps({"input": [{"text": "", "image": "data:image/png;base64," + base64.b64encode(b"GIF89a?").decode()}]}).encode(): 400,
        json.dumps({"input": [{"text": 3}]}).encode(): 400,
    }
    for body, status in cases.items():
        with pytest.raises(RequestError) as caught:
            parse_request(body, limits)
        assert caught.value.status == status, (body[:80], str(caught.value))
    with pytest.raises(RequestError) as caught:  # no image_root: local files are refused
        parse_request(json.dumps({"input": [{"image": str(tmp_path / "ok.png")}]}).encode(), ServeConfig())
    assert caught.value.status == 403
