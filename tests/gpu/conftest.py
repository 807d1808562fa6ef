import os

# GPU tests need the real Triton compiler: under the interpreter (turned on by tests/conftest.py unless
# FLASHLLM_TEST_GPU=1) they are not collected.
collect_ignore_glob = ["test_*.py"] if os.environ.get("TRITON_INTERPRET") == "1" else []
