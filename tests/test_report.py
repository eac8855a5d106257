"""The run's report and the approval gate, on one real run shared by the module's tests.

One private Airflow (real logins: the Simple auth manager, as in docker/) runs ``distill_r1`` on 8 MATH training
problems with *Approve before fine-tuning* on. The browser test approves the gate from the UI, sees fine-tuning
start, waits for the run to finish and opens its Report tab (screenshots kept under ``docs/``); the others read
the same finished run: the plugin's app through the API server (logged in, anonymous, a folder outside the runs),
and the report's figures against the stats files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from distilled_plugins.core.schema import EVALUATION, PACKED_ENTRY, REPORT_FILE
from distilled_plugins.devtools.demo import airflow_for_demo, demo_settings, make_seed
from distilled_plugins.devtools.local_airflow import free_port
from distilled_plugins.report.approval import data_summary
from distilled_plugins.report.collect import collect, previous_run
from distilled_plugins.report.render import render
from operators.approval import TASK_ID as GATE
from operators.dag_helpers.deployment import parse
from tests.support import MATH_TRAIN_SOLUTIONS, REPO, browser, read_jsonl, run_cli, wait_until

DAG_ID = "distill_r1"
DOCS = REPO / "docs"
PLUGIN = "distill_report"


def figure(page: str, name: str) -> str:
    """The text of the table cell tagged ``data-figure="name"``."""
    found = re.search(rf'data-figure="{re.escape(name)}">([^<]*)<', page)
    assert found, f"no figure {name} in the report"
    return found.group(1)


def number(text: str) -> float:
    return float(text.replace(",", ""))


def get_report(af, dag_id: str, run_id: str, token: str | None = None) -> tuple[int, str]:
    """GET the plugin's report page through the API server: (status, body); ``token=""``: anonymously."""
    query = urllib.parse.urlencode({"dag_id": dag_id, "run_id": run_id})
    token = af.token if token is None else token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{af.url}/distill-report/run?{query}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def states(af, run_id: str) -> dict[str, str | None]:
    return {ti["task_id"]: ti["state"] for ti in af.task_instances(DAG_ID, run_id) if ti["map_index"] <= 0}


def wait_for_gate(af, run_id: str, timeout: float = 600) -> None:
    """Until the gate has waited for a person for a few seconds. An answer within a second of the task parking
    races Airflow's bookkeeping: the answer reschedules the task before the scheduler has seen the parking
    workload end, which it then takes for a task changed externally and retries, and the answer is lost. No person
    answers that fast; a test must not either."""
    since = None

    def settled() -> bool:
        nonlocal since
        if states(af, run_id).get(GATE) != "awaiting_input":
            since = None
            return False
        since = since or time.monotonic()
        return time.monotonic() - since >= 5

    wait_until(settled, timeout, "the approval task to wait for a person", interval=1)


@pytest.fixture(scope="module")
def gated_run(module_replay_teacher, tmp_path_factory):
    """A run with the approval gate on, waiting at it (the plugin must be registered: the project installed)."""
    tmp = tmp_path_factory.mktemp("report")
    seed = make_seed(tmp / "seed" / "seed.jsonl", 8)
    settings = {**demo_settings(tmp, seed), "eval_limit": 2, "eval_max_new_tokens": 8}
    _teacher, url = module_replay_teacher(solutions=MATH_TRAIN_SOLUTIONS)
    af = airflow_for_demo(tmp, url, free_port(), settings, users="admin:admin")
    with af:
        plugins = af.api("GET", "/api/v2/plugins")["plugins"]
        assert [p["name"] for p in plugins] == [PLUGIN], (
            f"plugins loaded: {plugins}; install the project (pip install -e .) so its airflow.plugins entry "
            "point is registered"
        )
        af.wait_for_dag(DAG_ID)
        run_id = af.trigger(DAG_ID, {**settings, "approve_before_finetune": True})
        wait_until(
            lambda: states(af, run_id).get(GATE) == "awaiting_input" or af.runs(DAG_ID)[0]["state"] == "failed",
            600,
            "the approval task to wait for a person",
            interval=2,
        )
        assert states(af, run_id)[GATE] == "awaiting_input", states(af, run_id)
        yield af, run_id, Path(settings["output_root"]) / DAG_ID / run_id


@pytest.fixture(scope="module")
def finished_run(gated_run):
    """The same run, approved (by the browser test, or here through the REST API when it did not run) and
    finished."""
    af, run_id, _ = gated_run
    if states(af, run_id)[GATE] == "awaiting_input":
        wait_for_gate(af, run_id)
        af.api(
            "PATCH",
            f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{GATE}/-1/hitlDetails",
            {"chosen_options": ["Approve"], "params_input": {}},
        )
    assert af.wait_for_run(DAG_ID, run_id, timeout=900) == "success"
    return gated_run


@pytest.mark.slow
@pytest.mark.airflow
def test_browser_approves_the_gate_then_sees_the_finished_runs_report_tab(gated_run, tmp_path):
    """In headless Chromium: the approval form shows the data summary, Approve starts fine-tuning; the finished
    run's Report tab shows the charts. ``DISTILL_DOCS_SCREENSHOTS=1`` also copies the two shots the README shows
    into docs/."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    af, run_id, _ = gated_run
    run_page = f"{af.url}/dags/{DAG_ID}/runs/{urllib.parse.quote(run_id, safe='')}"
    with browser(tmp_path / "screenshots") as page:
        driver = page.driver
        body = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731
        driver.get(f"{af.url}/api/v2/version")  # the UI's login keeps its token in this cookie
        driver.add_cookie({"name": "_token", "value": af.token, "path": "/"})

        # the gate: its body (the data summary, the report's link) and the two choices
        driver.get(f"{run_page}/tasks/{GATE}/required_actions")
        page.wait(lambda: "Kept rows" in body() and "Open the distillation report" in body(), "the approval form")
        approve = page.wait(
            lambda: next((b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Approve"), None),
            "the Approve button",
        )
        assert "Without an answer within 24 h: Reject" in body()
        form_shot = page.shot("approval-form")
        approve.click()
        page.wait(
            lambda: states(af, run_id).get("finetune") in ("queued", "running", "deferred", "success"),
            "fine-tuning to start once approved",
        )
        page.shot("approved")
        assert states(af, run_id)[GATE] == "success"
        assert af.wait_for_run(DAG_ID, run_id, timeout=900) == "success"

        # the finished run's page: the Report tab shows the report in a frame, charts included
        driver.get(run_page)

        def open_report_tab() -> bool:  # the page re-renders while it loads: find the tab afresh each time
            try:
                tab = next((a for a in driver.find_elements(By.TAG_NAME, "a") if a.text.strip() == "Report"), None)
                if tab is not None:
                    tab.click()
                return driver.current_url.endswith("/plugin/distill-report")
            except StaleElementReferenceException:
                return False

        page.wait(open_report_tab, "the Report tab to open")
        frame = page.wait(lambda: driver.find_elements(By.TAG_NAME, "iframe"), "the report's frame")[0]
        assert frame.size["height"] > 300, frame.size
        driver.switch_to.frame(frame)
        page.wait(
            lambda: "Fine-tuning loss" in driver.page_source and "MATH-500 by level" in driver.page_source,
            "the report's charts",
        )
        charts = driver.find_elements(By.CSS_SELECTOR, "figure.chart svg")
        assert len(charts) >= 5 and all(c.size["height"] > 100 for c in charts[:1]), len(charts)
        assert "approved by admin" in driver.find_element(By.TAG_NAME, "body").text
        driver.switch_to.default_content()
        report_shot = page.shot("report-tab")
        if os.environ.get("DISTILL_DOCS_SCREENSHOTS") == "1":
            shutil.copy(form_shot, DOCS / "approval-form.png")
            shutil.copy(report_shot, DOCS / "report-tab.png")


@pytest.mark.slow
@pytest.mark.airflow
def test_report_figures_are_the_stats_files(finished_run, tmp_path):
    _af, _run_id, run_dir = finished_run
    written = run_dir / REPORT_FILE  # by the DAG's report task, at the end of the run
    assert written.exists()
    # the CLI writes the same page elsewhere
    done = run_cli("report", "--run-dir", str(run_dir), "--dst", str(tmp_path / "r.html"))
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "r.html").read_text()
    assert "<script" not in page and 'src="http' not in page  # self-contained: inline SVG and data: images only
    assert page.count("<svg") >= 4  # funnel, acceptance by subject, completion lengths, loss, MATH-500 by level

    shards = [json.loads(p.read_text()) for p in sorted(run_dir.glob("generate/shard-*.stats.json"))]
    merged = json.loads((run_dir / "merge/generations.stats.json").read_text())
    filtered = json.loads((run_dir / "reject_sampling/filtered.stats.json").read_text())
    handled = json.loads((run_dir / "handle/stats.json").read_text())
    packed = json.loads((run_dir / "pack/stats.json").read_text())
    evaluation = json.loads((run_dir / "evaluate/report.json").read_text())
    metrics = json.loads(next(run_dir.glob("finetune/job-*/metrics.json")).read_text())
    decision = json.loads((run_dir / GATE / "decision.json").read_text())

    assert number(figure(page, "funnel.seed_rows")) == shards[0]["seed_rows"] == 8
    assert number(figure(page, "funnel.generated")) == merged["rows_out"]
    assert number(figure(page, "funnel.kept")) == filtered["rows_out"]
    assert number(figure(page, "funnel.handled")) == handled["rows_out"]
    assert number(figure(page, "funnel.packed_rows")) == packed["packs"]
    assert number(figure(page, "funnel.trained_tokens")) == packed["tokens"] * metrics["steps"][-1]["epochs"]
    for stage, stats in (("reject_sampling", filtered), ("handle", handled), ("pack", packed)):
        assert number(figure(page, f"{stage}.rows_in")) == stats["rows_in"]
        assert number(figure(page, f"{stage}.dropped")) == sum(stats["dropped"].values())
    assert number(figure(page, "teacher.requests_sent")) == sum(s["requests_sent"] for s in shards)
    assert number(figure(page, "teacher.completion_tokens")) == sum(s["completion_tokens"] for s in shards)
    assert number(figure(page, "teacher.cost_estimate")) == sum(s["cost_estimate"] for s in shards)
    assert number(figure(page, "grading.generations_graded")) == filtered["generations_graded"]
    assert number(figure(page, "grading.rejected.truncated")) == filtered["rejected_generations"]["truncated"]
    assert number(figure(page, "lengths.max_tokens")) == shards[0]["sampling"]["max_tokens"]
    assert number(figure(page, "lengths.seq_length")) == packed["seq_length"]
    assert number(figure(page, "packing.efficiency")) == pytest.approx(packed["efficiency"], abs=1e-4)
    assert number(figure(page, "training.final_loss")) == pytest.approx(metrics["final_loss"], rel=1e-3)
    assert number(figure(page, "evaluation.pass@1")) == evaluation["pass@1"]
    assert number(figure(page, "evaluation.problems")) == evaluation["problems"] == 2
    # acceptance by the seed's subject column: rows per subject in the merged generations vs the kept rows
    subjects = [r["subject"] for r in read_jsonl(run_dir / "merge/generations.jsonl")]
    kept = [r["subject"] for r in read_jsonl(run_dir / "reject_sampling/filtered.jsonl")]
    for subject in set(subjects):
        share = 100 * kept.count(subject) / subjects.count(subject)
        assert number(figure(page, f"acceptance.subject.{subject}")) == pytest.approx(share, abs=0.05)
    # the completion lengths are the teacher's usage figures, one per completion
    lengths = [
        u["completion_tokens"] for r in read_jsonl(run_dir / "merge/generations.jsonl") for u in r["api_metadata"]
    ]
    assert number(figure(page, "lengths.completions")) == len(lengths)
    assert number(figure(page, "lengths.completion_max")) == max(lengths)
    # the gate's decision heads the report
    assert decision["chosen"] == "Approve" and decision["responded_by"] == "admin"
    assert figure(page, "decision.chosen").startswith("Approve: fine-tuning approved by admin")


@pytest.mark.slow
@pytest.mark.airflow
def test_report_app_in_the_api_server_needs_a_login_and_stays_in_the_runs_folder(finished_run):
    af, run_id, run_dir = finished_run
    status, page = get_report(af, DAG_ID, run_id)
    assert status == 200 and f"Distillation report: {run_id}" in page and page.count("<svg") >= 4
    assert number(figure(page, "funnel.packed_rows")) == json.loads((run_dir / "pack/stats.json").read_text())["packs"]

    status, page = get_report(af, DAG_ID, run_id, token="")  # anonymous
    assert status == 401 and "Distillation" not in page
    status, page = get_report(af, DAG_ID, run_id, token=af.token[:-6] + "AAAAAA")  # a forged token
    assert status in (401, 403) and "Distillation" not in page
    status, page = get_report(af, DAG_ID, "../../../etc")  # not a run: no path is built from it
    assert status == 404, page
    # a real run whose id resolves to the runs' folder itself (Airflow refuses "..", accepts "."): refused
    af.api("POST", "/api/v2/dags/publish_model/dagRuns", {"dag_run_id": ".", "logical_date": None})
    status, page = get_report(af, "publish_model", ".")
    assert status == 403 and "outside the runs' folder" in page
    # the tab is on the run page: the plugin's external view, destination dag_run
    views = af.api("GET", "/api/v2/plugins")["plugins"][0]["external_views"]
    assert [(v["name"], v["destination"]) for v in views] == [("Report", "dag_run")]


@pytest.mark.slow
@pytest.mark.airflow
def test_reject_ends_the_run_without_training_and_says_so(finished_run):
    af, first_run, first_dir = finished_run
    conf = next(r for r in af.runs(DAG_ID) if r["dag_run_id"] == first_run)["conf"]
    run_id = af.trigger(DAG_ID, conf)  # the same data: the generation store answers, the teacher is not asked
    wait_for_gate(af, run_id)
    af.api(
        "PATCH",
        f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{GATE}/-1/hitlDetails",
        {"chosen_options": ["Reject"], "params_input": {}},
    )
    assert af.wait_for_run(DAG_ID, run_id, timeout=600) == "success"  # as Airflow's approval: a rejection ends well
    teardowns = ("report", "fail_if_stopped")
    wait_until(lambda: {states(af, run_id)[t] for t in teardowns} <= {"success", "failed"}, 300, "the teardowns")
    final = states(af, run_id)
    assert final[GATE] == "success" and final["finetune"] == "skipped" and final["evaluate"] == "skipped", final
    assert final["report"] == final["fail_if_stopped"] == "success", final
    run_dir = first_dir.parent / run_id
    assert not (run_dir / "finetune").exists()  # nothing trained
    decision = json.loads((run_dir / GATE / "decision.json").read_text())
    assert decision["chosen"] == "Reject" and not decision["approved"] and decision["responded_by"] == "admin"
    page = (run_dir / REPORT_FILE).read_text()
    assert "Reject: fine-tuning rejected by admin" in page and "the run ended without training" in page
    assert "Not trained: fine-tuning was rejected at the approval gate." in page
    # MATH-500 is compared with the previous run that has an evaluation report: the first one
    assert previous_run(run_dir) == first_dir


def test_the_gate_is_off_by_default_and_a_deployment_turns_it_on_for_seed_refreshes():
    from airflow.sdk import DAG

    from operators.approval import FinetuneApprovalOperator

    assert parse('{"approval": {"seed_refresh": true}}')["approval"] == {"seed_refresh": True}
    with pytest.raises(ValueError, match="on_timeout"):
        parse('{"approval": {"on_timeout": "Maybe"}}')
    with DAG("gate_check", schedule=None):
        gate = FinetuneApprovalOperator(task_id=GATE, enabled="False", seed_refresh=True, run_dir="/tmp")

    class Run:
        def __init__(self, run_type):
            self.run_type = run_type

    assert not gate.gate_on({"dag_run": Run("manual")})
    assert gate.gate_on({"dag_run": Run("asset_triggered")})
    assert gate.defaults == ["Reject"] and gate.response_timeout.total_seconds() == 24 * 3600


def test_the_report_of_a_run_that_has_just_started_says_what_is_missing(tmp_path):
    run_dir = tmp_path / "distill_r1" / "manual__2026-01-01T00:00:00+00:00"
    run_dir.mkdir(parents=True)
    page = render(collect(run_dir))
    for missing in ("No stage has finished yet.", "Fine-tuning has not started yet.", "Not evaluated yet."):
        assert missing in page
    assert figure(page, "funnel.kept") == ""
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        collect(tmp_path / "distill_r1" / "absent")


def test_the_report_reads_the_packed_entrys_folder_and_the_job_evaluate_used(tmp_path):
    run_dir = tmp_path / "distill_r1" / "manual__2026-01-02T00:00:00+00:00"
    packed = tmp_path / "packed_earlier"  # packed by another run: the packed dataset entry point trains on it
    packed.mkdir(parents=True)
    stats = {"rows_in": 20, "rows_out": 7, "dropped": {}, "packs": 7, "tokens": 900, "seq_length": 256}
    (packed / "stats.json").write_text(json.dumps(stats))
    (run_dir / "from_packed").mkdir(parents=True)
    (run_dir / PACKED_ENTRY).write_text(json.dumps({"path": str(packed)}))
    metrics = {"first_loss": 2.0, "final_loss": 1.0, "median_step_time_ms": 5, "tokens_per_s": 1, "workers": 1}
    jobs = []
    for name, epochs in (("job-aaaa", 1), ("job-bbbb", 2)):  # the second is the newer
        (run_dir / "finetune" / name / "checkpoint").mkdir(parents=True)
        (run_dir / "finetune" / name / "metrics.json").write_text(
            json.dumps({**metrics, "steps": [{"step": 1, "loss": 1.0, "epochs": epochs}]})
        )
        jobs.append(run_dir / "finetune" / name)
        os.utime(jobs[-1], (1_000 * len(jobs), 1_000 * len(jobs)))
    (run_dir / "evaluate").mkdir()
    evaluation = {"pass@1": 50.0, "problems": 2, "checkpoint": str(jobs[0] / "checkpoint")}
    (run_dir / EVALUATION).write_text(json.dumps(evaluation))

    figures = collect(run_dir)
    assert figures["packing"]["packs"] == 7 and dict(figures["funnel"])["packed rows"] == 7
    assert data_summary(figures)["tokens"] == 900
    # evaluated after both jobs: the training figures are those of the job whose checkpoint was evaluated
    assert figures["training"]["job"] == "job-aaaa" and dict(figures["funnel"])["trained tokens"] == 900
    os.utime(run_dir / EVALUATION, (1_500, 1_500))  # a job began after it (finetune cleared): the newest
    assert collect(run_dir)["training"]["job"] == "job-bbbb"
