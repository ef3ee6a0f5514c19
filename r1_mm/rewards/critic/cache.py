"""Judgements cached by everything that determines them: judge model, full prompt text (question and
completions) and the bytes of every image or frame. An optional jsonl file keeps them across runs."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from PIL import Image


def image_digest(image: Image.Image) -> str:
    h = hashlib.sha256(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def judgement_key(model_id: str, prompt: str, images: tuple[Image.Image, ...], output_regex: str | None) -> str:
    h = hashlib.sha256()
    for part in (model_id, prompt, output_regex or "", *(image_digest(im) for im in images)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


class JudgementCache:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self._entries: dict[str, str] = {}
        self._lock = threading.Lock()
        if self.path and self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self._entries[record["key"]] = record["judgement"]

    def get(self, key: str) -> str | None:
        return self._entries.get(key)

    def put(self, key: str, judgement: str) -> None:
        with self._lock:
            self._entries[key] = judgement
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as f:
                    f.write(json.dumps({"key": key, "judgement": judgement}) + "\n")

    def __len__(self) -> int:
        return len(self._entries)
