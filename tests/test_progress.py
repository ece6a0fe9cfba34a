"""Progress bars: shown on a terminal, quiet under CI or when stderr is redirected; evaluation
and FitPrune calibration report through them."""

from __future__ import annotations

import functools
import io

from torch.utils.data import DataLoader

import atp
from atp.progress import progress, progress_enabled


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def use_terminal(monkeypatch) -> Terminal:
    """stderr as a terminal (inside the test: pytest's capture replaces it between phases)."""
    stream = Terminal()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.delenv("CI", raising=False)
    return stream


def test_enabled_only_on_a_terminal_outside_ci(monkeypatch):
    use_terminal(monkeypatch)
    assert progress_enabled()
    for value in ("true", "1", "yes"):
        monkeypatch.setenv("CI", value)
        assert not progress_enabled()
    for value in ("", "0", "false"):
        monkeypatch.setenv("CI", value)
        assert progress_enabled()
    monkeypatch.setattr("sys.stderr", io.StringIO())  # redirected: a log file, a pipe
    assert not progress_enabled()


def test_the_bar_writes_to_a_terminal_and_nothing_under_ci(monkeypatch):
    terminal = use_terminal(monkeypatch)
    assert list(progress(range(3), "counting")) == [0, 1, 2]
    assert "counting" in terminal.getvalue() and "/3" in terminal.getvalue()
    terminal.seek(0), terminal.truncate()
    monkeypatch.setenv("CI", "true")
    assert list(progress(range(3), "counting")) == [0, 1, 2]
    assert terminal.getvalue() == ""


def test_evaluation_and_fitprune_calibration_show_progress(monkeypatch, tmp_path):
    from atp.calibration.fitprune import FitPruneFitter
    from atp.data.llava_format import LlavaConversationDataset, collate
    from atp.data.processor import build_processor
    from atp.data.shapes import vocabulary, write_dataset
    from atp.evaluation import evaluate
    from tests.conftest import tiny_testbed_model

    terminal = use_terminal(monkeypatch)
    root = write_dataset(tmp_path, {"test": (4, 2, 1)})
    processor = build_processor(vocabulary())
    model = tiny_testbed_model(processor).eval()
    dataset = LlavaConversationDataset(root / "test.json", root / "images", processor, prompt_only=True)
    loader = DataLoader(dataset, batch_size=2, collate_fn=functools.partial(collate, pad_token_id=0))
    atp.apply(model, atp.build_pruner("fastv", layer=1, keep_ratio=0.5).eval())
    evaluate(model, processor, loader, "fastv", latency_batches=1, latency_repeats=1)
    atp.remove(model)
    shown = terminal.getvalue()
    assert "evaluating fastv" in shown and "/2 [" in shown and "latency rounds" in shown
    batches = [{k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")} for b in loader]
    FitPruneFitter(model, batches[:1], 0.6).trial(1.0)  # the statistics pass and one trial
    shown = terminal.getvalue()
    assert "fitprune: statistics" in shown and "fitprune: alpha = 1.00" in shown
