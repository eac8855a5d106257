"""What the DAG files are built with, apart from the operators: the trigger form's fields (``params``), the
failure contract every task keeps (``failures``), the deployment's queues, pools and output root (``deployment``),
the assets the pipeline reads and produces (``assets``) and what a task returns through XCom (``xcom``)."""
