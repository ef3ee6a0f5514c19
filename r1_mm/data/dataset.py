"""A resumable stream of prepared prompts with the recipe's bad-row policies applied and counted.

Why a stream and not a torch Dataset: rows that fail (bad media, over-long prompts) are skipped by
policy and replaced by the next row, the skip counts must be reported, and the exact position
(epoch, offset, shuffle seed) must be saved so a resumed run neither repeats nor skips data.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from r1_mm.config.recipe import DataConfig, MediaConfig
from r1_mm.core.seeds import derive_seed
from r1_mm.data.loading import DataError, load_split, media_root
from r1_mm.data.media import MediaError
from r1_mm.data.prompts import PromptBuilder, PromptTooLongError, Sample, row_id

log = logging.getLogger(__name__)


@dataclass
class DataReport:
    """What the data pipeline left out, and why (logged with the metrics)."""

    rows_prepared: int = 0
    skipped_bad_media: int = 0
    dropped_long_prompt: int = 0
    examples: list[str] = field(default_factory=list)  # the first few messages, for the log

    def note(self, message: str) -> None:
        if len(self.examples) < 20:
            self.examples.append(message)
        log.warning(message)

    def counts(self) -> dict[str, int]:
        return {"data/rows_prepared": self.rows_prepared, "data/skipped_bad_media": self.skipped_bad_media,
                "data/dropped_long_prompt": self.dropped_long_prompt}


class PromptStream:
    """Yields :class:`Sample` batches forever (epoch after epoch), reshuffled per epoch from the seed."""

    def __init__(self, rows: list[dict[str, Any]], builder: PromptBuilder, *, data_cfg: DataConfig,
                 media_cfg: MediaConfig, seed: int = 0, shard: tuple[int, int] = (0, 1)):
        if not rows:
            raise DataError("no rows to train on")
        self.rows = rows
        self.source = "<rows>"  # how errors name the data (from_config: the file or load_dataset source)
        self.builder = builder
        self.data_cfg = data_cfg
        self.media_cfg = media_cfg
        self.seed = seed
        self.shard_index, self.num_shards = shard
        self.epoch = 0
        self.offset = 0
        self.report = DataReport()
        self._order = self._epoch_order(0)
        self._video_logged = False  # the first video's frames x tokens per frame are logged once, at start

    @classmethod
    def from_config(cls, processor: Any, data_cfg: DataConfig, media_cfg: MediaConfig, *, split: str = "train",
                    path: str | None = None, dataset: Any = None, seed: int = 0,
                    shard: tuple[int, int] = (0, 1), tools: list[dict[str, Any]] | None = None) -> PromptStream:
        """The recipe's train or eval split (or ``dataset``, an object given through the Python API);
        ``tools``: the function schemas the prompts show an agentic model."""
        rows, source, default_root = load_split(data_cfg, split, path=path, dataset=dataset)
        root = media_root(data_cfg, default_root)
        builder = PromptBuilder(processor, data_cfg, media_cfg, root, tools=tools)
        stream = cls(rows, builder, data_cfg=data_cfg, media_cfg=media_cfg, seed=seed, shard=shard)
        stream.source = source
        return stream

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.data_cfg.shuffle:
            random.Random(derive_seed(self.seed, "data.shuffle", epoch)).shuffle(order)
        return order[self.shard_index::self.num_shards] or order[:1]

    def _advance(self) -> int:
        if self.offset >= len(self._order):
            self.epoch += 1
            self.offset = 0
            self._order = self._epoch_order(self.epoch)
        index = self._order[self.offset]
        self.offset += 1
        return index

    def prepare(self, index: int) -> Sample | None:
        """Prepare one row, or None when the policy says skip (the reason is counted and logged)."""
        row = self.rows[index]
        try:
            sample = self.builder.prepare(row, index)
        except MediaError as exc:
            if self.media_cfg.on_bad_media == "error":
                raise
            self.report.skipped_bad_media += 1
            self.report.note(f"skipped (media.on_bad_media=skip): {exc}")
            return None
        except PromptTooLongError as exc:
            if self.data_cfg.on_long_prompt == "error":
                raise
            self.report.dropped_long_prompt += 1
            self.report.note(f"dropped (data.on_long_prompt=drop): {exc}")
            return None
        self.report.rows_prepared += 1
        if sample.videos and not self._video_logged and self.shard_index == 0 and self.builder.factor > 1:
            self._video_logged = True
            log.info("first video (%s): %s", sample.videos[0].source, self.builder.video_tokens(sample.videos[0]).describe())
        return sample

    def next_batch(self, size: int) -> list[Sample]:
        batch: list[Sample] = []
        failures_in_a_row = 0
        while len(batch) < size:
            sample = self.prepare(self._advance())
            if sample is None:
                failures_in_a_row += 1
                if failures_in_a_row > len(self._order):
                    raise DataError(f"no usable rows: every row of the shard was skipped "
                                    f"({self.report.counts()}); first reasons: {self.report.examples[:3]}")
                continue
            failures_in_a_row = 0
            batch.append(sample)
        return batch

    def each_once(self) -> list[Sample]:
        """Every usable row of this shard once, in order, without moving the stream (evaluation)."""
        return [s for s in (self.prepare(i) for i in self._epoch_order(0)) if s is not None]

    def __iter__(self):
        while True:
            yield self.next_batch(1)[0]

    # Exact resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "report": asdict(self.report)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise DataError(f"resume: data seed {state['seed']} differs from the recipe's {self.seed}")
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._epoch_order(self.epoch)
        self.report = DataReport(**state["report"])


__all__ = ["DataReport", "PromptStream", "Sample", "row_id"]
