"""The OpenAI-compatible model a stage talks to: addresses, fleets and header parsers (``endpoints``), the async
chat client and its request settings (``client``), and the Batch API side (``batch_api``, light enough for the
triggerer). Generation, evaluation and the judge all call a model through this package."""
