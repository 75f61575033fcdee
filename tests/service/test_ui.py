"""The dashboard in a real headless browser (Playwright driving Debian's chromium): create a job
from the page, watch it finish, open its report. ``TUNEFORGE_UI_SCREENSHOT=PATH`` also saves the
page there (how docs/service-ui.png was made)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from svc import chat_file

CHROMIUM = "/usr/bin/chromium"


def test_dashboard_creates_a_job_and_shows_its_report(service, tiny_lm, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: apt-get install -y chromium (make system-deps does)")
    data = chat_file(tiny_lm, tmp_path / "chat.jsonl", n=32)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.goto(service.server.url + "/ui")
        page.fill("#key", service.keys["alpha"])
        page.click("#save-key")
        expect(page.locator("#model option", has_text="tiny-lm")).to_have_count(1)
        page.select_option("#model", "tiny-lm")
        page.set_input_files("#file", str(data))
        page.fill("#suffix", "ui")
        page.fill("#extension", json.dumps({"overrides": {"train.max_steps": 6, "train.log_every": 1,
                                                          "train.eval_every": 2, "output.report": True,
                                                          "task.generation.eval_prompts": 0}}))
        page.click("#submit")
        expect(page.locator("#job-status")).to_contain_text("succeeded", timeout=300_000)
        expect(page.locator("#events")).to_contain_text("The job has successfully completed")
        expect(page.locator("#checkpoints tr").first).to_contain_text("step")
        page.click("#open-report")
        report = page.frame_locator("#report")
        expect(report.locator("body")).not_to_be_empty(timeout=30_000)
        assert "ft:tiny-lm:ui:" in page.locator("#summary").inner_text()
        page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
        if os.environ.get("TUNEFORGE_UI_SCREENSHOT"):
            page.screenshot(path=os.environ["TUNEFORGE_UI_SCREENSHOT"], full_page=True)
        browser.close()
    assert (tmp_path / "ui.png").stat().st_size > 10_000
