"""Fuzz of the infer and datastore endpoints from the server's own OpenAPI schema (Hypothesis, bounded, loopback).

Every operation under ``/infer`` and ``/datastore`` that the schema lists is called with values drawn for each of its
parameters and form fields: valid ids mixed with paths (``../``, absolute, NUL), long strings, JSON ``params`` with
prompts of every wrong type, non-finite and huge numbers, uploads with hostile names and contents. The server must
answer every request below 500 and create no file outside its datastore.

    .venv/bin/python -m pytest tests/test_fuzz_server.py -q           # FUZZ_EXAMPLES=<n> for a longer run
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from scripts.monailabel_server import server_log, start_server, stop_server

pytestmark = pytest.mark.server

MARK = f"fuzz_{uuid.uuid4().hex[:12]}"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "250"))
STATUS: Counter[int] = Counter()


def _png(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full(shape, 90, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


HOSTILE = [
    f"../../../../tmp/{MARK}",
    f"/tmp/{MARK}",
    f"..%2F..%2Ftmp%2F{MARK}",
    "/etc/passwd",
    "picture",
    "volume",
    "final",
    "datastore_v2",
    ".lock",
    "labels",
    "1.2.840.10008.1",
    "",
    "x" * 3000,
    "a\x00b",
    "C:\\Windows\\win.ini",
    "ünïcødé",
]
text = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=40))
number = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 5, 20, 63, -1, 10**12]),
)
leaf = st.one_of(number, text, st.booleans(), st.none())
point = st.lists(number, min_size=0, max_size=4)
PROMPT_KEYS = {
    "foreground": st.one_of(st.lists(point, max_size=4), leaf),
    "background": st.one_of(st.lists(point, max_size=3), leaf),
    "box": st.one_of(st.lists(number, max_size=7), leaf),
    "roi": st.one_of(st.lists(number, max_size=7), leaf),
    "slice": leaf,
    "window": st.one_of(st.lists(number, max_size=3), st.fixed_dictionaries({"level": leaf, "width": leaf}), leaf),
    "multimask_output": leaf,
    "reset": leaf,
    "largest_cc": leaf,
    "client_id": leaf,
    "label": leaf,
    "image": text,
    "save_label": leaf,
    "label_tag": text,
    "result_extension": st.one_of(st.sampled_from([".png", ".nrrd", ".nii.gz", ".json", "../x"]), text),
    "result_dtype": st.one_of(st.sampled_from(["uint8", "uint16", "float32", "object"]), text),
    "result_compress": leaf,
}
prompts = st.fixed_dictionaries({}, optional=PROMPT_KEYS).map(lambda d: json.dumps(d))
form_json = st.one_of(prompts, text, st.just("{}"), st.just("[1, 2"))
upload = st.tuples(
    st.one_of(st.sampled_from(["x.png", "x.nrrd", "x.nii.gz", "x.json", f"../../{MARK}.png", "x"]), text),
    st.sampled_from(
        [
            _png((24, 32)),
            _png((4000, 4000)),
            b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: /etc/hostname\n\n",
            b"not an image at all",
            b"",
        ]
    ),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, golden_dir: Path):
    studies = tmp_path_factory.mktemp("studies")
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8), (48, 1))).save(studies / "picture.png")
    conf = {
        "model": golden_dir / "meta.json",
        "checkpoint": golden_dir / "weights.pth",
        "download": "false",
        "model_dir": tmp_path_factory.mktemp("model"),
        "max_upload_mb": 4,
    }
    url = start_server("apps/sam_med2d", studies, conf)
    schema = requests.get(f"{url}/openapi.json", timeout=30).json()
    yield url, schema, studies
    log = server_log(url)
    stop_server(url)
    assert "Traceback" not in log, log[-6000:]


def _operations(schema: dict) -> list[tuple[str, str, dict]]:
    return [
        (method, path, op)
        for path, ops in sorted(schema["paths"].items())
        if path.startswith(("/infer", "/datastore"))
        for method, op in sorted(ops.items())
    ]


def _form_fields(schema: dict, op: dict) -> dict[str, dict]:
    content = op.get("requestBody", {}).get("content", {})
    for media in content.values():
        ref = media["schema"].get("$ref", "")
        return schema["components"]["schemas"][ref.rsplit("/", 1)[-1]]["properties"] if ref else {}
    return {}


def test_fuzz_infer_and_datastore_endpoints(server: tuple[str, dict, Path]) -> None:
    url, schema, studies = server
    operations = _operations(schema)
    assert len(operations) >= 10, [p for _, p, _ in operations]

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True
    )
    @given(data=st.data())
    def call(data: st.DataObject) -> None:
        method, path, op = data.draw(st.sampled_from(operations))
        query, files = {}, {}
        for parameter in op.get("parameters", []):
            if parameter["name"] == "model" and parameter["in"] == "path":
                model = data.draw(st.one_of(st.sampled_from(["sam_med2d_points", "sam_med2d_box"]), text))
                path = path.replace("{model}", requests.utils.quote(model, safe="") or "x")
            elif parameter["in"] == "query" and data.draw(st.booleans()):
                query[parameter["name"]] = data.draw(text)
        for name, field in _form_fields(schema, op).items():
            if field.get("format") == "binary":
                if data.draw(st.booleans()) or name in ("file",) and method == "put":
                    files[name] = data.draw(upload)
            elif data.draw(st.booleans()):
                files[name] = (None, data.draw(form_json))
        response = requests.request(method.upper(), url + path, params=query, files=files or None, timeout=120)
        STATUS[response.status_code] += 1
        assert response.status_code < 500, (method, path, query, {k: v[0] for k, v in files.items()}, response.text)

    call()
    found = {p for root in (Path("/tmp"), studies.parent) for p in root.rglob(f"*{MARK}*")}
    # Uploads land in the datastore (named by their base name) or, while a request runs, in the server's own folder.
    escaped = sorted(str(p) for p in found if not p.is_relative_to(studies) and "sam_med2d_requests_" not in str(p))
    assert not escaped, escaped
    statuses = dict(sorted(STATUS.items()))
    print(f"fuzz: {sum(STATUS.values())} requests over {len(operations)} operations; statuses {statuses}")
