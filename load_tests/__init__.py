"""Load tests for vLLM's OpenAI-compatible server: a locustfile (``locustfile.py``), the headless
concurrency sweep around it (``run_load.py``), and the report it writes (``report.py``).
``workload.py`` holds what both sides share and needs neither locust nor gevent."""
