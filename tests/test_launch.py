"""codegen/kernels/launch.py on the CPU: `precompile` compiles (Triton's warmup, with the options of the real launch)
and launches nothing; a failing call is skipped; outside it, nothing is left precompiling."""

import pytest

from flashllm_compile.codegen.kernels import launch as launch_mod


class FakeKernel:
    """Records warmups; a launch would fail the test."""

    def __init__(self):
        self.warmups = []

    def warmup(self, *args, grid, **kwargs):
        self.warmups.append((args, grid, kwargs))

    def __getitem__(self, grid):
        raise AssertionError("precompile launched a kernel")


def test_precompile_warms_up_with_the_launch_options_and_skips_failures(monkeypatch):
    monkeypatch.setattr(launch_mod, "interpreting", lambda: False)
    kernel = FakeKernel()
    ran = []

    def failing():
        ran.append("failing")
        raise ValueError("not a config for this weight")

    calls = [lambda: launch_mod.launch(kernel, (3, 2, 1), (7, 8), num_warps=2, pdl=True, BLOCK=16), failing,
             lambda: launch_mod.launch(kernel, (1,), (9,), num_stages=1, BLOCK=32)]
    launch_mod.precompile(calls, threads=2)
    assert ran == ["failing"]
    assert kernel.warmups == [
        ((7, 8), (3, 2, 1), {"BLOCK": 16, "num_warps": 2, "num_stages": 3, "launch_pdl": True}),
        ((9,), (1,), {"BLOCK": 32, "num_warps": 4, "num_stages": 1}),
    ]
    assert not launch_mod._PRECOMPILING.get()  # after it, launch() launches again


@pytest.mark.parametrize("why", ["interpreter", "no async compile in this Triton"])
def test_precompile_is_a_no_op(monkeypatch, why):
    monkeypatch.setattr(launch_mod, "interpreting", lambda: why == "interpreter")
    if why != "interpreter":
        monkeypatch.setattr(launch_mod, "_async_compile", None)
    launch_mod.precompile([lambda: pytest.fail("a call ran")])
