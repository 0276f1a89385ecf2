"""The training loop's progress lines (jobs.progress.ProgressLog), on a fake clock."""

from __future__ import annotations

from jobs.progress import ProgressLog


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def test_lines_at_first_step_every_n_steps_and_last_step() -> None:
    clock = FakeClock()
    lines: list[str] = []
    progress = ProgressLog(
        total_steps=7, every_steps=3, every_s=60.0, clock=clock, write=lines.append
    )
    for step in range(1, 8):
        clock.now_s += 0.5  # 0.5 s a step of 100 samples: 200 samples/s
        progress.step(step, loss=1.0 / step, samples=100)
    assert lines == [
        "step 1/7  loss 1.0000  200 samples/s",
        "step 4/7  loss 0.2500  200 samples/s",
        "step 7/7  loss 0.1429  200 samples/s",
    ]


def test_a_slow_step_writes_a_line_once_every_s_have_passed() -> None:
    clock = FakeClock()
    lines: list[str] = []
    progress = ProgressLog(
        total_steps=1000, every_steps=100, every_s=5.0, clock=clock, write=lines.append
    )
    progress.step(1, loss=2.0, samples=32)
    clock.now_s += 4.0
    progress.step(2, loss=1.9, samples=32)  # 4 s since the last line: not yet
    clock.now_s += 1.0
    progress.step(3, loss=1.8, samples=2000)
    assert lines[1:] == ["step 3/1000  loss 1.8000  406 samples/s"]  # 2032 samples in 5 s


def test_throughput_uses_thousands_separators() -> None:
    clock = FakeClock()
    lines: list[str] = []
    progress = ProgressLog(total_steps=2, clock=clock, write=lines.append)
    clock.now_s += 0.01
    progress.step(1, loss=0.5, samples=18_300)
    assert lines == ["step 1/2  loss 0.5000  1,830,000 samples/s"]
