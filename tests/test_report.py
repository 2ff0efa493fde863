"""``python -m mmpeft report RUN_DIR``: one self-contained HTML page from a run's event files."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import run_main
from torch.utils.tensorboard import SummaryWriter

from mmpeft import plots
from mmpeft.report import best_point, lower_is_better, read_run, task_table

TASKS = ["caption", "vqa"]
CONFIG = "model:\n  adapters:\n  - name: asymlora  # <routed> & logged\n"


class Links(HTMLParser):
    """Every src/href of a page, and the text of its table cells by row."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href")]
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join(self._cell))
            self._cell = None


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run's event file as the monitor and the module write it: losses, per-task metrics, a routing heatmap; its
    config beside it."""
    run = tmp_path / "runs" / "demo" / "version_3"
    writer = SummaryWriter(str(run))
    for step in range(0, 40, 5):
        writer.add_scalar("train/loss", 5.0 - step / 10, step)
        writer.add_scalar("train/loss/caption", 5.5 - step / 10, step)
        writer.add_scalar("train/loss/vqa", 4.5 - step / 20, step)
        writer.add_scalar("train/aux/load_balance", 3.0, step)
        writer.add_scalar("train/tokens_per_sec", 1234.0, step)
        writer.add_scalar("routing/asymlora/entropy", 0.9, step)
    # Validation at steps 19 and 39: vqa's exact match peaks early, caption's loss keeps falling.
    for step, em_vqa, loss_caption in ((19, 0.6, 3.0), (39, 0.4, 2.5)):
        writer.add_scalar("val/loss", 3.3, step)
        writer.add_scalar("val/exact_match", 0.5, step)
        writer.add_scalar("val/vqa/exact_match", em_vqa, step)
        writer.add_scalar("val/caption/loss", loss_caption, step)
        heatmap = plots.rgb(plots.heatmap(np.array([[0.7, 0.3], [0.2, 0.8]]), TASKS, f"step {step}"))
        writer.add_image("routing/asymlora/task_expert", heatmap, step, dataformats="HWC")
    writer.close()
    (run / "config.yaml").write_text(CONFIG)
    return run


def decoded_images(page: str) -> list[Image.Image]:
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    return [Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1], validate=True))) for s in sources]


def test_report_is_one_page_with_curves_task_table_heatmap_and_config(run_dir, capsys):
    code, stderr = run_main(capsys, "report", str(run_dir))
    assert code == 0, stderr
    page = (run_dir / "report.html").read_text()
    assert not list(run_dir.glob(".report.html.*"))  # written atomically, nothing left beside it

    # Nothing outside the page: every src/href is a data URI or a file that exists.
    parser = Links()
    parser.feed(page)
    assert parser.links and all(link.startswith("data:") or (run_dir / link).exists() for link in parser.links)
    images = decoded_images(page)
    assert all(image.format == "PNG" for image in images)
    # Losses, per-task losses, auxiliary losses, the heatmap, the entropy: 5 images.
    # The heatmap is the event file's own.
    assert len(images) == 5
    heatmap = [image for image in images if image.size == plots.heatmap_size(TASKS, 2)]
    assert len(heatmap) == 1
    assert "validation at step 39" in page

    # The per-task table: the last train loss; each validation metric's last value and its best with the step.
    header, *rows = parser.rows
    assert header == ["task", "train loss", "loss", "exact_match"]
    assert rows == [
        ["caption", "2", "2.5 best 2.5 @ 39", ""],
        ["vqa", "2.75", "", "0.4 best 0.6 @ 19"],
        ["all tasks", "", "3.3 best 3.3 @ 19", "0.5 best 0.5 @ 19"],
    ]
    assert "&lt;routed&gt; &amp; logged" in page  # the config, escaped


def test_report_reads_what_tensorboard_holds(run_dir):
    run = read_run(run_dir)
    assert run.scalars["val/vqa/exact_match"] == [(19, pytest.approx(0.6)), (39, pytest.approx(0.4))]
    step, png = run.images["routing/asymlora/task_expert"]
    assert step == 39 and Image.open(io.BytesIO(png)).size == plots.heatmap_size(TASKS, 2)
    tasks, metrics, _ = task_table(run)
    assert tasks == ["caption", "vqa", "all tasks"] and metrics == ["train loss", "loss", "exact_match"]
    assert run.config == CONFIG


def test_report_out_elsewhere(run_dir, tmp_path, capsys):
    out = tmp_path / "pages" / "run.html"
    code, _ = run_main(capsys, "report", str(run_dir), "--out", str(out))
    assert code == 0 and out.is_file() and not (run_dir / "report.html").exists()
    assert len(decoded_images(out.read_text())) == 5


def test_better_is_lower_for_losses_and_error_rates_only():
    assert lower_is_better("val/loss") and lower_is_better("val/caption/wer") and lower_is_better("val/ocr/char_error")
    assert not lower_is_better("val/vqa/answer_f1") and not lower_is_better("val/exact_match")  # "answer" holds "wer"
    assert best_point("val/loss", [(1, 2.0), (2, 1.0), (3, 1.0)]) == (2, 1.0)
    assert best_point("val/exact_match", [(1, 0.2), (2, 0.1)]) == (1, 0.2)


def test_bad_run_dir_is_one_error_line_naming_it(tmp_path, run_dir, capsys):
    missing = tmp_path / "no" / "such" / "run"
    code, stderr = run_main(capsys, "report", str(missing))
    assert code == 2 and stderr == f"error: report: run directory {str(missing)!r} does not exist\n"

    empty = tmp_path / "empty"
    empty.mkdir()
    code, stderr = run_main(capsys, "report", str(empty))
    assert code == 2 and str(empty) in stderr and "events.out.tfevents" in stderr and stderr.count("\n") == 1

    # The parent of a run's folder: the message names the runs inside it.
    code, stderr = run_main(capsys, "report", str(run_dir.parent))
    assert code == 2 and f"runs below it: {run_dir}" in stderr
    assert not (run_dir.parent / "report.html").exists()
