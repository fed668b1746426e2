import os

from imageragturbo.benchmarks.conditions import other_busy_processes
from imageragturbo.benchmarks.load import parse_server_timing
from imageragturbo.benchmarks.service_report import update_markdown


def test_parse_server_timing():
    header = "queue_wait;dur=0.25, text_encode;dur=2.5, retrieve;dur=1e-3, bogus, denoise;dur=31.0"
    assert parse_server_timing(header) == {"queue_wait": 0.25, "text_encode": 2.5, "retrieve": 0.001, "denoise": 31.0}


def test_update_markdown_replaces_only_its_own_section(tmp_path):
    page = tmp_path / "service.md"
    update_markdown(page, "tiny", "### tiny\nold\n", "# Title\n")
    update_markdown(page, "shapes-v1", "### shapes-v1\nnumbers\n", "# Title\n")
    update_markdown(page, "tiny", "### tiny\nnew\n", "# Title\n")
    text = page.read_text()
    assert text.startswith("# Title\n") and "old" not in text
    assert text.index("### tiny\nnew") < text.index("### shapes-v1\nnumbers")


def test_other_busy_processes_reports_niceness_and_cpu_share():
    ticks = os.sysconf("SC_CLK_TCK")
    start = (100.0, {1: (-5, 0), 2: (10, 0), 3: (0, 0), 4: (0, 0)})
    end = (102.0, {1: (-5, int(1.8 * ticks)), 2: (10, int(0.1 * ticks)), 3: (0, 2 * ticks), 5: (0, 9 * ticks)})
    # pid 3 is excluded (the bench's own); 2 used 5% (under the 10% floor); 4 ended, 5 started meanwhile.
    assert other_busy_processes(start, end, exclude={3}) == [{"pid": 1, "nice": -5, "cpu_pct": 90.0}]
