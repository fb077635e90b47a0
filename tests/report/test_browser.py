"""The MLflow UI in a real browser: a tiny study, `make ui` over its store, headless Chromium through Selenium.

Screenshots of each step go to $SEARCHLAB_SCREENSHOTS (default tests/artifacts/, ignored by git), also on failure.
Chromium and ChromeDriver are Debian's (`make system`), named explicitly so Selenium Manager never downloads one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port
from mlflow.tracking import MlflowClient
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait
from ui_servers import ROOT, make_server, run_tiny_study

pytestmark = pytest.mark.e2e

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-quic", "--window-size=1600,1000"]
SCREENSHOTS = Path(os.environ.get("SEARCHLAB_SCREENSHOTS", ROOT / "tests" / "artifacts"))
WAIT_S = 30  # the React app renders in a few seconds; generous for a loaded 2-core machine
STUDY = "browser-study"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"needs {CHROMIUM} and {CHROMEDRIVER}: run `make system`")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never look for a browser or driver online
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER), log_output=str(tmp_path / "cd.log")))
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def step(driver: WebDriver, name: str) -> Iterator[None]:
    """One step of the walk-through; its screenshot is saved at the end of the step, or as FAILED-<name> on error."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # a dead browser must not hide the step's own error
            driver.save_screenshot(str(SCREENSHOTS / f"FAILED-{name}.png"))
        raise
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def shown(driver: WebDriver | WebElement, xpath: str) -> WebElement:
    return WebDriverWait(driver, WAIT_S).until(ec.visibility_of_element_located((By.XPATH, xpath)))


def type_into(field: WebElement, text: str) -> bool:
    """Types `text` into an empty field; False (try again) when the app re-rendered it and dropped the keys."""
    if field.get_property("value") == "":
        field.send_keys(text)
    return field.get_property("value") == text


def run_link(run_id: str) -> str:
    return f"//a[contains(@href, '/runs/{run_id}')]"


def test_the_study_its_nested_trials_their_params_and_config_show_in_the_mlflow_ui(tmp_path, browser):
    run_tiny_study(tmp_path, STUDY)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("searchlab.role") == "study"]
    trials = sorted((r for r in runs if r.data.tags.get("searchlab.role") == "trial"), key=lambda r: r.info.run_name)
    assert len(trials) >= 3
    # the study logged the best trial's model (tracking.log_models=best): its run shows it in the Models column
    (model,) = client.search_logged_models([experiment.experiment_id])
    best = max((t for t in trials if "objective" in t.data.metrics), key=lambda t: t.data.metrics["objective"])
    assert model.source_run_id == best.info.run_id
    for old in SCREENSHOTS.glob("*.png"):
        old.unlink()

    port = free_port()
    with make_server("ui", {"TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "UI_PORT": str(port)},
                     f"http://127.0.0.1:{port}/health", tmp_path / "ui.log") as base:
        base = base.removesuffix("/health")
        # MLflow 3 opens experiments in its GenAI view; the runs table and run pages are its "Model training" view
        view = "?workflowType=machine_learning"
        experiment_page = f"{base}/#/experiments/{experiment.experiment_id}"
        with step(browser, "1-study-and-nested-trials"):
            browser.get(f"{experiment_page}/runs{view}")
            assert shown(browser, run_link(parent.info.run_id)).text == STUDY
            for close in browser.find_elements(By.XPATH, "//*[@data-assistant-ui]//button[@aria-label='Close']"):
                close.click()  # the assistant's side panel only hides part of the table
            if not browser.find_elements(By.XPATH, run_link(trials[0].info.run_id)):
                # the parent's row starts collapsed: its expander is the button in the run-name cell
                shown(browser, f"//*[@role='gridcell'][.{run_link(parent.info.run_id)}]//button").click()
            for trial in trials:
                assert shown(browser, run_link(trial.info.run_id)).text == trial.info.run_name

        with step(browser, "1b-best-trial-model-column"):
            link = WebDriverWait(browser, WAIT_S).until(ec.presence_of_element_located((By.XPATH, (
                # the table's rows are ag-grid's: the run name and the Models cell sit in two rows with the run's id
                f"//*[@role='row'][@row-id='{best.info.run_id}']//a[contains(@href, '/models/{model.model_id}')]"))))
            browser.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'center'})", link)
            assert link.text == "model"
            assert not browser.find_elements(By.XPATH, f"//a[contains(@href, '/models/m-')][not(contains(@href, "
                                                       f"'{model.model_id}'))]")  # no other trial's model

        # params against a metric: a parallel-coordinates chart over the trials shown (expanded) in the table
        with step(browser, "2-params-against-val_acc"):
            shown(browser, "//label[.//input[@name='runs-view-mode'][@value='CHART']]").click()
            shown(browser, "//button[normalize-space()='Add chart']").click()
            shown(browser, "//*[@role='menuitem'][normalize-space()='Parallel coordinates']").click()
            params = sorted(set.intersection(*(set(t.data.params) for t in trials)) - {"optimizer"})[:3]
            for field, names in (("Params", params), ("Metrics", ["val_acc"])):
                box = shown(browser, f"//*[@data-testid='experiment-view-compare-runs-config-field'][h4='{field}']")
                box.find_element(By.XPATH, ".//*[contains(@class, 'select-selector')]").click()
                for name in names:  # a searchable select: typing filters the options, Enter picks the first
                    WebDriverWait(browser, WAIT_S, ignored_exceptions=[StaleElementReferenceException]).until(
                        lambda d, box=box, name=name: type_into(box.find_element(By.XPATH, ".//*[@role='combobox']"),
                                                                name))
                    shown(browser, f"//*[contains(@class, 'select-item-option-active')][@title='{name}']")
                    box.find_element(By.XPATH, ".//*[@role='combobox']").send_keys(Keys.ENTER)
                    shown(box, f".//*[contains(@class, 'select-selection-item')][normalize-space()='{name}']")
                box.find_element(By.XPATH, ".//*[@role='combobox']").send_keys(Keys.ESCAPE)
            for axis in [*params, "val_acc"]:  # plotly draws one titled axis per param and metric
                shown(browser, f"//*[@role='dialog']//*[name()='svg']//*[name()='text'][normalize-space()='{axis}']")

        with step(browser, "3-metric-charts"):
            shown(browser, "//*[@role='dialog']//button[normalize-space()='Add chart']").click()
            shown(browser, "//input[@placeholder='Search metric charts']").send_keys("val_")
            shown(browser, "//*[text()='val_acc']")  # charts render lazily: the search brings val_* to the top
            shown(browser, "//*[text()='val_loss']")

        trial = trials[0]
        with step(browser, "4-trial-run-params"):
            browser.get(f"{experiment_page}/runs/{trial.info.run_id}{view}")
            assert shown(browser, "//h2").text == trial.info.run_name
            assert trial.data.params
            rows = [shown(browser, f"//*[@role='row' or self::tr][.//*[normalize-space()='{key}']]")
                    for key in trial.data.params]
            for row, (key, value) in zip(rows, trial.data.params.items(), strict=True):
                assert value in row.text, (key, value, row.text)
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", rows[0])

        config = Path(client.download_artifacts(trial.info.run_id, "config.yaml", str(tmp_path))).read_text()
        with step(browser, "5-trial-config-artifact"):
            shown(browser, "//button[@role='tab'][normalize-space()='Artifacts']").click()
            shown(browser, "//*[@data-testid='artifact-tree-node'][@artifact-name='config.yaml']").click()
            first_lines = [line.strip() for line in config.splitlines()[:20]]
            WebDriverWait(browser, WAIT_S).until(
                lambda d: all(line in d.find_element(By.TAG_NAME, "body").text for line in first_lines),
                f"config.yaml's first lines not shown: {first_lines}")
