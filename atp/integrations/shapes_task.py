"""ShapesVQA as an lmms-eval task: the document functions its YAML names with `!function`.

A document is one ShapesVQA question: {"id", "question", "answer", "question_type",
"num_objects", "image"} (the image decoded by `datasets`). Scored as `evaluate.py` scores it:
exact match of the first word of the answer (`atp.evaluation.first_word`). Runs without lmms-eval.
"""

from __future__ import annotations

from atp.evaluation import first_word


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict) -> str:
    return doc["question"]


def doc_to_target(doc: dict) -> str:
    return doc["answer"]


def process_results(doc: dict, results: list[str]) -> dict:
    """{"exact_match": 1.0 or 0.0}: the first generated word against the reference answer's."""
    return {"exact_match": float(first_word(results[0]) == first_word(doc["answer"]))}
