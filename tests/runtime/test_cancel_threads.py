"""Canny2Image.process(cancel=...) stops at the next DDIM step, and one Canny2Image (or one model)
used from several threads gives the images serial calls with the same seeds give (tiny model,
CPU, real threads)."""
import threading

import numpy as np
import pytest

from runtime.canny2image import Canny2Image
from runtime.errors import Cancelled
from runtime.sample import sample_image
from runtime.weights import build_model
from tests.conftest import TINY_CONFIG

ARGS = dict(prompt="a house", a_prompt="best quality", n_prompt="lowres", num_samples=1,
            image_resolution=256, ddim_steps=3, guess_mode=False, strength=1.0, scale=9.0,
            eta=0.0, low_threshold=100, high_threshold=200)


@pytest.fixture(scope="module")
def model():
    return build_model(TINY_CONFIG, random_weights=True, device="cpu", seed=0)


@pytest.fixture(scope="module")
def image():
    return sample_image(320, 256)


def test_cancel_stops_at_the_next_step(model, image):
    pipe = Canny2Image(model)
    cancel, steps = threading.Event(), []

    def progress(done, total):
        steps.append(done)
        if done == 2:
            cancel.set()               # as another thread would, during step 2
    with pytest.raises(Cancelled, match="after DDIM step 2 of 10"):
        pipe.process(image, **{**ARGS, "ddim_steps": 10}, seed=1, progress=progress,
                     cancel=cancel)
    assert steps == [1, 2]
    # nothing is left behind: the next call runs, and gives what a fresh pipeline gives
    again = pipe.process(image, **ARGS, seed=1)
    fresh = Canny2Image(model).process(image, **ARGS, seed=1)
    for a, b in zip(again, fresh):
        np.testing.assert_array_equal(a, b)


def test_cancel_in_fast_mode_leaves_the_runner_usable(image):
    """Fast mode (on the CPU here): stopped after step 1; the next call gives the same images
    as the call before the cancelled one."""
    from runtime.fast import FastOptions

    model = build_model(TINY_CONFIG, random_weights=True, device="cpu", seed=0)
    pipe = Canny2Image(model, mode="fast", options=FastOptions.for_device("cpu"))
    try:
        before = pipe.process(image, **ARGS, seed=1)
        cancel, steps = threading.Event(), []
        with pytest.raises(Cancelled, match="after DDIM step 1 of 3"):
            pipe.process(image, **ARGS, seed=1, cancel=cancel,
                         progress=lambda done, total: (steps.append(done), cancel.set()))
        assert steps == [1]
        for a, b in zip(before, pipe.process(image, **ARGS, seed=1)):
            np.testing.assert_array_equal(a, b)
    finally:
        pipe.close()


def test_cancel_set_before_the_start_runs_no_step(model, image):
    cancel, steps = threading.Event(), []
    cancel.set()
    with pytest.raises(Cancelled, match="before the first"):
        Canny2Image(model).process(image, **ARGS, seed=1, cancel=cancel,
                                   progress=lambda done, total: steps.append(done))
    assert steps == []


def test_cancel_from_another_thread(model, image):
    """A thread sets the event while the call runs in this one: it ends long before 100 steps."""
    pipe, cancel, steps = Canny2Image(model), threading.Event(), []
    started = threading.Event()

    def progress(done, total):
        steps.append(done)
        started.set()
    timer = threading.Thread(target=lambda: (started.wait(60), cancel.set()))
    timer.start()
    with pytest.raises(Cancelled):
        pipe.process(image, **{**ARGS, "ddim_steps": 100}, seed=1, progress=progress,
                     cancel=cancel)
    timer.join()
    assert 1 <= len(steps) < 100


def _in_threads(calls):
    """Run each call (a function of no argument) in its own thread, all started together."""
    results, errors = [None] * len(calls), []
    barrier = threading.Barrier(len(calls))

    def run(i):
        try:
            barrier.wait(30)
            results[i] = calls[i]()
        except Exception as e:       # reported below: a thread's exception would be lost
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return results


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_one_pipeline_from_several_threads_gives_the_serial_images(model, image, eta):
    """Each thread with its own seed and strength (control scales are model state)."""
    pipe = Canny2Image(model)
    jobs = [dict(ARGS, eta=eta, seed=seed, strength=strength)
            for seed, strength in [(1, 1.0), (2, 0.5), (3, 1.5), (4, 0.0)]]
    serial = [pipe.process(image, **job) for job in jobs]
    threaded = _in_threads([lambda job=job: pipe.process(image, **job) for job in jobs])
    for s, t in zip(serial, threaded):
        for a, b in zip(s, t):
            np.testing.assert_array_equal(a, b)


def test_two_pipelines_on_two_models_at_once_give_the_serial_images(image):
    """Two models (two GPUs in the demo): their runs overlap, yet no run reseeds the other's
    generators between its seeding and its draws (eta > 0 draws every step)."""
    models = [build_model(TINY_CONFIG, random_weights=True, device="cpu", seed=0)
              for _ in range(2)]
    pipes = [Canny2Image(m) for m in models]
    jobs = [(pipes[i % 2], dict(ARGS, eta=eta, seed=10 + i)) for i, eta in
            enumerate([0.0, 0.0, 0.5, 0.5])]
    serial = [p.process(image, **job) for p, job in jobs]
    threaded = _in_threads([lambda p=p, job=job: p.process(image, **job) for p, job in jobs])
    for s, t in zip(serial, threaded):
        for a, b in zip(s, t):
            np.testing.assert_array_equal(a, b)


def test_a_reference_run_at_eta_0_does_not_draw_into_another_runs_noise(image):
    """Upstream's sampler draws every step even at eta 0. Forced interleaving: a reference run
    at eta 0 (model B) is between steps when a run at eta 0.5 (model A) starts; A's step 1 then
    waits for B's step 2. Without the lock B's draws land between A's seeding and A's draws; with
    it A waits for B to finish (each wait gives up after 3 s), and A's images are the serial ones."""
    models = [build_model(TINY_CONFIG, random_weights=True, device="cpu", seed=0)
              for _ in range(2)]
    job_a, job_b = dict(ARGS, eta=0.5, seed=21), dict(ARGS, eta=0.0, seed=22)
    serial_a = Canny2Image(models[0]).process(image, **job_a)
    b_between_steps, a_stepped, b_stepped_again = (threading.Event() for _ in range(3))

    def progress_b(done, total):
        if done == 1:
            b_between_steps.set()
            a_stepped.wait(3)
        else:
            b_stepped_again.set()

    def progress_a(done, total):
        a_stepped.set()
        if done == 1:
            b_stepped_again.wait(3)

    def run_a():
        b_between_steps.wait(60)
        return Canny2Image(models[0]).process(image, **job_a, progress=progress_a)
    threaded_a, _ = _in_threads([run_a, lambda: Canny2Image(models[1]).process(
        image, **job_b, progress=progress_b)])
    for s, t in zip(serial_a, threaded_a):
        np.testing.assert_array_equal(s, t)
