import resource, time, pytest
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter(); m0 = time.clock_gettime(time.CLOCK_MONOTONIC)
    yield
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(f"  [minflt {r1.ru_minflt - r0.ru_minflt} majflt {r1.ru_majflt - r0.ru_majflt} sys {r1.ru_stime - r0.ru_stime:.2f}s user {r1.ru_utime - r0.ru_utime:.2f}s wall {time.perf_counter() - t0:.2f}s mono {m0:.3f}-{time.clock_gettime(time.CLOCK_MONOTONIC):.3f}]", flush=True)
