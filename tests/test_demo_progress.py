"""The demos' progress: in a pipe or a log (no terminal), whole lines at an interval, never a bare carriage return."""

from __future__ import annotations

from opendelta.demo import progress as progress_module


def test_progress_off_a_terminal_writes_the_start_and_the_end_as_whole_lines(capsys, monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 3600.0)  # no line in between
    with progress_module.progress(total=50, desc="training lora", unit="step") as bar:
        for _ in range(50):
            bar.set_postfix(loss="0.5")  # a postfix refreshes tqdm's bar on every step
            bar.update()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("training lora:   0%") and "0/50" in lines[0]
    assert lines[1].startswith("training lora: 100%") and "50/50" in lines[1] and "loss=0.5" in lines[1]


def test_progress_off_a_terminal_writes_a_line_per_interval(capsys, monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 0.0)  # every refresh is due
    for _ in progress_module.progress(range(3), desc="answering", mininterval=0):  # tqdm's own throttle off
        pass
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("|")[0] for line in lines] == [
        "answering:   0%", "answering:  33%", "answering:  67%", "answering: 100%"
    ]
