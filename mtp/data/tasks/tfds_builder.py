"""Any task as a tfds dataset (ArrayRecord), read back with `tfds.data_source`.

One builder, `mtp_task`, parameterised by a `TaskConfig` (task name,
difficulty, split sizes) whose name encodes them all, e.g.
`addition-digits=6-train=1000-eval=100`, so each variant gets its own directory
under `data_dir`. Records are `{"prompt", "thought", "answer"}` as bytes, in
the order of `task.examples(split, n)`. No TensorFlow is needed: prepare from
Python (`prepare_tfds`), not with the `tfds build` CLI.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from mtp.config import UserError
from mtp.data.tasks import SPLITS, make_task
from mtp.data.tasks.base import check


@dataclasses.dataclass(kw_only=True)
class TaskConfig(tfds.core.BuilderConfig):
    """One dataset variant; build it with `task_config`, which names it."""

    task: str = "addition"
    difficulty: tuple[tuple[str, int], ...] = ()
    n_train: int = 1000
    n_eval: int = 100


def task_config(task_name: str, n_train: int, n_eval: int, **difficulty: int) -> TaskConfig:
    """The config of one dataset variant; validates the task and difficulty.

    The name spells out every difficulty field, defaults included, so one
    dataset has one name however it was asked for.
    """
    params = sorted(make_task(task_name, **difficulty).difficulty.items())
    for field, n in (("n_train", n_train), ("n_eval", n_eval)):
        check(n >= 1, task_name, field, f"must be >= 1, got {n}")
    name = "-".join([task_name, *(f"{k}={v}" for k, v in params), f"train={n_train}-eval={n_eval}"])
    return TaskConfig(
        name=name,
        version="1.0.0",
        task=task_name,
        difficulty=tuple(params),
        n_train=n_train,
        n_eval=n_eval,
    )


class MtpTask(tfds.core.GeneratorBasedBuilder):
    """Worked examples of one `mtp` task: prompt, thought, answer."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds looks for a checksums file beside a builder's module through the
    # `importlib_resources` backport, absent on Python >= 3.9; there is nothing
    # to download, so there is no such file to look for.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({"prompt": text, "thought": text, "answer": text}),
            disable_shuffling=True,  # keep the order of task.examples
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        sizes = {"train": c.n_train, "eval": c.n_eval}
        return {s: self._generate_examples(s, sizes[s]) for s in SPLITS}

    def _generate_examples(self, split, n):
        task = make_task(self.builder_config.task, **dict(self.builder_config.difficulty))
        for i, ex in enumerate(task.examples(split, n)):
            yield i, dataclasses.asdict(ex)


def prepare_tfds(task_name: str, data_dir: str, n_train: int, n_eval: int, **difficulty: int):
    """Builds the dataset under `data_dir` (once) and returns `{split: data source}`."""
    config = task_config(task_name, n_train, n_eval, **difficulty)
    builder = MtpTask(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder.as_data_source()


def load_tfds(task_name: str, data_dir: str, n_train: int, n_eval: int, **difficulty: int):
    """`{split: data source}` of a dataset `prepare_tfds` built; records hold bytes."""
    config = task_config(task_name, n_train, n_eval, **difficulty)
    builder = MtpTask(config=config, data_dir=data_dir)
    if not builder.is_prepared():
        raise UserError(f"no task dataset at {builder.data_path}; build it with prepare_tfds")
    return tfds.data_source(
        "mtp_task", data_dir=data_dir, builder_kwargs={"config": config}, download=False
    )
