"""Headless Chromium (Debian's chromium + chromium-driver) driven by Selenium, for the dashboard's
browser tests; screenshots go to tests/artifacts/ (gitignored)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).parent / "artifacts"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000")


def chromium():
    """A fresh browser (its own profile directory); skips when Chromium is not installed."""
    driver_path = shutil.which("chromedriver")
    binary = shutil.which("chromium")
    if not driver_path or not binary:
        pytest.skip("chromium and chromium-driver are not installed (scripts/setup.sh does it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tempfile.mkdtemp(prefix="claw-chromium-")
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    driver.profile_dir = profile
    return driver


def close(driver) -> None:
    driver.quit()
    shutil.rmtree(driver.profile_dir, ignore_errors=True)


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
