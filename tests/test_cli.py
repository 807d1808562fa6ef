"""`python -m flashllm_compile`: help at each level, a tiny explain run, the cache commands (subprocesses, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, cwd: str = REPO, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "TRITON_INTERPRET": "1", "FLASHLLM_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "flashllm_compile", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_help():
    result = cli("--help")
    assert result.returncode == 0
    for command in ("explain", "cache-clear", "cache-info", "bench"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["explain", "cache-clear", "cache-info", "bench"])
def test_subcommand_help(command):
    result = cli(command, "--help")
    assert result.returncode == 0 and f"usage: flashllm-compile {command}" in result.stdout


def test_explain_tiny_llama(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "report.json"
    result = cli("explain", "--arch", "llama", "--config-size", "test", "--sparsity", "0.8", "--device", "cpu",
                 "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model.layers.0.mlp.down_proj" in result.stdout and "sparse_linear" in result.stdout
    assert "linears rewritten" in result.stdout
    rows = {row["name"]: row for row in json.loads(out.read_text())["layers"]}
    assert rows["model.layers.0.mlp.down_proj"]["rewritten"] and not rows["lm_head"]["rewritten"]


def test_cache_clear_and_info(tmp_path):
    (tmp_path / "autotune-gpu-x.json").write_text("{}")
    (tmp_path / "keep.txt").write_text("not ours")
    info = cli("cache-info", "--cache-dir", str(tmp_path))
    assert info.returncode == 0 and "autotune-gpu-x.json" in info.stdout and str(tmp_path) in info.stdout
    cleared = cli("cache-clear", "--cache-dir", str(tmp_path))
    assert cleared.returncode == 0 and "removed 1" in cleared.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_bench_missing_script_is_a_clear_error(monkeypatch, capsys):
    from flashllm_compile import __main__ as cli_main

    monkeypatch.setattr(cli_main, "BENCH_SCRIPTS", {"kernels": "no_such_bench.py", "e2e": "no_such_bench.py"})
    assert cli_main.main(["bench", "kernels"]) == 2
    assert "not found" in capsys.readouterr().err
