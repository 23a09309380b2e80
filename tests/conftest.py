import os

from hypothesis import HealthCheck, settings

# "ci" (the default) keeps the suite within minutes on 2 cores and draws the same examples on every
# run (derandomized: a submission's CI cannot fail on a case no one has seen); "thorough" draws
# 1000 fresh random examples per property for a long local search.
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
