"""The trigger form of ``distill_r1`` as a user meets it: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium) against a real Airflow started here with the demo's deployment defaults.

Screenshots of every step are saved under the test's tmp folder; a failure message lists them.
"""

from __future__ import annotations

import pytest

from distilled_plugins.devtools.demo import airflow_for_demo, demo_settings, make_seed
from distilled_plugins.devtools.local_airflow import free_port
from tests.support import MATH_TRAIN_SOLUTIONS, browser

DAG_ID = "distill_r1"
SECTIONS = ["Data", "Teacher", "Processing", "Fine-tune", "Multi-node (rarely changed)", "Evaluation", "Output"]
REQUIRED = "This field is required"  # Airflow's message for an emptied field that does not accept null


def visible_text(elements) -> list[str]:
    return [e.text.strip() for e in elements if e.is_displayed() and e.text.strip()]


def button(form, text: str):
    from selenium.webdriver.common.by import By

    return next(b for b in form.find_elements(By.TAG_NAME, "button") if b.text.strip() == text)


def labels(form) -> set[str]:
    """The field labels shown (without the '*' Airflow adds to required fields)."""
    from selenium.webdriver.common.by import By

    return {t.rstrip("*").strip() for t in visible_text(form.find_elements(By.TAG_NAME, "label"))}


@pytest.mark.slow
@pytest.mark.airflow
def test_trigger_form_shows_labelled_sections_refuses_an_empty_field_and_submits_its_defaults(replay_teacher, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    seed = make_seed(tmp_path / "seed" / "seed.jsonl", 4)
    settings = demo_settings(tmp_path, seed)  # the demo's deployment defaults (Variable distill_deployment)
    _teacher, url = replay_teacher(solutions=MATH_TRAIN_SOLUTIONS)
    with browser(tmp_path / "screenshots") as page:
        driver = page.driver
        with airflow_for_demo(tmp_path, url, free_port(), settings) as af:
            af.wait_for_dag(DAG_ID)
            params = af.api("GET", f"/api/v2/dags/{DAG_ID}/details")["params"]
            driver.get(f"{af.url}/dags/{DAG_ID}")
            trigger = page.wait(
                lambda: driver.find_elements(By.CSS_SELECTOR, "[data-testid=trigger-dag-button]"), "the Trigger button"
            )[0]
            page.shot("dag")
            trigger.click()

            def dialog():
                found = [d for d in driver.find_elements(By.CSS_SELECTOR, "[role=dialog]") if "Trigger Dag" in d.text]
                return found[0] if found else None

            form = page.wait(dialog, "the trigger form")
            page.wait(lambda: "Data" in visible_text(form.find_elements(By.TAG_NAME, "button")), "the form's sections")
            page.shot("form")
            buttons = visible_text(form.find_elements(By.TAG_NAME, "button"))
            shown = [b for b in buttons if b in SECTIONS]
            assert shown == SECTIONS, f"sections shown: {buttons}; screenshots: {page.listing()}"

            def submit_button():
                return [b for b in form.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Trigger"][-1]

            assert submit_button().is_enabled(), f"Trigger is disabled with the defaults; see {page.listing()}"

            # every field, section by section: its title is the label, its description under it, no error
            for section in SECTIONS:
                header = button(form, section)
                if header.get_attribute("aria-expanded") != "true":
                    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", header)
                    header.click()
                wanted = {
                    p["schema"]["title"]: p["description"] for p in params.values() if p["schema"]["section"] == section
                }
                page.wait(
                    lambda wanted=wanted: set(wanted) <= labels(form),
                    f"the labels of section {section}: {sorted(wanted)}",
                )
                page.shot(f"section-{section.split()[0].lower()}")
                for title, description in wanted.items():
                    assert description in form.text, f"{title}: description not shown; see {page.listing()}"
                assert REQUIRED not in form.text, f"{section}: a field reports an error; see {page.listing()}"
                if section == "Data":  # the datasets of the other entry points are optional: no '*'
                    raw = visible_text(form.find_elements(By.TAG_NAME, "label"))
                    optional = [t for t in raw if t.rstrip("*").strip() in ("OpenR1 dataset", "Packed dataset")]
                    assert len(optional) == 2 and not any(t.endswith("*") for t in optional), raw
                    assert any(t.rstrip().endswith("*") and "Seed dataset" in t for t in raw), raw
                if section == "Fine-tune":  # an enum shows its readable choice, not the file name
                    assert "Tiny CPU model (demo)" in form.text, f"values_display not shown; see {page.listing()}"
                if section == "Teacher":  # the teacher mode, online by default (batch: the Batch API)
                    assert "Online: requests one by one" in form.text, f"no teacher mode; see {page.listing()}"

            # an invalid value: the seed dataset emptied is refused in the form (error shown, Trigger disabled)
            data = button(form, "Data")
            if data.get_attribute("aria-expanded") != "true":
                data.click()
            field = page.wait(lambda: driver.find_element(By.ID, "element_seed_dataset"), "the seed dataset field")
            page.wait(field.is_displayed, "the seed dataset field to show")
            assert field.get_attribute("value") == str(seed)  # the deployment's default is filled in
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(Keys.DELETE)
            page.wait(lambda: REQUIRED in form.text, "the form to refuse an empty seed dataset")
            page.wait(lambda: not submit_button().is_enabled(), "Trigger to be disabled")
            page.shot("refused")
            assert af.runs(DAG_ID) == []

            # a fresh form, untouched: submitting the defaults starts a run with them as its conf
            driver.refresh()
            trigger = page.wait(
                lambda: driver.find_elements(By.CSS_SELECTOR, "[data-testid=trigger-dag-button]"), "the Trigger button"
            )[0]
            trigger.click()
            form = page.wait(dialog, "the trigger form again")
            page.wait(lambda: submit_button().is_enabled(), "the form to accept its defaults")
            page.shot("fresh-form")
            submit = submit_button()
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", submit)
            submit.click()
            runs = page.wait(lambda: af.runs(DAG_ID), "the run to start (REST API)")
            page.shot("submitted")
            assert len(runs) == 1 and runs[0]["run_type"] == "manual", runs
            conf = runs[0]["conf"]
            assert conf["seed_dataset"] == str(seed) and conf["finetune_config"] == "finetune_tiny_cpu.yaml", conf
            assert conf["base_checkpoint"] is None and conf["shards"] == settings["shards"], conf
            run_id = runs[0]["dag_run_id"]
            page.wait(
                lambda: [t for t in af.task_instances(DAG_ID, run_id) if t["state"]], f"run {run_id} to start a task"
            )
            af.set_run_state(DAG_ID, run_id, "failed")  # no need to finish it

            # the seed asset's page shows its description and URI; the DAG docs show the chain as code
            asset = af.api("GET", "/api/v2/assets?name_pattern=distill_seed")["assets"][0]
            driver.get(f"{af.url}/assets/{asset['id']}")
            body = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731
            page.wait(lambda: asset["uri"] in body() and "an update to this asset starts" in body(), "the asset's URI")
            page.shot("asset")
            driver.get(f"{af.url}/dags/{DAG_ID}")
            docs = page.wait(
                lambda: driver.find_elements(By.CSS_SELECTOR, "[data-testid=markdown-button]"), "the Dag Docs button"
            )[0]
            docs.click()
            page.wait(
                lambda: any("shard_plan -> generate" in c.text for c in driver.find_elements(By.TAG_NAME, "code")),
                "the DAG docs' chain in a code block",
            )
            page.wait(lambda: "Create Event" in body(), "the DAG docs saying how to announce a seed refresh")
            page.shot("docs")
