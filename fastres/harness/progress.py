"""Progress of long runs: a bar on a terminal (tqdm when installed), a line per result in a log."""


from __future__ import annotations

import sys


class _NoBar:
    def __init__(self, total):
        self.total = total

    def update(self, n=1):
        pass

    def set_description(self, s):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass

    @staticmethod
    def write(s):
        print(s)


_BAR = None


def progress_bar(total: int, enabled: bool):
    global _BAR
    if enabled:
        try:
            from tqdm.auto import tqdm

            _BAR = tqdm(total=total, unit="step", leave=False, file=sys.stderr,
                        dynamic_ncols=True)
            return _BAR
        except ImportError:
            pass
    _BAR = _NoBar(total)
    return _BAR


def emit(line: str) -> None:
    """Print a line without breaking the progress bar."""
    if _BAR is not None and not isinstance(_BAR, _NoBar):
        _BAR.write(line)
    else:
        print(line, flush=True)
