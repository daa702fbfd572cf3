"""A simulated annotator that works a running server through REST, as a user of Slicer or OHIF does.

It measures what an annotator gets: on each held-out image it draws the box around the expert mask's largest
component, then clicks (the most interior pixel of the mask, then of the larger error region of the answer it got:
:func:`lib.serving.prompts.interior_clicks`, the annotator of the promotion gate), sends every request with the
server's default parameters (only the prompts, a ``client_id`` per annotation session and the label name), reads the PNG
mask the server answers and scores it with Dice against the expert mask. It also saves labels with
``PUT /datastore/label``, which is how the active-learning loop is fed. Nothing here imports the server.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Sequence

import numpy as np
import requests
import torch
from PIL import Image
from requests_toolbelt.multipart.decoder import MultipartDecoder

from lib.serving.prompts import interior_clicks, largest_component_box
from lib.training.metrics import dice_per_mask


def infer_answer(response: requests.Response) -> tuple[dict, bytes | None, str]:
    """An infer answer as MONAI Label sends it -> ``(result JSON, label file bytes or None, label file name)``:
    multipart (JSON and file, Slicer's default), the file alone (``output=image``; the name from the disposition) or
    the JSON alone (``output=json``)."""
    content_type = response.headers["content-type"]
    if content_type.startswith("multipart"):
        result, data, name = {}, None, ""
        for part in MultipartDecoder(response.content, content_type).parts:
            disposition = part.headers[b"Content-Disposition"].decode()
            if 'name="params"' in disposition:
                result = json.loads(part.content)
            else:
                data, name = part.content, disposition.split("filename=")[-1].strip('"')
        return result, data, name
    if content_type.startswith("application/json"):
        return response.json(), None, ""
    disposition = response.headers.get("content-disposition", "")
    return {}, response.content, disposition.split("filename=")[-1].strip('"') if "filename=" in disposition else ""


class RestAnnotator:
    """Talks to one server.

    Args:
        url: base URL, e.g. ``http://127.0.0.1:8000``.
        timeout: seconds per request.
    """

    def __init__(self, url: str, timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def infer(self, model: str, image: str, params: dict) -> tuple[np.ndarray, dict]:
        """``POST /infer/<model>?image=...`` (the label and the result JSON in a multipart answer, as Slicer asks)
        -> the ``(H, W)`` bool mask and the result JSON."""
        response = requests.post(
            f"{self.url}/infer/{model}",
            params={"image": image},
            files={"params": (None, json.dumps(params))},
            timeout=self.timeout,
        )
        if response.status_code != 200:
            raise RuntimeError(f"POST /infer/{model} for {image}: {response.status_code} {response.text[:500]}")
        result, data, _ = infer_answer(response)
        if data is None:
            raise RuntimeError(f"POST /infer/{model} for {image}: the answer holds no label")
        return np.asarray(Image.open(io.BytesIO(data))) > 0, result

    def annotate(self, image: str, target: np.ndarray, clicks: int = 5, box: bool = True) -> dict[str, float]:
        """Box Dice (a session of its own) and Dice after each of ``clicks`` accumulated clicks (one session, the
        server keeping the previous mask as it does for any client) on ``image`` with expert mask ``target``."""
        target = np.asarray(target, dtype=bool)
        truth = torch.from_numpy(target)
        out: dict[str, float] = {}
        if box:
            x0, y0, x1, y1 = (float(v) for v in largest_component_box(target))
            mask, _ = self.infer("sam_med2d_box", image, self._session({"box": [x0, y0, x1, y1]}))
            out["box"] = _dice(mask, target)
        session = self._session({})
        foreground: list[list[float]] = []
        background: list[list[float]] = []
        prediction = torch.zeros_like(truth)
        for count in range(1, clicks + 1):
            coords, labels = interior_clicks(prediction[None], truth[None])
            (foreground if int(labels[0, 0]) == 1 else background).append([float(v) for v in coords[0, 0]])
            mask, _ = self.infer(
                "sam_med2d_points", image, {**session, "foreground": foreground, "background": background}
            )
            prediction = torch.from_numpy(mask)
            out[f"{count} point" + ("s" if count > 1 else "")] = _dice(mask, target)
        return out

    def held_out_dice(self, cases: Sequence[tuple[str, np.ndarray]], clicks: int = 5) -> dict[str, object]:
        """:meth:`annotate` on every ``(image id, expert mask)``: ``{"dice": {mode: mean}, "per_image": {...}}``."""
        per_image = {image: self.annotate(image, target, clicks) for image, target in cases}
        modes = list(next(iter(per_image.values())))
        return {"dice": {m: float(np.mean([r[m] for r in per_image.values()])) for m in modes}, "per_image": per_image}

    def save_label(self, image: str, mask: np.ndarray, tag: str = "final") -> None:
        """``PUT /datastore/label``: the mask as a 0/1 PNG, as an annotator's Save does."""
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(mask, dtype=np.uint8)).save(buffer, format="PNG")
        response = requests.put(
            f"{self.url}/datastore/label",
            params={"image": image, "tag": tag},
            files={"label": (f"{image}.png", buffer.getvalue(), "image/png")},
            timeout=self.timeout,
        )
        if response.status_code != 200:
            raise RuntimeError(f"PUT /datastore/label for {image}: {response.status_code} {response.text[:500]}")

    @staticmethod
    def _session(params: dict) -> dict:
        """A new annotation session: its own client id, so no earlier mask is reused."""
        return {**params, "client_id": f"annotator-{uuid.uuid4().hex[:12]}", "label": "object"}


def _dice(mask: np.ndarray, target: np.ndarray) -> float:
    return float(dice_per_mask(torch.from_numpy(mask)[None], torch.from_numpy(target)[None])[0])
