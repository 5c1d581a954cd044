"""Where does a training step spend its time? A profiler that times every op, forward and backward apart.

    from minivit.profile import profile_step
    print(profile_step(model, images, labels))

``Profiler`` is a context manager: while it is active, every op's forward and backward is timed (on the GPU
each timing waits for the device, so the numbers are real but the step is slower than without the profiler).
"""

import time
from collections import defaultdict

from minivit import devices, function
from minivit import functional as F


class Profiler:
    """Collects (op, phase) -> [calls, seconds] while active; ``table()`` prints them."""

    def __init__(self):
        self.stats = defaultdict(lambda: [0, 0.0])
        self.wall = 0.0
        self.steps = 0
        self._t0 = None

    def __enter__(self):
        if any(isinstance(getattr(h, "__self__", None), Profiler) for h in function._hooks):
            raise RuntimeError("a Profiler is already active")
        self._watch = function.hook(self._time_op)
        self._watch.__enter__()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._watch.__exit__(None, None, None)
        self.wall += time.perf_counter() - self._t0
        return False

    def _time_op(self, fn, phase, compute, inputs):
        t0 = time.perf_counter()
        result = compute()
        first = result[0] if isinstance(result, tuple) else result
        devices.synchronize(getattr(first, "data", first))
        self.record(type(fn).__name__, phase, time.perf_counter() - t0)
        return result

    def record(self, name, phase, seconds):
        entry = self.stats[(name, phase)]
        entry[0] += 1
        entry[1] += seconds

    def section(self, name):
        """Time a block that is not an op (the optimizer step, data loading) under ``name``."""
        profiler = self

        class _Section:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                profiler.record(name, "-", time.perf_counter() - self.t0)
                return False
        return _Section()

    def table(self, per_step=True):
        """The ops sorted by time: calls, milliseconds and share of the profiled wall time."""
        steps = max(self.steps, 1) if per_step else 1
        total = self.wall / steps
        rows = sorted(self.stats.items(), key=lambda kv: -kv[1][1])
        accounted = sum(s for _, (_, s) in rows) / steps
        width = max([len(name) for (name, _), _ in rows] + [10])
        unit = "per step" if per_step and self.steps else "in total"
        lines = [f"{'op':<{width}}  {'phase':<8}  {'calls':>6}  {'ms':>9}  {'share':>6}   ({unit}; wall "
                 f"{1e3 * total:.1f} ms, {100 * accounted / max(total, 1e-12):.0f}% inside ops)",
                 "-" * (width + 42)]
        for (name, phase), (calls, seconds) in rows:
            ms = 1e3 * seconds / steps
            lines.append(f"{name:<{width}}  {phase:<8}  {calls // steps:>6}  {ms:>9.2f}  "
                         f"{100 * seconds / steps / max(total, 1e-12):>5.1f}%")
        return "\n".join(lines)

    def by_phase(self):
        """Seconds per step spent in forward, backward and elsewhere ('-')."""
        totals = defaultdict(float)
        for (_, phase), (_, seconds) in self.stats.items():
            totals[phase] += seconds / max(self.steps, 1)
        return dict(totals)

    __str__ = table


def profile_step(model, images, labels, optimizer=None, steps=3, warmup=1, label_smoothing=0.0):
    """Run ``warmup + steps`` training steps and return a Profiler holding the timings of the last ``steps``.

    A step is forward, cross-entropy, backward and (if given) ``optimizer.step()``.
    """
    xp = devices.get_array_module(model.parameters()[0].data)

    def step(profiler=None):
        loss = F.cross_entropy(model(images), labels, label_smoothing=label_smoothing)
        if optimizer is not None:
            optimizer.zero_grad()
        loss.backward()
        if optimizer is not None:
            if profiler is not None:
                with profiler.section("optimizer.step"):
                    optimizer.step()
            else:
                optimizer.step()
        if xp.__name__ == "cupy":
            xp.cuda.Device().synchronize()

    for _ in range(warmup):
        step()
    profiler = Profiler()
    with profiler:
        for _ in range(steps):
            step(profiler)
    profiler.steps = steps
    return profiler
