"""The suite's own rules, as conftest.py enforces them."""

from __future__ import annotations

import pytest

from distilled_plugins.devtools.local_airflow import LocalAirflow, free_port


def test_a_test_not_marked_airflow_cannot_start_airflows_services(tmp_path):
    airflow = LocalAirflow(tmp_path / "airflow", free_port())
    refused = r"test_suite_rules\.py::test_a_test\S* starts Airflow's services.*: mark it @pytest\.mark\.airflow"
    try:
        with pytest.raises(pytest.fail.Exception, match=refused):
            airflow.start()
    finally:
        airflow.stop()  # were it started after all
    assert not airflow.processes and not (tmp_path / "airflow" / "logs").exists()  # refused before starting any
