"""Local lmms-eval tasks: a folder for `--include_path` with a YAML and a parquet of embedded images.

    python -m atp.integrations.lmms_tasks shapes --data checkpoints/data/shapes --out checkpoints/lmms_tasks
    python -m atp.integrations.lmms_tasks pope --out checkpoints/lmms_tasks --samples 200
    lmms-eval --model atp --include_path checkpoints/lmms_tasks --tasks shapesvqa ...

- `shapesvqa`: the ShapesVQA questions of a LLaVA-format JSON (the testbed's test split), scored as
  `evaluate.py` scores them (`atp.integrations.shapes_task`).
- `pope_shapes`: POPE's protocol on ShapesVQA scenes: "is there a <color> <shape> ?", yes / no,
  half present; scored by lmms-eval's own POPE functions (`lmms_eval.tasks.pope.utils`: accuracy,
  precision, recall, F1, yes ratio), named in the YAML with `!function`.

The parquet is written with `datasets` (an lmms-eval dependency), so the image column keeps its
`Image` feature and loads back as PIL images; the YAML names the parquet by absolute path.
Nothing reaches the network (`dataset_path: parquet`).
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

from PIL import Image

from atp.data.llava_format import IMAGE_PLACEHOLDER, load_records

SHAPES_YAML = """\
task: {task}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: generate_until
doc_to_visual: !function atp.integrations.shapes_task.doc_to_visual
doc_to_text: !function atp.integrations.shapes_task.doc_to_text
doc_to_target: !function atp.integrations.shapes_task.doc_to_target
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function atp.integrations.shapes_task.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

POPE_YAML = """\
task: {task}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: generate_until
doc_to_visual: !function lmms_eval.tasks.pope.utils.pope_doc_to_visual
doc_to_text: !function lmms_eval.tasks.pope.utils.pope_doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function lmms_eval.tasks.pope.utils.pope_process_results
metric_list:
  - metric: pope_accuracy
    aggregation: !function lmms_eval.tasks.pope.utils.pope_aggregate_accuracy
    higher_is_better: true
  - metric: pope_precision
    aggregation: !function lmms_eval.tasks.pope.utils.pope_aggregate_precision
    higher_is_better: true
  - metric: pope_recall
    aggregation: !function lmms_eval.tasks.pope.utils.pope_aggregate_recall
    higher_is_better: true
  - metric: pope_f1_score
    aggregation: !function lmms_eval.tasks.pope.utils.pope_aggregate_f1_score
    higher_is_better: true
  - metric: pope_yes_ratio
    aggregation: !function lmms_eval.tasks.pope.utils.pope_aggregate_yes_ratio
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "{post_prompt}"
metadata:
  version: 1.0
"""


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path: Path, rows: list[dict]) -> Path:
    """rows (each with a PIL "image") -> parquet whose image column is a `datasets.Image` feature."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    if not rows:
        raise ValueError(f"no rows to write to {path}.")
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    columns["image"] = [{"bytes": _png(image), "path": None} for image in columns["image"]]
    features = Features(
        {
            key: ImageFeature() if key == "image" else Value("int64" if key == "num_objects" else "string")
            for key in columns
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(columns, features=features).to_parquet(str(path))
    return path


def shapes_rows(json_path: str | Path, image_folder: str | Path, max_samples: int | None = None) -> list[dict]:
    """One row per ShapesVQA record: its first question as `evaluate.py` reads it (placeholder removed)."""
    rows = []
    for index, record in enumerate(load_records(json_path, image_folder)[:max_samples]):
        human = next(t["value"] for t in record["conversations"] if t["from"] in ("human", "user"))
        answer = next(t["value"] for t in record["conversations"] if t["from"] in ("gpt", "assistant"))
        rows.append(
            {
                "id": str(record.get("id", index)),
                "question": human.replace(IMAGE_PLACEHOLDER, "").strip(),
                "answer": answer.strip(),
                "question_type": record.get("question_type", "all"),
                "num_objects": int(record.get("num_objects", -1)),
                "image": Image.open(Path(image_folder) / record["image"]).convert("RGB"),
            }
        )
    return rows


def write_shapes_task(
    out: str | Path,
    json_path: str | Path,
    image_folder: str | Path,
    max_samples: int | None = None,
    task: str = "shapesvqa",
    max_new_tokens: int = 3,
) -> Path:
    """Write `<out>/<task>.yaml` and `<out>/<task>.parquet`; returns the folder for --include_path.
    max_new_tokens: 3, as evaluate.py generates."""
    out = Path(out).resolve()
    parquet = write_parquet(out / f"{task}.parquet", shapes_rows(json_path, image_folder, max_samples))
    (out / f"{task}.yaml").write_text(SHAPES_YAML.format(task=task, parquet=parquet, max_new_tokens=max_new_tokens))
    return out


def pope_rows(samples: int, seed: int = 0) -> list[dict]:
    """POPE-style rows on seeded ShapesVQA scenes: presence questions, half of them about an
    object in the image (ShapesVQA's presence rule, `atp.data.shapes.ask`)."""
    from atp.data.shapes import ask, render, sample_scene

    rng = random.Random(seed)
    rows = []
    for index in range(samples):
        objects = sample_scene(rng)
        question, answer = ask(objects, "presence", rng)
        rows.append({"question_id": f"{index:06d}", "question": question, "answer": answer, "image": render(objects)})
    return rows


def write_pope_task(
    out: str | Path,
    rows: list[dict],
    task: str = "pope_shapes",
    max_new_tokens: int = 3,
    post_prompt: str = "",
) -> Path:
    """Write `<out>/<task>.yaml` and its parquet for rows {"question_id", "question", "answer"
    ("yes" / "no"), "image"}; scored by lmms-eval's POPE functions. post_prompt: POPE's default is
    "\\nAnswer the question using a single word or phrase." (empty here: the testbed has no such words)."""
    bad = sorted({row["answer"] for row in rows} - {"yes", "no"})
    if bad:
        raise ValueError(f"POPE answers are 'yes' or 'no'; got {bad}.")
    out = Path(out).resolve()
    parquet = write_parquet(out / f"{task}.parquet", rows)
    text = POPE_YAML.format(
        task=task, parquet=parquet, max_new_tokens=max_new_tokens, post_prompt=json.dumps(post_prompt)[1:-1]
    )
    (out / f"{task}.yaml").write_text(text)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=("shapes", "pope"))
    parser.add_argument("--out", type=Path, required=True, help="the task folder (lmms-eval's --include_path)")
    parser.add_argument("--data", type=Path, default=Path("checkpoints/data/shapes"), help="ShapesVQA data root")
    parser.add_argument("--split", default="test", help="ShapesVQA split (its <split>.json)")
    parser.add_argument("--samples", type=int, default=None, help="first N questions (shapes) / N questions (pope)")
    args = parser.parse_args(argv)
    if args.task == "shapes":
        folder = write_shapes_task(args.out, args.data / f"{args.split}.json", args.data / "images", args.samples)
    else:
        folder = write_pope_task(args.out, pope_rows(args.samples or 500))
    print(f"task written to {folder} (lmms-eval --include_path {folder})")


if __name__ == "__main__":
    main()
